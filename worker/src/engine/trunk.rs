//! What the ascent asks of a network: the [`Trunk`] trait, implemented by the hand-written CPU
//! trunk ([`super::cpu_trunk`]) and the candle device trunk ([`super::device_trunk`]), and the
//! checks and measures they share.

use std::any::Any;

use vgg_atlas_proto::layers::{Layer, DENSE_INPUT_SIZE};
use vgg_atlas_proto::Objective;

use crate::{Error, Result};

/// A target filter's response on one image: spatial means before and after the ReLU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    pub pre: f32,
    pub post: f32,
}

impl Scores {
    /// The quantity `objective` maximises.
    pub fn target(&self, objective: Objective) -> f32 {
        match objective {
            Objective::PreRelu => self.pre,
            Objective::PostRelu => self.post,
            Objective::PostReluWake if self.post > 0.0 => self.post,
            Objective::PostReluWake => self.pre,
        }
    }
}

/// One filter's response to one real image (the dataset-examples pass): its post-ReLU spatial
/// mean (the *activation*, as everywhere else) and the position `(y, x)` of its largest value
/// in the layer's feature map, with that value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Peak {
    pub activation: f32,
    pub max: f32,
    pub y: u32,
    pub x: u32,
}

/// Every conv layer's [`Peak`]s for one image: `[layer][filter]`, the 13 conv layers in order.
pub type ImagePeaks = Vec<Vec<Peak>>;

/// Something that can evaluate a batch of images against per-image target filters and return
/// the gradient of each image's objective w.r.t. its (preprocessed) network input. It is `Any`
/// so that the ascent can tell a device trunk, whose images it keeps on the device, from one
/// it feeds from the host (see `ascent::ascend`).
pub trait Trunk: Any {
    #[allow(clippy::too_many_arguments)]
    /// `input`: B images, NHWC `[B, h, w, 3]`, already preprocessed for the network. If `grad`
    /// is given it receives d(objective_b)/d(input_b) in the same layout.
    fn run(
        &mut self,
        layer: Layer,
        filters: &[usize],
        h: usize,
        w: usize,
        input: &[f32],
        objective: Objective,
        grad: Option<&mut [f32]>,
    ) -> Result<Vec<Scores>>;

    /// One forward pass of `batch` images (NHWC `[batch, side, side, 3]`, preprocessed) through
    /// all 13 conv layers, keeping every filter's [`Peak`]: the dataset-examples pass.
    fn peaks(&mut self, batch: usize, side: usize, input: &[f32]) -> Result<Vec<ImagePeaks>>;
}

/// The smallest image the peaks pass takes: block5_conv3 needs at least one position.
pub const MIN_PEAKS_SIDE: usize = 16;

/// Refuses a peaks request whose input does not match its shape or is too small.
pub fn check_peaks_request(batch: usize, side: usize, input: &[f32]) -> Result<()> {
    if side < MIN_PEAKS_SIDE {
        return Err(Error::Invalid(format!(
            "a {side}x{side} image is too small for the examples pass; block5_conv3 needs at least \
             {MIN_PEAKS_SIDE}x{MIN_PEAKS_SIDE}"
        )));
    }
    if batch == 0 || input.len() != batch * side * side * 3 {
        return Err(Error::Invalid(format!(
            "the examples pass got {} floats for {batch} images of {side}x{side} (expected {})",
            input.len(),
            batch * side * side * 3
        )));
    }
    Ok(())
}

/// `||a - b|| / ||b||` (L2, in f64): how far a trunk's output is from a reference's.
pub fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// What every trunk refuses before computing: filters out of range, an image too small for
/// the layer, a dense layer on an image that does not pool down to 7x7.
pub fn check_request(layer: Layer, filters: &[usize], h: usize, w: usize) -> Result<()> {
    if let Some(&f) = filters.iter().find(|&&f| f >= layer.filters()) {
        return Err(Error::Invalid(format!(
            "filter {f} is out of range for {} (0..{})",
            layer.name,
            layer.filters()
        )));
    }
    if layer.output_side(h.min(w)) == 0 {
        return Err(Error::Invalid(format!(
            "a {h}x{w} image is too small for {}: it has no pixels left after {} pools",
            layer.name,
            layer.pools_before()
        )));
    }
    if !layer.is_conv() && (layer.output_side(h) != 7 || layer.output_side(w) != 7) {
        return Err(Error::Invalid(format!(
            "{} needs a {DENSE_INPUT_SIZE}x{DENSE_INPUT_SIZE} image (7x7 after the last pool), got {h}x{w}",
            layer.name
        )));
    }
    Ok(())
}

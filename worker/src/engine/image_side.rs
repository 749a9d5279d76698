//! What the ascent driver ([`super::ascent`]) asks of a backend's images: the [`ImageSide`]
//! trait, implemented on the host ([`super::host_images`]) and on a candle device
//! ([`super::device_images`]), and the [`Target`]s it optimises.

use vgg_atlas_proto::{filter_seed, Layer, Settings};

use super::profile::Phases;
use super::transform::Affine;
use super::trunk::Scores;
use crate::Result;

/// One filter to visualize and the seed of its start image and transforms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target {
    pub filter: usize,
    pub seed: u64,
}

impl Target {
    /// Filter `filter` of `layer` with the seed the planner gives it for these settings (a
    /// lease carries the same seed; a worker uses the lease's).
    pub fn planned(s: &Settings, layer: &Layer, filter: usize) -> Target {
        Target {
            filter,
            seed: filter_seed(s.seed, layer.index as u64, filter as u64),
        }
    }
}

/// One step's evaluation of every image of a batch, as the driver needs it.
pub struct Evaluation {
    /// The target filter's scores on each image's view.
    pub scores: Vec<Scores>,
    /// The regularizers' value on each image (0 if the settings have none).
    pub regularizers: Vec<f64>,
    /// Whether each image's gradient w.r.t. its parameters is finite (all true when no
    /// gradient was asked for).
    pub grad_finite: Vec<bool>,
}

/// The images of one batch on one backend: their parameters, optimiser states and last good
/// parameters. The driver owns every decision; an image side carries them out.
pub trait ImageSide {
    /// Renders every `active` image (a side may compute the others too; their values are
    /// ignored) from its parameters, views it through `affines[i]`, and
    /// scores it on the trunk; with `want_grad`, also computes (and keeps, for [`Self::update`])
    /// the gradient of its objective w.r.t. its parameters, poisoned with NaN for image
    /// `poison` (a test fault).
    fn evaluate(
        &mut self,
        affines: &[Affine],
        active: &[bool],
        want_grad: bool,
        poison: Option<usize>,
    ) -> Result<Evaluation>;

    /// Per image `i`: if `good[i]`, its current parameters become its last good ones; if
    /// `restore[i]`, it goes back to its last good parameters with a fresh optimiser state;
    /// if `step[i]`, it takes one optimiser step with step size `lr[i]` along the gradient of
    /// the last evaluation. Returns whether each image's parameters are finite afterwards.
    fn update(
        &mut self,
        good: &[bool],
        restore: &[bool],
        step: &[bool],
        lr: &[f32],
    ) -> Result<Vec<bool>>;

    /// The images as last rendered: 0..255 RGB, HWC, one vector per image.
    fn images(&mut self) -> Result<Vec<Vec<f32>>>;

    /// The wall time of each phase of the steps so far, where the side measures it (the host
    /// does; a device side, whose kernels run asynchronously, does not).
    fn phases(&self) -> Option<&Phases> {
        None
    }
}

//! What the ascent records of each image, wherever it runs, and the result it makes of it: the
//! scores after each step, the retry policy for non-finite values, and the final 8-bit image.

use rand::{Rng, SeedableRng};
use vgg_atlas_proto::{Layer, Parameterization, SecondAscent, Settings};

use super::trunk::Scores;
use crate::{Error, Result};

/// What the engine returns per filter.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FilterResult {
    pub layer: String,
    pub filter: usize,
    /// Final post-ReLU mean activation of the filter on its image: the score.
    pub activation: f32,
    /// The optimised objective at the end: the target (pre- or post-ReLU mean) minus the regularizers.
    pub objective: f32,
    pub start_activation: f32,
    /// The filter's mean response before the ReLU on the final image: below 0 when the
    /// image's silent positions outweigh those where it fires.
    pub pre_activation: f32,
    /// Post-ReLU activation after each step.
    pub curve: Vec<f32>,
    /// Activation 0 from start to end: no setting of this run could raise it.
    pub dead: bool,
    /// Why the filter failed (non-finite values that retries could not avoid); None if it did
    /// not. `failed` in `visualize`'s JSON (its key since the first release).
    #[serde(rename = "failed")]
    pub failed_reason: Option<String>,
    /// Number of steps that produced non-finite values and were retried with a smaller step.
    pub retries: u32,
    pub seconds: f32,
    /// Set when the filter was ascended a second time (`Settings::second_ascent`): both
    /// ascents' activations, as they go on the wire; the image kept is that of the higher one
    /// (the first on a tie).
    pub second_ascent: Option<SecondAscent>,
    /// The image, RGB 8-bit, `size x size` (deprocessed: standardised to std 0.1 around 0.5).
    #[serde(skip)]
    pub image: Option<image::RgbImage>,
}

/// How many times one image may retry a step that produced NaN/Inf before it is failed.
pub const MAX_RETRIES: u32 = 4;

/// What is recorded of one image's ascent, wherever it runs.
#[derive(Default)]
pub(crate) struct Record {
    pub start: f32,
    pub curve: Vec<f32>,
    pub failed_reason: Option<String>,
    pub retries: u32,
    /// The objective at the last finite scoring: the target minus the regularizers.
    pub objective: f32,
    /// The pre-ReLU mean at the last finite scoring.
    pub pre: f32,
}

impl Record {
    pub fn new(steps: usize) -> Record {
        Record {
            curve: Vec::with_capacity(steps),
            ..Record::default()
        }
    }

    /// Records a step's scores and returns the objective's target, or None if they are not
    /// finite (the step must be retried).
    pub fn score(&mut self, step: usize, sc: &Scores, s: &Settings) -> Option<f32> {
        let target = sc.target(s.objective);
        if !sc.post.is_finite() || !target.is_finite() {
            return None;
        }
        self.pre = sc.pre;
        if step == 0 {
            self.start = sc.post;
        } else {
            self.curve.push(sc.post);
        }
        Some(target)
    }

    /// Counts a retry of `step` (the caller restores the image and halves its step size); fails
    /// the filter after [`MAX_RETRIES`].
    pub fn retry(&mut self, step: usize, what: &str) {
        self.retries += 1;
        if self.retries > MAX_RETRIES {
            self.failed_reason = Some(format!("{what} at step {step}; still non-finite after {MAX_RETRIES} retries with smaller steps"));
        }
    }

    /// The filter's result, from its record and its final image `x` (0..255 RGB, HWC).
    pub fn finish(
        self,
        layer: &Layer,
        filter: usize,
        s: &Settings,
        x: &[f32],
        seconds: f32,
    ) -> FilterResult {
        let activation = self.curve.last().copied().unwrap_or(self.start);
        let dead = self.failed_reason.is_none()
            && self.start == 0.0
            && self.curve.iter().all(|&a| a == 0.0);
        let image = self
            .failed_reason
            .is_none()
            .then(|| match s.parameterization {
                Parameterization::Pixels => deprocess(x, s.size),
                // Already in the valid range: shown as it is.
                Parameterization::Fourier => to_rgb8(x, s.size),
            });
        FilterResult {
            layer: layer.name.to_string(),
            filter,
            activation,
            objective: if self.objective.is_finite() {
                self.objective
            } else {
                0.0
            },
            start_activation: self.start,
            pre_activation: self.pre,
            curve: self.curve,
            dead,
            failed_reason: self.failed_reason,
            retries: self.retries,
            seconds,
            second_ascent: None,
            image,
        }
    }
}

/// An image as PNG bytes, as a worker sends it.
pub fn encode_png(img: &image::RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Invalid(format!("cannot encode PNG: {e}")))?;
    Ok(bytes)
}

/// The start image in pixels: `(uniform(0,1) - 0.5) * 20 + 128`, RGB, from the filter's seed.
pub fn start_pixels(seed: u64, size: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..size * size * 3)
        .map(|_| (rng.random::<f32>() - 0.5) * 20.0 + 128.0)
        .collect()
}

/// A [0, 255] image to 8-bit as it is.
fn to_rgb8(x: &[f32], size: usize) -> image::RgbImage {
    let bytes: Vec<u8> = x
        .iter()
        .map(|&v| v.clamp(0.0, 255.0).round() as u8)
        .collect();
    image::RgbImage::from_raw(size as u32, size as u32, bytes).expect("size*size*3 bytes")
}

/// Pixels to an 8-bit image the way the Keras tutorial shows them: standardise, std 0.1
/// around 0.5, clip.
pub fn deprocess(x: &[f32], size: usize) -> image::RgbImage {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let bytes: Vec<u8> = x
        .iter()
        .map(|&v| {
            ((((v as f64 - mean) / (std + 1e-5)) * 0.1 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8
        })
        .collect();
    image::RgbImage::from_raw(size as u32, size as u32, bytes).expect("size*size*3 bytes")
}

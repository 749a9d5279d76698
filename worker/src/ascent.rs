//! The ascent engine: batched activation maximization with the natural-image priors of
//! Mahendran & Vedaldi (Lp norm, total variation), per-image normalised gradients and RMSprop,
//! as in keras-vis. B filters of one layer are optimised at once, one image per filter; every
//! per-image quantity (regularizers, normalisation, RMSprop state, seed) stays per image, so a
//! filter's result does not depend on the batch it was computed in.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::fourier::{Adam, Fourier};
use crate::layers::Layer;
use crate::transform::Affine;
use crate::trunk::{Objective, Scores, Trunk};
use crate::weights::Preprocess;
use crate::{Error, Result};

/// How the image is represented while it is optimised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Parameterization {
    /// The pixels themselves (the Keras blog, keras-vis), shown standardised at the end.
    Pixels,
    /// lucid's scaled Fourier spectrum with decorrelated colour and a sigmoid.
    Fourier,
}

/// The ascent's update rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    /// RMSprop on the per-image RMS-normalised gradient (keras-vis).
    Rmsprop,
    /// Adam on the raw gradient (lucid).
    Adam,
}

/// A named bundle of method settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The Keras blog's method as first written here: pixels, Lp + TV weight 10, 20 steps.
    Quick,
    /// keras-vis / tf-keras-vis: pixels, Lp + TV (weight 1), jitter and a small rotation,
    /// RMSprop, 200 steps.
    KerasVis,
    /// lucid: Fourier parameterisation, decorrelated colour, transformation robustness, Adam,
    /// 256 steps.
    Lucid,
    /// The default: lucid's method at 64 steps, chosen by measurement (README.md, "Presets").
    Atlas,
}

impl Preset {
    pub const ALL: [Preset; 4] = [
        Preset::Atlas,
        Preset::Quick,
        Preset::KerasVis,
        Preset::Lucid,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Preset::Quick => "quick",
            Preset::KerasVis => "keras-vis",
            Preset::Lucid => "lucid",
            Preset::Atlas => "atlas",
        }
    }

    pub fn by_name(name: &str) -> Result<Preset> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown preset '{name}'; the presets are {}",
                    Preset::ALL.map(|p| p.name()).join(", ")
                ))
            })
    }

    /// The preset's settings (at 128 px, seed 0).
    pub fn settings(&self) -> Settings {
        let quick = Settings {
            preset: *self,
            size: 128,
            steps: 20,
            seed: 0,
            objective: Objective::PreRelu,
            parameterization: Parameterization::Pixels,
            optimizer: Optimizer::Rmsprop,
            learning_rate: 1.0,
            rmsprop_decay: 0.95,
            lp_norm_p: 6.0,
            lp_norm_weight: 10.0,
            tv_beta: 2.0,
            tv_weight: 10.0,
            fourier_decay: 1.0,
            jitter: 0,
            rotate_degrees: 0.0,
            scale_jitter: 0.0,
            inject_nan_filter: None,
        };
        match self {
            Preset::Quick => quick,
            Preset::KerasVis => Settings {
                steps: 200,
                tv_weight: 1.0,
                jitter: 4,
                rotate_degrees: 1.0,
                ..quick
            },
            Preset::Atlas => Settings {
                preset: Preset::Atlas,
                steps: 64,
                ..Preset::Lucid.settings()
            },
            Preset::Lucid => Settings {
                steps: 256,
                parameterization: Parameterization::Fourier,
                optimizer: Optimizer::Adam,
                learning_rate: 0.05,
                lp_norm_weight: 0.0,
                tv_weight: 0.0,
                jitter: 8,
                rotate_degrees: 10.0,
                scale_jitter: 0.1,
                ..quick
            },
        }
    }
}

/// Every parameter that changes an image. Serialised with each result.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// The preset these settings started from (flags may have changed some values; all of
    /// them are recorded).
    pub preset: Preset,
    pub size: usize,
    pub steps: usize,
    pub seed: u64,
    pub objective: Objective,
    pub parameterization: Parameterization,
    pub optimizer: Optimizer,
    pub learning_rate: f32,
    /// RMSprop's decay of the squared-gradient average.
    pub rmsprop_decay: f32,
    pub lp_norm_p: f32,
    pub lp_norm_weight: f32,
    pub tv_beta: f32,
    pub tv_weight: f32,
    /// Fourier parameterisation: frequency f is scaled by 1/f^decay.
    pub fourier_decay: f32,
    /// Transformation robustness: random shift up to this many pixels each way per step.
    pub jitter: u32,
    /// ... random rotation up to this many degrees each way.
    pub rotate_degrees: f32,
    /// ... random scale in 1 ± this.
    pub scale_jitter: f32,
    /// Test-only fault injection: the filter whose gradient is poisoned with NaN every step.
    #[serde(skip)]
    pub inject_nan_filter: Option<usize>,
}

/// Test hook: `VGG_ATLAS_TEST_INJECT_NAN_FILTER=N` poisons filter N's gradient with NaN (in
/// `visualize` and in every worker), to show a failing filter is retried, then recorded as
/// failed, and never stored as a NaN.
pub fn test_inject_nan_filter() -> Option<usize> {
    std::env::var("VGG_ATLAS_TEST_INJECT_NAN_FILTER")
        .ok()?
        .parse()
        .ok()
}

/// The default preset: see README.md for the measurement behind the choice.
pub const DEFAULT_PRESET: Preset = Preset::Atlas;

impl Default for Settings {
    fn default() -> Self {
        DEFAULT_PRESET.settings()
    }
}

impl Settings {
    /// Refuses settings that cannot work for `layer`, before anything is computed or written.
    pub fn check(&self, layer: &Layer) -> Result<()> {
        if self.size == 0 || layer.output_side(self.size) == 0 {
            return Err(Error::Invalid(format!(
                "size {} is too small for {}: it is downsampled {} times, so the size must be at least {}",
                self.size,
                layer.name,
                layer.pools_before(),
                1 << layer.pools_before()
            )));
        }
        if !layer.is_conv() && layer.output_side(self.size) != 7 {
            return Err(Error::Invalid(format!(
                "{} needs --size {}: the classifier takes the 7x7 map after the last pool",
                layer.name,
                crate::layers::DENSE_INPUT_SIZE
            )));
        }
        let finite = [
            self.learning_rate,
            self.rmsprop_decay,
            self.lp_norm_p,
            self.lp_norm_weight,
            self.tv_beta,
            self.tv_weight,
            self.fourier_decay,
            self.rotate_degrees,
            self.scale_jitter,
        ];
        if finite.iter().any(|v| !v.is_finite())
            || !(0.0..1.0).contains(&self.rmsprop_decay)
            || self.lp_norm_p < 1.0
            || self.tv_beta <= 0.0
        {
            return Err(Error::Invalid(format!(
                "bad method parameters: learning rate {}, RMSprop decay {} (must be in [0, 1)), Lp p {} (>= 1), TV beta {} (> 0)",
                self.learning_rate, self.rmsprop_decay, self.lp_norm_p, self.tv_beta
            )));
        }
        if self.jitter as usize * 2 > self.size
            || !(0.0..=45.0).contains(&self.rotate_degrees)
            || !(0.0..=0.5).contains(&self.scale_jitter)
            || !(0.0..=4.0).contains(&self.fourier_decay)
        {
            return Err(Error::Invalid(format!(
                "bad transform parameters: jitter {} px (at most half the size {}), rotation {} degrees (0..=45), scale jitter {} (0..=0.5), Fourier decay {} (0..=4)",
                self.jitter, self.size, self.rotate_degrees, self.scale_jitter, self.fourier_decay
            )));
        }
        Ok(())
    }
}

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
    /// Post-ReLU activation after each step.
    pub curve: Vec<f32>,
    /// Activation 0 from start to end: no setting of this run could raise it.
    pub dead: bool,
    /// Why the filter failed (non-finite values that retries could not avoid); None if it did not.
    pub failed: Option<String>,
    /// Number of steps that produced non-finite values and were retried with a smaller step.
    pub retries: u32,
    pub seconds: f32,
    /// The image, RGB 8-bit, `size x size` (deprocessed: standardised to std 0.1 around 0.5).
    #[serde(skip)]
    pub image: Option<image::RgbImage>,
}

/// How many times one image may retry a step that produced NaN/Inf before it is failed.
const MAX_RETRIES: u32 = 4;
pub(crate) const EPS: f64 = 1e-7;

/// What is recorded of one image's ascent, wherever it runs.
#[derive(Default)]
pub(crate) struct Record {
    pub start: f32,
    pub curve: Vec<f32>,
    pub failed: Option<String>,
    pub retries: u32,
    /// The objective at the last finite scoring: the target minus the regularizers.
    pub objective: f32,
}

impl Record {
    /// Records a step's scores and returns the objective's target, or None if they are not
    /// finite (the step must be retried).
    pub fn score(&mut self, step: usize, sc: &Scores, s: &Settings) -> Option<f32> {
        let target = s.objective.target(sc);
        if !sc.post.is_finite() || !target.is_finite() {
            return None;
        }
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
            self.failed = Some(format!("{what} at step {step}; still non-finite after {MAX_RETRIES} retries with smaller steps"));
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
        let dead =
            self.failed.is_none() && self.start == 0.0 && self.curve.iter().all(|&a| a == 0.0);
        let image = self.failed.is_none().then(|| match s.parameterization {
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
            curve: self.curve,
            dead,
            failed: self.failed,
            retries: self.retries,
            seconds,
            image,
        }
    }
}

/// The start image of one filter: `(uniform(0,1) - 0.5) * 20 + 128`, RGB, seeded per
/// (run seed, layer, filter).
pub fn start_image(seed: u64, layer: &Layer, filter: usize, size: usize) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(filter_seed(
        seed,
        layer.index as u64,
        filter as u64,
    ));
    (0..size * size * 3)
        .map(|_| (rng.random::<f32>() - 0.5) * 20.0 + 128.0)
        .collect()
}

/// The seed of one filter's start image, from the run seed: a function of (seed, layer,
/// filter) only, so a filter's image never depends on which worker or batch computed it.
pub fn filter_seed(seed: u64, layer: u64, filter: u64) -> u64 {
    // splitmix64 over the three parts, so nearby filters get unrelated streams.
    let mut z = seed
        ^ layer.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ filter.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The optimiser's state for one image.
enum OptState {
    /// RMSprop's squared-gradient average.
    Rmsprop(Vec<f32>),
    Adam(Adam),
}

impl OptState {
    fn new(o: Optimizer, n: usize) -> OptState {
        match o {
            Optimizer::Rmsprop => OptState::Rmsprop(vec![0.0; n]),
            Optimizer::Adam => OptState::Adam(Adam::new(n)),
        }
    }
}

/// Per-image optimiser state.
struct ImageState {
    /// What is optimised: the pixels (0..255 RGB, HWC) or a Fourier spectrum.
    params: Vec<f32>,
    opt: OptState,
    /// The parameters before the current step, to retry it after NaN/Inf.
    last_good: Vec<f32>,
    /// The image in pixels (0..255 RGB, HWC), as the parameters make it.
    x: Vec<f32>,
    /// Pre-sigmoid values of a Fourier image, for its backward pass.
    pre: Vec<f32>,
    /// What the network sees this step: `x` through this step's transform.
    view: Vec<f32>,
    affine: Affine,
    seed: u64,
    lr: f32,
    record: Record,
}

impl ImageState {
    fn new(s: &Settings, layer: &Layer, filter: usize, fourier: Option<&Fourier>) -> ImageState {
        let seed = filter_seed(s.seed, layer.index as u64, filter as u64);
        let params = match fourier {
            None => start_image(s.seed, layer, filter, s.size),
            Some(f) => f.random_spectrum(seed),
        };
        ImageState {
            last_good: params.clone(),
            opt: OptState::new(s.optimizer, params.len()),
            params,
            x: Vec::new(),
            pre: Vec::new(),
            view: Vec::new(),
            affine: Affine::IDENTITY,
            seed,
            lr: s.learning_rate,
            record: Record {
                curve: Vec::with_capacity(s.steps),
                ..Record::default()
            },
        }
    }

    /// Renders the image from the parameters and the network's view of it for `step`: the
    /// first and last steps (start and final scores) see the image as it is, the others
    /// through a random transform.
    fn prepare(&mut self, s: &Settings, fourier: Option<&Fourier>, step: usize) {
        match fourier {
            Some(f) => {
                let (rgb, pre) = f.render(&self.params);
                self.x = rgb.iter().map(|v| v * 255.0).collect();
                self.pre = pre;
            }
            None => self.x.clone_from(&self.params),
        }
        self.affine = if step == 0 || step == s.steps {
            Affine::IDENTITY
        } else {
            Affine::random(self.seed, step, s.jitter, s.rotate_degrees, s.scale_jitter)
        };
        // Outside the image, mid grey.
        self.view = self.affine.apply(&self.x, s.size, 127.5);
    }

    /// Restores the last finite parameters and halves the step, or fails the filter.
    fn retry(&mut self, step: usize, what: &str) {
        self.record.retry(step, what);
        self.params.copy_from_slice(&self.last_good);
        self.opt = match &self.opt {
            OptState::Rmsprop(_) => OptState::Rmsprop(vec![0.0; self.params.len()]),
            OptState::Adam(_) => OptState::Adam(Adam::new(self.params.len())),
        };
        self.lr *= 0.5;
    }
}

/// Optimises one image per filter of `layer`, all in one batch.
pub fn visualize(
    trunk: &mut dyn Trunk,
    preprocess: Preprocess,
    layer: Layer,
    filters: &[usize],
    s: &Settings,
) -> Result<Vec<FilterResult>> {
    if filters.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(&f) = filters.iter().find(|&&f| f >= layer.filters()) {
        return Err(Error::Invalid(format!(
            "filter {f} is out of range: {} has filters 0..{}",
            layer.name,
            layer.filters()
        )));
    }
    s.check(&layer)?;
    if let Some(device) = trunk.device_trunk() {
        // As many at once as the device's memory holds.
        let fit = device.fit_batch(layer, s.size)?.unwrap_or(filters.len());
        let mut results = Vec::with_capacity(filters.len());
        for part in filters.chunks(fit.max(1)) {
            results.extend(crate::device_ascent::visualize(
                device, preprocess, layer, part, s,
            )?);
        }
        return Ok(results);
    }
    let started = Instant::now();
    let n = s.size * s.size * 3;
    let fourier = (s.parameterization == Parameterization::Fourier)
        .then(|| Fourier::new(s.size, s.fourier_decay));
    let mut states: Vec<ImageState> = filters
        .iter()
        .map(|&f| ImageState::new(s, &layer, f, fourier.as_ref()))
        .collect();
    let chans = preprocess.channels();
    let mut input = vec![0.0f32; filters.len() * n];
    let mut grad = vec![0.0f32; filters.len() * n];
    for step in 0..=s.steps {
        states
            .par_iter_mut()
            .filter(|st| st.record.failed.is_none())
            .for_each(|st| st.prepare(s, fourier.as_ref(), step));
        fill_input(&states, &chans, &mut input, n);
        let want_grad = step < s.steps;
        let scores = trunk.run(
            layer,
            filters,
            s.size,
            s.size,
            &input,
            s.objective,
            want_grad.then_some(&mut grad[..]),
        )?;
        states
            .par_iter_mut()
            .zip(grad.par_chunks(n))
            .zip(scores.par_iter())
            .zip(filters.par_iter())
            .for_each(|(((st, g), sc), &f)| {
                if st.record.failed.is_some() {
                    return;
                }
                let Some(target) = st.record.score(step, sc, s) else {
                    st.retry(step, "non-finite activation");
                    return;
                };
                st.last_good.copy_from_slice(&st.params);
                let (reg, reg_grad) = regularizers(&st.x, s.size, s);
                st.record.objective = (target as f64 - reg) as f32;
                if !want_grad {
                    return;
                }
                let poisoned = s.inject_nan_filter == Some(f);
                step_image(
                    st,
                    g,
                    &reg_grad,
                    &chans,
                    s,
                    fourier.as_ref(),
                    poisoned,
                    step,
                );
            });
    }
    let seconds = started.elapsed().as_secs_f32() / filters.len() as f32;
    Ok(states
        .into_iter()
        .zip(filters)
        .map(|(st, &f)| st.record.finish(&layer, f, s, &st.x, seconds))
        .collect())
}

/// Preprocessed network input of every image (its transformed view).
fn fill_input(states: &[ImageState], chans: &[(usize, f32, f32); 3], input: &mut [f32], n: usize) {
    input
        .par_chunks_mut(n)
        .zip(states.par_iter())
        .for_each(|(inp, st)| {
            for (px, rgb) in inp.chunks_exact_mut(3).zip(st.view.chunks_exact(3)) {
                for (c, &(src, scale, off)) in chans.iter().enumerate() {
                    px[c] = scale * rgb[src] + off;
                }
            }
        });
}

/// d(objective)/d(pixels) of one image: the network gradient `g_net` (w.r.t. the preprocessed
/// input) carried back through the preprocessing's transpose, minus the regularizers' gradient.
pub fn pixel_gradient(g_net: &[f32], reg_grad: &[f64], chans: &[(usize, f32, f32); 3]) -> Vec<f64> {
    preprocess_transpose(g_net, chans)
        .iter()
        .zip(reg_grad)
        .map(|(&g, &r)| g as f64 - r)
        .collect()
}

/// The network gradient (w.r.t. the preprocessed input) carried back through the
/// preprocessing's transpose to RGB pixels.
fn preprocess_transpose(g_net: &[f32], chans: &[(usize, f32, f32); 3]) -> Vec<f32> {
    let mut out = vec![0.0f32; g_net.len()];
    for (t, gn) in out.chunks_exact_mut(3).zip(g_net.chunks_exact(3)) {
        for (c, &(src, scale, _)) in chans.iter().enumerate() {
            t[src] += scale * gn[c];
        }
    }
    out
}

/// One ascent step on one image, from the network gradient `g` (w.r.t. its transformed,
/// preprocessed view).
#[allow(clippy::too_many_arguments)]
fn step_image(
    st: &mut ImageState,
    g: &[f32],
    reg_grad: &[f64],
    chans: &[(usize, f32, f32); 3],
    s: &Settings,
    fourier: Option<&Fourier>,
    poisoned: bool,
    step: usize,
) {
    // Back through the transform to the image: the network's part only (the regularizers
    // look at the untransformed image).
    let g_image = st.affine.adjoint(&preprocess_transpose(g, chans), s.size);
    let mut total: Vec<f64> = g_image
        .iter()
        .zip(reg_grad)
        .map(|(&a, &r)| a as f64 - r)
        .collect();
    if poisoned {
        total[0] = f64::NAN;
    }
    // To the parameters: the pixels themselves, or back through the Fourier basis (the image
    // is 255 x its sigmoid output).
    let grad: Vec<f64> = match fourier {
        None => total,
        Some(f) => {
            let g_rgb: Vec<f32> = total.iter().map(|&v| (v * 255.0) as f32).collect();
            f.backward(&st.pre, &g_rgb)
                .into_iter()
                .map(f64::from)
                .collect()
        }
    };
    if grad.iter().any(|v| !v.is_finite()) {
        st.retry(step, "non-finite gradient");
        return;
    }
    let lr = st.lr as f64;
    match &mut st.opt {
        OptState::Rmsprop(cache) => {
            // keras-vis: the gradient normalised by its RMS, then RMSprop.
            let norm = (grad.iter().map(|v| v * v).sum::<f64>() / grad.len() as f64).sqrt() + EPS;
            let decay = s.rmsprop_decay as f64;
            for ((x, c), t) in st.params.iter_mut().zip(cache.iter_mut()).zip(&grad) {
                let g = t / norm;
                let cache = decay * *c as f64 + (1.0 - decay) * g * g;
                *c = cache as f32;
                *x = (*x as f64 + lr * g / (cache + EPS).sqrt()) as f32;
            }
        }
        OptState::Adam(adam) => {
            let g: Vec<f32> = grad.iter().map(|&v| v as f32).collect();
            adam.ascend(&mut st.params, &g, lr as f32);
        }
    }
    if st.params.iter().any(|v| !v.is_finite()) {
        st.retry(step, "non-finite image");
    }
}

/// A [0, 255] image to 8-bit as it is.
fn to_rgb8(x: &[f32], size: usize) -> image::RgbImage {
    let bytes: Vec<u8> = x
        .iter()
        .map(|&v| v.clamp(0.0, 255.0).round() as u8)
        .collect();
    image::RgbImage::from_raw(size as u32, size as u32, bytes).expect("size*size*3 bytes")
}

/// The Lp-norm and total-variation penalties of one image (RGB, HWC) and their gradient, each
/// divided by the number of input elements and weighted. Computed in f64: |x|^6 of pixel
/// values overflows f32's precision long before its range.
pub fn regularizers(x: &[f32], size: usize, s: &Settings) -> (f64, Vec<f64>) {
    let n = x.len() as f64;
    let mut grad = vec![0.0f64; x.len()];
    let mut value = 0.0;
    if s.lp_norm_weight != 0.0 {
        let p = s.lp_norm_p as f64;
        // |v|^(p-1), with powi for integer p (the default 6): powf dominated shallow layers.
        let pow_p1 = |v: f64| -> f64 {
            if p.fract() == 0.0 && p <= 32.0 {
                v.powi(p as i32 - 1)
            } else {
                v.powf(p - 1.0)
            }
        };
        let sum: f64 = x
            .iter()
            .map(|&v| {
                let a = (v as f64).abs();
                pow_p1(a) * a
            })
            .sum();
        let norm = sum.powf(1.0 / p);
        value += s.lp_norm_weight as f64 * norm / n;
        if norm > 0.0 {
            let k = s.lp_norm_weight as f64 / n * norm.powf(1.0 - p);
            for (g, &v) in grad.iter_mut().zip(x) {
                let v = v as f64;
                *g += k * pow_p1(v.abs()) * v.signum();
            }
        }
    }
    if s.tv_weight != 0.0 {
        // Forward differences; the last row has no dy and the last column no dx, but every
        // pixel still contributes through the differences it has.
        let beta = s.tv_beta as f64;
        let k = s.tv_weight as f64 / n;
        let at = |y: usize, xx: usize, c: usize| x[(y * size + xx) * 3 + c] as f64;
        for y in 0..size {
            for xx in 0..size {
                for c in 0..3 {
                    let v = at(y, xx, c);
                    let dx = if xx + 1 < size {
                        at(y, xx + 1, c) - v
                    } else {
                        0.0
                    };
                    let dy = if y + 1 < size {
                        at(y + 1, xx, c) - v
                    } else {
                        0.0
                    };
                    let t = dx * dx + dy * dy;
                    if t == 0.0 {
                        continue;
                    }
                    // beta = 2 (the default) needs no powf.
                    let (tb, tb1) = if beta == 2.0 {
                        (t, 1.0)
                    } else {
                        (t.powf(beta / 2.0), t.powf(beta / 2.0 - 1.0))
                    };
                    value += k * tb;
                    let d = k * beta * tb1;
                    let i = (y * size + xx) * 3 + c;
                    grad[i] -= d * (dx + dy);
                    if xx + 1 < size {
                        grad[i + 3] += d * dx;
                    }
                    if y + 1 < size {
                        grad[i + size * 3] += d * dy;
                    }
                }
            }
        }
    }
    (value, grad)
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

//! The ascent engine: batched activation maximization with the natural-image priors of
//! Mahendran & Vedaldi (Lp norm, total variation), per-image normalised gradients and RMSprop,
//! as in keras-vis. B filters of one layer are optimised at once, one image per filter; every
//! per-image quantity (regularizers, normalisation, RMSprop state, seed) stays per image, so a
//! filter's result does not depend on the batch it was computed in.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::layers::Layer;
use crate::trunk::{Objective, Trunk};
use crate::weights::Preprocess;
use crate::{Error, Result};

/// Every parameter that changes an image. Serialised with each result.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    pub size: usize,
    pub steps: usize,
    pub seed: u64,
    pub objective: Objective,
    pub learning_rate: f32,
    /// RMSprop's decay of the squared-gradient average.
    pub rmsprop_decay: f32,
    pub lp_norm_p: f32,
    pub lp_norm_weight: f32,
    pub tv_beta: f32,
    pub tv_weight: f32,
    /// Test-only fault injection: the filter whose gradient is poisoned with NaN every step.
    #[serde(skip)]
    pub inject_nan_filter: Option<usize>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            size: 128,
            steps: 20,
            seed: 0,
            objective: Objective::PreRelu,
            learning_rate: 1.0,
            rmsprop_decay: 0.95,
            lp_norm_p: 6.0,
            lp_norm_weight: 10.0,
            tv_beta: 2.0,
            tv_weight: 10.0,
            inject_nan_filter: None,
        }
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
const EPS: f64 = 1e-7;

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

/// Per-image optimiser state.
struct ImageState {
    x: Vec<f32>,
    cache: Vec<f32>,
    last_good: Vec<f32>,
    lr: f32,
    retries: u32,
    failed: Option<String>,
    curve: Vec<f32>,
    start: f32,
    objective: f32,
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
    let started = Instant::now();
    let n = s.size * s.size * 3;
    let mut states: Vec<ImageState> = filters
        .iter()
        .map(|&f| {
            let x = start_image(s.seed, &layer, f, s.size);
            ImageState {
                cache: vec![0.0; n],
                last_good: x.clone(),
                x,
                lr: s.learning_rate,
                retries: 0,
                failed: None,
                curve: Vec::with_capacity(s.steps),
                start: 0.0,
                objective: 0.0,
            }
        })
        .collect();
    let chans = preprocess.channels();
    let mut input = vec![0.0f32; filters.len() * n];
    let mut grad = vec![0.0f32; filters.len() * n];
    for step in 0..=s.steps {
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
                if st.failed.is_some() {
                    return;
                }
                let target = s.objective.target(sc);
                if !sc.post.is_finite() || !target.is_finite() {
                    st.retry(step, "non-finite activation");
                    return;
                }
                if step == 0 {
                    st.start = sc.post;
                } else {
                    st.curve.push(sc.post);
                }
                st.last_good.copy_from_slice(&st.x);
                let (reg, reg_grad) = regularizers(&st.x, s.size, s);
                st.objective = (target as f64 - reg) as f32;
                if !want_grad {
                    return;
                }
                let poisoned = s.inject_nan_filter == Some(f);
                step_image(st, g, &reg_grad, &chans, s, poisoned, step);
            });
    }
    let seconds = started.elapsed().as_secs_f32() / filters.len() as f32;
    Ok(states
        .into_iter()
        .zip(filters)
        .map(|(st, &f)| {
            let activation = st.curve.last().copied().unwrap_or(st.start);
            let dead = st.failed.is_none() && st.start == 0.0 && st.curve.iter().all(|&a| a == 0.0);
            let image = st.failed.is_none().then(|| deprocess(&st.x, s.size));
            FilterResult {
                layer: layer.name.to_string(),
                filter: f,
                activation,
                objective: if st.objective.is_finite() {
                    st.objective
                } else {
                    0.0
                },
                start_activation: st.start,
                curve: st.curve,
                dead,
                failed: st.failed,
                retries: st.retries,
                seconds,
                image,
            }
        })
        .collect())
}

impl ImageState {
    /// Restores the last finite image and halves the step, or fails the filter.
    fn retry(&mut self, step: usize, what: &str) {
        self.retries += 1;
        self.x.copy_from_slice(&self.last_good);
        self.cache.fill(0.0);
        self.lr *= 0.5;
        if self.retries > MAX_RETRIES {
            self.failed = Some(format!("{what} at step {step}; still non-finite after {MAX_RETRIES} retries with smaller steps"));
        }
    }
}

/// Preprocessed network input of every image.
fn fill_input(states: &[ImageState], chans: &[(usize, f32, f32); 3], input: &mut [f32], n: usize) {
    input
        .par_chunks_mut(n)
        .zip(states.par_iter())
        .for_each(|(inp, st)| {
            for (px, rgb) in inp.chunks_exact_mut(3).zip(st.x.chunks_exact(3)) {
                for (c, &(src, scale, off)) in chans.iter().enumerate() {
                    px[c] = scale * rgb[src] + off;
                }
            }
        });
}

/// d(objective)/d(pixels) of one image: the network gradient `g_net` (w.r.t. the preprocessed
/// input) carried back through the preprocessing's transpose, minus the regularizers' gradient.
pub fn pixel_gradient(g_net: &[f32], reg_grad: &[f64], chans: &[(usize, f32, f32); 3]) -> Vec<f64> {
    let mut total: Vec<f64> = reg_grad.iter().map(|r| -r).collect();
    for (t, gn) in total.chunks_exact_mut(3).zip(g_net.chunks_exact(3)) {
        for (c, &(src, scale, _)) in chans.iter().enumerate() {
            t[src] += scale as f64 * gn[c] as f64;
        }
    }
    total
}

/// One RMSprop ascent step on one image, from the network gradient `g` (w.r.t. its input).
fn step_image(
    st: &mut ImageState,
    g: &[f32],
    reg_grad: &[f64],
    chans: &[(usize, f32, f32); 3],
    s: &Settings,
    poisoned: bool,
    step: usize,
) {
    let mut total = pixel_gradient(g, reg_grad, chans);
    if poisoned {
        total[0] = f64::NAN;
    }
    let norm = (total.iter().map(|v| v * v).sum::<f64>() / total.len() as f64).sqrt() + EPS;
    if !norm.is_finite() {
        st.retry(step, "non-finite gradient");
        return;
    }
    let decay = s.rmsprop_decay as f64;
    let lr = st.lr as f64;
    for ((x, c), t) in st.x.iter_mut().zip(st.cache.iter_mut()).zip(&total) {
        let g = t / norm;
        let cache = decay * *c as f64 + (1.0 - decay) * g * g;
        *c = cache as f32;
        *x = (*x as f64 + lr * g / (cache + EPS).sqrt()) as f32;
    }
    if st.x.iter().any(|v| !v.is_finite()) {
        st.retry(step, "non-finite image");
    }
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

//! The ascent's images kept on a candle device ([`ImageSide`] around a [`DeviceTrunk`]): the
//! same parameterisations, transforms, preprocessing, regularizers and optimisers as
//! [`super::host_images`] (so the same images up to float rounding), as tensors. Per step only
//! the scores and a few per-image numbers cross to the host; the images come back once, at the
//! end.
//!
//! The network's input gradient comes from the [`DeviceTrunk`]'s hand-written backward; the
//! cheap rest (parameterisation, transform, preprocessing, regularizers) is differentiated by
//! candle's autograd, seeded with that gradient: the backward of `sum(input * g_net) - reg(x)`
//! w.r.t. the parameters is exactly the ascent direction.

use candle_core::{DType, Device, Shape, Tensor, Var};
use vgg_atlas_proto::{Layer, Optimizer, Parameterization, Settings};

use super::device_trunk::DeviceTrunk;
use super::fourier::Fourier;
use super::image_side::{Evaluation, ImageSide, Target};
use super::optim::{Adam, RMSPROP_EPS};
use super::record::start_pixels;
use super::transform::Affine;
use super::trunk::Scores;
use super::weights::Preprocess;
use crate::{Error, Result};

/// A batch of images on the trunk's device.
pub struct DeviceImages<'a> {
    trunk: &'a DeviceTrunk,
    layer: Layer,
    filters: Vec<usize>,
    settings: Settings,
    basis: Option<Basis>,
    input_map: InputMap,
    grid: Grid,
    /// What is optimised: pixels `[B, S, S, 3]` or spectra `[B, 3, 2, S, K]`.
    params: Tensor,
    last_good: Tensor,
    opt: Opt,
    /// The images as last rendered, `[B, S, S, 3]`, 0..255.
    x: Tensor,
    /// The gradient w.r.t. the parameters, from the last evaluation.
    grad: Option<Tensor>,
}

impl<'a> DeviceImages<'a> {
    pub fn new(
        trunk: &'a DeviceTrunk,
        preprocess: Preprocess,
        layer: Layer,
        targets: &[Target],
        s: &Settings,
    ) -> Result<DeviceImages<'a>> {
        let dev = trunk.device().clone();
        let (b, size) = (targets.len(), s.size);
        let fourier = (s.parameterization == Parameterization::Fourier)
            .then(|| Fourier::new(size, s.fourier_decay));
        let (start, shape): (Vec<f32>, Shape) = match &fourier {
            None => (
                targets
                    .iter()
                    .flat_map(|t| start_pixels(t.seed, size))
                    .collect(),
                (b, size, size, 3).into(),
            ),
            Some(f) => (
                targets
                    .iter()
                    .flat_map(|t| f.random_spectrum(t.seed))
                    .collect(),
                (b, 3, 2, size, f.k).into(),
            ),
        };
        let params = Tensor::from_vec(start, shape, &dev)?;
        Ok(DeviceImages {
            trunk,
            layer,
            filters: targets.iter().map(|t| t.filter).collect(),
            settings: s.clone(),
            basis: fourier.as_ref().map(|f| Basis::new(f, &dev)).transpose()?,
            input_map: InputMap::new(preprocess, &dev)?,
            grid: Grid::new(size, &dev)?,
            opt: Opt::new(s, &params)?,
            last_good: params.clone(),
            x: params.clone(),
            params,
            grad: None,
        })
    }
}

impl ImageSide for DeviceImages<'_> {
    /// The whole batch is computed at once on the device, failed images included (the driver
    /// ignores their values); skipping them would cost a gather per step.
    fn evaluate(
        &mut self,
        affines: &[Affine],
        _active: &[bool],
        want_grad: bool,
        poison: Option<usize>,
    ) -> Result<Evaluation> {
        let s = &self.settings;
        let b = self.filters.len();
        let p = Var::from_tensor(&self.params)?;
        self.x = match &self.basis {
            None => p.as_tensor().clone(),
            Some(basis) => basis.render(p.as_tensor())?,
        };
        let view = if affines.iter().all(Affine::is_identity) {
            self.x.clone()
        } else {
            // Outside the image, mid grey (or, rolled, the image again).
            self.grid.apply(&self.x, affines, 127.5)?
        };
        let input = self.input_map.apply(&view)?;
        let pass = self.trunk.pass(
            &input.detach(),
            self.layer,
            &self.filters,
            s.objective,
            want_grad,
        )?;
        let reg = regularizers(&self.x, s)?;
        self.grad = match pass.grad {
            Some(g_net) => {
                let mut surrogate = input.mul(&g_net)?.sum_all()?;
                if let Some(reg) = &reg {
                    surrogate = surrogate.sub(&reg.sum_all()?)?;
                }
                let grads = surrogate.backward()?;
                let mut g = grads
                    .get(p.as_tensor())
                    .ok_or_else(|| Error::Invalid("no gradient reached the parameters".into()))?
                    .clone();
                if let Some(i) = poison {
                    let mut nan = vec![0.0f32; b];
                    nan[i] = f32::NAN;
                    g = g.broadcast_add(&per_image(nan, g.rank(), self.x.device())?)?;
                }
                Some(g)
            }
            None => None,
        };
        // What the driver decides on, in one download: the scores, the regularizers, and
        // whether each image's gradient is finite.
        let mut parts = vec![pass.pre, pass.post];
        parts.extend(reg.clone());
        if let Some(g) = &self.grad {
            parts.push(g.abs()?.flatten_from(1)?.sum(1)?);
        }
        let host = to_host(&Tensor::cat(&parts, 0)?)?;
        let (pre, post) = (&host[..b], &host[b..2 * b]);
        Ok(Evaluation {
            scores: pre
                .iter()
                .zip(post)
                .map(|(&pre, &post)| Scores { pre, post })
                .collect(),
            regularizers: match reg {
                Some(_) => host[2 * b..3 * b].iter().map(|&v| v as f64).collect(),
                None => vec![0.0; b],
            },
            grad_finite: match &self.grad {
                Some(_) => host[host.len() - b..]
                    .iter()
                    .map(|v| v.is_finite())
                    .collect(),
                None => vec![true; b],
            },
        })
    }

    fn update(
        &mut self,
        good: &[bool],
        restore: &[bool],
        step: &[bool],
        lr: &[f32],
    ) -> Result<Vec<bool>> {
        self.last_good = select(good, &self.params, &self.last_good)?;
        let before = select(restore, &self.last_good, &self.params)?;
        self.opt.reset(restore)?;
        self.params = match (&self.grad, step.iter().any(|&v| v)) {
            (Some(grad), true) => self.opt.step(&before, grad, step, lr)?,
            _ => before,
        };
        per_image_finite(&self.params)
    }

    fn images(&mut self) -> Result<Vec<Vec<f32>>> {
        let n = self.settings.size * self.settings.size * 3;
        Ok(to_host(&self.x.detach().flatten_all()?)?
            .chunks_exact(n)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// Whether each image's values (the first dimension indexes images) are all finite.
fn per_image_finite(t: &Tensor) -> Result<Vec<bool>> {
    Ok(to_host(&t.abs()?.flatten_from(1)?.sum(1)?)?
        .into_iter()
        .map(f32::is_finite)
        .collect())
}

/// The shape `[B, 1, ...]` of `rank` dimensions: one value per image, broadcast over the rest.
fn per_image_shape(b: usize, rank: usize) -> Vec<usize> {
    let mut dims = vec![1usize; rank];
    dims[0] = b;
    dims
}

/// Per image: `on[i] ? a[i] : b[i]`.
fn select(on: &[bool], a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if on.iter().all(|&v| !v) {
        return Ok(b.clone());
    }
    if on.iter().all(|&v| v) {
        return Ok(a.clone());
    }
    let mask: Vec<u8> = on.iter().map(|&v| v as u8).collect();
    let mask = Tensor::from_vec(mask, per_image_shape(on.len(), a.rank()), a.device())?
        .broadcast_as(a.shape())?;
    Ok(mask.where_cond(a, b)?)
}

/// A per-image scalar as a `[B, 1, ...]` tensor of `rank` dimensions.
fn per_image(values: Vec<f32>, rank: usize, dev: &Device) -> Result<Tensor> {
    let dims = per_image_shape(values.len(), rank);
    Ok(Tensor::from_vec(values, dims, dev)?)
}

/// The optimiser's state, per image, on the device.
struct Opt {
    kind: Optimizer,
    /// Adam's first moment, or RMSprop's squared-gradient average.
    m: Tensor,
    /// Adam's second moment (unused by RMSprop).
    v: Tensor,
    /// Adam's step count per image.
    t: Vec<i32>,
    decay: f64,
}

impl Opt {
    fn new(s: &Settings, params: &Tensor) -> Result<Opt> {
        Ok(Opt {
            kind: s.optimizer,
            m: params.zeros_like()?,
            v: params.zeros_like()?,
            t: vec![0; params.dim(0)?],
            decay: s.rmsprop_decay as f64,
        })
    }

    /// Starts the state of the images in `which` afresh (after a retry).
    fn reset(&mut self, which: &[bool]) -> Result<()> {
        if which.iter().any(|&v| v) {
            let zeros = self.m.zeros_like()?;
            self.m = select(which, &zeros, &self.m)?;
            self.v = select(which, &zeros, &self.v)?;
            for (t, _) in self.t.iter_mut().zip(which).filter(|(_, &w)| w) {
                *t = 0;
            }
        }
        Ok(())
    }

    /// One ascent step of the images in `which` (the others keep their parameters and state).
    fn step(&mut self, params: &Tensor, g: &Tensor, which: &[bool], lr: &[f32]) -> Result<Tensor> {
        let (rank, dev) = (params.rank(), params.device().clone());
        let b = which.len();
        let lr = per_image(lr.to_vec(), rank, &dev)?;
        match self.kind {
            Optimizer::Rmsprop => {
                // keras-vis: the gradient normalised by its RMS, then RMSprop.
                let rms = g
                    .sqr()?
                    .flatten_from(1)?
                    .mean(1)?
                    .sqrt()?
                    .affine(1.0, RMSPROP_EPS)?;
                let g = g.broadcast_div(&rms.reshape(per_image_shape(b, rank))?)?;
                let cache = self
                    .m
                    .affine(self.decay, 0.0)?
                    .add(&g.sqr()?.affine(1.0 - self.decay, 0.0)?)?;
                let next = params.add(
                    &g.div(&cache.affine(1.0, RMSPROP_EPS)?.sqrt()?)?
                        .broadcast_mul(&lr)?,
                )?;
                self.m = select(which, &cache, &self.m)?;
                select(which, &next, params)
            }
            Optimizer::Adam => {
                for (t, _) in self.t.iter_mut().zip(which).filter(|(_, &w)| w) {
                    *t += 1;
                }
                let (b1, b2) = (Adam::BETA1 as f64, Adam::BETA2 as f64);
                let m = self.m.affine(b1, 0.0)?.add(&g.affine(1.0 - b1, 0.0)?)?;
                let v = self
                    .v
                    .affine(b2, 0.0)?
                    .add(&g.sqr()?.affine(1.0 - b2, 0.0)?)?;
                // Bias corrections; images not stepped yet (t = 0) are divided by 1.
                let correction = |beta: f32| -> Result<Tensor> {
                    let c = self.t.iter().map(|&t| match 1.0 - beta.powi(t) {
                        c if c > 0.0 => c,
                        _ => 1.0,
                    });
                    per_image(c.collect(), rank, &dev)
                };
                let (c1, c2) = (correction(Adam::BETA1)?, correction(Adam::BETA2)?);
                // lr * (m / c1) / (sqrt(v / c2) + eps)
                let step = m
                    .broadcast_div(&c1)?
                    .div(
                        &v.broadcast_div(&c2)?
                            .sqrt()?
                            .affine(1.0, Adam::EPS as f64)?,
                    )?
                    .broadcast_mul(&lr)?;
                let next = params.add(&step)?;
                self.m = select(which, &m, &self.m)?;
                self.v = select(which, &v, &self.v)?;
                select(which, &next, params)
            }
        }
    }
}

/// The Lp-norm and total-variation penalties of each image of `x` (`[B, S, S, 3]`, 0..255),
/// each divided by the number of input elements and weighted; None if both weights are 0.
fn regularizers(x: &Tensor, s: &Settings) -> Result<Option<Tensor>> {
    let (_, h, w, c) = x.dims4()?;
    let n = (h * w * c) as f64;
    let mut total: Option<Tensor> = None;
    let mut add = |t: Tensor| -> Result<()> {
        total = Some(match total.take() {
            Some(a) => a.add(&t)?,
            None => t,
        });
        Ok(())
    };
    if s.lp_norm_weight != 0.0 {
        let p = s.lp_norm_p as f64;
        let norm = x.abs()?.powf(p)?.flatten_from(1)?.sum(1)?.powf(1.0 / p)?;
        add(norm.affine(s.lp_norm_weight as f64 / n, 0.0)?)?;
    }
    if s.tv_weight != 0.0 {
        // Forward differences; the last row has no dy and the last column no dx.
        let dx = x
            .narrow(2, 1, w - 1)?
            .sub(&x.narrow(2, 0, w - 1)?)?
            .pad_with_zeros(2, 0, 1)?;
        let dy = x
            .narrow(1, 1, h - 1)?
            .sub(&x.narrow(1, 0, h - 1)?)?
            .pad_with_zeros(1, 0, 1)?;
        let t = dx.sqr()?.add(&dy.sqr()?)?;
        let beta = s.tv_beta as f64;
        let tb = if beta == 2.0 {
            t
        } else {
            // t^(beta/2), with 0 where t is 0 (where its gradient would be 0 * inf).
            let zero = t.eq(0.0f32)?;
            let safe = zero.where_cond(&t.ones_like()?, &t)?;
            zero.where_cond(&t.zeros_like()?, &safe.powf(beta / 2.0)?)?
        };
        add(tb
            .flatten_from(1)?
            .sum(1)?
            .affine(s.tv_weight as f64 / n, 0.0)?)?;
    }
    Ok(total)
}

/// lucid's Fourier parameterisation as tensors (the matrices of [`Fourier`]): spectrum
/// `[B, 3, 2, S, K]` (real and imaginary planes per channel) to image `[B, S, S, 3]`, 0..255.
struct Basis {
    size: usize,
    k: usize,
    /// `[S, K]`.
    scale: Tensor,
    /// Transposed row matrices `[ky, h]`.
    ch_t: Tensor,
    sh_t: Tensor,
    /// Column matrices `[kx, w]`.
    cw: Tensor,
    sw: Tensor,
    /// `[j, i]`: input channel j's weight in output channel i.
    color_t: Tensor,
}

impl Basis {
    fn new(f: &Fourier, dev: &Device) -> Result<Basis> {
        let (s, k) = (f.size, f.k);
        let t = |m: &[f32]| -> Result<Tensor> {
            Ok(Tensor::from_slice(m, (s, s), dev)?.t()?.contiguous()?)
        };
        let mut color_t = [0.0f32; 9];
        for i in 0..3 {
            for j in 0..3 {
                color_t[j * 3 + i] = f.color[i][j];
            }
        }
        Ok(Basis {
            size: s,
            k,
            scale: Tensor::from_slice(&f.scale, (s, k), dev)?,
            ch_t: t(&f.ch)?,
            sh_t: t(&f.sh)?,
            cw: Tensor::from_slice(&f.cw, (k, s), dev)?,
            sw: Tensor::from_slice(&f.sw, (k, s), dev)?,
            color_t: Tensor::from_slice(&color_t, (3, 3), dev)?,
        })
    }

    fn render(&self, p: &Tensor) -> Result<Tensor> {
        let (s, k) = (self.size, self.k);
        let b = p.dim(0)?;
        // Scaled planes, transposed to [B*3*K, ky] for the inverse DFT along the rows.
        let plane = |i: usize| -> Result<Tensor> {
            Ok(p.narrow(2, i, 1)?
                .squeeze(2)?
                .broadcast_mul(&self.scale)?
                .transpose(2, 3)?
                .contiguous()?
                .reshape((b * 3 * k, s))?)
        };
        let (re, im) = (plane(0)?, plane(1)?);
        // Y = (C + iS) X along the rows: [B*3*K, h].
        let yr = re.matmul(&self.ch_t)?.sub(&im.matmul(&self.sh_t)?)?;
        let yi = re.matmul(&self.sh_t)?.add(&im.matmul(&self.ch_t)?)?;
        // Back to [B*3*h, kx] for the inverse real DFT along the columns.
        let rows = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, 3, k, s))?
                .transpose(2, 3)?
                .contiguous()?
                .reshape((b * 3 * s, k))?)
        };
        // (cw and sw hold lucid's division of the image by 4.)
        let lin = rows(yr)?
            .matmul(&self.cw)?
            .add(&rows(yi)?.matmul(&self.sw)?)?
            .reshape((b, 3, s, s))?;
        // Decorrelated colour, then the sigmoid, scaled to 0..255.
        let pre = lin
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .reshape((b * s * s, 3))?
            .matmul(&self.color_t)?
            .reshape((b, s, s, 3))?;
        Ok(pre
            .neg()?
            .exp()?
            .affine(1.0, 1.0)?
            .recip()?
            .affine(255.0, 0.0)?)
    }
}

/// The network's input from an image: `[B, S, S, 3]` RGB 0..255 to `[B, 3, S, S]`
/// preprocessed, as a matrix product (one source channel per output channel) and an offset.
struct InputMap {
    matrix: Tensor,
    offset: Tensor,
}

impl InputMap {
    fn new(preprocess: Preprocess, dev: &Device) -> Result<InputMap> {
        let mut m = [0.0f32; 9];
        let mut off = [0.0f32; 3];
        for (c, &(src, scale, o)) in preprocess.channels().iter().enumerate() {
            m[src * 3 + c] = scale;
            off[c] = o;
        }
        Ok(InputMap {
            matrix: Tensor::from_slice(&m, (3, 3), dev)?,
            offset: Tensor::from_slice(&off, (1, 3), dev)?,
        })
    }

    fn apply(&self, view: &Tensor) -> Result<Tensor> {
        let (b, h, w, _) = view.dims4()?;
        Ok(view
            .reshape((b * h * w, 3))?
            .matmul(&self.matrix)?
            .broadcast_add(&self.offset)?
            .reshape((b, h, w, 3))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }
}

/// [`Affine`] transforms on the device: the same bilinear taps, gathered per image.
struct Grid {
    size: usize,
    /// Each output pixel's x and y, `[1, S*S]`.
    gx: Tensor,
    gy: Tensor,
}

impl Grid {
    fn new(size: usize, dev: &Device) -> Result<Grid> {
        let gx: Vec<f32> = (0..size * size).map(|p| (p % size) as f32).collect();
        let gy: Vec<f32> = (0..size * size).map(|p| (p / size) as f32).collect();
        Ok(Grid {
            size,
            gx: Tensor::from_vec(gx, (1, size * size), dev)?,
            gy: Tensor::from_vec(gy, (1, size * size), dev)?,
        })
    }

    /// Image b of `x` (`[B, S, S, 3]`) through `affines[b]`; outside the image, `fill`, or the
    /// image repeated where the affines wrap (they all do or none does: one layer's settings).
    fn apply(&self, x: &Tensor, affines: &[Affine], fill: f32) -> Result<Tensor> {
        let wrap = affines.iter().any(|a| a.wrap);
        if wrap && !affines.iter().all(|a| a.wrap) {
            return Err(Error::Invalid(
                "a batch mixes rolled and unrolled views; the driver gives one batch one kind"
                    .into(),
            ));
        }
        let size = self.size;
        let (b, dev) = (affines.len(), x.device().clone());
        let col = |f: &dyn Fn(&Affine) -> f32| -> Result<Tensor> {
            Ok(Tensor::from_vec(
                affines.iter().map(f).collect::<Vec<f32>>(),
                (b, 1),
                &dev,
            )?)
        };
        let c = (size as f32 - 1.0) / 2.0;
        let scale = col(&|a| a.scale)?;
        let sin = col(&|a| (-a.angle).sin())?;
        let cos = col(&|a| (-a.angle).cos())?;
        let shift_x = col(&|a| a.shift_x)?;
        let shift_y = col(&|a| a.shift_y)?;
        // Where output pixel u samples the input: R(-angle) (u - c) / scale + c - shift.
        let ux = self.gx.affine(1.0, -c as f64)?.broadcast_div(&scale)?;
        let uy = self.gy.affine(1.0, -c as f64)?.broadcast_div(&scale)?;
        let sx = ux
            .broadcast_mul(&cos)?
            .sub(&uy.broadcast_mul(&sin)?)?
            .affine(1.0, c as f64)?
            .broadcast_sub(&shift_x)?;
        let sy = ux
            .broadcast_mul(&sin)?
            .add(&uy.broadcast_mul(&cos)?)?
            .affine(1.0, c as f64)?
            .broadcast_sub(&shift_y)?;
        let (x0, y0) = (sx.floor()?, sy.floor()?);
        let (fx, fy) = (sx.sub(&x0)?, sy.sub(&y0)?);
        let (gx, gy) = (fx.affine(-1.0, 1.0)?, fy.affine(-1.0, 1.0)?);
        let pixels = x.reshape((b, size * size, 3))?;
        let last = (size - 1) as f64;
        let mut out: Option<Tensor> = None;
        for (dx, dy, w) in [
            (0.0, 0.0, gx.mul(&gy)?),
            (1.0, 0.0, fx.mul(&gy)?),
            (0.0, 1.0, gx.mul(&fy)?),
            (1.0, 1.0, fx.mul(&fy)?),
        ] {
            let (mut xx, mut yy) = (x0.affine(1.0, dx)?, y0.affine(1.0, dy)?);
            if wrap {
                // v mod size, for the whole numbers v the taps are.
                let modulo = |v: &Tensor| -> Result<Tensor> {
                    let periods = v.affine(1.0 / size as f64, 0.0)?.floor()?;
                    Ok(v.sub(&periods.affine(size as f64, 0.0)?)?)
                };
                xx = modulo(&xx)?;
                yy = modulo(&yy)?;
            }
            let inside = xx
                .ge(0.0f32)?
                .mul(&xx.le(last as f32)?)?
                .mul(&yy.ge(0.0f32)?)?
                .mul(&yy.le(last as f32)?)?
                .to_dtype(x.dtype())?;
            let index = yy
                .clamp(0.0f32, last as f32)?
                .affine(size as f64, 0.0)?
                .add(&xx.clamp(0.0f32, last as f32)?)?
                .to_dtype(DType::U32)?
                .unsqueeze(2)?
                .broadcast_as((b, size * size, 3))?
                .contiguous()?;
            let taken = pixels.gather(&index, 1)?;
            let w_in = w.mul(&inside)?.unsqueeze(2)?;
            let w_out = w
                .mul(&inside.affine(-1.0, 1.0)?)?
                .affine(fill as f64, 0.0)?
                .unsqueeze(2)?;
            let term = taken.broadcast_mul(&w_in)?.broadcast_add(&w_out)?;
            out = Some(match out {
                Some(o) => o.add(&term)?,
                None => term,
            });
        }
        Ok(out.expect("four taps").reshape((b, size, size, 3))?)
    }
}

//! The ascent's images on the host ([`ImageSide`] for any [`Trunk`] fed from host memory): the
//! pixels or lucid's Fourier spectrum per image, the transforms as bilinear resampling, the
//! preprocessing, the Lp-norm and total-variation regularizers (Mahendran & Vedaldi) and the
//! optimisers as plain loops, parallel over the images.

use rayon::prelude::*;
use vgg_atlas_proto::{Layer, Parameterization, Settings};

use super::fourier::Fourier;
use super::image_side::{Evaluation, ImageSide, Target};
use super::optim::OptState;
use super::profile::{Phase, Phases};
use super::record::start_pixels;
use super::transform::Affine;
use super::trunk::{Scores, Trunk};
use super::weights::Preprocess;
use crate::Result;

/// How each preprocessed channel is made from RGB: (source channel, scale, offset).
type Channels = [(usize, f32, f32); 3];

/// One image and its optimiser.
struct Image {
    /// What is optimised: the pixels (0..255 RGB, HWC) or a Fourier spectrum.
    params: Vec<f32>,
    opt: OptState,
    /// The parameters at the last finite scoring, to retry a step after NaN/Inf.
    last_good: Vec<f32>,
    /// The image in pixels (0..255 RGB, HWC), as the parameters make it.
    x: Vec<f32>,
    /// Pre-sigmoid values of a Fourier image, for its backward pass.
    pre: Vec<f32>,
    affine: Affine,
    /// The gradient of the objective w.r.t. the parameters, from the last evaluation.
    grad: Vec<f64>,
}

/// A batch of images on the host, around a trunk.
pub struct HostImages<'a> {
    trunk: &'a mut dyn Trunk,
    layer: Layer,
    filters: Vec<usize>,
    settings: Settings,
    chans: Channels,
    fourier: Option<Fourier>,
    images: Vec<Image>,
    /// The network's input and its gradient, `[B, S, S, 3]`, reused across steps.
    input: Vec<f32>,
    grad: Vec<f32>,
    phases: Phases,
}

impl<'a> HostImages<'a> {
    pub fn new(
        trunk: &'a mut dyn Trunk,
        preprocess: Preprocess,
        layer: Layer,
        targets: &[Target],
        s: &Settings,
    ) -> HostImages<'a> {
        let fourier = (s.parameterization == Parameterization::Fourier)
            .then(|| Fourier::new(s.size, s.fourier_decay));
        let images = targets
            .iter()
            .map(|t| {
                let params = match &fourier {
                    None => start_pixels(t.seed, s.size),
                    Some(f) => f.random_spectrum(t.seed),
                };
                Image {
                    last_good: params.clone(),
                    opt: OptState::new(s.optimizer, params.len()),
                    params,
                    x: Vec::new(),
                    pre: Vec::new(),
                    affine: Affine::IDENTITY,
                    grad: Vec::new(),
                }
            })
            .collect();
        let n = targets.len() * s.size * s.size * 3;
        HostImages {
            trunk,
            layer,
            filters: targets.iter().map(|t| t.filter).collect(),
            settings: s.clone(),
            chans: preprocess.channels(),
            fourier,
            images,
            input: vec![0.0; n],
            grad: vec![0.0; n],
            phases: Phases::default(),
        }
    }
}

impl Image {
    /// Renders the image from its parameters.
    fn render(&mut self, fourier: Option<&Fourier>) {
        match fourier {
            Some(f) => {
                let (rgb, pre) = f.render(&self.params);
                self.x = rgb.iter().map(|v| v * 255.0).collect();
                self.pre = pre;
            }
            None => self.x.clone_from(&self.params),
        }
    }
}

impl ImageSide for HostImages<'_> {
    fn evaluate(
        &mut self,
        affines: &[Affine],
        active: &[bool],
        want_grad: bool,
        poison: Option<usize>,
    ) -> Result<Evaluation> {
        let s = &self.settings;
        let n = s.size * s.size * 3;
        let fourier = self.fourier.as_ref();
        let chans = self.chans;
        let phases = &mut self.phases;
        let images = &mut self.images;
        let on = |i: &usize| active[*i];
        phases.time(Phase::Render, || {
            images
                .par_iter_mut()
                .enumerate()
                .filter(|(i, _)| on(i))
                .for_each(|(_, im)| im.render(fourier))
        });
        phases.time(Phase::Transform, || {
            images
                .par_iter_mut()
                .zip(self.input.par_chunks_mut(n))
                .zip(affines.par_iter())
                .enumerate()
                .filter(|(i, _)| on(i))
                .for_each(|(_, ((im, inp), &a))| {
                    im.affine = a;
                    // Outside the image, mid grey.
                    let view = a.apply(&im.x, s.size, 127.5);
                    for (px, rgb) in inp.chunks_exact_mut(3).zip(view.chunks_exact(3)) {
                        for (c, &(src, scale, off)) in chans.iter().enumerate() {
                            px[c] = scale * rgb[src] + off;
                        }
                    }
                })
        });
        let trunk = &mut self.trunk;
        let (layer, filters, input) = (self.layer, &self.filters, &self.input);
        let grad = &mut self.grad;
        let scores: Vec<Scores> = phases.time(Phase::Network, || {
            trunk.run(
                layer,
                filters,
                s.size,
                s.size,
                input,
                s.objective,
                want_grad.then_some(&mut grad[..]),
            )
        })?;
        let regs: Vec<(f64, Vec<f64>)> = phases.time(Phase::Regularizers, || {
            images
                .par_iter()
                .enumerate()
                .map(|(i, im)| {
                    if on(&i) {
                        regularizers(&im.x, s.size, s)
                    } else {
                        (0.0, Vec::new())
                    }
                })
                .collect()
        });
        let regularizers: Vec<f64> = regs.iter().map(|r| r.0).collect();
        if !want_grad {
            return Ok(Evaluation {
                scores,
                regularizers,
                grad_finite: vec![true; images.len()],
            });
        }
        phases.time(Phase::TransformBackward, || {
            images
                .par_iter_mut()
                .zip(grad.par_chunks(n))
                .zip(regs.par_iter())
                .enumerate()
                .filter(|(i, _)| on(i))
                .for_each(|(i, ((im, g_net), (_, reg_grad)))| {
                    im.grad = pixel_gradient(g_net, reg_grad, &chans, &im.affine, s.size);
                    if poison == Some(i) {
                        im.grad[0] = f64::NAN;
                    }
                })
        });
        // To the parameters: the pixels themselves, or back through the Fourier basis (the
        // image is 255 x its sigmoid output).
        if let Some(f) = fourier {
            phases.time(Phase::RenderBackward, || {
                images
                    .par_iter_mut()
                    .enumerate()
                    .filter(|(i, _)| on(i))
                    .for_each(|(_, im)| {
                        let g_rgb: Vec<f32> = im.grad.iter().map(|&v| (v * 255.0) as f32).collect();
                        im.grad = f
                            .backward(&im.pre, &g_rgb)
                            .into_iter()
                            .map(f64::from)
                            .collect();
                    })
            });
        }
        let grad_finite = images
            .iter()
            .enumerate()
            .map(|(i, im)| !on(&i) || im.grad.iter().all(|v| v.is_finite()))
            .collect();
        Ok(Evaluation {
            scores,
            regularizers,
            grad_finite,
        })
    }

    fn update(
        &mut self,
        good: &[bool],
        restore: &[bool],
        step: &[bool],
        lr: &[f32],
    ) -> Result<Vec<bool>> {
        let s = &self.settings;
        let images = &mut self.images;
        Ok(self.phases.time(Phase::Optimiser, || {
            images
                .par_iter_mut()
                .enumerate()
                .map(|(i, im)| {
                    if good[i] {
                        im.last_good.copy_from_slice(&im.params);
                    }
                    if restore[i] {
                        im.params.copy_from_slice(&im.last_good);
                        im.opt = OptState::new(s.optimizer, im.params.len());
                    }
                    if step[i] {
                        im.opt.ascend(&mut im.params, &im.grad, lr[i], s);
                    }
                    im.params.iter().all(|v| v.is_finite())
                })
                .collect()
        }))
    }

    fn images(&mut self) -> Result<Vec<Vec<f32>>> {
        Ok(self.images.iter().map(|im| im.x.clone()).collect())
    }

    fn phases(&self) -> Option<&Phases> {
        Some(&self.phases)
    }
}

/// d(objective)/d(pixels) of one image: the network gradient `g_net` (w.r.t. the preprocessed
/// view) carried back through the preprocessing's transpose and the view's transform (its
/// adjoint), minus the regularizers' gradient (they look at the untransformed image).
pub fn pixel_gradient(
    g_net: &[f32],
    reg_grad: &[f64],
    chans: &Channels,
    affine: &Affine,
    size: usize,
) -> Vec<f64> {
    let mut g_view = vec![0.0f32; g_net.len()];
    for (t, gn) in g_view.chunks_exact_mut(3).zip(g_net.chunks_exact(3)) {
        for (c, &(src, scale, _)) in chans.iter().enumerate() {
            t[src] += scale * gn[c];
        }
    }
    affine
        .adjoint(&g_view, size)
        .iter()
        .zip(reg_grad)
        .map(|(&g, &r)| g as f64 - r)
        .collect()
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

//! lucid's image parameterisation: a scaled Fourier spectrum per colour channel, an inverse real
//! 2-D DFT, decorrelated colour (a fixed 3x3 matrix from ImageNet's colour statistics) and a
//! sigmoid into the valid range. Optimising the spectrum instead of the pixels whitens the
//! gradient: low frequencies move as fast as high ones, so patterns form in far fewer steps.
//!
//! There is no FFT here: at atlas sizes the inverse DFT as a few small real matrix products on
//! the `gemm` crate is cheap next to the network (on the host, render and backward together
//! are under 3% of a step on block1_conv2, `bench --profile`), works the same everywhere, and
//! its adjoint (the gradient) is the same products transposed.

use rand::{Rng, SeedableRng};

use super::conv::{matmul, Operand};

/// ImageNet's colour correlation, square root of its SVD (lucid's `color_correlation_svd_sqrt`).
const COLOR_SVD_SQRT: [[f32; 3]; 3] =
    [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]];

/// The colour matrix normalised by its largest column norm, as lucid does.
fn color_matrix() -> [[f32; 3]; 3] {
    let max_norm = (0..3)
        .map(|j| {
            (0..3)
                .map(|i| COLOR_SVD_SQRT[i][j].powi(2))
                .sum::<f32>()
                .sqrt()
        })
        .fold(0.0f32, f32::max);
    COLOR_SVD_SQRT.map(|row| row.map(|v| v / max_norm))
}

/// Precomputed matrices for one image side.
#[derive(Clone, Debug)]
pub struct Fourier {
    pub size: usize,
    /// Frequencies along the last axis kept by a real DFT: size / 2 + 1.
    pub k: usize,
    /// Per-frequency scale, `[ky][kx]`.
    pub(crate) scale: Vec<f32>,
    /// Inverse DFT along rows (complex): `[h][ky]`, cos and sin, divided by size.
    pub(crate) ch: Vec<f32>,
    pub(crate) sh: Vec<f32>,
    /// `[[C, -S], [S, C]]` of `ch` and `sh`, `[2h][2ky]`: the row transform of the real and
    /// imaginary planes stacked.
    rows: Vec<f32>,
    /// Inverse real DFT along columns, with lucid's division of the image by 4: `[kx][w]`.
    pub(crate) cw: Vec<f32>,
    pub(crate) sw: Vec<f32>,
    pub(crate) color: [[f32; 3]; 3],
}

/// The spectrum of one image: real and imaginary parts, `[channel][ky][kx]`.
pub type Spectrum = Vec<f32>;

impl Fourier {
    /// `decay_power` 1 weights frequency f by 1/f, lucid's default.
    pub fn new(size: usize, decay_power: f32) -> Fourier {
        let k = size / 2 + 1;
        let n = size as f32;
        let freq = |i: usize| {
            let i = i as f32;
            if i < n / 2.0 + 0.5 {
                i / n
            } else {
                (i - n) / n
            }
        };
        let mut scale = Vec::with_capacity(size * k);
        for ky in 0..size {
            for kx in 0..k {
                let f = (freq(ky).powi(2) + (kx as f32 / n).powi(2)).sqrt();
                scale.push(n / f.max(1.0 / n).powf(decay_power));
            }
        }
        let tau = std::f32::consts::TAU;
        let mut ch = vec![0.0; size * size];
        let mut sh = vec![0.0; size * size];
        for h in 0..size {
            for ky in 0..size {
                let a = tau * ((ky * h) % size) as f32 / n;
                ch[h * size + ky] = a.cos() / n;
                sh[h * size + ky] = a.sin() / n;
            }
        }
        let mut cw = vec![0.0; k * size];
        let mut sw = vec![0.0; k * size];
        for kx in 0..k {
            // The DC and (for an even side) Nyquist terms appear once, the others twice.
            let weight = if kx == 0 || (size.is_multiple_of(2) && kx == size / 2) {
                1.0
            } else {
                2.0
            };
            for w in 0..size {
                let a = tau * ((kx * w) % size) as f32 / n;
                cw[kx * size + w] = weight * a.cos() / n / 4.0;
                sw[kx * size + w] = -weight * a.sin() / n / 4.0;
            }
        }
        // [[C, -S], [S, C]]: the complex product along the rows as one real product.
        let mut rows = vec![0.0; 4 * size * size];
        for h in 0..size {
            for ky in 0..size {
                let (c, s) = (ch[h * size + ky], sh[h * size + ky]);
                rows[h * 2 * size + ky] = c;
                rows[h * 2 * size + size + ky] = -s;
                rows[(size + h) * 2 * size + ky] = s;
                rows[(size + h) * 2 * size + size + ky] = c;
            }
        }
        Fourier {
            size,
            k,
            scale,
            ch,
            sh,
            rows,
            cw,
            sw,
            color: color_matrix(),
        }
    }

    /// Parameters per image: real and imaginary spectrum of 3 channels.
    pub fn len(&self) -> usize {
        2 * 3 * self.size * self.k
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// lucid's start: normal noise with standard deviation 0.01, seeded.
    pub fn random_spectrum(&self, seed: u64) -> Spectrum {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        // Box-Muller.
        (0..self.len())
            .map(|_| {
                let u1: f32 = rng.random::<f32>().max(f32::MIN_POSITIVE);
                let u2: f32 = rng.random();
                0.01 * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect()
    }

    /// The image in [0, 1], RGB interleaved (`[h][w][c]`), and the pre-sigmoid values it came
    /// from (kept for the backward pass).
    pub fn render(&self, spectrum: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let (s, k) = (self.size, self.k);
        let plane = s * k;
        let mut lin = vec![0.0f32; 3 * s * s];
        let mut x = vec![0.0f32; 2 * plane];
        let mut y = vec![0.0f32; 2 * plane];
        for c in 0..3 {
            // X: the channel's spectrum (real plane over imaginary plane, 2s x k), scaled.
            let spec = &spectrum[2 * c * plane..2 * (c + 1) * plane];
            for ((xv, sv), sc) in x.iter_mut().zip(spec).zip(self.scale.iter().cycle()) {
                *xv = sv * sc;
            }
            // [Yr; Yi] = [[C, -S], [S, C]] [Xr; Xi]: the complex inverse DFT along the rows.
            mm(
                (2 * s, k, 2 * s),
                &mut y,
                (&self.rows, 2 * s, 1),
                (&x, k, 1),
                false,
            );
            // x = Yr Cw + Yi Sw along the columns (lucid divides the image by 4, folded in).
            let out = &mut lin[c * s * s..(c + 1) * s * s];
            mm((s, s, k), out, (&y[..plane], k, 1), (&self.cw, s, 1), false);
            mm((s, s, k), out, (&y[plane..], k, 1), (&self.sw, s, 1), true);
        }
        // Decorrelated colour, then the sigmoid.
        let mut pre = vec![0.0f32; 3 * s * s];
        let mut rgb = vec![0.0f32; 3 * s * s];
        for p in 0..s * s {
            for i in 0..3 {
                let v: f32 = (0..3).map(|j| self.color[i][j] * lin[j * s * s + p]).sum();
                pre[p * 3 + i] = v;
                rgb[p * 3 + i] = 1.0 / (1.0 + (-v).exp());
            }
        }
        (rgb, pre)
    }

    /// The gradient w.r.t. the spectrum from the gradient w.r.t. the [0, 1] image: the same
    /// products as [`Fourier::render`], transposed, in reverse order.
    pub fn backward(&self, pre: &[f32], grad_rgb: &[f32]) -> Spectrum {
        let (s, k) = (self.size, self.k);
        let plane = s * k;
        // Through the sigmoid and the colour matrix (transposed) to the linear channels.
        let mut g_lin = vec![0.0f32; 3 * s * s];
        for p in 0..s * s {
            let mut g_pre = [0.0f32; 3];
            for i in 0..3 {
                let sig = 1.0 / (1.0 + (-pre[p * 3 + i]).exp());
                g_pre[i] = grad_rgb[p * 3 + i] * sig * (1.0 - sig);
            }
            for j in 0..3 {
                g_lin[j * s * s + p] = (0..3).map(|i| self.color[i][j] * g_pre[i]).sum();
            }
        }
        let mut grad = vec![0.0f32; self.len()];
        let mut g_y = vec![0.0f32; 2 * plane];
        for c in 0..3 {
            let gl = &g_lin[c * s * s..(c + 1) * s * s];
            // [gYr; gYi] = [gl Cwᵀ; gl Swᵀ].
            let (g_yr, g_yi) = g_y.split_at_mut(plane);
            mm((s, k, s), g_yr, (gl, s, 1), (&self.cw, 1, s), false);
            mm((s, k, s), g_yi, (gl, s, 1), (&self.sw, 1, s), false);
            // [gXr; gXi] = [[C, -S], [S, C]]ᵀ [gYr; gYi], then the frequency scale.
            let g = &mut grad[2 * c * plane..2 * (c + 1) * plane];
            mm(
                (2 * s, k, 2 * s),
                g,
                (&self.rows, 1, 2 * s),
                (&g_y, k, 1),
                false,
            );
            for (gv, sc) in g.iter_mut().zip(self.scale.iter().cycle()) {
                *gv *= sc;
            }
        }
        grad
    }
}

/// `dst = A B` (`+=` with `accumulate`) for `(m, n, depth)`, the operands as (slice, row stride,
/// column stride): [`matmul`] on one thread (the callers run one image per rayon task).
fn mm(
    (m, n, depth): (usize, usize, usize),
    dst: &mut [f32],
    (a, a_rs, a_cs): (&[f32], usize, usize),
    (b, b_rs, b_cs): (&[f32], usize, usize),
    accumulate: bool,
) {
    let op = |values, row_stride, col_stride| Operand {
        values,
        row_stride,
        col_stride,
    };
    matmul(
        m,
        n,
        depth,
        dst,
        op(a, a_rs, a_cs),
        op(b, b_rs, b_cs),
        accumulate,
        gemm::Parallelism::None,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_inverts_the_real_dft_of_an_image() {
        // Independent of the matrices: the naive forward real DFT of a random image, fed back
        // as the spectrum (undoing the frequency scale), must render that image again.
        let s = 8;
        let f = Fourier::new(s, 1.0);
        let k = f.k;
        let z: Vec<f64> = f.random_spectrum(3)[..s * s]
            .iter()
            .map(|v| *v as f64 * 100.0)
            .collect();
        let mut spec = vec![0.0f32; f.len()];
        let plane = s * k;
        for ky in 0..s {
            for kx in 0..k {
                let (mut re, mut im) = (0.0f64, 0.0f64);
                for h in 0..s {
                    for w in 0..s {
                        let a =
                            -std::f64::consts::TAU * ((ky * h) as f64 + (kx * w) as f64) / s as f64;
                        re += z[h * s + w] * a.cos();
                        im += z[h * s + w] * a.sin();
                    }
                }
                let sc = f.scale[ky * k + kx] as f64;
                spec[ky * k + kx] = (re / sc) as f32;
                spec[plane + ky * k + kx] = (im / sc) as f32;
            }
        }
        let (_, pre) = f.render(&spec);
        for p in 0..s * s {
            let got = pre[p * 3] as f64 / f.color[0][0] as f64;
            let want = z[p] / 4.0;
            assert!(
                (got - want).abs() < 1e-3 * (1.0 + want.abs()),
                "{p}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let s = 8;
        let f = Fourier::new(s, 1.0);
        let spec: Vec<f32> = f.random_spectrum(5).iter().map(|v| v * 20.0).collect();
        // Objective: a fixed random linear function of the image.
        let weights: Vec<f32> = f.random_spectrum(9)[..3 * s * s]
            .iter()
            .map(|v| v * 100.0)
            .collect();
        let objective = |sp: &[f32]| -> f64 {
            let (rgb, _) = f.render(sp);
            rgb.iter().zip(&weights).map(|(a, b)| (a * b) as f64).sum()
        };
        let (_, pre) = f.render(&spec);
        let grad = f.backward(&pre, &weights);
        let eps = 1e-2f32;
        let mut checked = 0;
        for i in (0..f.len()).step_by(7) {
            let mut plus = spec.clone();
            plus[i] += eps;
            let mut minus = spec.clone();
            minus[i] -= eps;
            let fd = (objective(&plus) - objective(&minus)) / (2.0 * eps as f64);
            let g = grad[i] as f64;
            assert!(
                (fd - g).abs() <= 2e-2 * fd.abs().max(g.abs()) + 1e-4,
                "param {i}: fd {fd} vs grad {g}"
            );
            checked += 1;
        }
        assert!(checked > 20);
    }
}

//! Transformation robustness: each ascent step looks at the image through a small random affine
//! transform (jitter, rotation, scale), as lucid and tf-keras-vis do, so the optimisation cannot
//! rely on pixel-exact high-frequency patterns. The transform is bilinear resampling of an
//! interleaved RGB image onto a canvas of the same size, with a constant fill outside, or, for
//! a rolled view, the image repeated periodically outside; its gradient is the exact adjoint
//! (the same weights, scattered back).

use rand::{Rng, SeedableRng};

/// One affine view of the image: output pixel `u` samples the input at
/// `R(-angle) (u - c) / scale + c - shift`, with `c` the image centre.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine {
    pub scale: f32,
    /// Radians.
    pub angle: f32,
    pub shift_x: f32,
    pub shift_y: f32,
    /// The image repeats periodically outside itself (a Fourier image is periodic), instead of
    /// the fill: a rolled view.
    pub wrap: bool,
}

impl Affine {
    pub const IDENTITY: Affine = Affine {
        scale: 1.0,
        angle: 0.0,
        shift_x: 0.0,
        shift_y: 0.0,
        wrap: false,
    };

    pub fn is_identity(&self) -> bool {
        *self == Self::IDENTITY
    }

    /// The transform of one step of one filter: jitter in whole pixels (`-jitter..=jitter` each
    /// way), rotation uniform in `±rotate_degrees`, scale uniform in `1 ± scale_jitter`; all
    /// from a stream seeded by (filter seed, step), so it is reproducible anywhere. With
    /// `roll_size`, the view is rolled: the image of that side repeats periodically and the
    /// shift is uniform over a whole period (`0..size` each way), so every part of the image is
    /// as often at the view's border as any other.
    pub fn random(
        filter_seed: u64,
        step: usize,
        jitter: u32,
        rotate_degrees: f32,
        scale_jitter: f32,
        roll_size: Option<usize>,
    ) -> Affine {
        if jitter == 0 && rotate_degrees == 0.0 && scale_jitter == 0.0 && roll_size.is_none() {
            return Self::IDENTITY;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            filter_seed ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let j = match roll_size {
            Some(size) => size as i32 / 2,
            None => jitter as i32,
        };
        let shift_x = rng.random_range(-j..=j) as f32;
        let shift_y = rng.random_range(-j..=j) as f32;
        let angle = if rotate_degrees > 0.0 {
            rng.random_range(-rotate_degrees..=rotate_degrees)
                .to_radians()
        } else {
            0.0
        };
        let scale = if scale_jitter > 0.0 {
            rng.random_range(1.0 - scale_jitter..=1.0 + scale_jitter)
        } else {
            1.0
        };
        Affine {
            scale,
            angle,
            shift_x,
            shift_y,
            wrap: roll_size.is_some(),
        }
    }

    /// For output pixel (x, y) of a `size` square: the four input neighbours (index of their
    /// first channel, or `None` outside) and their bilinear weights.
    fn taps(&self, size: usize, x: usize, y: usize) -> [(Option<usize>, f32); 4] {
        let c = (size as f32 - 1.0) / 2.0;
        let (sin, cos) = (-self.angle).sin_cos();
        let (ux, uy) = ((x as f32 - c) / self.scale, (y as f32 - c) / self.scale);
        let sx = cos * ux - sin * uy + c - self.shift_x;
        let sy = sin * ux + cos * uy + c - self.shift_y;
        let (x0, y0) = (sx.floor(), sy.floor());
        let (fx, fy) = (sx - x0, sy - y0);
        let at = |xx: f32, yy: f32| {
            if self.wrap {
                let n = size as i64;
                let (xw, yw) = ((xx as i64).rem_euclid(n), (yy as i64).rem_euclid(n));
                return Some((yw as usize * size + xw as usize) * 3);
            }
            (xx >= 0.0 && yy >= 0.0 && (xx as usize) < size && (yy as usize) < size)
                .then(|| (yy as usize * size + xx as usize) * 3)
        };
        [
            (at(x0, y0), (1.0 - fx) * (1.0 - fy)),
            (at(x0 + 1.0, y0), fx * (1.0 - fy)),
            (at(x0, y0 + 1.0), (1.0 - fx) * fy),
            (at(x0 + 1.0, y0 + 1.0), fx * fy),
        ]
    }

    /// The transformed image (RGB interleaved, `size` x `size`); outside the input, `fill`
    /// (or, rolled, the input again).
    pub fn apply(&self, input: &[f32], size: usize, fill: f32) -> Vec<f32> {
        if self.is_identity() {
            return input.to_vec();
        }
        let mut out = vec![0.0f32; input.len()];
        for y in 0..size {
            for x in 0..size {
                let o = (y * size + x) * 3;
                for (tap, w) in self.taps(size, x, y) {
                    if w == 0.0 {
                        continue;
                    }
                    for ch in 0..3 {
                        out[o + ch] += w * tap.map_or(fill, |i| input[i + ch]);
                    }
                }
            }
        }
        out
    }

    /// The adjoint: the gradient w.r.t. the input from the gradient w.r.t. the output (the fill
    /// is a constant and takes none).
    pub fn adjoint(&self, grad_out: &[f32], size: usize) -> Vec<f32> {
        if self.is_identity() {
            return grad_out.to_vec();
        }
        let mut g = vec![0.0f32; grad_out.len()];
        for y in 0..size {
            for x in 0..size {
                let o = (y * size + x) * 3;
                for (tap, w) in self.taps(size, x, y) {
                    if let (Some(i), true) = (tap, w != 0.0) {
                        for ch in 0..3 {
                            g[i + ch] += w * grad_out[o + ch];
                        }
                    }
                }
            }
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..size * size * 3).map(|_| rng.random::<f32>()).collect()
    }

    #[test]
    fn integer_jitter_is_an_exact_shift() {
        let size = 8;
        let img = image(size, 1);
        let t = Affine {
            shift_x: 2.0,
            shift_y: -1.0,
            ..Affine::IDENTITY
        };
        let out = t.apply(&img, size, -9.0);
        // Output (x, y) shows input (x - 2, y + 1).
        assert_eq!(out[(3 * size + 5) * 3 + 1], img[(4 * size + 3) * 3 + 1]);
        assert_eq!(
            out[(3 * size + 1) * 3],
            -9.0,
            "shifted in from outside: the fill"
        );
        assert_eq!(Affine::IDENTITY.apply(&img, size, 0.0), img);
    }

    #[test]
    fn a_rolled_view_repeats_the_image_instead_of_the_fill() {
        let size = 8;
        let img = image(size, 2);
        let t = Affine {
            shift_x: 3.0,
            shift_y: -2.0,
            wrap: true,
            ..Affine::IDENTITY
        };
        let out = t.apply(&img, size, -9.0);
        // Output (x, y) shows input ((x - 3) mod 8, (y + 2) mod 8): every pixel, none filled.
        for y in 0..size {
            for x in 0..size {
                let (sx, sy) = ((x + size - 3) % size, (y + 2) % size);
                assert_eq!(out[(y * size + x) * 3 + 2], img[(sy * size + sx) * 3 + 2]);
            }
        }
        let mut sorted_in = img.clone();
        let mut sorted_out = out.clone();
        sorted_in.sort_by(f32::total_cmp);
        sorted_out.sort_by(f32::total_cmp);
        assert_eq!(sorted_in, sorted_out, "a whole-pixel roll is a permutation");
    }

    #[test]
    fn adjoint_is_the_transpose() {
        // <T x, y> == <x, T* y> for random x, y: the gradient of the transform is exact.
        let size = 12;
        for seed in 0..5 {
            let t = Affine::random(seed, 3, 4, 10.0, 0.1, (seed % 2 == 1).then_some(size));
            let x = image(size, 10 + seed);
            let y = image(size, 20 + seed);
            let tx = t.apply(&x, size, 0.0);
            let ty = t.adjoint(&y, size);
            let lhs: f64 = tx.iter().zip(&y).map(|(a, b)| (a * b) as f64).sum();
            let rhs: f64 = x.iter().zip(&ty).map(|(a, b)| (a * b) as f64).sum();
            assert!(
                (lhs - rhs).abs() < 1e-4 * lhs.abs(),
                "{t:?}: {lhs} vs {rhs}"
            );
        }
    }

    #[test]
    fn random_transforms_are_reproducible_and_in_range() {
        let a = Affine::random(7, 3, 4, 5.0, 0.1, None);
        assert_eq!(a, Affine::random(7, 3, 4, 5.0, 0.1, None));
        assert_ne!(a, Affine::random(7, 4, 4, 5.0, 0.1, None));
        for step in 0..100 {
            let t = Affine::random(1, step, 4, 5.0, 0.1, None);
            assert!(t.shift_x.abs() <= 4.0 && t.shift_x.fract() == 0.0);
            assert!(t.angle.abs() <= 5f32.to_radians() + 1e-6);
            assert!((0.9..=1.1).contains(&t.scale));
        }
        assert!(Affine::random(1, 0, 0, 0.0, 0.0, None).is_identity());
        // Rolled: shifts over the whole period, both signs, and a wrapping view.
        let rolled: Vec<Affine> = (0..200)
            .map(|step| Affine::random(1, step, 4, 0.0, 0.0, Some(32)))
            .collect();
        assert!(rolled.iter().all(|t| t.wrap && t.shift_x.abs() <= 16.0));
        assert!(rolled.iter().any(|t| t.shift_x > 8.0) && rolled.iter().any(|t| t.shift_y < -8.0));
    }
}

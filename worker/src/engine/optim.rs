//! The optimisers of the ascent on the host, one state per image: RMSprop on the RMS-normalised
//! gradient (keras-vis) and Adam (lucid). Both *ascend*: the gradient points uphill. The device
//! image side ([`super::device_images`]) has the same update rules as tensor kernels, with the
//! constants defined here.

use vgg_atlas_proto::{Optimizer, Settings};

/// Added to RMS norms and RMSprop's denominator.
pub const RMSPROP_EPS: f64 = 1e-7;

/// One image's optimiser state.
#[derive(Clone, Debug)]
pub enum OptState {
    /// RMSprop's squared-gradient average.
    Rmsprop(Vec<f32>),
    Adam(Adam),
}

impl OptState {
    /// A fresh state for `n` parameters (at the start, and after a retry).
    pub fn new(o: Optimizer, n: usize) -> OptState {
        match o {
            Optimizer::Rmsprop => OptState::Rmsprop(vec![0.0; n]),
            Optimizer::Adam => OptState::Adam(Adam::new(n)),
        }
    }

    /// One ascent step of `params` along `grad` with step size `lr`.
    pub fn ascend(&mut self, params: &mut [f32], grad: &[f64], lr: f32, s: &Settings) {
        match self {
            OptState::Rmsprop(cache) => {
                // keras-vis: the gradient normalised by its RMS, then RMSprop.
                let lr = lr as f64;
                let norm = (grad.iter().map(|v| v * v).sum::<f64>() / grad.len() as f64).sqrt()
                    + RMSPROP_EPS;
                let decay = s.rmsprop_decay as f64;
                for ((x, c), t) in params.iter_mut().zip(cache.iter_mut()).zip(grad) {
                    let g = t / norm;
                    let cache = decay * *c as f64 + (1.0 - decay) * g * g;
                    *c = cache as f32;
                    *x = (*x as f64 + lr * g / (cache + RMSPROP_EPS).sqrt()) as f32;
                }
            }
            OptState::Adam(adam) => {
                let g: Vec<f32> = grad.iter().map(|&v| v as f32).collect();
                adam.ascend(params, &g, lr);
            }
        }
    }
}

/// Adam's state for one parameter vector.
#[derive(Clone, Debug)]
pub struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    pub const BETA1: f32 = 0.9;
    pub const BETA2: f32 = 0.999;
    pub const EPS: f32 = 1e-8;

    pub fn new(n: usize) -> Adam {
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// One ascent step (the gradient points uphill).
    pub fn ascend(&mut self, params: &mut [f32], grad: &[f32], lr: f32) {
        self.t += 1;
        let c1 = 1.0 - Self::BETA1.powi(self.t);
        let c2 = 1.0 - Self::BETA2.powi(self.t);
        for (((p, g), m), v) in params
            .iter_mut()
            .zip(grad)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *m = Self::BETA1 * *m + (1.0 - Self::BETA1) * g;
            *v = Self::BETA2 * *v + (1.0 - Self::BETA2) * g * g;
            *p += lr * (*m / c1) / ((*v / c2).sqrt() + Self::EPS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_climbs_a_quadratic() {
        // Maximise -(p - 3)^2.
        let mut p = vec![0.0f32];
        let mut adam = Adam::new(1);
        for _ in 0..500 {
            let g = vec![-2.0 * (p[0] - 3.0)];
            adam.ascend(&mut p, &g, 0.05);
        }
        assert!((p[0] - 3.0).abs() < 0.05, "{}", p[0]);
    }
}

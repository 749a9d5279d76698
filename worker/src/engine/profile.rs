//! Where an ascent's time goes, phase by phase: the network, and everything around it that the
//! host image side does each step (`vgg-atlas bench --profile` prints it). Each phase is timed
//! as the wall time of the loop that does it for the whole batch, so the phases add up to the
//! step.

use std::time::{Duration, Instant};

/// One phase of a step on the host image side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The images from their parameters: the Fourier basis (inverse DFT, colour, sigmoid), or
    /// a copy of the pixels.
    Render,
    /// Each image through its step's random transform, then the network's preprocessing.
    Transform,
    /// The network: forward to the target layer and the input gradient.
    Network,
    /// The Lp-norm and total-variation penalties and their gradients.
    Regularizers,
    /// The network's gradient back through the preprocessing and the transform (its adjoint).
    TransformBackward,
    /// The pixels' gradient back through the Fourier basis.
    RenderBackward,
    /// The optimiser's step, and the copies that make a step undoable.
    Optimiser,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Render,
        Phase::Transform,
        Phase::Network,
        Phase::Regularizers,
        Phase::TransformBackward,
        Phase::RenderBackward,
        Phase::Optimiser,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Render => "render",
            Phase::Transform => "transform",
            Phase::Network => "network",
            Phase::Regularizers => "regularizers",
            Phase::TransformBackward => "transform backward",
            Phase::RenderBackward => "render backward",
            Phase::Optimiser => "optimiser",
        }
    }
}

/// Wall time per [`Phase`], summed over steps and batches.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Phases {
    time: [Duration; Phase::ALL.len()],
}

impl Phases {
    /// Runs `f`, adding its wall time to `phase`.
    pub fn time<T>(&mut self, phase: Phase, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.time[phase as usize] += t.elapsed();
        out
    }

    pub fn get(&self, phase: Phase) -> Duration {
        self.time[phase as usize]
    }

    pub fn total(&self) -> Duration {
        self.time.iter().sum()
    }

    pub fn add(&mut self, other: &Phases) {
        for (a, b) in self.time.iter_mut().zip(other.time) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up() {
        let mut p = Phases::default();
        let v = p.time(Phase::Network, || {
            std::thread::sleep(Duration::from_millis(5));
            7
        });
        assert_eq!(v, 7);
        p.time(Phase::Optimiser, || {
            std::thread::sleep(Duration::from_millis(2))
        });
        assert!(p.get(Phase::Network) >= Duration::from_millis(5));
        assert!(p.get(Phase::Render).is_zero());
        let mut q = Phases::default();
        q.add(&p);
        q.add(&p);
        assert_eq!(q.total(), p.total() * 2);
    }
}

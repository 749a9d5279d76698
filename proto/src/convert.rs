//! Every conversion between the shared vocabulary ([`crate::method`]) and the wire messages,
//! in one place: the coordinator sends a run's [`Settings`] in each lease, the worker reads
//! them back, and neither spells a field out again.

use crate::method::{Objective, Optimizer, Parameterization, Preset, Settings};
use crate::{Error, RunSettings};

impl Settings {
    /// These settings on the wire, for a run of the weights with this sha256.
    pub fn to_wire(&self, weights_sha256: &str) -> RunSettings {
        RunSettings {
            weights_sha256: weights_sha256.to_string(),
            size: self.size as u32,
            steps: self.steps as u32,
            objective: self.objective.name().to_string(),
            learning_rate: self.learning_rate,
            rmsprop_decay: self.rmsprop_decay,
            lp_norm_p: self.lp_norm_p,
            lp_norm_weight: self.lp_norm_weight,
            tv_beta: self.tv_beta,
            tv_weight: self.tv_weight,
            seed: self.seed,
            preset: self.preset.name().to_string(),
            parameterization: self.parameterization.name().to_string(),
            optimizer: self.optimizer.name().to_string(),
            fourier_decay: self.fourier_decay,
            jitter: self.jitter,
            rotate_degrees: self.rotate_degrees,
            scale_jitter: self.scale_jitter,
            warmup_steps: self.warmup_steps,
            cosine_decay: self.cosine_decay,
            roll_blocks: self.roll_blocks,
            second_ascent: self.second_ascent,
        }
    }
}

/// The value of `field` among `known` by name, or an error naming what the coordinator sent.
fn by_name<T: Copy>(
    field: &str,
    value: &str,
    known: &[T],
    name: fn(&T) -> &'static str,
) -> Result<T, Error> {
    known
        .iter()
        .find(|k| name(k) == value)
        .copied()
        .ok_or_else(|| {
            Error::Invalid(format!(
                "the coordinator asked for {field} '{value}', which this worker does not know (it \
             knows {}); run the same vgg-atlas release on the coordinator and every worker",
                known
                    .iter()
                    .map(|k| name(k).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
}

impl TryFrom<&RunSettings> for Settings {
    type Error = Error;

    fn try_from(s: &RunSettings) -> Result<Settings, Error> {
        use Objective::*;
        use Optimizer::*;
        use Parameterization::*;
        Ok(Settings {
            preset: by_name("preset", &s.preset, &Preset::ALL, Preset::name)?,
            objective: by_name(
                "objective",
                &s.objective,
                &[PreRelu, PostRelu, PostReluWake],
                Objective::name,
            )?,
            parameterization: by_name(
                "parameterization",
                &s.parameterization,
                &[Pixels, Fourier],
                Parameterization::name,
            )?,
            optimizer: by_name("optimizer", &s.optimizer, &[Rmsprop, Adam], Optimizer::name)?,
            size: s.size as usize,
            steps: s.steps as usize,
            seed: s.seed,
            learning_rate: s.learning_rate,
            rmsprop_decay: s.rmsprop_decay,
            lp_norm_p: s.lp_norm_p,
            lp_norm_weight: s.lp_norm_weight,
            tv_beta: s.tv_beta,
            tv_weight: s.tv_weight,
            fourier_decay: s.fourier_decay,
            jitter: s.jitter,
            rotate_degrees: s.rotate_degrees,
            scale_jitter: s.scale_jitter,
            warmup_steps: s.warmup_steps,
            cosine_decay: s.cosine_decay,
            roll_blocks: s.roll_blocks,
            second_ascent: s.second_ascent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_crosses_the_wire_unchanged() {
        for preset in Preset::ALL {
            let s = Settings {
                seed: 42,
                size: 96,
                ..preset.settings()
            };
            let wire = s.to_wire("ab");
            assert_eq!(wire.weights_sha256, "ab");
            assert_eq!(Settings::try_from(&wire).unwrap(), s, "{preset:?}");
        }
        let mut wire = Settings::default().to_wire("ab");
        wire.parameterization = "wavelets".into();
        let err = Settings::try_from(&wire).unwrap_err().to_string();
        assert!(
            err.contains("parameterization 'wavelets'") && err.contains("fourier"),
            "{err}"
        );
        wire = Settings::default().to_wire("ab");
        wire.preset = "deepdream".into();
        let err = Settings::try_from(&wire).unwrap_err().to_string();
        assert!(
            err.contains("deepdream") && err.contains("keras-vis"),
            "{err}"
        );
    }
}

//! The method's vocabulary, shared by the planner, the wire, the engine and the CLI: the
//! presets, every parameter that changes an image ([`Settings`]), the settings check, and the
//! seed of each filter. The engine that carries the method out is `vgg-atlas-worker`'s
//! `engine`; this module only names and checks what it is asked to do.

use crate::layers::{Layer, DENSE_INPUT_SIZE};
use crate::{Error, Result};

/// Which quantity of the target filter is maximised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Mean of the conv output before the ReLU: silent filters still get a gradient.
    PreRelu,
    /// Mean after the ReLU, as in the Keras tutorial.
    PostRelu,
    /// Mean after the ReLU while the filter fires anywhere in the image, and before it while
    /// it is silent: the activation itself is maximised, and a silent filter is still woken
    /// (post-ReLU alone gives it no gradient).
    PostReluWake,
}

/// How the image is represented while it is optimised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Parameterization {
    /// The pixels themselves (the Keras blog, keras-vis), shown standardised at the end.
    Pixels,
    /// lucid's scaled Fourier spectrum with decorrelated colour and a sigmoid.
    Fourier,
}

/// The ascent's update rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum Optimizer {
    /// RMSprop on the per-image RMS-normalised gradient (keras-vis).
    Rmsprop,
    /// Adam on the raw gradient (lucid).
    Adam,
}

/// A named bundle of method settings. (`--preset` takes its name as a string, so that an unknown
/// one gets the same error on the command line and on the wire.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The default: lucid's image side at 64 steps, with a larger warmed-up step size, the
    /// post-ReLU objective woken by pre-ReLU, and blocks 1-2 rolled; chosen by measurement
    /// (docs/method.md).
    Atlas,
    /// The Keras blog's method as first written here: pixels, Lp + TV weight 10, 20 steps.
    Quick,
    /// keras-vis / tf-keras-vis: pixels, Lp + TV (weight 1), jitter and a small rotation,
    /// RMSprop, 200 steps.
    KerasVis,
    /// lucid: Fourier parameterisation, decorrelated colour, transformation robustness, Adam,
    /// 256 steps.
    Lucid,
}

/// The default preset.
pub const DEFAULT_PRESET: Preset = Preset::Atlas;

impl Objective {
    pub fn name(&self) -> &'static str {
        match self {
            Objective::PreRelu => "pre-relu",
            Objective::PostRelu => "post-relu",
            Objective::PostReluWake => "post-relu-wake",
        }
    }
}

impl Parameterization {
    pub fn name(&self) -> &'static str {
        match self {
            Parameterization::Pixels => "pixels",
            Parameterization::Fourier => "fourier",
        }
    }
}

impl Optimizer {
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Rmsprop => "rmsprop",
            Optimizer::Adam => "adam",
        }
    }
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

    /// The preset named `name`; an error lists the presets.
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
            warmup_steps: 0,
            cosine_decay: false,
            roll_blocks: 0,
            second_ascent: false,
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
            // lucid's image side at 64 steps, with what measured best at that length
            // (docs/method.md): 8x the step size after an 8-step warm-up, the activation
            // itself as the objective (woken by pre-ReLU while silent), the images of
            // block1 and block2 rolled, so their borders are not special, and a second,
            // pre-ReLU ascent for a filter whose image ends mostly silent.
            Preset::Atlas => Settings {
                preset: Preset::Atlas,
                steps: 64,
                objective: Objective::PostReluWake,
                learning_rate: 0.4,
                warmup_steps: 8,
                roll_blocks: 2,
                second_ascent: true,
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

/// Every parameter that changes an image. A run stores them as JSON (`runs.settings`), and the
/// run id is a hash of that JSON: the field order and names are part of every stored run's
/// identity, so a field is only ever added (with a default that keeps old runs' JSON).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Settings {
    /// The preset these settings started from (flags may have changed some values; all of
    /// them are recorded).
    pub preset: Preset,
    pub size: usize,
    pub steps: usize,
    /// The run seed; each filter's seed is [`filter_seed`] of it.
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
    /// The step size's schedule: it rises linearly from a tenth of `learning_rate` to all of
    /// it over the first `warmup_steps` steps, at most half the run (0: it starts at all of
    /// it) ...
    #[serde(default, skip_serializing_if = "is_zero")]
    pub warmup_steps: u32,
    /// ... and then, if set, falls along a half cosine to a hundredth of it at the last step
    /// (unset: it stays). (Both are left out of the JSON when unused, so the runs stored
    /// before they existed keep their identity.)
    #[serde(default, skip_serializing_if = "is_false")]
    pub cosine_decay: bool,
    /// In the first `roll_blocks` blocks of the network, every step views the image rolled: it
    /// repeats periodically (a Fourier image is periodic) and is shifted by a random offset
    /// over a whole period, so no part of it sits at the view's border more than another.
    /// Left out of the JSON when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub roll_blocks: u32,
    /// A filter whose image ends mostly silent under a post-ReLU objective (its mean before
    /// the ReLU below 0: the image's positions where it is silent outweigh those where it
    /// fires, and post-ReLU gives them no gradient) is ascended again from the same seed on
    /// the pre-ReLU mean, which gives every position a gradient; the image that excites it
    /// more is kept. No effect with the pre-ReLU objective. Left out of the JSON when unset.
    #[serde(default, skip_serializing_if = "is_false")]
    pub second_ascent: bool,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

impl Default for Settings {
    fn default() -> Self {
        DEFAULT_PRESET.settings()
    }
}

/// The largest image side and step count anyone may ask for: a worker never trusts sizes from
/// the wire without a bound (a 100,000 px image would take the machine's memory).
pub const MAX_SIZE: usize = 4096;
pub const MAX_STEPS: usize = 100_000;

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
        if self.size > MAX_SIZE || self.steps > MAX_STEPS {
            return Err(Error::Invalid(format!(
                "size {} px and {} steps: at most {MAX_SIZE} px and {MAX_STEPS} steps",
                self.size, self.steps
            )));
        }
        if !layer.is_conv() && layer.output_side(self.size) != 7 {
            return Err(Error::Invalid(format!(
                "{} needs --size {DENSE_INPUT_SIZE}: the classifier takes the 7x7 map after the last pool",
                layer.name,
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
        if self.roll_blocks > 5 {
            return Err(Error::Invalid(format!(
                "roll blocks {}: VGG16 has 5 blocks",
                self.roll_blocks
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

impl Settings {
    /// Whether the ascent on `layer` views its image rolled (see `roll_blocks`).
    pub fn rolls(&self, layer: &Layer) -> bool {
        layer.is_conv() && (layer.pools_before() as u32) < self.roll_blocks
    }

    /// The step size of step `step` (0-based) of `steps`, from the schedule.
    pub fn learning_rate_at(&self, step: usize) -> f32 {
        let base = self.learning_rate;
        // At most half the run, so `--steps 4` with a preset's warm-up still climbs to the full
        // step size.
        let warmup = (self.warmup_steps as usize).min(self.steps / 2);
        if step < warmup {
            return base * (0.1 + 0.9 * step as f32 / warmup as f32);
        }
        if !self.cosine_decay || self.steps <= warmup + 1 {
            return base;
        }
        let t = (step - warmup) as f32 / (self.steps - warmup - 1) as f32;
        base * (0.01 + 0.99 * 0.5 * (1.0 + (std::f32::consts::PI * t.min(1.0)).cos()))
    }
}

/// The seed of one filter's start image and transforms, from the run seed: a function of
/// (seed, layer, filter) only, so a filter's image never depends on which worker or batch
/// computed it. The planner stores it with the filter and the lease carries it; the engine
/// uses the lease's.
pub fn filter_seed(seed: u64, layer: u64, filter: u64) -> u64 {
    // splitmix64 over the three parts, so nearby filters get unrelated streams.
    let mut z = seed
        ^ layer.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ filter.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored JSON of the settings is the run's identity: a change to it (a renamed or
    /// reordered field) would make every existing database start its runs again.
    #[test]
    fn the_settings_json_of_stored_runs_does_not_change() {
        assert_eq!(
            serde_json::to_string(&Preset::Atlas.settings()).unwrap(),
            r#"{"preset":"atlas","size":128,"steps":64,"seed":0,"objective":"post-relu-wake","parameterization":"fourier","optimizer":"adam","learning_rate":0.4,"rmsprop_decay":0.95,"lp_norm_p":6.0,"lp_norm_weight":0.0,"tv_beta":2.0,"tv_weight":0.0,"fourier_decay":1.0,"jitter":8,"rotate_degrees":10.0,"scale_jitter":0.1,"warmup_steps":8,"roll_blocks":2,"second_ascent":true}"#
        );
        // The presets without the schedule or the roll keep the JSON they had before those
        // fields existed, so their stored runs keep their ids.
        assert_eq!(
            serde_json::to_string(&Preset::Lucid.settings()).unwrap(),
            r#"{"preset":"lucid","size":128,"steps":256,"seed":0,"objective":"pre-relu","parameterization":"fourier","optimizer":"adam","learning_rate":0.05,"rmsprop_decay":0.95,"lp_norm_p":6.0,"lp_norm_weight":0.0,"tv_beta":2.0,"tv_weight":0.0,"fourier_decay":1.0,"jitter":8,"rotate_degrees":10.0,"scale_jitter":0.1}"#
        );
        let old: Settings = serde_json::from_str(r#"{"preset":"atlas","size":128,"steps":64,"seed":0,"objective":"pre-relu","parameterization":"fourier","optimizer":"adam","learning_rate":0.05,"rmsprop_decay":0.95,"lp_norm_p":6.0,"lp_norm_weight":0.0,"tv_beta":2.0,"tv_weight":0.0,"fourier_decay":1.0,"jitter":8,"rotate_degrees":10.0,"scale_jitter":0.1}"#).unwrap();
        assert_eq!(
            (
                old.warmup_steps,
                old.cosine_decay,
                old.roll_blocks,
                old.second_ascent
            ),
            (0, false, 0, false)
        );
    }

    #[test]
    fn the_step_size_warms_up_then_stays_or_decays_along_a_cosine() {
        let s = Settings {
            learning_rate: 0.4,
            steps: 64,
            warmup_steps: 8,
            cosine_decay: false,
            ..Settings::default()
        };
        assert!((s.learning_rate_at(0) - 0.04).abs() < 1e-6);
        assert!((s.learning_rate_at(4) - 0.22).abs() < 1e-6);
        assert_eq!(s.learning_rate_at(8), 0.4);
        assert_eq!(s.learning_rate_at(63), 0.4);
        let c = Settings {
            cosine_decay: true,
            ..s.clone()
        };
        assert_eq!(c.learning_rate_at(8), 0.4);
        assert!((c.learning_rate_at(63) - 0.004).abs() < 1e-6);
        let mid = c.learning_rate_at(35);
        assert!(mid < 0.4 && mid > 0.004 && mid < c.learning_rate_at(20));
        let flat = Settings {
            warmup_steps: 0,
            ..Preset::Lucid.settings()
        };
        assert!((0..256).all(|i| flat.learning_rate_at(i) == 0.05));
        // A short run warms up over half its steps at most.
        let short = Settings { steps: 4, ..s };
        assert!(short
            .check(&Layer::by_name("block1_conv1").unwrap())
            .is_ok());
        assert!((short.learning_rate_at(0) - 0.04).abs() < 1e-6);
        assert!((short.learning_rate_at(1) - 0.22).abs() < 1e-6);
        assert_eq!(short.learning_rate_at(2), 0.4);
    }

    #[test]
    fn the_atlas_preset_rolls_blocks_1_and_2_only() {
        let s = Preset::Atlas.settings();
        let rolls = |name| s.rolls(&Layer::by_name(name).unwrap());
        assert!(rolls("block1_conv1") && rolls("block1_conv2") && rolls("block2_conv2"));
        assert!(!rolls("block3_conv1") && !rolls("block5_conv3") && !rolls("fc1"));
        assert!(!Preset::Lucid
            .settings()
            .rolls(&Layer::by_name("block1_conv1").unwrap()));
    }

    #[test]
    fn seeds_are_fixed_functions_of_seed_layer_and_filter() {
        assert_eq!(filter_seed(0, 4, 7), filter_seed(0, 4, 7));
        assert_ne!(filter_seed(0, 4, 7), filter_seed(0, 4, 8));
        assert_ne!(filter_seed(0, 4, 7), filter_seed(1, 4, 7));
        assert_ne!(filter_seed(0, 4, 7), filter_seed(0, 5, 7));
    }

    #[test]
    fn absurd_sizes_are_refused_before_anything_runs() {
        let l = Layer::by_name("block1_conv1").unwrap();
        let big = Settings {
            size: 100_000,
            ..Settings::default()
        };
        let e = big.check(&l).unwrap_err().to_string();
        assert!(e.contains("100000") && e.contains("4096"), "{e}");
        let long = Settings {
            steps: 1_000_000,
            ..Settings::default()
        };
        assert!(long.check(&l).is_err());
        assert!(Settings::default().check(&l).is_ok());
    }
}

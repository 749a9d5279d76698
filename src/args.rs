//! The flags several commands share: where the network runs (`Compute`), the method
//! (`Method`), the atlas layout (`MosaicArgs`), and the layer and filter lists.

use std::ops::Range;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use vgg_atlas_proto::{Layer, Objective, Optimizer, Parameterization, Preset, Settings};
use vgg_atlas_worker::engine::device_trunk::Precision;
use vgg_atlas_worker::engine::trunk::Trunk;
use vgg_atlas_worker::{fetch, Weights};

#[derive(Args)]
pub struct Compute {
    /// Weights file (.safetensors with Keras or torchvision names, or Keras .onnx); default: the
    /// cached Keras VGG16 weights, fetched if missing.
    #[arg(long, global = true)]
    pub weights: Option<PathBuf>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where the network runs: `cpu`, or `cuda:N` / `metal:N` in a build with that feature.
    /// `render` and `worker` take a list (cuda:0,cuda:1,...): one worker per device.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// On a GPU: f32 (the default), tf32 (CUDA: f32 tensors, the convs' products on TF32
    /// tensor cores) or bf16 (the network in bfloat16); `check-device --precision P` measures
    /// the error against the CPU's f32.
    #[arg(long, default_value = "f32")]
    pub precision: String,
}

#[derive(Args)]
pub struct Method {
    /// The method: atlas (the default: lucid's transforms and Fourier parameterisation at 64
    /// steps, a larger warmed-up step, the activation woken while silent, block1-2 rolled),
    /// quick (20 steps, pixels), keras-vis (200 steps, jitter), lucid (lucid's own settings,
    /// 256 steps); see docs/method.md. The flags below override single values of the preset.
    #[arg(long, default_value = vgg_atlas_proto::method::DEFAULT_PRESET.name())]
    pub preset: String,
    /// Image side in pixels [128; at most 4096].
    #[arg(long)]
    pub size: Option<usize>,
    /// Ascent steps [preset; at most 100000].
    #[arg(long)]
    pub steps: Option<usize>,
    /// Run seed [0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// What is maximised: post-relu-wake (the atlas preset's), pre-relu (lucid's, keras-vis's)
    /// or post-relu (the tutorial's) [preset].
    #[arg(long, value_enum)]
    pub objective: Option<Objective>,
    /// pixels or fourier [preset].
    #[arg(long, value_enum)]
    pub parameterization: Option<Parameterization>,
    /// rmsprop or adam [preset].
    #[arg(long, value_enum)]
    pub optimizer: Option<Optimizer>,
    #[arg(long)]
    pub learning_rate: Option<f32>,
    #[arg(long)]
    pub rmsprop_decay: Option<f32>,
    #[arg(long)]
    pub lp_norm_p: Option<f32>,
    #[arg(long)]
    pub lp_norm_weight: Option<f32>,
    #[arg(long)]
    pub tv_beta: Option<f32>,
    #[arg(long)]
    pub tv_weight: Option<f32>,
    /// Fourier parameterisation: frequency f scaled by 1/f^decay.
    #[arg(long)]
    pub fourier_decay: Option<f32>,
    /// Random shift per step, pixels each way.
    #[arg(long)]
    pub jitter: Option<u32>,
    /// Random rotation per step, degrees each way.
    #[arg(long)]
    pub rotate_degrees: Option<f32>,
    /// Random scale per step within 1 +- this.
    #[arg(long)]
    pub scale_jitter: Option<f32>,
    /// Steps over which the step size rises from a tenth of --learning-rate to all of it (at
    /// most half of --steps).
    #[arg(long)]
    pub warmup_steps: Option<u32>,
    /// After the warm-up, lower the step size along a half cosine to a hundredth of it at the
    /// last step (true or false).
    #[arg(long)]
    pub cosine_decay: Option<bool>,
    /// In the first N blocks (0 to 5), view the image rolled each step: repeated periodically
    /// and shifted by a random offset over a whole period, so its borders are not special.
    #[arg(long)]
    pub roll_blocks: Option<u32>,
    /// Ascend a filter whose image ends mostly silent (its mean before the ReLU below 0) a
    /// second time on the pre-ReLU objective, and keep the image that excites it more (true
    /// or false).
    #[arg(long)]
    pub second_ascent: Option<bool>,
}

impl Method {
    /// The preset's settings with the given flags applied.
    pub fn settings(&self) -> Result<Settings> {
        let mut s = Preset::by_name(&self.preset)?.settings();
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field { s.$field = v; } )* };
        }
        set!(
            size,
            steps,
            seed,
            learning_rate,
            rmsprop_decay,
            lp_norm_p,
            lp_norm_weight,
            tv_beta,
            tv_weight,
            fourier_decay,
            jitter,
            rotate_degrees,
            scale_jitter,
            warmup_steps,
            cosine_decay,
            roll_blocks,
            second_ascent,
            objective,
            parameterization,
            optimizer
        );
        Ok(s)
    }
}

impl Compute {
    /// The network on `--device`, checked before any work starts.
    pub fn trunk(&self, weights: &Weights) -> Result<Box<dyn Trunk + Send>> {
        Ok(vgg_atlas_worker::trunk_on(
            weights,
            &self.device,
            self.precision()?,
        )?)
    }

    /// `--device` as a list (render's local workers take one each).
    pub fn devices(&self) -> Vec<&str> {
        self.device.split(',').map(str::trim).collect()
    }

    /// `--precision`, checked against every `--device`.
    pub fn precision(&self) -> Result<Precision> {
        let p = Precision::by_name(&self.precision)?;
        for d in self.devices() {
            match p {
                Precision::F32 => {}
                _ if d == "cpu" => bail!(
                    "--precision {} is for GPU devices; on --device cpu the network computes in f32",
                    p.name()
                ),
                Precision::Tf32 if !d.starts_with("cuda") => bail!(
                    "--precision tf32 is for CUDA devices; use f32 or bf16 on --device {d}"
                ),
                _ => {}
            }
        }
        Ok(p)
    }

    /// Filters computed together when `--batch` is not given: a GPU wants wide batches.
    pub fn default_batch(&self) -> usize {
        if self.devices().iter().all(|&d| d == "cpu") {
            16
        } else {
            64
        }
    }

    pub fn weights(&self) -> Result<Weights> {
        Ok(Weights::load(&self.weights_path()?)?)
    }

    /// `--weights`, else the cached default (fetched if missing).
    pub fn weights_path(&self) -> Result<std::path::PathBuf> {
        Ok(match &self.weights {
            Some(p) => p.clone(),
            None => fetch::ensure_default(&|m| eprintln!("{m}"))?,
        })
    }

    /// `--threads`, else every core.
    pub fn threads(&self) -> Result<usize> {
        let n = self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        });
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        Ok(n)
    }

    pub fn pool(&self) -> Result<(rayon::ThreadPool, usize)> {
        let n = self.threads()?;
        Ok((rayon::ThreadPoolBuilder::new().num_threads(n).build()?, n))
    }
}

/// How the atlas pictures are laid out.
#[derive(Args, Clone)]
pub struct MosaicArgs {
    /// Side of one tile in the layer mosaics, pixels (tiles/ keeps every image at full size).
    #[arg(long, default_value_t = 64)]
    pub tile_size: u32,
    /// Margin between mosaic tiles, pixels.
    #[arg(long, default_value_t = 2)]
    pub margin: u32,
}

impl MosaicArgs {
    pub fn options(&self) -> vgg_atlas_atlas::Options {
        vgg_atlas_atlas::Options {
            tile: self.tile_size,
            margin: self.margin,
            ..Default::default()
        }
    }
}

pub fn parse_filters(spec: &str, layer: &Layer) -> Result<Range<usize>> {
    let n = layer.filters();
    let range = match spec.split_once("..") {
        Some((a, b)) => {
            let a: usize = a
                .trim()
                .parse()
                .with_context(|| format!("bad --filters '{spec}': expected A..B, e.g. 0..16"))?;
            let b: usize = if b.trim().is_empty() {
                n
            } else {
                b.trim()
                    .parse()
                    .with_context(|| format!("bad --filters '{spec}': expected A..B, e.g. 0..16"))?
            };
            a..b
        }
        None => {
            let a: usize = spec
                .trim()
                .parse()
                .with_context(|| format!("bad --filters '{spec}': expected A..B or N"))?;
            a..a + 1
        }
    };
    if range.start >= range.end || range.end > n {
        bail!(
            "--filters {spec} is out of range: {} has filters 0..{n} (end exclusive)",
            layer.name
        );
    }
    Ok(range)
}

/// The named layers, or all 13 conv layers when none are named.
pub fn conv_layers_or(names: &[String]) -> Result<Vec<Layer>> {
    if names.is_empty() {
        return Ok(vgg_atlas_proto::LAYERS[..vgg_atlas_proto::CONV_LAYERS].to_vec());
    }
    Ok(names
        .iter()
        .map(|n| Layer::by_name(n.trim()))
        .collect::<Result<_, _>>()?)
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

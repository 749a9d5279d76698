//! `vgg-atlas visualize` (a few filters' images into a folder, no database) and `vgg-atlas
//! probe` (which filters a real image excites most).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use vgg_atlas_proto::Layer;
use vgg_atlas_worker::engine::ascent::{self, Faults, Target};
use vgg_atlas_worker::engine::vgg::Vgg16;

use crate::args::{parse_filters, Compute, Method};

#[derive(Args)]
pub struct ProbeArgs {
    pub image: PathBuf,
    #[arg(long)]
    pub layer: String,
    #[arg(long, default_value_t = 10)]
    pub top: usize,
    /// Print {"layer": ..., "activations": [one per filter]}.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: Compute,
}

#[derive(Args)]
pub struct VisualizeArgs {
    #[arg(long)]
    pub layer: String,
    /// Filter range A..B (end exclusive), or a single filter N.
    #[arg(long, default_value = "0..16")]
    pub filters: String,
    #[arg(long)]
    pub out: PathBuf,
    /// Filters optimised at once (one image each).
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Print a JSON array, one object per filter.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub method: Method,
    #[command(flatten)]
    pub compute: Compute,
}

pub fn probe(a: ProbeArgs) -> Result<()> {
    let ProbeArgs {
        image,
        layer,
        top,
        json,
        compute,
    } = a;
    let layer = Layer::by_name(&layer)?;
    let img = image::open(&image)
        .with_context(|| format!("cannot read image {}", image.display()))?
        .to_rgb8();
    let weights = compute.weights()?;
    let (pool, _) = compute.pool()?;
    let model = Vgg16::new(&weights, &vgg_atlas_worker::device(&compute.device)?)?;
    let acts = pool.install(|| model.probe(&img, layer))?;
    if json {
        println!("{}", json!({"layer": layer.name, "activations": acts}));
        return Ok(());
    }
    let mut order: Vec<usize> = (0..acts.len()).collect();
    order.sort_by(|&a, &b| acts[b].total_cmp(&acts[a]));
    println!(
        "{} on {} ({}x{}): top {} of {} filters",
        layer.name,
        image.display(),
        img.width(),
        img.height(),
        top.min(acts.len()),
        acts.len()
    );
    println!("{:>5} {:>7} {:>12}", "rank", "filter", "activation");
    for (rank, &f) in order.iter().take(top).enumerate() {
        println!("{:>5} {:>7} {:>12.4}", rank + 1, f, acts[f]);
    }
    Ok(())
}

pub fn visualize(a: VisualizeArgs) -> Result<()> {
    let VisualizeArgs {
        layer,
        filters,
        out,
        batch,
        json,
        method,
        compute,
    } = a;
    let out = out.as_path();
    let layer = Layer::by_name(&layer)?;
    let filters = parse_filters(&filters, &layer)?;
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let settings = method.settings()?;
    settings.check(&layer)?;
    let weights = compute.weights()?;
    if !layer.is_conv() && !weights.has_classifier() {
        return Err(vgg_atlas_worker::Error::NoClassifier {
            layer: layer.name.into(),
            source_name: weights.source.clone(),
        }
        .into());
    }
    let (pool, _) = compute.pool()?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create output folder {}", out.display()))?;
    let mut trunk = compute.trunk(&weights)?;
    let all: Vec<usize> = filters.collect();
    let mut records = Vec::new();
    for chunk in all.chunks(batch) {
        let results = pool.install(|| {
            let targets: Vec<Target> = chunk
                .iter()
                .map(|&f| Target::planned(&settings, &layer, f))
                .collect();
            ascent::ascend(
                &mut *trunk,
                weights.preprocess,
                layer,
                &targets,
                &settings,
                Faults::from_env(),
            )
        })?;
        for r in results {
            let name = format!("{}_{:04}.png", r.layer, r.filter);
            let png = out.join(&name);
            if let Some(img) = &r.image {
                img.save(&png)
                    .with_context(|| format!("cannot write {}", png.display()))?;
            }
            if !json {
                let flag = if let Some(f) = &r.failed_reason {
                    format!("FAILED: {f}")
                } else if r.dead {
                    "dead".into()
                } else {
                    String::new()
                };
                eprintln!(
                    "{} filter {:>3}: activation {:>10.3} (start {:>8.3}) {}",
                    r.layer, r.filter, r.activation, r.start_activation, flag
                );
            }
            let mut v = serde_json::to_value(&r)?;
            v["image"] = json!(r.image.as_ref().map(|_| name.clone()));
            records.push(v);
        }
    }
    let doc = json!({"weights_sha256": weights.sha256, "preprocess": weights.preprocess, "settings": settings, "results": records});
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    if json {
        println!("{}", serde_json::to_string(&records)?);
    } else {
        eprintln!(
            "wrote {} images and results.json to {}",
            records.len(),
            out.display()
        );
    }
    Ok(())
}

//! `vgg-atlas visualize` (a few filters' images into a folder, no database) and `vgg-atlas
//! probe` (which filters a real image excites most).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use vgg_atlas_atlas::quality;
use vgg_atlas_proto::Layer;
use vgg_atlas_worker::engine::ascent::{self, Faults, Progress, Target, Watch};
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
    /// Output folder: a PNG per filter and results.json.
    #[arg(long, default_value = "out/visualize")]
    pub out: PathBuf,
    /// Filters optimised at once, one image each [16 on the CPU, 64 on a GPU].
    #[arg(long)]
    pub batch: Option<usize>,
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
    let batch = batch.unwrap_or(compute.default_batch());
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
    let mut steps = StepProgress::new(layer.name, all.len(), settings.steps);
    let mut records = Vec::new();
    let (mut activations, mut borders) = (Vec::new(), Vec::new());
    for chunk in all.chunks(batch) {
        let results = pool.install(|| {
            let targets: Vec<Target> = chunk
                .iter()
                .map(|&f| Target::planned(&settings, &layer, f))
                .collect();
            ascent::ascend_observed(
                &mut *trunk,
                weights.preprocess,
                layer,
                &targets,
                &settings,
                Faults::from_env(),
                &mut Watch {
                    on_progress: Some(&mut |p| steps.progress(p)),
                    phases: None,
                },
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
                } else if let Some(a) = r.second_ascent {
                    format!(
                        "(mostly silent: a second, pre-ReLU ascent reached {:.3}, the first {:.3})",
                        a.second_activation, a.first_activation
                    )
                } else {
                    String::new()
                };
                steps.say(&format!(
                    "{} filter {:>3}: activation {:>10.3} (start {:>8.3}) {}",
                    r.layer, r.filter, r.activation, r.start_activation, flag
                ));
            }
            let border = r.image.as_ref().map(quality::border_ratio);
            if r.failed_reason.is_none() {
                activations.push(r.activation as f64);
                borders.extend(border);
            }
            let mut v = serde_json::to_value(&r)?;
            v["image"] = json!(r.image.as_ref().map(|_| name.clone()));
            v["border_ratio"] = json!(border);
            records.push(v);
        }
    }
    steps.finish();
    let doc = json!({"weights_sha256": weights.sha256, "preprocess": weights.preprocess, "settings": settings, "results": records});
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&doc)?,
    )?;
    if json {
        println!("{}", serde_json::to_string(&records)?);
    } else {
        eprintln!(
            "{}: {} finished, {} dead, {} weak (under a fifth of the median activation); \
             activation median {:.1}; border ratio median {:.2}, max {:.2}",
            layer.name,
            activations.len(),
            records.iter().filter(|r| r["dead"] == json!(true)).count(),
            quality::weak_count(&activations),
            quality::median(&activations).unwrap_or(0.0),
            quality::median(&borders).unwrap_or(1.0),
            borders.iter().copied().fold(1.0f64, f64::max),
        );
        eprintln!(
            "wrote {} images and results.json to {}",
            records.len(),
            out.display()
        );
    }
    Ok(())
}

/// Step-by-step progress of `visualize`: a bar on a terminal, else a line every 10 s.
struct StepProgress {
    bar: Option<indicatif::ProgressBar>,
    layer: &'static str,
    done: u64,
    total: u64,
    steps: usize,
    last_line: std::time::Instant,
}

impl StepProgress {
    fn new(layer: &'static str, filters: usize, steps: usize) -> StepProgress {
        let total = (filters * (steps + 1)) as u64;
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {percent:>3}% of image steps, {elapsed} (ETA {eta})",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{layer}, {filters} filters"));
            bar
        });
        StepProgress {
            bar,
            layer,
            done: 0,
            total,
            steps,
            last_line: std::time::Instant::now(),
        }
    }

    /// One report of the ascent: image steps done, or second ascents to come (which grow the
    /// total by their steps).
    fn progress(&mut self, p: Progress) {
        let images = match p {
            Progress::Step(images) => images,
            Progress::SecondAscent(filters) => {
                self.total += (filters * (self.steps + 1)) as u64;
                if let Some(bar) = &self.bar {
                    bar.set_length(self.total);
                }
                return;
            }
        };
        self.done += images as u64;
        match &self.bar {
            Some(bar) => bar.set_position(self.done),
            None if self.last_line.elapsed() >= std::time::Duration::from_secs(10) => {
                self.last_line = std::time::Instant::now();
                eprintln!(
                    "{}: {}% of image steps ({} of {})",
                    self.layer,
                    100 * self.done / self.total.max(1),
                    self.done,
                    self.total
                );
            }
            None => {}
        }
    }

    /// A line for the user, above the bar.
    fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

//! The benchmarks: `bench` (filters per second of the ascent on one layer), `bench-presets`
//! (the presets side by side on the same filters) and `bench-coordinator` (results per second a
//! coordinator records from simulated workers).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use vgg_atlas_atlas::quality;
use vgg_atlas_proto::{Layer, Preset, Settings};
use vgg_atlas_worker::engine::ascent::{self, Faults, Target, Watch};
use vgg_atlas_worker::engine::device_trunk::DeviceTrunk;
use vgg_atlas_worker::engine::profile::{Phase, Phases};
use vgg_atlas_worker::engine::record;
use vgg_atlas_worker::engine::record::FilterResult;

use crate::args::{conv_layers_or, parse_filters, runtime, Compute, Method};

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long)]
    pub layer: String,
    /// Batch size; if omitted, tries 1, 2, 4, 8 and 16 (on a GPU 16 to 256) and reports the
    /// best.
    #[arg(long)]
    pub batch: Option<usize>,
    /// On a GPU, step the images on the CPU between network passes (a batch of images up and
    /// of gradients back per step) instead of keeping the whole ascent on the device: the
    /// comparison that shows what keeping it there buys.
    #[arg(long)]
    pub host_ascent: bool,
    /// Also print where the best batch's time went: the network, and each phase the host image
    /// side runs around it every step (render, transform, regularizers, their backward passes,
    /// optimiser), plus encoding the PNGs once per filter.
    #[arg(long)]
    pub profile: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub method: Method,
    #[command(flatten)]
    pub compute: Compute,
}

#[derive(Args)]
pub struct BenchPresetsArgs {
    /// Layers, comma-separated, or `all` (the 13 conv layers).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "block1_conv2,block3_conv1,block5_conv3"
    )]
    pub layers: Vec<String>,
    /// Filters of each layer, A..B.
    #[arg(long, default_value = "0..4", conflicts_with = "sample")]
    pub filters: String,
    /// Instead of --filters: N filters of each layer spread over it (as `render --sample N`).
    #[arg(long)]
    pub sample: Option<usize>,
    /// Presets to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "quick,keras-vis,lucid")]
    pub presets: Vec<String>,
    /// Override every preset's step count (default: each preset's own).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    /// Where to write presets.png.
    #[arg(long, default_value = "out/bench-presets")]
    pub out: PathBuf,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub compute: Compute,
}

#[derive(Args)]
pub struct BenchCoordinatorArgs {
    /// The store to measure (default: SQLite in a temporary folder). On PostgreSQL the
    /// benchmark works in a schema of its own and drops it at the end.
    #[arg(long)]
    pub db: Option<String>,
    /// Concurrent simulated workers.
    #[arg(long, default_value_t = 64)]
    pub workers: usize,
    /// Filters per lease.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Image side (128: ~50 KB PNGs of noise).
    #[arg(long, default_value_t = 128)]
    pub size: u32,
    /// Layers of the plan (default: all 13 conv layers, 4,224 filters).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn bench_coordinator(a: BenchCoordinatorArgs) -> Result<()> {
    let BenchCoordinatorArgs {
        db,
        workers,
        batch,
        size,
        layers,
        json,
    } = a;
    let layers = conv_layers_or(&layers)?;
    let cfg = vgg_atlas_coordinator::bench::BenchConfig {
        db,
        workers: workers.max(1),
        batch: batch.max(1),
        size,
        layers,
    };
    let r = runtime()?.block_on(vgg_atlas_coordinator::bench::run(cfg))?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{}: {} workers x {} filters/lease, {} filters, {} KB PNGs: {:.0} results/s, \
             {:.0} leases/s; poll+heartbeat+submit p50 {:.1} ms, p99 {:.1} ms ({:.1} s)",
            r.backend,
            r.workers,
            r.batch,
            r.filters,
            r.png_bytes / 1000,
            r.results_per_second,
            r.leases_per_second,
            r.round_trip_p50_ms,
            r.round_trip_p99_ms,
            r.seconds
        );
    }
    Ok(())
}

pub fn bench_presets(a: BenchPresetsArgs) -> Result<()> {
    let BenchPresetsArgs {
        layers,
        filters,
        sample,
        presets,
        steps,
        size,
        out,
        json,
        compute,
    } = a;
    let filters = filters.as_str();
    let layers: Vec<Layer> = if layers.iter().any(|l| l.trim() == "all") {
        conv_layers_or(&[])?
    } else {
        conv_layers_or(&layers)?
    };
    if sample == Some(0) {
        bail!("--sample must be at least 1");
    }
    let weights = compute.weights()?;
    let (pool, threads) = compute.pool()?;
    let mut trunk = compute.trunk(&weights)?;
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut rows = Vec::new();
    let mut images: Vec<Vec<Option<image::RgbImage>>> = Vec::new();
    let presets: Vec<Preset> = presets
        .iter()
        .map(|p| Preset::by_name(p.trim()))
        .collect::<Result<_, _>>()?;
    for &preset in &presets {
        for &layer in &layers {
            let ids: Vec<usize> = match sample {
                Some(n) => vgg_atlas_coordinator::plan::spread(layer.filters(), n),
                None => parse_filters(filters, &layer)?.collect(),
            };
            let mut s = preset.settings();
            s.size = size;
            if let Some(n) = steps {
                s.steps = n;
            }
            s.check(&layer)?;
            let t = Instant::now();
            let results = pool
                .install(|| ascent::visualize(&mut *trunk, weights.preprocess, layer, &ids, &s))?;
            let secs = t.elapsed().as_secs_f64() / ids.len() as f64;
            let mean = |f: &dyn Fn(&FilterResult) -> f32| {
                results.iter().map(|r| f(r) as f64).sum::<f64>() / results.len() as f64
            };
            let activation = mean(&|r| r.activation);
            let finished: Vec<&FilterResult> = results
                .iter()
                .filter(|r| r.failed_reason.is_none())
                .collect();
            let activations: Vec<f64> = finished.iter().map(|r| r.activation as f64).collect();
            let borders: Vec<f64> = finished
                .iter()
                .filter_map(|r| r.image.as_ref().map(quality::border_ratio))
                .collect();
            let median_activation = quality::median(&activations).unwrap_or(0.0);
            let median_border = quality::median(&borders).unwrap_or(1.0);
            let max_border = borders.iter().copied().fold(1.0f64, f64::max);
            let weak = quality::weak_count(&activations);
            let row = json!({"preset": preset.name(), "layer": layer.name, "filters": ids.len(),
                "steps": s.steps, "size": s.size, "threads": threads,
                "mean_activation": activation, "mean_start_activation": mean(&|r| r.start_activation),
                "median_activation": median_activation,
                "seconds_per_filter": secs, "activation_per_second": activation / secs,
                "dead": results.iter().filter(|r| r.dead).count(), "weak": weak,
                "border_ratio_median": median_border, "border_ratio_max": max_border,
                "median_curve": (0..s.steps).map(|i| {
                    let at: Vec<f64> = finished.iter().filter_map(|r| r.curve.get(i).map(|&a| a as f64)).collect();
                    quality::median(&at).unwrap_or(0.0)
                }).collect::<Vec<_>>(),
                "failed": results.iter().filter(|r| r.failed_reason.is_some()).count()});
            if !json {
                println!(
                    "{:<10} {:<13} {:>4} steps: activation mean {:>9.1} median {:>9.1} (start {:>7.1}), {:>6.2} s/filter, {} dead, {} weak, border ratio median {:.2} max {:.2}",
                    preset.name(), layer.name, s.steps, activation, median_activation,
                    row["mean_start_activation"].as_f64().unwrap_or(0.0),
                    secs, row["dead"], weak, median_border, max_border
                );
            }
            rows.push(row);
            images.push(results.into_iter().map(|r| r.image).collect());
        }
    }
    // The picture: one row per (preset, layer), one column per filter.
    let pic = vgg_atlas_atlas::table(&images, size as u32, 4);
    let path = out.join("presets.png");
    pic.save(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    if json {
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        println!(
            "picture: {} (rows: {} for each of {}; columns: filters {filters})",
            path.display(),
            layers.iter().map(|l| l.name).collect::<Vec<_>>().join(", "),
            presets
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// One line of `bench --profile`.
#[derive(Clone)]
struct ProfileRow {
    phase: &'static str,
    seconds: f64,
    percent: f64,
}

/// The phases of a batch that took `seconds` in all, the PNG encoding (`png` seconds) after it,
/// and what no phase covers (the driver's records and bookkeeping).
fn profile_of(phases: Option<&Phases>, seconds: f64, png: f64) -> Option<Vec<ProfileRow>> {
    let phases = phases?;
    let total = seconds + png;
    let row = |phase, s: f64| ProfileRow {
        phase,
        seconds: s,
        percent: 100.0 * s / total,
    };
    let mut rows: Vec<ProfileRow> = Phase::ALL
        .iter()
        .map(|&p| row(p.name(), phases.get(p).as_secs_f64()))
        .collect();
    rows.push(row("png (once per filter)", png));
    rows.push(row("other", seconds - phases.total().as_secs_f64()));
    Some(rows)
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let BenchArgs {
        layer,
        batch,
        host_ascent,
        profile,
        json,
        method,
        compute,
    } = a;
    let layer = Layer::by_name(&layer)?;
    let settings = method.settings()?;
    settings.check(&layer)?;
    if !layer.is_conv() {
        bail!(
            "bench measures the conv layers; {} is a dense layer",
            layer.name
        );
    }
    let weights = compute.weights()?;
    let (pool, threads) = compute.pool()?;
    let mut trunk = compute.trunk(&weights)?;
    if host_ascent {
        match DeviceTrunk::of(&mut *trunk) {
            Some(d) => d.set_resident(false),
            None => bail!("--host-ascent is for GPU devices; on --device cpu the ascent always steps the images on the CPU"),
        }
    }
    let resident = DeviceTrunk::of(&mut *trunk).is_some_and(|d| d.resident());
    let fits = match DeviceTrunk::of(&mut *trunk) {
        Some(d) => d.fit_batch(layer, settings.size)?,
        None => None,
    };
    if let (Some(n), false) = (fits, json) {
        eprintln!(
            "{}: the device's free memory holds {n} images at {} px; wider batches are split",
            layer.name, settings.size
        );
    }
    let batches = match batch {
        Some(0) => bail!("--batch must be at least 1"),
        Some(b) => vec![b],
        None if compute.device == "cpu" => vec![1, 2, 4, 8, 16],
        // A GPU wants wide batches; the widest that fits in its memory wins.
        None => vec![16, 32, 64, 128, 256],
    };
    // Effective FLOPs: 2 per MAC, forward to the layer plus an input-gradient pass of the same
    // size, per step, as the dense method would do them; per ascent (a filter ascended a second
    // time, `Settings::second_ascent`, has two).
    let flops_per_ascent =
        2.0 * 2.0 * layer.forward_macs(settings.size) as f64 * settings.steps as f64;
    // The best batch: its width, filters/s, GFLOP/s and profile.
    let mut best: Option<(usize, f64, f64, Option<Vec<ProfileRow>>)> = None;
    let mut tried = Vec::new();
    for b in batches {
        let filters: Vec<usize> = (0..b).map(|i| i % layer.filters()).collect();
        // Warm-up (allocates the buffers), then the timed run.
        let warm = Settings {
            steps: 1,
            ..settings.clone()
        };
        let warmed = pool
            .install(|| ascent::visualize(&mut *trunk, weights.preprocess, layer, &filters, &warm));
        match warmed {
            Ok(_) => {}
            // A batch that does not fit in the device's memory ends the search.
            Err(e) if best.is_some() => {
                eprintln!("{} batch {b}: {e}; stopping here", layer.name);
                break;
            }
            Err(e) => return Err(e.into()),
        }
        let targets: Vec<Target> = filters
            .iter()
            .map(|&f| Target::planned(&settings, &layer, f))
            .collect();
        let mut watch = Watch::default();
        let t = Instant::now();
        let results = pool.install(|| {
            ascent::ascend_observed(
                &mut *trunk,
                weights.preprocess,
                layer,
                &targets,
                &settings,
                Faults::default(),
                &mut watch,
            )
        })?;
        let seconds = t.elapsed().as_secs_f64();
        let fps = b as f64 / seconds;
        let twice = results.iter().filter(|r| r.second_ascent.is_some()).count();
        let gflops = (b + twice) as f64 * flops_per_ascent / seconds / 1e9;
        // What a worker does next with each result: its PNG.
        let t = Instant::now();
        for img in results.iter().filter_map(|r| r.image.as_ref()) {
            record::encode_png(img)?;
        }
        let png = t.elapsed().as_secs_f64();
        if !json {
            let again = match twice {
                0 => String::new(),
                n => format!(", {n} of {b} ascended twice"),
            };
            eprintln!("{} batch {:>3}: {:>8.3} filters/s, {:>7.1} GFLOP/s effective ({} threads, {} px, {} steps{again})", layer.name, b, fps, gflops, threads, settings.size, settings.steps);
        }
        tried.push(json!({"batch": b, "filters_per_second": fps, "second_ascents": twice}));
        if best.as_ref().is_none_or(|(_, f, _, _)| fps > *f) {
            best = Some((
                b,
                fps,
                gflops,
                profile_of(watch.phases.as_ref(), seconds, png),
            ));
        }
    }
    let (b, fps, gflops, phases) = best.expect("at least one batch");
    if profile && phases.is_none() {
        bail!("--profile times the phases of the host image side; this device keeps the images on the device (add --host-ascent to profile the host side)");
    }
    let doc = json!({"layer": layer.name, "batch": b, "filters_per_second": fps, "gflops": gflops,
        "threads": threads, "device": compute.device, "precision": compute.precision, "ascent": if resident { "device" } else { "host" },
        "fits_in_memory": fits, "size": settings.size, "steps": settings.steps, "tried": tried,
        "profile": phases.as_ref().filter(|_| profile).map(|rows| rows.iter()
            .map(|r| json!({"phase": r.phase, "seconds": r.seconds, "percent": r.percent}))
            .collect::<Vec<_>>())});
    if json {
        println!("{doc}");
    } else {
        if let (true, Some(rows)) = (profile, &phases) {
            println!(
                "{} batch {b}: where the time went (share of the batch's wall time)",
                layer.name
            );
            for row in rows {
                println!(
                    "  {:<20} {:>9.3} s {:>6.1}%",
                    row.phase, row.seconds, row.percent
                );
            }
        }
        println!(
            "{}: best batch {b}, {fps:.3} filters/s, {gflops:.1} GFLOP/s effective",
            layer.name
        );
    }
    Ok(())
}

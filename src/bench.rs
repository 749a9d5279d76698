//! The benchmarks: `bench` (filters per second of the ascent on one layer), `bench-presets`
//! (the presets side by side on the same filters) and `bench-coordinator` (results per second a
//! coordinator records from simulated workers).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;
use vgg_atlas_proto::{Layer, Preset, Settings};
use vgg_atlas_worker::engine::ascent;
use vgg_atlas_worker::engine::device_trunk::DeviceTrunk;
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
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub method: Method,
    #[command(flatten)]
    pub compute: Compute,
}

#[derive(Args)]
pub struct BenchPresetsArgs {
    /// Layers, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "block1_conv2,block3_conv1,block5_conv3"
    )]
    pub layers: Vec<String>,
    /// Filters of each layer, A..B.
    #[arg(long, default_value = "0..4")]
    pub filters: String,
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
        presets,
        steps,
        size,
        out,
        json,
        compute,
    } = a;
    let filters = filters.as_str();
    let layers: Vec<Layer> = layers
        .iter()
        .map(|n| Layer::by_name(n.trim()))
        .collect::<Result<_, _>>()?;
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
            let range = parse_filters(filters, &layer)?;
            let ids: Vec<usize> = range.collect();
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
            let row = json!({"preset": preset.name(), "layer": layer.name, "filters": ids.len(),
                "steps": s.steps, "size": s.size, "threads": threads,
                "mean_activation": activation, "mean_start_activation": mean(&|r| r.start_activation),
                "seconds_per_filter": secs, "activation_per_second": activation / secs,
                "dead": results.iter().filter(|r| r.dead).count(),
                "failed": results.iter().filter(|r| r.failed_reason.is_some()).count()});
            if !json {
                println!(
                    "{:<10} {:<13} {:>4} steps: mean activation {:>9.1} (start {:>7.1}), {:>6.2} s/filter, {:>8.1} activation/s, {} dead",
                    preset.name(), layer.name, s.steps, activation, row["mean_start_activation"].as_f64().unwrap_or(0.0),
                    secs, activation / secs, row["dead"]
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

pub fn bench(a: BenchArgs) -> Result<()> {
    let BenchArgs {
        layer,
        batch,
        host_ascent,
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
    // size, per step, as the dense method would do them.
    let flops_per_filter =
        2.0 * 2.0 * layer.forward_macs(settings.size) as f64 * settings.steps as f64;
    let mut best: Option<(usize, f64)> = None;
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
        let t = Instant::now();
        pool.install(|| {
            ascent::visualize(&mut *trunk, weights.preprocess, layer, &filters, &settings)
        })?;
        let fps = b as f64 / t.elapsed().as_secs_f64();
        if !json {
            eprintln!("{} batch {:>3}: {:>8.3} filters/s, {:>7.1} GFLOP/s effective ({} threads, {} px, {} steps)", layer.name, b, fps, fps * flops_per_filter / 1e9, threads, settings.size, settings.steps);
        }
        tried.push(json!({"batch": b, "filters_per_second": fps}));
        if best.is_none_or(|(_, f)| fps > f) {
            best = Some((b, fps));
        }
    }
    let (b, fps) = best.expect("at least one batch");
    let doc = json!({"layer": layer.name, "batch": b, "filters_per_second": fps, "gflops": fps * flops_per_filter / 1e9,
        "threads": threads, "device": compute.device, "precision": compute.precision, "ascent": if resident { "device" } else { "host" },
        "fits_in_memory": fits, "size": settings.size, "steps": settings.steps, "tried": tried});
    if json {
        println!("{doc}");
    } else {
        println!(
            "{}: best batch {b}, {fps:.3} filters/s, {:.1} GFLOP/s effective",
            layer.name,
            fps * flops_per_filter / 1e9
        );
    }
    Ok(())
}

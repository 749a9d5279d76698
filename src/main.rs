//! `vgg-atlas`: the command line. Each command lives in its own module, which parses its flags
//! and prints; the work is the library crates' (`vgg_atlas_coordinator`, `vgg_atlas_worker`,
//! `vgg_atlas_atlas`, the contract `vgg_atlas_proto`). docs/architecture.md has the map.

use anyhow::Result;
use clap::{Parser, Subcommand};

mod args;
mod bench;
mod check;
mod db;
mod examples;
mod progress;
mod render;
mod serve;
mod visualize;
mod weights;
mod worker;

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
        action: weights::WeightsAction,
    },
    /// Which filters of a layer a real image excites most (mean post-ReLU activation).
    Probe(visualize::ProbeArgs),
    /// The real images that excite each filter most: every image of a folder once through the
    /// conv layers; each filter's top K (with the crop where it fired most) and each image's
    /// strongest filters go into the database (tables filter_examples, image_filters).
    Examples(examples::ExamplesArgs),
    /// Synthesize the image that excites each filter most: a PNG per filter in --out.
    Visualize(visualize::VisualizeArgs),
    /// Render every filter of the chosen layers as a resumable, distributed batch job.
    Render(Box<render::RenderArgs>),
    /// Join a running render: take leases from the coordinator and compute them.
    Worker(worker::WorkerArgs),
    /// Per-layer progress of every run in a database.
    Status(db::StatusArgs),
    /// (Re)builds the atlas (tiles, mosaics, atlas.png, index.html) from the database alone;
    /// works on an unfinished run (missing filters are shown as pending).
    Mosaic(db::MosaicCommandArgs),
    /// Runs one SQL statement against the database, read-only (the schema: docs/database.md).
    Query(db::QueryArgs),
    /// The atlas viewer over HTTP, from the database (read-only), live while a run goes on:
    /// finished filters appear as they are stored (docs/viewer.md).
    Serve(serve::ServeArgs),
    /// Filter results per second the coordinator records: simulated workers (no compute, ~50 KB
    /// PNGs) against a real coordinator and store on loopback.
    BenchCoordinator(bench::BenchCoordinatorArgs),
    /// The presets side by side on the same filters: activation reached, seconds, dead filters,
    /// and a picture (rows: preset x layer; columns: filters).
    BenchPresets(bench::BenchPresetsArgs),
    /// Checks the network on --device against the CPU: every conv layer's activations on a
    /// fixed image and the input gradient (rel. error <= 1e-3); exits 1 if any is off.
    CheckDevice(check::CheckDeviceArgs),
    /// Filters per second and effective GFLOP/s of the ascent on one layer.
    Bench(bench::BenchArgs),
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
        Command::Weights { action } => weights::weights(action),
        Command::Probe(a) => visualize::probe(a),
        Command::Examples(a) => examples::examples(a),
        Command::Visualize(a) => visualize::visualize(a),
        Command::Render(a) => args::runtime()?.block_on(render::render(*a)),
        Command::Worker(a) => worker::worker(a),
        Command::Status(a) => db::status(a),
        Command::Mosaic(a) => db::mosaic(a),
        Command::Query(a) => db::query(a),
        Command::Serve(a) => serve::serve(a),
        Command::BenchCoordinator(a) => bench::bench_coordinator(a),
        Command::BenchPresets(a) => bench::bench_presets(a),
        Command::CheckDevice(a) => check::check_device(a),
        Command::Bench(a) => bench::bench(a),
    }
}

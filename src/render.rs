//! `vgg-atlas render`: the whole atlas as a resumable batch job. The orchestration is the
//! coordinator's (`vgg_atlas_coordinator::standalone`); this command adds the local workers
//! (the engine on `--device`) and the progress display.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use vgg_atlas_coordinator::standalone::{Event, RenderConfig, DEFAULT_OUT};
use vgg_atlas_worker::client::WorkerConfig;
use vgg_atlas_worker::{fetch, Weights};

use crate::args::{conv_layers_or, Compute, Method, MosaicArgs};
use crate::progress::{self, Progress};

#[derive(Args)]
pub struct RenderArgs {
    /// Layers to render, comma-separated (default: all 13 conv layers).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<String>,
    /// Output folder (the default database lives here too).
    #[arg(long, default_value = DEFAULT_OUT)]
    pub out: PathBuf,
    /// sqlite://PATH or postgres://USER:PASSWORD@HOST/DB [sqlite://<out>/atlas.db].
    #[arg(long, env = "VGG_ATLAS_DB", hide_env_values = true)]
    pub db: Option<String>,
    /// Plan only N filters of each layer, spread across it: a first look at the whole network
    /// in minutes. The same run with the same seeds, so the same command without --sample
    /// later renders the rest and keeps these.
    #[arg(long, value_name = "N")]
    pub sample: Option<usize>,
    /// Workers started in this process (each talks gRPC to the coordinator like a remote one),
    /// taking the `--device`s in turn [one per device]; 0 makes this a pure coordinator.
    #[arg(long)]
    pub local_workers: Option<usize>,
    /// Address to accept workers on (default: a loopback port for the local workers only).
    #[arg(long)]
    pub listen: Option<String>,
    /// Filters per lease and per batch of the local workers [16 on the CPU, 64 on a GPU].
    #[arg(long)]
    pub batch: Option<usize>,
    /// Start a new run even if this configuration was rendered before.
    #[arg(long)]
    pub fresh: bool,
    /// Seconds a lease lives without a heartbeat.
    #[arg(long, default_value_t = 60)]
    pub lease_seconds: u64,
    /// Attempts per filter before it is recorded as failed.
    #[arg(long, default_value_t = 3)]
    pub max_attempts: i32,
    /// The shared token workers must send (at least 16 characters). Required with --listen;
    /// without --listen a random one is made for the local workers.
    #[arg(long, env = "VGG_ATLAS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Accept workers without a token; only with --listen on a loopback address.
    #[arg(long, conflicts_with = "token")]
    pub no_token: bool,
    /// Serve /healthz (503 while the database is out), /livez and Prometheus /metrics over HTTP on
    /// this address (e.g. 0.0.0.0:9090).
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Keep running after the run is finished (serving workers "finished", health and
    /// metrics) until stopped: for a coordinator under a supervisor such as Kubernetes.
    #[arg(long)]
    pub stay: bool,
    /// Serve --listen with TLS: this certificate chain (PEM). Workers connect to https://...
    #[arg(long, requires_all = ["tls_key", "listen"])]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub mosaic: MosaicArgs,
    #[command(flatten)]
    pub method: Method,
    #[command(flatten)]
    pub compute: Compute,
}

pub async fn render(a: RenderArgs) -> Result<()> {
    let layers = conv_layers_or(&a.layers)?;
    let settings = a.method.settings()?;
    let local_workers = a.local_workers.unwrap_or(a.compute.devices().len());
    let checked = RenderConfig {
        layers: layers.clone(),
        settings: settings.clone(),
        out: a.out.clone(),
        db: a.db.clone(),
        listen: a.listen.clone(),
        token: a.token.clone(),
        no_token: a.no_token,
        tls: a.tls_cert.clone().zip(a.tls_key.clone()),
        local_workers,
        metrics_listen: a.metrics_listen.clone(),
        lease_seconds: a.lease_seconds,
        max_attempts: a.max_attempts,
        fresh: a.fresh,
        sample: a.sample,
        stay: a.stay,
        mosaic: a.mosaic.options(),
    }
    .check()?;
    // A GPU build for a GPU device, each device once.
    let devices: Vec<String> = a.compute.devices().iter().map(|d| d.to_string()).collect();
    for d in &devices {
        vgg_atlas_worker::device(d)?;
    }
    let precision = a.compute.precision()?;
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
    let threads = a.compute.threads()?;
    let batch = a.batch.unwrap_or(a.compute.default_batch()).max(1);
    let start_workers = |at: vgg_atlas_coordinator::standalone::LocalEndpoint| {
        let per_worker = (threads / local_workers.max(1)).max(1);
        for i in 0..local_workers {
            let cfg = WorkerConfig {
                connect: at.url.clone(),
                name: format!("local-{i}"),
                batch,
                threads: per_worker,
                weights: Some(weights_path.clone()),
                token: at.token.clone(),
                tls_ca: None,
                tls_domain: None,
                device: devices[i % devices.len()].clone(),
                precision,
                images: None,
            };
            tokio::spawn(async move {
                if let Err(e) = vgg_atlas_worker::client::run(cfg).await {
                    eprintln!("local worker {i} stopped: {e}");
                }
            });
        }
    };
    let costs = layers
        .iter()
        .map(|l| (l.name.to_string(), l.render_cost(settings.size)))
        .collect();
    let mut shown = Progress::new(costs);
    let mut on = |e: Event| match e {
        Event::Say(line) => eprintln!("{line}"),
        Event::Progress(p) => shown.update(p),
        Event::Finished {
            run_id,
            progress: p,
        } => {
            shown.update(p);
            shown.finish();
            let (finished, _) = progress::counts(p);
            let failed: i64 = p.iter().map(|l| l.failed).sum();
            let dead: i64 = p.iter().map(|l| l.dead).sum();
            eprintln!("run {run_id} finished: {finished} filters, {dead} dead, {failed} failed");
        }
    };
    checked
        .run(&weights.sha256, &weights_path, start_workers, &mut on)
        .await?;
    Ok(())
}

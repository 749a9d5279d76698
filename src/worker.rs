//! `vgg-atlas worker`: join a running render and compute its leases until it is finished.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use vgg_atlas_worker::client::{self, WorkerConfig};

use crate::args::{runtime, Compute};

#[derive(Args)]
pub struct WorkerArgs {
    /// The coordinator, e.g. http://coordinator:50051 (https://... when it has TLS).
    #[arg(long)]
    pub connect: String,
    /// Filters per lease, computed together [16 on the CPU, 64 on a GPU; on a GPU, split
    /// further if its free memory holds fewer].
    #[arg(long)]
    pub batch: Option<usize>,
    /// A name for logs (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// The coordinator's token.
    #[arg(long, env = "VGG_ATLAS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The CA (PEM) that signed the coordinator's certificate, for an https:// address;
    /// default: the system's roots.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The name the coordinator's certificate carries, if not the host in --connect.
    #[arg(long)]
    pub tls_domain: Option<String>,
    #[command(flatten)]
    pub compute: Compute,
}

pub fn worker(a: WorkerArgs) -> Result<()> {
    let WorkerArgs {
        connect,
        batch,
        name,
        token,
        tls_ca,
        tls_domain,
        compute,
    } = a;
    vgg_atlas_worker::device(&compute.device)?; // a GPU build for a GPU device
    let precision = compute.precision()?;
    let threads = compute.threads()?;
    let name =
        name.unwrap_or_else(|| std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into()));
    let cfg = WorkerConfig {
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
    runtime()?.block_on(client::run(cfg))?;
    eprintln!("the run is finished");
    Ok(())
}

//! `vgg-atlas worker`: join a running render or examples pass and compute its leases until it is
//! finished.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use vgg_atlas_worker::client::{self, WorkerConfig};

use crate::args::{runtime, Compute};

#[derive(Args)]
pub struct WorkerArgs {
    /// The coordinator, e.g. http://coordinator:50051 (https://... when it has TLS).
    #[arg(long)]
    pub connect: String,
    /// Filters per lease, computed together [16 on the CPU, 64 on a GPU; on a GPU, split
    /// further if its free memory holds fewer]. With several --device, for each.
    #[arg(long)]
    pub batch: Option<usize>,
    /// A name for logs and the database (default: the host name). With several --device, the
    /// workers are NAME-0, NAME-1, ... in the order of the list.
    #[arg(long)]
    pub name: Option<String>,
    /// The coordinator's token.
    #[arg(long, env = "VGG_ATLAS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Send no token: for a coordinator started with --no-token, which listens on a loopback
    /// address only; --connect must then be a loopback address too.
    #[arg(long, conflicts_with = "token")]
    pub no_token: bool,
    /// Stop with an error when no coordinator has answered for this long (since the start or
    /// since its last answer), e.g. 90s, 30m, 2h, 1h30m [default: retry forever].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub give_up_after: Option<Duration>,
    /// The CA (PEM) that signed the coordinator's certificate, for an https:// address;
    /// default: the system's roots.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// The name the coordinator's certificate carries, if not the host in --connect.
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// For an examples pass (`vgg-atlas examples --listen`): this machine's copy of the pass's
    /// folder. Images it lacks (or all, without it) are fetched from the coordinator.
    #[arg(long)]
    pub images: Option<PathBuf>,
    // --device takes a list here too (cuda:0,cuda:1,...): one worker per device in this
    // process, sharing the threads.
    #[command(flatten)]
    pub compute: Compute,
}

pub fn worker(a: WorkerArgs) -> Result<()> {
    let WorkerArgs {
        connect,
        batch,
        name,
        token,
        no_token,
        give_up_after,
        tls_ca,
        tls_domain,
        images,
        compute,
    } = a;
    // A GPU build for a GPU device, each device of the list.
    let devices: Vec<String> = compute.devices().iter().map(|d| d.to_string()).collect();
    for d in &devices {
        vgg_atlas_worker::device(d)?;
    }
    let precision = compute.precision()?;
    let threads = compute.threads()?;
    if token.is_none() {
        token_may_be_left_out(&connect, no_token)?;
    }
    let name = name.unwrap_or_else(|| host_name().unwrap_or_else(|| "worker".into()));
    let batch = batch.unwrap_or(compute.default_batch()).max(1);
    let per_worker = (threads / devices.len()).max(1);
    let configs: Vec<WorkerConfig> = devices
        .iter()
        .enumerate()
        .map(|(i, device)| WorkerConfig {
            connect: connect.clone(),
            name: if devices.len() == 1 {
                name.clone()
            } else {
                format!("{name}-{i}")
            },
            batch,
            threads: per_worker,
            weights: compute.weights.clone(),
            token: token.clone(),
            tls_ca: tls_ca.clone(),
            tls_domain: tls_domain.clone(),
            device: device.clone(),
            precision,
            images: images.clone(),
        })
        .collect();
    runtime()?.block_on(async move {
        if configs.len() == 1 {
            let cfg = configs.into_iter().next().expect("one");
            return Ok(client::run_or_give_up(cfg, give_up_after).await?);
        }
        // One loop per device; one that stops does not stop the others.
        let n = configs.len();
        let mut loops = tokio::task::JoinSet::new();
        for cfg in configs {
            let label = format!("{} on {}", cfg.name, cfg.device);
            loops.spawn(async move { (label, client::run_or_give_up(cfg, give_up_after).await) });
        }
        let mut stopped = 0;
        while let Some(done) = loops.join_next().await {
            match done {
                Ok((_, Ok(()))) => {}
                Ok((label, Err(e))) => {
                    eprintln!("worker {label} stopped: {e}");
                    stopped += 1;
                }
                Err(e) => {
                    eprintln!("a worker task died: {e}");
                    stopped += 1;
                }
            }
        }
        if stopped > 0 {
            bail!("{stopped} of the {n} workers of this process stopped with an error (above)");
        }
        Ok(())
    })?;
    eprintln!("finished: the coordinator's run or pass has no work left");
    Ok(())
}

/// A worker sends no token only when told to (`--no-token`), and only to a coordinator on this
/// machine: `render --no-token` listens on loopback addresses only.
fn token_may_be_left_out(connect: &str, no_token: bool) -> Result<()> {
    if !no_token {
        bail!(
            "a coordinator requires a token from its workers: give this worker the coordinator's \
             --token (or VGG_ATLAS_TOKEN), or --no-token to join a `render --no-token` on this \
             machine"
        );
    }
    match connect_host(connect) {
        Some(host) if is_loopback(&host) => Ok(()),
        Some(host) => bail!(
            "--no-token is only for a coordinator on a loopback address (localhost, 127.0.0.1, \
             [::1]); {host} is not one. Give --token (or VGG_ATLAS_TOKEN) with the coordinator's \
             token"
        ),
        None => bail!("bad --connect '{connect}': expected e.g. http://127.0.0.1:50051"),
    }
}

/// The host of a `--connect` URL, without the brackets of an IPv6 address.
fn connect_host(connect: &str) -> Option<String> {
    let uri: vgg_atlas_proto::tonic::transport::Uri = connect.parse().ok()?;
    let host = uri.host()?;
    Some(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
}

/// localhost, 127.0.0.0/8 and ::1.
fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// The system's host name (`gethostname`), not `$HOSTNAME`, which shells set but do not
/// export; `None` if it cannot be had.
fn host_name() -> Option<String> {
    let name = gethostname::gethostname()
        .to_string_lossy()
        .trim()
        .to_string();
    (!name.is_empty()).then_some(name)
}

/// A duration as an operator writes it (humantime's syntax): 90s, 30m, 2h, 1h30m, 1day.
fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let bad =
        |why: &str| format!("'{s}' is not a duration ({why}); write e.g. 90s, 30m, 2h or 1h30m");
    match humantime::parse_duration(s.trim()) {
        Ok(d) if d.is_zero() => Err(bad("it must be more than 0")),
        Ok(d) => Ok(d),
        Err(e) => Err(bad(&e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_read_as_operators_write_them() {
        for (text, secs) in [
            ("90s", 90.0),
            ("30m", 1800.0),
            ("2h", 7200.0),
            ("1h30m", 5400.0),
            ("1.5h", 5400.0),
            ("500ms", 0.5),
            ("1d", 86400.0),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs_f64(secs)),
                "{text}"
            );
        }
        for bad in ["", "30", "m", "3x", "0s", "-3s", "1h 30"] {
            let e = parse_duration(bad).unwrap_err();
            assert!(
                e.contains("not a duration") && e.contains("90s"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn no_token_is_for_loopback_coordinators_only() {
        for ok in [
            "http://127.0.0.1:50051",
            "http://127.3.2.1:1",
            "http://localhost:50051",
            "https://LOCALHOST:9",
            "http://[::1]:50051",
        ] {
            assert!(token_may_be_left_out(ok, true).is_ok(), "{ok}");
        }
        for far in [
            "http://10.0.0.1:50051",
            "http://coordinator:50051",
            "http://[::2]:50051",
            "http://localhost.example.com:1",
        ] {
            let e = token_may_be_left_out(far, true).unwrap_err().to_string();
            assert!(
                e.contains("only for a coordinator on a loopback address"),
                "{far}: {e}"
            );
        }
        let e = token_may_be_left_out("http://127.0.0.1:1", false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("requires a token") && e.contains("--no-token"),
            "{e}"
        );
    }

    #[test]
    fn the_default_name_is_the_system_s_host_name() {
        let name = host_name().expect("a host name");
        assert!(!name.is_empty());
        if let Ok(kernel) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
            assert_eq!(name, kernel.trim());
        }
    }
}

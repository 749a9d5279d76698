//! What an operator watches: `/healthz` (the store answers and can store; see
//! [`crate::health`]), `/livez`, and `/metrics` in the Prometheus text format, served over plain HTTP on a port of its own (`render --metrics-listen`). The
//! per-layer counts are read from the store at each scrape, so they are right after a restart;
//! the counters count since this coordinator started.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;

use crate::health::{describe, StoreHealth};
use crate::store::Store;

/// Counters the gRPC service keeps as it answers.
#[derive(Default)]
pub struct Stats {
    pub results_recorded: AtomicU64,
    pub results_refused: AtomicU64,
    /// Filters a worker reported as failed (retried or failed for good).
    pub failures_reported: AtomicU64,
    pub leases_issued: AtomicU64,
    /// Lease and submit calls written by [`crate::commit`], and the transactions they took.
    pub write_calls: AtomicU64,
    pub write_groups: AtomicU64,
    /// Whether the store answers (an outage is reported on `/healthz`).
    pub store: StoreHealth,
    /// Worker id -> when it last called.
    seen: Mutex<HashMap<String, Instant>>,
}

impl Stats {
    /// Counters at zero over a store health of the caller's (an examples pass's).
    pub fn with_store(store: StoreHealth) -> Stats {
        Stats {
            store,
            ..Stats::default()
        }
    }

    pub fn saw(&self, worker_id: &str) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.insert(worker_id.to_string(), Instant::now());
        }
    }

    /// Workers that called within `window`.
    pub fn workers(&self, window: Duration) -> usize {
        self.seen
            .lock()
            .map(|s| s.values().filter(|t| t.elapsed() <= window).count())
            .unwrap_or(0)
    }
}

#[derive(Clone)]
struct Ctx {
    store: Arc<dyn Store>,
    run_id: String,
    stats: Arc<Stats>,
    /// How long a lease lives without a heartbeat. A worker counts as connected if it called
    /// within two of them.
    lease: Duration,
}

/// Serves `/healthz`, `/livez` (the process answers, whatever the store does: for a liveness
/// probe, which must not restart a coordinator that is waiting out a database outage) and
/// `/metrics` on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Store>,
    run_id: String,
    stats: Arc<Stats>,
    lease: Duration,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(health))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(Ctx {
            store,
            run_id,
            stats,
            lease,
        });
    axum::serve(listener, app).await
}

/// How long `/healthz` waits for the store: a stopped server makes the pool retry for longer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);

/// `ok` while the store answers; 503 with what is wrong (and for how long) while it does not,
/// or while its disk is full (reads still answer then; writes do not).
async fn health(State(c): State<Ctx>) -> (StatusCode, String) {
    let health = &c.stats.store;
    let read = tokio::time::timeout(HEALTH_TIMEOUT, c.store.progress(&c.run_id)).await;
    match read {
        Ok(Ok(_)) => {
            // Ends an outage the render has not yet noticed is over (a coordinator that only
            // stays up, `--stay`, has no other caller).
            let _ = health
                .recovered(&*c.store, &c.run_id, c.lease.as_millis() as i64)
                .await;
        }
        Ok(Err(e)) => {
            health.failed(&e);
            if e.outage().is_none() {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the database gave an error: {e}\n"),
                );
            }
        }
        // As the pool says when it cannot connect (it retries for longer than this).
        Err(_) => {
            health.failed(&crate::Error::Database(sqlx::Error::PoolTimedOut));
        }
    }
    match health.outage() {
        None => (StatusCode::OK, "ok\n".into()),
        Some((kind, lasted, why)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{} for {:.0} s: {why}\n",
                describe(kind),
                lasted.as_secs_f64()
            ),
        ),
    }
}

async fn metrics(State(c): State<Ctx>) -> (StatusCode, String) {
    let progress = match c.store.progress(&c.run_id).await {
        Ok(p) => p,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("# the store does not answer: {e}\n"),
            )
        }
    };
    let mut out = String::new();
    let run = &c.run_id;
    let _ = writeln!(
        out,
        "# HELP vgg_atlas_filters Filters of the run by layer and state (dead filters are also done).\n# TYPE vgg_atlas_filters gauge"
    );
    for p in &progress {
        for (state, n) in [
            ("done", p.done),
            ("pending", p.pending),
            ("leased", p.leased),
            ("failed", p.failed),
            ("dead", p.dead),
        ] {
            let _ = writeln!(
                out,
                "vgg_atlas_filters{{run=\"{run}\",layer=\"{}\",state=\"{state}\"}} {n}",
                p.layer
            );
        }
    }
    let total: i64 = progress.iter().map(|p| p.total).sum();
    let finished: i64 = progress.iter().map(|p| p.done + p.failed).sum();
    let leased: i64 = progress.iter().map(|p| p.leased).sum();
    let s = &c.stats;
    for (name, kind, help, value) in [
        (
            "vgg_atlas_filters_planned",
            "gauge",
            "Filters planned in the run.",
            total as u64,
        ),
        (
            "vgg_atlas_filters_finished",
            "gauge",
            "Filters done or failed.",
            finished as u64,
        ),
        (
            "vgg_atlas_filters_leased",
            "gauge",
            "Filters under a lease now (leases outstanding, in filters).",
            leased as u64,
        ),
        (
            "vgg_atlas_workers",
            "gauge",
            "Workers that called in the last two lease lengths.",
            s.workers(2 * c.lease) as u64,
        ),
        (
            "vgg_atlas_results_recorded_total",
            "counter",
            "Results recorded by this coordinator process; rate() gives results/s.",
            s.results_recorded.load(Ordering::Relaxed),
        ),
        (
            "vgg_atlas_results_refused_total",
            "counter",
            "Submitted results not recorded (rejected, not leased, duplicate).",
            s.results_refused.load(Ordering::Relaxed),
        ),
        (
            "vgg_atlas_failures_reported_total",
            "counter",
            "Filters workers reported as failed (NaN, ...), retried or failed for good.",
            s.failures_reported.load(Ordering::Relaxed),
        ),
        (
            "vgg_atlas_leases_issued_total",
            "counter",
            "Leases issued by this coordinator process.",
            s.leases_issued.load(Ordering::Relaxed),
        ),
        (
            "vgg_atlas_write_calls_total",
            "counter",
            "Lease and submit calls written to the store.",
            s.write_calls.load(Ordering::Relaxed),
        ),
        (
            "vgg_atlas_write_groups_total",
            "counter",
            "Transactions those calls took: calls that arrive together are written together.",
            s.write_groups.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{run=\"{run}\"}} {value}"
        );
    }
    (StatusCode::OK, out)
}

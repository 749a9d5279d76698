//! `vgg-atlas bench-coordinator`: how many filter results per second the coordinator records.
//!
//! A real coordinator (the gRPC service over a real store) on a loopback port, and N simulated
//! workers in the same process that do what real ones do, minus the compute: register, poll for
//! a lease, submit one result per leased filter with a realistic PNG (noise, so it does not
//! compress: ~50 KB at 128 px), heartbeat once per lease. The whole plan of a full atlas (4,224
//! filters) by default. Clients and server share this machine's cores, so the figure is a floor
//! for a coordinator on its own machine.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vgg_atlas_proto as pb;
use vgg_atlas_proto::tonic;
use vgg_atlas_proto::{Layer, Settings};

use crate::service::{CoordinatorService, RunContext};
use crate::store::{self, Store};
use crate::{plan, Error, Result};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The store to measure; `None`: a SQLite file in a fresh temporary folder. A PostgreSQL
    /// database is used in a schema of the benchmark's own, dropped at the end.
    pub db: Option<String>,
    pub workers: usize,
    /// Filters per lease.
    pub batch: usize,
    /// Image side; the PNG of noise at 128 px is ~50 KB.
    pub size: u32,
    pub layers: Vec<Layer>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// `sqlite` or `postgres`.
    pub backend: String,
    pub workers: usize,
    pub batch: usize,
    pub filters: usize,
    pub png_bytes: usize,
    /// From the first worker's start to the last result recorded.
    pub seconds: f64,
    pub results_per_second: f64,
    pub leases_per_second: f64,
    /// Median and 99th percentile of one poll+submit round trip, milliseconds.
    pub round_trip_p50_ms: f64,
    pub round_trip_p99_ms: f64,
}

/// A PNG of `size`x`size` RGB noise from a fixed seed.
pub fn noise_png(size: u32) -> Vec<u8> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let img = image::RgbImage::from_fn(size, size, |_, _| {
        // xorshift64*: cheap, and noise enough to defeat the PNG filter and deflate.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let v = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
        image::Rgb([(v >> 56) as u8, (v >> 48) as u8, (v >> 40) as u8])
    });
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .expect("PNG to memory");
    bytes
}

pub async fn run(cfg: BenchConfig) -> Result<BenchReport> {
    let tmp =
        std::env::temp_dir().join(format!("vgg-atlas-bench-{}", uuid::Uuid::new_v4().simple()));
    let schema = format!("vgg_atlas_bench_{}", uuid::Uuid::new_v4().simple());
    let (url, pg_admin) = match &cfg.db {
        None => (format!("sqlite://{}", tmp.join("bench.db").display()), None),
        Some(url) if url.starts_with("postgres") => {
            // A schema of its own, dropped afterwards: the benchmark leaves no runs behind in
            // a database that may hold a real atlas.
            let admin = sqlx::PgPool::connect(url)
                .await
                .map_err(|cause| Error::Connect {
                    url: store::redact(url),
                    hint: "Is the server running, and may this user create a schema?",
                    cause,
                })?;
            sqlx::query(&format!("CREATE SCHEMA {schema}"))
                .execute(&admin)
                .await?;
            let separator = if url.contains('?') { '&' } else { '?' };
            (
                format!("{url}{separator}options=-c%20search_path%3D{schema}"),
                Some(admin),
            )
        }
        Some(url) => (url.clone(), None),
    };
    let result = measure(&cfg, &url).await;
    std::fs::remove_dir_all(&tmp).ok();
    if let Some(admin) = pg_admin {
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&admin)
            .await?;
    }
    result
}

async fn measure(cfg: &BenchConfig, url: &str) -> Result<BenchReport> {
    let store: Arc<dyn Store> = store::connect(url).await?;
    let settings = Settings {
        size: cfg.size as usize,
        ..Settings::default()
    };
    // A fresh run each time, so a benchmark never resumes (or collides with) an earlier one.
    let fresh = store::now_ms() as u64;
    let weights = "be".repeat(32);
    let spec = plan::plan(&weights, &cfg.layers, &settings, 3, Some(fresh));
    store.create_or_resume_run(&spec).await?;
    let ctx = RunContext {
        run_id: spec.run_id.clone(),
        settings: settings.to_wire(&weights),
        layers: cfg.layers.iter().map(|l| l.name.to_string()).collect(),
        filters_total: spec.filters.len() as u32,
        weights_path: std::path::PathBuf::new(),
        lease_ms: 60_000,
    };
    // Measured with the token check on, as a real cluster runs.
    let token = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let check = pb::auth::CheckToken::new(Some(&token)).map_err(Error::Bench)?;
    let listener = crate::service::listen("127.0.0.1:0")
        .await
        .map_err(|e| Error::Bench(format!("cannot listen on loopback: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Bench(e.to_string()))?;
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CoordinatorService::new(store.clone(), ctx).into_server(check))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let png = Arc::new(noise_png(cfg.size));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..cfg.workers {
        let png = png.clone();
        let batch = cfg.batch;
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            simulated_worker(
                format!("http://{addr}"),
                format!("bench-{w}"),
                batch,
                png,
                token,
            )
            .await
        }));
    }
    let mut round_trips = Vec::new();
    let mut last_recorded = started;
    for t in tasks {
        let r = t
            .await
            .map_err(|e| Error::Bench(format!("a simulated worker panicked: {e}")))?;
        let (times, last) = r?;
        round_trips.extend(times);
        last_recorded = last_recorded.max(last.unwrap_or(started));
    }
    let leases = round_trips.len();
    // Until the last result was recorded: the workers that found nothing left to lease wait
    // (as real ones do) before they learn that the run is finished, which is not the store's
    // work.
    let seconds = (last_recorded - started).as_secs_f64();
    server.abort();
    let progress = store.progress(&spec.run_id).await?;
    let done: i64 = progress.iter().map(|p| p.done).sum();
    if done as usize != spec.filters.len() {
        return Err(Error::Bench(format!(
            "the benchmark recorded {done} of {} filters",
            spec.filters.len()
        )));
    }
    round_trips.sort_by(f64::total_cmp);
    let pct = |q: f64| round_trips[((round_trips.len() - 1) as f64 * q).round() as usize];
    Ok(BenchReport {
        backend: if url.starts_with("sqlite") {
            "sqlite"
        } else {
            "postgres"
        }
        .to_string(),
        workers: cfg.workers,
        batch: cfg.batch,
        filters: spec.filters.len(),
        png_bytes: png.len(),
        seconds,
        results_per_second: spec.filters.len() as f64 / seconds,
        leases_per_second: leases as f64 / seconds,
        round_trip_p50_ms: pct(0.5),
        round_trip_p99_ms: pct(0.99),
    })
}

/// A worker without compute; returns its per-lease round-trip times (ms) and when its last
/// result was recorded.
async fn simulated_worker(
    url: String,
    name: String,
    batch: usize,
    png: Arc<Vec<u8>>,
    token: String,
) -> Result<(Vec<f64>, Option<Instant>)> {
    let rpc = |e: tonic::Status| {
        let mut why = format!("{}: {}", e.code(), e.message());
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            why += &format!(": {c}");
            cause = c.source();
        }
        Error::Bench(why)
    };
    let channel = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| Error::Bench(e.to_string()))?
        .connect()
        .await
        .map_err(|e| Error::Bench(e.to_string()))?;
    let mut client = pb::auth::client(
        channel,
        pb::auth::AttachToken::new(Some(&token)).map_err(Error::Bench)?,
    );
    let worker_id = client
        .register(pb::RegisterRequest {
            protocol_version: pb::PROTOCOL_VERSION,
            name,
            device: "bench".into(),
            batch: batch as u32,
            worker_id: String::new(),
        })
        .await
        .map_err(rpc)?
        .into_inner()
        .worker_id;
    let mut times = Vec::new();
    let mut last = None;
    loop {
        let t = Instant::now();
        let work = client
            .poll_work(pb::PollWorkRequest {
                worker_id: worker_id.clone(),
                batch: batch as u32,
                held_lease_ids: Vec::new(), // every lease is submitted before the next poll
            })
            .await
            .map_err(rpc)?
            .into_inner()
            .work;
        let lease = match work {
            Some(pb::poll_work_response::Work::Lease(l)) => l,
            Some(pb::poll_work_response::Work::Finished(true)) => return Ok((times, last)),
            // Waits as long as a real worker does (`vgg-atlas worker`'s `poll`).
            Some(pb::poll_work_response::Work::RetryAfterMs(ms)) => {
                tokio::time::sleep(Duration::from_millis(ms.into())).await;
                continue;
            }
            _ => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        client
            .heartbeat(pb::HeartbeatRequest {
                worker_id: worker_id.clone(),
                lease_ids: vec![lease.lease_id.clone()],
            })
            .await
            .map_err(rpc)?;
        let results = lease
            .filters
            .iter()
            .map(|f| pb::FilterResult {
                filter: f.filter,
                png: png.to_vec(),
                activation: 1.0 + f.filter as f32,
                objective: 1.0,
                start_activation: 0.5,
                curve: vec![0.5; 20],
                seconds: 1.0,
                dead: false,
                failed_reason: None,
                retries: 0,
                second_ascent: None,
            })
            .collect();
        let outcomes = client
            .submit(pb::SubmitRequest {
                worker_id: worker_id.clone(),
                lease_id: lease.lease_id.clone(),
                results,
            })
            .await
            .map_err(rpc)?
            .into_inner()
            .outcomes;
        if let Some(o) = outcomes
            .iter()
            .find(|o| o.outcome != pb::SubmitOutcome::Recorded as i32)
        {
            return Err(Error::Bench(format!(
                "filter {} was not recorded: {}",
                o.filter, o.message
            )));
        }
        let now = Instant::now();
        times.push((now - t).as_secs_f64() * 1000.0);
        last = Some(now);
    }
}

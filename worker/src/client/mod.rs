//! The worker's side of the wire: register, poll for leases, compute them off the async
//! runtime, heartbeat while computing, submit, and reconnect with backoff when the coordinator
//! is away. A new node needs only the binary and the coordinator's address: it fetches the
//! weights by sha256 if it has none that match.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use vgg_atlas_proto as pb;
use vgg_atlas_proto::tonic;

use vgg_atlas_proto::{Layer, Settings};

use crate::engine::ascent::{self, Faults, Target};
use crate::engine::device_trunk::Precision;
use crate::engine::fetch;
use crate::engine::record::{self, FilterResult};
use crate::engine::trunk::Trunk;
use crate::engine::weights::{hex, Weights};
use crate::{Error, Result};

mod examples;

pub struct WorkerConfig {
    pub connect: String,
    pub name: String,
    pub batch: usize,
    pub threads: usize,
    /// Weights to use instead of the cache; must have the run's sha256.
    pub weights: Option<PathBuf>,
    /// The coordinator's shared token, sent with every call.
    pub token: Option<String>,
    /// TLS for an `https://` address: the CA to trust (PEM; default: the system's roots).
    pub tls_ca: Option<PathBuf>,
    /// The name the coordinator's certificate must carry, if not the host of `connect`.
    pub tls_domain: Option<String>,
    /// Where to compute: `cpu`, `cuda:N` or `metal:N`.
    pub device: String,
    /// The device trunk's arithmetic (f32 on the CPU).
    pub precision: Precision,
    /// For an examples pass: a copy of the pass's folder on this machine. Images are read from
    /// it; one it lacks (or all, without it) is fetched from the coordinator.
    pub images: Option<PathBuf>,
}

pub(crate) enum SessionEnd {
    Finished,
}

/// What a worker keeps across reconnects, so that a coordinator restart or a network cut costs
/// no finished work: its id (its leases are issued to it), results computed but not yet
/// accepted, and a lease fetched ahead; and when the coordinator last answered.
#[derive(Default)]
pub(crate) struct Carry {
    worker_id: Option<String>,
    unsent: Option<pb::SubmitRequest>,
    next: Option<pb::Lease>,
    /// When a call to the coordinator last succeeded (`None`: never yet).
    last_answer: Option<Instant>,
    /// The connection was lost while computing and the results are in `unsent`, not yet
    /// offered: one more try is owed before giving up.
    owe_a_try: bool,
}

impl Carry {
    pub(crate) fn answered(&mut self) {
        self.last_answer = Some(Instant::now());
        self.owe_a_try = false;
    }
}

/// Works for the coordinator until its run is finished. Connection losses are retried with
/// backoff (up to 5 s between tries) for as long as it takes, keeping what was computed; a
/// refusal (another protocol version, the wrong token, an untrusted certificate) is returned.
pub async fn run(cfg: WorkerConfig) -> Result<()> {
    run_or_give_up(cfg, None).await
}

/// [`run`], except that with `give_up_after` it stops with an error once no coordinator has
/// answered for that long: since it started, or since the coordinator's last answer. (Results
/// computed while the connection was lost are offered once more first.)
pub async fn run_or_give_up(cfg: WorkerConfig, give_up_after: Option<Duration>) -> Result<()> {
    let endpoint = endpoint(&cfg)?;
    let started = Instant::now();
    let mut backoff = Duration::from_millis(200);
    let mut engine: Option<Engine> = None;
    let mut carry = Carry::default();
    loop {
        match session(&cfg, &endpoint, &mut engine, &mut carry).await {
            Ok(SessionEnd::Finished) => return Ok(()),
            Err(e @ (SessionError::Retry(_) | SessionError::Outage(_))) => {
                let (why, what) = match e {
                    SessionError::Outage(why) => {
                        carry.answered(); // the coordinator is there, its database is not
                        (why, "answers that its database is out")
                    }
                    SessionError::Retry(why) => (why, "unreachable or lost"),
                    SessionError::Fatal(_) => unreachable!("matched above"),
                };
                let silent = carry.last_answer.unwrap_or(started).elapsed();
                let unsent = match &carry.unsent {
                    Some(u) => format!(" with {} results to submit", u.results.len()),
                    None => String::new(),
                };
                let mut wait = backoff;
                if let Some(limit) = give_up_after {
                    if silent >= limit && !std::mem::take(&mut carry.owe_a_try) {
                        return Err(Error::Invalid(give_up_message(
                            &cfg.connect,
                            carry.last_answer.is_some(),
                            limit,
                            &why,
                            carry.unsent.as_ref().map_or(0, |u| u.results.len()),
                        )));
                    }
                    // Whole milliseconds, as the log shows them.
                    wait = wait.min(Duration::from_millis(
                        limit.saturating_sub(silent).as_millis() as u64,
                    ));
                }
                tracing::warn!(
                    "coordinator {} {what} ({why}); retrying in {wait:?}{unsent}",
                    cfg.connect,
                );
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(SessionError::Fatal(e)) => return Err(e),
        }
    }
}

/// Why a worker stopped with `--give-up-after`.
fn give_up_message(
    connect: &str,
    ever_answered: bool,
    limit: Duration,
    why: &str,
    unsent: usize,
) -> String {
    let since = if ever_answered {
        "since its last answer"
    } else {
        "since this worker started"
    };
    let lost = if unsent > 0 {
        format!("; {unsent} computed results were not submitted")
    } else {
        String::new()
    };
    format!(
        "giving up: no coordinator answered at {connect} for {} {since} (--give-up-after); \
         the last try: {why}{lost}",
        human(limit)
    )
}

/// A duration as an operator writes it: 90s, 30m, 2h, 1h30m, 1.5s.
fn human(d: Duration) -> String {
    if d.subsec_millis() != 0 || d.as_secs() == 0 {
        return format!("{}s", d.as_secs_f64());
    }
    let s = d.as_secs();
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    let mut out = String::new();
    for (n, unit) in [(h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out += &format!("{n}{unit}");
        }
    }
    out
}

/// What the coordinator's answer to Register put this worker to.
#[allow(clippy::large_enum_variant)] // one, briefly
enum Joined {
    Run(pb::RunSummary, pb::RunSettings),
    Pass(pb::PassSummary),
}

pub(crate) enum SessionError {
    Retry(String),
    /// The coordinator answered that its store is out ([`pb::STORE_OUTAGE_METADATA`]): retried
    /// as [`SessionError::Retry`] is, but it was an answer (see `--give-up-after`).
    Outage(String),
    Fatal(Error),
}

impl From<tonic::Status> for SessionError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            tonic::Code::FailedPrecondition
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated => SessionError::Fatal(Error::Invalid(format!(
                "the coordinator refused this worker: {}",
                s.message()
            ))),
            tonic::Code::Unavailable if s.metadata().contains_key(pb::STORE_OUTAGE_METADATA) => {
                SessionError::Outage(s.message().to_string())
            }
            _ => SessionError::Retry(format!("{}: {}", s.code(), s.message())),
        }
    }
}

impl From<Error> for SessionError {
    fn from(e: Error) -> Self {
        SessionError::Fatal(e)
    }
}

/// The compute side, shared with blocking tasks: weights, the trunk and its thread pool.
#[derive(Clone)]
pub(crate) struct Engine {
    sha256: String,
    /// A forward-only trunk for an examples pass (see `peaks_trunk_on`), not a render's.
    peaks: bool,
    weights: Arc<Weights>,
    trunk: Arc<Mutex<Box<dyn Trunk + Send>>>,
    pool: Arc<rayon::ThreadPool>,
}

/// The coordinator's address as a tonic endpoint, with TLS for `https://`. Everything wrong
/// with the address or the TLS files is an error here, before the first connection.
fn endpoint(cfg: &WorkerConfig) -> Result<tonic::transport::Endpoint> {
    let bad = |why: String| Error::Invalid(format!("bad --connect '{}': {why}", cfg.connect));
    let endpoint = tonic::transport::Endpoint::from_shared(cfg.connect.clone())
        .map_err(|e| bad(format!("{e}; expected e.g. http://host:50051")))?
        .connect_timeout(Duration::from_secs(5))
        // A call that gets no answer (a half-open connection after a network cut) fails instead
        // of hanging; the pings notice a dead connection between calls. A weights stream is
        // only timed until its first message.
        .timeout(Duration::from_secs(60))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let https = cfg.connect.starts_with("https://");
    if !https && !cfg.connect.starts_with("http://") {
        return Err(bad(
            "expected http://host:port, or https://host:port for TLS".into(),
        ));
    }
    if !https && (cfg.tls_ca.is_some() || cfg.tls_domain.is_some()) {
        return Err(bad(
            "--tls-ca and --tls-domain are for a coordinator with TLS; write its address as https://..."
                .into(),
        ));
    }
    if !https {
        return Ok(endpoint);
    }
    let tls = pb::tls::client(cfg.tls_ca.as_deref(), cfg.tls_domain.as_deref())
        .map_err(Error::Invalid)?;
    endpoint
        .tls_config(tls)
        .map_err(|e| bad(pb::tls::error_chain(&e)))
}

async fn session(
    cfg: &WorkerConfig,
    endpoint: &tonic::transport::Endpoint,
    engine: &mut Option<Engine>,
    carry: &mut Carry,
) -> Result<SessionEnd, SessionError> {
    let channel = endpoint.connect().await.map_err(|e| {
        let why = pb::tls::error_chain(&e);
        if pb::tls::is_certificate_error(&why) {
            SessionError::Fatal(Error::Invalid(format!(
                "the coordinator at {} presented a certificate this worker does not trust ({why}); \
                 give --tls-ca with the CA that signed it (and --tls-domain if the certificate \
                 names another host)",
                cfg.connect
            )))
        } else {
            SessionError::Retry(why)
        }
    })?;
    let attach = pb::auth::AttachToken::new(cfg.token.as_deref())
        .map_err(|e| SessionError::Fatal(Error::Invalid(format!("bad --token: {e}"))))?;
    let mut client = pb::auth::client(channel, attach);
    let reg = client
        .register(pb::RegisterRequest {
            protocol_version: pb::PROTOCOL_VERSION,
            name: cfg.name.clone(),
            device: match cfg.precision {
                Precision::F32 => cfg.device.clone(),
                p => format!("{}/{}", cfg.device, p.name()),
            },
            batch: cfg.batch as u32,
            worker_id: carry.worker_id.clone().unwrap_or_default(),
        })
        .await?
        .into_inner();
    carry.answered();
    let joined = match (reg.run, reg.pass) {
        (_, Some(pass)) => Joined::Pass(pass),
        (Some(run), None) => {
            let settings = run
                .settings
                .clone()
                .ok_or_else(|| SessionError::Retry("register answered without settings".into()))?;
            Joined::Run(run, settings)
        }
        (None, None) => {
            return Err(SessionError::Retry(
                "register answered with neither a run nor a pass".into(),
            ))
        }
    };
    let (sha, peaks) = match &joined {
        Joined::Pass(pass) => (pass.weights_sha256.clone(), true),
        Joined::Run(_, settings) => (settings.weights_sha256.clone(), false),
    };
    if engine
        .as_ref()
        .map(|e| e.sha256 != sha || e.peaks != peaks)
        .unwrap_or(true)
    {
        let path = weights_for(cfg, &mut client, &sha).await?;
        carry.answered();
        let weights = Weights::load(&path)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads)
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start {} threads: {e}", cfg.threads)))?;
        let trunk = if peaks {
            crate::peaks_trunk_on(&weights, &cfg.device, cfg.precision)?
        } else {
            crate::trunk_on(&weights, &cfg.device, cfg.precision)?
        };
        *engine = Some(Engine {
            sha256: sha.clone(),
            peaks,
            trunk: Arc::new(Mutex::new(trunk)),
            weights: Arc::new(weights),
            pool: Arc::new(pool),
        });
    }
    let engine = engine.clone().expect("set above");
    let heartbeat = Duration::from_millis(reg.heartbeat_interval_ms.max(50) as u64);
    let worker_id = reg.worker_id.clone();
    carry.worker_id = Some(worker_id.clone());
    let (run, settings) = match joined {
        Joined::Pass(pass) => {
            tracing::info!(worker = %worker_id, pass = %pass.pass_id, "registered for an examples pass");
            return examples::session(cfg, client, &engine, carry, worker_id, pass, heartbeat)
                .await;
        }
        Joined::Run(run, settings) => (run, settings),
    };
    tracing::info!(worker = %worker_id, run = %run.run_id, "registered");
    // Results of a lease computed before the connection was lost go first.
    if let Some(unsent) = carry.unsent.take() {
        submit(&mut client, unsent, carry).await?;
    }
    loop {
        let lease = match carry.next.take() {
            Some(l) => l,
            None => match poll(client.clone(), worker_id.clone(), cfg.batch, Vec::new())
                .await
                .inspect(|_| carry.answered())?
            {
                Next::Lease(l) => *l,
                Next::Images(l) => {
                    return Err(SessionError::Retry(format!(
                        "the coordinator of run {} sent image lease {}",
                        run.run_id, l.lease_id
                    )))
                }
                Next::Finished => return Ok(SessionEnd::Finished),
                Next::Wait(d) => {
                    tokio::time::sleep(d).await;
                    continue;
                }
            },
        };
        if lease.filters.len() > cfg.batch {
            return Err(SessionError::Fatal(Error::Invalid(format!(
                "the coordinator leased {} filters to a worker that asked for at most {}",
                lease.filters.len(),
                cfg.batch
            ))));
        }
        // Nothing from the wire is trusted unchecked: a layer this network lacks, settings out
        // of bounds, or an image too large for this machine's memory refuse the lease, each of
        // its filters failed with the reason (the coordinator records it and the run goes on).
        let checked = Settings::try_from(lease.settings.as_ref().unwrap_or(&settings))
            .map_err(Error::from)
            .and_then(|s| Ok((s, Layer::by_name(&lease.layer)?)));
        // The lease's seeds are the planner's: the one source of each filter's start image.
        let targets: Vec<Target> = lease
            .filters
            .iter()
            .map(|f| Target {
                filter: f.filter as usize,
                seed: f.seed,
            })
            .collect();
        // Compute off the async runtime; heartbeat until it is done.
        let e = engine.clone();
        let layer_name = lease.layer.clone();
        let mut job = tokio::task::spawn_blocking(move || {
            let computed = checked.and_then(|(s, layer)| {
                let mut guard = e.trunk.lock().expect("trunk");
                let trunk: &mut (dyn Trunk + Send) = &mut **guard;
                e.pool.install(|| {
                    let faults = Faults::from_env();
                    ascent::ascend(trunk, e.weights.preprocess, layer, &targets, &s, faults)
                })
            });
            match computed {
                Err(e @ (Error::Invalid(_) | Error::Contract(_))) => {
                    tracing::warn!(layer = %layer_name, "lease refused: {e}");
                    Ok(refused(&layer_name, &targets, &e.to_string()))
                }
                other => other,
            }
        });
        // Meanwhile ask for the next lease, so the compute never waits on a round trip.
        let mut prefetch = Some(tokio::spawn(poll(
            client.clone(),
            worker_id.clone(),
            cfg.batch,
            vec![lease.lease_id.clone()],
        )));
        let mut tick = tokio::time::interval(heartbeat);
        tick.tick().await;
        // A lost connection does not stop the compute: its results are offered when the
        // coordinator is back (recorded if nobody else has taken the lease meanwhile).
        let mut lost: Option<String> = None;
        let stall = test_stall();
        let results = loop {
            tokio::select! {
                done = &mut job => break done.map_err(|e| SessionError::Fatal(Error::Invalid(format!("compute task failed: {e}"))))??,
                got = async { prefetch.as_mut().expect("guarded").await }, if prefetch.is_some() => {
                    prefetch = None;
                    if matches!(got, Ok(Ok(_))) {
                        carry.answered();
                    }
                    carry.next = prefetched(got);
                }
                _ = tick.tick(), if lost.is_none() && stall.is_none() => {
                    let mut ids = vec![lease.lease_id.clone()];
                    ids.extend(carry.next.iter().map(|l| l.lease_id.clone()));
                    match client.heartbeat(pb::HeartbeatRequest { worker_id: worker_id.clone(), lease_ids: ids }).await {
                        Ok(hb) => {
                            carry.answered();
                            for l in hb.into_inner().leases.iter().filter(|l| l.state == pb::LeaseState::Revoked as i32) {
                                if l.lease_id == lease.lease_id {
                                    tracing::warn!(lease = %lease.lease_id, "lease revoked while computing; its results will be offered anyway");
                                } else if carry.next.as_ref().is_some_and(|n| n.lease_id == l.lease_id) {
                                    tracing::warn!(lease = %l.lease_id, "prefetched lease revoked before it started; dropped");
                                    carry.next = None;
                                }
                            }
                        }
                        Err(status) => match SessionError::from(status) {
                            SessionError::Retry(why) | SessionError::Outage(why) => {
                                tracing::warn!(lease = %lease.lease_id, "heartbeat failed ({why}); computing on, to submit when the coordinator is back");
                                lost = Some(why);
                            }
                            fatal => return Err(fatal),
                        },
                    }
                }
            }
        };
        if let Some(d) = stall {
            tokio::time::sleep(d).await;
        }
        if let Some(p) = prefetch {
            // Still in flight: it is one short RPC, and a lease it brings must not be left to expire.
            let got = p.await;
            if matches!(got, Ok(Ok(_))) {
                carry.answered();
            }
            carry.next = prefetched(got);
        }
        let wire: Vec<pb::FilterResult> = results.iter().map(to_wire).collect::<Result<_>>()?;
        let request = pb::SubmitRequest {
            worker_id: worker_id.clone(),
            lease_id: lease.lease_id.clone(),
            results: wire,
        };
        if let Some(why) = lost {
            carry.unsent = Some(request);
            carry.owe_a_try = true;
            return Err(SessionError::Retry(why));
        }
        submit(&mut client, request, carry).await?;
    }
}

/// Submits one lease's results; if the coordinator cannot be reached they are kept in `carry`
/// for the next session.
async fn submit(
    client: &mut pb::auth::Client,
    request: pb::SubmitRequest,
    carry: &mut Carry,
) -> Result<(), SessionError> {
    let lease_id = request.lease_id.clone();
    let outcomes = match client.submit(request.clone()).await {
        Ok(r) => {
            carry.answered();
            r.into_inner()
        }
        Err(status) => {
            let e = SessionError::from(status);
            if matches!(e, SessionError::Retry(_) | SessionError::Outage(_)) {
                carry.unsent = Some(request);
            }
            return Err(e);
        }
    };
    for o in outcomes.outcomes {
        if o.outcome != pb::SubmitOutcome::Recorded as i32 {
            tracing::warn!(lease = %lease_id, filter = o.filter, outcome = o.outcome, message = %o.message, "result not recorded");
        }
    }
    Ok(())
}

/// Test hook: `VGG_ATLAS_TEST_STALL_SECONDS=N` makes the worker hang as an overloaded or
/// swapping node would: no heartbeats while it computes, then N seconds of nothing before it
/// submits, all on an open connection. Its leases expire meanwhile.
fn test_stall() -> Option<Duration> {
    let s: f64 = std::env::var("VGG_ATLAS_TEST_STALL_SECONDS")
        .ok()?
        .parse()
        .ok()?;
    (s > 0.0).then(|| Duration::from_secs_f64(s))
}

/// What a poll for work brought.
pub(crate) enum Next {
    Lease(Box<pb::Lease>),
    /// An examples pass's images.
    Images(Box<pb::ImageLease>),
    Finished,
    Wait(Duration),
}

/// Asks for work; `held` are the leases this worker has and knows of (so that one it was
/// given but never heard of is sent again).
pub(crate) async fn poll(
    mut client: pb::auth::Client,
    worker_id: String,
    batch: usize,
    held: Vec<String>,
) -> Result<Next, SessionError> {
    let work = client
        .poll_work(pb::PollWorkRequest {
            worker_id,
            batch: batch as u32,
            held_lease_ids: held,
        })
        .await?
        .into_inner()
        .work;
    Ok(match work {
        Some(pb::poll_work_response::Work::Lease(l)) => Next::Lease(Box::new(l)),
        Some(pb::poll_work_response::Work::ImageLease(l)) => Next::Images(Box::new(l)),
        Some(pb::poll_work_response::Work::Finished(true)) => Next::Finished,
        Some(pb::poll_work_response::Work::RetryAfterMs(ms)) => {
            Next::Wait(Duration::from_millis(ms as u64))
        }
        _ => Next::Wait(Duration::from_millis(200)),
    })
}

/// The lease a prefetch brought, if any. A failed prefetch costs nothing but the overlap: the
/// next poll after the compute asks again (and meets the same error, if it persists).
fn prefetched(
    got: Result<Result<Next, SessionError>, tokio::task::JoinError>,
) -> Option<pb::Lease> {
    match got {
        Ok(Ok(Next::Lease(l))) => Some(*l),
        Ok(Err(SessionError::Retry(why) | SessionError::Outage(why))) => {
            tracing::debug!("prefetch of the next lease failed: {why}");
            None
        }
        Ok(Err(SessionError::Fatal(e))) => {
            tracing::debug!("prefetch of the next lease failed: {e}");
            None
        }
        Err(e) => {
            tracing::warn!("the prefetch task of the next lease died: {e}");
            None
        }
        // Finished or nothing to lease yet: the next poll after the compute asks again.
        Ok(Ok(Next::Finished | Next::Wait(_) | Next::Images(_))) => None,
    }
}

/// Every filter of a lease this worker refuses, failed with the reason.
fn refused(layer: &str, targets: &[Target], why: &str) -> Vec<FilterResult> {
    targets
        .iter()
        .map(|t| FilterResult {
            layer: layer.to_string(),
            filter: t.filter,
            activation: 0.0,
            objective: 0.0,
            start_activation: 0.0,
            pre_activation: 0.0,
            curve: Vec::new(),
            dead: false,
            failed_reason: Some(format!("the worker refused the lease: {why}")),
            retries: 0,
            seconds: 0.0,
            second_ascent: None,
            image: None,
        })
        .collect()
}

fn to_wire(r: &FilterResult) -> Result<pb::FilterResult> {
    let png = match &r.image {
        Some(img) => record::encode_png(img)?,
        None => Vec::new(),
    };
    Ok(pb::FilterResult {
        filter: r.filter as u32,
        png,
        activation: r.activation,
        objective: r.objective,
        start_activation: r.start_activation,
        curve: r.curve.clone(),
        seconds: r.seconds,
        dead: r.dead,
        failed_reason: r.failed_reason.clone(),
        retries: r.retries,
        second_ascent: r.second_ascent,
    })
}

/// A local weights file with this sha256: `--weights`, the cached default, a previously
/// fetched copy, or a fresh copy streamed from the coordinator.
async fn weights_for(
    cfg: &WorkerConfig,
    client: &mut pb::auth::Client,
    sha: &str,
) -> Result<PathBuf, SessionError> {
    if let Some(p) = &cfg.weights {
        let got = fetch::file_sha256(p)?;
        if got != sha {
            return Err(Error::Invalid(format!("--weights {} has sha256 {got}, but the run uses weights {sha}; drop --weights to fetch them from the coordinator", p.display())).into());
        }
        return Ok(p.clone());
    }
    let default = fetch::default_weights_path()?;
    if default.exists() && fetch::file_sha256(&default)? == sha {
        return Ok(default);
    }
    // A copy fetched before: its format is in its name, as the coordinator named it.
    let cached = |format: WeightsFormat| fetch::cache_dir().map(|d| d.join(format.file_name(sha)));
    for format in WeightsFormat::ALL {
        let p = cached(format)?;
        if p.exists() && fetch::file_sha256(&p)? == sha {
            return Ok(p);
        }
    }
    tracing::info!("fetching weights {sha} from the coordinator");
    let mut stream = client
        .fetch_weights(pb::FetchWeightsRequest {
            sha256: sha.to_string(),
            offset: 0,
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    let mut name = String::new();
    while let Some(chunk) = stream.message().await? {
        if name.is_empty() {
            name = chunk.file_name;
        }
        bytes.extend_from_slice(&chunk.data);
    }
    let got = hex(&Sha256::digest(&bytes));
    if got != sha {
        return Err(SessionError::Retry(format!(
            "weights stream had sha256 {got}, expected {sha}"
        )));
    }
    // Saved under the format the coordinator's file has: the loader reads `.onnx` as ONNX.
    let fetched = cached(WeightsFormat::of(&name)?)?;
    std::fs::create_dir_all(fetch::cache_dir()?).map_err(|source| Error::WeightsIo {
        path: fetched.clone(),
        source,
    })?;
    let partial = fetched.with_extension("partial");
    std::fs::write(&partial, &bytes).map_err(|source| Error::WeightsIo {
        path: partial.clone(),
        source,
    })?;
    std::fs::rename(&partial, &fetched).map_err(|source| Error::WeightsIo {
        path: fetched.clone(),
        source,
    })?;
    Ok(fetched)
}

/// The formats a coordinator may serve its weights in, known by the file name it sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WeightsFormat {
    Safetensors,
    Onnx,
}

impl WeightsFormat {
    const ALL: [WeightsFormat; 2] = [WeightsFormat::Safetensors, WeightsFormat::Onnx];

    fn extension(self) -> &'static str {
        match self {
            WeightsFormat::Safetensors => "safetensors",
            WeightsFormat::Onnx => "onnx",
        }
    }

    /// The cache's name for a copy of the weights with this sha256.
    fn file_name(self, sha: &str) -> String {
        format!("weights-{sha}.{}", self.extension())
    }

    /// The format of the coordinator's file `name` (the `file_name` of its `WeightsChunk`s).
    fn of(name: &str) -> Result<WeightsFormat> {
        let ext = std::path::Path::new(name)
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        WeightsFormat::ALL
            .into_iter()
            .find(|f| f.extension() == ext)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "the coordinator serves its weights as '{name}', which is neither .safetensors                      nor .onnx; start it with --weights FILE.safetensors or FILE.onnx"
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetched_weights_keep_the_format_of_the_coordinator_s_file() {
        assert_eq!(
            WeightsFormat::of("model.onnx").unwrap(),
            WeightsFormat::Onnx
        );
        assert_eq!(
            WeightsFormat::of("x/VGG.ONNX").unwrap(),
            WeightsFormat::Onnx
        );
        assert_eq!(
            WeightsFormat::of("vgg16.safetensors").unwrap(),
            WeightsFormat::Safetensors
        );
        assert_eq!(WeightsFormat::Onnx.file_name("ab"), "weights-ab.onnx");
        let e = WeightsFormat::of("vgg16.h5").unwrap_err().to_string();
        assert!(e.contains("vgg16.h5") && e.contains(".onnx"), "{e}");
    }

    #[test]
    fn a_second_ascent_goes_on_the_wire_with_both_activations() {
        let target = Target { filter: 3, seed: 7 };
        let mut r = refused("block1_conv1", &[target], "").remove(0);
        r.failed_reason = None;
        r.activation = 245.0;
        r.second_ascent = Some(pb::SecondAscent {
            first_activation: 91.0,
            second_activation: 245.0,
        });
        let wire = to_wire(&r).unwrap();
        assert_eq!(
            wire.second_ascent,
            Some(pb::SecondAscent {
                first_activation: 91.0,
                second_activation: 245.0
            })
        );
        r.second_ascent = None;
        assert_eq!(to_wire(&r).unwrap().second_ascent, None);
    }

    #[test]
    fn giving_up_says_how_long_since_what_and_what_is_lost() {
        assert_eq!(human(Duration::from_secs(90)), "1m30s");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
        assert_eq!(human(Duration::from_millis(1500)), "1.5s");
        let m = give_up_message(
            "http://c:50051",
            false,
            Duration::from_secs(1800),
            "refused",
            0,
        );
        assert!(
            m.contains(
                "no coordinator answered at http://c:50051 for 30m since this worker started"
            ) && m.contains("the last try: refused")
                && !m.contains("not submitted"),
            "{m}"
        );
        let m = give_up_message("http://c:50051", true, Duration::from_secs(3), "cut", 8);
        assert!(
            m.contains("3s since its last answer")
                && m.contains("8 computed results were not submitted"),
            "{m}"
        );
    }
}

//! The gRPC face of the coordinator: registers workers, hands out leases from the store,
//! records what they submit, and serves the run's weights. Every decision about leases and
//! results is the store's (one transaction each); this layer converts and validates.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use tokio_stream::Stream;
use vgg_atlas_proto as pb;
use vgg_atlas_proto::tonic::service::interceptor::InterceptedService;
use vgg_atlas_proto::tonic::{Request, Response, Status};

/// The coordinator as a tonic service, behind its token check.
pub type Server =
    InterceptedService<pb::CoordinatorServer<CoordinatorService>, pb::auth::CheckToken>;

use crate::commit::GroupCommit;
use crate::metrics::Stats;
use crate::store::{self, now_ms, Store};

/// What the coordinator serves: one run.
#[derive(Clone, Debug)]
pub struct RunContext {
    pub run_id: String,
    pub settings: pb::RunSettings,
    pub layers: Vec<String>,
    pub filters_total: u32,
    pub weights_path: PathBuf,
    /// How long a lease lives without a heartbeat.
    pub lease_ms: i64,
}

#[derive(Clone)]
pub struct CoordinatorService {
    store: Arc<dyn Store>,
    run: RunContext,
    stats: Arc<Stats>,
    /// Until when (ms since the epoch) the store is known to have nothing to lease: polls
    /// meanwhile are answered without asking it (see [`IDLE_RECHECK_MS`]).
    idle_until: Arc<AtomicI64>,
    /// Set once the store says the run is finished (it stays finished).
    finished: Arc<AtomicBool>,
    /// The leases this process issued: see [`Issued`].
    issued: Arc<Issued>,
    /// Where leases and results are written, together when they arrive together.
    writes: Arc<GroupCommit>,
    /// `(when, unfinished filters)` as last read for `Register`; held while it is read, so
    /// that the registrations arriving meanwhile wait for that read instead of each making
    /// their own (except during an outage of the store).
    unfinished: Arc<tokio::sync::Mutex<Option<(i64, i64)>>>,
}

/// What this process knows of the leases it issued, so that the calls of a thousand workers
/// do not each read the store for it. The store stays the authority: anything not known here
/// (a lease issued before a restart, or by another coordinator process) is asked of it as
/// before.
///
/// - **Deadlines.** A heartbeat while more than half of the lease is left is answered from the
///   deadline this process last wrote (a lease cannot be taken before it) instead of writing
///   it: under a thousand workers heartbeats were a third of the writes.
/// - **Layers.** A submission under a lease of ours whose deadline is ahead takes the lease's
///   layer from here instead of reading it: under a thousand workers that read was 8% of
///   PostgreSQL's statement time. Whether each filter is still held is checked when the
///   results are written, as for every submission.
/// - **Each worker's leases.** A poll asks the store for a lease whose answer was lost
///   ([`Store::reclaim`]) only when it could find one: on the first poll to this process of a
///   worker that registered with an id it already had (a reconnect), or when this process
///   issued it a lease that the poll does not say it holds.
///   Otherwise every poll read the worker's rows. (Behind a load balancer that sends one
///   worker's polls to several coordinator processes, a lost answer from another process is
///   then found when the lease expires, as it was before reclaiming existed.)
#[derive(Default)]
struct Issued {
    state: std::sync::Mutex<IssuedState>,
}

#[derive(Default)]
struct IssuedState {
    /// Lease id -> its deadline as last written, and its layer.
    leases: std::collections::HashMap<String, IssuedLease>,
    /// Worker id -> the ids of its leases issued here and not yet submitted; present once the
    /// store has been asked for the worker's leases.
    workers: std::collections::HashMap<String, std::collections::HashSet<String>>,
}

struct IssuedLease {
    deadline: i64,
    layer: String,
}

/// Past this many entries the long-expired leases are dropped, and past this many workers
/// their lease lists (so the next poll of each asks the store again).
const ISSUED_MAX: usize = 100_000;

impl Issued {
    fn lock(&self) -> std::sync::MutexGuard<'_, IssuedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn issued(&self, worker: &str, lease: &store::Lease, now: i64) {
        let mut s = self.lock();
        if s.leases.len() >= ISSUED_MAX {
            s.leases.retain(|_, l| l.deadline > now); // the long expired
        }
        if s.workers.len() >= ISSUED_MAX {
            s.workers.clear();
        }
        let entry = IssuedLease {
            deadline: lease.lease_deadline_ms,
            layer: lease.layer.clone(),
        };
        s.leases.insert(lease.lease_id.clone(), entry);
        if let Some(ids) = s.workers.get_mut(worker) {
            ids.insert(lease.lease_id.clone());
        }
    }

    /// The deadline of a lease of ours that has more than `lease_ms / 2` left at `now`.
    fn fresh(&self, lease_id: &str, now: i64, lease_ms: i64) -> Option<i64> {
        let deadline = self.lock().leases.get(lease_id)?.deadline;
        (deadline - now > lease_ms / 2).then_some(deadline)
    }

    /// The layer of a lease of ours whose deadline is still ahead at `now`: until then none
    /// of its filters can have been leased again.
    fn live_layer(&self, lease_id: &str, now: i64) -> Option<String> {
        let s = self.lock();
        let lease = s.leases.get(lease_id)?;
        (lease.deadline > now).then(|| lease.layer.clone())
    }

    fn renewed(&self, lease_id: &str, deadline: i64) {
        if let Some(entry) = self.lock().leases.get_mut(lease_id) {
            entry.deadline = deadline;
        }
    }

    fn forget(&self, worker: &str, lease_id: &str) {
        let mut s = self.lock();
        s.leases.remove(lease_id);
        if let Some(ids) = s.workers.get_mut(worker) {
            ids.remove(lease_id);
        }
    }

    /// Whether the store may hold a lease of `worker` that it does not know it has: see
    /// [`Issued`].
    fn may_have_lost(&self, worker: &str, held: &[String]) -> bool {
        match self.lock().workers.get(worker) {
            None => true,
            Some(ids) => ids.iter().any(|id| !held.contains(id)),
        }
    }

    /// Forgets what is known of `worker`'s leases, so that its next poll asks the store.
    fn unsure(&self, worker: &str) {
        self.lock().workers.remove(worker);
    }

    /// The store was asked: the worker's leases are those it holds, and `reclaimed`.
    fn checked(&self, worker: &str, held: &[String], reclaimed: Option<&str>) {
        let ids = held.iter().map(String::as_str).chain(reclaimed);
        self.lock()
            .workers
            .insert(worker.to_string(), ids.map(str::to_string).collect());
    }
}

/// Held by a poll while it may lease: a poll dropped before it has noted its lease in
/// [`Issued`] (its connection cut while the lease was written: the write, in its own task, goes
/// on) makes the worker's next poll ask the store, which sends that lease again. Without it the
/// next poll would lease other filters, and the lost lease's filters would wait for it to
/// expire and be computed again.
struct PollInFlight<'a> {
    issued: &'a Issued,
    worker: &'a str,
    noted: bool,
}

impl Drop for PollInFlight<'_> {
    fn drop(&mut self) {
        if !self.noted {
            self.issued.unsure(self.worker);
        }
    }
}

/// How long `Register`'s count of finished filters (shown by the worker, nothing more) is
/// reused: a thousand workers registering at once asked the store a thousand times. The
/// registrations that arrive while it is read wait for that one read (with a cache alone, 833
/// of a thousand still read it, 15% of PostgreSQL's statement time).
const REGISTER_COUNT_MS: i64 = 1000;

/// How long "nothing to lease" is believed without asking the store again. Near the end of a
/// run every idle worker polls; a thousand of them would otherwise keep the store busy
/// answering "nothing" while it should record results. A filter put back to pending (a failed
/// attempt) ends the wait at once; a lease that expires waits at most this long more.
pub const IDLE_RECHECK_MS: i64 = 200;

impl CoordinatorService {
    pub fn new(store: Arc<dyn Store>, run: RunContext) -> CoordinatorService {
        let stats: Arc<Stats> = Arc::default();
        let writes = GroupCommit::new(
            store.clone(),
            stats.clone(),
            run.run_id.clone(),
            run.lease_ms,
        );
        CoordinatorService {
            store,
            run,
            stats,
            idle_until: Arc::default(),
            finished: Arc::default(),
            issued: Arc::default(),
            writes: Arc::new(writes),
            unfinished: Arc::default(),
        }
    }

    /// The run's unfinished filters, read at most every [`REGISTER_COUNT_MS`].
    async fn unfinished(&self) -> Result<i64, Status> {
        let mut cached = self.unfinished.lock().await;
        let now = now_ms();
        if let Some((_, n)) = cached.filter(|(at, _)| now - at < REGISTER_COUNT_MS) {
            return Ok(n);
        }
        let read = || async {
            self.store
                .unfinished(&self.run.run_id)
                .await
                .map_err(|e| self.stats.store.status(e))
        };
        if self.stats.store.is_down() {
            // During an outage a read may wait for the pool's timeout before it fails: each
            // registration then asks for itself rather than queue behind the others' failures.
            drop(cached);
            return read().await;
        }
        let n = read().await?;
        *cached = Some((now, n));
        Ok(n)
    }

    /// Whether the store was found with nothing to lease less than [`IDLE_RECHECK_MS`] ago.
    fn idle(&self, now: i64) -> bool {
        now < self.idle_until.load(Ordering::Relaxed)
    }

    /// A new lease for this worker if the store has filters to lease (asked at most every
    /// [`IDLE_RECHECK_MS`] while it has none).
    async fn lease_if_any(
        &self,
        worker: &str,
        batch: usize,
        now: i64,
    ) -> Result<Option<store::Lease>, Status> {
        if self.idle(now) {
            return Ok(None);
        }
        let run = &self.run.run_id;
        let health = &self.stats.store;
        // Nothing is leased during an outage, nor after it before the leases held meanwhile
        // are renewed: no heartbeat could renew them.
        health
            .recovered(&*self.store, run, self.run.lease_ms)
            .await
            .map_err(|e| health.status(e))?;
        let leasable = self
            .store
            .has_leasable(run, now)
            .await
            .map_err(|e| health.status(e))?;
        let lease = if leasable {
            self.writes.lease(worker, batch, now).await?
        } else {
            None
        };
        if lease.is_none() {
            self.idle_until
                .store(now + IDLE_RECHECK_MS, Ordering::Relaxed);
        }
        Ok(lease)
    }

    /// Whether every filter is done or failed, asked of the store only when `asked` (the poll
    /// found nothing to lease in the store itself, not in the idle window).
    async fn run_finished(&self, asked: bool) -> Result<bool, Status> {
        if self.finished.load(Ordering::Relaxed) {
            return Ok(true);
        }
        if !asked {
            return Ok(false);
        }
        let done = self
            .store
            .is_finished(&self.run.run_id)
            .await
            .map_err(|e| self.stats.store.status(e))?;
        self.finished.store(done, Ordering::Relaxed);
        Ok(done)
    }

    /// The counters `/metrics` reports (see [`crate::metrics`]).
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The service for a tonic server: message limits set, and every call checked for the
    /// token first.
    pub fn into_server(self, token: pb::auth::CheckToken) -> Server {
        InterceptedService::new(
            pb::CoordinatorServer::new(self)
                .max_decoding_message_size(pb::MAX_MESSAGE_BYTES)
                .max_encoding_message_size(pb::MAX_MESSAGE_BYTES),
            token,
        )
    }
}

/// The pending-connection queue of a coordinator's port. The default (1,024 in tokio) is met
/// when a thousand workers connect at once (a cluster starting, or reconnecting after a
/// coordinator restart) while the runtime is busy: the kernel then drops connections, and
/// some clients see them reset. The kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 8192;

/// Listens on `addr` (`host:port`; the first address it resolves to that can be bound) with
/// [`LISTEN_BACKLOG`].
pub async fn listen(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std's and tokio's bind do: a restarted coordinator gets its port back at once.
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(LISTEN_BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr} resolves to no address"),
        )
    }))
}

/// How long an idle worker waits before polling again: around when leases may expire.
pub fn retry_after_ms(lease_ms: i64) -> u32 {
    (lease_ms / 4).clamp(100, 5_000) as u32
}

/// A part of a worker id: printable ASCII (what a reconnect may send back), at most 80 bytes.
fn id_part(s: &str) -> String {
    let part: String = s
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(80)
        .collect();
    if part.is_empty() {
        "worker".into()
    } else {
        part
    }
}

/// Checks a registering worker's protocol version and gives its worker id: a new one
/// (NAME@DEVICE-xxxxxxxx), or the one it had before a reconnect.
pub(crate) fn register_worker(req: &pb::RegisterRequest) -> Result<String, Status> {
    pb::check_protocol_version(req.protocol_version)?;
    if req.worker_id.is_empty() {
        // NAME@DEVICE-xxxxxxxx: stored with every result, so SQL can tell which device (and
        // precision, e.g. cuda:0/bf16) made an image.
        let id = format!(
            "{}@{}-{}",
            id_part(&req.name),
            id_part(&req.device),
            &uuid::Uuid::new_v4().to_string()[..8]
        );
        tracing::info!(worker = %id, device = %req.device, batch = req.batch, "worker registered");
        Ok(id)
    } else if req.worker_id.len() <= 200 && req.worker_id.bytes().all(|b| b.is_ascii_graphic()) {
        tracing::info!(worker = %req.worker_id, "worker reconnected");
        Ok(req.worker_id.clone())
    } else {
        Err(Status::invalid_argument(
            "worker_id must be at most 200 printable ASCII characters",
        ))
    }
}

/// How often a worker heartbeats its leases: a quarter of their lifetime.
pub(crate) fn heartbeat_interval_ms(lease_ms: i64) -> u32 {
    (lease_ms / 4).max(100) as u32
}

/// A file streamed in order in `chunk`-byte pieces from `offset`, each made by `piece(offset,
/// data, total_size)`: the weights to a worker that lacks them, an image of an examples pass
/// to a worker without the folder.
pub(crate) async fn stream_file<T: Send + 'static>(
    path: &std::path::Path,
    offset: u64,
    chunk: usize,
    piece: impl Fn(u64, Vec<u8>, u64) -> T,
) -> Result<Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>, Status> {
    let bytes = tokio::fs::read(path)
        .await
        .map_err(|e| Status::internal(format!("cannot read {}: {e}", path.display())))?;
    let total = bytes.len() as u64;
    let start = offset.min(total) as usize;
    let chunks: Vec<Result<T, Status>> = bytes[start..]
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| Ok(piece((start + i * chunk) as u64, c.to_vec(), total)))
        .collect();
    Ok(Box::pin(tokio_stream::iter(chunks)))
}

/// The weights file at `path` (sha256 `served`) as a stream of chunks, from the offset the
/// request asks for.
pub(crate) async fn serve_weights(
    path: &std::path::Path,
    served: &str,
    req: pb::FetchWeightsRequest,
) -> Result<WeightsStream, Status> {
    if req.sha256 != served {
        return Err(Status::not_found(format!(
            "this coordinator serves weights {served} only, not {}",
            req.sha256
        )));
    }
    let sha = req.sha256.clone();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    stream_file(
        path,
        req.offset,
        pb::WEIGHTS_CHUNK_BYTES,
        move |offset, data, total_size| pb::WeightsChunk {
            offset,
            data,
            total_size,
            sha256: sha.clone(),
            file_name: name.clone(),
        },
    )
    .await
}

pub(crate) type WeightsStream =
    Pin<Box<dyn Stream<Item = Result<pb::WeightsChunk, Status>> + Send>>;
pub(crate) type ImageStream = Pin<Box<dyn Stream<Item = Result<pb::ImageChunk, Status>> + Send>>;

/// A heartbeat's answer for one lease: held until `deadline`, or revoked (`None`).
pub(crate) fn lease_status(lease_id: String, deadline: Option<i64>) -> pb::LeaseStatus {
    pb::LeaseStatus {
        lease_id,
        state: match deadline {
            Some(_) => pb::LeaseState::Held,
            None => pb::LeaseState::Revoked,
        } as i32,
        lease_deadline_ms: deadline.unwrap_or(0) as u64,
    }
}

#[pb::tonic::async_trait]
impl pb::Coordinator for CoordinatorService {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = req.into_inner();
        let worker_id = register_worker(&req)?;
        self.stats.saw(&worker_id);
        if req.worker_id.is_empty() {
            // A worker id new from this process holds no lease anywhere yet.
            self.issued.checked(&worker_id, &[], None);
        }
        // A count, not the per-layer summary: a thousand workers register at once.
        let unfinished = self.unfinished().await?;
        let finished = (self.run.filters_total as i64 - unfinished).max(0);
        Ok(Response::new(pb::RegisterResponse {
            worker_id,
            run: Some(pb::RunSummary {
                run_id: self.run.run_id.clone(),
                settings: Some(self.run.settings.clone()),
                layers: self.run.layers.clone(),
                filters_total: self.run.filters_total,
                filters_finished: finished as u32,
            }),
            heartbeat_interval_ms: heartbeat_interval_ms(self.run.lease_ms),
            pass: None,
        }))
    }

    async fn poll_work(
        &self,
        req: Request<pb::PollWorkRequest>,
    ) -> Result<Response<pb::PollWorkResponse>, Status> {
        let req = req.into_inner();
        self.stats.saw(&req.worker_id);
        let batch = req.batch.max(1) as usize;
        let now = now_ms();
        let idle_before = self.idle(now);
        let held = &req.held_lease_ids;
        let mut in_flight = PollInFlight {
            issued: &self.issued,
            worker: &req.worker_id,
            noted: false,
        };
        let reclaimed = if self.issued.may_have_lost(&req.worker_id, held) {
            let found = self
                .store
                .reclaim(
                    &self.run.run_id,
                    &req.worker_id,
                    held,
                    now,
                    self.run.lease_ms,
                )
                .await
                .map_err(|e| self.stats.store.status(e))?;
            let id = found.as_ref().map(|l| l.lease_id.as_str());
            self.issued.checked(&req.worker_id, held, id);
            found
        } else {
            None
        };
        let lease = match reclaimed {
            Some(l) => {
                tracing::info!(worker = %req.worker_id, lease = %l.lease_id, "lease sent again: its first answer was lost");
                Some(l)
            }
            None => self.lease_if_any(&req.worker_id, batch, now).await?,
        };
        let asked_store = !idle_before;
        if let Some(l) = &lease {
            self.stats.leases_issued.fetch_add(1, Ordering::Relaxed);
            self.issued.issued(&req.worker_id, l, now);
        }
        in_flight.noted = true;
        let work = match lease {
            Some(l) => pb::poll_work_response::Work::Lease(pb::Lease {
                lease_id: l.lease_id,
                run_id: l.run_id,
                layer: l.layer,
                filters: l
                    .filters
                    .into_iter()
                    .map(|(filter, seed)| pb::LeasedFilter {
                        filter: filter as u32,
                        seed: seed as u64,
                    })
                    .collect(),
                lease_deadline_ms: l.lease_deadline_ms as u64,
                settings: Some(self.run.settings.clone()),
            }),
            None if self.run_finished(asked_store).await? => {
                pb::poll_work_response::Work::Finished(true)
            }
            // Everything left is leased to someone else; ask again around when leases expire.
            None => pb::poll_work_response::Work::RetryAfterMs(retry_after_ms(self.run.lease_ms)),
        };
        Ok(Response::new(pb::PollWorkResponse { work: Some(work) }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        self.stats.saw(&req.worker_id);
        let now = now_ms();
        let mut leases = Vec::with_capacity(req.lease_ids.len());
        let lease_ms = self.run.lease_ms;
        for lease_id in req.lease_ids {
            if let Some(deadline) = self.issued.fresh(&lease_id, now, lease_ms) {
                leases.push(lease_status(lease_id, Some(deadline)));
                continue;
            }
            let held = self
                .store
                .heartbeat(&lease_id, now, lease_ms)
                .await
                .map_err(|e| self.stats.store.status(e))?;
            if held {
                self.issued.renewed(&lease_id, now + lease_ms);
            } else {
                self.issued.forget(&req.worker_id, &lease_id);
            }
            leases.push(lease_status(lease_id, held.then_some(now + lease_ms)));
        }
        Ok(Response::new(pb::HeartbeatResponse { leases }))
    }

    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let req = req.into_inner();
        self.stats.saw(&req.worker_id);
        // The layer of a live lease issued here is known; any other comes from the store: a
        // lease issued before a coordinator restart is still honoured, and one re-leased since
        // holds no filter any more.
        let layer = match self.issued.live_layer(&req.lease_id, now_ms()) {
            Some(layer) => Some(layer),
            None => self
                .store
                .lease_layer(&self.run.run_id, &req.lease_id)
                .await
                .map_err(|e| self.stats.store.status(e))?,
        };
        // Checked one by one; what passes is recorded in one transaction.
        let filters: Vec<u32> = req.results.iter().map(|r| r.filter).collect();
        let mut answers: Vec<Option<(pb::SubmitOutcome, String)>> = Vec::new();
        let mut submissions = Vec::new();
        for r in req.results {
            let answer = match &layer {
                None => Some((
                    pb::SubmitOutcome::NotLeased,
                    format!(
                        "lease {} holds no filter of run {} (expired and re-leased, or never issued)",
                        req.lease_id, self.run.run_id
                    ),
                )),
                Some(layer) => match check_png(&r, self.run.settings.size) {
                    Err(why) => Some((pb::SubmitOutcome::Rejected, why)),
                    Ok(border_ratio) => {
                        submissions.push(store::Submission {
                            run_id: self.run.run_id.clone(),
                            layer: layer.clone(),
                            filter: r.filter as i32,
                            lease_id: req.lease_id.clone(),
                            worker: req.worker_id.clone(),
                            activation: r.activation,
                            objective: r.objective,
                            start_activation: r.start_activation,
                            curve: r.curve,
                            seconds: r.seconds,
                            dead: r.dead,
                            failed_reason: r.failed_reason,
                            retries: r.retries,
                            png: r.png,
                            border_ratio,
                            second_ascent: r.second_ascent,
                        });
                        None
                    }
                },
            };
            answers.push(answer);
        }
        let mut stored = self.writes.submit(submissions, now_ms()).await?.into_iter();
        self.issued.forget(&req.worker_id, &req.lease_id);
        // Stored: if an outage was on, it is over (and if ending it fails, it goes on).
        let _ = self
            .stats
            .store
            .recovered(&*self.store, &self.run.run_id, self.run.lease_ms)
            .await;
        let mut outcomes = Vec::with_capacity(answers.len());
        for (filter, answer) in filters.into_iter().zip(answers) {
            let (outcome, message) = match answer {
                Some(a) => a,
                None => match stored.next().expect("one answer per stored submission") {
                    Ok(store::SubmitOutcome::NotLeased) => (
                        pb::SubmitOutcome::NotLeased,
                        format!(
                            "filter {filter} is not held by worker {} under lease {} (the lease \
                             expired and was re-leased, or it is another worker's)",
                            req.worker_id, req.lease_id
                        ),
                    ),
                    Ok(o) => to_wire(o),
                    Err(
                        e @ (crate::Error::NonFinite { .. } | crate::Error::UnknownFilter { .. }),
                    ) => (pb::SubmitOutcome::Rejected, e.to_string()),
                    Err(e) => return Err(self.stats.store.status(e)),
                },
            };
            if outcome == pb::SubmitOutcome::Failed {
                // Perhaps pending again: the next poll asks the store.
                self.idle_until.store(0, Ordering::Relaxed);
            }
            let counter = match outcome {
                pb::SubmitOutcome::Recorded => &self.stats.results_recorded,
                pb::SubmitOutcome::Failed => &self.stats.failures_reported,
                _ => &self.stats.results_refused,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            if outcome != pb::SubmitOutcome::Recorded {
                tracing::warn!(worker = %req.worker_id, lease = %req.lease_id, layer = layer.as_deref().unwrap_or("?"), filter, ?outcome, %message, "submission not recorded");
            }
            outcomes.push(pb::FilterOutcome {
                filter,
                outcome: outcome as i32,
                message,
            });
        }
        Ok(Response::new(pb::SubmitResponse { outcomes }))
    }

    type FetchWeightsStream = WeightsStream;

    async fn fetch_weights(
        &self,
        req: Request<pb::FetchWeightsRequest>,
    ) -> Result<Response<Self::FetchWeightsStream>, Status> {
        serve_weights(
            &self.run.weights_path,
            &self.run.settings.weights_sha256,
            req.into_inner(),
        )
        .await
        .map(Response::new)
    }

    async fn submit_images(
        &self,
        _: Request<pb::SubmitImagesRequest>,
    ) -> Result<Response<pb::SubmitImagesResponse>, Status> {
        Err(self.no_pass())
    }

    type FetchImageStream = ImageStream;

    async fn fetch_image(
        &self,
        _: Request<pb::FetchImageRequest>,
    ) -> Result<Response<Self::FetchImageStream>, Status> {
        Err(self.no_pass())
    }
}

impl CoordinatorService {
    fn no_pass(&self) -> Status {
        Status::failed_precondition(format!(
            "this coordinator renders run {}; it runs no examples pass",
            self.run.run_id
        ))
    }
}

/// What the store did, as the wire says it: a recorded failure is `FAILED` whether the filter
/// is leased again or failed for good; the message tells which.
fn to_wire(o: store::SubmitOutcome) -> (pb::SubmitOutcome, String) {
    match o {
        store::SubmitOutcome::Recorded => (pb::SubmitOutcome::Recorded, String::new()),
        store::SubmitOutcome::Duplicate => (pb::SubmitOutcome::Duplicate, String::new()),
        store::SubmitOutcome::NotLeased => (pb::SubmitOutcome::NotLeased, String::new()),
        store::SubmitOutcome::Pending => (
            pb::SubmitOutcome::Failed,
            "the failure is recorded; the filter is pending and will be leased again".into(),
        ),
        store::SubmitOutcome::Failed => (
            pb::SubmitOutcome::Failed,
            "the failure is recorded; the filter used its last attempt and failed for good".into(),
        ),
    }
}

/// A finished filter's image must be a PNG of the run's size; a failed one carries none. Gives
/// the image's border ratio ([`vgg_atlas_atlas::quality::border_ratio`], stored with the
/// result), computed from the image decoded here; `None` for a failed filter.
fn check_png(r: &pb::FilterResult, size: u32) -> Result<Option<f32>, String> {
    if r.failed_reason.is_some() {
        return Ok(None);
    }
    let img = image::load_from_memory_with_format(&r.png, image::ImageFormat::Png)
        .map_err(|e| format!("filter {}: the image is not a valid PNG ({e})", r.filter))?;
    if img.width() != size || img.height() != size {
        return Err(format!(
            "filter {}: the image is {}x{}, the run's size is {size}",
            r.filter,
            img.width(),
            img.height()
        ));
    }
    Ok(Some(
        vgg_atlas_atlas::quality::border_ratio(&img.to_rgb8()) as f32
    ))
}

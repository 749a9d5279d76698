//! Group commit: the leases and the results that reach the coordinator while the store is busy
//! writing go to it together, the leases in one transaction and the results in another,
//! instead of a transaction (and, with SQLite's `synchronous = FULL` or PostgreSQL's defaults,
//! an fsync) each. A thousand workers that poll or submit at once would otherwise queue for
//! SQLite's one writer one commit at a time. A call alone is written at once; calls that arrive
//! while a write is under way wait for it, as they would have waited for the write lock, and
//! go in the next one.
//!
//! A group that fails for a reason other than an outage of the store is written again call by
//! call, so that a bad call fails alone and never takes the others with it. An outage fails
//! every call of the group with `UNAVAILABLE` (see [`crate::health`]): their workers keep
//! their results and retry.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot};
use vgg_atlas_proto::tonic::Status;

use crate::metrics::Stats;
use crate::store::{Lease, Store, Submission, SubmitOutcome};
use crate::Result;

/// The two writes a group is made of: [`Store::lease_many`] and [`Store::submit_all`].
#[async_trait::async_trait]
trait Sink: Send + Sync {
    async fn lease_many(
        &self,
        run_id: &str,
        requests: &[(&str, usize)],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<Option<Lease>>>;

    async fn submit_all(&self, submissions: &[Submission], now_ms: i64) -> Result<Outcomes>;

    /// How many groups may be written at once.
    fn writers(&self) -> usize;
}

struct StoreSink(Arc<dyn Store>);

#[async_trait::async_trait]
impl Sink for StoreSink {
    async fn lease_many(
        &self,
        run_id: &str,
        requests: &[(&str, usize)],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<Option<Lease>>> {
        self.0.lease_many(run_id, requests, now_ms, lease_ms).await
    }

    async fn submit_all(&self, submissions: &[Submission], now_ms: i64) -> Result<Outcomes> {
        self.0.submit_all(submissions, now_ms).await
    }

    fn writers(&self) -> usize {
        self.0.writers()
    }
}

/// At most this many calls in one group, and results with at most this many image bytes
/// shared among the writers: a group's transaction stays short (a few hundred milliseconds at
/// most) and its memory bounded. Every call of a group waits for all of it: with four
/// PostgreSQL writers, groups of 16 MB instead of 64 MB took the p99 of a thousand workers'
/// round trips from 2.3 s to 1.9 s (`bench-coordinator`), while SQLite's one writer measured
/// the same with either.
const MAX_CALLS: usize = 512;
const MAX_IMAGE_BYTES: usize = 64 << 20;

type Reply<T> = oneshot::Sender<std::result::Result<T, Status>>;

/// The answers to one submit call: one per submission, in its order.
pub type Outcomes = Vec<Result<SubmitOutcome>>;

enum Call {
    Lease(LeaseCall),
    Submit(SubmitCall),
}

/// The write side of one run's leases and results (see the module's doc).
pub struct GroupCommit {
    sink: Arc<dyn Sink>,
    stats: Arc<Stats>,
    run_id: String,
    lease_ms: i64,
    /// Started by the first call, on its runtime. Unbounded: every queued call is an RPC that
    /// waits for its answer, so the queue is never longer than the calls in flight.
    queue: OnceLock<mpsc::UnboundedSender<Call>>,
}

impl GroupCommit {
    pub fn new(store: Arc<dyn Store>, stats: Arc<Stats>, run_id: String, lease_ms: i64) -> Self {
        Self::on(Arc::new(StoreSink(store)), stats, run_id, lease_ms)
    }

    fn on(sink: Arc<dyn Sink>, stats: Arc<Stats>, run_id: String, lease_ms: i64) -> Self {
        GroupCommit {
            sink,
            stats,
            run_id,
            lease_ms,
            queue: OnceLock::new(),
        }
    }

    /// [`Store::lease`], written with the leases of other calls waiting at the same time.
    pub async fn lease(
        &self,
        worker: &str,
        batch: usize,
        now_ms: i64,
    ) -> std::result::Result<Option<Lease>, Status> {
        let (reply, answer) = oneshot::channel();
        self.send(Call::Lease(LeaseCall {
            worker: worker.to_string(),
            batch,
            now_ms,
            reply,
        }))?;
        answer.await.map_err(|_| gone())?
    }

    /// [`Store::submit_all`], written with the results of other calls waiting at the same time.
    pub async fn submit(
        &self,
        submissions: Vec<Submission>,
        now_ms: i64,
    ) -> std::result::Result<Outcomes, Status> {
        let (reply, answer) = oneshot::channel();
        self.send(Call::Submit(SubmitCall {
            submissions,
            now_ms,
            reply,
        }))?;
        answer.await.map_err(|_| gone())?
    }

    fn send(&self, call: Call) -> std::result::Result<(), Status> {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            // Writers take turns at the queue: one gathers the next group while others write.
            let rx = Arc::new(tokio::sync::Mutex::new(rx));
            let writers = self.sink.writers().max(1);
            for _ in 0..writers {
                let writer = Writer {
                    sink: self.sink.clone(),
                    max_bytes: MAX_IMAGE_BYTES / writers,
                    stats: self.stats.clone(),
                    run_id: self.run_id.clone(),
                    lease_ms: self.lease_ms,
                };
                tokio::spawn(writer.run(rx.clone()));
            }
            tx
        });
        queue.send(call).map_err(|_| gone())
    }
}

fn gone() -> Status {
    Status::unavailable("the coordinator's writer has stopped; retry")
}

struct Writer {
    sink: Arc<dyn Sink>,
    max_bytes: usize,
    stats: Arc<Stats>,
    run_id: String,
    lease_ms: i64,
}

struct LeaseCall {
    worker: String,
    batch: usize,
    now_ms: i64,
    reply: Reply<Option<Lease>>,
}

struct SubmitCall {
    submissions: Vec<Submission>,
    now_ms: i64,
    reply: Reply<Outcomes>,
}

impl Writer {
    async fn run(self, queue: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Call>>>) {
        loop {
            let (mut leases, mut submits) = (Vec::new(), Vec::new());
            {
                let mut queue = queue.lock().await;
                let Some(first) = queue.recv().await else {
                    return;
                };
                let mut bytes = 0;
                let mut next = Some(first);
                while let Some(call) = next.take() {
                    match call {
                        Call::Lease(call) => leases.push(call),
                        Call::Submit(call) => {
                            bytes += call.submissions.iter().map(|s| s.png.len()).sum::<usize>();
                            submits.push(call);
                        }
                    }
                    if leases.len() + submits.len() < MAX_CALLS && bytes < self.max_bytes {
                        next = queue.try_recv().ok();
                    }
                }
            }
            let calls = (leases.len() + submits.len()) as u64;
            self.stats.write_calls.fetch_add(calls, Ordering::Relaxed);
            let groups = u64::from(!leases.is_empty()) + u64::from(!submits.is_empty());
            self.stats.write_groups.fetch_add(groups, Ordering::Relaxed);
            // Results first: they are work done; a lease is work to come.
            if !submits.is_empty() {
                self.submit(submits).await;
            }
            if !leases.is_empty() {
                self.lease(leases).await;
            }
        }
    }

    /// One transaction for every call's results; each call answered with its own part.
    async fn submit(&self, calls: Vec<SubmitCall>) {
        // One time for the whole group: the latest, so no result is stamped before it arrived.
        let now_ms = calls.iter().map(|c| c.now_ms).max().unwrap_or_default();
        let counts: Vec<usize> = calls.iter().map(|c| c.submissions.len()).collect();
        let (replies, parts): (Vec<_>, Vec<_>) =
            calls.into_iter().map(|c| (c.reply, c.submissions)).unzip();
        let all: Vec<Submission> = parts.into_iter().flatten().collect();
        match self.sink.submit_all(&all, now_ms).await {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for (reply, n) in replies.into_iter().zip(counts) {
                    let _ = reply.send(Ok(outcomes.by_ref().take(n).collect()));
                }
            }
            Err(e) if replies.len() > 1 && e.outage().is_none() => {
                tracing::warn!(
                    "a group of {} submissions failed ({e}); written again one call at a time",
                    all.len()
                );
                let mut all = all.into_iter();
                for (reply, n) in replies.into_iter().zip(counts) {
                    let part: Vec<Submission> = all.by_ref().take(n).collect();
                    let got = self.sink.submit_all(&part, now_ms).await;
                    let _ = reply.send(got.map_err(|e| self.stats.store.status(e)));
                }
            }
            // An outage, or the one call's own error.
            Err(e) => {
                let status = self.stats.store.status(e);
                for reply in replies {
                    let _ = reply.send(Err(status.clone()));
                }
            }
        }
    }

    /// One transaction for every call's lease, taken in the order the calls came.
    async fn lease(&self, calls: Vec<LeaseCall>) {
        let now_ms = calls.iter().map(|c| c.now_ms).min().unwrap_or_default();
        let requests: Vec<(&str, usize)> =
            calls.iter().map(|c| (c.worker.as_str(), c.batch)).collect();
        let got = self
            .sink
            .lease_many(&self.run_id, &requests, now_ms, self.lease_ms)
            .await;
        match got {
            Ok(leases) => {
                for (call, lease) in calls.into_iter().zip(leases) {
                    let _ = call.reply.send(Ok(lease));
                }
            }
            Err(e) if calls.len() > 1 && e.outage().is_none() => {
                tracing::warn!(
                    "a group of {} leases failed ({e}); taken again one at a time",
                    calls.len()
                );
                for call in calls {
                    let got = self
                        .sink
                        .lease_many(
                            &self.run_id,
                            &[(&call.worker, call.batch)],
                            call.now_ms,
                            self.lease_ms,
                        )
                        .await
                        .map(|mut one| one.pop().flatten());
                    let _ = call.reply.send(got.map_err(|e| self.stats.store.status(e)));
                }
            }
            Err(e) => {
                let status = self.stats.store.status(e);
                for call in calls {
                    let _ = call.reply.send(Err(status.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::Error;
    use vgg_atlas_proto::tonic::Code;

    /// A store that records the calls it gets: each submit fails (as no real database would
    /// for such a reason, but as one can for any row) when a submission carries the failure
    /// reason "poison", and every call fails as an outage while `down`.
    #[derive(Default)]
    struct Fake {
        submit_calls: Mutex<Vec<usize>>,
        lease_calls: Mutex<Vec<usize>>,
        down: bool,
    }

    fn outage() -> Error {
        Error::Database(sqlx::Error::PoolTimedOut)
    }

    #[async_trait::async_trait]
    impl Sink for Fake {
        async fn lease_many(
            &self,
            run_id: &str,
            requests: &[(&str, usize)],
            now_ms: i64,
            lease_ms: i64,
        ) -> Result<Vec<Option<Lease>>> {
            self.lease_calls.lock().unwrap().push(requests.len());
            if self.down {
                return Err(outage());
            }
            Ok(requests
                .iter()
                .map(|&(worker, batch)| {
                    Some(Lease {
                        lease_id: format!("lease of {worker}"),
                        run_id: run_id.to_string(),
                        layer: "block1_conv1".into(),
                        filters: (0..batch as i32).map(|f| (f, 0)).collect(),
                        lease_deadline_ms: now_ms + lease_ms,
                    })
                })
                .collect())
        }

        fn writers(&self) -> usize {
            1
        }

        async fn submit_all(&self, submissions: &[Submission], _now: i64) -> Result<Outcomes> {
            self.submit_calls.lock().unwrap().push(submissions.len());
            if self.down {
                return Err(outage());
            }
            if submissions
                .iter()
                .any(|s| s.failed_reason.as_deref() == Some("poison"))
            {
                return Err(Error::Corrupt("a row the database refuses".into()));
            }
            Ok(submissions
                .iter()
                .map(|s| match s.filter {
                    99 => Err(Error::UnknownFilter {
                        run_id: s.run_id.clone(),
                        layer: s.layer.clone(),
                        filter: s.filter,
                    }),
                    _ => Ok(SubmitOutcome::Recorded),
                })
                .collect())
        }
    }

    fn result(worker: &str, filter: i32) -> Submission {
        Submission {
            run_id: "run".into(),
            layer: "block1_conv1".into(),
            filter,
            lease_id: format!("lease of {worker}"),
            worker: worker.into(),
            activation: 1.0,
            objective: 1.0,
            start_activation: 0.5,
            curve: vec![1.0],
            seconds: 1.0,
            dead: false,
            failed_reason: None,
            retries: 0,
            png: vec![0; 10],
            border_ratio: Some(1.0),
            second_ascent: None,
        }
    }

    fn poison(worker: &str, filter: i32) -> Submission {
        Submission {
            failed_reason: Some("poison".into()),
            ..result(worker, filter)
        }
    }

    fn commit(fake: &Arc<Fake>) -> (GroupCommit, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        let commit = GroupCommit::on(fake.clone(), stats.clone(), "run".into(), 60_000);
        (commit, stats)
    }

    fn recorded(got: &std::result::Result<Outcomes, Status>) -> Vec<bool> {
        got.as_ref()
            .expect("answered")
            .iter()
            .map(|o| matches!(o, Ok(SubmitOutcome::Recorded)))
            .collect()
    }

    // The tests run on one thread: every call of a `join!` is queued before the writer runs,
    // so they reach it together, as calls do that arrive during a write.

    #[tokio::test]
    async fn calls_that_arrive_together_are_written_in_one_transaction_each_kind() {
        let fake = Arc::new(Fake::default());
        let (commit, stats) = commit(&fake);
        let (a, b, c, la, lb) = tokio::join!(
            commit.submit(vec![result("a", 0), result("a", 1)], 10),
            commit.submit(vec![result("b", 99)], 10),
            commit.submit(vec![result("c", 2), result("c", 3), result("c", 4)], 10),
            commit.lease("d", 4, 10),
            commit.lease("e", 2, 10),
        );
        assert_eq!(*fake.submit_calls.lock().unwrap(), [6]);
        assert_eq!(*fake.lease_calls.lock().unwrap(), [2]);
        // Each call gets its own part of the answers, in its order.
        assert_eq!(recorded(&a), [true, true]);
        assert!(matches!(
            b.as_ref().unwrap()[..],
            [Err(Error::UnknownFilter { filter: 99, .. })]
        ));
        assert_eq!(recorded(&c), [true, true, true]);
        assert_eq!(la.unwrap().unwrap().lease_id, "lease of d");
        assert_eq!(lb.unwrap().unwrap().filters.len(), 2);
        assert_eq!(stats.write_calls.load(Ordering::Relaxed), 5);
        assert_eq!(stats.write_groups.load(Ordering::Relaxed), 2);
        // A call alone is written alone.
        let alone = commit.submit(vec![result("a", 5)], 20).await;
        assert_eq!(recorded(&alone), [true]);
        assert_eq!(*fake.submit_calls.lock().unwrap(), [6, 1]);
    }

    #[tokio::test]
    async fn a_group_that_fails_is_written_again_call_by_call_so_only_the_bad_call_fails() {
        let fake = Arc::new(Fake::default());
        let (commit, _) = commit(&fake);
        let (a, bad, c) = tokio::join!(
            commit.submit(vec![result("a", 0)], 10),
            commit.submit(vec![result("b", 1), poison("b", 2)], 10),
            commit.submit(vec![result("c", 3)], 10),
        );
        assert_eq!(*fake.submit_calls.lock().unwrap(), [4, 1, 2, 1]);
        assert_eq!(recorded(&a), [true]);
        assert_eq!(recorded(&c), [true]);
        let bad = bad.expect_err("the poisoned call fails");
        assert_eq!(bad.code(), Code::Internal, "{bad:?}");
    }

    #[tokio::test]
    async fn an_outage_fails_every_call_of_the_group_at_once_with_unavailable() {
        let fake = Arc::new(Fake {
            down: true,
            ..Fake::default()
        });
        let (commit, stats) = commit(&fake);
        let (a, b, l) = tokio::join!(
            commit.submit(vec![result("a", 0)], 10),
            commit.submit(vec![result("b", 1)], 10),
            commit.lease("c", 4, 10),
        );
        // Not written again one by one: each would wait out the same outage.
        assert_eq!(*fake.submit_calls.lock().unwrap(), [2]);
        assert_eq!(*fake.lease_calls.lock().unwrap(), [1]);
        for status in [a.unwrap_err(), b.unwrap_err(), l.unwrap_err()] {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(status
                .metadata()
                .get(vgg_atlas_proto::STORE_OUTAGE_METADATA)
                .is_some());
        }
        assert!(stats.store.is_down());
    }
}

//! Whether the store answers, as the coordinator last found it. An outage (the database server
//! stopped or restarting, the connection lost, the disk full; see [`Error::outage`]) is said
//! once in the log when it begins and once when it ends; meanwhile calls that need the store
//! are answered `UNAVAILABLE` (workers keep their results and retry), nothing is leased, the
//! render waits instead of stopping, and `/healthz` reports it. It ends with the leases of the
//! run renewed ([`StoreHealth::recovered`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vgg_atlas_proto::tonic::metadata::MetadataValue;
use vgg_atlas_proto::tonic::Status;

use crate::error::{Error, Outage};
use crate::store::{now_ms, Store};

#[derive(Default)]
pub struct StoreHealth {
    /// Fast path for the common case: no outage.
    down: AtomicBool,
    outage: Mutex<Option<Down>>,
    /// One recovery at a time.
    recovering: tokio::sync::Mutex<()>,
}

struct Down {
    since: Instant,
    kind: Outage,
    why: String,
}

/// How often an outage is asked again whether it is over.
pub const OUTAGE_RECHECK: Duration = Duration::from_secs(1);

/// What `/healthz` and the log say of an outage.
pub fn describe(kind: Outage) -> &'static str {
    match kind {
        Outage::Unreachable => "the database does not answer",
        Outage::Full => "the database cannot store anything: its disk is full",
    }
}

impl StoreHealth {
    /// Notes `e` if it is an outage (said in the log when the outage begins) and returns its
    /// kind; `None` for any other error.
    pub fn failed(&self, e: &Error) -> Option<Outage> {
        let kind = e.outage()?;
        let mut outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        match &mut *outage {
            Some(d) if d.kind == kind => d.why = e.to_string(),
            _ => {
                tracing::warn!(
                    "{} ({e}); results are kept and retried, and the work goes on when it is back",
                    describe(kind)
                );
                *outage = Some(Down {
                    since: Instant::now(),
                    kind,
                    why: e.to_string(),
                });
            }
        }
        self.down.store(true, Ordering::Relaxed);
        Some(kind)
    }

    /// Whether an outage has begun and not yet ended.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    /// Called after the store answered: if an outage was on, it ends here, once every lease of
    /// `run_id` has been renewed for `lease_ms` from now ([`Store::renew_leases`]; no heartbeat
    /// could renew them meanwhile). Until then nothing is leased (see [`crate::service`]), so
    /// no lease of a worker that was alive all along is taken from it; a worker that died
    /// during the outage loses its leases one lease length after it. An error here (the write
    /// that proves a full disk has room again failed) keeps the outage on.
    pub async fn recovered(
        &self,
        store: &dyn Store,
        run_id: &str,
        lease_ms: i64,
    ) -> Result<(), Error> {
        if !self.is_down() {
            return Ok(());
        }
        let _one = self.recovering.lock().await;
        let Some((kind, lasted, _)) = self.outage() else {
            return Ok(()); // ended by another caller meanwhile
        };
        match store.renew_leases(run_id, now_ms() + lease_ms).await {
            Ok(held) => {
                self.end(
                    kind,
                    lasted,
                    &format!("the {held} filters under lease meanwhile keep their leases"),
                );
                Ok(())
            }
            Err(e) => {
                self.failed(&e);
                Err(e)
            }
        }
    }

    /// Called after the store answered, by a caller that holds no filter leases (an examples
    /// pass, whose image leases are not renewed: a batch whose lease ran out and was taken by
    /// another process is examined again there). Ends an outage of the server at once, and one
    /// of a full disk once `wrote` (reads work on a full disk).
    pub fn answered(&self, wrote: bool) {
        if let Some((kind, lasted, _)) = self.outage() {
            if kind == Outage::Unreachable || wrote {
                self.end(kind, lasted, "going on");
            }
        }
    }

    fn end(&self, kind: Outage, lasted: Duration, then: &str) {
        tracing::warn!(
            "the database answers again, after {:.1} s ({}); {then}",
            lasted.as_secs_f64(),
            describe(kind),
        );
        *self.outage.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.down.store(false, Ordering::Relaxed);
    }

    /// Runs `op` until it succeeds or fails with something other than an outage, which it waits
    /// out (asking again every [`OUTAGE_RECHECK`]); for a caller that holds no filter leases, as
    /// [`StoreHealth::answered`]. `wrote`: whether `op` writes.
    pub async fn patiently<T, F, Fut>(&self, wrote: bool, mut op: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        loop {
            match op().await {
                Ok(v) => {
                    self.answered(wrote);
                    return Ok(v);
                }
                Err(e) if self.failed(&e).is_some() => tokio::time::sleep(OUTAGE_RECHECK).await,
                Err(e) => return Err(e),
            }
        }
    }

    /// The outage now, if any: its kind, how long it has lasted, and the last error it gave.
    pub fn outage(&self) -> Option<(Outage, Duration, String)> {
        if !self.down.load(Ordering::Relaxed) {
            return None;
        }
        let outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
        outage
            .as_ref()
            .map(|d| (d.kind, d.since.elapsed(), d.why.clone()))
    }

    /// The gRPC answer to a call the store failed: `UNAVAILABLE` for an outage (the worker
    /// keeps what it has and retries), `INTERNAL` otherwise.
    pub fn status(&self, e: Error) -> Status {
        match self.failed(&e) {
            Some(kind) => {
                let mut status = Status::unavailable(format!(
                    "{} ({e}); keep the results and retry",
                    describe(kind)
                ));
                status.metadata_mut().insert(
                    vgg_atlas_proto::STORE_OUTAGE_METADATA,
                    MetadataValue::from_static("1"),
                );
                status
            }
            None => Status::internal(e.to_string()),
        }
    }
}

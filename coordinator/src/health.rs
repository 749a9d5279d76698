//! Whether the store answers, as the coordinator last found it. An outage (the database server
//! stopped or restarting, the connection lost, the disk full; see [`Error::outage`]) is said
//! once in the log when it begins and once when it ends; meanwhile calls that need the store
//! are answered `UNAVAILABLE` (workers keep their results and retry), nothing is leased, the
//! render waits instead of stopping, and `/healthz` reports it. It ends with the leases of the
//! run renewed ([`StoreHealth::recovered`]), or for an examples pass with its image leases
//! renewed ([`StoreHealth::keeping_image_leases`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    /// An examples pass's image leases, renewed before its outage may end.
    images: Option<ImageLeases>,
    /// How many of `images` were renewed since the outage began; `None` until they are.
    renewed: Mutex<Option<u64>>,
}

/// The image leases of one examples pass, held by this process or by its workers.
struct ImageLeases {
    store: Arc<dyn Store>,
    pass_id: String,
    lease_ms: i64,
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
    /// The health of an examples pass's store: an outage ends only once the pass's image leases
    /// have been renewed for `lease_ms` ([`Store::renew_image_leases`]), and while it is on,
    /// [`StoreHealth::patiently`] renews them before anything else (the first call to succeed
    /// could otherwise be one that leases images, and take those of a worker alive all along
    /// whose lease ran out meanwhile).
    pub fn keeping_image_leases(store: Arc<dyn Store>, pass_id: &str, lease_ms: i64) -> Self {
        StoreHealth {
            images: Some(ImageLeases {
                store,
                pass_id: pass_id.to_string(),
                lease_ms,
            }),
            ..StoreHealth::default()
        }
    }

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
        // Leases renewed before this error may run out before the outage ends: renewed again.
        *self.renewed() = None;
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
    /// pass). Ends an outage of the server at once, and one of a full disk once `wrote` (reads
    /// work on a full disk); for an examples pass ([`StoreHealth::keeping_image_leases`]) only
    /// once its image leases have been renewed ([`StoreHealth::keep_image_leases`]).
    pub fn answered(&self, wrote: bool) {
        if let Some((kind, lasted, _)) = self.outage() {
            if kind == Outage::Unreachable || wrote {
                let renewed = *self.renewed();
                match (&self.images, renewed) {
                    (None, _) => self.end(kind, lasted, "going on"),
                    (Some(_), Some(held)) => self.end(
                        kind,
                        lasted,
                        &format!("the {held} images under lease meanwhile keep their leases"),
                    ),
                    (Some(_), None) => {}
                }
            }
        }
    }

    /// During an outage of an examples pass's store, renews the pass's image leases once (no
    /// heartbeat could renew them), so that nothing leased after it takes the images of a
    /// worker that was alive all along; a worker that died meanwhile loses its lease one lease
    /// length later. Call it before leasing images; nothing to do when there is no outage, it
    /// was done, or this is not an examples pass's health. An error (the store still down) is
    /// noted as [`StoreHealth::failed`] does and returned.
    pub async fn keep_image_leases(&self) -> Result<(), Error> {
        let Some(l) = &self.images else {
            return Ok(());
        };
        let done = || !self.is_down() || self.renewed().is_some();
        if done() {
            return Ok(());
        }
        let _one = self.recovering.lock().await;
        if done() {
            return Ok(()); // done by another caller meanwhile
        }
        match l
            .store
            .renew_image_leases(&l.pass_id, now_ms() + l.lease_ms)
            .await
        {
            Ok(held) => {
                *self.renewed() = Some(held);
                Ok(())
            }
            Err(e) => {
                self.failed(&e);
                Err(e)
            }
        }
    }

    fn renewed(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.renewed.lock().unwrap_or_else(|p| p.into_inner())
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
    /// [`StoreHealth::answered`]. `wrote`: whether `op` writes. While an outage is on, an
    /// examples pass's image leases are renewed before `op` runs
    /// ([`StoreHealth::keep_image_leases`]).
    pub async fn patiently<T, F, Fut>(&self, wrote: bool, mut op: F) -> Result<T, Error>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        loop {
            match self.keep_image_leases().await {
                Ok(()) => {}
                Err(e) if e.outage().is_some() => {
                    tokio::time::sleep(OUTAGE_RECHECK).await;
                    continue;
                }
                Err(e) => return Err(e),
            }
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

//! The persistent store: runs, filters with their lease state, and results.
//!
//! One trait, [`Store`], with two implementations chosen at run time from the database URL:
//! [`sqlite::SqliteStore`] (the embedded default, a file next to the output) and
//! [`postgres::PostgresStore`] (for a cluster). Both apply the schema of `migrations/` at connect
//! and pass the same test suite (`coordinator/tests/store.rs`).
//!
//! Times are passed in as unix milliseconds (`now_ms`) rather than read from the clock, so the
//! coordinator decides what "now" is and tests can move time forward.

#[macro_use]
mod shared;
#[macro_use]
pub mod examples;
pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use vgg_atlas_proto::FilterState;

use crate::{Error, Result};

pub use examples::{
    ExampleRow, ImageFilterRow, ImageLease, ImageOutcome, ImageSubmission, MissingCrop,
    PassProgress, PassSpec, StoredExample,
};

/// One filter of a run's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedFilter {
    pub layer: String,
    /// Position of the layer in the network; leases hand out lower layers first.
    pub layer_index: i32,
    pub filter: i32,
    /// Seed of the filter's start image.
    pub seed: i64,
}

/// Everything the store keeps about a run when it is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    pub run_id: String,
    pub weights_sha256: String,
    /// The run settings as JSON; stored verbatim and compared verbatim on resume.
    pub settings_json: String,
    /// How many times a filter may be leased before it fails for good.
    pub max_attempts: i32,
    pub filters: Vec<PlannedFilter>,
}

/// Up to N filters of one layer handed to one worker until `lease_deadline_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub lease_id: String,
    pub run_id: String,
    pub layer: String,
    /// `(filter, seed)` in filter order.
    pub filters: Vec<(i32, i64)>,
    pub lease_deadline_ms: i64,
}

/// What a worker submits for one filter of its lease: a result, or why it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Submission {
    pub run_id: String,
    pub layer: String,
    pub filter: i32,
    pub lease_id: String,
    pub worker: String,
    pub activation: f32,
    pub objective: f32,
    pub start_activation: f32,
    /// The post-ReLU activation after each ascent step.
    pub curve: Vec<f32>,
    pub seconds: f32,
    pub dead: bool,
    /// `Some(reason)` when the worker could not produce an image; scores are then ignored.
    pub failed_reason: Option<String>,
    /// Steps the worker retried with a smaller step after a non-finite value.
    pub retries: u32,
    pub png: Vec<u8>,
    /// The image's border ratio ([`vgg_atlas_atlas::quality::border_ratio`]), computed by the
    /// coordinator from `png`; `None` for a failed submission.
    pub border_ratio: Option<f32>,
    /// Both ascents' activations when the filter had a second ascent.
    pub second_ascent: Option<vgg_atlas_proto::SecondAscent>,
}

/// What [`Store::submit`] did with a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Result and image stored; the filter is done.
    Recorded,
    /// The filter was already done; nothing was overwritten.
    Duplicate,
    /// The submitting lease no longer holds the filter (expired and re-leased, or failed); nothing written.
    NotLeased,
    /// The worker reported a failure and attempts are left: the failure is recorded and the
    /// filter is pending again (the next poll leases it).
    Pending,
    /// The worker reported a failure and no attempts are left: the filter failed for good.
    Failed,
}

/// One planned filter with its lease state and, when finished, its result (image included).
#[derive(Debug, Clone, PartialEq)]
pub struct FilterRecord {
    pub filter: i32,
    pub state: FilterState,
    pub attempts: i32,
    /// Why it failed for good, or why its last attempt failed (a pending retry).
    pub failed_reason: Option<String>,
    pub result: Option<StoredResult>,
}

/// What a run is, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunInfo {
    pub run_id: String,
    pub weights_sha256: String,
    /// The settings JSON as given at creation.
    pub settings: String,
    pub created_at_ms: i64,
}

/// Per-layer counts of a run. `dead` filters are finished and counted in `done` as well.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerProgress {
    pub layer: String,
    pub layer_index: i32,
    pub total: i64,
    pub done: i64,
    pub pending: i64,
    pub leased: i64,
    pub failed: i64,
    pub dead: i64,
}

/// A finished filter as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredResult {
    pub run_id: String,
    pub layer: String,
    pub filter: i32,
    pub activation: f32,
    pub objective: f32,
    pub start_activation: f32,
    pub curve: Vec<f32>,
    pub seconds: f32,
    pub dead: bool,
    pub worker: String,
    pub png: Vec<u8>,
    pub finished_at_ms: i64,
    /// Steps retried with a smaller step after a non-finite value.
    pub retries: u32,
    /// The image's border ratio (about 1 is good); `None` for a result stored before the
    /// column existed (migration 0003).
    pub border_ratio: Option<f32>,
}

/// The dataset-examples pass's part of the store (see [`examples`]). Every method is one
/// transaction.
#[async_trait::async_trait]
pub trait ExampleStore: Send + Sync {
    /// Creates the pass (`Ok(true)`) or finds it already there (`Ok(false)`); a stored pass
    /// with the same id but another folder, weights, side or K is an error.
    async fn create_or_resume_pass(&self, spec: &PassSpec) -> Result<bool>;

    /// Every pass, oldest first.
    async fn passes(&self) -> Result<Vec<PassSpec>>;

    /// Adds the images the pass lacks, pending; returns how many were new.
    async fn add_images(&self, pass_id: &str, images: &[String]) -> Result<u64>;

    /// Leases up to `batch` images (pending, or leased with an expired deadline), in name
    /// order. An image whose expired lease used its last attempt is skipped for good instead.
    /// `None` when nothing is leasable now.
    async fn lease_images(
        &self,
        pass_id: &str,
        batch: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<ImageLease>>;

    /// Moves the deadline of the images this lease still holds; `false` when it holds none.
    async fn heartbeat_images(&self, lease_id: &str, now_ms: i64, lease_ms: i64) -> Result<bool>;

    /// Moves every leased image of the pass whose deadline is before `deadline_ms` to it: after
    /// an outage, in which no heartbeat could renew them. Returns how many.
    async fn renew_image_leases(&self, pass_id: &str, deadline_ms: i64) -> Result<u64>;

    /// Records the outcomes of a lease's images that it still holds (others are ignored: a late
    /// duplicate) and keeps each touched filter's top K; returns how many were recorded.
    async fn submit_images(
        &self,
        pass_id: &str,
        lease_id: &str,
        submissions: &[ImageSubmission],
        now_ms: i64,
    ) -> Result<usize>;

    /// `(layer, filter, K-th activation)` of every filter that has K examples already.
    async fn example_bars(&self, pass_id: &str, top: i32) -> Result<Vec<(String, i32, f32)>>;

    /// The pass's images by state.
    async fn pass_progress(&self, pass_id: &str) -> Result<PassProgress>;

    /// A layer's examples, by filter then rank.
    async fn layer_examples(&self, pass_id: &str, layer: &str) -> Result<Vec<StoredExample>>;

    /// How many examples have no crop yet (a full count: for the start of a pass, not a loop).
    async fn missing_crop_count(&self, pass_id: &str) -> Result<u64>;

    /// The examples still without their crop, of the first `images` images (by name) that
    /// have one.
    async fn missing_crops(&self, pass_id: &str, images: usize) -> Result<Vec<MissingCrop>>;

    /// Stores crops made for [`ExampleStore::missing_crops`] (an empty one: the file could not
    /// be read again); an example that left its top K since is not brought back.
    async fn store_crops(&self, pass_id: &str, crops: &[(MissingCrop, Vec<u8>)]) -> Result<()>;

    /// The skipped images with their reasons, in name order.
    async fn skipped_images(&self, pass_id: &str) -> Result<Vec<(String, Option<String>)>>;
}

/// The coordinator's persistent state. Every method is one transaction, safe to call from many
/// tasks (and, for PostgreSQL, many coordinator processes) at once.
#[async_trait::async_trait]
pub trait Store: ExampleStore + Send + Sync {
    /// Creates the run and its filters (`Ok(true)`), or finds it already there (`Ok(false)`)
    /// and adds to its plan the filters of `spec` it lacks (a whole run after a sample of it);
    /// planned filters and their results are never changed. A stored run with the same id but
    /// other weights or settings is an error.
    async fn create_or_resume_run(&self, spec: &RunSpec) -> Result<bool>;

    /// Closes every connection; on SQLite the last one folds the write-ahead log back into the
    /// database file, so a finished render leaves one file.
    async fn close(&self);

    /// The run's filters that are pending or leased, as (layer, filter), in lease order.
    async fn unfinished_filters(&self, run_id: &str) -> Result<Vec<(String, i32)>>;

    /// Leases up to `batch` filters of one layer (the lowest layer with work, then filter
    /// order) that are pending or whose lease expired. A filter whose expired lease used its last
    /// attempt fails for good instead. `None` when nothing is leasable now.
    async fn lease(
        &self,
        run_id: &str,
        worker: &str,
        batch: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<Lease>> {
        Ok(self
            .lease_many(run_id, &[(worker, batch)], now_ms, lease_ms)
            .await?
            .pop()
            .flatten())
    }

    /// How many write transactions are worth running at once ([`crate::commit`]): one on
    /// SQLite, which has one writer; several on PostgreSQL, whose server runs them side by side.
    fn writers(&self) -> usize;

    /// [`Store::lease`] for several `(worker, batch)` requests, served in turn in one
    /// transaction (one commit instead of one each); a lease per request, `None` for those
    /// that found nothing (and for a batch of 0).
    async fn lease_many(
        &self,
        run_id: &str,
        requests: &[(&str, usize)],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Vec<Option<Lease>>>;

    /// Filters under lease to `worker`: `(lease_id, layer, filter, seed)`, in plan order.
    async fn worker_leases(
        &self,
        run_id: &str,
        worker: &str,
    ) -> Result<Vec<(String, String, i32, i64)>>;

    /// A lease issued to `worker` that is not in `held` (the leases it knows it has): its
    /// answer was lost on the wire, so the worker never started it. It is handed over again,
    /// deadline renewed, instead of waiting to expire and being computed by someone later.
    async fn reclaim(
        &self,
        run_id: &str,
        worker: &str,
        held: &[String],
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<Lease>> {
        let rows = self.worker_leases(run_id, worker).await?;
        let Some(lost) = rows
            .iter()
            .map(|r| &r.0)
            .find(|id| !held.contains(id))
            .cloned()
        else {
            return Ok(None);
        };
        if !self.heartbeat(&lost, now_ms, lease_ms).await? {
            return Ok(None);
        }
        let mine: Vec<_> = rows.into_iter().filter(|r| r.0 == lost).collect();
        Ok(Some(Lease {
            lease_id: lost,
            run_id: run_id.to_string(),
            layer: mine[0].1.clone(),
            filters: mine.iter().map(|r| (r.2, r.3)).collect(),
            lease_deadline_ms: now_ms + lease_ms,
        }))
    }

    /// Moves the deadline of the filters this lease still holds to `now_ms + lease_ms`;
    /// `false` when it holds none (all submitted, or revoked by expiry and re-lease).
    async fn heartbeat(&self, lease_id: &str, now_ms: i64, lease_ms: i64) -> Result<bool>;

    /// Renews every lease of the run to at least `deadline_ms`, as a heartbeat from each of
    /// their workers would, and says how many filters they hold. After an outage of the store
    /// no heartbeat could renew a lease, so without it the leases of workers alive all along
    /// would expire and be computed again by others.
    async fn renew_leases(&self, run_id: &str, deadline_ms: i64) -> Result<u64>;

    /// Records one filter's outcome; see [`SubmitOutcome`]. Non-finite scores are an error.
    async fn submit(&self, submission: &Submission, now_ms: i64) -> Result<SubmitOutcome> {
        self.submit_all(std::slice::from_ref(submission), now_ms)
            .await?
            .pop()
            .expect("one answer per submission")
    }

    /// [`Store::submit`] for several filters (a lease's) in one transaction, which costs one
    /// commit instead of one each. Each is answered on its own, in order: a non-finite score or
    /// an unknown filter is that submission's error and the others are still recorded; the
    /// outer error is the store's (nothing was recorded).
    async fn submit_all(
        &self,
        submissions: &[Submission],
        now_ms: i64,
    ) -> Result<Vec<Result<SubmitOutcome>>>;

    /// Per-layer counts of a run, in layer order.
    async fn progress(&self, run_id: &str) -> Result<Vec<LayerProgress>>;

    /// `(run_id, created_at_ms, settings)` of every run, oldest first.
    async fn runs(&self) -> Result<Vec<(String, i64, String)>>;

    /// `true` when no filter of the run is pending or leased (each is done or failed).
    async fn is_finished(&self, run_id: &str) -> Result<bool>;

    /// Whether [`Store::lease`] would find a filter now (one pending, or leased with its lease
    /// ended): a read, so that the polls of idle workers do not queue for the write lock.
    async fn has_leasable(&self, run_id: &str, now_ms: i64) -> Result<bool>;

    /// How many of the run's filters are pending or leased: one indexed count, cheap enough for
    /// every call of a worker (unlike [`Store::progress`], which summarises every layer).
    async fn unfinished(&self, run_id: &str) -> Result<i64>;

    /// The layer of the filters a lease holds or held (a finished filter keeps its last lease id),
    /// so a submission can be matched after a coordinator restart. `None` when no filter of the run
    /// carries this lease id any more (expired and re-leased, or never issued).
    async fn lease_layer(&self, run_id: &str, lease_id: &str) -> Result<Option<String>>;

    /// The run's weights and settings.
    async fn run_info(&self, run_id: &str) -> Result<RunInfo>;

    /// Every planned filter of one layer of a run, in filter order, with its result if finished.
    async fn layer_filters(&self, run_id: &str, layer: &str) -> Result<Vec<FilterRecord>>;
}

/// The kind of database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend<'a> {
    /// The SQLite file's path (`sqlite://PATH`, `sqlite:///abs/path` or `sqlite:PATH`), with any
    /// `?options` dropped: the store sets its own.
    Sqlite(&'a str),
    Postgres,
}

/// Which database `url` names; an error says what a good URL looks like.
pub fn backend(url: &str) -> Result<Backend<'_>> {
    let bad = |reason: &str| Error::BadUrl {
        url: redact(url),
        reason: reason.into(),
    };
    if let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        match rest.split('?').next().unwrap_or_default() {
            "" => Err(bad("it names no file")),
            path => Ok(Backend::Sqlite(path)),
        }
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Backend::Postgres)
    } else {
        Err(bad("it names neither sqlite nor postgres"))
    }
}

/// Opens (creating if needed) the store named by `url` and brings its schema up to date:
/// `sqlite://PATH` (a file; `sqlite:///abs/path` for an absolute one) or `postgres://...`.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    Ok(match backend(url)? {
        Backend::Sqlite(path) => Arc::new(sqlite::SqliteStore::open(url, path).await?),
        Backend::Postgres => Arc::new(postgres::PostgresStore::connect(url).await?),
    })
}

/// For commands that only read: a SQLite file must exist already (opening it would create an
/// empty one). PostgreSQL URLs pass; the connection says whether the database is there.
pub fn require_existing(url: &str) -> Result<()> {
    match backend(url)? {
        Backend::Sqlite(path) if !std::path::Path::new(path).is_file() => Err(Error::BadUrl {
            url: url.to_string(),
            reason: format!(
                "there is no database file at {path}; `render` creates it (give the --db it used, \
                 or set VGG_ATLAS_DB; the default is {})",
                crate::standalone::DEFAULT_DB
            ),
        }),
        _ => Ok(()),
    }
}

/// The reason stored when a filter's lease expired on its last attempt.
fn expired_reason(attempts: i32) -> String {
    format!("lease expired {attempts} times (worker died or stalled?)")
}

/// Refuses NaN and Inf before anything is written: they would poison every view and mosaic.
fn check_finite(r: &Submission) -> Result<()> {
    let scores = [
        ("activation", r.activation),
        ("objective", r.objective),
        ("start activation", r.start_activation),
        ("seconds", r.seconds),
    ];
    let curve = r.curve.iter().map(|&v| ("curve", v));
    let border = r.border_ratio.map(|v| ("border ratio", v));
    let second = r.second_ascent.iter().flat_map(|s| {
        [
            ("first activation", s.first_activation),
            ("second activation", s.second_activation),
        ]
    });
    match scores
        .into_iter()
        .chain(curve)
        .chain(border)
        .chain(second)
        .find(|(_, v)| !v.is_finite())
    {
        None => Ok(()),
        Some((field, value)) => Err(Error::NonFinite {
            run_id: r.run_id.clone(),
            layer: r.layer.clone(),
            filter: r.filter,
            field,
            value,
        }),
    }
}

/// The curve as stored: a JSON array, readable from SQL (`json_each`, `json_array_elements`).
fn curve_json(curve: &[f32]) -> String {
    // Cannot fail: check_finite has refused NaN and Inf, the only floats JSON cannot hold.
    serde_json::to_string(curve).expect("a finite f32 array is valid JSON")
}

fn parse_curve(run_id: &str, layer: &str, filter: i32, json: &str) -> Result<Vec<f32>> {
    serde_json::from_str(json).map_err(|e| Error::Corrupt(format!(
        "the curve of run {run_id}, layer {layer}, filter {filter} is not a JSON array of numbers ({e}): {json:?}"
    )))
}

/// Checks a run's spec before anything is written.
fn check_spec(spec: &RunSpec) -> Result<()> {
    let invalid = |reason: String| Error::InvalidRun {
        run_id: spec.run_id.clone(),
        reason,
    };
    if spec.max_attempts < 1 {
        return Err(invalid(format!(
            "max_attempts is {}; it must be at least 1",
            spec.max_attempts
        )));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &spec.filters {
        if !seen.insert((&f.layer, f.filter)) {
            return Err(invalid(format!(
                "filter {} of layer {} is planned twice",
                f.filter, f.layer
            )));
        }
    }
    Ok(())
}

/// What a submission does, decided from the filter's row (shared by both backends so they agree).
enum SubmitPlan {
    Answer(SubmitOutcome),
    Retry,
    Fail(String),
    Record,
}

fn plan_submit(row: &SubmitRow, r: &Submission) -> SubmitPlan {
    if row.state == FilterState::Done.name() {
        return SubmitPlan::Answer(SubmitOutcome::Duplicate);
    }
    // Only the worker the lease was issued to may answer it: a lease id seen by another worker
    // (in a log, say) does not let that worker write results.
    if row.state != FilterState::Leased.name()
        || row.lease_id.as_deref() != Some(r.lease_id.as_str())
        || row.worker.as_deref() != Some(r.worker.as_str())
    {
        return SubmitPlan::Answer(SubmitOutcome::NotLeased);
    }
    match &r.failed_reason {
        Some(_) if row.attempts < row.max_attempts => SubmitPlan::Retry,
        Some(reason) => SubmitPlan::Fail(reason.clone()),
        None => SubmitPlan::Record,
    }
}

/// Most rows (or `IN` list entries) one statement of [`Store::submit_all`] carries: 16 values
/// a result row, far under either database's limit on bound values.
const ROWS_PER_STATEMENT: usize = 256;

/// A filter's lease state as [`Store::submit_all`] reads it, with its run's `max_attempts`.
#[derive(Debug, Clone, PartialEq)]
struct SubmitRow {
    state: String,
    lease_id: Option<String>,
    worker: Option<String>,
    attempts: i32,
    max_attempts: i32,
}

/// `(run_id, layer, filter)`: a planned filter's key.
type FilterKey = (String, String, i32);

/// The writes of one [`Store::submit_all`], planned from the rows it read once.
#[derive(Debug, Default)]
struct SubmitWrites<'a> {
    record: Vec<&'a Submission>,
    retry: Vec<&'a Submission>,
    fail: Vec<(&'a Submission, String)>,
}

impl SubmitWrites<'_> {
    /// The recorded filters, grouped by `(run_id, layer)` for one `UPDATE` per group.
    fn done_groups(&self) -> Vec<((&str, &str), Vec<i32>)> {
        let mut groups: std::collections::BTreeMap<(&str, &str), Vec<i32>> = Default::default();
        for r in &self.record {
            groups
                .entry((r.run_id.as_str(), r.layer.as_str()))
                .or_default()
                .push(r.filter);
        }
        groups.into_iter().collect()
    }
}

/// The order [`Store::submit_all`] takes submissions in: by filter key, so that PostgreSQL
/// locks rows in one order and two submissions that share filters cannot deadlock.
fn submit_order(submissions: &[Submission]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..submissions.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&submissions[a], &submissions[b]);
        (&a.run_id, &a.layer, a.filter).cmp(&(&b.run_id, &b.layer, b.filter))
    });
    order
}

/// The filters whose rows [`Store::submit_all`] reads, grouped by `(run_id, layer)`, each
/// group's filters ascending and without repeats; `skip` are the submissions already answered.
fn row_groups<'a>(
    submissions: &'a [Submission],
    order: &[usize],
    skip: &[Option<Result<SubmitOutcome>>],
) -> Vec<((&'a str, &'a str), Vec<i32>)> {
    let mut groups: Vec<((&str, &str), Vec<i32>)> = Vec::new();
    for &i in order.iter().filter(|&&i| skip[i].is_none()) {
        let r = &submissions[i];
        let key = (r.run_id.as_str(), r.layer.as_str());
        match groups.last_mut() {
            Some((k, filters)) if *k == key => {
                if filters.last() != Some(&r.filter) {
                    filters.push(r.filter);
                }
            }
            _ => groups.push((key, vec![r.filter])),
        }
    }
    groups
}

/// Decides every submission in `order` from the rows read, as if each were written before the
/// next is read: a second result for a filter recorded earlier in the same call is a duplicate.
/// Answers go into `outcomes` (those already there are left alone); the writes are returned.
fn plan_submissions<'a>(
    submissions: &'a [Submission],
    order: &[usize],
    rows: &mut std::collections::HashMap<FilterKey, SubmitRow>,
    outcomes: &mut [Option<Result<SubmitOutcome>>],
) -> SubmitWrites<'a> {
    let mut writes = SubmitWrites::default();
    for &i in order {
        if outcomes[i].is_some() {
            continue;
        }
        let r = &submissions[i];
        let key = (r.run_id.clone(), r.layer.clone(), r.filter);
        let Some(row) = rows.get_mut(&key) else {
            outcomes[i] = Some(Err(Error::UnknownFilter {
                run_id: r.run_id.clone(),
                layer: r.layer.clone(),
                filter: r.filter,
            }));
            continue;
        };
        let outcome = match plan_submit(row, r) {
            SubmitPlan::Answer(outcome) => outcome,
            SubmitPlan::Retry => {
                writes.retry.push(r);
                row.state = FilterState::Pending.name().to_string();
                (row.lease_id, row.worker) = (None, None);
                SubmitOutcome::Pending
            }
            SubmitPlan::Fail(reason) => {
                writes.fail.push((r, reason));
                row.state = FilterState::Failed.name().to_string();
                row.lease_id = None;
                SubmitOutcome::Failed
            }
            SubmitPlan::Record => {
                writes.record.push(r);
                row.state = FilterState::Done.name().to_string();
                SubmitOutcome::Recorded
            }
        };
        outcomes[i] = Some(Ok(outcome));
    }
    writes
}

/// The URL with its password blanked out, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_only_the_password() {
        assert_eq!(
            redact("postgres://atlas:secret@db:5432/atlas"),
            "postgres://atlas:***@db:5432/atlas"
        );
        assert_eq!(
            redact("postgres://atlas@db/atlas"),
            "postgres://atlas@db/atlas"
        );
        assert_eq!(redact("postgres://db/atlas"), "postgres://db/atlas");
    }

    #[test]
    fn curve_round_trips_through_json() {
        let curve = vec![0.0, 1.5, -2.25, 1e-7, 3.4e38];
        assert_eq!(
            parse_curve("r", "l", 0, &curve_json(&curve)).unwrap(),
            curve
        );
        assert_eq!(
            parse_curve("r", "l", 0, &curve_json(&[])).unwrap(),
            Vec::<f32>::new()
        );
        assert!(parse_curve("r", "l", 0, "[1,").is_err());
    }
}

/// SQL that reads the same in both dialects (SQLite accepts `$N` placeholders too).
/// [`sql::LEASABLE`] as a literal, for `concat!` into a backend's own statement.
macro_rules! leasable {
    () => {
        "(state = 'pending' OR (state = 'leased' AND lease_deadline_ms <= $2))"
    };
}
pub(crate) use leasable;

pub(crate) mod sql {
    pub const INSERT_RUN: &str =
        "INSERT INTO runs (run_id, weights_sha256, settings, max_attempts, created_at_ms)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (run_id) DO NOTHING";
    pub const SELECT_RUN: &str = "SELECT weights_sha256, settings FROM runs WHERE run_id = $1";
    pub const MAX_ATTEMPTS: &str = "SELECT max_attempts FROM runs WHERE run_id = $1";
    pub const RUNS: &str =
        "SELECT run_id, created_at_ms, settings FROM runs ORDER BY created_at_ms, run_id";

    /// A filter is leasable when pending, or leased with a deadline that has passed.
    pub const LEASABLE: &str = leasable!();

    /// Whether anything is [`LEASABLE`]: each half is one index seek (`filters_leasing`,
    /// `filters_expiry`), where the OR in one WHERE made SQLite walk the run's index entries,
    /// all of them once nothing is left to lease.
    pub const HAS_LEASABLE: &str = "SELECT EXISTS (SELECT 1 FROM filters WHERE run_id = $1 AND state = 'pending')
         OR EXISTS (SELECT 1 FROM filters WHERE run_id = $1 AND state = 'leased' AND lease_deadline_ms <= $2)";

    /// The layer to lease from: that of the first [`LEASABLE`] filter in plan order, the first
    /// pending one and the first expired one found apart (an index seek each) for the same
    /// reason as [`HAS_LEASABLE`].
    pub const FIRST_LEASABLE_LAYER: &str = "SELECT layer FROM (
             SELECT * FROM (SELECT layer, layer_index, filter FROM filters
                            WHERE run_id = $1 AND state = 'pending'
                            ORDER BY layer_index, filter LIMIT 1) pending
             UNION ALL
             SELECT * FROM (SELECT layer, layer_index, filter FROM filters
                            WHERE run_id = $1 AND state = 'leased' AND lease_deadline_ms <= $2
                            ORDER BY layer_index, filter LIMIT 1) expired
         ) first ORDER BY layer_index, filter LIMIT 1";

    /// Whether every filter of the run is finished: an index seek per unfinished state.
    pub const IS_FINISHED: &str =
        "SELECT NOT EXISTS (SELECT 1 FROM filters WHERE run_id = $1 AND state IN ('pending', 'leased'))";

    pub const FAIL_EXPIRED: &str = "UPDATE filters
         SET state = 'failed', failed_reason = $4, lease_id = NULL, lease_deadline_ms = NULL
         WHERE run_id = $1 AND layer = $2 AND filter = $3";

    pub const WORKER_LEASES: &str = "SELECT lease_id, layer, filter, seed FROM filters
         WHERE run_id = $1 AND worker = $2 AND state = 'leased' AND lease_id IS NOT NULL
         ORDER BY layer_index, filter";

    pub const HEARTBEAT: &str =
        "UPDATE filters SET lease_deadline_ms = $2 WHERE lease_id = $1 AND state = 'leased'";

    pub const RENEW_LEASES: &str = "UPDATE filters SET lease_deadline_ms = $2
         WHERE run_id = $1 AND state = 'leased' AND lease_deadline_ms < $2";

    pub const SUBMIT_RETRY: &str = "UPDATE filters
         SET state = 'pending', failed_reason = $4, lease_id = NULL, worker = NULL, lease_deadline_ms = NULL
         WHERE run_id = $1 AND layer = $2 AND filter = $3";
    pub const SUBMIT_FAIL: &str = "UPDATE filters
         SET state = 'failed', failed_reason = $4, worker = $5, lease_id = NULL, lease_deadline_ms = NULL
         WHERE run_id = $1 AND layer = $2 AND filter = $3";
    pub const INSERT_FILTER: &str =
        "INSERT INTO filters (run_id, layer, layer_index, filter, seed) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (run_id, layer, filter) DO NOTHING";
    pub const UNFINISHED_FILTERS: &str = "SELECT layer, filter FROM filters
         WHERE run_id = $1 AND state IN ('pending', 'leased') ORDER BY layer_index, filter";

    pub const PROGRESS: &str =
        "SELECT layer, layer_index, filters, done, pending, leased, failed, dead
         FROM layer_summary WHERE run_id = $1 ORDER BY layer_index, layer";
    pub const UNFINISHED: &str =
        "SELECT COUNT(*) FROM filters WHERE run_id = $1 AND state IN ('pending', 'leased')";
    pub const RUN_INFO: &str =
        "SELECT run_id, weights_sha256, settings, created_at_ms FROM runs WHERE run_id = $1";
    pub const LAYER_FILTERS: &str = "SELECT f.filter, f.state, f.attempts, f.failed_reason,
                r.activation, r.objective, r.start_activation, r.curve, r.seconds, r.dead, r.worker,
                r.png, r.finished_at_ms, r.retries, r.border_ratio
         FROM filters f
         LEFT JOIN results r ON r.run_id = f.run_id AND r.layer = f.layer AND r.filter = f.filter
         WHERE f.run_id = $1 AND f.layer = $2
         ORDER BY f.filter";
    pub const LEASE_LAYER: &str =
        "SELECT layer FROM filters WHERE run_id = $1 AND lease_id = $2 LIMIT 1";
}

/// Compares a stored run with the spec given to resume it.
fn check_resume(spec: &RunSpec, stored_weights: String, stored_settings: String) -> Result<()> {
    let mismatch = |what, stored, given: &str| Error::RunMismatch {
        run_id: spec.run_id.clone(),
        what,
        stored,
        given: given.to_string(),
    };
    if stored_weights != spec.weights_sha256 {
        return Err(mismatch(
            "weights sha256",
            stored_weights,
            &spec.weights_sha256,
        ));
    }
    if stored_settings != spec.settings_json {
        return Err(mismatch("settings", stored_settings, &spec.settings_json));
    }
    Ok(())
}

/// The columns of [`sql::LAYER_FILTERS`].
pub(crate) type LayerFilterRow = (
    i32,
    String,
    i32,
    Option<String>,
    Option<f32>,
    Option<f32>,
    Option<f32>,
    Option<String>,
    Option<f32>,
    Option<bool>,
    Option<String>,
    Option<Vec<u8>>,
    Option<i64>,
    Option<i32>,
    Option<f32>,
);

fn filter_record(run_id: &str, layer: &str, row: LayerFilterRow) -> Result<FilterRecord> {
    let (
        filter,
        state,
        attempts,
        failed_reason,
        activation,
        objective,
        start,
        curve,
        seconds,
        dead,
        worker,
        png,
        finished,
        retries,
        border_ratio,
    ) = row;
    let result = match (
        activation, objective, start, curve, seconds, dead, worker, png, finished, retries,
    ) {
        (
            Some(activation),
            Some(objective),
            Some(start_activation),
            Some(curve),
            Some(seconds),
            Some(dead),
            Some(worker),
            Some(png),
            Some(finished_at_ms),
            Some(retries),
        ) => Some(StoredResult {
            run_id: run_id.to_string(),
            layer: layer.to_string(),
            filter,
            activation,
            objective,
            start_activation,
            curve: parse_curve(run_id, layer, filter, &curve)?,
            seconds,
            dead,
            worker,
            png,
            finished_at_ms,
            retries: retries.max(0) as u32,
            border_ratio,
        }),
        (None, None, None, None, None, None, None, None, None, None) => None,
        _ => {
            return Err(Error::Corrupt(format!(
                "the result of run {run_id}, layer {layer}, filter {filter} has NULL columns"
            )))
        }
    };
    let state = state.parse::<FilterState>().map_err(|e| {
        Error::Corrupt(format!("run {run_id}, layer {layer}, filter {filter}: {e}"))
    })?;
    Ok(FilterRecord {
        filter,
        state,
        attempts,
        failed_reason,
        result,
    })
}

type ProgressRow = (String, i32, i64, i64, i64, i64, i64, i64);

fn layer_progress(row: ProgressRow) -> LayerProgress {
    let (layer, layer_index, total, done, pending, leased, failed, dead) = row;
    LayerProgress {
        layer,
        layer_index,
        total,
        done,
        pending,
        leased,
        failed,
        dead,
    }
}

/// Wall-clock time in unix milliseconds, the unit of every deadline and timestamp.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

//! The store suite: every test body below runs against SQLite and against PostgreSQL.
//!
//! PostgreSQL tests read the server's URL from `VGG_ATLAS_TEST_POSTGRES` (`.ci/run` starts one)
//! and each works in a fresh schema, so they run in parallel. Without the variable they fail
//! under CI and are skipped, with a line saying so, elsewhere.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::json;
use sqlx::{PgPool, SqlitePool};
use vgg_atlas_coordinator::store::{
    self, ExampleRow, ImageFilterRow, ImageOutcome, ImageSubmission, LayerProgress, Lease,
    PassProgress, PassSpec, PlannedFilter, RunSpec, Store, StoredResult, Submission, SubmitOutcome,
};
use vgg_atlas_coordinator::{query, Error};

/// One filter's stored result, read as the atlas reads it (through `layer_filters`).
#[async_trait::async_trait]
trait ResultOf {
    async fn result(
        &self,
        run_id: &str,
        layer: &str,
        filter: i32,
    ) -> vgg_atlas_coordinator::Result<Option<StoredResult>>;
}

#[async_trait::async_trait]
impl<S: Store + ?Sized> ResultOf for S {
    async fn result(
        &self,
        run_id: &str,
        layer: &str,
        filter: i32,
    ) -> vgg_atlas_coordinator::Result<Option<StoredResult>> {
        Ok(self
            .layer_filters(run_id, layer)
            .await?
            .into_iter()
            .find(|r| r.filter == filter)
            .and_then(|r| r.result))
    }
}

const POSTGRES_ENV: &str = "VGG_ATLAS_TEST_POSTGRES";
const MINUTE: i64 = 60_000;

/// A store on a fresh database, plus a plain connection to it for reading the views.
struct TestDb {
    store: Arc<dyn Store>,
    /// The URL the store was opened with (for `query`).
    url: String,
    pool: Pool,
    _dir: Option<tempfile::TempDir>,
    /// The PostgreSQL schema to drop when the test is done.
    schema: Option<String>,
}

enum Pool {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs the same SQL on either backend and decodes the rows into `$ty`.
macro_rules! fetch_all {
    ($db:expr, $ty:ty, $sql:expr $(, $bind:expr)* $(,)?) => {
        match &$db.pool {
            Pool::Sqlite(pool) => sqlx::query_as::<_, $ty>($sql)$(.bind($bind))*.fetch_all(pool).await,
            Pool::Postgres(pool) => sqlx::query_as::<_, $ty>($sql)$(.bind($bind))*.fetch_all(pool).await,
        }
        .expect($sql)
    };
}

impl TestDb {
    async fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("atlas.db");
        let url = format!("sqlite://{}", path.display());
        let store = store::connect(&url).await.unwrap();
        let pool = SqlitePool::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        TestDb {
            store,
            url,
            pool: Pool::Sqlite(pool),
            _dir: Some(dir),
            schema: None,
        }
    }

    /// `None` (after saying so) when no server is configured outside CI.
    async fn postgres() -> Option<TestDb> {
        let (url, schema) = fresh_postgres_schema().await?;
        let store = store::connect(&url).await.unwrap();
        let pool = PgPool::connect(&url).await.unwrap();
        Some(TestDb {
            store,
            url,
            pool: Pool::Postgres(pool),
            _dir: None,
            schema: Some(schema),
        })
    }

    async fn cleanup(self) {
        if let (Some(schema), Pool::Postgres(pool)) = (&self.schema, &self.pool) {
            sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
                .execute(pool)
                .await
                .unwrap();
        }
    }
}

/// The URL of a fresh, empty schema on the test server (its search path set to it) and the
/// schema's name; `None` (after saying so) when no server is configured outside CI.
async fn fresh_postgres_schema() -> Option<(String, String)> {
    let base = match std::env::var(POSTGRES_ENV) {
        Ok(url) if !url.is_empty() => url,
        _ if std::env::var_os("CI").is_some() => {
            panic!(
                "{POSTGRES_ENV} is not set under CI: .ci/run should start PostgreSQL and export it"
            )
        }
        _ => {
            eprintln!("skipped: set {POSTGRES_ENV}=postgres://USER:PASSWORD@HOST:PORT/DB to run the PostgreSQL store tests");
            return None;
        }
    };
    let schema = format!("store_test_{}", uuid::Uuid::new_v4().simple());
    let admin = PgPool::connect(&base).await.expect(POSTGRES_ENV);
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let separator = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{separator}options=-c%20search_path%3D{schema}");
    Some((url, schema))
}

/// Declares each test body once per backend: `sqlite::NAME` and `postgres::NAME`.
macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = super::TestDb::sqlite().await;
                    super::$name(&db).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some(db) = super::TestDb::postgres().await else { return };
                    super::$name(&db).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

store_tests!(
    create_or_resume_is_idempotent,
    a_whole_run_after_its_sample_adds_the_rest_and_keeps_the_sample,
    resume_with_other_weights_or_settings_is_refused,
    leases_take_one_layer_at_a_time_in_order,
    concurrent_lessees_never_share_a_filter,
    expired_lease_goes_to_another_worker,
    attempts_limit_fails_a_filter_with_the_reason,
    duplicate_and_late_submissions_are_recorded_once,
    stale_lease_submission_is_not_recorded,
    reported_failure_is_retried_then_fails_for_good,
    heartbeat_extends_the_lease_until_it_is_revoked,
    progress_counts_every_state,
    best_filters_ranks_the_strongest_first,
    layer_summary_and_failed_filters_views,
    non_finite_scores_are_refused,
    lease_layer_follows_the_lease_through_submit_and_expiry,
    query_reads_the_views_and_refuses_every_write,
    layer_filters_and_run_info_feed_the_atlas,
    a_lease_the_worker_never_heard_of_is_reclaimed,
    a_result_keeps_its_border_ratio,
    a_result_keeps_both_activations_of_a_second_ascent,
    layer_summary_has_the_median_weak_filters_and_border_ratios,
    an_examples_pass_keeps_each_filters_top_k,
    image_leases_expire_and_skip_an_image_after_its_last_attempt,
    a_pass_resumes_and_refuses_other_settings,
    concurrent_image_lessees_never_share_an_image,
    non_finite_example_activations_are_refused,
    a_leases_results_are_answered_one_by_one_in_one_transaction,
    one_call_answers_the_results_of_several_leases_as_if_each_were_written_in_turn,
    several_leases_in_one_call_are_served_in_turn_each_from_one_layer,
    nothing_is_leasable_once_every_filter_is_leased,
    leases_held_through_an_outage_are_renewed,
    an_examples_pass_renews_its_image_leases_before_it_leases_after_an_outage,
);

/// A pass of K = `top` over images `a.jpg`, `b.jpg`, ... (`n` of them).
async fn pass_with_images(db: &TestDb, top: i32, max_attempts: i32, n: usize) -> PassSpec {
    let spec = PassSpec {
        pass_id: format!("pass-{top}-{max_attempts}"),
        folder: "/data/photos".into(),
        weights_sha256: "w".into(),
        side: 224,
        top,
        max_attempts,
    };
    assert!(db.store.create_or_resume_pass(&spec).await.unwrap());
    let images: Vec<String> = (0..n)
        .map(|i| format!("{}.jpg", (b'a' + i as u8) as char))
        .collect();
    assert_eq!(
        db.store.add_images(&spec.pass_id, &images).await.unwrap(),
        n as u64
    );
    spec
}

/// An image's outcome with examples `(layer, filter, activation)`, one image filter per example.
fn examined(image: &str, examples: &[(&str, i32, f32)]) -> ImageSubmission {
    ImageSubmission {
        image: image.into(),
        sha256: format!("sha-{image}"),
        outcome: ImageOutcome::Done {
            examples: examples
                .iter()
                .map(|&(layer, filter, activation)| ExampleRow {
                    layer: layer.into(),
                    layer_index: 0,
                    filter,
                    activation,
                    y: 1,
                    x: 2,
                    crop_box: [0, 1, 3, 3],
                })
                .collect(),
            filters: examples
                .iter()
                .enumerate()
                .map(|(i, &(layer, filter, activation))| ImageFilterRow {
                    layer: layer.into(),
                    layer_index: 0,
                    filter,
                    activation,
                    rank: i as i32 + 1,
                })
                .collect(),
        },
    }
}

async fn an_examples_pass_keeps_each_filters_top_k(db: &TestDb) {
    let s = &db.store;
    let pass = pass_with_images(db, 2, 3, 5).await;
    let id = &pass.pass_id;
    let lease = s.lease_images(id, 2, 0, MINUTE).await.unwrap().unwrap();
    assert_eq!(lease.images, ["a.jpg", "b.jpg"]);
    let subs = [
        examined(
            "a.jpg",
            &[("block1_conv1", 0, 5.0), ("block1_conv1", 1, 1.0)],
        ),
        examined("b.jpg", &[("block1_conv1", 0, 3.0)]),
    ];
    assert_eq!(
        s.submit_images(id, &lease.lease_id, &subs, 1)
            .await
            .unwrap(),
        2
    );
    // A late duplicate of the same lease writes nothing.
    assert_eq!(
        s.submit_images(id, &lease.lease_id, &subs, 2)
            .await
            .unwrap(),
        0
    );
    let lease = s.lease_images(id, 2, 3, MINUTE).await.unwrap().unwrap();
    assert_eq!(lease.images, ["c.jpg", "d.jpg"]);
    let subs = [
        examined("c.jpg", &[("block1_conv1", 0, 4.0)]),
        examined(
            "d.jpg",
            &[("block1_conv1", 0, 1.0), ("block1_conv1", 1, 2.0)],
        ),
    ];
    assert_eq!(
        s.submit_images(id, &lease.lease_id, &subs, 4)
            .await
            .unwrap(),
        2
    );

    // K = 2: b (3.0) and d (1.0) fell out of filter 0's top; filter 1 keeps both of its.
    let top = fetch_all!(
        db,
        (i32, i64, String, f32, i32, i32, i32, i32),
        "SELECT filter, rank, image, activation, y, x, crop_width, crop_height FROM filter_examples
         WHERE pass_id = $1 AND layer = 'block1_conv1' ORDER BY filter, rank",
        id
    );
    assert_eq!(
        top,
        [
            (0, 1, "a.jpg".into(), 5.0, 1, 2, 3, 3),
            (0, 2, "c.jpg".into(), 4.0, 1, 2, 3, 3),
            (1, 1, "d.jpg".into(), 2.0, 1, 2, 3, 3),
            (1, 2, "a.jpg".into(), 1.0, 1, 2, 3, 3),
        ]
    );
    let mut bars = s.example_bars(id, 2).await.unwrap();
    bars.sort_by_key(|b| b.1);
    assert_eq!(
        bars,
        [
            ("block1_conv1".into(), 0, 4.0),
            ("block1_conv1".into(), 1, 1.0)
        ]
    );
    // Each image's filters, ranked as submitted, and its bytes' hash.
    let filters = fetch_all!(
        db,
        (i32, f32, i32),
        "SELECT filter, activation, rank FROM image_filters WHERE pass_id = $1 AND image = 'd.jpg'
         ORDER BY rank",
        id
    );
    assert_eq!(filters, [(0, 1.0, 1), (1, 2.0, 2)]);
    let sha = fetch_all!(
        db,
        (String,),
        "SELECT sha256 FROM images WHERE pass_id = $1 AND image = 'c.jpg'",
        id
    );
    assert_eq!(sha, [("sha-c.jpg".to_string(),)]);
    assert_eq!(
        s.pass_progress(id).await.unwrap(),
        PassProgress {
            images: 5,
            pending: 1,
            leased: 0,
            done: 4,
            skipped: 0
        }
    );

    // The crops: asked for image by image (the first 2 images that lack any), stored, and then
    // no longer asked for; an example that fell out of its top K is never asked for.
    assert_eq!(s.missing_crop_count(id).await.unwrap(), 4);
    let missing = s.missing_crops(id, 2).await.unwrap();
    let asked: Vec<(&str, i32)> = missing
        .iter()
        .map(|m| (m.image.as_str(), m.filter))
        .collect();
    assert_eq!(asked, [("a.jpg", 0), ("a.jpg", 1), ("c.jpg", 0)]);
    assert_eq!(missing[0].crop_box, [0, 1, 3, 3]);
    let made: Vec<_> = missing.into_iter().map(|m| (m, vec![9u8; 4])).collect();
    s.store_crops(id, &made).await.unwrap();
    let left = s.missing_crops(id, 10).await.unwrap();
    let left: Vec<(&str, i32)> = left.iter().map(|m| (m.image.as_str(), m.filter)).collect();
    assert_eq!(left, [("d.jpg", 1)]);
    assert_eq!(s.missing_crop_count(id).await.unwrap(), 1);
    let stored = s.layer_examples(id, "block1_conv1").await.unwrap();
    let crops: Vec<(i32, i64, Option<Vec<u8>>)> = stored
        .into_iter()
        .map(|e| (e.filter, e.rank, e.crop))
        .collect();
    assert_eq!(
        crops,
        [
            (0, 1, Some(vec![9; 4])),
            (0, 2, Some(vec![9; 4])),
            (1, 1, None),
            (1, 2, Some(vec![9; 4]))
        ]
    );
}

async fn image_leases_expire_and_skip_an_image_after_its_last_attempt(db: &TestDb) {
    let s = &db.store;
    let pass = pass_with_images(db, 3, 2, 3).await;
    let id = &pass.pass_id;
    let first = s.lease_images(id, 10, 0, MINUTE).await.unwrap().unwrap();
    assert_eq!(first.images.len(), 3);
    assert!(s
        .lease_images(id, 10, MINUTE - 1, MINUTE)
        .await
        .unwrap()
        .is_none());
    // A heartbeat keeps them; then they expire and are leased again (attempt 2 of 2).
    assert!(s
        .heartbeat_images(&first.lease_id, MINUTE - 1, MINUTE)
        .await
        .unwrap());
    assert!(s
        .lease_images(id, 10, MINUTE + 1, MINUTE)
        .await
        .unwrap()
        .is_none());
    let second = s
        .lease_images(id, 10, 3 * MINUTE, MINUTE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.images, first.images);
    // The first lease's results come too late: nothing is recorded.
    let late = [examined("a.jpg", &[("block1_conv1", 0, 1.0)])];
    assert_eq!(
        s.submit_images(id, &first.lease_id, &late, 3 * MINUTE)
            .await
            .unwrap(),
        0
    );
    assert!(!s
        .heartbeat_images(&first.lease_id, 3 * MINUTE, MINUTE)
        .await
        .unwrap());
    // One image is reported unreadable; the other two expire on their last attempt.
    let skipped = [ImageSubmission {
        image: "b.jpg".into(),
        sha256: "sha-b".into(),
        outcome: ImageOutcome::Skipped {
            reason: "cannot decode: truncated".into(),
        },
    }];
    assert_eq!(
        s.submit_images(id, &second.lease_id, &skipped, 3 * MINUTE)
            .await
            .unwrap(),
        1
    );
    assert!(s
        .lease_images(id, 10, 5 * MINUTE, MINUTE)
        .await
        .unwrap()
        .is_none());
    let p = s.pass_progress(id).await.unwrap();
    assert_eq!(
        (p.images, p.skipped, p.pending, p.leased, p.done),
        (3, 3, 0, 0, 0)
    );
    let reasons = s.skipped_images(id).await.unwrap();
    assert_eq!(
        reasons[1],
        ("b.jpg".into(), Some("cannot decode: truncated".into()))
    );
    let expired = reasons[0].1.as_deref().unwrap();
    assert!(expired.contains("expired 2 times"), "{expired}");
    assert!(fetch_all!(
        db,
        (i32,),
        "SELECT filter FROM examples WHERE pass_id = $1",
        id
    )
    .is_empty());
}

async fn a_pass_resumes_and_refuses_other_settings(db: &TestDb) {
    let s = &db.store;
    let pass = pass_with_images(db, 9, 3, 4).await;
    assert!(!s.create_or_resume_pass(&pass).await.unwrap());
    // The same images again add nothing; one more adds one.
    let again: Vec<String> = ["a.jpg", "b.jpg", "e.jpg"].map(String::from).to_vec();
    assert_eq!(s.add_images(&pass.pass_id, &again).await.unwrap(), 1);
    for other in [
        PassSpec {
            top: 5,
            ..pass.clone()
        },
        PassSpec {
            side: 128,
            ..pass.clone()
        },
        PassSpec {
            folder: "/elsewhere".into(),
            ..pass.clone()
        },
        PassSpec {
            weights_sha256: "v".into(),
            ..pass.clone()
        },
    ] {
        let e = s.create_or_resume_pass(&other).await.unwrap_err();
        assert!(matches!(e, Error::RunMismatch { .. }), "{e}");
    }
    assert_eq!(s.passes().await.unwrap(), [pass]);
    let e = s
        .lease_images("no-such-pass", 4, 0, MINUTE)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::UnknownRun(_)), "{e}");
}

async fn concurrent_image_lessees_never_share_an_image(db: &TestDb) {
    let pass = pass_with_images(db, 9, 3, 26).await;
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let (s, id) = (db.store.clone(), pass.pass_id.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                while let Some(l) = s.lease_images(&id, 3, 0, MINUTE).await.unwrap() {
                    mine.extend(l.images);
                }
                mine
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!((all.len(), distinct.len()), (26, 26));
}

async fn non_finite_example_activations_are_refused(db: &TestDb) {
    let s = &db.store;
    let pass = pass_with_images(db, 2, 3, 1).await;
    let lease = s
        .lease_images(&pass.pass_id, 1, 0, MINUTE)
        .await
        .unwrap()
        .unwrap();
    let bad = [examined("a.jpg", &[("block1_conv1", 0, f32::NAN)])];
    let e = s
        .submit_images(&pass.pass_id, &lease.lease_id, &bad, 1)
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    let p = s.pass_progress(&pass.pass_id).await.unwrap();
    assert_eq!((p.leased, p.done), (1, 0));
}

/// A run over `layers` = `[(name, filter count)]`, layer_index in the order given.
fn spec(run_id: &str, layers: &[(&str, i32)], max_attempts: i32) -> RunSpec {
    let filters = layers
        .iter()
        .enumerate()
        .flat_map(|(index, &(layer, count))| {
            (0..count).map(move |filter| PlannedFilter {
                layer: layer.to_string(),
                layer_index: index as i32,
                filter,
                seed: seed(index as i32, filter),
            })
        })
        .collect();
    RunSpec {
        run_id: run_id.to_string(),
        weights_sha256: "ab".repeat(32),
        settings_json: r#"{"size":32,"steps":4}"#.to_string(),
        max_attempts,
        filters,
    }
}

fn seed(layer_index: i32, filter: i32) -> i64 {
    1_000_000 + 1000 * layer_index as i64 + filter as i64
}

/// A successful result for `filter` of `lease`, submitted by `worker`.
fn outcome(lease: &Lease, filter: i32, worker: &str, activation: f32) -> Submission {
    Submission {
        run_id: lease.run_id.clone(),
        layer: lease.layer.clone(),
        filter,
        lease_id: lease.lease_id.clone(),
        worker: worker.to_string(),
        activation,
        objective: activation - 0.5,
        start_activation: 0.25,
        curve: vec![0.25, activation / 2.0, activation],
        seconds: 1.5,
        dead: false,
        failed_reason: None,
        retries: 0,
        png: format!("png of {filter} by {worker}").into_bytes(),
        border_ratio: Some(1.0),
        second_ascent: None,
    }
}

fn failure(lease: &Lease, filter: i32, worker: &str, reason: &str) -> Submission {
    Submission {
        failed_reason: Some(reason.to_string()),
        retries: 0,
        border_ratio: None,
        ..outcome(lease, filter, worker, 0.0)
    }
}

fn filter_ids(lease: &Lease) -> Vec<i32> {
    lease.filters.iter().map(|&(filter, _)| filter).collect()
}

fn layer<'a>(progress: &'a [LayerProgress], name: &str) -> &'a LayerProgress {
    progress.iter().find(|p| p.layer == name).unwrap()
}

async fn create_or_resume_is_idempotent(db: &TestDb) {
    let s = &db.store;
    let run = spec("run-1", &[("block1_conv1", 4), ("block1_conv2", 3)], 3);
    assert!(
        s.create_or_resume_run(&run).await.unwrap(),
        "first call creates the run"
    );

    let lease = s.lease("run-1", "w1", 1, 0, MINUTE).await.unwrap().unwrap();
    assert_eq!(
        s.submit(&outcome(&lease, 0, "w1", 2.0), 10).await.unwrap(),
        SubmitOutcome::Recorded
    );

    assert!(
        !s.create_or_resume_run(&run).await.unwrap(),
        "second call resumes"
    );
    let progress = s.progress("run-1").await.unwrap();
    assert_eq!(progress.len(), 2);
    assert_eq!(
        (progress[0].layer.as_str(), progress[0].total),
        ("block1_conv1", 4)
    );
    assert_eq!(
        (progress[1].layer.as_str(), progress[1].total),
        ("block1_conv2", 3)
    );
    assert_eq!(
        progress[0].done, 1,
        "resuming keeps finished filters finished"
    );

    let runs = s.runs().await.unwrap();
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].0, "run-1");
    assert_eq!(runs[0].2, run.settings_json);
    assert!(
        runs[0].1 > 1_600_000_000_000,
        "created_at_ms is unix milliseconds"
    );
}

async fn a_whole_run_after_its_sample_adds_the_rest_and_keeps_the_sample(db: &TestDb) {
    let s = &db.store;
    let whole = spec("run-1", &[("block1_conv1", 4), ("block1_conv2", 3)], 3);
    let mut sample = whole.clone();
    sample.filters.retain(|f| f.filter == 0);
    assert!(s.create_or_resume_run(&sample).await.unwrap());
    assert_eq!(
        s.unfinished_filters("run-1").await.unwrap(),
        [
            ("block1_conv1".to_string(), 0),
            ("block1_conv2".to_string(), 0)
        ]
    );
    for _ in 0..2 {
        let l = s.lease("run-1", "w1", 4, 0, MINUTE).await.unwrap().unwrap();
        assert_eq!(filter_ids(&l), [0], "only the sample is planned");
        s.submit(&outcome(&l, 0, "w1", 2.0), 10).await.unwrap();
    }
    assert!(
        s.is_finished("run-1").await.unwrap(),
        "the sample is the whole plan"
    );
    let before = s.layer_filters("run-1", "block1_conv1").await.unwrap();

    assert!(
        !s.create_or_resume_run(&whole).await.unwrap(),
        "the whole run resumes the sample's run"
    );
    assert!(!s.is_finished("run-1").await.unwrap());
    let progress = s.progress("run-1").await.unwrap();
    assert_eq!(
        progress
            .iter()
            .map(|p| (p.total, p.done))
            .collect::<Vec<_>>(),
        [(4, 1), (3, 1)]
    );
    let after = s.layer_filters("run-1", "block1_conv1").await.unwrap();
    let kept = after.iter().find(|r| r.filter == 0).unwrap();
    assert_eq!(
        kept.attempts, before[0].attempts,
        "the sample's filter was not leased again"
    );
    assert_eq!(
        kept.result
            .as_ref()
            .map(|r| (r.activation, r.finished_at_ms, r.png.clone())),
        before[0]
            .result
            .as_ref()
            .map(|r| (r.activation, r.finished_at_ms, r.png.clone())),
        "the sample's result is unchanged"
    );
    let l = s.lease("run-1", "w1", 8, 0, MINUTE).await.unwrap().unwrap();
    assert_eq!(
        filter_ids(&l),
        [1, 2, 3],
        "only the filters beyond the sample are leased"
    );
    let seeds: Vec<i64> = l.filters.iter().map(|&(_, seed)| seed).collect();
    assert_eq!(seeds, [seed(0, 1), seed(0, 2), seed(0, 3)]);
    // Resuming the whole run again adds nothing.
    assert!(!s.create_or_resume_run(&whole).await.unwrap());
    assert_eq!(s.progress("run-1").await.unwrap()[0].total, 4);
}

async fn resume_with_other_weights_or_settings_is_refused(db: &TestDb) {
    let s = &db.store;
    let run = spec("run-1", &[("block1_conv1", 2)], 3);
    s.create_or_resume_run(&run).await.unwrap();

    let other_weights = RunSpec {
        weights_sha256: "cd".repeat(32),
        ..run.clone()
    };
    let err = s.create_or_resume_run(&other_weights).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::RunMismatch {
                what: "weights sha256",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("run-1"), "{err}");

    let other_settings = RunSpec {
        settings_json: r#"{"size":64,"steps":4}"#.to_string(),
        ..run.clone()
    };
    let err = s.create_or_resume_run(&other_settings).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::RunMismatch {
                what: "settings",
                ..
            }
        ),
        "{err}"
    );

    let mut twice = spec("run-2", &[("block1_conv1", 2)], 3);
    twice.filters.push(twice.filters[0].clone());
    let err = s.create_or_resume_run(&twice).await.unwrap_err();
    assert!(matches!(err, Error::InvalidRun { .. }), "{err}");
    assert!(matches!(
        s.progress("run-2").await.unwrap_err(),
        Error::UnknownRun(_)
    ));
    assert_eq!(
        s.runs().await.unwrap().len(),
        1,
        "refused runs leave nothing behind"
    );
}

async fn leases_take_one_layer_at_a_time_in_order(db: &TestDb) {
    let s = &db.store;
    let mut run = spec("run-1", &[("block1_conv1", 5), ("block1_conv2", 3)], 3);
    run.filters.reverse(); // plan order must not matter: layer_index and filter do
    s.create_or_resume_run(&run).await.unwrap();

    let first = s
        .lease("run-1", "w1", 3, 1000, MINUTE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.layer, "block1_conv1");
    assert_eq!(
        first.filters,
        vec![(0, seed(0, 0)), (1, seed(0, 1)), (2, seed(0, 2))]
    );
    assert_eq!(first.lease_deadline_ms, 1000 + MINUTE);

    let second = s
        .lease("run-1", "w2", 3, 1000, MINUTE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(second.layer, "block1_conv1");
    assert_eq!(
        filter_ids(&second),
        vec![3, 4],
        "a lease never spans two layers"
    );
    assert_ne!(first.lease_id, second.lease_id);

    let third = s
        .lease("run-1", "w3", 3, 1000, MINUTE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(third.layer, "block1_conv2");
    assert_eq!(
        third.filters,
        vec![(0, seed(1, 0)), (1, seed(1, 1)), (2, seed(1, 2))]
    );

    assert_eq!(s.lease("run-1", "w4", 3, 1000, MINUTE).await.unwrap(), None);
    assert_eq!(
        layer(&s.progress("run-1").await.unwrap(), "block1_conv1").leased,
        5
    );
}

async fn concurrent_lessees_never_share_a_filter(db: &TestDb) {
    let layers = [
        ("block1_conv1", 20),
        ("block1_conv2", 20),
        ("block2_conv1", 20),
    ];
    db.store
        .create_or_resume_run(&spec("run-1", &layers, 3))
        .await
        .unwrap();

    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let s = db.store.clone();
            tokio::spawn(async move {
                let mut leases = Vec::new();
                while let Some(lease) = s
                    .lease("run-1", &format!("w{w}"), 4, 1000, MINUTE)
                    .await
                    .unwrap()
                {
                    leases.push(lease);
                }
                leases
            })
        })
        .collect();
    let mut leases = Vec::new();
    for task in tasks {
        leases.extend(task.await.unwrap());
    }

    let mut taken = HashSet::new();
    for lease in &leases {
        assert!(!lease.filters.is_empty() && lease.filters.len() <= 4);
        for &(filter, _) in &lease.filters {
            assert!(
                taken.insert((lease.layer.clone(), filter)),
                "{} {filter} leased twice",
                lease.layer
            );
        }
    }
    assert_eq!(taken.len(), 60, "every filter leased exactly once");
    let ids: HashSet<_> = leases.iter().map(|l| &l.lease_id).collect();
    assert_eq!(ids.len(), leases.len(), "lease ids are unique");
    let progress = db.store.progress("run-1").await.unwrap();
    assert!(progress.iter().all(|p| p.leased == 20 && p.pending == 0));
}

async fn expired_lease_goes_to_another_worker(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 2)], 3))
        .await
        .unwrap();
    let dead = s.lease("run-1", "dies", 8, 0, 1000).await.unwrap().unwrap();
    assert_eq!(filter_ids(&dead), vec![0, 1]);

    assert_eq!(
        s.lease("run-1", "w2", 8, 999, 1000).await.unwrap(),
        None,
        "not expired yet"
    );
    let again = s
        .lease("run-1", "w2", 8, 1000, 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.filters, dead.filters, "same filters, same seeds");
    assert_ne!(again.lease_id, dead.lease_id);
    assert_eq!(again.lease_deadline_ms, 2000);

    for filter in [0, 1] {
        assert_eq!(
            s.submit(&outcome(&again, filter, "w2", 3.0), 1500)
                .await
                .unwrap(),
            SubmitOutcome::Recorded
        );
    }
    assert!(s.is_finished("run-1").await.unwrap());
    assert_eq!(
        s.result("run-1", "block1_conv1", 1)
            .await
            .unwrap()
            .unwrap()
            .worker,
        "w2"
    );
}

async fn attempts_limit_fails_a_filter_with_the_reason(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 2)], 2))
        .await
        .unwrap();
    let a = s.lease("run-1", "w1", 1, 0, 1000).await.unwrap().unwrap();
    let b = s.lease("run-1", "w2", 1, 0, 1000).await.unwrap().unwrap();
    assert_eq!((filter_ids(&a), filter_ids(&b)), (vec![0], vec![1]));
    assert_eq!(
        s.submit(&outcome(&b, 1, "w2", 1.0), 500).await.unwrap(),
        SubmitOutcome::Recorded
    );

    // Filter 0's workers keep dying: attempt 2 at t=1000, then its last lease expires too.
    let again = s
        .lease("run-1", "w3", 1, 1000, 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(filter_ids(&again), vec![0]);
    assert_eq!(s.lease("run-1", "w4", 1, 2000, 1000).await.unwrap(), None);

    let progress = s.progress("run-1").await.unwrap();
    assert_eq!(
        (progress[0].failed, progress[0].done, progress[0].leased),
        (1, 1, 0)
    );
    assert!(
        s.is_finished("run-1").await.unwrap(),
        "a failed filter is finished"
    );
    let failed = fetch_all!(
        db,
        (String, i32, String, i32, String),
        "SELECT layer, filter, status, attempts, reason FROM failed_filters WHERE run_id = $1",
        "run-1"
    );
    assert_eq!(
        failed,
        vec![(
            "block1_conv1".to_string(),
            0,
            "failed".to_string(),
            2,
            "lease expired 2 times (worker died or stalled?)".to_string()
        )]
    );
}

async fn duplicate_and_late_submissions_are_recorded_once(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 1)], 3))
        .await
        .unwrap();
    let slow = s.lease("run-1", "slow", 1, 0, 1000).await.unwrap().unwrap();
    let fast = s
        .lease("run-1", "fast", 1, 1000, 1000)
        .await
        .unwrap()
        .unwrap();

    assert_eq!(
        s.submit(&outcome(&fast, 0, "fast", 5.0), 1600)
            .await
            .unwrap(),
        SubmitOutcome::Recorded
    );
    // The slow worker whose lease expired finally reports, and the fast one retries its submit.
    assert_eq!(
        s.submit(&outcome(&slow, 0, "slow", 9.0), 1700)
            .await
            .unwrap(),
        SubmitOutcome::Duplicate
    );
    assert_eq!(
        s.submit(&outcome(&fast, 0, "fast", 7.0), 1800)
            .await
            .unwrap(),
        SubmitOutcome::Duplicate
    );

    let stored = s.result("run-1", "block1_conv1", 0).await.unwrap().unwrap();
    assert_eq!(
        (stored.activation, stored.finished_at_ms),
        (5.0, 1600),
        "first result kept"
    );
    assert_eq!(stored.worker, "fast");
    assert_eq!(stored.png, b"png of 0 by fast");
    assert_eq!(stored.curve, vec![0.25, 2.5, 5.0]);
    assert_eq!(
        (stored.objective, stored.start_activation, stored.seconds),
        (4.5, 0.25, 1.5)
    );
    let rows = fetch_all!(
        db,
        (i64,),
        "SELECT COUNT(*) FROM results WHERE run_id = $1",
        "run-1"
    );
    assert_eq!(rows, vec![(1,)]);
}

async fn stale_lease_submission_is_not_recorded(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 1)], 3))
        .await
        .unwrap();
    let stale = s.lease("run-1", "slow", 1, 0, 1000).await.unwrap().unwrap();
    let current = s
        .lease("run-1", "fast", 1, 1000, 1000)
        .await
        .unwrap()
        .unwrap();

    // The expired lease reports before the current holder: refused, nothing written.
    assert_eq!(
        s.submit(&outcome(&stale, 0, "slow", 9.0), 1100)
            .await
            .unwrap(),
        SubmitOutcome::NotLeased
    );
    assert_eq!(s.result("run-1", "block1_conv1", 0).await.unwrap(), None);
    let failed = failure(&stale, 0, "slow", "out of memory");
    assert_eq!(
        s.submit(&failed, 1100).await.unwrap(),
        SubmitOutcome::NotLeased
    );
    assert_eq!(
        s.progress("run-1").await.unwrap()[0].leased,
        1,
        "still leased to the current holder"
    );

    let forged = Lease {
        lease_id: "no-such-lease".into(),
        ..current.clone()
    };
    assert_eq!(
        s.submit(&outcome(&forged, 0, "x", 1.0), 1100)
            .await
            .unwrap(),
        SubmitOutcome::NotLeased
    );
    // The current lease id, sent by another worker: refused, nothing written.
    assert_eq!(
        s.submit(&outcome(&current, 0, "slow", 9.0), 1100)
            .await
            .unwrap(),
        SubmitOutcome::NotLeased
    );
    assert_eq!(s.result("run-1", "block1_conv1", 0).await.unwrap(), None);
    assert_eq!(
        s.submit(&outcome(&current, 0, "fast", 2.0), 1200)
            .await
            .unwrap(),
        SubmitOutcome::Recorded
    );
    let err = s
        .submit(&outcome(&current, 99, "fast", 2.0), 1200)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::UnknownFilter { filter: 99, .. }),
        "{err}"
    );
}

async fn lease_layer_follows_the_lease_through_submit_and_expiry(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec(
        "run-1",
        &[("block1_conv1", 2), ("block2_conv1", 2)],
        3,
    ))
    .await
    .unwrap();
    let first = s.lease("run-1", "a", 2, 0, 1000).await.unwrap().unwrap();
    let second = s.lease("run-1", "b", 2, 0, 1000).await.unwrap().unwrap();
    assert_eq!(
        (first.layer.as_str(), second.layer.as_str()),
        ("block1_conv1", "block2_conv1")
    );
    assert_eq!(
        s.lease_layer("run-1", &first.lease_id)
            .await
            .unwrap()
            .as_deref(),
        Some("block1_conv1")
    );
    assert_eq!(
        s.lease_layer("run-1", &second.lease_id)
            .await
            .unwrap()
            .as_deref(),
        Some("block2_conv1")
    );
    assert_eq!(s.lease_layer("run-1", "no-such-lease").await.unwrap(), None);
    assert_eq!(
        s.lease_layer("other-run", &first.lease_id).await.unwrap(),
        None
    );

    // A finished filter keeps its lease id, so a duplicate still finds its layer...
    s.submit(&outcome(&first, 0, "a", 1.0), 10).await.unwrap();
    s.submit(&outcome(&first, 1, "a", 1.0), 10).await.unwrap();
    assert_eq!(
        s.lease_layer("run-1", &first.lease_id)
            .await
            .unwrap()
            .as_deref(),
        Some("block1_conv1")
    );
    // ...while a lease that expired and was re-issued holds nothing any more.
    let again = s.lease("run-1", "c", 2, 5000, 1000).await.unwrap().unwrap();
    assert_eq!(filter_ids(&again), filter_ids(&second));
    assert_eq!(
        s.lease_layer("run-1", &second.lease_id).await.unwrap(),
        None
    );
    assert_eq!(
        s.lease_layer("run-1", &again.lease_id)
            .await
            .unwrap()
            .as_deref(),
        Some("block2_conv1")
    );
}

async fn reported_failure_is_retried_then_fails_for_good(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 1)], 2))
        .await
        .unwrap();
    let first = s.lease("run-1", "w1", 1, 0, MINUTE).await.unwrap().unwrap();
    let retry = s
        .submit(&failure(&first, 0, "w1", "CUDA out of memory"), 10)
        .await
        .unwrap();
    assert_eq!(retry, SubmitOutcome::Pending);
    let progress = s.progress("run-1").await.unwrap();
    assert_eq!(
        (progress[0].pending, progress[0].leased, progress[0].failed),
        (1, 0, 0)
    );
    assert!(
        !s.heartbeat(&first.lease_id, 20, MINUTE).await.unwrap(),
        "a failed-back lease holds nothing"
    );

    let second = s
        .lease("run-1", "w2", 1, 20, MINUTE)
        .await
        .unwrap()
        .unwrap();
    let failed = s
        .submit(
            &failure(&second, 0, "w2", "NaN at step 3 even with the fallback"),
            30,
        )
        .await
        .unwrap();
    assert_eq!(failed, SubmitOutcome::Failed);
    assert_eq!(s.lease("run-1", "w3", 1, 40, MINUTE).await.unwrap(), None);
    assert!(s.is_finished("run-1").await.unwrap());
    assert_eq!(
        s.result("run-1", "block1_conv1", 0).await.unwrap(),
        None,
        "a failure stores no image"
    );

    let rows = fetch_all!(
        db,
        (String, i32, String),
        "SELECT status, attempts, reason FROM failed_filters WHERE run_id = $1",
        "run-1"
    );
    assert_eq!(
        rows,
        vec![(
            "failed".into(),
            2,
            "NaN at step 3 even with the fallback".into()
        )]
    );
}

async fn leases_held_through_an_outage_are_renewed(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 4)], 3))
        .await
        .unwrap();
    s.create_or_resume_run(&spec("run-2", &[("block1_conv1", 1)], 3))
        .await
        .unwrap();
    // Filters 0-1 leased until 1000 (0 then submitted), 2 until 9000; run-2's until 1000.
    let a = s.lease("run-1", "w1", 2, 0, 1000).await.unwrap().unwrap();
    s.submit(&outcome(&a, 0, "w1", 1.0), 100).await.unwrap();
    let late = s.lease("run-1", "w2", 1, 0, 9000).await.unwrap().unwrap();
    assert_eq!(filter_ids(&late), vec![2]);
    let other = s.lease("run-2", "w3", 1, 0, 1000).await.unwrap().unwrap();

    // Back at 5000 after an outage: renewed to 6000 (filter 1; filter 2's deadline is later).
    assert_eq!(s.renew_leases("run-1", 6000).await.unwrap(), 1);
    let taken = s
        .lease("run-1", "w4", 4, 5999, 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(filter_ids(&taken), vec![3], "only the pending filter");
    let retaken = s
        .lease("run-1", "w4", 4, 6000, 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(filter_ids(&retaken), vec![1], "expired at 6000");
    assert_eq!(s.lease("run-1", "w4", 4, 6998, 1000).await.unwrap(), None);
    // Another run's leases are its own.
    let again = s
        .lease("run-2", "w5", 1, 1000, 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(filter_ids(&again), filter_ids(&other));
}

async fn an_examples_pass_renews_its_image_leases_before_it_leases_after_an_outage(db: &TestDb) {
    use vgg_atlas_coordinator::health::StoreHealth;
    let s = &db.store;
    let outage = || Error::Database(sqlx::Error::PoolTimedOut);
    // Two passes of 4 images: in each, a worker leased a.jpg and b.jpg before the outage, and
    // its lease ran out during it (no heartbeat could renew it).
    let kept = pass_with_images(db, 1, 3, 4).await;
    let plain = pass_with_images(db, 2, 3, 4).await;
    let now = store::now_ms();
    let mut held = Vec::new();
    for pass in [&kept, &plain] {
        let l = s.lease_images(&pass.pass_id, 2, now - 10_000, 1000).await;
        let l = l.unwrap().unwrap();
        assert_eq!(l.images, ["a.jpg", "b.jpg"]);
        held.push(l);
    }

    // The store answers again; the first call to succeed is one that leases images.
    let health = StoreHealth::keeping_image_leases(s.clone(), &kept.pass_id, 60_000);
    health.failed(&outage());
    let lease = || s.lease_images(&kept.pass_id, 4, store::now_ms(), 60_000);
    let next = health.patiently(true, lease).await.unwrap().unwrap();
    assert_eq!(
        next.images,
        ["c.jpg", "d.jpg"],
        "only the images no worker holds"
    );
    assert!(
        !health.is_down(),
        "the outage ended with the leases renewed"
    );
    assert!(
        s.heartbeat_images(&held[0].lease_id, store::now_ms(), 60_000)
            .await
            .unwrap(),
        "the worker's lease is still its own"
    );

    // Without the renewal, that call takes the worker's images.
    let health = StoreHealth::default();
    health.failed(&outage());
    let lease = || s.lease_images(&plain.pass_id, 4, store::now_ms(), 60_000);
    let taken = health.patiently(true, lease).await.unwrap().unwrap();
    assert_eq!(taken.images, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]);
    assert!(!s
        .heartbeat_images(&held[1].lease_id, store::now_ms(), 60_000)
        .await
        .unwrap());
}

async fn heartbeat_extends_the_lease_until_it_is_revoked(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 2)], 3))
        .await
        .unwrap();
    let a = s.lease("run-1", "w1", 2, 0, 1000).await.unwrap().unwrap();

    assert!(s.heartbeat(&a.lease_id, 900, 1000).await.unwrap());
    assert_eq!(
        s.lease("run-1", "w2", 2, 1500, 1000).await.unwrap(),
        None,
        "extended to 1900"
    );
    assert!(!s.heartbeat("no-such-lease", 900, 1000).await.unwrap());

    // The holder stops heartbeating; once its deadline passes, another worker takes over.
    let b = s
        .lease("run-1", "w2", 2, 1900, 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(filter_ids(&b), vec![0, 1]);
    assert!(
        !s.heartbeat(&a.lease_id, 2000, 1000).await.unwrap(),
        "revoked"
    );
    assert!(s.heartbeat(&b.lease_id, 2000, 1000).await.unwrap());

    // A lease holds its filters until it has submitted all of them.
    s.submit(&outcome(&b, 0, "w2", 1.0), 2100).await.unwrap();
    assert!(s.heartbeat(&b.lease_id, 2200, 1000).await.unwrap());
    s.submit(&outcome(&b, 1, "w2", 1.0), 2300).await.unwrap();
    assert!(!s.heartbeat(&b.lease_id, 2400, 1000).await.unwrap());
}

async fn progress_counts_every_state(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec(
        "run-1",
        &[("block1_conv1", 4), ("block1_conv2", 2)],
        1,
    ))
    .await
    .unwrap();
    assert!(!s.is_finished("run-1").await.unwrap());
    let lease = s.lease("run-1", "w1", 4, 0, MINUTE).await.unwrap().unwrap();
    assert_eq!(
        s.submit(&outcome(&lease, 0, "w1", 2.0), 10).await.unwrap(),
        SubmitOutcome::Recorded
    );
    let dead = Submission {
        dead: true,
        ..outcome(&lease, 1, "w1", 0.0)
    };
    assert_eq!(s.submit(&dead, 10).await.unwrap(), SubmitOutcome::Recorded);
    assert_eq!(
        s.submit(&failure(&lease, 2, "w1", "oom"), 10)
            .await
            .unwrap(),
        SubmitOutcome::Failed
    );

    let progress = s.progress("run-1").await.unwrap();
    let expect =
        |layer: &str, layer_index, total, done, pending, leased, failed, dead| LayerProgress {
            layer: layer.to_string(),
            layer_index,
            total,
            done,
            pending,
            leased,
            failed,
            dead,
        };
    assert_eq!(
        progress,
        vec![
            expect("block1_conv1", 0, 4, 2, 0, 1, 1, 1),
            expect("block1_conv2", 1, 2, 0, 2, 0, 0, 0)
        ]
    );
    assert!(!s.is_finished("run-1").await.unwrap());

    s.submit(&outcome(&lease, 3, "w1", 1.0), 20).await.unwrap();
    let last = s
        .lease("run-1", "w1", 4, 30, MINUTE)
        .await
        .unwrap()
        .unwrap();
    for filter in filter_ids(&last) {
        s.submit(&outcome(&last, filter, "w1", 1.0), 40)
            .await
            .unwrap();
    }
    assert!(s.is_finished("run-1").await.unwrap());
    assert!(matches!(
        s.is_finished("run-9").await.unwrap_err(),
        Error::UnknownRun(_)
    ));
}

/// A filter's (activation, border ratio); `None`: leave it leased.
type Outcome = Option<(f32, Option<f32>)>;

/// Leases everything and records `activations[layer][filter]` (`None`: leave it leased).
async fn finish(s: &Arc<dyn Store>, run: &RunSpec, activations: &[&[Option<f32>]]) {
    let results: Vec<Vec<Outcome>> = activations
        .iter()
        .map(|layer| layer.iter().map(|a| a.map(|a| (a, Some(1.0)))).collect())
        .collect();
    let results: Vec<&[Outcome]> = results.iter().map(Vec::as_slice).collect();
    finish_with(s, run, &results).await;
}

/// Leases everything and records `results[layer][filter]` = (activation, border ratio) (`None`:
/// leave it leased). A filter whose activation is 0 is dead.
async fn finish_with(s: &Arc<dyn Store>, run: &RunSpec, results: &[&[Outcome]]) {
    s.create_or_resume_run(run).await.unwrap();
    while let Some(lease) = s.lease(&run.run_id, "w1", 16, 0, MINUTE).await.unwrap() {
        let index = run
            .filters
            .iter()
            .find(|f| f.layer == lease.layer)
            .unwrap()
            .layer_index as usize;
        for (filter, _) in &lease.filters {
            if let Some((activation, border_ratio)) = results[index][*filter as usize] {
                let result = Submission {
                    dead: activation == 0.0,
                    border_ratio,
                    ..outcome(&lease, *filter, "w1", activation)
                };
                s.submit(&result, 10).await.unwrap();
            }
        }
    }
}

async fn query_reads_the_views_and_refuses_every_write(db: &TestDb) {
    let run = spec("run-1", &[("block1_conv1", 3), ("block1_conv2", 2)], 3);
    finish(
        &db.store,
        &run,
        &[&[Some(1.0), Some(3.0), Some(2.0)], &[Some(0.5), Some(4.0)]],
    )
    .await;
    let q = |sql: &'static str| query::query(&db.url, sql);

    let best = q("SELECT layer, filter, activation, rank FROM best_filters
                  WHERE rank <= 2 ORDER BY layer_index, rank")
    .await
    .unwrap();
    assert_eq!(best.columns, ["layer", "filter", "activation", "rank"]);
    assert_eq!(
        best.rows,
        vec![
            vec![json!("block1_conv1"), json!(1), json!(3.0), json!(1)],
            vec![json!("block1_conv1"), json!(2), json!(2.0), json!(2)],
            vec![json!("block1_conv2"), json!(1), json!(4.0), json!(1)],
            vec![json!("block1_conv2"), json!(0), json!(0.5), json!(2)],
        ]
    );
    let parsed: serde_json::Value =
        serde_json::from_str(&best.render(query::Format::Json)).unwrap();
    assert_eq!(parsed[3]["activation"], json!(0.5));

    // No row matches: the columns are still named, so a csv keeps its header.
    let none = q("SELECT layer, filter, activation FROM best_filters WHERE rank > 1000")
        .await
        .unwrap();
    assert_eq!(none.columns, ["layer", "filter", "activation"]);
    assert_eq!(none.render(query::Format::Csv), "layer,filter,activation\n");
    assert_eq!(none.render(query::Format::Json), "[]\n");

    // Images come back as bytes, shown by size in a table.
    let image = q("SELECT png FROM results WHERE layer = 'block1_conv1' AND filter = 0")
        .await
        .unwrap();
    assert_eq!(image.binary, [true]);
    let expected = format!("<{} bytes>", "png of 0 by w1".len());
    assert!(
        image.render(query::Format::Table).contains(&expected),
        "{}",
        image.render(query::Format::Table)
    );

    let activations = || q("SELECT layer, filter, activation FROM results ORDER BY layer, filter");
    let before = activations().await.unwrap();
    assert_eq!(before.rows.len(), 5);
    for write in [
        "DROP TABLE results",
        "DELETE FROM results",
        "UPDATE results SET activation = 0",
        "INSERT INTO runs (run_id, weights_sha256, settings, max_attempts, created_at_ms) VALUES ('x', 'y', '{}', 1, 0)",
        "SELECT 1; DELETE FROM results",
        "DELETE FROM results RETURNING filter",
        "CREATE TABLE evil (x INTEGER)",
    ] {
        let err = q(write).await.expect_err(write);
        assert!(
            matches!(err, Error::Query(_)),
            "{write}: {err}"
        );
    }
    assert_eq!(
        activations().await.unwrap(),
        before,
        "a refused write changed nothing"
    );
    assert_eq!(db.store.runs().await.unwrap().len(), 1);

    let err = q("SELEC nonsense").await.unwrap_err();
    assert!(err.to_string().contains("query failed"), "{err}");
}

async fn layer_filters_and_run_info_feed_the_atlas(db: &TestDb) {
    let s = &db.store;
    let run = spec("run-1", &[("block1_conv1", 4), ("block1_conv2", 2)], 1);
    s.create_or_resume_run(&run).await.unwrap();
    let l = s.lease("run-1", "w", 3, 0, MINUTE).await.unwrap().unwrap();
    let retried = Submission {
        retries: 3,
        ..outcome(&l, 0, "w", 2.5)
    };
    s.submit(&retried, 5).await.unwrap();
    s.submit(&failure(&l, 1, "w", "NaN in the gradient"), 5)
        .await
        .unwrap();
    let records = s.layer_filters("run-1", "block1_conv1").await.unwrap();
    assert_eq!(
        records
            .iter()
            .map(|r| (r.filter, r.state.name()))
            .collect::<Vec<_>>(),
        [(0, "done"), (1, "failed"), (2, "leased"), (3, "pending")]
    );
    let done = records[0].result.as_ref().unwrap();
    assert_eq!(
        (done.activation, done.png.as_slice()),
        (2.5, b"png of 0 by w".as_slice())
    );
    assert_eq!(done.curve, vec![0.25, 1.25, 2.5]);
    assert_eq!(done.retries, 3, "the steps the worker retried are stored");
    assert_eq!(
        records[1].failed_reason.as_deref(),
        Some("NaN in the gradient")
    );
    assert!(records[1..].iter().all(|r| r.result.is_none()));
    assert_eq!(
        s.layer_filters("run-1", "block1_conv2")
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(s.layer_filters("run-1", "block9").await.unwrap().is_empty());

    let info = s.run_info("run-1").await.unwrap();
    assert_eq!(info.weights_sha256, run.weights_sha256);
    assert_eq!(info.settings, run.settings_json);
    assert!(matches!(
        s.run_info("run-9").await.unwrap_err(),
        Error::UnknownRun(_)
    ));
}

async fn best_filters_ranks_the_strongest_first(db: &TestDb) {
    let run = spec("run-1", &[("block1_conv1", 5), ("block1_conv2", 2)], 3);
    let a = [Some(1.0), Some(3.0), Some(3.0), Some(2.0), None];
    finish(&db.store, &run, &[&a, &[Some(0.5), Some(4.0)]]).await;

    let rows = fetch_all!(
        db,
        (String, i32, i32, f32, i64),
        "SELECT layer, layer_index, filter, activation, rank FROM best_filters
         WHERE run_id = $1 ORDER BY layer_index, rank",
        "run-1"
    );
    let expected = [
        ("block1_conv1", 0, 1, 3.0, 1), // ties go to the lower filter
        ("block1_conv1", 0, 2, 3.0, 2),
        ("block1_conv1", 0, 3, 2.0, 3),
        ("block1_conv1", 0, 0, 1.0, 4), // filter 4 is unfinished: no row
        ("block1_conv2", 1, 1, 4.0, 1),
        ("block1_conv2", 1, 0, 0.5, 2),
    ];
    let expected: Vec<_> = expected
        .iter()
        .map(|&(l, i, f, a, r)| (l.to_string(), i, f, a, r))
        .collect();
    assert_eq!(rows, expected);

    let top = fetch_all!(
        db,
        (String, i32, f32, bool),
        "SELECT layer, filter, start_activation, dead FROM best_filters WHERE rank <= 1 ORDER BY layer",
    );
    assert_eq!(
        top,
        vec![
            ("block1_conv1".into(), 1, 0.25, false),
            ("block1_conv2".into(), 1, 0.25, false)
        ]
    );
}

async fn layer_summary_and_failed_filters_views(db: &TestDb) {
    let run = spec("run-1", &[("block1_conv1", 4), ("block1_conv2", 2)], 1);
    // Filter 3 of block1_conv1 stays leased; filter 2 stays silent (dead).
    finish(
        &db.store,
        &run,
        &[
            &[Some(1.0), Some(5.0), Some(0.0), None],
            &[Some(2.0), Some(2.0)],
        ],
    )
    .await;

    let summary = fetch_all!(
        db,
        (String, i32, i64, i64, i64, i64, i64, i64, Option<f64>, Option<f32>),
        "SELECT layer, layer_index, filters, done, pending, leased, failed, dead, mean_activation, max_activation
         FROM layer_summary WHERE run_id = $1 ORDER BY layer_index",
        "run-1"
    );
    assert_eq!(
        summary,
        vec![
            (
                "block1_conv1".into(),
                0,
                4,
                3,
                0,
                1,
                0,
                1,
                Some(2.0),
                Some(5.0)
            ),
            (
                "block1_conv2".into(),
                1,
                2,
                2,
                0,
                0,
                0,
                0,
                Some(2.0),
                Some(2.0)
            ),
        ]
    );

    let failed = fetch_all!(
        db,
        (String, i32, String),
        "SELECT layer, filter, status FROM failed_filters WHERE run_id = $1 ORDER BY layer, filter",
        "run-1"
    );
    assert_eq!(failed, vec![("block1_conv1".into(), 2, "dead".into())]);
}

async fn a_result_keeps_both_activations_of_a_second_ascent(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 2)], 3))
        .await
        .unwrap();
    let l = s.lease("run-1", "w", 2, 0, MINUTE).await.unwrap().unwrap();
    let again = Submission {
        second_ascent: Some(vgg_atlas_proto::SecondAscent {
            first_activation: 97.5,
            second_activation: 224.25,
        }),
        ..outcome(&l, 0, "w", 224.25)
    };
    for r in [again, outcome(&l, 1, "w", 3.0)] {
        assert_eq!(s.submit(&r, 5).await.unwrap(), SubmitOutcome::Recorded);
    }
    let rows = fetch_all!(
        db,
        (i32, Option<f32>, Option<f32>),
        "SELECT filter, first_activation, second_activation FROM results WHERE run_id = $1
         ORDER BY filter",
        "run-1"
    );
    assert_eq!(rows, [(0, Some(97.5), Some(224.25)), (1, None, None)]);
}

async fn a_result_keeps_its_border_ratio(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 4)], 3))
        .await
        .unwrap();
    let l = s.lease("run-1", "w", 4, 0, MINUTE).await.unwrap().unwrap();
    // A NaN border ratio is refused like any non-finite score, and nothing is written.
    let nan = Submission {
        border_ratio: Some(f32::NAN),
        ..outcome(&l, 3, "w", 2.0)
    };
    let err = s.submit(&nan, 5).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NonFinite {
                field: "border ratio",
                ..
            }
        ),
        "{err}"
    );
    for (filter, border_ratio) in [
        (0, Some(1.375)),
        (1, None),
        (2, Some(12.5)),
        (3, Some(0.75)),
    ] {
        let r = Submission {
            border_ratio,
            ..outcome(&l, filter, "w", 2.0)
        };
        assert_eq!(s.submit(&r, 5).await.unwrap(), SubmitOutcome::Recorded);
    }
    let stored: Vec<Option<f32>> = s
        .layer_filters("run-1", "block1_conv1")
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.result.expect("finished").border_ratio)
        .collect();
    assert_eq!(stored, [Some(1.375), None, Some(12.5), Some(0.75)]);
    let column = fetch_all!(
        db,
        (i32, Option<f32>),
        "SELECT filter, border_ratio FROM results WHERE run_id = $1 ORDER BY filter",
        "run-1"
    );
    assert_eq!(
        column,
        [
            (0, Some(1.375)),
            (1, None),
            (2, Some(12.5)),
            (3, Some(0.75))
        ]
    );
}

async fn layer_summary_has_the_median_weak_filters_and_border_ratios(db: &TestDb) {
    use vgg_atlas_atlas::quality;
    let run = spec(
        "run-1",
        &[
            ("block1_conv1", 6),
            ("block1_conv2", 7),
            ("block2_conv1", 2),
        ],
        3,
    );
    let odd = [
        Some((100.0, Some(1.0))),
        Some((100.0, Some(1.5))),
        Some((150.0, None)), // a result without a border ratio: left out of those figures
        Some((19.0, Some(3.0))),
        Some((20.0, Some(1.25))),
        None, // stays leased: not finished, in no figure
    ];
    // An even count (the median of the middle two); the dead filter (0) is weak; no result has
    // a border ratio.
    let even = [
        Some((4.0, None)),
        Some((0.0, None)),
        Some((6.0, None)),
        None,
        Some((1.0, None)),
        Some((3.0, None)),
        Some((2.0, None)),
    ];
    finish_with(&db.store, &run, &[&odd, &even, &[None, None]]).await;
    // Another run's results in the same layer count only for that run.
    finish_with(
        &db.store,
        &spec("run-2", &[("block1_conv1", 3)], 3),
        &[&[
            Some((1000.0, Some(9.0))),
            Some((1000.0, Some(9.0))),
            Some((1.0, Some(9.0))),
        ]],
    )
    .await;

    // The view's figures mean what quality's do.
    let figures = |results: &[Option<(f32, Option<f32>)>]| {
        let activations: Vec<f64> = results.iter().flatten().map(|r| r.0 as f64).collect();
        let borders: Vec<f64> = results
            .iter()
            .flatten()
            .filter_map(|r| r.1.map(f64::from))
            .collect();
        (
            quality::median(&activations),
            quality::weak_count(&activations) as i64,
            quality::median(&borders),
            borders.iter().copied().reduce(f64::max).map(|m| m as f32),
        )
    };
    assert_eq!(figures(&odd), (Some(100.0), 1, Some(1.375), Some(3.0)));
    assert_eq!(figures(&even), (Some(2.5), 1, None, None));
    assert_eq!(figures(&[None, None]), (None, 0, None, None));

    let summary = fetch_all!(
        db,
        (
            String,
            i64,
            i64,
            i64,
            Option<f64>,
            i64,
            Option<f64>,
            Option<f32>
        ),
        "SELECT layer, filters, done, leased, median_activation, weak, median_border_ratio,
                max_border_ratio
         FROM layer_summary WHERE run_id = $1 ORDER BY layer_index",
        "run-1"
    );
    let expected = |layer: &str, filters, done, leased, results: &[Option<(f32, Option<f32>)>]| {
        let (median, weak, median_border, max_border) = figures(results);
        (
            layer.to_string(),
            filters,
            done,
            leased,
            median,
            weak,
            median_border,
            max_border,
        )
    };
    assert_eq!(
        summary,
        [
            expected("block1_conv1", 6, 5, 1, &odd),
            expected("block1_conv2", 7, 6, 1, &even),
            expected("block2_conv1", 2, 0, 2, &[None, None]),
        ]
    );
    let other = fetch_all!(
        db,
        (Option<f64>, i64, Option<f64>, Option<f32>),
        "SELECT median_activation, weak, median_border_ratio, max_border_ratio
         FROM layer_summary WHERE run_id = $1",
        "run-2"
    );
    assert_eq!(other, [(Some(1000.0), 1, Some(9.0), Some(9.0))]);

    // The example of docs/database.md: layers with weak filters or busy borders.
    let flagged = query::query(
        &db.url,
        "SELECT layer, done, weak, median_activation, median_border_ratio, max_border_ratio
         FROM layer_summary
         WHERE weak > 0 OR median_border_ratio > 1.2 OR max_border_ratio > 1.6
         ORDER BY layer_index",
    )
    .await
    .unwrap();
    let mut layers: Vec<&str> = flagged
        .rows
        .iter()
        .map(|r| r[0].as_str().unwrap())
        .collect();
    layers.sort();
    assert_eq!(layers, ["block1_conv1", "block1_conv1", "block1_conv2"]);

    // Every column of the view from before, in the same order, then the new ones.
    let all = query::query(&db.url, "SELECT * FROM layer_summary")
        .await
        .unwrap();
    assert_eq!(
        all.columns,
        [
            "run_id",
            "layer",
            "layer_index",
            "filters",
            "done",
            "pending",
            "leased",
            "failed",
            "dead",
            "mean_activation",
            "max_activation",
            "median_activation",
            "weak",
            "median_border_ratio",
            "max_border_ratio",
        ]
    );
}

async fn a_leases_results_are_answered_one_by_one_in_one_transaction(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 4)], 3))
        .await
        .unwrap();
    let lease = s.lease("run-1", "w1", 4, 0, MINUTE).await.unwrap().unwrap();
    let nan = Submission {
        activation: f32::NAN,
        ..outcome(&lease, 1, "w1", 1.0)
    };
    let unknown = Submission {
        filter: 999,
        ..outcome(&lease, 2, "w1", 1.0)
    };
    // Out of filter order on purpose: the answers follow the request's order.
    let all = [
        outcome(&lease, 3, "w1", 3.0),
        nan,
        unknown,
        outcome(&lease, 0, "w1", 0.5),
        outcome(&lease, 3, "w1", 9.0),
    ];
    let got = s.submit_all(&all, 10).await.unwrap();
    assert!(
        matches!(got[0], Ok(SubmitOutcome::Recorded)),
        "{:?}",
        got[0]
    );
    assert!(
        matches!(got[1], Err(Error::NonFinite { .. })),
        "{:?}",
        got[1]
    );
    assert!(
        matches!(got[2], Err(Error::UnknownFilter { filter: 999, .. })),
        "{:?}",
        got[2]
    );
    assert!(
        matches!(got[3], Ok(SubmitOutcome::Recorded)),
        "{:?}",
        got[3]
    );
    assert!(
        matches!(got[4], Ok(SubmitOutcome::Duplicate)),
        "the second result for filter 3 in the same call: {:?}",
        got[4]
    );
    let r = s.result("run-1", "block1_conv1", 3).await.unwrap().unwrap();
    assert_eq!(r.activation, 3.0, "the first one is kept");
    assert!(s
        .result("run-1", "block1_conv1", 1)
        .await
        .unwrap()
        .is_none());
    let p = &s.progress("run-1").await.unwrap()[0];
    assert_eq!((p.done, p.leased), (2, 2), "filters 1 and 2 still leased");
}

/// `submit_all` reads the rows once and plans every write in memory: what it answers must be
/// what one call per submission, in filter order, would have answered.
async fn one_call_answers_the_results_of_several_leases_as_if_each_were_written_in_turn(
    db: &TestDb,
) {
    let s = &db.store;
    s.create_or_resume_run(&spec(
        "run-1",
        &[("block1_conv1", 2), ("block1_conv2", 2)],
        2,
    ))
    .await
    .unwrap();
    let first = s.lease("run-1", "w1", 2, 0, MINUTE).await.unwrap().unwrap();
    let second = s.lease("run-1", "w2", 2, 0, MINUTE).await.unwrap().unwrap();
    assert_eq!(
        (first.layer.as_str(), second.layer.as_str()),
        ("block1_conv1", "block1_conv2")
    );
    let all = [
        outcome(&second, 1, "w2", 7.0),
        // A failure with attempts left puts filter 0 back to pending; the result after it in
        // the same call no longer holds the lease.
        failure(&first, 0, "w1", "device lost"),
        outcome(&first, 0, "w1", 2.0),
        // Another worker's answer to w1's lease.
        outcome(&first, 1, "w2", 3.0),
        outcome(&first, 1, "w1", 4.0),
        outcome(&second, 0, "w2", 6.0),
    ];
    let got: Vec<_> = s
        .submit_all(&all, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        got,
        [
            SubmitOutcome::Recorded,
            SubmitOutcome::Pending,
            SubmitOutcome::NotLeased,
            SubmitOutcome::NotLeased,
            SubmitOutcome::Recorded,
            SubmitOutcome::Recorded,
        ]
    );
    let stored = |layer: &'static str, filter| async move {
        s.result("run-1", layer, filter)
            .await
            .unwrap()
            .map(|r| (r.activation, r.worker))
    };
    assert_eq!(stored("block1_conv1", 0).await, None);
    assert_eq!(stored("block1_conv1", 1).await, Some((4.0, "w1".into())));
    assert_eq!(stored("block1_conv2", 0).await, Some((6.0, "w2".into())));
    assert_eq!(stored("block1_conv2", 1).await, Some((7.0, "w2".into())));
    let p = s.progress("run-1").await.unwrap();
    assert_eq!(
        p.iter()
            .map(|l| (l.done, l.pending, l.leased))
            .collect::<Vec<_>>(),
        [(1, 1, 0), (2, 0, 0)]
    );
    // Filter 0 was put back with its reason, and is leased again.
    let again = s
        .lease("run-1", "w3", 4, 20, MINUTE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.filters.iter().map(|f| f.0).collect::<Vec<_>>(), [0]);
}

async fn several_leases_in_one_call_are_served_in_turn_each_from_one_layer(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec(
        "run-1",
        &[("block1_conv1", 5), ("block1_conv2", 3)],
        3,
    ))
    .await
    .unwrap();
    let requests = [
        ("w1", 2),
        ("w2", 0),
        ("w3", 2),
        ("w4", 2),
        ("w5", 2),
        ("w6", 1),
    ];
    let got = s.lease_many("run-1", &requests, 0, MINUTE).await.unwrap();
    let seen: Vec<Option<(&str, Vec<i32>)>> = got
        .iter()
        .map(|l| {
            l.as_ref()
                .map(|l| (l.layer.as_str(), l.filters.iter().map(|f| f.0).collect()))
        })
        .collect();
    assert_eq!(
        seen,
        [
            Some(("block1_conv1", vec![0, 1])),
            None,
            Some(("block1_conv1", vec![2, 3])),
            // A lease holds one layer's filters: the rest of the layer, then the next layer.
            Some(("block1_conv1", vec![4])),
            Some(("block1_conv2", vec![0, 1])),
            Some(("block1_conv2", vec![2])),
        ]
    );
    // Each lease is its worker's, under its own id, with the plan's seeds.
    let mut ids = std::collections::HashSet::new();
    for (lease, (worker, _)) in got.iter().zip(requests) {
        let Some(lease) = lease else { continue };
        assert!(ids.insert(lease.lease_id.clone()), "lease ids are distinct");
        let held = s.worker_leases("run-1", worker).await.unwrap();
        assert_eq!(
            held,
            lease
                .filters
                .iter()
                .map(|&(f, seed)| (lease.lease_id.clone(), lease.layer.clone(), f, seed))
                .collect::<Vec<_>>(),
            "{worker}"
        );
        let index = i32::from(lease.layer == "block1_conv2");
        assert!(lease
            .filters
            .iter()
            .all(|&(f, seed)| seed == self::seed(index, f)));
    }
    assert_eq!(
        s.lease_many("run-1", &[("w7", 1), ("w8", 4)], 10, MINUTE)
            .await
            .unwrap(),
        [None, None],
        "nothing left"
    );
    // After the deadline the same filters are leased again, to whoever asks.
    let again = s
        .lease_many("run-1", &[("w9", 8)], MINUTE, MINUTE)
        .await
        .unwrap();
    assert_eq!(again[0].as_ref().unwrap().filters.len(), 5);
}

async fn nothing_is_leasable_once_every_filter_is_leased(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 2)], 3))
        .await
        .unwrap();
    assert!(s.has_leasable("run-1", 0).await.unwrap());
    let lease = s.lease("run-1", "w1", 2, 0, MINUTE).await.unwrap().unwrap();
    assert!(!s.has_leasable("run-1", 10).await.unwrap(), "both leased");
    assert_eq!(s.unfinished("run-1").await.unwrap(), 2);
    assert!(
        s.has_leasable("run-1", MINUTE).await.unwrap(),
        "leasable again once the lease has ended"
    );
    s.submit(&outcome(&lease, 0, "w1", 1.0), 10).await.unwrap();
    assert_eq!(s.unfinished("run-1").await.unwrap(), 1);
    assert!(!s.is_finished("run-1").await.unwrap());
}

async fn non_finite_scores_are_refused(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 1)], 3))
        .await
        .unwrap();
    let lease = s.lease("run-1", "w1", 1, 0, MINUTE).await.unwrap().unwrap();

    let nan = Submission {
        activation: f32::NAN,
        ..outcome(&lease, 0, "w1", 1.0)
    };
    let err = s.submit(&nan, 10).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::NonFinite {
                field: "activation",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("NaN"), "{err}");
    let mut inf_curve = outcome(&lease, 0, "w1", 1.0);
    inf_curve.curve[1] = f32::INFINITY;
    let err = s.submit(&inf_curve, 10).await.unwrap_err();
    assert!(
        matches!(err, Error::NonFinite { field: "curve", .. }),
        "{err}"
    );

    assert_eq!(
        s.result("run-1", "block1_conv1", 0).await.unwrap(),
        None,
        "nothing stored"
    );
    assert_eq!(
        s.progress("run-1").await.unwrap()[0].leased,
        1,
        "the lease still holds the filter"
    );
    assert_eq!(
        s.submit(&outcome(&lease, 0, "w1", 1.0), 20).await.unwrap(),
        SubmitOutcome::Recorded
    );
}

// ---- Backend-specific behaviour ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_reader_with_an_open_transaction_does_not_block_submit() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("atlas.db").display());
    let s = store::connect(&url).await.unwrap();
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 2)], 3))
        .await
        .unwrap();
    let lease = s.lease("run-1", "w1", 2, 0, MINUTE).await.unwrap().unwrap();

    // Someone runs `vgg-atlas query` or `sqlite3` and keeps a read transaction open.
    let mut reader = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut reader).await.unwrap();
    let count = "SELECT COUNT(*) FROM results";
    let before: i64 = sqlx::query_scalar(count)
        .fetch_one(&mut reader)
        .await
        .unwrap();

    // Well under the busy timeout: the writer must not wait for the reader at all.
    let submit = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let recorded = s.submit(&outcome(&lease, 0, "w1", 1.0), 10).await.unwrap();
        let heartbeat = s.heartbeat(&lease.lease_id, 20, MINUTE).await.unwrap();
        (recorded, heartbeat)
    });
    assert_eq!(
        submit.await.expect("submit waited for a reader"),
        (SubmitOutcome::Recorded, true)
    );

    let during: i64 = sqlx::query_scalar(count)
        .fetch_one(&mut reader)
        .await
        .unwrap();
    assert_eq!((before, during), (0, 0), "the reader keeps its snapshot");
    sqlx::query("COMMIT").execute(&mut reader).await.unwrap();
    let after: i64 = sqlx::query_scalar(count)
        .fetch_one(&mut reader)
        .await
        .unwrap();
    assert_eq!(after, 1);
}

#[tokio::test]
async fn sqlite_file_and_directory_are_created_and_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out").join("nested").join("atlas.db");
    let url = format!("sqlite://{}", path.display());
    let run = spec("run-1", &[("block1_conv1", 3)], 3);
    {
        let s = store::connect(&url).await.unwrap();
        assert!(s.create_or_resume_run(&run).await.unwrap());
        let lease = s.lease("run-1", "w1", 1, 0, MINUTE).await.unwrap().unwrap();
        s.submit(&outcome(&lease, 0, "w1", 1.0), 10).await.unwrap();
    }
    assert!(path.is_file());
    let s = store::connect(&url).await.unwrap();
    assert!(
        !s.create_or_resume_run(&run).await.unwrap(),
        "reopening resumes the run"
    );
    let progress = s.progress("run-1").await.unwrap();
    assert_eq!((progress[0].done, progress[0].pending), (1, 2));
}

#[tokio::test]
async fn bad_urls_say_what_is_wrong() {
    let err = store::connect("mysql://localhost/atlas")
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::BadUrl { .. }), "{err}");
    assert!(err.to_string().contains("sqlite://PATH"), "{err}");

    let err = store::connect("sqlite://").await.err().unwrap();
    assert!(err.to_string().contains("names no file"), "{err}");

    let err = store::connect("postgres://atlas:secret@localhost:notaport/atlas")
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::BadUrl { .. }), "{err}");
    assert!(
        !err.to_string().contains("secret"),
        "password leaked: {err}"
    );

    // Port 1 on loopback: nothing listens there.
    let err = store::connect("postgres://atlas:secret@127.0.0.1:1/atlas")
        .await
        .err()
        .unwrap();
    assert!(matches!(err, Error::Connect { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("127.0.0.1:1") && message.contains("Is the server running"),
        "{message}"
    );
    assert!(!message.contains("secret"), "password leaked: {message}");
}

async fn a_lease_the_worker_never_heard_of_is_reclaimed(db: &TestDb) {
    let s = &db.store;
    s.create_or_resume_run(&spec("run-1", &[("block1_conv1", 6)], 3))
        .await
        .unwrap();
    let first = s.lease("run-1", "w", 2, 0, 1000).await.unwrap().unwrap();
    let second = s.lease("run-1", "w", 2, 0, 1000).await.unwrap().unwrap();
    // Knowing of both: nothing to reclaim.
    let both = [first.lease_id.clone(), second.lease_id.clone()];
    assert_eq!(
        s.reclaim("run-1", "w", &both, 10, 1000).await.unwrap(),
        None
    );
    // Knowing of the second only (the first answer was lost), even after its deadline passed
    // with nobody else leasing it: the first comes back, same id and filters, renewed.
    let back = s
        .reclaim("run-1", "w", &both[1..], 1500, 1000)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (back.lease_id.as_str(), back.lease_deadline_ms),
        (first.lease_id.as_str(), 2500)
    );
    assert_eq!(back.filters, first.filters);
    assert!(
        s.heartbeat(&first.lease_id, 2000, 1000).await.unwrap(),
        "renewed, still held"
    );
    // Another worker has none of w's leases to reclaim.
    assert_eq!(
        s.reclaim("run-1", "v", &[], 1500, 1000).await.unwrap(),
        None
    );
    // Once re-leased to someone else, it is theirs: nothing for w to reclaim.
    let taken = s.lease("run-1", "v", 4, 5000, 1000).await.unwrap().unwrap();
    assert!(taken.filters.contains(&first.filters[0]));
    assert_eq!(
        s.reclaim("run-1", "w", &[], 5000, 1000).await.unwrap(),
        None,
        "{taken:?}"
    );
    // Reclaiming issues no new attempt.
    let attempts = fetch_all!(
        db,
        (i32,),
        "SELECT attempts FROM filters WHERE run_id = $1 AND filter = 0",
        "run-1"
    );
    assert_eq!(attempts, vec![(2,)], "leased to w once and to v once");
}

/// A database written by the release before `0002_png_and_retries` (its schema is migration
/// 0001 alone, the image in `results.image`) opens, keeps its result, and resumes its run.
#[tokio::test]
async fn a_database_from_before_the_png_column_opens_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("atlas.db");
    let old_migrations = dir.path().join("migrations");
    std::fs::create_dir(&old_migrations).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../migrations/sqlite/0001_store.sql"
        ),
        old_migrations.join("0001_store.sql"),
    )
    .unwrap();
    let old = SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true),
    )
    .await
    .unwrap();
    sqlx::migrate::Migrator::new(old_migrations.as_path())
        .await
        .unwrap()
        .run(&old)
        .await
        .unwrap();
    let spec = spec("run-1", &[("block1_conv1", 2)], 3);
    for sql in [
        "INSERT INTO runs VALUES ('run-1', 'abc', '{\"steps\":1}', 3, 1)".to_string(),
        "INSERT INTO filters (run_id, layer, layer_index, filter, seed, state, attempts, worker)
         VALUES ('run-1', 'block1_conv1', 0, 0, 0, 'done', 1, 'w'),
                ('run-1', 'block1_conv1', 0, 1, 1, 'pending', 0, NULL)"
            .to_string(),
        "INSERT INTO results VALUES ('run-1', 'block1_conv1', 0, 2.5, 2.0, 0.5, '[1.0,2.5]', 0.1, 0,
                                     'w', x'89504e47', 7)"
            .to_string(),
    ] {
        sqlx::query(&sql).execute(&old).await.unwrap();
    }
    old.close().await;
    let s = store::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let stored = s
        .result("run-1", "block1_conv1", 0)
        .await
        .unwrap()
        .expect("the old result is still there");
    assert_eq!(
        (
            stored.activation,
            stored.png.as_slice(),
            stored.retries,
            stored.border_ratio
        ),
        (2.5, b"\x89PNG".as_slice(), 0, None)
    );
    let resumed = RunSpec {
        weights_sha256: "abc".into(),
        settings_json: "{\"steps\":1}".into(),
        ..spec
    };
    assert!(
        !s.create_or_resume_run(&resumed).await.unwrap(),
        "resumed, not created"
    );
    let lease = s
        .lease("run-1", "w2", 8, 10, MINUTE)
        .await
        .unwrap()
        .expect("the unfinished filter is leased");
    assert_eq!(lease.filters, [(1, 1)]);
    assert_eq!(
        sqlite_page_size(&path).await,
        4096,
        "a file made with SQLite's default pages keeps them"
    );
}

/// `PRAGMA page_size` of the SQLite file at `path`, read through a connection of its own.
async fn sqlite_page_size(path: &std::path::Path) -> u32 {
    let pool = SqlitePool::connect_with(sqlx::sqlite::SqliteConnectOptions::new().filename(path))
        .await
        .unwrap();
    let (size,): (i64,) = sqlx::query_as("PRAGMA page_size")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    size as u32
}

/// A SQLite store this release creates has pages of `PAGE_SIZE` (16 KB) and keeps
/// a result's image through them: the pages are chosen for images (see `PAGE_SIZE`).
#[tokio::test]
async fn a_new_sqlite_store_has_pages_sized_for_images() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("atlas.db");
    let s = store::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let spec = spec("run-1", &[("block1_conv1", 1)], 3);
    s.create_or_resume_run(&spec).await.unwrap();
    let lease = s.lease("run-1", "w", 1, 0, MINUTE).await.unwrap().unwrap();
    // An image of 45 KB: three 16 KB pages' worth, a dozen of the default's.
    let png: Vec<u8> = (0..45_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let submitted = Submission {
        png: png.clone(),
        ..outcome(&lease, 0, "w", 2.0)
    };
    assert_eq!(
        s.submit(&submitted, 10).await.unwrap(),
        SubmitOutcome::Recorded
    );
    let stored = s.result("run-1", "block1_conv1", 0).await.unwrap().unwrap();
    assert_eq!(stored.png, png);
    drop(s);
    assert_eq!(sqlite_page_size(&path).await, store::sqlite::PAGE_SIZE);
    assert_eq!(store::sqlite::PAGE_SIZE, 16 * 1024);
}

/// Runs SQL with binds on either backend, panicking on an error.
macro_rules! execute {
    ($db:expr, $sql:expr $(, $bind:expr)* $(,)?) => {
        match &$db.pool {
            Pool::Sqlite(pool) => sqlx::query($sql)$(.bind($bind))*.execute(pool).await.map(|_| ()),
            Pool::Postgres(pool) => sqlx::query($sql)$(.bind($bind))*.execute(pool).await.map(|_| ()),
        }
        .expect($sql)
    };
}

/// A database as an older release left it: the migrations of `migrations/<dialect>/` up to
/// `last` applied, no more. [`OldDb::open`] opens today's store on it, which migrates it.
struct OldDb {
    url: String,
    pool: Pool,
    dir: Option<tempfile::TempDir>,
    schema: Option<String>,
}

/// The migrations of `dialect` numbered up to `last`, copied into a folder of their own.
fn migrations_up_to(dialect: &str, last: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(dialect);
    let mut copied = 0;
    for entry in std::fs::read_dir(&all).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let version: u32 = name.split('_').next().unwrap().parse().unwrap();
        if version <= last {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
            copied += 1;
        }
    }
    assert_eq!(copied, last, "migrations 1..={last} of {dialect}");
    dir
}

impl OldDb {
    async fn sqlite(last: u32) -> OldDb {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("atlas.db");
        let pool = SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(&path)
                .create_if_missing(true),
        )
        .await
        .unwrap();
        let migrations = migrations_up_to("sqlite", last);
        sqlx::migrate::Migrator::new(migrations.path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        OldDb {
            url: format!("sqlite://{}", path.display()),
            pool: Pool::Sqlite(pool),
            dir: Some(dir),
            schema: None,
        }
    }

    async fn postgres(last: u32) -> Option<OldDb> {
        let (url, schema) = fresh_postgres_schema().await?;
        let pool = PgPool::connect(&url).await.unwrap();
        let migrations = migrations_up_to("postgres", last);
        sqlx::migrate::Migrator::new(migrations.path())
            .await
            .unwrap()
            .run(&pool)
            .await
            .unwrap();
        Some(OldDb {
            url,
            pool: Pool::Postgres(pool),
            dir: None,
            schema: Some(schema),
        })
    }

    /// Today's store on the database: it applies the migrations the database lacks.
    async fn open(self) -> TestDb {
        let store = store::connect(&self.url).await.unwrap();
        TestDb {
            store,
            url: self.url,
            pool: self.pool,
            _dir: self.dir,
            schema: self.schema,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_database_from_before_the_border_ratio_opens_with_its_results() {
    a_database_from_before_the_border_ratio_opens_with_its_results(OldDb::sqlite(2).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_database_from_before_the_border_ratio_opens_with_its_results() {
    let Some(old) = OldDb::postgres(2).await else {
        return;
    };
    a_database_from_before_the_border_ratio_opens_with_its_results(old).await;
}

/// A database written by the release before `0003_border_ratio` (migrations 0001 and 0002): two
/// results stored by it and one filter pending. Today's store migrates it; the old results have
/// no border ratio (NULL), `layer_summary` has their activations but no border figures, and the
/// run resumes, its next result with a border ratio.
async fn a_database_from_before_the_border_ratio_opens_with_its_results(old: OldDb) {
    let run = spec("run-1", &[("block1_conv1", 3)], 3);
    execute!(
        old,
        "INSERT INTO runs (run_id, weights_sha256, settings, max_attempts, created_at_ms)
         VALUES ($1, $2, $3, 3, 1)",
        &run.run_id,
        &run.weights_sha256,
        &run.settings_json,
    );
    for (filter, state, worker) in [
        (0, "done", Some("w")),
        (1, "done", Some("w")),
        (2, "pending", None),
    ] {
        execute!(
            old,
            "INSERT INTO filters (run_id, layer, layer_index, filter, seed, state, attempts, worker)
             VALUES ($1, 'block1_conv1', 0, $2, $3, $4, $5, $6)",
            &run.run_id,
            filter,
            seed(0, filter),
            state,
            i32::from(state == "done"),
            worker,
        );
    }
    for (filter, activation) in [(0, 4.0f32), (1, 2.0)] {
        execute!(
            old,
            "INSERT INTO results (run_id, layer, filter, activation, objective, start_activation,
                                  curve, seconds, dead, worker, png, finished_at_ms, retries)
             VALUES ($1, 'block1_conv1', $2, $3, 1.0, 0.5, '[0.5]', 0.1, $4, 'w', $5, 7, $6)",
            &run.run_id,
            filter,
            activation,
            false,
            b"\x89PNG".to_vec(),
            filter + 1,
        );
    }

    let db = old.open().await;
    let s = &db.store;
    let old_results = || async {
        let mut stored = Vec::new();
        for filter in [0, 1] {
            let r = s
                .result("run-1", "block1_conv1", filter)
                .await
                .unwrap()
                .unwrap();
            stored.push((r.activation, r.retries, r.png, r.border_ratio));
        }
        stored
    };
    let before = [
        (4.0, 1, b"\x89PNG".to_vec(), None),
        (2.0, 2, b"\x89PNG".to_vec(), None),
    ];
    assert_eq!(old_results().await, before, "kept, with no border ratio");
    let summary = || async {
        fetch_all!(
            db,
            (i64, Option<f64>, i64, Option<f64>, Option<f32>),
            "SELECT done, median_activation, weak, median_border_ratio, max_border_ratio
             FROM layer_summary WHERE run_id = $1",
            "run-1"
        )
    };
    assert_eq!(summary().await, [(2, Some(3.0), 0, None, None)]);

    // The run resumes; its new result has a border ratio, and the figures count only it.
    assert!(!s.create_or_resume_run(&run).await.unwrap(), "resumed");
    let lease = s
        .lease("run-1", "w2", 8, 10, MINUTE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(lease.filters, [(2, seed(0, 2))]);
    let new = Submission {
        border_ratio: Some(1.5),
        ..outcome(&lease, 2, "w2", 3.0)
    };
    assert_eq!(s.submit(&new, 20).await.unwrap(), SubmitOutcome::Recorded);
    assert_eq!(
        s.result("run-1", "block1_conv1", 2)
            .await
            .unwrap()
            .unwrap()
            .border_ratio,
        Some(1.5)
    );
    assert_eq!(old_results().await, before);
    assert_eq!(summary().await, [(3, Some(3.0), 0, Some(1.5), Some(1.5))]);
    db.cleanup().await;
}

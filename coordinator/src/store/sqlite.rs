//! The embedded store: one SQLite file, written by one coordinator process.
//!
//! Concurrency: the file is in WAL mode, so readers (`vgg-atlas query`, `sqlite3`) never block the
//! writer and the writer never blocks them. Every write transaction starts with `BEGIN IMMEDIATE`,
//! taking the write lock up front: a deferred transaction that reads and then writes can fail
//! with SQLITE_BUSY without waiting, whereas `BEGIN IMMEDIATE` waits out `busy_timeout`. With the
//! write lock held, leasing needs no row locks to never hand a filter to two workers.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use super::{
    check_finite, check_resume, check_spec, curve_json, expired_reason, filter_record,
    layer_progress, plan_submit, sql, stored_result, FilterOutcome, FilterRecord, LayerFilterRow,
    LayerProgress, Lease, ProgressRow, ResultRow, RunInfo, RunSpec, Store, StoredResult,
    SubmitOutcome, SubmitPlan,
};
use crate::{Error, Result};

/// How long a write waits for another writer (or a checkpoint) before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens or creates the database file at `path` (from [`super::backend`]; `url` is only
    /// for messages).
    pub async fn open(url: &str, path: &str) -> Result<Self> {
        let bad_url = |reason: String| Error::BadUrl {
            url: url.to_string(),
            reason,
        };
        if path == ":memory:" {
            return Err(bad_url(
                "an in-memory database would lose every result at exit; name a file".into(),
            ));
        }
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                bad_url(format!(
                    "cannot create the directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(|e| bad_url(e.to_string()))?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on power loss, and a
            // lost result means a finished filter computed twice.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(|cause| Error::Connect {
                url: url.to_string(),
                hint: "Is the path writable, and is the file a SQLite database?",
                cause,
            })?;
        sqlx::migrate!("../migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|cause| Error::Migrate {
                url: url.to_string(),
                cause,
            })?;
        Ok(Self { pool })
    }

    /// A write transaction holding the database's write lock from its first statement.
    async fn write(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

async fn max_attempts(tx: &mut Transaction<'static, Sqlite>, run_id: &str) -> Result<i32> {
    sqlx::query_scalar(sql::MAX_ATTEMPTS)
        .bind(run_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| Error::UnknownRun(run_id.to_string()))
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn create_or_resume_run(&self, spec: &RunSpec) -> Result<bool> {
        check_spec(spec)?;
        let mut tx = self.write().await?;
        let inserted = sqlx::query(sql::INSERT_RUN)
            .bind(&spec.run_id)
            .bind(&spec.weights_sha256)
            .bind(&spec.settings_json)
            .bind(spec.max_attempts)
            .bind(super::now_ms())
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !inserted {
            let (weights, settings): (String, String) = sqlx::query_as(sql::SELECT_RUN)
                .bind(&spec.run_id)
                .fetch_one(&mut *tx)
                .await?;
            return check_resume(spec, weights, settings).map(|()| false);
        }
        // One prepared statement reused per row: in-process, this is as fast as a bulk insert.
        for f in &spec.filters {
            sqlx::query("INSERT INTO filters (run_id, layer, layer_index, filter, seed) VALUES ($1, $2, $3, $4, $5)")
                .bind(&spec.run_id)
                .bind(&f.layer)
                .bind(f.layer_index)
                .bind(f.filter)
                .bind(f.seed)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn lease(
        &self,
        run_id: &str,
        worker: &str,
        max_filters: usize,
        now_ms: i64,
        lease_ms: i64,
    ) -> Result<Option<Lease>> {
        if max_filters == 0 {
            return Ok(None);
        }
        let mut tx = self.write().await?;
        let max_attempts = max_attempts(&mut tx, run_id).await?;
        let lease_id = uuid::Uuid::new_v4().to_string();
        let deadline_ms = now_ms + lease_ms;
        // Loops only when every candidate had used its last attempt and failed instead.
        loop {
            let candidates: Vec<(String, i32, i64, String, i32)> = sqlx::query_as(&format!(
                "SELECT layer, filter, seed, state, attempts FROM filters
                 WHERE run_id = $1 AND {leasable} AND layer = (
                     SELECT layer FROM filters WHERE run_id = $1 AND {leasable}
                     ORDER BY layer_index, filter LIMIT 1)
                 ORDER BY filter LIMIT $3",
                leasable = sql::LEASABLE
            ))
            .bind(run_id)
            .bind(now_ms)
            .bind(i64::try_from(max_filters).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
            let Some(layer) = candidates.first().map(|c| c.0.clone()) else {
                tx.commit().await?; // keeps the filters failed in earlier rounds
                return Ok(None);
            };
            let mut filters = Vec::with_capacity(candidates.len());
            for (_, filter, seed, state, attempts) in candidates {
                if state == "leased" && attempts >= max_attempts {
                    sqlx::query(sql::FAIL_EXPIRED)
                        .bind(run_id)
                        .bind(&layer)
                        .bind(filter)
                        .bind(expired_reason(attempts))
                        .execute(&mut *tx)
                        .await?;
                    continue;
                }
                sqlx::query(
                    "UPDATE filters
                     SET state = 'leased', lease_id = $4, worker = $5, lease_deadline_ms = $6, attempts = attempts + 1
                     WHERE run_id = $1 AND layer = $2 AND filter = $3",
                )
                .bind(run_id)
                .bind(&layer)
                .bind(filter)
                .bind(&lease_id)
                .bind(worker)
                .bind(deadline_ms)
                .execute(&mut *tx)
                .await?;
                filters.push((filter, seed));
            }
            if !filters.is_empty() {
                tx.commit().await?;
                return Ok(Some(Lease {
                    lease_id,
                    run_id: run_id.to_string(),
                    layer,
                    filters,
                    deadline_ms,
                }));
            }
        }
    }

    async fn worker_leases(
        &self,
        run_id: &str,
        worker: &str,
    ) -> Result<Vec<(String, String, i32, i64)>> {
        Ok(sqlx::query_as(sql::WORKER_LEASES)
            .bind(run_id)
            .bind(worker)
            .fetch_all(&self.pool)
            .await?)
    }

    async fn heartbeat(&self, lease_id: &str, now_ms: i64, lease_ms: i64) -> Result<bool> {
        // A single statement is its own transaction; busy_timeout covers waiting for the lock.
        let held = sqlx::query(sql::HEARTBEAT)
            .bind(lease_id)
            .bind(now_ms + lease_ms)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(held > 0)
    }

    async fn submit(&self, r: &FilterOutcome, now_ms: i64) -> Result<SubmitOutcome> {
        if r.failed.is_none() {
            check_finite(r)?;
        }
        let mut tx = self.write().await?;
        let row: Option<(String, Option<String>, Option<String>, i32, i32)> = sqlx::query_as(
            "SELECT f.state, f.lease_id, f.worker, f.attempts, r.max_attempts
             FROM filters f JOIN runs r ON r.run_id = f.run_id
             WHERE f.run_id = $1 AND f.layer = $2 AND f.filter = $3",
        )
        .bind(&r.run_id)
        .bind(&r.layer)
        .bind(r.filter)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((state, lease_id, worker, attempts, max_attempts)) = row else {
            return Err(Error::UnknownFilter {
                run_id: r.run_id.clone(),
                layer: r.layer.clone(),
                filter: r.filter,
            });
        };
        let outcome = match plan_submit(
            &state,
            lease_id.as_deref(),
            worker.as_deref(),
            attempts,
            max_attempts,
            r,
        ) {
            SubmitPlan::Answer(outcome) => return Ok(outcome), // dropping tx rolls back: nothing written
            SubmitPlan::Retry => {
                sqlx::query(sql::SUBMIT_RETRY)
                    .bind(&r.run_id)
                    .bind(&r.layer)
                    .bind(r.filter)
                    .bind(r.failed.as_deref())
                    .execute(&mut *tx)
                    .await?;
                SubmitOutcome::RetryLater
            }
            SubmitPlan::Fail(reason) => {
                sqlx::query(sql::SUBMIT_FAIL)
                    .bind(&r.run_id)
                    .bind(&r.layer)
                    .bind(r.filter)
                    .bind(reason)
                    .bind(&r.worker)
                    .execute(&mut *tx)
                    .await?;
                SubmitOutcome::Failed
            }
            SubmitPlan::Record => {
                sqlx::query(sql::INSERT_RESULT)
                    .bind(&r.run_id)
                    .bind(&r.layer)
                    .bind(r.filter)
                    .bind(r.activation)
                    .bind(r.objective)
                    .bind(r.start_activation)
                    .bind(curve_json(&r.curve))
                    .bind(r.seconds)
                    .bind(r.dead)
                    .bind(&r.worker)
                    .bind(&r.png)
                    .bind(now_ms)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(sql::SUBMIT_DONE)
                    .bind(&r.run_id)
                    .bind(&r.layer)
                    .bind(r.filter)
                    .bind(&r.worker)
                    .execute(&mut *tx)
                    .await?;
                SubmitOutcome::Recorded
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    async fn progress(&self, run_id: &str) -> Result<Vec<LayerProgress>> {
        let rows: Vec<ProgressRow> = sqlx::query_as(sql::PROGRESS)
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?;
        if rows.is_empty() {
            self.require_run(run_id).await?;
        }
        Ok(rows.into_iter().map(layer_progress).collect())
    }

    async fn runs(&self) -> Result<Vec<(String, i64, String)>> {
        Ok(sqlx::query_as(sql::RUNS).fetch_all(&self.pool).await?)
    }

    async fn is_finished(&self, run_id: &str) -> Result<bool> {
        self.require_run(run_id).await?;
        let unfinished: i64 = sqlx::query_scalar(sql::UNFINISHED)
            .bind(run_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(unfinished == 0)
    }

    async fn run_info(&self, run_id: &str) -> Result<RunInfo> {
        let row: Option<(String, String, String, i64)> = sqlx::query_as(sql::RUN_INFO)
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?;
        let (run_id, weights_sha256, settings, created_at_ms) =
            row.ok_or_else(|| Error::UnknownRun(run_id.to_string()))?;
        Ok(RunInfo {
            run_id,
            weights_sha256,
            settings,
            created_at_ms,
        })
    }

    async fn layer_filters(&self, run_id: &str, layer: &str) -> Result<Vec<FilterRecord>> {
        let rows: Vec<LayerFilterRow> = sqlx::query_as(sql::LAYER_FILTERS)
            .bind(run_id)
            .bind(layer)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|row| filter_record(run_id, layer, row))
            .collect()
    }

    async fn lease_layer(&self, run_id: &str, lease_id: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar(sql::LEASE_LAYER)
            .bind(run_id)
            .bind(lease_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn result(&self, run_id: &str, layer: &str, filter: i32) -> Result<Option<StoredResult>> {
        let row: Option<ResultRow> = sqlx::query_as(sql::RESULT)
            .bind(run_id)
            .bind(layer)
            .bind(filter)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|row| stored_result(run_id, layer, filter, row))
            .transpose()
    }
}

impl SqliteStore {
    async fn require_run(&self, run_id: &str) -> Result<()> {
        let found: Option<i32> = sqlx::query_scalar(sql::MAX_ATTEMPTS)
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?;
        found
            .map(|_| ())
            .ok_or_else(|| Error::UnknownRun(run_id.to_string()))
    }
}

//! The cluster store: PostgreSQL, shared by the coordinator and anyone running queries.
//!
//! Concurrency: leasing locks the filters it takes with `SELECT ... FOR UPDATE SKIP LOCKED`, so
//! concurrent lessees (tasks or coordinator processes) split the pending filters between them
//! instead of waiting on, or double-leasing, each other's rows. A submission locks its filter's
//! row before deciding, so a result and a late duplicate cannot both be recorded.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres, Transaction};

use super::{
    check_finite, check_resume, check_spec, curve_json, expired_reason, filter_record,
    layer_progress, plan_submit, redact, sql, stored_result, FilterOutcome, FilterRecord,
    LayerFilterRow, LayerProgress, Lease, ProgressRow, ResultRow, RunInfo, RunSpec, Store,
    StoredResult, SubmitOutcome, SubmitPlan,
};
use crate::{Error, Result};

/// How long to wait for a connection before saying the server is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    pub async fn connect(url: &str) -> Result<Self> {
        let shown = redact(url);
        let options = PgConnectOptions::from_str(url).map_err(|e| Error::BadUrl {
            url: shown.clone(),
            reason: e.to_string(),
        })?;
        let unreachable = |cause| Error::Connect {
            url: shown.clone(),
            hint: "Is the server running and reachable at that host and port, and are the user, \
                   password and database right?",
            cause,
        };
        // One plain connection first: the pool would report any failure as "timed out", whereas
        // this says what went wrong (refused, unknown host, bad password, no such database).
        let probe = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
            .map_err(unreachable)?;
        probe.close().await.map_err(unreachable)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(unreachable)?;
        // Applied in the first schema of the search path (the URL may set it with
        // `?options=-c search_path=NAME`), which lets several stores share one database.
        sqlx::migrate!("../migrations/postgres")
            .run(&pool)
            .await
            .map_err(|cause| Error::Migrate { url: shown, cause })?;
        Ok(Self { pool })
    }

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

async fn max_attempts(tx: &mut Transaction<'static, Postgres>, run_id: &str) -> Result<i32> {
    sqlx::query_scalar(sql::MAX_ATTEMPTS)
        .bind(run_id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| Error::UnknownRun(run_id.to_string()))
}

#[async_trait::async_trait]
impl Store for PostgresStore {
    async fn create_or_resume_run(&self, spec: &RunSpec) -> Result<bool> {
        check_spec(spec)?;
        let mut tx = self.pool.begin().await?;
        // ON CONFLICT makes two coordinators starting the same run at once agree: one inserts.
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
        // One statement for the whole plan (thousands of filters) instead of a round trip each.
        let layers: Vec<&str> = spec.filters.iter().map(|f| f.layer.as_str()).collect();
        let layer_indices: Vec<i32> = spec.filters.iter().map(|f| f.layer_index).collect();
        let filters: Vec<i32> = spec.filters.iter().map(|f| f.filter).collect();
        let seeds: Vec<i64> = spec.filters.iter().map(|f| f.seed).collect();
        sqlx::query(
            "INSERT INTO filters (run_id, layer, layer_index, filter, seed)
             SELECT $1, * FROM UNNEST($2::text[], $3::int[], $4::int[], $5::bigint[])",
        )
        .bind(&spec.run_id)
        .bind(&layers)
        .bind(&layer_indices)
        .bind(&filters)
        .bind(&seeds)
        .execute(&mut *tx)
        .await?;
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
        let mut tx = self.pool.begin().await?;
        let max_attempts = max_attempts(&mut tx, run_id).await?;
        let lease_id = uuid::Uuid::new_v4().to_string();
        let deadline_ms = now_ms + lease_ms;
        // Loops only when every candidate had used its last attempt and failed instead.
        loop {
            // The first filter we can lock decides the layer; the rest of the batch comes from it.
            let layer: Option<String> = sqlx::query_scalar(&format!(
                "SELECT layer FROM filters WHERE run_id = $1 AND {leasable}
                 ORDER BY layer_index, filter LIMIT 1 FOR UPDATE SKIP LOCKED",
                leasable = sql::LEASABLE
            ))
            .bind(run_id)
            .bind(now_ms)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(layer) = layer else {
                tx.commit().await?; // keeps the filters failed in earlier rounds
                return Ok(None);
            };
            let candidates: Vec<(i32, i64, String, i32)> = sqlx::query_as(&format!(
                "SELECT filter, seed, state, attempts FROM filters
                 WHERE run_id = $1 AND {leasable} AND layer = $3
                 ORDER BY filter LIMIT $4 FOR UPDATE SKIP LOCKED",
                leasable = sql::LEASABLE
            ))
            .bind(run_id)
            .bind(now_ms)
            .bind(&layer)
            .bind(i64::try_from(max_filters).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
            let mut filters = Vec::with_capacity(candidates.len());
            for (filter, seed, state, attempts) in candidates {
                if state == "leased" && attempts >= max_attempts {
                    sqlx::query(sql::FAIL_EXPIRED)
                        .bind(run_id)
                        .bind(&layer)
                        .bind(filter)
                        .bind(expired_reason(attempts))
                        .execute(&mut *tx)
                        .await?;
                } else {
                    filters.push((filter, seed));
                }
            }
            if filters.is_empty() {
                continue;
            }
            let ids: Vec<i32> = filters.iter().map(|&(filter, _)| filter).collect();
            sqlx::query(
                "UPDATE filters
                 SET state = 'leased', lease_id = $4, worker = $5, lease_deadline_ms = $6, attempts = attempts + 1
                 WHERE run_id = $1 AND layer = $2 AND filter = ANY($3)",
            )
            .bind(run_id)
            .bind(&layer)
            .bind(&ids)
            .bind(&lease_id)
            .bind(worker)
            .bind(deadline_ms)
            .execute(&mut *tx)
            .await?;
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
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, Option<String>, Option<String>, i32, i32)> = sqlx::query_as(
            "SELECT f.state, f.lease_id, f.worker, f.attempts, r.max_attempts
             FROM filters f JOIN runs r ON r.run_id = f.run_id
             WHERE f.run_id = $1 AND f.layer = $2 AND f.filter = $3
             FOR UPDATE OF f",
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

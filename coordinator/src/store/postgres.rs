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

use super::{redact, RunSpec};
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
            // Slow acquires are those of an outage, which the coordinator reports itself.
            .acquire_slow_threshold(CONNECT_TIMEOUT)
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

    /// Row locks (`FOR UPDATE ... SKIP LOCKED` in `lease`, `FOR UPDATE` in `submit`) keep
    /// concurrent transactions apart; the transaction itself is an ordinary one.
    async fn write(&self) -> Result<Transaction<'static, Postgres>> {
        Ok(self.pool.begin().await?)
    }

    /// Reads and writes share the pool: the server's row locks order the writes.
    fn writes(&self) -> &PgPool {
        &self.pool
    }

    async fn insert_filters(tx: &mut Transaction<'static, Postgres>, spec: &RunSpec) -> Result<()> {
        // One statement for the whole plan (thousands of filters) instead of a round trip each.
        let layers: Vec<&str> = spec.filters.iter().map(|f| f.layer.as_str()).collect();
        let layer_indices: Vec<i32> = spec.filters.iter().map(|f| f.layer_index).collect();
        let filters: Vec<i32> = spec.filters.iter().map(|f| f.filter).collect();
        let seeds: Vec<i64> = spec.filters.iter().map(|f| f.seed).collect();
        sqlx::query(
            "INSERT INTO filters (run_id, layer, layer_index, filter, seed)
             SELECT $1, * FROM UNNEST($2::text[], $3::int[], $4::int[], $5::bigint[])
             ON CONFLICT (run_id, layer, filter) DO NOTHING",
        )
        .bind(&spec.run_id)
        .bind(&layers)
        .bind(&layer_indices)
        .bind(&filters)
        .bind(&seeds)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// How `submit_all` locks the rows it reads: each filter's row, in filter order, so that a
/// result and a late duplicate cannot both be recorded.
const SUBMIT_ROWS_LOCK: &str = " FOR UPDATE OF f";

/// The layer a lease takes its filters from: that of the first leasable filter that no other
/// transaction has locked.
const LEASE_LAYER_FIRST: &str = concat!(
    "SELECT layer FROM filters WHERE run_id = $1 AND ",
    super::leasable!(),
    " ORDER BY layer_index, filter LIMIT 1 FOR UPDATE SKIP LOCKED"
);

/// How the candidates of a lease are locked: each row, skipping those another transaction
/// (another coordinator process, another group) is leasing now.
const LEASE_LOCK: &str = " FOR UPDATE SKIP LOCKED";

impl_example_store!(PostgresStore, Postgres);

impl_store!(PostgresStore, Postgres, {
    async fn close(&self) {
        self.pool.close().await;
    }

    fn writers(&self) -> usize {
        // A quarter of the pool: the rest is left to reads.
        4
    }
});

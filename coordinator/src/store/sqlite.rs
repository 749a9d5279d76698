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
use sqlx::{Connection, Sqlite, Transaction};

use super::{sql, RunSpec};
use crate::{Error, Result};

/// How long a write waits for another writer (or a checkpoint) before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// The page size of a database file this store creates: 16 KB, not SQLite's default 4 KB. Most of
/// the file is images of 40-50 KB, each one row: on 4 KB pages an image spans a dozen overflow
/// pages, each a page to allocate, cache, checksum and log to the WAL as a frame of its own; on 16
/// KB pages it spans three. With a thousand workers storing at once (`bench-coordinator --workers
/// 1000 --batch 4`) that is a sixth more results a second and a sixth off the p99 round trip
/// (docs/performance.md), for results 8% larger (46.0 KB a result instead of 42.5 KB for the
/// images of `render --sample 4`) and an examples pass's store a sixth to a quarter larger (its
/// crops, 7-8 KB each, often take a page each). Larger pages keep an image of under 64 KB whole in
/// one page and leave the rest of it empty: 32 KB and 64 KB pages gained little over 16 KB and
/// made the bench's file a third larger. A file made with other pages keeps them: SQLite changes
/// the page size of a file in WAL mode only by rewriting it, which the store never does.
pub const PAGE_SIZE: u32 = 16 * 1024;

/// The WAL is checkpointed into the file once it holds this many pages: 4 MB, what SQLite's
/// default of 1,000 pages is on its default 4 KB pages, so that the WAL grows no further
/// between checkpoints on [`PAGE_SIZE`] pages (a disk nearly full has the same room for it).
const WAL_CHECKPOINT_PAGES: u32 = (4 << 20) / PAGE_SIZE;

pub struct SqliteStore {
    pool: SqlitePool,
    options: SqliteConnectOptions,
    /// One connection for every write. SQLite has one writer at a time: writes from several
    /// connections would wait for each other in SQLite's busy handler, which sleeps (1 ms
    /// growing to 100 ms) while the lock may already be free, and writes sharing the readers'
    /// pool would wait behind a crowd of reads for a connection while they hold the lock. With
    /// a connection of their own they queue in order and never wait for a read (WAL readers do
    /// not block the writer). The busy handler is left to other processes.
    writer: SqlitePool,
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
            .foreign_keys(true)
            // Set before anything else (sqlx sends it first); a no-op on an existing file.
            .page_size(PAGE_SIZE)
            .pragma("wal_autocheckpoint", WAL_CHECKPOINT_PAGES.to_string());
        let cannot_open = |cause| Error::Connect {
            url: url.to_string(),
            hint: "Is the path writable, and is the file a SQLite database?",
            cause,
        };
        let pool = pool_options()
            .max_connections(8)
            .connect_with(options.clone())
            .await
            .map_err(cannot_open)?;
        sqlx::migrate!("../migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|cause| Error::Migrate {
                url: url.to_string(),
                cause,
            })?;
        let writer = pool_options()
            .max_connections(1)
            // A write may queue behind many others under a thousand workers.
            .acquire_timeout(BUSY_TIMEOUT)
            .connect_with(options.clone())
            .await
            .map_err(cannot_open)?;
        Ok(Self {
            pool,
            options,
            writer,
        })
    }

    /// The connection every write of this process goes through (see [`SqliteStore::writer`]).
    fn writes(&self) -> &SqlitePool {
        &self.writer
    }

    /// A write transaction holding the database's write lock from its first statement.
    async fn write(&self) -> Result<Transaction<'static, Sqlite>> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// The plan's filters, one prepared statement reused per row: in-process, this is as fast
    /// as a bulk insert.
    async fn insert_filters(tx: &mut Transaction<'static, Sqlite>, spec: &RunSpec) -> Result<()> {
        for f in &spec.filters {
            sqlx::query(sql::INSERT_FILTER)
                .bind(&spec.run_id)
                .bind(&f.layer)
                .bind(f.layer_index)
                .bind(f.filter)
                .bind(f.seed)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }
}

/// Pool options of both pools: a connection left inside a transaction is closed, not reused.
/// SQLite rolls a transaction back by itself when a write fails with a full disk
/// (`SQLITE_FULL`) or an I/O error; the rollback sqlx then sends fails ("no transaction is
/// active") and its count of open transactions stays at one, so that every later `BEGIN` on
/// the connection would fail ("non-zero transaction depth"), and the writer pool has only one.
fn pool_options() -> SqlitePoolOptions {
    SqlitePoolOptions::new().after_release(|conn, _| {
        Box::pin(async move {
            // A rollback queued by a dropped transaction is carried out before the ping
            // answers; a connection still counted inside one after it is stuck.
            conn.ping().await?;
            Ok(!conn.is_in_transaction())
        })
    })
}

/// How `submit_all` locks the rows it reads: not at all, the write transaction holds the
/// whole database.
const SUBMIT_ROWS_LOCK: &str = "";

/// The layer a lease takes its filters from: that of the first leasable filter (an index seek
/// each for the first pending and the first expired one).
const LEASE_LAYER_FIRST: &str = sql::FIRST_LEASABLE_LAYER;

/// How the candidates of a lease are locked: not at all, the write transaction holds the whole
/// database.
const LEASE_LOCK: &str = "";

impl_example_store!(SqliteStore, Sqlite);

impl_store!(SqliteStore, Sqlite, {
    async fn close(&self) {
        self.pool.close().await;
        self.writer.close().await;
        // Connections that close at once may each see another still open and leave the
        // write-ahead log behind; one last connection, alone, folds it in and removes it.
        use sqlx::Connection;
        if let Ok(last) = sqlx::SqliteConnection::connect_with(&self.options).await {
            let _ = last.close().await;
        }
    }

    fn writers(&self) -> usize {
        // One writer: see `SqliteStore::writer`.
        1
    }
});

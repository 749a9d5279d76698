//! The crate's one error type: each variant says what failed, with which input, and what to do.

/// Result of every fallible call in this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "database URL {url:?} is not usable: {reason}. Give sqlite://PATH (e.g. sqlite://out/atlas.db) \
         or postgres://USER:PASSWORD@HOST:PORT/DATABASE"
    )]
    BadUrl { url: String, reason: String },

    // The cause is in the message and not chained as a source, so that `{:#}` prints it once.
    #[error("cannot open the database {url}: {cause}. {hint}")]
    Connect {
        /// The URL with any password blanked out.
        url: String,
        hint: &'static str,
        cause: sqlx::Error,
    },

    #[error(
        "cannot apply the schema migrations to {url}: {cause}. Was this database written by a newer \
         vgg-atlas, or edited by hand?"
    )]
    Migrate {
        url: String,
        cause: sqlx::migrate::MigrateError,
    },

    #[error(
        "run {run_id} is already in the database with another {what} (stored {stored:?}, given {given:?}); \
         a run id must identify its settings. Use --fresh, or another database"
    )]
    RunMismatch {
        run_id: String,
        what: &'static str,
        stored: String,
        given: String,
    },

    #[error("run {run_id} is not valid: {reason}")]
    InvalidRun { run_id: String, reason: String },

    #[error("no run {0:?} in the database; `vgg-atlas status` lists the runs it holds")]
    UnknownRun(String),

    #[error("run {run_id} has no filter {filter} in layer {layer:?}; was this result meant for another database?")]
    UnknownFilter {
        run_id: String,
        layer: String,
        filter: i32,
    },

    #[error(
        "result of run {run_id}, layer {layer}, filter {filter} has a non-finite {field} ({value}); NaN or \
         Inf is never stored: the worker must retry or report the filter as failed with a reason"
    )]
    NonFinite {
        run_id: String,
        layer: String,
        filter: i32,
        field: &'static str,
        value: f32,
    },

    #[error("the database holds a damaged value: {0}")]
    Corrupt(String),

    #[error("benchmark failed: {0}")]
    Bench(String),

    #[error("query failed: {0}")]
    Query(String),

    #[error(transparent)]
    Atlas(#[from] vgg_atlas_atlas::Error),

    /// A render refused its input or could not write its output; the message says why and
    /// what to do.
    #[error("{0}")]
    Render(String),

    /// The examples pass refused its input; the message says why and what to do.
    #[error("{0}")]
    Examples(String),

    #[error(transparent)]
    Contract(#[from] vgg_atlas_proto::Error),

    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// Why the store cannot be used now, though it may be later: see [`Error::outage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// The database server is down or restarting, or the connection to it was lost.
    Unreachable,
    /// The disk under the database is full: reads still work, writes do not.
    Full,
}

impl Error {
    /// Whether this error is an outage of the store rather than a fault of the request: the
    /// server gone or restarting (PostgreSQL's connection errors, `08…`, and shutdown codes,
    /// `57P01`-`57P03`), a lost connection, a pool that timed out waiting for one, or a full
    /// disk (PostgreSQL's `53100`, SQLite's `SQLITE_FULL` and its failed writes,
    /// `SQLITE_IOERR`). Nothing was stored by the failed call, so retrying it later is safe:
    /// workers keep their results until it succeeds.
    pub fn outage(&self) -> Option<Outage> {
        let Error::Database(e) = self else {
            return None;
        };
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => Some(Outage::Unreachable),
            sqlx::Error::Database(d) => {
                let code = d.code()?;
                if code == "53100" {
                    return Some(Outage::Full);
                }
                if code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03") {
                    return Some(Outage::Unreachable);
                }
                // SQLite gives its extended result code; the primary code is its low byte.
                match code.parse::<i32>().ok()? & 0xff {
                    13 | 10 if d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() => {
                        Some(Outage::Full)
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

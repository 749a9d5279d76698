//! `vgg-atlas serve`: the atlas viewer over HTTP, read from the database while a run goes on, for
//! a cluster whose output is not on the user's disk.
//!
//! Routes:
//! - `/` (and `/index.html`): the viewer of the static atlas, without inlined data, so it runs in
//!   its served mode: it fetches `atlas.json` and polls it, updating what it shows in place;
//! - `/atlas.json`: built from the store at each request, in the static atlas's shape (one
//!   writer, [`vgg_atlas_atlas::atlas_json`]), without image bytes; with an `ETag`, so a poll
//!   that finds nothing new is answered `304 Not Modified`;
//! - `/tiles/<layer>/<filter>.png`: the stored PNG bytes (`results.png`), as stored, one row per
//!   request; 404 when the filter has no image (yet);
//! - `/examples/<layer>/<filter>-<rank>.png`: the crop of a filter's example of that rank, from
//!   the newest examples pass with the run's weights (`vgg-atlas examples`);
//! - `/healthz`: `ok` when the store answers.
//!
//! Read-only by construction: no migration, no write.
//! - SQLite: each request opens the file read-only (`SQLITE_OPEN_READONLY`, `PRAGMA
//!   query_only`), never creating it. SQLite makes a `-wal` and a `-shm` file next to a WAL
//!   database it reads, even read-only; so when the `-wal` file is absent (no process has the
//!   database open: a finished render) the file is opened `immutable` and nothing is created
//!   next to it. A writer that starts during that one request is seen from the next request on.
//! - PostgreSQL: every connection has `default_transaction_read_only = on`, so each statement
//!   runs in a read-only transaction.
//!
//! A database from before migration `0002` (the image in `results.image`, no
//! `results.retries`) is served as it is (retries shown as 0) and left unmigrated, and so is one
//! from before `0003` (no `results.border_ratio`: border ratios shown as null) or `0004` (no
//! examples tables: no examples shown); the schema is looked at again when a query finds it
//! changed (a render of this version migrated it).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{Connection, PgConnection};
use vgg_atlas_atlas as atlas;

use crate::store::{self, redact, Backend};
use crate::Error;

/// A row of `filter_examples` as `serve` reads it: filter, rank, image, activation, the crop
/// box (left, top, width, height) and whether a crop is stored.
type ExampleRow = (i32, i64, String, f32, i32, i32, i32, i32, bool);

/// How long to wait for PostgreSQL, or for a SQLite file a writer holds busy.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why the viewer cannot serve a database; each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] Error),

    #[error(
        "there is no database file at {path}; serve only reads, it never creates one. Give the \
         --db a render wrote (`render --out DIR` writes sqlite://DIR/atlas.db)"
    )]
    Missing { path: String },

    #[error("{db} is not a vgg-atlas database: {reason}")]
    NotAtlas { db: String, reason: String },

    #[error("{db} holds no run yet; `vgg-atlas render` makes one")]
    NoRun { db: String },

    #[error("no run {run:?} in {db}; it holds {runs}. Choose one of these with --run, or leave --run out for the newest")]
    UnknownRun {
        run: String,
        db: String,
        runs: String,
    },
}

pub type Result<T, E = ServeError> = std::result::Result<T, E>;

/// A run in the database, as `serve` lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunListing {
    pub run_id: String,
    pub created_at_ms: i64,
    pub filters: i64,
    /// Done or failed.
    pub finished: i64,
}

impl std::fmt::Display for RunListing {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{} ({}/{} filters finished)",
            self.run_id, self.finished, self.filters
        )
    }
}

/// Where the results' columns are: the schema since migration 0003, or one before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Schema {
    /// `png`, or `image` before migration 0002.
    png: &'static str,
    /// `results.retries` exists (since migration 0002).
    retries: bool,
    /// `results.border_ratio` exists (since migration 0003).
    border_ratio: bool,
    /// The dataset-examples tables exist (since migration 0004).
    examples: bool,
}

impl Schema {
    const CURRENT: Schema = Schema {
        png: "png",
        retries: true,
        border_ratio: true,
        examples: true,
    };

    fn current(self) -> bool {
        self == Self::CURRENT
    }
}

enum Source {
    /// Opened per request (see the module's notes on `-wal` files).
    Sqlite(PathBuf),
    Postgres(PgPool),
}

/// A database opened for reading and the run it serves.
pub struct Viewer {
    source: Source,
    /// The URL, password blanked out, for messages.
    url: String,
    run: atlas::Run,
    runs: Vec<RunListing>,
    schema: Mutex<Schema>,
}

/// Runs `$body` (one sqlx call with executor `$c`, giving `Result<_, sqlx::Error>`) on either
/// backend: SQLite on a connection opened for it, PostgreSQL on the pool; gives
/// `Result<_, crate::Error>`.
macro_rules! on_db {
    ($viewer:expr, |$c:ident| $body:expr) => {
        match &$viewer.source {
            Source::Sqlite(path) => {
                let mut conn = sqlite_connection(path, &$viewer.url).await?;
                let result = {
                    let $c = &mut conn;
                    $body
                };
                conn.close().await.ok();
                result.map_err(Error::from)
            }
            Source::Postgres(pool) => {
                let $c = pool;
                $body.map_err(Error::from)
            }
        }
    };
}

/// The row of each planned filter, with its scores when finished (no image bytes).
type FilterRow = (
    String,
    i32,
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
    Option<i32>,
    Option<f32>,
);

impl Viewer {
    /// Opens the database named by `url` for reading and chooses the run: `run`, or the newest.
    pub async fn open(url: &str, run: Option<&str>) -> Result<Viewer> {
        let shown = redact(url);
        let source = match store::backend(url)? {
            Backend::Sqlite(":memory:") => {
                return Err(Error::BadUrl {
                    url: shown,
                    reason: "an in-memory database is empty; name the file a render wrote".into(),
                }
                .into())
            }
            Backend::Sqlite(path) => {
                if !Path::new(path).is_file() {
                    return Err(ServeError::Missing { path: path.into() });
                }
                Source::Sqlite(PathBuf::from(path))
            }
            Backend::Postgres => Source::Postgres(postgres_pool(url, &shown).await?),
        };
        let mut viewer = Viewer {
            source,
            url: shown,
            run: atlas::Run {
                run_id: String::new(),
                weights_sha256: String::new(),
                settings: serde_json::Value::Null,
                created_at_ms: 0,
            },
            runs: Vec::new(),
            schema: Mutex::new(Schema::CURRENT),
        };
        let schema = viewer.detect_schema().await?;
        *viewer.schema.lock().expect("schema lock") = schema;
        viewer.runs = viewer.list_runs().await?;
        let chosen = match run {
            Some(r) => viewer.runs.iter().find(|l| l.run_id == r).ok_or_else(|| {
                ServeError::UnknownRun {
                    run: r.into(),
                    db: viewer.url.clone(),
                    runs: listing(&viewer.runs),
                }
            })?,
            None => viewer.runs.last().ok_or_else(|| ServeError::NoRun {
                db: viewer.url.clone(),
            })?,
        }
        .run_id
        .clone();
        viewer.run = viewer.run_info(&chosen).await?;
        Ok(viewer)
    }

    pub fn run_id(&self) -> &str {
        &self.run.run_id
    }

    /// Every run of the database when it was opened, oldest first.
    pub fn runs(&self) -> &[RunListing] {
        &self.runs
    }

    /// The database's URL, password blanked out.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// What the user should know about the schema, if anything (an older one, served as it is).
    pub fn schema_note(&self) -> Option<String> {
        let schema = *self.schema.lock().expect("schema lock");
        if schema.current() {
            return None;
        }
        let mut missing = Vec::new();
        let mut shown = Vec::new();
        if schema.png != "png" {
            missing.push(format!("the image in results.{}", schema.png));
        }
        if !schema.retries {
            missing.push("no results.retries".to_string());
            shown.push("retries shown as 0");
        }
        if !schema.border_ratio {
            missing.push("no results.border_ratio".to_string());
            shown.push("border ratios as null");
        }
        if !schema.examples {
            missing.push("no examples tables".to_string());
            shown.push("no real-image examples");
        }
        let migration = if schema.png != "png" || !schema.retries {
            "0002"
        } else if !schema.border_ratio {
            "0003"
        } else {
            "0004"
        };
        let shown = if shown.is_empty() {
            String::new()
        } else {
            format!(", with {}", shown.join(" and "))
        };
        Some(format!(
            "{} has the schema from before migration {migration} ({}); it is served as it \
             is{shown}. serve never migrates; `vgg-atlas status --db URL` (or a render) brings it \
             up to date",
            self.url,
            missing.join(", "),
        ))
    }

    /// `atlas.json` of the run as the store holds it now.
    pub async fn atlas_json(&self) -> Result<String> {
        let rows = match self.filter_rows().await {
            Err(e) if schema_changed(&e) => {
                self.redetect().await?;
                self.filter_rows().await
            }
            r => r,
        }?;
        let mut layers: Vec<atlas::LayerFilters> = Vec::new();
        for row in rows {
            let (layer, layer_index) = (row.0.clone(), row.1);
            let f = atlas_filter(&self.run.run_id, row)?;
            match layers.last_mut() {
                Some(l) if l.name == layer => l.filters.push(f),
                _ => layers.push(atlas::LayerFilters {
                    name: layer,
                    index: layer_index.max(0) as u32,
                    filters: vec![f],
                }),
            }
        }
        if let Some(pass) = self.examples_pass().await? {
            for l in &mut layers {
                let rows = self.example_rows(&pass, &l.name).await?;
                crate::draw::attach_examples(&mut l.filters, rows);
            }
        }
        // Every finished filter has its result row, and with it its image: served at its tile path.
        let summaries: Vec<atlas::LayerSummary> = layers
            .iter()
            .map(|l| atlas::layer_summary(l, |_| true))
            .collect();
        let refs: Vec<&atlas::LayerSummary> = summaries.iter().collect();
        Ok(atlas::atlas_json(
            &self.run,
            &atlas::Options::default(),
            &refs,
        ))
    }

    /// The stored PNG of a filter and when it was stored; `None` when it has none (yet).
    pub async fn tile(&self, layer: &str, filter: i32) -> Result<Option<(Vec<u8>, i64)>> {
        Ok(match self.tile_row(layer, filter).await {
            Err(e) if schema_changed(&e) => {
                self.redetect().await?;
                self.tile_row(layer, filter).await
            }
            r => r,
        }?)
    }

    /// `Ok` when the store answers and still holds the run.
    pub async fn health(&self) -> Result<()> {
        let run_id = self.run.run_id.as_str();
        let n: i64 = on_db!(self, |c| sqlx::query_scalar(
            "SELECT COUNT(*) FROM runs WHERE run_id = $1"
        )
        .bind(run_id)
        .fetch_one(c)
        .await)?;
        if n == 1 {
            Ok(())
        } else {
            Err(ServeError::UnknownRun {
                run: run_id.into(),
                db: self.url.clone(),
                runs: "no such run any more".into(),
            })
        }
    }

    async fn filter_rows(&self) -> Result<Vec<FilterRow>, Error> {
        let schema = *self.schema.lock().expect("schema lock");
        let sql = format!(
            "SELECT f.layer, f.layer_index, f.filter, f.state, f.attempts, f.failed_reason,
                    r.activation, r.objective, r.start_activation, r.curve, r.seconds, r.dead,
                    r.worker, {}, {}
             FROM filters f
             LEFT JOIN results r ON r.run_id = f.run_id AND r.layer = f.layer AND r.filter = f.filter
             WHERE f.run_id = $1
             ORDER BY f.layer_index, f.layer, f.filter",
            if schema.retries { "r.retries" } else { "0" },
            if schema.border_ratio {
                "r.border_ratio"
            } else {
                "CAST(NULL AS REAL)"
            }
        );
        let run_id = self.run.run_id.as_str();
        on_db!(self, |c| sqlx::query_as::<_, FilterRow>(&sql)
            .bind(run_id)
            .fetch_all(c)
            .await)
    }

    async fn tile_row(&self, layer: &str, filter: i32) -> Result<Option<(Vec<u8>, i64)>, Error> {
        let schema = *self.schema.lock().expect("schema lock");
        let sql = format!(
            "SELECT {}, finished_at_ms FROM results WHERE run_id = $1 AND layer = $2 AND filter = $3",
            schema.png
        );
        let run_id = self.run.run_id.as_str();
        on_db!(self, |c| sqlx::query_as::<_, (Vec<u8>, i64)>(&sql)
            .bind(run_id)
            .bind(layer)
            .bind(filter)
            .fetch_optional(c)
            .await)
    }

    /// The examples pass shown beside the run (as `draw::examples_pass`), when the schema has
    /// examples and one with the run's weights is stored.
    async fn examples_pass(&self) -> Result<Option<String>, Error> {
        if !self.schema.lock().expect("schema lock").examples {
            return Ok(None);
        }
        let weights = self.run.weights_sha256.as_str();
        on_db!(self, |c| sqlx::query_scalar(
            "SELECT pass_id FROM example_passes WHERE weights_sha256 = $1
             ORDER BY created_at_ms DESC, pass_id DESC LIMIT 1"
        )
        .bind(weights)
        .fetch_optional(c)
        .await)
    }

    /// A layer's examples, `(filter, example)`, without their crops (served at their own paths).
    async fn example_rows(
        &self,
        pass: &str,
        layer: &str,
    ) -> Result<Vec<(i32, atlas::Example)>, Error> {
        let rows: Vec<ExampleRow> = on_db!(self, |c| {
            sqlx::query_as(
                "SELECT filter, rank, image, activation, crop_left, crop_top, crop_width, crop_height,
                        crop IS NOT NULL AND LENGTH(crop) > 0
                 FROM filter_examples WHERE pass_id = $1 AND layer = $2 ORDER BY filter, rank",
            )
            .bind(pass)
            .bind(layer)
            .fetch_all(c)
            .await
        })?;
        Ok(rows
            .into_iter()
            .map(|(filter, rank, image, activation, l, t, w, h, cropped)| {
                let example = atlas::Example {
                    rank: rank.max(0) as u32,
                    image,
                    activation,
                    crop_box: [l, t, w, h].map(|v| v.max(0) as u32),
                    cropped,
                    crop: None,
                };
                (filter, example)
            })
            .collect())
    }

    /// The crop of a filter's example of rank `rank`; `None` when there is none.
    pub async fn example_crop(
        &self,
        layer: &str,
        filter: i32,
        rank: i64,
    ) -> Result<Option<Vec<u8>>> {
        let Some(pass) = self.examples_pass().await? else {
            return Ok(None);
        };
        let crop: Option<Option<Vec<u8>>> = on_db!(self, |c| sqlx::query_scalar(
            "SELECT crop FROM filter_examples
             WHERE pass_id = $1 AND layer = $2 AND filter = $3 AND rank = $4"
        )
        .bind(&pass)
        .bind(layer)
        .bind(filter)
        .bind(rank)
        .fetch_optional(c)
        .await)?;
        Ok(crop.flatten().filter(|c| !c.is_empty()))
    }

    async fn redetect(&self) -> Result<()> {
        let schema = self.detect_schema().await?;
        *self.schema.lock().expect("schema lock") = schema;
        Ok(())
    }

    /// The schema, from the tables' columns (not from the migrations table: a later migration
    /// that leaves these columns alone changes nothing here).
    async fn detect_schema(&self) -> Result<Schema> {
        let columns: Vec<(String, String)> = match &self.source {
            Source::Sqlite(_) => on_db!(self, |c| sqlx::query_as(
                "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p
                 WHERE m.type = 'table' AND m.name IN ('runs', 'filters', 'results', 'examples')"
            )
            .fetch_all(c)
            .await),
            Source::Postgres(_) => on_db!(self, |c| sqlx::query_as(
                "SELECT table_name::text, column_name::text FROM information_schema.columns
                 WHERE table_schema = current_schema()
                   AND table_name IN ('runs', 'filters', 'results', 'examples')"
            )
            .fetch_all(c)
            .await),
        }
        .map_err(|e| match e {
            Error::Database(cause) => Error::Connect {
                url: self.url.clone(),
                hint: "Is it a database written by vgg-atlas, and readable?",
                cause,
            },
            e => e,
        })?;
        let has =
            |table: &str, column: &str| columns.iter().any(|(t, c)| t == table && c == column);
        for table in ["runs", "filters", "results"] {
            if !columns.iter().any(|(t, _)| t == table) {
                return Err(ServeError::NotAtlas {
                    db: self.url.clone(),
                    reason: format!(
                        "it has no {table} table (`vgg-atlas render` creates the schema)"
                    ),
                });
            }
        }
        let png = if has("results", "png") {
            "png"
        } else if has("results", "image") {
            "image"
        } else {
            return Err(ServeError::NotAtlas {
                db: self.url.clone(),
                reason: "its results table has no png (or image) column".into(),
            });
        };
        Ok(Schema {
            png,
            retries: has("results", "retries"),
            border_ratio: has("results", "border_ratio"),
            examples: has("examples", "crop"),
        })
    }

    async fn list_runs(&self) -> Result<Vec<RunListing>> {
        let rows: Vec<(String, i64, i64, i64)> = on_db!(self, |c| sqlx::query_as(
            "SELECT r.run_id, r.created_at_ms,
                    (SELECT COUNT(*) FROM filters f WHERE f.run_id = r.run_id),
                    (SELECT COUNT(*) FROM filters f
                     WHERE f.run_id = r.run_id AND f.state IN ('done', 'failed'))
             FROM runs r ORDER BY r.created_at_ms, r.run_id"
        )
        .fetch_all(c)
        .await)?;
        Ok(rows
            .into_iter()
            .map(|(run_id, created_at_ms, filters, finished)| RunListing {
                run_id,
                created_at_ms,
                filters,
                finished,
            })
            .collect())
    }

    async fn run_info(&self, run_id: &str) -> Result<atlas::Run> {
        let (weights_sha256, settings, created_at_ms): (String, String, i64) =
            on_db!(self, |c| sqlx::query_as(
                "SELECT weights_sha256, settings, created_at_ms FROM runs WHERE run_id = $1"
            )
            .bind(run_id)
            .fetch_one(c)
            .await)?;
        Ok(atlas::Run {
            run_id: run_id.into(),
            weights_sha256,
            settings: serde_json::from_str(&settings).map_err(|e| {
                Error::Corrupt(format!(
                    "the stored settings of run {run_id} are not JSON ({e}): {settings:?}"
                ))
            })?,
            created_at_ms,
        })
    }
}

/// The runs for a message, newest last.
fn listing(runs: &[RunListing]) -> String {
    if runs.is_empty() {
        return "no run".into();
    }
    runs.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A query that failed because the schema is not the one detected (it was migrated since).
fn schema_changed(e: &Error) -> bool {
    match e {
        Error::Database(sqlx::Error::Database(d)) => {
            d.message().contains("no such column") || d.code().as_deref() == Some("42703")
        }
        _ => false,
    }
}

/// A stored filter as the atlas shows it (the statuses of `draw`: a done filter without its
/// result is still pending).
fn atlas_filter(run_id: &str, row: FilterRow) -> Result<atlas::Filter> {
    use atlas::{Filter, Scores, Status};
    let (
        layer,
        _,
        filter,
        state,
        attempts,
        failed_reason,
        activation,
        objective,
        start_activation,
        curve,
        seconds,
        dead,
        worker,
        retries,
        border_ratio,
    ) = row;
    let scores = match (
        activation,
        objective,
        start_activation,
        curve,
        seconds,
        worker,
    ) {
        (
            Some(activation),
            Some(objective),
            Some(start_activation),
            Some(curve),
            Some(seconds),
            Some(worker),
        ) => Some(Scores {
            activation,
            objective,
            start_activation,
            curve: serde_json::from_str(&curve).map_err(|e| {
                Error::Corrupt(format!(
                    "the curve of run {run_id}, layer {layer}, filter {filter} is not a JSON \
                         array of numbers ({e}): {curve:?}"
                ))
            })?,
            seconds,
            worker,
            retries: retries.unwrap_or(0).max(0) as u32,
            border_ratio,
        }),
        _ => None,
    };
    let status = match (state.as_str(), &scores) {
        ("done", Some(_)) if dead == Some(true) => Status::Dead,
        ("done", Some(_)) => Status::Done,
        ("failed", _) => Status::Failed,
        _ => Status::Pending,
    };
    Ok(Filter {
        filter: filter.max(0) as u32,
        status,
        png: None,
        scores,
        attempts: attempts.max(0) as u32,
        failed_reason,
        examples: Vec::new(),
    })
}

/// The SQLite file opened read-only for one request.
async fn sqlite_connection(path: &Path, url: &str) -> Result<SqliteConnection, Error> {
    if !path.is_file() {
        return Err(Error::BadUrl {
            url: url.into(),
            reason: format!("the database file {} is gone", path.display()),
        });
    }
    let options = SqliteConnectOptions::from_str("sqlite:")
        .map_err(|e| Error::BadUrl {
            url: url.into(),
            reason: e.to_string(),
        })?
        .filename(path)
        .read_only(true)
        .create_if_missing(false)
        .immutable(quiet_wal(path))
        .busy_timeout(TIMEOUT)
        .pragma("query_only", "ON");
    SqliteConnection::connect_with(&options)
        .await
        .map_err(|cause| Error::Connect {
            url: url.into(),
            hint: "Is the file a SQLite database written by vgg-atlas, and readable?",
            cause,
        })
}

/// A WAL database that no process has open: its header says WAL and it has no `-wal` file
/// (SQLite deletes it when the last connection closes cleanly; a crashed writer leaves it, and
/// then it holds committed results that must be read).
fn quiet_wal(path: &Path) -> bool {
    use std::io::Read;
    let mut header = [0u8; 20];
    let wal_mode = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .is_ok()
        && header[18] == 2
        && header[19] == 2;
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    wal_mode && !Path::new(&wal).exists()
}

async fn postgres_pool(url: &str, shown: &str) -> Result<PgPool, Error> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| Error::BadUrl {
            url: shown.into(),
            reason: e.to_string(),
        })?
        .application_name("vgg-atlas serve")
        .options([("default_transaction_read_only", "on")]);
    let unreachable = |cause| Error::Connect {
        url: shown.into(),
        hint: "Is the server running and reachable at that host and port, and are the user, \
               password and database right?",
        cause,
    };
    // One plain connection first: it says what went wrong, where the pool would say "timed out".
    let probe = tokio::time::timeout(TIMEOUT, PgConnection::connect_with(&options))
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
        .map_err(unreachable)?;
    probe.close().await.map_err(unreachable)?;
    PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(TIMEOUT)
        .connect_with(options)
        .await
        .map_err(unreachable)
}

// ---------------------------------------------------------------------------------------------
// HTTP

/// Serves the viewer on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, viewer: Viewer) -> std::io::Result<()> {
    let app = Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/atlas.json", get(atlas_json))
        .route("/tiles/{layer}/{file}", get(tile))
        .route("/examples/{layer}/{file}", get(example))
        .route("/healthz", get(health))
        .fallback(not_found)
        .with_state(Arc::new(viewer));
    axum::serve(listener, app).await
}

type Ctx = State<Arc<Viewer>>;

async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        atlas::served_viewer_html(),
    )
        .into_response()
}

async fn atlas_json(State(v): Ctx, headers: HeaderMap) -> Response {
    let json = match v.atlas_json().await {
        Ok(j) => j,
        Err(e) => return unavailable(&e),
    };
    let digest = Sha256::digest(json.as_bytes());
    let etag = format!(
        "\"{}\"",
        digest[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    cached(&headers, &etag, "application/json", json.into_bytes())
}

async fn tile(
    State(v): Ctx,
    UrlPath((layer, file)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(filter) = file
        .strip_suffix(".png")
        .and_then(|n| n.parse::<i32>().ok())
        .filter(|&n| n >= 0)
    else {
        return not_found().await;
    };
    match v.tile(&layer, filter).await {
        Ok(Some((png, finished_at_ms))) => {
            // A stored result never changes; the run and the time it was stored name it.
            let etag = format!("\"{}-{finished_at_ms}\"", v.run_id());
            cached(&headers, &etag, "image/png", png)
        }
        Ok(None) => (
            StatusCode::NOT_FOUND,
            [(header::CACHE_CONTROL, "no-store")],
            format!(
                "run {} has no image of {layer} filter {filter} (not finished, failed, or no such filter)\n",
                v.run_id()
            ),
        )
            .into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn example(State(v): Ctx, UrlPath((layer, file)): UrlPath<(String, String)>) -> Response {
    let Some((filter, rank)) = file
        .strip_suffix(".png")
        .and_then(|n| n.split_once('-'))
        .and_then(|(f, r)| Some((f.parse::<i32>().ok()?, r.parse::<i64>().ok()?)))
        .filter(|&(f, r)| f >= 0 && r >= 1)
    else {
        return not_found().await;
    };
    match v.example_crop(&layer, filter, rank).await {
        // A rank's image changes while an examples pass goes on: never cached stale.
        Ok(Some(png)) => (
            [
                (header::CONTENT_TYPE, "image/png"),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            png,
        )
            .into_response(),
        Ok(None) => (
            StatusCode::NOT_FOUND,
            [(header::CACHE_CONTROL, "no-store")],
            format!("no example {rank} of {layer} filter {filter} is stored\n"),
        )
            .into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn health(State(v): Ctx) -> Response {
    match v.health().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        "not found: this server answers /, /atlas.json, /tiles/<layer>/<filter>.png, \
         /examples/<layer>/<filter>-<rank>.png and /healthz\n",
    )
        .into_response()
}

/// The store did not answer: said to the client, and logged.
fn unavailable(e: &ServeError) -> Response {
    tracing::warn!("serve: {e}");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CACHE_CONTROL, "no-store")],
        format!("the database does not answer: {e}\n"),
    )
        .into_response()
}

/// `body` with its `ETag`, or `304 Not Modified` when the client has it already.
fn cached(headers: &HeaderMap, etag: &str, content_type: &'static str, body: Vec<u8>) -> Response {
    let etag_value = HeaderValue::from_str(etag).expect("an ETag of hex digits is a header value");
    let seen = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let common = [
        (header::ETAG, etag_value),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
    ];
    if seen {
        (StatusCode::NOT_MODIFIED, common).into_response()
    } else {
        (
            common,
            [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
            body,
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_wal_database_is_one_without_its_wal_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("a.db");
        let mut header = vec![0u8; 100];
        header[..16].copy_from_slice(b"SQLite format 3\0");
        std::fs::write(&db, &header).unwrap();
        assert!(!quiet_wal(&db), "not in WAL mode");
        header[18] = 2;
        header[19] = 2;
        std::fs::write(&db, &header).unwrap();
        assert!(quiet_wal(&db));
        std::fs::write(dir.path().join("a.db-wal"), b"").unwrap();
        assert!(
            !quiet_wal(&db),
            "a -wal file: a writer has it, or left results in it"
        );
        assert!(!quiet_wal(&dir.path().join("none.db")));
    }

    #[test]
    fn runs_are_listed_with_their_progress() {
        let runs = [
            RunListing {
                run_id: "a".into(),
                created_at_ms: 1,
                filters: 64,
                finished: 64,
            },
            RunListing {
                run_id: "b".into(),
                created_at_ms: 2,
                filters: 128,
                finished: 3,
            },
        ];
        assert_eq!(
            listing(&runs),
            "a (64/64 filters finished), b (3/128 filters finished)"
        );
        assert_eq!(listing(&[]), "no run");
    }
}

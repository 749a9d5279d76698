//! A whole render, as `vgg-atlas render` runs it: plan the run, open the store, serve the
//! coordinator over gRPC (and health and metrics over HTTP), let the caller start its local
//! workers (which talk gRPC to it like remote ones), wait for the run to finish, and draw the
//! atlas. One code path for one machine and for a cluster's coordinator.
//!
//! In two phases, so that nothing is written until every input has been checked:
//! [`RenderConfig::check`] refuses bad input without side effects (the caller then loads the
//! weights and checks its devices), [`Checked::run`] takes the ports, then opens the store and
//! the output folder, and runs.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_stream::wrappers::TcpListenerStream;
use vgg_atlas_proto as pb;
use vgg_atlas_proto::tonic::transport::Server;
use vgg_atlas_proto::{Layer, Settings};

use crate::store::{self, LayerProgress, Store};
use crate::{draw, health, metrics, plan, service, space, Error, Result};

/// Where `render` writes when no `--out` is given: a folder no source folder is named like,
/// ignored by git and by the Docker build context.
pub const DEFAULT_OUT: &str = "out/atlas";
/// The database of a render into [`DEFAULT_OUT`], where `status`, `query`, `mosaic` and `serve`
/// look when no `--db` (or `VGG_ATLAS_DB`) is given.
pub const DEFAULT_DB: &str = "sqlite://out/atlas/atlas.db";

/// Everything a render is asked to do, as the user gave it.
#[derive(Debug, Clone)]
pub struct RenderConfig {
    pub layers: Vec<Layer>,
    pub settings: Settings,
    /// The output folder; the default database lives there too.
    pub out: PathBuf,
    /// sqlite://PATH or postgres://...; default sqlite://<out>/atlas.db.
    pub db: Option<String>,
    /// Where to accept remote workers; None: a loopback port for the local workers only.
    pub listen: Option<String>,
    /// The shared token workers must send.
    pub token: Option<String>,
    /// Accept workers without a token (loopback `listen` only).
    pub no_token: bool,
    /// TLS on `listen`: the certificate chain and its key (PEM).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Workers the caller starts in its own process (on a plain loopback port when `listen`
    /// has TLS).
    pub local_workers: usize,
    /// Serve /healthz and /metrics here.
    pub metrics_listen: Option<String>,
    pub lease_seconds: u64,
    pub max_attempts: i32,
    /// A new run even if this configuration was rendered before.
    pub fresh: bool,
    /// Plan only this many filters of each layer, spread across it ([`plan::spread`]): the
    /// same run, so a later render without a sample adds the rest and keeps these.
    pub sample: Option<usize>,
    /// Keep serving after the run is finished.
    pub stay: bool,
    pub mosaic: vgg_atlas_atlas::Options,
}

/// A configuration that passed [`RenderConfig::check`].
pub struct Checked {
    cfg: RenderConfig,
    token: Option<String>,
    check: pb::auth::CheckToken,
    server: Server,
}

/// Where the caller's local workers connect, and with which token.
#[derive(Debug, Clone)]
pub struct LocalEndpoint {
    pub url: String,
    pub token: Option<String>,
}

/// What a render tells its caller as it goes.
pub enum Event<'a> {
    /// A message for the user (a new or resumed run, where workers join, ...).
    Say(String),
    /// The progress of every layer, twice a second.
    Progress(&'a [LayerProgress]),
    /// Every filter is done or failed; the atlas is drawn next.
    Finished {
        run_id: &'a str,
        progress: &'a [LayerProgress],
    },
}

impl RenderConfig {
    /// Checks the layers, settings, atlas options, token and TLS files; writes nothing.
    pub fn check(self) -> Result<Checked> {
        self.mosaic.check()?;
        if self.sample == Some(0) {
            return Err(Error::Render(
                "--sample 0 plans no filter; give at least 1 (filters per layer)".into(),
            ));
        }
        for l in &self.layers {
            self.settings.check(l)?;
        }
        let token = token_for(self.listen.as_deref(), self.token.clone(), self.no_token)?;
        let check = pb::auth::CheckToken::new(token.as_deref())
            .map_err(|e| Error::Render(format!("bad --token: {e}")))?;
        // TLS is checked here too (files readable, PEM of the right kind, accepted by rustls),
        // before any state.
        let server = match &self.tls {
            Some((cert, key)) => {
                let tls = pb::tls::server(cert, key).map_err(Error::Render)?;
                Server::builder().tls_config(tls).map_err(|e| {
                    Error::Render(format!(
                        "--tls-cert {} / --tls-key {} cannot be used: {}",
                        cert.display(),
                        key.display(),
                        pb::tls::error_chain(&e)
                    ))
                })?
            }
            None => Server::builder(),
        };
        Ok(Checked {
            cfg: self,
            token,
            check,
            server,
        })
    }
}

impl Checked {
    /// Renders with the weights at `weights_path` (sha256 `weights_sha256`). Once the
    /// coordinator serves, `start_workers` is called with the endpoint for the caller's local
    /// workers (a plain loopback port even when `listen` has TLS). Returns when the run is
    /// finished and its atlas drawn (with `stay`, never).
    pub async fn run(
        self,
        weights_sha256: &str,
        weights_path: &Path,
        start_workers: impl FnOnce(LocalEndpoint),
        on: &mut (dyn FnMut(Event) + Send),
    ) -> Result<()> {
        let Checked {
            cfg,
            token,
            check,
            mut server,
        } = self;
        // The ports are taken before anything is written: one in use is an error that changes
        // nothing.
        let listen = cfg.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
        let listener = service::listen(&listen).await.map_err(|e| {
            Error::Render(format!(
                "cannot listen on {listen}: {e}; is another coordinator there?"
            ))
        })?;
        let metrics_listener = match &cfg.metrics_listen {
            Some(m) => Some(service::listen(m).await.map_err(|e| {
                Error::Render(format!("cannot listen on --metrics-listen {m}: {e}"))
            })?),
            None => None,
        };
        let db = cfg
            .db
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", cfg.out.join("atlas.db").display()));
        let store = open(&db, &cfg.out).await?;
        let fresh = cfg.fresh.then(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
        let mut spec = plan::plan(
            weights_sha256,
            &cfg.layers,
            &cfg.settings,
            cfg.max_attempts,
            fresh,
        );
        if let Some(n) = cfg.sample {
            spec = spec.sample(n);
            refuse_sample_of_a_bigger_plan(&*store, &spec).await?;
        }
        if fresh.is_none() {
            refuse_other_weights(
                &*store,
                &spec.run_id,
                weights_sha256,
                &cfg.layers,
                &cfg.settings,
            )
            .await?;
        }
        let created = store.create_or_resume_run(&spec).await?;
        let progress = store.progress(&spec.run_id).await?;
        let planned: i64 = progress.iter().map(|p| p.total).sum();
        let unstored: i64 = progress.iter().map(|p| p.pending + p.leased).sum();
        on(Event::Say(format!(
            "{} run {} ({}) in {}",
            if created { "new" } else { "resuming" },
            spec.run_id,
            match cfg.sample {
                Some(n) => format!("a sample: {n} filters of each layer, {planned} filters"),
                None => format!("{planned} filters"),
            },
            store::redact(&db)
        )));
        let db_file = match store::backend(&db)? {
            store::Backend::Sqlite(path) => Some(Path::new(path)),
            store::Backend::Postgres => None,
        };
        let needs = space::render_needs(
            db_file,
            &cfg.out,
            planned as u64,
            unstored as u64,
            cfg.settings.size,
            cfg.mosaic.tile,
        );
        for w in space::warnings("render", &needs) {
            on(Event::Say(format!("warning: {w}")));
        }
        let lease_ms = (cfg.lease_seconds * 1000) as i64;
        let ctx = service::RunContext {
            run_id: spec.run_id.clone(),
            settings: cfg.settings.to_wire(weights_sha256),
            layers: cfg.layers.iter().map(|l| l.name.to_string()).collect(),
            filters_total: spec.filters.len() as u32,
            weights_path: weights_path.to_path_buf(),
            lease_ms,
        };
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Render(e.to_string()))?;
        let tls = cfg.tls.is_some();
        if cfg.listen.is_some() {
            on(Event::Say(format!(
                "coordinator listening on {addr}{}; workers join with `vgg-atlas worker --connect {}://{}{}`{}{}",
                if tls { " with TLS" } else { "" },
                if tls { "https" } else { "http" },
                reachable(addr),
                if token.is_some() { "" } else { " --no-token" },
                if token.is_some() { " and the same token (--token or VGG_ATLAS_TOKEN)" } else { "" },
                if tls { ", giving --tls-ca the CA that signed --tls-cert" } else { "" },
            )));
        }
        let coordinator = service::CoordinatorService::new(store.clone(), ctx);
        let health = coordinator.stats();
        if let Some(listener) = metrics_listener {
            let at = listener
                .local_addr()
                .map_err(|e| Error::Render(e.to_string()))?;
            on(Event::Say(format!(
                "health on http://{at}/healthz, Prometheus metrics on http://{at}/metrics"
            )));
            tokio::spawn(metrics::serve(
                listener,
                store.clone(),
                spec.run_id.clone(),
                coordinator.stats(),
                Duration::from_secs(cfg.lease_seconds),
            ));
        }
        // Local workers get a plain loopback port of their own when --listen has TLS (same
        // service, same token) instead of needing the CA.
        let local_addr = if tls && cfg.local_workers > 0 {
            let local = service::listen("127.0.0.1:0")
                .await
                .map_err(|e| Error::Render(format!("cannot listen on loopback: {e}")))?;
            let local_addr = local
                .local_addr()
                .map_err(|e| Error::Render(e.to_string()))?;
            tokio::spawn(
                Server::builder()
                    .add_service(coordinator.clone().into_server(check.clone()))
                    .serve_with_incoming(TcpListenerStream::new(local)),
            );
            local_addr
        } else {
            addr
        };
        tokio::spawn(
            server
                .add_service(coordinator.into_server(check))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        // A run that is already finished (rendered again) needs no workers: started, they would
        // only find the coordinator gone when this returns.
        if !store.is_finished(&spec.run_id).await? {
            start_workers(LocalEndpoint {
                url: format!("http://{local_addr}"),
                token: token.clone(),
            });
        }
        loop {
            // An outage of the store (a database server restarting, a full disk) is waited out,
            // said once in the log (see `health`); any other error ends the render.
            let polled = async {
                let progress = store.progress(&spec.run_id).await?;
                let finished = store.is_finished(&spec.run_id).await?;
                health
                    .store
                    .recovered(&*store, &spec.run_id, lease_ms)
                    .await?;
                Ok::<_, Error>((finished, progress))
            }
            .await;
            let (finished, progress) = match polled {
                Ok(p) => p,
                Err(e) if health.store.failed(&e).is_some() => {
                    tokio::time::sleep(health::OUTAGE_RECHECK).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if finished {
                on(Event::Finished {
                    run_id: &spec.run_id,
                    progress: &progress,
                });
                // The run is finished: no lease is held any more.
                let drawn = health
                    .store
                    .patiently(false, || {
                        draw::write_atlas(store.clone(), &spec.run_id, &cfg.out, cfg.mosaic)
                    })
                    .await?;
                for w in &drawn.warnings {
                    on(Event::Say(format!("warning: {w}")));
                }
                on(Event::Say(drawn.describe(&spec.run_id, &cfg.out)));
                if cfg.sample.is_some() {
                    on(Event::Say(
                        "this was a sample: the same command without --sample renders every \
                         filter of these layers and keeps the sample's results"
                            .into(),
                    ));
                }
                if cfg.stay {
                    on(Event::Say(
                        "staying up (--stay): workers that ask are told the run is finished".into(),
                    ));
                    std::future::pending::<()>().await;
                }
                if cfg.listen.is_some() {
                    // Keep answering until every idle remote worker has polled once more and
                    // been told the run is finished, so they exit instead of waiting for us.
                    let linger =
                        service::retry_after_ms((cfg.lease_seconds * 1000) as i64) as u64 + 1000;
                    tokio::time::sleep(Duration::from_millis(linger)).await;
                }
                store.close().await;
                return Ok(());
            }
            on(Event::Progress(&progress));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// The token workers must send to a coordinator listening on `listen`: the one given; a random
/// one when it listens for its own local workers only (no `listen`); none with `no_token`, which
/// is refused unless `listen` is a loopback address.
pub fn token_for(
    listen: Option<&str>,
    token: Option<String>,
    no_token: bool,
) -> Result<Option<String>> {
    match (listen, token, no_token) {
        (_, Some(t), _) => Ok(Some(t)),
        (None, None, _) => Ok(Some(format!(
            "local-{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ))),
        (Some(addr), None, true) => {
            let loopback = addr
                .parse::<SocketAddr>()
                .map(|a| a.ip().is_loopback())
                .unwrap_or(addr.starts_with("localhost:"));
            if !loopback {
                return Err(Error::Render(format!(
                    "--no-token is only for loopback addresses; on {addr} anyone who can reach \
                     the port could feed or read the run. Give --token (or VGG_ATLAS_TOKEN)"
                )));
            }
            Ok(None)
        }
        (Some(addr), None, false) => Err(Error::Render(format!(
            "--listen {addr} needs a token, so that only your workers can feed or read the run: \
             give --token (or VGG_ATLAS_TOKEN; e.g. `export VGG_ATLAS_TOKEN=$(openssl rand -hex 32)`) \
             here and to each worker, or --no-token on a loopback address"
        ))),
    }
}

/// The address a worker on another machine connects to: a wildcard listen address
/// (0.0.0.0, ::) is reached through this machine's host name.
pub fn reachable(addr: SocketAddr) -> String {
    if !addr.ip().is_unspecified() {
        return addr.to_string();
    }
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let host = if host.is_empty() {
        "THIS-HOST".into()
    } else {
        host
    };
    format!("{host}:{}", addr.port())
}

/// A sample render of a run whose plan already holds unfinished filters beyond the sample (a
/// whole render of it began) would have to render them too before it could finish; say so and
/// change nothing.
async fn refuse_sample_of_a_bigger_plan(store: &dyn Store, spec: &store::RunSpec) -> Result<()> {
    let sampled: std::collections::HashSet<(&str, i32)> = spec
        .filters
        .iter()
        .map(|f| (f.layer.as_str(), f.filter))
        .collect();
    let beyond = store
        .unfinished_filters(&spec.run_id)
        .await?
        .into_iter()
        .filter(|(layer, filter)| !sampled.contains(&(layer.as_str(), *filter)))
        .count();
    if beyond > 0 {
        return Err(Error::Render(format!(
            "run {} already plans {beyond} unfinished filters beyond this sample (a render of \
             every filter of these layers began): a sample of it would render them too. Run the \
             same command without --sample to go on with the whole run, or add --fresh for a \
             sample in a run of its own; nothing was changed",
            spec.run_id
        )));
    }
    Ok(())
}

/// Opens the store for a render. Nothing is written until every input has been checked: the
/// database URL first, a database server reached before the output folder is made, the folder
/// proven writable (the atlas goes there at the end of a long render).
async fn open(db: &str, out: &Path) -> Result<Arc<dyn Store>> {
    let server = match store::backend(db)? {
        store::Backend::Postgres => Some(store::connect(db).await?),
        store::Backend::Sqlite(_) => None,
    };
    let made_out = !out.exists();
    let opened = async {
        writable_folder(out)?;
        match server {
            Some(s) => Ok(s),
            None => store::connect(db).await,
        }
    }
    .await;
    if opened.is_err() && made_out {
        let _ = std::fs::remove_dir(out); // only if still empty
    }
    opened
}

/// Makes `dir` if needed and proves it writable with a probe file, so that a render never runs
/// for hours and then fails to write its atlas.
fn writable_folder(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::Render(format!(
            "cannot create output folder {}: {e}; choose another --out",
            dir.display()
        ))
    })?;
    let probe = dir.join(format!(".vgg-atlas-write-test-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| {
            Error::Render(format!(
                "output folder {} is not writable: {e}; choose another --out",
                dir.display()
            ))
        })
}

/// Refuses to start a second run of the same layers and settings next to one made with other
/// weights: the user most likely meant to resume it, and an atlas of two networks is not one.
async fn refuse_other_weights(
    store: &dyn Store,
    run_id: &str,
    sha256: &str,
    layers: &[Layer],
    settings: &Settings,
) -> Result<()> {
    let runs = store.runs().await?;
    if runs.iter().any(|(id, _, _)| id == run_id) {
        return Ok(()); // resuming this very run
    }
    for (id, _, _) in &runs {
        let other = store.run_info(id).await?;
        if other.weights_sha256 == sha256 {
            continue;
        }
        if plan::plan(&other.weights_sha256, layers, settings, 1, None).run_id == *id {
            return Err(Error::Render(format!(
                "this database holds run {id} of the same layers and settings, made with weights \
                 sha256 {}, but these weights are sha256 {sha256}. Resuming it with other weights \
                 would mix two networks in one atlas. Give the weights it was made with \
                 (--weights FILE with that sha256), or --fresh to start a new run with these \
                 weights beside it; nothing was changed",
                other.weights_sha256
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_database_is_in_the_default_output_folder() {
        assert_eq!(DEFAULT_DB, format!("sqlite://{DEFAULT_OUT}/atlas.db"));
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let first = Path::new(DEFAULT_OUT).components().next().unwrap();
        let ignored = std::fs::read_to_string(root.join(".gitignore")).unwrap();
        let name = first.as_os_str().to_str().unwrap();
        assert!(
            ignored.lines().any(|l| l.trim_matches('/') == name),
            "{name} is in .gitignore"
        );
        let docker = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
        assert!(
            docker.lines().any(|l| l.trim_matches('/') == name),
            "{name} is in .dockerignore"
        );
        for crate_dir in ["atlas", "coordinator", "proto", "worker", "src", "tests"] {
            assert_ne!(name, crate_dir, "the output folder is no source folder");
        }
    }

    #[test]
    fn a_wildcard_listen_address_is_reached_by_host_name() {
        assert_eq!(
            reachable("10.1.2.3:50051".parse().unwrap()),
            "10.1.2.3:50051"
        );
        let wild = reachable("0.0.0.0:50051".parse().unwrap());
        assert!(
            wild.ends_with(":50051") && !wild.starts_with("0.0.0.0"),
            "{wild}"
        );
    }
}

//! `vgg-atlas serve`: the atlas viewer over HTTP, read from the database (never written), live
//! while a run goes on. The server is `vgg_atlas_coordinator::serve`; docs/viewer.md is the
//! user's page.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use clap::Args;
use vgg_atlas_coordinator::serve::{self, Viewer};
use vgg_atlas_coordinator::standalone::DEFAULT_DB;

use crate::args::runtime;

#[derive(Args)]
pub struct ServeArgs {
    /// The database to read, never written: sqlite://PATH (the file a render wrote) or
    /// postgres://USER:PASSWORD@HOST:PORT/DATABASE.
    #[arg(long, env = "VGG_ATLAS_DB", hide_env_values = true, default_value = DEFAULT_DB)]
    pub db: String,
    /// Where to listen, HOST:PORT (0.0.0.0:8080: every interface; port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The run to show when the database holds several (default: the newest).
    #[arg(long)]
    pub run: Option<String>,
}

pub fn serve(a: ServeArgs) -> Result<()> {
    runtime()?.block_on(async {
        let viewer = Viewer::open(&a.db, a.run.as_deref()).await?;
        if a.run.is_none() && viewer.runs().len() > 1 {
            eprintln!(
                "{} holds {} runs: {}; serving the newest (choose with --run)",
                viewer.url(),
                viewer.runs().len(),
                viewer
                    .runs()
                    .iter()
                    .map(|r| r.run_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(note) = viewer.schema_note() {
            eprintln!("note: {note}");
        }
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .map_err(|e| listen_error(&a.listen, e))?;
        let addr = listener.local_addr()?;
        let run = viewer
            .runs()
            .iter()
            .find(|r| r.run_id == viewer.run_id())
            .map(|r| format!("{r}"))
            .unwrap_or_else(|| viewer.run_id().to_string());
        eprintln!(
            "serving run {run} from {} (read-only; the viewer updates every 5 s)",
            viewer.url()
        );
        eprintln!("open {}", url_to_open(addr));
        serve::serve(listener, viewer)
            .await
            .context("the HTTP server stopped")
    })
}

/// What a browser on this machine opens (every interface: through localhost).
fn url_to_open(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        format!(
            "http://localhost:{port}/ (listening on every interface: from another machine, \
             http://THIS-HOST:{port}/)",
            port = addr.port()
        )
    } else {
        format!("http://{addr}/")
    }
}

fn listen_error(listen: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        anyhow::anyhow!(
            "cannot listen on {listen}: the address is in use (another `vgg-atlas serve`?); \
             choose another --listen, e.g. 127.0.0.1:8081 (port 0 picks a free one)"
        )
    } else {
        anyhow::anyhow!(
            "cannot listen on {listen}: {e}; --listen takes HOST:PORT, e.g. 127.0.0.1:8080 or \
             0.0.0.0:8080"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_to_open_names_a_reachable_host() {
        assert_eq!(
            url_to_open("127.0.0.1:8080".parse().unwrap()),
            "http://127.0.0.1:8080/"
        );
        assert_eq!(url_to_open("[::1]:80".parse().unwrap()), "http://[::1]:80/");
        assert!(url_to_open("0.0.0.0:8080".parse().unwrap()).starts_with("http://localhost:8080/ "));
    }
}

//! Faults a long render meets on real machines, each injected into real processes: the
//! coordinator killed and restarted, the network cut, a worker that hangs, a database locked
//! by someone else, a filter whose ascent goes NaN. Each test prints one `FAULTS` line with
//! what was injected, how many filters were lost (must be 0) and how many were computed again;
//! docs/reliability.md reports them (`cargo test --test faults -- --nocapture | grep FAULTS`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

fn db_of(dir: &std::path::Path) -> String {
    format!("sqlite://{}", dir.join("atlas.db").display())
}

fn stop(mut c: Child) {
    let _ = c.kill();
    let _ = c.wait();
}

/// After the run: all 128 filters finished, every one finished before the fault with the same
/// result as then, and no filter leased twice (nothing computed again).
fn assert_nothing_lost_or_redone(
    dir: &std::path::Path,
    before: &std::collections::HashMap<(String, i64), i64>,
) {
    let after = finished_at(&dir.join("atlas.db"));
    assert_eq!(after.len(), 128);
    for (key, t) in before {
        assert_eq!(
            after.get(key),
            Some(t),
            "filter {key:?} was lost or recomputed"
        );
    }
    assert_eq!(recomputed(&db_of(dir)), 0, "filters computed again");
}

#[test]
fn the_coordinator_killed_and_restarted_loses_and_recomputes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_of(dir.path());
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = PLAN.to_vec();
    args.extend(["--lease-seconds", "30"]);
    let (first, addr) = coordinator_on(&listen, dir.path(), &args);
    let mut w = worker(&addr, "steady");
    wait_until("16 finished filters", Duration::from_secs(120), || {
        done(&db) >= 16
    });
    stop(first); // SIGKILL, with the worker mid-batch
    let before = finished_at(&dir.path().join("atlas.db"));
    std::thread::sleep(Duration::from_secs(2)); // the worker retries meanwhile
    let (mut second, _) = coordinator_on(&listen, dir.path(), &args);
    assert!(wait(&mut second, Duration::from_secs(300)).success());
    assert!(
        wait(&mut w, Duration::from_secs(30)).success(),
        "the same worker process reconnected and finished"
    );
    // The batch in flight at the kill is kept by the worker and submitted after the restart; a
    // lease whose answer was lost with the kill is sent to it again.
    assert_nothing_lost_or_redone(dir.path(), &before);
    eprintln!(
        "FAULTS coordinator SIGKILL + restart: 1 injected, {} finished before, 0 lost, 0 recomputed",
        before.len()
    );
}

/// A TCP proxy between workers and the coordinator that the test can cut: every open
/// connection is shut down and new ones are dropped until it is restored.
struct Proxy {
    addr: String,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    accepted: Arc<AtomicUsize>,
}

impl Proxy {
    fn start(upstream: &str) -> Proxy {
        let upstream = upstream.trim_start_matches("http://").to_string();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let cut = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::<TcpStream>::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (c, o, a) = (cut.clone(), open.clone(), accepted.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::SeqCst) {
                    drop(client); // the network is down: connections die at once
                    continue;
                }
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let mut held = o.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(server.try_clone().unwrap());
                pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                pipe(server, client);
            }
        });
        Proxy {
            addr,
            cut,
            open,
            accepted,
        }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
    });
}

#[test]
fn a_worker_recovers_from_a_network_cut_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_of(dir.path());
    let mut args = PLAN.to_vec();
    args.extend(["--lease-seconds", "30"]);
    let (mut render, addr) = coordinator(dir.path(), &args);
    let proxy = Proxy::start(&addr);
    let mut w = worker(&proxy.addr, "behind-proxy");
    wait_until("16 finished filters", Duration::from_secs(120), || {
        done(&db) >= 16
    });
    let before = finished_at(&dir.path().join("atlas.db"));
    proxy.cut();
    std::thread::sleep(Duration::from_secs(4));
    let during = done(&db);
    proxy.restore();
    assert!(wait(&mut render, Duration::from_secs(300)).success());
    assert!(
        wait(&mut w, Duration::from_secs(30)).success(),
        "the worker finished the run"
    );
    assert!(
        proxy.accepted.load(Ordering::SeqCst) >= 2,
        "the worker connected again after the cut"
    );
    assert_nothing_lost_or_redone(dir.path(), &before);
    eprintln!(
        "FAULTS network cut for 4 s: 1 injected, {during} finished before it ended, 0 lost, 0 recomputed"
    );
}

#[test]
fn a_stalled_worker_loses_its_lease_and_its_late_results_do_not_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_of(dir.path());
    let args = [
        "--layers",
        "block1_conv2,block2_conv1",
        "--size",
        "32",
        "--steps",
        "20",
        "--lease-seconds",
        "2",
    ];
    let (mut render, addr, log) = coordinator_logged("127.0.0.1:0", dir.path(), &args);
    // It computes a batch, then hangs for 4 s (no heartbeats, connection open), then submits.
    let stalled = bin()
        .env("VGG_ATLAS_TEST_STALL_SECONDS", "4")
        .args(["worker", "--connect", &addr, "--name", "stalled"])
        .args(["--batch", "8", "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "the stalled worker's leases",
        Duration::from_secs(60),
        || count(&status(&db), "leased") >= 8,
    );
    let mut healthy = worker(&addr, "healthy");
    // No stored result may ever change: watched while the run goes on, and once more at the end.
    let file = dir.path().join("atlas.db");
    let mut seen = std::collections::HashMap::new();
    let mut watch = || {
        for (key, t) in finished_at(&file) {
            if let Some(first) = seen.insert(key.clone(), t) {
                assert_eq!(first, t, "the result of {key:?} was overwritten");
            }
        }
    };
    while render.try_wait().unwrap().is_none() {
        watch();
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(wait(&mut render, Duration::from_secs(1)).success());
    watch();
    assert!(wait(&mut healthy, Duration::from_secs(30)).success());
    stop(stalled); // it may still be hanging on a lease of its own
    assert_eq!(seen.len(), 64 + 128, "one result per filter");

    let log = log.lock().unwrap().join("\n");
    let refused = log
        .lines()
        .filter(|l| l.contains("submission not recorded") && l.contains("worker=stalled@cpu-"))
        .count();
    assert!(refused > 0, "no late submission was refused:\n{log}");
    eprintln!(
        "FAULTS worker stalled 4 s per lease (lease 2 s): {refused} late results refused, 0 lost, 0 overwritten, {} recomputed",
        recomputed(&db)
    );
}

/// `sqlite3` with its stdin held open, to hold transactions on the store from outside.
struct Sqlite3 {
    child: Child,
    out: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl Sqlite3 {
    fn open(path: &std::path::Path) -> Option<Sqlite3> {
        let mut child = std::process::Command::new("sqlite3")
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let out = BufReader::new(child.stdout.take().unwrap()).lines();
        Some(Sqlite3 { child, out })
    }

    /// Runs statements ending in one SELECT and returns its one-line answer.
    fn ask(&mut self, sql: &str) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{sql}").unwrap();
        stdin.flush().unwrap();
        self.out.next().unwrap().unwrap()
    }
}

#[test]
fn the_render_goes_on_while_others_hold_the_sqlite_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_of(dir.path());
    let file = dir.path().join("atlas.db");
    let mut render = bin()
        .args(["render", "--batch", "4", "--threads", "1", "--out"])
        .arg(dir.path())
        .args(PLAN)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("4 finished filters", Duration::from_secs(120), || {
        done(&db) >= 4
    });
    let Some(mut reader) = Sqlite3::open(&file) else {
        stop(render);
        assert!(
            std::env::var_os("CI").is_none(),
            "sqlite3 is missing; .ci/run installs it"
        );
        eprintln!("skipped: no sqlite3 on this machine");
        return;
    };
    // A read transaction held for the rest of the render (as a long analysis would)...
    let seen: i64 = reader
        .ask("BEGIN; SELECT COUNT(*) FROM results;")
        .parse()
        .unwrap();
    // ...a writer holding the write lock for 3 s, while the workers keep submitting...
    let mut writer = Sqlite3::open(&file).unwrap();
    assert_eq!(writer.ask("BEGIN IMMEDIATE; SELECT 'locked';"), "locked");
    std::thread::sleep(Duration::from_secs(3));
    writer.ask("COMMIT; SELECT 'free';");
    // ...and `query` running alongside.
    for _ in 0..5 {
        query(
            &db,
            "SELECT layer, COUNT(*) FROM best_filters GROUP BY layer",
            "csv",
        );
    }
    assert!(
        wait(&mut render, Duration::from_secs(300)).success(),
        "the render finished"
    );
    assert_eq!(
        reader
            .ask("SELECT COUNT(*) FROM results;")
            .parse::<i64>()
            .unwrap(),
        seen,
        "the reader kept its snapshot throughout"
    );
    reader.ask("COMMIT; SELECT 1;");
    assert_eq!(done(&db), 128);
    eprintln!(
        "FAULTS SQLite held by a reader for the whole render and locked by a writer for 3 s: 2 injected, 0 lost, {} recomputed",
        recomputed(&db)
    );
    stop(reader.child);
    stop(writer.child);
}

#[test]
fn a_filter_whose_ascent_goes_nan_is_retried_then_failed_and_the_run_completes() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_of(dir.path());
    let o = bin()
        .env("VGG_ATLAS_TEST_INJECT_NAN_FILTER", "5")
        .args([
            "render",
            "--max-attempts",
            "2",
            "--batch",
            "8",
            "--threads",
            "1",
        ])
        .args([
            "--layers",
            "block1_conv1",
            "--size",
            "32",
            "--steps",
            "5",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains(" 1 failed"), "{err}");
    let failed: serde_json::Value = serde_json::from_str(&query(
        &db,
        "SELECT layer, filter, attempts, failed_reason FROM filters WHERE state = 'failed'",
        "json",
    ))
    .unwrap();
    let failed = failed.as_array().unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["filter"], 5);
    assert_eq!(failed[0]["attempts"], 2, "retried up to the attempt limit");
    let reason = failed[0]["failed_reason"].as_str().unwrap();
    assert!(
        reason.to_lowercase().contains("nan") || reason.contains("finite"),
        "{reason}"
    );
    let stored: serde_json::Value = serde_json::from_str(&query(
        &db,
        "SELECT COUNT(*) AS n, SUM(activation IS NULL OR activation != activation) AS nan \
         FROM results",
        "json",
    ))
    .unwrap();
    assert_eq!(stored[0]["n"], 63);
    assert_eq!(stored[0]["nan"], 0, "no NaN stored");
    eprintln!("FAULTS NaN in one filter's ascent: 1 injected, failed after 2 attempts ({reason}), 0 lost, 1 recomputed (the retry)");
}

/// A coordinator that sends absurd settings (a 100,000 px image, a million steps): the worker
/// process refuses each lease instead of trying to allocate it, every filter is recorded as
/// failed with the reason, the run ends, and the worker exits cleanly.
#[test]
fn a_worker_refuses_absurd_settings_from_the_wire_and_the_run_still_ends() {
    use vgg_atlas_coordinator::service::{self, CoordinatorService, RunContext};
    use vgg_atlas_coordinator::{plan, store};
    use vgg_atlas_proto as pb;

    let dir = tempfile::tempdir().unwrap();
    let db = db_of(dir.path());
    let weights = vgg_atlas_worker::fetch::default_weights_path().unwrap();
    let sha = vgg_atlas_worker::fetch::file_sha256(&weights).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = rt.block_on(async {
        let store = store::connect(&db).await.unwrap();
        let layer = pb::Layer::by_name("block1_conv1").unwrap();
        let settings = pb::Settings::default();
        let spec = plan::plan(&sha, &[layer], &settings, 2, None).sample(8);
        store.create_or_resume_run(&spec).await.unwrap();
        let mut wire = settings.to_wire(&sha);
        wire.size = 100_000;
        wire.steps = 1_000_000;
        let ctx = RunContext {
            run_id: spec.run_id.clone(),
            settings: wire,
            layers: vec![layer.name.to_string()],
            filters_total: spec.filters.len() as u32,
            weights_path: weights.clone(),
            lease_ms: 60_000,
        };
        let listener = service::listen("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let check = pb::auth::CheckToken::new(None).unwrap();
        tokio::spawn(
            pb::tonic::transport::Server::builder()
                .add_service(CoordinatorService::new(store, ctx).into_server(check))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    });
    let out = bin()
        .env_remove("VGG_ATLAS_TOKEN")
        .args([
            "worker",
            "--connect",
            &format!("http://{addr}"),
            "--no-token",
        ])
        .args(["--batch", "4", "--threads", "1", "--give-up-after", "60s"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&query(
        &db,
        "SELECT state, attempts, failed_reason FROM filters",
        "json",
    ))
    .unwrap();
    assert_eq!(rows.len(), 8);
    for r in &rows {
        assert_eq!(r["state"], "failed", "{r}");
        let why = r["failed_reason"].as_str().unwrap();
        assert!(
            why.contains("the worker refused the lease") && why.contains("at most 4096 px"),
            "{why}"
        );
    }
    let attempts: i64 = rows.iter().map(|r| r["attempts"].as_i64().unwrap()).sum();
    println!(
        "FAULTS coordinator sending 100,000 px and 1,000,000 steps: 8 filters, 0 lost (all \
         recorded failed with the reason), {} attempts (2 each), worker exited cleanly",
        attempts
    );
    drop(rt);
}

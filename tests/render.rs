//! The distributed render with real processes: a coordinator (`render --listen`) and worker
//! processes talking gRPC on loopback, a SQLite store, kill -9 and resume.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The token of every test coordinator; the workers get it from the environment.
const TOKEN: &str = "render-test-token-0123456789";

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vgg-atlas"));
    c.env("VGG_ATLAS_TOKEN", TOKEN);
    c
}

/// Starts `render` as a pure coordinator on a loopback port and returns it with its address.
fn coordinator(out: &Path, extra: &[&str]) -> (Child, String) {
    let mut child = bin()
        .args([
            "render",
            "--listen",
            "127.0.0.1:0",
            "--local-workers",
            "0",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("render printed its address").unwrap();
        if let Some(rest) = line.split("--connect ").nth(1) {
            break rest.split('`').next().unwrap().to_string();
        }
    };
    // Keep draining stderr so the coordinator never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

fn worker(addr: &str, name: &str) -> Child {
    bin()
        .args([
            "worker",
            "--connect",
            addr,
            "--name",
            name,
            "--batch",
            "8",
            "--threads",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            t.elapsed() < limit,
            "process did not finish within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status(db: &str) -> Vec<serde_json::Value> {
    let o = bin()
        .args(["status", "--db", db, "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<serde_json::Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn count(rows: &[serde_json::Value], key: &str) -> i64 {
    rows.iter().map(|r| r[key].as_i64().unwrap()).sum()
}

const SMALL: [&str; 6] = [
    "--layers",
    "block1_conv1,block2_conv1",
    "--size",
    "32",
    "--steps",
    "3",
];

#[test]
fn two_worker_processes_finish_every_filter_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut render, addr) = coordinator(dir.path(), &SMALL);
    let mut a = worker(&addr, "a");
    let mut b = worker(&addr, "b");
    assert!(wait(&mut render, Duration::from_secs(300)).success());
    assert!(
        wait(&mut a, Duration::from_secs(30)).success(),
        "worker a exits 0 when the run is finished"
    );
    assert!(wait(&mut b, Duration::from_secs(30)).success());
    let rows = status(&format!(
        "sqlite://{}",
        dir.path().join("atlas.db").display()
    ));
    assert_eq!(rows.len(), 2);
    assert_eq!(count(&rows, "total"), 64 + 128);
    assert_eq!(count(&rows, "done"), 64 + 128);
    assert_eq!(
        count(&rows, "pending") + count(&rows, "leased") + count(&rows, "failed"),
        0
    );

    // `query` answers from the same database, in each format.
    let db = format!("sqlite://{}", dir.path().join("atlas.db").display());
    let per_layer = query(
        &db,
        "SELECT layer, COUNT(*) AS n, MIN(rank) AS top, MAX(rank) AS bottom \
         FROM best_filters GROUP BY layer ORDER BY layer",
        "json",
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&per_layer).unwrap(),
        serde_json::json!([
            {"layer": "block1_conv1", "n": 64, "top": 1, "bottom": 64},
            {"layer": "block2_conv1", "n": 128, "top": 1, "bottom": 128},
        ])
    );
    let best = query(
        &db,
        "SELECT layer, filter, activation FROM best_filters WHERE rank <= 3 ORDER BY layer, rank",
        "csv",
    );
    let lines: Vec<&str> = best.lines().collect();
    assert_eq!(lines[0], "layer,filter,activation");
    assert_eq!(lines.len(), 1 + 6, "{best}");
    let activations: Vec<f64> = lines[1..4]
        .iter()
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    assert!(
        activations[0] >= activations[1]
            && activations[1] >= activations[2]
            && activations[2] > 0.0,
        "rank 1 is the strongest: {activations:?}"
    );
    let table = query(
        &db,
        "SELECT layer, filter, image FROM results WHERE filter = 0 ORDER BY layer",
        "table",
    );
    assert!(
        table.contains("block2_conv1")
            && table.contains(" bytes>")
            && table.ends_with("(2 rows)\n"),
        "{table}"
    );

    // A write is refused, says so, and changes nothing.
    let o = bin()
        .args(["query", "--db", &db, "DELETE FROM results"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("read-only") && err.contains("nothing was changed"),
        "{err}"
    );
    assert_eq!(count(&status(&db), "done"), 64 + 128);
}

fn query(db: &str, sql: &str, format: &str) -> String {
    let o = bin()
        .args(["query", "--db", db, "--format", format, sql])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{sql}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn a_killed_worker_s_lease_is_finished_by_another_worker() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("atlas.db").display());
    let args = [
        "--layers",
        "block1_conv1,block2_conv1",
        "--size",
        "32",
        "--steps",
        "40",
        "--lease-seconds",
        "2",
    ];
    let (mut render, addr) = coordinator(dir.path(), &args);
    let mut a = worker(&addr, "doomed");
    let t = Instant::now();
    // Two leases of 8: the one computing and the next, fetched meanwhile (the overlap).
    while count(&status(&db), "leased") < 16 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "worker never held a lease and a prefetched one"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    a.kill().unwrap(); // SIGKILL, mid-lease
    a.wait().unwrap();
    let mut b = worker(&addr, "survivor");
    assert!(wait(&mut render, Duration::from_secs(300)).success());
    assert!(wait(&mut b, Duration::from_secs(30)).success());
    let rows = status(&db);
    assert_eq!(count(&rows, "done"), 64 + 128);
}

#[test]
fn render_resumes_after_kill_9_without_recomputing_finished_filters() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("atlas.db").display());
    let args = [
        "render",
        "--layers",
        "block1_conv1,block1_conv2",
        "--size",
        "32",
        "--steps",
        "30",
        "--batch",
        "4",
        "--threads",
        "1",
        "--out",
    ];
    let mut first = bin()
        .args(args)
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while status_or_empty(&db).map(|r| count(&r, "done")).unwrap_or(0) < 8 {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no progress before the kill"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let before = finished_at(&dir.path().join("atlas.db"));
    assert!(
        before.len() >= 8 && before.len() < 128,
        "killed mid-run: {} finished",
        before.len()
    );
    let second = bin().args(args).arg(dir.path()).output().unwrap();
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert!(String::from_utf8_lossy(&second.stderr).contains("resuming run"));
    let after = finished_at(&dir.path().join("atlas.db"));
    assert_eq!(after.len(), 128);
    for (key, t) in &before {
        assert_eq!(after.get(key), Some(t), "filter {key:?} was recomputed");
    }
}

fn status_or_empty(db: &str) -> Option<Vec<serde_json::Value>> {
    let o = bin().args(["status", "--db", db, "--json"]).output().ok()?;
    o.status
        .success()
        .then(|| {
            serde_json::from_slice::<serde_json::Value>(&o.stdout)
                .ok()?
                .as_array()
                .cloned()
        })
        .flatten()
}

/// (layer, filter) -> finished_at_ms of every stored result, read with the sqlite3-compatible
/// file directly through the project's store.
fn finished_at(db: &Path) -> std::collections::HashMap<(String, i32), i64> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let store = vgg_atlas_coordinator::store::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        let mut out = std::collections::HashMap::new();
        for (run_id, _, _) in store.runs().await.unwrap() {
            for layer in ["block1_conv1", "block1_conv2"] {
                for f in 0..64 {
                    if let Some(r) = store.result(&run_id, layer, f).await.unwrap() {
                        out.insert((layer.to_string(), f), r.finished_at_ms);
                    }
                }
            }
        }
        out
    })
}

#[test]
fn a_worker_with_the_wrong_token_is_refused_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (mut render, addr) = coordinator(dir.path(), &SMALL);
    let o = bin()
        .env("VGG_ATLAS_TOKEN", "not-the-render-token-0000")
        .args(["worker", "--connect", &addr, "--threads", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("wrong token"), "{err}");
    let o = bin()
        .env_remove("VGG_ATLAS_TOKEN")
        .args(["worker", "--connect", &addr, "--threads", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("requires a token"));
    // Nothing was leased to them.
    let db = format!("sqlite://{}", dir.path().join("atlas.db").display());
    assert_eq!(
        count(&status(&db), "leased") + count(&status(&db), "done"),
        0
    );
    render.kill().unwrap();
    render.wait().unwrap();
}

#[test]
fn listening_beyond_loopback_needs_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let o = bin()
        .env_remove("VGG_ATLAS_TOKEN")
        .args([
            "render",
            "--listen",
            "0.0.0.0:0",
            "--local-workers",
            "0",
            "--out",
            &out,
        ])
        .args(SMALL)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs a token"));
    let o = bin()
        .env_remove("VGG_ATLAS_TOKEN")
        .args([
            "render",
            "--listen",
            "0.0.0.0:0",
            "--no-token",
            "--local-workers",
            "0",
            "--out",
            &out,
        ])
        .args(SMALL)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("only for loopback"));
    let o = bin()
        .args(["render", "--token", "short", "--out", &out])
        .args(SMALL)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 16"));
    assert!(
        !dir.path().join("atlas.db").exists(),
        "a refused render writes nothing"
    );
}

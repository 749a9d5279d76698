//! Helpers of the tests with real processes: a coordinator (`render --listen`), worker
//! processes talking gRPC on loopback, and the CLI reading the SQLite store.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The token of every test coordinator; the workers get it from the environment.
pub const TOKEN: &str = "render-test-token-0123456789";

/// Two cheap layers, 128 filters, slow enough (30 steps) that a fault lands mid-run.
pub const PLAN: [&str; 6] = [
    "--layers",
    "block1_conv1,block1_conv2",
    "--size",
    "32",
    "--steps",
    "30",
];

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vgg-atlas"));
    c.env("VGG_ATLAS_TOKEN", TOKEN);
    c
}

/// Starts `render` as a pure coordinator on a loopback port and returns it with its address.
pub fn coordinator(out: &Path, extra: &[&str]) -> (Child, String) {
    coordinator_on("127.0.0.1:0", out, extra)
}

/// `coordinator` on a given address (e.g. the same port again after a restart).
pub fn coordinator_on(listen: &str, out: &Path, extra: &[&str]) -> (Child, String) {
    let (child, addr, _) = coordinator_logged(listen, out, extra);
    (child, addr)
}

/// `coordinator_on`, also returning everything it writes to stderr (its log) as it comes.
pub fn coordinator_logged(
    listen: &str,
    out: &Path,
    extra: &[&str],
) -> (Child, String, Arc<Mutex<Vec<String>>>) {
    let mut child = bin()
        .args([
            "render",
            "--listen",
            listen,
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
    let log = Arc::new(Mutex::new(Vec::new()));
    let addr = loop {
        let line = lines.next().expect("render printed its address").unwrap();
        log.lock().unwrap().push(line.clone());
        if let Some(rest) = line.split("--connect ").nth(1) {
            break rest
                .split('`')
                .next()
                .unwrap()
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
        }
    };
    // Keep draining stderr so the coordinator never blocks on a full pipe.
    let keep = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            keep.lock().unwrap().push(line);
        }
    });
    (child, addr, log)
}

/// A loopback port free right now (for a coordinator that must come back on the same one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How many filter leases were issued beyond one per filter: the filters computed again.
pub fn recomputed(db: &str) -> i64 {
    let v: serde_json::Value = serde_json::from_str(&query(
        db,
        "SELECT SUM(attempts) - COUNT(*) AS extra FROM filters",
        "json",
    ))
    .unwrap();
    v[0]["extra"].as_i64().unwrap()
}

/// Polls `cond` every 50 ms until it holds; fails with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn worker(addr: &str, name: &str) -> Child {
    worker_with(addr, name, &[])
}

/// A worker process with extra arguments, its output dropped.
pub fn worker_with(addr: &str, name: &str, extra: &[&str]) -> Child {
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
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

pub fn wait(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
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

pub fn status(db: &str) -> Vec<serde_json::Value> {
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

/// Finished filters of every run in the database; 0 while it cannot be read.
pub fn done(db: &str) -> i64 {
    status_or_empty(db).map(|r| count(&r, "done")).unwrap_or(0)
}

pub fn count(rows: &[serde_json::Value], key: &str) -> i64 {
    rows.iter().map(|r| r[key].as_i64().unwrap()).sum()
}

pub fn query(db: &str, sql: &str, format: &str) -> String {
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

pub fn status_or_empty(db: &str) -> Option<Vec<serde_json::Value>> {
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

/// (layer, filter) -> finished_at_ms of every stored result in the SQLite file `db`.
pub fn finished_at(db: &Path) -> std::collections::HashMap<(String, i64), i64> {
    finished_at_in(&format!("sqlite://{}", db.display()))
}

/// (layer, filter) -> finished_at_ms of every stored result, through `query` on the database
/// at `db` (a URL).
pub fn finished_at_in(db: &str) -> std::collections::HashMap<(String, i64), i64> {
    let rows: serde_json::Value = serde_json::from_str(&query(
        db,
        "SELECT layer, filter, finished_at_ms FROM results",
        "json",
    ))
    .unwrap();
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                (
                    r["layer"].as_str().unwrap().to_string(),
                    r["filter"].as_i64().unwrap(),
                ),
                r["finished_at_ms"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// One HTTP/1.1 GET on `addr`: the status line and the body.
pub fn http_get(addr: &str, path: &str) -> (String, String) {
    try_http_get(addr, path).unwrap()
}

/// [`http_get`], with a connection error returned instead of failing.
pub fn try_http_get(addr: &str, path: &str) -> std::io::Result<(String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

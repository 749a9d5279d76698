//! The distributed render with real processes: a coordinator (`render --listen`) and worker
//! processes talking gRPC on loopback, a SQLite store, kill -9 and resume, who may connect.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

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
        "SELECT layer, filter, png FROM results WHERE filter = 0 ORDER BY layer",
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
    eprintln!(
        "FAULTS worker SIGKILL mid-lease: 1 injected, 0 lost, {} recomputed",
        recomputed(&db)
    );
}

#[test]
fn render_resumes_after_kill_9_without_recomputing_finished_filters() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("atlas.db").display());
    let args = [
        &["render"][..],
        &PLAN,
        &["--batch", "4", "--threads", "1", "--out"],
    ]
    .concat();
    let mut first = bin()
        .args(&args)
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // A bound against a render that hangs, not a speed check: on two cores shared with other
    // suites' renders the first 8 filters have taken over 120 s.
    let t = Instant::now();
    while done(&db) < 8 {
        assert!(
            t.elapsed() < Duration::from_secs(300),
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
    let second = bin().args(&args).arg(dir.path()).output().unwrap();
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
    eprintln!(
        "FAULTS render (coordinator and local worker) kill -9, same command again: 1 injected, {} finished before, 0 lost, {} recomputed",
        before.len(),
        recomputed(&db)
    );
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
    let cases: [(&[&str], &str); 3] = [
        (&["--listen", "0.0.0.0:0"], "needs a token"),
        (
            &["--listen", "0.0.0.0:0", "--no-token"],
            "only for loopback",
        ),
        (&["--token", "short"], "at least 16"),
    ];
    for (args, want) in cases {
        let o = bin()
            .env_remove("VGG_ATLAS_TOKEN")
            .args(["render", "--local-workers", "0", "--out", &out])
            .args(args)
            .args(SMALL)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(
        !dir.path().join("atlas.db").exists(),
        "a refused render writes nothing"
    );
}

/// `render --listen 127.0.0.1:P --no-token` says how workers join, and a worker run exactly as
/// it says joins and finishes the run.
#[test]
fn a_no_token_coordinator_says_how_to_join_and_a_worker_that_does_so_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let mut render = bin()
        .env_remove("VGG_ATLAS_TOKEN")
        .args([
            "render",
            "--listen",
            "127.0.0.1:0",
            "--no-token",
            "--local-workers",
            "0",
        ])
        .arg("--out")
        .arg(dir.path())
        .args(["--layers", "block1_conv1", "--size", "32", "--steps", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(render.stderr.take().unwrap()));
    let said = loop {
        let line = lines.next().expect("render says how workers join").unwrap();
        if line.contains("workers join with") {
            break line;
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    let command = said.split('`').nth(1).unwrap();
    let words: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(&words[..2], ["vgg-atlas", "worker"], "{said}");
    assert!(words.contains(&"--no-token"), "{said}");
    let mut w = bin()
        .env_remove("VGG_ATLAS_TOKEN")
        .args(&words[1..])
        .args(["--threads", "1"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait(&mut w, Duration::from_secs(120)).success(), "{said}");
    assert!(wait(&mut render, Duration::from_secs(60)).success());
}

/// A CA and a certificate for 127.0.0.1 signed by it, made here: (ca.pem, cert.pem, key.pem).
fn certificates(dir: &std::path::Path) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "vgg-atlas test CA");
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    (
        write("ca.pem", ca_pem),
        write("cert.pem", cert.pem()),
        write("key.pem", key.serialize_pem()),
    )
}

#[test]
fn a_tls_coordinator_serves_workers_that_trust_its_ca_and_no_others() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificates(dir.path());
    let mut args = vec!["--tls-cert", &cert, "--tls-key", &key];
    args.extend(["--layers", "block1_conv1", "--size", "32", "--steps", "3"]);
    let (mut render, addr) = coordinator(dir.path(), &args);
    assert!(addr.starts_with("https://"), "{addr}");

    // Without the CA the worker stops at once and says what to give it.
    let o = bin()
        .args(["worker", "--connect", &addr, "--threads", "1"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("does not trust") && err.contains("--tls-ca"),
        "{err}"
    );
    // Plain gRPC to the TLS port gets nowhere either (it would retry: it is killed).
    let plain = addr.replace("https://", "http://");
    let mut p = worker(&plain, "plain");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        p.try_wait().unwrap().is_none(),
        "a plain worker keeps retrying"
    );
    p.kill().unwrap();
    p.wait().unwrap();
    let db = format!("sqlite://{}", dir.path().join("atlas.db").display());
    assert_eq!(
        count(&status(&db), "leased") + count(&status(&db), "done"),
        0
    );

    // With the CA it renders the run.
    let mut w = worker_with(&addr, "tls", &["--tls-ca", &ca]);
    assert!(wait(&mut render, Duration::from_secs(300)).success());
    assert!(wait(&mut w, Duration::from_secs(30)).success());
    assert_eq!(count(&status(&db), "done"), 64);
}

/// One HTTP GET on loopback: (status line, body).
#[test]
fn health_and_prometheus_metrics_report_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--metrics-listen",
        "127.0.0.1:0",
        "--stay",
        "--layers",
        "block1_conv1",
        "--size",
        "32",
        "--steps",
        "2",
    ];
    let (mut render, addr, log) = coordinator_logged("127.0.0.1:0", dir.path(), &args);
    let metrics_addr = || {
        log.lock()
            .unwrap()
            .iter()
            .find_map(|l| l.split("metrics on http://").nth(1))
            .map(|rest| rest.trim_end_matches("/metrics").to_string())
    };
    wait_until("the metrics address", Duration::from_secs(30), || {
        metrics_addr().is_some()
    });
    let m = metrics_addr().unwrap();
    let (status_line, body) = http_get(&m, "/healthz");
    assert!(status_line.contains("200"), "{status_line}");
    assert_eq!(body.trim(), "ok");
    let (_, before) = http_get(&m, "/metrics");
    assert!(
        before.contains(r#"layer="block1_conv1",state="pending"} 64"#),
        "{before}"
    );
    let mut w = worker(&addr, "measured");
    assert!(wait(&mut w, Duration::from_secs(120)).success());
    let (_, after) = http_get(&m, "/metrics");
    for want in [
        r#"layer="block1_conv1",state="done"} 64"#,
        r#"layer="block1_conv1",state="pending"} 0"#,
        "# TYPE vgg_atlas_results_recorded_total counter",
        "vgg_atlas_filters_finished{run=",
    ] {
        assert!(after.contains(want), "missing {want} in:\n{after}");
    }
    let value = |name: &str| -> u64 {
        after
            .lines()
            .find(|l| l.starts_with(&format!("{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(value("vgg_atlas_results_recorded_total"), 64);
    assert_eq!(value("vgg_atlas_filters_planned"), 64);
    // Prometheus reserves `_total` for counters: no gauge may carry it.
    for gauge in after.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let (name, kind) = gauge.split_once(' ').unwrap();
        assert!(
            kind != "gauge" || !name.ends_with("_total"),
            "the gauge {name} ends in _total"
        );
    }
    assert_eq!(value("vgg_atlas_workers"), 1);
    assert!(value("vgg_atlas_leases_issued_total") >= 64 / 8);
    // Every lease and every submission was written, some perhaps in the same transaction.
    let (calls, groups) = (
        value("vgg_atlas_write_calls_total"),
        value("vgg_atlas_write_groups_total"),
    );
    assert!(
        groups > 0 && calls >= groups && calls >= 2 * (64 / 8),
        "{calls} write calls in {groups} groups"
    );
    assert!(
        render.try_wait().unwrap().is_none(),
        "--stay keeps the coordinator up after the run"
    );
    render.kill().unwrap();
    render.wait().unwrap();
}

/// `render --device A,B`: one local worker per device, each recorded with the results it made.
#[test]
fn render_starts_one_local_worker_per_listed_device() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("atlas.db").display());
    let o = bin()
        .args([
            "render",
            "--device",
            "cpu,cpu",
            "--layers",
            "block1_conv1",
            "--size",
            "16",
            "--steps",
            "20",
            "--batch",
            "2",
            "--threads",
            "2",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = query(
        &db,
        "SELECT worker, COUNT(*) AS n FROM results GROUP BY worker ORDER BY worker",
        "csv",
    );
    let workers: Vec<&str> = rows.lines().skip(1).collect();
    assert_eq!(
        workers.len(),
        2,
        "two local workers made the images: {rows}"
    );
    assert!(workers[0].starts_with("local-0@cpu-"), "{rows}");
    assert!(workers[1].starts_with("local-1@cpu-"), "{rows}");
    // A single-device command refuses a list, and says where lists go.
    let e = bin()
        .args(["bench", "--layer", "block1_conv1", "--device", "cpu,cpu"])
        .output()
        .unwrap();
    assert!(!e.status.success());
    assert!(
        String::from_utf8_lossy(&e.stderr).contains("names several devices"),
        "{}",
        String::from_utf8_lossy(&e.stderr)
    );
}

/// Just enough of ONNX's schema to write a weights-only model (its initializers).
mod onnx {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(message, optional, tag = "7")]
        pub graph: Option<GraphProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct GraphProto {
        #[prost(message, repeated, tag = "5")]
        pub initializer: Vec<TensorProto>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TensorProto {
        #[prost(int64, repeated, tag = "1")]
        pub dims: Vec<i64>,
        #[prost(int32, tag = "2")]
        pub data_type: i32,
        #[prost(string, tag = "8")]
        pub name: String,
        #[prost(bytes = "vec", tag = "9")]
        pub raw_data: Vec<u8>,
    }
}

/// The cached Keras weights as an ONNX file (Keras names, OIHW kernels): what a user's own
/// export looks like to the loader.
fn onnx_weights(path: &std::path::Path) -> String {
    use prost::Message;
    let w =
        vgg_atlas_worker::Weights::load(&vgg_atlas_worker::fetch::default_weights_path().unwrap())
            .unwrap();
    let tensor = |name: String, dims: Vec<i64>, values: &[f32]| onnx::TensorProto {
        dims,
        data_type: 1,
        name,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let mut initializer = Vec::new();
    for (c, layer) in w.convs.iter().zip(vgg_atlas_proto::LAYERS.iter()) {
        initializer.push(tensor(
            format!("{}/kernel:0", layer.name),
            vec![c.cout as i64, c.cin as i64, 3, 3],
            &c.weight,
        ));
        initializer.push(tensor(
            format!("{}/bias:0", layer.name),
            vec![c.cout as i64],
            &c.bias,
        ));
    }
    let model = onnx::ModelProto {
        graph: Some(onnx::GraphProto { initializer }),
    };
    std::fs::write(path, model.encode_to_vec()).unwrap();
    vgg_atlas_worker::Weights::load(path).unwrap().sha256
}

#[test]
fn a_remote_worker_fetches_onnx_weights_as_onnx_and_renders() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("x.onnx");
    let sha = onnx_weights(&weights);
    let out = dir.path().join("out");
    let (mut render, addr) = coordinator(
        &out,
        &[
            "--weights",
            weights.to_str().unwrap(),
            "--layers",
            "block1_conv1",
            "--size",
            "16",
            "--steps",
            "2",
        ],
    );
    // A worker with an empty cache: it has no weights and must fetch the coordinator's.
    let cache = dir.path().join("cache");
    let mut w = bin()
        .args([
            "worker",
            "--connect",
            &addr,
            "--name",
            "remote",
            "--threads",
            "1",
        ])
        .env("VGG_ATLAS_CACHE", &cache)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The worker finishes the run (and exits 0), or stops on weights it cannot read.
    let exit = wait(&mut w, Duration::from_secs(300));
    let mut log = String::new();
    std::io::Read::read_to_string(&mut w.stderr.take().unwrap(), &mut log).unwrap();
    if !exit.success() {
        let _ = render.kill();
        panic!("the worker stopped: {log}");
    }
    assert!(wait(&mut render, Duration::from_secs(60)).success());
    assert!(
        cache.join(format!("weights-{sha}.onnx")).exists(),
        "fetched as ONNX: {:?}",
        std::fs::read_dir(&cache).unwrap().collect::<Vec<_>>()
    );
    let db = format!("sqlite://{}", out.join("atlas.db").display());
    let rows = status(&db);
    assert_eq!((count(&rows, "done"), count(&rows, "total")), (64, 64));
}

#[test]
fn a_sample_renders_every_layer_and_the_whole_run_keeps_it() {
    // No --out: the default output folder, under the working directory.
    let cwd = tempfile::tempdir().unwrap();
    let out = cwd.path().join("out/atlas");
    let db = format!("sqlite://{}", out.join("atlas.db").display());
    let args = [&SMALL[..], &["--batch", "4", "--threads", "1"]].concat();
    let sample = bin()
        .current_dir(cwd.path())
        .args(["render", "--sample", "2"])
        .args(&args)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&sample.stderr);
    assert!(sample.status.success(), "{said}");
    assert!(
        said.contains("a sample: 2 filters of each layer, 4 filters"),
        "{said}"
    );
    assert!(
        !out.join("atlas.db-wal").exists(),
        "a finished render folds its write-ahead log into the database"
    );
    let picked = query(
        &db,
        "SELECT layer, filter, attempts FROM filters ORDER BY layer_index, filter",
        "csv",
    );
    assert_eq!(
        picked,
        "layer,filter,attempts\nblock1_conv1,0,1\nblock1_conv1,32,1\nblock2_conv1,0,1\nblock2_conv1,64,1\n",
        "2 filters of each layer, spread across it, each computed once"
    );
    let atlas: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("atlas.json")).unwrap()).unwrap();
    let drawn: Vec<u64> = atlas["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["filters"].as_u64().unwrap())
        .collect();
    assert_eq!(
        drawn,
        [2, 2],
        "the sample's atlas shows the sampled filters"
    );
    let before = finished_at(&out.join("atlas.db"));
    assert_eq!(before.len(), 4);

    // The same command without --sample: the same run, the other filters added.
    let whole = bin()
        .current_dir(cwd.path())
        .arg("render")
        .args(&args)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&whole.stderr);
    assert!(whole.status.success(), "{said}");
    assert!(
        said.contains("resuming run") && said.contains("(192 filters)"),
        "{said}"
    );
    let after = finished_at(&out.join("atlas.db"));
    assert_eq!(after.len(), 64 + 128);
    for (key, t) in &before {
        assert_eq!(
            after.get(key),
            Some(t),
            "sampled filter {key:?} was computed again"
        );
    }
    assert_eq!(recomputed(&db), 0, "no filter was leased twice");
    // A sample of a run whose whole plan is finished renders nothing and changes nothing.
    let again = bin()
        .current_dir(cwd.path())
        .args(["render", "--sample", "3"])
        .args(&args)
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(finished_at(&out.join("atlas.db")), after);
}

#[test]
fn a_sample_of_a_run_with_unfinished_filters_beyond_it_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("atlas.db").display());
    // Plan the whole run without computing it: a coordinator with no workers, stopped.
    let (mut render, _) = coordinator(dir.path(), &SMALL);
    wait_until("the plan is stored", Duration::from_secs(60), || {
        status_or_empty(&db).is_some_and(|r| count(&r, "total") == 192)
    });
    render.kill().unwrap();
    render.wait().unwrap();
    let before = query(
        &db,
        "SELECT layer, filter, state, attempts FROM filters",
        "csv",
    );
    let out = bin()
        .args(["render", "--sample", "2", "--out"])
        .arg(dir.path())
        .args(SMALL)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        said.contains("already plans 188 unfinished filters beyond this sample")
            && said.contains("without --sample"),
        "{said}"
    );
    assert_eq!(
        query(
            &db,
            "SELECT layer, filter, state, attempts FROM filters",
            "csv"
        ),
        before,
        "nothing was changed"
    );
}

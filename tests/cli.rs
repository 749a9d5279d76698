//! The CLI's contracts, through the real binary on the real weights: the JSON other tools
//! read, the PNGs, and clear errors (non-zero exit, no panic) on bad input.

use std::path::Path;
use std::process::{Command, Output};

fn vgg_atlas(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vgg-atlas"))
        .args(args)
        .output()
        .expect("run vgg-atlas")
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn visualize_writes_a_png_per_filter_and_the_json_contract() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let o = vgg_atlas(&[
        "visualize",
        "--layer",
        "block2_conv1",
        "--filters",
        "3..6",
        "--size",
        "32",
        "--steps",
        "4",
        "--out",
        &out,
        "--json",
        "--threads",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).expect("stdout is JSON");
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for (row, f) in rows.iter().zip(3..) {
        assert_eq!(row["layer"], "block2_conv1");
        assert_eq!(row["filter"], f);
        for key in ["activation", "start_activation", "objective"] {
            assert!(row[key].as_f64().unwrap().is_finite(), "{key} in {row}");
        }
        assert!(row["dead"].is_boolean() && row["failed"].is_null());
        let png = image::open(dir.path().join(format!("block2_conv1_{f:04}.png"))).unwrap();
        assert_eq!((png.width(), png.height()), (32, 32));
        let border = row["border_ratio"].as_f64().expect("border_ratio");
        let want = vgg_atlas_atlas::quality::border_ratio(&png.to_rgb8());
        assert!((border - want).abs() < 1e-9, "{border} vs {want}");
    }
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("results.json")).unwrap())
            .unwrap();
    assert_eq!(saved["settings"]["steps"], 4);
    assert_eq!(saved["settings"]["objective"], "post-relu-wake");
    assert_eq!(saved["settings"]["roll_blocks"], 2);
}

#[test]
fn probe_prints_one_activation_per_filter() {
    let o = vgg_atlas(&[
        "probe",
        &fixture("chelsea64.png"),
        "--layer",
        "block5_conv3",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["layer"], "block5_conv3");
    let acts = v["activations"].as_array().unwrap();
    assert_eq!(acts.len(), 512);
    // The cat's strongest block5_conv3 filter, per onnxruntime (tests/fixtures/refs_keras_chelsea64.json).
    let best = (0..512)
        .max_by(|&a, &b| {
            acts[a]
                .as_f64()
                .unwrap()
                .total_cmp(&acts[b].as_f64().unwrap())
        })
        .unwrap();
    assert_eq!(best, 286);
}

#[test]
fn bench_prints_its_json_contract() {
    let o = vgg_atlas(&[
        "bench",
        "--layer",
        "block1_conv2",
        "--size",
        "32",
        "--steps",
        "2",
        "--batch",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["layer"], "block1_conv2");
    assert_eq!(v["batch"], 2);
    assert_eq!(
        v["ascent"], "host",
        "on the CPU the images are stepped on the host"
    );
    assert_eq!(v["precision"], "f32");
    assert!(
        v["fits_in_memory"].is_null(),
        "no device memory to ask on the CPU"
    );
    assert!(v["filters_per_second"].as_f64().unwrap() > 0.0 && v["gflops"].as_f64().unwrap() > 0.0);
}

/// `bench` counts the FLOPs of every ascent: a filter the `atlas` preset ascends a second time
/// (its image ended mostly silent) counts twice. Of block2_conv1's first four filters at 32 px
/// and 4 steps, one is.
#[test]
fn bench_counts_the_flops_of_a_second_ascent() {
    let (size, steps, batch) = (32, 4, 4);
    let o = vgg_atlas(&[
        "bench",
        "--preset",
        "atlas",
        "--layer",
        "block2_conv1",
        "--size",
        &size.to_string(),
        "--steps",
        &steps.to_string(),
        "--batch",
        &batch.to_string(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let twice = v["tried"][0]["second_ascents"].as_u64().unwrap();
    assert!(twice > 0, "a filter of these was ascended twice: {v}");
    let layer = vgg_atlas_proto::Layer::by_name("block2_conv1").unwrap();
    let per_ascent = 2.0 * 2.0 * layer.forward_macs(size) as f64 * steps as f64;
    let fps = v["filters_per_second"].as_f64().unwrap();
    let expected = (batch + twice) as f64 * per_ascent * fps / batch as f64 / 1e9;
    let gflops = v["gflops"].as_f64().unwrap();
    assert!(
        (gflops - expected).abs() <= 1e-9 * expected,
        "{gflops} GFLOP/s, {expected} for {twice} second ascents"
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o").display().to_string();
    let missing_db = format!("sqlite://{}/none.db", dir.path().display());
    let cases: [(&[&str], &str); 17] = [
        (
            &["bench", "--layer", "block1_conv1", "--precision", "fp8"],
            "unknown precision 'fp8'; use f32, tf32 or bf16",
        ),
        (
            &["bench", "--layer", "block1_conv1", "--host-ascent"],
            "--host-ascent is for GPU devices",
        ),
        (
            &[
                "visualize",
                "--layer",
                "block1_conv1",
                "--precision",
                "bf16",
                "--out",
                &out,
            ],
            "--precision bf16 is for GPU devices",
        ),
        (
            &["visualize", "--layer", "block6_conv1", "--out", &out],
            "unknown layer 'block6_conv1'",
        ),
        (
            &[
                "visualize",
                "--layer",
                "block1_conv1",
                "--filters",
                "60..70",
                "--out",
                &out,
            ],
            "out of range",
        ),
        (
            &[
                "visualize",
                "--layer",
                "block5_conv1",
                "--size",
                "8",
                "--out",
                &out,
            ],
            "too small",
        ),
        (
            &[
                "visualize",
                "--layer",
                "block1_conv1",
                "--weights",
                "/nonexistent/w.safetensors",
                "--out",
                &out,
            ],
            "/nonexistent/w.safetensors",
        ),
        (
            &["probe", "/nonexistent.png", "--layer", "block1_conv1"],
            "cannot read image",
        ),
        (
            &["visualize", "--layer", "fc1", "--out", &out],
            "classifier",
        ),
        (
            &[
                "worker",
                "--connect",
                "http://127.0.0.1:9",
                "--device",
                "cuda:0",
            ],
            "without GPU support",
        ),
        (
            &["query", "--db", &missing_db, "SELECT 1"],
            "no database file",
        ),
        (&["status", "--db", &missing_db], "no database file"),
        (
            &[
                "visualize",
                "--layer",
                "block1_conv1",
                "--preset",
                "deepdream",
                "--out",
                &out,
            ],
            "unknown preset 'deepdream'; the presets are atlas, quick, keras-vis, lucid",
        ),
        (
            &[
                "visualize",
                "--layer",
                "block1_conv1",
                "--size",
                "32",
                "--jitter",
                "17",
                "--out",
                &out,
            ],
            "bad transform parameters",
        ),
        (
            &["query", "--db", "mysql://x/y", "SELECT 1"],
            "neither sqlite nor postgres",
        ),
        (
            &[
                "render",
                "--layers",
                "block1_conv1,block9_conv9",
                "--out",
                &out,
            ],
            "unknown layer 'block9_conv9'",
        ),
        (
            &[
                "render",
                "--listen",
                "127.0.0.1:0",
                "--no-token",
                "--tls-cert",
                "/nonexistent/cert.pem",
                "--tls-key",
                "/nonexistent/key.pem",
                "--out",
                &out,
            ],
            "cannot read --tls-cert /nonexistent/cert.pem",
        ),
    ];
    for (args, want) in cases {
        let o = vgg_atlas(args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
    assert!(
        !dir.path().join("none.db").exists(),
        "query and status on a missing database create nothing"
    );
}

/// `render` checks everything it is given before it writes anything: each bad input gets its
/// own message and exit code 1, and the output folder is not even created.
#[test]
fn render_refuses_bad_input_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "not a folder").unwrap();
    let under_file = file.join("out").display().to_string();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--db", "postgres://atlas:secret@127.0.0.1:1/atlas"],
            "cannot open the database postgres://atlas:***@127.0.0.1:1/atlas",
        ),
        (&["--db", "postgres//atlas"], "neither sqlite nor postgres"),
        (&["--db", "sqlite://"], "database URL"),
        (&["--layers", "block5_conv1", "--size", "8"], "too small"),
        (
            &["--layers", "block1_conv1,block1_conv1x"],
            "unknown layer 'block1_conv1x'",
        ),
    ];
    for (i, (args, want)) in cases.iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        let out_s = out.display().to_string();
        let mut all = vec!["render", "--steps", "1", "--out", &out_s];
        if !args.contains(&"--layers") {
            all.extend(["--layers", "block1_conv1", "--size", "32"]);
        }
        all.extend(args.iter());
        let o = vgg_atlas(&all);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
        assert!(
            !err.contains("secret"),
            "the password is never shown: {err}"
        );
        assert!(!out.exists(), "{args:?} created {}", out.display());
    }
    // A port in use, for the workers or for the metrics.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    for (listen, metrics) in [
        (port.as_str(), "127.0.0.1:0"),
        ("127.0.0.1:0", port.as_str()),
    ] {
        let out = dir.path().join("out-port");
        let out_s = out.display().to_string();
        let o = vgg_atlas(&[
            "render",
            "--layers",
            "block1_conv1",
            "--no-token",
            "--listen",
            listen,
            "--metrics-listen",
            metrics,
            "--out",
            &out_s,
        ]);
        let flag = if metrics == port {
            "--metrics-listen"
        } else {
            "--listen"
        };
        assert_eq!(o.status.code(), Some(1), "{flag}: {}", stderr(&o));
        assert!(stderr(&o).contains("cannot listen on"), "{}", stderr(&o));
        assert!(!out.exists(), "{flag}: a refused render created its folder");
    }
    let o = vgg_atlas(&["render", "--layers", "block1_conv1", "--out", &under_file]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot create output folder"),
        "{}",
        stderr(&o)
    );
}

/// A run is resumed only with the weights it was made with; other weights are refused with
/// both hashes, and `--fresh` starts a run of its own beside it.
#[test]
fn resuming_with_other_weights_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas").display().to_string();
    let db = format!("sqlite://{out}/atlas.db");
    let render = |extra: &[&str]| {
        let mut args = vec!["render", "--layers", "block1_conv1", "--size", "32"];
        args.extend(["--steps", "1", "--threads", "1", "--out", &out]);
        args.extend(extra);
        vgg_atlas(&args)
    };
    let o = render(&[]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The same network with one weight changed in its last byte: valid, but not the same.
    let original = vgg_atlas_worker::fetch::default_weights_path().unwrap();
    let mut bytes = std::fs::read(&original).unwrap();
    *bytes.last_mut().unwrap() ^= 1;
    let other = dir.path().join("other.safetensors");
    std::fs::write(&other, &bytes).unwrap();
    let other_s = other.display().to_string();
    let o = render(&["--weights", &other_s]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("made with weights sha256 59c1f2de") && err.contains("--fresh"),
        "{err}"
    );
    let runs = vgg_atlas(&[
        "query",
        "--db",
        &db,
        "--format",
        "csv",
        "SELECT COUNT(*) AS n FROM runs",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&runs.stdout),
        "n\n1\n",
        "nothing was added"
    );
    let o = render(&["--weights", &other_s, "--fresh"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A worker without a token says what to give it; `--no-token` is for a coordinator on a
/// loopback address only; `--give-up-after` wants a duration with a unit. All before any
/// connection or weights.
#[test]
fn a_worker_without_a_token_needs_no_token_and_a_loopback_coordinator() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--connect", "http://127.0.0.1:9"],
            "requires a token from its workers",
        ),
        (
            &["--connect", "http://10.1.2.3:50051", "--no-token"],
            "--no-token is only for a coordinator on a loopback address",
        ),
        (
            &["--connect", "http://coordinator:50051", "--no-token"],
            "coordinator is not one",
        ),
        (
            &[
                "--connect",
                "http://[::1]:9",
                "--no-token",
                "--give-up-after",
                "30",
            ],
            "'30' is not a duration",
        ),
    ];
    for (args, want) in cases {
        let o = Command::new(env!("CARGO_BIN_EXE_vgg-atlas"))
            .env_remove("VGG_ATLAS_TOKEN")
            .arg("worker")
            .args(args)
            .output()
            .unwrap();
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: expected '{want}' in: {err}");
    }
    let o = vgg_atlas(&[
        "worker",
        "--connect",
        "http://127.0.0.1:9",
        "--no-token",
        "--token",
        "0123456789abcdef0123",
    ]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "--no-token conflicts with --token"
    );
}

/// `--give-up-after`: a worker whose coordinator never answers stops, non-zero, saying why,
/// instead of retrying forever.
#[test]
fn a_worker_gives_up_when_no_coordinator_answers() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("http://127.0.0.1:{port}");
    let t = std::time::Instant::now();
    let o = Command::new(env!("CARGO_BIN_EXE_vgg-atlas"))
        .env_remove("VGG_ATLAS_TOKEN")
        .args(["worker", "--connect", &addr, "--no-token"])
        .args(["--give-up-after", "3s", "--threads", "1"])
        .output()
        .unwrap();
    let took = t.elapsed();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "giving up: no coordinator answered at {addr} for 3s since this worker started"
        )),
        "{err}"
    );
    assert!(
        took >= std::time::Duration::from_secs(3) && took < std::time::Duration::from_secs(15),
        "gave up after {took:?}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// `worker --device cpu,cpu` without `--name`: one process, one worker per device, named after
/// the system's host name (not `$HOSTNAME`, which shells do not export) with the device's place
/// in the list; both register with a `render --no-token` on loopback, and the run finishes.
#[test]
fn one_worker_process_runs_a_worker_per_device_named_after_the_host() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    let mut render = Command::new(env!("CARGO_BIN_EXE_vgg-atlas"))
        .env_remove("VGG_ATLAS_TOKEN")
        .env("RUST_LOG", "vgg_atlas_coordinator=info")
        .args(["render", "--listen", "127.0.0.1:0", "--no-token"])
        .args(["--local-workers", "0", "--layers", "block1_conv1"])
        .args(["--size", "32", "--steps", "4", "--out"])
        .arg(&out)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(render.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("render printed its address").unwrap();
        if let Some(rest) = line.split("--connect ").nth(1) {
            break rest.split([' ', '`']).next().unwrap().to_string();
        }
    };
    let log = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());
    let o = Command::new(env!("CARGO_BIN_EXE_vgg-atlas"))
        .env_remove("VGG_ATLAS_TOKEN")
        .env_remove("HOSTNAME")
        .args(["worker", "--connect", &addr, "--no-token"])
        .args(["--device", "cpu,cpu", "--batch", "4", "--threads", "2"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(render.wait().unwrap().success());
    let log = log.join().unwrap();
    let registered: Vec<String> = log
        .iter()
        .filter(|l| l.contains("worker registered"))
        .filter_map(|l| l.split("worker=").nth(1))
        .map(|w| w.split([' ', '@']).next().unwrap().to_string())
        .collect();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok();
    let mut names = registered.clone();
    names.sort();
    match &host {
        Some(h) => assert_eq!(names, [format!("{h}-0"), format!("{h}-1")], "{log:?}"),
        None => assert_eq!(names.len(), 2, "{log:?}"),
    }
    assert!(!names.iter().any(|n| n.starts_with("worker-")), "{names:?}");
    // Every result is stored under one of the two, and the run is complete.
    let db = format!("sqlite://{}", out.join("atlas.db").display());
    let o = vgg_atlas(&[
        "query",
        "--db",
        &db,
        "--format",
        "json",
        "SELECT worker, COUNT(*) AS n FROM results GROUP BY worker",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut total = 0;
    for r in rows.as_array().unwrap() {
        let worker = r["worker"].as_str().unwrap();
        assert!(
            names
                .iter()
                .any(|n| worker.starts_with(&format!("{n}@cpu-"))),
            "{worker} is not one of {names:?}"
        );
        total += r["n"].as_i64().unwrap();
    }
    assert_eq!(total, 64);
}

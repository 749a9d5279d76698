//! The atlas from real renders: what `render` writes at the end, `mosaic` on a partial run, and
//! the viewer opened from `file://` in headless Chromium (driven over the DevTools protocol).

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vgg_atlas_atlas::draw;
use vgg_atlas_coordinator::store::{self, Submission};
use vgg_atlas_proto::{Layer, Settings};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vgg-atlas"))
}

fn run_ok(cmd: &mut Command) -> String {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{:?}: {}",
        cmd,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// One small real render shared by the tests: block1_conv1 + block2_conv1, 32 px, 3 steps.
fn rendered() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        run_ok(
            bin()
                .args([
                    "render",
                    "--layers",
                    "block2_conv1,block1_conv1",
                    "--size",
                    "32",
                    "--steps",
                    "3",
                    "--tile-size",
                    "24",
                    "--out",
                ])
                .arg(dir.path()),
        );
        dir
    })
    .path()
}

fn db_of(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("atlas.db").display())
}

#[test]
fn render_ends_with_the_atlas_and_its_counts_match_the_database() {
    let dir = rendered();
    let atlas = read_json(&dir.join("atlas.json"));
    let layers = atlas["layers"].as_array().unwrap();
    let names: Vec<&str> = layers.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["block1_conv1", "block2_conv1"],
        "network order, not the order asked"
    );

    let status: Value = serde_json::from_str(&run_ok(bin().args([
        "status",
        "--db",
        &db_of(dir),
        "--json",
    ])))
    .unwrap();
    for l in layers {
        let s = status
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["layer"] == l["name"])
            .unwrap();
        for (atlas_key, status_key) in [
            ("filters", "total"),
            ("done", "done"),
            ("dead", "dead"),
            ("failed", "failed"),
        ] {
            assert_eq!(l[atlas_key], s[status_key], "{} {atlas_key}", l["name"]);
        }
        assert_eq!(l["pending"], 0);
        let name = l["name"].as_str().unwrap();
        let n = l["filters"].as_u64().unwrap() as usize;
        // Every filter has a full-size tile, byte for byte what the database holds.
        for e in l["entries"].as_array().unwrap() {
            let tile = dir.join(e["tile"].as_str().unwrap());
            let img = image::open(&tile).unwrap();
            assert_eq!(img.width(), 32, "{}", tile.display());
        }
        for mosaic in [format!("{name}.png"), format!("{name}.by-activation.png")] {
            let m = image::open(dir.join(&mosaic)).unwrap();
            assert_eq!(
                (m.width(), m.height()),
                vgg_atlas_atlas::mosaic_size(n, 24, 2),
                "{mosaic}"
            );
        }
    }
    // Ranks agree with the best_filters view.
    let best: Value = serde_json::from_str(&run_ok(bin().args([
        "query",
        "--db",
        &db_of(dir),
        "--format",
        "json",
        "SELECT layer, filter, rank FROM best_filters",
    ])))
    .unwrap();
    for row in best.as_array().unwrap() {
        let l = layers.iter().find(|l| l["name"] == row["layer"]).unwrap();
        let e = &l["entries"][row["filter"].as_u64().unwrap() as usize];
        assert_eq!(e["filter"], row["filter"]);
        assert_eq!(e["rank"], row["rank"], "{row}");
    }
    assert!(image::open(dir.join("atlas.png")).unwrap().width() > 0);
    let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
    assert!(html.contains("block2_conv1"));
}

/// A PNG of a flat colour.
fn png(side: u32, shade: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(side, side, image::Rgb([shade, 255 - shade, 90]));
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    bytes
}

#[test]
fn mosaic_rebuilds_a_partial_run_from_the_database_with_pending_tiles() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_of(dir.path());
    let layers = [
        Layer::by_name("block1_conv1").unwrap(),
        Layer::by_name("block1_conv2").unwrap(),
    ];
    let settings = Settings {
        size: 16,
        steps: 2,
        ..Settings::default()
    };
    let spec = vgg_atlas_coordinator::plan::plan(&"ab".repeat(32), &layers, &settings, 1, None);
    // Ten filters finished, one failed for good, the rest never started.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let s = store::connect(&db).await.unwrap();
        s.create_or_resume_run(&spec).await.unwrap();
        let lease = s
            .lease(&spec.run_id, "w", 11, store::now_ms(), 60_000)
            .await
            .unwrap()
            .unwrap();
        for (i, &(filter, _)) in lease.filters.iter().enumerate() {
            let outcome = Submission {
                run_id: spec.run_id.clone(),
                layer: lease.layer.clone(),
                filter,
                lease_id: lease.lease_id.clone(),
                worker: "w".into(),
                activation: 1.0 + filter as f32,
                objective: 1.0,
                start_activation: 0.5,
                curve: vec![0.5, 1.0],
                seconds: 0.1,
                dead: false,
                failed_reason: (i == 10).then(|| "NaN in the gradient".to_string()),
                retries: 0,
                png: png(16, filter as u8 * 20),
            };
            s.submit(&outcome, store::now_ms()).await.unwrap();
        }
    });
    let out = dir.path().join("atlas");
    run_ok(
        bin()
            .args([
                "mosaic",
                "--db",
                &db,
                "--tile-size",
                "16",
                "--margin",
                "1",
                "--out",
            ])
            .arg(&out),
    );
    let atlas = read_json(&out.join("atlas.json"));
    let l1 = &atlas["layers"][0];
    assert_eq!(
        (&l1["name"], &l1["done"], &l1["failed"], &l1["pending"]),
        (&json!("block1_conv1"), &json!(10), &json!(1), &json!(53))
    );
    assert_eq!(atlas["layers"][1]["pending"], 64);
    assert_eq!(l1["entries"][10]["reason"], "NaN in the gradient");
    assert!(out.join("tiles/block1_conv1/9.png").exists());
    assert!(!out.join("tiles/block1_conv1/10.png").exists());
    assert!(!out.join("tiles/block1_conv1/11.png").exists());

    let m = image::open(out.join("block1_conv1.png")).unwrap().to_rgb8();
    let tile = |k: usize| {
        let (x, y) = vgg_atlas_atlas::tile_origin(k, 64, 16, 1);
        image::imageops::crop_imm(&m, x, y, 16, 16).to_image()
    };
    assert_eq!(
        tile(3),
        image::load_from_memory(&png(16, 60)).unwrap().to_rgb8()
    );
    assert!(tile(10) == draw::failed_tile(16));
    for k in 11..64 {
        assert!(
            tile(k) == draw::pending_tile(16),
            "filter {k} is drawn as pending"
        );
    }
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(html.contains("block1_conv2"));

    // Refused with a clear message: an unknown run, and a database with no run.
    let o = bin()
        .args(["mosaic", "--db", &db, "--run", "nope", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no run \"nope\""));
}

// ---------------------------------------------------------------------------------------------
// The viewer in a real browser.

/// Chromium, or `None` (after saying so) when it is not installed outside CI.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VGG_ATLAS_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        if let Ok(o) = Command::new("which").arg(name).output() {
            if o.status.success() {
                return Some(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
            }
        }
    }
    if std::env::var_os("CI").is_some() {
        panic!("no Chromium under CI: .ci/run should install Debian's chromium");
    }
    eprintln!("skipped: install chromium (or set VGG_ATLAS_CHROMIUM) to run the browser test");
    None
}

/// A headless Chromium spoken to over the DevTools protocol.
struct Browser {
    child: Child,
    ws: tungstenite::WebSocket<TcpStream>,
    session: String,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn launch(chrome: &Path, url: &str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chrome)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let ws_url = loop {
            let line = lines
                .next()
                .expect("chromium printed its DevTools address")
                .unwrap();
            if let Some(url) = line.strip_prefix("DevTools listening on ") {
                break url.trim().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        let addr = ws_url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let (ws, _) = tungstenite::client(ws_url.as_str(), stream).unwrap();
        let mut b = Browser {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            _profile: profile,
        };
        let targets = b.call("Target.getTargets", json!({}));
        let page = targets["targetInfos"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .expect("a page target")["targetId"]
            .clone();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": page, "flatten": true}),
        );
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b
    }

    /// Sends a command (to the page once attached) and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(tungstenite::Message::text(msg.to_string()))
            .unwrap();
        loop {
            let reply = self.ws.read().unwrap();
            let Ok(text) = reply.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap();
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {}", v["error"]);
                return v["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    fn eval(&mut self, js: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{js}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Waits until the expression is truthy, and returns its value.
    fn wait_for(&mut self, js: &str) -> Value {
        let t = Instant::now();
        loop {
            let v = self.eval(js);
            if !(v.is_null() || v == json!(false) || v == json!(0)) {
                return v;
            }
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "timed out waiting for {js}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A real mouse click on the centre of the element `selector` matches (scrolled into view).
    fn click(&mut self, selector: &str) {
        let sel = serde_json::to_string(selector).unwrap();
        let at = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); e.scrollIntoView({{block: 'center'}});
                       const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (at[0].as_f64().unwrap(), at[1].as_f64().unwrap());
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

#[test]
fn the_viewer_works_from_file_in_headless_chromium() {
    let Some(chrome) = chromium() else { return };
    let dir = rendered();
    let atlas = read_json(&dir.join("atlas.json"));
    let url = format!("file://{}", dir.join("index.html").display());
    let mut b = Browser::launch(&chrome, "about:blank");
    b.call("Page.navigate", json!({"url": url}));
    b.wait_for("location.protocol === 'file:' && document.readyState === 'complete'");

    // The layer list, in network order.
    let names = b.eval("[...document.querySelectorAll('nav a.layer')].map(a => a.dataset.layer)");
    assert_eq!(names, json!(["block1_conv1", "block2_conv1"]));
    // The overview picture loaded.
    b.wait_for("(() => { const i = document.querySelector('#overview img'); return i.complete && i.naturalWidth > 0; })()");

    // Open block2_conv1 with a click: every tile's image loads.
    b.click("nav a.layer[data-layer='block2_conv1']");
    b.wait_for("!document.getElementById('layer').hidden && document.getElementById('layer-name').textContent === 'block2_conv1'");
    let layer = &atlas["layers"][1];
    let done = layer["done"].as_u64().unwrap();
    b.wait_for(&format!(
        "(() => {{ const imgs = [...document.querySelectorAll('#tiles img')];
                   return imgs.length === {done} && imgs.every(i => i.complete); }})()"
    ));
    let loaded = b.eval(
        "[...document.querySelectorAll('#tiles img')].filter(i => i.naturalWidth > 0).length",
    );
    assert_eq!(
        loaded,
        json!(done),
        "every tile image loaded (naturalWidth > 0)"
    );
    let tiles = b.eval("document.querySelectorAll('#tiles .tile').length");
    assert_eq!(tiles, layer["filters"]);

    // Click a tile: its scores show, and they are the database's.
    let entry = &layer["entries"][5];
    b.click("#tiles .tile[data-filter='5']");
    b.wait_for("document.getElementById('detail').classList.contains('open')");
    let title = b.eval("document.getElementById('detail-title').textContent");
    assert_eq!(title, json!("block2_conv1 · filter 5"));
    let scores = b.eval(
        "Object.fromEntries([...document.querySelectorAll('#scores tr')].map(r => [r.dataset.key, r.cells[1].textContent]))",
    );
    let shown: f64 = scores["activation"].as_str().unwrap().parse().unwrap();
    let stored = entry["activation"].as_f64().unwrap();
    assert!(
        (shown - stored).abs() <= 1e-3 * stored.abs().max(1.0),
        "shown {shown}, stored {stored}"
    );
    assert_eq!(
        scores["rank in layer"],
        json!(format!("{} of {}", entry["rank"], layer["done"]))
    );
    assert_eq!(scores["status"], entry["status"]);
    assert_eq!(
        scores["retries"],
        json!(entry["retries"]
            .as_u64()
            .expect("atlas.json has retries")
            .to_string()),
        "the viewer shows the steps retried"
    );
    let curve_points = b
        .eval("document.querySelector('#curve polyline').getAttribute('points').split(' ').length");
    assert_eq!(
        curve_points,
        json!(entry["curve"].as_array().unwrap().len())
    );
    b.wait_for("(() => { const i = document.getElementById('detail-img'); return i.complete && i.naturalWidth === 32; })()");

    // Sorting by activation puts rank 1 first.
    b.eval("document.getElementById('close').click()");
    b.eval("(() => { const s = document.getElementById('sort'); s.value = 'activation'; s.dispatchEvent(new Event('change')); })()");
    let first = b.eval("Number(document.querySelector('#tiles .tile').dataset.filter)");
    let best = layer["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["rank"] == json!(1))
        .unwrap();
    assert_eq!(first, best["filter"]);
}

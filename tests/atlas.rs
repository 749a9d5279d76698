//! The atlas from real renders: what `render` writes at the end, `mosaic` on a partial run, the
//! viewer opened from `file://` in headless Chromium (driven over the DevTools protocol), and
//! `serve`: the viewer over HTTP from the database, read-only and live.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
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
        // Each has the border ratio the coordinator computed from it.
        for e in l["entries"].as_array().unwrap() {
            let tile = dir.join(e["tile"].as_str().unwrap());
            let img = image::open(&tile).unwrap();
            assert_eq!(img.width(), 32, "{}", tile.display());
            let stored = e["border_ratio"]
                .as_f64()
                .expect("atlas.json has border_ratio");
            let computed = vgg_atlas_atlas::quality::border_ratio(&img.to_rgb8());
            assert!(
                (stored - computed).abs() <= 1e-4,
                "{}: stored {stored}, computed {computed}",
                tile.display()
            );
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
                border_ratio: Some(1.0),
                second_ascent: None,
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
    let shown: f64 = scores["border ratio"]
        .as_str()
        .expect("the viewer shows the border ratio")
        .parse()
        .unwrap();
    let stored = entry["border_ratio"]
        .as_f64()
        .expect("atlas.json has border_ratio");
    assert!(
        (shown - stored).abs() <= 0.0051,
        "border ratio shown {shown}, stored {stored}"
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

    // From file:// the viewer runs on its inlined data: the static mode, which never polls.
    assert_eq!(
        b.eval("document.body.classList.contains('served')"),
        json!(false)
    );
    assert_eq!(
        b.eval("getComputedStyle(document.getElementById('mosaic-link')).display !== 'none'"),
        json!(true),
        "the static atlas links its mosaics"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        b.eval("performance.getEntriesByType('resource').filter(r => r.name.includes('atlas.json')).length"),
        json!(0),
        "the static viewer fetches no atlas.json"
    );
}

// ---------------------------------------------------------------------------------------------
// `vgg-atlas serve`: the viewer over HTTP, from the database.

/// The sqlite3 shell run on `db` with `args`, or `None` (after saying so) when it is not
/// installed outside CI (.ci/run installs it).
fn sqlite3(db: &Path, args: &[&str], stdin: &str) -> Option<String> {
    let mut child = match Command::new("sqlite3")
        .arg(db)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(_) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: no sqlite3 on this machine (.ci/run installs it)");
            return None;
        }
        Err(e) => panic!("sqlite3 is missing under CI ({e}); .ci/run installs it"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!(".timeout 10000\n{stdin}").as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "sqlite3 {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    Some(String::from_utf8(o.stdout).unwrap())
}

/// A consistent copy of the database `from` at `to`, as a store closed cleanly leaves it: in WAL
/// mode, with no -wal or -shm file beside it. `None` without sqlite3.
fn quiet_copy(from: &Path, to: &Path) -> Option<()> {
    let target = to.display().to_string().replace('\'', "''");
    sqlite3(from, &["-readonly"], &format!("VACUUM INTO '{target}';"))?;
    let mode = sqlite3(to, &[], "PRAGMA journal_mode = WAL;")?;
    assert_eq!(mode.trim(), "wal");
    assert!(
        !wal_files(to).iter().any(|p| p.exists()),
        "sqlite3 removes them at exit"
    );
    Some(())
}

/// The `-wal` and `-shm` files SQLite keeps beside a WAL database while it is open.
fn wal_files(db: &Path) -> [PathBuf; 2] {
    ["-wal", "-shm"].map(|s| PathBuf::from(format!("{}{s}", db.display())))
}

/// A file's bytes and modification time.
fn file_state(path: &Path) -> (Vec<u8>, std::time::SystemTime) {
    (
        std::fs::read(path).unwrap(),
        std::fs::metadata(path).unwrap().modified().unwrap(),
    )
}

/// One HTTP answer.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        assert_eq!(self.status, 200, "{}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// `GET path` on `addr` with extra request headers (HTTP/1.1, one request per connection).
fn http_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP head");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        let mut plain = Vec::new();
        let mut rest = body.as_slice();
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
                .unwrap();
            if size == 0 {
                break;
            }
            plain.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = plain;
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// A `vgg-atlas serve` process on a free loopback port; killed when dropped.
struct Served {
    child: Child,
    /// HOST:PORT
    addr: String,
    /// Its stderr, line by line.
    log: Arc<Mutex<Vec<String>>>,
}

impl Served {
    fn start(db: &str, extra: &[&str]) -> Served {
        let mut child = bin()
            .args(["serve", "--db", db, "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let log = Arc::new(Mutex::new(Vec::new()));
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                panic!(
                    "serve ended before saying where it listens: {:?}",
                    log.lock().unwrap()
                );
            };
            log.lock().unwrap().push(line.clone());
            if let Some(url) = line.strip_prefix("open http://") {
                break url.split('/').next().unwrap().to_string();
            }
        };
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                keep.lock().unwrap().push(line);
            }
        });
        Served { child, addr, log }
    }

    fn get(&self, path: &str) -> Reply {
        http_get(&self.addr, path, &[])
    }

    fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    fn stop(mut self) -> Vec<String> {
        self.child.kill().ok();
        self.child.wait().ok();
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The bytes in the first row's only column of `sql`, read through `vgg-atlas query`.
fn stored_bytes(db: &str, sql: &str) -> Vec<u8> {
    let rows: Value = serde_json::from_str(&run_ok(
        bin().args(["query", "--db", db, "--format", "json", sql]),
    ))
    .unwrap();
    let (_, value) = rows[0].as_object().unwrap().iter().next().unwrap();
    let hex = value.as_str().unwrap().trim_start_matches("\\x");
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// A result's stored PNG.
fn stored_png(db: &str, layer: &str, filter: u32) -> Vec<u8> {
    stored_bytes(
        db,
        &format!("SELECT png FROM results WHERE layer = '{layer}' AND filter = {filter}"),
    )
}

#[test]
fn serve_answers_from_the_database_and_never_writes_it() {
    let dir = rendered();
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("atlas.db");
    let quiet = quiet_copy(&dir.join("atlas.db"), &copy).is_some();
    if !quiet {
        // Without sqlite3: the file alone (render's -wal may hold results not in it yet, so
        // only what it holds is compared below).
        std::fs::copy(dir.join("atlas.db"), &copy).unwrap();
        if let Ok(wal) = std::fs::read(dir.join("atlas.db-wal")) {
            std::fs::write(wal_files(&copy)[0].clone(), wal).unwrap();
        }
    }
    let before = file_state(&copy);
    let db = format!("sqlite://{}", copy.display());
    let server = Served::start(&db, &[]);

    // atlas.json: the static atlas's shape and content (the static one matches the database:
    // render_ends_with_the_atlas_and_its_counts_match_the_database), without image bytes.
    let served = server.get("/atlas.json").json();
    let stored = read_json(&dir.join("atlas.json"));
    assert_eq!(served["run"], stored["run"]);
    assert_eq!(served["layers"], stored["layers"], "every filter and score");
    for key in ["tile", "margin", "panel"] {
        assert!(served["options"][key].is_u64(), "options.{key}");
    }
    assert!(
        server.get("/atlas.json").body.len() < 200_000,
        "no image bytes in atlas.json"
    );
    // The activations, checked against the database itself as well.
    let rows: Value = serde_json::from_str(&run_ok(bin().args([
        "query",
        "--db",
        &db_of(dir),
        "--format",
        "json",
        "SELECT layer, filter, activation FROM results",
    ])))
    .unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 192);
    for row in rows {
        let l = served["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == row["layer"])
            .unwrap();
        let e = &l["entries"][row["filter"].as_u64().unwrap() as usize];
        assert_eq!(e["filter"], row["filter"]);
        let (a, b) = (
            e["activation"].as_f64().unwrap(),
            row["activation"].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= 1e-6 * b.abs().max(1.0),
            "{row}: served {a}"
        );
    }
    // Polling what has not changed costs a 304 and no body.
    let etag = server
        .get("/atlas.json")
        .header("etag")
        .expect("an ETag")
        .to_string();
    let again = http_get(&server.addr, "/atlas.json", &[("If-None-Match", &etag)]);
    assert_eq!((again.status, again.body.len()), (304, 0));

    // Tiles: the stored bytes, as stored.
    for (layer, filter) in [("block1_conv1", 3), ("block2_conv1", 127)] {
        let tile = server.get(&format!("/tiles/{layer}/{filter}.png"));
        assert_eq!(tile.status, 200, "{}", tile.text());
        assert_eq!(tile.header("content-type"), Some("image/png"));
        assert!(
            tile.body == stored_png(&db_of(dir), layer, filter),
            "{layer} {filter}: the served PNG is the stored one, byte for byte"
        );
        assert_eq!(
            tile.body,
            std::fs::read(dir.join(format!("tiles/{layer}/{filter}.png"))).unwrap()
        );
    }
    for path in [
        "/tiles/block1_conv1/64.png",
        "/tiles/block5_conv3/0.png",
        "/tiles/block1_conv1/x.png",
        "/tiles/block1_conv1/3.jpg",
        "/atlas.png",
        "/nothing",
    ] {
        assert_eq!(server.get(path).status, 404, "{path}");
    }
    let health = server.get("/healthz");
    assert_eq!((health.status, health.text().trim()), (200, "ok"));
    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(
        page.text().contains("let ATLAS = /*ATLAS_DATA*/null;"),
        "the served mode"
    );

    // Read-only: the file is as it was, and nothing was made beside it.
    let log = server.stop();
    assert!(log.iter().any(|l| l.contains("serving run")), "{log:?}");
    let after = file_state(&copy);
    assert!(before.0 == after.0, "the database file was written");
    assert_eq!(before.1, after.1, "the database file's mtime changed");
    if quiet {
        for f in wal_files(&copy) {
            assert!(!f.exists(), "serve created {}", f.display());
        }
    }
}

#[test]
fn serve_refuses_what_it_cannot_serve_with_a_clear_message() {
    let dir = rendered();
    let tmp = tempfile::tempdir().unwrap();
    let refused = |args: &[&str], expected: &[&str]| {
        let o = bin().arg("serve").args(args).output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        for e in expected {
            assert!(err.contains(e), "{args:?}: {err:?} should say {e:?}");
        }
    };
    let missing = tmp.path().join("missing.db");
    refused(
        &["--db", &format!("sqlite://{}", missing.display())],
        &["no database file", "never creates"],
    );
    assert!(!missing.exists(), "serve created the database");
    refused(&["--db", "mysql://x/y"], &["not usable"]);
    refused(
        &["--db", "postgres://u:secret@127.0.0.1:1/db"],
        &["cannot open the database", "u:***@"],
    );
    // Not a vgg-atlas database: an empty SQLite database, and a file that is no database.
    let empty = tmp.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    refused(
        &["--db", &format!("sqlite://{}", empty.display())],
        &["not a vgg-atlas database", "no runs table"],
    );
    let text = tmp.path().join("text.db");
    std::fs::write(&text, "hello, this is not SQLite ".repeat(20)).unwrap();
    refused(
        &["--db", &format!("sqlite://{}", text.display())],
        &["cannot open the database"],
    );
    // An unknown run: the runs it holds are listed.
    let run_id = read_json(&dir.join("atlas.json"))["run"]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    refused(
        &["--db", &db_of(dir), "--run", "nope"],
        &["no run \"nope\"", &run_id, "192/192 filters finished"],
    );
    // The address is taken, or is no address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    refused(
        &["--db", &db_of(dir), "--listen", &addr],
        &["cannot listen on", "in use"],
    );
    refused(
        &["--db", &db_of(dir), "--listen", "nonsense"],
        &["cannot listen on nonsense", "HOST:PORT"],
    );
}

/// The `layer_summary` view as migration 0001 made it (0003 added columns to it).
fn layer_summary_of_0001() -> &'static str {
    let sql = include_str!("../migrations/sqlite/0001_store.sql");
    let start = sql
        .find("CREATE VIEW layer_summary")
        .expect("0001 creates layer_summary");
    let len = sql[start..].find(';').unwrap() + 1;
    &sql[start..start + len]
}

/// SQL that takes today's SQLite schema back to the one before migration 0003: no
/// `results.border_ratio` (nor its index), and `layer_summary` as 0001 made it.
/// SQL taking today's SQLite schema back to before migration 0004 (no examples tables, nor
/// 0007's second-ascent columns).
const BEFORE_0004: &str = "ALTER TABLE results DROP COLUMN first_activation;
     ALTER TABLE results DROP COLUMN second_activation;
     DROP INDEX filters_expiry;
     DROP INDEX filters_worker;
     DELETE FROM _sqlx_migrations WHERE version >= 5;
     DROP VIEW filter_examples;
     DROP TABLE image_filters;
     DROP TABLE examples;
     DROP TABLE images;
     DROP TABLE example_passes;
     DELETE FROM _sqlx_migrations WHERE version >= 4;";

fn before_0003() -> String {
    format!(
        "{BEFORE_0004}
         DROP VIEW layer_summary;
         DROP INDEX results_border_ratio;
         ALTER TABLE results DROP COLUMN border_ratio;
         {}
         DELETE FROM _sqlx_migrations WHERE version >= 3;",
        layer_summary_of_0001()
    )
}

/// Today's store at `path`, one filter of block1_conv1 finished (`image`, 2 retries, a border
/// ratio) and one leased.
fn store_with_one_result(path: &Path, image: &[u8]) {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let s = store::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        let spec = vgg_atlas_coordinator::plan::plan(
            &"ef".repeat(32),
            &[Layer::by_name("block1_conv1").unwrap()],
            &Settings {
                size: 16,
                steps: 2,
                ..Settings::default()
            },
            3,
            None,
        );
        s.create_or_resume_run(&spec).await.unwrap();
        let lease = s
            .lease(&spec.run_id, "w", 2, store::now_ms(), 600_000)
            .await
            .unwrap()
            .unwrap();
        let outcome = Submission {
            run_id: spec.run_id.clone(),
            layer: lease.layer.clone(),
            filter: 0,
            lease_id: lease.lease_id.clone(),
            worker: "w".into(),
            activation: 2.5,
            objective: 2.0,
            start_activation: 0.5,
            curve: vec![1.0, 2.5],
            seconds: 0.1,
            dead: false,
            failed_reason: None,
            retries: 2,
            png: image.to_vec(),
            border_ratio: Some(1.25),
            second_ascent: None,
        };
        s.submit(&outcome, store::now_ms()).await.unwrap();
        s.close().await;
    });
}

/// A database from before migration 0002 (the image in `results.image`, no `retries`, no
/// `border_ratio`) is served as it is, never migrated; when a newer vgg-atlas migrates it
/// meanwhile, serve follows.
#[test]
fn serve_shows_a_database_from_before_migration_0002_without_migrating_it() {
    let tmp = tempfile::tempdir().unwrap();
    // Today's store, one filter finished and one leased, taken back to migration 0001.
    let new = tmp.path().join("new.db");
    let image = png(16, 40);
    store_with_one_result(&new, &image);
    let downgrade = format!(
        "{}
         ALTER TABLE results RENAME COLUMN png TO image;
         ALTER TABLE results DROP COLUMN retries;
         DELETE FROM _sqlx_migrations WHERE version >= 2;",
        before_0003()
    );
    if sqlite3(&new, &[], &downgrade).is_none() {
        return;
    }
    let path = tmp.path().join("old.db");
    quiet_copy(&new, &path).unwrap();
    let before = file_state(&path);
    let db = format!("sqlite://{}", path.display());
    let server = Served::start(&db, &[]);
    let atlas = server.get("/atlas.json").json();
    let entries = &atlas["layers"][0]["entries"];
    assert_eq!(
        (
            &entries[0]["status"],
            &entries[0]["retries"],
            &entries[0]["activation"]
        ),
        (&json!("done"), &json!(0), &json!(2.5))
    );
    assert_eq!(
        entries[0].get("border_ratio"),
        Some(&Value::Null),
        "no border ratio in this database: null"
    );
    assert_eq!(entries[0]["tile"], "tiles/block1_conv1/0.png");
    assert_eq!(entries[1]["status"], "pending");
    assert_eq!(server.get("/tiles/block1_conv1/0.png").body, image);
    assert_eq!(server.get("/tiles/block1_conv1/1.png").status, 404);
    let after = file_state(&path);
    assert!(before.0 == after.0, "serve wrote the old database");
    assert_eq!(before.1, after.1);
    assert!(!wal_files(&path)[0].exists(), "serve created a -wal file");
    {
        let log = server.log.lock().unwrap();
        assert!(
            log.iter().any(|l| l.contains("before migration 0002")),
            "serve says the schema is old: {log:?}"
        );
    }

    // `status` migrates it while serve runs: atlas.json and the tiles come from the new columns.
    run_ok(bin().args(["status", "--db", &db]));
    let columns = sqlite3(
        &path,
        &["-readonly"],
        "SELECT name FROM pragma_table_info('results');",
    )
    .unwrap();
    assert!(columns.lines().any(|c| c == "png"), "migrated: {columns}");
    let atlas = server.get("/atlas.json").json();
    assert_eq!(atlas["layers"][0]["entries"][0]["retries"], 0);
    assert_eq!(
        atlas["layers"][0]["entries"][0].get("border_ratio"),
        Some(&Value::Null),
        "a result stored before the column has none"
    );
    assert_eq!(server.get("/tiles/block1_conv1/0.png").body, image);
    let health = server.get("/healthz");
    assert_eq!(health.status, 200, "{}", health.text());
}

/// A database from before migration 0003 (no `results.border_ratio`) is served as it is, its
/// border ratios null, and left unmigrated.
#[test]
fn serve_shows_a_database_from_before_migration_0003_without_migrating_it() {
    let tmp = tempfile::tempdir().unwrap();
    let new = tmp.path().join("new.db");
    let image = png(16, 40);
    store_with_one_result(&new, &image);
    if sqlite3(&new, &[], &before_0003()).is_none() {
        return;
    }
    let path = tmp.path().join("old.db");
    quiet_copy(&new, &path).unwrap();
    let before = file_state(&path);
    let db = format!("sqlite://{}", path.display());
    let server = Served::start(&db, &[]);
    let atlas = server.get("/atlas.json").json();
    let e = &atlas["layers"][0]["entries"][0];
    assert_eq!(
        (&e["status"], &e["retries"], e.get("border_ratio")),
        (&json!("done"), &json!(2), Some(&Value::Null))
    );
    assert_eq!(server.get("/tiles/block1_conv1/0.png").body, image);
    let log = server.stop();
    assert!(
        log.iter().any(|l| l.contains("before migration 0003")),
        "serve says the schema is old: {log:?}"
    );
    let after = file_state(&path);
    assert!(before.0 == after.0, "serve wrote the old database");
    assert_eq!(before.1, after.1);
    assert!(!wal_files(&path)[0].exists(), "serve created a -wal file");
}

/// The served viewer polls: a filter that finishes while the page is open appears in it, without
/// a reload, and what the user looks at (the layer, the open filter, the scroll) stays.
#[test]
fn serve_is_live_a_filter_that_finishes_appears_in_the_open_viewer() {
    let tmp = tempfile::tempdir().unwrap();
    let db = db_of(tmp.path());
    let layers = [Layer::by_name("block1_conv1").unwrap()];
    let settings = Settings {
        size: 16,
        steps: 2,
        ..Settings::default()
    };
    let spec = vgg_atlas_coordinator::plan::plan(&"cd".repeat(32), &layers, &settings, 1, None);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // The writer stays open, as a render's coordinator does: 16 filters leased, 10 finished.
    let s = rt.block_on(store::connect(&db)).unwrap();
    let lease = rt.block_on(async {
        s.create_or_resume_run(&spec).await.unwrap();
        s.lease(&spec.run_id, "w", 16, store::now_ms(), 600_000)
            .await
            .unwrap()
            .unwrap()
    });
    let submit = |filters: std::ops::Range<usize>| {
        rt.block_on(async {
            for &(filter, _) in &lease.filters[filters] {
                let outcome = Submission {
                    run_id: spec.run_id.clone(),
                    layer: lease.layer.clone(),
                    filter,
                    lease_id: lease.lease_id.clone(),
                    worker: "w".into(),
                    activation: 1.0 + filter as f32,
                    objective: 1.0,
                    start_activation: 0.5,
                    curve: vec![0.5, 1.0 + filter as f32],
                    seconds: 0.1,
                    dead: false,
                    failed_reason: None,
                    retries: 0,
                    png: png(16, filter as u8 * 10),
                    border_ratio: Some(1.0 + filter as f32 / 8.0),
                    second_ascent: None,
                };
                assert_eq!(
                    s.submit(&outcome, store::now_ms()).await.unwrap(),
                    store::SubmitOutcome::Recorded
                );
            }
        })
    };
    submit(0..10);

    let server = Served::start(&db, &[]);
    let atlas = server.get("/atlas.json").json();
    let l = &atlas["layers"][0];
    assert_eq!((&l["done"], &l["pending"]), (&json!(10), &json!(54)));
    assert_eq!(
        l["entries"][12]["status"], "pending",
        "leased shows as pending"
    );
    assert_eq!(server.get("/tiles/block1_conv1/12.png").status, 404);

    let browser = chromium().map(|chrome| {
        let mut b = Browser::launch(&chrome, "about:blank");
        b.call(
            "Page.navigate",
            json!({"url": format!("{}#/block1_conv1/12", server.url())}),
        );
        b.wait_for("location.protocol === 'http:' && document.readyState === 'complete'");
        b.wait_for("document.body.classList.contains('served') && document.querySelectorAll('#tiles img').length === 10");
        b.wait_for("document.getElementById('detail').classList.contains('open')");
        let status = b.eval("document.querySelector('#scores tr[data-key=status] td').textContent");
        assert_eq!(status, json!("pending"));
        assert_eq!(b.eval("document.querySelectorAll('#tiles .tile').length"), json!(64));
        assert_eq!(
            b.eval("document.querySelector('nav a.layer .count').textContent"),
            json!("10/64")
        );
        // Marks that a reload would lose.
        b.eval("window.notReloaded = true; document.scrollingElement.scrollTop = 150; document.scrollingElement.scrollTop");
        b
    });

    submit(10..16);
    let atlas = server.get("/atlas.json").json();
    let l = &atlas["layers"][0];
    assert_eq!((&l["done"], &l["pending"]), (&json!(16), &json!(48)));
    assert_eq!(l["entries"][12]["status"], "done");
    assert_eq!(
        l["entries"][12]["rank"], 4,
        "activations 16, 15, 14, 13, ..."
    );
    assert_eq!(server.get("/tiles/block1_conv1/12.png").body, png(16, 120));

    if let Some(mut b) = browser {
        let scroll = b.eval("document.scrollingElement.scrollTop");
        // The next poll (every 5 s) brings the new filters in.
        b.wait_for("[...document.querySelectorAll('#tiles img')].filter(i => i.complete && i.naturalWidth === 16).length === 16");
        assert_eq!(
            b.eval("window.notReloaded === true"),
            json!(true),
            "no reload"
        );
        assert_eq!(b.eval("location.hash"), json!("#/block1_conv1/12"));
        assert_eq!(
            b.eval("document.scrollingElement.scrollTop"),
            scroll,
            "the scroll stays"
        );
        // The open filter stays open and shows its result now.
        assert_eq!(
            b.eval("document.getElementById('detail').classList.contains('open')"),
            json!(true)
        );
        assert_eq!(
            b.eval("document.getElementById('detail-title').textContent"),
            json!("block1_conv1 · filter 12")
        );
        b.wait_for(
            "document.querySelector('#scores tr[data-key=status] td').textContent === 'done'",
        );
        let scores = b.eval(
            "Object.fromEntries([...document.querySelectorAll('#scores tr')].map(r => [r.dataset.key, r.cells[1].textContent]))",
        );
        assert_eq!(scores["activation"], json!("13.000"));
        assert_eq!(scores["rank in layer"], json!("4 of 16"));
        assert_eq!(scores["border ratio"], json!("2.50"));
        b.wait_for("(() => { const i = document.getElementById('detail-img'); return !i.hidden && i.complete && i.naturalWidth === 16; })()");
        assert_eq!(
            b.eval("document.querySelector('nav a.layer .count').textContent"),
            json!("16/64")
        );
        assert_eq!(
            b.eval("document.querySelectorAll('#tiles .tile.pending').length"),
            json!(48)
        );
        // The overview is each layer's progress.
        b.eval("document.getElementById('close').click(); location.hash = '#/'");
        b.wait_for("!document.getElementById('overview').hidden");
        assert_eq!(
            b.eval(
                "document.querySelector('#progress tr[data-layer] td:nth-child(2)').textContent"
            ),
            json!("16/64")
        );
        let (path, _) = screenshot(&mut b, "serve-live-overview.png");
        println!(
            "screenshot of the served overview during a run: {}",
            path.display()
        );
    }
    drop(server);
    rt.block_on(async { drop(s) });
}

/// Standard base64, as the DevTools protocol sends binary data.
fn base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .map(value)
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut n = 0u32;
        for (i, &d) in chunk.iter().enumerate() {
            n |= (d as u32) << (18 - 6 * i);
        }
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// The page as it looks now, written to target/tmp/`name`, and decoded.
fn screenshot(b: &mut Browser, name: &str) -> (PathBuf, image::RgbImage) {
    let shot = b.call("Page.captureScreenshot", json!({"format": "png"}));
    let bytes = base64(shot["data"].as_str().unwrap());
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::write(&path, &bytes).unwrap();
    let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8();
    (path, img)
}

/// The served viewer of a rendered run in headless Chromium: the progress overview, a layer's
/// tiles from /tiles, a filter's scores; and a screenshot of it.
#[test]
fn the_served_viewer_works_in_headless_chromium_and_is_screenshot() {
    let Some(chrome) = chromium() else { return };
    let dir = rendered();
    let atlas = read_json(&dir.join("atlas.json"));
    let server = Served::start(&db_of(dir), &[]);
    let mut b = Browser::launch(&chrome, "about:blank");
    b.call("Page.navigate", json!({"url": server.url()}));
    b.wait_for("location.protocol === 'http:' && document.readyState === 'complete'");
    b.wait_for("document.body.classList.contains('served') && document.querySelectorAll('#progress tr[data-layer]').length === 2");
    let names = b.eval("[...document.querySelectorAll('nav a.layer')].map(a => a.dataset.layer)");
    assert_eq!(names, json!(["block1_conv1", "block2_conv1"]));
    let progress = b.eval("[...document.querySelectorAll('#progress tr[data-layer]')].map(r => r.cells[1].textContent)");
    assert_eq!(progress, json!(["64/64", "128/128"]));
    assert_eq!(b.eval("document.title"), json!("VGG16 atlas (192/192)"));
    b.wait_for("document.getElementById('live').textContent.startsWith('live')");

    b.click("nav a.layer[data-layer='block2_conv1']");
    b.wait_for("document.getElementById('layer-name').textContent === 'block2_conv1'");
    b.wait_for("(() => { const imgs = [...document.querySelectorAll('#tiles img')]; return imgs.length === 128 && imgs.every(i => i.complete && i.naturalWidth === 32); })()");
    assert_eq!(
        b.eval("getComputedStyle(document.getElementById('mosaic-link')).display"),
        json!("none"),
        "no mosaics are served"
    );
    let entry = &atlas["layers"][1]["entries"][7];
    b.click("#tiles .tile[data-filter='7']");
    b.wait_for("document.getElementById('detail').classList.contains('open')");
    let rank =
        b.eval("document.querySelector('#scores tr[data-key=\"rank in layer\"] td').textContent");
    assert_eq!(rank, json!(format!("{} of 128", entry["rank"])));
    b.eval("document.getElementById('close').click()");
    b.wait_for("!document.getElementById('detail').classList.contains('open')");
    assert_eq!(
        b.eval("performance.getEntriesByType('resource').some(r => r.name.endsWith('/atlas.png'))"),
        json!(false),
        "the served viewer asks for no atlas.png"
    );

    let (path, img) = screenshot(&mut b, "serve-screenshot.png");
    println!("screenshot of the served viewer: {}", path.display());
    assert!(
        img.width() >= 800 && img.height() >= 600,
        "{}x{}",
        img.width(),
        img.height()
    );
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(
        colours.len() > 1000,
        "a blank screenshot: {} colours",
        colours.len()
    );
    let background = image::Rgb([0x11, 0x11, 0x11]);
    let drawn = img.pixels().filter(|&&p| p != background).count();
    assert!(
        drawn * 4 > img.pixels().len(),
        "most of the page is drawn: {drawn} of {} pixels",
        img.pixels().len()
    );
}

/// The PostgreSQL server of the store tests (`VGG_ATLAS_TEST_POSTGRES`; .ci/run starts one), or
/// `None` (after saying so) outside CI.
fn postgres_url() -> Option<String> {
    match std::env::var("VGG_ATLAS_TEST_POSTGRES") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var_os("CI").is_some() => {
            panic!("VGG_ATLAS_TEST_POSTGRES is not set under CI: .ci/run starts PostgreSQL")
        }
        _ => {
            eprintln!("skipped: set VGG_ATLAS_TEST_POSTGRES=postgres://USER:PASSWORD@HOST:PORT/DB to serve from PostgreSQL");
            None
        }
    }
}

/// `serve` from PostgreSQL: the run asked for among others, its scores and its stored PNGs.
#[test]
fn serve_reads_a_run_from_postgres() {
    let Some(url) = postgres_url() else { return };
    let layers = [Layer::by_name("block1_conv1").unwrap()];
    let settings = Settings {
        size: 16,
        steps: 2,
        ..Settings::default()
    };
    // A run of its own (a fresh seed), in a database other tests share.
    let fresh = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let spec =
        vgg_atlas_coordinator::plan::plan(&"12".repeat(32), &layers, &settings, 1, Some(fresh));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = rt.block_on(store::connect(&url)).unwrap();
    rt.block_on(async {
        s.create_or_resume_run(&spec).await.unwrap();
        let lease = s
            .lease(&spec.run_id, "w", 3, store::now_ms(), 600_000)
            .await
            .unwrap()
            .unwrap();
        for &(filter, _) in &lease.filters[..2] {
            let outcome = Submission {
                run_id: spec.run_id.clone(),
                layer: lease.layer.clone(),
                filter,
                lease_id: lease.lease_id.clone(),
                worker: "w".into(),
                activation: 1.5 + filter as f32,
                objective: 1.0,
                start_activation: 0.5,
                curve: vec![0.5, 1.5],
                seconds: 0.1,
                dead: filter == 1,
                failed_reason: None,
                retries: 1,
                png: png(16, 70 + filter as u8),
                border_ratio: Some(1.5 + filter as f32),
                second_ascent: None,
            };
            s.submit(&outcome, store::now_ms()).await.unwrap();
        }
    });
    let server = Served::start(&url, &["--run", &spec.run_id]);
    let atlas = server.get("/atlas.json").json();
    assert_eq!(atlas["run"]["run_id"], json!(spec.run_id));
    let l = &atlas["layers"][0];
    assert_eq!(
        (&l["done"], &l["dead"], &l["pending"]),
        (&json!(2), &json!(1), &json!(62))
    );
    let e = &l["entries"];
    assert_eq!(
        (
            &e[0]["status"],
            &e[0]["activation"],
            &e[0]["retries"],
            &e[0]["border_ratio"]
        ),
        (&json!("done"), &json!(1.5), &json!(1), &json!(1.5))
    );
    assert_eq!(e[2]["border_ratio"], Value::Null, "pending: no scores");
    assert_eq!(e[1]["status"], "dead");
    assert_eq!(e[2]["status"], "pending");
    assert_eq!(server.get("/tiles/block1_conv1/1.png").body, png(16, 71));
    assert_eq!(server.get("/tiles/block1_conv1/2.png").status, 404);
    assert_eq!(server.get("/healthz").status, 200);
    let log = server.stop();
    assert!(
        !log.iter().any(|l| l.contains("atlas:atlas@")),
        "the password is never printed: {log:?}"
    );
    rt.block_on(async { drop(s) });
}

#[test]
fn examples_appear_in_the_atlas_and_in_serve() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("atlas");
    run_ok(
        bin()
            .args([
                "render",
                "--layers",
                "block1_conv1",
                "--size",
                "32",
                "--steps",
                "2",
                "--sample",
                "4",
                "--tile-size",
                "24",
                "--out",
            ])
            .arg(&out),
    );
    let photos = dir.path().join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
    for name in ["chelsea.png", "coffee.webp", "rocket.jpg"] {
        std::fs::copy(fixtures.join(name), photos.join(name)).unwrap();
    }
    let db = db_of(&out);
    run_ok(
        bin()
            .args([
                "examples", "--db", &db, "--size", "32", "--top", "2", "--images",
            ])
            .arg(&photos),
    );
    run_ok(
        bin()
            .args(["mosaic", "--db", &db, "--tile-size", "24", "--out"])
            .arg(&out),
    );

    // The static atlas: the crops as files, byte for byte, listed per filter; the mosaic.
    let atlas = read_json(&out.join("atlas.json"));
    let layer = &atlas["layers"][0];
    assert_eq!(layer["mosaic_examples"], "block1_conv1.examples.png");
    assert!(out.join("block1_conv1.examples.png").is_file());
    let entries = layer["entries"].as_array().unwrap();
    // The sample's 4 filters of block1_conv1 each fire on some photo.
    assert_eq!(entries.len(), 4);
    assert!(
        entries.iter().all(|e| e.get("examples").is_some()),
        "{entries:?}"
    );
    let e0 = &entries[0]["examples"];
    assert_eq!(e0[0]["rank"], 1);
    assert_eq!(e0[0]["crop"], "examples/block1_conv1/0-1.png");
    assert!(e0[0]["activation"].as_f64().unwrap() >= e0[1]["activation"].as_f64().unwrap());
    let crop = stored_bytes(
        &db,
        "SELECT crop FROM filter_examples WHERE layer = 'block1_conv1' AND filter = 0 AND rank = 1",
    );
    assert_eq!(
        std::fs::read(out.join("examples/block1_conv1/0-1.png")).unwrap(),
        crop
    );

    // Served: the same list, the crop at the same path, and 404 for a rank that is not there.
    let server = Served::start(&db, &[]);
    let served = server.get("/atlas.json").json();
    assert_eq!(served["layers"][0]["entries"][0]["examples"], *e0);
    let reply = server.get("/examples/block1_conv1/0-1.png");
    assert_eq!((reply.status, &reply.body), (200, &crop));
    assert_eq!(server.get("/examples/block1_conv1/0-3.png").status, 404);
    assert_eq!(server.get("/examples/block1_conv1/zero-1.png").status, 404);
}

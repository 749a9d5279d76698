//! Faults of the ground a run stands on, injected into real processes: the PostgreSQL server
//! stopped and started again mid-run, the disk under the store filling up, and workers and the
//! coordinator killed at random. Each test prints one `FAULTS` line (as tests/faults.rs does)
//! with what was injected, how many filters were lost (must be 0) and how many were computed
//! again; docs/reliability.md reports them
//! (`cargo test --test chaos -- --nocapture | grep FAULTS`).
//!
//! The PostgreSQL test runs a server of its own (it must stop it), with the binaries `.ci/run`
//! installs; the disk test mounts a small tmpfs, which needs root. Where either is missing the
//! test fails under CI and is skipped, with a line saying so, elsewhere.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A test that cannot run here: a failure under CI (which installs what it needs), a line
/// saying so elsewhere.
fn unavailable(why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{why}; .ci/run provides it"
    );
    eprintln!("skipped: {why}");
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A PostgreSQL server of this test's own (a fresh cluster in a folder under /tmp, on a free
/// loopback port), which the test may stop and start again. As root it runs as the `postgres`
/// user, as PostgreSQL requires. Stopped and removed on drop.
struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    root: bool,
}

impl Postgres {
    fn start() -> Result<Postgres, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|_| "no PostgreSQL server binaries under /usr/lib/postgresql".to_string())?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max_by_key(|b| {
                b.parent()
                    .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
                    .unwrap_or(0)
            })
            .ok_or("no initdb under /usr/lib/postgresql/*/bin")?;
        let root = is_root();
        if root
            && Command::new("id")
                .arg("postgres")
                .output()
                .map_or(true, |o| !o.status.success())
        {
            return Err("no `postgres` user to run a PostgreSQL server as".into());
        }
        let data = std::env::temp_dir().join(format!(
            "vgg-atlas-chaos-pg-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir(&data).map_err(|e| e.to_string())?;
        let pg = Postgres {
            bin,
            data,
            port: free_port(),
            root,
        };
        if root {
            pg.must(Command::new("chown").arg("postgres:postgres").arg(&pg.data));
        }
        pg.must(pg.tool("initdb").arg("-D").arg(&pg.data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-locale",
            "-E",
            "UTF8",
        ]));
        pg.start_again();
        Ok(pg)
    }

    /// A PostgreSQL program, run as the `postgres` user when this test is root.
    fn tool(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        let mut c = if self.root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        c.current_dir(std::env::temp_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    }

    fn must(&self, c: &mut Command) {
        let o = c.output().unwrap();
        assert!(
            o.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Starts the server and waits until it accepts connections.
    fn start_again(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} -c fsync=off",
            self.port,
            self.data.display()
        );
        self.must(
            self.tool("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.data.join("server.log"))
                .args(["-w", "-o", &options, "start"]),
        );
    }

    /// Stops the server as an operator's restart does (`pg_ctl stop -m fast`): open
    /// connections are ended, new ones refused.
    fn stop(&self) {
        self.must(
            self.tool("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "stop"]),
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// After the coordinator has finished: every worker exits cleanly, all 128 filters have their
/// result, and every result stored `before` the fault is unchanged. Returns the results.
fn all_finished_and_kept(
    workers: &mut [std::process::Child],
    db: &str,
    before: &HashMap<(String, i64), i64>,
) -> HashMap<(String, i64), i64> {
    for w in workers {
        assert!(
            wait(w, Duration::from_secs(30)).success(),
            "a worker finished"
        );
    }
    let after = finished_at_in(db);
    assert_eq!(after.len(), 128, "every filter has its result");
    for (key, t) in before {
        assert_eq!(
            after.get(key),
            Some(t),
            "filter {key:?} was lost or recomputed"
        );
    }
    after
}

fn healthz(addr: &str) -> (String, String) {
    try_http_get(addr, "/healthz").unwrap_or_else(|e| (format!("no answer: {e}"), String::new()))
}

/// 128 filters rendered by two worker processes on a PostgreSQL store whose server is stopped
/// twice: for 3 s, then for 10 s (longer than the 4 s lease, and than the workers'
/// `--give-up-after`). The coordinator keeps running, says so on `/healthz` and in its log,
/// reconnects by itself, and the run finishes with every result stored before the outages
/// unchanged. Recomputed at most: the leases in flight at each
/// outage (two workers, a lease and a prefetched one each, 8 filters a lease).
#[test]
fn postgresql_stopped_and_started_again_mid_run_loses_nothing() {
    let pg = match Postgres::start() {
        Ok(pg) => pg,
        Err(why) => return unavailable(&why),
    };
    let db = pg.url();
    let dir = tempfile::tempdir().unwrap();
    let health = format!("127.0.0.1:{}", free_port());
    let mut args = PLAN.to_vec();
    args.extend([
        "--db",
        &db,
        "--lease-seconds",
        "4",
        "--metrics-listen",
        &health,
    ]);
    let (mut render, addr, log) = coordinator_logged("127.0.0.1:0", dir.path(), &args);
    // A coordinator that answers "my database is out" is not silent: workers that give up after
    // 5 s without an answer wait out the 10 s outage.
    let patient = ["--give-up-after", "5s"];
    let mut workers = [
        worker_with(&addr, "a", &patient),
        worker_with(&addr, "b", &patient),
    ];
    wait_until("16 finished filters", Duration::from_secs(120), || {
        done(&db) >= 16
    });
    let before = finished_at_in(&db);
    let mut outages = Vec::new();
    for (seconds, more) in [(3, 16), (10, 0)] {
        let at = finished_at_in(&db).len();
        pg.stop();
        let down = Instant::now();
        let (status, body) = healthz(&health);
        assert!(
            status.contains("503"),
            "/healthz during the outage: {status} {body}"
        );
        assert!(body.contains("the database does not answer"), "{body}");
        std::thread::sleep(Duration::from_secs(seconds).saturating_sub(down.elapsed()));
        pg.start_again();
        wait_until("/healthz ok again", Duration::from_secs(30), || {
            healthz(&health).0.contains("200")
        });
        outages.push(format!("{seconds} s at {at} of 128"));
        if more > 0 {
            wait_until("more finished filters", Duration::from_secs(120), || {
                done(&db) >= at as i64 + more
            });
        }
    }
    assert!(
        wait(&mut render, Duration::from_secs(300)).success(),
        "the coordinator finished the run"
    );
    all_finished_and_kept(&mut workers, &db, &before);
    let recomputed = recomputed(&db);
    assert!(
        recomputed <= 2 * 2 * 2 * 8,
        "{recomputed} filters computed again: more than the leases in flight at two outages"
    );
    let log = log.lock().unwrap().join("\n");
    let began = log.matches("the database does not answer").count();
    let ended = log.matches("the database answers again").count();
    assert!(
        began >= 2 && ended >= 2,
        "each outage is said in the log:\n{log}"
    );
    eprintln!(
        "FAULTS PostgreSQL stopped ({}; lease 4 s): 2 injected, 0 lost, {recomputed} recomputed",
        outages.join(", then ")
    );
}

/// A small tmpfs mounted by the test (root only), unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(bytes: u64) -> Result<Tmpfs, String> {
        if !is_root() {
            return Err("mounting a small filesystem to fill needs root".into());
        }
        // One folder per mount: the tests that mount one run side by side.
        static MOUNTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = MOUNTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("vgg-atlas-chaos-disk-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !o.status.success() {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!(
                "cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    /// [`Tmpfs::mount`], for a test that checks a SQLite store on it with the sqlite3 shell.
    fn for_sqlite(bytes: u64) -> Result<Tmpfs, String> {
        if Command::new("sqlite3").arg("--version").output().is_err() {
            return Err("no sqlite3 shell to check the store's integrity".into());
        }
        Tmpfs::mount(bytes)
    }

    /// Fills what is left of the filesystem with one file, returned.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        for chunk in [1 << 16, 1 << 12, 1] {
            let block = vec![0u8; chunk];
            while f.write_all(&block).is_ok() {}
        }
        let _ = f.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Every line `child` writes to its (piped) stderr, kept as it comes.
fn keep_log(child: &mut std::process::Child) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use std::io::{BufRead, BufReader};
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let keep = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            keep.lock().unwrap().push(line);
        }
    });
    log
}

/// `PRAGMA integrity_check` of a SQLite file, by the sqlite3 shell.
fn integrity(file: &std::path::Path) -> String {
    let o = Command::new("sqlite3")
        .arg(file)
        .arg("PRAGMA integrity_check")
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

/// The disk under the SQLite store and the output folder fills up mid-run: the coordinator
/// says so (log, `/healthz`) and records nothing more, the workers keep their results and
/// retry, the store stays intact (`PRAGMA integrity_check`), and once space is freed the run
/// finishes with nothing lost or computed again. Then the disk fills before the atlas is drawn:
/// the render warns at its start that the disk is short, says what is full, and the same
/// command, run again after space is freed, draws it.
#[test]
fn a_full_disk_stops_results_until_space_is_freed_and_corrupts_nothing() {
    let disk = match Tmpfs::for_sqlite(32 << 20) {
        Ok(d) => d,
        Err(why) => return unavailable(&why),
    };
    let out = disk.dir.join("atlas");
    let file = out.join("atlas.db");
    let db = format!("sqlite://{}", file.display());
    let health = format!("127.0.0.1:{}", free_port());
    let mut args = PLAN.to_vec();
    args.extend(["--lease-seconds", "60", "--metrics-listen", &health]);
    let (mut render, addr, log) = coordinator_logged("127.0.0.1:0", &out, &args);
    let mut workers = [worker(&addr, "a"), worker(&addr, "b")];
    wait_until("16 finished filters", Duration::from_secs(120), || {
        done(&db) >= 16
    });
    let before = finished_at_in(&db);
    let short = |log: &str| log.contains("warning: the disk under");
    assert!(
        !short(&log.lock().unwrap().join("\n")),
        "a render that fits its disk is warned of none"
    );
    let filler = disk.fill();
    let said = || {
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("its disk is full"))
    };
    wait_until(
        "the coordinator to say the disk is full",
        Duration::from_secs(120),
        said,
    );
    let (status, body) = healthz(&health);
    assert!(
        status.contains("503") && body.contains("disk is full"),
        "/healthz: {status} {body}"
    );
    let full_at = done(&db);
    std::thread::sleep(Duration::from_secs(3));
    let stored_while_full = done(&db) - full_at;
    assert_eq!(integrity(&file), "ok", "the store while its disk is full");
    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait(&mut render, Duration::from_secs(300)).success(),
        "the coordinator finished the run once space was freed"
    );
    let after = all_finished_and_kept(&mut workers, &db, &before);
    assert_eq!(
        recomputed(&db),
        0,
        "the workers kept their results: nothing computed again"
    );
    let log = log.lock().unwrap().join("\n");
    assert!(log.contains("the database answers again"), "{log}");

    // The atlas drawn onto a full disk: refused with what is full, drawn by the same command
    // once space is freed.
    let mosaic = out.join("block1_conv2.png");
    std::fs::remove_dir_all(out.join("tiles")).unwrap();
    std::fs::remove_file(&mosaic).unwrap();
    let filler = disk.fill();
    let again = || {
        bin()
            .args(["render", "--out"])
            .arg(&out)
            .args(PLAN)
            .output()
            .unwrap()
    };
    let refused = again();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success(),
        "drawing onto a full disk succeeded: {err}"
    );
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        short(&err),
        "the render said the disk was short at its start: {err}"
    );
    assert_eq!(integrity(&file), "ok", "the store after a refused render");
    std::fs::remove_file(&filler).unwrap();
    let drawn = again();
    assert!(
        drawn.status.success(),
        "{}",
        String::from_utf8_lossy(&drawn.stderr)
    );
    assert!(mosaic.exists(), "the atlas was drawn");
    assert_eq!(finished_at_in(&db), after, "no stored result changed");
    let last = err.lines().last().unwrap_or_default();
    eprintln!(
        "FAULTS disk full under the SQLite store at {full_at} of 128 ({stored_while_full} stored while full), then under the atlas: 2 injected, 0 lost, 0 recomputed, integrity ok; the refused render said: {last}"
    );
}

/// The disk under an examples pass's SQLite store fills up as it makes its crops: the pass says
/// at its start that the disk is short, waits with what it made (said in its log) instead of
/// failing, keeps the store intact, and once space is freed finishes with every image examined
/// once and every example cropped.
#[test]
fn an_examples_pass_waits_out_a_full_disk_under_its_store() {
    use std::io::Write;
    let disk = match Tmpfs::for_sqlite(64 << 20) {
        Ok(d) => d,
        Err(why) => return unavailable(&why),
    };
    // 20 MB left: the crops of every filter's top 1 take about 30 MB.
    let filler = disk.dir.join("filler");
    std::fs::File::create(&filler)
        .unwrap()
        .write_all(&vec![0u8; 44 << 20])
        .unwrap();
    let file = disk.dir.join("atlas.db");
    let db = format!("sqlite://{}", file.display());
    let photos = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
    let mut pass = bin()
        .args(["examples", "--images"])
        .arg(&photos)
        .args(["--db", &db, "--top", "1", "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = keep_log(&mut pass);
    let said = |what: &str| log.lock().unwrap().iter().any(|l| l.contains(what));
    wait_until(
        "the pass to say its disk is full",
        Duration::from_secs(300),
        || said("its disk is full"),
    );
    assert!(
        said("warning: the disk under") && said("this examples pass writes about"),
        "the pass said at its start that the disk was short: {:?}",
        log.lock().unwrap()
    );
    let during = if said("making the crops") {
        "its crops"
    } else {
        "the pass"
    };
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(integrity(&file), "ok", "the store while its disk is full");
    assert!(
        pass.try_wait().unwrap().is_none(),
        "the pass stopped on a full disk: {:?}",
        log.lock().unwrap()
    );
    std::fs::remove_file(&filler).unwrap();
    assert!(
        wait(&mut pass, Duration::from_secs(300)).success(),
        "the pass finished once space was freed: {:?}",
        log.lock().unwrap()
    );
    assert_eq!(integrity(&file), "ok", "the store after the pass");
    let numbers = |sql: &str| -> Vec<i64> {
        query(&db, sql, "csv")
            .lines()
            .nth(1)
            .unwrap()
            .split(',')
            .map(|v| v.trim().parse().unwrap())
            .collect()
    };
    let images = numbers(
        "SELECT SUM(state = 'done') AS done, SUM(state = 'skipped') AS skipped, \
         SUM(attempts) - COUNT(*) AS again FROM images",
    );
    assert_eq!(
        images[..2],
        [11, 1],
        "every photo examined, the README skipped"
    );
    let examples = numbers(
        "SELECT COUNT(*) AS n, SUM(crop IS NULL OR length(crop) = 0) AS uncropped FROM examples",
    );
    assert!(
        examples[0] > 4000 && examples[1] == 0,
        "each filter's example, each cropped: {examples:?}"
    );
    // What it stored is what the same pass stores on a disk with room.
    let roomy = tempfile::tempdir().unwrap();
    let reference = format!("sqlite://{}", roomy.path().join("atlas.db").display());
    let o = bin()
        .args(["examples", "--images"])
        .arg(&photos)
        .args(["--db", &reference, "--top", "1", "--threads", "1"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listing = "SELECT layer, filter, image, activation, length(crop) AS crop FROM examples \
                   ORDER BY layer_index, filter";
    let (stored, expected) = (
        query(&db, listing, "csv"),
        query(&reference, listing, "csv"),
    );
    assert!(
        expected.lines().count() > 4000 && stored == expected,
        "the examples and crops are those of the same pass on a disk with room"
    );
    assert!(
        said("the database answers again"),
        "{:?}",
        log.lock().unwrap()
    );
    eprintln!(
        "FAULTS disk full under an examples pass's SQLite store during {during} (12 files, top 1, 20 MB free): 1 injected, 0 lost, {} images examined again, every example cropped, integrity ok",
        images[2]
    );
}

/// A small random generator (xorshift64*), seeded from the clock or `VGG_ATLAS_SOAK_SEED` so
/// that a failing soak can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Filters under a lease in the store now, all or one worker's (`name@…`).
fn leased(db: &str, worker: Option<&str>) -> i64 {
    let filter = worker.map_or(String::new(), |w| format!(" AND worker LIKE '{w}@%'"));
    let v: serde_json::Value = serde_json::from_str(&query(
        db,
        &format!("SELECT COUNT(*) AS n FROM filters WHERE state = 'leased'{filter}"),
        "json",
    ))
    .unwrap();
    v[0]["n"].as_i64().unwrap()
}

/// 256 filters (`VGG_ATLAS_SOAK_LAYERS` to change the layers) rendered by four worker processes while, every 2-4 s, a random one of them or
/// the coordinator is killed (SIGKILL) and started again: for `VGG_ATLAS_SOAK_SECONDS` (30 by
/// default; docs/reliability.md gives a longer run) or until three quarters are done. Every filter ends done exactly once, no
/// result is lost, and the filters computed again are at most the filters under lease at the
/// kills (a killed worker's leases; every lease at a coordinator kill).
#[test]
fn a_soak_of_random_kills_loses_nothing_and_recomputes_at_most_what_was_in_flight() {
    let seconds: u64 = std::env::var("VGG_ATLAS_SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var("VGG_ATLAS_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("soak: {seconds} s, VGG_ATLAS_SOAK_SEED={seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("atlas.db").display());
    let listen = format!("127.0.0.1:{}", free_port());
    let layers = std::env::var("VGG_ATLAS_SOAK_LAYERS")
        .unwrap_or_else(|_| "block1_conv1,block1_conv2,block2_conv1".into());
    let args = [
        "--layers",
        &layers,
        "--size",
        "32",
        "--steps",
        "30",
        "--lease-seconds",
        "3",
        // A filter whose leases are killed again and again must not be failed for it.
        "--max-attempts",
        "1000",
    ];
    let (mut render, addr) = coordinator_on(&listen, dir.path(), &args);
    let total = count(&status(&db), "total");
    let names = ["w0", "w1", "w2", "w3"];
    let mut workers: Vec<_> = names.iter().map(|n| worker(&addr, n)).collect();
    let started = Instant::now();
    let (mut worker_kills, mut coordinator_kills, mut in_flight) = (0, 0, 0);
    while started.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(2000 + rng.below(2000)));
        // The last quarter is left in peace: a worker started after the coordinator has
        // finished would wait for it for ever.
        if render.try_wait().unwrap().is_some() || done(&db) >= total * 3 / 4 {
            break;
        }
        match rng.below(5) as usize {
            0 => {
                let _ = render.kill();
                let _ = render.wait();
                in_flight += leased(&db, None);
                coordinator_kills += 1;
                render = coordinator_on(&listen, dir.path(), &args).0;
            }
            i => {
                let w = &mut workers[i - 1];
                let _ = w.kill();
                let _ = w.wait();
                in_flight += leased(&db, Some(names[i - 1]));
                worker_kills += 1;
                *w = worker(&addr, names[i - 1]);
            }
        }
    }
    let soaked = started.elapsed().as_secs();
    let at_end = done(&db);
    assert!(
        wait(&mut render, Duration::from_secs(600)).success(),
        "the coordinator finished the run"
    );
    for w in &mut workers {
        assert!(
            wait(w, Duration::from_secs(60)).success(),
            "a worker finished"
        );
    }
    let rows = status(&db);
    assert_eq!(count(&rows, "done"), total, "{rows:?}");
    assert_eq!(count(&rows, "failed"), 0, "{rows:?}");
    assert_eq!(
        finished_at_in(&db).len() as i64,
        total,
        "one result per filter"
    );
    let recomputed = recomputed(&db);
    assert!(
        recomputed <= in_flight,
        "{recomputed} filters computed again, more than the {in_flight} under lease at the kills"
    );
    eprintln!(
        "FAULTS chaos soak, {soaked} s of random SIGKILLs every 2-4 s ({worker_kills} of workers, \
         {coordinator_kills} of the coordinator; {at_end} of {total} done when it ended): \
         {} injected, 0 lost, {recomputed} recomputed (bound: {in_flight} under lease at the kills)",
        worker_kills + coordinator_kills
    );
}

/// An examples pass (`vgg-atlas examples`, 40 images, batches of 4) on a PostgreSQL store whose
/// server is stopped for 14 s mid-pass, then again for 12 s as the crops begin: the pass waits
/// both outages out (said in its log), keeps the batch it was examining, and finishes with every
/// image examined once and every example cropped.
#[test]
fn an_examples_pass_waits_out_postgresql_stopped_mid_pass_and_during_its_crops() {
    let pg = match Postgres::start() {
        Ok(pg) => pg,
        Err(why) => return unavailable(&why),
    };
    let db = pg.url();
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..40 {
        let img = image::RgbImage::from_fn(256, 256, |x, y| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let v = (state as u8) / 2 + ((x + y + i) % 128) as u8;
            image::Rgb([v, v / 2, 255 - v])
        });
        img.save(images.join(format!("{i:02}.png"))).unwrap();
    }
    let mut pass = bin()
        .args(["examples", "--images"])
        .arg(&images)
        .args(["--db", &db, "--batch", "4", "--top", "3", "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = keep_log(&mut pass);
    let examined = || -> i64 {
        let o = bin()
            .args(["query", "--db", &db, "--format", "csv"])
            .arg("SELECT COUNT(*) AS n FROM images WHERE state = 'done'")
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .nth(1)
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    wait_until("8 examined images", Duration::from_secs(120), || {
        examined() >= 8
    });
    let at = examined();
    pg.stop();
    // Longer than the pool waits for a connection (10 s): the pass's calls fail meanwhile.
    std::thread::sleep(Duration::from_secs(14));
    pg.start_again();
    // The second outage, when the pass says it begins the crops (every image examined).
    let said = |what: &str| log.lock().unwrap().iter().any(|l| l.contains(what));
    wait_until("the crops to begin", Duration::from_secs(300), || {
        said("making the crops") || said("crops of the top")
    });
    pg.stop();
    std::thread::sleep(Duration::from_secs(12));
    pg.start_again();
    assert!(
        wait(&mut pass, Duration::from_secs(300)).success(),
        "the pass finished: {:?}",
        log.lock().unwrap()
    );
    assert_eq!(examined(), 40, "every image examined");
    let attempts = query(
        &db,
        "SELECT SUM(attempts) - COUNT(*) AS again FROM images",
        "csv",
    );
    let again: i64 = attempts.lines().nth(1).unwrap().trim().parse().unwrap();
    let uncropped = query(
        &db,
        "SELECT COUNT(*) AS n FROM examples WHERE crop IS NULL OR length(crop) = 0",
        "csv",
    );
    assert_eq!(
        uncropped.lines().nth(1).map(str::trim),
        Some("0"),
        "every example has its crop"
    );
    let lines = log.lock().unwrap().clone();
    let log = lines.join("\n");
    assert!(
        log.matches("the database answers again").count() >= 2,
        "each outage is said in the pass's log:\n{log}"
    );
    // The second outage began while the crops were being made, not after them.
    let line = |what: &str, nth: usize| {
        lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains(what))
            .map(|(i, _)| i)
            .nth(nth)
    };
    let (began, down, made) = (
        line("making the crops", 0),
        // (the line that ends an outage names it in parentheses)
        line("the database does not answer (", 1),
        line("crops of the top", 0),
    );
    assert!(
        matches!((began, down, made), (Some(b), Some(d), Some(m)) if b < d && d < m),
        "the second outage came after the crops began and before they were made:\n{log}"
    );
    eprintln!(
        "FAULTS PostgreSQL stopped for 14 s during an examples pass at {at} of 40 images, then for 12 s as its crops began: 2 injected, 0 lost, {again} images examined again, every example cropped"
    );
}

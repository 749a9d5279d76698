//! `vgg-atlas examples` as a user runs it: a folder of real photos (tests/fixtures/photos),
//! generated stripes with a known answer, files that are not images, then SQL on the store,
//! and the same command again.

mod common;

use std::path::Path;

use common::*;

fn run(args: &[&str]) -> std::process::Output {
    bin().args(args).output().unwrap()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Black and white stripes 2 px wide, vertical or horizontal, 64 x 64.
fn stripes(vertical: bool) -> image::RgbImage {
    image::RgbImage::from_fn(64, 64, |x, y| {
        let v = if vertical { x } else { y };
        image::Rgb(if (v / 2) % 2 == 0 { [0; 3] } else { [255; 3] })
    })
}

/// The block1_conv2 filter that `probe` finds the stripes excite most relative to the cat.
fn stripe_filter(dir: &Path, name: &str) -> usize {
    let acts = |path: &str| -> Vec<f64> {
        let o = run(&["probe", path, "--layer", "block1_conv2", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["activations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_f64().unwrap())
            .collect()
    };
    let cat = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chelsea64.png");
    let (s, c) = (
        acts(dir.join(name).to_str().unwrap()),
        acts(cat.to_str().unwrap()),
    );
    (0..s.len())
        .max_by(|&a, &b| (s[a] - c[a]).total_cmp(&(s[b] - c[b])))
        .unwrap()
}

#[test]
fn examples_rank_real_photos_skip_what_is_not_an_image_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let photos = images.join("photos");
    std::fs::create_dir_all(&photos).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
    let mut n_photos = 0;
    for e in std::fs::read_dir(&fixtures).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x != "md") {
            std::fs::copy(&p, photos.join(p.file_name().unwrap())).unwrap();
            n_photos += 1;
        }
    }
    stripes(true).save(images.join("stripes_v.png")).unwrap();
    stripes(false).save(images.join("stripes_h.png")).unwrap();
    std::fs::write(images.join("notes.txt"), "not an image").unwrap();
    let rocket = std::fs::read(fixtures.join("rocket.jpg")).unwrap();
    std::fs::write(images.join("broken.jpg"), &rocket[..rocket.len() / 3]).unwrap();
    std::fs::write(images.join(".hidden.png"), "left out").unwrap();
    let db = format!("sqlite://{}", dir.path().join("examples.db").display());
    let args = [
        "examples",
        "--images",
        images.to_str().unwrap(),
        "--db",
        &db,
        "--size",
        "64",
        "--top",
        "3",
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    let n = n_photos + 2;
    assert!(
        log.contains("new pass") && log.contains(&format!("{} images ({} new)", n + 2, n + 2)),
        "{log}"
    );
    assert!(
        log.contains(&format!("{n} images done, 2 skipped")),
        "{log}"
    );

    // Every file is accounted for; the two that are not images say why.
    let skipped = query(
        &db,
        "SELECT image, reason FROM images WHERE state = 'skipped' ORDER BY image",
        "csv",
    );
    let lines: Vec<&str> = skipped.lines().collect();
    assert_eq!(lines.len(), 3, "{skipped}");
    assert!(
        lines[1].starts_with("broken.jpg,") && lines[1].contains("truncated"),
        "{skipped}"
    );
    assert!(
        lines[2].starts_with("notes.txt,") && lines[2].contains("not an image"),
        "{skipped}"
    );
    assert_eq!(
        query(
            &db,
            "SELECT COUNT(*) AS n FROM images WHERE state = 'done' AND sha256 IS NOT NULL",
            "csv"
        ),
        format!("n\n{n}\n")
    );

    // Every filter of every conv layer has its top 3, and every image its 3 strongest filters
    // of each layer.
    // An image where a filter stays silent (activation 0) is not its example, so a filter
    // silent on all but one or two images has fewer than 3.
    let counts = query(
        &db,
        "SELECT COUNT(*) AS n, MAX(rank) AS k, MIN(activation) > 0 AS positive,
                COUNT(DISTINCT layer || '/' || filter) AS filters
         FROM filter_examples",
        "csv",
    );
    let v: Vec<f64> = counts
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(v[0] <= 12672.0 && v[0] >= 0.9 * 12672.0, "{counts}");
    assert_eq!((v[1], v[2]), (3.0, 1.0), "{counts}");
    assert!(
        v[3] >= 4100.0,
        "nearly every one of the 4224 filters has an example: {counts}"
    );
    assert_eq!(
        query(&db, "SELECT COUNT(*) AS n FROM image_filters", "csv"),
        format!("n\n{}\n", n * 13 * 3)
    );
    // An image's strongest filter of a layer has it among its own examples, at the same
    // activation (the two tables are written from the same pass).
    let joined = query(
        &db,
        "SELECT COUNT(*) AS n FROM image_filters i
         JOIN filter_examples e ON e.pass_id = i.pass_id AND e.layer = i.layer
              AND e.filter = i.filter AND e.image = i.image AND e.activation = i.activation
         WHERE i.rank = 1",
        "csv",
    );
    let joined: usize = joined.lines().nth(1).unwrap().parse().unwrap();
    assert!(
        joined > 0,
        "no image is an example of its own strongest filter"
    );

    // Known answers: the stripes are among the top 3 of the filter that responds to them.
    for (name, vertical) in [("stripes_v.png", true), ("stripes_h.png", false)] {
        let f = stripe_filter(&images, name);
        let rank = query(
            &db,
            &format!(
                "SELECT rank FROM filter_examples
                 WHERE layer = 'block1_conv2' AND filter = {f} AND image = '{name}'"
            ),
            "csv",
        );
        assert!(
            rank.lines()
                .nth(1)
                .is_some_and(|r| r.parse::<i64>().unwrap() <= 3),
            "{name} (vertical {vertical}) is not among filter {f}'s top 3: {rank:?}"
        );
    }

    // The crops are PNGs of their receptive fields: block1_conv1 sees 3 x 3 pixels (2 on an
    // edge), block5_conv3 up to 64 (the whole image at this size).
    let crops = query(
        &db,
        "SELECT layer, crop_width, crop_height, crop FROM filter_examples
         WHERE filter = 0 AND rank = 1 AND layer IN ('block1_conv1', 'block5_conv3') ORDER BY layer",
        "json",
    );
    let crops: Vec<serde_json::Value> = serde_json::from_str(&crops).unwrap();
    for c in &crops {
        let hex = c["crop"].as_str().unwrap().trim_start_matches("\\x");
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        let png = image::load_from_memory(&bytes).unwrap();
        assert_eq!(
            (png.width() as i64, png.height() as i64),
            (
                c["crop_width"].as_i64().unwrap(),
                c["crop_height"].as_i64().unwrap()
            )
        );
    }
    assert!(crops[0]["crop_width"].as_i64().unwrap() <= 3);
    assert_eq!(crops[1]["crop_width"].as_i64().unwrap(), 64);

    // The same command again resumes the finished pass: nothing new, nothing changed.
    let table = "SELECT layer, filter, rank, image, activation, y, x, crop FROM filter_examples
                 ORDER BY layer, filter, rank";
    let before = query(&db, table, "csv");
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = stderr(&o);
    assert!(
        log.contains("resuming pass") && log.contains("(0 new)"),
        "{log}"
    );
    assert!(log.contains("0 examined here"), "{log}");
    assert_eq!(query(&db, table, "csv"), before);
}

/// The fixture photos (and a few flipped copies) in a new folder.
fn photo_folder(dir: &Path) -> std::path::PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
    for e in std::fs::read_dir(&fixtures).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x != "md") {
            let img = image::open(&p).unwrap().to_rgb8();
            let stem = p.file_stem().unwrap().to_str().unwrap();
            img.save(images.join(format!("{stem}.png"))).unwrap();
            image::imageops::flip_horizontal(&img)
                .save(images.join(format!("{stem}-flipped.png")))
                .unwrap();
        }
    }
    images
}

#[test]
fn two_processes_on_one_database_share_the_pass_and_store_what_one_would() {
    let dir = tempfile::tempdir().unwrap();
    let images = photo_folder(dir.path());
    let pass = |db: &str| {
        vec![
            "examples".to_string(),
            "--images".into(),
            images.to_str().unwrap().into(),
            "--db".into(),
            db.into(),
            "--size".into(),
            "128".into(),
            "--batch".into(),
            "2".into(),
            "--threads".into(),
            "1".into(),
        ]
    };
    // Each database starts with a pass over a one-image folder, so both processes below find
    // the schema made (as on a cluster's PostgreSQL).
    let tiny = dir.path().join("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    stripes(true).save(tiny.join("stripes.png")).unwrap();
    let (one, two) = (
        format!("sqlite://{}", dir.path().join("one.db").display()),
        format!("sqlite://{}", dir.path().join("two.db").display()),
    );
    for db in [&one, &two] {
        let o = bin()
            .args([
                "examples",
                "--images",
                tiny.to_str().unwrap(),
                "--db",
                db,
                "--size",
                "32",
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let o = bin().args(pass(&one)).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let a = bin()
        .args(pass(&two))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let b = bin()
        .args(pass(&two))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        stderr(&a),
        stderr(&b)
    );
    let examined = |o: &std::process::Output| -> usize {
        let log = stderr(o);
        let line = log
            .lines()
            .find(|l| l.contains("examined here"))
            .unwrap()
            .to_string();
        line.split("; ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let n = std::fs::read_dir(&images).unwrap().count();
    assert_eq!(
        examined(&a) + examined(&b),
        n,
        "every image examined once between the two"
    );
    assert!(examined(&a) > 0 && examined(&b) > 0, "both took part");
    let table = "SELECT layer, filter, rank, image, activation, y, x FROM filter_examples
                 ORDER BY layer, filter, rank";
    assert_eq!(query(&one, table, "csv"), query(&two, table, "csv"));
    let images_table = "SELECT image, layer, filter, rank, activation FROM image_filters
                        ORDER BY image, layer, rank";
    assert_eq!(
        query(&one, images_table, "csv"),
        query(&two, images_table, "csv")
    );
}

#[test]
fn workers_over_grpc_store_what_a_local_pass_does() {
    let dir = tempfile::tempdir().unwrap();
    let images = photo_folder(dir.path());
    let flags = ["--size", "64", "--top", "5"];
    let local = format!("sqlite://{}", dir.path().join("local.db").display());
    let o = run(&[
        &[
            "examples",
            "--images",
            images.to_str().unwrap(),
            "--db",
            &local,
        ][..],
        &flags,
    ]
    .concat());
    assert!(o.status.success(), "{}", stderr(&o));

    // One worker has a copy of half the folder (the rest it fetches), the other none.
    let half = dir.path().join("half");
    std::fs::create_dir_all(&half).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for name in names.iter().step_by(2) {
        std::fs::copy(images.join(name), half.join(name)).unwrap();
    }
    let remote = format!("sqlite://{}", dir.path().join("remote.db").display());
    let mut coordinator = bin()
        .args([
            "examples",
            "--images",
            images.to_str().unwrap(),
            "--db",
            &remote,
            "--listen",
            "127.0.0.1:0",
            "--local-workers",
            "0",
        ])
        .args(flags)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines =
        std::io::BufRead::lines(std::io::BufReader::new(coordinator.stderr.take().unwrap()));
    let mut log = Vec::new();
    let addr = loop {
        let line = lines.next().expect("examples printed its address").unwrap();
        log.push(line.clone());
        if let Some(rest) = line.split("--connect ").nth(1) {
            break rest.split([' ', '`']).next().unwrap().to_string();
        }
    };
    let mut a = worker_with(&addr, "a", &["--images", half.to_str().unwrap()]);
    let mut b = worker_with(&addr, "b", &[]);
    log.extend(lines.map_while(Result::ok));
    let limit = std::time::Duration::from_secs(300);
    assert!(
        wait(&mut coordinator, limit).success(),
        "{}",
        log.join("\n")
    );
    assert!(wait(&mut a, limit).success() && wait(&mut b, limit).success());
    let log = log.join("\n");
    assert!(log.contains("0 examined here"), "{log}");
    assert!(
        log.contains(&format!("{} images done, 0 skipped", names.len())),
        "{log}"
    );

    let table = "SELECT layer, filter, rank, image, activation, y, x, crop IS NOT NULL AS cropped
                 FROM filter_examples ORDER BY layer, filter, rank";
    assert_eq!(query(&local, table, "csv"), query(&remote, table, "csv"));
    let images_table = "SELECT image, sha256, layer, filter, rank, activation FROM image_filters
                        JOIN images USING (pass_id, image) ORDER BY image, layer, rank";
    assert_eq!(
        query(&local, images_table, "csv"),
        query(&remote, images_table, "csv")
    );
}

#[test]
fn examples_refuse_an_empty_folder_and_bad_flags_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let db_path = dir.path().join("x.db");
    let db = format!("sqlite://{}", db_path.display());
    let e = empty.to_str().unwrap();
    for (args, says) in [
        (vec!["--images", e], "holds no files"),
        (
            vec!["--images", "/nonexistent/photos"],
            "cannot open the images folder",
        ),
        (vec!["--images", e, "--top", "0"], "--top 0 is out of range"),
        (
            vec!["--images", e, "--size", "8"],
            "--size 8 is out of range",
        ),
        (
            vec!["--images", e, "--batch", "0"],
            "--batch must be at least 1",
        ),
    ] {
        let o = run(&[&["examples", "--db", &db][..], &args].concat());
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(!db_path.exists(), "a refused pass creates no database");
}

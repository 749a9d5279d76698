//! The atlas crate on synthetic tiles: mosaic geometry and pixels, the by-activation order,
//! the marks of dead, failed and pending filters, the files written, and the overview.

use image::{Rgb, RgbImage};
use vgg_atlas_atlas::{
    self as atlas, draw, Example, Filter, LayerFilters, Options, Run, Scores, Status,
};

/// A distinct image per filter: a gradient whose colours depend on `k`.
fn image_for(k: u32, side: u32) -> RgbImage {
    RgbImage::from_fn(side, side, |x, y| {
        Rgb([
            (x * 255 / side) as u8 ^ (k * 37) as u8,
            (y * 255 / side) as u8 ^ (k * 91) as u8,
            (k * 53 % 256) as u8,
        ])
    })
}

fn png(img: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    bytes
}

fn scores(activation: f32) -> Scores {
    Scores {
        activation,
        objective: activation - 1.0,
        start_activation: 0.5,
        curve: vec![0.5, activation / 2.0, activation],
        seconds: 0.25,
        worker: "w1".into(),
        retries: 0,
        border_ratio: Some(1.25),
    }
}

/// `n` filters; filter k has activation (k * 7) % n, except the given dead/failed/pending ones.
fn layer(
    name: &str,
    index: u32,
    n: u32,
    side: u32,
    dead: &[u32],
    failed: &[u32],
    pending: &[u32],
) -> LayerFilters {
    let filters = (0..n)
        .map(|k| {
            let status = if dead.contains(&k) {
                Status::Dead
            } else if failed.contains(&k) {
                Status::Failed
            } else if pending.contains(&k) {
                Status::Pending
            } else {
                Status::Done
            };
            let finished = matches!(status, Status::Done | Status::Dead);
            Filter {
                filter: k,
                status,
                png: finished.then(|| png(&image_for(k, side))),
                scores: finished.then(|| {
                    scores(if status == Status::Dead {
                        0.0
                    } else {
                        ((k * 7) % n) as f32 + 1.0
                    })
                }),
                attempts: 1,
                failed_reason: (status == Status::Failed)
                    .then(|| "NaN in the gradient".to_string()),
                examples: vec![],
            }
        })
        .collect();
    LayerFilters {
        name: name.into(),
        index,
        filters,
    }
}

fn crop(img: &RgbImage, x: u32, y: u32, side: u32) -> RgbImage {
    image::imageops::crop_imm(img, x, y, side, side).to_image()
}

#[test]
fn mosaic_size_follows_from_count_tile_and_margin_and_tile_k_is_the_resized_image() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        tile: 20,
        margin: 3,
        panel: 200,
    };
    // 37 filters: a 7x6 grid with an empty last row tail.
    let l = layer("block1_conv1", 0, 37, 32, &[], &[], &[]);
    let out = atlas::write_layer(dir.path(), &l, &opts).unwrap();
    let m = image::open(dir.path().join("block1_conv1.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(atlas::grid(37), (7, 6));
    assert_eq!(m.dimensions(), (7 * 20 + 8 * 3, 6 * 20 + 7 * 3));
    assert_eq!(m.dimensions(), atlas::mosaic_size(37, 20, 3));
    for k in 0..37u32 {
        let (x, y) = atlas::tile_origin(k as usize, 37, 20, 3);
        assert_eq!((x, y), (3 + (k % 7) * 23, 3 + (k / 7) * 23));
        let expected = atlas::resized(&image_for(k, 32), 20);
        assert!(
            crop(&m, x, y, 20) == expected,
            "tile {k} differs from the resized image"
        );
    }
    // Margins are background, not image.
    assert_eq!(*m.get_pixel(1, 1), draw::BACKGROUND);
    assert_eq!(*m.get_pixel(3 + 20 + 1, 10), draw::BACKGROUND);
    assert_eq!(out.summary.filters, 37);
    assert_eq!(out.summary.done, 37);

    // Sorted by activation: activation of filter k is (7k mod 37) + 1, so rank r holds the k
    // with 7k = 36 - r (mod 37).
    let sorted = image::open(dir.path().join("block1_conv1.by-activation.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(sorted.dimensions(), m.dimensions());
    let order = atlas::by_activation(&l.filters);
    for (slot, &k) in order.iter().enumerate() {
        assert_eq!((7 * k as u32) % 37, 36 - slot as u32);
        let (x, y) = atlas::tile_origin(slot, 37, 20, 3);
        assert!(crop(&sorted, x, y, 20) == atlas::resized(&image_for(k as u32, 32), 20));
    }
    for e in &out.summary.entries {
        let k = e.filter;
        assert_eq!(e.rank, Some(37 - (7 * k) % 37), "filter {k}");
    }
}

#[test]
fn dead_failed_and_pending_filters_are_marked_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        tile: 32,
        margin: 2,
        panel: 200,
    };
    let l = layer("block2_conv1", 2, 16, 32, &[3], &[5], &[7, 8]);
    let out = atlas::write_layer(dir.path(), &l, &opts).unwrap();
    let m = image::open(dir.path().join("block2_conv1.png"))
        .unwrap()
        .to_rgb8();
    let at = |k: usize| {
        let (x, y) = atlas::tile_origin(k, 16, 32, 2);
        crop(&m, x, y, 32)
    };
    // Dead: the image with a red frame.
    let dead = at(3);
    assert_eq!(*dead.get_pixel(0, 0), draw::DEAD);
    assert_eq!(*dead.get_pixel(16, 16), *image_for(3, 32).get_pixel(16, 16));
    // Failed and pending: their marks.
    assert!(at(5) == draw::failed_tile(32));
    assert!(at(7) == draw::pending_tile(32));
    assert!(at(8) == draw::pending_tile(32));
    assert!(at(0) == image_for(0, 32));

    let s = &out.summary;
    assert_eq!(
        (s.filters, s.done, s.dead, s.failed, s.pending),
        (16, 13, 1, 1, 2)
    );
    // Tiles exist for finished filters only, byte for byte the stored PNGs.
    for f in &l.filters {
        let path = dir
            .path()
            .join(format!("tiles/block2_conv1/{}.png", f.filter));
        match &f.png {
            Some(bytes) => assert_eq!(&std::fs::read(&path).unwrap(), bytes),
            None => assert!(!path.exists(), "{}", path.display()),
        }
    }
    let e5 = &s.entries[5];
    assert_eq!(
        (e5.status, e5.rank, e5.failed_reason.as_deref()),
        (Status::Failed, None, Some("NaN in the gradient"))
    );
    assert_eq!(
        s.entries[3].rank,
        Some(13),
        "dead ranks last among the finished"
    );
    // By activation: finished first, then failed, then pending.
    let order = atlas::by_activation(&l.filters);
    assert_eq!(&order[12..], &[3, 5, 7, 8]);
}

#[test]
fn a_stale_tile_from_an_earlier_render_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options::default();
    let all = layer("block1_conv1", 0, 4, 16, &[], &[], &[]);
    atlas::write_layer(dir.path(), &all, &opts).unwrap();
    let partial = layer("block1_conv1", 0, 4, 16, &[], &[], &[2]);
    atlas::write_layer(dir.path(), &partial, &opts).unwrap();
    assert!(!dir.path().join("tiles/block1_conv1/2.png").exists());
    assert!(dir.path().join("tiles/block1_conv1/1.png").exists());
}

#[test]
fn overview_and_index_hold_every_layer_in_network_order() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        tile: 16,
        margin: 1,
        panel: 160,
    };
    let layers = [
        layer("block2_conv1", 2, 12, 16, &[], &[], &[1]),
        layer("block1_conv1", 0, 8, 16, &[2], &[], &[]),
        layer("block1_conv2", 1, 8, 16, &[], &[4], &[]),
    ];
    let outputs: Vec<_> = layers
        .iter()
        .map(|l| atlas::write_layer(dir.path(), l, &opts).unwrap())
        .collect();
    let run = Run {
        run_id: "0123456789abcdef".into(),
        weights_sha256: "59c1f2de".repeat(8),
        settings: serde_json::json!({"size": 16, "steps": 3, "objective": "pre-relu", "seed": 0}),
        created_at_ms: 1,
    };
    atlas::write_index(dir.path(), &run, &outputs, &opts).unwrap();

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("atlas.json")).unwrap()).unwrap();
    let names: Vec<&str> = json["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["block1_conv1", "block1_conv2", "block2_conv1"]);
    assert_eq!(json["layers"][2]["pending"], 1);
    assert_eq!(json["layers"][0]["dead"], 1);
    assert_eq!(json["layers"][1]["failed"], 1);
    assert_eq!(json["layers"][0]["entries"][0]["activation"], 1.0);
    assert_eq!(json["layers"][0]["entries"][0]["border_ratio"], 1.25);
    assert_eq!(json["run"]["run_id"], "0123456789abcdef");

    let html = std::fs::read_to_string(dir.path().join("index.html")).unwrap();
    assert!(html.contains("block1_conv2") && html.contains("tiles/block2_conv1/0.png"));
    assert!(!html.contains("/*ATLAS_DATA*/null"), "the data is inlined");

    // atlas.png: every layer's panel is in it, block1's two side by side above block2's.
    let overview = image::open(dir.path().join("atlas.png")).unwrap().to_rgb8();
    let at: Vec<(u32, u32)> = [1usize, 2, 0]
        .iter()
        .map(|&i| find(&overview, &outputs[i].panel).expect("panel drawn in atlas.png"))
        .collect();
    assert!(
        at[0].1 == at[1].1 && at[0].0 < at[1].0,
        "block1 layers share a row: {at:?}"
    );
    assert!(
        at[2].1 > at[0].1 && at[2].0 < at[1].0,
        "block2 starts the next row: {at:?}"
    );
}

/// Where `needle` appears in `hay`, pixel for pixel.
fn find(hay: &RgbImage, needle: &RgbImage) -> Option<(u32, u32)> {
    let (w, h) = needle.dimensions();
    for y in 0..=hay.height().saturating_sub(h) {
        for x in 0..=hay.width().saturating_sub(w) {
            if hay.get_pixel(x + 1, y + 1) == needle.get_pixel(1, 1)
                && crop(hay, x, y, w.max(h)).dimensions() == (w.max(h), w.max(h))
                && image::imageops::crop_imm(hay, x, y, w, h).to_image() == *needle
            {
                return Some((x, y));
            }
        }
    }
    None
}

#[test]
fn an_image_that_does_not_decode_is_drawn_failed_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options {
        tile: 16,
        margin: 1,
        panel: 200,
    };
    let mut l = layer("block1_conv1", 0, 4, 16, &[], &[], &[]);
    l.filters[2].png = Some(b"not a png".to_vec());
    let out = atlas::write_layer(dir.path(), &l, &opts).unwrap();
    assert_eq!(out.warnings.len(), 1);
    assert!(out.warnings[0].contains("filter 2") && out.warnings[0].contains("does not decode"));
    let m = image::open(dir.path().join("block1_conv1.png"))
        .unwrap()
        .to_rgb8();
    let (x, y) = atlas::tile_origin(2, 4, 16, 1);
    assert!(crop(&m, x, y, 16) == draw::failed_tile(16));
    let (x, y) = atlas::tile_origin(1, 4, 16, 1);
    assert!(crop(&m, x, y, 16) == image_for(1, 16));
}

#[test]
fn a_table_puts_each_image_in_its_row_and_column_and_leaves_missing_ones_empty() {
    let red = image::RgbImage::from_pixel(8, 8, image::Rgb([255, 0, 0]));
    let blue = image::RgbImage::from_pixel(8, 8, image::Rgb([0, 0, 255]));
    let t = atlas::table(&[vec![Some(red), None], vec![None, Some(blue)]], 8, 4);
    assert_eq!(t.dimensions(), (2 * 12 + 4, 2 * 12 + 4));
    assert_eq!(*t.get_pixel(4, 4), image::Rgb([255, 0, 0]));
    assert_eq!(*t.get_pixel(16 + 3, 16 + 3), image::Rgb([0, 0, 255]));
    assert_eq!(*t.get_pixel(16 + 3, 4), draw::BACKGROUND);
    assert_eq!(*t.get_pixel(4, 16 + 3), draw::BACKGROUND);
}

#[test]
fn examples_are_written_listed_and_drawn_as_a_mosaic_of_the_strongest_crops() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = layer("block1_conv1", 0, 4, 16, &[], &[], &[]);
    // Filter 1 has two examples (a red 3x3 crop first), filter 3 one (a blue 2x3 edge crop);
    // filters 0 and 2 none.
    let red = png(&RgbImage::from_pixel(3, 3, Rgb([250, 0, 0])));
    let green = png(&RgbImage::from_pixel(3, 3, Rgb([0, 250, 0])));
    let blue = png(&RgbImage::from_pixel(2, 3, Rgb([0, 0, 250])));
    let example = |rank, image: &str, crop: &Vec<u8>| Example {
        rank,
        image: image.into(),
        activation: 10.0 / rank as f32,
        crop_box: [5, 6, 3, 3],
        cropped: true,
        crop: Some(crop.clone()),
    };
    l.filters[1].examples = vec![example(1, "a/cat.jpg", &red), example(2, "dog.png", &green)];
    l.filters[3].examples = vec![example(1, "sea.webp", &blue)];
    let opts = Options::default();
    let out = atlas::write_layer(dir.path(), &l, &opts).unwrap();
    let s = &out.summary;
    assert_eq!(
        s.mosaic_examples.as_deref(),
        Some("block1_conv1.examples.png")
    );
    for (f, rank, bytes) in [(1, 1, &red), (1, 2, &green), (3, 1, &blue)] {
        let path = dir
            .path()
            .join(atlas::example_path("block1_conv1", f, rank));
        assert_eq!(&std::fs::read(&path).unwrap(), bytes, "{}", path.display());
    }
    let m = image::open(dir.path().join("block1_conv1.examples.png"))
        .unwrap()
        .to_rgb8();
    let tile_centre = |k: usize| {
        let (x, y) = atlas::tile_origin(k, 4, opts.tile, opts.margin);
        *m.get_pixel(x + opts.tile / 2, y + opts.tile / 2)
    };
    assert_eq!(
        tile_centre(1),
        Rgb([250, 0, 0]),
        "filter 1's strongest crop, scaled up sharp"
    );
    assert_eq!(tile_centre(3), Rgb([0, 0, 250]));
    assert_eq!(
        tile_centre(0),
        *draw::pending_tile(opts.tile).get_pixel(opts.tile / 2, opts.tile / 2)
    );

    let json: serde_json::Value = serde_json::from_str(&atlas::atlas_json(
        &Run {
            run_id: "r".into(),
            weights_sha256: "w".into(),
            settings: serde_json::json!({}),
            created_at_ms: 0,
        },
        &opts,
        &[s],
    ))
    .unwrap();
    let entries = &json["layers"][0]["entries"];
    assert_eq!(entries[1]["examples"][0]["image"], "a/cat.jpg");
    assert_eq!(
        entries[1]["examples"][1]["crop"],
        "examples/block1_conv1/1-2.png"
    );
    assert_eq!(
        entries[1]["examples"][0]["box"],
        serde_json::json!([5, 6, 3, 3])
    );
    assert!(
        entries[0].get("examples").is_none(),
        "no examples, no key: {}",
        entries[0]
    );
    assert_eq!(
        json["layers"][0]["mosaic_examples"],
        "block1_conv1.examples.png"
    );

    // Without examples, no mosaic and no key.
    let plain = atlas::write_layer(
        dir.path(),
        &layer("block1_conv2", 1, 4, 16, &[], &[], &[]),
        &opts,
    )
    .unwrap();
    assert_eq!(plain.summary.mosaic_examples, None);
    assert!(!dir.path().join("block1_conv2.examples.png").exists());
}

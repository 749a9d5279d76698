//! Shared by the compute tests: the real weights and the fixture image.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use vgg_atlas_worker::{fetch, Preprocess, Weights};

/// The real Keras VGG16 weights: from the cache, fetched by the project if missing (CI runs
/// `vgg-atlas weights fetch` first). A test never runs on made-up weights by accident.
pub fn weights() -> &'static Weights {
    static W: OnceLock<Weights> = OnceLock::new();
    W.get_or_init(|| {
        let path = fetch::ensure_default(&|m| eprintln!("{m}"))
            .expect("the default weights (run `vgg-atlas weights fetch`)");
        let w = Weights::load(&path).expect("the cached weights load");
        assert_eq!(
            w.sha256,
            fetch::WEIGHTS_SHA256,
            "cached weights are not the pinned ones"
        );
        w
    })
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub fn chelsea() -> image::RgbImage {
    image::open(fixtures().join("chelsea64.png"))
        .expect("fixture image")
        .to_rgb8()
}

/// An RGB image as the network's NHWC input, repeated `copies` times.
pub fn net_input(img: &image::RgbImage, pre: Preprocess, copies: usize) -> Vec<f32> {
    pre.nhwc(img).repeat(copies)
}

pub fn pool() -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
}

/// max |a - b| / max |b|: relative error of a whole vector.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

//! Forward activations against onnxruntime on the same weights (fixtures made by
//! tests/fixtures/make_refs.py), for both the candle model and the fast CPU trunk.

mod common;

use candle_core::Device;
use common::*;
use vgg_atlas_proto::{Layer, Objective, LAYERS};
use vgg_atlas_worker::engine::cpu_trunk::CpuTrunk;
use vgg_atlas_worker::engine::trunk::Trunk;
use vgg_atlas_worker::engine::vgg::Vgg16;

fn refs() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("refs_keras_chelsea64.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn column(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn candle_forward_matches_onnxruntime_on_every_conv_layer() {
    let refs = refs();
    let model = Vgg16::new(weights(), &Device::Cpu).unwrap();
    let x = model.input_from_image(&chelsea()).unwrap();
    let outs = model
        .forward(&x, Layer::by_name("block5_conv3").unwrap())
        .unwrap();
    assert_eq!(outs.len(), 13);
    for (layer, out) in LAYERS[..13].iter().zip(outs) {
        let r = &refs["layers"][layer.name];
        let pre: Vec<f64> = out
            .flatten_from(2)
            .unwrap()
            .mean(2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let post: Vec<f64> = out
            .relu()
            .unwrap()
            .flatten_from(2)
            .unwrap()
            .mean(2)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let (ep, eq) = (
            rel_err(&pre, &column(&r["pre_relu_mean"])),
            rel_err(&post, &column(&r["post_relu_mean"])),
        );
        assert!(
            ep <= 1e-4 && eq <= 1e-4,
            "{}: relative error pre {ep:e}, post {eq:e}",
            layer.name
        );
    }
}

#[test]
fn cpu_trunk_matches_onnxruntime_on_every_conv_layer() {
    let refs = refs();
    let w = weights();
    let img = chelsea();
    let mut trunk = CpuTrunk::new(w);
    pool().install(|| {
        for layer in &LAYERS[..13] {
            // A spread of filters, one image each (the trunk computes one filter per image).
            let filters: Vec<usize> = (0..layer.filters())
                .step_by(layer.filters() / 16)
                .chain([layer.filters() - 1])
                .collect();
            let n = filters.len();
            let input = net_input(&img, w.preprocess, n);
            let scores = trunk
                .run(*layer, &filters, 64, 64, &input, Objective::PreRelu, None)
                .unwrap();
            let pre: Vec<f64> = scores.iter().map(|s| s.pre as f64).collect();
            let post: Vec<f64> = scores.iter().map(|s| s.post as f64).collect();
            let r = &refs["layers"][layer.name];
            let pick = |v: Vec<f64>| filters.iter().map(|&f| v[f]).collect::<Vec<_>>();
            let (want_pre, want_post) = (column(&r["pre_relu_mean"]), column(&r["post_relu_mean"]));
            // Relative to the layer's largest mean, as in the candle test.
            let scale = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let ep = pick(want_pre.clone())
                .iter()
                .zip(&pre)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max)
                / scale(&want_pre);
            let eq = pick(want_post.clone())
                .iter()
                .zip(&post)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max)
                / scale(&want_post);
            assert!(
                ep <= 1e-4 && eq <= 1e-4,
                "{}: relative error pre {ep:e}, post {eq:e}",
                layer.name
            );
        }
    });
}

#[test]
fn probe_ranks_filters_like_the_reference() {
    let refs = refs();
    let model = Vgg16::new(weights(), &Device::Cpu).unwrap();
    let acts = model
        .probe(&chelsea(), Layer::by_name("block4_conv3").unwrap())
        .unwrap();
    let want = column(&refs["layers"]["block4_conv3"]["post_relu_mean"]);
    let top = |v: &[f64]| (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
    let got: Vec<f64> = acts.iter().map(|&a| a as f64).collect();
    assert_eq!(top(&got), top(&want));
    assert!(rel_err(&got, &want) <= 1e-4);
}

#[test]
fn conv_only_weights_refuse_the_classifier_layers() {
    let model = Vgg16::new(weights(), &Device::Cpu).unwrap();
    let img = image::RgbImage::new(224, 224);
    let err = model
        .probe(&img, Layer::by_name("fc1").unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("fc1") && err.contains("classifier"), "{err}");
}

//! Forward activations against onnxruntime on the same weights (fixtures made by
//! tests/fixtures/make_refs.py), for both the candle model and the fast CPU trunk.

mod common;

use candle_core::Device;
use common::*;
use vgg_atlas_proto::{Layer, Objective, LAYERS};
use vgg_atlas_worker::engine::cpu_trunk::CpuTrunk;
use vgg_atlas_worker::engine::device_trunk::DeviceTrunk;
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

/// The examples pass's forward (every filter of every conv layer, its mean and where it peaks)
/// on the CPU trunk, against onnxruntime's means and candle's means, maxima and positions.
#[test]
fn the_peaks_pass_matches_onnxruntime_and_candle_on_every_conv_layer() {
    let refs = refs();
    let w = weights();
    let img = chelsea();
    let flipped = image::imageops::flip_horizontal(&img);
    let input: Vec<f32> = [w.preprocess.nhwc(&img), w.preprocess.nhwc(&flipped)].concat();
    let mut trunk = CpuTrunk::new(w);
    let ours = pool().install(|| trunk.peaks(2, 64, &input)).unwrap();
    let model = Vgg16::new(w, &Device::Cpu).unwrap();
    let x = candle_core::Tensor::from_slice(&input, (2, 64, 64, 3), &Device::Cpu)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
        .contiguous()
        .unwrap();
    let theirs = model.peaks(&x).unwrap();
    assert_eq!((ours.len(), theirs.len()), (2, 2));
    let scale = |v: &[f64]| v.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    for (l, layer) in LAYERS[..13].iter().enumerate() {
        let want = column(&refs["layers"][layer.name]["post_relu_mean"]);
        let got: Vec<f64> = ours[0][l].iter().map(|p| p.activation as f64).collect();
        let e = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
            / scale(&want);
        assert!(e <= 1e-4, "{}: activation vs onnxruntime {e:e}", layer.name);
        for b in 0..2 {
            let (o, t) = (&ours[b][l], &theirs[b][l]);
            assert_eq!(o.len(), layer.filters());
            let max_scale = t.iter().fold(0.0f32, |m, p| m.max(p.max));
            let side = layer.output_side(64) as u32;
            let mut same_place = 0;
            for (f, (o, t)) in o.iter().zip(t).enumerate() {
                let e = (o.activation - t.activation).abs() / max_scale.max(1e-6);
                let m = (o.max - t.max).abs() / max_scale.max(1e-6);
                assert!(
                    e <= 1e-4 && m <= 1e-4,
                    "{} filter {f}: mean {e:e}, max {m:e}",
                    layer.name
                );
                assert!(o.y < side && o.x < side);
                same_place += usize::from((o.y, o.x) == (t.y, t.x));
            }
            // Two f32 computations may order a near-tie differently; nearly all agree.
            assert!(
                same_place * 100 >= 98 * layer.filters(),
                "{}: {same_place} of {} maxima at the same position",
                layer.name,
                layer.filters()
            );
        }
    }
    // Each image of the batch has its own figures (the mirrored cat is another input).
    assert_ne!(ours[0][12], ours[1][12]);
    // The device trunk (what `examples --device cuda:0` runs) on the CPU device: the same as
    // the candle model it wraps, from the same NHWC input.
    let mut device = DeviceTrunk::new(w, &Device::Cpu).unwrap();
    assert_eq!(device.peaks(2, 64, &input).unwrap(), theirs);
    // The forward-only trunk the examples pass builds computes the same, and no ascent.
    let mut lean = CpuTrunk::for_peaks(w);
    assert_eq!(pool().install(|| lean.peaks(2, 64, &input)).unwrap(), ours);
    let e = lean
        .run(
            LAYERS[0],
            &[0],
            64,
            64,
            &input[..64 * 64 * 3],
            Objective::PreRelu,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("examples pass"), "{e}");
}

//! The classifier targets (fc1, fc2, predictions) of a full checkpoint: the fast trunk's
//! forward equals the candle model's (same flatten order), and its input gradient matches
//! finite differences. The real checkpoint here is conv-only, so the classifier is random.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use common::*;
use rand::{Rng, SeedableRng};
use vgg_atlas_proto::{Layer, LayerKind, Objective, LAYERS};
use vgg_atlas_worker::engine::cpu_trunk::CpuTrunk;
use vgg_atlas_worker::engine::trunk::Trunk;
use vgg_atlas_worker::engine::vgg::Vgg16;
use vgg_atlas_worker::engine::weights::DenseParams;
use vgg_atlas_worker::Weights;

fn full_checkpoint() -> Weights {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut w = weights().clone();
    let dense = LAYERS[13..]
        .iter()
        .map(|l| {
            let LayerKind::Dense {
                inputs, outputs, ..
            } = l.kind
            else {
                unreachable!()
            };
            let scale = (3.0 / inputs as f32).sqrt();
            DenseParams {
                inputs,
                outputs,
                weight: (0..inputs * outputs)
                    .map(|_| (rng.random::<f32>() - 0.5) * scale)
                    .collect(),
                bias: (0..outputs).map(|_| rng.random::<f32>() - 0.5).collect(),
            }
        })
        .collect();
    w.dense = Arc::new(dense);
    w
}

#[test]
fn classifier_targets_match_candle_and_finite_differences() {
    let w = full_checkpoint();
    let size = 224;
    let n = size * size * 3;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    // A smooth image (few max-pool near-ties), two copies for two target units.
    let phase: Vec<f32> = (0..3).map(|_| rng.random::<f32>() * 6.0).collect();
    let pixels: Vec<f32> = (0..n)
        .map(|i| {
            let (p, c) = (i / 3, i % 3);
            let (y, x) = ((p / size) as f32, (p % size) as f32);
            128.0 + 60.0 * (x / 9.0 + phase[c]).sin() * (y / 13.0 - phase[c]).cos()
        })
        .collect();
    let chans = w.preprocess.channels();
    let to_input = |px: &[f32]| -> Vec<f32> {
        px.chunks_exact(3)
            .flat_map(|p| chans.map(|(s, k, o)| k * p[s] + o))
            .collect()
    };
    let model = Vgg16::new(&w, &Device::Cpu).unwrap();
    let mut trunk = CpuTrunk::new(&w);
    pool().install(|| {
        // block5_conv3 too: at 224 px it crosses the tap-path (large maps) and compact-path
        // (small maps) convs that 16 px tests never reach.
        for (name, units) in [
            ("block5_conv3", [3usize, 5]),
            ("fc1", [7, 4000]),
            ("fc2", [1, 2]),
            ("predictions", [281, 999]),
        ] {
            let layer = Layer::by_name(name).unwrap();
            let two: Vec<f32> = to_input(&pixels).repeat(2);
            let mut g = vec![0.0f32; 2 * n];
            let scores = trunk
                .run(
                    layer,
                    &units,
                    size,
                    size,
                    &two,
                    Objective::PreRelu,
                    Some(&mut g),
                )
                .unwrap();
            // candle: NCHW input, full layer output.
            let nchw: Vec<f32> = (0..3)
                .flat_map(|c| (0..size * size).map(move |p| (c, p)))
                .map(|(c, p)| two[p * 3 + c])
                .collect();
            let x = Tensor::from_vec(nchw, (1, 3, size, size), &Device::Cpu).unwrap();
            if !layer.is_conv() {
                let out = model
                    .forward(&x, layer)
                    .unwrap()
                    .pop()
                    .unwrap()
                    .squeeze(0)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for (sc, &u) in scores.iter().zip(&units) {
                    assert!(
                        (sc.pre - out[u]).abs() <= 1e-3 * out[u].abs().max(1.0),
                        "{name} unit {u}: trunk {} candle {}",
                        sc.pre,
                        out[u]
                    );
                }
            }
            // Directional derivative against central differences, along each image's own
            // gradient (RMS-normalised per pixel): the direction of largest change, so the
            // difference stands well above f32 rounding of a 224 px forward pass.
            // Small: along the gradient, many ReLUs and pools switch; the error shrinks linearly
            // with h (measured: 11% at 0.05, 0.5% at 0.002 on block3_conv3).
            let h = 0.002f32;
            let mut fd = Vec::new();
            for b in 0..2 {
                let gp = vgg_atlas_worker::engine::host_images::pixel_gradient(
                    &g[b * n..(b + 1) * n],
                    &vec![0.0; n],
                    &chans,
                    &vgg_atlas_worker::engine::transform::Affine::IDENTITY,
                    size,
                );
                let rms = (gp.iter().map(|v| v * v).sum::<f64>() / n as f64).sqrt();
                let v: Vec<f32> = gp.iter().map(|v| (v / rms) as f32).collect();
                let shifted = |sign: f32| -> Vec<f32> {
                    let px: Vec<f32> = pixels
                        .iter()
                        .zip(&v)
                        .map(|(a, d)| a + sign * h * d)
                        .collect();
                    to_input(&px).repeat(2)
                };
                let fp = trunk
                    .run(
                        layer,
                        &units,
                        size,
                        size,
                        &shifted(1.0),
                        Objective::PreRelu,
                        None,
                    )
                    .unwrap();
                let fm = trunk
                    .run(
                        layer,
                        &units,
                        size,
                        size,
                        &shifted(-1.0),
                        Objective::PreRelu,
                        None,
                    )
                    .unwrap();
                let numeric = (fp[b].pre - fm[b].pre) as f64 / (2.0 * h as f64);
                let analytic: f64 = gp.iter().zip(&v).map(|(a, d)| a * *d as f64).sum();
                fd.push((numeric, analytic));
            }
            for (b, (numeric, analytic)) in fd.into_iter().enumerate() {
                let err = (numeric - analytic).abs() / analytic.abs().max(1e-9);
                eprintln!(
                    "{name} unit {}: analytic {analytic:e} numeric {numeric:e} err {err:e}",
                    units[b]
                );
                assert!(
                    err < 2e-2,
                    "{name} unit {}: analytic {analytic:e} numeric {numeric:e}",
                    units[b]
                );
            }
        }
    });
}

#[test]
fn classifier_targets_need_224_pixels_and_a_full_checkpoint() {
    let mut conv_only = CpuTrunk::new(weights());
    let layer = Layer::by_name("fc2").unwrap();
    let e = conv_only
        .run(
            layer,
            &[0],
            224,
            224,
            &vec![0.0; 224 * 224 * 3],
            Objective::PreRelu,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("classifier"), "{e}");
    let mut full = CpuTrunk::new(&full_checkpoint());
    let e = full
        .run(
            layer,
            &[0],
            128,
            128,
            &vec![0.0; 128 * 128 * 3],
            Objective::PreRelu,
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("224"), "{e}");
}

/// The device trunk (candle, what GPU workers run; here on the CPU device) on the classifier
/// targets: the same scores and input gradient as the CPU trunk.
#[test]
fn the_device_trunk_matches_the_cpu_trunk_on_classifier_targets() {
    let w = full_checkpoint();
    let size = 224;
    let img = image::imageops::resize(&chelsea(), 224, 224, image::imageops::FilterType::Triangle);
    let input = net_input(&img, w.preprocess, 2);
    let mut cpu = CpuTrunk::new(&w);
    let mut dev =
        vgg_atlas_worker::engine::device_trunk::DeviceTrunk::new(&w, &Device::Cpu).unwrap();
    pool().install(|| {
        for (name, units) in [("fc1", [7usize, 4000]), ("predictions", [281, 999])] {
            let layer = Layer::by_name(name).unwrap();
            for objective in [Objective::PreRelu, Objective::PostRelu] {
                let (mut gc, mut gd) = (vec![0.0f32; input.len()], vec![0.0f32; input.len()]);
                let sc = cpu
                    .run(layer, &units, size, size, &input, objective, Some(&mut gc))
                    .unwrap();
                let sd = dev
                    .run(layer, &units, size, size, &input, objective, Some(&mut gd))
                    .unwrap();
                for (a, b) in sd.iter().zip(&sc) {
                    assert!(
                        (a.pre - b.pre).abs() <= 1e-3 * b.pre.abs().max(1.0),
                        "{name} {objective:?}: device {a:?} vs cpu {b:?}"
                    );
                }
                let e = vgg_atlas_worker::engine::trunk::relative_error(&gd, &gc);
                assert!(e < 1e-3, "{name} {objective:?}: gradient rel. error {e}");
                // (After the ReLU a silent unit has none.)
                if objective == Objective::PreRelu {
                    assert!(
                        gc.iter().any(|v| *v != 0.0),
                        "{name}: a zero gradient proves nothing"
                    );
                }
            }
        }
    });
}

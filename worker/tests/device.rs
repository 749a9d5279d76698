//! The device trunk (candle's forward and a hand-written input gradient in candle ops, what GPU
//! workers run) against the CPU trunk, on candle's CPU device: the same scores and the same
//! input gradient, and the same ascent with the images stepped on the host or kept on the
//! device. `deploy/gpu/check.sh` repeats the comparison on CUDA.

mod common;

use common::*;
use vgg_atlas_proto::{Layer, Objective, Preset, Settings};
use vgg_atlas_worker::candle::Device;
use vgg_atlas_worker::engine::ascent;
use vgg_atlas_worker::engine::cpu_trunk::CpuTrunk;
use vgg_atlas_worker::engine::device_trunk::DeviceTrunk;
use vgg_atlas_worker::engine::trunk::{relative_error as rel_l2, Trunk};

#[test]
fn device_trunk_scores_and_gradient_equal_the_cpu_trunk() {
    let w = weights();
    let mut cpu = CpuTrunk::new(w);
    let mut dev = DeviceTrunk::new(w, &Device::Cpu).unwrap();
    let img = chelsea();
    let size = img.width() as usize;
    for (name, filters) in [
        ("block1_conv2", vec![0usize, 5, 63]),
        ("block3_conv1", vec![1, 100, 255]),
        ("block4_conv3", vec![7, 300]),
    ] {
        let layer = Layer::by_name(name).unwrap();
        let input = net_input(&img, w.preprocess, filters.len());
        for objective in [
            Objective::PreRelu,
            Objective::PostRelu,
            Objective::PostReluWake,
        ] {
            let n = input.len();
            let (mut g_cpu, mut g_dev) = (vec![0.0f32; n], vec![0.0f32; n]);
            let s_cpu = cpu
                .run(
                    layer,
                    &filters,
                    size,
                    size,
                    &input,
                    objective,
                    Some(&mut g_cpu),
                )
                .unwrap();
            let s_dev = dev
                .run(
                    layer,
                    &filters,
                    size,
                    size,
                    &input,
                    objective,
                    Some(&mut g_dev),
                )
                .unwrap();
            for (a, b) in s_dev.iter().zip(&s_cpu) {
                for (x, y) in [(a.pre, b.pre), (a.post, b.post)] {
                    assert!(
                        (x - y).abs() <= 1e-4 * y.abs().max(1.0),
                        "{name} {objective:?}: device {x} vs cpu {y}"
                    );
                }
            }
            let e = rel_l2(&g_dev, &g_cpu);
            assert!(e < 1e-3, "{name} {objective:?}: gradient rel. error {e}");
            assert!(
                g_cpu.iter().any(|v| *v != 0.0),
                "{name}: a zero gradient proves nothing"
            );
        }
    }
}

/// Mean absolute difference of two 8-bit images, in grey levels.
fn image_difference(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).abs())
        .sum::<f64>()
        / a.as_raw().len() as f64
}

/// The ascent three ways: on the CPU trunk, on the device with the images stepped on the host,
/// and kept on the device. All three must find the same activations and the same images.
fn three_ways_agree(layer: &str, filters: &[usize], s: &Settings) {
    let w = weights();
    let layer = Layer::by_name(layer).unwrap();
    let mut cpu = CpuTrunk::new(w);
    let mut host = DeviceTrunk::new(w, &Device::Cpu).unwrap();
    host.set_resident(false);
    let mut resident = DeviceTrunk::new(w, &Device::Cpu).unwrap();
    assert!(resident.resident(), "the device ascent is the default");
    let a = ascent::visualize(&mut cpu, w.preprocess, layer, filters, s).unwrap();
    let b = ascent::visualize(&mut host, w.preprocess, layer, filters, s).unwrap();
    let c = ascent::visualize(&mut resident, w.preprocess, layer, filters, s).unwrap();
    for (way, other) in [("host-stepped", &b), ("resident", &c)] {
        for (x, y) in other.iter().zip(&a) {
            assert_eq!(x.filter, y.filter);
            assert!(
                x.failed_reason.is_none() && y.failed_reason.is_none(),
                "{x:?}"
            );
            assert_eq!(x.curve.len(), y.curve.len());
            for (p, q) in [
                (x.start_activation, y.start_activation),
                (x.activation, y.activation),
            ] {
                assert!(
                    (p - q).abs() <= 1e-2 * q.abs().max(1.0),
                    "{} filter {}, {way}: {p} vs cpu {q}",
                    layer.name,
                    x.filter
                );
            }
            let (i, j) = (x.image.as_ref().unwrap(), y.image.as_ref().unwrap());
            let d = image_difference(i, j);
            assert!(
                d < 1.0,
                "{} filter {}, {way}: images differ by {d} grey levels on average",
                layer.name,
                x.filter
            );
        }
    }
    assert!(
        c.iter()
            .filter(|x| x.activation > x.start_activation + 0.1)
            .count()
            >= filters.len() - 1,
        "the ascent raised the activations: {:?}",
        c.iter()
            .map(|x| (x.start_activation, x.activation))
            .collect::<Vec<_>>()
    );
}

#[test]
fn the_ascent_on_the_device_follows_the_cpu_one_with_pixels_and_rmsprop() {
    // The Keras blog's method: pixels, Lp and TV regularizers, RMSprop, no transforms.
    let s = Settings {
        size: 32,
        steps: 5,
        ..Preset::Quick.settings()
    };
    three_ways_agree("block2_conv1", &[0, 9, 77], &s);
    // keras-vis: jitter and rotation; TV with beta 1.5 (a power, not a square).
    let s = Settings {
        size: 32,
        steps: 4,
        tv_beta: 1.5,
        ..Preset::KerasVis.settings()
    };
    three_ways_agree("block1_conv2", &[3, 40], &s);
}

#[test]
fn the_ascent_on_the_device_follows_the_cpu_one_with_lucids_method() {
    // lucid: Fourier parameterisation, decorrelated colour, jitter, rotation and scale, Adam.
    let s = Settings {
        size: 36,
        steps: 6,
        ..Preset::Lucid.settings()
    };
    three_ways_agree("block3_conv1", &[1, 100, 255], &s);
}

#[test]
fn the_ascent_on_the_device_follows_the_cpu_one_with_the_default_method() {
    // The atlas preset: the step-size schedule, post-ReLU woken by pre-ReLU, and on blocks 1-2
    // the rolled view (the image repeated outside itself); block3 is not rolled.
    let s = Settings {
        size: 32,
        steps: 6,
        warmup_steps: 2,
        ..Preset::Atlas.settings()
    };
    assert!(s.rolls(&Layer::by_name("block1_conv2").unwrap()));
    three_ways_agree("block1_conv2", &[0, 33], &s);
    three_ways_agree("block3_conv1", &[5, 90], &s);
}

#[test]
fn a_filter_that_fails_on_the_device_is_retried_then_failed_alone() {
    let w = weights();
    let layer = Layer::by_name("block1_conv2").unwrap();
    let s = Settings {
        size: 16,
        steps: 8,
        ..Preset::Atlas.settings()
    };
    let mut dev = DeviceTrunk::new(w, &Device::Cpu).unwrap();
    let faults = ascent::Faults {
        nan_filter: Some(7),
        ..ascent::Faults::default()
    };
    let targets: Vec<ascent::Target> = [2, 7, 9]
        .iter()
        .map(|&f| ascent::Target::planned(&s, &layer, f))
        .collect();
    let r = ascent::ascend(&mut dev, w.preprocess, layer, &targets, &s, faults).unwrap();
    let failed = r[1].failed_reason.as_deref().expect("filter 7 fails");
    assert!(failed.contains("non-finite gradient"), "{failed}");
    assert!(r[1].image.is_none() && r[1].retries == 5, "{:?}", r[1]);
    for ok in [&r[0], &r[2]] {
        assert!(
            ok.failed_reason.is_none() && ok.retries == 0 && ok.image.is_some(),
            "{ok:?}"
        );
        assert!(ok.activation.is_finite() && ok.curve.len() == s.steps);
    }
}

#[test]
fn a_device_out_of_memory_halves_the_batch_and_every_filter_still_finishes() {
    let w = weights();
    let layer = Layer::by_name("block1_conv2").unwrap();
    let s = Settings {
        size: 16,
        steps: 4,
        ..Preset::Atlas.settings()
    };
    let mut dev = DeviceTrunk::new(w, &Device::Cpu).unwrap();
    assert!(dev.resident(), "the device path keeps its images");
    let targets: Vec<ascent::Target> = [2, 7, 9, 11, 20]
        .iter()
        .map(|&f| ascent::Target::planned(&s, &layer, f))
        .collect();
    let whole = ascent::Faults::default();
    let plain = ascent::ascend(&mut dev, w.preprocess, layer, &targets, &s, whole).unwrap();
    // Every batch of more than 2 images fails as an exhausted GPU would: 5 -> 2, 2, 1.
    let faults = ascent::Faults {
        oom_above: Some(2),
        ..whole
    };
    let halved = ascent::ascend(&mut dev, w.preprocess, layer, &targets, &s, faults).unwrap();
    assert_eq!(halved.len(), 5);
    for (a, b) in plain.iter().zip(&halved) {
        assert_eq!(a.filter, b.filter);
        assert!(b.failed_reason.is_none() && b.image.is_some(), "{b:?}");
        let rel = (a.activation - b.activation).abs() / a.activation.abs().max(1e-3);
        assert!(
            rel < 1e-3,
            "filter {}: {} vs {}",
            a.filter,
            a.activation,
            b.activation
        );
    }
    // Even one image out of memory is the device's error, not a loop.
    let none = ascent::Faults {
        oom_above: Some(0),
        ..whole
    };
    let e = ascent::ascend(&mut dev, w.preprocess, layer, &targets, &s, none).unwrap_err();
    assert!(e.to_string().contains("out of memory"), "{e}");
}

#[test]
fn half_precision_stays_close_to_f32_on_the_same_filters() {
    // The network in 16-bit floats against the f32 CPU trunk: the scores, the input gradient,
    // and a short ascent of the default method. candle's CPU device has no bfloat16 matrix
    // product, so this runs the same path in f16 (10-bit mantissas to bfloat16's 8);
    // `check-device --precision bf16` checks bfloat16 itself on a GPU.
    let w = weights();
    let mut cpu = CpuTrunk::new(w);
    let mut bf16 =
        DeviceTrunk::with_dtype(w, &Device::Cpu, vgg_atlas_worker::candle::DType::F16).unwrap();
    let img = chelsea();
    let size = img.width() as usize;
    for (name, filters) in [
        ("block1_conv2", vec![0usize, 5]),
        ("block4_conv3", vec![7, 300]),
    ] {
        let layer = Layer::by_name(name).unwrap();
        let input = net_input(&img, w.preprocess, filters.len());
        let (mut g_cpu, mut g_bf) = (vec![0.0f32; input.len()], vec![0.0f32; input.len()]);
        let s_cpu = cpu
            .run(
                layer,
                &filters,
                size,
                size,
                &input,
                Objective::PreRelu,
                Some(&mut g_cpu),
            )
            .unwrap();
        let s_bf = bf16
            .run(
                layer,
                &filters,
                size,
                size,
                &input,
                Objective::PreRelu,
                Some(&mut g_bf),
            )
            .unwrap();
        let pre = |s: &[vgg_atlas_worker::engine::trunk::Scores]| {
            s.iter().map(|s| s.pre).collect::<Vec<_>>()
        };
        let (e_scores, e_grad) = (rel_l2(&pre(&s_bf), &pre(&s_cpu)), rel_l2(&g_bf, &g_cpu));
        eprintln!("f16 {name}: scores rel. error {e_scores:.2e}, gradient {e_grad:.2e}");
        assert!(
            e_scores < 3e-2 && e_grad < 1e-1,
            "{name}: {e_scores} {e_grad}"
        );
        assert!(
            e_scores > 0.0,
            "f16 was not used: the scores are exactly f32's"
        );
        // At lucid's step size: the default's (8x larger) amplifies any rounding difference
        // within a few steps.
        let s = Settings {
            size: 32,
            steps: 6,
            learning_rate: 0.05,
            ..Preset::Atlas.settings()
        };
        let a = ascent::visualize(&mut cpu, w.preprocess, layer, &filters, &s).unwrap();
        let b = ascent::visualize(&mut bf16, w.preprocess, layer, &filters, &s).unwrap();
        let act = |r: &[vgg_atlas_worker::engine::record::FilterResult]| {
            r.iter().map(|r| r.activation).collect::<Vec<_>>()
        };
        let e = rel_l2(&act(&b), &act(&a));
        eprintln!("f16 {name}: ascent final activations rel. error {e:.2e}");
        assert!(e < 2e-1, "{name}: {e}");
    }
}

#[test]
fn a_batch_wider_than_the_device_memory_is_split_with_the_same_results() {
    // Memory for two images: five filters go as 2 + 2 + 1, and each filter's result must be
    // what it is in one batch of five (a filter's result never depends on its batch).
    let w = weights();
    let layer = Layer::by_name("block2_conv2").unwrap();
    let s = Settings {
        size: 32,
        steps: 4,
        ..Preset::Atlas.settings()
    };
    let filters = [3usize, 50, 7, 99, 120];
    let mut whole = DeviceTrunk::new(w, &Device::Cpu).unwrap();
    let mut split = DeviceTrunk::new(w, &Device::Cpu).unwrap();
    let each = vgg_atlas_worker::engine::device_trunk::bytes_per_image(layer, s.size) as usize;
    split.assume_free_memory(each * 5 / 2 * 5 / 4); // 0.8 of it is 2.5 images
    assert_eq!(split.fit_batch(layer, s.size).unwrap(), Some(2));
    let a = ascent::visualize(&mut whole, w.preprocess, layer, &filters, &s).unwrap();
    let b = ascent::visualize(&mut split, w.preprocess, layer, &filters, &s).unwrap();
    assert_eq!(b.len(), filters.len());
    for ((x, y), &f) in b.iter().zip(&a).zip(&filters) {
        assert_eq!(
            (x.filter, y.filter),
            (f, f),
            "results in the order of the filters"
        );
        assert!(
            (x.activation - y.activation).abs() <= 1e-4 * y.activation.abs().max(1.0),
            "filter {f}: split {} vs whole {}",
            x.activation,
            y.activation
        );
        let d = image_difference(x.image.as_ref().unwrap(), y.image.as_ref().unwrap());
        assert!(d < 0.05, "filter {f}: images differ by {d}");
    }
}

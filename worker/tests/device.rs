//! The device trunk (candle forward + autograd, what GPU workers run) against the CPU trunk
//! with its hand-written backward, on the CPU device: the same scores and the same input
//! gradient, and the same ascent. `deploy/gpu/check.sh` repeats the comparison on CUDA.

mod common;

use common::*;
use vgg_atlas_worker::ascent::{self, Preset, Settings};
use vgg_atlas_worker::candle::Device;
use vgg_atlas_worker::device_trunk::DeviceTrunk;
use vgg_atlas_worker::trunk::{relative_error as rel_l2, CpuTrunk, Objective, Trunk};
use vgg_atlas_worker::Layer;

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
        for objective in [Objective::PreRelu, Objective::PostRelu] {
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

#[test]
fn the_ascent_on_the_device_trunk_follows_the_cpu_one() {
    let w = weights();
    let layer = Layer::by_name("block2_conv1").unwrap();
    let s = Settings {
        size: 32,
        steps: 5,
        ..Preset::Quick.settings()
    };
    let filters = [0usize, 9, 77];
    let mut cpu = CpuTrunk::new(w);
    let mut dev = DeviceTrunk::new(w, &Device::Cpu).unwrap();
    let a = ascent::visualize(&mut cpu, w.preprocess, layer, &filters, &s).unwrap();
    let b = ascent::visualize(&mut dev, w.preprocess, layer, &filters, &s).unwrap();
    for (x, y) in b.iter().zip(&a) {
        assert!(
            (x.activation - y.activation).abs() <= 1e-2 * y.activation.abs().max(1.0),
            "filter {}: device {} vs cpu {}",
            x.filter,
            x.activation,
            y.activation
        );
    }
    assert!(
        b.iter()
            .filter(|x| x.activation > x.start_activation + 0.1)
            .count()
            >= 2,
        "the ascent raised the activations: {:?}",
        b.iter()
            .map(|x| (x.start_activation, x.activation))
            .collect::<Vec<_>>()
    );
}

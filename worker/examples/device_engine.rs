//! Times the device engine on candle's CPU device (what a GPU worker runs, on the CPU, so the
//! engine's own costs can be compared without a GPU): one trunk pass with its input gradient,
//! and the ascent with its image steps on the device against the same ascent stepping the
//! images on the host.
//!
//! `cargo run --release -p vgg-atlas-worker --example device_engine [LAYER] [SIZE] [BATCH]`

use std::time::Instant;

use vgg_atlas_proto::{Layer, Objective, Preset, Settings};
use vgg_atlas_worker::candle::Device;
use vgg_atlas_worker::engine::ascent;
use vgg_atlas_worker::engine::device_trunk::DeviceTrunk;
use vgg_atlas_worker::engine::trunk::Trunk;
use vgg_atlas_worker::{fetch, Weights};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let layer = Layer::by_name(args.first().map_or("block3_conv1", |s| s.as_str()))?;
    let size: usize = args.get(1).map_or(Ok(64), |s| s.parse())?;
    let batch: usize = args.get(2).map_or(Ok(8), |s| s.parse())?;
    let weights = Weights::load(&fetch::ensure_default(&|m| eprintln!("{m}"))?)?;
    let mut trunk = DeviceTrunk::new(&weights, &Device::Cpu)?;
    let filters: Vec<usize> = (0..batch).map(|i| i * 7 % layer.filters()).collect();
    let input = vec![10.0f32; batch * size * size * 3];
    let mut grad = vec![0.0f32; input.len()];
    let reps = 3;
    let mut pass = || {
        trunk.run(
            layer,
            &filters,
            size,
            size,
            &input,
            Objective::PreRelu,
            Some(&mut grad),
        )
    };
    pass()?; // warm-up
    let t = Instant::now();
    for _ in 0..reps {
        pass()?;
    }
    let pass = t.elapsed().as_secs_f64() / reps as f64;
    println!(
        "{} {size} px batch {batch}: forward + input gradient {:.1} ms per image",
        layer.name,
        pass * 1e3 / batch as f64
    );
    // The ascent (the default preset, at SIZE), images stepped on the host, then on the device.
    let s = Settings {
        size,
        steps: 10,
        ..Preset::Atlas.settings()
    };
    let mut per_filter = Vec::new();
    for resident in [false, true] {
        trunk.set_resident(resident);
        let t = Instant::now();
        ascent::visualize(&mut trunk, weights.preprocess, layer, &filters, &s)?;
        per_filter.push(t.elapsed().as_secs_f64() / batch as f64);
        println!(
            "ascent, {} preset, {} steps, images stepped {}: {:.3} s per filter",
            s.preset.name(),
            s.steps,
            if resident {
                "on the device"
            } else {
                "on the host"
            },
            per_filter[per_filter.len() - 1]
        );
    }
    println!("device / host time: {:.2}", per_filter[1] / per_filter[0]);
    Ok(())
}

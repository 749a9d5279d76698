//! `check-device`: is the network on `--device` the same network as on the CPU? Activations of
//! every conv layer on one fixed image (candle on the device against candle on the CPU), and
//! the input gradient of the device trunk against the hand-written CPU trunk. This is what
//! `deploy/gpu/check.sh` runs first on a GPU machine; on `--device cpu` it checks the device
//! trunk's autograd against the hand-written backward.

use anyhow::{bail, Result};
use serde_json::json;
use vgg_atlas_worker::candle::Device;
use vgg_atlas_worker::device_trunk::DeviceTrunk;
use vgg_atlas_worker::trunk::{relative_error as rel_l2, CpuTrunk, Objective, Trunk};
use vgg_atlas_worker::vgg::Vgg16;
use vgg_atlas_worker::{Layer, Weights, LAYERS};

/// The largest relative error accepted (f32 on both sides; reductions in another order).
const TOLERANCE: f64 = 1e-3;

/// A fixed, smooth, colourful test image (no file needed on the GPU machine).
fn test_image(size: u32) -> image::RgbImage {
    image::RgbImage::from_fn(size, size, |x, y| {
        let (u, v) = (x as f32 / size as f32, y as f32 / size as f32);
        let c = |a: f32| (127.5 + 127.5 * a.sin()) as u8;
        image::Rgb([
            c(9.0 * u + 3.0 * v),
            c(7.0 * v - 5.0 * u * v),
            c(13.0 * (u - 0.5).hypot(v - 0.5)),
        ])
    })
}

pub fn check_device(weights: &Weights, spec: &str, size: u32, json_out: bool) -> Result<()> {
    let device = vgg_atlas_worker::device(spec)?;
    let img = test_image(size);
    let cpu_net = Vgg16::new(weights, &Device::Cpu)?;
    let dev_net = Vgg16::new(weights, &device)?;
    let mut rows = Vec::new();
    for layer in LAYERS.iter().filter(|l| l.is_conv()) {
        let a = dev_net.probe(&img, *layer)?;
        let b = cpu_net.probe(&img, *layer)?;
        rows.push(("activations", layer.name, rel_l2(&a, &b)));
    }
    let mut dev = DeviceTrunk::new(weights, &device)?;
    let mut cpu = CpuTrunk::new(weights);
    let one = weights.preprocess.nhwc(&img);
    let s = size as usize;
    for (name, filters) in [
        ("block1_conv2", [0usize, 31]),
        ("block3_conv1", [5, 200]),
        ("block5_conv3", [17, 500]),
    ] {
        let layer = Layer::by_name(name)?;
        let input: Vec<f32> = one.repeat(filters.len());
        let (mut gd, mut gc) = (vec![0.0; input.len()], vec![0.0; input.len()]);
        dev.run(
            layer,
            &filters,
            s,
            s,
            &input,
            Objective::PreRelu,
            Some(&mut gd),
        )?;
        cpu.run(
            layer,
            &filters,
            s,
            s,
            &input,
            Objective::PreRelu,
            Some(&mut gc),
        )?;
        rows.push(("input gradient", layer.name, rel_l2(&gd, &gc)));
    }
    // NaN fails too.
    let failed: Vec<_> = rows
        .iter()
        .filter(|r| r.2.is_nan() || r.2 > TOLERANCE)
        .collect();
    if json_out {
        let doc = json!({
            "device": spec,
            "size": size,
            "tolerance": TOLERANCE,
            "checks": rows.iter().map(|(what, layer, err)| json!({"what": what, "layer": layer, "rel_err": err})).collect::<Vec<_>>(),
            "passed": failed.is_empty(),
        });
        println!("{doc}");
    } else {
        println!("{spec} against the CPU, {size}x{size} test image, tolerance {TOLERANCE:e}");
        println!("{:<15} {:<13} {:>10}", "what", "layer", "rel. err");
        for (what, layer, err) in &rows {
            let mark = if err.is_nan() || *err > TOLERANCE {
                "  FAILED"
            } else {
                ""
            };
            println!("{what:<15} {layer:<13} {err:>10.2e}{mark}");
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} checks on {spec} are off by more than {TOLERANCE:e}; do not render with this device",
            failed.len(),
            rows.len()
        );
    }
    Ok(())
}

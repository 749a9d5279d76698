//! The engine: what computes a filter's image, with no knowledge of the wire.
//!
//! | to change | open |
//! |---|---|
//! | the method: steps, seeds, records, retries, results | [`ascent`] (the driver) and [`record`] |
//! | what a backend does with the images (render, transform, regularize, step) | [`image_side`] (the trait), [`host_images`] (CPU loops), [`device_images`] (candle tensors) |
//! | the optimisers | [`optim`] (host), the `Opt` of [`device_images`] (device) |
//! | where a step's time goes (`bench --profile`) | [`profile`], timed in [`host_images`] |
//! | lucid's parameterisation, the random transforms | [`fourier`], [`transform`] |
//! | the network on the CPU (forward and input gradient) | [`cpu_trunk`], with its GEMM convs in [`conv`] |
//! | the network on a GPU | [`device_trunk`], over candle's VGG16 in [`vgg`] |
//! | what every trunk offers the ascent | [`trunk`] |
//! | loading weights (safetensors, Keras ONNX) and fetching the default ones | [`weights`], [`onnx`], [`fetch`] |
//!
//! The method's vocabulary (layers, settings, presets, seeds) is the contract crate's,
//! `vgg-atlas-proto`. Only the driver ([`ascent`]) brings the trunks and the image sides
//! together; no two modules import each other.

pub mod ascent;
pub mod conv;
pub mod cpu_trunk;
pub mod device_images;
pub mod device_trunk;
pub mod examples;
pub mod fetch;
pub mod fourier;
pub mod host_images;
pub mod image_side;
mod onnx;
pub mod optim;
pub mod profile;
pub mod record;
pub mod transform;
pub mod trunk;
pub mod vgg;
pub mod weights;
pub mod winograd;

use cpu_trunk::CpuTrunk;
use device_trunk::{DeviceTrunk, Precision};
use trunk::Trunk;
use weights::Weights;

use crate::{Error, Result};

/// Picks the compute device from a user's `--device` string: `cpu`, `cuda:N` or `metal:N`.
pub fn device(spec: &str) -> Result<candle_core::Device> {
    if spec.contains(',') {
        return Err(Error::Invalid(format!(
            "--device {spec} names several devices; this command runs on one (a list is for \
             render, one local worker per device)"
        )));
    }
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => (
            k,
            n.parse::<usize>().map_err(|_| {
                Error::Invalid(format!(
                    "bad device '{spec}': the part after ':' must be a number, e.g. cuda:0"
                ))
            })?,
        ),
        None => (spec, 0),
    };
    let unbuilt = |feature: &str| {
        Error::Invalid(format!(
            "--device {spec}: this vgg-atlas was built without GPU support for it; build with \
             `cargo build --release --features {feature}` (for CUDA: deploy/gpu/build-worker.sh), \
             or use --device cpu"
        ))
    };
    match kind {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" if !cfg!(feature = "cuda") => Err(unbuilt("cuda")),
        "metal" if !cfg!(feature = "metal") => Err(unbuilt("metal")),
        "cuda" => Ok(candle_core::Device::new_cuda(ordinal).map_err(|e| {
            Error::Invalid(format!(
                "--device {spec}: {e}; is there an NVIDIA GPU {ordinal} and its driver (libcuda.so.1)?"
            ))
        })?),
        "metal" => Ok(candle_core::Device::new_metal(ordinal)
            .map_err(|e| Error::Invalid(format!("--device {spec}: {e}")))?),
        _ => Err(Error::Invalid(format!(
            "unknown device '{spec}'; use cpu, cuda:N or metal:N"
        ))),
    }
}

/// The trunk for the examples pass on a `--device`: [`CpuTrunk::for_peaks`] (forward kernels
/// only) for `cpu`, the candle trunk on the device otherwise.
pub fn peaks_trunk_on(
    weights: &Weights,
    spec: &str,
    precision: Precision,
) -> Result<Box<dyn Trunk + Send>> {
    match device(spec)? {
        candle_core::Device::Cpu => Ok(Box::new(CpuTrunk::for_peaks(weights))),
        _ => trunk_on(weights, spec, precision),
    }
}

/// The trunk for a `--device`: the hand-written CPU trunk for `cpu` (always f32), the candle
/// trunk on the device in `precision` otherwise.
pub fn trunk_on(
    weights: &Weights,
    spec: &str,
    precision: Precision,
) -> Result<Box<dyn Trunk + Send>> {
    match device(spec)? {
        candle_core::Device::Cpu => Ok(Box::new(CpuTrunk::new(weights))),
        d => Ok(Box::new(DeviceTrunk::with_precision(
            weights, &d, precision,
        )?)),
    }
}

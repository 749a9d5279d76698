//! The compute side of vgg-atlas: VGG16 weights and their loading, VGG16 in candle, the fast
//! CPU trunk with its hand-written backward pass, and the batched ascent engine.

pub mod ascent;
pub mod client;
pub mod conv;
pub mod device_ascent;
pub mod device_trunk;
mod error;
pub mod fetch;
pub mod fourier;
pub mod layers;
mod onnx;
pub mod transform;
pub mod trunk;
pub mod vgg;
pub mod weights;

pub use error::{Error, Result};
pub use layers::{Layer, LayerKind, LAYERS};
pub use weights::{Preprocess, Weights};

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

/// The trunk for a `--device`: the hand-written CPU trunk for `cpu` (always f32), the candle
/// trunk on the device in `precision` otherwise.
pub fn trunk(
    weights: &Weights,
    spec: &str,
    precision: device_trunk::Precision,
) -> Result<Box<dyn trunk::Trunk + Send>> {
    match device(spec)? {
        candle_core::Device::Cpu => Ok(Box::new(trunk::CpuTrunk::new(weights))),
        d => Ok(Box::new(device_trunk::DeviceTrunk::with_precision(
            weights, &d, precision,
        )?)),
    }
}

pub use candle_core as candle;

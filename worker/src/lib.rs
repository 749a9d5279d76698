//! The compute side of vgg-atlas: VGG16 weights and their loading, VGG16 in candle, the fast
//! CPU trunk with its hand-written backward pass, and the batched ascent engine.

pub mod ascent;
pub mod client;
pub mod conv;
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
    match kind {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => Ok(candle_core::Device::new_cuda(ordinal).map_err(|e| {
            Error::Invalid(format!(
                "device {spec}: {e}; this binary needs the `cuda` feature and an NVIDIA driver"
            ))
        })?),
        "metal" => Ok(candle_core::Device::new_metal(ordinal).map_err(|e| {
            Error::Invalid(format!(
                "device {spec}: {e}; this binary needs the `metal` feature"
            ))
        })?),
        _ => Err(Error::Invalid(format!(
            "unknown device '{spec}'; use cpu, cuda:N or metal:N"
        ))),
    }
}
pub use candle_core as candle;

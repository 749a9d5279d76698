//! The compute side of vgg-atlas, in two parts:
//!
//! - [`engine`]: VGG16's weights and their loading, the network on the CPU (hand-written GEMM
//!   trunk) and on candle devices, and the one ascent driver with its image sides and
//!   optimisers. Its module doc says which file to open for what.
//! - [`client`]: the worker's gRPC loop (register, poll for leases, compute them on the engine,
//!   heartbeat, submit), the only part that knows the wire.

pub mod client;
pub mod engine;
mod error;

pub use candle_core as candle;
pub use engine::weights::{Preprocess, Weights};
pub use engine::{device, fetch, peaks_trunk_on, trunk_on};
pub use error::{Error, Result};

//! The contract between the vgg-atlas coordinator and its workers, which depend on this crate
//! and never on each other:
//!
//! - the wire: the gRPC package `atlas.v1` of `atlas.proto`, generated at build time with
//!   tonic/prost. The messages live in [`v1`] and are re-exported here; the client is
//!   [`CoordinatorClient`], the server side is the [`Coordinator`] trait wrapped in
//!   [`CoordinatorServer`]; [`auth`] and [`tls`] secure it.
//! - the vocabulary both sides share: the layer table ([`layers`]), the method's settings,
//!   presets and filter seeds ([`method`]), and the state of a filter in a run ([`FilterState`]).
//! - every conversion between that vocabulary and the wire ([`convert`]), once.
//!
//! `tonic` and `prost` are re-exported so that dependents build against the exact versions the
//! code was generated for. With the `clap` feature the method's enums are `clap::ValueEnum`s.

pub mod auth;
pub mod convert;
mod error;
pub mod layers;
pub mod method;
mod state;
pub mod tls;

pub use error::{Error, Result};
pub use layers::{conv_filters, Layer, LayerKind, ReceptiveField, CONV_LAYERS, LAYERS};
pub use method::{filter_seed, Objective, Optimizer, Parameterization, Preset, Settings};
pub use state::FilterState;

pub use prost;
pub use tonic;

/// The generated code of package `atlas.v1`.
#[allow(clippy::large_enum_variant)] // prost's oneof enums hold messages inline
pub mod v1 {
    tonic::include_proto!("atlas.v1");
}

pub use v1::coordinator_client::CoordinatorClient;
pub use v1::coordinator_server::{Coordinator, CoordinatorServer};
pub use v1::*;

/// Set (to `1`) on the `UNAVAILABLE` answer of a coordinator whose store is out (its database
/// server down or restarting, its disk full): the coordinator itself is up and answering, so a
/// worker keeps its results and waits for as long as the outage lasts, without counting it as
/// silence (`worker --give-up-after`). Older workers ignore it and retry as for any
/// `UNAVAILABLE`.
pub const STORE_OUTAGE_METADATA: &str = "vgg-atlas-store-outage";

/// The version of this contract a peer speaks, sent in `RegisterRequest.protocol_version`.
/// Bumped on any breaking change (together with the package name) and on any addition old
/// peers would silently misread, such as new run settings; see the header of `atlas.proto`.
pub const PROTOCOL_VERSION: u32 = 6;

/// The largest gRPC message either side accepts. tonic's default of 4 MiB is too small for a
/// submit of a large batch of large images (64 filters at 512x512 are ~50 MB of PNG); set it on
/// both `CoordinatorServer` and `CoordinatorClient` with `max_decoding_message_size`.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Size of the `data` of one `WeightsChunk`: well under any message limit, large enough that a
/// 500 MB checkpoint streams in a few hundred messages.
pub const WEIGHTS_CHUNK_BYTES: usize = 1024 * 1024;

/// The coordinator's check of a registering worker's protocol version: a mismatch is refused
/// with `FAILED_PRECONDITION` and a message naming both versions and what to do.
pub fn check_protocol_version(worker_version: u32) -> Result<(), tonic::Status> {
    if worker_version == PROTOCOL_VERSION {
        return Ok(());
    }
    Err(tonic::Status::failed_precondition(format!(
        "worker speaks protocol version {worker_version} but this coordinator speaks version \
         {PROTOCOL_VERSION}; run the same vgg-atlas release on the coordinator and every worker"
    )))
}

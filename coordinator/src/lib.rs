//! The coordinator of vgg-atlas: it plans runs ([`plan`]), leases filters to workers and records
//! their results over gRPC ([`service`]), keeps runs, filters and results in SQLite or
//! PostgreSQL ([`store`]), answers read-only SQL ([`query`]), serves health and metrics
//! ([`metrics`], [`health`]), draws a run's atlas from the store ([`draw`]), and runs a whole render
//! ([`standalone`]). It depends on the contract crate, `vgg-atlas-proto`, and never on the
//! worker: its build links no candle.

pub mod bench;
pub mod commit;
pub mod draw;
pub mod error;
pub mod examples;
pub mod health;
pub mod metrics;
pub mod pass_service;
pub mod plan;
pub mod query;
pub mod serve;
pub mod service;
pub mod space;
pub mod standalone;
pub mod store;

pub use error::{Error, Result};

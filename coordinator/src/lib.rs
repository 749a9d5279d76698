//! Run planning, task leasing and result recording for vgg-atlas.
//!
//! [`store`] keeps runs, filters with their lease state, and results in SQLite or PostgreSQL.

pub mod bench;
pub mod error;
pub mod metrics;
pub mod plan;
pub mod query;
pub mod service;
pub mod store;

pub use error::{Error, Result};

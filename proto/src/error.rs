//! The contract's one error: input that the shared vocabulary refuses (an unknown layer or
//! preset, settings that cannot work, a wire message with a value this build does not know).
//! Each message says what was wrong and what to do.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("unknown layer '{name}'; VGG16's layers are: {known}")]
    UnknownLayer { name: String, known: String },

    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The worker crate's one error enum. Every variant says what failed, with which input, and
//! what to do about it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input the shared vocabulary refuses: an unknown layer, impossible settings.
    #[error(transparent)]
    Contract(#[from] vgg_atlas_proto::Error),

    #[error("cannot read weights file {path}: {source}")]
    WeightsIo {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("weights file {path} is not a readable {format} file ({reason}); is it truncated or of another format?")]
    WeightsFormat {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },

    #[error("weights file {path} has no tensor '{tensor}' (expected shape {expected:?}); is this a VGG16 checkpoint?{hint}")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        hint: String,
    },

    #[error("weights file {path} has {tensor} of shape {got:?}, expected {expected:?}; is this a VGG16 checkpoint?")]
    WrongShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error(
        "weights file {path} has {tensor} of dtype {dtype}; only F32, F16 and BF16 are supported"
    )]
    WrongDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },

    #[error("weights file {path} does not look like VGG16: {reason}")]
    NotVgg16 { path: PathBuf, reason: String },

    #[error("layer {layer} needs the classifier (fc1, fc2, predictions), but the weights {source_name} have the conv layers only; pass --weights with a full VGG16 checkpoint (Keras names fc1.*, fc2.*, predictions.* or torchvision classifier.0/3/6.*)")]
    NoClassifier { layer: String, source_name: String },

    #[error("fetching the default weights failed: {reason}\n  what to do: {hint}")]
    Fetch { reason: String, hint: String },

    #[error("cannot use image {path}: {reason}")]
    BadImage { path: PathBuf, reason: String },

    #[error("{0}")]
    Invalid(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

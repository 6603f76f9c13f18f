//! The library's one error type: every failure names what it was working on.

use std::path::PathBuf;

/// Errors of the sparsellm library. Each variant carries enough context (file, tensor,
/// offset) for a user to see what is wrong without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A model file that is malformed: bad magic, truncated, inconsistent.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A tensor that is missing, of the wrong shape or of an unsupported type.
    #[error("{path}: tensor '{tensor}': {msg}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    /// config.json / GGUF metadata that does not describe a model we can run.
    #[error("model config: {0}")]
    Config(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Bad user input: a prompt longer than the context, a bad sparsity spec, ...
    #[error("{0}")]
    Input(String),
    #[error("fetch: {0}")]
    Fetch(String),
    #[error("predictor: {0}")]
    Predictor(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Tensor {
            path: path.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
}

//! Errors raised while reading model files. Each names the file and, where there is one, the
//! tensor or field, so a user can tell what to fix without a debugger.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: tensor `{tensor}` is missing{hint}")]
    MissingTensor {
        path: PathBuf,
        tensor: String,
        hint: String,
    },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?} (from the model config)")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{path}: tensor `{tensor}` has dtype {dtype}, which deepspec cannot read (supported: {supported})")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
        supported: String,
    },
    /// A tensor that is present but unusable as found (wrong rank, a scale that does not fit
    /// its weight, two tensors that must agree and do not).
    #[error("{path}: tensor `{tensor}`: {detail}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        detail: String,
    },
    #[error("{path}: file is truncated or corrupt: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("{path}: field `{field}`: {detail}")]
    BadField {
        path: PathBuf,
        field: String,
        detail: String,
    },
}

impl LoadError {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LoadError::Io {
            path: path.into(),
            source,
        }
    }

    pub fn corrupt(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        LoadError::Corrupt {
            path: path.into(),
            detail: detail.into(),
        }
    }

    pub fn tensor(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        LoadError::BadTensor {
            path: path.into(),
            tensor: tensor.into(),
            detail: detail.into(),
        }
    }

    pub fn field(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        detail: impl Into<String>,
    ) -> Self {
        LoadError::BadField {
            path: path.into(),
            field: field.into(),
            detail: detail.into(),
        }
    }
}

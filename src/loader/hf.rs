//! HuggingFace directories (placeholder: being written).
use std::path::Path;

use crate::error::{Error, Result};

pub struct HfModel;
impl HfModel {
    pub fn open(dir: &Path) -> Result<super::gguf::GgufModel> {
        Err(Error::format(
            dir,
            "HuggingFace directories are not supported yet",
        ))
    }
}

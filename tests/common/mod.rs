//! Shared helpers of the integration tests: where the model and the reference fixtures are.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// The shared reference directory (../shared/reference from the crate root).
pub fn reference_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/reference"))
}

/// The reference fixture JSON.
pub fn reference() -> Value {
    let p = reference_dir().join("smollm2-135m-instruct-q4_1.json");
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).expect("reference JSON")
}

/// The default model, fetched on first use (into `$SPARSELLM_MODELS_DIR`, default ./models).
pub fn model_path() -> PathBuf {
    sparsellm::loader::fetch::default_model_path().expect("fetching the default model")
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

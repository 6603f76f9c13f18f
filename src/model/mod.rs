//! The LLaMA model: config, weights, forward pass, KV cache.

pub mod config;
pub mod kv_cache;
pub mod llama;

pub use config::ModelConfig;
pub use kv_cache::{KvCache, KvDType};
pub use llama::{BatchItem, InputGroup, InputMask, Llama, Logits, MlpOverride, WeightLayout};

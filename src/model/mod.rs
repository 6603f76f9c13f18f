//! The LLaMA model: config, weights, forward pass, KV cache.

pub mod config;

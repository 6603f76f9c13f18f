//! safetensors files (placeholder: being written).

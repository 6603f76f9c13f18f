//! Fetching the default model (placeholder: being written).

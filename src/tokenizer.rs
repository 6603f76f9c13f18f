//! Tokenization (placeholder: being written).
pub struct Tokenizer;

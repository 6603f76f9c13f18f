//! Writes the logits of every position of a token sequence as raw little-endian f32
//! ([n, vocab]): for comparing with another implementation.
//!
//! `cargo run --release --example dump_logits -- MODEL IDS_JSON OUT [f32|native]`

use sparsellm::kernels::pool;
use sparsellm::loader;
use sparsellm::model::{Llama, Logits};
use sparsellm::tensor::LoadDType;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        return Err("usage: dump_logits MODEL IDS_JSON OUT [dtype]".into());
    }
    let ids: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(&a[2])?)?;
    let dtype: LoadDType = a.get(4).map_or("native", |s| s.as_str()).parse()?;
    let src = loader::open(std::path::Path::new(&a[1]))?;
    let m = Llama::load(src.as_ref(), dtype, pool::init_global(2))?;
    let logits = m.forward(&ids, &mut m.new_cache(), Logits::All, None)?;
    let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&a[3], bytes)?;
    Ok(())
}

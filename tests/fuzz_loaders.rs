//! Mutation fuzzing of the loaders: GGUF, safetensors, config.json.
//!
//! Seeds are small valid files (a complete tiny llama GGUF, a tiny safetensors file, a
//! real config.json); each case mutates one (bit flips, byte overwrites, interesting
//! integers at 8-byte offsets, truncation, insertion, splicing) and runs it through the
//! whole path a user's file takes: parse, config, model load, one forward step and the
//! tokenizer. Every case must end in Ok or Err: a panic is a failure, and the input is
//! written to target/fuzz-failures for inspection.
//!
//! - `cargo test --release --test fuzz_loaders` runs 20,000 cases per target and replays
//!   the regression corpus in tests/corpus/.
//! - `FUZZ_CASES=1000000 cargo test --release --test fuzz_loaders -- --ignored --nocapture`
//!   runs the long campaign and writes inputs with new error kinds to tests/corpus/.

use std::collections::BTreeSet;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use sparsellm::kernels::{map_bytes, pool};
use sparsellm::loader::gguf::{GgufFile, GgufModel};
use sparsellm::loader::hf::parse_config;
use sparsellm::loader::safetensors::SafetensorsFile;
use sparsellm::loader::{TokenizerSource, WeightSource};
use sparsellm::model::{Llama, Logits};
use sparsellm::tensor::DType;
use sparsellm::tokenizer::Tokenizer;

// ---------------------------------------------------------------------------------------
// Seeds.

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// A complete llama GGUF: hidden 8, 1 layer, 2 heads / 1 KV head, intermediate 16,
/// 8-token gpt2 vocabulary, F32 and Q8_0 tensors.
fn seed_gguf() -> Vec<u8> {
    let (h, inter, vocab, kv) = (8u64, 16u64, 8u64, 4u64);
    let mut meta = Vec::new();
    let mut n_meta = 0u64;
    let kv_u32 = |meta: &mut Vec<u8>, k: &str, v: u32| {
        put_str(meta, k);
        meta.extend(4u32.to_le_bytes());
        meta.extend(v.to_le_bytes());
    };
    put_str(&mut meta, "general.architecture");
    meta.extend(8u32.to_le_bytes());
    put_str(&mut meta, "llama");
    n_meta += 1;
    for (k, v) in [
        ("llama.embedding_length", h as u32),
        ("llama.feed_forward_length", inter as u32),
        ("llama.block_count", 1),
        ("llama.attention.head_count", 2),
        ("llama.attention.head_count_kv", 1),
        ("llama.context_length", 32),
        ("tokenizer.ggml.eos_token_id", 1),
    ] {
        kv_u32(&mut meta, k, v);
        n_meta += 1;
    }
    put_str(&mut meta, "llama.attention.layer_norm_rms_epsilon");
    meta.extend(6u32.to_le_bytes());
    meta.extend(1e-5f32.to_le_bytes());
    n_meta += 1;
    put_str(&mut meta, "tokenizer.ggml.model");
    meta.extend(8u32.to_le_bytes());
    put_str(&mut meta, "gpt2");
    n_meta += 1;
    put_str(&mut meta, "tokenizer.ggml.tokens");
    meta.extend(9u32.to_le_bytes());
    meta.extend(8u32.to_le_bytes());
    meta.extend(vocab.to_le_bytes());
    for t in ["a", "b", "c", "d", "ab", "cd", "abcd", " "] {
        put_str(&mut meta, t);
    }
    n_meta += 1;
    put_str(&mut meta, "tokenizer.ggml.merges");
    meta.extend(9u32.to_le_bytes());
    meta.extend(8u32.to_le_bytes());
    meta.extend(3u64.to_le_bytes());
    for m in ["a b", "c d", "ab cd"] {
        put_str(&mut meta, m);
    }
    n_meta += 1;

    let mut infos = Vec::new();
    let mut data: Vec<u8> = Vec::new();
    let mut n_tensors = 0u64;
    let mut tensor = |name: &str, dims: &[u64], ty: u32, bytes: Vec<u8>| {
        while !data.len().is_multiple_of(32) {
            data.push(0);
        }
        put_str(&mut infos, name);
        infos.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            infos.extend(d.to_le_bytes());
        }
        infos.extend(ty.to_le_bytes());
        infos.extend((data.len() as u64).to_le_bytes());
        data.extend(bytes);
        n_tensors += 1;
    };
    let f32s = |n: u64, seed: u32| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                ((((i as u32 * 2654435761) ^ seed) % 1000) as f32 / 1000.0 - 0.5).to_le_bytes()
            })
            .collect()
    };
    // Q8_0 embedding: 8 rows of 8 columns would not be whole blocks; use F32 there and
    // Q8_0 for a 32-wide gate (blocks of 32 along the row).
    tensor("token_embd.weight", &[h, vocab], 0, f32s(h * vocab, 1));
    tensor("blk.0.attn_norm.weight", &[h], 0, f32s(h, 2));
    tensor("blk.0.attn_q.weight", &[h, h], 0, f32s(h * h, 3));
    tensor("blk.0.attn_k.weight", &[h, kv], 0, f32s(h * kv, 4));
    tensor("blk.0.attn_v.weight", &[h, kv], 0, f32s(h * kv, 5));
    tensor("blk.0.attn_output.weight", &[h, h], 0, f32s(h * h, 6));
    tensor("blk.0.ffn_norm.weight", &[h], 0, f32s(h, 7));
    tensor("blk.0.ffn_gate.weight", &[h, inter], 0, f32s(h * inter, 8));
    tensor("blk.0.ffn_up.weight", &[h, inter], 0, f32s(h * inter, 9));
    tensor("blk.0.ffn_down.weight", &[inter, h], 0, f32s(h * inter, 10));
    tensor("output_norm.weight", &[h], 0, f32s(h, 11));
    // An extra Q8_0 tensor the model does not use: exercises the block size checks.
    let mut q8 = vec![0u8; 34];
    q8[..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    tensor("extra.q8.weight", &[32], 8, q8);

    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_meta.to_le_bytes());
    b.extend(meta);
    b.extend(infos);
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend(data);
    b
}

/// A safetensors file with an F32, a BF16 and an F16 tensor.
fn seed_safetensors() -> Vec<u8> {
    let header = r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]},"c":{"dtype":"F16","shape":[2,2],"data_offsets":[32,40]},"__metadata__":{"format":"pt"}}"#;
    let mut h = header.as_bytes().to_vec();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut b = (h.len() as u64).to_le_bytes().to_vec();
    b.extend(h);
    b.extend((0..40u8).map(|i| i.wrapping_mul(37)));
    b
}

fn seed_config() -> Vec<u8> {
    br#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","hidden_size":2048,"intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,"num_key_value_heads":8,"head_dim":64,"rms_norm_eps":1e-05,"rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":32.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192},"max_position_embeddings":131072,"vocab_size":128256,"tie_word_embeddings":true,"bos_token_id":128000,"eos_token_id":[128001,128008,128009]}"#.to_vec()
}

// ---------------------------------------------------------------------------------------
// Targets: each returns Ok(()) or the error text; a panic is caught by the driver.

fn run_gguf(bytes: &[u8]) -> Result<(), String> {
    let map = map_bytes(bytes).map_err(|e| e.to_string())?;
    let file = GgufFile::parse(Path::new("fuzz.gguf"), map).map_err(|e| e.to_string())?;
    let model = GgufModel::from_file(file).map_err(|e| e.to_string())?;
    if let Ok(TokenizerSource::Gguf(v)) = model.tokenizer_source()
        && let Ok(t) = Tokenizer::from_gguf_vocab(&v)
    {
        let ids = t.encode("abcd a").map_err(|e| e.to_string())?;
        let _ = t.decode(&ids);
    }
    let llama = Llama::load(&model, DType::F32, pool::global()).map_err(|e| e.to_string())?;
    let mut cache = llama.new_cache();
    llama
        .forward(&[0, 1], &mut cache, Logits::All, None)
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn run_safetensors(bytes: &[u8]) -> Result<(), String> {
    let map = map_bytes(bytes).map_err(|e| e.to_string())?;
    let f =
        SafetensorsFile::from_map(Path::new("fuzz.safetensors"), map).map_err(|e| e.to_string())?;
    for name in ["a", "b", "c"] {
        if let Ok(t) = f.tensor(name) {
            let _ = t.bytes().iter().fold(0u8, |a, &b| a ^ b);
        }
    }
    Ok(())
}

fn run_config(bytes: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
    let c = parse_config(text).map_err(|e| e.to_string())?;
    let _ = c.rope_inv_freq();
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The mutation driver.

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    2,
    7,
    8,
    31,
    32,
    255,
    1 << 31,
    1 << 32,
    1 << 63,
    u64::MAX,
];

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        if b.is_empty() {
            b.push(rng.next() as u8);
            continue;
        }
        match rng.below(7) {
            0 => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            2 => {
                // An interesting integer over 8 (or 4) bytes at an aligned offset: counts,
                // lengths, dims and offsets are u64 (u32) fields.
                let v = INTERESTING[rng.below(INTERESTING.len())]
                    .wrapping_add(rng.below(3) as u64)
                    .wrapping_sub(1);
                let w = if rng.below(2) == 0 { 8 } else { 4 };
                if b.len() >= w {
                    let i = rng.below(b.len() - w + 1) & !(w - 1);
                    b[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
                }
            }
            3 => {
                let n = rng.below(b.len());
                b.truncate(n);
            }
            4 => {
                let i = rng.below(b.len());
                let n = 1 + rng.below(16);
                let ins: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                b.splice(i..i, ins);
            }
            5 => {
                let i = rng.below(b.len());
                let n = (1 + rng.below(16)).min(b.len() - i);
                b.drain(i..i + n);
            }
            _ => {
                // Copy a chunk of the input over another place (splicing structure).
                let (i, j) = (rng.below(b.len()), rng.below(b.len()));
                let n = (1 + rng.below(32)).min(b.len() - i.max(j));
                let chunk = b[i..i + n].to_vec();
                b[j..j + n].copy_from_slice(&chunk);
            }
        }
    }
    b
}

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(target)
}

/// An error message with numbers and quoted names removed: inputs with a new kind are
/// worth keeping.
fn error_kind(e: &str) -> String {
    let mut out = String::new();
    let mut quoted = false;
    for c in e.chars() {
        if c == '\'' {
            quoted = !quoted;
        } else if !quoted && !c.is_ascii_digit() {
            out.push(c);
        }
    }
    out.chars().take(48).collect()
}

struct Outcome {
    cases: usize,
    ok: usize,
    kinds: BTreeSet<String>,
    panics: Vec<PathBuf>,
}

fn fuzz(
    target: &str,
    seed: &[u8],
    run: fn(&[u8]) -> Result<(), String>,
    cases: usize,
    save_new_kinds: bool,
) -> Outcome {
    let mut rng = Rng(0x5EED_0000 ^ target.len() as u64 ^ (cases as u64) << 20);
    let mut out = Outcome {
        cases,
        ok: 0,
        kinds: BTreeSet::new(),
        panics: Vec::new(),
    };
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for case in 0..cases {
        let input = mutate(seed, &mut rng);
        match catch_unwind(AssertUnwindSafe(|| run(&input))) {
            Ok(Ok(())) => out.ok += 1,
            Ok(Err(e)) => {
                let kind = error_kind(&e);
                // Keep at most 40 inputs per target: a regression corpus, not an archive.
                if out.kinds.insert(kind) && save_new_kinds && out.kinds.len() <= 40 {
                    let dir = corpus_dir(target);
                    std::fs::create_dir_all(&dir).unwrap();
                    std::fs::write(dir.join(format!("case-{case:07}")), &input).unwrap();
                }
            }
            Err(_) => {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("target/fuzz-failures")
                    .join(target);
                std::fs::create_dir_all(&dir).unwrap();
                let p = dir.join(format!("panic-{case:07}"));
                std::fs::write(&p, &input).unwrap();
                out.panics.push(p);
            }
        }
    }
    std::panic::set_hook(prev);
    out
}

fn replay(target: &str, run: fn(&[u8]) -> Result<(), String>) -> usize {
    let Ok(entries) = std::fs::read_dir(corpus_dir(target)) else {
        return 0;
    };
    let mut n = 0;
    for e in entries {
        let p = e.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| run(&bytes)));
        assert!(r.is_ok(), "corpus input {} panics", p.display());
        n += 1;
    }
    n
}

fn check(
    target: &str,
    seed: Vec<u8>,
    run: fn(&[u8]) -> Result<(), String>,
    cases: usize,
    save: bool,
) {
    assert_eq!(run(&seed), Ok(()), "the {target} seed must be valid");
    let replayed = replay(target, run);
    let o = fuzz(target, &seed, run, cases, save);
    eprintln!(
        "{target}: {} cases, {} accepted, {} distinct errors, {} panics; {replayed} corpus inputs replayed",
        o.cases,
        o.ok,
        o.kinds.len(),
        o.panics.len()
    );
    assert!(o.panics.is_empty(), "{target}: panics on {:?}", o.panics);
    assert!(
        o.kinds.len() > 5,
        "{target}: the mutations reach too few error paths"
    );
}

fn cases_from_env(default: usize) -> usize {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn gguf_never_panics() {
    check("gguf", seed_gguf(), run_gguf, 20_000, false);
}

#[test]
fn safetensors_never_panics() {
    check(
        "safetensors",
        seed_safetensors(),
        run_safetensors,
        20_000,
        false,
    );
}

#[test]
fn config_json_never_panics() {
    check("config", seed_config(), run_config, 20_000, false);
}

#[test]
#[ignore = "long campaign: FUZZ_CASES=1000000 ... -- --ignored --nocapture"]
fn long_campaign_saves_new_error_kinds_to_the_corpus() {
    let n = cases_from_env(1_000_000);
    check("gguf", seed_gguf(), run_gguf, n, true);
    check("safetensors", seed_safetensors(), run_safetensors, n, true);
    check("config", seed_config(), run_config, n, true);
}

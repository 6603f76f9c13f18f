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
//!
//! The `gguf-real` target mutates the header of the real model (SmolLM2-135M-Instruct
//! Q4_1, read from the fetched file: the header is not committed) with the same mutations
//! plus ones aimed at its fields (counts, lengths, type tags, dims, offsets, names, found
//! by walking the header once). Its corpus, tests/corpus/gguf-real/, holds each input as a
//! short list of edits to that header; the normal run replays it and runs
//! `REAL_CASES` mutants. Its long campaign, with cases per second, peak allocation and the
//! slowest case, saves inputs with error kinds the corpus lacks:
//! `FUZZ_CASES=1000000 cargo test --release --test fuzz_loaders long_campaign_gguf_real -- --ignored --nocapture`
//! (`FUZZ_THREADS=2` for two threads; `FUZZ_SEED=n` for another sequence of inputs, to run a
//! campaign as several shorter processes).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::hint::black_box;
use std::ops::Bound;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use memmap2::{Mmap, MmapMut, MmapOptions};
use sparsellm::kernels::{map_bytes, pool};
use sparsellm::loader::gguf::{GgufFile, GgufModel, MetaValue};
use sparsellm::loader::hf::parse_config;
use sparsellm::loader::safetensors::SafetensorsFile;
use sparsellm::loader::{TokenizerSource, WeightSource};
use sparsellm::model::{Llama, Logits};
use sparsellm::tensor::DType;
use sparsellm::tokenizer::{ChatTemplate, Tokenizer};

mod common;

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

/// A change to an input, in the coordinates of the input as it is when the change applies.
#[derive(Debug, Clone, PartialEq)]
enum Edit {
    /// Overwrite bytes at an offset.
    Set(usize, Vec<u8>),
    /// Insert bytes before an offset.
    Ins(usize, Vec<u8>),
    /// Remove bytes at an offset.
    Del(usize, usize),
    /// Cut the file at this length (of a real header: nothing follows it).
    Trunc(usize),
    /// Cut the data section after a real header to this length.
    Data(usize),
}

/// Applies `e` to `b`, whose data section (real header only) is `data_len` bytes.
fn apply(b: &mut Vec<u8>, data_len: &mut usize, e: &Edit) -> Result<(), String> {
    let len = b.len();
    let bad = || format!("{e:?} does not fit an input of {len} bytes");
    match e {
        Edit::Set(i, v) => {
            let end = i.checked_add(v.len()).filter(|&end| end <= b.len());
            b[*i..end.ok_or_else(bad)?].copy_from_slice(v);
        }
        Edit::Ins(i, v) => {
            if *i > b.len() {
                return Err(bad());
            }
            b.splice(*i..*i, v.iter().copied());
        }
        Edit::Del(i, n) => {
            let end = i.checked_add(*n).filter(|&end| end <= b.len());
            b.drain(*i..end.ok_or_else(bad)?);
        }
        Edit::Trunc(n) => {
            if *n > b.len() {
                return Err(bad());
            }
            b.truncate(*n);
            *data_len = 0;
        }
        Edit::Data(n) => *data_len = (*data_len).min(*n),
    }
    Ok(())
}

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    mutate_in_place(&mut b, &mut 0, rng, &mut Vec::new());
    b
}

/// One to three random mutations of `b`, applied in place and recorded in `edits`.
fn mutate_in_place(b: &mut Vec<u8>, data_len: &mut usize, rng: &mut Rng, edits: &mut Vec<Edit>) {
    for _ in 0..1 + rng.below(3) {
        let e = if b.is_empty() {
            Edit::Ins(0, vec![rng.next() as u8])
        } else {
            match rng.below(7) {
                0 => {
                    let i = rng.below(b.len());
                    Edit::Set(i, vec![b[i] ^ (1 << rng.below(8))])
                }
                1 => {
                    let i = rng.below(b.len());
                    Edit::Set(i, vec![rng.next() as u8])
                }
                2 => {
                    // An interesting integer over 8 (or 4) bytes at an aligned offset: counts,
                    // lengths, dims and offsets are u64 (u32) fields.
                    let v = INTERESTING[rng.below(INTERESTING.len())]
                        .wrapping_add(rng.below(3) as u64)
                        .wrapping_sub(1);
                    let w = if rng.below(2) == 0 { 8 } else { 4 };
                    if b.len() < w {
                        continue;
                    }
                    let i = rng.below(b.len() - w + 1) & !(w - 1);
                    Edit::Set(i, v.to_le_bytes()[..w].to_vec())
                }
                3 => Edit::Trunc(rng.below(b.len())),
                4 => {
                    let i = rng.below(b.len());
                    let n = 1 + rng.below(16);
                    Edit::Ins(i, (0..n).map(|_| rng.next() as u8).collect())
                }
                5 => {
                    let i = rng.below(b.len());
                    Edit::Del(i, (1 + rng.below(16)).min(b.len() - i))
                }
                _ => {
                    // Copy a chunk of the input over another place (splicing structure).
                    let (i, j) = (rng.below(b.len()), rng.below(b.len()));
                    let n = (1 + rng.below(32)).min(b.len() - i.max(j));
                    Edit::Set(j, b[i..i + n].to_vec())
                }
            }
        };
        apply(b, data_len, &e).expect("a generated edit fits its input");
        edits.push(e);
    }
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

// ---------------------------------------------------------------------------------------
// gguf-real: the header of the real model.
//
// A mutant is the real header with edits, followed by the tensor data section as zeros
// (96 MB of a sparse file or map, which cost nothing unless touched) unless an edit cut the
// file. It goes through what loading the model does short of reading the weights: parse,
// every accepted tensor's bytes (first and last), the model config, the tensor lookups of
// a model load, the tokenizer and the chat template.

/// The real header's length: the data section's offset (checked by the test against the
/// parser and against an independent walk of the header).
const REAL_HEADER_LEN: usize = 1_785_664;
const REAL_PATH: &str = "real.gguf";
/// Mutants per normal test run.
const REAL_CASES: usize = 3_000;

/// Allocation accounting per thread: live bytes and their peak, so each case's largest
/// allocation shows (an absurd allocation is a finding even when it succeeds).
struct CountingAlloc;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note_alloc(delta: isize) {
    let _ = LIVE.try_with(|live| {
        let v = live.get() + delta;
        live.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

// SAFETY: forwards to the system allocator; the accounting itself does not allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            note_alloc(l.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            note_alloc(l.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(p, l) };
        note_alloc(-(l.size() as isize));
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        let q = unsafe { System.realloc(p, l, new_size) };
        if !q.is_null() {
            note_alloc(new_size as isize - l.size() as isize);
        }
        q
    }
}

/// Runs `f`, returning its result and the most bytes it had allocated at once (on this
/// thread).
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    (r, (PEAK.with(Cell::get) - base).max(0) as usize)
}

/// A field of the GGUF header, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    Version,
    /// Tensor and metadata counts.
    Count,
    KeyLen,
    ValueType,
    /// Length of a string value or array element.
    StrLen,
    ArrayType,
    ArrayLen,
    /// A numeric or bool metadata value.
    Scalar,
    /// A numeric array element (token types).
    Element,
    NameLen,
    NDims,
    Dim,
    TensorType,
    TensorOffset,
}

/// The real header and where its fields are.
struct RealSeed {
    file_name: String,
    header: Vec<u8>,
    data_len: usize,
    /// Each role with the (offset, width) of its fields.
    fields: Vec<(Field, Spans)>,
    /// (offset, length) of every metadata key and tensor name.
    names: Spans,
    names_by_len: HashMap<usize, Vec<usize>>,
    /// The seed's tokenizer.* metadata: a mutant that leaves it alone has the seed's
    /// tokenizer and chat template, which the test built once.
    tokenizer_meta: Vec<(String, MetaValue)>,
}

/// (offset, length) of fields or names in the header.
type Spans = Vec<(usize, usize)>;

/// Walks a well-formed GGUF header (the seed), independently of the loader: the fields by
/// role, the names, and where the header ends.
fn walk_header(h: &[u8]) -> (BTreeMap<Field, Spans>, Spans, usize) {
    struct W<'a> {
        h: &'a [u8],
        pos: usize,
        fields: BTreeMap<Field, Spans>,
    }
    impl W<'_> {
        fn int(&mut self, kind: Field, width: usize) -> u64 {
            let mut b = [0u8; 8];
            b[..width].copy_from_slice(&self.h[self.pos..self.pos + width]);
            self.fields.entry(kind).or_default().push((self.pos, width));
            self.pos += width;
            u64::from_le_bytes(b)
        }
        fn string(&mut self, kind: Field) -> (usize, usize) {
            let n = self.int(kind, 8) as usize;
            self.pos += n;
            (self.pos - n, n)
        }
        fn value(&mut self, ty: u64, in_array: bool) {
            let scalar = if in_array {
                Field::Element
            } else {
                Field::Scalar
            };
            match ty {
                0 | 1 | 7 => drop(self.int(scalar, 1)),
                2 | 3 => drop(self.int(scalar, 2)),
                4..=6 => drop(self.int(scalar, 4)),
                10..=12 => drop(self.int(scalar, 8)),
                8 => drop(self.string(Field::StrLen)),
                9 => {
                    let elem = self.int(Field::ArrayType, 4);
                    for _ in 0..self.int(Field::ArrayLen, 8) {
                        self.value(elem, true);
                    }
                }
                t => panic!("the seed has a metadata value of type {t}"),
            }
        }
    }
    assert_eq!(&h[..4], b"GGUF", "the seed is not a GGUF file");
    let mut w = W {
        h,
        pos: 4,
        fields: BTreeMap::new(),
    };
    w.int(Field::Version, 4);
    let n_tensors = w.int(Field::Count, 8);
    let n_meta = w.int(Field::Count, 8);
    let mut names = Vec::new();
    for _ in 0..n_meta {
        names.push(w.string(Field::KeyLen));
        let ty = w.int(Field::ValueType, 4);
        w.value(ty, false);
    }
    for _ in 0..n_tensors {
        names.push(w.string(Field::NameLen));
        for _ in 0..w.int(Field::NDims, 4) {
            w.int(Field::Dim, 8);
        }
        w.int(Field::TensorType, 4);
        w.int(Field::TensorOffset, 8);
    }
    (w.fields, names, w.pos)
}

/// The tokenizer.* metadata entries.
fn tokenizer_entries(f: &GgufFile) -> impl Iterator<Item = (&String, &MetaValue)> {
    f.metadata
        .range::<str, _>((Bound::Included("tokenizer."), Bound::Unbounded))
        .take_while(|(k, _)| k.starts_with("tokenizer."))
}

/// The seed, read once from the real model (fetched on first use).
fn real_seed() -> &'static RealSeed {
    static SEED: OnceLock<RealSeed> = OnceLock::new();
    SEED.get_or_init(|| {
        let path = common::model_path();
        let file = GgufFile::open(&path).expect("the real model parses");
        let data_offset = file.data_offset;
        let mut header = vec![0u8; data_offset];
        let mut f = std::fs::File::open(&path).expect("open the real model");
        std::io::Read::read_exact(&mut f, &mut header).expect("read the real header");
        let file_len = f.metadata().unwrap().len() as usize;
        let (by_kind, names, end) = walk_header(&header);
        assert_eq!(
            (data_offset, end.div_ceil(32) * 32),
            (REAL_HEADER_LEN, REAL_HEADER_LEN),
            "the real header's length (data offset, and the end of the walk of its fields)"
        );
        let mut names_by_len: HashMap<usize, Vec<usize>> = HashMap::new();
        for (i, &(_, len)) in names.iter().enumerate() {
            names_by_len.entry(len).or_default().push(i);
        }
        RealSeed {
            file_name: path.file_name().unwrap().to_string_lossy().into_owned(),
            tokenizer_meta: tokenizer_entries(&file)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            data_len: file_len - data_offset,
            header,
            fields: by_kind.into_iter().collect(),
            names,
            names_by_len,
        }
    })
}

fn read_le(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(a)
}

/// One to three mutations of the seed's fields, applied to `b` (still laid out as the seed)
/// and recorded in `edits`.
fn mutate_fields(b: &mut Vec<u8>, seed: &RealSeed, rng: &mut Rng, edits: &mut Vec<Edit>) {
    for _ in 0..1 + rng.below(3) {
        let e = if rng.below(8) == 0 {
            // A key or tensor name replaced by another of the same length: duplicates,
            // missing and renamed tensors and keys.
            let (at, len) = seed.names[rng.below(seed.names.len())];
            let same = &seed.names_by_len[&len];
            let (other, _) = seed.names[same[rng.below(same.len())]];
            Edit::Set(at, seed.header[other..other + len].to_vec())
        } else {
            // The roles are drawn evenly, so the two counts get as many mutations as the
            // 100,000 string lengths of the vocabulary.
            let (kind, list) = &seed.fields[rng.below(seed.fields.len())];
            let (at, w) = list[rng.below(list.len())];
            let orig = read_le(&seed.header[at..at + w]);
            let v = match rng.below(6) {
                0 | 1 => INTERESTING[rng.below(INTERESTING.len())]
                    .wrapping_add(rng.below(3) as u64)
                    .wrapping_sub(1),
                2 => orig.wrapping_add(rng.below(9) as u64).wrapping_sub(4),
                3 => match rng.below(3) {
                    0 => orig.wrapping_mul(2),
                    1 => orig / 2,
                    _ => orig.wrapping_add(32),
                },
                4 => {
                    // The value of another field of the same role.
                    let (o, ow) = list[rng.below(list.len())];
                    read_le(&seed.header[o..o + ow])
                }
                _ => match kind {
                    Field::Version | Field::ValueType | Field::ArrayType | Field::TensorType => {
                        rng.below(40) as u64
                    }
                    Field::NDims => rng.below(8) as u64,
                    _ => rng.next() >> rng.below(64),
                },
            };
            Edit::Set(at, v.to_le_bytes()[..w].to_vec())
        };
        apply(b, &mut 0, &e).expect("a field edit fits the header");
        edits.push(e);
    }
}

/// Makes a mutant of the seed in `buf` (which holds the seed), recording its edits; returns
/// the length of its data section.
fn real_mutant(seed: &RealSeed, rng: &mut Rng, buf: &mut Vec<u8>, edits: &mut Vec<Edit>) -> usize {
    edits.clear();
    let mut data_len = seed.data_len;
    match rng.below(16) {
        0..=6 => mutate_in_place(buf, &mut data_len, rng, edits),
        7..=13 => mutate_fields(buf, seed, rng, edits),
        14 => {
            mutate_fields(buf, seed, rng, edits);
            mutate_in_place(buf, &mut data_len, rng, edits);
        }
        _ => {
            let e = Edit::Data(rng.below(seed.data_len));
            apply(buf, &mut data_len, &e).unwrap();
            edits.push(e);
            if rng.below(2) == 0 {
                mutate_fields(buf, seed, rng, edits);
            }
        }
    }
    data_len
}

/// Whether `edits` moved bytes (insertions, deletions): then undoing them means restoring
/// the whole header rather than the overwritten ranges.
fn shifts(edits: &[Edit]) -> bool {
    edits
        .iter()
        .any(|e| matches!(e, Edit::Ins(..) | Edit::Del(..)))
}

/// Makes `buf` the seed header again after `edits`.
fn undo(buf: &mut Vec<u8>, seed: &RealSeed, edits: &[Edit]) {
    if shifts(edits) || edits.iter().any(|e| matches!(e, Edit::Trunc(_))) {
        buf.clear();
        buf.extend_from_slice(&seed.header);
    } else {
        for e in edits {
            if let Edit::Set(i, v) = e {
                buf[*i..i + v.len()].copy_from_slice(&seed.header[*i..i + v.len()]);
            }
        }
    }
}

/// Where a mutant lies for the loader: a temporary file (on tmpfs when there is one) that
/// holds the seed header and then zeros, mapped writable once. A case writes its edits in,
/// maps the file read-only at the mutant's length and undoes the edits: no 98 MB map to
/// build and no 1.7 MB of fresh pages to fault in per case.
struct MutantFile {
    file: std::fs::File,
    rw: MmapMut,
    header_len: usize,
}

/// Room past the header and data for insertions.
const SLACK: usize = 1 << 16;

impl MutantFile {
    fn new(seed: &RealSeed) -> MutantFile {
        let shm = Path::new("/dev/shm");
        let file = if shm.is_dir() {
            tempfile::tempfile_in(shm).or_else(|_| tempfile::tempfile())
        } else {
            tempfile::tempfile()
        }
        .expect("a temporary file");
        file.set_len((seed.header.len() + seed.data_len + SLACK) as u64)
            .unwrap();
        // SAFETY: the file is unlinked, so only this process sees it, and only through
        // this struct, which writes it while no read-only map of it is alive.
        let mut rw = unsafe { MmapMut::map_mut(&file) }.expect("map the temporary file");
        rw[..seed.header.len()].copy_from_slice(&seed.header);
        MutantFile {
            file,
            rw,
            header_len: seed.header.len(),
        }
    }

    /// Runs `f` on a map of the mutant `buf` (the seed after `edits`) followed by
    /// `data_len` zero bytes, then restores the file to the seed.
    fn with_mutant<R>(
        &mut self,
        seed: &RealSeed,
        buf: &[u8],
        edits: &[Edit],
        data_len: usize,
        f: impl FnOnce(Arc<Mmap>) -> R,
    ) -> R {
        let shifted = shifts(edits);
        if shifted {
            self.rw[..buf.len()].copy_from_slice(buf);
            if buf.len() < self.header_len {
                self.rw[buf.len()..self.header_len].fill(0);
            }
        } else {
            for e in edits {
                if let Edit::Set(i, v) = e {
                    self.rw[*i..i + v.len()].copy_from_slice(v);
                }
            }
        }
        let len = buf.len() + data_len;
        let map = if len == 0 {
            map_bytes(&[]).unwrap()
        } else {
            // SAFETY: see `new`; `f` drops the map before the file is written again (a
            // map kept past `f` would be a bug of the harness, caught by the count check).
            Arc::new(unsafe { MmapOptions::new().len(len).map(&self.file) }.expect("map"))
        };
        let weak = Arc::downgrade(&map);
        let r = f(map);
        assert_eq!(weak.strong_count(), 0, "the mutant's map outlived its case");
        if shifted {
            self.rw[..self.header_len].copy_from_slice(&seed.header);
            self.rw[self.header_len..self.header_len.max(buf.len())].fill(0);
        } else {
            for e in edits {
                if let Edit::Set(i, v) = e {
                    self.rw[*i..i + v.len()].copy_from_slice(&seed.header[*i..i + v.len()]);
                }
            }
        }
        r
    }
}

/// `header` followed by `data_len` zeros, in an anonymous map (for one-off inputs).
fn anon_map(header: &[u8], data_len: usize) -> Arc<Mmap> {
    let mut m = MmapMut::map_anon((header.len() + data_len).max(1)).unwrap();
    m[..header.len()].copy_from_slice(header);
    Arc::new(m.make_read_only().unwrap())
}

/// The HF tensor names a model load asks for.
fn model_tensor_names(num_layers: usize) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_string(),
        "model.norm.weight".to_string(),
    ];
    for l in 0..num_layers {
        for part in common::LAYER_TENSORS {
            names.push(format!("model.layers.{l}.{part}.weight"));
        }
    }
    names
}

/// Loads a mutant as far as it goes without reading the weights.
fn run_gguf_real(seed: &RealSeed, map: Arc<Mmap>) -> Result<(), String> {
    let s = |e: sparsellm::Error| e.to_string();
    let file = GgufFile::parse(Path::new(REAL_PATH), map).map_err(s)?;
    // Every tensor the parser accepted lies inside the file.
    for t in &file.tensors {
        if let Ok(raw) = file.raw_tensor(&t.name) {
            let b = raw.bytes();
            black_box((b.first(), b.last()));
        }
    }
    let same_tokenizer = tokenizer_entries(&file)
        .map(|(k, v)| (k.as_str(), v))
        .eq(seed.tokenizer_meta.iter().map(|(k, v)| (k.as_str(), v)));
    let model = GgufModel::from_file(file).map_err(s)?;
    let c = model.config().clone();
    black_box(c.rope_inv_freq());
    black_box(model.identity());
    // The lookups of Llama::load, without its reading of the weights (a second per case).
    let mut names = model_tensor_names(c.num_layers);
    if model.has_tensor("lm_head.weight") {
        names.push("lm_head.weight".into());
    }
    for name in names {
        let t = model.tensor(&name).map_err(s)?;
        black_box(t.bytes().len());
    }
    // The seed's tokenizer and chat template were built once by `check_real_seed`; a
    // mutant with the same tokenizer metadata builds the same ones.
    if same_tokenizer {
        return Ok(());
    }
    let t = Tokenizer::load(&model.tokenizer_source().map_err(s)?).map_err(s)?;
    let ids = t
        .encode("Hello, world! 12345 <|im_start|>user\nhé")
        .map_err(s)?;
    t.decode(&ids).map_err(s)?;
    if let Some(tpl) = model.chat_template() {
        let tok = |id: Option<u32>| id.and_then(|i| t.id_to_token(i)).unwrap_or_default();
        let ct =
            ChatTemplate::new(&tpl, &tok(t.bos_token_id()), &tok(t.eos_token_id())).map_err(s)?;
        ct.render(&[("user", "hi")], true).map_err(s)?;
    }
    Ok(())
}

/// The seed itself through the whole path, tokenizer and chat template included.
fn check_real_seed(seed: &RealSeed) {
    let map = anon_map(&seed.header, seed.data_len);
    let model = GgufModel::from_file(GgufFile::parse(Path::new(REAL_PATH), map).unwrap()).unwrap();
    let t = Tokenizer::load(&model.tokenizer_source().unwrap()).unwrap();
    assert!(!t.encode("Hello").unwrap().is_empty());
    let tpl = model
        .chat_template()
        .expect("the real model has a chat template");
    ChatTemplate::new(&tpl, "", "<|im_end|>")
        .unwrap()
        .render(&[("user", "hi")], true)
        .unwrap();
    let map = anon_map(&seed.header, seed.data_len);
    assert_eq!(run_gguf_real(seed, map), Ok(()));
}

/// An error message reduced to its kind, so that one check failing on different keys,
/// tensors or numbers is one kind: without the file name, the key or tensor name a header
/// error names (any text, when a mutation misaligned the reader), numbers, values, quoted
/// text and dotted words (names, floats).
fn real_error_kind(e: &str) -> String {
    let e = e.replace(&format!("{REAL_PATH}: "), "");
    let what = |w: &str| {
        let fixed = [
            "magic",
            "version",
            "tensor count",
            "metadata count",
            "metadata key",
            "tensor name",
        ];
        if fixed.contains(&w) { w } else { "<name>" }.to_string()
    };
    // The header reader's errors: "<what>: <message> (at byte offset N)" and "truncated
    // file: <what> needs N bytes (at byte offset N)".
    let e = match e.find(" (at byte offset ") {
        Some(end) => {
            let body = &e[..end];
            let truncated = body
                .strip_prefix("truncated file: ")
                .and_then(|r| r.rfind(" needs ").map(|i| &r[..i]));
            if let Some(w) = truncated {
                format!("truncated file: {} needs N bytes", what(w))
            } else if body.starts_with("duplicate metadata key") {
                "duplicate metadata key".to_string()
            } else if let Some(i) = body.rfind(": ") {
                format!("{}: {}", what(&body[..i]), &body[i + 2..])
            } else {
                body.to_string()
            }
        }
        None => e,
    };
    // Messages that show text or values of any form: their fixed part.
    let e = if let Some(rest) = e.strip_prefix("tokenizer: GGUF merge #") {
        let tail = ["names a token not in the vocabulary", "is not two tokens"]
            .into_iter()
            .find(|t| rest.contains(t))
            .unwrap_or("");
        format!("tokenizer: GGUF merge # {tail}")
    } else if e.starts_with("not a GGUF file (magic") {
        "not a GGUF file (magic)".to_string()
    } else if let Some(i) = e.find(" is not an unsigned integer") {
        e[..i + " is not an unsigned integer".len()].to_string()
    } else {
        e
    };
    // Quoted text: a quote opens after a space, '(' or the start, and closes before a
    // space, ':', ',', ')' or the end (names may contain quotes).
    let chars: Vec<char> = e.chars().collect();
    let mut out = String::new();
    let mut quoted = false;
    for (i, &c) in chars.iter().enumerate() {
        let (before, after) = (
            i.checked_sub(1).map(|j| chars[j]),
            chars.get(i + 1).copied(),
        );
        if c == '\'' || c == '"' {
            if !quoted && matches!(before, None | Some(' ' | '(')) {
                quoted = true;
            } else if quoted && matches!(after, None | Some(' ' | ':' | ',' | ')')) {
                quoted = false;
            }
        } else if !quoted && !c.is_ascii_digit() {
            out.push(c);
        }
    }
    let mut words: Vec<&str> = out
        .split(' ')
        .map(|w| {
            let core = w.trim_end_matches(['.', ':', ',', ')']);
            if core.contains('.') && core.chars().any(char::is_alphabetic) {
                "<name>"
            } else {
                w
            }
        })
        .collect();
    // "x = <value>": any value (digits gone, a sign, NaN, inf) is one kind.
    for i in 1..words.len() {
        if words[i - 1] == "=" {
            words[i] = "N";
        }
    }
    words.join(" ").chars().take(80).collect()
}

fn edits_to_text(seed: &RealSeed, edits: &[Edit], note: &str) -> String {
    let hex = |v: &[u8]| v.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut s = format!(
        "# gguf-real: edits to the header (first {REAL_HEADER_LEN} bytes) of {}, which is\n\
         # followed by its data section as zeros; replayed by tests/fuzz_loaders.rs.\n",
        seed.file_name
    );
    for line in note.lines() {
        // Escaped control characters keep the file text (a mutated name may hold NULs).
        let line: String = line
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect();
        writeln!(s, "# {line}").unwrap();
    }
    for e in edits {
        match e {
            Edit::Set(i, v) => writeln!(s, "set {i} {}", hex(v)),
            Edit::Ins(i, v) => writeln!(s, "ins {i} {}", hex(v)),
            Edit::Del(i, n) => writeln!(s, "del {i} {n}"),
            Edit::Trunc(n) => writeln!(s, "trunc {n}"),
            Edit::Data(n) => writeln!(s, "data {n}"),
        }
        .unwrap();
    }
    s
}

fn edits_from_text(text: &str) -> Result<Vec<Edit>, String> {
    let mut edits = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || format!("line {}: '{line}'", n + 1);
        let w: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| {
            w.get(i)
                .and_then(|x| x.parse::<usize>().ok())
                .ok_or_else(bad)
        };
        let hex = |i: usize| -> Result<Vec<u8>, String> {
            let h = w.get(i).ok_or_else(bad)?;
            if h.len() % 2 != 0 || !h.is_ascii() {
                return Err(bad());
            }
            (0..h.len())
                .step_by(2)
                .map(|j| u8::from_str_radix(&h[j..j + 2], 16).map_err(|_| bad()))
                .collect()
        };
        edits.push(match (w[0], w.len()) {
            ("set", 3) => Edit::Set(num(1)?, hex(2)?),
            ("ins", 3) => Edit::Ins(num(1)?, hex(2)?),
            ("del", 3) => Edit::Del(num(1)?, num(2)?),
            ("trunc", 2) => Edit::Trunc(num(1)?),
            ("data", 2) => Edit::Data(num(1)?),
            _ => return Err(bad()),
        });
    }
    Ok(edits)
}

fn real_failure_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures/gguf-real")
}

#[derive(Default)]
struct RealOutcome {
    cases: usize,
    ok: usize,
    /// Error kind -> (count, first case).
    kinds: BTreeMap<String, (usize, usize)>,
    panics: Vec<PathBuf>,
    saved: usize,
    slowest: (Duration, usize),
    /// Cases that took over a second (written to target/fuzz-failures/gguf-real).
    slow: usize,
    /// The most bytes a case had allocated at once, and the case.
    largest_alloc: (usize, usize),
    /// That case's input, as edits.
    largest_alloc_input: String,
}

impl RealOutcome {
    fn summary(&self, secs: f64) -> String {
        format!(
            "{} cases in {secs:.1} s ({:.0}/s), {} accepted, {} distinct errors, {} panics, {} slow (>1 s), slowest {:.1} ms (case {}), largest allocation {:.1} MB (case {}), {} corpus inputs saved",
            self.cases,
            self.cases as f64 / secs,
            self.ok,
            self.kinds.len(),
            self.panics.len(),
            self.slow,
            self.slowest.0.as_secs_f64() * 1e3,
            self.slowest.1,
            self.largest_alloc.0 as f64 / (1 << 20) as f64,
            self.largest_alloc.1,
            self.saved
        )
    }
}

thread_local! {
    /// The panic message, where, and a backtrace, kept by the panic hook for the driver.
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// The corpus grows to at most this many inputs (one per error kind).
const MAX_SAVED: usize = 200;

/// Runs `cases` mutants on `threads` threads (case `c` on thread `c % threads`). With
/// `progress`, a watchdog prints progress every minute and aborts, naming the input, when
/// no case has finished for two minutes (a hang).
fn fuzz_real(seed: &RealSeed, run: &RealRun, corpus: &Corpus) -> RealOutcome {
    let RealRun {
        cases,
        threads,
        rng_seed,
        save,
        progress,
    } = *run;
    let out = Mutex::new(RealOutcome::default());
    let inputs: Vec<Mutex<String>> = (0..threads).map(|_| Mutex::new(String::new())).collect();
    let finished = AtomicU64::new(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let started = Instant::now();
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let bt = std::backtrace::Backtrace::force_capture();
        LAST_PANIC.with(|p| *p.borrow_mut() = format!("{info}\n{bt}"));
    }));
    let worker = |t: usize| {
        let mut rng = Rng((0x5EED_4EA1 ^ (cases as u64) << 20 ^ (t as u64) << 8)
            ^ rng_seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).max(1));
        let mut file = MutantFile::new(seed);
        let (mut buf, mut edits) = (seed.header.clone(), Vec::new());
        for case in (t..cases).step_by(threads) {
            let data_len = real_mutant(seed, &mut rng, &mut buf, &mut edits);
            if progress {
                *inputs[t].lock().unwrap() = format!("case {case}: {edits:?}");
            }
            let t0 = Instant::now();
            let (r, peak) = file.with_mutant(seed, &buf, &edits, data_len, |map| {
                peak_alloc(|| catch_unwind(AssertUnwindSafe(|| run_gguf_real(seed, map))))
            });
            let dt = t0.elapsed();
            let mut o = out.lock().unwrap();
            o.cases += 1;
            if dt > o.slowest.0 {
                o.slowest = (dt, case);
            }
            if peak > o.largest_alloc.0 {
                o.largest_alloc = (peak, case);
                let note = format!("allocated {peak} bytes at once: {r:?}");
                o.largest_alloc_input = edits_to_text(seed, &edits, &note);
            }
            if dt > Duration::from_secs(1) {
                o.slow += 1;
                let dir = real_failure_dir();
                std::fs::create_dir_all(&dir).unwrap();
                let note = format!("took {dt:?}: {r:?}");
                let text = edits_to_text(seed, &edits, &note);
                std::fs::write(dir.join(format!("slow-{rng_seed}-{case:07}")), text).unwrap();
            }
            match r {
                Ok(Ok(())) => o.ok += 1,
                Ok(Err(e)) => {
                    let kind = real_error_kind(&e);
                    let entry = o.kinds.entry(kind.clone()).or_insert((0, case));
                    entry.0 += 1;
                    let new = entry.0 == 1 && !corpus.kinds.contains(&kind);
                    if new && save && corpus.files + o.saved < MAX_SAVED {
                        let dir = corpus_dir("gguf-real");
                        std::fs::create_dir_all(&dir).unwrap();
                        let text = edits_to_text(seed, &edits, &format!("error: {e}"));
                        let name = format!("case-{rng_seed}-{case:07}");
                        std::fs::write(dir.join(name), text).unwrap();
                        o.saved += 1;
                    }
                }
                Err(_) => {
                    let dir = real_failure_dir();
                    std::fs::create_dir_all(&dir).unwrap();
                    let p = dir.join(format!("panic-{rng_seed}-{case:07}"));
                    let msg = LAST_PANIC.with(|p| p.borrow().clone());
                    let text = edits_to_text(seed, &edits, &format!("panic: {msg}"));
                    std::fs::write(&p, text).unwrap();
                    eprintln!("gguf-real: case {case} panics: {}", p.display());
                    o.panics.push(p);
                }
            }
            drop(o);
            finished.fetch_add(1, Ordering::Relaxed);
            undo(&mut buf, seed, &edits);
        }
    };
    std::thread::scope(|s| {
        if progress {
            s.spawn(|| {
                let (mut last, mut since, mut report) = (0, Instant::now(), Instant::now());
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(250));
                    let now = finished.load(Ordering::Relaxed);
                    if now != last {
                        (last, since) = (now, Instant::now());
                    } else if since.elapsed() > Duration::from_secs(120) {
                        for i in &inputs {
                            eprintln!(
                                "gguf-real: no case finished for 2 minutes (a hang?); running: {}",
                                i.lock().unwrap()
                            );
                        }
                        std::process::abort();
                    }
                    if report.elapsed() > Duration::from_secs(60) {
                        report = Instant::now();
                        let secs = started.elapsed().as_secs_f64();
                        eprintln!("gguf-real: {}", out.lock().unwrap().summary(secs));
                    }
                }
            });
        }
        let workers: Vec<_> = (0..threads).map(|t| s.spawn(move || worker(t))).collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    std::panic::set_hook(prev);
    let out = out.into_inner().unwrap();
    if progress {
        let dir = real_failure_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(format!("largest-alloc-seed-{rng_seed}"));
        std::fs::write(p, &out.largest_alloc_input).unwrap();
    }
    out
}

/// What the corpus holds: how many inputs, and the error kinds they reach.
#[derive(Default)]
struct Corpus {
    files: usize,
    kinds: BTreeSet<String>,
}

/// Replays tests/corpus/gguf-real/: every input must load to Ok or Err.
fn replay_real(seed: &RealSeed) -> Corpus {
    let mut corpus = Corpus::default();
    let Ok(entries) = std::fs::read_dir(corpus_dir("gguf-real")) else {
        return corpus;
    };
    for e in entries {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let edits = edits_from_text(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let (mut b, mut data_len) = (seed.header.clone(), seed.data_len);
        for e in &edits {
            apply(&mut b, &mut data_len, e).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
        let r = catch_unwind(AssertUnwindSafe(|| {
            run_gguf_real(seed, anon_map(&b, data_len))
        }));
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => drop(corpus.kinds.insert(real_error_kind(&e))),
            Err(_) => panic!("corpus input {} panics", p.display()),
        }
        corpus.files += 1;
    }
    corpus
}

/// One run of the gguf-real target.
#[derive(Clone, Copy)]
struct RealRun {
    cases: usize,
    threads: usize,
    /// Mixed into the random seed, so that the runs of a campaign see other inputs.
    rng_seed: u64,
    /// Save inputs whose error kind the corpus does not reach yet.
    save: bool,
    progress: bool,
}

fn check_real(run: RealRun) -> RealOutcome {
    let seed = real_seed();
    check_real_seed(seed);
    let corpus = replay_real(seed);
    let t0 = Instant::now();
    let o = fuzz_real(seed, &run, &corpus);
    let secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "gguf-real (seed {}): {}; {} corpus inputs replayed ({} error kinds)",
        run.rng_seed,
        o.summary(secs),
        corpus.files,
        corpus.kinds.len()
    );
    assert!(o.panics.is_empty(), "gguf-real: panics on {:?}", o.panics);
    assert!(
        o.kinds.len() > 5,
        "gguf-real: the mutations reach too few error paths"
    );
    o
}

#[test]
fn gguf_real_header_never_panics() {
    check_real(RealRun {
        cases: REAL_CASES,
        threads: 1,
        rng_seed: 0,
        save: false,
        progress: false,
    });
}

/// `FUZZ_CASES` mutants (default 1,000,000) on `FUZZ_THREADS` threads (default 1), from
/// random seed `FUZZ_SEED` (default 0: a campaign can run as several processes with
/// different seeds); inputs with error kinds the corpus lacks are saved to
/// tests/corpus/gguf-real/.
#[test]
#[ignore = "long campaign: FUZZ_CASES=1000000 ... long_campaign_gguf_real -- --ignored --nocapture"]
fn long_campaign_gguf_real() {
    let env = |k: &str, default: u64| {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let o = check_real(RealRun {
        cases: cases_from_env(1_000_000),
        threads: env("FUZZ_THREADS", 1).max(1) as usize,
        rng_seed: env("FUZZ_SEED", 0),
        save: true,
        progress: true,
    });
    eprintln!("gguf-real error kinds (count, first case, kind):");
    for (kind, (count, first)) in &o.kinds {
        eprintln!("{count:>9}  {first:>7}  {kind}");
    }
}

/// The harness's in-place mutants (written into the file, undone after) load exactly as
/// the same inputs built afresh, and the file and buffer go back to the seed.
#[test]
fn gguf_real_in_place_mutants_match_fresh_ones() {
    let seed = real_seed();
    let mut rng = Rng(0xC0FFEE);
    let mut file = MutantFile::new(seed);
    let (mut buf, mut edits) = (seed.header.clone(), Vec::new());
    for _ in 0..200 {
        let data_len = real_mutant(seed, &mut rng, &mut buf, &mut edits);
        let (mut fresh, mut fresh_data) = (seed.header.clone(), seed.data_len);
        for e in &edits {
            apply(&mut fresh, &mut fresh_data, e).unwrap();
        }
        assert_eq!((&buf, data_len), (&fresh, fresh_data));
        let in_place = file.with_mutant(seed, &buf, &edits, data_len, |map| {
            assert_eq!(&map[..buf.len()], &buf[..]);
            let near = (buf.len() + SLACK).min(map.len());
            assert!(map[buf.len()..near].iter().all(|&b| b == 0));
            run_gguf_real(seed, map)
        });
        assert_eq!(in_place, run_gguf_real(seed, anon_map(&fresh, fresh_data)));
        let text = edits_to_text(seed, &edits, "note");
        assert_eq!(edits_from_text(&text).unwrap(), edits);
        undo(&mut buf, seed, &edits);
        assert!(buf == seed.header);
        assert!(file.rw[..seed.header.len()] == seed.header[..]);
        let near = seed.header.len() + SLACK;
        assert!(file.rw[seed.header.len()..near].iter().all(|&b| b == 0));
    }
}

/// Loads one saved gguf-real input (a corpus file, or a panic or slow input from
/// target/fuzz-failures/gguf-real) and prints the outcome, the time and the peak allocation:
/// `FUZZ_INPUT=path cargo test --release --test fuzz_loaders gguf_real_replay_one -- --ignored --nocapture`.
#[test]
#[ignore = "replays FUZZ_INPUT"]
fn gguf_real_replay_one() {
    let path = std::env::var("FUZZ_INPUT").expect("FUZZ_INPUT=<edits file>");
    let seed = real_seed();
    let edits = edits_from_text(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let (mut b, mut data_len) = (seed.header.clone(), seed.data_len);
    for e in &edits {
        apply(&mut b, &mut data_len, e).unwrap();
    }
    for _ in 0..3 {
        let t0 = Instant::now();
        let (r, peak) = peak_alloc(|| run_gguf_real(seed, anon_map(&b, data_len)));
        eprintln!(
            "{path}: {r:?} in {:.1} ms, peak allocation {:.1} MB",
            t0.elapsed().as_secs_f64() * 1e3,
            peak as f64 / (1 << 20) as f64
        );
    }
}

//! Batched decode, the step of continuous batching: each sequence's logits from
//! `Llama::forward_batch` equal, bit for bit, what decoding that sequence alone gives,
//! whatever joins or leaves the batch around it.

mod common;

use sparsellm::generate::argmax;
use sparsellm::kernels::pool;
use sparsellm::loader;
use sparsellm::model::{BatchItem, KvCache, KvDType, Llama, Logits};
use sparsellm::tensor::{DType, LoadDType};

fn load(dtype: LoadDType) -> Llama {
    load_file(&common::model_path(), dtype)
}

fn load_file(path: &std::path::Path, dtype: LoadDType) -> Llama {
    let src = loader::open(path).expect("open model");
    Llama::load(src.as_ref(), dtype, pool::global()).expect("load model")
}

/// Prompts of different lengths: the reference prompts and the GPL-3 text's openings.
fn prompts() -> Vec<Vec<u32>> {
    let r = common::reference();
    let mut p: Vec<Vec<u32>> = r["forward"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| common::ids(&c["ids"]))
        .collect();
    let text = common::ids(&r["perplexity"]["ids"]);
    p.extend([1, 40, 97].map(|n| text[..n].to_vec()));
    p
}

/// The logits of each greedy decode step of `prompt` alone (row 0: the prompt's last
/// position), `steps + 1` rows.
fn alone(model: &Llama, prompt: &[u32], steps: usize) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut rows = vec![
        model
            .forward(prompt, &mut cache, Logits::Last, None)
            .unwrap(),
    ];
    for _ in 0..steps {
        let next = argmax(rows.last().unwrap());
        rows.push(
            model
                .forward(&[next], &mut cache, Logits::Last, None)
                .unwrap(),
        );
    }
    rows
}

struct Running {
    seq: usize,
    cache: KvCache,
    /// Logits rows so far (row 0 from the prefill).
    rows: Vec<Vec<f32>>,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Sequence s joins at step `s` (prefilled alone, as a server admits it) and leaves after
/// `steps[s]` decode steps; every step decodes all running sequences in one batch.
fn check_batches_equal_alone(model: &Llama, what: &str) {
    let prompts = prompts();
    let steps: Vec<usize> = (0..prompts.len()).map(|s| 3 + (s * 5) % 7).collect();
    let want: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .zip(&steps)
        .map(|(p, &n)| alone(model, p, n))
        .collect();
    let mut running: Vec<Running> = Vec::new();
    let (mut joined, mut finished, mut largest) = (0, 0, 0);
    for step in 0.. {
        if joined < prompts.len() && step >= joined {
            let mut cache = model.new_cache();
            let first = model
                .forward(&prompts[joined], &mut cache, Logits::Last, None)
                .unwrap();
            running.push(Running {
                seq: joined,
                cache,
                rows: vec![first],
            });
            joined += 1;
        }
        if running.is_empty() {
            break;
        }
        largest = largest.max(running.len());
        let mut items: Vec<BatchItem> = running
            .iter_mut()
            .map(|r| BatchItem {
                token: argmax(r.rows.last().unwrap()),
                cache: &mut r.cache,
            })
            .collect();
        let logits = model.forward_batch(&mut items, None).unwrap();
        drop(items);
        let vocab = model.config.vocab_size;
        assert_eq!(logits.len(), running.len() * vocab);
        for (r, row) in running.iter_mut().zip(logits.chunks_exact(vocab)) {
            let i = r.rows.len();
            assert!(
                bits(row) == bits(&want[r.seq][i]),
                "{what}: sequence {} step {i} differs from decoding it alone (batch of {})",
                r.seq,
                logits.len() / vocab
            );
            r.rows.push(row.to_vec());
        }
        running.retain(|r| {
            let done = r.rows.len() == steps[r.seq] + 1;
            finished += done as usize;
            !done
        });
    }
    assert_eq!(
        finished,
        prompts.len(),
        "{what}: every sequence ran to its end"
    );
    assert!(largest >= 4, "{what}: batches of up to {largest} only");
}

#[test]
fn quantized_batches_are_one_pass_and_equal_decoding_alone() {
    for dtype in [
        LoadDType::Native,
        LoadDType::To(DType::Q8_0),
        LoadDType::To(DType::Q4_0),
    ] {
        let model = load(dtype);
        assert!(
            model.batches_in_one_pass(),
            "{}: quantized weights batch in one pass",
            dtype.name()
        );
        check_batches_equal_alone(&model, dtype.name());
    }
}

/// K-quant blocks (Q4_K, Q6_K: the chunk kernels), GeGLU, q/k norms and Gemma 3's
/// sliding-window layers (the prompts are SmolLM2's ids: valid, meaningless to Gemma).
#[test]
fn gemma3_k_quant_batches_equal_decoding_alone() {
    let model = load_file(&common::gemma3_model_path(), LoadDType::Native);
    assert!(model.batches_in_one_pass());
    check_batches_equal_alone(&model, "gemma3-270m Q4_K_M");
}

/// Caches in f16: every sequence's keys and values are rounded once, alone or batched.
#[test]
fn f16_kv_cache_batches_equal_decoding_alone() {
    let mut model = load(LoadDType::Native);
    model.kv_dtype = KvDType::F16;
    check_batches_equal_alone(&model, "native, f16 KV cache");
}

#[test]
fn float_batches_are_one_pass_and_equal_decoding_alone() {
    for dtype in [DType::BF16, DType::F32] {
        let model = load(LoadDType::To(dtype));
        assert!(model.batches_in_one_pass());
        check_batches_equal_alone(&model, dtype.name());
    }
}

#[test]
fn a_bad_item_fails_the_batch_without_touching_any_cache() {
    let model = load(LoadDType::Native);
    let (mut a, mut b) = (model.new_cache(), model.new_cache());
    model
        .forward(&[1, 2, 3], &mut a, Logits::None, None)
        .unwrap();
    let vocab = model.config.vocab_size as u32;
    let mut items = [
        BatchItem {
            token: 5,
            cache: &mut a,
        },
        BatchItem {
            token: vocab,
            cache: &mut b,
        },
    ];
    let err = model.forward_batch(&mut items, None).unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    assert_eq!((a.len(), b.len()), (3, 0));
    assert!(model.forward_batch(&mut [], None).unwrap().is_empty());
}

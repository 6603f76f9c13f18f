//! The dense forward pass against HuggingFace transformers' float32 logits.

mod common;

use sparsellm::kernels::pool;
use sparsellm::loader;
use sparsellm::model::{KvDType, Llama, Logits};
use sparsellm::tensor::DType;

fn load(dtype: DType) -> Llama {
    let src = loader::open(&common::model_path()).expect("open model");
    Llama::load(src.as_ref(), dtype, pool::global()).expect("load model")
}

/// (positions whose top-1 equals the reference's, positions, worst |logit difference| over the top 20).
fn check_logits(model: &Llama) -> (usize, usize, f32) {
    let r = common::reference();
    let vocab = model.config.vocab_size;
    let (mut agree, mut total, mut worst) = (0, 0, 0f32);
    for case in r["forward"].as_array().unwrap() {
        let ids = common::ids(&case["ids"]);
        let mut cache = model.new_cache();
        let logits = model.forward(&ids, &mut cache, Logits::All, None).unwrap();
        for (t, pos) in case["positions"].as_array().unwrap().iter().enumerate() {
            let row = &logits[t * vocab..(t + 1) * vocab];
            let top = common::ids(&pos["top_ids"]);
            let argmax = row
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            total += 1;
            agree += (argmax == top[0]) as usize;
            for (id, want) in top.iter().zip(pos["top_logits"].as_array().unwrap()) {
                let d = (row[*id as usize] - want.as_f64().unwrap() as f32).abs();
                worst = worst.max(d);
            }
        }
    }
    assert!(worst.is_finite());
    (agree, total, worst)
}

#[test]
fn f32_logits_match_transformers() {
    let model = load(DType::F32);
    let (agree, total, worst) = check_logits(&model);
    eprintln!("f32: top-1 {agree}/{total}, worst top-20 logit difference {worst}");
    assert_eq!(agree, total, "top-1 must agree at every position");
    assert!(worst < 1e-2, "worst top-20 logit difference {worst}");
}

/// An f16 KV cache (llama.cpp's default) on f32 weights: each key and value rounded to
/// f16 once moves the logits by far less than bf16 weights do.
#[test]
fn f32_logits_with_an_f16_kv_cache_match_transformers() {
    let mut model = load(DType::F32);
    model.kv_dtype = KvDType::F16;
    assert_eq!(model.new_cache().dtype(), KvDType::F16);
    let (agree, total, worst) = check_logits(&model);
    eprintln!("f32, f16 KV cache: top-1 {agree}/{total}, worst top-20 logit difference {worst}");
    assert_eq!(agree, total, "top-1 must agree at every position");
    assert!(worst < 0.05, "worst top-20 logit difference {worst}");
    assert!(worst > 1e-4, "{worst}: the cache did not round to f16");
}

#[test]
fn bf16_logits_agreement_reported() {
    let model = load(DType::BF16);
    let (agree, total, worst) = check_logits(&model);
    eprintln!("bf16: top-1 {agree}/{total}, worst top-20 logit difference {worst}");
    assert!(
        agree * 10 >= total * 9,
        "bf16 top-1 agreement {agree}/{total}"
    );
}

#[test]
fn f32_greedy_continuations_identical() {
    let model = load(DType::F32);
    let r = common::reference();
    let vocab = model.config.vocab_size;
    let pad = 2; // tokenizer.ggml.padding_token_id of the default model (<|im_end|>)
    for case in r["forward"].as_array().unwrap() {
        // The fixture's continuations come from transformers' `generate`, which, given no
        // attention mask, masks every prompt token equal to the pad id and derives
        // positions from the mask: for the chat prompt that removes its `<|im_end|>`.
        // Reproduce that input exactly (the logits fixture above is unmasked).
        let ids: Vec<u32> = common::ids(&case["ids"])
            .into_iter()
            .filter(|&t| t != pad)
            .collect();
        let want = common::ids(&case["greedy_continuation"]);
        let mut cache = model.new_cache();
        let mut logits = model.forward(&ids, &mut cache, Logits::Last, None).unwrap();
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let next = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            got.push(next);
            logits = model
                .forward(&[next], &mut cache, Logits::Last, None)
                .unwrap();
            assert_eq!(logits.len(), vocab);
        }
        assert_eq!(got, want, "greedy continuation of {:?}", case["prompt"]);
    }
}

//! The dense engine end to end: perplexity on GPL-3 against the reference, the HuggingFace
//! checkpoint of the same weights against the GGUF path, and KV-cached decoding against
//! recomputing the whole sequence.

mod common;

use sparsellm::eval;
use sparsellm::kernels::pool;
use sparsellm::loader;
use sparsellm::model::{Llama, Logits};
use sparsellm::tensor::DType;

fn load(path: &std::path::Path, dtype: DType) -> Llama {
    let src = loader::open(path).expect("open model");
    Llama::load(src.as_ref(), dtype, pool::global()).expect("load model")
}

fn gpl3_ids() -> Vec<u32> {
    common::ids(&common::reference()["perplexity"]["ids"])
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b
}

#[test]
fn perplexity_f32_within_0_1_percent_and_bf16_within_1_percent() {
    let r = common::reference();
    let want_all = r["perplexity"]["all_tokens"]["ppl"].as_f64().unwrap();
    let want_half = r["perplexity"]["second_half"]["ppl"].as_f64().unwrap();
    let ids = gpl3_ids();
    for (dtype, tol) in [(DType::F32, 1e-3), (DType::BF16, 1e-2)] {
        let model = load(&common::model_path(), dtype);
        let rep = eval::perplexity(&model, &ids, 512, None, |_, _| {}).unwrap();
        eprintln!(
            "{}: {} windows, ppl_all {:.4} (ref {want_all}), ppl_second_half {:.4} (ref {want_half})",
            dtype.name(),
            rep.windows,
            rep.ppl_all,
            rep.ppl_second_half
        );
        assert_eq!(rep.windows, 14);
        assert!(
            rel(rep.ppl_all, want_all) < tol,
            "{}: ppl_all {}",
            dtype.name(),
            rep.ppl_all
        );
        assert!(
            rel(rep.ppl_second_half, want_half) < tol,
            "{}: ppl_second_half {}",
            dtype.name(),
            rep.ppl_second_half
        );
    }
}

/// (largest |a - b| over all logits of the reference prompts, positions whose argmax
/// differs).
fn compare_logits(a: &Llama, b: &Llama) -> (f32, usize) {
    let (mut worst, mut argmax_diff) = (0f32, 0);
    let vocab = a.config.vocab_size;
    for case in common::reference()["forward"].as_array().unwrap() {
        let ids = common::ids(&case["ids"]);
        let la = a
            .forward(&ids, &mut a.new_cache(), Logits::All, None)
            .unwrap();
        let lb = b
            .forward(&ids, &mut b.new_cache(), Logits::All, None)
            .unwrap();
        for (x, y) in la.iter().zip(&lb) {
            worst = worst.max((x - y).abs());
        }
        for (ra, rb) in la.chunks(vocab).zip(lb.chunks(vocab)) {
            argmax_diff +=
                (sparsellm::generate::argmax(ra) != sparsellm::generate::argmax(rb)) as usize;
        }
    }
    (worst, argmax_diff)
}

#[test]
fn hf_checkpoint_gives_the_gguf_logits() {
    let gguf = common::model_path();
    // f32: same weights, the HF file with un-permuted q/k rows and rotate-half RoPE.
    let hf32 = load(&common::hf_checkpoint("f32"), DType::F32);
    assert!(
        hf32.embed_tokens.is_mapped(),
        "an f32 safetensors file is memory-mapped, not copied"
    );
    let (d, flips) = compare_logits(&hf32, &load(&gguf, DType::F32));
    eprintln!("HF f32 vs GGUF f32: max logit difference {d}, argmax differs at {flips} positions");
    assert!(d < 1e-3, "HF f32 vs GGUF f32: {d}");
    assert_eq!(flips, 0);
    drop(hf32);
    // bf16: the weights are bit-identical (the script rounds to nearest even, as our
    // GGUF-to-bf16 conversion does), but on AVX-512 BF16 CPUs the activations are rounded
    // to bf16 before each product, which turns the tiny differences of summation order
    // (the two RoPE layouts permute the dot products) into differences of bf16 rounding:
    // compare as bf16 results, argmax everywhere and logits within the bf16-vs-f32 spread.
    let hf16 = load(&common::hf_checkpoint("bf16"), DType::BF16);
    assert!(
        hf16.embed_tokens.is_mapped(),
        "a bf16 safetensors file is memory-mapped, not copied"
    );
    let (d, flips) = compare_logits(&hf16, &load(&gguf, DType::BF16));
    eprintln!(
        "HF bf16 vs GGUF bf16: max logit difference {d}, argmax differs at {flips} positions"
    );
    assert!(d < 0.5, "HF bf16 vs GGUF bf16: {d}");
    assert_eq!(flips, 0);
}

#[test]
fn kv_cached_decoding_equals_recomputing_for_64_steps() {
    let model = load(&common::model_path(), DType::F32);
    let vocab = model.config.vocab_size;
    let mut seq = common::ids(&common::reference()["forward"][1]["ids"]);
    let mut cache = model.new_cache();
    let mut logits = model.forward(&seq, &mut cache, Logits::Last, None).unwrap();
    let mut worst = 0f32;
    for step in 0..64 {
        let next = sparsellm::generate::argmax(&logits);
        seq.push(next);
        logits = model
            .forward(&[next], &mut cache, Logits::Last, None)
            .unwrap();
        // Recompute the whole sequence from scratch at every step.
        {
            let full = model
                .forward(&seq, &mut model.new_cache(), Logits::Last, None)
                .unwrap();
            assert_eq!(full.len(), vocab);
            for (a, b) in logits.iter().zip(&full) {
                worst = worst.max((a - b).abs());
            }
            assert_eq!(
                sparsellm::generate::argmax(&full),
                sparsellm::generate::argmax(&logits),
                "step {step}"
            );
        }
    }
    eprintln!("cached vs recomputed: max logit difference {worst}");
    assert_eq!(cache.len(), seq.len());
    assert!(worst < 1e-3, "cached vs recomputed: {worst}");
}

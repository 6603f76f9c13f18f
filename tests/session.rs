//! The library's entry points for front ends (the Python bindings): a generation stopped
//! between tokens, a model loaded with a sparse setting, perplexity and the in-process
//! benchmark per setting.

mod common;

use std::ops::ControlFlow;

use sparsellm::bench;
use sparsellm::eval;
use sparsellm::generate::{self, GenerateOptions, StopReason};
use sparsellm::model::WeightLayout;
use sparsellm::session::{self, LoadedModel, SparseSettings};
use sparsellm::tensor::LoadDType;

fn load() -> LoadedModel {
    LoadedModel::load(
        Some(&common::model_path()),
        LoadDType::Native,
        None,
        WeightLayout::RowMajor,
    )
    .expect("load the default model")
}

fn settings(spec: &str) -> SparseSettings {
    SparseSettings {
        spec: spec.into(),
        ..SparseSettings::default()
    }
}

#[test]
fn a_generation_stops_within_one_token_of_a_cancel() {
    let l = load();
    let ids = l.tokenizer.encode("The capital of France is").unwrap();
    // fixed_greedy: no stop at EOS, so every run has all 12 tokens to lose.
    let opts = GenerateOptions::fixed_greedy(12);
    let full = generate::generate(&l.model, Some(&l.tokenizer), &ids, &opts, None, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(full.output_ids.len(), 12);
    for cancel_at in [1, 5] {
        let mut calls = 0;
        let g = generate::generate_interruptible(
            &l.model,
            Some(&l.tokenizer),
            &ids,
            &opts,
            None,
            |_| ControlFlow::Continue(()),
            || {
                calls += 1;
                if calls == cancel_at {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
        .unwrap();
        // Called after each token: breaking on the k-th call keeps exactly k tokens.
        assert_eq!(g.stop, StopReason::Cancelled);
        assert_eq!(g.output_ids, full.output_ids[..cancel_at]);
        assert_eq!(g.eos_id, None);
    }
}

#[test]
fn an_eos_stop_names_the_end_token() {
    let l = load();
    let prompt = l
        .render_chat(&[("user", "Reply with the single word: yes")], true)
        .unwrap();
    let ids = l.tokenizer.encode(&prompt).unwrap();
    let mut opts = GenerateOptions::fixed_greedy(64);
    opts.stop_at_eos = true;
    let g = generate::generate(&l.model, Some(&l.tokenizer), &ids, &opts, None, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(g.stop, StopReason::Eos, "{:?}", g.text);
    let eos = g.eos_id.expect("the end token");
    assert!(l.model.config.eos_token_ids.contains(&eos));
    assert!(!g.output_ids.contains(&eos));
}

#[test]
fn settings_build_the_clis_sparse_modes_and_perplexity_matches_eval() {
    let l = load();
    assert!(settings("off").build(&l.model).unwrap().is_none());
    let sp = settings("density:0.5")
        .build(&l.model)
        .unwrap()
        .expect("sparse");
    assert!(sp.as_mlp().is_some());
    let text = std::fs::read_to_string(common::repo_root().join("LICENSE-MIT")).unwrap();
    let ids = l.tokenizer.encode(&text).unwrap();
    let dense = session::perplexity(&l.model, &ids, 64, &settings("off"), |_, _| {}).unwrap();
    let want = eval::perplexity(&l.model, &ids, 64, None, |_, _| {}).unwrap();
    assert_eq!(dense.report.ppl_all, want.ppl_all);
    assert!(dense.density.is_none() && dense.report.kl_vs_dense.is_none());
    let sparse = session::perplexity(
        &l.model,
        &ids[..96],
        32,
        &settings("density:0.5"),
        |_, _| {},
    )
    .unwrap();
    let d = sparse.density.expect("density");
    assert!((0.45..0.55).contains(&d), "{d}");
    assert!(sparse.report.kl_vs_dense.unwrap() > 0.0);
    assert_eq!(sparse.scorer.as_deref(), Some("exact"));
}

#[test]
fn the_in_process_benchmark_reports_both_modes() {
    let l = load();
    let ids = l
        .tokenizer
        .encode("Once upon a time, in a land far away")
        .unwrap();
    let mut sp = settings("density:0.5").build(&l.model).unwrap();
    let (dense, sparse) = bench::interleaved(&l.model, &ids, 4, 2, 0, sp.as_mut()).unwrap();
    let sparse = sparse.expect("a sparse report");
    assert_eq!(dense.mlp_density, 1.0);
    assert!((0.4..0.6).contains(&sparse.mlp_density));
    assert!(dense.decode_tok_s.min > 0.0 && dense.decode_tok_s.min <= dense.decode_tok_s.max);
    assert!(bench::interleaved(&l.model, &ids, 4, 0, 0, None).is_err());
}

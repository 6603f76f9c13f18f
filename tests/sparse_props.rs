//! Property tests of the sparse MLP's pieces: the weight cache always equals its mask, and
//! the threshold rules keep what their definitions say.

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use sparsellm::kernels::WeightView;
use sparsellm::sparse::threshold::{SelectScratch, Threshold, top_k_count};
use sparsellm::sparse::weight_cache::{CacheSource, UpdateStrategy, WeightCache, down_t_dtype};
use sparsellm::tensor::{DType, Matrix};

fn matrix(rows: usize, cols: usize, seed: u64, dtype: DType) -> Matrix {
    let v = sparsellm::kernels::test_data::data(rows * cols, seed);
    let v: Vec<f32> = v.into_iter().map(|v| v * 0.5).collect();
    Matrix::from_f32(&v, rows, cols, dtype)
}

/// Row `r` of a view at element offset `start`, as raw bits (exact comparison).
fn bits(v: WeightView<'_>, start: usize, len: usize) -> Vec<u32> {
    match v {
        WeightView::F32(w) => w[start..start + len].iter().map(|x| x.to_bits()).collect(),
        WeightView::Bf16(w) | WeightView::F16(w) => {
            w[start..start + len].iter().map(|&x| x as u32).collect()
        }
        WeightView::Quant(f, w) => {
            let (b0, b1) = (
                start / 32 * f.block_bytes(),
                (start + len) / 32 * f.block_bytes(),
            );
            w[b0..b1].iter().map(|&x| x as u32).collect()
        }
    }
}

fn check_cache(c: &WeightCache, src: &CacheSource<'_>, mask: &[u32], inter: usize) {
    let h = src.hidden;
    assert_eq!(c.len(), mask.len(), "len == popcount");
    let mut seen = vec![false; inter];
    for (s, &n) in c.neurons().iter().enumerate() {
        assert!(!seen[n as usize], "neuron {n} in two slots");
        seen[n as usize] = true;
        assert_eq!(c.slot_of(n as usize), Some(s), "slot map inverse");
    }
    for (n, &cached) in seen.iter().enumerate() {
        let want = mask.binary_search(&(n as u32)).is_ok();
        assert_eq!(
            cached, want,
            "neuron {n} cached = {cached} but in mask = {want}"
        );
        assert_eq!(c.slot_of(n).is_some(), want);
    }
    let (dv, ds) = c.down();
    let (gv, gs) = c.gate_up();
    for (s, &n) in c.neurons().iter().enumerate() {
        let n = n as usize;
        assert_eq!(
            bits(dv, s * ds, h),
            bits(src.down_t, n * h, h),
            "down row of {n}"
        );
        if c.has_gate_up() {
            assert_eq!(
                bits(gv, s * gs, h),
                bits(src.gate, n * h, h),
                "gate row of {n}"
            );
            assert_eq!(
                bits(gv, s * gs + h, h),
                bits(src.up, n * h, h),
                "up row of {n}"
            );
        }
    }
}

fn density() -> impl Strategy<Value = f64> {
    prop_oneof![Just(0.0), Just(1.0), 0.0..=1.0f64]
}

proptest! {
    // A failing case is kept under target/, not as tests/*.proptest-regressions in the tree.
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/proptest-regressions/sparse_props.txt"
        )))),
        ..ProptestConfig::with_cases(200)
    })]

    #[test]
    fn cache_always_holds_exactly_the_mask(
        hidden in 1usize..24,
        inter in 1usize..150,
        dtype in 0usize..5,
        with_gate_up in any::<bool>(),
        strategy in 0usize..3,
        steps in prop::collection::vec((density(), any::<u64>()), 1..16),
    ) {
        let dtype = [DType::F32, DType::BF16, DType::F16, DType::Q4_1, DType::Q8_0][dtype];
        // Quantized rows are whole 32-element blocks.
        let hidden = if dtype.block_elems() > 1 { 32 * (1 + hidden % 3) } else { hidden };
        let gate = matrix(inter, hidden, 1, dtype);
        let up = matrix(inter, hidden, 2, dtype);
        let down_t = matrix(inter, hidden, 3, down_t_dtype(dtype));
        let src = CacheSource { gate: gate.view(), up: up.view(), down_t: down_t.view(), hidden };
        let strategy = [UpdateStrategy::Paired, UpdateStrategy::RemoveThenAppend, UpdateStrategy::Rebuild][strategy];
        let mut cache = WeightCache::new(hidden, inter, dtype, with_gate_up);
        let mut max_len = 0;
        for (d, seed) in steps {
            // A random mask of density about d (exactly empty at 0, full at 1).
            let mut s = seed | 1;
            let mask: Vec<u32> = (0..inter as u32)
                .filter(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    ((s >> 11) as f64 / (1u64 << 53) as f64) < d
                })
                .collect();
            cache.update_with(&src, &mask, strategy);
            check_cache(&cache, &src, &mask, inter);
            max_len = max_len.max(mask.len());
            prop_assert!(cache.capacity() >= max_len, "capacity never drops below what was needed");
        }
    }

    #[test]
    fn sigma_equals_naive_two_pass(
        scores in prop::collection::vec(-100.0f32..100.0, 0..600),
        k in -4.0f64..4.0,
    ) {
        let n = scores.len() as f64;
        let mean = scores.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = scores.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let t = mean + k * var.sqrt();
        let mut out = Vec::new();
        Threshold::Sigma(k).select(&scores, None, &mut SelectScratch::default(), &mut out);
        for (i, &v) in scores.iter().enumerate() {
            // Values within rounding of the cut may fall either way.
            if ((v as f64) - t).abs() <= 1e-9 * (1.0 + t.abs()) {
                continue;
            }
            prop_assert_eq!(out.binary_search(&(i as u32)).is_ok(), v as f64 > t, "score {} vs cut {}", v, t);
        }
    }

    #[test]
    fn density_keeps_exactly_ceil_dn_top_scores(
        scores in prop::collection::vec(prop_oneof![-5.0f32..5.0, Just(1.0f32)], 0..700),
        d in density(),
    ) {
        let mut out = Vec::new();
        Threshold::Density(d).select(&scores, None, &mut SelectScratch::default(), &mut out);
        let k = (d * scores.len() as f64 - 1e-9).ceil().max(0.0) as usize;
        prop_assert_eq!(out.len(), k.min(scores.len()));
        prop_assert_eq!(out.len(), top_k_count(d, scores.len()));
        prop_assert!(out.windows(2).all(|w| w[0] < w[1]), "ascending, distinct");
        let kept_min = out.iter().map(|&i| scores[i as usize]).fold(f32::INFINITY, f32::min);
        for (i, &v) in scores.iter().enumerate() {
            if out.binary_search(&(i as u32)).is_err() {
                prop_assert!(v <= kept_min, "dropped {} above kept {}", v, kept_min);
            }
        }
    }
}

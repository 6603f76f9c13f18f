//! Criterion mirrors of the sparse MLP component benchmarks (`sparsellm::sparse::bench`):
//! threshold rules, cache update strategies, cached vs gather vs dense MLP, predictor cost.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use sparsellm::kernels::sparse::{Activation, Items, Strided, sparse_mlp};
use sparsellm::kernels::{matvec, ops, pool};
use sparsellm::sparse::bench::{
    CACHE_UPDATE_CASES, LLAMA_32_1B, SMOLLM2_135M, mask_sequence, random_matrix,
};
use sparsellm::sparse::mlp::transpose_matrix;
use sparsellm::sparse::predictor::{Predictor, PredictorScratch};
use sparsellm::sparse::threshold::{SelectScratch, Threshold};
use sparsellm::sparse::weight_cache::{CacheSource, UpdateStrategy, WeightCache};
use sparsellm::tensor::DType;

fn thresholds(c: &mut Criterion) {
    let mut g = c.benchmark_group("threshold");
    for n in [1536usize, 8192] {
        let scores: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 * 0.001).collect();
        let mut out = Vec::new();
        let mut scratch = SelectScratch::default();
        g.bench_with_input(BenchmarkId::new("sigma", n), &n, |b, _| {
            b.iter(|| Threshold::Sigma(1.0).select(&scores, None, &mut scratch, &mut out))
        });
        g.bench_with_input(BenchmarkId::new("density_select_nth", n), &n, |b, _| {
            b.iter(|| Threshold::Density(0.25).select(&scores, None, &mut scratch, &mut out))
        });
        let mut sorted = scores.clone();
        g.bench_with_input(BenchmarkId::new("quantile_by_sort", n), &n, |b, _| {
            b.iter(|| {
                sorted.copy_from_slice(&scores);
                sorted.sort_unstable_by(|a, b| b.total_cmp(a));
                sorted[n / 4]
            })
        });
    }
    g.finish();
}

fn cache_update(c: &mut Criterion) {
    let (hidden, inter) = SMOLLM2_135M;
    let dtype = DType::F32;
    let gate = random_matrix(inter, hidden, dtype, 1);
    let up = random_matrix(inter, hidden, dtype, 2);
    let down_t = random_matrix(inter, hidden, dtype, 3);
    let src = CacheSource {
        gate: gate.view(),
        up: up.view(),
        down_t: down_t.view(),
        hidden,
    };
    let mut g = c.benchmark_group("cache_update");
    for (density, churn) in CACHE_UPDATE_CASES {
        let masks = mask_sequence(inter, density, churn, 64, 7);
        for (name, s) in [
            ("paired", UpdateStrategy::Paired),
            ("remove_then_append", UpdateStrategy::RemoveThenAppend),
            ("rebuild", UpdateStrategy::Rebuild),
        ] {
            let mut cache = WeightCache::new(hidden, inter, dtype, true);
            let mut i = 0;
            g.bench_function(
                BenchmarkId::new(name, format!("d{density}_churn{churn}")),
                |b| {
                    b.iter(|| {
                        cache.update_with(&src, &masks[i % masks.len()], s);
                        i += 1;
                    })
                },
            );
        }
    }
    g.finish();
}

fn sparse_mlp_kernels(c: &mut Criterion) {
    let pool = pool::global();
    let mut g = c.benchmark_group("sparse_mlp");
    g.sample_size(20);
    for (shape_name, (hidden, inter)) in [("smollm2", SMOLLM2_135M), ("llama1b", LLAMA_32_1B)] {
        for dtype in [DType::F32, DType::BF16] {
            let gate = random_matrix(inter, hidden, dtype, 1);
            let up = random_matrix(inter, hidden, dtype, 2);
            let down = random_matrix(hidden, inter, dtype, 3);
            let down_t = transpose_matrix(&down, dtype);
            let h = vec![0.5f32; hidden];
            let mut out = vec![0f32; hidden];
            let mut acc = Vec::new();
            let id = |what: &str, d: f64| {
                BenchmarkId::new(format!("{shape_name}/{}/{what}", dtype.name()), d)
            };
            let (mut gg, mut uu) = (vec![0f32; inter], vec![0f32; inter]);
            g.bench_function(id("dense", 1.0), |b| {
                b.iter(|| {
                    matvec(pool, gate.view(), inter, hidden, &h, &mut gg);
                    matvec(pool, up.view(), inter, hidden, &h, &mut uu);
                    ops::silu_mul(&mut gg, &uu);
                    matvec(pool, down.view(), hidden, inter, &gg, &mut out);
                })
            });
            for d in [0.05, 0.1, 0.25, 0.5, 1.0] {
                let mask = &mask_sequence(inter, d, 0.0, 1, 11)[0];
                let src = CacheSource {
                    gate: gate.view(),
                    up: up.view(),
                    down_t: down_t.view(),
                    hidden,
                };
                let mut cache = WeightCache::new(hidden, inter, dtype, true);
                cache.update(&src, mask);
                g.bench_function(id("cached", d), |b| {
                    b.iter(|| {
                        let act = cache.activation();
                        let dn = cache.down_rows();
                        sparse_mlp(
                            pool,
                            Items::Slots(cache.len()),
                            act,
                            dn,
                            &h,
                            &mut out,
                            &mut acc,
                        )
                    })
                });
                g.bench_function(id("gather", d), |b| {
                    b.iter(|| {
                        let act = Activation::Compute {
                            gate: Strided::matrix(gate.view(), hidden),
                            up: Strided::matrix(up.view(), hidden),
                        };
                        let dn = Strided::matrix(down_t.view(), hidden);
                        sparse_mlp(pool, Items::Gather(mask), act, dn, &h, &mut out, &mut acc)
                    })
                });
            }
        }
    }
    g.finish();
}

fn predictor(c: &mut Criterion) {
    let pool = pool::global();
    let (hidden, inter) = SMOLLM2_135M;
    let h = vec![0.5f32; hidden];
    let mut out = vec![0f32; inter];
    let mut scratch = PredictorScratch::default();
    let mut g = c.benchmark_group("predictor");
    for rank in [64, 128, 256] {
        let p = Predictor::random_shape(hidden, inter, 1, rank, 3);
        g.bench_with_input(BenchmarkId::from_parameter(rank), &rank, |b, _| {
            b.iter(|| p.scores(pool, 0, &h, &mut scratch, &mut out))
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    thresholds,
    cache_update,
    sparse_mlp_kernels,
    predictor
);
criterion_main!(benches);

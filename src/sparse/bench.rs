//! Component benchmarks of the sparse MLP (threshold, cache update, sparse kernels,
//! predictor), as plain functions returning serialisable rows: `sparsellm bench
//! --components --json` prints them and `benches/sparse.rs` mirrors them under criterion.
//! Weights are random (speed only); working sets are sized past the last-level cache so
//! the numbers are memory-bound as in real decoding.

use std::time::Instant;

use serde::Serialize;

use crate::kernels::sparse::{Activation, Items, Strided, sparse_mlp};
use crate::kernels::{ThreadPool, matvec, ops};
use crate::sparse::predictor::{Predictor, PredictorScratch, Rng};
use crate::sparse::threshold::{SelectScratch, Threshold, mean_std};
use crate::sparse::weight_cache::{CacheSource, UpdateStrategy, WeightCache};
use crate::tensor::{DType, Matrix};

/// Model shapes (hidden, intermediate) the benchmarks run at.
pub const SMOLLM2_135M: (usize, usize) = (576, 1536);
pub const LLAMA_32_1B: (usize, usize) = (2048, 8192);

/// (density, churn) of the cache update benchmark: low churns, and the churn measured
/// between consecutive tokens of real text (SmolLM2-135M on the first 12 kB of GPL-3,
/// `sparsellm eval --text FILE --sparsity density:D --json` reports it as `mask_churn`):
/// 0.63 at density 0.25 and 0.44 at 0.5 with exact scores, 0.094 at `calibrated`
/// (density 0.87, rank-128 predictor).
pub const CACHE_UPDATE_CASES: [(f64, f64); 5] = [
    (0.25, 0.05),
    (0.25, 0.2),
    (0.25, 0.63),
    (0.5, 0.44),
    (0.87, 0.094),
];

/// Densities of the sparse MLP table.
pub const DENSITIES: [f64; 5] = [0.05, 0.1, 0.25, 0.5, 1.0];

/// Bytes of weights the kernels cycle through, so that nothing stays in a 32 MiB L3.
const WORKING_SET: usize = 96 << 20;

/// Median of `runs` timings of `f`, in milliseconds (after one warm-up call).
pub fn time_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

#[derive(Debug, Clone, Serialize)]
pub struct ThresholdRow {
    pub n: usize,
    /// One-pass mean/std and the filter (`sigma:1`).
    pub sigma_us: f64,
    /// Exact top-k by select_nth (`density:0.25`).
    pub density_us: f64,
    /// The same cut by sorting all scores and reading the quantile.
    pub sort_quantile_us: f64,
}

/// One-pass sigma vs select_nth top-k vs a full sort, on `n` random scores.
pub fn threshold(n: usize, runs: usize) -> ThresholdRow {
    let scores: Vec<f32> = Rng::new(n as u64)
        .vec(n, 1.0)
        .iter()
        .map(|v| v.abs())
        .collect();
    let mut out = Vec::with_capacity(n);
    let mut scratch = SelectScratch::default();
    let reps = 100;
    let per = |ms: f64| ms * 1e3 / reps as f64;
    let sigma_us = per(time_ms(runs, || {
        for _ in 0..reps {
            Threshold::Sigma(1.0).select(&scores, None, &mut scratch, &mut out);
        }
    }));
    let density_us = per(time_ms(runs, || {
        for _ in 0..reps {
            Threshold::Density(0.25).select(&scores, None, &mut scratch, &mut out);
        }
    }));
    let mut sorted = scores.clone();
    let sort_quantile_us = per(time_ms(runs, || {
        for _ in 0..reps {
            sorted.copy_from_slice(&scores);
            sorted.sort_unstable_by(|a, b| b.total_cmp(a));
            let t = sorted[n / 4];
            out.clear();
            out.extend((0..n as u32).filter(|&i| scores[i as usize] >= t));
        }
    }));
    let _ = mean_std(&scores);
    ThresholdRow {
        n,
        sigma_us,
        density_us,
        sort_quantile_us,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CacheUpdateRow {
    pub hidden: usize,
    pub intermediate: usize,
    pub dtype: &'static str,
    pub density: f64,
    /// Fraction of the mask replaced per token.
    pub churn: f64,
    pub paired_us: f64,
    pub remove_then_append_us: f64,
    pub rebuild_us: f64,
    /// Neuron row sets copied per token by each strategy.
    pub paired_rows: f64,
    pub remove_then_append_rows: f64,
    pub rebuild_rows: f64,
}

/// A random mask sequence: `k` neurons, of which `churn·k` distinct ones are replaced by
/// inactive neurons every step, so `churn` is the fraction of a mask that was not in the
/// previous one (what `SparseMlp::churn` and `eval --json`'s `mask_churn` measure).
pub fn mask_sequence(
    inter: usize,
    density: f64,
    churn: f64,
    steps: usize,
    seed: u64,
) -> Vec<Vec<u32>> {
    let mut rng = Rng::new(seed);
    let mut rand = |n: usize| ((rng.next_f32() + 1.0) * 0.5 * n as f32) as usize % n.max(1);
    let k = crate::sparse::threshold::top_k_count(density, inter);
    let mut on = vec![false; inter];
    let mut cur: Vec<u32> = Vec::new();
    while cur.len() < k {
        let i = rand(inter);
        if !on[i] {
            on[i] = true;
            cur.push(i as u32);
        }
    }
    let mut seq = Vec::with_capacity(steps);
    for _ in 0..steps {
        let change = ((churn * k as f64).round() as usize).min(inter - k).min(k);
        // The first `change` positions of a partial shuffle of the mask leave it; each is
        // replaced by a neuron inactive at the previous step.
        let was_on = on.clone();
        for j in 0..change {
            let pick = j + rand(k - j);
            cur.swap(j, pick);
            let mut n = rand(inter);
            while on[n] || was_on[n] {
                n = (n + 1) % inter;
            }
            on[cur[j] as usize] = false;
            on[n] = true;
            cur[j] = n as u32;
        }
        let mut m = cur.clone();
        m.sort_unstable();
        seq.push(m);
    }
    seq
}

/// Random `[rows, cols]` weights in `dtype`.
pub fn random_matrix(rows: usize, cols: usize, dtype: DType, seed: u64) -> Matrix {
    let scale = (3.0 / cols as f32).sqrt();
    Matrix::from_f32(&Rng::new(seed).vec(rows * cols, scale), rows, cols, dtype)
}

/// Paired replacement vs remove-then-append vs full rebuild over a mask sequence.
pub fn cache_update(
    shape: (usize, usize),
    dtype: DType,
    density: f64,
    churn: f64,
    steps: usize,
) -> CacheUpdateRow {
    let (hidden, inter) = shape;
    let gate = random_matrix(inter, hidden, dtype, 1);
    let up = random_matrix(inter, hidden, dtype, 2);
    let down_t = random_matrix(inter, hidden, dtype, 3);
    let src = CacheSource {
        gate: gate.view(),
        up: up.view(),
        down_t: down_t.view(),
        hidden,
    };
    let masks = mask_sequence(inter, density, churn, steps + 1, 7);
    let run = |strategy| {
        let mut c = WeightCache::new(hidden, inter, dtype, true);
        c.update_with(&src, &masks[0], UpdateStrategy::Rebuild);
        let before = c.rows_copied;
        let start = Instant::now();
        for m in &masks[1..] {
            c.update_with(&src, m, strategy);
        }
        let us = start.elapsed().as_secs_f64() * 1e6 / steps as f64;
        (us, (c.rows_copied - before) as f64 / steps as f64)
    };
    let (paired_us, paired_rows) = run(UpdateStrategy::Paired);
    let (remove_then_append_us, remove_then_append_rows) = run(UpdateStrategy::RemoveThenAppend);
    let (rebuild_us, rebuild_rows) = run(UpdateStrategy::Rebuild);
    CacheUpdateRow {
        hidden,
        intermediate: inter,
        dtype: dtype.name(),
        density,
        churn,
        paired_us,
        remove_then_append_us,
        rebuild_us,
        paired_rows,
        remove_then_append_rows,
        rebuild_rows,
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SparseMlpRow {
    pub hidden: usize,
    pub intermediate: usize,
    pub dtype: &'static str,
    pub threads: usize,
    pub density: f64,
    /// Sparse MLP over cached compact rows (cache already holding the mask).
    pub cached_ms: f64,
    /// Sparse MLP gathering rows by index from the full matrices.
    pub gather_ms: f64,
    /// The dense MLP (three matvecs).
    pub dense_ms: f64,
    /// Weight bytes read per second by each.
    pub cached_gb_s: f64,
    pub gather_gb_s: f64,
    pub dense_gb_s: f64,
}

/// One layer's random weights for the kernel benchmark.
struct BenchLayer {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
    down_t: crate::sparse::weight_cache::HugeMatrix,
}

impl BenchLayer {
    fn source(&self, hidden: usize) -> CacheSource<'_> {
        CacheSource {
            gate: self.gate.view(),
            up: self.up.view(),
            down_t: self.down_t.view(),
            hidden,
        }
    }
}

/// Distinct masks the gather benchmark rotates through, so that the rows one pass reads
/// are mostly not the rows the previous pass left in the cache (as in decoding, where all
/// the other layers run between two visits of a layer).
const GATHER_MASKS: usize = 16;

/// Cached vs gather vs dense MLP (one token) at each density, random weights of `shape`.
///
/// Every variant streams more bytes per pass than the last-level cache holds: the dense
/// MLP cycles through `WORKING_SET` bytes of layers; the cached variant through enough
/// caches (each filled from one of those layers with its own mask) that their compact
/// rows alone exceed `WORKING_SET`; the gather variant rotates masks. Otherwise a
/// low-density cache would be timed from L3, faster than any real decode can read it.
pub fn sparse_mlp_table(
    pool: &ThreadPool,
    shape: (usize, usize),
    dtype: DType,
    densities: &[f64],
    runs: usize,
) -> Vec<SparseMlpRow> {
    let (hidden, inter) = shape;
    let layer_bytes = dtype.bytes_for(3 * hidden * inter);
    let nl = WORKING_SET.div_ceil(layer_bytes).max(1);
    let layers: Vec<BenchLayer> = (0..nl as u64)
        .map(|l| {
            let down = random_matrix(hidden, inter, dtype, 10 * l + 3);
            BenchLayer {
                gate: random_matrix(inter, hidden, dtype, 10 * l + 1),
                up: random_matrix(inter, hidden, dtype, 10 * l + 2),
                down_t: crate::sparse::mlp::transpose_matrix(&down, dtype),
                down,
            }
        })
        .collect();
    let h = Rng::new(5).vec(hidden, 1.0);
    let mut out = vec![0f32; hidden];
    let mut acc: Vec<f32> = Vec::new();
    let (mut g, mut u) = (vec![0f32; inter], vec![0f32; inter]);
    let gbs = |bytes: usize, ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
    let dense_ms = time_ms(runs, || {
        for l in &layers {
            matvec(pool, l.gate.view(), inter, hidden, &h, &mut g);
            matvec(pool, l.up.view(), inter, hidden, &h, &mut u);
            ops::silu_mul(&mut g, &u);
            matvec(pool, l.down.view(), hidden, inter, &g, &mut out);
        }
    }) / nl as f64;
    densities
        .iter()
        .map(|&d| {
            let masks: Vec<Vec<u32>> = (0..GATHER_MASKS as u64)
                .map(|s| mask_sequence(inter, d, 0.0, 1, 11 + s).remove(0))
                .collect();
            let sparse_bytes = dtype.bytes_for(masks[0].len() * 3 * hidden);
            let n_caches = WORKING_SET.div_ceil(sparse_bytes.max(1)).max(nl);
            let caches: Vec<WeightCache> = (0..n_caches)
                .map(|c| {
                    let mut cache = WeightCache::new(hidden, inter, dtype, true);
                    let mask = &masks[c % GATHER_MASKS];
                    cache.update(&layers[c % nl].source(hidden), mask);
                    cache
                })
                .collect();
            let cached_ms = time_ms(runs, || {
                for cache in &caches {
                    sparse_mlp(
                        pool,
                        Items::Slots(cache.len()),
                        cache.activation(),
                        cache.down_rows(),
                        &h,
                        &mut out,
                        &mut acc,
                    );
                }
            }) / n_caches as f64;
            drop(caches);
            let mut pass = 0;
            let gather_ms = time_ms(runs, || {
                pass += 1;
                for (i, l) in layers.iter().enumerate() {
                    let act = Activation::Compute {
                        gate: Strided::matrix(l.gate.view(), hidden),
                        up: Strided::matrix(l.up.view(), hidden),
                    };
                    let down = Strided::matrix(l.down_t.view(), hidden);
                    let mask = &masks[(i + pass) % GATHER_MASKS];
                    sparse_mlp(pool, Items::Gather(mask), act, down, &h, &mut out, &mut acc);
                }
            }) / nl as f64;
            SparseMlpRow {
                hidden,
                intermediate: inter,
                dtype: dtype.name(),
                threads: pool.threads(),
                density: d,
                cached_ms,
                gather_ms,
                dense_ms,
                cached_gb_s: gbs(sparse_bytes, cached_ms),
                gather_gb_s: gbs(sparse_bytes, gather_ms),
                dense_gb_s: gbs(layer_bytes, dense_ms),
            }
        })
        .collect()
}

#[derive(Debug, Clone, Serialize)]
pub struct PredictorRow {
    pub hidden: usize,
    pub intermediate: usize,
    pub dtype: &'static str,
    pub rank: usize,
    /// One layer's scores (gate and up predictors), milliseconds.
    pub ms: f64,
    /// Bytes the predictor reads per layer (in `dtype`), and that as a fraction of the
    /// dense MLP's bytes at the same dtype.
    pub bytes: usize,
    pub fraction_of_mlp: f64,
}

/// Predictor cost per rank (gate and up predictors, in `dtype` as a sparse MLP keeps them).
pub fn predictor(
    pool: &ThreadPool,
    shape: (usize, usize),
    dtype: DType,
    ranks: &[usize],
    runs: usize,
) -> Vec<PredictorRow> {
    let (hidden, inter) = shape;
    let h = Rng::new(9).vec(hidden, 1.0);
    let mut out = vec![0f32; inter];
    let mut scratch = PredictorScratch::default();
    ranks
        .iter()
        .map(|&rank| {
            let per_layer = dtype.bytes_for(2 * rank * (hidden + inter));
            let nl = WORKING_SET.div_ceil(per_layer).clamp(1, 64);
            let mut p = Predictor::random_shape(hidden, inter, nl, rank, 3);
            p.convert_to(dtype);
            let ms = time_ms(runs, || {
                for l in 0..nl {
                    p.scores(pool, l, &h, &mut scratch, &mut out);
                }
            }) / nl as f64;
            PredictorRow {
                hidden,
                intermediate: inter,
                dtype: dtype.name(),
                rank,
                ms,
                bytes: per_layer,
                fraction_of_mlp: per_layer as f64 / dtype.bytes_for(3 * hidden * inter) as f64,
            }
        })
        .collect()
}

/// Everything `sparsellm bench --components` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ComponentReport {
    pub threshold: Vec<ThresholdRow>,
    pub cache_update: Vec<CacheUpdateRow>,
    pub sparse_mlp: Vec<SparseMlpRow>,
    pub predictor: Vec<PredictorRow>,
}

/// Runs every component benchmark at both shapes (f32 and bf16 for the sparse MLP).
pub fn components(pool: &ThreadPool, runs: usize) -> ComponentReport {
    let mut sparse = Vec::new();
    for shape in [SMOLLM2_135M, LLAMA_32_1B] {
        for dtype in [DType::F32, DType::BF16] {
            sparse.extend(sparse_mlp_table(pool, shape, dtype, &DENSITIES, runs));
        }
    }
    ComponentReport {
        threshold: [1536, 8192].iter().map(|&n| threshold(n, runs)).collect(),
        cache_update: CACHE_UPDATE_CASES
            .iter()
            .map(|&(density, churn)| cache_update(SMOLLM2_135M, DType::F32, density, churn, 64))
            .collect(),
        sparse_mlp: sparse,
        predictor: [DType::F32, DType::BF16]
            .into_iter()
            .flat_map(|dtype| predictor(pool, SMOLLM2_135M, dtype, &[64, 128, 256], runs))
            .collect(),
    }
}

impl ComponentReport {
    /// The report as markdown tables (what `bench --components` prints without --json).
    pub fn markdown(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Threshold, one layer's scores (µs):\n\n| neurons | sigma:1 (one pass) | density:0.25 (select_nth) | sort + quantile |\n|---|---|---|---|"
        );
        for r in &self.threshold {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {:.1} | {:.1} |",
                r.n, r.sigma_us, r.density_us, r.sort_quantile_us
            );
        }
        let _ = writeln!(
            s,
            "\nWeight cache update per token, {} (µs, rows copied):\n\n| density | churn | paired replacement | remove then append | full rebuild | rebuild / paired |\n|---|---|---|---|---|---|",
            self.cache_update.first().map_or(String::new(), |r| format!(
                "{}x{} {}",
                r.hidden, r.intermediate, r.dtype
            ))
        );
        for r in &self.cache_update {
            let _ = writeln!(
                s,
                "| {} | {} | {:.1} ({:.0}) | {:.1} ({:.0}) | {:.1} ({:.0}) | {:.2} |",
                r.density,
                r.churn,
                r.paired_us,
                r.paired_rows,
                r.remove_then_append_us,
                r.remove_then_append_rows,
                r.rebuild_us,
                r.rebuild_rows,
                r.rebuild_us / r.paired_us
            );
        }
        let _ = writeln!(
            s,
            "\nSparse MLP, one token, one layer (ms, GB/s of weights read):\n\n| shape | dtype | threads | density | cached | gather | dense | dense / cached |\n|---|---|---|---|---|---|---|---|"
        );
        for r in &self.sparse_mlp {
            let _ = writeln!(
                s,
                "| {}x{} | {} | {} | {} | {:.3} ({:.1}) | {:.3} ({:.1}) | {:.3} ({:.1}) | {:.2} |",
                r.hidden,
                r.intermediate,
                r.dtype,
                r.threads,
                r.density,
                r.cached_ms,
                r.cached_gb_s,
                r.gather_ms,
                r.gather_gb_s,
                r.dense_ms,
                r.dense_gb_s,
                r.dense_ms / r.cached_ms
            );
        }
        let _ = writeln!(
            s,
            "\nLow-rank predictor (gate and up), one layer:\n\n| shape | dtype | rank | ms | bytes | of the MLP's bytes |\n|---|---|---|---|---|---|"
        );
        for r in &self.predictor {
            let _ = writeln!(
                s,
                "| {}x{} | {} | {} | {:.3} | {} | {:.2} |",
                r.hidden, r.intermediate, r.dtype, r.rank, r.ms, r.bytes, r.fraction_of_mlp
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_has_a_row_per_measurement() {
        let pool = ThreadPool::new(1);
        let report = ComponentReport {
            threshold: vec![threshold(64, 1)],
            cache_update: vec![cache_update((32, 64), DType::F32, 0.5, 0.25, 4)],
            sparse_mlp: sparse_mlp_table(&pool, (32, 64), DType::F32, &[0.5], 1),
            predictor: predictor(&pool, (32, 64), DType::BF16, &[8], 1),
        };
        let md = report.markdown();
        for line in [
            "| 64 | ",
            "| 0.5 | 0.25 | ",
            "| 32x64 | f32 | 1 | 0.5 | ",
            "| 32x64 | bf16 | 8 | ",
        ] {
            assert!(md.contains(line), "{line:?} missing from\n{md}");
        }
        // The paired update copies at most the rows a rebuild copies.
        let c = &report.cache_update[0];
        assert!(
            c.paired_rows <= c.rebuild_rows && c.rebuild_rows == 32.0,
            "{c:?}"
        );
    }
}

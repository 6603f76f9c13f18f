//! Decode-shaped timings of the sparse MLP's parts at the Llama-3.2-1B shape, bf16 (ignored
//! by default: a benchmark; `cargo test --release --test sparse_probe -- --ignored
//! --nocapture`).

use sparsellm::sparse::bench;
use sparsellm::tensor::DType;

#[test]
#[ignore]
fn llama_1b_bf16_parts() {
    let pool = sparsellm::kernels::pool::global();
    let runs = 7;
    let rows = bench::sparse_mlp_table(pool, bench::LLAMA_32_1B, DType::BF16, &[0.25, 1.0], runs);
    println!("{}", serde_json::to_string_pretty(&rows).unwrap());
    let p = bench::predictor(pool, bench::LLAMA_32_1B, DType::BF16, &[128], runs);
    println!("{}", serde_json::to_string_pretty(&p).unwrap());
    let t = bench::threshold(8192, runs);
    println!("{}", serde_json::to_string_pretty(&t).unwrap());
}

/// The sparse kernel over a cache's slots: in slot order (contiguous), in mask order
/// (a permutation of the slots: what decoding does), and gathered from the full matrices.
#[test]
#[ignore]
fn llama_1b_bf16_slot_orders() {
    use sparsellm::kernels::sparse::{Activation, Items, Strided, sparse_mlp};
    use sparsellm::sparse::weight_cache::{CacheSource, WeightCache};
    let pool = sparsellm::kernels::pool::global();
    let (hidden, inter) = bench::LLAMA_32_1B;
    let dtype = DType::BF16;
    let nl = 4;
    struct L {
        gate: sparsellm::tensor::Matrix,
        up: sparsellm::tensor::Matrix,
        down_t: sparsellm::sparse::weight_cache::HugeMatrix,
        cache: WeightCache,
        slots: Vec<u32>,
    }
    let mask = bench::mask_sequence(inter, 0.25, 0.0, 1, 11).remove(0);
    let layers: Vec<L> = (0..nl as u64)
        .map(|l| {
            let gate = bench::random_matrix(inter, hidden, dtype, 10 * l + 1);
            let up = bench::random_matrix(inter, hidden, dtype, 10 * l + 2);
            let down = bench::random_matrix(hidden, inter, dtype, 10 * l + 3);
            let down_t = sparsellm::sparse::mlp::transpose_matrix(&down, dtype);
            let mut cache = WeightCache::new(hidden, inter, dtype, true);
            // Fill in a scrambled order so mask order is a permutation of the slots.
            let mut scrambled = mask.clone();
            scrambled.reverse();
            for k in 1..=scrambled.len() {
                let src = CacheSource {
                    gate: gate.view(),
                    up: up.view(),
                    down_t: down_t.view(),
                    hidden,
                };
                let mut m = scrambled[..k].to_vec();
                m.sort_unstable();
                if k % 64 == 0 || k == scrambled.len() {
                    cache.update(&src, &m);
                }
            }
            let mut slots = Vec::new();
            cache.slots_of(&mask, &mut slots);
            L {
                gate,
                up,
                down_t,
                cache,
                slots,
            }
        })
        .collect();
    let h: Vec<f32> = (0..hidden)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let mut out = vec![0f32; hidden];
    let mut acc = Vec::new();
    for what in ["slot order", "mask order", "gather"] {
        let ms = bench::time_ms(9, || {
            for l in &layers {
                let (gv, gs) = l.cache.gate_up();
                let (dv, ds) = l.cache.down();
                let cg = Strided {
                    view: gv,
                    stride: gs,
                    offset: 0,
                };
                let cu = Strided {
                    view: gv,
                    stride: gs,
                    offset: hidden,
                };
                let cd = Strided {
                    view: dv,
                    stride: ds,
                    offset: 0,
                };
                match what {
                    "slot order" => sparse_mlp(
                        pool,
                        Items::Slots(l.cache.len()),
                        Activation::Compute { gate: cg, up: cu },
                        cd,
                        &h,
                        &mut out,
                        &mut acc,
                    ),
                    "mask order" => sparse_mlp(
                        pool,
                        Items::Gather(&l.slots),
                        Activation::Compute { gate: cg, up: cu },
                        cd,
                        &h,
                        &mut out,
                        &mut acc,
                    ),
                    _ => sparse_mlp(
                        pool,
                        Items::Gather(&mask),
                        Activation::Compute {
                            gate: Strided::matrix(l.gate.view(), hidden),
                            up: Strided::matrix(l.up.view(), hidden),
                        },
                        Strided::matrix(l.down_t.view(), hidden),
                        &h,
                        &mut out,
                        &mut acc,
                    ),
                }
            }
        }) / nl as f64;
        let gb = mask.len() as f64 * 3.0 * hidden as f64 * 2.0 / (ms * 1e-3) / 1e9;
        println!("{what}: {ms:.3} ms/layer, {gb:.1} GB/s");
    }
}

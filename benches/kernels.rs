//! Criterion benchmarks of the linear kernels: matvec (decode) and matmul with n = 128
//! tokens (prefill), f32, bf16 and GGUF-quantized (Q8_0, Q4_0, Q4_1) weights, at SmolLM2-135M's MLP shape (576 x 1536) and
//! Llama-3.2-1B/3B-like shapes (2048 x 8192, 3072 x 8192). Throughput is in bytes of
//! weights read per call, so matvec figures compare with memory bandwidth and matmul
//! figures times 128 tokens give weight-bytes x tokens per second.
//!
//! `SPARSELLM_GEMM=crate` runs the previous prefill path (the `gemm` crate) instead.

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sparsellm::kernels::dot::f32_to_bf16;
use sparsellm::kernels::test_data::data;
use sparsellm::kernels::{WeightView, matmul, matvec, pool};
use sparsellm::quant::{QFormat, quantize};

fn linear(c: &mut Criterion) {
    let pool = pool::global();
    let mut g = c.benchmark_group("linear");
    g.measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(10);
    for (rows, cols) in [(1536usize, 576usize), (8192, 2048), (8192, 3072)] {
        let wf = data(rows * cols, 1);
        let wb: Vec<u16> = wf.iter().map(|&v| f32_to_bf16(v)).collect();
        let quantized = |f: QFormat| {
            let mut b = vec![0u8; rows * cols / 32 * f.block_bytes()];
            quantize(f, &wf, &mut b);
            b
        };
        let (q8, q40, q41) = (
            quantized(QFormat::Q8_0),
            quantized(QFormat::Q4_0),
            quantized(QFormat::Q4_1),
        );
        for (dtype, w) in [
            ("f32", WeightView::F32(&wf)),
            ("bf16", WeightView::Bf16(&wb)),
            ("q8_0", WeightView::Quant(QFormat::Q8_0, &q8)),
            ("q4_0", WeightView::Quant(QFormat::Q4_0, &q40)),
            ("q4_1", WeightView::Quant(QFormat::Q4_1, &q41)),
        ] {
            g.throughput(Throughput::Bytes(w.byte_len() as u64));
            let shape = format!("{dtype}/{rows}x{cols}");
            let x = data(cols, 2);
            let mut out = vec![0f32; rows];
            g.bench_with_input(BenchmarkId::new("matvec", &shape), &(), |b, _| {
                b.iter(|| matvec(pool, w, rows, cols, &x, &mut out))
            });
            let n = 128;
            let x = data(n * cols, 3);
            let mut out = vec![0f32; n * rows];
            g.bench_with_input(BenchmarkId::new("matmul_n128", &shape), &(), |b, _| {
                b.iter(|| matmul(pool, w, rows, cols, &x, n, &mut out))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, linear);
criterion_main!(benches);

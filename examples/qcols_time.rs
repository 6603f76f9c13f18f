//! Time of a Q4_1 matrix-vector product on one thread: the row-major blocks as GGUF stores
//! them (the engine's decode kernel) against the same numbers held by input column
//! (`kernels::qcols`), with every input and with the largest 60% / 40% of |x| kept (input
//! sparsity). 40 matrices of SmolLM2's down shape (576 x 1536) and 40 of its gate shape
//! (1536 x 576), 44 MB, so each pass streams from memory as a decode step does.
//!
//!     cargo run --release --example qcols_time [passes]

use std::time::Instant;

use sparsellm::kernels::qcols::{QColMatrix, QColScratch};
use sparsellm::kernels::qdot::{quantize_activations, rows_q};
use sparsellm::kernels::test_data::data;
use sparsellm::quant::{QFormat, QK};

fn q4_1(out_dim: usize, in_dim: usize, seed: u64) -> Vec<u8> {
    let n = out_dim * in_dim / QK;
    let v = data(n * 20, seed);
    let mut w = vec![0u8; n * 20];
    for (b, blk) in w.chunks_exact_mut(20).enumerate() {
        let d = half::f16::from_f32(0.01 + v[b * 20].abs() * 0.02).to_bits();
        let m = half::f16::from_f32(v[b * 20 + 1] * 0.1).to_bits();
        blk[..2].copy_from_slice(&d.to_le_bytes());
        blk[2..4].copy_from_slice(&m.to_le_bytes());
        for (j, q) in blk[4..].iter_mut().enumerate() {
            *q = ((v[b * 20 + 2 + j] + 1.0) * 127.0) as u8;
        }
    }
    w
}

fn main() {
    let passes: usize = std::env::args()
        .nth(1)
        .map_or(30, |s| s.parse().expect("passes"));
    let shapes: Vec<(usize, usize)> = (0..240)
        .map(|i| if i % 2 == 0 { (576, 1536) } else { (1536, 576) })
        .collect();
    let rows: Vec<Vec<u8>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(o, k))| q4_1(o, k, i as u64 + 1))
        .collect();
    let cols: Vec<QColMatrix> = shapes
        .iter()
        .zip(&rows)
        .map(|(&(o, k), w)| QColMatrix::from_row_major(QFormat::Q4_1, w, o, k, 2))
        .collect();
    let xs: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(_, k))| data(k, 1000 + i as u64))
        .collect();
    let kept_at = |frac: f64| -> Vec<Vec<u32>> {
        xs.iter()
            .map(|x| {
                let mut order: Vec<u32> = (0..x.len() as u32).collect();
                order.sort_by(|&a, &b| x[b as usize].abs().total_cmp(&x[a as usize].abs()));
                let mut k = order[..(frac * x.len() as f64) as usize].to_vec();
                k.sort_unstable();
                k
            })
            .collect()
    };
    let (k60, k40) = (kept_at(0.6), kept_at(0.4));
    let bytes: usize = rows.iter().map(Vec::len).sum();
    let mut out: Vec<Vec<f32>> = shapes.iter().map(|&(o, _)| vec![0f32; o]).collect();
    let mut pairs = Vec::new();
    let mut s = QColScratch::new();
    let pool2 = sparsellm::kernels::pool::ThreadPool::new(2);
    let names = [
        "row-major (GGUF blocks)",
        "by column, all kept",
        "by column, 60% kept",
        "by column, 40% kept",
        "row-major, 2 threads",
        "by column, 2 threads",
        "by column, 2 threads, 60% kept",
        "by column, 2 threads, 40% kept",
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..passes {
        for (v, t) in times.iter_mut().enumerate() {
            let start = Instant::now();
            for i in 0..shapes.len() {
                match v {
                    0 => {
                        quantize_activations(&xs[i], &mut pairs);
                        rows_q(
                            QFormat::Q4_1,
                            &rows[i],
                            shapes[i].1 / QK * 20,
                            &pairs,
                            &mut out[i],
                        );
                    }
                    1 => cols[i].matvec(&xs[i], None, &mut out[i], &mut s),
                    2 => cols[i].matvec(&xs[i], Some(&k60[i]), &mut out[i], &mut s),
                    3 => cols[i].matvec(&xs[i], Some(&k40[i]), &mut out[i], &mut s),
                    4 => sparsellm::kernels::linear::matvec(
                        &pool2,
                        sparsellm::kernels::WeightView::Quant(QFormat::Q4_1, &rows[i]),
                        shapes[i].0,
                        shapes[i].1,
                        &xs[i],
                        &mut out[i],
                    ),
                    5 => cols[i].matvec_pool(&pool2, &xs[i], None, &mut out[i], &mut s),
                    6 => cols[i].matvec_pool(&pool2, &xs[i], Some(&k60[i]), &mut out[i], &mut s),
                    _ => cols[i].matvec_pool(&pool2, &xs[i], Some(&k40[i]), &mut out[i], &mut s),
                }
            }
            t.push(start.elapsed().as_secs_f64());
        }
    }
    println!(
        "{} Q4_1 matrices, {:.1} MB, one thread, {passes} interleaved passes (median [min, max] ms; GB/s of the row-major bytes at the median)",
        shapes.len(),
        bytes as f64 / 1e6
    );
    let base = {
        let mut t = times[0].clone();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    for (name, t) in names.iter().zip(&mut times) {
        t.sort_by(f64::total_cmp);
        let med = t[t.len() / 2];
        println!(
            "{name:26} {:7.2} [{:.2}, {:.2}] ms  {:5.1} GB/s  x{:.2} of row-major",
            med * 1e3,
            t[0] * 1e3,
            t[t.len() - 1] * 1e3,
            bytes as f64 / med / 1e9,
            base / med
        );
    }
}

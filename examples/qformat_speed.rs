//! Single-thread speed of the quantized block products per format, interleaved rounds
//! (a shared machine's load moves all formats alike): decode (`rows_q`, one activation
//! vector) and prefill (`rows_q_tokens`, 8 vectors), on a 1536 x 768 matrix of random
//! weights. Prints per format the best (least disturbed) over rounds of ns per 256 weights and GB/s of
//! weight bytes (decode).
//!
//!     cargo run --release --example qformat_speed [rounds]

use std::time::Instant;

use sparsellm::kernels::qdot::{QPair, quantize_activations, rows_q, rows_q_tokens};
use sparsellm::kernels::test_data::data;
use sparsellm::quant::{QFormat, quantize};

fn best(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[0]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(7);
    let (rows, cols) = (1536, 768);
    let wf = data(rows * cols, 1);
    let mut x: Vec<Vec<QPair>> = Vec::new();
    for t in 0..8 {
        let mut q = Vec::new();
        quantize_activations(&data(cols, 2 + t), &mut q);
        x.push(q);
    }
    let weights: Vec<(QFormat, Vec<u8>)> = QFormat::ALL
        .iter()
        .map(|&f| {
            let mut b = vec![0u8; rows * f.row_bytes(cols)];
            quantize(f, &wf, &mut b);
            (f, b)
        })
        .collect();
    let mut dec = vec![Vec::new(); weights.len()];
    let mut pre = vec![Vec::new(); weights.len()];
    let mut out = vec![0f32; rows];
    let mut outs = vec![vec![0f32; rows]; 8];
    for _ in 0..rounds {
        for (i, (f, w)) in weights.iter().enumerate() {
            let rb = f.row_bytes(cols);
            let reps = 20;
            let t0 = Instant::now();
            for _ in 0..reps {
                rows_q(*f, w, rb, &x[0], &mut out);
            }
            dec[i].push(t0.elapsed().as_secs_f64() / reps as f64);
            let xs: Vec<&[QPair]> = x.iter().map(|v| &v[..]).collect();
            let t0 = Instant::now();
            for _ in 0..reps / 4 {
                for r0 in (0..rows).step_by(32) {
                    let mut views: Vec<&mut [f32]> =
                        outs.iter_mut().map(|o| &mut o[r0..r0 + 32]).collect();
                    rows_q_tokens(*f, &w[r0 * rb..(r0 + 32) * rb], rb, &xs, &mut views);
                }
            }
            pre[i].push(t0.elapsed().as_secs_f64() / (reps / 4) as f64 / 8.0);
        }
    }
    println!("format  decode ns/256w  decode GB/s  prefill ns/256w/token");
    for (i, (f, w)) in weights.iter().enumerate() {
        let d = best(&mut dec[i]);
        let p = best(&mut pre[i]);
        let per = (rows * cols / 256) as f64;
        println!(
            "{:6}  {:14.1}  {:11.2}  {:21.1}",
            f.name(),
            d / per * 1e9,
            w.len() as f64 / d / 1e9,
            p / per * 1e9
        );
    }
}

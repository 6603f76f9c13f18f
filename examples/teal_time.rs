//! Times dense decode on both weight layouts and input-sparse decode, interleaved in one
//! process, by wall time and by CPU time (robust when other processes share the cores):
//!
//!     cargo run --release --example teal_time -- MODEL DTYPE THREADS RUNS SPEC [PREDICTOR]
//!
//! e.g. `... models/SmolLM2-135M-Instruct.Q4_1.gguf bf16 2 7 teal:calibrated p.safetensors`
//! (DTYPE: native, f32, bf16 or f16; native works for float, Q8_0, Q4_0 and Q4_1 files).
//! Each run: a 128-token prefill (GPL-3 is not needed: fixed ids) and 64 greedy decode
//! steps per mode. Prints medians and ranges per mode, and the ratios of medians.

use sparsellm::kernels::pool;
use sparsellm::model::llama::{Llama, Logits};
use sparsellm::model::{MlpOverride, WeightLayout};
use sparsellm::sparse::input::{InputSparsity, InputSpec};
use sparsellm::sparse::predictor::Predictor;
use sparsellm::tensor::LoadDType;

/// Nanoseconds on a CPU, summed over the process's threads, in ms.
fn cpu_ms() -> f64 {
    let mut run = 0u64;
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
            run += s
                .split_whitespace()
                .next()
                .and_then(|x| x.parse().ok())
                .unwrap_or(0);
        }
    }
    run as f64 * 1e-6
}

fn median(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// (prefill wall, prefill cpu, decode wall, decode cpu) in ms.
fn one_run(model: &Llama, mut hook: Option<&mut dyn MlpOverride>) -> [f64; 4] {
    let tokens: Vec<u32> = (0..128u32).map(|i| (i * 7919 + 13) % 20000 + 100).collect();
    let mut cache = model.new_cache();
    let (c0, t0) = (cpu_ms(), std::time::Instant::now());
    let mut logits = model
        .forward(&tokens, &mut cache, Logits::Last, hook.as_deref_mut())
        .unwrap();
    let (c1, t1) = (cpu_ms(), std::time::Instant::now());
    for _ in 0..64 {
        let next = sparsellm::generate::argmax(&logits);
        logits = model
            .forward(&[next], &mut cache, Logits::Last, hook.as_deref_mut())
            .unwrap();
    }
    let (c2, t2) = (cpu_ms(), std::time::Instant::now());
    [
        (t1 - t0).as_secs_f64() * 1e3,
        c1 - c0,
        (t2 - t1).as_secs_f64() * 1e3,
        c2 - c1,
    ]
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let path = std::path::Path::new(&a[1]);
    // native: each matrix as the file stores it (float, or Q8_0 re-quantized input-major).
    let dtype: LoadDType = a[2].parse().unwrap();
    let threads: usize = a[3].parse().unwrap();
    let runs: usize = a[4].parse().unwrap();
    let spec: InputSpec = a[5].parse().unwrap();
    let pool = pool::init_global(threads);
    let src = sparsellm::loader::open(path).unwrap();
    let row = Llama::load_with_layout(src.as_ref(), dtype, pool, WeightLayout::RowMajor).unwrap();
    let col = Llama::load_with_layout(src.as_ref(), dtype, pool, WeightLayout::InputMajor).unwrap();
    let predictor = a
        .get(6)
        .map(|p| Predictor::load(std::path::Path::new(p), &col).unwrap());
    let tables = predictor.as_ref().and_then(|p| p.input.as_ref());
    let mut sparse = InputSparsity::new(&col, spec, tables).unwrap();
    let names = ["dense row-major", "dense input-major", "sparse"];
    let mut res: Vec<Vec<[f64; 4]>> = vec![Vec::new(); 3];
    for r in 0..runs + 1 {
        for (m, out) in res.iter_mut().enumerate() {
            let x = match m {
                0 => one_run(&row, None),
                1 => one_run(&col, None),
                _ => one_run(&col, Some(&mut sparse)),
            };
            if r > 0 {
                out.push(x);
            }
        }
    }
    println!(
        "{} threads, {} runs; inputs kept {:.3}, weight bytes x{:.3}",
        threads,
        runs,
        sparse.density().unwrap_or(1.0),
        sparse.weight_bytes_ratio().unwrap_or(1.0)
    );
    println!(
        "| mode | prefill tok/s wall | prefill ms cpu | decode tok/s wall | decode ms/token cpu |"
    );
    println!("|---|---|---|---|---|");
    let mut meds = Vec::new();
    for (name, v) in names.iter().zip(&res) {
        let col = |k: usize| v.iter().map(|x| x[k]).collect::<Vec<f64>>();
        let pw = median(&mut col(0).iter().map(|ms| 128e3 / ms).collect::<Vec<_>>());
        let pc = median(&mut col(1));
        let dw = median(&mut col(2).iter().map(|ms| 64e3 / ms).collect::<Vec<_>>());
        let dc = median(&mut col(3).iter().map(|ms| ms / 64.0).collect::<Vec<_>>());
        println!(
            "| {name} | {:.0} [{:.0}, {:.0}] | {:.1} [{:.1}, {:.1}] | {:.1} [{:.1}, {:.1}] | {:.3} [{:.3}, {:.3}] |",
            pw.0, pw.1, pw.2, pc.0, pc.1, pc.2, dw.0, dw.1, dw.2, dc.0, dc.1, dc.2
        );
        meds.push((pw.0, pc.0, dw.0, dc.0));
    }
    println!(
        "input-major dense / row-major: prefill wall x{:.3}, decode wall x{:.3}, decode cpu x{:.3}",
        meds[1].0 / meds[0].0,
        meds[1].2 / meds[0].2,
        meds[0].3 / meds[1].3
    );
    println!(
        "sparse / row-major dense: decode wall x{:.3}, decode cpu x{:.3}",
        meds[2].2 / meds[0].2,
        meds[0].3 / meds[2].3
    );
}

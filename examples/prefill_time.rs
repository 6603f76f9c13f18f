//! Times a 128-token prefill (wall and CPU time) on a loaded machine:
//!
//!     cargo run --release --example prefill_time -- MODEL.gguf bf16|f32|native THREADS RUNS
//!
//! CPU time is the sum over the process's threads of their time on a CPU
//! (`/proc/self/task/*/schedstat`), so it is not inflated by other processes taking the
//! cores; it does include the pool's spin-waits. Prints medians and ranges in ms.

use sparsellm::kernels::pool;
use sparsellm::model::llama::{Llama, Logits};
use sparsellm::tensor::{DType, LoadDType};

/// Nanoseconds on a CPU and waiting for one, summed over the process's threads.
fn sched() -> (f64, f64) {
    let mut run = 0u64;
    let mut wait = 0u64;
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(s) = std::fs::read_to_string(e.path().join("schedstat")) {
            let v: Vec<u64> = s
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            run += v.first().copied().unwrap_or(0);
            wait += v.get(1).copied().unwrap_or(0);
        }
    }
    (run as f64 * 1e-6, wait as f64 * 1e-6)
}

/// Minor page faults of the process so far.
fn minflt() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    rest.split_whitespace().nth(7).unwrap().parse().unwrap()
}

fn stat(v: &mut [f64]) -> String {
    v.sort_by(f64::total_cmp);
    format!("{:.1} [{:.1}, {:.1}]", v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let path = a.get(1).map_or("/tmp/model-bf16.gguf", |s| s.as_str());
    let dtype = match a.get(2).map_or("native", |s| s.as_str()) {
        "bf16" => LoadDType::To(DType::BF16),
        "f32" => LoadDType::To(DType::F32),
        _ => LoadDType::Native,
    };
    let threads: usize = a.get(3).map_or(2, |s| s.parse().unwrap());
    let runs: usize = a.get(4).map_or(10, |s| s.parse().unwrap());
    let pool = pool::init_global(threads);
    let src = sparsellm::loader::open(std::path::Path::new(path)).unwrap();
    let model = Llama::load(src.as_ref(), dtype, pool).unwrap();
    let tokens: Vec<u32> = (0..128u32).map(|i| (i * 7919 + 13) % 20000 + 100).collect();
    let (mut wall, mut cpu, mut wait, mut faults) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for r in 0..runs + 2 {
        let mut cache = model.new_cache();
        let f0 = minflt();
        let (c0, w0) = sched();
        let t0 = std::time::Instant::now();
        let out = model
            .forward(&tokens, &mut cache, Logits::Last, None)
            .unwrap();
        let dt = t0.elapsed().as_secs_f64() * 1e3;
        let (c1, w1) = sched();
        let f1 = minflt();
        assert!(out.iter().all(|v| v.is_finite()));
        if r >= 2 {
            wall.push(dt);
            cpu.push(c1 - c0);
            wait.push(w1 - w0);
            faults.push(f1 - f0);
        }
    }
    println!(
        "wall ms {} | cpu ms {} | runqueue wait ms {} | page faults {} | tok/s (median wall) {:.0}",
        stat(&mut wall),
        stat(&mut cpu),
        stat(&mut wait),
        stat(&mut faults),
        128.0 * 1e3 / wall[wall.len() / 2]
    );
}

//! Decode speed at 1 and 2 (or more) threads on an idle machine and with a competing
//! process busy on one core (a shell loop pinned with `taskset` to the last CPU, killed
//! after each measurement), interleaved and repeated:
//!
//!     cargo run --release --example decode_under_load -- [MODEL|-] [native|bf16|f32] [TOKENS] [REPS] [POOLS]
//!
//! Defaults: the default model (under `SPARSELLM_MODELS_DIR`), native, 128 tokens, 5
//! repetitions, pools `1,2`. POOLS lists thread counts; a count followed by `f` is a pool
//! that does not adapt (`ThreadPool::set_adaptive(false)`: every job offered to every
//! thread however busy the machine is). Each measurement decodes TOKENS greedy tokens after
//! a 16-token prompt (one model, one pool per entry). Prints the median, min and max decode
//! tokens/s per (load, pool), the shares of chunked jobs run on fewer threads because
//! other processes kept cores busy and on the caller alone after stalls, and the stalls
//! (jobs that waited for a descheduled worker), summed over the repetitions.

use std::process::{Child, Command};

use sparsellm::kernels::{ThreadPool, pool};
use sparsellm::model::llama::{Llama, Logits};
use sparsellm::tensor::{DType, LoadDType};

/// A busy loop pinned to the last CPU, or None when `taskset` is missing.
fn hog() -> Option<Child> {
    let last = std::thread::available_parallelism().map_or(1, |n| n.get()) - 1;
    Command::new("taskset")
        .args(["-c", &last.to_string(), "sh", "-c", "while :; do :; done"])
        .spawn()
        .ok()
}

fn decode(model: &Llama, tokens: usize) -> f64 {
    let prompt: Vec<u32> = (0..16u32).map(|i| (i * 7919 + 13) % 20000 + 100).collect();
    let mut cache = model.new_cache();
    let mut logits = model
        .forward(&prompt, &mut cache, Logits::Last, None)
        .expect("prefill");
    let t0 = std::time::Instant::now();
    for _ in 0..tokens {
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i as u32);
        logits = model
            .forward(&[next], &mut cache, Logits::Last, None)
            .expect("decode");
    }
    tokens as f64 / t0.elapsed().as_secs_f64()
}

struct Entry {
    name: String,
    pool: &'static ThreadPool,
    tok_s: [Vec<f64>; 2],
    /// (chunked jobs, serial after stalls, fewer threads for load, stalls) per load.
    stats: [(u64, u64, u64, u64); 2],
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let path = match a.get(1) {
        Some(p) if p != "-" => std::path::PathBuf::from(p),
        _ => sparsellm::loader::fetch::default_model_path().expect("the default model"),
    };
    let dtype = match a.get(2).map_or("native", |s| s.as_str()) {
        "bf16" => LoadDType::To(DType::BF16),
        "f32" => LoadDType::To(DType::F32),
        _ => LoadDType::Native,
    };
    let tokens: usize = a.get(3).map_or(128, |s| s.parse().expect("TOKENS"));
    let reps: usize = a.get(4).map_or(5, |s| s.parse().expect("REPS"));
    let mut entries: Vec<Entry> = a
        .get(5)
        .map_or("1,2", |s| s.as_str())
        .split(',')
        .map(|spec| {
            let fixed = spec.ends_with('f');
            let threads: usize = spec.trim_end_matches('f').parse().expect("POOLS");
            let pool: &'static ThreadPool = Box::leak(Box::new(ThreadPool::new(threads)));
            pool.set_adaptive(!fixed);
            Entry {
                name: format!("{threads}{}", if fixed { " (not adaptive)" } else { "" }),
                pool,
                tok_s: [Vec::new(), Vec::new()],
                stats: [(0, 0, 0, 0); 2],
            }
        })
        .collect();
    let src = sparsellm::loader::open(&path).expect("opening the model");
    let mut model = Llama::load(src.as_ref(), dtype, pool::global()).expect("loading");
    for rep in 0..reps {
        for loaded in [0, 1] {
            let mut h = if loaded == 1 { hog() } else { None };
            for e in entries.iter_mut() {
                model.pool = e.pool;
                let s0 = e.pool.stats();
                let tok_s = decode(&model, tokens);
                let s1 = e.pool.stats();
                let st = &mut e.stats[loaded];
                st.0 += s1.chunked_jobs - s0.chunked_jobs;
                st.1 += s1.serial_after_stalls - s0.serial_after_stalls;
                st.2 += s1.fewer_for_load - s0.fewer_for_load;
                st.3 += s1.stalls - s0.stalls;
                let load = ["idle", "loaded"][loaded];
                eprintln!("rep {rep} {load} {} threads: {tok_s:.1} tok/s", e.name);
                e.tok_s[loaded].push(tok_s);
            }
            if let Some(h) = h.as_mut() {
                let _ = h.kill();
                let _ = h.wait();
            }
        }
    }
    println!(
        "| load | threads | decode tok/s median | min | max | jobs on fewer threads (load) | jobs alone after stalls | stalls |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for loaded in [0, 1] {
        for e in entries.iter_mut() {
            let v = &mut e.tok_s[loaded];
            v.sort_by(f64::total_cmp);
            let (jobs, after_stalls, for_load, stalls) = e.stats[loaded];
            let share = |n: u64| {
                if jobs == 0 {
                    "-".to_string()
                } else {
                    format!("{:.0}%", 100.0 * n as f64 / jobs as f64)
                }
            };
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
                ["idle", "one core busy"][loaded],
                e.name,
                v[v.len() / 2],
                v[0],
                v[v.len() - 1],
                share(for_load),
                share(after_stalls),
                stalls
            );
        }
    }
}

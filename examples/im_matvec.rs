//! Row-major matvec against the input-major (column-sparse) kernel on one matrix out of
//! cache, interleaved, wall and CPU time:
//!
//!     cargo run --release --example im_matvec -- ROWS COLS THREADS REPS [KEEP]
//!
//! ROWS x COLS bf16 (`[out, in]`); KEEP (default 1.0): the fraction of inputs kept.

use sparsellm::kernels::input_major::{InputMajorScratch, matvec_input_major};
use sparsellm::kernels::{ThreadPool, WeightView, matvec};

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

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let (rows, cols): (usize, usize) = (a[1].parse().unwrap(), a[2].parse().unwrap());
    let threads: usize = a[3].parse().unwrap();
    let reps: usize = a[4].parse().unwrap();
    let keep: f64 = a.get(5).map_or(1.0, |s| s.parse().unwrap());
    let pool = ThreadPool::new(threads);
    // Several copies so each call reads from memory, not from L3 (260 MiB here).
    let copies = (1usize << 30) / (rows * cols * 2) + 1;
    let w: Vec<Vec<u16>> = (0..copies)
        .map(|c| {
            (0..rows * cols)
                .map(|i| (0x3c00 + ((i * 31 + c) % 512)) as u16)
                .collect()
        })
        .collect();
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 13 % 97) as f32 - 48.0) / 50.0)
        .collect();
    let kept: Vec<u32> = (0..cols as u32)
        .filter(|&i| ((i as u64 * 2654435761) % 1000) < (keep * 1000.0) as u64)
        .collect();
    let mut out = vec![0f32; rows];
    let mut s = InputMajorScratch::default();
    let (mut rm, mut im) = (Vec::new(), Vec::new());
    for r in 0..reps {
        let wr = &w[r % copies];
        let (c0, t0) = (cpu_ms(), std::time::Instant::now());
        matvec(&pool, WeightView::Bf16(wr), rows, cols, &x, &mut out);
        let (c1, t1) = (cpu_ms(), std::time::Instant::now());
        let wi = &w[(r + copies / 2) % copies];
        let k = (keep < 1.0).then_some(&kept[..]);
        matvec_input_major(
            &pool,
            WeightView::Bf16(wi),
            cols,
            rows,
            &x,
            k,
            &mut out,
            &mut s,
        );
        let (c2, t2) = (cpu_ms(), std::time::Instant::now());
        rm.push(((t1 - t0).as_secs_f64() * 1e6, (c1 - c0) * 1e3));
        im.push(((t2 - t1).as_secs_f64() * 1e6, (c2 - c1) * 1e3));
    }
    let med = |v: &mut Vec<(f64, f64)>| {
        let mut a: Vec<f64> = v.iter().map(|x| x.0).collect();
        let mut b: Vec<f64> = v.iter().map(|x| x.1).collect();
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        (a[a.len() / 2], b[b.len() / 2])
    };
    let (r, i) = (med(&mut rm), med(&mut im));
    let gb = (rows * cols * 2) as f64 / 1e3;
    println!(
        "{rows}x{cols} bf16 t{threads} keep {keep}: row-major {:.0} us ({:.1} GB/s, cpu {:.0} us) | input-major {:.0} us ({:.1} GB/s of dense bytes, cpu {:.0} us) | ratio {:.3}",
        r.0,
        gb / r.0,
        r.1,
        i.0,
        gb / i.0,
        i.1,
        r.0 / i.0
    );
}

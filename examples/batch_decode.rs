//! Aggregate decode speed of batched decoding (`Llama::forward_batch`, continuous
//! batching's step) at several batch sizes, interleaved and repeated:
//!
//!     cargo run --release --example batch_decode -- [MODEL|-] [native|bf16|f32] [STEPS] [REPS] [SIZES]
//!
//! Defaults: the default model (under `SPARSELLM_MODELS_DIR`), native, 64 steps, 3
//! repetitions, batch sizes `1,2,4,8,16`. Each measurement prefills one 16-token prompt
//! per sequence (different prompts; not timed), then runs STEPS batched greedy decode
//! steps; aggregate tokens/s = batch size x STEPS / time. Prints, per batch size, the
//! median and range of the aggregate rate and its ratio to batch size 1's median.

use sparsellm::generate::argmax;
use sparsellm::kernels::pool;
use sparsellm::model::{BatchItem, Llama, Logits};
use sparsellm::tensor::{DType, LoadDType};

fn run(model: &Llama, batch: usize, steps: usize) -> f64 {
    let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
    let mut next: Vec<u32> = caches
        .iter_mut()
        .enumerate()
        .map(|(s, cache)| {
            let prompt: Vec<u32> = (0..16u32)
                .map(|i| (i * 7919 + 13 + s as u32 * 104_729) % 20000 + 100)
                .collect();
            argmax(
                &model
                    .forward(&prompt, cache, Logits::Last, None)
                    .expect("prefill"),
            )
        })
        .collect();
    let vocab = model.config.vocab_size;
    let t0 = std::time::Instant::now();
    for _ in 0..steps {
        let mut items: Vec<BatchItem> = caches
            .iter_mut()
            .zip(&next)
            .map(|(cache, &token)| BatchItem { token, cache })
            .collect();
        let logits = model.forward_batch(&mut items, None).expect("batch step");
        next = logits.chunks_exact(vocab).map(argmax).collect();
    }
    (batch * steps) as f64 / t0.elapsed().as_secs_f64()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).filter(|s| *s != "-");
    let path = arg(0)
        .map(Into::into)
        .unwrap_or_else(|| sparsellm::loader::fetch::default_model_path().expect("model"));
    let dtype = match arg(1).unwrap_or("native") {
        "native" => LoadDType::Native,
        "bf16" => LoadDType::To(DType::BF16),
        "f32" => LoadDType::To(DType::F32),
        other => panic!("dtype {other}: native, bf16 or f32"),
    };
    let steps: usize = arg(2).map_or(64, |s| s.parse().expect("STEPS"));
    let reps: usize = arg(3).map_or(3, |s| s.parse().expect("REPS"));
    let sizes: Vec<usize> = arg(4)
        .unwrap_or("1,2,4,8,16")
        .split(',')
        .map(|s| s.parse().expect("SIZES"))
        .collect();
    let src = sparsellm::loader::open(&path).expect("open");
    let model = Llama::load(src.as_ref(), dtype, pool::global()).expect("load");
    println!(
        "{} ({}), {} threads, one pass per batch: {}",
        path.display(),
        dtype.name(),
        pool::global().threads(),
        model.batches_in_one_pass()
    );
    run(&model, 2, 4);
    let mut rates = vec![Vec::new(); sizes.len()];
    for _ in 0..reps {
        for (i, &b) in sizes.iter().enumerate() {
            rates[i].push(run(&model, b, steps));
        }
    }
    let base = median(&mut rates[0].clone());
    println!(
        "| batch | aggregate tok/s (median) | range | vs batch {} |",
        sizes[0]
    );
    println!("|---:|---:|---|---:|");
    for (b, r) in sizes.iter().zip(&mut rates) {
        let (lo, hi) = (
            r.iter().copied().fold(f64::MAX, f64::min),
            r.iter().copied().fold(0.0, f64::max),
        );
        let m = median(r);
        println!("| {b} | {m:.1} | {lo:.1}-{hi:.1} | {:.2}x |", m / base);
    }
}

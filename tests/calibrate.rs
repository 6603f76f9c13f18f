//! Calibration of the low-rank predictors: the closed-form data-aware fit on synthetic data
//! with known structure, calibrate -> save -> load -> `SparseMlp` on the real model, refusal
//! of another model's file, and (ignored: slow) the quality table on SmolLM2 bf16.

mod common;

use std::sync::OnceLock;

use sparsellm::Error;
use sparsellm::eval::perplexity;
use sparsellm::kernels::pool;
use sparsellm::model::Llama;
use sparsellm::sparse::calibrate::{
    CalibrationOptions, CalibrationReport, Covariance, calibrate, fit_low_rank,
};
use sparsellm::sparse::predictor::{Predictor, model_identity};
use sparsellm::sparse::{Mode, Scorer, SparseMlp};
use sparsellm::tensor::DType;
use sparsellm::tokenizer::Tokenizer;

fn model() -> &'static Llama {
    static M: OnceLock<Llama> = OnceLock::new();
    M.get_or_init(|| {
        let src = sparsellm::loader::open(&common::model_path()).expect("open model");
        Llama::load(src.as_ref(), DType::BF16, pool::global()).expect("load model")
    })
}

/// Token ids of a text file under /usr/share/common-licenses.
fn license_ids(name: &str) -> Vec<u32> {
    let path = std::path::Path::new("/usr/share/common-licenses").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let src = sparsellm::loader::open(&common::model_path()).expect("open model");
    let tok =
        Tokenizer::load(&src.tokenizer_source().expect("tokenizer source")).expect("tokenizer");
    tok.encode(&text).expect("encode")
}

/// Standard normal samples (xorshift + Box-Muller).
struct Gauss(u64);
impl Gauss {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn next(&mut self) -> f64 {
        let (a, b) = (self.uniform(), self.uniform());
        (-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()
    }
}

/// E over rows of ‖h Wᵀ − h A B‖², h: [n, d], w: [out, d], a: [d, r], b: [r, out].
fn objective(h: &[f32], d: usize, w: &[f32], out: usize, a: &[f32], b: &[f32], r: usize) -> f64 {
    let n = h.len() / d;
    let mut total = 0f64;
    for t in 0..n {
        let x = &h[t * d..(t + 1) * d];
        let z: Vec<f64> = (0..r)
            .map(|k| (0..d).map(|i| x[i] as f64 * a[i * r + k] as f64).sum())
            .collect();
        for j in 0..out {
            let exact: f64 = (0..d).map(|i| x[i] as f64 * w[j * d + i] as f64).sum();
            let approx: f64 = (0..r).map(|k| z[k] * b[k * out + j] as f64).sum();
            total += (exact - approx).powi(2);
        }
    }
    total / n as f64
}

#[test]
fn data_aware_fit_recovers_low_rank_and_beats_plain_svd() {
    let (d, out, true_rank, n) = (48, 80, 8, 4000);
    let mut g = Gauss(0x1234_5678_9abc_def1);
    // W = U V (rank 8) + tiny noise.
    let u: Vec<f64> = (0..out * true_rank).map(|_| g.next()).collect();
    let v: Vec<f64> = (0..true_rank * d).map(|_| g.next()).collect();
    let w: Vec<f32> = (0..out * d)
        .map(|idx| {
            let (j, i) = (idx / d, idx % d);
            let s: f64 = (0..true_rank)
                .map(|k| u[j * true_rank + k] * v[k * d + i])
                .sum();
            (s + 1e-7 * g.next()) as f32
        })
        .collect();
    // h = z M: correlated, strongly anisotropic (column scales 1 .. 1/d^1.5).
    let m: Vec<f64> = (0..d * d)
        .map(|idx| g.next() / (1.0 + (idx % d) as f64).powf(1.5))
        .collect();
    let h: Vec<f32> = (0..n)
        .flat_map(|_| {
            let z: Vec<f64> = (0..d).map(|_| g.next()).collect();
            let m = &m;
            (0..d).map(move |j| (0..d).map(|i| z[i] * m[i * d + j]).sum::<f64>() as f32)
        })
        .collect();
    let mut cov = Covariance::new(d);
    cov.add_rows(&h[..n / 2 * d], n / 2);
    cov.add_rows(&h[n / 2 * d..], n - n / 2);
    assert_eq!(cov.count(), n);
    let c = cov.second_moment();

    // Rank >= 8 recovers W: ‖A B − Wᵀ‖ / ‖W‖ < 1e-3.
    for r in [8, 12] {
        let f = fit_low_rank(&c, d, &w, out, r, 1e-9).unwrap();
        let (mut num, mut den) = (0f64, 0f64);
        for i in 0..d {
            for j in 0..out {
                let ab: f64 = (0..r)
                    .map(|k| f.a[i * r + k] as f64 * f.b[k * out + j] as f64)
                    .sum();
                let wt = w[j * d + i] as f64;
                num += (ab - wt).powi(2);
                den += wt * wt;
            }
        }
        let rel = (num / den).sqrt();
        eprintln!("rank {r}: relative error {rel:.2e}");
        assert!(rel < 1e-3, "rank {r}: relative error {rel}");
    }

    // Below the true rank the data-aware fit beats the plain truncated SVD of W (the fit
    // for an identity second moment) in E‖hWᵀ − hAB‖², on the same h.
    let mut identity = vec![0f64; d * d];
    (0..d).for_each(|i| identity[i * d + i] = 1.0);
    for r in [2, 4, 6] {
        let aware = fit_low_rank(&c, d, &w, out, r, 1e-9).unwrap();
        let plain = fit_low_rank(&identity, d, &w, out, r, 0.0).unwrap();
        let ea = objective(&h, d, &w, out, &aware.a, &aware.b, r);
        let ep = objective(&h, d, &w, out, &plain.a, &plain.b, r);
        eprintln!("rank {r}: data-aware {ea:.4e}, plain SVD {ep:.4e}");
        assert!(ea < ep * 0.9, "rank {r}: data-aware {ea} vs plain {ep}");
    }

    // Bad input is an error, not a panic.
    assert!(matches!(
        fit_low_rank(&c, d, &w, out, 0, 0.0),
        Err(Error::Input(_))
    ));
    assert!(matches!(
        fit_low_rank(&vec![0.0; d * d], d, &w, out, 4, 0.0),
        Err(Error::Predictor(_))
    ));
}

#[test]
fn calibrate_save_load_round_trip_runs_sparse_and_refuses_other_models() {
    let m = model();
    let ids = license_ids("Apache-2.0");
    let opts = CalibrationOptions {
        rank: 32,
        up_rank: 32,
        window: 128,
        max_tokens: 256,
        sample_tokens: 128,
        ..Default::default()
    };
    let mut stages = Vec::new();
    let t0 = std::time::Instant::now();
    let (p, report) = calibrate(m, &ids, &opts, |s, _, _| {
        if stages.last() != Some(&s) {
            eprintln!("{:.1} s: {s}", t0.elapsed().as_secs_f64());
            stages.push(s)
        }
    })
    .unwrap();
    eprintln!("stages: {stages:?}");
    assert_eq!(stages.len(), 6);
    assert_eq!((report.fit_tokens, report.heldout_tokens), (128, 128));
    assert_eq!(report.layers.len(), 30);
    assert!(report.heldout_ppl_ratio.is_finite() && report.mean_density <= 1.0);
    let t = p.thresholds.as_ref().expect("thresholds");
    assert_eq!(t.len(), 30);
    assert_eq!(p.model, model_identity(m));
    assert_eq!(
        p.metadata["calibration_ids_sha256"],
        sparsellm::sparse::calibrate::ids_sha256(&ids[..256])
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("calibrated.safetensors");
    p.save(&path).unwrap();
    let q = Predictor::load(&path, m).unwrap();
    assert_eq!((q.rank, q.up_rank), (32, 32));
    assert_eq!(q.thresholds, p.thresholds);
    assert_eq!(q.metadata, p.metadata);
    let h: Vec<f32> = (0..576)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    let mut scratch = Default::default();
    let (mut a, mut b) = (vec![0f32; 1536], vec![0f32; 1536]);
    for l in 0..30 {
        p.scores(m.pool, l, &h, &mut scratch, &mut a);
        q.scores(m.pool, l, &h, &mut scratch, &mut b);
        assert_eq!(a, b, "layer {l} scores after round trip");
    }

    // The loaded file runs end to end through SparseMlp, calibrated and at a density.
    let eval_ids = &ids[256..256 + 128];
    for spec in ["calibrated", "density:0.5"] {
        let mut s = SparseMlp::from_spec(m, spec, None, Some(&path), Mode::Cached).unwrap();
        s.set_prefill_dense(false);
        assert_eq!(s.scorer(), Scorer::LowRank);
        let r = perplexity(m, eval_ids, 128, Some(&mut s), |_, _| {}).unwrap();
        let d = s.density().unwrap();
        eprintln!(
            "{spec}: ppl {:.3}, kl {:.4}, density {d:.3}",
            r.ppl_second_half,
            r.kl_vs_dense.unwrap()
        );
        assert!(r.ppl_second_half.is_finite() && d > 0.0 && d <= 1.0);
    }

    // A file for another model is refused with a clear error.
    let mut other = q.clone();
    other.model = "llama-h576-i1536-l30-v49152-0000000000000000".into();
    let other_path = dir.path().join("other.safetensors");
    other.save(&other_path).unwrap();
    let e = SparseMlp::from_spec(m, "calibrated", None, Some(&other_path), Mode::Cached)
        .err()
        .expect("another model's predictor was accepted");
    assert!(matches!(e, Error::Predictor(_)), "{e}");
    assert!(e.to_string().contains("fitted to model"), "{e}");

    // Too little text is a typed error.
    let e = calibrate(m, &ids[..200], &opts, |_, _, _| {})
        .err()
        .unwrap();
    assert!(matches!(e, Error::Input(_)), "{e}");
}

fn print_report(name: &str, r: &CalibrationReport) {
    println!(
        "{name}: fit {} tok, held-out {} tok, held-out ppl dense {:.3} calibrated {:.3} (x{:.4}, budget met: {}), density {:.3}",
        r.fit_tokens,
        r.heldout_tokens,
        r.heldout_ppl_dense,
        r.heldout_ppl_sparse,
        r.heldout_ppl_ratio,
        r.budget_met,
        r.mean_density
    );
    println!("layer  gate_err  up_err  recall@0.5  density  recall@cal  threshold  sens_kl");
    for l in &r.layers {
        println!(
            "{:>5}  {:>8.4}  {:>6.4}  {:>10.4}  {:>7.3}  {:>10.4}  {:>9.4}  {:>7.4}",
            l.layer,
            l.gate_rel_err,
            l.up_rel_err.unwrap_or(f64::NAN),
            l.recall,
            l.density,
            l.recall_calibrated,
            l.threshold,
            l.sensitivity_kl
        );
    }
}

/// The quality table on SmolLM2 bf16: calibrate on non-GPL license texts, evaluate on GPL-3
/// (window 512, second-half perplexity).
/// `cargo test --release --test calibrate -- --ignored --nocapture`
#[test]
#[ignore]
fn smollm2_quality_table() {
    let m = model();
    let mut cal = Vec::new();
    for name in ["Apache-2.0", "MPL-2.0", "Artistic", "CC0-1.0", "BSD"] {
        cal.extend(license_ids(name));
    }
    let eval_ids = license_ids("GPL-3");
    let ranks: Vec<usize> = std::env::var("CALIB_RANKS")
        .map(|s| s.split(',').map(|r| r.parse().unwrap()).collect())
        .unwrap_or(vec![128, 256]);
    let weight = std::env::var("CALIB_WEIGHT")
        .map(|s| s != "0")
        .unwrap_or(true);
    let dense = perplexity(m, &eval_ids, 512, None, |_, _| {}).unwrap();
    println!(
        "calibration text: {} tokens; GPL-3: {} tokens; dense ppl (second half) {:.3}",
        cal.len(),
        eval_ids.len(),
        dense.ppl_second_half
    );
    let dir = tempfile::tempdir().unwrap();
    let mut rows = Vec::new();
    for &rank in &ranks {
        let opts = CalibrationOptions {
            rank,
            up_rank: rank,
            weight_by_down_norm: weight,
            ..Default::default()
        };
        let t0 = std::time::Instant::now();
        let (p, report) = calibrate(m, &cal, &opts, |_, _, _| {}).unwrap();
        let secs = t0.elapsed().as_secs_f64();
        print_report(&format!("rank {rank} ({secs:.0} s)"), &report);
        let path = dir.path().join(format!("r{rank}.safetensors"));
        p.save(&path).unwrap();
        for (spec, scorer) in [
            ("density:0.5", "lowrank"),
            ("density:0.5", "cascade"),
            ("calibrated", "lowrank"),
        ] {
            let mut s =
                SparseMlp::from_spec(m, spec, Some(scorer), Some(&path), Mode::Cached).unwrap();
            s.set_prefill_dense(false);
            let r = perplexity(m, &eval_ids, 512, Some(&mut s), |_, _| {}).unwrap();
            rows.push(format!(
                "| {rank} | {spec} | {scorer} | {:.3} (x{:.3}) | {:.4} | {:.4} | {:.3} |",
                r.ppl_second_half,
                r.ppl_second_half / dense.ppl_second_half,
                r.kl_vs_dense.unwrap(),
                r.top1_agreement.unwrap(),
                s.density().unwrap()
            ));
            println!("{}", rows.last().unwrap());
        }
    }
    println!("\n| rank | spec | scorer | ppl (2nd half) | KL | top-1 | density |");
    println!("|---|---|---|---|---|---|---|");
    rows.iter().for_each(|r| println!("{r}"));
}

//! `sparsellm bench`: time to first token, prefill and decode speed and peak memory,
//! dense and sparse interleaved in child processes; `--components` times the parts of a
//! decode step.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use sparsellm::bench;
use sparsellm::kernels::pool;
use sparsellm::model::{Llama, WeightLayout};
use sparsellm::progress::{Progress, count};
use sparsellm::sparse::{Predictor, SparseMlp, Sparsity, SparsityConfig};

use crate::args::*;
use crate::load::*;

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Prompt length: the first N tokens of --text.
    #[arg(long, default_value_t = 128, value_parser = parse_positive)]
    pub(crate) prompt_tokens: usize,
    /// Tokens generated per run (no stop at EOS).
    #[arg(long, default_value_t = 64, value_parser = parse_positive)]
    pub(crate) gen_tokens: usize,
    /// Measured runs per mode.
    #[arg(long, default_value_t = 5, value_parser = parse_positive)]
    pub(crate) runs: usize,
    /// Unmeasured warm-up runs per mode.
    #[arg(long, default_value_t = 1, value_parser = parse_count)]
    pub(crate) warmup: usize,
    /// Text the prompt is taken from.
    #[arg(long, default_value = "/usr/share/common-licenses/GPL-3")]
    pub(crate) text: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
    /// Instead of the benchmark: where the time goes. (1) The sparse components
    /// (threshold, cache update, sparse MLP cached / gathered / dense at densities
    /// 0.05-1.0, predictor cost per rank) at the SmolLM2 and Llama-3.2-1B shapes, random
    /// weights. (2) The model's decode step by phase (embed, norm, qkv, rope, attention,
    /// o_proj, the MLP's parts, head), dense and, with --sparsity, sparse (scorer,
    /// threshold, cache_update, sparse_kernel): --warmup then --runs generations per mode,
    /// interleaved, in this process; ms per token.
    #[arg(long)]
    pub(crate) components: bool,
    /// With --components: only the kernels' micro-benchmarks (`kernels`) or only the
    /// model's decode step by phase (`model`).
    #[arg(long, value_name = "PART", value_parser = ["kernels", "model"], requires = "components")]
    pub(crate) components_only: Option<String>,
    /// Benchmarks only: score with a seeded RANDOM low-rank predictor of this rank (its
    /// cost is real, its choices are not; for synthetic models, whose weights are random).
    #[arg(long, value_name = "RANK", value_parser = parse_positive)]
    pub(crate) random_predictor: Option<usize>,
    /// Internal: run one mode in this process and print its samples as JSON (the parent
    /// runs each mode in its own child so that peak memory is measured per mode).
    #[arg(long, hide = true, value_parser = ["dense", "sparse"])]
    pub(crate) child_mode: Option<String>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

/// The benchmark: for each run, a dense child process then a sparse one (interleaved, so
/// drift of a shared machine hits both alike), each loading the model, warming up and
/// measuring one generation; medians over runs.
pub(crate) fn cmd_bench(a: BenchArgs) -> Result<()> {
    if let Some(mode) = a.child_mode.clone() {
        return bench_child(a, &mode);
    }
    check_sparse_flags(&a.run, a.random_predictor.is_some())?;
    if a.components {
        return bench_components(a);
    }
    if a.prompt_tokens + a.gen_tokens > 1 << 20 {
        bail!("--prompt-tokens + --gen-tokens is absurd");
    }
    // Resolve the model once (fetching it if needed) so children do not race to fetch.
    let model = model_path(&a.run.model)?;
    let modes: &[&str] = if a.run.sparsity == "off" {
        &["dense"]
    } else {
        &["dense", "sparse"]
    };
    let exe = std::env::current_exe().context("locating the sparsellm executable")?;
    let mut pb = if a.json {
        Progress::hidden()
    } else {
        progress_bar((a.runs * modes.len()) as u64, "bench", "runs")
    };
    let mut samples: Vec<Vec<bench::Sample>> = vec![Vec::new(); modes.len()];
    let mut header = serde_json::Value::Null;
    for run in 0..a.runs {
        for (m, mode) in modes.iter().enumerate() {
            pb.set_message(format!("bench {mode}"));
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["bench", "--child-mode", mode, "--runs", "1"])
                .arg("--warmup")
                .arg(a.warmup.to_string())
                .arg("--prompt-tokens")
                .arg(a.prompt_tokens.to_string())
                .arg("--gen-tokens")
                .arg(a.gen_tokens.to_string())
                .arg("--text")
                .arg(&a.text)
                .arg("--model")
                .arg(&model)
                .args([
                    "--dtype",
                    a.run.dtype.name(),
                    "--kv-dtype",
                    a.run.kv_dtype.name(),
                    "--sparsity",
                    &a.run.sparsity,
                    "--sparse-mode",
                    &a.run.sparse_mode,
                ]);
            if let Some(t) = a.run.threads {
                cmd.arg("--threads").arg(t.to_string());
            }
            if let Some(s) = &a.run.scorer {
                cmd.arg("--scorer").arg(s);
            }
            if let Some(p) = &a.run.predictor {
                cmd.arg("--predictor").arg(p);
            }
            if let Some(r) = a.random_predictor {
                cmd.arg("--random-predictor").arg(r.to_string());
            }
            let out = cmd
                .stderr(std::process::Stdio::piped())
                .output()
                .context("running a benchmark child")?;
            if !out.status.success() {
                let err = String::from_utf8_lossy(&out.stderr);
                let line = err
                    .lines()
                    .rfind(|l| l.starts_with("error:"))
                    .unwrap_or("failed");
                bail!(
                    "{mode} run {}: {}",
                    run + 1,
                    line.trim_start_matches("error: ")
                );
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .context("reading a benchmark child's output")?;
            samples[m]
                .push(serde_json::from_value(v["sample"].clone()).context("benchmark sample")?);
            header = v["header"].clone();
            pb.inc(1);
        }
    }
    pb.finish();
    let reports: Vec<bench::ModeReport> = samples
        .iter()
        .map(|s| bench::ModeReport::from_samples(s))
        .collect();
    let ratio = |f: fn(&bench::ModeReport) -> f64| -> serde_json::Value {
        if reports.len() == 2 {
            json!(f(&reports[1]) / f(&reports[0]))
        } else {
            serde_json::Value::Null
        }
    };
    let mut report = header.clone();
    report["prompt_tokens"] = json!(a.prompt_tokens);
    report["gen_tokens"] = json!(a.gen_tokens);
    report["runs"] = json!(a.runs);
    report["warmup"] = json!(a.warmup);
    report["sparsity"] = json!(a.run.sparsity);
    let mut modes_json = serde_json::Map::new();
    for (mode, r) in modes.iter().zip(&reports) {
        modes_json.insert(mode.to_string(), json!(r));
    }
    report["modes"] = serde_json::Value::Object(modes_json);
    report["ratios"] = json!({
        "ttft": ratio(|r| r.ttft_ms.median),
        "decode": ratio(|r| r.decode_tok_s.median),
        "total": ratio(|r| r.total_tok_s.median),
    });
    if a.json {
        outln!("{report}");
        return Ok(());
    }
    outln!(
        "model {} | {}, KV cache {} | {} | {} | sparsity {}",
        header["model"].as_str().unwrap_or(""),
        a.run.dtype.name(),
        a.run.kv_dtype.name(),
        count(header["threads"].as_u64().unwrap_or(0) as usize, "thread"),
        header["cpu"].as_str().unwrap_or(""),
        a.run.sparsity
    );
    outln!(
        "prompt {}, {} generated, {} interleaved (median [min, max])",
        count(a.prompt_tokens, "token"),
        a.gen_tokens,
        count(a.runs, "run")
    );
    outln!(
        "| mode | TTFT ms | prefill tok/s | decode tok/s | total tok/s | decode GB/s | peak RSS MB | MLP density | inputs kept | weight bytes x |"
    );
    outln!("|---|---|---|---|---|---|---|---|---|---|");
    let s = |x: &bench::Stat| format!("{:.1} [{:.1}, {:.1}]", x.median, x.min, x.max);
    for (mode, r) in modes.iter().zip(&reports) {
        outln!(
            "| {mode} | {} | {} | {} | {} | {:.1} | {:.0} | {:.3} | {:.3} | {:.3} |",
            s(&r.ttft_ms),
            s(&r.prefill_tok_s),
            s(&r.decode_tok_s),
            s(&r.total_tok_s),
            r.decode_gb_s,
            r.peak_rss_mb,
            r.mlp_density,
            r.input_density,
            r.weight_bytes_ratio
        );
    }
    if reports.len() == 2 {
        outln!(
            "sparse/dense: decode x{:.3}, TTFT x{:.3}, total x{:.3}",
            report["ratios"]["decode"].as_f64().unwrap_or(0.0),
            report["ratios"]["ttft"].as_f64().unwrap_or(0.0),
            report["ratios"]["total"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// The benchmark's prompt: the first --prompt-tokens tokens of --text, checked against
/// the text's length and the model's context.
pub(crate) fn bench_prompt(a: &BenchArgs, l: &Loaded) -> Result<Vec<u32>> {
    let text = read_text(&a.text)?;
    let mut ids = l.tokenizer.encode(&text)?;
    if ids.len() < a.prompt_tokens {
        bail!(
            "{} has {}, fewer than --prompt-tokens {}",
            a.text.display(),
            count(ids.len(), "token"),
            a.prompt_tokens
        );
    }
    let total_ctx = a.prompt_tokens + a.gen_tokens;
    if total_ctx > l.model.config.max_position_embeddings {
        bail!(
            "--prompt-tokens + --gen-tokens = {total_ctx} exceeds the model's context ({})",
            l.model.config.max_position_embeddings
        );
    }
    ids.truncate(a.prompt_tokens);
    Ok(ids)
}

/// `bench --components`: the kernels' micro-benchmarks, then the model's decode step by
/// phase, dense and sparse.
pub(crate) fn bench_components(a: BenchArgs) -> Result<()> {
    let only = a.components_only.as_deref();
    let pool = pool::init_global(a.run.threads.unwrap_or_else(pool::default_threads));
    let mut report = json!({ "threads": pool.threads(), "cpu": bench::cpu_name() });
    if only != Some("model") {
        let kernels = sparsellm::sparse::bench::components(pool, a.runs);
        if !a.json {
            outln!("{}", kernels.markdown());
        }
        report["components"] = json!(kernels);
    }
    if only != Some("kernels") {
        let (header, modes) = decode_components(&a)?;
        if a.json {
            report["model"] = header["model"].clone();
            report["dtype"] = header["dtype"].clone();
            report["sparsity"] = json!(a.run.sparsity);
            report["prompt_tokens"] = json!(a.prompt_tokens);
            report["gen_tokens"] = json!(a.gen_tokens);
            report["runs"] = json!(a.runs);
            let mut m = serde_json::Map::new();
            for (mode, c) in &modes {
                m.insert(mode.to_string(), json!(c));
            }
            report["decode_components"] = serde_json::Value::Object(m);
        } else {
            print_decode_components(&a, &header, &modes)?;
        }
    }
    if a.json {
        outln!("{report}");
    }
    Ok(())
}

/// Loads the model once and times its decode steps by phase: dense, and sparse when
/// --sparsity asks, interleaved run by run so that a shared machine's drift hits both.
pub(crate) fn decode_components(
    a: &BenchArgs,
) -> Result<(
    serde_json::Value,
    Vec<(&'static str, bench::DecodeComponents)>,
)> {
    let l = load(&a.run)?;
    let prompt = &bench_prompt(a, &l)?;
    let mut sparse = bench_sparse_mlp(a, &l.model)?;
    let modes: &[&'static str] = if sparse.is_some() {
        &["dense", "sparse"]
    } else {
        &["dense"]
    };
    let mut pb = if a.json {
        Progress::hidden()
    } else {
        progress_bar(
            ((a.warmup + a.runs) * modes.len()) as u64,
            "components",
            "runs",
        )
    };
    let mut runs: Vec<Vec<bench::DecodeRun>> = vec![Vec::new(); modes.len()];
    for run in 0..a.warmup + a.runs {
        if run == a.warmup
            && let Some(sp) = sparse.as_mut()
        {
            sp.reset_stats();
        }
        for (m, mode) in modes.iter().enumerate() {
            pb.set_message(format!("components {mode}"));
            let mlp = if *mode == "sparse" {
                as_override(&mut sparse)
            } else {
                None
            };
            let r = bench::measure_decode_phases(&l.model, prompt, a.gen_tokens, mlp)?;
            if run >= a.warmup {
                runs[m].push(r);
            }
            pb.inc(1);
        }
    }
    pb.finish();
    let out = modes
        .iter()
        .zip(&runs)
        .map(|(&mode, r)| {
            let density = match mode {
                "sparse" => sparse.as_ref().and_then(|s| s.density()).unwrap_or(1.0),
                _ => 1.0,
            };
            (mode, bench::DecodeComponents::from_runs(r, density))
        })
        .collect();
    let header = json!({ "model": l.identity, "dtype": a.run.dtype.name() });
    Ok((header, out))
}

/// The sparse MLP of a benchmark: as --sparsity and friends ask, or scored by a seeded
/// random predictor (--random-predictor).
pub(crate) fn bench_sparse_mlp(a: &BenchArgs, model: &Llama) -> Result<Option<Sparsity>> {
    match a.random_predictor {
        None => sparse_mlp(&a.run, model),
        Some(_) if a.run.sparsity == "off" => Ok(None),
        Some(rank) => {
            let mut config: SparsityConfig = a.run.sparsity.parse()?;
            config.scorer = a.run.scorer.as_deref().map(str::parse).transpose()?;
            config.mode = a.run.sparse_mode.parse()?;
            let predictor = Predictor::random(&model.config, rank, 1);
            Ok(Some(Sparsity::Mlp(SparseMlp::new(
                model,
                config,
                Some(predictor),
            )?)))
        }
    }
}

/// The decode phases as a markdown table: phase x mode, ms per token and share of the
/// step.
pub(crate) fn print_decode_components(
    a: &BenchArgs,
    header: &serde_json::Value,
    modes: &[(&str, bench::DecodeComponents)],
) -> Result<()> {
    outln!(
        "model {} | {} | {} | sparsity {} | prompt {}, {} generated, {}",
        header["model"].as_str().unwrap_or(""),
        a.run.dtype.name(),
        count(pool::global().threads(), "thread"),
        a.run.sparsity,
        count(a.prompt_tokens, "token"),
        a.gen_tokens,
        count(a.runs, "run")
    );
    let mut phases: Vec<sparsellm::profile::Phase> = Vec::new();
    for p in sparsellm::profile::Phase::ALL {
        if modes
            .iter()
            .any(|(_, c)| c.ordered.iter().any(|&(q, _)| q == p))
        {
            phases.push(p);
        }
    }
    let head: Vec<String> = modes
        .iter()
        .map(|(m, _)| format!("{m} ms/token | {m} share"))
        .collect();
    outln!("| phase | {} |", head.join(" | "));
    outln!("|---|{}", "---|---|".repeat(modes.len()));
    let cell = |c: &bench::DecodeComponents, ms: Option<f64>| match ms {
        Some(ms) => format!("{ms:.3} | {:.1}%", 100.0 * ms / c.step_ms),
        None => " | ".to_owned(),
    };
    for p in phases {
        let cells: Vec<String> = modes
            .iter()
            .map(|(_, c)| {
                let ms = c.ordered.iter().find(|&&(q, _)| q == p).map(|&(_, ms)| ms);
                cell(c, ms)
            })
            .collect();
        outln!("| {} | {} |", p.name(), cells.join(" | "));
    }
    let row = |name: &str, f: &dyn Fn(&bench::DecodeComponents) -> f64| -> Result<()> {
        let cells: Vec<String> = modes.iter().map(|(_, c)| cell(c, Some(f(c)))).collect();
        outln!("| {name} | {} |", cells.join(" | "));
        Ok(())
    };
    row("**sum of phases**", &|c| c.phases_ms)?;
    row("unaccounted", &|c| c.unaccounted_ms)?;
    row("**decode step**", &|c| c.step_ms)?;
    let extra: Vec<String> = modes
        .iter()
        .map(|(m, c)| {
            format!(
                "{m}: {:.1} tok/s, MLP density {:.3}, {}",
                1e3 / c.step_ms,
                c.mlp_density,
                count(c.tokens as usize, "step")
            )
        })
        .collect();
    outln!("{}", extra.join("; "));
    Ok(())
}

/// One mode in this process: load, warm up, measure, print {"header", "sample"}.
pub(crate) fn bench_child(a: BenchArgs, mode: &str) -> Result<()> {
    // The dense runs use the dense layout, whatever the sparse mode's layout is.
    let l = match mode {
        "sparse" => load(&a.run)?,
        _ => load_as(&a.run, WeightLayout::RowMajor)?,
    };
    let prompt = &bench_prompt(&a, &l)?;
    let mut sparse = match mode {
        "sparse" => bench_sparse_mlp(&a, &l.model)?,
        _ => None,
    };
    for _ in 0..a.warmup {
        bench::measure(&l.model, prompt, a.gen_tokens, as_override(&mut sparse))?;
    }
    if let Some(sp) = sparse.as_mut() {
        sp.reset_stats();
    }
    let mut sample = bench::measure(&l.model, prompt, a.gen_tokens, as_override(&mut sparse))?;
    match sparse.as_ref() {
        Some(Sparsity::Input(s)) => {
            sample.mlp_density = 1.0;
            sample.input_density = s.density().unwrap_or(1.0);
            sample.weight_bytes_ratio = s.weight_bytes_ratio().unwrap_or(1.0);
        }
        Some(s) => sample.mlp_density = s.density().unwrap_or(1.0),
        None => sample.mlp_density = 1.0,
    }
    sample.peak_rss_mb = bench::peak_rss_mb();
    sample.weight_bytes_per_token = l.model.weight_bytes_per_token();
    let header = json!({
        "model": l.identity,
        "dtype": a.run.dtype.name(),
        "kv_dtype": l.model.kv_dtype.name(),
        "threads": pool::global().threads(),
        "cpu": bench::cpu_name(),
        "isa": format!("{:?}", sparsellm::kernels::dot::isa()),
    });
    outln!("{}", json!({ "header": header, "sample": sample }));
    Ok(())
}

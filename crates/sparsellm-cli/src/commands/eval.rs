//! `sparsellm eval`: perplexity of a text, and with --sparsity the cost against dense
//! (KL, top-1 agreement), or a sweep of settings with a plot.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use sparsellm::eval;
use sparsellm::kernels::pool;
use sparsellm::model::{MlpOverride, WeightLayout};
use sparsellm::progress::count;
use sparsellm::sparse::{InputSpec, Predictor, SparsityConfig};
use sparsellm::sweep;

use crate::args::*;
use crate::load::*;

#[derive(Args)]
pub(crate) struct EvalArgs {
    /// UTF-8 text file to score.
    #[arg(long)]
    pub(crate) text: PathBuf,
    /// Window length in tokens (at least 4); windows do not overlap and each is scored
    /// alone; tokens after the last whole window are not scored (the count is reported).
    #[arg(long, default_value_t = 512, value_parser = parse_window)]
    pub(crate) window: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub(crate) json: bool,
    /// With --sparsity or --sweep: also print each layer's achieved MLP density (a table;
    /// the array `layer_density` with --json).
    #[arg(long)]
    pub(crate) verbose: bool,
    /// Run a list of sparsity settings over the text (dense, exact scores at densities
    /// 0.25/0.5/0.75, sigma:0/0.5/1/2, the original sigma:2 on signed gate scores, and with
    /// --predictor lowrank, cascade and calibrated), each also timed on a short generation
    /// in this process, and write sweep.md, sweep.json and sweep.png into --out DIR:
    /// perplexity and decode tokens/s against MLP bytes read per token.
    #[arg(long, requires = "out")]
    pub(crate) sweep: bool,
    /// The sweep's output directory (created if missing).
    #[arg(long, value_name = "DIR", requires = "sweep")]
    pub(crate) out: Option<PathBuf>,
    /// The sweep's settings instead of the default list: comma-separated SPEC[@SCORER],
    /// e.g. "off,density:0.5@exact,sigma:1@exact,sigma:2@signed-gate,calibrated".
    #[arg(long, value_name = "LIST", requires = "sweep", value_parser = parse_sweep_settings)]
    pub(crate) sweep_settings: Option<String>,
    /// The sweep's decode timing: tokens generated (greedy) after the text's first 32
    /// tokens, per run.
    #[arg(long, default_value_t = 32, value_parser = parse_positive, requires = "sweep")]
    pub(crate) decode_tokens: usize,
    /// The sweep's decode timing: measured runs per setting (after one warm-up); the median
    /// is reported.
    #[arg(long, default_value_t = 3, value_parser = parse_positive, requires = "sweep")]
    pub(crate) decode_runs: usize,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

pub(crate) fn parse_sweep_settings(s: &str) -> std::result::Result<String, String> {
    sweep::parse_settings(s)
        .map(|_| s.to_owned())
        .map_err(|e| e.to_string())
}

pub(crate) fn cmd_eval(a: EvalArgs) -> Result<()> {
    let text = read_text(&a.text)?;
    if text.is_empty() {
        bail!("{}: the text is empty", a.text.display());
    }
    if a.sweep {
        if a.run.sparsity != "off" || a.run.scorer.is_some() {
            bail!(
                "--sweep runs its own settings: give them with --sweep-settings, not --sparsity or --scorer"
            );
        }
        if let Some(p) = &a.run.predictor {
            std::fs::metadata(p).with_context(|| format!("--predictor {}", p.display()))?;
        } else if let Some(list) = &a.sweep_settings
            && let Some(s) = sweep::parse_settings(list)?
                .iter()
                .find(|s| s.needs_predictor())
        {
            bail!("sweep setting '{s}' needs a predictor file (--predictor)");
        }
        let out = a.out.as_deref().context("--sweep needs --out DIR")?;
        check_output_dir("--out", out, false)?;
    } else {
        check_sparse_flags(&a.run, false)?;
    }
    let l = load(&a.run)?;
    // Each window starts with BOS when the vocabulary asks for it (as llama-perplexity).
    let bos = l.tokenizer.bos_token_id().filter(|_| l.tokenizer.add_bos());
    let ids = eval::with_bos_windows(l.tokenizer.encode_prompt(&text)?, a.window, bos);
    // Loaded once, its factors in the dtype the sparse MLP reads them in (so that its
    // bytes per token are counted as decoding reads them).
    let predictor = a
        .run
        .predictor
        .as_deref()
        .map(|p| sweep::load_predictor(p, &l.model))
        .transpose()?;
    if InputSpec::is_input_spec(&a.run.sparsity) {
        return eval_input(&a, &l, &ids);
    }
    let mode = a.run.sparse_mode.parse()?;
    if a.sweep {
        return eval_sweep(&a, &l, &ids, predictor.as_ref(), mode);
    }
    let config: SparsityConfig = a.run.sparsity.parse()?;
    let scorer = a.run.scorer.as_deref().map(str::parse).transpose()?;
    let mut sparse = sweep::build_sparse(&l.model, config, scorer, predictor.as_ref(), mode)?;
    if let Some(sp) = sparse.as_mut() {
        // Every position uses its own mask, as decoding would.
        sp.set_prefill_dense(false);
    }
    let mut pb = progress_bar(0, "eval", "windows");
    let r = eval::perplexity(
        &l.model,
        &ids,
        a.window,
        sparse.as_mut().map(|s| s as &mut dyn MlpOverride),
        |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        },
    )?;
    pb.finish();
    note_unscored(r.tokens_unscored, a.window);
    let bytes = sparse
        .as_ref()
        .and_then(|sp| eval::mlp_bytes(&l.model, sp, predictor.as_ref()));
    let layer_density = sparse.as_ref().map(|sp| sp.layer_density());
    if a.json {
        let mut v = json!({
            "tokens": r.tokens,
            "tokens_unscored": r.tokens_unscored,
            "windows": r.windows,
            "window": a.window,
            "ppl_all": r.ppl_all,
            "ppl_second_half": r.ppl_second_half,
            "dtype": a.run.dtype.name(),
        });
        if let Some(kl) = r.kl_vs_dense {
            v["kl_vs_dense"] = json!(kl);
            v["top1_agreement"] = json!(r.top1_agreement);
            v["mlp_density"] = json!(sparse.as_ref().and_then(|s| s.density()));
            v["mask_churn"] = json!(sparse.as_ref().and_then(|s| s.churn()));
            v["mlp_bytes_ratio"] = json!(bytes.map(|b| b.ratio()));
            v["predictor_bytes_ratio"] = json!(bytes.map(|b| b.predictor / b.dense));
            v["sparsity"] = json!(a.run.sparsity);
            v["scorer"] = json!(sparse.as_ref().map(|s| s.scorer().to_string()));
            if a.verbose {
                v["layer_density"] = json!(layer_density);
            }
        }
        outln!("{v}");
    } else {
        outln!(
            "{} in {} of {}: perplexity {:.4} (all predictions), {:.4} (second half of each window)",
            count(r.tokens, "token"),
            count(r.windows, "window"),
            a.window,
            r.ppl_all,
            r.ppl_second_half
        );
        if let (Some(kl), Some(top1), Some(sp)) = (r.kl_vs_dense, r.top1_agreement, sparse.as_ref())
        {
            outln!(
                "sparsity {} (scorer {}): MLP density {:.3} (mask churn {:.3} per token), KL(dense || sparse) {:.4} nats/token, top-1 agreement {:.3}",
                a.run.sparsity,
                sp.scorer(),
                sp.density().unwrap_or(1.0),
                sp.churn().unwrap_or(0.0),
                kl,
                top1
            );
            if let Some(b) = bytes {
                outln!(
                    "MLP bytes read per token: {:.3} of dense ({:.2} of {:.2} MB{})",
                    b.ratio(),
                    b.sparse / 1e6,
                    b.dense / 1e6,
                    if b.predictor > 0.0 {
                        format!(", predictor {:.3} of dense", b.predictor / b.dense)
                    } else {
                        String::new()
                    }
                );
            }
            if a.verbose {
                outln!("| layer | MLP density |");
                outln!("|---|---|");
                for (i, d) in layer_density.iter().flatten().enumerate() {
                    outln!("| {i} | {d:.3} |");
                }
            }
        }
    }
    Ok(())
}

/// Says on stderr how many tokens after the last whole window were not scored.
pub(crate) fn note_unscored(unscored: usize, window: usize) {
    if unscored > 0 {
        eprintln!(
            "sparsellm: the last {} of the text (less than a window of {window}) {} not scored",
            count(unscored, "token"),
            if unscored == 1 { "was" } else { "were" }
        );
    }
}

/// `eval --sweep`: every setting over the text, then the table, JSON and plot.
/// `eval` of an input-sparsity SPEC: each window's first half is the dense prompt, its
/// second half decoded sparse token by token (as generation runs it); the KL, agreement
/// and `ppl_second_half` measure the sparse positions.
pub(crate) fn eval_input(a: &EvalArgs, l: &Loaded, ids: &[u32]) -> Result<()> {
    let mut sp = input_sparsity(&a.run, &l.model)?;
    let mut pb = progress_bar(0, "eval", "windows");
    let r = eval::perplexity_with(
        &l.model,
        ids,
        a.window,
        Some(&mut sp),
        true,
        |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
        },
    )?;
    pb.finish();
    let groups = sp.group_density();
    let group_json: serde_json::Map<String, serde_json::Value> = sparsellm::model::InputGroup::ALL
        .iter()
        .map(|g| (g.name().to_string(), json!(groups[*g as usize])))
        .collect();
    if a.json {
        let mut v = json!({
            "tokens": r.tokens,
            "windows": r.windows,
            "window": a.window,
            "ppl_all": r.ppl_all,
            "ppl_second_half": r.ppl_second_half,
            "dtype": a.run.dtype.name(),
            "kl_vs_dense": r.kl_vs_dense,
            "top1_agreement": r.top1_agreement,
            "sparsity": a.run.sparsity,
            "input_density": sp.density(),
            "group_density": group_json,
            "weight_bytes_ratio": sp.weight_bytes_ratio(),
            "dense_prefix": true,
        });
        if a.verbose {
            v["layer_group_density"] = json!(sp.layer_group_density());
        }
        outln!("{v}");
    } else {
        outln!(
            "{} tokens in {} windows of {}: ppl {:.4} (second half, decoded sparse: {:.4}); KL vs dense {:.4}, top-1 agreement {:.3}; inputs kept {:.3}, weight bytes per token {:.3} of dense",
            r.tokens,
            r.windows,
            a.window,
            r.ppl_all,
            r.ppl_second_half,
            r.kl_vs_dense.unwrap_or(0.0),
            r.top1_agreement.unwrap_or(1.0),
            sp.density().unwrap_or(1.0),
            sp.weight_bytes_ratio().unwrap_or(1.0),
        );
        if a.verbose {
            for (l, d) in sp.layer_group_density().iter().enumerate() {
                outln!(
                    "layer {l:2}: qkv {:.3}  o {:.3}  gate_up {:.3}  down {:.3}",
                    d[0],
                    d[1],
                    d[2],
                    d[3]
                );
            }
        }
    }
    Ok(())
}

pub(crate) fn eval_sweep(
    a: &EvalArgs,
    l: &Loaded,
    ids: &[u32],
    predictor: Option<&Predictor>,
    mode: sparsellm::sparse::Mode,
) -> Result<()> {
    let out = a.out.as_deref().context("--sweep needs --out DIR")?;
    // Settings needing a predictor without one were refused before loading.
    let mut settings = match &a.sweep_settings {
        Some(list) => sweep::parse_settings(list)?,
        None => sweep::default_settings(),
    };
    // Input sparsity runs on a second copy of the weights, held input-major; where the
    // dtype cannot be (4- and 5-bit blocks), those settings are skipped with the reason.
    let mut cannot_run = Vec::new();
    let input_model = if settings.iter().any(sweep::Setting::is_input) {
        match load_as(&a.run, WeightLayout::InputMajor) {
            Ok(m) => Some(m),
            Err(e) => {
                let (input, rest): (Vec<_>, Vec<_>) =
                    settings.into_iter().partition(sweep::Setting::is_input);
                settings = rest;
                cannot_run = input.iter().map(|s| format!("{s} ({e:#})")).collect();
                None
            }
        }
    } else {
        None
    };
    let opts = sweep::SweepOptions {
        window: a.window,
        prompt_tokens: 32,
        gen_tokens: a.decode_tokens,
        runs: a.decode_runs,
        warmup: 1,
        mode,
    };
    let mut pb = progress_bar(settings.len() as u64, "sweep", "settings");
    let input = input_model.as_ref().map(|m| &m.model);
    let mut report = sweep::run(&l.model, input, ids, &settings, predictor, &opts, |p| {
        pb.set_length(p.settings as u64);
        if p.window < p.windows {
            pb.set_message(format!("{}, window {}/{}", p.name, p.window + 1, p.windows));
        } else {
            pb.set_message(format!("{}, decode timing", p.name));
        }
        pb.set_position(p.setting as u64);
    })?;
    pb.finish();
    report.skipped.extend(cannot_run);
    note_unscored(ids.len() - report.tokens, a.window);
    let path = model_path(&a.run.model)?;
    report.model = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    report.model_identity = l.identity.clone();
    report.text = a.text.display().to_string();
    report.dtype = a.run.dtype.name().to_string();
    report.threads = pool::global().threads();
    report.predictor = a.run.predictor.as_ref().map(|p| p.display().to_string());
    sweep::write_outputs(&report, out)?;
    if a.json {
        outln!("{}", json!(report));
    } else {
        out!("{}", sweep::markdown(&report));
        let sparse: Vec<&sweep::SweepRow> = report
            .rows
            .iter()
            .filter(|r| !r.layer_density.is_empty())
            .collect();
        if a.verbose && !sparse.is_empty() {
            outln!("\nMLP density per layer (input sparsity: the MLP's inputs kept, by bytes):\n");
            let names: Vec<&str> = sparse.iter().map(|r| r.setting.as_str()).collect();
            outln!("| layer | {} |", names.join(" | "));
            outln!("|---|{}", "---|".repeat(names.len()));
            for layer in 0..l.model.config.num_layers {
                let cells: Vec<String> = sparse
                    .iter()
                    .map(|r| format!("{:.3}", r.layer_density[layer]))
                    .collect();
                outln!("| {layer} | {} |", cells.join(" | "));
            }
        }
        outln!(
            "\nwrote {}, {} and {}",
            out.join("sweep.md").display(),
            out.join("sweep.json").display(),
            out.join("sweep.png").display()
        );
    }
    Ok(())
}

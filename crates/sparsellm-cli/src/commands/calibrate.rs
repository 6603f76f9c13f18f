//! `sparsellm calibrate`: fit neuron-score predictors, calibrated thresholds and input
//! sparsity tables on a text, into one predictor file.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;
use serde_json::json;
use sparsellm::model::WeightLayout;
use sparsellm::progress::Unit;
use sparsellm::sparse::Predictor;
use sparsellm::tensor::{DType, LoadDType};

use crate::args::*;
use crate::load::*;

#[derive(Args)]
pub(crate) struct CalibrateArgs {
    /// Calibration text (UTF-8). Never evaluate on the text you calibrate on.
    #[arg(long)]
    pub(crate) text: PathBuf,
    /// Output predictor file (safetensors; written atomically; its directory must exist).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Rank of the gate predictors.
    #[arg(long, default_value_t = 128, value_parser = parse_positive)]
    pub(crate) rank: usize,
    /// Rank of the up predictors (0: none; scores are then |silu(g)|).
    #[arg(long, default_value_t = 128, value_parser = parse_count)]
    pub(crate) up_rank: usize,
    /// At most this many tokens of the text are used (fit and held-out together).
    #[arg(long, default_value_t = 8192, value_parser = parse_positive)]
    pub(crate) max_tokens: usize,
    /// Quality budget of `--sparsity calibrated`: allowed relative perplexity increase
    /// over dense on held-out calibration text.
    #[arg(long, default_value_t = 0.05, value_parser = parse_budget)]
    pub(crate) budget: f64,
    /// The scorer the calibrated thresholds are for: lowrank or cascade[:F].
    #[arg(long, default_value = "lowrank", value_parser = parse_scorer)]
    pub(crate) scorer: String,
    /// Fit only the input-sparsity tables (teal:S, wina:S, teal:calibrated), no low-rank
    /// predictors.
    #[arg(long, conflicts_with = "no_input")]
    pub(crate) input_only: bool,
    /// Fit no input-sparsity tables.
    #[arg(long)]
    pub(crate) no_input: bool,
    /// Quality budget of `--sparsity teal:calibrated`: allowed perplexity increase over
    /// dense on held-out calibration windows decoded after a dense prompt (a margin below
    /// the +5% it should hold on text it never saw).
    #[arg(long, default_value_t = 0.03)]
    pub(crate) input_budget: f64,
    /// Print the report as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// How the weights are held during calibration: native (as the file stores them:
    /// GGUF's quantized blocks stay quantized), f32, bf16 or f16.
    #[arg(long, default_value = "native", value_parser = parse_load_dtype)]
    pub(crate) dtype: LoadDType,
    /// Worker threads (default: the number of physical cores).
    #[arg(long, value_parser = parse_threads)]
    pub(crate) threads: Option<usize>,
}

pub(crate) fn cmd_calibrate(a: CalibrateArgs) -> Result<()> {
    use sparsellm::sparse::calibrate::{CalibrationOptions, Stage, calibrate};
    check_output_file("--out", &a.out)?;
    let text = read_text(&a.text)?;
    let run = RunArgs {
        model: a.model.clone(),
        dtype: a.dtype,
        kv_dtype: Default::default(),
        threads: a.threads,
        sparsity: "off".into(),
        scorer: None,
        predictor: None,
        sparse_mode: "cached".into(),
    };
    if !(a.input_budget > 0.0 && a.input_budget.is_finite()) {
        bail!(
            "--input-budget {} must be a positive number",
            a.input_budget
        );
    }
    if a.input_only {
        let (l, tables) = calibrate_input_tables(&a, &run, &text)?;
        let p = Predictor::input_only(&l.model, tables);
        p.save(&a.out)?;
        outln!("wrote {}", a.out.display());
        return Ok(());
    }
    let l = load(&run)?;
    let ids = l.tokenizer.encode(&text)?;
    let opts = CalibrationOptions {
        rank: a.rank,
        up_rank: a.up_rank,
        max_tokens: a.max_tokens,
        budget: a.budget,
        scorer: a.scorer.parse()?,
        ..CalibrationOptions::default()
    };
    let mut pb = progress_bar(0, "calibrate", "windows");
    let (predictor, report) = calibrate(&l.model, &ids, &opts, |stage, done, total| {
        pb.set_message(format!("calibrate: {stage}"));
        pb.set_unit(Unit::Items(match stage {
            Stage::Record => "windows",
            Stage::Fit | Stage::Report | Stage::Sensitivity => "layers",
            Stage::Search => "evaluations",
            Stage::Verify => "checks",
        }));
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish();
    let mut predictor = predictor;
    if !a.no_input {
        drop(l);
        let (_, tables) = calibrate_input_tables(&a, &run, &text)?;
        predictor.input = Some(tables);
    }
    let _ = ids;
    predictor.save(&a.out)?;
    if a.json {
        outln!("{}", json!(report));
        return Ok(());
    }
    outln!(
        "| layer | rel. err g | rel. err u | recall@{:.2} | calibrated density | recall there |",
        opts.report_density
    );
    outln!("|---|---|---|---|---|---|");
    for r in &report.layers {
        outln!(
            "| {} | {:.3} | {} | {:.3} | {:.3} | {:.3} |",
            r.layer,
            r.gate_rel_err,
            r.up_rel_err
                .map(|e| format!("{e:.3}"))
                .unwrap_or_else(|| "-".into()),
            r.recall,
            r.density,
            r.recall_calibrated
        );
    }
    outln!(
        "fit on {} tokens, held out {}: dense ppl {:.3}, calibrated ppl {:.3} (x{:.3}, budget x{:.3}{}), KL {:.4}, mean MLP density {:.3}",
        report.fit_tokens,
        report.heldout_tokens,
        report.heldout_ppl_dense,
        report.heldout_ppl_sparse,
        report.heldout_ppl_ratio,
        1.0 + report.budget,
        if report.budget_met {
            ", met"
        } else {
            ", NOT met"
        },
        report.heldout_kl,
        report.mean_density
    );
    outln!("wrote {}", a.out.display());
    Ok(())
}

/// The input-sparsity tables of `calibrate`: the model loaded input-major (native when
/// the file's projections can be held so, i.e. float or Q8_0; in bf16 otherwise:
/// activations' quantiles barely depend on it, and the model's identity does not), the
/// quantiles and the `teal:calibrated` allocation; prints the allocation's figures.
pub(crate) fn calibrate_input_tables(
    a: &CalibrateArgs,
    run: &RunArgs,
    text: &str,
) -> Result<(Loaded, sparsellm::sparse::input::InputTables)> {
    use sparsellm::sparse::input::{InputCalibrationOptions, calibrate_input};
    let l = match load_as(run, WeightLayout::InputMajor) {
        Ok(l) => l,
        // Native 4- and 5-bit blocks are not held input-major.
        Err(_) if run.dtype == LoadDType::Native => {
            let mut run = run.clone();
            run.dtype = LoadDType::To(DType::BF16);
            load_as(&run, WeightLayout::InputMajor)?
        }
        Err(e) => return Err(e),
    };
    let ids = l.tokenizer.encode(text)?;
    let opts = InputCalibrationOptions {
        budget: a.input_budget,
        ..InputCalibrationOptions::default()
    };
    let mut pb = progress_bar(0, "calibrate input", "evaluations");
    let (tables, reports) = calibrate_input(&l.model, &ids, &opts, |stage, done, total| {
        pb.set_message(format!("calibrate input: {stage}"));
        pb.set_unit(Unit::Items(if stage == "record" {
            "windows"
        } else {
            "evaluations"
        }));
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish();
    if !a.json {
        outln!(
            "| qkv | o | gate_up | down | predicted KL | KL (held out) | ppl x (held out) | weight bytes x |"
        );
        outln!("|---|---|---|---|---|---|---|---|");
        for r in &reports {
            outln!(
                "| {:.2} | {:.2} | {:.2} | {:.2} | {:.4} | {:.4} | {:.4} | {:.3} |",
                r.sparsity[0],
                r.sparsity[1],
                r.sparsity[2],
                r.sparsity[3],
                r.predicted_kl,
                r.kl,
                r.ppl_ratio,
                r.weight_bytes_ratio
            );
        }
        let sp = tables.calibrated_sparsity.as_deref().unwrap_or_default();
        let best = reports
            .iter()
            .filter(|r| r.ppl_ratio <= 1.0 + a.input_budget)
            .min_by(|x, y| x.weight_bytes_ratio.total_cmp(&y.weight_bytes_ratio));
        match best {
            Some(b) => outln!(
                "teal:calibrated: mean sparsity (over layers, by bytes) qkv {:.2}, o {:.2}, gate_up {:.2}, down {:.2}; per layer from {:.2} to {:.2}: held-out ppl x{:.4} (budget x{:.3}), weight bytes per token x{:.3}",
                b.sparsity[0],
                b.sparsity[1],
                b.sparsity[2],
                b.sparsity[3],
                sp.iter().copied().fold(f32::INFINITY, f32::min),
                sp.iter().copied().fold(0f32, f32::max),
                b.ppl_ratio,
                1.0 + a.input_budget,
                b.weight_bytes_ratio
            ),
            None => outln!(
                "teal:calibrated: no allocation met the budget x{:.3} on the held-out windows: the thresholds keep every input",
                1.0 + a.input_budget
            ),
        }
    }
    Ok((l, tables))
}

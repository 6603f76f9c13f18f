//! `sparsellm eval --sweep` and the sparse-setting fields of `eval --json`
//! (`mlp_bytes_ratio`, `layer_density`), end to end through the binary on a short text.

#[macro_use]
#[path = "../../../tests/common/mod.rs"]
mod common;
#[path = "../../../tests/common/bin.rs"]
mod bin;

use std::ffi::OsString;

use bin::{Out, run};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// About 200 words of ordinary English: a few windows of 64 tokens.
const TEXT: &str = "The library stood at the end of a narrow street, between a bakery and a shop \
that repaired clocks. Every morning the librarian opened the heavy door, swept the steps and \
set out a small table of books that nobody had borrowed for a year. Most people walked past \
without looking, but a few stopped, turned the pages and sometimes carried a book inside to \
ask about it. The librarian liked those conversations more than anything else in the day. \
She would explain where the book had come from, who had given it to the library, and which \
other books on the shelves were like it. In the afternoon the children arrived from the school \
nearby. They read aloud to each other in the corner by the window, argued about the endings \
of stories and drew pictures of dragons on the backs of old catalogue cards. When the light \
began to fade, the librarian collected the cards, put the books back in their places and \
locked the door. On the way home she often thought about which books to put on the table the \
next morning, and whether anyone would stop to read them.";

fn text_file(dir: &Path) -> PathBuf {
    let p = dir.join("short.txt");
    std::fs::write(&p, TEXT).unwrap();
    p
}

fn json_of(o: &Out) -> Value {
    assert_eq!(o.code, Some(0), "{o:?}");
    serde_json::from_str(o.stdout.trim()).unwrap_or_else(|e| panic!("{e}: {o:?}"))
}

/// `eval --sweep` into `out` over `text` (windows of 64, 2 threads, one decode run of 8
/// tokens per setting), with `extra` flags.
fn sweep(out: &Path, text: &Path, extra: &[&str]) -> Out {
    let mut a = eval_args(text);
    a.extend(args![
        "--sweep",
        "--out",
        out,
        "--decode-tokens",
        "8",
        "--decode-runs",
        "1"
    ]);
    a.extend(extra.iter().map(OsString::from));
    run(&a)
}

/// `eval` over `text` with windows of 64, 2 threads, the default model.
fn eval_args(text: &Path) -> Vec<OsString> {
    args![
        "eval",
        "--text",
        text,
        "--window",
        "64",
        "--threads",
        "2",
        "--model",
        common::model_path()
    ]
}

fn eval_json(text: &Path, extra: &[&str]) -> Value {
    let mut a = eval_args(text);
    a.push("--json".into());
    a.extend(extra.iter().map(OsString::from));
    json_of(&run(&a))
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("{k}: {v}"))
}

#[test]
fn sweep_writes_table_json_and_plot() {
    let d = tempfile::tempdir().unwrap();
    let text = text_file(d.path());
    let out = d.path().join("sweep-out");
    let o = sweep(
        &out,
        &text,
        &["--sweep-settings", "off,density:0.5@exact,teal:0.3"],
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    assert!(o.stdout.contains("| setting |"), "{o:?}");
    // Q4_1 is held by input column for the input setting: it runs, natively.
    assert!(!o.stdout.contains("Skipped"), "{o:?}");
    for f in ["sweep.md", "sweep.json", "sweep.png"] {
        let p = out.join(f);
        assert!(p.is_file() && p.metadata().unwrap().len() > 0, "{f}: {o:?}");
    }
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert!(
        md.contains("| dense |")
            && md.contains("| density:0.5 exact |")
            && md.contains("| teal:0.3 |"),
        "{md}"
    );
    let png = std::fs::read(out.join("sweep.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap())
        .expect("sweep.json parses");
    assert_eq!(v["window"], 64, "{v}");
    assert!(v["windows"].as_u64().unwrap() >= 2, "{v}");
    assert!(
        v["decode_note"].as_str().unwrap().contains("this process"),
        "{v}"
    );
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 3, "{v}");
    for r in rows {
        for k in [
            "mlp_density",
            "mlp_bytes_ratio",
            "predictor_bytes_ratio",
            "ppl_all",
            "ppl_second_half",
            "ppl_ratio",
            "kl_vs_dense",
            "top1_agreement",
            "decode_ratio",
        ] {
            assert!(num(r, k).is_finite(), "{k}: {r}");
        }
        for k in ["median", "min", "max"] {
            assert!(r["decode_tok_s"][k].as_f64().unwrap() > 0.0, "{r}");
        }
        assert!(r["setting"].is_string() && r["sparsity"].is_string(), "{r}");
        assert!(r["layer_density"].is_array(), "{r}");
    }
    let (dense, sparse) = (&rows[0], &rows[1]);
    assert_eq!(dense["setting"], "dense");
    assert_eq!(dense["scorer"], Value::Null);
    assert_eq!(num(dense, "mlp_bytes_ratio"), 1.0);
    assert_eq!(num(dense, "ppl_ratio"), 1.0);
    assert_eq!(sparse["scorer"], "exact");
    assert_eq!(num(sparse, "mlp_density"), 0.5);
    assert_eq!(sparse["layer_density"].as_array().unwrap().len(), 30);
    // Exact scoring reads all of gate and up and half the down rows (Q8_0 copies).
    let b = num(sparse, "mlp_bytes_ratio");
    assert!(b > 0.5 && b < 1.5, "{b}");
    assert_eq!(num(sparse, "predictor_bytes_ratio"), 0.0);
    assert!(num(sparse, "kl_vs_dense") > 0.0, "{sparse}");
    // sweep.json reads back into the report, and the plot can be drawn again from it.
    let report: sparsellm::sweep::SweepReport =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap())
            .expect("sweep.json reads back");
    assert_eq!(report.rows.len(), 3);
    let again = out.join("again.png");
    sparsellm::sweep::plot(&report, &again).unwrap();
    assert!(
        std::fs::read(&again)
            .unwrap()
            .starts_with(b"\x89PNG\r\n\x1a\n")
    );
}

#[test]
fn sweep_places_input_and_neuron_sparsity_by_weight_bytes() {
    let d = tempfile::tempdir().unwrap();
    let text = text_file(d.path());
    let out = d.path().join("sweep-out");
    let settings = "off,teal:0.3,wina:0.3,density:0.5@exact";
    let o = sweep(
        &out,
        &text,
        &["--dtype", "bf16", "--sweep-settings", settings],
    );
    assert_eq!(o.code, Some(0), "{o:?}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap())
        .expect("sweep.json parses");
    assert_eq!(v["skipped"].as_array().unwrap().len(), 0, "{v}");
    let rows = v["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 4, "{v}");
    assert_eq!(num(&rows[0], "weight_bytes_ratio"), 1.0);
    for r in &rows[1..3] {
        // Every neuron computed; 30% of each projection's inputs skipped, the head dense.
        assert_eq!(r["scorer"], Value::Null, "{r}");
        assert_eq!(num(r, "mlp_density"), 1.0, "{r}");
        let (w, m) = (num(r, "weight_bytes_ratio"), num(r, "mlp_bytes_ratio"));
        assert!(w > 0.7 && w < 0.85 && m > 0.65 && m < 0.75, "{r}");
        assert_eq!(r["layer_density"].as_array().unwrap().len(), 30, "{r}");
        assert!(
            num(r, "kl_vs_dense") > 0.0 && num(r, "ppl_ratio").is_finite(),
            "{r}"
        );
    }
    // A neuron setting's weight bytes: its MLP's change, diluted by the rest of the model.
    let n = &rows[3];
    let (w, m) = (num(n, "weight_bytes_ratio"), num(n, "mlp_bytes_ratio"));
    let share = (1.0 - w) / (1.0 - m);
    assert!(m < 1.0 && share > 0.3 && share < 0.8, "{n}");
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    assert!(
        md.contains("| teal:0.3 |") && md.contains("| wina:0.3 |"),
        "{md}"
    );
    assert!(out.join("sweep.png").is_file());
}

#[test]
fn eval_json_reports_mlp_bytes_and_layer_density() {
    let d = tempfile::tempdir().unwrap();
    let text = text_file(d.path());
    let dense = eval_json(&text, &[]);
    assert!(dense.get("mlp_bytes_ratio").is_none(), "{dense}");
    let v = eval_json(
        &text,
        &[
            "--sparsity",
            "density:0.25",
            "--scorer",
            "exact",
            "--verbose",
        ],
    );
    let b = num(&v, "mlp_bytes_ratio");
    assert!(b > 0.0 && b < 2.0, "{v}");
    assert_eq!(num(&v, "predictor_bytes_ratio"), 0.0, "{v}");
    let layers = v["layer_density"].as_array().expect("layer_density");
    assert_eq!(layers.len(), 30, "{v}");
    assert!(layers.iter().all(|x| x.as_f64() == Some(0.25)), "{v}");
    // sigma:1 keeps a different number of neurons per layer, and reads fewer bytes the
    // fewer it keeps.
    let s = eval_json(&text, &["--sparsity", "sigma:1", "--scorer", "exact"]);
    let bs = num(&s, "mlp_bytes_ratio");
    assert!(bs > 0.0 && bs < 2.0, "{s}");
    assert_eq!(
        num(&s, "mlp_density") < num(&v, "mlp_density"),
        bs < b,
        "{s} {v}"
    );
    // All neurons on exact scores is the dense model computed token by token with the
    // sparse kernels. In f32 that is dense to rounding (the batched dense pass sums in
    // another order): not bit for bit, but within 1e-6. (Quantized weights are not compared:
    // the sparse path reads re-quantized Q8_0 down rows and 8-bit activations where the
    // batched dense pass widens tiles to bf16, a KL of ~0.005 apart.)
    let f32_dense = eval_json(&text, &["--dtype", "f32"]);
    let full = eval_json(
        &text,
        &[
            "--dtype",
            "f32",
            "--sparsity",
            "density:1.0",
            "--scorer",
            "exact",
        ],
    );
    assert_eq!(num(&full, "mlp_density"), 1.0, "{full}");
    for k in ["ppl_all", "ppl_second_half"] {
        let (a, b) = (num(&full, k), num(&f32_dense, k));
        assert!((a / b - 1.0).abs() < 1e-6, "{k}: {a} vs dense {b}");
    }
    assert!(num(&full, "kl_vs_dense") < 1e-8, "{full}");
    assert_eq!(num(&full, "top1_agreement"), 1.0, "{full}");
    // f32 weights: exact scoring at full density reads what dense reads.
    assert!(
        (num(&full, "mlp_bytes_ratio") - 1.0).abs() < 1e-12,
        "{full}"
    );
}

#[test]
fn sweep_flags_are_checked() {
    // --sweep needs --out (a usage error), and runs its own settings.
    let o = run(&args![
        "eval",
        "--sweep",
        "--text",
        "/usr/share/common-licenses/GPL-3"
    ]);
    assert_eq!(o.code, Some(2), "{o:?}");
    assert!(o.stderr.contains("--out"), "{o:?}");
    let o = run(&args![
        "eval",
        "--sweep-settings",
        "off",
        "--text",
        "/usr/share/common-licenses/GPL-3"
    ]);
    assert_eq!(o.code, Some(2), "{o:?}");
    let o = run(&args![
        "eval",
        "--sweep",
        "--out",
        "/tmp/unused",
        "--sweep-settings",
        "density:7",
        "--text",
        "/usr/share/common-licenses/GPL-3"
    ]);
    assert_eq!(o.code, Some(2), "{o:?}");
    assert!(o.stderr.contains("density:7"), "{o:?}");
    let o = run(&args![
        "eval",
        "--sweep",
        "--out",
        "/tmp/unused",
        "--sparsity",
        "density:0.5",
        "--text",
        "/usr/share/common-licenses/GPL-3"
    ]);
    assert_eq!(o.code, Some(1), "{o:?}");
    assert!(o.stderr.contains("--sweep-settings"), "{o:?}");
    let o = run(&args!["eval", "--help"]);
    for f in [
        "--sweep",
        "--out",
        "--sweep-settings",
        "--verbose",
        "--decode-tokens",
    ] {
        assert!(o.stdout.contains(f), "eval --help lacks {f}: {o:?}");
    }
}

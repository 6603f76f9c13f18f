//! Shared helpers of the integration tests: where the model and the reference fixtures are.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;

/// The weight names of one layer of a HuggingFace llama checkpoint, after
/// `model.layers.{l}.` and before `.weight`.
pub const LAYER_TENSORS: [&str; 9] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
];

/// The repository's root: the workspace root, where tests/fixtures, scripts/ and target/
/// are (integration tests of crates/sparsellm-cli include this module too).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .find(|d| d.join("tests").join("fixtures").is_dir())
        .expect("tests/fixtures above CARGO_MANIFEST_DIR")
}

/// The committed reference fixtures (tests/fixtures; tests/fixtures/README.md says how each
/// was made).
pub fn reference_dir() -> PathBuf {
    repo_root().join("tests").join("fixtures")
}

/// SmolLM2's tokenizer.json (with the Digits pre-tokenizer; see tests/fixtures/README.md).
pub fn tokenizer_json() -> PathBuf {
    reference_dir()
        .join("smollm2-135m-instruct")
        .join("tokenizer.json")
}

/// Where tests put what they generate (HF checkpoints, the F16 GGUF): target/test-data,
/// never the source tree.
pub fn test_data_dir() -> PathBuf {
    let d = repo_root().join("target").join("test-data");
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("create {}: {e}", d.display()));
    d
}

/// The reference fixture JSON.
pub fn reference() -> Value {
    let p = reference_dir().join("smollm2-135m-instruct-q4_1.json");
    let s = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).expect("reference JSON")
}

/// The default model, fetched on first use (into `$SPARSELLM_MODELS_DIR`, default ./models).
pub fn model_path() -> PathBuf {
    sparsellm::loader::fetch::default_model_path().expect("fetching the default model")
}

/// The default model loaded as `dtype` in `layout` (a fresh load each call).
pub fn load_model(
    dtype: impl Into<sparsellm::tensor::LoadDType>,
    layout: sparsellm::model::WeightLayout,
) -> sparsellm::model::Llama {
    let src = sparsellm::loader::open(&model_path()).expect("open model");
    let pool = sparsellm::kernels::pool::global();
    sparsellm::model::Llama::load_with_layout(src.as_ref(), dtype, pool, layout)
        .expect("load model")
}

/// Gemma 3 270M (Q4_K_M GGUF), fetched on first use as `sparsellm fetch gemma3-270m` does.
pub fn gemma3_model_path() -> PathBuf {
    static P: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    P.get_or_init(|| {
        use sparsellm::loader::fetch;
        let mut opts = fetch::FetchOptions::from_env();
        opts.progress = false;
        fetch::fetch_chunked(&fetch::GEMMA3_270M, &opts, false).expect("fetching gemma3-270m")
    })
    .clone()
}

/// Little-endian f32 values (as numpy's `tofile` writes them on this machine kind).
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A HuggingFace checkpoint of SmolLM2-135M-Instruct at `dtype` ("f32", "f16", "bf16"),
/// made once by `scripts/make_hf_checkpoint.py` from the default GGUF and
/// cached in `target/test-data/hf-<dtype>`. The script writes to a temporary directory
/// that is renamed into place only when it succeeded, so a half-written checkpoint is
/// never reused.
pub fn hf_checkpoint(dtype: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = repo_root();
    let data = test_data_dir();
    let out = data.join(format!("hf-{dtype}"));
    if out.join("config.json").is_file() {
        return out;
    }
    let gguf = model_path();
    let script = root.join("scripts").join("make_hf_checkpoint.py");
    let tmp = data.join(format!("hf-{dtype}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    python_file(
        &script,
        [
            gguf.as_os_str(),
            tmp.as_os_str(),
            OsStr::new("--dtype"),
            OsStr::new(dtype),
            OsStr::new("--tokenizer"),
            tokenizer_json().as_os_str(),
        ],
        &["gguf", "safetensors", "numpy"],
    );
    if std::fs::rename(&tmp, &out).is_err() {
        // Another test process finished first; use its copy.
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(
            out.join("config.json").is_file(),
            "could not place {}",
            out.display()
        );
    }
    out
}

/// `$SPARSELLM_MODELS_DIR`, default ./models under the repository root.
pub fn models_dir() -> PathBuf {
    // Empty counts as unset, as for the engine (`fetch::models_dir_from`).
    std::env::var_os("SPARSELLM_MODELS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models"))
}

/// Builds an argument list (`Vec<OsString>`) from string-likes and paths.
#[allow(unused_macros)]
macro_rules! args {
    ($($a:expr),* $(,)?) => {{
        let v: Vec<std::ffi::OsString> = vec![$(std::ffi::OsString::from($a)),*];
        v
    }};
}

/// The Python interpreter the tests run: `$SPARSELLM_PYTHON`, default `python3` (first on
/// PATH; `scripts/test` puts a venv with the packages the tests need there).
pub fn python_exe() -> std::ffi::OsString {
    std::env::var_os("SPARSELLM_PYTHON")
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into())
}

/// Fails the test, naming what is missing and how to get it, unless the test's Python
/// interpreter can import every module in `packages`.
pub fn require_python(packages: &[&str]) {
    static CHECKED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|e| e.into_inner());
    let wanted: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !checked.iter().any(|c| c == p))
        .collect();
    if wanted.is_empty() {
        return;
    }
    let exe = python_exe();
    let probe = "import importlib.util, sys\n\
                 print(', '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))";
    let out = match Command::new(&exe)
        .arg("-c")
        .arg(probe)
        .args(&wanted)
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!(
            "this test needs Python ({} could not be run: {e}) with the packages {}: \
             run the tests with scripts/test, which installs them in a venv under target/py, \
             or set SPARSELLM_PYTHON to an interpreter that has them",
            exe.to_string_lossy(),
            wanted.join(", ")
        ),
    };
    assert!(
        out.status.success(),
        "{} failed: {}",
        exe.to_string_lossy(),
        String::from_utf8_lossy(&out.stderr)
    );
    let missing = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        missing.is_empty(),
        "this test needs the Python package(s) {missing}, missing from {}: run the tests with \
         scripts/test (it installs gguf, safetensors and numpy in a venv under target/py), \
         or set SPARSELLM_PYTHON to an interpreter that has them",
        exe.to_string_lossy()
    );
    checked.extend(wanted.iter().map(|p| p.to_string()));
}

/// Runs `python3 -c script args...` after checking that `packages` are importable, and
/// returns its stdout; a failure fails the test with python's stderr.
pub fn python<I, S>(script: &str, args: I, packages: &[&str]) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_python(Some(script), None, args, packages)
}

/// Runs the Python script file `path` with `args`, as [`python`].
pub fn python_file<I, S>(path: &Path, args: I, packages: &[&str]) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_python(None, Some(path), args, packages)
}

fn run_python<I, S>(code: Option<&str>, file: Option<&Path>, args: I, packages: &[&str]) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    require_python(packages);
    let exe = python_exe();
    let mut cmd = Command::new(&exe);
    if let Some(code) = code {
        cmd.arg("-c").arg(code);
    }
    if let Some(file) = file {
        cmd.arg(file);
    }
    let out = cmd
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", exe.to_string_lossy()));
    assert!(
        out.status.success(),
        "{} {} failed ({}): {}",
        exe.to_string_lossy(),
        file.map_or("-c".into(), |f| f.display().to_string()),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

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

/// The shared reference directory (../shared/reference from the crate root).
pub fn reference_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/reference"))
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

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// A HuggingFace checkpoint of SmolLM2-135M-Instruct at `dtype` ("f32", "f16", "bf16"),
/// made once by `../shared/reference/make_hf_checkpoint.py` from the default GGUF and
/// cached in `target/test-data/hf-<dtype>`. The script writes to a temporary directory
/// that is renamed into place only when it succeeded, so a half-written checkpoint is
/// never reused.
pub fn hf_checkpoint(dtype: &str) -> PathBuf {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let data = root.join("target").join("test-data");
    let out = data.join(format!("hf-{dtype}"));
    if out.join("config.json").is_file() {
        return out;
    }
    let gguf = model_path();
    let script = root.join("../shared/reference/make_hf_checkpoint.py");
    std::fs::create_dir_all(&data).expect("create target/test-data");
    let tmp = data.join(format!("hf-{dtype}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let status = Command::new("python3")
        .arg(&script)
        .arg(&gguf)
        .arg(&tmp)
        .args(["--dtype", dtype])
        .status()
        .expect("run python3 (needs the gguf, safetensors and numpy packages)");
    assert!(status.success(), "{} failed: {status}", script.display());
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

/// What a run of the `sparsellm` binary left: exit code, stdout, stderr.
pub struct Out {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs the `sparsellm` binary with `args`.
pub fn run<I, S>(args: I) -> Out
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_sparsellm"))
        .args(args)
        // Never fetch from the network in these tests: every command gets --model.
        .env("SPARSELLM_MODELS_DIR", models_dir())
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run sparsellm");
    Out {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `$SPARSELLM_MODELS_DIR`, default ./models under the crate root.
pub fn models_dir() -> PathBuf {
    std::env::var_os("SPARSELLM_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"))
}

/// Builds an argument list (`Vec<OsString>`) from string-likes and paths.
#[allow(unused_macros)]
macro_rules! args {
    ($($a:expr),* $(,)?) => {{
        let v: Vec<std::ffi::OsString> = vec![$(std::ffi::OsString::from($a)),*];
        v
    }};
}

/// Runs `python3 -c script args...` (the tests that need it say which packages) and
/// returns its stdout; a failure fails the test with python's stderr.
pub fn python<I, S>(script: &str, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "python3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

//! Running the `sparsellm` binary from the integration tests of crates/sparsellm-cli (the
//! only package whose tests have `CARGO_BIN_EXE_sparsellm`).
#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::Command;

use crate::common::models_dir;

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

//! `sparsellm serve`: the OpenAI-compatible HTTP server (crates/sparsellm-server) on a
//! model loaded with the shared flags.

use anyhow::Result;
use clap::Args;
use sparsellm_server::ServerOptions;

use crate::args::*;
use crate::load::*;

#[derive(Args)]
#[command(after_long_help = "\
Endpoints: POST /v1/chat/completions, POST /v1/completions (JSON, or SSE with \"stream\": true), \
GET /v1/models, GET /health (never needs the key), GET /metrics (Prometheus text). \
Any `model` name is accepted in requests. SIGTERM or Ctrl-C stops accepting connections, \
finishes the requests in flight and exits 0. See docs/server.md.")]
pub(crate) struct ServeArgs {
    /// Address to listen on (loopback by default; 0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: String,
    /// Port to listen on (0: any free port; the listening line says which).
    #[arg(long, default_value_t = 8080)]
    pub(crate) port: u16,
    /// Sequences decoded together, each with its own KV cache (continuous batching:
    /// every step decodes one token of each in one batched forward pass).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_positive)]
    pub(crate) parallel: usize,
    /// Each request's context in tokens: prompt + max_tokens must fit, or the request
    /// gets a 400 (context_length_exceeded); KV memory is at most parallel × T positions.
    /// Default: the model's context, at most 4096.
    #[arg(long, value_name = "T", value_parser = parse_positive)]
    pub(crate) ctx_size: Option<usize>,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health (401 otherwise).
    #[arg(long, value_name = "KEY")]
    pub(crate) api_key: Option<String>,
    /// Requests that may wait for a free sequence; beyond that (parallel + Q running or
    /// waiting) a request is refused at once with 429.
    #[arg(long, value_name = "Q", default_value_t = 64, value_parser = parse_count)]
    pub(crate) max_queue: usize,
    /// Largest request body in MiB (413 beyond).
    #[arg(long, value_name = "MIB", default_value_t = 4, value_parser = parse_positive)]
    pub(crate) max_body_mib: usize,
    /// Prompt tokens read per scheduler step (smaller: running streams stall less while
    /// a long prompt is read; larger: faster prefill).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = parse_positive)]
    pub(crate) prefill_chunk: usize,
    /// The model name /v1/models lists and responses carry (default: the file name).
    #[arg(long, value_name = "NAME")]
    pub(crate) alias: Option<String>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

pub(crate) fn cmd_serve(a: ServeArgs) -> Result<()> {
    check_sparse_flags(&a.run, false)?;
    if a.api_key.as_deref() == Some("") {
        anyhow::bail!("--api-key must not be empty");
    }
    let sparse = sparse_settings(&a.run)?;
    let model = load_as(&a.run, sparse.layout())?;
    if let Some(t) = a.ctx_size
        && t > model.model.config.max_position_embeddings
    {
        anyhow::bail!(
            "--ctx-size {t} is larger than the model's context of {} tokens",
            model.model.config.max_position_embeddings
        );
    }
    sparsellm_server::run(ServerOptions {
        sparse,
        host: a.host,
        port: a.port,
        parallel: a.parallel,
        ctx_size: a.ctx_size,
        api_key: a.api_key,
        max_queue: a.max_queue,
        body_limit: a.max_body_mib << 20,
        prefill_chunk: a.prefill_chunk,
        model_id: a.alias,
        ..ServerOptions::new(model)
    })
}

//! sparsellm's OpenAI-compatible HTTP server (`sparsellm serve`): /v1/chat/completions,
//! /v1/completions (JSON or SSE streams), /v1/models, /health and /metrics, in front of a
//! continuous-batching scheduler that owns the model on one thread ([`scheduler`]).
//!
//! [`run`] serves until SIGTERM or Ctrl-C (then stops accepting, finishes the requests in
//! flight and returns); [`spawn`] serves on a background thread until its handle says
//! stop, for tests and embedding (port 0 picks a free port; the handle says which).

pub mod error;
pub mod metrics;
pub mod openai;
pub mod routes;
pub mod scheduler;

use std::fmt;
use std::hash::RandomState;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::{Context, Result, bail};
use sparsellm::session::{LoadedModel, SparseSettings};

use crate::metrics::{DensityKind, Metrics};
use crate::routes::AppState;
use crate::scheduler::{Queue, SchedulerConfig};

/// Default `--ctx-size`: the model's context, capped here (KV memory is bounded by
/// `parallel × ctx_size` positions).
pub const DEFAULT_CTX_CAP: usize = 4096;

/// Everything the server needs: the loaded model and how to serve it.
pub struct ServerOptions {
    pub model: LoadedModel,
    /// The sparse mode every request decodes with (off by default).
    pub sparse: SparseSettings,
    pub host: String,
    /// 0 picks a free port.
    pub port: u16,
    /// Sequences decoded together (each with its own KV cache).
    pub parallel: usize,
    /// Each sequence's context in tokens (prompt + max_tokens); None: the model's,
    /// capped at [`DEFAULT_CTX_CAP`].
    pub ctx_size: Option<usize>,
    /// Required as `Authorization: Bearer KEY` on every endpoint but /health.
    pub api_key: Option<String>,
    /// Requests that may wait for a slot; more are refused at once (429).
    pub max_queue: usize,
    /// Largest request body in bytes (413 beyond).
    pub body_limit: usize,
    /// Prompt tokens read per scheduler step by a prefilling sequence.
    pub prefill_chunk: usize,
    /// The name /v1/models lists (None: the model file's name).
    pub model_id: Option<String>,
}

impl ServerOptions {
    /// `model` served on 127.0.0.1:8080 with the defaults of `sparsellm serve`.
    pub fn new(model: LoadedModel) -> ServerOptions {
        ServerOptions {
            model,
            sparse: SparseSettings::default(),
            host: "127.0.0.1".into(),
            port: 8080,
            parallel: 4,
            ctx_size: None,
            api_key: None,
            max_queue: 64,
            body_limit: 4 << 20,
            prefill_chunk: 64,
            model_id: None,
        }
    }
}

/// What a started server serves, and where.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    pub addr: SocketAddr,
    pub model_id: String,
    pub parallel: usize,
    pub ctx_size: usize,
    /// KV cache memory if every slot fills its context: parallel × ctx_size positions.
    pub kv_bound_bytes: u64,
}

impl fmt::Display for ServerInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "sparsellm serve: listening on http://{} (model {}, parallel {}, ctx-size {}, KV cache at most {:.0} MiB)",
            self.addr,
            self.model_id,
            self.parallel,
            self.ctx_size,
            self.kv_bound_bytes as f64 / (1024.0 * 1024.0)
        )
    }
}

/// A bound server, ready to serve.
struct Server {
    listener: tokio::net::TcpListener,
    router: axum::Router,
    queue: Arc<Queue>,
    scheduler: std::thread::JoinHandle<()>,
    info: ServerInfo,
}

impl Server {
    async fn bind(o: ServerOptions) -> Result<Server> {
        let config = &o.model.model.config;
        let model_ctx = config.max_position_embeddings;
        let ctx_size = o.ctx_size.unwrap_or(model_ctx.min(DEFAULT_CTX_CAP));
        if o.parallel == 0 {
            bail!("--parallel must be at least 1");
        }
        if ctx_size < 2 {
            bail!("--ctx-size {ctx_size} is too small: at least 2 tokens");
        }
        if ctx_size > model_ctx {
            bail!("--ctx-size {ctx_size} is larger than the model's context of {model_ctx} tokens");
        }
        if o.api_key.as_deref() == Some("") {
            bail!("--api-key must not be empty");
        }
        // Keys and values for every layer, in the model's KV cache type.
        let kv_bytes_per_token = o.model.model.kv_bytes_per_token() as u64;
        let model_id = o.model_id.clone().unwrap_or_else(|| {
            o.model.path.file_name().map_or_else(
                || o.model.identity.clone(),
                |n| n.to_string_lossy().into_owned(),
            )
        });
        let density = if o.sparse.is_off() {
            DensityKind::None
        } else if o.sparse.is_input() {
            DensityKind::Input
        } else {
            DensityKind::Mlp
        };
        let metrics = Arc::new(Metrics::new(density).context("metrics")?);
        let listener = tokio::net::TcpListener::bind((o.host.as_str(), o.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", o.host, o.port))?;
        let addr = listener.local_addr()?;
        let queue = Arc::new(Queue::new(o.parallel, o.max_queue, metrics.clone()));
        let model = Arc::new(o.model);
        let scheduler = scheduler::start(
            model.clone(),
            o.sparse,
            SchedulerConfig {
                parallel: o.parallel,
                prefill_chunk: o.prefill_chunk,
            },
            queue.clone(),
            metrics.clone(),
        )?;
        let state = Arc::new(AppState {
            model,
            model_id: model_id.clone(),
            started: routes::unix_now(),
            queue: queue.clone(),
            metrics,
            ctx_size,
            api_key_digest: o.api_key.as_deref().map(routes::key_digest),
            next_id: AtomicU64::new(0),
            seeds: RandomState::new(),
            unseeded: AtomicU64::new(0),
        });
        Ok(Server {
            listener,
            router: routes::router(state, o.body_limit),
            queue,
            scheduler,
            info: ServerInfo {
                addr,
                model_id,
                parallel: o.parallel,
                ctx_size,
                kv_bound_bytes: o.parallel as u64 * ctx_size as u64 * kv_bytes_per_token,
            },
        })
    }

    /// Serves until `shutdown` completes, then stops accepting connections, lets the
    /// requests in flight finish (streams included) and stops the scheduler.
    async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await;
        self.queue.close();
        let scheduler = self.scheduler;
        let joined = tokio::task::spawn_blocking(move || scheduler.join()).await;
        served.context("serving HTTP")?;
        match joined {
            Ok(Ok(())) => Ok(()),
            _ => bail!("the scheduler thread panicked"),
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // The HTTP side is light (parsing, SSE framing): two workers leave the cores to the
    // model's thread pool.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("sparsellm-http")
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Serves `options` until SIGTERM or SIGINT (Ctrl-C), printing one line on stdout once
/// listening; then finishes the requests in flight and returns Ok.
pub fn run(options: ServerOptions) -> Result<()> {
    runtime()?.block_on(async move {
        let server = Server::bind(options).await?;
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            // A closed stdout must not stop the server.
            let _ = writeln!(out, "{}", server.info).and_then(|()| out.flush());
        }
        server.serve(shutdown_signal()).await
    })
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    eprintln!(
        "sparsellm serve: shutting down: no new connections; finishing the requests in flight"
    );
}

/// A server running on a background thread ([`spawn`]).
pub struct ServerHandle {
    pub info: ServerInfo,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl ServerHandle {
    pub fn addr(&self) -> SocketAddr {
        self.info.addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.info.addr)
    }

    /// Stops accepting, waits for the requests in flight, and returns how serving ended.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.thread.take().map(|t| t.join()) {
            None => Ok(()),
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the server thread panicked"),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// Starts serving `options` on a background thread with its own runtime; returns once
/// the server is listening (or could not start).
pub fn spawn(options: ServerOptions) -> Result<ServerHandle> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<ServerInfo>>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("sparsellm-server".into())
        .spawn(move || -> Result<()> {
            let rt = match runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return Ok(());
                }
            };
            rt.block_on(async move {
                match Server::bind(options).await {
                    Ok(server) => {
                        let _ = ready_tx.send(Ok(server.info.clone()));
                        server
                            .serve(async {
                                let _ = stop_rx.await;
                            })
                            .await
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        Ok(())
                    }
                }
            })
        })?;
    let info = match ready_rx.recv() {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("the server thread stopped while starting")),
    };
    match info {
        Ok(info) => Ok(ServerHandle {
            info,
            stop: Some(stop_tx),
            thread: Some(thread),
        }),
        Err(e) => {
            let _ = thread.join();
            Err(e)
        }
    }
}

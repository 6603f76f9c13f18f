//! The server's Prometheus metrics (GET /metrics, text format): requests by endpoint and
//! status, tokens in and out, queue depth, active sequences, time to first token and
//! per-token latency, decode batch sizes, and the achieved density of a sparse mode.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// The metrics, registered in their own registry (several servers in one process, as in
/// the tests, do not share counts).
pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
    pub queue_depth: IntGauge,
    pub active_sequences: IntGauge,
    pub kv_cache_tokens: IntGauge,
    pub disconnects: IntCounter,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub decode_batch_size: Histogram,
    /// MLP-neuron sparsity: the fraction of neurons kept (None when not that mode).
    pub mlp_density: Option<Gauge>,
    /// Input sparsity: the fraction of projection inputs kept.
    pub input_density: Option<Gauge>,
}

/// Which density gauge a sparse mode reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DensityKind {
    None,
    Mlp,
    Input,
}

impl Metrics {
    pub fn new(density: DensityKind) -> prometheus::Result<Metrics> {
        let registry = Registry::new_custom(Some("sparsellm".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "HTTP requests answered, by endpoint and status",
            ),
            &["endpoint", "status"],
        )?;
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let prompt_tokens = counter("prompt_tokens_total", "Prompt tokens admitted")?;
        let completion_tokens = counter("completion_tokens_total", "Tokens generated")?;
        let queue_depth = gauge("queue_depth", "Requests waiting for a sequence slot")?;
        let active_sequences = gauge(
            "active_sequences",
            "Sequences holding a slot (prefilling or decoding)",
        )?;
        let kv_cache_tokens = gauge(
            "kv_cache_tokens",
            "Positions held in the active sequences' KV caches",
        )?;
        let disconnects = counter(
            "client_disconnects_total",
            "Requests ended because their client went away",
        )?;
        let time_to_first_token = Histogram::with_opts(
            HistogramOpts::new(
                "time_to_first_token_seconds",
                "From a request's arrival (queueing included) to its first generated token",
            )
            .buckets(prometheus::exponential_buckets(0.005, 2.0, 15)?),
        )?;
        let time_per_output_token = Histogram::with_opts(
            HistogramOpts::new(
                "time_per_output_token_seconds",
                "Time between consecutive generated tokens of a sequence",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 13)?),
        )?;
        let decode_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "decode_batch_size",
                "Sequences decoded together in one batched forward step",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]),
        )?;
        let mlp_density = (density == DensityKind::Mlp)
            .then(|| {
                Gauge::new(
                    "mlp_density",
                    "Fraction of MLP neurons computed per token (since the server started)",
                )
            })
            .transpose()?;
        let input_density = (density == DensityKind::Input)
            .then(|| {
                Gauge::new(
                    "input_density",
                    "Fraction of projection inputs kept per token (since the server started)",
                )
            })
            .transpose()?;
        registry.register(Box::new(requests.clone()))?;
        for c in [&prompt_tokens, &completion_tokens, &disconnects] {
            registry.register(Box::new(c.clone()))?;
        }
        for g in [&queue_depth, &active_sequences, &kv_cache_tokens] {
            registry.register(Box::new(g.clone()))?;
        }
        for h in [
            &time_to_first_token,
            &time_per_output_token,
            &decode_batch_size,
        ] {
            registry.register(Box::new(h.clone()))?;
        }
        for g in [&mlp_density, &input_density].into_iter().flatten() {
            registry.register(Box::new(g.clone()))?;
        }
        Ok(Metrics {
            registry,
            requests,
            prompt_tokens,
            completion_tokens,
            queue_depth,
            active_sequences,
            kv_cache_tokens,
            disconnects,
            time_to_first_token,
            time_per_output_token,
            decode_batch_size,
            mlp_density,
            input_density,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Writing into a Vec fails only on a metric the encoder cannot express (none
        // here); then the page shows what was written.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

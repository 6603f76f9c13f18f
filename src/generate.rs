//! Text generation: sampling (greedy, temperature, top-k, top-p with a seeded RNG), stop
//! conditions (EOS, a token budget, the context limit), streaming of decoded text, and
//! the timings a user or benchmark wants (time to first token, decode tokens/s).

use std::time::Instant;

use crate::error::{Error, Result};
use crate::model::{Llama, Logits, MlpOverride};
use crate::tokenizer::Tokenizer;

/// How the next token is picked from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingOptions {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0: no limit).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Input(format!(
                "--temperature {} must be >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Input(format!(
                "--top-p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// A small, reproducible random number generator (SplitMix64): the same seed gives the
/// same text on every machine.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    opts: SamplingOptions,
    rng: SplitMix64,
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Sampler {
        Sampler {
            opts,
            rng: SplitMix64(opts.seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let o = self.opts;
        if o.temperature == 0.0 {
            return argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if o.top_k > 0 && o.top_k < cand.len() {
            cand.select_nth_unstable_by(o.top_k - 1, by_logit);
            cand.truncate(o.top_k);
        }
        cand.sort_unstable_by(by_logit);
        let max = cand[0].1;
        let mut probs: Vec<f64> = cand
            .iter()
            .map(|&(_, l)| (((l - max) / o.temperature) as f64).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if o.top_p < 1.0 {
            let mut acc = 0.0;
            let keep = probs
                .iter()
                .position(|&p| {
                    acc += p;
                    acc >= o.top_p as f64
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut r = self.rng.next_f64() * total;
        for (i, &p) in probs.iter().enumerate() {
            if r < p {
                return cand[i].0;
            }
            r -= p;
        }
        cand[probs.len() - 1].0
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Eos,
    MaxTokens,
    /// The model's context is full.
    ContextFull,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampling: SamplingOptions,
    /// Stop at an end-of-sequence token (benchmarks turn this off for a fixed length).
    pub stop_at_eos: bool,
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub output_ids: Vec<u32>,
    pub text: String,
    pub stop: StopReason,
    /// From the start of prefill to the first sampled token.
    pub ttft_ms: f64,
    pub prefill_tok_s: f64,
    /// Tokens after the first, per second of decoding.
    pub decode_tok_s: f64,
    pub total_ms: f64,
}

/// Generates from `prompt_ids`, calling `on_text` with each newly completed piece of text.
pub fn generate(
    model: &Llama,
    tokenizer: Option<&Tokenizer>,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    mut mlp: Option<&mut (dyn MlpOverride + '_)>,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    opts.sampling.validate()?;
    if prompt_ids.is_empty() {
        return Err(Error::Input("the prompt is empty".into()));
    }
    let ctx = model.config.max_position_embeddings;
    if prompt_ids.len() >= ctx {
        return Err(Error::Input(format!(
            "the prompt has {} tokens but the model's context is {ctx} tokens",
            prompt_ids.len()
        )));
    }
    let eos = &model.config.eos_token_ids;
    // A model whose vocabulary is larger than its tokenizer's (a synthetic checkpoint, or
    // padded embeddings) must not emit ids the tokenizer cannot decode.
    let vocab = tokenizer.map_or(model.config.vocab_size, |t| {
        t.vocab_size().min(model.config.vocab_size)
    });
    let mut sampler = Sampler::new(opts.sampling);
    let mut stream = tokenizer.map(|t| t.stream_decoder());
    let mut text = String::new();
    let mut cache = model.new_cache();
    let start = Instant::now();
    let mut output = Vec::new();
    let mut stop = StopReason::MaxTokens;
    let mut ttft = 0.0;
    let mut first_at = start;
    let mut prefill_s = 0.0;
    if opts.max_tokens > 0 {
        let mut logits = model.forward(prompt_ids, &mut cache, Logits::Last, mlp.as_deref_mut())?;
        prefill_s = start.elapsed().as_secs_f64();
        loop {
            let next = sampler.sample(&logits[..vocab]);
            if output.is_empty() {
                first_at = Instant::now();
                ttft = (first_at - start).as_secs_f64() * 1e3;
            }
            if opts.stop_at_eos && eos.contains(&next) {
                stop = StopReason::Eos;
                break;
            }
            output.push(next);
            if let Some(s) = stream.as_mut() {
                let piece = s.push(next)?;
                if !piece.is_empty() {
                    on_text(&piece);
                    text.push_str(&piece);
                }
            }
            if output.len() >= opts.max_tokens {
                break;
            }
            if cache.len() >= ctx {
                stop = StopReason::ContextFull;
                break;
            }
            logits = model.forward(&[next], &mut cache, Logits::Last, mlp.as_deref_mut())?;
        }
    }
    if let Some(s) = stream.as_mut() {
        let rest = s.finish()?;
        if !rest.is_empty() {
            on_text(&rest);
            text.push_str(&rest);
        }
    }
    let end = Instant::now();
    let decode_s = (end - first_at).as_secs_f64();
    let decoded = output.len().saturating_sub(1);
    Ok(Generation {
        output_ids: output,
        text,
        stop,
        ttft_ms: ttft,
        prefill_tok_s: if prefill_s > 0.0 {
            prompt_ids.len() as f64 / prefill_s
        } else {
            0.0
        },
        decode_tok_s: if decoded > 0 && decode_s > 0.0 {
            decoded as f64 / decode_s
        } else {
            0.0
        },
        total_ms: (end - start).as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_seeded_sampling_repeats() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 101) as f32 / 10.0).collect();
        let mut g = Sampler::new(SamplingOptions::default());
        assert_eq!(g.sample(&logits), argmax(&logits));
        let o = SamplingOptions {
            temperature: 0.8,
            top_k: 20,
            top_p: 0.9,
            seed: 42,
        };
        let a: Vec<u32> = {
            let mut s = Sampler::new(o);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(o);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        // top-k 20 keeps only the 20 largest logits.
        let mut sorted = logits.clone();
        sorted.sort_by(|x, y| y.total_cmp(x));
        assert!(a.iter().all(|&t| logits[t as usize] >= sorted[19]));
        // Different seeds give different draws.
        let mut s = Sampler::new(SamplingOptions { seed: 7, ..o });
        let c: Vec<u32> = (0..50).map(|_| s.sample(&logits)).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn top_p_tiny_is_greedy() {
        let logits = [1.0, 5.0, 2.0, 4.9];
        let mut s = Sampler::new(SamplingOptions {
            temperature: 1.0,
            top_k: 0,
            top_p: 1e-6,
            seed: 3,
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
    }
}

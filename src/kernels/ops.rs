//! Element-wise and per-vector operations of the forward pass: RMSNorm, RoPE, softmax,
//! SiLU-times-up. They touch activations only (kilobytes per token), so plain loops the
//! compiler vectorises are enough; the weight-reading kernels are in `linear`.

/// `out = x / sqrt(mean(x^2) + eps) * weight`. x, weight, out: [n].
pub fn rmsnorm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    debug_assert_eq!(x.len(), weight.len());
    let ss: f32 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (ss + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// Rotates the heads in `x` ([heads * head_dim]) for position `pos`.
///
/// `inv_freq`: [head_dim / 2]. `interleaved`: rotate pairs (2i, 2i+1) (GGUF's layout)
/// rather than (i, i + head_dim/2) (HuggingFace's).
pub fn rope(x: &mut [f32], head_dim: usize, pos: usize, inv_freq: &[f32], interleaved: bool) {
    let half = head_dim / 2;
    let (sin, cos): (Vec<f32>, Vec<f32>) = inv_freq
        .iter()
        .map(|&f| {
            // The angle in f32, as transformers computes it (inv_freq @ position in f32).
            let a = pos as f32 * f;
            (a.sin(), a.cos())
        })
        .unzip();
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

/// In-place softmax over `x`.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `gate[i] = silu(gate[i]) * up[i]`: SwiGLU's element-wise part.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu(*g) * u;
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// `log(sum(exp(x)))`, stable.
pub fn logsumexp(x: &[f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    max + s.ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_styles_agree_under_permutation() {
        // GGUF's interleaved layout is HF's halves layout with rows permuted: rotating the
        // permuted vector interleaved equals permuting the halves-rotated one.
        let d = 8;
        let inv: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / 100f32.powf(2.0 * i as f32 / d as f32))
            .collect();
        let hf: Vec<f32> = (0..d).map(|i| i as f32 + 0.5).collect();
        // interleaved position 2i <- hf i, 2i+1 <- hf i + d/2
        let perm = |v: &[f32]| -> Vec<f32> {
            (0..d)
                .map(|j| {
                    if j % 2 == 0 {
                        v[j / 2]
                    } else {
                        v[j / 2 + d / 2]
                    }
                })
                .collect()
        };
        let mut a = hf.clone();
        rope(&mut a, d, 7, &inv, false);
        let mut b = perm(&hf);
        rope(&mut b, d, 7, &inv, true);
        for (x, y) in perm(&a).iter().zip(&b) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = vec![1.0, 2.0, 3.0, -1e9];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
    }
}

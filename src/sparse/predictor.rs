//! Low-rank activation predictors: per layer `ĝ = (h·A_g)·B_g` and optionally
//! `û = (h·A_u)·B_u`, scoring each neuron by `|silu(ĝ_i)·û_i|` (or `|silu(ĝ_i)|`). Owns
//! the predictor file format (safetensors + metadata naming the model), its validation,
//! and the model identity a file is checked against.
//!
//! File layout (`format_version` 1): tensors `layers.{i}.a_gate` [hidden, rank],
//! `layers.{i}.b_gate` [rank, intermediate], optionally `layers.{i}.a_up` [hidden, up_rank]
//! and `layers.{i}.b_up` [up_rank, intermediate], optionally `thresholds` [layers] (the
//! per-layer cut-offs of `calibrated`); metadata `model` (see [`model_identity`]), `rank`,
//! `up_rank` (0: no up predictor), `format_version`, plus any provenance keys
//! ([`Predictor::metadata`]: calibration text hash, budget, ...). All tensors F32
//! (F16/BF16 accepted on load). In memory `A` is kept transposed (`A^T` [rank, hidden]: z
//! is a matvec) and `B` as in the file (`[rank, intermediate]`: the scores are
//! combinations of its rows, by ranges of columns); see `kernels::sparse::lowrank_scores`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::error::{Error, Result};
use crate::kernels::dot::{bf16_to_f32, f32_to_bf16};
use crate::kernels::sparse::{LowRankView, lowrank_scores};
use crate::kernels::{ThreadPool, WeightView};
use crate::loader::safetensors::SafetensorsFile;
use crate::model::{Llama, ModelConfig};
use crate::sparse::input::{InputTables, LEVELS};
use crate::tensor::{DType, Matrix};

/// The predictor file format this code writes and reads.
pub const FORMAT_VERSION: &str = "1";

/// The model's identity, which a predictor file records: [`Llama::identity`].
pub fn model_identity(model: &Llama) -> String {
    model.identity().to_string()
}

/// A factor's values in a compute dtype.
#[derive(Clone)]
enum Factor {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Factor {
    fn view(&self) -> WeightView<'_> {
        match self {
            Factor::F32(v) => WeightView::F32(v),
            Factor::Bf16(v) => WeightView::Bf16(v),
        }
    }
    fn len(&self) -> usize {
        self.view().len()
    }
    fn to_f32(&self) -> Vec<f32> {
        match self {
            Factor::F32(v) => v.clone(),
            Factor::Bf16(v) => v.iter().map(|&b| bf16_to_f32(b)).collect(),
        }
    }
    fn convert_to(&mut self, dtype: DType) {
        *self = match (&*self, dtype) {
            (Factor::F32(v), DType::BF16) => {
                Factor::Bf16(v.iter().map(|&x| f32_to_bf16(x)).collect())
            }
            (Factor::Bf16(_), DType::F32) => Factor::F32(self.to_f32()),
            _ => return,
        };
    }
}

/// One low-rank factorisation `W ≈ A·B` of a projection, stored transposed, in f32 as
/// loaded or in the model's dtype once a sparse MLP uses it (bf16 halves the bytes each
/// token reads; the scores only rank neurons).
#[derive(Clone)]
pub struct LowRank {
    pub rank: usize,
    /// A^T: [rank, hidden] (each z_r is a dot product with a row).
    at: Factor,
    /// B: [rank, intermediate] (the output is a combination of its rows, computed by
    /// ranges of columns: long contiguous reads, where B^T's rows are only `rank` long).
    b: Factor,
}

impl LowRank {
    /// From the file layout: `a` [hidden, rank], `b` [rank, inter].
    pub fn from_ab(a: &[f32], b: &[f32], hidden: usize, rank: usize, inter: usize) -> LowRank {
        assert_eq!(a.len(), hidden * rank);
        assert_eq!(b.len(), rank * inter);
        LowRank {
            rank,
            at: Factor::F32(transpose(a, hidden, rank)),
            b: Factor::F32(b.to_vec()),
        }
    }

    /// A [hidden, rank] and B [rank, inter] in the file layout.
    fn to_ab(&self, hidden: usize, inter: usize) -> (Vec<f32>, Vec<f32>) {
        debug_assert_eq!(self.b.len(), self.rank * inter);
        (
            transpose(&self.at.to_f32(), self.rank, hidden),
            self.b.to_f32(),
        )
    }

    fn view(&self) -> LowRankView<'_> {
        LowRankView {
            at: self.at.view(),
            b: self.b.view(),
            rank: self.rank,
        }
    }

    /// Values read per prediction.
    pub fn numel(&self) -> usize {
        self.at.len() + self.b.len()
    }

    /// Keeps the factors in `dtype` from now on (saving still writes f32).
    pub fn convert_to(&mut self, dtype: DType) {
        self.at.convert_to(dtype);
        self.b.convert_to(dtype);
    }
}

/// `m` ([rows, cols], row-major) transposed: [cols, rows].
pub(crate) fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

/// One layer's predictors.
#[derive(Clone)]
pub struct LayerPredictor {
    pub gate: LowRank,
    pub up: Option<LowRank>,
}

/// Scratch of [`Predictor::scores`], reused across tokens.
#[derive(Default)]
pub struct PredictorScratch {
    z: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    hb: Vec<u16>,
}

/// Per-layer low-rank predictors for one model.
#[derive(Clone)]
pub struct Predictor {
    /// The [`model_identity`] of the model it was fitted to.
    pub model: String,
    pub hidden: usize,
    pub intermediate: usize,
    /// Rank of the gate predictors.
    pub rank: usize,
    /// Rank of the up predictors; 0 when there are none.
    pub up_rank: usize,
    pub layers: Vec<LayerPredictor>,
    /// Per-layer cut-offs for `calibrated`, when the file holds them.
    pub thresholds: Option<Vec<f32>>,
    /// Input-sparsity tables (TEAL/WINA quantiles, `teal:calibrated`), when the file
    /// holds them. A file may hold only these (`rank` 0, no layers).
    pub input: Option<InputTables>,
    /// Further file metadata (provenance: calibration text hash, budget, ...), saved and
    /// loaded as is; the keys the format itself uses (see [`RESERVED_METADATA`]) are not
    /// allowed here and are skipped on save.
    pub metadata: BTreeMap<String, String>,
}

/// Metadata keys the file format owns.
pub const RESERVED_METADATA: [&str; 5] =
    ["model", "rank", "up_rank", "format_version", "num_layers"];

/// A small deterministic generator (xorshift64*) for random predictors and test data.
pub(crate) struct Rng(u64);
impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    /// Uniform in [-1, 1).
    pub(crate) fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545F4914F6CDD1D);
        ((v >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub(crate) fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next_f32() * scale).collect()
    }
}

impl Predictor {
    /// Random predictors of rank `rank` for gate and up: for tests and benchmarks only
    /// (they predict nothing). Model identity `random`.
    pub fn random(config: &ModelConfig, rank: usize, seed: u64) -> Predictor {
        Self::random_shape(
            config.hidden_size,
            config.intermediate_size,
            config.num_layers,
            rank,
            seed,
        )
    }

    /// As [`random`](Self::random), for `layers` layers of shape hidden x inter.
    pub fn random_shape(h: usize, i: usize, layers: usize, rank: usize, seed: u64) -> Predictor {
        let mut rng = Rng::new(seed);
        // Uniform scale sqrt(3/fan_in) keeps (h·A)·B at the variance of h.
        let sa = (3.0 / h as f32).sqrt();
        let sb = (3.0 / rank.max(1) as f32).sqrt();
        let lr = |rng: &mut Rng| {
            LowRank::from_ab(&rng.vec(h * rank, sa), &rng.vec(rank * i, sb), h, rank, i)
        };
        let layers = (0..layers)
            .map(|_| LayerPredictor {
                gate: lr(&mut rng),
                up: Some(lr(&mut rng)),
            })
            .collect();
        Predictor {
            model: "random".into(),
            hidden: h,
            intermediate: i,
            rank,
            up_rank: rank,
            layers,
            thresholds: None,
            input: None,
            metadata: BTreeMap::new(),
        }
    }

    /// A predictor file holding only input-sparsity tables (no low-rank factors).
    pub fn input_only(model: &Llama, input: InputTables) -> Predictor {
        Predictor {
            model: model_identity(model),
            hidden: model.config.hidden_size,
            intermediate: model.config.intermediate_size,
            rank: 0,
            up_rank: 0,
            layers: Vec::new(),
            thresholds: None,
            input: Some(input),
            metadata: BTreeMap::new(),
        }
    }

    /// Writes `out[i]` = the predicted `|silu(g_i)·u_i|` (or `|silu(g_i)|` without an up
    /// predictor) for layer `layer`. h: [hidden], out: [intermediate].
    pub fn scores(
        &self,
        pool: &ThreadPool,
        layer: usize,
        h: &[f32],
        scratch: &mut PredictorScratch,
        out: &mut [f32],
    ) {
        let p = &self.layers[layer];
        let s = scratch;
        assert_eq!(out.len(), self.intermediate);
        lowrank_scores(
            pool,
            p.gate.view(),
            p.up.as_ref().map(LowRank::view),
            h,
            &mut s.hb,
            &mut s.z,
            &mut s.g,
            &mut s.u,
            out,
        );
    }

    /// Keeps every factor in `dtype` (what [`SparseMlp`](crate::sparse::SparseMlp) does
    /// with the model's dtype).
    pub fn convert_to(&mut self, dtype: DType) {
        for l in &mut self.layers {
            l.gate.convert_to(dtype);
            if let Some(u) = &mut l.up {
                u.convert_to(dtype);
            }
        }
    }

    /// Values one prediction reads for one layer (the predictor's memory traffic).
    pub fn numel_per_layer(&self) -> usize {
        self.layers
            .first()
            .map(|l| l.gate.numel() + l.up.as_ref().map_or(0, LowRank::numel))
            .unwrap_or(0)
    }

    /// The dtype a sparse MLP keeps the factors in for a model whose MLP weights are
    /// `weights`: f32 for f32 weights, bf16 otherwise (bf16 halves the bytes each token
    /// reads; f16 and quantized models use bf16 factors).
    pub fn factor_dtype_for(weights: DType) -> DType {
        if weights == DType::F32 {
            DType::F32
        } else {
            DType::BF16
        }
    }

    /// Bytes one prediction reads for layer `layer` (every factor once), with the factors
    /// in the dtype they are held in now (see [`convert_to`](Self::convert_to)).
    pub fn bytes_per_layer(&self, layer: usize) -> usize {
        let l = &self.layers[layer];
        let bytes = |f: &Factor| match f {
            Factor::F32(v) => 4 * v.len(),
            Factor::Bf16(v) => 2 * v.len(),
        };
        let lr = |x: &LowRank| bytes(&x.at) + bytes(&x.b);
        lr(&l.gate) + l.up.as_ref().map_or(0, lr)
    }

    /// Writes the predictor to `path` atomically (a temporary file in the same directory,
    /// renamed into place), with the mode any new file gets (0666 less the umask: 0644
    /// under umask 022). Errors name `path`, never the temporary file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let perr = |m: String| Error::Predictor(format!("{}: {m}", path.display()));
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        let (h, i) = (self.hidden, self.intermediate);
        for (l, p) in self.layers.iter().enumerate() {
            let (a, b) = p.gate.to_ab(h, i);
            tensors.push((
                format!("layers.{l}.a_gate"),
                vec![h, p.gate.rank],
                f32_bytes(&a),
            ));
            tensors.push((
                format!("layers.{l}.b_gate"),
                vec![p.gate.rank, i],
                f32_bytes(&b),
            ));
            if let Some(up) = &p.up {
                let (a, b) = up.to_ab(h, i);
                tensors.push((format!("layers.{l}.a_up"), vec![h, up.rank], f32_bytes(&a)));
                tensors.push((format!("layers.{l}.b_up"), vec![up.rank, i], f32_bytes(&b)));
            }
        }
        if let Some(t) = &self.thresholds {
            tensors.push(("thresholds".into(), vec![t.len()], f32_bytes(t)));
        }
        if let Some(t) = &self.input {
            let shape = vec![t.layers, 4, LEVELS];
            tensors.push(("input.teal".into(), shape.clone(), f32_bytes(&t.teal)));
            tensors.push(("input.wina".into(), shape, f32_bytes(&t.wina)));
            if let (Some(c), Some(s)) = (&t.calibrated, &t.calibrated_sparsity) {
                tensors.push(("input.calibrated".into(), vec![t.layers, 4], f32_bytes(c)));
                tensors.push((
                    "input.calibrated_sparsity".into(),
                    vec![t.layers, 4],
                    f32_bytes(s),
                ));
            }
        }
        let views = tensors
            .iter()
            .map(|(name, shape, data)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                    .map(|v| (name.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| perr(e.to_string()))?;
        let mut meta: HashMap<String, String> = self
            .metadata
            .iter()
            .filter(|(k, _)| !RESERVED_METADATA.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        meta.extend(
            [
                ("model", self.model.clone()),
                ("rank", self.rank.to_string()),
                ("up_rank", self.up_rank.to_string()),
                ("format_version", FORMAT_VERSION.to_string()),
                ("num_layers", self.layers.len().to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
        );
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| perr(e.to_string()))?;
        write_atomic(path, &bytes)
    }

    /// Reads a predictor for `model`; refuses files for another model and files whose
    /// shapes do not fit its config.
    pub fn load(path: &Path, model: &Llama) -> Result<Predictor> {
        Self::load_for(path, &model.config, &model_identity(model))
    }

    /// Reads a predictor and checks it against a config and a model identity.
    pub fn load_for(path: &Path, config: &ModelConfig, identity: &str) -> Result<Predictor> {
        let perr = |m: String| Error::Predictor(format!("{}: {m}", path.display()));
        let file = SafetensorsFile::open(path)
            .map_err(|e| Error::Predictor(format!("cannot read predictor file: {e}")))?;
        let meta = file.metadata();
        let get = |k: &str| {
            meta.get(k)
                .ok_or_else(|| perr(format!("metadata '{k}' is missing (not a predictor file?)")))
        };
        let version = get("format_version")?;
        if version != FORMAT_VERSION {
            return Err(perr(format!(
                "format_version {version} is not supported (expected {FORMAT_VERSION})"
            )));
        }
        let model = get("model")?.clone();
        if model != identity {
            return Err(perr(format!(
                "fitted to model '{model}', not to this model '{identity}'"
            )));
        }
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let max_rank = h.min(i);
        let rank_of = |k: &str, min: usize| -> Result<usize> {
            let v = get(k)?;
            match v.parse::<usize>() {
                Ok(r) if (min..=max_rank).contains(&r) => Ok(r),
                _ => Err(perr(format!(
                    "metadata {k} = '{v}' is not in {min}..={max_rank}"
                ))),
            }
        };
        let rank = rank_of("rank", 0)?;
        let up_rank = rank_of("up_rank", 0)?;
        let read = |name: &str, rows: usize, cols: usize| -> Result<Vec<f32>> {
            let raw = file.tensor(name).map_err(|e| perr(e.to_string()))?;
            // 2-D [rows, cols], a vector for one row, or [layers, 4, levels] tables read
            // as [layers * 4, levels].
            let table =
                raw.shape.len() == 3 && raw.shape[0] * raw.shape[1] == rows && raw.shape[2] == cols;
            if raw.shape != [rows, cols] && !(rows == 1 && raw.shape == [cols]) && !table {
                return Err(perr(format!(
                    "tensor '{name}' has shape {:?}, expected [{rows}, {cols}]",
                    raw.shape
                )));
            }
            let v = Matrix::from_raw(&raw, rows, cols, DType::F32)
                .map_err(|e| perr(e.to_string()))?
                .to_f32_vec();
            if let Some(p) = v.iter().position(|x| !x.is_finite()) {
                return Err(perr(format!(
                    "tensor '{name}' holds a non-finite value at {p}"
                )));
            }
            Ok(v)
        };
        let mut layers = Vec::with_capacity(config.num_layers);
        for l in 0..config.num_layers * (rank > 0) as usize {
            let a = read(&format!("layers.{l}.a_gate"), h, rank)?;
            let b = read(&format!("layers.{l}.b_gate"), rank, i)?;
            let gate = LowRank::from_ab(&a, &b, h, rank, i);
            let up = if up_rank > 0 {
                let a = read(&format!("layers.{l}.a_up"), h, up_rank)?;
                let b = read(&format!("layers.{l}.b_up"), up_rank, i)?;
                Some(LowRank::from_ab(&a, &b, h, up_rank, i))
            } else {
                None
            };
            layers.push(LayerPredictor { gate, up });
        }
        if file.has_tensor(&format!("layers.{}.a_gate", config.num_layers)) {
            return Err(perr(format!(
                "holds more layers than the model's {}",
                config.num_layers
            )));
        }
        let thresholds = if file.has_tensor("thresholds") {
            Some(read("thresholds", 1, config.num_layers)?)
        } else {
            None
        };
        let nl = config.num_layers;
        let input = if file.has_tensor("input.teal") {
            let calibrated = if file.has_tensor("input.calibrated") {
                Some((
                    read("input.calibrated", nl, 4)?,
                    read("input.calibrated_sparsity", nl, 4)?,
                ))
            } else {
                None
            };
            Some(InputTables {
                layers: nl,
                teal: read("input.teal", nl * 4, LEVELS)?,
                wina: read("input.wina", nl * 4, LEVELS)?,
                calibrated_sparsity: calibrated.as_ref().map(|c| c.1.clone()),
                calibrated: calibrated.map(|c| c.0),
            })
        } else {
            None
        };
        if rank == 0 && input.is_none() {
            return Err(perr(
                "rank 0 and no input tables: the file holds nothing".into(),
            ));
        }
        let metadata = meta
            .iter()
            .filter(|(k, _)| !RESERVED_METADATA.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Predictor {
            model,
            hidden: h,
            intermediate: i,
            rank,
            up_rank,
            layers,
            thresholds,
            input,
            metadata,
        })
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// Writes `bytes` to `path` through a temporary sibling file renamed into place, so that
/// `path` is either the old file or the whole new one. The temporary file is created as
/// an ordinary new file (mode 0666 less the umask); on any error it is removed and the
/// error names `path`.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Input(format!("{}: not a file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_is_atomic_with_an_ordinary_files_mode_and_names_the_users_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = Predictor::random_shape(8, 16, 2, 2, 1);
        let path = dir.path().join("p.safetensors");
        p.save(&path).unwrap();
        // The mode of any new file here (the umask applies to both alike).
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let mode = |q: &Path| std::fs::metadata(q).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&plain), "predictor file mode");
        assert_ne!(mode(&path), 0o600, "a tempfile's private mode leaked");
        // Nothing but the two files: no temporary left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // Overwriting works and reads back.
        p.save(&path).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 0);
        // A missing directory: the error names the user's path.
        let bad = dir.path().join("no-such-dir").join("p.safetensors");
        let e = p.save(&bad).unwrap_err().to_string();
        assert!(e.starts_with(&bad.display().to_string()), "{e}");
        assert!(!e.contains(".tmp-"), "{e}");
    }
}

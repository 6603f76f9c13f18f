//! The model families (Llama, Mistral, Qwen 2, Qwen 3, Gemma 3) on tiny random-weight
//! checkpoints written by scripts/family_models.py (a HuggingFace directory and a GGUF of
//! the same weights, laid out as llama.cpp's converter does): logits at every position
//! against an independent float64 numpy transcription of transformers' modeling code,
//! prefill against token-by-token decode, greedy tokens, and the HF directory against the
//! GGUF. The llama checkpoint carries Llama 3.1's RoPE scaling (the GGUF as per-frequency
//! factors, `rope_freqs.weight`), the gemma3 one Gemma 3 4B's linear scaling of the global
//! layers. With `SPARSELLM_PEER_PYTHON` naming a Python that has llama-cpp-python, the GGUF's
//! logits and tokens are also checked against llama.cpp's.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;
use sparsellm::kernels::pool;
use sparsellm::loader;
use sparsellm::model::{Llama, Logits};
use sparsellm::tensor::DType;

const FAMILIES: [&str; 5] = ["llama", "mistral", "qwen2", "qwen3", "gemma3"];

/// Token ids of the test sequence: 12 positions (longer than the windows, 4 and 5).
const IDS: [u32; 12] = [1, 290, 17, 300, 45, 45, 260, 2, 311, 100, 5, 299];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/family_models.py")
}

/// The family's tiny checkpoints (made once under target/test-data/families/).
fn checkpoint(family: &str) -> PathBuf {
    let dir = common::test_data_dir().join("families").join(family);
    if !dir.join("model.gguf").is_file() {
        common::python_file(
            &script(),
            ["make".into(), family.into(), dir.clone().into_os_string()],
            &["numpy", "gguf", "safetensors"],
        );
    }
    dir
}

fn ids_file() -> PathBuf {
    let p = common::test_data_dir().join("families").join("ids.json");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, serde_json::to_string(&IDS).unwrap()).unwrap();
    p
}

fn load(path: &Path) -> Llama {
    let src = loader::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    Llama::load(src.as_ref(), DType::F32, pool::global())
        .unwrap_or_else(|e| panic!("load {}: {e}", path.display()))
}

fn logits_json(out: &str) -> Vec<Vec<f32>> {
    let v: Value = serde_json::from_str(out).expect("logits JSON");
    v["logits"]
        .as_array()
        .expect("logits")
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

/// Logits at every position: one prefill, and token by token through the cache.
fn ours(m: &Llama) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let v = m.config.vocab_size;
    let all = m
        .forward(&IDS, &mut m.new_cache(), Logits::All, None)
        .unwrap();
    let prefill = all.chunks_exact(v).map(<[f32]>::to_vec).collect();
    let mut cache = m.new_cache();
    let decode = IDS
        .iter()
        .map(|&id| m.forward(&[id], &mut cache, Logits::Last, None).unwrap())
        .collect();
    (prefill, decode)
}

/// Largest |a - b| / (1 + max |b|) over the positions `0..upto`, and the positions whose
/// argmax differs.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>], upto: usize) -> (f32, Vec<usize>) {
    let argmax = |x: &[f32]| sparsellm::generate::argmax(x);
    let mut worst = 0f32;
    let mut differ = Vec::new();
    for (p, (x, y)) in a.iter().zip(b).enumerate().take(upto) {
        assert_eq!(x.len(), y.len(), "vocabulary sizes");
        let scale = 1.0 + y.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (u, w) in x.iter().zip(y) {
            worst = worst.max((u - w).abs() / scale);
        }
        if argmax(x) != argmax(y) {
            differ.push(p);
        }
    }
    (worst, differ)
}

/// Greedy continuation of `IDS[..4]` for 8 tokens.
fn greedy(m: &Llama) -> Vec<u32> {
    let mut cache = m.new_cache();
    let mut logits = m
        .forward(&IDS[..4], &mut cache, Logits::Last, None)
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..8 {
        let id = sparsellm::generate::argmax(&logits);
        out.push(id);
        logits = m.forward(&[id], &mut cache, Logits::Last, None).unwrap();
    }
    out
}

/// The greedy continuation the numpy reference gives (recomputing the whole sequence).
fn greedy_reference(hf: &Path) -> Vec<u32> {
    let mut ids: Vec<u32> = IDS[..4].to_vec();
    let p = common::test_data_dir()
        .join("families")
        .join("greedy_ids.json");
    for _ in 0..8 {
        std::fs::write(&p, serde_json::to_string(&ids).unwrap()).unwrap();
        let out = common::python_file(
            &script(),
            [
                "reference".into(),
                hf.as_os_str().to_owned(),
                p.clone().into_os_string(),
            ],
            &["numpy", "safetensors"],
        );
        let l = logits_json(&out);
        ids.push(sparsellm::generate::argmax(l.last().unwrap()));
    }
    ids.split_off(4)
}

#[test]
fn each_family_matches_the_numpy_transcription_of_transformers() {
    let ids = ids_file();
    for family in FAMILIES {
        let dir = checkpoint(family);
        let hf = dir.join("hf");
        let out = common::python_file(
            &script(),
            [
                "reference".into(),
                hf.clone().into_os_string(),
                ids.clone().into_os_string(),
            ],
            &["numpy", "safetensors"],
        );
        let want = logits_json(&out);
        let hf_model = load(&hf);
        let gguf_model = load(&dir.join("model.gguf"));
        let (hf_prefill, hf_decode) = ours(&hf_model);
        let (gg_prefill, gg_decode) = ours(&gguf_model);
        for (what, got) in [
            ("HF prefill", &hf_prefill),
            ("HF decode", &hf_decode),
            ("GGUF prefill", &gg_prefill),
            ("GGUF decode", &gg_decode),
        ] {
            // llama.cpp's llama architecture (Mistral's GGUFs) has no sliding window.
            let upto = if family == "mistral" && what.starts_with("GGUF") {
                5
            } else {
                IDS.len()
            };
            let (worst, differ) = compare(got, &want, upto);
            eprintln!("{family} {what}: max rel. error {worst:.2e} over {upto} positions");
            assert!(worst < 1e-4, "{family} {what}: logits differ by {worst}");
            assert!(
                differ.is_empty(),
                "{family} {what}: argmax differs at {differ:?}"
            );
        }
        // Prefill and decode compute the same thing.
        let (worst, _) = compare(&hf_prefill, &hf_decode, IDS.len());
        assert!(worst < 1e-5, "{family}: prefill vs decode {worst}");
        let g = greedy(&hf_model);
        assert_eq!(g, greedy_reference(&hf), "{family}: greedy vs reference");
        if family != "mistral" {
            assert_eq!(g, greedy(&gguf_model), "{family}: greedy HF vs GGUF");
        }
    }
}

/// The GGUF against llama.cpp itself, when a Python with llama-cpp-python is named by
/// `SPARSELLM_PEER_PYTHON` (it is not in the test venv: building it takes minutes).
#[test]
fn each_family_matches_llama_cpp_when_available() {
    let Some(peer) = std::env::var_os("SPARSELLM_PEER_PYTHON").filter(|p| !p.is_empty()) else {
        eprintln!("SPARSELLM_PEER_PYTHON is not set: llama.cpp comparison skipped");
        return;
    };
    let ids = ids_file();
    for family in FAMILIES {
        let dir = checkpoint(family);
        let gguf = dir.join("model.gguf");
        let out = std::process::Command::new(&peer)
            .arg(script())
            .arg("llamacpp")
            .arg(&gguf)
            .arg(&ids)
            .output()
            .expect("run the peer Python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let want = logits_json(&String::from_utf8_lossy(&out.stdout));
        let (prefill, decode) = ours(&load(&gguf));
        for (what, got) in [("prefill", &prefill), ("decode", &decode)] {
            let (worst, differ) = compare(got, &want, IDS.len());
            eprintln!("{family} GGUF {what} vs llama.cpp: max rel. error {worst:.2e}");
            // llama.cpp keeps the KV cache in f16 and its GELU goes through an f16 table.
            assert!(worst < 2e-3, "{family} {what}: logits differ by {worst}");
            assert!(
                differ.is_empty(),
                "{family} {what}: argmax differs at {differ:?}"
            );
        }
    }
}

#[test]
fn unknown_architectures_are_refused_in_one_line_naming_them() {
    let dir = common::test_data_dir().join("families").join("unknown");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "falcon", "architectures": ["FalconForCausalLM"], "hidden_size": 64}"#,
    )
    .unwrap();
    let e = loader::open(&dir).err().expect("refused").to_string();
    assert!(e.contains("falcon") && !e.contains('\n'), "{e}");
    // A GGUF whose general.architecture is unknown.
    let src = checkpoint("llama").join("model.gguf");
    let mut bytes = std::fs::read(&src).unwrap();
    let at = bytes
        .windows(5)
        .position(|w| w == b"llama")
        .expect("the architecture string");
    bytes[at..at + 5].copy_from_slice(b"bloom");
    let path = dir.join("bloom.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let e = loader::open(&path).err().expect("refused").to_string();
    assert!(e.contains("'bloom'") && !e.contains('\n'), "{e}");
}

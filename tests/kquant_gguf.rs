//! Q5_0, Q5_1 and the K-quants against the third-party `gguf` Python package: a GGUF
//! written by gguf-py with random (but valid: finite f16 scales) blocks of every format
//! is read by our loader, and every dequantized value must equal gguf's bit for bit.
//! Types we cannot compute on are refused in one line naming the type and the tensor.
//!
//! Needs Python with the `gguf` and `numpy` packages (`scripts/test` installs them).

mod common;

use sparsellm::loader::gguf::GgufFile;
use sparsellm::quant;

/// Writes target/test-data/kquant-random.gguf: per format, a [3, 2 blocks] tensor of
/// random blocks named after the format, plus one IQ4_NL tensor; dumps gguf's
/// dequantization of each as `<name>.f32` into the directory argv[2].
const SCRIPT: &str = r#"
import sys, gguf, numpy as np
from gguf import GGMLQuantizationType as T
path, out = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(1234)
# (type, block bytes, byte offsets of its f16 fields)
formats = [
    (T.Q5_0, 22, [0]), (T.Q5_1, 24, [0, 2]), (T.Q2_K, 84, [80, 82]),
    (T.Q3_K, 110, [108]), (T.Q4_K, 144, [0, 2]), (T.Q5_K, 176, [0, 2]),
    (T.Q6_K, 210, [208]), (T.IQ4_NL, 18, [0]),
]
w = gguf.GGUFWriter(path, "llama")
for ty, bb, f16s in formats:
    rows, blocks = 3, 2
    b = rng.integers(0, 256, size=(rows * blocks, bb), dtype=np.uint8)
    for o in f16s:
        h = (rng.standard_normal(rows * blocks) * 0.05).astype(np.float16)
        b[:, o:o + 2] = h.view(np.uint8).reshape(-1, 2)
    w.add_tensor(ty.name, b.reshape(rows, blocks * bb), raw_dtype=ty)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
for t in gguf.GGUFReader(path).tensors:
    d = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    d.tofile(out + "/" + t.name + ".f32")
    print(t.name, d.size)
"#;

#[test]
fn random_blocks_dequantize_bit_for_bit_as_gguf() {
    let dir = common::test_data_dir().join(format!("kquant-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("random.gguf");
    let listing = common::python(
        SCRIPT,
        [path.as_os_str(), dir.as_os_str()],
        &["gguf", "numpy"],
    );
    let file = GgufFile::open(&path).unwrap();
    let names = ["Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"];
    for name in names {
        assert!(listing.contains(name), "python did not write {name}");
        let bytes = std::fs::read(dir.join(format!("{name}.f32"))).unwrap();
        let want = common::f32s(&bytes);
        let raw = file.raw_tensor(name).unwrap();
        assert_eq!(raw.dtype.name(), name);
        let per_row = if name.ends_with("_K") { 512 } else { 64 };
        assert_eq!(raw.shape, [3, per_row], "{name}");
        let mut got = vec![0f32; raw.numel()];
        quant::dequantize(raw.dtype, raw.bytes(), &mut got);
        assert_eq!(got.len(), want.len(), "{name}: element count");
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{name}: {differ} of {} values differ", got.len());
    }
    // An i-quant: one line naming the type and the tensor.
    let e = file.raw_tensor("IQ4_NL").err().expect("IQ4_NL refused");
    let msg = e.to_string();
    assert!(
        msg.contains("IQ4_NL (ggml type 20)") && msg.contains("'IQ4_NL'") && !msg.contains('\n'),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

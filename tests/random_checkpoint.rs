//! `qwenvl dev random-checkpoint`: the "tiny" preset written in both layouts loads back through
//! the checkpoint loader with exactly the tensor list of the `tiny-a` fixture, both layouts hold
//! bit-identical tensors for one seed, and the index files are complete. Where python3 exists, the
//! `.bin` shards are also checked as zip archives (CRCs) and as pickles naming only the globals
//! `torch.save` uses.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device};
use lm::Checkpoint;
use qwenvl::random_checkpoint::{self, Format};
use qwenvl_e2e::tiny_a;

fn write(dir: &Path, format: Format, seed: u64) {
    let preset = random_checkpoint::preset("tiny").unwrap();
    let mut last = (0, 1);
    random_checkpoint::write(dir, &preset, format, seed, &mut |d, t| last = (d, t)).unwrap();
    assert_eq!(last.0, last.1, "progress must end at the total");
}

fn shapes(ck: &Checkpoint) -> BTreeMap<String, Vec<usize>> {
    ck.tensor_names()
        .map(|n| (n.to_string(), ck.tensor_info(n).unwrap().shape))
        .collect()
}

fn check_index(dir: &Path, index: &str, shard_prefix: &str, ck: &Checkpoint) {
    let text = std::fs::read_to_string(dir.join(index)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let map = v["weight_map"].as_object().unwrap();
    let names: Vec<&str> = ck.tensor_names().collect();
    assert_eq!(map.len(), names.len());
    let mut total = 0u64;
    for n in names {
        let info = ck.tensor_info(n).unwrap();
        assert_eq!(info.dtype, DType::BF16, "{n}");
        let file = map[n].as_str().unwrap();
        assert_eq!(info.file.file_name().unwrap().to_str().unwrap(), file);
        total += info.shape.iter().product::<usize>() as u64 * 2;
    }
    assert_eq!(v["metadata"]["total_size"].as_u64(), Some(total));
    let mut files: Vec<&str> = map.values().map(|f| f.as_str().unwrap()).collect();
    files.sort();
    files.dedup();
    let ext = if shard_prefix == "model" {
        "safetensors"
    } else {
        "bin"
    };
    assert_eq!(
        files,
        vec![
            format!("{shard_prefix}-00001-of-00002.{ext}"),
            format!("{shard_prefix}-00002-of-00002.{ext}")
        ]
    );
}

#[test]
fn random_checkpoint_tiny_both_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let (st_dir, bin_dir) = (tmp.path().join("st"), tmp.path().join("bin"));
    write(&st_dir, Format::Safetensors, 7);
    write(&bin_dir, Format::Bin, 7);

    let fixture = Checkpoint::open(&tiny_a()).unwrap();
    // `Checkpoint::open` needs a tokenizer file next to the weights.
    for d in [&st_dir, &bin_dir] {
        random_checkpoint::copy_tokenizer(d, &fixture.tokenizer_file()).unwrap();
        for f in ["config.json", "generation_config.json", "qwen.tiktoken"] {
            assert!(d.join(f).is_file(), "{f} missing");
        }
    }
    let st = Checkpoint::open(&st_dir).unwrap();
    let bin = Checkpoint::open(&bin_dir).unwrap();
    assert_eq!(
        st.format(),
        lm::checkpoint::WeightsFormat::ShardedSafetensors
    );
    assert_eq!(bin.format(), lm::checkpoint::WeightsFormat::ShardedPytorch);

    let want = shapes(&fixture);
    assert_eq!(shapes(&st), want);
    assert_eq!(shapes(&bin), want);

    let cfg = lm::QwenConfig::from_file(&st_dir.join("config.json")).unwrap();
    let specs: BTreeMap<String, Vec<usize>> = random_checkpoint::tensor_specs(&cfg)
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(specs, want);

    check_index(&st_dir, "model.safetensors.index.json", "model", &st);
    check_index(
        &bin_dir,
        "pytorch_model.bin.index.json",
        "pytorch_model",
        &bin,
    );

    let gen = lm::GenerationConfig::from_file(&st_dir.join("generation_config.json")).unwrap();
    drop(gen);

    let dev = Device::Cpu;
    let bits = |ck: &Checkpoint, n: &str| -> Vec<u32> {
        // bf16 -> f32 is exact, so comparing f32 bits compares the stored bf16 bits.
        let t = ck.load_tensor(n, DType::BF16, &dev).unwrap();
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect()
    };
    for n in want.keys() {
        let a = bits(&st, n);
        assert_eq!(a, bits(&bin, n), "{n} differs between the formats");
        let vals: Vec<f32> = a.iter().map(|&b| f32::from_bits(b)).collect();
        if n.contains(".ln_") && n.ends_with(".weight") {
            assert!(vals.iter().all(|&v| v == 1.0), "{n} is a norm weight");
        } else if !n.contains(".ln_") {
            let mean_sq = vals.iter().map(|v| v * v).sum::<f32>() / vals.len() as f32;
            let std = mean_sq.sqrt();
            assert!(
                (0.01..0.03).contains(&std) || vals.len() < 64,
                "{n}: std {std}"
            );
        }
    }

    // Another seed, other values.
    let other = tmp.path().join("other");
    write(&other, Format::Safetensors, 8);
    random_checkpoint::copy_tokenizer(&other, &fixture.tokenizer_file()).unwrap();
    let other = Checkpoint::open(&other).unwrap();
    assert_ne!(bits(&st, "lm_head.weight"), bits(&other, "lm_head.weight"));

    check_bin_with_python(&bin_dir);
}

/// Python's `zipfile` verifies every entry's CRC; `pickletools` walks `data.pkl` and lists the
/// globals it names. Skipped without python3.
fn check_bin_with_python(dir: &Path) {
    if Command::new("python3").arg("--version").output().is_err() {
        eprintln!("python3 not found: skipping the zipfile/pickletools check");
        return;
    }
    let script = r#"
import sys, io, zipfile, pickletools, pickle, collections
import types
# Stand-ins for the torch objects `torch.save` pickles, importable under torch's names.
torch = types.ModuleType("torch")
torch_utils = types.ModuleType("torch._utils")
def _rebuild_tensor_v2(*args):
    return args
_rebuild_tensor_v2.__module__ = "torch._utils"
torch_utils._rebuild_tensor_v2 = _rebuild_tensor_v2
class BFloat16Storage:
    pass
BFloat16Storage.__module__ = "torch"
torch.BFloat16Storage = BFloat16Storage
torch._utils = torch_utils
sys.modules["torch"] = torch
sys.modules["torch._utils"] = torch_utils
class Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel
class Tensor:
    def __init__(self, *args):
        self.args = args
    def __reduce_ex__(self, proto):
        return (_rebuild_tensor_v2, self.args)
class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", BFloat16Storage, obj.key, "cpu", obj.numel)
        return None
allowed = {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch BFloat16Storage"}
for path in sys.argv[1:]:
    z = zipfile.ZipFile(path)
    bad = z.testzip()
    assert bad is None, (path, bad)
    names = z.namelist()
    assert names[0] == "archive/data.pkl", names[:3]
    assert z.read("archive/version") == b"3\n"
    assert z.read("archive/byteorder") == b"little"
    for info in z.infolist():
        assert info.compress_type == zipfile.ZIP_STORED
        if info.filename.startswith("archive/data/"):
            with open(path, "rb") as f:
                f.seek(info.header_offset + 26)
                n = int.from_bytes(f.read(2), "little")
                e = int.from_bytes(f.read(2), "little")
            start = info.header_offset + 30 + n + e
            assert start % 64 == 0, (info.filename, start)
    pkl = z.read("archive/data.pkl")
    found = set()
    tensors = 0
    for op, arg, pos in pickletools.genops(pkl):
        if op.name == "GLOBAL":
            found.add(arg)
        if op.name == "BINPERSID":
            tensors += 1
        assert op.proto <= 2, op.name
    assert found <= allowed, found
    assert found == allowed, found
    storages = [n for n in names if n.startswith("archive/data/")]
    assert tensors == len(storages), (tensors, len(storages))
    # Unpickle for real, with stand-ins for the three torch callables.
    class U(pickle.Unpickler):
        def find_class(self, mod, name):
            if (mod, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (mod, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda st, off, size, stride, rg, hooks: (st, off, size, stride, rg, hooks)
            if (mod, name) == ("torch", "BFloat16Storage"):
                return "BFloat16Storage"
            raise pickle.UnpicklingError(mod + "." + name)
        def persistent_load(self, pid):
            tag, ty, key, loc, numel = pid
            assert (tag, ty, loc) == ("storage", "BFloat16Storage", "cpu"), pid
            return (key, numel)
    sd = U(io.BytesIO(pkl)).load()
    assert type(sd) is collections.OrderedDict
    assert len(sd) == len(storages)
    for name, ((key, numel), off, size, stride, rg, hooks) in sd.items():
        assert off == 0 and rg is False and hooks == collections.OrderedDict(), name
        n = 1
        for d in size:
            n *= d
        assert n == numel and numel * 2 == z.getinfo("archive/data/" + key).file_size, name
        expect, acc = [], 1
        for d in reversed(size):
            expect.insert(0, acc)
            acc *= d
        assert tuple(expect) == stride, (name, size, stride)
    # CPython's own pickler, given the same objects, must produce the very same bytes.
    buf = io.BytesIO()
    od = collections.OrderedDict(
        (name, Tensor(Storage(key, numel), off, tuple(list(size)), tuple(list(stride)), False, collections.OrderedDict()))
        for name, ((key, numel), off, size, stride, rg, hooks) in sd.items()
    )
    TorchPickler(buf, protocol=2).dump(od)
    ours = buf.getvalue()
    if ours != pkl:
        at = next((i for i, (a, b) in enumerate(zip(ours, pkl)) if a != b), min(len(ours), len(pkl)))
        raise AssertionError(f"{path}: pickle differs from CPython's at byte {at}: {pkl[at-20:at+20]!r} vs {ours[at-20:at+20]!r}")
print("ok")
"#;
    let mut shards: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    shards.sort();
    assert_eq!(shards.len(), 2);
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&shards)
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("ok"),
        "python check failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

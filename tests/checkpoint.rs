//! Checkpoint loading: the three weight layouts give bit-identical tensors, and broken folders fail
//! with errors that name the file and the tensor at fault.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lm::Checkpoint;
use qwenvl_e2e::{fixtures_root, tiny_a};

/// README section 6 of tiny-a, with `{i}` expanded over the two layers.
fn expected_tensors() -> Vec<(String, Vec<usize>)> {
    let global: &[(&str, &[usize])] = &[
        ("transformer.wte.weight", &[151936, 128]),
        ("transformer.ln_f.weight", &[128]),
        ("transformer.visual.attn_pool.attn.in_proj_bias", &[384]),
        (
            "transformer.visual.attn_pool.attn.in_proj_weight",
            &[384, 128],
        ),
        ("transformer.visual.attn_pool.attn.out_proj.bias", &[128]),
        (
            "transformer.visual.attn_pool.attn.out_proj.weight",
            &[128, 128],
        ),
        ("transformer.visual.attn_pool.kv_proj.weight", &[128, 64]),
        ("transformer.visual.attn_pool.ln_kv.bias", &[128]),
        ("transformer.visual.attn_pool.ln_kv.weight", &[128]),
        ("transformer.visual.attn_pool.ln_q.bias", &[128]),
        ("transformer.visual.attn_pool.ln_q.weight", &[128]),
        ("transformer.visual.attn_pool.pos_embed", &[256, 128]),
        ("transformer.visual.attn_pool.query", &[256, 128]),
        ("transformer.visual.conv1.weight", &[64, 3, 14, 14]),
        ("transformer.visual.ln_post.bias", &[128]),
        ("transformer.visual.ln_post.weight", &[128]),
        ("transformer.visual.ln_pre.bias", &[64]),
        ("transformer.visual.ln_pre.weight", &[64]),
        ("transformer.visual.positional_embedding", &[256, 64]),
        ("transformer.visual.proj", &[128, 128]),
        ("lm_head.weight", &[151936, 128]),
    ];
    let per_layer: &[(&str, &[usize])] = &[
        ("transformer.h.{i}.attn.c_attn.bias", &[384]),
        ("transformer.h.{i}.attn.c_attn.weight", &[384, 128]),
        ("transformer.h.{i}.attn.c_proj.weight", &[128, 128]),
        ("transformer.h.{i}.ln_1.weight", &[128]),
        ("transformer.h.{i}.ln_2.weight", &[128]),
        ("transformer.h.{i}.mlp.c_proj.weight", &[128, 256]),
        ("transformer.h.{i}.mlp.w1.weight", &[256, 128]),
        ("transformer.h.{i}.mlp.w2.weight", &[256, 128]),
        (
            "transformer.visual.transformer.resblocks.{i}.attn.in_proj.bias",
            &[192],
        ),
        (
            "transformer.visual.transformer.resblocks.{i}.attn.in_proj.weight",
            &[192, 64],
        ),
        (
            "transformer.visual.transformer.resblocks.{i}.attn.out_proj.bias",
            &[64],
        ),
        (
            "transformer.visual.transformer.resblocks.{i}.attn.out_proj.weight",
            &[64, 64],
        ),
        (
            "transformer.visual.transformer.resblocks.{i}.ln_1.bias",
            &[64],
        ),
        (
            "transformer.visual.transformer.resblocks.{i}.ln_1.weight",
            &[64],
        ),
        (
            "transformer.visual.transformer.resblocks.{i}.ln_2.bias",
            &[64],
        ),
        (
            "transformer.visual.transformer.resblocks.{i}.ln_2.weight",
            &[64],
        ),
        (
            "transformer.visual.transformer.resblocks.{i}.mlp.c_fc.bias",
            &[315],
        ),
        (
            "transformer.visual.transformer.resblocks.{i}.mlp.c_fc.weight",
            &[315, 64],
        ),
        (
            "transformer.visual.transformer.resblocks.{i}.mlp.c_proj.bias",
            &[64],
        ),
        (
            "transformer.visual.transformer.resblocks.{i}.mlp.c_proj.weight",
            &[64, 315],
        ),
    ];
    let mut out: Vec<(String, Vec<usize>)> = global
        .iter()
        .map(|(n, s)| (n.to_string(), s.to_vec()))
        .collect();
    for i in 0..2 {
        for (n, s) in per_layer {
            out.push((n.replace("{i}", &i.to_string()), s.to_vec()));
        }
    }
    out
}

fn open(dir: &Path) -> Checkpoint {
    Checkpoint::open(dir).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
}

fn open_err(dir: &Path) -> String {
    match Checkpoint::open(dir) {
        Ok(_) => panic!("{} opened although it is broken", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    eprintln!("error: {msg}");
    for p in parts {
        assert!(msg.contains(p), "error {msg:?} does not mention {p:?}");
    }
}

/// f32 bit patterns of a tensor (bf16 → f32 is exact, so equal bits mean equal bf16 values).
fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Every tensor of `got` equals the one of `want`: same names, dtype, shape and bits.
fn assert_same_tensors(got: &Checkpoint, want: &Checkpoint) {
    let want_names: Vec<&str> = want.tensor_names().collect();
    let got_names: Vec<&str> = got.tensor_names().collect();
    assert_eq!(got_names, want_names);
    for name in want_names {
        let (g, w) = (
            got.tensor_info(name).unwrap(),
            want.tensor_info(name).unwrap(),
        );
        assert_eq!((g.dtype, &g.shape), (w.dtype, &w.shape), "{name}");
        let g = got.load_tensor(name, DType::BF16, &Device::Cpu).unwrap();
        let w = want.load_tensor(name, DType::BF16, &Device::Cpu).unwrap();
        assert!(bits(&g) == bits(&w), "{name} differs");
    }
    assert_eq!(got.total_bytes(), want.total_bytes());
}

/// Copies the small files of a model folder (configs, vocabulary) into `dst`.
fn copy_side_files(src: &Path, dst: &Path) {
    for f in [
        "config.json",
        "generation_config.json",
        "qwen.tiktoken",
        "tokenizer_config.json",
    ] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
}

#[test]
fn tiny_a_single_safetensors() {
    let ckpt = open(&tiny_a());
    assert_eq!(ckpt.config.hidden_size, 128);
    assert_eq!(ckpt.generation.eos_token_id, 151643);
    assert_eq!(ckpt.format(), lm::checkpoint::WeightsFormat::Safetensors);
    assert_eq!(ckpt.tokenizer_file(), tiny_a().join("qwen.tiktoken"));

    let expected = expected_tensors();
    assert_eq!(ckpt.tensor_names().count(), expected.len());
    let mut total = 0u64;
    for (name, shape) in &expected {
        let info = ckpt
            .tensor_info(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(&info.shape, shape, "{name}");
        assert_eq!(info.dtype, DType::BF16, "{name}");
        assert_eq!(info.file, tiny_a().join("model.safetensors"));
        total += 2 * shape.iter().product::<usize>() as u64;
    }
    assert_eq!(ckpt.total_bytes(), total);

    // Independent reference: the raw bf16 bits from the safetensors crate, upcast by shifting.
    let bytes = std::fs::read(tiny_a().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
    for (name, shape) in &expected {
        let view = st.tensor(name).unwrap();
        let want: Vec<u32> = view
            .data()
            .chunks_exact(2)
            .map(|b| u32::from(u16::from_le_bytes([b[0], b[1]])) << 16)
            .collect();
        let t = vb.get(shape.as_slice(), name).unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.dims(), shape.as_slice());
        assert!(
            bits(&t) == want,
            "{name}: values differ from the bf16 upcast"
        );
    }
    // A prefixed builder resolves the same names.
    let ln_f = vb.pp("transformer").pp("ln_f").get(128, "weight").unwrap();
    assert_eq!(ln_f.dims(), &[128]);
    // Other dtypes convert on load.
    for dtype in [DType::F16, DType::BF16] {
        let t = ckpt
            .load_tensor("transformer.visual.proj", dtype, &Device::Cpu)
            .unwrap();
        assert_eq!(t.dtype(), dtype);
    }
}

#[test]
fn sharded_safetensors_equal_single_file() {
    let single = open(&tiny_a());
    let tmp = tempfile::tempdir().unwrap();
    copy_side_files(&tiny_a(), tmp.path());

    let bytes = std::fs::read(tiny_a().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    let mut weight_map = BTreeMap::new();
    let n = 3;
    for k in 0..n {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        let part: Vec<(String, safetensors::tensor::TensorView)> = names
            .iter()
            .enumerate()
            .filter(|(i, _)| i % n == k)
            .map(|(_, name)| (name.to_string(), st.tensor(name).unwrap()))
            .collect();
        for (name, _) in &part {
            weight_map.insert(name.clone(), file.clone());
        }
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(part, Some(meta), &tmp.path().join(&file)).unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": single.total_bytes()}, "weight_map": weight_map});
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&index).unwrap(),
    )
    .unwrap();

    let sharded = open(tmp.path());
    assert_eq!(
        sharded.format(),
        lm::checkpoint::WeightsFormat::ShardedSafetensors
    );
    let info = sharded.tensor_info("transformer.wte.weight").unwrap();
    assert_eq!(info.file.parent(), Some(tmp.path()));
    assert_same_tensors(&sharded, &single);
}

/// `tiny-a-bin`, unpacked into `dst` the way the real checkpoint lies on disk.
fn unpack_tiny_a_bin(dst: &Path) -> Vec<PathBuf> {
    let src = fixtures_root().join("tiny-a-bin");
    for f in [
        "config.json",
        "generation_config.json",
        "qwen.tiktoken",
        "tokenizer_config.json",
        "pytorch_model.bin.index.json",
    ] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut shards = Vec::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if let Some(stem) = name.strip_suffix(".gz") {
            let mut gz = flate2::read::GzDecoder::new(std::fs::File::open(&path).unwrap());
            let out = dst.join(stem);
            std::io::copy(&mut gz, &mut std::fs::File::create(&out).unwrap()).unwrap();
            shards.push(out);
        }
    }
    shards.sort();
    shards
}

#[test]
fn sharded_pytorch_bin_equals_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = unpack_tiny_a_bin(tmp.path());
    assert_eq!(shards.len(), 2);
    let bin = open(tmp.path());
    assert_eq!(bin.format(), lm::checkpoint::WeightsFormat::ShardedPytorch);
    assert_same_tensors(&bin, &open(&tiny_a()));
    // The VarBuilder serves every shard.
    let vb = bin.var_builder(DType::F32, &Device::Cpu);
    for (name, shape) in expected_tensors() {
        assert_eq!(vb.get(shape.as_slice(), &name).unwrap().dims(), shape);
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-written torch archives: a protocol-2 pickle inside a stored (uncompressed) zip.

/// A torch archive of `entries`, written by the one writer ([`lm::dev`]).
fn write_stored_zip(path: &Path, entries: &[(&str, &[u8])]) {
    std::fs::write(path, lm::dev::zip_bytes(entries)).unwrap();
}

/// `{name: tensor}` where the tensor is a view `(offset, size, stride)` of storage "0".
fn state_dict_pickle(
    name: &str,
    storage_type: &str,
    numel: u64,
    offset: u64,
    size: &[u64],
    stride: &[u64],
) -> Vec<u8> {
    lm::dev::state_dict_pickle(&[lm::dev::TensorEntry {
        name: name.into(),
        storage_type: storage_type.into(),
        key: "0".into(),
        numel,
        offset,
        size: size.to_vec(),
        stride: stride.to_vec(),
    }])
}

fn write_minimal_model(dir: &Path) {
    std::fs::copy(tiny_a().join("config.json"), dir.join("config.json")).unwrap();
}

#[test]
fn pytorch_bin_strided_view_is_materialised() {
    let tmp = tempfile::tempdir().unwrap();
    write_minimal_model(tmp.path());
    let storage: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    // A transposed [2, 3] view starting at element 1 of an 8-element storage.
    let pkl = state_dict_pickle("w", "FloatStorage", 8, 1, &[2, 3], &[1, 2]);
    write_stored_zip(
        &tmp.path().join("pytorch_model.bin"),
        &[
            ("archive/data.pkl", &pkl),
            ("archive/byteorder", b"little"),
            ("archive/data/0", &storage),
            ("archive/version", b"3\n"),
        ],
    );
    let ckpt = open(tmp.path());
    assert_eq!(ckpt.format(), lm::checkpoint::WeightsFormat::Pytorch);
    let t = ckpt.load_tensor("w", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        vec![vec![1.0, 3.0, 5.0], vec![2.0, 4.0, 6.0]]
    );

    // The same view reaching past the storage is refused when opening.
    let pkl = state_dict_pickle("w", "FloatStorage", 8, 3, &[2, 3], &[1, 2]);
    write_stored_zip(
        &tmp.path().join("pytorch_model.bin"),
        &[("archive/data.pkl", &pkl), ("archive/data/0", &storage)],
    );
    assert_mentions(&open_err(tmp.path()), &["`w`", "pytorch_model.bin"]);
}

#[test]
fn pickle_with_forbidden_global_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write_minimal_model(tmp.path());
    // os.system("true"): what a malicious checkpoint would do.
    let mut p = lm::dev::Pickler::new();
    p.global("os", "system");
    p.string("true");
    p.out.extend(b"\x85R");
    let pkl = p.finish();
    write_stored_zip(
        &tmp.path().join("pytorch_model.bin"),
        &[("archive/data.pkl", &pkl)],
    );
    let msg = open_err(tmp.path());
    assert_mentions(&msg, &["pytorch_model.bin", "os.system"]);

    // Same with the protocol-4 spelling (STACK_GLOBAL) and another module.
    let mut pkl = vec![0x80, 4];
    pkl.push(0x8c);
    pkl.push(8);
    pkl.extend(b"builtins");
    pkl.push(0x8c);
    pkl.push(4);
    pkl.extend(b"eval");
    pkl.push(0x93);
    pkl.extend(b".");
    write_stored_zip(
        &tmp.path().join("pytorch_model.bin"),
        &[("archive/data.pkl", &pkl)],
    );
    assert_mentions(&open_err(tmp.path()), &["builtins.eval"]);
}

/// Opening (and loading everything from) a damaged file must give an error, never a panic.
/// Every tensor of the folder's checkpoint as (name, shape, values), or the first error.
type Loaded = Vec<(String, Vec<usize>, Vec<f32>)>;

fn load_all(dir: &Path) -> Result<Loaded, String> {
    let ckpt = Checkpoint::open(dir).map_err(|e| format!("{e:#}"))?;
    let mut names: Vec<String> = ckpt.tensor_names().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let t = ckpt
                .load_tensor(&name, DType::F32, &Device::Cpu)
                .map_err(|e| format!("{e:#}"))?;
            let shape = t.dims().to_vec();
            let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            Ok((name, shape, values))
        })
        .collect()
}

/// Damages `file` (of the folder `dir`, holding `good`) every way at every byte: each prefix, and
/// three bit flips per byte. A cut file always gives an error that names it. A flipped byte
/// gives such an error or a file that is still valid (a flip in a tensor's name makes another
/// name); a flip inside the stored numbers (`data`, their byte range) changes values only: the
/// same tensors load. Returns how many damaged files were refused.
fn check_damage(dir: &Path, file: &str, good: &[u8], data: std::ops::Range<usize>) -> usize {
    let path = dir.join(file);
    std::fs::write(&path, good).unwrap();
    let want = load_all(dir).expect("the undamaged file loads");
    let mut refused = 0;
    let mut judge = |bytes: &[u8], what: &str, hit: Option<usize>| {
        std::fs::write(&path, bytes).unwrap();
        match load_all(dir) {
            Err(msg) => {
                assert!(
                    msg.contains(file),
                    "{file} {what}: the error does not name the file: {msg}"
                );
                assert!(
                    !hit.is_some_and(|i| data.contains(&i)),
                    "{file} {what}: a flip inside the numbers was refused: {msg}"
                );
                refused += 1;
            }
            Ok(got) => {
                assert!(hit.is_some(), "{file} {what}: a cut file loaded");
                if hit.is_some_and(|i| data.contains(&i)) {
                    let same_tensors = got.len() == want.len()
                        && got.iter().zip(&want).all(|(g, w)| g.0 == w.0 && g.1 == w.1);
                    assert!(same_tensors, "{file} {what}: loaded other tensors: {got:?}");
                }
            }
        }
    };
    for i in 0..good.len() {
        judge(&good[..i], &format!("cut to {i} bytes"), None);
        for flip in [0xffu8, 0x01, 0x80] {
            let mut bad = good.to_vec();
            bad[i] ^= flip;
            judge(&bad, &format!("byte {i} ^ {flip:#04x}"), Some(i));
        }
    }
    std::fs::remove_file(&path).unwrap();
    refused
}

#[test]
fn damaged_files_give_an_error_naming_them_or_the_same_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    write_minimal_model(tmp.path());
    let storage: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let pkl = state_dict_pickle("w", "FloatStorage", 8, 1, &[2, 3], &[1, 2]);
    let bin = tmp.path().join("pytorch_model.bin");
    write_stored_zip(
        &bin,
        &[("archive/data.pkl", &pkl), ("archive/data/0", &storage)],
    );
    let good = std::fs::read(&bin).unwrap();
    let at = good
        .windows(storage.len())
        .position(|w| w == storage)
        .unwrap();
    let refused = check_damage(
        tmp.path(),
        "pytorch_model.bin",
        &good,
        at..at + storage.len(),
    );
    // Every cut (one per byte) is refused, and many flips of the pickle and ZIP headers.
    assert!(
        refused > good.len() * 2,
        "{refused} of {} refused",
        good.len() * 4
    );

    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 4], &storage)
        .unwrap();
    let st = tmp.path().join("model.safetensors");
    safetensors::serialize_to_file([("w", view)], None, &st).unwrap();
    let good = std::fs::read(&st).unwrap();
    std::fs::remove_file(&st).unwrap();
    let data = good.len() - storage.len()..good.len();
    let refused = check_damage(tmp.path(), "model.safetensors", &good, data);
    assert!(
        refused > good.len() * 2,
        "{refused} of {} refused",
        good.len() * 4
    );
}

// ---------------------------------------------------------------------------------------------
// Broken folders.

#[test]
fn missing_config_json() {
    let tmp = tempfile::tempdir().unwrap();
    let msg = open_err(tmp.path());
    assert_mentions(&msg, &["config.json"]);
    let msg = open_err(&tmp.path().join("nope"));
    assert_mentions(&msg, &["nope"]);
}

#[test]
fn no_weights_names_the_layouts_looked_for() {
    let tmp = tempfile::tempdir().unwrap();
    write_minimal_model(tmp.path());
    let msg = open_err(tmp.path());
    assert_mentions(
        &msg,
        &[
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
            "pytorch_model.bin.index.json",
        ],
    );
}

#[test]
fn invalid_json() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("config.json"), b"{\"hidden_size\": 128,").unwrap();
    assert_mentions(&open_err(tmp.path()), &["config.json", "JSON"]);

    write_minimal_model(tmp.path());
    std::fs::write(tmp.path().join("generation_config.json"), b"[1, 2").unwrap();
    assert_mentions(&open_err(tmp.path()), &["generation_config.json", "JSON"]);

    std::fs::remove_file(tmp.path().join("generation_config.json")).unwrap();
    std::fs::write(tmp.path().join("model.safetensors.index.json"), b"nope").unwrap();
    assert_mentions(
        &open_err(tmp.path()),
        &["model.safetensors.index.json", "JSON"],
    );
}

#[test]
fn missing_generation_config_uses_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    write_minimal_model(tmp.path());
    std::os::unix::fs::symlink(
        tiny_a().join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let ckpt = open(tmp.path());
    assert_eq!(ckpt.generation.eos_token_id, 151643);
    assert_eq!(ckpt.generation.chat_format, "chatml");
}

#[test]
fn index_pointing_to_missing_shard() {
    let tmp = tempfile::tempdir().unwrap();
    write_minimal_model(tmp.path());
    let index = serde_json::json!({"weight_map": {
        "lm_head.weight": "model-00002-of-00002.safetensors",
    }});
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_mentions(
        &open_err(tmp.path()),
        &[
            "model.safetensors.index.json",
            "model-00002-of-00002.safetensors",
            "lm_head.weight",
        ],
    );

    // A shard that exists but lacks a tensor the index lists.
    std::os::unix::fs::symlink(
        tiny_a().join("model.safetensors"),
        tmp.path().join("model-00002-of-00002.safetensors"),
    )
    .unwrap();
    let index = serde_json::json!({"weight_map": {
        "lm_head.weight": "model-00002-of-00002.safetensors",
        "not.there": "model-00002-of-00002.safetensors",
    }});
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_mentions(
        &open_err(tmp.path()),
        &["not.there", "model-00002-of-00002.safetensors"],
    );

    // Shard names must stay inside the folder.
    let index = serde_json::json!({"weight_map": {"lm_head.weight": "../model.safetensors"}});
    std::fs::write(
        tmp.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_mentions(&open_err(tmp.path()), &["../model.safetensors"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    write_minimal_model(tmp.path());
    let bytes = std::fs::read(tiny_a().join("model.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let msg = open_err(tmp.path());
    assert_mentions(&msg, &["model.safetensors", "truncated", "tensor `"]);

    // Cut inside the header.
    std::fs::write(tmp.path().join("model.safetensors"), &bytes[..100]).unwrap();
    assert_mentions(&open_err(tmp.path()), &["model.safetensors", "truncated"]);
    std::fs::write(tmp.path().join("model.safetensors"), &bytes[..3]).unwrap();
    assert_mentions(&open_err(tmp.path()), &["model.safetensors"]);
}

#[test]
fn huge_safetensors_header_length() {
    let tmp = tempfile::tempdir().unwrap();
    write_minimal_model(tmp.path());
    for len in [u64::MAX, 1 << 40, 200_000_000] {
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend(b"{}");
        std::fs::write(tmp.path().join("model.safetensors"), &bytes).unwrap();
        assert_mentions(
            &open_err(tmp.path()),
            &["model.safetensors", "header length"],
        );
    }
}

#[test]
fn unsupported_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    write_minimal_model(tmp.path());
    let data = [1u8, 0, 1];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::BOOL, vec![3], &data).unwrap();
    safetensors::serialize_to_file(
        [("mask", view)],
        None,
        &tmp.path().join("model.safetensors"),
    )
    .unwrap();
    assert_mentions(
        &open_err(tmp.path()),
        &["`mask`", "BOOL", "model.safetensors"],
    );

    // Same for a torch storage type candle cannot hold.
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let pkl = state_dict_pickle("mask", "BoolStorage", 3, 0, &[3], &[1]);
    write_stored_zip(
        &tmp.path().join("pytorch_model.bin"),
        &[("archive/data.pkl", &pkl), ("archive/data/0", &data)],
    );
    assert_mentions(
        &open_err(tmp.path()),
        &["`mask`", "BoolStorage", "pytorch_model.bin"],
    );
}

#[test]
fn truncated_pytorch_bin() {
    let tmp = tempfile::tempdir().unwrap();
    let shards = unpack_tiny_a_bin(tmp.path());
    let shard = &shards[1];
    let bytes = std::fs::read(shard).unwrap();
    let mut f = std::fs::File::create(shard).unwrap();
    f.write_all(&bytes[..bytes.len() / 2]).unwrap();
    drop(f);
    let name = shard.file_name().unwrap().to_str().unwrap();
    assert_mentions(&open_err(tmp.path()), &[name, "truncated"]);

    // A storage entry whose bytes end past the end of the file (central directory intact).
    let storage: Vec<u8> = (0..8).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let pkl = state_dict_pickle("w", "FloatStorage", 8, 0, &[8], &[1]);
    let tmp = tempfile::tempdir().unwrap();
    write_minimal_model(tmp.path());
    let path = tmp.path().join("pytorch_model.bin");
    write_stored_zip(
        &path,
        &[
            ("archive/data.pkl", &pkl),
            ("archive/data/0", &storage[..16]),
        ],
    );
    // The pickle says 8 floats, the entry holds 4.
    assert_mentions(&open_err(tmp.path()), &["`w`", "pytorch_model.bin"]);
}

#[test]
fn var_builder_errors_name_the_tensor() {
    let ckpt = open(&tiny_a());
    let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
    let msg = vb
        .get((64, 2), "transformer.ln_f.weight")
        .unwrap_err()
        .to_string();
    assert_mentions(
        &msg,
        &[
            "transformer.ln_f.weight",
            "[64, 2]",
            "[128]",
            "model.safetensors",
        ],
    );

    let msg = vb
        .get(128, "transformer.nope.weight")
        .unwrap_err()
        .to_string();
    assert_mentions(
        &msg,
        &["transformer.nope.weight", tiny_a().to_str().unwrap()],
    );
    assert!(!vb.contains_tensor("transformer.nope.weight"));
    assert!(vb.contains_tensor("lm_head.weight"));

    let msg = ckpt
        .load_tensor("nope", DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert_mentions(&msg, &["`nope`"]);
}

/// The token table read row by row from the map equals the loaded tensor, in every layout (the
/// pickled `.bin` shards included), and bad rows are errors.
#[test]
fn mapped_rows_equal_the_loaded_table() {
    let tmp = tempfile::tempdir().unwrap();
    unpack_tiny_a_bin(tmp.path());
    for ck in [open(&tiny_a()), open(tmp.path())] {
        let name = "transformer.wte.weight";
        let table = ck.mapped_rows(name).expect("a row-major 2-D table");
        let full = ck.load_tensor(name, DType::F32, &Device::Cpu).unwrap();
        let (rows, cols) = table.dims();
        assert_eq!(full.dims(), [rows, cols]);
        let mut row = vec![0f32; cols];
        for i in [0, 1, 151643, rows - 1] {
            table.row_f32(i, &mut row).unwrap();
            let want: Vec<f32> = full.get(i).unwrap().to_vec1().unwrap();
            assert_eq!(
                row.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "row {i}"
            );
        }
        let e = table.row_f32(rows, &mut row).unwrap_err().to_string();
        assert!(e.contains(name), "{e}");
        // Not a table: 1-D.
        assert!(ck.mapped_rows("transformer.ln_f.weight").is_none());
        assert!(ck.mapped_rows("no.such.tensor").is_none());
    }

    // A NaN in a looked-up row is named, not passed on.
    let dir = tempfile::tempdir().unwrap();
    write_minimal_model(dir.path());
    let mut values = [0.5f32; 8];
    values[5] = f32::NAN;
    let storage: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 4], &storage)
        .unwrap();
    safetensors::serialize_to_file([("t", view)], None, &dir.path().join("model.safetensors"))
        .unwrap();
    let ck = open(dir.path());
    let table = ck.mapped_rows("t").unwrap();
    let mut row = vec![0f32; 4];
    table.row_f32(0, &mut row).unwrap();
    assert_eq!(row, [0.5; 4]);
    let e = table.row_f32(1, &mut row).unwrap_err().to_string();
    assert!(e.contains("NaN") && e.contains("row 1"), "{e}");
}

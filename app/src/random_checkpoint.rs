//! `qwenvl dev random-checkpoint`: writes a random checkpoint with the exact file layout of
//! `Qwen/Qwen-VL-Chat` on the hub (upstream tensor names and shapes, bfloat16, sharded safetensors
//! or sharded `torch.save` pickles with their index, `config.json`, `generation_config.json`), so
//! that other implementations can be timed loading the very same files.
//!
//! Shards are generated and written one at a time, tensor by tensor in small chunks: the full-size
//! checkpoint (~19 GB) never sits in memory. Every tensor's values depend only on the seed and its
//! name, so both formats written with one seed hold bit-identical tensors.
//!
//! The `.bin` writer reproduces what `torch.save(state_dict)` writes (zip of STORED entries, data
//! aligned to 64 bytes with the same `FB` padding field, a protocol-2 pickle of an `OrderedDict`
//! of `torch._utils._rebuild_tensor_v2` over persistent-id storages), with a small hand-written zip
//! writer (zip64 where an entry or the archive outgrows 32-bit fields): [`lm::dev`], the one
//! writer of these files, which the tests use too.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{ensure, Context, Result};
use lm::QwenConfig;

/// How the weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`.
    Safetensors,
    /// `pytorch_model-0000k-of-0000n.bin` + `pytorch_model.bin.index.json`.
    Bin,
}

/// What to write: the model's `config.json` and how many shards to split the weights into.
#[derive(Debug, Clone)]
pub struct Preset {
    pub config_json: String,
    pub shards: usize,
}

/// Shapes of the `tiny-a` golden fixture (`config.json` of `shared/fixtures/tiny-a`), for tests.
const TINY_CONFIG: &str = r#"{
  "architectures": ["QWenLMHeadModel"], "attn_dropout_prob": 0.0, "bf16": false,
  "emb_dropout_prob": 0.0, "fp16": false, "fp32": true, "hidden_size": 128,
  "initializer_range": 0.02, "intermediate_size": 512, "kv_channels": 64,
  "layer_norm_epsilon": 1e-06, "max_position_embeddings": 8192, "model_type": "qwen",
  "no_bias": true, "num_attention_heads": 2, "num_hidden_layers": 2, "onnx_safe": null,
  "rotary_emb_base": 10000, "rotary_pct": 1.0, "scale_attn_weights": true, "seq_length": 2048,
  "tie_word_embeddings": false, "tokenizer_type": "QWenTokenizer", "torch_dtype": "bfloat16",
  "transformers_version": "4.32.0", "use_cache": true, "use_dynamic_ntk": true,
  "use_flash_attn": false, "use_logn_attn": true,
  "visual": {"heads": 4, "image_size": 448, "image_start_id": 151857, "layers": 2,
             "mlp_ratio": 4.9231, "output_dim": 128, "patch_size": 14, "width": 64},
  "vocab_size": 151936
}"#;

/// `generation_config.json` of Qwen/Qwen-VL-Chat.
const GENERATION_CONFIG: &str = r#"{
  "chat_format": "chatml",
  "do_sample": true,
  "eos_token_id": 151643,
  "max_new_tokens": 512,
  "max_window_size": 6144,
  "pad_token_id": 151643,
  "top_k": 0,
  "top_p": 0.3,
  "transformers_version": "4.31.0"
}
"#;

/// The named presets: `qwen-vl-chat` (full size, 10 shards like the hub) and `tiny`.
pub fn preset(name: &str) -> Option<Preset> {
    match name {
        "qwen-vl-chat" => Some(Preset {
            config_json: crate::bench::QWEN_VL_CHAT_CONFIG.to_string(),
            shards: 10,
        }),
        "tiny" => Some(Preset {
            config_json: TINY_CONFIG.to_string(),
            shards: 2,
        }),
        _ => None,
    }
}

/// Every tensor of a Qwen-VL checkpoint (LM, ViT, resampler, `lm_head`) with its upstream name and
/// shape, in the order of upstream's `state_dict()` (the order the hub shards follow).
pub fn tensor_specs(cfg: &QwenConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let visual = cfg
        .visual
        .clone()
        .context("config.json has no \"visual\" section: not a Qwen-VL config")?;
    let vc: vision::Config =
        serde_json::from_value(visual).context("parsing the \"visual\" section of config.json")?;
    vc.validate()
        .map_err(|m| anyhow::anyhow!("invalid \"visual\" config: {m}"))?;
    ensure!(
        cfg.hidden_size > 0 && cfg.vocab_size > 0 && cfg.num_attention_heads > 0,
        "config.json: hidden_size, vocab_size and num_attention_heads must be positive"
    );

    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |name: String, shape: &[usize]| out.push((name, shape.to_vec()));
    let (h, v) = (cfg.hidden_size, cfg.vocab_size);
    // Attention width is heads * kv_channels; it equals hidden_size in every released Qwen model.
    let proj = cfg.num_attention_heads * cfg.head_dim();
    let ff = cfg.intermediate_size / 2;
    let bias = !cfg.no_bias;

    add("transformer.wte.weight".into(), &[v, h]);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("transformer.h.{i}");
        add(format!("{p}.ln_1.weight"), &[h]);
        add(format!("{p}.attn.c_attn.weight"), &[3 * proj, h]);
        add(format!("{p}.attn.c_attn.bias"), &[3 * proj]);
        add(format!("{p}.attn.c_proj.weight"), &[h, proj]);
        if bias {
            add(format!("{p}.attn.c_proj.bias"), &[h]);
        }
        add(format!("{p}.ln_2.weight"), &[h]);
        for (w, shape) in [("w1", [ff, h]), ("w2", [ff, h]), ("c_proj", [h, ff])] {
            add(format!("{p}.mlp.{w}.weight"), &shape);
            if bias {
                add(format!("{p}.mlp.{w}.bias"), &shape[..1]);
            }
        }
    }
    add("transformer.ln_f.weight".into(), &[h]);

    let (w, e, mlp) = (vc.width, vc.output_dim, vc.mlp_width());
    let p = "transformer.visual";
    // Own parameters first, then the submodules, as `nn.Module.state_dict` lists them.
    add(
        format!("{p}.positional_embedding"),
        &[vision::qwen_vit::VIT_POS_ROWS, w],
    );
    add(format!("{p}.proj"), &[e, e]);
    add(
        format!("{p}.conv1.weight"),
        &[w, 3, vc.patch_size, vc.patch_size],
    );
    add(format!("{p}.ln_pre.weight"), &[w]);
    add(format!("{p}.ln_pre.bias"), &[w]);
    for i in 0..vc.layers {
        let b = format!("{p}.transformer.resblocks.{i}");
        for ln in ["ln_1", "ln_2"] {
            add(format!("{b}.{ln}.weight"), &[w]);
            add(format!("{b}.{ln}.bias"), &[w]);
        }
        add(format!("{b}.attn.in_proj.weight"), &[3 * w, w]);
        add(format!("{b}.attn.in_proj.bias"), &[3 * w]);
        add(format!("{b}.attn.out_proj.weight"), &[w, w]);
        add(format!("{b}.attn.out_proj.bias"), &[w]);
        add(format!("{b}.mlp.c_fc.weight"), &[mlp, w]);
        add(format!("{b}.mlp.c_fc.bias"), &[mlp]);
        add(format!("{b}.mlp.c_proj.weight"), &[w, mlp]);
        add(format!("{b}.mlp.c_proj.bias"), &[w]);
    }
    let a = format!("{p}.attn_pool");
    add(format!("{a}.pos_embed"), &[vc.n_queries, e]);
    add(format!("{a}.query"), &[vc.n_queries, e]);
    // Upstream's resampler uses an identity instead of `kv_proj` when the widths agree.
    if w != e {
        add(format!("{a}.kv_proj.weight"), &[e, w]);
    }
    add(format!("{a}.attn.in_proj_weight"), &[3 * e, e]);
    add(format!("{a}.attn.in_proj_bias"), &[3 * e]);
    add(format!("{a}.attn.out_proj.weight"), &[e, e]);
    add(format!("{a}.attn.out_proj.bias"), &[e]);
    for ln in ["ln_q", "ln_kv"] {
        add(format!("{a}.{ln}.weight"), &[e]);
        add(format!("{a}.{ln}.bias"), &[e]);
    }
    add(format!("{p}.ln_post.weight"), &[e]);
    add(format!("{p}.ln_post.bias"), &[e]);
    add("lm_head.weight".into(), &[v, h]);
    Ok(out)
}

/// One tensor to write: name, shape, bytes (bf16).
struct Spec {
    name: String,
    shape: Vec<usize>,
    bytes: u64,
}

/// Splits `sizes` (in order) into `shards` consecutive non-empty runs of about equal bytes;
/// returns the shard of each tensor.
fn balance(sizes: &[u64], shards: usize) -> Result<Vec<usize>> {
    ensure!(shards > 0, "the number of shards must be positive");
    ensure!(
        sizes.len() >= shards,
        "{} tensors cannot fill {shards} shards",
        sizes.len()
    );
    let total: u128 = sizes.iter().map(|&s| u128::from(s)).sum();
    let (mut k, mut cum, mut out) = (0usize, 0u128, Vec::with_capacity(sizes.len()));
    for (i, &size) in sizes.iter().enumerate() {
        let left = sizes.len() - i;
        let shards_after = shards - 1 - k;
        // Move on once this tensor's middle would pass the shard's share of the total, or when
        // every remaining shard needs one of the remaining tensors.
        let past = (2 * cum + u128::from(size)) * shards as u128 > 2 * total * (k as u128 + 1);
        if i > 0 && shards_after > 0 && (past || left <= shards_after) {
            k += 1;
        }
        out.push(k);
        cum += u128::from(size);
    }
    Ok(out)
}

/// Writes the checkpoint for `preset` into `dir` (created if missing). `progress(done, total)`
/// is called with weight bytes written so far.
pub fn write(
    dir: &Path,
    preset: &Preset,
    format: Format,
    seed: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let cfg: QwenConfig =
        serde_json::from_str(&preset.config_json).context("parsing the preset's config.json")?;
    let specs: Vec<Spec> = tensor_specs(&cfg)?
        .into_iter()
        .map(|(name, shape)| {
            let bytes = shape.iter().map(|&d| d as u64).product::<u64>() * 2;
            Spec { name, shape, bytes }
        })
        .collect();
    let sizes: Vec<u64> = specs.iter().map(|s| s.bytes).collect();
    let shard_of = balance(&sizes, preset.shards)?;
    let total: u64 = sizes.iter().sum();

    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let put = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    put("config.json", &preset.config_json)?;
    put("generation_config.json", GENERATION_CONFIG)?;

    let (stem, ext, index_name) = match format {
        Format::Safetensors => ("model", "safetensors", "model.safetensors.index.json"),
        Format::Bin => ("pytorch_model", "bin", "pytorch_model.bin.index.json"),
    };
    let n = preset.shards;
    let mut weight_map = BTreeMap::new();
    let mut done = 0u64;
    progress(0, total);
    for shard in 0..n {
        let file_name = format!("{stem}-{:05}-of-{n:05}.{ext}", shard + 1);
        let tensors: Vec<&Spec> = specs
            .iter()
            .zip(&shard_of)
            .filter(|(_, &k)| k == shard)
            .map(|(s, _)| s)
            .collect();
        for t in &tensors {
            weight_map.insert(t.name.clone(), file_name.clone());
        }
        let path = dir.join(&file_name);
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let mut on_bytes = |n: u64| {
            done += n;
            progress(done, total);
        };
        match format {
            Format::Safetensors => write_safetensors(&mut w, &tensors, seed, &mut on_bytes),
            Format::Bin => write_bin(&mut w, &tensors, seed, shard, u64::MAX, &mut on_bytes),
        }
        .and_then(|()| w.flush().map_err(Into::into))
        .with_context(|| format!("writing {}", path.display()))?;
    }

    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    let text = serde_json::to_string_pretty(&index).context("serialising the index")?;
    put(index_name, &(text + "\n"))
}

/// Copies a tokenizer file into the checkpoint as `qwen.tiktoken`.
pub fn copy_tokenizer(dir: &Path, tokenizer: &Path) -> Result<()> {
    let dest = dir.join("qwen.tiktoken");
    std::fs::copy(tokenizer, &dest).with_context(|| {
        format!(
            "copying the tokenizer {} to {}",
            tokenizer.display(),
            dest.display()
        )
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Values

/// Norm weights are 1, norm biases 0, everything else random.
fn fill_of(name: &str) -> Option<f32> {
    let norm = [
        ".ln_1.",
        ".ln_2.",
        ".ln_f.",
        ".ln_pre.",
        ".ln_post.",
        ".ln_q.",
        ".ln_kv.",
    ]
    .iter()
    .any(|n| name.contains(n));
    if !norm {
        None
    } else if name.ends_with(".weight") {
        Some(1.0)
    } else {
        Some(0.0)
    }
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// f32 to bf16 bits, round to nearest even (no NaNs occur here).
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Elements generated per chunk (1 MiB of bf16).
const CHUNK: usize = 1 << 19;

/// Streams the bf16 bytes of tensor `t` to `sink` in chunks. Values are N(0, 0.02)-like (sum of
/// four uniforms per 64-bit draw, cheap and deterministic), seeded by `seed` and the name only.
fn generate(t: &Spec, seed: u64, sink: &mut dyn FnMut(&[u8]) -> Result<()>) -> Result<()> {
    // FNV-1a of the name, so a tensor's values do not depend on its shard or position.
    let mut state = t
        .name
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64 ^ seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let numel = usize::try_from(t.bytes / 2).context("tensor too large for this machine")?;
    let fill = fill_of(&t.name).map(bf16_bits);
    // Sum of four u16 uniforms: mean 2 * 65535, std 65536 / sqrt(3).
    let scale = 0.02 * 3f32.sqrt() / 65536.0;
    let mut buf = vec![0u8; CHUNK.min(numel) * 2];
    let mut left = numel;
    while left > 0 {
        let n = left.min(CHUNK);
        let out = &mut buf[..n * 2];
        for pair in out.chunks_exact_mut(2) {
            let bits = match fill {
                Some(b) => b,
                None => {
                    let r = splitmix64(&mut state);
                    let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
                    bf16_bits((s as f32 - 131_070.0) * scale)
                }
            };
            pair.copy_from_slice(&bits.to_le_bytes());
        }
        sink(out)?;
        left -= n;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// safetensors

fn write_safetensors(
    w: &mut BufWriter<File>,
    tensors: &[&Spec],
    seed: u64,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<()> {
    let entries: Vec<(&str, &str, &[usize], u64)> = tensors
        .iter()
        .map(|t| (t.name.as_str(), "BF16", &t.shape[..], t.bytes))
        .collect();
    let header = lm::dev::safetensors_header(&entries, Some(serde_json::json!({ "format": "pt" })));
    w.write_all(&header)?;
    for t in tensors {
        generate(t, seed, &mut |b| {
            w.write_all(b)?;
            on_bytes(b.len() as u64);
            Ok(())
        })
        .with_context(|| format!("tensor {}", t.name))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// torch.save

fn write_bin(
    w: &mut BufWriter<File>,
    tensors: &[&Spec],
    seed: u64,
    shard: usize,
    zip64_at: u64,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<()> {
    let mut zip = lm::dev::ZipWriter::new(w, zip64_at);
    let entries: Vec<lm::dev::TensorEntry> = tensors
        .iter()
        .enumerate()
        .map(|(key, t)| {
            let shape: Vec<u64> = t.shape.iter().map(|&d| d as u64).collect();
            lm::dev::TensorEntry::contiguous(&t.name, "BFloat16Storage", &key.to_string(), &shape)
        })
        .collect();
    let pickle = lm::dev::state_dict_pickle(&entries);
    // Entry order and the small records are those of torch 2.x.
    zip.small("archive/data.pkl", &pickle)?;
    zip.small("archive/.format_version", b"1")?;
    zip.small("archive/.storage_alignment", b"64")?;
    zip.small("archive/byteorder", b"little")?;
    for (key, t) in tensors.iter().enumerate() {
        zip.begin(&format!("archive/data/{key}"), t.bytes)?;
        generate(t, seed, &mut |b| {
            zip.data(b)?;
            on_bytes(b.len() as u64);
            Ok(())
        })
        .with_context(|| format!("tensor {}", t.name))?;
        zip.end()?;
    }
    zip.small("archive/version", b"3\n")?;
    // torch writes a random 40-digit id; derive one from the seed to stay reproducible.
    let mut st = seed ^ (shard as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let id: String = (0..40)
        .map(|_| char::from(b'0' + (splitmix64(&mut st) % 10) as u8))
        .collect();
    zip.small("archive/.data/serialization_id", id.as_bytes())?;
    zip.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balance_never_leaves_a_shard_empty() {
        assert_eq!(balance(&[100, 1, 1, 1], 3).unwrap(), vec![0, 1, 2, 2]);
        assert_eq!(balance(&[1, 1, 1, 1], 4).unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(balance(&[1, 1, 1, 1], 2).unwrap(), vec![0, 0, 1, 1]);
        assert!(balance(&[1], 2).is_err());
    }

    /// Every size and offset forced into zip64 fields: the loader still indexes the shard, and
    /// Python's `zipfile` (where present) reads it and verifies the CRCs.
    #[test]
    fn zip64_fields_read_back() {
        let specs = [
            Spec {
                name: "a.weight".into(),
                shape: vec![3, 5],
                bytes: 30,
            },
            Spec {
                name: "b.ln_1.weight".into(),
                shape: vec![7],
                bytes: 14,
            },
        ];
        let refs: Vec<&Spec> = specs.iter().collect();
        let dir = tempfile::tempdir().unwrap();
        for zip64_at in [0, u64::MAX] {
            let path = dir.path().join(format!("s{zip64_at}.bin"));
            let mut w = BufWriter::new(File::create(&path).unwrap());
            write_bin(&mut w, &refs, 1, 0, zip64_at, &mut |_| {}).unwrap();
            w.flush().unwrap();
            drop(w);
            let data = std::fs::read(&path).unwrap();
            assert_eq!(lm::checkpoint::parse::zip(&data).unwrap(), 8);
            assert_eq!(lm::checkpoint::parse::torch(&data).unwrap(), 2);
            let script = "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); \
                          assert z.testzip() is None; print(len(z.namelist()))";
            if let Ok(out) = std::process::Command::new("python3")
                .args(["-c", script])
                .arg(&path)
                .output()
            {
                let stdout = String::from_utf8_lossy(&out.stdout);
                assert!(
                    out.status.success() && stdout.trim() == "8",
                    "{stdout} {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    /// The full-size preset: 853 tensors, ~9.66 B parameters, ten shards of about 1.9 GB.
    #[test]
    fn qwen_vl_chat_shards() {
        let p = preset("qwen-vl-chat").unwrap();
        let cfg: QwenConfig = serde_json::from_str(&p.config_json).unwrap();
        let specs = tensor_specs(&cfg).unwrap();
        assert_eq!(specs.len(), 853);
        let sizes: Vec<u64> = specs
            .iter()
            .map(|(_, s)| s.iter().product::<usize>() as u64 * 2)
            .collect();
        let total: u64 = sizes.iter().sum();
        assert!((19_000_000_000..19_700_000_000).contains(&total), "{total}");
        let shard_of = balance(&sizes, p.shards).unwrap();
        let mut per = vec![0u64; p.shards];
        for (s, k) in sizes.iter().zip(&shard_of) {
            per[*k] += s;
        }
        assert!(
            per.iter().all(|&b| b > 1_500_000_000 && b < 2_500_000_000),
            "{per:?}"
        );
        let mlp = specs
            .iter()
            .find(|(n, _)| n == "transformer.visual.transformer.resblocks.0.mlp.c_fc.weight");
        assert_eq!(mlp.unwrap().1, vec![8192, 1664]);
    }
}

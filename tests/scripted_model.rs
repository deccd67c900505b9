//! A text-only Qwen checkpoint, built by hand, whose greedy reply after each given prompt tail is
//! a given token sequence: the tool-use tests need a model that really writes a ReAct call
//! (`Action:` / `Action Input:`) through the real loader, engine and server, which no random
//! checkpoint does.
//!
//! How it works (one layer, f32 maths exact enough in bf16): token `t` of the script's
//! vocabulary embeds as a one-hot `cur[t]` plus an `out[t]` (the tied head reads it) plus a
//! constant `bias` dimension; every other token only as `bias`. Attention head `d - 1` (d = 1..=3)
//! has constant queries and keys (the `c_attn` bias) rotated so that its RoPE score peaks at
//! distance `d`: it copies the token `d` places back into block `prev_d`. Each MLP unit detects
//! one context (the current token and up to three before it, the fewest that tell the script's
//! points apart) and writes the token that follows it into `out`. So the reply depends only on
//! the last four tokens, and a prompt's other tokens do not matter.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// One reply to script: after a prompt ending in `tail` (at least four ids) the model writes
/// `reply`.
pub struct Script {
    pub tail: Vec<u32>,
    pub reply: Vec<u32>,
}

/// Context lengths tried: the current token and up to `MAX_BACK` before it.
const MAX_BACK: usize = 3;
const HEAD_DIM: usize = 64;
/// Rotary base: with a low base every frequency discriminates, so a head's score at its own
/// distance beats every other distance up to the context length by a wide margin.
const ROPE_BASE: f64 = 10.0;
/// Query/key magnitude: the score margin is ~0.44 · A² (see `attention_margin`).
const QK: f64 = 40.0;

/// Writes the checkpoint into `dir` (config, generation config, tokenizer copied from
/// `tokenizer_from`, weights). Fails when two points of the scripts share their last four tokens
/// but not what follows.
pub fn write(dir: &Path, tokenizer_from: &Path, scripts: &[Script]) -> Result<(), String> {
    // Prediction points: (context, most recent first, and the next token).
    let mut points: Vec<(Vec<u32>, u32)> = Vec::new();
    for s in scripts {
        assert!(s.tail.len() > MAX_BACK, "a tail needs {} ids", MAX_BACK + 1);
        let seq: Vec<u32> = s.tail.iter().chain(&s.reply).copied().collect();
        for p in s.tail.len() - 1..seq.len() - 1 {
            let ctx: Vec<u32> = (0..=MAX_BACK).map(|k| seq[p - k]).collect();
            points.push((ctx, seq[p + 1]));
        }
    }
    // The shortest context of each point that no point with another next token shares.
    let mut units: BTreeMap<Vec<u32>, u32> = BTreeMap::new();
    for (ctx, next) in &points {
        let len = (1..=MAX_BACK + 1)
            .find(|&l| points.iter().all(|(c, n)| n == next || c[..l] != ctx[..l]))
            .ok_or_else(|| {
                format!("the scripts are ambiguous: context {ctx:?} is followed by several tokens")
            })?;
        units.insert(ctx[..len].to_vec(), *next);
    }
    let tokens: BTreeSet<u32> = units
        .iter()
        .flat_map(|(c, n)| c.iter().chain(std::iter::once(n)))
        .copied()
        .collect();
    let index: BTreeMap<u32, usize> = tokens.iter().enumerate().map(|(i, &t)| (t, i)).collect();
    let n = tokens.len();
    let margin = attention_margin(8192);
    if margin < 50.0 {
        return Err(format!("the heads' score margin is only {margin}"));
    }
    if n > HEAD_DIM {
        // One head's value carries the whole one-hot block.
        return Err(format!("{n} script tokens: at most {HEAD_DIM}"));
    }
    // Blocks: cur, prev_1..prev_3, out, then bias.
    let cur = |t: u32| index[&t];
    let prev = |d: usize, t: u32| d * n + index[&t];
    let out = |t: u32| (MAX_BACK + 1) * n + index[&t];
    let bias = (MAX_BACK + 2) * n;
    let heads = (bias + 1).div_ceil(HEAD_DIM).max(MAX_BACK + 1);
    let hidden = heads * HEAD_DIM;
    let inter = units.len().div_ceil(8) * 8;
    let vocab = 151936usize;

    let mut wte = vec![0f32; vocab * hidden];
    for t in 0..vocab {
        wte[t * hidden + bias] = 1.0;
    }
    for &t in &tokens {
        let row = t as usize * hidden;
        wte[row + cur(t)] = 1.0;
        wte[row + out(t)] = 1.0;
    }

    // Attention: head d-1 looks d places back and copies `cur` into `prev_d`. Every script
    // token's embedding has norm² 3, so after ln_1 its one-hot reads sqrt(hidden / 3).
    let mut c_attn_w = vec![0f32; 3 * hidden * hidden];
    let mut c_attn_b = vec![0f32; 3 * hidden];
    let mut c_proj = vec![0f32; hidden * hidden];
    let copy = (3.0 / hidden as f64).sqrt() as f32;
    for d in 1..=MAX_BACK {
        let h0 = (d - 1) * HEAD_DIM;
        for m in 0..HEAD_DIM / 2 {
            let theta = ROPE_BASE.powf(-2.0 * m as f64 / HEAD_DIM as f64);
            // q = A, k = A·e^{iθd} per rotary pair: the score is A²·Σ cos(θ(Δ - d)).
            c_attn_b[h0 + m] = QK as f32;
            c_attn_b[hidden + h0 + m] = (QK * (theta * d as f64).cos()) as f32;
            c_attn_b[hidden + h0 + m + HEAD_DIM / 2] = (QK * (theta * d as f64).sin()) as f32;
        }
        // v of head d-1 = the cur block; c_proj puts it into prev_d.
        for &t in &tokens {
            let i = cur(t);
            c_attn_w[(2 * hidden + h0 + i) * hidden + i] = 1.0;
            c_proj[prev(d, t) * hidden + h0 + i] = copy;
        }
    }

    // MLP: unit u fires (silu of +α·0.5/rms) only when all of its context matches, and then
    // writes its next token's `out` dimension.
    let (alpha, beta, gain) = (10f32, 1f32, 1f32);
    let mut w1 = vec![0f32; inter * hidden];
    let mut w2 = vec![0f32; inter * hidden];
    let mut mlp_proj = vec![0f32; hidden * inter];
    for (u, (ctx, next)) in units.iter().enumerate() {
        for (k, &t) in ctx.iter().enumerate() {
            let dim = if k == 0 { cur(t) } else { prev(k, t) };
            w2[u * hidden + dim] = alpha;
        }
        w2[u * hidden + bias] = -alpha * (ctx.len() as f32 - 0.5);
        w1[u * hidden + bias] = beta;
        mlp_proj[out(*next) * inter + u] = gain;
    }

    let dev = Device::Cpu;
    let t = |v: Vec<f32>, shape: &[usize]| -> Result<Tensor, String> {
        Tensor::from_vec(v, shape, &dev)
            .and_then(|t| t.to_dtype(DType::BF16))
            .map_err(|e| e.to_string())
    };
    let ones = vec![1f32; hidden];
    let mut tensors = std::collections::HashMap::new();
    tensors.insert(
        "transformer.wte.weight".to_string(),
        t(wte, &[vocab, hidden])?,
    );
    let l = "transformer.h.0";
    tensors.insert(format!("{l}.ln_1.weight"), t(ones.clone(), &[hidden])?);
    tensors.insert(format!("{l}.ln_2.weight"), t(ones.clone(), &[hidden])?);
    tensors.insert("transformer.ln_f.weight".into(), t(ones, &[hidden])?);
    tensors.insert(
        format!("{l}.attn.c_attn.weight"),
        t(c_attn_w, &[3 * hidden, hidden])?,
    );
    tensors.insert(format!("{l}.attn.c_attn.bias"), t(c_attn_b, &[3 * hidden])?);
    tensors.insert(
        format!("{l}.attn.c_proj.weight"),
        t(c_proj, &[hidden, hidden])?,
    );
    tensors.insert(format!("{l}.mlp.w1.weight"), t(w1, &[inter, hidden])?);
    tensors.insert(format!("{l}.mlp.w2.weight"), t(w2, &[inter, hidden])?);
    tensors.insert(
        format!("{l}.mlp.c_proj.weight"),
        t(mlp_proj, &[hidden, inter])?,
    );
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .map_err(|e| e.to_string())?;

    let config = serde_json::json!({
        "architectures": ["QWenLMHeadModel"],
        "model_type": "qwen",
        "hidden_size": hidden,
        "intermediate_size": 2 * inter,
        "num_attention_heads": heads,
        "kv_channels": HEAD_DIM,
        "num_hidden_layers": 1,
        "max_position_embeddings": 8192,
        "seq_length": 8192,
        "rotary_pct": 1.0,
        "rotary_emb_base": ROPE_BASE,
        "use_dynamic_ntk": false,
        "use_logn_attn": false,
        "no_bias": true,
        "tie_word_embeddings": true,
        "layer_norm_epsilon": 1e-6,
        "scale_attn_weights": true,
        "vocab_size": vocab,
        "torch_dtype": "bfloat16",
    });
    let generation = serde_json::json!({
        "chat_format": "chatml",
        "eos_token_id": 151643,
        "pad_token_id": 151643,
        "stop_words_ids": [[151643]],
        "max_new_tokens": 512,
        "max_window_size": 6144,
        "do_sample": true,
        "top_k": 0,
        "top_p": 0.8,
        "repetition_penalty": 1.1,
    });
    let write_json = |name: &str, v: &serde_json::Value| {
        std::fs::write(dir.join(name), serde_json::to_vec_pretty(v).unwrap())
            .map_err(|e| e.to_string())
    };
    write_json("config.json", &config)?;
    write_json("generation_config.json", &generation)?;
    std::fs::copy(tokenizer_from, dir.join("qwen.tiktoken")).map_err(|e| e.to_string())?;
    Ok(())
}

/// The attention score margin of a head (its score at its own distance minus the best other
/// distance up to `len`), in logits: must be large for the copy to be exact.
pub fn attention_margin(len: usize) -> f64 {
    let score = |delta: f64| {
        (0..HEAD_DIM / 2)
            .map(|m| {
                let theta = ROPE_BASE.powf(-2.0 * m as f64 / HEAD_DIM as f64);
                QK * QK * (theta * delta).cos()
            })
            .sum::<f64>()
            / (HEAD_DIM as f64).sqrt()
    };
    let peak = score(0.0);
    (1..len)
        .map(|k| peak - score(k as f64))
        .chain([peak - score(-1.0), peak - score(-2.0), peak - score(-3.0)])
        .fold(f64::INFINITY, f64::min)
}

/// What the weather model says: a call, then (after the tool's result) the answer.
pub const WEATHER_THOUGHT: &str = "I should call the weather tool.";
pub const WEATHER_ARGUMENTS: &str = "{\"city\": \"Paris\"}";
pub const WEATHER_ANSWER: &str = "It is clear and 21 C in Paris.";

/// A scripted model for the golden exchange `one_tool_question` → `after_observation`: after
/// the question it calls `get_weather` with [`WEATHER_ARGUMENTS`] (thought
/// [`WEATHER_THOUGHT`]) and stops at `Observation:`; after the tool's result it answers
/// [`WEATHER_ANSWER`]. Each reply comes only after the prompt upstream builds for that exchange
/// (the last four ids of the golden prompt).
pub fn write_weather_model(dir: &Path) {
    let from = crate::text_fixture("tiny-text");
    let tok = lm::Checkpoint::open(&from).unwrap().tokenizer().unwrap();
    let tail = |id: &str| {
        let ids = crate::ids_of(&crate::react_case(id)["prompt_ids"]);
        ids[ids.len() - (MAX_BACK + 1)..].to_vec()
    };
    let call = format!(
        "Thought: {WEATHER_THOUGHT}\nAction: get_weather\nAction Input: {WEATHER_ARGUMENTS}\n\
         Observation:"
    );
    let mut answer = tok.encode_ordinary(&format!(
        " I now know the final answer.\nFinal Answer: {WEATHER_ANSWER}"
    ));
    answer.push(lm::tokenizer::IM_END);
    let scripts = [
        Script {
            tail: tail("one_tool_question"),
            reply: tok.encode_ordinary(&call),
        },
        Script {
            tail: tail("after_observation"),
            reply: answer,
        },
    ];
    write(dir, &from.join("qwen.tiktoken"), &scripts).unwrap();
}

//! Conversation -> ChatML prompt token ids, id-exact with the reference `make_context` for normal
//! inputs (README 2.1, 2.2): Qwen-VL's, and the text-only Qwen's when the tokenizer is
//! [`QwenTokenizer::text_only`] (the same template; picture items are refused, markup is text).
//!
//! Deliberate difference (security): only `{"image": ...}` items attach images. `<img>`, `</img>`,
//! `<imgpad>` and chat specials typed in any text (system, user text, ref names, assistant replies)
//! are ordinary text, so a user string can neither open a file nor forge a turn. `<ref>`/`<box>`/
//! `<quad>` typed in text stay markup, as in the reference.
//!
//! Deliberate difference (robustness): an image path longer than the span's 256 positions is
//! accepted (the reference refuses it). The span holds only the path's first 256 bytes, which the
//! image features overwrite anyway; [`ImageSpan::path`] always comes from the image item itself,
//! never from the ids.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tokenizer::{self, QwenTokenizer, Specials, IMG_SPAN, IM_END, IM_START};

/// The reference default system prompt.
pub const DEFAULT_SYSTEM: &str = "You are a helpful assistant.";

/// One element of a user turn (the reference's `from_list_format` items).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum Item {
    /// `{"image": path}`: an image file (or URL) attached at this point.
    Image { image: String },
    /// `{"text": str}`: text, used verbatim.
    Text { text: String },
    /// `{"ref": name?, "box": [[x1, y1, x2, y2], ...]}`: a referenced region (0..1000 grid).
    Box {
        #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
        reference: Option<String>,
        #[serde(rename = "box")]
        boxes: Vec<[i64; 4]>,
    },
}

fn default_system() -> String {
    DEFAULT_SYSTEM.to_string()
}

/// The neutral conversation JSON of README 2.1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    #[serde(default = "default_system")]
    pub system: String,
    /// Earlier turns, oldest first: (user items, assistant reply).
    #[serde(default)]
    pub history: Vec<(Vec<Item>, String)>,
    pub query: Vec<Item>,
}

/// Where an image's features go: `ids[start]` is `<img>`, the features fill
/// `start + 1 ..= start + 256`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpan {
    pub path: String,
    pub start: usize,
}

impl ImageSpan {
    /// Positions of the 256 visual features (inclusive range).
    pub fn feature_positions(&self) -> std::ops::RangeInclusive<usize> {
        self.start + 1..=self.start + IMG_SPAN
    }
    /// Position of `</img>`.
    pub fn end(&self) -> usize {
        self.start + IMG_SPAN + 1
    }
}

/// A ready-to-run prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    /// Images in order of appearance in `ids`.
    pub images: Vec<ImageSpan>,
    /// The prompt as text (the reference's `raw_text`).
    pub raw_text: String,
    pub history_turns_kept: usize,
    pub history_turns_dropped: usize,
}

/// Flattens items to the reference's text (`from_list_format`): images become
/// `Picture k: <img>path</img>\n` (k from 1 in each list), boxes
/// `<ref>r</ref><box>(x1,y1),(x2,y2)</box>`.
pub fn items_to_text(items: &[Item]) -> String {
    let mut text = String::new();
    let mut pictures = 0;
    for item in items {
        match item {
            Item::Image { image } => {
                pictures += 1;
                text.push_str(&format!("Picture {pictures}: <img>{image}</img>\n"));
            }
            Item::Text { text: t } => text.push_str(t),
            Item::Box { reference, boxes } => text.push_str(&box_markup(reference, boxes)),
        }
    }
    text
}

fn box_markup(reference: &Option<String>, boxes: &[[i64; 4]]) -> String {
    let mut s = String::new();
    if let Some(r) = reference {
        s.push_str(&format!("<ref>{r}</ref>"));
    }
    for [x1, y1, x2, y2] in boxes {
        s.push_str(&format!("<box>({x1},{y1}),({x2},{y2})</box>"));
    }
    s
}

/// Token ids of a user turn's items: the ids the reference gives `items_to_text(items)`, except
/// that only image items produce image spans (their path bytes verbatim, cut to the first 256
/// bytes) and text is encoded with [`Specials::GroundingMarkup`].
///
/// Text between image spans is encoded as one run (so `"Picture 1: "` is BPE'd together with the
/// text before it, and the `"\n"` after `</img>` with the text after it), exactly as the reference
/// sees it between its `<img>`/`</img>` special tokens.
pub fn encode_items(tok: &QwenTokenizer, items: &[Item]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    let mut run = String::new();
    let mut pictures = 0;
    for item in items {
        match item {
            Item::Image { image } if !tok.has_markup() => {
                return Err(Error::Prompt(format!(
                    "this is a text-only Qwen model: it cannot read pictures ({image:?}); \
                     use a Qwen-VL checkpoint for images"
                )));
            }
            Item::Image { image } => {
                pictures += 1;
                run.push_str(&format!("Picture {pictures}: "));
                ids.extend(tok.encode(&run, Specials::GroundingMarkup)?);
                run.clear();
                let bytes = image.as_bytes();
                let span = tokenizer::image_span(&bytes[..bytes.len().min(IMG_SPAN)])
                    .map_err(|e| Error::Prompt(format!("image {image:?}: {e}")))?;
                ids.extend(span);
                run.push('\n');
            }
            Item::Text { text } => run.push_str(text),
            Item::Box { reference, boxes } => run.push_str(&box_markup(reference, boxes)),
        }
    }
    ids.extend(tok.encode(&run, Specials::GroundingMarkup)?);
    Ok(ids)
}

/// `<|im_start|>role\ncontent<|im_end|>` with each piece tokenized separately.
fn block(tok: &QwenTokenizer, nl: &[u32], role: &str, content: Vec<u32>) -> Vec<u32> {
    let mut ids = vec![IM_START];
    ids.extend(tok.encode_ordinary(role));
    ids.extend_from_slice(nl);
    ids.extend(content);
    ids.push(IM_END);
    ids
}

/// Builds the ChatML prompt of README 2.2: system block, as many history turns as fit (newest
/// first, `system + turn + kept < max_window_size`; the query is not counted), then the query and
/// `<|im_start|>assistant\n`.
pub fn build_chatml(
    tok: &QwenTokenizer,
    conv: &Conversation,
    max_window_size: usize,
) -> Result<Prompt> {
    let nl = tok.encode_ordinary("\n");
    let system_ids = block(
        tok,
        &nl,
        "system",
        tok.encode(&conv.system, Specials::GroundingMarkup)?,
    );
    let system_text = format!("<|im_start|>system\n{}<|im_end|>", conv.system);

    // Kept turns, newest first; each is (ids, text, image paths).
    let mut kept: Vec<(Vec<u32>, String, Vec<String>)> = Vec::new();
    let mut kept_len = 0;
    for (query, reply) in conv.history.iter().rev() {
        let mut turn = nl.clone();
        turn.extend(block(tok, &nl, "user", encode_items(tok, query)?));
        turn.extend_from_slice(&nl);
        turn.extend(block(
            tok,
            &nl,
            "assistant",
            tok.encode(reply, Specials::GroundingMarkup)?,
        ));
        if system_ids.len() + turn.len() + kept_len >= max_window_size {
            break;
        }
        let text = format!(
            "\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|>",
            items_to_text(query)
        );
        kept_len += turn.len();
        kept.push((turn, text, image_paths(query)));
    }
    let history_turns_kept = kept.len();

    let mut ids = system_ids;
    let mut raw_text = system_text;
    let mut paths = Vec::new();
    for (turn, text, turn_paths) in kept.into_iter().rev() {
        ids.extend(turn);
        raw_text.push_str(&text);
        paths.extend(turn_paths);
    }
    paths.extend(image_paths(&conv.query));
    ids.extend_from_slice(&nl);
    ids.extend(block(tok, &nl, "user", encode_items(tok, &conv.query)?));
    ids.extend_from_slice(&nl);
    ids.push(IM_START);
    ids.extend(tok.encode_ordinary("assistant"));
    ids.extend_from_slice(&nl);
    raw_text.push_str(&format!(
        "\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
        items_to_text(&conv.query)
    ));

    let images = find_image_spans(&ids, paths)?;
    Ok(Prompt {
        ids,
        images,
        raw_text,
        history_turns_kept,
        history_turns_dropped: conv.history.len() - history_turns_kept,
    })
}

/// Like [`build_chatml`], with the assistant's reply already begun: the prompt ends in
/// `<|im_start|>assistant\n{reply_prefix}` (no `<|im_end|>`), so the model continues that reply.
/// This is upstream's text completion of the last message in tool use (crate::react), where the
/// open reply ends in `Observation: ...\nThought:`.
pub fn build_chatml_continuing(
    tok: &QwenTokenizer,
    conv: &Conversation,
    reply_prefix: &str,
    max_window_size: usize,
) -> Result<Prompt> {
    let mut prompt = build_chatml(tok, conv, max_window_size)?;
    prompt
        .ids
        .extend(tok.encode(reply_prefix, Specials::GroundingMarkup)?);
    prompt.raw_text.push_str(reply_prefix);
    Ok(prompt)
}

/// Paths of the image items, in order.
fn image_paths(items: &[Item]) -> Vec<String> {
    items
        .iter()
        .filter_map(|item| match item {
            Item::Image { image } => Some(image.clone()),
            _ => None,
        })
        .collect()
}

/// Image spans of a prompt, paired in order with the paths of the image items they come from.
/// Only image items emit `<img>` (text is encoded without it), so every `<img>` here starts a
/// well-formed 258-id span.
fn find_image_spans(ids: &[u32], paths: Vec<String>) -> Result<Vec<ImageSpan>> {
    let starts: Vec<usize> = ids
        .iter()
        .enumerate()
        .filter(|&(_, &id)| id == tokenizer::IMG_START)
        .map(|(start, _)| start)
        .collect();
    if starts.len() != paths.len() {
        return Err(Error::Prompt(format!(
            "{} image spans for {} image items",
            starts.len(),
            paths.len()
        )));
    }
    starts
        .into_iter()
        .zip(paths)
        .map(|(start, path)| {
            let well_formed = ids
                .get(start..start + IMG_SPAN + 2)
                .and_then(tokenizer::image_path_from_span)
                .is_some();
            if well_formed {
                Ok(ImageSpan { path, start })
            } else {
                Err(Error::Prompt(format!(
                    "malformed image span at position {start}"
                )))
            }
        })
        .collect()
}

impl Prompt {
    /// Fails with a message that says what to remove when the prompt leaves no room for a reply
    /// in a context of `max_positions` (the model's `max_position_embeddings`): checked before
    /// any image is decoded or the model runs.
    pub fn check_context(&self, max_positions: usize) -> Result<()> {
        let n = self.ids.len();
        if n < max_positions {
            return Ok(());
        }
        let k = self.images.len();
        Err(Error::Prompt(format!(
            "the prompt has {n} tokens ({k} image(s) take {} of them, {} each) but the model's \
             context holds {max_positions} positions, reply included: remove images or text",
            k * (IMG_SPAN + 2),
            IMG_SPAN + 2
        )))
    }
}

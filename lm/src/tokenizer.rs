//! Qwen-VL tokenizer: the `qwen.tiktoken` ranks served by a `tokenizers` byte-level BPE, with
//! special tokens and image spans handled here, like the reference `QWenTokenizer`.
//!
//! * Ordinary text: NFC, the Qwen pre-tokenisation regex, byte-level BPE. The BPE vocabulary is the
//!   151643 ranks (id = rank) and its merges are derived from the ranks (the usual tiktoken -> HF
//!   conversion), which reproduces tiktoken's merge order.
//! * Special tokens (ids 151643..151859) are recognised by this wrapper, never by the BPE, so each
//!   caller decides which surface strings count as special ([`Specials`]).
//! * `<img>path</img>` becomes `<img>`, the path bytes as ids 0..255, `<imgpad>` up to 256 ids,
//!   `</img>` (258 ids in all).

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use base64::Engine as _;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

/// Number of BPE ranks in `qwen.tiktoken`; the special ids start right after them.
pub const N_RANKS: usize = 151643;
pub const ENDOFTEXT: u32 = 151643;
pub const IM_START: u32 = 151644;
pub const IM_END: u32 = 151645;
/// `<|extra_0|>`; `<|extra_N|>` is `EXTRA_0 + N` for N in 0..[`N_EXTRA`].
pub const EXTRA_0: u32 = 151646;
pub const N_EXTRA: u32 = 205;
pub const REF_START: u32 = 151851;
pub const REF_END: u32 = 151852;
pub const BOX_START: u32 = 151853;
pub const BOX_END: u32 = 151854;
pub const QUAD_START: u32 = 151855;
pub const QUAD_END: u32 = 151856;
pub const IMG_START: u32 = 151857;
pub const IMG_END: u32 = 151858;
pub const IMG_PAD: u32 = 151859;
/// Ids the tokenizer knows (ranks + specials). The model's embedding table is larger (151936).
pub const VOCAB_SIZE: usize = 151860;
/// The token of `"\n"` (byte-level BPE rank of the newline byte), which ends every chat line.
pub const NEWLINE: u32 = 198;
/// Positions between `<img>` and `</img>`: one per visual feature.
pub const IMG_SPAN: usize = 256;

/// Largest accepted `qwen.tiktoken` (the real one has about 2.5 MB).
const MAX_VOCAB_FILE: u64 = 64 << 20;

/// The upstream pre-tokenisation regex (README 2.3).
pub const PAT_STR: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The nine markup tokens of the reference `IMAGE_ST`, in id order.
const MARKUP: [(&str, u32); 9] = [
    ("<ref>", REF_START),
    ("</ref>", REF_END),
    ("<box>", BOX_START),
    ("</box>", BOX_END),
    ("<quad>", QUAD_START),
    ("</quad>", QUAD_END),
    ("<img>", IMG_START),
    ("</img>", IMG_END),
    ("<imgpad>", IMG_PAD),
];

const CHAT_SPECIALS: [(&str, u32); 3] = [
    ("<|endoftext|>", ENDOFTEXT),
    ("<|im_start|>", IM_START),
    ("<|im_end|>", IM_END),
];

/// Which special-token strings are recognised inside text (everything else is ordinary text).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Specials {
    /// Every special (the reference `encode(text)`).
    All,
    /// The nine `<ref> </ref> <box> </box> <quad> </quad> <img> </img> <imgpad>` (the reference's
    /// prompt-content encoding).
    ImageMarkup,
    /// Only the six ref/box/quad tokens: typed `<img>`/`<|im_start|>`/... stay plain text, so user
    /// text can neither open files nor forge turns.
    GroundingMarkup,
    /// No specials at all.
    None,
}

impl Specials {
    fn allows(self, id: u32) -> bool {
        match self {
            Specials::All => true,
            Specials::ImageMarkup => (REF_START..=IMG_PAD).contains(&id),
            Specials::GroundingMarkup => (REF_START..=QUAD_END).contains(&id),
            Specials::None => false,
        }
    }
}

/// A piece of text between recognised specials, or a recognised special.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment<'a> {
    Text(&'a str),
    Special(u32),
}

/// The special token whose surface string starts `s`, with its byte length.
///
/// No special string is a prefix of another, so the first hit is the only one.
fn special_at(s: &str) -> Option<(u32, usize)> {
    if !s.starts_with('<') {
        return None;
    }
    if let Some(rest) = s.strip_prefix("<|extra_") {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let num = &rest[..digits];
        // The surface form is the plain decimal number: `<|extra_007|>` is ordinary text.
        let canonical = !num.is_empty() && (num == "0" || !num.starts_with('0')) && digits <= 3;
        if canonical && rest[digits..].starts_with("|>") {
            let n: u32 = num.parse().ok()?;
            if n < N_EXTRA {
                return Some((EXTRA_0 + n, "<|extra_".len() + digits + 2));
            }
        }
        return None;
    }
    CHAT_SPECIALS
        .iter()
        .chain(MARKUP.iter())
        .find(|(name, _)| s.starts_with(name))
        .map(|&(name, id)| (id, name.len()))
}

/// Splits `text` at the leftmost occurrences of the recognised specials (tiktoken's special scan);
/// without `markup` (text-only Qwen) the ref/box/quad/img strings are not specials at all.
fn split_specials(text: &str, specials: Specials, markup: bool) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    if specials != Specials::None {
        for (pos, _) in text.match_indices('<') {
            if pos < start {
                continue;
            }
            if let Some((id, len)) = special_at(&text[pos..]) {
                if specials.allows(id) && (markup || id < REF_START) {
                    if pos > start {
                        out.push(Segment::Text(&text[start..pos]));
                    }
                    out.push(Segment::Special(id));
                    start = pos + len;
                }
            }
        }
    }
    if start < text.len() {
        out.push(Segment::Text(&text[start..]));
    }
    out
}

/// GPT-2's reversible byte -> printable char table used by byte-level BPE vocabularies.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            u32::from(b)
        } else {
            n += 1;
            255 + n
        };
        // Every value is below 0x200, a valid scalar.
        table[b as usize] = char::from_u32(c).unwrap_or('\u{FFFD}');
    }
    table
}

/// Qwen tokenizer (`qwen.tiktoken` + specials): Qwen-VL-Chat's, with the nine ref/box/quad/img
/// markup tokens and image spans, or the text-only Qwen's ([`QwenTokenizer::text_only`]), where
/// those strings are ordinary text and ids 151851 and up are not tokens.
///
/// Loading only parses the vocabulary; the `tokenizers` BPE (a few hundred ms to build) is built on
/// the first encode, or ahead of time with [`QwenTokenizer::warm_up`]. Decoding never needs it.
pub struct QwenTokenizer {
    bpe: OnceLock<std::result::Result<Tokenizer, String>>,
    /// Surface bytes of every id below [`VOCAB_SIZE`], concatenated; id `i` is
    /// `bytes[offsets[i]..offsets[i + 1]]`.
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    /// Rank of each single-byte token (the fallback encoding of a byte).
    byte_rank: [u32; 256],
    /// Whether the Qwen-VL markup tokens exist (false for text-only Qwen).
    markup: bool,
}

impl std::fmt::Debug for QwenTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QwenTokenizer")
            .field("vocab_size", &self.vocab_size_tokenizer())
            .field("markup", &self.markup)
            .finish()
    }
}

impl QwenTokenizer {
    /// Loads `qwen.tiktoken` (lines `base64(token bytes) rank`) and builds the BPE.
    pub fn from_file(path: &Path) -> Result<Self> {
        // A FIFO or device would block or never end; the real file is about 2.5 MB.
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() || meta.len() > MAX_VOCAB_FILE {
            return Err(Error::Tokenizer(format!(
                "{}: not a vocabulary file (expected a regular file of at most {MAX_VOCAB_FILE} bytes)",
                path.display()
            )));
        }
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |line: usize, msg: String| {
            Error::Tokenizer(format!("{}: line {line}: {msg}", path.display()))
        };
        let mut by_rank: Vec<Option<Vec<u8>>> = vec![None; N_RANKS];
        let mut count = 0usize;
        for (i, line) in data.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            // tiktoken's loader skips empty lines.
            if line.is_empty() {
                continue;
            }
            let lineno = i + 1;
            let mut fields = line.split(|&b| b == b' ').filter(|f| !f.is_empty());
            let (Some(tok), Some(rank), None) = (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad(lineno, "expected `base64 rank`".into()));
            };
            let tok = base64::engine::general_purpose::STANDARD
                .decode(tok)
                .map_err(|e| bad(lineno, format!("invalid base64: {e}")))?;
            let rank: usize = std::str::from_utf8(rank)
                .ok()
                .and_then(|r| r.parse().ok())
                .ok_or_else(|| bad(lineno, "invalid rank".into()))?;
            if tok.is_empty() {
                return Err(bad(lineno, "empty token".into()));
            }
            let slot = by_rank.get_mut(rank).ok_or_else(|| {
                bad(
                    lineno,
                    format!("rank {rank} out of range (expected {N_RANKS} ranks)"),
                )
            })?;
            if slot.is_some() {
                return Err(bad(lineno, format!("duplicate rank {rank}")));
            }
            *slot = Some(tok);
            count += 1;
        }
        if count != N_RANKS {
            return Err(Error::Tokenizer(format!(
                "{}: expected {N_RANKS} ranks, found {count}",
                path.display()
            )));
        }

        let mut bytes = Vec::with_capacity(data.len());
        let mut offsets = Vec::with_capacity(VOCAB_SIZE + 1);
        offsets.push(0);
        for tok in by_rank.iter().flatten() {
            bytes.extend_from_slice(tok);
            offsets.push(bytes.len());
        }
        for id in ENDOFTEXT..VOCAB_SIZE as u32 {
            bytes.extend_from_slice(special_name(id).as_bytes());
            offsets.push(bytes.len());
        }
        drop(by_rank);

        let tok_bytes = |id: usize| &bytes[offsets[id]..offsets[id + 1]];
        let mut rank_of: HashMap<&[u8], u32> = HashMap::with_capacity(N_RANKS);
        for id in 0..N_RANKS {
            if rank_of.insert(tok_bytes(id), id as u32).is_some() {
                return Err(Error::Tokenizer(format!(
                    "{}: token of rank {id} appears twice",
                    path.display()
                )));
            }
        }
        let mut byte_rank = [0u32; 256];
        for b in 0..=255u8 {
            byte_rank[b as usize] = *rank_of.get(&[b][..]).ok_or_else(|| {
                Error::Tokenizer(format!(
                    "{}: no token for the single byte {b:#04x}",
                    path.display()
                ))
            })?;
        }

        Ok(Self {
            bpe: OnceLock::new(),
            bytes,
            offsets,
            byte_rank,
            markup: true,
        })
    }

    /// The text-only Qwen tokenizer (Qwen-7B-Chat and the rest of the family): the same ranks and
    /// chat specials, no markup tokens, so `<ref>`, `<box>`, `<img>` ... typed anywhere are text.
    pub fn text_only(mut self) -> Self {
        self.markup = false;
        self
    }

    /// Whether the Qwen-VL markup tokens (`<ref>` ... `<imgpad>`) exist.
    pub fn has_markup(&self) -> bool {
        self.markup
    }

    /// Ids the tokenizer can produce: 151860 (Qwen-VL), 151851 (text-only).
    pub fn vocab_size_tokenizer(&self) -> usize {
        if self.markup {
            VOCAB_SIZE
        } else {
            REF_START as usize
        }
    }

    /// Surface bytes of `id` (special ids give their string); `None` beyond the tokenizer's vocab.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let id = id as usize;
        (id < self.vocab_size_tokenizer())
            .then(|| &self.bytes[self.offsets[id]..self.offsets[id + 1]])
    }

    /// The id of a special token given its exact surface string.
    pub fn special_id(&self, s: &str) -> Option<u32> {
        special_at(s)
            .filter(|&(id, len)| len == s.len() && (self.markup || id < REF_START))
            .map(|(id, _)| id)
    }

    /// The surface string of a special id.
    pub fn id_to_special(&self, id: u32) -> Option<&str> {
        if !(ENDOFTEXT..self.vocab_size_tokenizer() as u32).contains(&id) {
            return None;
        }
        self.token_bytes(id)
            .and_then(|b| std::str::from_utf8(b).ok())
    }

    /// Builds the BPE now (otherwise the first encode does), e.g. on a background thread.
    pub fn warm_up(&self) -> Result<()> {
        self.bpe().map(|_| ())
    }

    fn bpe(&self) -> Result<&Tokenizer> {
        self.bpe
            .get_or_init(|| build_bpe(&self.bytes, &self.offsets))
            .as_ref()
            .map_err(|e| Error::Tokenizer(e.clone()))
    }

    /// BPE of ordinary text (already NFC): regex pre-tokenisation, byte-level BPE.
    fn bpe_encode(&self, text: &str) -> Result<Vec<u32>> {
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .bpe()?
            .encode_fast(text, false)
            .map_err(|e| Error::Tokenizer(format!("BPE failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes text with no special tokens at all (role words, `"\n"`).
    pub fn encode_ordinary(&self, text: &str) -> Vec<u32> {
        let text: String = text.nfc().collect();
        // The BPE only fails on symbols missing from its alphabet, and every byte is in it;
        // degrade to one token per byte rather than panic.
        self.bpe_encode(&text)
            .unwrap_or_else(|_| text.bytes().map(|b| self.byte_rank[b as usize]).collect())
    }

    /// Encodes `text` exactly like the reference `QWenTokenizer.tokenize` + `convert_tokens_to_ids`
    /// with the given specials allowed: NFC, split at specials, BPE, then (when `<img>` is
    /// recognised) image-span expansion.
    pub fn encode(&self, text: &str, specials: Specials) -> Result<Vec<u32>> {
        let text: String = text.nfc().collect();
        let segments = split_specials(&text, specials, self.markup);
        let mut ids = Vec::new();
        let mut i = 0;
        while i < segments.len() {
            match segments[i] {
                Segment::Special(IMG_START) => {
                    let len = segments[i + 1..]
                        .iter()
                        .position(|s| *s == Segment::Special(IMG_END))
                        .ok_or_else(|| Error::Tokenizer("Unclosed image token".into()))?;
                    let mut path = Vec::new();
                    for seg in &segments[i + 1..i + 1 + len] {
                        match *seg {
                            Segment::Text(t) => path.extend_from_slice(t.as_bytes()),
                            // The reference fails here too (a TypeError joining the path bytes).
                            Segment::Special(id) => {
                                return Err(Error::Tokenizer(format!(
                                    "special token {} inside <img>..</img>",
                                    special_name(id)
                                )))
                            }
                        }
                    }
                    ids.extend(image_span(&path)?);
                    i += len + 2;
                }
                Segment::Special(id) => {
                    ids.push(id);
                    i += 1;
                }
                Segment::Text(t) => {
                    ids.extend(self.bpe_encode(t)?);
                    i += 1;
                }
            }
        }
        Ok(ids)
    }

    /// Decodes ids like the reference `QWenTokenizer.decode(ids, skip_special_tokens,
    /// keep_image_special=...)` with `errors="replace"`.
    ///
    /// * `<img>` + path bytes (ids 0..255 up to the first `<imgpad>`) + `</img>` decodes to
    ///   `<img>path</img>` (just `path` when specials are skipped).
    /// * `skip_special` drops every id >= 151643; `keep_image_special` keeps the six ref/box/quad
    ///   ones.
    /// * Ids >= 151860 have no text (the reference raises on them) and are dropped.
    /// * Invalid UTF-8 becomes U+FFFD per maximal invalid subsequence (Python's "replace").
    pub fn decode(&self, ids: &[u32], skip_special: bool, keep_image_special: bool) -> String {
        let keep = |id: u32| {
            id < ENDOFTEXT
                || !skip_special
                || (keep_image_special && (REF_START..=QUAD_END).contains(&id))
        };
        let mut out = Vec::new();
        let mut i = 0;
        // Position of the first `</img>` after the current `<img>`, cached so that many unclosed
        // `<img>` ids do not each search the rest of the ids (quadratic).
        let mut next_end: Option<usize> = None;
        let mut searched_from = 0;
        while i < ids.len() {
            let id = ids[i];
            if id == IMG_START && self.markup {
                if next_end.is_none_or(|e| e <= i) && searched_from <= i {
                    next_end = ids
                        .get(i + 1..)
                        .and_then(|rest| rest.iter().position(|&x| x == IMG_END))
                        .map(|len| i + 1 + len);
                    // Without a `</img>` after `i` there is none after any later position either.
                    searched_from = if next_end.is_some() { i + 1 } else { ids.len() };
                }
                let span = next_end.filter(|&e| e > i).map(|e| &ids[i..=e]);
                let path = span.and_then(image_path_from_span);
                if let (Some(span), Some(path)) = (span, path) {
                    if keep(IMG_START) {
                        out.extend_from_slice(b"<img>");
                    }
                    out.extend_from_slice(String::from_utf8_lossy(&path).as_bytes());
                    if keep(IMG_END) {
                        out.extend_from_slice(b"</img>");
                    }
                    i += span.len();
                    continue;
                }
                // Unclosed or not a byte span: the ids decode one by one below.
            }
            if keep(id) {
                if let Some(b) = self.token_bytes(id) {
                    out.extend_from_slice(b);
                }
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Surface string of a special id (`id` in 151643..151860).
fn special_name(id: u32) -> String {
    match id {
        ENDOFTEXT => "<|endoftext|>".into(),
        IM_START => "<|im_start|>".into(),
        IM_END => "<|im_end|>".into(),
        _ if (EXTRA_0..EXTRA_0 + N_EXTRA).contains(&id) => format!("<|extra_{}|>", id - EXTRA_0),
        _ => MARKUP
            .iter()
            .find(|&&(_, m)| m == id)
            .map_or_else(String::new, |&(name, _)| name.to_string()),
    }
}

/// The 258 ids of an image span: `<img>`, the path bytes as ids, `<imgpad>` padding, `</img>`.
pub fn image_span(path: &[u8]) -> Result<Vec<u32>> {
    if path.len() > IMG_SPAN {
        return Err(Error::Tokenizer(
            "The content in <img>..</img> is too long".into(),
        ));
    }
    let mut ids = Vec::with_capacity(IMG_SPAN + 2);
    ids.push(IMG_START);
    ids.extend(path.iter().map(|&b| u32::from(b)));
    ids.resize(IMG_SPAN + 1, IMG_PAD);
    ids.push(IMG_END);
    Ok(ids)
}

/// Path bytes of an image span `<img> ... </img>` (the ids up to the first `<imgpad>`, each a byte
/// value); `None` if `ids` is not such a span.
pub fn image_path_from_span(ids: &[u32]) -> Option<Vec<u8>> {
    let inner = ids.strip_prefix(&[IMG_START])?.strip_suffix(&[IMG_END])?;
    // Stops at the first `<imgpad>` or non-byte id: never walks the rest of a long span.
    let mut path = Vec::new();
    for &x in inner {
        if x == IMG_PAD {
            break;
        }
        path.push(u8::try_from(x).ok()?);
    }
    Some(path)
}

/// The `tokenizers` pipeline: NFC, Split(Qwen regex, isolated), ByteLevel (no regex, no prefix
/// space), BPE over the ranks with merges derived from them.
fn build_bpe(bytes: &[u8], offsets: &[usize]) -> std::result::Result<Tokenizer, String> {
    let err = |e: tokenizers::Error| format!("building the BPE: {e}");
    let tok_bytes = |id: usize| &bytes[offsets[id]..offsets[id + 1]];
    let rank_of: HashMap<&[u8], u32> = (0..N_RANKS).map(|id| (tok_bytes(id), id as u32)).collect();
    let table = bytes_to_unicode();
    let strs: Vec<String> = (0..N_RANKS)
        .map(|id| tok_bytes(id).iter().map(|&x| table[x as usize]).collect())
        .collect();

    // Every split of a token into two tokens is a merge producing it; merges are ordered by the
    // rank of the result (ties by the ranks of the parts). Applying the lowest-ranked available
    // merge first is then exactly tiktoken's rule.
    let mut merges = Vec::with_capacity(2 * N_RANKS);
    let mut local = Vec::new();
    for id in 0..N_RANKS {
        let tok = tok_bytes(id);
        local.clear();
        for cut in 1..tok.len() {
            let (l, r) = tok.split_at(cut);
            if let Some(&rl) = rank_of.get(l) {
                if let Some(&rr) = rank_of.get(r) {
                    local.push((rl, rr));
                }
            }
        }
        local.sort_unstable();
        merges.extend(
            local
                .iter()
                .map(|&(l, r)| (strs[l as usize].clone(), strs[r as usize].clone())),
        );
    }
    let vocab: Vocab = strs.into_iter().zip(0u32..).collect();

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        // tiktoken takes a whole pre-token that is itself a token without merging.
        .ignore_merges(true)
        .build()
        .map_err(err)?;
    let split = Split::new(
        SplitPattern::Regex(PAT_STR.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(err)?;
    let byte_level = ByteLevel::new(false, false, false);
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_normalizer(Some(NFC));
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![split.into(), byte_level.into()])));
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_strings_roundtrip() {
        for id in ENDOFTEXT..VOCAB_SIZE as u32 {
            let name = special_name(id);
            assert_eq!(special_at(&name), Some((id, name.len())), "{name}");
        }
        assert_eq!(special_at("<|extra_205|>"), None);
        assert_eq!(special_at("<|extra_07|>"), None);
        assert_eq!(special_at("<|extra_|>"), None);
        assert_eq!(special_at("<im>"), None);
    }

    #[test]
    fn splits_at_leftmost_allowed_special() {
        use Segment::*;
        let s = "a<|im_start|>b<img>c</img><ref>";
        assert_eq!(
            split_specials(s, Specials::ImageMarkup, true),
            vec![
                Text("a<|im_start|>b"),
                Special(IMG_START),
                Text("c"),
                Special(IMG_END),
                Special(REF_START)
            ]
        );
        assert_eq!(
            split_specials(s, Specials::GroundingMarkup, true),
            vec![Text("a<|im_start|>b<img>c</img>"), Special(REF_START)]
        );
        assert_eq!(split_specials(s, Specials::None, true), vec![Text(s)]);
        assert_eq!(
            split_specials("<<ref>", Specials::All, true),
            vec![Text("<"), Special(REF_START)]
        );
        // Text-only Qwen: the markup strings are text even where every special is allowed.
        assert_eq!(
            split_specials(s, Specials::All, false),
            vec![Text("a"), Special(IM_START), Text("b<img>c</img><ref>")]
        );
        assert_eq!(
            split_specials(s, Specials::GroundingMarkup, false),
            vec![Text(s)]
        );
    }

    #[test]
    fn shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<QwenTokenizer>();
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let t = bytes_to_unicode();
        let set: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b'!' as usize], '!');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
    }

    fn vocab_path() -> std::path::PathBuf {
        let root = std::env::var("QWENVL_FIXTURES").map_or_else(
            |_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
            std::path::PathBuf::from,
        );
        root.join("tiny-a/qwen.tiktoken")
    }

    /// tiktoken's `byte_pair_encode`: merge the adjacent pair whose concatenation has the lowest
    /// rank (leftmost on ties) until none is a token.
    fn tiktoken_bpe(piece: &[u8], ranks: &HashMap<&[u8], u32>) -> Vec<u32> {
        if let Some(&r) = ranks.get(piece) {
            return vec![r];
        }
        let mut parts: Vec<Vec<u8>> = piece.iter().map(|&b| vec![b]).collect();
        loop {
            let mut best: Option<(u32, usize)> = None;
            for i in 0..parts.len().saturating_sub(1) {
                let cat = [parts[i].as_slice(), parts[i + 1].as_slice()].concat();
                if let Some(&r) = ranks.get(cat.as_slice()) {
                    if best.is_none_or(|(b, _)| r < b) {
                        best = Some((r, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            let next = parts.remove(i + 1);
            parts[i].extend(next);
        }
        parts.iter().map(|p| ranks[p.as_slice()]).collect()
    }

    /// A deterministic generator, so failures reproduce.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    /// Our `tokenizers` pipeline against tiktoken's algorithm (fancy-regex, as tiktoken uses, plus
    /// the rank-greedy merge loop) on mixed texts, random strings and concatenated vocab tokens.
    #[test]
    fn bpe_matches_tiktoken_reference() {
        let t0 = std::time::Instant::now();
        let tok = QwenTokenizer::from_file(&vocab_path()).unwrap();
        let t1 = std::time::Instant::now();
        tok.warm_up().unwrap();
        eprintln!("from_file {:?}, BPE build {:?}", t1 - t0, t1.elapsed());
        let ranks: HashMap<&[u8], u32> = (0..N_RANKS as u32)
            .map(|id| (tok.token_bytes(id).unwrap(), id))
            .collect();
        let re = fancy_regex::Regex::new(PAT_STR).unwrap();
        let reference = |text: &str| -> Vec<u32> {
            let text: String = text.nfc().collect();
            let mut out = Vec::new();
            for m in re.find_iter(&text) {
                out.extend(tiktoken_bpe(m.unwrap().as_str().as_bytes(), &ranks));
            }
            out
        };

        let mut texts: Vec<String> = vec![
            "The quick brown fox jumps over the lazy dog. It's 12:30 -- isn't it?  Yes!!\n\n".repeat(5),
            "通义千问（Qwen）是阿里云研发的大语言模型，支持中文、English 和 日本語のテキスト。\r\n".repeat(4),
            "fn main() {\n\tlet x: Vec<u32> = (0..10).map(|i| i * 2).collect();\n    println!(\"{x:?}\");\n}\n".into(),
            "emoji 😀👍🏽🇨🇳 👨\u{200d}👩\u{200d}👧 ✨🔥💯 family\u{3000}full\u{a0}nbsp".into(),
            "   leading\t\ttabs   and trailing   \n\n\n   \r\n \n  ".into(),
            "e\u{301}e\u{301} Å Ω ﬁ Ａｂｃ１２３ ١٢٣ ⅷ ²³ ½ 𝒳𝓎 Ελληνικά русский 한국어".into(),
            "'s'S'll'LL'Re'rE'd'D 'm 've\u{17f} x'sx n't".into(),
        ];
        let pool: Vec<char> = "aZé 1０٣\t\n\r\u{a0}\u{3000}'sSdDlLmMtTvVrReE.,!?-_()[]{}<>|/\\\"#中文字😀🏽\u{200d}\u{301}ßİΣς"
            .chars()
            .collect();
        let mut rng = Lcg(42);
        for _ in 0..3000 {
            let n = rng.next(40);
            texts.push((0..n).map(|_| pool[rng.next(pool.len())]).collect());
        }
        for _ in 0..3000 {
            let s: Vec<u8> = (0..6)
                .flat_map(|_| tok.token_bytes(rng.next(N_RANKS) as u32).unwrap().to_vec())
                .collect();
            texts.push(String::from_utf8_lossy(&s).into_owned());
        }
        for text in &texts {
            assert_eq!(
                tok.encode(text, Specials::None).unwrap(),
                reference(text),
                "text {text:?}"
            );
        }
    }

    #[test]
    fn image_span_shape() {
        let ids = image_span(b"ab").unwrap();
        assert_eq!(ids.len(), IMG_SPAN + 2);
        assert_eq!(&ids[..3], &[IMG_START, 97, 98]);
        assert!(ids[3..IMG_SPAN + 1].iter().all(|&x| x == IMG_PAD));
        assert_eq!(image_path_from_span(&ids).unwrap(), b"ab");
        let full = image_span(&[b'x'; IMG_SPAN]).unwrap();
        assert_eq!(image_path_from_span(&full).unwrap(), vec![b'x'; IMG_SPAN]);
        assert!(image_span(&[b'x'; IMG_SPAN + 1]).is_err());
        assert_eq!(image_path_from_span(&[IMG_START, 300, IMG_END]), None);
        assert_eq!(image_path_from_span(&[IMG_START, 1]), None);
    }
}

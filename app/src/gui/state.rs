//! The chat model and its persistence: chats are JSON files in `<data>/chats/`, written
//! atomically after every message; attached images are copied to `<data>/chats/images/` under
//! their content hash, so a chat keeps working when the original file moves. Image items keep
//! paths relative to the chats folder, which is the engine's `base_dir`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use lm::grounding::Piece;
use lm::prompt::{Conversation, Item};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::backend::ReplyStats;

/// Current chat file format.
pub const CHAT_VERSION: u32 = 1;

/// Writes `bytes` so that `path` holds either the old or the new content, never a mix: temp
/// file, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .with_context(|| format!("{} has no parent folder", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Makes the rename itself durable; not possible on every platform, so best effort.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write()
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("cannot write {}", path.display()))
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub enum TurnStatus {
    /// The reply is still being written.
    Pending,
    #[default]
    Done,
    /// The user pressed Stop; the reply is what came before.
    Stopped,
    Failed(String),
}

/// One exchange: the user's items and the model's reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub user: Vec<Item>,
    #[serde(default)]
    pub reply: String,
    #[serde(default)]
    pub status: TurnStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<ReplyStats>,
    /// The reply's other versions (Regenerate keeps the one it replaces), each with the turns
    /// that followed it; the shown reply is version `shown` among them (0-based).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<ReplyVersion>,
    #[serde(default)]
    pub shown: usize,
}

/// A reply version that is not shown, and the conversation that went on after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyVersion {
    pub reply: String,
    #[serde(default)]
    pub status: TurnStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<ReplyStats>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<Turn>,
}

impl Turn {
    pub fn new(user: Vec<Item>) -> Self {
        Self {
            user,
            reply: String::new(),
            status: TurnStatus::Pending,
            stats: None,
            others: Vec::new(),
            shown: 0,
        }
    }

    /// `(shown, count)` of the reply's versions, 1-based for display.
    pub fn version(&self) -> (usize, usize) {
        (self.shown + 1, self.others.len() + 1)
    }

    /// The image files of the user's message, in order ("Picture 1", "Picture 2", ...).
    pub fn pictures(&self) -> impl Iterator<Item = &str> {
        self.user.iter().filter_map(|i| match i {
            Item::Image { image } => Some(image.as_str()),
            _ => None,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chat {
    pub version: u32,
    pub id: String,
    pub title: String,
    pub created: u64,
    pub system: String,
    pub turns: Vec<Turn>,
}

impl Chat {
    pub fn new(system: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        Self {
            version: CHAT_VERSION,
            id: format!("chat-{nanos}"),
            title: "New chat".into(),
            created: unix_now(),
            system: system.to_string(),
            turns: Vec::new(),
        }
    }

    /// Moves reply `t` and the turns after it into a kept version, and makes `t` the last turn
    /// with an empty pending reply, shown as the newest version (Regenerate).
    pub fn new_version(&mut self, t: usize) {
        let after = self.turns.split_off(t + 1);
        let turn = &mut self.turns[t];
        let old = ReplyVersion {
            reply: std::mem::take(&mut turn.reply),
            status: std::mem::replace(&mut turn.status, TurnStatus::Pending),
            stats: turn.stats.take(),
            after,
        };
        let at = turn.shown.min(turn.others.len());
        turn.others.insert(at, old);
        turn.shown = turn.others.len();
    }

    /// Shows version `v` (0-based) of reply `t`, with the conversation that followed it; the
    /// version shown before keeps its own.
    pub fn show_version(&mut self, t: usize, v: usize) {
        let Some(turn) = self.turns.get(t) else {
            return;
        };
        if v > turn.others.len() || v == turn.shown {
            return;
        }
        let after = self.turns.split_off(t + 1);
        let turn = &mut self.turns[t];
        let current = ReplyVersion {
            reply: std::mem::take(&mut turn.reply),
            status: std::mem::take(&mut turn.status),
            stats: turn.stats.take(),
            after,
        };
        let at = turn.shown.min(turn.others.len());
        turn.others.insert(at, current);
        let next = turn.others.remove(v);
        turn.reply = next.reply;
        turn.status = next.status;
        turn.stats = next.stats;
        turn.shown = v;
        self.turns.extend(next.after);
    }

    /// Title from the first message's text (or its first picture).
    pub fn auto_title(&mut self) {
        let Some(first) = self.turns.first() else {
            return;
        };
        let text: String = first
            .user
            .iter()
            .filter_map(|i| match i {
                Item::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join(" ");
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        self.title = if text.is_empty() {
            "Picture".into()
        } else if text.chars().count() > 40 {
            format!("{}…", text.chars().take(40).collect::<String>())
        } else {
            text
        };
    }

    /// What the model is asked for the newest turn: earlier finished turns are the history.
    /// Failed turns are left out (the model never answered them).
    pub fn conversation(&self) -> Option<Conversation> {
        let (last, earlier) = self.turns.split_last()?;
        Some(Conversation {
            system: self.system.clone(),
            history: earlier
                .iter()
                .filter(|t| !matches!(t.status, TurnStatus::Failed(_)))
                .map(|t| (t.user.clone(), t.reply.clone()))
                .collect(),
            query: last.user.clone(),
        })
    }

    /// The picture boxes in reply `turn` refer to: the newest picture in that turn's message or,
    /// failing that, in an earlier one (as the reference's `_fetch_latest_picture`).
    pub fn latest_picture(&self, turn: usize) -> Option<&str> {
        self.turns
            .get(..=turn)?
            .iter()
            .rev()
            .find_map(|t| t.pictures().last())
    }

    /// Markdown of the chat; images link to `images_root`-based absolute paths.
    pub fn to_markdown(&self, images_root: &Path) -> String {
        let mut md = format!("# {}\n\n", self.title);
        if self.system != lm::prompt::DEFAULT_SYSTEM {
            md.push_str(&format!("*System:* {}\n\n", self.system));
        }
        for turn in &self.turns {
            md.push_str("**You:**\n\n");
            let mut k = 0;
            for item in &turn.user {
                match item {
                    Item::Image { image } => {
                        k += 1;
                        let p = images_root.join(image);
                        md.push_str(&format!("![Picture {k}](<{}>)\n\n", p.display()));
                    }
                    Item::Text { text } => md.push_str(&format!("{text}\n\n")),
                    Item::Box { reference, boxes } => {
                        for b in boxes {
                            md.push_str(&format!(
                                "`{}[{}, {}, {}, {}]` ",
                                reference
                                    .as_ref()
                                    .map(|r| format!("{r} "))
                                    .unwrap_or_default(),
                                b[0],
                                b[1],
                                b[2],
                                b[3]
                            ));
                        }
                        md.push_str("\n\n");
                    }
                }
            }
            md.push_str(&format!("**Qwen-VL:**\n\n{}\n\n", readable(&turn.reply)));
            if turn.status == TurnStatus::Stopped {
                md.push_str("*(stopped)*\n\n");
            }
        }
        md
    }
}

/// Reply text with grounding markup as plain words: refs in bold, boxes as `[x1, y1, x2, y2]`.
pub fn readable(reply: &str) -> String {
    let mut out = String::new();
    for piece in super::geometry::pieces(reply) {
        match piece {
            Piece::Text(t) => out.push_str(&t),
            Piece::Ref(r) => out.push_str(&format!("**{}**", r.trim())),
            Piece::Box(b) => out.push_str(&format!(" `[{}]`", b.replace(['(', ')'], ""))),
            Piece::Quad(q) => out.push_str(&format!(" `quad[{}]`", q.replace(['(', ')'], ""))),
            Piece::Image(p) => out.push_str(&format!("<img>{p}</img>")),
        }
    }
    out
}

/// A picture file in the chats folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Relative to the chats folder, e.g. `images/3fa2….png`.
    pub rel: String,
    pub width: u32,
    pub height: u32,
}

/// Chats on disk.
#[derive(Debug, Clone)]
pub struct ChatStore {
    pub dir: PathBuf,
}

impl ChatStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    fn path_of(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    pub fn save(&self, chat: &Chat) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(chat)?;
        write_atomic(&self.path_of(&chat.id), &bytes)
    }

    /// Deletes a chat's file (its pictures stay: other chats may share them).
    pub fn delete(&self, id: &str) -> Result<()> {
        match std::fs::remove_file(self.path_of(id)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context(format!("cannot delete the chat {id}"))),
        }
    }

    /// Every chat, newest first, and a message for each file that could not be read. A corrupt
    /// file is renamed aside (`….json.corrupt-<time>`), never deleted, so nothing is lost and it
    /// is not reported again.
    pub fn load_all(&self) -> (Vec<Chat>, Vec<String>) {
        let mut chats = Vec::new();
        let mut problems = Vec::new();
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return (chats, problems);
        };
        for entry in rd.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .context("cannot read it")
                .and_then(|b| serde_json::from_slice::<Chat>(&b).context("not a valid chat file"));
            match parsed {
                Ok(chat) => chats.push(chat),
                Err(e) => {
                    let aside = path.with_extension(format!("json.corrupt-{}", unix_now()));
                    let moved = match std::fs::rename(&path, &aside) {
                        Ok(()) => format!("moved aside to {}", aside.display()),
                        Err(re) => format!("could not move it aside: {re}"),
                    };
                    problems.push(format!(
                        "Chat file {} is damaged ({e:#}); {moved}.",
                        path.display()
                    ));
                }
            }
        }
        chats.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
        (chats, problems)
    }

    /// Copies an image file into the store (validated by decoding it).
    pub fn import_file(&self, path: &Path) -> Result<Stored> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        self.import_bytes(&bytes)
            .with_context(|| format!("{} is not a readable image", path.display()))
    }

    /// Stores encoded image bytes under their hash, keeping the format.
    pub fn import_bytes(&self, bytes: &[u8]) -> Result<Stored> {
        let format = vision::image::guess_format(bytes).context("unknown image format")?;
        let img = vision::image::load_from_memory_with_format(bytes, format)
            .context("cannot decode the image")?;
        let ext = format.extensions_str().first().copied().unwrap_or("img");
        let hash = Sha256::digest(bytes);
        let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
        let rel = format!("images/{hex}.{ext}");
        let dest = self.dir.join(&rel);
        if !dest.is_file() {
            write_atomic(&dest, bytes)?;
        }
        Ok(Stored {
            rel,
            width: img.width(),
            height: img.height(),
        })
    }

    /// Stores raw RGBA pixels (a clipboard screenshot) as PNG.
    pub fn import_rgba(&self, width: u32, height: u32, rgba: Vec<u8>) -> Result<Stored> {
        let img = vision::image::RgbaImage::from_raw(width, height, rgba)
            .context("clipboard image has the wrong size")?;
        let mut png = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut png),
            vision::image::ImageFormat::Png,
        )
        .context("cannot encode the clipboard image")?;
        self.import_bytes(&png)
    }
}

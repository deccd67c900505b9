//! The app's plain state: what the views draw and edit. It holds no channels or threads; what
//! the app does in response (load, send, download…) is asked for with an
//! [`Action`](super::action::Action) and done in [`QwenApp`](super::app::QwenApp).

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use egui::{Rect, TextureHandle};
use lm::checkpoint::LoadProgress;
use lm::prompt::Item;

use super::action::Action;
use super::backend::{ModelInfo, ModelSource, Params};
use super::settings::{Dirs, Settings};
use super::state::{Chat, ChatStore, Stored};
use crate::download::DownloadProgress;
use crate::model_dir::Found;

#[derive(Debug, Clone)]
pub enum ModelState {
    None,
    Loading {
        source: ModelSource,
        stage: String,
        /// Known progress of a stage; `None`: see `counter`.
        fraction: Option<f32>,
        /// Weight bytes read so far, of `total` (polled every frame).
        counter: Arc<LoadProgress>,
        total: u64,
        since: Instant,
    },
    Ready(ModelInfo),
    Failed {
        source: ModelSource,
        error: String,
    },
}

impl ModelState {
    /// Fraction of the load done, when known: the stage's own, else weight bytes read.
    pub fn load_fraction(&self) -> Option<f32> {
        match self {
            ModelState::Loading {
                fraction,
                counter,
                total,
                ..
            } => fraction.or_else(|| {
                let read = counter.bytes.load(Ordering::Relaxed);
                (read > 0 && *total > 0).then(|| (read as f32 / *total as f32).min(1.0))
            }),
            _ => None,
        }
    }
}

/// A model download in progress (first-run screen).
pub struct Download {
    /// The latest report; `None` until the hub answered.
    pub progress: Option<DownloadProgress>,
    pub cancel: Arc<AtomicBool>,
    pub since: Instant,
    /// Bytes already in the cache when the transfer started (not counted in the speed).
    pub start_bytes: Option<u64>,
}

impl Download {
    /// Bytes per second of this transfer, once measurable.
    pub fn speed(&self) -> Option<f64> {
        let p = self.progress.as_ref()?;
        let moved = p.bytes_done.saturating_sub(self.start_bytes?);
        let secs = self.since.elapsed().as_secs_f64();
        (moved > 0 && secs > 0.5).then(|| moved as f64 / secs)
    }
}

/// The reply being written.
pub struct Pending {
    pub id: u64,
    pub chat_id: String,
    pub cancel: Arc<AtomicBool>,
    pub started: Instant,
    pub first_piece: Option<Instant>,
    pub pieces: usize,
}

impl Pending {
    /// Live speed: pieces after the first per second since the first.
    pub fn pieces_per_s(&self) -> f64 {
        match self.first_piece {
            Some(t) if self.pieces > 1 => {
                let s = t.elapsed().as_secs_f64();
                if s > 0.0 {
                    (self.pieces - 1) as f64 / s
                } else {
                    0.0
                }
            }
            _ => 0.0,
        }
    }
}

/// A region dragged on an attached picture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// Index into `Composer::images`.
    pub image: usize,
    pub grid: [i64; 4],
}

#[derive(Default)]
pub struct Composer {
    pub text: String,
    pub images: Vec<Stored>,
    pub regions: Vec<Region>,
    /// The attached picture shown large for dragging a region.
    pub selecting: Option<usize>,
    pub drag_start: Option<egui::Pos2>,
}

impl Composer {
    /// The message's items: pictures first ("Picture 1", ...), then the text, then the regions.
    pub fn items(&self) -> Vec<Item> {
        let mut items: Vec<Item> = self
            .images
            .iter()
            .map(|s| Item::Image {
                image: s.rel.clone(),
            })
            .collect();
        let text = self.text.trim();
        if !text.is_empty() {
            items.push(Item::Text {
                text: text.to_string(),
            });
        }
        for r in &self.regions {
            items.push(Item::Box {
                reference: None,
                boxes: vec![r.grid],
            });
        }
        items
    }

    pub fn is_empty(&self) -> bool {
        self.text.trim().is_empty() && self.images.is_empty() && self.regions.is_empty()
    }

    pub fn remove_image(&mut self, i: usize) {
        if i < self.images.len() {
            self.images.remove(i);
            self.regions.retain(|r| r.image != i);
            for r in &mut self.regions {
                if r.image > i {
                    r.image -= 1;
                }
            }
            self.selecting = None;
        }
    }
}

/// A shape drawn over a picture in the last frame (what tests assert on).
#[derive(Debug, Clone, PartialEq)]
pub struct Drawn {
    pub turn: usize,
    pub object: usize,
    pub label: Option<String>,
    /// Screen rectangle of the picture.
    pub image_rect: Rect,
    /// Outline points on screen (4 corners).
    pub outline: Vec<egui::Pos2>,
    pub highlighted: bool,
    /// Drawn in the picture viewer (not the chat).
    pub in_viewer: bool,
}

/// The picture viewer's state.
#[derive(Debug, Clone, Default)]
pub struct Viewer {
    /// The picture, relative to the chat store.
    pub image: String,
    /// The reply whose objects are drawn over it.
    pub turn: Option<usize>,
    /// Points per picture pixel; `None`: fit the canvas.
    pub zoom: Option<f32>,
    pub pan: egui::Vec2,
    /// Dragging draws a region instead of panning.
    pub drawing: bool,
    pub drag_start: Option<egui::Pos2>,
    /// The composer's copy of the picture that regions go to, once there is one.
    pub composer_image: Option<usize>,
    /// The canvas of the last frame.
    pub canvas: Option<Rect>,
    pub close: bool,
}

/// A decoded picture on the GPU, with the original size.
#[derive(Clone)]
pub struct Tex {
    pub handle: TextureHandle,
    pub width: u32,
    pub height: u32,
}

/// Everything the views draw and edit.
/// The sidebar's search box (Ctrl+F focuses it).
pub fn chat_search_id() -> egui::Id {
    egui::Id::new("chat_search")
}

pub struct AppState {
    pub dirs: Dirs,
    pub settings: Settings,
    pub store: ChatStore,
    pub chats: Vec<Chat>,
    pub current: usize,
    pub model: ModelState,
    pub params: Params,
    pub model_defaults: Params,
    /// Settings changed but not yet saved.
    pub params_dirty: bool,
    pub pending: Option<Pending>,
    pub composer: Composer,
    /// Messages shown as dismissable banners.
    pub errors: Vec<String>,
    pub notice: Option<String>,
    pub show_settings: bool,
    /// Object under the pointer last frame / this frame: (turn, object).
    pub hovered: Option<(usize, usize)>,
    pub hover_next: Option<(usize, usize)>,
    pub drawn: Vec<Drawn>,
    /// The first frame's discovery result (shown on the welcome screen).
    pub found: Option<Found>,
    pub(crate) textures: HashMap<String, Option<Tex>>,
    pub download: Option<Download>,
    /// The repository the Download button fetches.
    pub download_repo: String,
    /// The "Connect to a server" form.
    pub server_url: String,
    pub server_key: String,
    pub show_connect: bool,
    /// What the views asked for this frame, done by the app after drawing.
    pub(crate) outbox: Vec<Action>,
    /// Replies parsed as Markdown, by text.
    pub docs: super::markdown::Docs,
    /// The sidebar's chat search (Ctrl+F).
    pub chat_search: String,
    /// A user message being edited: its turn and the text so far.
    pub editing: Option<(usize, String)>,
    /// A chat being renamed in the sidebar: its index and the title so far.
    pub renaming: Option<(usize, String)>,
    /// The picture viewer, when open.
    pub viewer: Option<Viewer>,
}

impl AppState {
    /// Asks the app to do `action` once this frame is drawn.
    pub fn ask(&mut self, action: Action) {
        self.outbox.push(action);
    }

    pub fn chat(&self) -> &Chat {
        &self.chats[self.current.min(self.chats.len() - 1)]
    }

    pub(crate) fn chat_mut(&mut self) -> &mut Chat {
        let i = self.current.min(self.chats.len() - 1);
        &mut self.chats[i]
    }

    pub fn is_generating(&self) -> bool {
        self.pending.is_some()
    }

    /// The model folder loaded, loading or failed to load (not a server).
    pub fn model_folder(&self) -> Option<&Path> {
        let source = match &self.model {
            ModelState::Loading { source, .. } | ModelState::Failed { source, .. } => source,
            ModelState::Ready(info) => &info.source,
            ModelState::None => return None,
        };
        match source {
            ModelSource::Folder { path, .. } => Some(path),
            ModelSource::Server { .. } => None,
        }
    }

    /// Whether pictures can be attached: false while a text-only Qwen is loaded.
    pub fn reads_pictures(&self) -> bool {
        !matches!(&self.model, ModelState::Ready(info) if !info.vision)
    }

    /// Why a message cannot be sent now, if it cannot.
    pub fn send_blocked(&self) -> Option<&'static str> {
        if self.pending.is_some() {
            Some("Wait for the reply to finish, or press Stop.")
        } else if !matches!(self.model, ModelState::Ready(_)) {
            Some("Open a model first.")
        } else if !self.reads_pictures() && !self.composer.images.is_empty() {
            Some("This model is text-only: remove the pictures, or load a Qwen-VL model.")
        } else {
            None
        }
    }

    /// The texture of a stored picture (decoded once; `None` if unreadable).
    pub fn texture(&mut self, ctx: &egui::Context, rel: &str) -> Option<Tex> {
        if let Some(t) = self.textures.get(rel) {
            return t.clone();
        }
        let path = self.store.dir.join(rel);
        let tex = match load_texture(ctx, &path, rel) {
            Ok(t) => Some(t),
            Err(e) => {
                self.errors.push(format!("{e:#}"));
                None
            }
        };
        self.textures.insert(rel.to_string(), tex.clone());
        tex
    }
}

/// Decodes a picture into a texture, downscaled for display (the original size is kept for
/// geometry).
fn load_texture(ctx: &egui::Context, path: &Path, name: &str) -> Result<Tex> {
    let img =
        vision::image::open(path).with_context(|| format!("cannot show {}", path.display()))?;
    let (width, height) = (img.width(), img.height());
    let img = if width.max(height) > 1600 {
        img.thumbnail(1600, 1600)
    } else {
        img
    };
    let rgba = img.to_rgba8();
    let size = [rgba.width() as usize, rgba.height() as usize];
    let color = egui::ColorImage::from_rgba_unmultiplied(size, rgba.as_raw());
    Ok(Tex {
        handle: ctx.load_texture(name, color, egui::TextureOptions::LINEAR),
        width,
        height,
    })
}

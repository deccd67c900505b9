//! The app's state and everything it does in response to the user or the worker; drawing lives
//! in `view/`. One `QwenApp::ui` call is one frame, the same in the window and in tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result};
use egui::{Rect, TextureHandle};
use lm::checkpoint::LoadProgress;
use lm::prompt::Item;

use super::backend::{Backend, ModelInfo, ModelSource, Params, ReplyStats};
use super::settings::{self, Dirs, Found, Settings};
use super::state::{Chat, ChatStore, Stored, Turn, TurnStatus};
use super::worker::{Command, Event, Worker};
use crate::download::{DownloadOptions, DownloadProgress, DownloadStage};

/// The text-reading prompt of the "Read text" button.
pub const OCR_PROMPT: &str = "Read all the text in this picture, line by line.";

/// Reads an image from the system clipboard: `(width, height, rgba)`, `None` if it holds none.
pub type ClipboardImage = Box<dyn FnMut() -> Result<Option<(u32, u32, Vec<u8>)>>>;

/// The platform clipboard via arboard.
pub fn system_clipboard_image() -> ClipboardImage {
    Box::new(|| {
        let mut cb = arboard::Clipboard::new().context("cannot open the clipboard")?;
        match cb.get_image() {
            Ok(img) => Ok(Some((
                u32::try_from(img.width).context("clipboard image too wide")?,
                u32::try_from(img.height).context("clipboard image too tall")?,
                img.bytes.into_owned(),
            ))),
            // Text or nothing on the clipboard: not an error, just no picture.
            Err(arboard::Error::ContentNotAvailable) => Ok(None),
            Err(e) => Err(anyhow::Error::new(e).context("cannot read the clipboard")),
        }
    })
}

/// How the app starts.
pub struct AppOptions {
    pub dirs: Dirs,
    pub backend: Box<dyn Backend>,
    /// Look for a model ($QWENVL_MODEL, last used, HF cache) and load it at start.
    pub discover_model: bool,
    /// Load this model at start (wins over discovery).
    pub model: Option<PathBuf>,
    /// Connect to this server at start (wins over `model` and discovery).
    pub server: Option<ModelSource>,
    /// What the first-run screen's Download button fetches (Qwen/Qwen-VL-Chat from the hub).
    pub download: DownloadOptions,
    /// Import this saved chat file and show it (`QWENVL_OPEN_CHAT`).
    pub open_chat: Option<PathBuf>,
    pub clipboard: ClipboardImage,
}

impl AppOptions {
    /// Test/demo options: everything under `root`, no discovery, no system clipboard.
    pub fn for_folder(root: &Path, backend: Box<dyn Backend>) -> Self {
        Self {
            dirs: Dirs::in_folder(root),
            backend,
            discover_model: false,
            model: None,
            server: None,
            download: DownloadOptions::default(),
            open_chat: None,
            clipboard: Box::new(|| Ok(None)),
        }
    }
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

/// A model download in progress (first-run screen).
pub struct Download {
    /// The latest report; `None` until the hub answered.
    pub progress: Option<DownloadProgress>,
    pub cancel: Arc<AtomicBool>,
    pub since: Instant,
    /// Bytes already in the cache when the transfer started (not counted in the speed).
    pub start_bytes: Option<u64>,
    events: Receiver<DownloadEvent>,
}

enum DownloadEvent {
    Progress(DownloadProgress),
    End(DownloadEnd),
}

/// How a download ended.
enum DownloadEnd {
    Done(PathBuf),
    Failed(String),
    Cancelled,
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
}

/// A decoded picture on the GPU, with the original size.
#[derive(Clone)]
pub struct Tex {
    pub handle: TextureHandle,
    pub width: u32,
    pub height: u32,
}

pub struct QwenApp {
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
    pub(crate) clipboard: ClipboardImage,
    pub download: Option<Download>,
    download_opts: DownloadOptions,
    /// The "Connect to a server" form.
    pub server_url: String,
    pub server_key: String,
    pub show_connect: bool,
    /// The model that was ready when a server connection was tried: it is still loaded if the
    /// connection fails.
    previous: Option<ModelInfo>,
    worker: Worker,
    waker_ctx: Arc<OnceLock<egui::Context>>,
    next_id: u64,
    /// A `Paste` event came since the last V key release (the image check ran then).
    pasted: bool,
}

impl QwenApp {
    pub fn new(opts: AppOptions) -> Self {
        let waker_ctx: Arc<OnceLock<egui::Context>> = Arc::new(OnceLock::new());
        let w = waker_ctx.clone();
        let worker = Worker::spawn(
            opts.backend,
            Arc::new(move || {
                if let Some(ctx) = w.get() {
                    ctx.request_repaint();
                }
            }),
        );
        let settings = Settings::load(&opts.dirs);
        let store = ChatStore::new(opts.dirs.chats());
        let (mut chats, problems) = store.load_all();
        let mut errors = problems;
        let params = settings.params.clone().unwrap_or_default();
        let mut current = 0;
        if let Some(path) = &opts.open_chat {
            match import_chat(&store, path) {
                Ok(chat) => {
                    chats.retain(|c| c.id != chat.id);
                    chats.insert(0, chat);
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        } else if let Some(last) = &settings.last_chat {
            current = chats.iter().position(|c| &c.id == last).unwrap_or(0);
        }
        // Replies that were being written when the app stopped are what they are now.
        for chat in &mut chats {
            for t in &mut chat.turns {
                if t.status == TurnStatus::Pending {
                    t.status = TurnStatus::Stopped;
                }
            }
        }
        if chats.is_empty() {
            chats.push(Chat::new(&params.system));
        }
        let mut app = Self {
            dirs: opts.dirs,
            settings,
            store,
            chats,
            current,
            model: ModelState::None,
            model_defaults: params.clone(),
            params_dirty: false,
            params,
            pending: None,
            composer: Composer::default(),
            errors,
            notice: None,
            show_settings: false,
            hovered: None,
            hover_next: None,
            drawn: Vec::new(),
            found: None,
            textures: HashMap::new(),
            clipboard: opts.clipboard,
            server_url: String::new(),
            server_key: String::new(),
            show_connect: false,
            previous: None,
            download: None,
            download_opts: opts.download,
            worker,
            waker_ctx,
            next_id: 0,
            pasted: false,
        };
        if let Some(ModelSource::Server { url, api_key }) = &app.settings.server {
            app.server_url = url.clone();
            app.server_key = api_key.clone().unwrap_or_default();
        }
        let last_server = app
            .settings
            .server
            .clone()
            .filter(|_| app.settings.use_server && std::env::var_os("QWENVL_MODEL").is_none());
        if let Some(server) = opts
            .server
            .or_else(|| last_server.filter(|_| opts.discover_model && opts.model.is_none()))
        {
            app.load_source(server);
            return app;
        }
        let start = opts.model.map(Found::EnvVar).or_else(|| {
            if opts.discover_model {
                settings::discover(&app.settings)
            } else {
                None
            }
        });
        if let Some(found) = start {
            app.load_model(found.path().to_path_buf());
            app.found = Some(found);
        }
        app
    }

    pub fn chat(&self) -> &Chat {
        &self.chats[self.current.min(self.chats.len() - 1)]
    }

    fn chat_mut(&mut self) -> &mut Chat {
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

    /// Chooses the weight type for model folders (`None`: this machine's default), remembers
    /// it, and loads the current folder again with it.
    pub fn set_weights(&mut self, weights: Option<lm::quant::WeightType>) {
        if weights == self.settings.weights {
            return;
        }
        self.settings.weights = weights;
        self.save_settings();
        if let Some(dir) = self.model_folder().map(Path::to_path_buf) {
            self.load_model(dir);
        }
    }

    /// Loads a model folder with the weight type chosen in the settings.
    pub fn load_model(&mut self, dir: PathBuf) {
        self.load_source(ModelSource::Folder {
            path: dir,
            weights: self.settings.weights,
        });
    }

    /// Connects to the server of the "Connect to a server" form.
    pub fn connect_server(&mut self) {
        let key = self.server_key.trim();
        self.load_source(ModelSource::Server {
            url: self.server_url.trim().to_string(),
            api_key: (!key.is_empty()).then(|| key.to_string()),
        });
        self.show_connect = false;
    }

    pub fn load_source(&mut self, source: ModelSource) {
        let counter = Arc::new(LoadProgress::default());
        let total = match &source {
            ModelSource::Folder { path, .. } => super::backend::weights_bytes(path),
            ModelSource::Server { .. } => 0,
        };
        self.previous = match std::mem::replace(&mut self.model, ModelState::None) {
            ModelState::Ready(info) if source.is_server() => Some(info),
            _ => None,
        };
        self.model = ModelState::Loading {
            source: source.clone(),
            stage: "Starting".into(),
            fraction: None,
            counter: counter.clone(),
            total,
            since: Instant::now(),
        };
        if !self.worker.send(Command::Load(source, counter)) {
            self.fail_worker();
        }
    }

    fn fail_worker(&mut self) {
        self.errors
            .push("The inference thread stopped; restart the app.".into());
        self.pending = None;
    }

    /// Handles everything the worker (and a download) sent since the last frame.
    pub fn poll_worker(&mut self) {
        while let Ok(ev) = self.worker.events.try_recv() {
            self.on_event(ev);
        }
        self.poll_download();
    }

    /// Downloads the model into the Hugging Face cache on a thread of its own, then loads it.
    /// Partial files are kept: a failed or cancelled download resumes where it stopped.
    pub fn start_download(&mut self) {
        if self.download.is_some() {
            return;
        }
        let (tx, events) = std::sync::mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let opts = self.download_opts.clone();
        let waker = self.waker_ctx.clone();
        let flag = cancel.clone();
        let wake = move || {
            if let Some(ctx) = waker.get() {
                ctx.request_repaint();
            }
        };
        let spawned = std::thread::Builder::new()
            .name("qwenvl-download".into())
            .spawn(move || {
                let r = crate::download::download(
                    &opts,
                    &mut |p| {
                        let _ = tx.send(DownloadEvent::Progress(p.clone()));
                        wake();
                    },
                    &flag,
                );
                let _ = tx.send(DownloadEvent::End(match r {
                    Ok(dir) => DownloadEnd::Done(dir),
                    Err(e) if e.is::<crate::download::Cancelled>() => DownloadEnd::Cancelled,
                    Err(e) => DownloadEnd::Failed(format!("{e:#}")),
                }));
                wake();
            });
        if let Err(e) = spawned {
            self.errors
                .push(format!("Could not start the download: {e}"));
            return;
        }
        self.download = Some(Download {
            progress: None,
            cancel,
            since: Instant::now(),
            start_bytes: None,
            events,
        });
    }

    pub fn cancel_download(&mut self) {
        if let Some(d) = &self.download {
            d.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// The repository the Download button fetches.
    pub fn download_repo(&self) -> &str {
        &self.download_opts.repo
    }

    fn poll_download(&mut self) {
        let Some(d) = self.download.as_mut() else {
            return;
        };
        let mut end = None;
        while let Ok(ev) = d.events.try_recv() {
            match ev {
                DownloadEvent::Progress(p) => {
                    if p.stage == DownloadStage::Downloading && d.start_bytes.is_none() {
                        d.start_bytes = Some(p.bytes_done);
                        d.since = Instant::now();
                    }
                    d.progress = Some(p);
                }
                DownloadEvent::End(e) => end = Some(e),
            }
        }
        match end {
            None => {}
            Some(DownloadEnd::Done(dir)) => {
                self.download = None;
                self.load_model(dir);
            }
            Some(DownloadEnd::Cancelled) => {
                self.download = None;
                self.notice = Some(
                    "Download cancelled. The files fetched so far are kept: Download resumes."
                        .into(),
                );
            }
            Some(DownloadEnd::Failed(e)) => {
                self.download = None;
                self.errors.push(format!(
                    "The download failed: {e}. Press Download again to resume where it stopped."
                ));
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::LoadStage(s, f) => {
                if let ModelState::Loading {
                    stage, fraction, ..
                } = &mut self.model
                {
                    *stage = s;
                    *fraction = f;
                }
            }
            Event::Loaded(info) => {
                let same = match &info.source {
                    ModelSource::Folder { path, .. } => {
                        !self.settings.use_server
                            && self.settings.last_model.as_deref() == Some(path.as_path())
                    }
                    server => {
                        self.settings.use_server && self.settings.server.as_ref() == Some(server)
                    }
                };
                if !same || self.settings.params.is_none() {
                    self.params = info.defaults.clone();
                }
                self.model_defaults = info.defaults.clone();
                match &info.source {
                    ModelSource::Folder { path, .. } => {
                        self.settings.last_model = Some(path.clone());
                        self.settings.use_server = false;
                    }
                    server => {
                        self.settings.server = Some(server.clone());
                        self.settings.use_server = true;
                    }
                }
                self.previous = None;
                self.save_settings();
                self.model = ModelState::Ready(info);
            }
            Event::LoadFailed(error) => {
                let source = match &self.model {
                    ModelState::Loading { source, .. } => source.clone(),
                    _ => ModelSource::folder(PathBuf::new()),
                };
                if source.is_server() {
                    self.errors.push(format!(
                        "Could not connect to {}: {error}",
                        source.location()
                    ));
                    // The backend keeps what it had loaded before.
                    self.model = match self.previous.take() {
                        Some(info) => ModelState::Ready(info),
                        None => ModelState::Failed { source, error },
                    };
                } else {
                    self.errors
                        .push(format!("Could not load the model: {error}"));
                    self.model = ModelState::Failed { source, error };
                }
            }
            Event::Text(id, piece) => {
                let Some(p) = self.pending.as_mut().filter(|p| p.id == id) else {
                    return;
                };
                p.first_piece.get_or_insert_with(Instant::now);
                p.pieces += 1;
                let chat_id = p.chat_id.clone();
                if let Some(t) = self.turn_of(&chat_id) {
                    t.reply.push_str(&piece);
                }
            }
            Event::Done(id, stats) => self.finish(id, Ok(stats)),
            Event::Failed(id, e) => self.finish(id, Err(e)),
        }
    }

    /// The last turn of chat `id`.
    fn turn_of(&mut self, id: &str) -> Option<&mut Turn> {
        self.chats
            .iter_mut()
            .find(|c| c.id == id)
            .and_then(|c| c.turns.last_mut())
    }

    fn finish(&mut self, id: u64, result: std::result::Result<ReplyStats, String>) {
        let Some(p) = self.pending.take_if(|p| p.id == id) else {
            return;
        };
        let mut error = None;
        if let Some(t) = self.turn_of(&p.chat_id) {
            match result {
                Ok(stats) => {
                    t.reply = t.reply.trim().to_string();
                    t.status = if stats.cancelled {
                        TurnStatus::Stopped
                    } else {
                        TurnStatus::Done
                    };
                    t.stats = Some(stats.rounded());
                }
                Err(e) => {
                    t.status = TurnStatus::Failed(e.clone());
                    error = Some(e);
                }
            }
        }
        if let Some(e) = error {
            self.errors.push(format!("The reply failed: {e}"));
        }
        self.save_chat_by_id(&p.chat_id);
    }

    fn save_chat_by_id(&mut self, id: &str) {
        if let Some(chat) = self.chats.iter().find(|c| c.id == id) {
            if let Err(e) = self.store.save(chat) {
                self.errors.push(format!("Could not save the chat: {e:#}"));
            }
        }
    }

    pub fn save_current(&mut self) {
        let id = self.chat().id.clone();
        self.save_chat_by_id(&id);
    }

    pub fn save_settings(&mut self) {
        self.settings.params = Some(self.params.clone());
        self.settings.last_chat = Some(self.chat().id.clone());
        if let Err(e) = self.settings.save(&self.dirs) {
            self.errors
                .push(format!("Could not save the settings: {e:#}"));
        }
    }

    /// Why a message cannot be sent now, if it cannot.
    pub fn send_blocked(&self) -> Option<&'static str> {
        if self.pending.is_some() {
            Some("Wait for the reply to finish, or press Stop.")
        } else if !matches!(self.model, ModelState::Ready(_)) {
            Some("Open a model first.")
        } else {
            None
        }
    }

    /// Sends the composer's message.
    pub fn send_composer(&mut self) {
        if self.composer.is_empty() {
            return;
        }
        let items = self.composer.items();
        if self.send_items(items) {
            self.composer = Composer::default();
        }
    }

    /// Starts a new turn with `items`; refused (false, with a notice) while a reply is being
    /// written or without a model.
    pub fn send_items(&mut self, items: Vec<Item>) -> bool {
        if let Some(why) = self.send_blocked() {
            self.notice = Some(why.into());
            return false;
        }
        let system = self.params.system.clone();
        let chat = self.chat_mut();
        if chat.turns.is_empty() {
            chat.system = system;
        }
        chat.turns.push(Turn::new(items));
        chat.auto_title();
        self.save_current();
        self.start_reply();
        true
    }

    fn start_reply(&mut self) {
        let Some(conversation) = self.chat().conversation() else {
            return;
        };
        self.next_id += 1;
        let cancel = Arc::new(AtomicBool::new(false));
        let cmd = Command::Reply {
            id: self.next_id,
            conversation: Box::new(conversation),
            base_dir: self.store.dir.clone(),
            params: self.params.clone(),
            cancel: cancel.clone(),
        };
        self.pending = Some(Pending {
            id: self.next_id,
            chat_id: self.chat().id.clone(),
            cancel,
            started: Instant::now(),
            first_piece: None,
            pieces: 0,
        });
        self.notice = None;
        if !self.worker.send(cmd) {
            self.fail_worker();
        }
    }

    /// Stops the reply now: the turn keeps what came so far; whatever the worker still sends
    /// for it is ignored.
    pub fn stop(&mut self) {
        let Some(p) = self.pending.take() else {
            return;
        };
        p.cancel.store(true, Ordering::Relaxed);
        if let Some(t) = self.turn_of(&p.chat_id) {
            t.status = TurnStatus::Stopped;
            t.reply = t.reply.trim_end().to_string();
            t.stats = Some(
                ReplyStats {
                    tokens: p.pieces,
                    time_to_first_token_ms: p
                        .first_piece
                        .map(|f| f.duration_since(p.started).as_secs_f64() * 1e3)
                        .unwrap_or(0.0),
                    tokens_per_s: p.pieces_per_s(),
                    cancelled: true,
                    history_turns_dropped: 0,
                }
                .rounded(),
            );
        }
        self.save_chat_by_id(&p.chat_id);
    }

    /// Writes the last reply again.
    pub fn regenerate(&mut self) {
        if let Some(why) = self.send_blocked() {
            self.notice = Some(why.into());
            return;
        }
        let Some(t) = self.chat_mut().turns.last_mut() else {
            return;
        };
        t.reply.clear();
        t.status = TurnStatus::Pending;
        t.stats = None;
        self.start_reply();
    }

    pub fn new_chat(&mut self) {
        if self.chat().turns.is_empty() {
            self.chat_mut().system = self.params.system.clone();
            return;
        }
        self.chats.insert(0, Chat::new(&self.params.system));
        self.current = 0;
        self.composer = Composer::default();
        self.save_settings();
    }

    pub fn open_chat(&mut self, i: usize) {
        if i < self.chats.len() && i != self.current {
            // An unused empty chat is dropped when leaving it.
            if self.chat().turns.is_empty() {
                self.chats.remove(self.current);
                self.current = if i > self.current { i - 1 } else { i };
            } else {
                self.current = i;
            }
            self.composer.regions.clear();
            self.composer.selecting = None;
            self.save_settings();
        }
    }

    /// Attaches image files (validated and copied into the chat store).
    pub fn attach_files(&mut self, paths: &[PathBuf]) {
        for p in paths {
            match self.store.import_file(p) {
                Ok(s) => self.composer.images.push(s),
                Err(e) => self.errors.push(format!("{e:#}")),
            }
        }
    }

    pub fn attach_bytes(&mut self, name: &str, bytes: &[u8]) {
        match self.store.import_bytes(bytes) {
            Ok(s) => self.composer.images.push(s),
            Err(e) => self.errors.push(format!("{name}: {e:#}")),
        }
    }

    /// Ctrl+V: a picture on the clipboard becomes an attachment (text pastes as usual).
    pub fn paste_image(&mut self) {
        match (self.clipboard)() {
            Ok(Some((w, h, rgba))) => match self.store.import_rgba(w, h, rgba) {
                Ok(s) => self.composer.images.push(s),
                Err(e) => self.errors.push(format!("Pasted picture: {e:#}")),
            },
            Ok(None) => {}
            Err(e) => self.errors.push(format!("{e:#}")),
        }
    }

    /// Input that is not tied to a widget: dropped files, Ctrl+V.
    fn handle_input(&mut self, ctx: &egui::Context) {
        let (dropped, events) = ctx.input(|i| (i.raw.dropped_files.clone(), i.events.clone()));
        for f in dropped {
            if let Some(path) = &f.path {
                self.attach_files(std::slice::from_ref(path));
            } else if let Some(bytes) = &f.bytes {
                self.attach_bytes(&f.name, bytes);
            }
        }
        for ev in events {
            match ev {
                egui::Event::Paste(_) => {
                    self.pasted = true;
                    self.paste_image();
                }
                // With only a picture on the clipboard egui gets no Paste event, but it still
                // sees the V key go up.
                egui::Event::Key {
                    key: egui::Key::V,
                    pressed: false,
                    modifiers,
                    ..
                } if modifiers.command && !std::mem::take(&mut self.pasted) => {
                    self.paste_image();
                }
                _ => {}
            }
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

    /// Writes the picture of reply `turn` with its boxes drawn to `dest` (PNG).
    pub fn export_annotated(&self, turn: usize, dest: &Path) -> Result<()> {
        let chat = self.chat();
        let rel = chat
            .latest_picture(turn)
            .context("this reply has no picture to draw on")?;
        let src = self.store.dir.join(rel);
        let img = vision::image::open(&src)
            .with_context(|| format!("cannot read {}", src.display()))?
            .to_rgba8();
        let reply = &chat.turns.get(turn).context("no such reply")?.reply;
        let out = super::geometry::annotate(&img, &super::geometry::objects(reply));
        out.save_with_format(dest, vision::image::ImageFormat::Png)
            .with_context(|| format!("cannot write {}", dest.display()))
    }

    pub fn export_markdown(&self, dest: &Path) -> Result<()> {
        let md = self.chat().to_markdown(&self.store.dir);
        super::state::write_atomic(dest, md.as_bytes())
    }

    /// One frame.
    pub fn ui(&mut self, ctx: &egui::Context) {
        let _ = self.waker_ctx.set(ctx.clone());
        self.poll_worker();
        self.handle_input(ctx);
        self.hovered = self.hover_next.take();
        self.drawn.clear();
        super::view::frame(self, ctx);
        if self.pending.is_some()
            || self.download.is_some()
            || matches!(self.model, ModelState::Loading { .. })
        {
            // Live numbers and the loading bar move even without new events.
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }
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

/// Brings a chat file from elsewhere (`--open-chat`): its pictures are imported into the store
/// (relative paths resolve against the file's folder) and it is saved as a chat of this app.
pub fn import_chat(store: &ChatStore, path: &Path) -> Result<Chat> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read the chat {}", path.display()))?;
    let mut chat: Chat = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a chat file", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    for turn in &mut chat.turns {
        for item in &mut turn.user {
            if let Item::Image { image } = item {
                if store.dir.join(image.as_str()).is_file() && !Path::new(image).is_absolute() {
                    continue;
                }
                let stored = store.import_file(&base.join(image.as_str()))?;
                *image = stored.rel;
            }
        }
    }
    store.save(&chat)?;
    Ok(chat)
}

impl QwenApp {
    /// Replaces the clipboard reader (tests).
    pub fn set_clipboard(&mut self, clipboard: ClipboardImage) {
        self.clipboard = clipboard;
    }
}

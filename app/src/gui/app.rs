//! What the app does in response to the user (the views' [`Action`]s, handled in one place:
//! [`QwenApp::apply`]) and to the worker; the state it works on is [`AppState`], drawing lives in
//! `view/`. One `QwenApp::ui` call is one frame, the same in the window and in tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use anyhow::{Context, Result};
use lm::checkpoint::LoadProgress;
use lm::prompt::Item;

use super::action::Action;
use super::backend::{Backend, ModelInfo, ModelSource, ReplyStats};
use super::model::{AppState, Composer, ModelState, Pending};
use super::settings::{Dirs, Settings};
use super::state::{Chat, ChatStore, Turn, TurnStatus};
use super::worker::{Command, Event, Worker};

mod download;
mod input;

use crate::download::DownloadOptions;
use crate::model_dir::{self, Found};
use download::DownloadEvent;
pub use input::{system_clipboard_image, ClipboardImage};

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
    /// Pictures to attach to the first message (`qwenvl PICTURE...`, "Open with" in a file
    /// manager).
    pub attach: Vec<PathBuf>,
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
            attach: Vec::new(),
            clipboard: Box::new(|| Ok(None)),
        }
    }
}

/// The app: its plain state ([`AppState`], what the views see, reachable through `Deref`) and
/// what does the work: the worker thread, a download, the clipboard.
pub struct QwenApp {
    pub state: AppState,
    pub(crate) clipboard: ClipboardImage,
    download_events: Option<Receiver<DownloadEvent>>,
    download_opts: DownloadOptions,
    /// The model that was ready when a server connection was tried: it is still loaded if the
    /// connection fails.
    previous: Option<ModelInfo>,
    worker: Worker,
    waker_ctx: Arc<OnceLock<egui::Context>>,
    next_id: u64,
    /// A `Paste` event came since the last V key release (the image check ran then).
    pasted: bool,
    /// The settings' text size was put on the context (first frame).
    look_applied: bool,
}

impl std::ops::Deref for QwenApp {
    type Target = AppState;
    fn deref(&self) -> &AppState {
        &self.state
    }
}

impl std::ops::DerefMut for QwenApp {
    fn deref_mut(&mut self) -> &mut AppState {
        &mut self.state
    }
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
        let state = AppState {
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
            download: None,
            download_repo: opts.download.repo.clone(),
            server_url: String::new(),
            server_key: String::new(),
            show_connect: false,
            outbox: Vec::new(),
            docs: Default::default(),
            chat_search: String::new(),
            editing: None,
            viewer: None,
            renaming: None,
        };
        let mut app = Self {
            state,
            clipboard: opts.clipboard,
            download_events: None,
            previous: None,
            download_opts: opts.download,
            worker,
            waker_ctx,
            next_id: 0,
            pasted: false,
            look_applied: false,
        };
        if !opts.attach.is_empty() {
            app.attach_files(&opts.attach);
        }
        let st = &mut app.state;
        if let Some(ModelSource::Server { url, api_key }) = &st.settings.server {
            st.server_url = url.clone();
            st.server_key = api_key.clone().unwrap_or_default();
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
                model_dir::discover(app.settings.last_model.as_deref())
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

    /// Chooses the device model folders run on (`None`: the CPU), remembers it, and loads the
    /// current folder again there.
    pub fn set_device(&mut self, device: Option<String>) {
        if device == self.settings.device {
            return;
        }
        self.settings.device = device;
        self.save_settings();
        if let Some(dir) = self.model_folder().map(Path::to_path_buf) {
            self.load_model(dir);
        }
    }

    /// Loads a model folder with the weight type and device chosen in the settings.
    pub fn load_model(&mut self, dir: PathBuf) {
        self.load_source(ModelSource::Folder {
            path: dir,
            weights: self.settings.weights,
            device: self.settings.device.clone(),
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
    /// A new version of the last reply.
    pub fn regenerate(&mut self) {
        if let Some(t) = self.chat().turns.len().checked_sub(1) {
            self.regenerate_at(t);
        }
    }

    /// A new version of reply `t`; the version it replaces is kept with the turns after it.
    pub fn regenerate_at(&mut self, t: usize) {
        if let Some(why) = self.send_blocked() {
            self.notice = Some(why.into());
            return;
        }
        if t >= self.chat().turns.len() {
            return;
        }
        self.chat_mut().new_version(t);
        self.save_current();
        self.start_reply();
    }

    /// Shows another version of reply `t` (not while a reply is being written).
    pub fn show_version(&mut self, t: usize, v: usize) {
        if self.is_generating() {
            return;
        }
        self.chat_mut().show_version(t, v);
        self.save_current();
    }

    /// User message `t` becomes `items` and is asked again; what followed it is replaced.
    pub fn edit_resend(&mut self, t: usize, items: Vec<Item>) {
        if let Some(why) = self.send_blocked() {
            self.notice = Some(why.into());
            return;
        }
        if t >= self.chat().turns.len() || items.is_empty() {
            return;
        }
        self.chat_mut().turns.truncate(t);
        self.send_items(items);
    }

    /// Deletes turn `t` of the open chat (not while a reply is being written).
    pub fn delete_turn(&mut self, t: usize) {
        if self.is_generating() || t >= self.chat().turns.len() {
            return;
        }
        self.chat_mut().turns.remove(t);
        self.save_current();
    }

    /// Deletes chat `i` and its file; the chat that takes its place opens.
    pub fn delete_chat(&mut self, i: usize) {
        if i >= self.chats.len() || (self.is_generating() && i == self.current) {
            return;
        }
        let chat = self.state.chats.remove(i);
        if let Err(e) = self.store.delete(&chat.id) {
            self.errors.push(format!("{e:#}"));
        }
        if self.chats.is_empty() {
            let system = self.params.system.clone();
            self.state.chats.push(Chat::new(&system));
        }
        if self.current > i || self.current >= self.chats.len() {
            self.current = self.current.saturating_sub(1);
        }
        self.composer = Composer::default();
        self.save_settings();
    }

    pub fn rename_chat(&mut self, i: usize, title: String) {
        let title = title.trim().to_string();
        if title.is_empty() || i >= self.chats.len() {
            return;
        }
        self.state.chats[i].title = title;
        let chat = self.state.chats[i].clone();
        if let Err(e) = self.store.save(&chat) {
            self.errors.push(format!("Could not save the chat: {e:#}"));
        }
    }

    pub fn new_chat(&mut self) {
        if self.chat().turns.is_empty() {
            self.chat_mut().system = self.params.system.clone();
            return;
        }
        let st = &mut self.state;
        st.chats.insert(0, Chat::new(&st.params.system));
        self.current = 0;
        self.composer = Composer::default();
        self.save_settings();
    }

    pub fn open_chat(&mut self, i: usize) {
        if i < self.chats.len() && i != self.current {
            // An unused empty chat is dropped when leaving it.
            if self.chat().turns.is_empty() {
                let st = &mut self.state;
                st.chats.remove(st.current);
                self.current = if i > self.current { i - 1 } else { i };
            } else {
                self.current = i;
            }
            self.composer.regions.clear();
            self.composer.selecting = None;
            self.save_settings();
        }
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

    /// Does what a view asked for.
    pub fn apply(&mut self, action: Action) {
        match action {
            Action::LoadModel(dir) => self.load_model(dir),
            Action::ConnectServer => self.connect_server(),
            Action::StartDownload => self.start_download(),
            Action::CancelDownload => self.cancel_download(),
            Action::NewChat => self.new_chat(),
            Action::RegenerateAt(t) => self.regenerate_at(t),
            Action::ShowVersion { turn, version } => self.show_version(turn, version),
            Action::EditResend { turn, items } => self.edit_resend(turn, items),
            Action::DeleteTurn(t) => self.delete_turn(t),
            Action::DeleteChat(i) => self.delete_chat(i),
            Action::RenameChat { chat, title } => self.rename_chat(chat, title),
            Action::OpenChat(i) => self.open_chat(i),
            Action::SetWeights(w) => self.set_weights(w),
            Action::SetDevice(d) => self.set_device(d),
            Action::SaveSettings => self.save_settings(),
            Action::Send(items) => {
                self.send_items(items);
            }
            Action::SendComposer => self.send_composer(),
            Action::ReadText(i) => {
                let Some(image) = self.composer.images.get(i).map(|s| s.rel.clone()) else {
                    return;
                };
                let items = vec![
                    Item::Image { image },
                    Item::Text {
                        text: crate::session::OCR_PROMPT.into(),
                    },
                ];
                if self.send_items(items) {
                    self.composer.remove_image(i);
                }
            }
            Action::Stop => self.stop(),
            Action::Regenerate => self.regenerate(),
            Action::AttachFiles(paths) => self.attach_files(&paths),
            Action::ExportMarkdown(dest) => {
                if let Err(e) = self.export_markdown(&dest) {
                    self.errors.push(format!("{e:#}"));
                }
            }
            Action::ExportAnnotated { turn, dest } => {
                if let Err(e) = self.export_annotated(turn, &dest) {
                    self.errors.push(format!("{e:#}"));
                }
            }
        }
    }

    /// One frame.
    pub fn ui(&mut self, ctx: &egui::Context) {
        let _ = self.waker_ctx.set(ctx.clone());
        self.poll_worker();
        self.apply_look(ctx);
        self.handle_input(ctx);
        self.hovered = self.hover_next.take();
        self.drawn.clear();
        super::view::frame(&mut self.state, ctx);
        for a in std::mem::take(&mut self.state.outbox) {
            self.apply(a);
        }
        if self.pending.is_some()
            || self.download.is_some()
            || matches!(self.model, ModelState::Loading { .. })
        {
            // Live numbers and the loading bar move even without new events.
            ctx.request_repaint_after(std::time::Duration::from_millis(100));
        }
    }
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

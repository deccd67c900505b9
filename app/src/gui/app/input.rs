//! Input outside the widgets: dropped files, Ctrl+V and the clipboard, keyboard shortcuts, and
//! the theme and text size.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::super::action::Action;
use super::QwenApp;

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

/// What a text-only model says about pictures.
pub const TEXT_ONLY_NOTE: &str =
    "This model is text-only: it cannot read pictures. Load a Qwen-VL model to attach them.";

impl QwenApp {
    /// Attaches image files (validated and copied into the chat store).
    pub fn attach_files(&mut self, paths: &[PathBuf]) {
        if !self.pictures_allowed() {
            return;
        }
        for p in paths {
            match self.store.import_file(p) {
                Ok(s) => self.composer.images.push(s),
                Err(e) => self.errors.push(format!("{e:#}")),
            }
        }
    }

    pub fn attach_bytes(&mut self, name: &str, bytes: &[u8]) {
        if !self.pictures_allowed() {
            return;
        }
        match self.store.import_bytes(bytes) {
            Ok(s) => self.composer.images.push(s),
            Err(e) => self.errors.push(format!("{name}: {e:#}")),
        }
    }

    /// Whether pictures may be attached; when not (a text-only model is loaded), says why, once
    /// per attempt.
    fn pictures_allowed(&mut self) -> bool {
        if self.reads_pictures() {
            return true;
        }
        self.errors.push(TEXT_ONLY_NOTE.into());
        false
    }

    /// Ctrl+V: a picture on the clipboard becomes an attachment (text pastes as usual).
    pub fn paste_image(&mut self) {
        match (self.clipboard)() {
            Ok(Some(_)) if !self.pictures_allowed() => {}
            Ok(Some((w, h, rgba))) => match self.store.import_rgba(w, h, rgba) {
                Ok(s) => self.composer.images.push(s),
                Err(e) => self.errors.push(format!("Pasted picture: {e:#}")),
            },
            Ok(None) => {}
            Err(e) => self.errors.push(format!("{e:#}")),
        }
    }

    /// The settings' theme and text size on the context; a text size changed with Ctrl+= / Ctrl+-
    /// (egui's own keys) is remembered.
    pub(super) fn apply_look(&mut self, ctx: &egui::Context) {
        let theme = self.settings.theme.preference();
        if ctx.options(|o| o.theme_preference) != theme {
            ctx.set_theme(theme);
        }
        let zoom = ctx.zoom_factor();
        match self.settings.zoom {
            // First frame: the remembered size.
            Some(z) if !self.look_applied => ctx.set_zoom_factor(z),
            Some(z) if (z - zoom).abs() > 1e-3 => {
                self.settings.zoom = Some(zoom);
                self.save_settings();
            }
            None if self.look_applied && (zoom - 1.0).abs() > 1e-3 => {
                self.settings.zoom = Some(zoom);
                self.save_settings();
            }
            _ => {}
        }
        self.look_applied = true;
    }

    /// Keyboard shortcuts (Enter and Shift+Enter belong to the message box): Esc stops the reply,
    /// Ctrl+N opens a new chat, Ctrl+O attaches pictures, Ctrl+F searches the chats.
    fn shortcuts(&mut self, ctx: &egui::Context) {
        use egui::{Key, KeyboardShortcut, Modifiers};
        let cmd = |key| KeyboardShortcut::new(Modifiers::COMMAND, key);
        let generating = self.is_generating();
        let (esc, new, open, find) = ctx.input_mut(|i| {
            (
                // Only while a reply is written: otherwise Esc still leaves a text field.
                generating && i.consume_key(Modifiers::NONE, Key::Escape),
                i.consume_shortcut(&cmd(Key::N)),
                i.consume_shortcut(&cmd(Key::O)),
                i.consume_shortcut(&cmd(Key::F)),
            )
        });
        if esc {
            self.apply(Action::Stop);
        }
        if new {
            self.apply(Action::NewChat);
        }
        // Ctrl+O with a text-only model says why instead of opening a dialog it cannot use.
        if open && self.pictures_allowed() {
            if let Some(paths) = super::super::dialogs::pick_images() {
                self.attach_files(&paths);
            }
        }
        if find {
            ctx.memory_mut(|m| m.request_focus(super::super::model::chat_search_id()));
        }
    }

    /// Input that is not tied to a widget: dropped files, Ctrl+V, the shortcuts.
    pub(super) fn handle_input(&mut self, ctx: &egui::Context) {
        self.shortcuts(ctx);
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
}

impl QwenApp {
    /// Replaces the clipboard reader (tests).
    pub fn set_clipboard(&mut self, clipboard: ClipboardImage) {
        self.clipboard = clipboard;
    }
}

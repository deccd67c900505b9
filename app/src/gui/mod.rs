//! The desktop app (eframe/egui on wgpu). `app` holds the state and actions, `view` draws,
//! `worker` runs inference on its own thread behind a [`backend::Backend`], `state` keeps chats
//! on disk, `geometry` maps grounding boxes to the screen, `settings` finds folders and models.

pub mod action;
pub mod app;
pub mod backend;
pub mod dialogs;
pub mod fonts;
pub mod geometry;
pub mod markdown;
pub mod model;
pub mod settings;
pub mod state;
pub mod view;
pub mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Result};

pub use app::{AppOptions, QwenApp};

/// egui's fonts plus Droid Sans Fallback for CJK (and other scripts egui's fonts lack).
pub fn install_fonts(ctx: &egui::Context) {
    let mut fonts = egui::FontDefinitions::default();
    fonts.font_data.insert(
        "droid-fallback".into(),
        Arc::new(egui::FontData::from_static(fonts::CJK_FONT)),
    );
    for family in [egui::FontFamily::Proportional, egui::FontFamily::Monospace] {
        fonts
            .families
            .entry(family)
            .or_default()
            .push("droid-fallback".into());
    }
    ctx.set_fonts(fonts);
}

impl eframe::App for QwenApp {
    fn update(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        self.ui(ctx);
    }
}

/// Opens the window. Environment: `QWENVL_MODEL` (model folder), `QWENVL_WEIGHTS` (f32, bf16,
/// q8_0, q4k, ...: what the "Automatic" weight type means), `QWENVL_OPEN_CHAT` (a chat file to show), `QWENVL_DEMO=1` (scripted replies
/// instead of a model, for screenshots), `QWENVL_DATA_DIR` / `QWENVL_CONFIG_DIR` (where chats and
/// settings go).
/// The window and taskbar icon (assets/icons/qwenvl.png, the one the .desktop file names).
pub fn window_icon() -> egui::IconData {
    let png = include_bytes!("../../../assets/icons/qwenvl.png");
    let img = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .expect("the bundled icon is a PNG")
        .into_rgba8();
    egui::IconData {
        width: img.width(),
        height: img.height(),
        rgba: img.into_raw(),
    }
}

/// Opens the desktop app, with `attach` attached to the first message.
pub fn run(attach: Vec<PathBuf>) -> Result<()> {
    let dirs = settings::Dirs::platform()?;
    let demo = std::env::var_os("QWENVL_DEMO").is_some();
    let backend: Box<dyn backend::Backend> = if demo {
        Box::new(backend::ScriptedBackend::new(
            "这是一个演示回复：<ref>the dog</ref><box>(100,200),(500,900)</box>",
            std::time::Duration::from_millis(60),
        ))
    } else {
        Box::new(backend::EngineBackend::default())
    };
    let opts = AppOptions {
        dirs,
        backend,
        discover_model: !demo,
        // The demo "model" is the scripted backend; any folder name will do.
        model: demo.then(|| PathBuf::from("demo")),
        // QWENVL_SERVER=http://host:port (and QWENVL_API_KEY): chat with a server's model.
        server: std::env::var("QWENVL_SERVER")
            .ok()
            .filter(|u| !u.is_empty())
            .map(|url| backend::ModelSource::Server {
                url,
                api_key: std::env::var("QWENVL_API_KEY")
                    .ok()
                    .filter(|k| !k.is_empty()),
            }),
        download: crate::download::DownloadOptions::default(),
        open_chat: std::env::var_os("QWENVL_OPEN_CHAT").map(PathBuf::from),
        attach,
        clipboard: app::system_clipboard_image(),
    };
    let native = eframe::NativeOptions {
        renderer: eframe::Renderer::Wgpu,
        viewport: egui::ViewportBuilder::default()
            .with_title("Qwen-VL")
            .with_app_id("qwenvl")
            .with_icon(window_icon())
            .with_inner_size([1180.0, 800.0])
            .with_min_inner_size([640.0, 420.0])
            .with_drag_and_drop(true),
        ..Default::default()
    };
    eframe::run_native(
        "Qwen-VL",
        native,
        Box::new(move |cc| {
            install_fonts(&cc.egui_ctx);
            Ok(Box::new(QwenApp::new(opts)))
        }),
    )
    .map_err(|e| anyhow!("the window could not be opened: {e}"))
}

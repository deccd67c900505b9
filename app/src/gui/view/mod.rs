//! Drawing: one function per area of the window. They read and change `AppState` directly; the
//! logic they trigger lives in `app.rs`.

mod chat;
mod composer;
mod settings;
mod sidebar;
mod viewer;
mod welcome;

use super::action::Action;
use egui::{Align2, Color32, FontId, RichText};

use super::model::{AppState, ModelState};

pub fn frame(app: &mut AppState, ctx: &egui::Context) {
    top_bar(app, ctx);
    sidebar::show(app, ctx);
    if app.show_settings {
        settings::show(app, ctx);
    }
    if app.show_connect {
        let mut open = true;
        egui::Window::new("Connect to a server")
            .open(&mut open)
            .collapsible(false)
            .resizable(false)
            .show(ctx, |ui| welcome::server_form(app, ui));
        app.show_connect &= open;
    }
    composer::show(app, ctx);
    viewer::show(app, ctx);
    egui::CentralPanel::default().show(ctx, |ui| {
        banners(app, ui);
        let no_model = !matches!(app.model, ModelState::Ready(_));
        if no_model && app.chat().turns.is_empty() {
            welcome::show(app, ui);
        } else {
            chat::show(app, ui);
        }
    });
    drop_overlay(ctx);
}

fn top_bar(app: &mut AppState, ctx: &egui::Context) {
    egui::TopBottomPanel::top("top").show(ctx, |ui| {
        ui.horizontal(|ui| {
            ui.heading("Qwen-VL");
            ui.separator();
            match &app.model {
                ModelState::Ready(info) => {
                    let where_ = if info.source.is_server() {
                        "Server"
                    } else {
                        "Model"
                    };
                    ui.label(
                        RichText::new(format!("{where_}: {}", info.source.label()))
                            .color(Color32::from_rgb(60, 170, 90)),
                    )
                    .on_hover_text(format!(
                        "{}\n{}\nready in {:.1} s",
                        info.source.location(),
                        info.description,
                        info.load_ms / 1e3
                    ));
                }
                ModelState::Loading { stage, .. } => {
                    ui.spinner();
                    ui.label(stage.clone());
                    if let Some(f) = app.model.load_fraction() {
                        ui.add(egui::ProgressBar::new(f).desired_width(120.0));
                    }
                }
                ModelState::Failed { .. } => {
                    ui.label(RichText::new("Model failed to load").color(Color32::LIGHT_RED));
                }
                ModelState::None => {
                    ui.label("No model");
                }
            }
            if ui.button("Open model…").clicked() {
                if let Some(dir) = rfd::FileDialog::new()
                    .set_title("Choose the Qwen-VL-Chat folder")
                    .pick_folder()
                {
                    app.ask(Action::LoadModel(dir));
                }
            }
            if ui
                .selectable_label(app.show_connect, "Connect to server…")
                .on_hover_text("Chat with Qwen-VL-Chat on another machine (qwenvl serve, vLLM)")
                .clicked()
            {
                app.show_connect = !app.show_connect;
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                if ui
                    .selectable_label(app.show_settings, "⚙ Settings")
                    .clicked()
                {
                    app.show_settings = !app.show_settings;
                }
                let theme = app.settings.theme;
                if ui
                    .button(format!("Theme: {}", theme.name()))
                    .on_hover_text("Light, dark, or as the system is")
                    .clicked()
                {
                    app.settings.theme = theme.next();
                    app.ask(Action::SaveSettings);
                }
                let mut show = app.settings.show_boxes;
                if ui.checkbox(&mut show, "Show boxes").changed() {
                    app.settings.show_boxes = show;
                    app.ask(Action::SaveSettings);
                }
                let has_turns = !app.chat().turns.is_empty();
                if ui
                    .add_enabled(has_turns, egui::Button::new("Export chat…"))
                    .on_hover_text("Save this chat as Markdown")
                    .clicked()
                {
                    if let Some(dest) = rfd::FileDialog::new()
                        .add_filter("Markdown", &["md"])
                        .set_file_name(format!("{}.md", sanitize(&app.chat().title)))
                        .save_file()
                    {
                        app.ask(Action::ExportMarkdown(dest));
                    }
                }
            });
        });
    });
}

/// A file name from a title.
pub fn sanitize(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == ' ' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let t = t.trim().to_string();
    if t.is_empty() {
        "chat".into()
    } else {
        t
    }
}

fn banners(app: &mut AppState, ui: &mut egui::Ui) {
    let mut dismiss = None;
    for (i, e) in app.errors.iter().enumerate() {
        egui::Frame::new()
            .fill(Color32::from_rgb(120, 30, 30))
            .corner_radius(6)
            .inner_margin(8)
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    ui.label(RichText::new(e).color(Color32::WHITE));
                    ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                        if ui.button("Dismiss").clicked() {
                            dismiss = Some(i);
                        }
                    });
                });
            });
    }
    if let Some(i) = dismiss {
        app.errors.remove(i);
    }
}

/// While files are dragged over the window.
fn drop_overlay(ctx: &egui::Context) {
    let hovering = ctx.input(|i| !i.raw.hovered_files.is_empty());
    if !hovering {
        return;
    }
    let painter = ctx.layer_painter(egui::LayerId::new(
        egui::Order::Foreground,
        egui::Id::new("drop"),
    ));
    let rect = ctx.content_rect();
    painter.rect_filled(rect, 0.0, Color32::from_black_alpha(170));
    painter.rect_stroke(
        rect.shrink(16.0),
        12.0,
        egui::Stroke::new(3.0, Color32::from_rgb(90, 160, 255)),
        egui::StrokeKind::Inside,
    );
    painter.text(
        rect.center(),
        Align2::CENTER_CENTER,
        "Drop images to attach them",
        FontId::proportional(28.0),
        Color32::WHITE,
    );
}

/// An object's label as the reference draws it: white text on a tag of the object's colour,
/// whose top-left corner is `at`.
pub(super) fn label_tag(
    painter: &egui::Painter,
    label: &str,
    at: egui::Pos2,
    c: Color32,
    size: f32,
) {
    let font = FontId::proportional(size);
    let galley = painter.layout_no_wrap(label.to_string(), font.clone(), Color32::WHITE);
    let bg = egui::Rect::from_min_size(at, galley.size() + egui::vec2(6.0, 2.0));
    painter.rect_filled(bg, 2.0, c);
    painter.text(
        at + egui::vec2(3.0, 1.0),
        Align2::LEFT_TOP,
        label,
        font,
        Color32::WHITE,
    );
}

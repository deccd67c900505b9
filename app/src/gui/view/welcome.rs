//! First-run screen: what to download and where to put it; loading progress.

use super::super::action::Action;
use egui::{Color32, RichText};

use super::super::model::{AppState, ModelState};
use crate::model_dir::{self, MODEL_REPO};

pub fn show(app: &mut AppState, ui: &mut egui::Ui) {
    ui.vertical_centered(|ui| {
        ui.add_space(40.0);
        ui.heading(RichText::new("Qwen-VL, on your computer").size(26.0));
        ui.add_space(12.0);
    });
    let fraction = app.model.load_fraction();
    match app.model.clone() {
        ModelState::Loading {
            source,
            stage,
            since,
            ..
        } => {
            ui.vertical_centered(|ui| {
                let verb = if source.is_server() {
                    "Connecting to"
                } else {
                    "Loading"
                };
                ui.label(format!("{verb} {}", source.location()));
                ui.add_space(8.0);
                match fraction {
                    Some(f) => {
                        ui.add(
                            egui::ProgressBar::new(f)
                                .desired_width(320.0)
                                .show_percentage(),
                        );
                    }
                    None => indeterminate_bar(ui, since.elapsed().as_secs_f32()),
                }
                ui.label(format!("{stage} — {:.0} s", since.elapsed().as_secs_f32()));
            });
        }
        state => {
            if let ModelState::Failed { source, error } = &state {
                ui.label(
                    RichText::new(format!(
                        "{} could not be loaded: {error}",
                        source.location()
                    ))
                    .color(Color32::LIGHT_RED),
                );
                ui.add_space(8.0);
            }
            ui.label(format!(
                "This app runs the {MODEL_REPO} model locally. It needs the model's files \
                 (about 19 GB: config.json, generation_config.json, qwen.tiktoken and the \
                 weights)."
            ));
            ui.add_space(6.0);
            download_section(app, ui);
            ui.add_space(6.0);
            let hub = model_dir::hf_hub_cache()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "~/.cache/huggingface/hub".into());
            ui.label(format!(
                "Downloads go to the Hugging Face cache, {hub} (HF_HOME, HF_HUB_CACHE and \
                 HF_ENDPOINT are honoured), where the app finds them by itself; so do \
                 `qwenvl download` and `huggingface-cli download {MODEL_REPO}`. A model folder \
                 elsewhere: open it, or name it in QWENVL_MODEL."
            ));
            ui.add_space(10.0);
            if ui
                .add(egui::Button::new(
                    RichText::new("Open model folder…").size(18.0),
                ))
                .clicked()
            {
                if let Some(dir) = rfd::FileDialog::new()
                    .set_title("Choose the Qwen-VL-Chat folder")
                    .pick_folder()
                {
                    app.ask(Action::LoadModel(dir));
                }
            }
            ui.add_space(16.0);
            ui.separator();
            ui.label(
                "Or chat with Qwen-VL-Chat running on another machine: `qwenvl serve` there, or \
                 any OpenAI-compatible server such as vLLM.",
            );
            server_form(app, ui);
        }
    }
}

/// The Download button, or the running download's progress and Cancel.
fn download_section(app: &mut AppState, ui: &mut egui::Ui) {
    let Some(d) = &app.download else {
        let label = format!("Download {}", app.download_repo);
        if ui
            .add(egui::Button::new(RichText::new(label).size(18.0)))
            .on_hover_text(
                "Fetch the model from the Hugging Face hub; an interrupted download resumes",
            )
            .clicked()
        {
            app.ask(Action::StartDownload);
        }
        return;
    };
    let gb = |b: u64| b as f64 / 1e9;
    match &d.progress {
        None => {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label(format!("Asking the hub for {}…", app.download_repo));
            });
        }
        Some(p) => {
            let frac = if p.bytes_total > 0 {
                (p.bytes_done as f64 / p.bytes_total as f64) as f32
            } else {
                0.0
            };
            ui.add(
                egui::ProgressBar::new(frac)
                    .desired_width(420.0)
                    .text(format!(
                        "{:.2} of {:.2} GB",
                        gb(p.bytes_done),
                        gb(p.bytes_total)
                    )),
            );
            let mut line = format!("File {} of {}: {}", p.file_index + 1, p.file_count, p.file);
            if let Some(speed) = d.speed() {
                let left = p.bytes_total.saturating_sub(p.bytes_done) as f64 / speed;
                line.push_str(&format!(
                    " — {:.1} MB/s, {} left",
                    speed / 1e6,
                    if left >= 90.0 {
                        format!("{:.0} min", left / 60.0)
                    } else {
                        format!("{left:.0} s")
                    }
                ));
            }
            ui.label(line);
        }
    }
    if ui.button("Cancel download").clicked() {
        app.ask(Action::CancelDownload);
    }
}

/// Server address and key, and the Connect button.
pub fn server_form(app: &mut AppState, ui: &mut egui::Ui) {
    egui::Grid::new("server_form")
        .num_columns(2)
        .spacing([8.0, 6.0])
        .show(ui, |ui| {
            ui.label("Server URL");
            ui.add(
                egui::TextEdit::singleline(&mut app.server_url)
                    .hint_text("http://gpu-box:8080")
                    .desired_width(280.0),
            );
            ui.end_row();
            ui.label("API key");
            ui.add(
                egui::TextEdit::singleline(&mut app.server_key)
                    .password(true)
                    .hint_text("(none)")
                    .desired_width(280.0),
            );
            ui.end_row();
        });
    let ready = !app.server_url.trim().is_empty();
    if ui
        .add_enabled(ready, egui::Button::new("Connect"))
        .clicked()
    {
        app.ask(Action::ConnectServer);
    }
}

/// A bar with a segment sweeping back and forth: work is happening, amount unknown.
fn indeterminate_bar(ui: &mut egui::Ui, t: f32) {
    let (rect, _) = ui.allocate_exact_size(egui::vec2(320.0, 8.0), egui::Sense::hover());
    let p = ui.painter();
    p.rect_filled(rect, 4.0, ui.visuals().extreme_bg_color);
    let phase = (t * 0.8).fract();
    let tri = if phase < 0.5 {
        phase * 2.0
    } else {
        2.0 - phase * 2.0
    };
    let w = rect.width() * 0.3;
    let x = rect.min.x + tri * (rect.width() - w);
    let seg = egui::Rect::from_min_size(egui::pos2(x, rect.min.y), egui::vec2(w, rect.height()));
    p.rect_filled(seg, 4.0, ui.visuals().selection.bg_fill);
}

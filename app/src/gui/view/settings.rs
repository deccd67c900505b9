//! Generation settings (defaults: the checkpoint's generation_config.json).

use super::super::action::Action;
use std::path::Path;

use egui::Slider;
use lm::quant::WeightType;

use super::super::model::{AppState, ModelState};
use crate::model_dir::{choose_weights, in_memory_bytes, weights_bytes};
use crate::session::device::{available_devices, describe, parse_device};

pub fn show(app: &mut AppState, ctx: &egui::Context) {
    egui::SidePanel::right("settings")
        .default_width(260.0)
        .show(ctx, |ui| {
            ui.heading("Settings");
            let before = app.params.clone();
            let p = &mut app.params;
            ui.checkbox(
                &mut p.do_sample,
                "Sample (off: always the most likely word)",
            );
            ui.add_enabled(
                p.do_sample,
                Slider::new(&mut p.temperature, 0.0..=2.0).text("Temperature"),
            );
            ui.add_enabled(
                p.do_sample,
                Slider::new(&mut p.top_p, 0.01..=1.0).text("Top-p"),
            );
            ui.add_enabled(
                p.do_sample,
                Slider::new(&mut p.top_k, 0..=200).text("Top-k (0: off)"),
            );
            ui.add_enabled(
                p.do_sample,
                Slider::new(&mut p.repetition_penalty, 0.5..=2.0).text("Repetition penalty"),
            );
            ui.add(
                Slider::new(&mut p.max_new_tokens, 1..=2048)
                    .logarithmic(true)
                    .text("Max new tokens"),
            );
            ui.label("System prompt (applies to new chats)");
            ui.add(
                egui::TextEdit::multiline(&mut p.system)
                    .desired_rows(3)
                    .desired_width(f32::INFINITY),
            );
            if ui.button("Reset to the model's defaults").clicked() {
                app.params = app.model_defaults.clone();
            }
            ui.separator();
            weights(app, ui);
            // Saved once a slider is let go, not at every step of the drag.
            app.params_dirty |= app.params != before;
            if app.params_dirty && !ui.ctx().is_using_pointer() {
                app.params_dirty = false;
                app.ask(Action::SaveSettings);
            }
        });
}

/// What the weights menu shows for a folder on a device: the checkpoint's size and the
/// automatic type. Listing the folder and reading the free memory are not for every frame, so
/// they are kept (in egui's memory) until the folder or the device changes.
#[derive(Clone)]
struct WeightsFacts {
    key: (Option<std::path::PathBuf>, Option<String>),
    bytes: Option<u64>,
    auto: Option<WeightType>,
}

fn weights_facts(app: &AppState, ui: &egui::Ui) -> WeightsFacts {
    let key = (
        app.model_folder().map(Path::to_path_buf),
        app.settings.device.clone(),
    );
    let id = egui::Id::new("weights facts");
    if let Some(f) = ui
        .data(|d| d.get_temp::<WeightsFacts>(id))
        .filter(|f| f.key == key)
    {
        return f;
    }
    let bytes = key.0.as_deref().map(weights_bytes);
    let device = parse_device(key.1.as_deref().unwrap_or("cpu")).ok();
    let auto = bytes
        .zip(device)
        .and_then(|(b, d)| choose_weights(b, &d).ok());
    let facts = WeightsFacts { key, bytes, auto };
    ui.data_mut(|d| d.insert_temp(id, facts.clone()));
    facts
}

/// Where model folders run: the devices this build and machine offer (found once).
fn device(app: &mut AppState, ui: &mut egui::Ui, busy: bool) {
    let id = egui::Id::new("devices");
    let devices = match ui.data(|d| d.get_temp::<Vec<String>>(id)) {
        Some(d) => d,
        None => {
            let d = available_devices();
            ui.data_mut(|m| m.insert_temp(id, d.clone()));
            d
        }
    };
    let current = app.settings.device.clone().unwrap_or_else(|| "cpu".into());
    let mut choice = current.clone();
    ui.add_enabled_ui(!busy, |ui| {
        egui::ComboBox::from_label("Runs on")
            .selected_text(describe(&choice))
            .show_ui(ui, |ui| {
                for d in &devices {
                    ui.selectable_value(&mut choice, d.clone(), describe(d));
                }
            })
            .response
            .on_hover_text("Where model folders run. Changing it loads the model again.");
    });
    if choice != current {
        app.ask(Action::SetDevice((choice != "cpu").then_some(choice)));
    }
}

/// The weight type of model folders: automatic (this machine's default), or one chosen; with
/// the memory each would take for the current folder. Choosing one loads the folder again.
fn weights(app: &mut AppState, ui: &mut egui::Ui) {
    let facts = weights_facts(app, ui);
    let auto = facts.auto;
    let bytes = facts.bytes.filter(|&b| b > 0);
    let label = |w: Option<WeightType>| match (w, bytes) {
        (None, _) => match auto {
            Some(a) => format!("Automatic ({a})"),
            None => "Automatic".to_string(),
        },
        (Some(w), Some(b)) => format!("{w}, about {:.1} GB", in_memory_bytes(b, w) as f64 / 1e9),
        (Some(w), None) => w.to_string(),
    };
    let mut choice = app.settings.weights;
    let busy = app.is_generating() || matches!(app.model, ModelState::Loading { .. });
    device(app, ui, busy);
    ui.add_enabled_ui(!busy, |ui| {
        egui::ComboBox::from_label("Weights in memory")
            .selected_text(label(choice))
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut choice, None, label(None));
                for w in [
                    WeightType::Q4K,
                    WeightType::Q8_0,
                    WeightType::BF16,
                    WeightType::F16,
                    WeightType::F32,
                ] {
                    ui.selectable_value(&mut choice, Some(w), label(Some(w)));
                }
            })
            .response
            .on_hover_text(
                "q4k: smallest and fastest. q8_0: the quantized type closest to the original. \
                 bf16/f16: 16-bit, as the checkpoint is stored. f32: the exact reference, twice \
                 the checkpoint's size. Changing it loads the model again.",
            );
    });
    if choice != app.settings.weights {
        app.ask(Action::SetWeights(choice));
    }
}

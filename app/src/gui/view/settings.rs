//! Generation settings (defaults: the checkpoint's generation_config.json).

use egui::Slider;

use super::super::app::QwenApp;

pub fn show(app: &mut QwenApp, ctx: &egui::Context) {
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
            // Saved once a slider is let go, not at every step of the drag.
            app.params_dirty |= app.params != before;
            if app.params_dirty && !ui.ctx().is_using_pointer() {
                app.params_dirty = false;
                app.save_settings();
            }
        });
}

//! The message being written: attached pictures (removable, region picking, Read text), region
//! chips, the text field and Send/Stop.

use super::super::action::Action;
use egui::{Color32, Key, RichText, Sense, Stroke};

use super::super::geometry::{self, box_on_screen, colour, fit};
use super::super::model::{AppState, Region};

pub fn show(app: &mut AppState, ctx: &egui::Context) {
    egui::TopBottomPanel::bottom("composer")
        .resizable(false)
        .show(ctx, |ui| {
            ui.add_space(6.0);
            thumbnails(app, ui);
            if let Some(i) = app.composer.selecting {
                region_picker(app, ui, i);
            }
            region_chips(app, ui);
            input_row(app, ui);
            if !app.reads_pictures() {
                ui.label(
                    RichText::new("Text-only model: pictures cannot be attached.")
                        .color(ui.visuals().weak_text_color()),
                );
            }
            if let Some(n) = &app.notice {
                ui.label(RichText::new(n).color(Color32::from_rgb(230, 170, 60)));
            }
            ui.add_space(4.0);
        });
}

fn thumbnails(app: &mut AppState, ui: &mut egui::Ui) {
    if app.composer.images.is_empty() {
        return;
    }
    let mut remove = None;
    let mut ocr = None;
    let images = app.composer.images.clone();
    egui::ScrollArea::horizontal()
        .id_salt("thumbs")
        .show(ui, |ui| {
            ui.horizontal(|ui| {
                for (i, s) in images.iter().enumerate() {
                    ui.vertical(|ui| {
                        if let Some(tex) = app.texture(ui.ctx(), &s.rel) {
                            let size = fit(tex.width, tex.height, egui::vec2(110.0, 72.0), 4.0);
                            let r = ui
                                .add(
                                    egui::Image::from_texture((tex.handle.id(), size))
                                        .sense(Sense::click()),
                                )
                                .on_hover_text("Click to mark a region on it");
                            if r.clicked() {
                                app.composer.selecting =
                                    (app.composer.selecting != Some(i)).then_some(i);
                            }
                        }
                        ui.label(RichText::new(format!("Picture {}", i + 1)).small());
                        ui.horizontal(|ui| {
                            if ui.small_button("Remove").clicked() {
                                remove = Some(i);
                            }
                            if ui.small_button("Region").clicked() {
                                app.composer.selecting =
                                    (app.composer.selecting != Some(i)).then_some(i);
                            }
                            if ui.small_button("Read text").clicked() {
                                ocr = Some(i);
                            }
                        });
                    });
                }
            });
        });
    if let Some(i) = remove {
        app.composer.remove_image(i);
    }
    if let Some(i) = ocr {
        app.ask(Action::ReadText(i));
    }
}

/// The picture shown large; dragging a rectangle adds a region to the message.
fn region_picker(app: &mut AppState, ui: &mut egui::Ui, i: usize) {
    let Some(stored) = app.composer.images.get(i).cloned() else {
        app.composer.selecting = None;
        return;
    };
    let Some(tex) = app.texture(ui.ctx(), &stored.rel) else {
        return;
    };
    ui.label(format!(
        "Drag a rectangle on Picture {} to ask about that region",
        i + 1
    ));
    let size = fit(
        tex.width,
        tex.height,
        egui::vec2(ui.available_width().min(560.0), 260.0),
        4.0,
    );
    let (rect, resp) = ui.allocate_exact_size(size, Sense::drag());
    let label = format!("Region picker: Picture {}", i + 1);
    resp.widget_info(|| egui::WidgetInfo::labeled(egui::WidgetType::Image, true, &label));
    egui::Image::from_texture((tex.handle.id(), size)).paint_at(ui, rect);
    let painter = ui.painter_at(rect);
    for (k, r) in app.composer.regions.iter().enumerate() {
        if r.image == i {
            let shown = box_on_screen(r.grid, 1000, 1000, rect);
            painter.rect_stroke(
                shown,
                0.0,
                Stroke::new(2.0, colour(k)),
                egui::StrokeKind::Middle,
            );
        }
    }
    if resp.drag_started() {
        app.composer.drag_start = ui.ctx().input(|inp| inp.pointer.press_origin());
    }
    let now = resp.interact_pointer_pos();
    if let (Some(a), Some(b)) = (app.composer.drag_start, now) {
        if resp.dragged() {
            painter.rect_stroke(
                egui::Rect::from_two_pos(a, b),
                0.0,
                Stroke::new(2.0, Color32::YELLOW),
                egui::StrokeKind::Middle,
            );
        }
    }
    if resp.drag_stopped() {
        if let (Some(a), Some(b)) = (app.composer.drag_start.take(), now) {
            let grid = geometry::selection_to_grid(a, b, rect);
            if grid[2] > grid[0] && grid[3] > grid[1] {
                app.composer.regions.push(Region { image: i, grid });
            }
        }
    }
}

fn region_chips(app: &mut AppState, ui: &mut egui::Ui) {
    if app.composer.regions.is_empty() {
        return;
    }
    let mut remove = None;
    ui.horizontal_wrapped(|ui| {
        for (k, r) in app.composer.regions.iter().enumerate() {
            let c = colour(k);
            let text = format!(
                "Region on Picture {}: ({},{}),({},{})",
                r.image + 1,
                r.grid[0],
                r.grid[1],
                r.grid[2],
                r.grid[3]
            );
            let resp = ui
                .add(
                    egui::Button::new(RichText::new(text).color(c))
                        .fill(c.gamma_multiply(0.15))
                        .stroke(Stroke::new(1.0, c)),
                )
                .on_hover_text(format!(
                    "Sent as {} — click to remove",
                    geometry::box_markup(r.grid)
                ));
            if resp.clicked() {
                remove = Some(k);
            }
        }
    });
    if let Some(k) = remove {
        app.composer.regions.remove(k);
    }
}

fn input_row(app: &mut AppState, ui: &mut egui::Ui) {
    ui.horizontal(|ui| {
        if ui
            .add_enabled(app.reads_pictures(), egui::Button::new("Attach images…"))
            .on_hover_text("Ctrl+O; or drop pictures on the window, or paste one with Ctrl+V")
            .on_disabled_hover_text("This model is text-only: it cannot read pictures")
            .clicked()
        {
            if let Some(paths) = super::super::dialogs::pick_images() {
                app.ask(Action::AttachFiles(paths));
            }
        }
        let generating = app.is_generating();
        let button_w = 80.0;
        let edit = egui::TextEdit::multiline(&mut app.composer.text)
            .id_salt("message")
            .hint_text("Message (Enter sends, Shift+Enter: new line)")
            .desired_rows(2)
            .desired_width(ui.available_width() - button_w - 12.0)
            .return_key(Some(egui::KeyboardShortcut::new(
                egui::Modifiers::SHIFT,
                Key::Enter,
            )));
        let resp = ui.add(edit);
        let enter =
            resp.has_focus() && ui.input(|i| i.key_pressed(Key::Enter) && !i.modifiers.shift);
        if generating {
            if ui
                .add_sized([button_w, 30.0], egui::Button::new("Stop"))
                .clicked()
            {
                app.ask(Action::Stop);
            }
            if enter {
                app.notice = app.send_blocked().map(String::from);
            }
        } else {
            let can = !app.composer.is_empty();
            let send = ui
                .add_enabled(
                    can,
                    egui::Button::new("Send").min_size(egui::vec2(button_w, 30.0)),
                )
                .clicked();
            if send || (enter && can) {
                app.ask(Action::SendComposer);
                resp.request_focus();
            }
        }
    });
}

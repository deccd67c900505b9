//! The conversation: user messages with their numbered pictures, replies with grounding markup
//! as chips and the boxes drawn over the latest picture, and per-reply actions.

use super::super::action::Action;
use egui::{Color32, RichText, Sense, Stroke};
use lm::grounding::{self, Piece};
use lm::prompt::Item;

use super::super::geometry::{self, colour, fit, shape_on_screen};
use super::super::markdown;
use super::super::model::{AppState, Drawn, Viewer};
use super::super::state::TurnStatus;
use crate::session::OCR_PROMPT;

/// Regions the user marked (one colour: they are questions, not answers).
const REGION_COLOUR: Color32 = Color32::from_rgb(90, 160, 255);

pub fn show(app: &mut AppState, ui: &mut egui::Ui) {
    let n = app.chat().turns.len();
    if n == 0 {
        let pictures = app.reads_pictures();
        ui.vertical_centered(|ui| {
            ui.add_space(ui.available_height() / 3.0);
            if pictures {
                ui.label(RichText::new("Ask about pictures").size(22.0));
                ui.label(
                    RichText::new(
                        "Drop pictures on the window, paste one with Ctrl+V, or use Attach images…\n\
                         To find things, ask e.g. \"Output the bounding box of the red square\".",
                    )
                    .weak(),
                );
            } else {
                ui.label(RichText::new("Ask anything").size(22.0));
                ui.label(
                    RichText::new(
                        "This is a text-only Qwen model: write your question below.\n\
                         Pictures need a Qwen-VL model (Open model…).",
                    )
                    .weak(),
                );
            }
        });
        return;
    }
    egui::ScrollArea::vertical()
        .auto_shrink([false, false])
        .stick_to_bottom(true)
        .show(ui, |ui| {
            ui.set_max_width(ui.available_width());
            for t in 0..n {
                user_message(app, ui, t);
                ui.add_space(6.0);
                reply(app, ui, t);
                ui.add_space(14.0);
            }
        });
}

fn user_message(app: &mut AppState, ui: &mut egui::Ui, t: usize) {
    let items = app.chat().turns[t].user.clone();
    let mut ocr = None;
    let mut open_viewer = None;
    let n_pictures = items
        .iter()
        .filter(|i| matches!(i, Item::Image { .. }))
        .count();
    let regions: Vec<([i64; 4], Color32)> = items
        .iter()
        .filter_map(|i| match i {
            Item::Box { boxes, .. } => Some(boxes.clone()),
            _ => None,
        })
        .flatten()
        .map(|b| (b, REGION_COLOUR))
        .collect();
    egui::Frame::new()
        .fill(ui.visuals().faint_bg_color)
        .corner_radius(8)
        .inner_margin(10)
        .show(ui, |ui| {
            ui.label(RichText::new("You").strong());
            let mut k = 0;
            ui.horizontal_wrapped(|ui| {
                for item in &items {
                    if let Item::Image { image } = item {
                        k += 1;
                        ui.vertical(|ui| {
                            if let Some(tex) = app.texture(ui.ctx(), image) {
                                let size =
                                    fit(tex.width, tex.height, egui::vec2(220.0, 160.0), 4.0);
                                let r = ui
                                    .add(
                                        egui::Image::new((tex.handle.id(), size))
                                            .sense(Sense::click()),
                                    )
                                    .on_hover_text("Click to open it large");
                                if r.clicked() {
                                    open_viewer = Some(image.clone());
                                }
                                // The regions the user asked about refer to the message's last
                                // picture.
                                if k == n_pictures {
                                    for (b, c) in &regions {
                                        let shown = geometry::box_on_screen(
                                            *b, tex.width, tex.height, r.rect,
                                        );
                                        ui.painter().rect_stroke(
                                            shown,
                                            0.0,
                                            Stroke::new(2.0, *c),
                                            egui::StrokeKind::Middle,
                                        );
                                    }
                                }
                            } else {
                                ui.label(RichText::new("(picture missing)").weak());
                            }
                            ui.horizontal(|ui| {
                                ui.label(RichText::new(format!("Picture {k}")).small());
                                if ui.small_button("Read text").clicked() {
                                    ocr = Some(image.clone());
                                }
                            });
                        });
                    }
                }
            });
            if let Some((_, draft)) = app.editing.as_mut().filter(|(e, _)| *e == t) {
                ui.add(
                    egui::TextEdit::multiline(draft)
                        .id(egui::Id::new(("edit message", t)))
                        .desired_rows(2)
                        .desired_width(f32::INFINITY),
                );
                let text = draft.trim().to_string();
                ui.horizontal(|ui| {
                    let can = !text.is_empty() && !app.is_generating();
                    if ui
                        .add_enabled(can, egui::Button::new("Save and send"))
                        .on_hover_text("Ask again with this text; the chat after it is replaced")
                        .clicked()
                    {
                        let mut edited: Vec<Item> = items
                            .iter()
                            .filter(|i| !matches!(i, Item::Text { .. }))
                            .cloned()
                            .collect();
                        // The text goes where the message had it: after its pictures.
                        let at = edited
                            .iter()
                            .position(|i| matches!(i, Item::Box { .. }))
                            .unwrap_or(edited.len());
                        edited.insert(at, Item::Text { text: text.clone() });
                        app.editing = None;
                        app.ask(Action::EditResend {
                            turn: t,
                            items: edited,
                        });
                    }
                    if ui.button("Cancel").clicked() {
                        app.editing = None;
                    }
                });
                return;
            }
            ui.horizontal_wrapped(|ui| {
                for item in &items {
                    match item {
                        Item::Text { text } => rich_text(ui, text),
                        Item::Box { reference, boxes } => {
                            for b in boxes {
                                let label = match reference {
                                    Some(r) => {
                                        format!("{r}: box ({},{}),({},{})", b[0], b[1], b[2], b[3])
                                    }
                                    None => {
                                        format!("region ({},{}),({},{})", b[0], b[1], b[2], b[3])
                                    }
                                };
                                let c = REGION_COLOUR;
                                ui.add(
                                    egui::Button::new(RichText::new(label).color(c))
                                        .fill(c.gamma_multiply(0.15))
                                        .stroke(Stroke::new(1.0, c)),
                                );
                            }
                        }
                        Item::Image { .. } => {}
                    }
                }
            });
        });
    let generating = app.is_generating();
    ui.horizontal(|ui| {
        let text: String = items
            .iter()
            .filter_map(|i| match i {
                Item::Text { text } => Some(text.as_str()),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n");
        if ui.small_button("Copy message").clicked() {
            ui.ctx().copy_text(text.clone());
        }
        if ui
            .add_enabled(!generating, egui::Button::new("Edit").small())
            .on_hover_text("Change this message and ask again")
            .clicked()
        {
            app.editing = Some((t, text));
        }
        if ui
            .add_enabled(!generating, egui::Button::new("Delete").small())
            .on_hover_text("Delete this message and its reply")
            .clicked()
        {
            app.ask(Action::DeleteTurn(t));
        }
    });
    if let Some(image) = open_viewer {
        app.viewer = Some(Viewer {
            image,
            ..Default::default()
        });
    }
    if let Some(image) = ocr {
        app.ask(Action::Send(vec![
            Item::Image { image },
            Item::Text {
                text: OCR_PROMPT.into(),
            },
        ]));
    }
}

/// One grounding piece as a chip (`highlighted`: its box is hovered); `None` for text.
fn chip(
    ui: &mut egui::Ui,
    p: &Piece,
    obj: Option<usize>,
    highlighted: bool,
    box_no: usize,
) -> Option<egui::Response> {
    let c = obj.map(colour).unwrap_or(Color32::GRAY);
    let button = |ui: &mut egui::Ui, label: String| {
        ui.add(
            egui::Button::new(RichText::new(label).color(if highlighted {
                Color32::WHITE
            } else {
                c
            }))
            .fill(if highlighted {
                c
            } else {
                c.gamma_multiply(0.15)
            })
            .stroke(Stroke::new(1.0, c)),
        )
    };
    match p {
        Piece::Text(_) => None,
        Piece::Ref(r) => Some(button(ui, r.trim().to_string())),
        Piece::Box(b) => Some(
            button(ui, format!("box {box_no}"))
                .on_hover_text(format!("box {}", b.replace(['(', ')'], ""))),
        ),
        Piece::Quad(q) => Some(
            button(ui, format!("quad {box_no}"))
                .on_hover_text(format!("quad {}", q.replace(['(', ')'], ""))),
        ),
        Piece::Image(path) => {
            ui.label(RichText::new(format!("[picture {path}]")).italics());
            None
        }
    }
}

/// Each piece's number among the boxes and quads (shown on their chips).
fn box_numbers(pieces: &[Piece]) -> Vec<usize> {
    let mut n = 0;
    pieces
        .iter()
        .map(|p| {
            if matches!(p, Piece::Box(_) | Piece::Quad(_)) {
                n += 1;
            }
            n
        })
        .collect()
}

/// A user's text as written, with `<ref>`/`<box>`/`<quad>` shown as chips.
fn rich_text(ui: &mut egui::Ui, text: &str) {
    let pieces = geometry::pieces(text);
    let objs = geometry::piece_objects(&pieces);
    let numbers = box_numbers(&pieces);
    for (i, p) in pieces.iter().enumerate() {
        if let Piece::Text(s) = p {
            let mut lines = s.split('\n').peekable();
            while let Some(line) = lines.next() {
                if !line.is_empty() {
                    ui.label(line);
                }
                if lines.peek().is_some() {
                    ui.end_row();
                }
            }
        } else {
            chip(ui, p, objs[i], false, numbers[i]);
        }
    }
}

/// A reply as Markdown, its grounding chips linked to the boxes drawn for turn `t`.
fn reply_markdown(app: &mut AppState, ui: &mut egui::Ui, t: usize, text: &str) {
    let pieces = geometry::pieces(text);
    let objs = geometry::piece_objects(&pieces);
    let numbers = box_numbers(&pieces);
    let streaming = app.is_generating()
        && t + 1 == app.chat().turns.len()
        && app.chat().turns[t].status == TurnStatus::Pending;
    let doc = if streaming {
        std::sync::Arc::new(app.docs.streaming(text))
    } else {
        app.docs.get(text, &pieces)
    };
    let hovered = app.hovered;
    let mut hover_next = None;
    let mut draw_chip = |ui: &mut egui::Ui, i: usize| {
        // A chip always names a piece of this text; a stale number draws nothing.
        let (Some(piece), Some(&obj)) = (pieces.get(i), objs.get(i)) else {
            return;
        };
        let lit = obj.is_some() && hovered == obj.map(|o| (t, o));
        if let (Some(r), Some(o)) = (chip(ui, piece, obj, lit, numbers[i]), obj) {
            if r.hovered() {
                hover_next = Some((t, o));
            }
        }
    };
    let mut copied = None;
    markdown::show(
        ui,
        &doc,
        &mut markdown::Draw {
            chip: &mut draw_chip,
            copied: &mut copied,
        },
    );
    if hover_next.is_some() {
        app.hover_next = hover_next;
    }
    if let Some(code) = copied {
        ui.ctx().copy_text(code);
    }
}

fn reply(app: &mut AppState, ui: &mut egui::Ui, t: usize) {
    let turn = app.chat().turns[t].clone();
    let last = t + 1 == app.chat().turns.len();
    let pending = last && app.is_generating() && turn.status == TurnStatus::Pending;
    ui.label(RichText::new("Qwen-VL").strong());
    if pending && turn.reply.is_empty() {
        ui.horizontal(|ui| {
            ui.spinner();
            ui.label("Reading the message…");
        });
    }
    reply_markdown(app, ui, t, &turn.reply);
    match &turn.status {
        TurnStatus::Failed(e) => {
            ui.label(RichText::new(format!("Failed: {e}")).color(Color32::LIGHT_RED));
        }
        TurnStatus::Stopped => {
            ui.label(RichText::new("(stopped)").weak());
        }
        _ => {}
    }
    // Live or final numbers.
    if pending {
        if let Some(p) = &app.pending {
            let ttft = p
                .first_piece
                .map(|f| {
                    format!(
                        " · first token {:.0} ms",
                        f.duration_since(p.started).as_secs_f64() * 1e3
                    )
                })
                .unwrap_or_default();
            ui.label(
                RichText::new(format!(
                    "{} tokens · {:.1} tokens/s{ttft}",
                    p.pieces,
                    p.pieces_per_s()
                ))
                .small()
                .weak(),
            );
        }
    } else if let Some(s) = &turn.stats {
        ui.label(
            RichText::new(format!(
                "{} tokens · {:.1} tokens/s · first token {:.0} ms",
                s.tokens, s.tokens_per_s, s.time_to_first_token_ms
            ))
            .small()
            .weak(),
        );
        if s.history_turns_dropped > 0 {
            // The model did not see the start of the chat: say so where the answer is.
            ui.label(
                RichText::new(format!(
                    "The {} oldest turn(s) no longer fit the model's context and were left out of this answer.",
                    s.history_turns_dropped
                ))
                .small()
                .color(ui.visuals().warn_fg_color),
            );
        }
    }
    let objects = geometry::objects(&turn.reply);
    let picture = app.chat().latest_picture(t).map(str::to_string);
    if !pending {
        ui.horizontal(|ui| {
            if ui.small_button("Copy").clicked() {
                ui.ctx()
                    .copy_text(super::super::state::readable(&turn.reply));
            }
            if ui
                .small_button("Regenerate")
                .on_hover_text(if last {
                    "Write this reply again (this version is kept)"
                } else {
                    "Write this reply again; this version and the chat after it are kept"
                })
                .clicked()
            {
                app.ask(Action::RegenerateAt(t));
            }
            let (shown, count) = turn.version();
            if count > 1 {
                if ui
                    .add_enabled(shown > 1, egui::Button::new("‹").small())
                    .on_hover_text("Previous version")
                    .clicked()
                {
                    app.ask(Action::ShowVersion {
                        turn: t,
                        version: shown - 2,
                    });
                }
                ui.label(RichText::new(format!("{shown}/{count}")).small());
                if ui
                    .add_enabled(shown < count, egui::Button::new("›").small())
                    .on_hover_text("Next version")
                    .clicked()
                {
                    app.ask(Action::ShowVersion {
                        turn: t,
                        version: shown,
                    });
                }
            }
            if !objects.is_empty()
                && picture.is_some()
                && ui.small_button("Export annotated image…").clicked()
            {
                if let Some(dest) = rfd::FileDialog::new()
                    .add_filter("PNG", &["png"])
                    .set_file_name("annotated.png")
                    .save_file()
                {
                    app.ask(Action::ExportAnnotated { turn: t, dest });
                }
            }
        });
    }
    if let (false, Some(rel)) = (objects.is_empty(), picture) {
        annotated_picture(app, ui, t, &rel, &objects);
    }
}

/// The latest picture with the reply's objects drawn over it, scaled to the space available.
fn annotated_picture(
    app: &mut AppState,
    ui: &mut egui::Ui,
    t: usize,
    rel: &str,
    objects: &[grounding::GroundedObject],
) {
    let Some(tex) = app.texture(ui.ctx(), rel) else {
        return;
    };
    let avail = egui::vec2(ui.available_width().clamp(100.0, 560.0), 320.0);
    let size = fit(tex.width, tex.height, avail, 4.0);
    let (rect, resp) = ui.allocate_exact_size(size, Sense::click());
    if resp.clicked() {
        app.viewer = Some(Viewer {
            image: rel.to_string(),
            turn: Some(t),
            ..Default::default()
        });
    }
    let resp = resp.on_hover_text("Click to open it large");
    let label = format!(
        "Picture with {} found object(s): {}",
        objects.len(),
        objects
            .iter()
            .filter_map(|o| o.label.clone())
            .collect::<Vec<_>>()
            .join(", ")
    );
    resp.widget_info(|| egui::WidgetInfo::labeled(egui::WidgetType::Image, true, &label));
    egui::Image::from_texture((tex.handle.id(), size)).paint_at(ui, rect);
    if !app.settings.show_boxes {
        return;
    }
    let painter = ui.painter_at(rect);
    let pointer = resp.hover_pos();
    let mut under: Option<(f32, usize)> = None;
    for (o, obj) in objects.iter().enumerate() {
        let highlighted = app.hovered == Some((t, o));
        let c = colour(o);
        for shape in &obj.shapes {
            let pts = shape_on_screen(shape, tex.width, tex.height, rect);
            let bounds = egui::Rect::from_points(&pts);
            if let Some(p) = pointer {
                let area = bounds.area();
                if bounds.contains(p) && under.is_none_or(|(a, _)| area < a) {
                    under = Some((area, o));
                }
            }
            if highlighted {
                painter.add(egui::Shape::convex_polygon(
                    pts.clone(),
                    c.gamma_multiply(0.25),
                    Stroke::NONE,
                ));
            }
            painter.add(egui::Shape::closed_line(
                pts.clone(),
                Stroke::new(if highlighted { 4.0 } else { 2.0 }, c),
            ));
            app.drawn.push(Drawn {
                turn: t,
                object: o,
                label: obj.label.clone(),
                image_rect: rect,
                outline: pts,
                highlighted,
                in_viewer: false,
            });
        }
        // The label sits on the first shape's top-left corner, as the reference draws it.
        if let (Some(label), Some(first)) = (&obj.label, obj.shapes.first()) {
            let pts = shape_on_screen(first, tex.width, tex.height, rect);
            let at = egui::Rect::from_points(&pts).left_top();
            super::label_tag(&painter, label, at, c, 13.0);
        }
    }
    if let Some((_, o)) = under {
        app.hover_next = Some((t, o));
    }
}

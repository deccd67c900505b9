//! The picture viewer: a picture shown large, zoomed (wheel, pinch, buttons) and panned (drag),
//! with a reply's boxes and labels drawn over it at every zoom, a list of the boxes in pixels
//! (copyable as JSON), and a region drawn on it to ask about.

use egui::{Color32, Pos2, Rect, RichText, Sense, Stroke, Vec2};

use super::super::geometry::{self, colour, shape_on_screen};
use super::super::model::{AppState, Drawn, Region, Viewer};

/// Zoom limits (1 = one picture pixel per point).
const MIN_ZOOM: f32 = 0.05;
const MAX_ZOOM: f32 = 16.0;

pub fn show(app: &mut AppState, ctx: &egui::Context) {
    let Some(mut v) = app.viewer.take() else {
        return;
    };
    let mut open = true;
    egui::Window::new("Picture viewer")
        .open(&mut open)
        .default_size([900.0, 640.0])
        .resizable(true)
        .collapsible(false)
        .show(ctx, |ui| viewer(app, ui, &mut v));
    if open && !v.close {
        app.viewer = Some(v);
    }
}

/// The picture's rectangle on screen for the viewer's zoom and pan inside `canvas`.
pub fn image_rect(v: &Viewer, size: (u32, u32), canvas: Rect) -> Rect {
    let (w, h) = (size.0 as f32, size.1 as f32);
    let scale = v.zoom.unwrap_or_else(|| fit_zoom(size, canvas));
    let shown = Vec2::new(w * scale, h * scale);
    Rect::from_min_size(canvas.center() - shown / 2.0 + v.pan, shown)
}

fn fit_zoom(size: (u32, u32), canvas: Rect) -> f32 {
    let (w, h) = (size.0.max(1) as f32, size.1.max(1) as f32);
    (canvas.width() / w)
        .min(canvas.height() / h)
        .clamp(MIN_ZOOM, MAX_ZOOM)
}

/// Sets the zoom, keeping the picture point under `anchor` where it is.
fn zoom_about(v: &mut Viewer, size: (u32, u32), canvas: Rect, zoom: f32, anchor: Pos2) {
    let before = image_rect(v, size, canvas);
    let old = before.width() / size.0.max(1) as f32;
    let zoom = zoom.clamp(MIN_ZOOM, MAX_ZOOM);
    let at = (anchor - before.min) / old;
    let shown = Vec2::new(size.0 as f32, size.1 as f32) * zoom;
    let min = anchor - at * zoom;
    v.zoom = Some(zoom);
    v.pan = min - (canvas.center() - shown / 2.0);
}

fn viewer(app: &mut AppState, ui: &mut egui::Ui, v: &mut Viewer) {
    let Some(tex) = app.texture(ui.ctx(), &v.image) else {
        ui.label("This picture can no longer be read.");
        return;
    };
    let size = (tex.width, tex.height);
    let reply = v
        .turn
        .and_then(|t| app.chat().turns.get(t))
        .map(|t| t.reply.clone())
        .unwrap_or_default();
    let objects = geometry::objects(&reply);
    let avail = ui.available_size();
    let list_width = if objects.is_empty() { 0.0 } else { 230.0 };
    let canvas_size = Vec2::new(
        (avail.x - list_width - 8.0).max(200.0),
        (avail.y - 40.0).max(160.0),
    );
    // The toolbar acts on the canvas laid out below; its rectangle is the one of the last frame.
    let canvas_guess = v
        .canvas
        .unwrap_or_else(|| Rect::from_min_size(ui.cursor().min, canvas_size));
    let scale_now = image_rect(v, size, canvas_guess).width() / size.0.max(1) as f32;
    ui.horizontal(|ui| {
        if ui.button("Fit").clicked() {
            v.zoom = None;
            v.pan = Vec2::ZERO;
        }
        if ui
            .button("Actual size")
            .on_hover_text("100 %: one picture pixel per screen point")
            .clicked()
        {
            zoom_about(v, size, canvas_guess, 1.0, canvas_guess.center());
        }
        if ui.button("Zoom in").clicked() {
            zoom_about(
                v,
                size,
                canvas_guess,
                scale_now * 1.25,
                canvas_guess.center(),
            );
        }
        if ui.button("Zoom out").clicked() {
            zoom_about(
                v,
                size,
                canvas_guess,
                scale_now / 1.25,
                canvas_guess.center(),
            );
        }
        ui.label(format!("{:.0} %", scale_now * 100.0));
        ui.separator();
        ui.toggle_value(&mut v.drawing, "Draw region")
            .on_hover_text("Drag on the picture to ask about that region");
        ui.label(
            RichText::new(format!("{} × {} px", size.0, size.1))
                .small()
                .weak(),
        );
        if ui.button("Close").clicked() {
            v.close = true;
        }
    });
    ui.horizontal_top(|ui| {
        let (canvas, resp) = ui.allocate_exact_size(canvas_size, Sense::click_and_drag());
        resp.widget_info(|| {
            egui::WidgetInfo::labeled(egui::WidgetType::Image, true, "Zoomable picture")
        });
        v.canvas = Some(canvas);
        // Wheel and pinch zoom about the pointer; a drag pans (or draws a region).
        if let Some(p) = resp.hover_pos() {
            let (scroll, pinch) = ui.input(|i| (i.smooth_scroll_delta.y, i.zoom_delta()));
            let factor = pinch * (scroll / 300.0).exp();
            if (factor - 1.0).abs() > 1e-4 {
                let now = image_rect(v, size, canvas).width() / size.0.max(1) as f32;
                zoom_about(v, size, canvas, now * factor, p);
            }
        }
        if !v.drawing && resp.dragged() {
            v.pan += resp.drag_delta();
        }
        let shown = image_rect(v, size, canvas);
        let painter = ui.painter_at(canvas);
        painter.rect_filled(canvas, 0.0, ui.visuals().extreme_bg_color);
        painter.image(
            tex.handle.id(),
            shown,
            Rect::from_min_max(Pos2::ZERO, Pos2::new(1.0, 1.0)),
            Color32::WHITE,
        );
        if app.settings.show_boxes {
            draw_objects(app, &painter, v.turn.unwrap_or(0), &objects, size, shown);
        }
        if v.drawing {
            region_drag(app, ui, v, &resp, &painter, shown);
        }
        if !objects.is_empty() {
            ui.vertical(|ui| {
                ui.set_width(list_width - 8.0);
                box_list(ui, &objects, size);
            });
        }
    });
}

/// Objects over the picture shown in `shown` (also recorded in `app.drawn`, marked as the
/// viewer's).
fn draw_objects(
    app: &mut AppState,
    painter: &egui::Painter,
    t: usize,
    objects: &[lm::grounding::GroundedObject],
    size: (u32, u32),
    shown: Rect,
) {
    for (o, obj) in objects.iter().enumerate() {
        let c = colour(o);
        for shape in &obj.shapes {
            let pts = shape_on_screen(shape, size.0, size.1, shown);
            painter.add(egui::Shape::closed_line(pts.clone(), Stroke::new(2.0, c)));
            app.drawn.push(Drawn {
                turn: t,
                object: o,
                label: obj.label.clone(),
                image_rect: shown,
                outline: pts,
                highlighted: false,
                in_viewer: true,
            });
        }
        if let (Some(label), Some(first)) = (&obj.label, obj.shapes.first()) {
            let pts = shape_on_screen(first, size.0, size.1, shown);
            let at = Rect::from_points(&pts).left_top();
            super::label_tag(painter, label, at, c, 14.0);
        }
    }
}

/// A region dragged on the picture becomes a question about the composer's copy of it.
fn region_drag(
    app: &mut AppState,
    ui: &egui::Ui,
    v: &mut Viewer,
    resp: &egui::Response,
    painter: &egui::Painter,
    shown: Rect,
) {
    if resp.drag_started() {
        v.drag_start = ui.ctx().input(|i| i.pointer.press_origin());
    }
    let now = resp.interact_pointer_pos();
    if let (Some(a), Some(b), true) = (v.drag_start, now, resp.dragged()) {
        painter.rect_stroke(
            Rect::from_two_pos(a, b),
            0.0,
            Stroke::new(2.0, Color32::YELLOW),
            egui::StrokeKind::Middle,
        );
    }
    if resp.drag_stopped() {
        if let (Some(a), Some(b)) = (v.drag_start.take(), now) {
            let grid = geometry::selection_to_grid(a, b, shown);
            if grid[2] > grid[0] && grid[3] > grid[1] {
                let image = match v.composer_image {
                    Some(i) => i,
                    None => {
                        // A picture of the chat: it goes with the next message again.
                        match app.store.import_file(&app.store.dir.join(&v.image)) {
                            Ok(s) => {
                                app.composer.images.push(s);
                                let i = app.composer.images.len() - 1;
                                v.composer_image = Some(i);
                                i
                            }
                            Err(e) => {
                                app.errors.push(format!("{e:#}"));
                                return;
                            }
                        }
                    }
                };
                app.composer.regions.push(Region { image, grid });
            }
        }
    }
}

/// Each box's label and pixel corners, and a button that copies them as JSON.
fn box_list(ui: &mut egui::Ui, objects: &[lm::grounding::GroundedObject], size: (u32, u32)) {
    ui.label(RichText::new("Found").strong());
    let mut rows = Vec::new();
    for (o, obj) in objects.iter().enumerate() {
        let c = colour(o);
        for shape in &obj.shapes {
            let (grid, px) = match shape {
                lm::grounding::Shape::Box(g) => (
                    g.to_vec(),
                    lm::grounding::grid_to_pixels(*g, size.0, size.1).to_vec(),
                ),
                lm::grounding::Shape::Quad(q) => {
                    let grid: Vec<i64> = q.iter().flatten().copied().collect();
                    let px = q
                        .iter()
                        .flat_map(|[x, y]| {
                            let p = lm::grounding::grid_to_pixels([*x, *y, 0, 0], size.0, size.1);
                            [p[0], p[1]]
                        })
                        .collect();
                    (grid, px)
                }
            };
            let label = obj
                .label
                .clone()
                .unwrap_or_else(|| format!("object {}", o + 1));
            ui.horizontal_wrapped(|ui| {
                ui.label(RichText::new("■").color(c));
                ui.label(RichText::new(&label).color(c));
                ui.label(
                    RichText::new(
                        px.iter()
                            .map(|v| v.to_string())
                            .collect::<Vec<_>>()
                            .join(", "),
                    )
                    .small()
                    .monospace(),
                );
            });
            rows.push(serde_json::json!({ "label": obj.label, "grid": grid, "px": px }));
        }
    }
    if ui.button("Copy boxes as JSON").clicked() {
        let json = serde_json::to_string_pretty(&rows).unwrap_or_default();
        ui.ctx().copy_text(json);
    }
}

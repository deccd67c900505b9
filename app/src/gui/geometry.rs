//! Pure geometry of grounding: model grid (0..1000) ↔ image pixels ↔ screen points, colours per
//! ref, region selection, and drawing boxes into an image for export. No UI state here, so the
//! tests can assert exact rectangles.

use egui::{pos2, vec2, Color32, Pos2, Rect, Vec2};
use lm::grounding::{self, GroundedObject, Shape};
use vision::image::{Rgba, RgbaImage};

/// Whether `text` may hold grounding markup (every tag starts with `<`). Replies are drawn every
/// frame; plain text skips the parser.
pub fn has_markup(text: &str) -> bool {
    text.contains('<')
}

/// Pieces of a text: one text piece when it has no markup.
pub fn pieces(text: &str) -> Vec<grounding::Piece> {
    if has_markup(text) {
        grounding::parse(text)
    } else if text.is_empty() {
        Vec::new()
    } else {
        vec![grounding::Piece::Text(text.to_string())]
    }
}

/// Distinct colours for refs, in order of appearance.
pub const PALETTE: [Color32; 8] = [
    Color32::from_rgb(230, 57, 70),
    Color32::from_rgb(29, 140, 230),
    Color32::from_rgb(46, 180, 90),
    Color32::from_rgb(245, 160, 20),
    Color32::from_rgb(150, 80, 220),
    Color32::from_rgb(20, 190, 190),
    Color32::from_rgb(225, 80, 170),
    Color32::from_rgb(130, 130, 40),
];

pub fn colour(i: usize) -> Color32 {
    PALETTE[i % PALETTE.len()]
}

/// Grounded objects of a reply (each ref with all its boxes/quads).
pub fn objects(reply: &str) -> Vec<GroundedObject> {
    if !has_markup(reply) {
        return Vec::new();
    }
    grounding::objects(reply)
}

/// Largest size with the image's aspect ratio that fits in `avail` (never upscaled past
/// `max_scale`).
pub fn fit(width: u32, height: u32, avail: Vec2, max_scale: f32) -> Vec2 {
    if width == 0 || height == 0 {
        return Vec2::ZERO;
    }
    let (w, h) = (width as f32, height as f32);
    let s = (avail.x / w).min(avail.y / h).min(max_scale).max(0.0);
    vec2(w * s, h * s)
}

/// One grid point on the displayed image: grid → pixel with the reference's truncation
/// (`grid_to_pixels`), then pixel → screen by the display scale.
fn grid_point(x: i64, y: i64, width: u32, height: u32, shown: Rect) -> Pos2 {
    let [px, py, _, _] = grounding::grid_to_pixels([x, y, 0, 0], width, height);
    let sx = shown.width() / width.max(1) as f32;
    let sy = shown.height() / height.max(1) as f32;
    pos2(shown.min.x + px as f32 * sx, shown.min.y + py as f32 * sy)
}

/// A box on a `width`×`height` picture shown in `shown` (screen rect of the whole picture).
pub fn box_on_screen(grid: [i64; 4], width: u32, height: u32, shown: Rect) -> Rect {
    Rect::from_two_pos(
        grid_point(grid[0], grid[1], width, height, shown),
        grid_point(grid[2], grid[3], width, height, shown),
    )
}

pub fn quad_on_screen(pts: [[i64; 2]; 4], width: u32, height: u32, shown: Rect) -> [Pos2; 4] {
    pts.map(|[x, y]| grid_point(x, y, width, height, shown))
}

/// Screen outline of a shape, as a closed polygon.
pub fn shape_on_screen(shape: &Shape, width: u32, height: u32, shown: Rect) -> Vec<Pos2> {
    match shape {
        Shape::Box(g) => {
            let r = box_on_screen(*g, width, height, shown);
            vec![
                r.left_top(),
                r.right_top(),
                r.right_bottom(),
                r.left_bottom(),
            ]
        }
        Shape::Quad(q) => quad_on_screen(*q, width, height, shown).to_vec(),
    }
}

/// A dragged screen rectangle on a picture shown in `shown`, as a model box (0..1000 grid,
/// x1 ≤ x2, y1 ≤ y2, clamped to the picture).
pub fn selection_to_grid(a: Pos2, b: Pos2, shown: Rect) -> [i64; 4] {
    let to_grid = |v: f32, lo: f32, len: f32| -> i64 {
        if len <= 0.0 {
            return 0;
        }
        (((v - lo) / len).clamp(0.0, 1.0) * 1000.0).round() as i64
    };
    let (x1, x2) = (a.x.min(b.x), a.x.max(b.x));
    let (y1, y2) = (a.y.min(b.y), a.y.max(b.y));
    [
        to_grid(x1, shown.min.x, shown.width()),
        to_grid(y1, shown.min.y, shown.height()),
        to_grid(x2, shown.min.x, shown.width()),
        to_grid(y2, shown.min.y, shown.height()),
    ]
}

/// `<box>(x1,y1),(x2,y2)</box>`, as the model reads it.
pub fn box_markup(grid: [i64; 4]) -> String {
    format!(
        "<box>({},{}),({},{})</box>",
        grid[0], grid[1], grid[2], grid[3]
    )
}

fn put(img: &mut RgbaImage, x: i64, y: i64, c: Rgba<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// A thick line (square brush) between two pixel points.
fn line(img: &mut RgbaImage, a: (i64, i64), b: (i64, i64), thick: i64, c: Rgba<u8>) {
    let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).max(1);
    for s in 0..=steps {
        let x = a.0 + (b.0 - a.0) * s / steps;
        let y = a.1 + (b.1 - a.1) * s / steps;
        for dx in 0..thick {
            for dy in 0..thick {
                put(img, x + dx - thick / 2, y + dy - thick / 2, c);
            }
        }
    }
}

/// The picture with every object's shapes drawn in its colour (pixel coordinates exactly as the
/// reference's `draw_bbox_on_latest_picture`).
pub fn annotate(img: &RgbaImage, objects: &[GroundedObject]) -> RgbaImage {
    let mut out = img.clone();
    let (w, h) = out.dimensions();
    let thick = i64::from((w.min(h) / 200).max(2));
    for (i, obj) in objects.iter().enumerate() {
        let c = colour(i);
        let c = Rgba([c.r(), c.g(), c.b(), 255]);
        for shape in &obj.shapes {
            let pts: Vec<(i64, i64)> = match shape {
                Shape::Box(g) => {
                    let p = grounding::grid_to_pixels(*g, w, h);
                    vec![(p[0], p[1]), (p[2], p[1]), (p[2], p[3]), (p[0], p[3])]
                }
                Shape::Quad(q) => q
                    .iter()
                    .map(|[x, y]| {
                        let p = grounding::grid_to_pixels([*x, *y, 0, 0], w, h);
                        (p[0], p[1])
                    })
                    .collect(),
            };
            for k in 0..pts.len() {
                line(&mut out, pts[k], pts[(k + 1) % pts.len()], thick, c);
            }
        }
    }
    // Labels after every outline, so no box is drawn over another object's label.
    for (i, obj) in objects.iter().enumerate() {
        let (Some(label), Some(first)) = (obj.label.as_deref(), obj.shapes.first()) else {
            continue;
        };
        let label = label.trim();
        if label.is_empty() {
            continue;
        }
        let (x, y) = match first {
            Shape::Box(g) => {
                let p = grounding::grid_to_pixels(*g, w, h);
                (p[0], p[1])
            }
            Shape::Quad(q) => {
                let p = grounding::grid_to_pixels([q[0][0], q[0][1], 0, 0], w, h);
                (p[0], p[1])
            }
        };
        let c = colour(i);
        draw_label(&mut out, label, x, y, Rgba([c.r(), c.g(), c.b(), 255]));
    }
    out
}

/// A filled tag in the object's colour with `text` in white, just above `(x, y)` (the shape's
/// first corner), or just below it where the picture has no room above; kept inside the picture.
/// The text is drawn with the bundled CJK font, so Chinese labels read as they do in the app.
fn draw_label(img: &mut RgbaImage, text: &str, x: i64, y: i64, bg: Rgba<u8>) {
    use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
    // The window's fonts, in its order: egui's Latin font, then the CJK fallback.
    let defaults = egui::FontDefinitions::default();
    let latin = defaults
        .font_data
        .get("Ubuntu-Light")
        .map(|d| d.font.clone());
    let fonts: Vec<FontRef> = latin
        .as_deref()
        .into_iter()
        .chain([super::fonts::CJK_FONT])
        .filter_map(|bytes| FontRef::try_from_slice(bytes).ok())
        .collect();
    let Some(last) = fonts.last() else {
        return;
    };
    let (w, h) = (i64::from(img.width()), i64::from(img.height()));
    let px = (w.min(h) as f32 / 24.0).clamp(14.0, 48.0);
    let scale = PxScale::from(px);
    let ascent = fonts
        .iter()
        .map(|f| f.as_scaled(scale).ascent())
        .fold(0f32, f32::max);
    let descent = fonts
        .iter()
        .map(|f| f.as_scaled(scale).descent())
        .fold(0f32, f32::min);
    let pad = (px / 5.0).ceil() as i64;
    // Each character from the first font that has it.
    let mut glyphs = Vec::new();
    let mut caret = 0f32;
    for ch in text.chars().filter(|c| !c.is_control()) {
        let font = fonts.iter().find(|f| f.glyph_id(ch).0 != 0).unwrap_or(last);
        let sf = font.as_scaled(scale);
        let id = sf.glyph_id(ch);
        glyphs.push((
            font,
            id.with_scale_and_position(scale, ab_glyph::point(caret, ascent)),
        ));
        caret += sf.h_advance(id);
    }
    let tw = caret.ceil() as i64 + 2 * pad;
    let th = (ascent - descent).ceil() as i64 + 2 * pad;
    let x0 = x.clamp(0, (w - tw).max(0));
    let y0 = if y - th >= 0 {
        y - th
    } else {
        (y + 1).min((h - th).max(0))
    };
    for yy in y0.max(0)..(y0 + th).min(h) {
        for xx in x0.max(0)..(x0 + tw).min(w) {
            img.put_pixel(xx as u32, yy as u32, bg);
        }
    }
    for (font, g) in glyphs {
        let Some(outline) = font.outline_glyph(g) else {
            continue;
        };
        let b = outline.px_bounds();
        outline.draw(|gx, gy, cov| {
            let (px_x, px_y) = (
                x0 + pad + b.min.x as i64 + i64::from(gx),
                y0 + pad + b.min.y as i64 + i64::from(gy),
            );
            if (0..w).contains(&px_x) && (0..h).contains(&px_y) {
                let p = img.get_pixel_mut(px_x as u32, px_y as u32);
                for k in 0..3 {
                    let v = f32::from(p.0[k]) * (1.0 - cov) + 255.0 * cov;
                    p.0[k] = v.round() as u8;
                }
            }
        });
    }
}

/// For each piece of `grounding::parse(text)`, the index of the object (as `objects(text)`
/// numbers them) it belongs to: refs and shapes get one, text and images none. Mirrors
/// `lm::grounding::objects` so a chip and its box share a colour.
pub fn piece_objects(pieces: &[grounding::Piece]) -> Vec<Option<usize>> {
    use grounding::Piece;
    let valid = |markup: String| !grounding::objects(&markup).is_empty();
    // Raw objects before the "no shapes" filter: shape counts.
    let mut raw: Vec<usize> = Vec::new();
    let mut of_piece: Vec<Option<usize>> = Vec::with_capacity(pieces.len());
    let mut open = false;
    for p in pieces {
        let ok = match p {
            Piece::Ref(_) => {
                raw.push(0);
                open = true;
                of_piece.push(Some(raw.len() - 1));
                continue;
            }
            Piece::Box(c) => valid(format!("<box>{c}</box>")),
            Piece::Quad(c) => valid(format!("<quad>{c}</quad>")),
            Piece::Text(_) | Piece::Image(_) => {
                open = false;
                of_piece.push(None);
                continue;
            }
        };
        if !ok {
            of_piece.push(None);
            continue;
        }
        match raw.last_mut() {
            Some(n) if open => {
                *n += 1;
                of_piece.push(Some(raw.len() - 1));
            }
            _ => {
                raw.push(1);
                of_piece.push(Some(raw.len() - 1));
                open = false;
            }
        }
    }
    // Renumber without the shape-less refs.
    let mut final_index = Vec::with_capacity(raw.len());
    let mut next = 0;
    for n in &raw {
        final_index.push((*n > 0).then(|| {
            next += 1;
            next - 1
        }));
    }
    of_piece
        .into_iter()
        .map(|o| o.and_then(|i| final_index[i]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labelled(text: &str, label: &str) -> RgbaImage {
        let img = RgbaImage::from_pixel(400, 300, Rgba([40, 40, 40, 255]));
        annotate(
            &img,
            &grounding::objects(&format!("<ref>{label}</ref>{text}")),
        )
    }

    /// The label tag of a box (in `c`, the object's colour) sits above its top-left corner.
    fn tag_pixels(img: &RgbaImage, x0: u32, x1: u32, y0: u32, y1: u32) -> (usize, usize) {
        let c = colour(0);
        let (mut fill, mut white) = (0, 0);
        for y in y0..y1 {
            for x in x0..x1 {
                let p = img.get_pixel(x, y).0;
                if p == [c.r(), c.g(), c.b(), 255] {
                    fill += 1;
                }
                // Text: lighter than the tag in every channel (anti-aliased white).
                let sum = |q: [u8; 3]| q.iter().map(|&v| u32::from(v)).sum::<u32>();
                if sum([p[0], p[1], p[2]]) > sum([c.r(), c.g(), c.b()]) + 150 {
                    white += 1;
                }
            }
        }
        (fill, white)
    }

    #[test]
    fn exported_boxes_carry_their_labels_cjk_included() {
        // Box (250,500),(750,900) on 400x300: pixels (100,150)-(300,270); the tag is above y 150.
        let cat = labelled("<box>(250,500),(750,900)</box>", "the cat");
        if let Some(dir) = std::env::var_os("QWENVL_SAVE_ANNOTATED") {
            let dir = std::path::PathBuf::from(dir);
            cat.save(dir.join("label_cat.png")).unwrap();
            labelled("<box>(250,500),(750,900)</box>", "狗和猫")
                .save(dir.join("label_zh.png"))
                .unwrap();
        }
        let (fill, white) = tag_pixels(&cat, 100, 200, 110, 150);
        assert!(fill > 300 && white > 30, "fill {fill}, text {white}");
        // Below the corner, inside the box, the picture is untouched.
        assert_eq!(cat.get_pixel(150, 200).0, [40, 40, 40, 255]);
        // Chinese labels are drawn as glyphs (two different characters, two different pictures),
        // not as missing-glyph boxes.
        let dog = labelled("<box>(250,500),(750,900)</box>", "狗");
        let cat_zh = labelled("<box>(250,500),(750,900)</box>", "猫");
        let (_, w_dog) = tag_pixels(&dog, 100, 200, 110, 150);
        assert!(w_dog > 20, "{w_dog}");
        assert_ne!(dog, cat_zh);
        // A box at the top edge gets its tag inside, below the corner; one at the right edge is
        // kept inside the picture.
        let top = labelled("<box>(900,0),(1000,300)</box>", "a long label at the edge");
        let (fill, white) = tag_pixels(&top, 200, 400, 0, 40);
        assert!(fill > 300 && white > 30, "fill {fill}, text {white}");
        // No label, no tag: only the outline.
        let bare = annotate(
            &RgbaImage::from_pixel(400, 300, Rgba([40, 40, 40, 255])),
            &grounding::objects("<box>(250,500),(750,900)</box>"),
        );
        assert_eq!(tag_pixels(&bare, 100, 200, 120, 148), (0, 0));
    }
}

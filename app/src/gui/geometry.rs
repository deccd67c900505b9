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
    out
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

//! Grounding markup in model replies: `<ref>name</ref><box>(x1,y1),(x2,y2)</box>`, `<quad>` and
//! `<img>path</img>`, with coordinates on a 0..1000 grid.
//!
//! Two flavours of every function:
//! * strict ones named after the reference (`to_list_format`, `fetch_all_box_with_ref`,
//!   `fetch_latest_picture`) reproduce the upstream `QWenTokenizer` helpers, errors included;
//! * lenient ones (`parse`, `boxes`, `objects`, `latest_picture`) never fail: an unclosed tag is
//!   plain text and a malformed box is skipped, which suits streaming partial replies.

use unicode_normalization::UnicodeNormalization;

/// One piece of a reply (the reference's `to_list_format` elements).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Ref(String),
    /// Raw box content, e.g. `"(10,20),(30,40)"`.
    Box(String),
    /// Raw quad content, e.g. `"(1,2),(3,4),(5,6),(7,8)"`.
    Quad(String),
    Image(String),
}

/// Why the strict (reference) helpers fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GroundingError {
    /// A `<img>`/`<ref>`/`<box>`/`<quad>` without its closing tag (the reference's message is
    /// "Unclosed image token" whatever the tag).
    #[error("Unclosed image token ({tag} without its closing tag)")]
    Unclosed { tag: &'static str },
    /// A coordinate that is not an integer (Python `int()` failed on `literal`).
    #[error("invalid literal for int() with base 10: {literal:?}")]
    BadNumber { literal: String },
    /// An integer too large for i64 (Python would accept it).
    #[error("coordinate {literal:?} out of range")]
    Overflow { literal: String },
    /// A box without exactly 4 numbers (the reference's bare `assert`).
    #[error("expected 4 numbers in a box, found {count}")]
    WrongArity { count: usize },
}

/// A box with the ref it belongs to, grid coordinates `[x1, y1, x2, y2]` on 0..1000.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroundedBox {
    pub label: Option<String>,
    pub grid: [i64; 4],
}

/// A region of a reply: a box or a quadrilateral (4 corner points), grid coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shape {
    Box([i64; 4]),
    Quad([[i64; 2]; 4]),
}

/// A referenced object: an optional `<ref>` and every box/quad that directly follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroundedObject {
    pub label: Option<String>,
    pub shapes: Vec<Shape>,
}

/// One drawing operation of the reference `draw_bbox_on_latest_picture`, in pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrawCall {
    Box {
        px: [i64; 4],
    },
    /// The ref label, drawn with its left edge at `pos` (the box's top-left corner).
    Text {
        text: String,
        pos: [i64; 2],
    },
}

const TAGS: [(&str, &str, &str); 4] = [
    ("<img>", "</img>", "image"),
    ("<ref>", "</ref>", "ref"),
    ("<box>", "</box>", "box"),
    ("<quad>", "</quad>", "quad"),
];

fn make_piece(kind: &str, content: &str) -> Piece {
    let s = content.to_string();
    match kind {
        "image" => Piece::Image(s),
        "ref" => Piece::Ref(s),
        "box" => Piece::Box(s),
        "quad" => Piece::Quad(s),
        _ => Piece::Text(s),
    }
}

/// Shared scanner. The reference tokenizes with the markup tokens (plus `<|endoftext|>`) special
/// and pairs tokens; markup strings cannot overlap, so a string scan finds the same tags. Content
/// is everything up to the first matching closing tag, other tags included.
fn scan(text: &str, strict: bool) -> Result<Vec<Piece>, GroundingError> {
    let text: String = text.nfc().collect();
    let mut pieces = Vec::new();
    let mut pos = 0;
    // Next occurrence of each opening tag at or after `pos` (`None`: no more). Cached so that a
    // tag absent from the rest of a long text is not searched for again at every piece (which
    // made the scan quadratic).
    let mut next_open: [Option<usize>; TAGS.len()] = TAGS.map(|t| text.find(t.0));
    loop {
        for (slot, t) in next_open.iter_mut().zip(TAGS.iter()) {
            if slot.is_some_and(|at| at < pos) {
                *slot = text
                    .get(pos..)
                    .and_then(|rest| rest.find(t.0))
                    .map(|i| pos + i);
            }
        }
        // Leftmost opening tag at or after `pos`.
        let next = next_open
            .iter()
            .zip(TAGS.iter())
            .filter_map(|(slot, t)| slot.map(|i| (i, t)))
            .min_by_key(|(i, _)| *i);
        let Some((start, &(open, close, kind))) = next else {
            break;
        };
        let content_start = start + open.len();
        let Some(len) = text[content_start..].find(close) else {
            if strict {
                return Err(GroundingError::Unclosed { tag: open });
            }
            // Lenient: the unclosed tag and everything after it is text.
            break;
        };
        if start > pos {
            pieces.push(Piece::Text(text[pos..start].to_string()));
        }
        pieces.push(make_piece(kind, &text[content_start..content_start + len]));
        pos = content_start + len + close.len();
    }
    if pos < text.len() {
        pieces.push(Piece::Text(text[pos..].to_string()));
    }
    Ok(pieces)
}

/// The reference `to_list_format(text)`: NFC, then text/ref/box/quad/image pieces in order.
/// Fails on an unclosed tag.
pub fn to_list_format(text: &str) -> Result<Vec<Piece>, GroundingError> {
    scan(text, true)
}

/// Lenient [`to_list_format`]: an unclosed tag and the rest of the reply are one text piece.
pub fn parse(text: &str) -> Vec<Piece> {
    // The lenient scan has no error path.
    scan(text, false).unwrap_or_default()
}

/// Python's `str.isspace` (Unicode White_Space plus the ASCII information separators).
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `int(s)` for base 10: surrounding whitespace, optional sign, ASCII digits with single
/// underscores between them. (Python also accepts non-ASCII decimal digits; we do not.)
fn py_int(literal: &str) -> Result<i64, GroundingError> {
    let bad = || GroundingError::BadNumber {
        literal: literal.to_string(),
    };
    let s = literal.trim_matches(py_space);
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let b = digits.as_bytes();
    let well_formed = !b.is_empty()
        && b.iter().all(|&c| c.is_ascii_digit() || c == b'_')
        && b[0] != b'_'
        && b[b.len() - 1] != b'_'
        && !digits.contains("__");
    if !well_formed {
        return Err(bad());
    }
    let mut v: i64 = 0;
    for d in b.iter().filter(|&&c| c != b'_') {
        let d = i64::from(d - b'0');
        v = v
            .checked_mul(10)
            .and_then(|v| {
                if neg {
                    v.checked_sub(d)
                } else {
                    v.checked_add(d)
                }
            })
            .ok_or_else(|| GroundingError::Overflow {
                literal: literal.to_string(),
            })?;
    }
    Ok(v)
}

/// The reference's coordinate parse: delete `(` and `)`, split on `,`, `int()` each piece.
fn coords(content: &str) -> Result<Vec<i64>, GroundingError> {
    content
        .replace(['(', ')'], "")
        .split(',')
        .map(py_int)
        .collect()
}

fn box_coords(content: &str) -> Result<[i64; 4], GroundingError> {
    let v = coords(content)?;
    <[i64; 4]>::try_from(v.as_slice()).map_err(|_| GroundingError::WrongArity { count: v.len() })
}

fn quad_coords(content: &str) -> Option<[[i64; 2]; 4]> {
    let v = coords(content).ok()?;
    let v = <[i64; 8]>::try_from(v.as_slice()).ok()?;
    Some([[v[0], v[1]], [v[2], v[3]], [v[4], v[5]], [v[6], v[7]]])
}

/// Label of the piece at `i - 1` if it is a ref (whitespace-stripped, like the reference).
fn ref_before(pieces: &[Piece], i: usize) -> Option<String> {
    match i.checked_sub(1).and_then(|j| pieces.get(j)) {
        Some(Piece::Ref(r)) => Some(r.trim_matches(py_space).to_string()),
        _ => None,
    }
}

/// The reference `_fetch_all_box_with_ref(text)`: every `<box>` in order; a box gets the ref only
/// if the piece right before it is a `<ref>`. Fails on an unclosed tag, a non-integer coordinate
/// or a box without exactly 4 numbers.
pub fn fetch_all_box_with_ref(text: &str) -> Result<Vec<GroundedBox>, GroundingError> {
    let pieces = to_list_format(text)?;
    let mut out = Vec::new();
    for (i, p) in pieces.iter().enumerate() {
        if let Piece::Box(content) = p {
            out.push(GroundedBox {
                grid: box_coords(content)?,
                label: ref_before(&pieces, i),
            });
        }
    }
    Ok(out)
}

/// Lenient [`fetch_all_box_with_ref`]: malformed boxes are skipped (a skipped box still separates
/// the next box from the ref, as in the reference's piece order).
pub fn boxes(text: &str) -> Vec<GroundedBox> {
    let pieces = parse(text);
    pieces
        .iter()
        .enumerate()
        .filter_map(|(i, p)| match p {
            Piece::Box(content) => Some(GroundedBox {
                grid: box_coords(content).ok()?,
                label: ref_before(&pieces, i),
            }),
            _ => None,
        })
        .collect()
}

/// Objects of a reply: each `<ref>` with all boxes/quads directly after it (`<ref>a</ref><box>..
/// </box><box>..</box>` is one object with two boxes); boxes/quads not after a ref are unlabelled
/// objects. Malformed shapes are skipped.
pub fn objects(text: &str) -> Vec<GroundedObject> {
    let mut out: Vec<GroundedObject> = Vec::new();
    // Whether the previous piece continues an object (a ref or one of its shapes).
    let mut open = false;
    for p in parse(text) {
        let shape = match &p {
            Piece::Ref(r) => {
                out.push(GroundedObject {
                    label: Some(r.trim_matches(py_space).to_string()),
                    shapes: Vec::new(),
                });
                open = true;
                continue;
            }
            Piece::Box(c) => box_coords(c).ok().map(Shape::Box),
            Piece::Quad(c) => quad_coords(c).map(Shape::Quad),
            Piece::Text(_) | Piece::Image(_) => {
                open = false;
                continue;
            }
        };
        let Some(shape) = shape else { continue };
        match out.last_mut() {
            Some(obj) if open => obj.shapes.push(shape),
            _ => {
                out.push(GroundedObject {
                    label: None,
                    shapes: vec![shape],
                });
                open = false;
            }
        }
    }
    // A ref with no shape (e.g. "<ref>dog</ref> is at <box>..") grounds nothing.
    out.retain(|o| !o.shapes.is_empty());
    out
}

fn last_image(pieces: Vec<Piece>) -> Option<String> {
    pieces.into_iter().rev().find_map(|p| match p {
        Piece::Image(path) => Some(path),
        _ => None,
    })
}

/// The reference `_fetch_latest_picture(response, history)`: the last `<img>` of the response,
/// else of the newest history query (`history` = `(query_text, reply)` pairs, oldest first) that
/// has one. Replies in the history are not searched. Fails if a searched text has an unclosed tag.
pub fn fetch_latest_picture(
    response: &str,
    history: &[(String, String)],
) -> Result<Option<String>, GroundingError> {
    let texts = std::iter::once(response).chain(history.iter().rev().map(|(q, _)| q.as_str()));
    for text in texts {
        if let Some(path) = last_image(to_list_format(text)?) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Lenient [`fetch_latest_picture`] (unclosed tags are text).
pub fn latest_picture(response: &str, history: &[(String, String)]) -> Option<String> {
    std::iter::once(response)
        .chain(history.iter().rev().map(|(q, _)| q.as_str()))
        .find_map(|text| last_image(parse(text)))
}

/// Grid (0..1000) to pixels like the reference: `int(v / 1000 * size)` in f64, truncated toward
/// zero (not `v * size // 1000`, which differs for some values).
pub fn grid_to_pixels(grid: [i64; 4], width: u32, height: u32) -> [i64; 4] {
    let px = |v: i64, size: u32| (v as f64 / 1000.0 * f64::from(size)).trunc() as i64;
    [
        px(grid[0], width),
        px(grid[1], height),
        px(grid[2], width),
        px(grid[3], height),
    ]
}

/// What the reference `draw_bbox_on_latest_picture` draws on a `width` x `height` picture: each
/// box, then its label (if any) at the box's top-left corner.
pub fn draw_calls(boxes: &[GroundedBox], width: u32, height: u32) -> Vec<DrawCall> {
    let mut calls = Vec::new();
    for b in boxes {
        let px = grid_to_pixels(b.grid, width, height);
        calls.push(DrawCall::Box { px });
        if let Some(label) = &b.label {
            calls.push(DrawCall::Text {
                text: label.clone(),
                pos: [px[0], px[1]],
            });
        }
    }
    calls
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_int() {
        assert_eq!(py_int(" 12 "), Ok(12));
        assert_eq!(py_int("-5"), Ok(-5));
        assert_eq!(py_int("+7"), Ok(7));
        assert_eq!(py_int("1_000"), Ok(1000));
        assert_eq!(py_int("007"), Ok(7));
        for bad in [
            "", " ", "a", "1 2", "_1", "1_", "1__0", "--1", "1.5", "0x1F",
        ] {
            assert!(py_int(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            py_int("99999999999999999999"),
            Err(GroundingError::Overflow { .. })
        ));
        assert_eq!(py_int("-9223372036854775808"), Ok(i64::MIN));
    }

    #[test]
    fn lenient_never_fails() {
        for s in [
            "<ref>",
            "<box>(1,2",
            "</box><box>",
            "<ref>a</ref><box>(1,2),(3,4)",
            "<img><ref></img>",
            "<quad>(1,2)</quad>",
            "<<<>>>",
        ] {
            let _ = parse(s);
            let _ = boxes(s);
            let _ = objects(s);
            let _ = latest_picture(s, &[]);
        }
        assert_eq!(
            parse("a <box>(1,2"),
            vec![Piece::Text("a <box>(1,2".into())]
        );
    }

    #[test]
    fn objects_group_shapes_by_ref() {
        let objs = objects(
            "<ref>a</ref><box>(1,2),(3,4)</box><quad>(1,2),(3,4),(5,6),(7,8)</quad> x <box>(5,6),(7,8)</box><ref>b</ref> is <box>(0,0),(1,1)</box>",
        );
        assert_eq!(
            objs,
            vec![
                GroundedObject {
                    label: Some("a".into()),
                    shapes: vec![
                        Shape::Box([1, 2, 3, 4]),
                        Shape::Quad([[1, 2], [3, 4], [5, 6], [7, 8]])
                    ],
                },
                GroundedObject {
                    label: None,
                    shapes: vec![Shape::Box([5, 6, 7, 8])]
                },
                GroundedObject {
                    label: None,
                    shapes: vec![Shape::Box([0, 0, 1, 1])]
                },
            ]
        );
    }
}

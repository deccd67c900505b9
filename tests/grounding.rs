//! Golden tests of grounding-markup parsing against `expected/grounding.json`.

use lm::grounding::{
    boxes, draw_calls, fetch_all_box_with_ref, fetch_latest_picture, grid_to_pixels,
    latest_picture, parse, to_list_format, DrawCall, GroundedBox, GroundingError, Piece,
};
use qwenvl_e2e::expected_json;
use serde_json::Value;

fn entries() -> Vec<Value> {
    let j = expected_json("grounding.json");
    let entries = j.as_array().unwrap().clone();
    assert_eq!(entries.len(), 17);
    entries
}

fn i64s(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn history_of(e: &Value) -> Vec<(String, String)> {
    e["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t[0].as_str().unwrap().to_string(),
                t[1].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn piece_json(p: &Piece) -> Value {
    let (k, v) = match p {
        Piece::Text(s) => ("text", s),
        Piece::Ref(s) => ("ref", s),
        Piece::Box(s) => ("box", s),
        Piece::Quad(s) => ("quad", s),
        Piece::Image(s) => ("image", s),
    };
    serde_json::json!({ k: v })
}

/// The reference error string ("Type: message") our error corresponds to.
fn python_error(e: &GroundingError) -> String {
    match e {
        GroundingError::Unclosed { .. } => "ValueError: Unclosed image token".into(),
        GroundingError::BadNumber { literal } if !literal.contains('\'') => {
            format!("ValueError: invalid literal for int() with base 10: '{literal}'")
        }
        GroundingError::WrongArity { .. } => "AssertionError: ".into(),
        other => panic!("no reference counterpart in the fixture for {other:?}"),
    }
}

fn boxes_json(boxes: &[GroundedBox]) -> Value {
    Value::Array(
        boxes
            .iter()
            .map(|b| match &b.label {
                Some(r) => serde_json::json!({"box": b.grid, "ref": r}),
                None => serde_json::json!({"box": b.grid}),
            })
            .collect(),
    )
}

#[test]
fn to_list_format_matches() {
    let mut checked = 0;
    for e in entries() {
        let name = e["name"].as_str().unwrap();
        let Some(want) = e.get("to_list_format") else {
            continue;
        };
        let response = e["response"].as_str().unwrap();
        match to_list_format(response) {
            Ok(pieces) => {
                assert!(want["ok"].as_bool().unwrap(), "{name}: expected an error");
                let got: Vec<Value> = pieces.iter().map(piece_json).collect();
                assert_eq!(Value::Array(got), want["value"], "{name}");
                // Lenient parse agrees whenever the strict one succeeds.
                assert_eq!(parse(response), pieces, "{name}");
            }
            Err(err) => {
                assert!(!want["ok"].as_bool().unwrap(), "{name}: {err}");
                assert_eq!(
                    python_error(&err),
                    want["error"].as_str().unwrap(),
                    "{name}"
                );
                // Lenient: the unclosed tail is text.
                let lenient = parse(response);
                assert!(matches!(lenient.last(), Some(Piece::Text(_))), "{name}");
            }
        }
        checked += 1;
    }
    assert!(checked >= 14);
}

#[test]
fn fetch_all_box_with_ref_matches() {
    for e in entries() {
        let name = e["name"].as_str().unwrap();
        let response = e["response"].as_str().unwrap();
        let want = &e["fetch_all_box_with_ref"];
        match fetch_all_box_with_ref(response) {
            Ok(got) => {
                assert!(want["ok"].as_bool().unwrap(), "{name}: expected an error");
                assert_eq!(boxes_json(&got), want["value"], "{name}");
                assert_eq!(boxes(response), got, "{name}: lenient");
            }
            Err(err) => {
                assert!(!want["ok"].as_bool().unwrap(), "{name}: {err}");
                assert_eq!(
                    python_error(&err),
                    want["error"].as_str().unwrap(),
                    "{name}"
                );
                // Lenient: the offending box is skipped, nothing panics.
                let lenient = boxes(response);
                assert!(lenient.len() < response.matches("<box>").count(), "{name}");
            }
        }
    }
}

/// Entries recorded without `to_list_format` and whose labelled boxes have no text draw call.
fn is_label_less_recording(e: &Value) -> bool {
    let calls = e["draw_bbox_on_latest_picture"]["draw_calls"]
        .as_array()
        .unwrap();
    let labelled = e["fetch_all_box_with_ref"]["value"]
        .as_array()
        .is_some_and(|b| b.iter().any(|b| b.get("ref").is_some()));
    e.get("to_list_format").is_none() && labelled && calls.iter().all(|c| c["kind"] == "box")
}

/// The reference `draw_bbox_on_latest_picture`, composed from the strict helpers: find the picture,
/// check it is the fixture's image, fetch the boxes, draw them on the recorded image size.
#[test]
fn draw_bbox_on_latest_picture_matches() {
    let mut label_less = Vec::new();
    for e in entries() {
        let name = e["name"].as_str().unwrap();
        let response = e["response"].as_str().unwrap();
        let history = history_of(&e);
        let want = &e["draw_bbox_on_latest_picture"];
        let wh = i64s(&e["image_size_wh"]);
        let (w, h) = (u32::try_from(wh[0]).unwrap(), u32::try_from(wh[1]).unwrap());

        let result = fetch_latest_picture(response, &history).and_then(|picture| {
            let Some(picture) = picture else {
                return Ok(None);
            };
            assert_eq!(picture, e["image"].as_str().unwrap(), "{name}");
            let found = fetch_all_box_with_ref(response)?;
            Ok((!found.is_empty()).then(|| draw_calls(&found, w, h)))
        });
        match result {
            Ok(calls) => {
                assert!(want["ok"].as_bool().unwrap(), "{name}: expected an error");
                assert_eq!(
                    calls.is_some(),
                    want["returned_image"].as_bool().unwrap(),
                    "{name}"
                );
                let mut calls = calls.unwrap_or_default();
                if is_label_less_recording(&e) {
                    label_less.push(name.to_string());
                    // FIXTURE DISCREPANCY (reported): the three `float_rounding_*` entries were
                    // recorded without `to_list_format` and without the label's draw_text call,
                    // although their box has ref "tricky" (see their `fetch_all_box_with_ref`) and
                    // the reference code draws the label unconditionally (README 4). We still
                    // produce the label; compare the rectangles, which is what these entries pin.
                    assert!(
                        calls.iter().any(|c| matches!(c, DrawCall::Text { .. })),
                        "{name}: expected our label call"
                    );
                    calls.retain(|c| matches!(c, DrawCall::Box { .. }));
                }
                let got: Vec<Value> = calls
                    .iter()
                    .map(|c| match c {
                        DrawCall::Box { px } => serde_json::json!({"kind": "box", "box_px": px}),
                        DrawCall::Text { text, pos } => {
                            serde_json::json!({"kind": "text", "text": text, "position_px": pos})
                        }
                    })
                    .collect();
                assert_eq!(Value::Array(got), want["draw_calls"], "{name}");
            }
            Err(err) => {
                assert!(!want["ok"].as_bool().unwrap(), "{name}: {err}");
                assert!(!want["returned_image"].as_bool().unwrap(), "{name}");
                assert_eq!(
                    python_error(&err),
                    want["error"].as_str().unwrap(),
                    "{name}"
                );
            }
        }
        // The lenient lookup finds the same picture.
        assert_eq!(
            latest_picture(response, &history).as_deref(),
            Some(e["image"].as_str().unwrap()),
            "{name}"
        );
    }
    // The exception above covers exactly the three float-rounding entries.
    assert_eq!(label_less.len(), 3, "{label_less:?}");
    assert!(label_less.iter().all(|n| n.starts_with("float_rounding")));
}

/// The `float_rounding_*` entries: float truncation, not integer floor division.
#[test]
fn grid_to_pixels_uses_float_truncation() {
    for e in entries() {
        let name = e["name"].as_str().unwrap();
        if !name.starts_with("float_rounding") {
            continue;
        }
        let wh = i64s(&e["image_size_wh"]);
        let (w, h) = (u32::try_from(wh[0]).unwrap(), u32::try_from(wh[1]).unwrap());
        let b = &fetch_all_box_with_ref(e["response"].as_str().unwrap()).unwrap()[0];
        let px = grid_to_pixels(b.grid, w, h);
        let want = i64s(&e["draw_bbox_on_latest_picture"]["draw_calls"][0]["box_px"]);
        assert_eq!(px.to_vec(), want, "{name}");
        let floor_div = b.grid[0] * i64::from(w) / 1000;
        assert_ne!(
            px[0], floor_div,
            "{name}: the entry should exercise the difference"
        );
    }
}

#[test]
fn latest_picture_order() {
    let h = |q: &str| (q.to_string(), "<img>reply.png</img>".to_string());
    let history = vec![
        h("<img>old.png</img>"),
        h("Picture 1: <img>a.png</img>\nPicture 2: <img>b.png</img>\n"),
        h("no picture"),
    ];
    // Newest history query with a picture, its last picture; replies are not searched.
    assert_eq!(latest_picture("text", &history).as_deref(), Some("b.png"));
    assert_eq!(
        fetch_latest_picture("text", &history).unwrap().as_deref(),
        Some("b.png")
    );
    // The response's own picture wins.
    assert_eq!(
        latest_picture("<img>c.png</img>", &history).as_deref(),
        Some("c.png")
    );
    assert_eq!(latest_picture("text", &[]), None);
    // Strict: an unclosed tag in a searched text is an error; lenient: it is text.
    assert!(fetch_latest_picture("<box>(1,2", &history).is_err());
    assert_eq!(
        latest_picture("<box>(1,2", &history).as_deref(),
        Some("b.png")
    );
}

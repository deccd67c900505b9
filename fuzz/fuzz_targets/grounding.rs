//! Grounding markup of replies: strict and lenient parses, boxes, objects, draw calls.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lm::grounding;

fuzz_target!(|data: &[u8]| {
    let (w, h, rest) = match data {
        [a, b, c, d, rest @ ..] => (
            u32::from(u16::from_le_bytes([*a, *b])),
            u32::from(u16::from_le_bytes([*c, *d])),
            rest,
        ),
        _ => (448, 448, data),
    };
    let text = String::from_utf8_lossy(rest);
    let _ = grounding::to_list_format(&text);
    let pieces = grounding::parse(&text);
    assert!(!text.is_empty() || pieces.is_empty());
    if let Ok(b) = grounding::fetch_all_box_with_ref(&text) {
        let _ = grounding::draw_calls(&b, w, h);
    }
    let b = grounding::boxes(&text);
    let _ = grounding::draw_calls(&b, w, h);
    let _ = grounding::objects(&text);
    let history = vec![(text.to_string(), String::new())];
    let _ = grounding::fetch_latest_picture(&text, &history);
    let _ = grounding::latest_picture(&text, &history);
});

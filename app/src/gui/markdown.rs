//! Replies as Markdown (CommonMark with GFM tables and strikethrough), drawn with egui widgets so
//! that grounding markup stays coloured chips inside the text.
//!
//! The reply is split into grounding pieces first; every piece that is not text becomes a
//! private-use marker (`U+E000 index U+E001`) in the Markdown source, so pulldown-cmark never sees
//! `<ref>` as HTML and the chip lands where the markup was. Parsed documents are kept by text (see
//! [`Docs`]): a frame that shows the same reply again draws it without parsing. Raw HTML is shown
//! as text and Markdown images as their alt text: a reply never loads anything.

use std::collections::HashMap;
use std::sync::Arc;

use egui::{Color32, RichText, Stroke};
use lm::grounding::Piece;
use pulldown_cmark::{CodeBlockKind, Event, Options, Parser, Tag, TagEnd};

const MARK_OPEN: char = '\u{E000}';
const MARK_CLOSE: char = '\u{E001}';

/// A parsed reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub blocks: Vec<Block>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Para(Vec<Span>),
    Heading(u8, Vec<Span>),
    /// `start`: the first number of an ordered list.
    List {
        start: Option<u64>,
        items: Vec<Vec<Block>>,
    },
    Code {
        lang: String,
        code: String,
    },
    Table {
        head: Vec<Vec<Span>>,
        rows: Vec<Vec<Vec<Span>>>,
    },
    Quote(Vec<Block>),
    Rule,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Span {
    Text(String, Style),
    /// Grounding piece `i` of the reply (see [`parse`]).
    Chip(usize),
    Break,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Style {
    pub bold: bool,
    pub italic: bool,
    pub strike: bool,
    pub code: bool,
    pub link: Option<String>,
}

/// The Markdown of `pieces` (from [`super::super::geometry::pieces`]): text pieces as written,
/// the others as chips numbered by their index in `pieces`.
pub fn parse(pieces: &[Piece]) -> Doc {
    let mut source = String::new();
    for (i, p) in pieces.iter().enumerate() {
        match p {
            Piece::Text(t) => source.push_str(&t.replace([MARK_OPEN, MARK_CLOSE], "\u{FFFD}")),
            _ => {
                source.push(MARK_OPEN);
                source.push_str(&i.to_string());
                source.push(MARK_CLOSE);
            }
        }
    }
    let raw: Vec<String> = pieces.iter().map(raw_markup).collect();
    let mut opts = Options::empty();
    opts.insert(Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH);
    let mut ev = Parser::new_ext(&source, opts).peekable();
    let mut p = Parse { raw: &raw };
    Doc {
        blocks: p.blocks(&mut ev),
    }
}

/// A piece as it was written (code shows grounding markup literally).
fn raw_markup(p: &Piece) -> String {
    match p {
        Piece::Text(t) => t.clone(),
        Piece::Ref(r) => format!("<ref>{r}</ref>"),
        Piece::Box(b) => format!("<box>{b}</box>"),
        Piece::Quad(q) => format!("<quad>{q}</quad>"),
        Piece::Image(i) => format!("<img>{i}</img>"),
    }
}

type Events<'a> = std::iter::Peekable<Parser<'a>>;

struct Parse<'r> {
    raw: &'r [String],
}

fn is_inline(e: &Event) -> bool {
    match e {
        Event::Text(_)
        | Event::Code(_)
        | Event::SoftBreak
        | Event::HardBreak
        | Event::InlineHtml(_)
        | Event::InlineMath(_)
        | Event::FootnoteReference(_)
        | Event::TaskListMarker(_) => true,
        Event::Start(t) => matches!(
            t,
            Tag::Emphasis
                | Tag::Strong
                | Tag::Strikethrough
                | Tag::Link { .. }
                | Tag::Image { .. }
                | Tag::Superscript
                | Tag::Subscript
        ),
        Event::End(t) => matches!(
            t,
            TagEnd::Emphasis
                | TagEnd::Strong
                | TagEnd::Strikethrough
                | TagEnd::Link
                | TagEnd::Image
                | TagEnd::Superscript
                | TagEnd::Subscript
        ),
        _ => false,
    }
}

impl Parse<'_> {
    /// Blocks up to the end of the enclosing container (its `End` is consumed) or of the input.
    fn blocks(&mut self, ev: &mut Events) -> Vec<Block> {
        let mut out = Vec::new();
        while let Some(e) = ev.peek() {
            if is_inline(e) {
                // Tight list items hold their text without a paragraph.
                let spans = self.inlines(ev);
                out.push(Block::Para(spans));
                continue;
            }
            let Some(e) = ev.next() else { break };
            match e {
                Event::End(_) => break,
                Event::Start(Tag::Paragraph) => {
                    let s = self.inlines(ev);
                    ev.next(); // End(Paragraph)
                    out.push(Block::Para(s));
                }
                Event::Start(Tag::Heading { level, .. }) => {
                    let s = self.inlines(ev);
                    ev.next();
                    out.push(Block::Heading(level as u8, s));
                }
                Event::Start(Tag::BlockQuote(_)) => out.push(Block::Quote(self.blocks(ev))),
                Event::Start(Tag::List(start)) => {
                    let mut items = Vec::new();
                    while let Some(Event::Start(Tag::Item)) = ev.peek() {
                        ev.next();
                        items.push(self.blocks(ev));
                    }
                    ev.next(); // End(List)
                    out.push(Block::List { start, items });
                }
                Event::Start(Tag::CodeBlock(kind)) => {
                    let lang = match kind {
                        CodeBlockKind::Fenced(info) => {
                            info.split_whitespace().next().unwrap_or("").to_string()
                        }
                        CodeBlockKind::Indented => String::new(),
                    };
                    let mut code = String::new();
                    for e in ev.by_ref() {
                        match e {
                            Event::Text(t) => code.push_str(&self.unmark(&t)),
                            Event::End(_) => break,
                            _ => {}
                        }
                    }
                    if code.ends_with('\n') {
                        code.pop();
                    }
                    out.push(Block::Code { lang, code });
                }
                Event::Start(Tag::Table(_)) => out.push(self.table(ev)),
                Event::Start(Tag::HtmlBlock) => {
                    let mut text = String::new();
                    for e in ev.by_ref() {
                        match e {
                            Event::Html(t) | Event::Text(t) => text.push_str(&t),
                            Event::End(_) => break,
                            _ => {}
                        }
                    }
                    let text = text.trim_end().to_string();
                    out.push(Block::Para(self.text(&text, &Style::default())));
                }
                Event::Rule => out.push(Block::Rule),
                Event::Html(t) | Event::Text(t) => {
                    out.push(Block::Para(self.text(&t, &Style::default())))
                }
                // Containers we do not draw specially: their contents, inline.
                Event::Start(_) => {
                    let inner = self.blocks(ev);
                    out.extend(inner);
                }
                _ => {}
            }
        }
        out
    }

    /// Inline events up to the first block-level event (left in `ev`).
    fn inlines(&mut self, ev: &mut Events) -> Vec<Span> {
        let mut out = Vec::new();
        let mut stack: Vec<Style> = vec![Style::default()];
        while let Some(e) = ev.peek() {
            if !is_inline(e) {
                break;
            }
            let e = ev.next().expect("peeked");
            let top = stack.last().cloned().unwrap_or_default();
            match e {
                Event::Text(t) | Event::InlineHtml(t) | Event::InlineMath(t) => {
                    out.extend(self.text(&t, &top))
                }
                Event::Code(t) => {
                    out.push(Span::Text(self.unmark(&t), Style { code: true, ..top }))
                }
                Event::SoftBreak => out.push(Span::Text(" ".into(), top)),
                Event::HardBreak => out.push(Span::Break),
                Event::FootnoteReference(t) => out.push(Span::Text(format!("[{t}]"), top)),
                Event::TaskListMarker(done) => {
                    out.push(Span::Text(if done { "☑ " } else { "☐ " }.into(), top))
                }
                Event::Start(tag) => {
                    let mut s = top;
                    match tag {
                        Tag::Emphasis => s.italic = true,
                        Tag::Strong => s.bold = true,
                        Tag::Strikethrough => s.strike = true,
                        Tag::Link { dest_url, .. } => s.link = Some(dest_url.to_string()),
                        // An image is its alt text (the text events inside), never fetched.
                        Tag::Image { .. } => s.italic = true,
                        _ => {}
                    }
                    stack.push(s);
                }
                Event::End(_) if stack.len() > 1 => {
                    stack.pop();
                }
                _ => {}
            }
        }
        out
    }

    fn table(&mut self, ev: &mut Events) -> Block {
        let (mut head, mut rows) = (Vec::new(), Vec::new());
        let mut row: Vec<Vec<Span>> = Vec::new();
        while let Some(e) = ev.next() {
            match e {
                Event::Start(Tag::TableCell) => {
                    row.push(self.inlines(ev));
                    ev.next(); // End(TableCell)
                }
                Event::End(TagEnd::TableHead) => head = std::mem::take(&mut row),
                Event::End(TagEnd::TableRow) => rows.push(std::mem::take(&mut row)),
                Event::End(TagEnd::Table) => break,
                _ => {}
            }
        }
        Block::Table { head, rows }
    }

    /// Text with chip markers split out.
    fn text(&self, t: &str, style: &Style) -> Vec<Span> {
        let mut out = Vec::new();
        let mut rest = t;
        while let Some(open) = rest.find(MARK_OPEN) {
            let after = &rest[open + MARK_OPEN.len_utf8()..];
            let Some(close) = after.find(MARK_CLOSE) else {
                break;
            };
            match after[..close].parse::<usize>() {
                Ok(i) if i < self.raw.len() => {
                    if open > 0 {
                        out.push(Span::Text(rest[..open].to_string(), style.clone()));
                    }
                    out.push(Span::Chip(i));
                }
                _ => out.push(Span::Text(
                    rest[..open + MARK_OPEN.len_utf8() + close].to_string(),
                    style.clone(),
                )),
            }
            rest = &after[close + MARK_CLOSE.len_utf8()..];
        }
        if !rest.is_empty() {
            out.push(Span::Text(rest.to_string(), style.clone()));
        }
        out
    }

    /// Code: markers back to the markup they stand for.
    fn unmark(&self, t: &str) -> String {
        self.text(t, &Style::default())
            .into_iter()
            .map(|s| match s {
                Span::Text(t, _) => t,
                Span::Chip(i) => self.raw[i].clone(),
                Span::Break => "\n".into(),
            })
            .collect()
    }
}

/// Parsed replies by their text, so a frame that shows the same text again does not parse it.
///
/// A reply being written changes every piece. [`Docs::streaming`] parses it in blank-line
/// separated segments (outside code fences), each parsed once, so a frame parses only the last,
/// growing segment: the work over a whole reply is linear in its length, not quadratic. The
/// finished reply is parsed whole ([`Docs::get`]), so a list or a list item's paragraph that spans
/// a blank line renders exactly as CommonMark says once the reply is done.
#[derive(Default)]
pub struct Docs {
    docs: HashMap<String, Arc<Doc>>,
    /// Streaming segments by text: their blocks (chips numbered within the segment) and pieces.
    segments: HashMap<String, Arc<(Doc, Vec<Piece>)>>,
    /// Bytes of Markdown parsed so far (tests check the streaming work is linear).
    pub parsed_bytes: usize,
}

impl Docs {
    /// At most this many texts are kept (a long chat, each reply once).
    const KEEP: usize = 256;
    const KEEP_SEGMENTS: usize = 4096;

    /// A finished reply, parsed whole.
    pub fn get(&mut self, text: &str, pieces: &[Piece]) -> Arc<Doc> {
        if let Some(d) = self.docs.get(text) {
            return d.clone();
        }
        if self.docs.len() >= Self::KEEP {
            self.docs.clear();
        }
        self.parsed_bytes += text.len();
        let d = Arc::new(parse(pieces));
        self.docs.insert(text.to_string(), d.clone());
        d
    }

    /// A reply being written: its segments' blocks, chips numbered as in `pieces(text)`.
    pub fn streaming(&mut self, text: &str) -> Doc {
        if self.segments.len() >= Self::KEEP_SEGMENTS {
            self.segments.clear();
        }
        let mut blocks = Vec::new();
        let mut offset = 0usize;
        let mut prev_ends_text = false;
        for seg in segments(text) {
            let entry = match self.segments.get(seg) {
                Some(e) => e.clone(),
                None => {
                    self.parsed_bytes += seg.len();
                    let pieces = super::geometry::pieces(seg);
                    let e = Arc::new((parse(&pieces), pieces));
                    self.segments.insert(seg.to_string(), e.clone());
                    e
                }
            };
            let (doc, pieces) = &*entry;
            // Text at the end of one segment and the start of the next is one piece of the
            // whole reply.
            let merged = prev_ends_text && matches!(pieces.first(), Some(Piece::Text(_)));
            let base = offset - usize::from(merged);
            blocks.extend(doc.blocks.iter().map(|b| renumber(b, base)));
            offset = base + pieces.len();
            prev_ends_text = matches!(pieces.last(), Some(Piece::Text(_)));
        }
        Doc { blocks }
    }
}

/// The text cut after each blank line that is outside a code fence.
fn segments(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut at, mut fence) = (0, 0, false);
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            fence = !fence;
        }
        at += line.len();
        if !fence && line.trim().is_empty() && line.ends_with('\n') && at - start > line.len() {
            out.push(&text[start..at]);
            start = at;
        }
    }
    if start < text.len() {
        out.push(&text[start..]);
    }
    out
}

fn renumber(b: &Block, base: usize) -> Block {
    let spans = |s: &[Span]| -> Vec<Span> {
        s.iter()
            .map(|x| match x {
                Span::Chip(i) => Span::Chip(base + i),
                other => other.clone(),
            })
            .collect()
    };
    let blocks = |bs: &[Block]| bs.iter().map(|b| renumber(b, base)).collect();
    match b {
        Block::Para(s) => Block::Para(spans(s)),
        Block::Heading(l, s) => Block::Heading(*l, spans(s)),
        Block::List { start, items } => Block::List {
            start: *start,
            items: items.iter().map(|i| blocks(i)).collect(),
        },
        Block::Table { head, rows } => Block::Table {
            head: head.iter().map(|c| spans(c)).collect(),
            rows: rows
                .iter()
                .map(|r| r.iter().map(|c| spans(c)).collect())
                .collect(),
        },
        Block::Quote(bs) => Block::Quote(blocks(bs)),
        other => other.clone(),
    }
}

/// What a code block's copy button and a chip need from the caller.
pub struct Draw<'a> {
    /// Draws grounding piece `i` as its chip.
    pub chip: &'a mut dyn FnMut(&mut egui::Ui, usize),
    /// A code block's "Copy code" was clicked with this code.
    pub copied: &'a mut Option<String>,
}

pub fn show(ui: &mut egui::Ui, doc: &Doc, d: &mut Draw) {
    ui.vertical(|ui| {
        for (i, b) in doc.blocks.iter().enumerate() {
            block(ui, b, d, i);
        }
    });
}

fn block(ui: &mut egui::Ui, b: &Block, d: &mut Draw, n: usize) {
    match b {
        Block::Para(s) => paragraph(ui, s, d, None),
        Block::Heading(level, s) => {
            let size = match level {
                1 => 1.5,
                2 => 1.3,
                3 => 1.15,
                _ => 1.0,
            } * egui::TextStyle::Body.resolve(ui.style()).size;
            ui.add_space(4.0);
            paragraph(ui, s, d, Some(size));
        }
        Block::List { start, items } => {
            for (k, item) in items.iter().enumerate() {
                let marker = match start {
                    Some(s) => format!("{}.", s + k as u64),
                    None => "•".to_string(),
                };
                ui.horizontal_top(|ui| {
                    ui.label(RichText::new(marker).weak());
                    ui.vertical(|ui| {
                        for (j, b) in item.iter().enumerate() {
                            block(ui, b, d, j);
                        }
                    });
                });
            }
        }
        Block::Code { lang, code } => code_block(ui, lang, code, d, n),
        Block::Table { head, rows } => {
            egui::Frame::group(ui.style()).show(ui, |ui| {
                egui::Grid::new(ui.id().with(("table", n)))
                    .striped(true)
                    .spacing([16.0, 4.0])
                    .show(ui, |ui| {
                        for cell in head {
                            ui.horizontal_wrapped(|ui| {
                                spans(ui, cell, d, None, true);
                            });
                        }
                        ui.end_row();
                        for row in rows {
                            for cell in row {
                                ui.horizontal_wrapped(|ui| {
                                    spans(ui, cell, d, None, false);
                                });
                            }
                            ui.end_row();
                        }
                    });
            });
        }
        Block::Quote(bs) => {
            egui::Frame::new()
                .stroke(Stroke::new(0.0, Color32::TRANSPARENT))
                .inner_margin(egui::Margin {
                    left: 10,
                    ..Default::default()
                })
                .show(ui, |ui| {
                    let top = ui.cursor().min;
                    ui.vertical(|ui| {
                        for (j, b) in bs.iter().enumerate() {
                            block(ui, b, d, j);
                        }
                    });
                    let bottom = ui.min_rect().max.y;
                    ui.painter().vline(
                        top.x - 6.0,
                        top.y..=bottom,
                        Stroke::new(3.0, ui.visuals().weak_text_color()),
                    );
                });
        }
        Block::Rule => {
            ui.separator();
        }
    }
}

fn paragraph(ui: &mut egui::Ui, s: &[Span], d: &mut Draw, size: Option<f32>) {
    ui.horizontal_wrapped(|ui| {
        // Runs of differently styled text follow each other without gaps.
        ui.spacing_mut().item_spacing.x = 0.0;
        spans(ui, s, d, size, size.is_some());
    });
}

fn spans(ui: &mut egui::Ui, s: &[Span], d: &mut Draw, size: Option<f32>, strong: bool) {
    for span in s {
        match span {
            Span::Text(t, style) => {
                let mut r = RichText::new(t);
                if let Some(px) = size {
                    r = r.size(px);
                }
                if style.bold || strong {
                    r = r.strong();
                }
                if style.italic {
                    r = r.italics();
                }
                if style.strike {
                    r = r.strikethrough();
                }
                if style.code {
                    r = r.code();
                }
                match style.link.as_deref() {
                    // Only web and mail links open; anything else (file:, javascript:) is text.
                    Some(url)
                        if url.starts_with("https://")
                            || url.starts_with("http://")
                            || url.starts_with("mailto:") =>
                    {
                        ui.hyperlink_to(r, url).on_hover_text(url);
                    }
                    _ => {
                        ui.label(r);
                    }
                }
            }
            Span::Chip(i) => {
                ui.add_space(2.0);
                (d.chip)(ui, *i);
                ui.add_space(2.0);
            }
            Span::Break => ui.end_row(),
        }
    }
}

fn code_block(ui: &mut egui::Ui, lang: &str, code: &str, d: &mut Draw, n: usize) {
    let style = ui.style().clone();
    egui::Frame::group(&style)
        .fill(ui.visuals().extreme_bg_color)
        .show(ui, |ui| {
            ui.set_min_width(ui.available_width().min(640.0));
            ui.horizontal(|ui| {
                ui.label(
                    RichText::new(if lang.is_empty() { "code" } else { lang })
                        .small()
                        .weak(),
                );
                ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                    if ui
                        .small_button("Copy code")
                        .on_hover_text("Copy this code block")
                        .clicked()
                    {
                        *d.copied = Some(code.to_string());
                    }
                });
            });
            let theme = egui_extras::syntax_highlighting::CodeTheme::from_style(&style);
            let job =
                egui_extras::syntax_highlighting::highlight(ui.ctx(), &style, &theme, code, lang);
            egui::ScrollArea::horizontal()
                .id_salt(("code", n, code.len()))
                .show(ui, |ui| {
                    ui.add(egui::Label::new(job).selectable(true).extend());
                });
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Doc {
        parse(&lm::grounding::parse(text))
    }

    fn plain(s: &[Span]) -> String {
        s.iter()
            .map(|s| match s {
                Span::Text(t, _) => t.clone(),
                Span::Chip(i) => format!("[chip {i}]"),
                Span::Break => "\n".into(),
            })
            .collect()
    }

    #[test]
    fn blocks_lists_tables_and_code() {
        let d = doc(
            "# Title\n\nSome **bold** and `code`.\n\n- one\n- two\n  1. nested\n\n\
             | a | b |\n|---|---|\n| 1 | 2 |\n\n```rust\nfn main() {}\n```\n\n> quoted\n\n---\n",
        );
        let b = &d.blocks;
        assert!(matches!(&b[0], Block::Heading(1, s) if plain(s) == "Title"));
        let Block::Para(p) = &b[1] else {
            panic!("{:?}", b[1])
        };
        assert_eq!(plain(p), "Some bold and code.");
        assert!(p.contains(&Span::Text(
            "bold".into(),
            Style {
                bold: true,
                ..Default::default()
            }
        )));
        let Block::List { start: None, items } = &b[2] else {
            panic!("{:?}", b[2])
        };
        assert_eq!(items.len(), 2);
        assert!(matches!(&items[1][1], Block::List { start: Some(1), .. }));
        let Block::Table { head, rows } = &b[3] else {
            panic!("{:?}", b[3])
        };
        assert_eq!(
            (head.len(), rows.len(), plain(&rows[0][1])),
            (2, 1, "2".into())
        );
        assert_eq!(
            b[4],
            Block::Code {
                lang: "rust".into(),
                code: "fn main() {}".into()
            }
        );
        assert!(matches!(&b[5], Block::Quote(q) if q.len() == 1));
        assert_eq!(b[6], Block::Rule);
    }

    #[test]
    fn grounding_markup_becomes_chips_inside_markdown() {
        let d = doc("**Found** <ref>the cat</ref><box>(1,2),(3,4)</box> here.\n\n- <ref>狗</ref>");
        let Block::Para(p) = &d.blocks[0] else {
            panic!()
        };
        assert_eq!(plain(p), "Found [chip 1][chip 2] here.");
        let Block::List { items, .. } = &d.blocks[1] else {
            panic!()
        };
        assert!(matches!(&items[0][0], Block::Para(s) if plain(s) == "[chip 4]"));
    }

    #[test]
    fn code_keeps_markup_literally_and_html_is_text() {
        let d = doc("```\n<ref>x</ref><box>(1,2),(3,4)</box>\n```\n\n<script>alert(1)</script>\n");
        assert_eq!(
            d.blocks[0],
            Block::Code {
                lang: String::new(),
                code: "<ref>x</ref><box>(1,2),(3,4)</box>".into()
            }
        );
        assert!(matches!(&d.blocks[1], Block::Para(s) if plain(s) == "<script>alert(1)</script>"));
        // A typed marker character cannot forge a chip.
        let d = doc("\u{E000}0\u{E001} text");
        let Block::Para(p) = &d.blocks[0] else {
            panic!()
        };
        assert!(!p.iter().any(|s| matches!(s, Span::Chip(_))), "{p:?}");
    }

    /// A reply streamed piece by piece: each frame's document equals the whole-text parse (for
    /// blocks that do not span blank lines), chips keep the reply's numbering, and the Markdown
    /// parsed over the whole reply stays linear in its length.
    #[test]
    fn streaming_parses_each_segment_once_with_the_same_result() {
        let mut text = String::new();
        for k in 0..150 {
            text.push_str(&format!(
                "## Part {k}\n\nSome **bold** text about <ref>thing {k}</ref><box>(1,2),(3,4)</box> here.\n\n\
                 ```rust\nlet x = {k};\n\nlet y = x;\n```\n\n| a | b |\n|---|---|\n| {k} | 2 |\n\n"
            ));
        }
        let mut docs = Docs::default();
        let mut shown = String::new();
        let mut frames = 0;
        for piece in text.split_inclusive(' ') {
            shown.push_str(piece);
            frames += 1;
            let streamed = docs.streaming(&shown);
            if frames % 97 == 0 {
                assert_eq!(
                    streamed,
                    parse(&super::super::geometry::pieces(&shown)),
                    "{shown:?}"
                );
            }
        }
        assert_eq!(
            docs.streaming(&text),
            parse(&super::super::geometry::pieces(&text))
        );
        // Each complete segment is parsed once; a frame parses only the growing last one.
        let longest = segments(&text).iter().map(|s| s.len()).max().unwrap();
        let linear = 2 * text.len() + frames * longest;
        let quadratic: usize = (1..=frames).map(|f| f * text.len() / frames).sum();
        assert!(
            docs.parsed_bytes <= linear && docs.parsed_bytes * 20 < quadratic,
            "{} bytes parsed for a {}-byte reply over {frames} frames (whole text each frame: {quadratic})",
            docs.parsed_bytes,
            text.len()
        );
    }

    #[test]
    fn unfinished_markdown_while_streaming_still_parses() {
        for text in ["```py\nprint(", "| a |\n|--", "**bold", "1. one\n2."] {
            let d = doc(text);
            assert!(!d.blocks.is_empty(), "{text}");
        }
    }
}

//! The reply text as a front end shows it: trimmed like the engine's final text (so that the
//! streamed pieces add up to exactly the non-streamed `content`), and cut at the first `stop`
//! string, which is never sent.

/// Feeds on the engine's text pieces and releases what is safe to send.
#[derive(Debug, Default)]
pub struct TextFilter {
    stops: Vec<String>,
    /// Held back: trailing whitespace, or a tail that may be the start of a stop string.
    held: String,
    /// Everything released so far.
    sent: String,
    started: bool,
    stopped: bool,
}

impl TextFilter {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// True once a stop string was seen: generation should end.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// All text released so far.
    pub fn text(&self) -> &str {
        &self.sent
    }

    /// Adds a piece; returns the text that can be sent now.
    pub fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        let mut piece = piece;
        if !self.started {
            // Leading whitespace is trimmed, like the final text.
            piece = piece.trim_start();
            if piece.is_empty() {
                return String::new();
            }
            self.started = true;
        }
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(at);
            self.stopped = true;
            // Text before a stop string ends the reply: its trailing whitespace goes too.
            let out = self.held.trim_end().to_string();
            self.held.clear();
            self.sent.push_str(&out);
            return out;
        }
        // Keep back trailing whitespace (it may end the reply) and the longest tail that could
        // still grow into a stop string.
        let mut keep = self.held.len() - self.held.trim_end().len();
        for s in &self.stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.held.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        // Whitespace just before a held-back tail would end the reply if the tail is a stop.
        let cut = self.held[..self.held.len() - keep].trim_end().len();
        let out: String = self.held[..cut].to_string();
        self.held.drain(..cut);
        self.sent.push_str(&out);
        out
    }

    /// Releases what was held back at the end of the reply (a partial stop-string match is
    /// text after all; trailing whitespace is trimmed).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let out = self.held.trim_end().to_string();
        self.held.clear();
        self.sent.push_str(&out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, String, bool) {
        let mut f = TextFilter::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out: Vec<String> = pieces.iter().map(|p| f.push(p)).collect();
        out.push(f.finish());
        (out, f.text().to_string(), f.stopped())
    }

    #[test]
    fn trims_like_the_final_text() {
        let (out, text, stopped) = run(&[], &["  ", "\nHello", " ", "world", " \n"]);
        assert_eq!(text, "Hello world");
        assert_eq!(out.concat(), "Hello world");
        assert!(!stopped);
        // The space is only sent once the next word shows it is not trailing.
        assert_eq!(out, ["", "Hello", "", " world", "", ""]);
    }

    #[test]
    fn cuts_at_a_stop_string_split_across_pieces() {
        let (out, text, stopped) = run(&["END"], &["one two E", "N", "D three"]);
        assert_eq!(text, "one two");
        assert_eq!(out.concat(), "one two");
        assert!(stopped);
        // "E" and "EN" were held back as possible starts of "END".
        assert_eq!(out[0], "one two");
    }

    #[test]
    fn whitespace_before_a_possible_stop_is_held_too() {
        let (out, text, stopped) = run(&["STOP"], &["word", " ST", "OP more"]);
        assert_eq!(text, "word");
        assert_eq!(out, ["word", "", "", ""]);
        assert!(stopped);
    }

    #[test]
    fn a_partial_match_that_fails_is_released() {
        let (_, text, stopped) = run(&["ENDING"], &["the E", "N", "d"]);
        assert_eq!(text, "the ENd");
        assert!(!stopped);
        let (_, text, _) = run(&["ENDING"], &["the EN"]);
        assert_eq!(text, "the EN");
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_is_safe() {
        let (_, text, stopped) = run(&["ü!", "b"], &["aü", "!b"]);
        assert_eq!(text, "a");
        assert!(stopped);
        let (_, text, stopped) = run(&["ññ"], &["xñ", "y"]);
        assert_eq!(text, "xñy");
        assert!(!stopped);
    }
}

//! `GET /metrics`: the server's counters in the Prometheus text format (as llama-server and vLLM
//! expose them): requests by status, prompt and generated tokens, queue depth, busy slots, and
//! histograms of the time to the first token and between tokens.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Upper bounds (seconds) of the latency histograms' buckets.
const TTFT_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const ITL_BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A cumulative histogram over fixed buckets.
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

pub(super) struct Metrics {
    /// Finished chat-completion requests by HTTP status.
    requests: Mutex<BTreeMap<u16, u64>>,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    /// Requests waiting for a slot (queued, or admitted and waiting for KV memory).
    pub(super) waiting: AtomicUsize,
    /// Sequences being generated.
    pub(super) busy: AtomicUsize,
    /// Sequences the server generates together (`--parallel`; 0 until the model is loaded).
    pub(super) slots: AtomicUsize,
    latencies: Mutex<(Histogram, Histogram)>,
}

impl Metrics {
    pub(super) fn new() -> Self {
        Self {
            requests: Mutex::default(),
            prompt_tokens: AtomicU64::new(0),
            generation_tokens: AtomicU64::new(0),
            waiting: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            slots: AtomicUsize::new(0),
            latencies: Mutex::new((Histogram::new(&TTFT_BUCKETS), Histogram::new(&ITL_BUCKETS))),
        }
    }

    pub(super) fn request(&self, status: u16) {
        let mut r = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *r.entry(status).or_default() += 1;
    }

    pub(super) fn tokens(&self, prompt: u64, generated: u64) {
        self.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        self.generation_tokens
            .fetch_add(generated, Ordering::Relaxed);
    }

    pub(super) fn first_token(&self, seconds: f64) {
        self.latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .observe(seconds);
    }

    pub(super) fn between_tokens(&self, seconds: f64) {
        self.latencies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .observe(seconds);
    }

    /// The Prometheus text exposition of every metric.
    pub(super) fn render(&self, queued: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP qwenvl_requests_total Chat-completion requests answered, by HTTP status.\n# TYPE qwenvl_requests_total counter"
        );
        for (status, n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(out, "qwenvl_requests_total{{status=\"{status}\"}} {n}");
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "qwenvl_prompt_tokens_total",
            "Prompt tokens of finished requests.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "qwenvl_generation_tokens_total",
            "Tokens generated for finished requests.",
            self.generation_tokens.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "qwenvl_queue_depth",
            "Requests waiting for a slot.",
            queued + self.waiting.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "qwenvl_slots_busy",
            "Sequences being generated.",
            self.busy.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "qwenvl_slots_total",
            "Sequences generated together at most (--parallel).",
            self.slots.load(Ordering::Relaxed),
        );
        let l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        l.0.write(
            &mut out,
            "qwenvl_time_to_first_token_seconds",
            "From a request's arrival to its first generated token.",
        );
        l.1.write(
            &mut out,
            "qwenvl_inter_token_latency_seconds",
            "Between consecutive generated tokens of a request.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_counters_add_up() {
        let m = Metrics::new();
        m.slots.store(4, Ordering::Relaxed);
        m.request(200);
        m.request(200);
        m.request(400);
        m.tokens(10, 3);
        m.tokens(5, 2);
        m.first_token(0.07);
        m.first_token(3.0);
        m.between_tokens(0.002);
        let text = m.render(2);
        for line in [
            "qwenvl_requests_total{status=\"200\"} 2",
            "qwenvl_requests_total{status=\"400\"} 1",
            "qwenvl_prompt_tokens_total 15",
            "qwenvl_generation_tokens_total 5",
            "qwenvl_queue_depth 2",
            "qwenvl_slots_total 4",
            "qwenvl_time_to_first_token_seconds_bucket{le=\"0.05\"} 0",
            "qwenvl_time_to_first_token_seconds_bucket{le=\"0.1\"} 1",
            "qwenvl_time_to_first_token_seconds_bucket{le=\"5\"} 2",
            "qwenvl_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2",
            "qwenvl_time_to_first_token_seconds_count 2",
            "qwenvl_inter_token_latency_seconds_bucket{le=\"0.0025\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }
}

//! What a caller may ask of one reply (CLI flags, API fields, GUI sliders) and the one rule set
//! that turns it, over the checkpoint's `generation_config.json`, into the generator's options.
//!
//! The rules, the same for every front end:
//! - `temperature: 0` (or `greedy`) is greedy decoding, as OpenAI clients expect;
//! - otherwise decoding samples when a sampling setting (temperature, top-p, top-k) is given or
//!   the checkpoint's `do_sample` is set, and is greedy when neither;
//! - the repetition penalty (asked for, else the checkpoint's) applies in greedy decoding too, as
//!   the reference `generate` applies it;
//! - a value out of range is an [`OptionError`] that names the field and its range.

use lm::generate::{Decoding, GenerateOptions, SamplingParams};
use lm::GenerationConfig;

/// The highest temperature accepted (OpenAI's bound; past it the samples are noise).
pub const MAX_TEMPERATURE: f64 = 2.0;

/// A caller's generation settings; `None` keeps the checkpoint's default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerateRequest {
    /// Most new tokens (at least 1).
    pub max_new_tokens: Option<u64>,
    /// Argmax at every step, whatever the checkpoint's `do_sample` says.
    pub greedy: bool,
    /// In [0, 2]; 0 is greedy.
    pub temperature: Option<f64>,
    /// In (0, 1]; 1 switches top-p off.
    pub top_p: Option<f64>,
    /// 0 switches top-k off.
    pub top_k: Option<u64>,
    /// Finite and > 0; 1 switches the penalty off.
    pub repetition_penalty: Option<f64>,
    /// The sampler's seed.
    pub seed: Option<u64>,
    /// Keep going past the stop tokens until `max_new_tokens`.
    pub ignore_eos: bool,
}

/// A setting out of its range. `field` is the API's name for it (`top_p`); front ends that spell
/// it otherwise (`--top-p`) say so through [`OptionError::message_for_flags`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} must be {range}, got {value}")]
pub struct OptionError {
    pub field: &'static str,
    pub range: &'static str,
    pub value: String,
}

impl OptionError {
    /// The message with the field spelled as a command-line flag (`--top-p must be in (0, 1]`).
    pub fn message_for_flags(&self) -> String {
        format!(
            "--{} must be {}, got {}",
            self.field.replace('_', "-"),
            self.range,
            self.value
        )
    }
}

fn check(
    ok: bool,
    field: &'static str,
    range: &'static str,
    value: impl ToString,
) -> Result<(), OptionError> {
    if ok {
        Ok(())
    } else {
        Err(OptionError {
            field,
            range,
            value: value.to_string(),
        })
    }
}

impl GenerateRequest {
    /// Every value in range, or the first one that is not.
    pub fn validate(&self) -> Result<(), OptionError> {
        if let Some(n) = self.max_new_tokens {
            check(n >= 1, "max_new_tokens", "at least 1", n)?;
        }
        if let Some(t) = self.temperature {
            check(
                t.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&t),
                "temperature",
                "in [0, 2]",
                t,
            )?;
        }
        if let Some(p) = self.top_p {
            check(p > 0.0 && p <= 1.0, "top_p", "in (0, 1]", p)?;
        }
        if let Some(r) = self.repetition_penalty {
            check(
                r.is_finite() && r > 0.0,
                "repetition_penalty",
                "a finite number > 0",
                r,
            )?;
        }
        Ok(())
    }

    /// Whether these settings decode greedily over `g`.
    pub fn is_greedy(&self, g: &GenerationConfig) -> bool {
        let asks_sampling =
            self.temperature.is_some() || self.top_p.is_some() || self.top_k.is_some();
        self.greedy || self.temperature == Some(0.0) || !(g.do_sample || asks_sampling)
    }

    /// The generator's options over the checkpoint's defaults `g`. `default_seed` is the seed
    /// when none was asked for: fixed on the command line (reproducible runs), fresh per request
    /// in the server and the app (a new answer each time).
    pub fn resolve(
        &self,
        g: &GenerationConfig,
        default_seed: u64,
    ) -> Result<GenerateOptions, OptionError> {
        self.validate()?;
        let mut opts = GenerateOptions::from_generation_config(g);
        if let Some(n) = self.max_new_tokens {
            opts.max_new_tokens = usize::try_from(n).unwrap_or(usize::MAX);
        }
        if let Some(r) = self.repetition_penalty {
            opts.repetition_penalty = Some(r).filter(|r| *r != 1.0);
        }
        if self.ignore_eos {
            opts.stop_ids.clear();
        }
        opts.decoding = if self.is_greedy(g) {
            Decoding::Greedy
        } else {
            let mut p = SamplingParams::from_generation_config(g);
            if let Some(t) = self.temperature {
                p.temperature = t;
            }
            if let Some(top_p) = self.top_p {
                p.top_p = Some(top_p).filter(|p| *p < 1.0);
            }
            if let Some(k) = self.top_k {
                p.top_k = usize::try_from(k).ok().filter(|k| *k > 0);
            }
            p.seed = self.seed.unwrap_or(default_seed);
            Decoding::Sample(p)
        };
        Ok(opts)
    }
}

/// A seed that differs per call (time and a counter): for front ends where an unseeded request
/// should give a new answer.
pub fn fresh_seed() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling_checkpoint() -> GenerationConfig {
        GenerationConfig {
            do_sample: true,
            top_p: 0.3,
            top_k: 0,
            ..GenerationConfig::default()
        }
    }

    #[test]
    fn temperature_zero_is_greedy_whatever_the_seed() {
        let g = sampling_checkpoint();
        for seed in [1, 2] {
            let r = GenerateRequest {
                temperature: Some(0.0),
                seed: Some(seed),
                repetition_penalty: Some(1.1),
                ..Default::default()
            };
            let o = r.resolve(&g, 0).unwrap();
            assert_eq!(o.decoding, Decoding::Greedy);
            assert_eq!(
                o.repetition_penalty,
                Some(1.1),
                "the penalty stays in greedy"
            );
        }
        let greedy = GenerateRequest {
            greedy: true,
            repetition_penalty: Some(1.1),
            ..Default::default()
        };
        assert_eq!(greedy.resolve(&g, 0).unwrap().decoding, Decoding::Greedy);
    }

    #[test]
    fn the_checkpoint_decides_when_nothing_is_asked() {
        let g = sampling_checkpoint();
        let o = GenerateRequest::default().resolve(&g, 9).unwrap();
        match o.decoding {
            Decoding::Sample(p) => {
                assert_eq!((p.top_p, p.top_k, p.seed), (Some(0.3), None, 9));
            }
            Decoding::Greedy => panic!("do_sample checkpoint decoded greedily"),
        }
        let g = GenerationConfig {
            do_sample: false,
            ..g
        };
        let o = GenerateRequest {
            repetition_penalty: Some(1.2),
            ..Default::default()
        }
        .resolve(&g, 0)
        .unwrap();
        assert_eq!(
            o.decoding,
            Decoding::Greedy,
            "a penalty alone does not sample"
        );
        let o = GenerateRequest {
            temperature: Some(0.7),
            ..Default::default()
        }
        .resolve(&g, 0)
        .unwrap();
        assert!(matches!(o.decoding, Decoding::Sample(p) if p.temperature == 0.7));
    }

    #[test]
    fn out_of_range_values_name_the_field_and_range() {
        let g = sampling_checkpoint();
        let cases = [
            (
                GenerateRequest {
                    temperature: Some(-1.0),
                    ..Default::default()
                },
                "temperature must be in [0, 2], got -1",
            ),
            (
                GenerateRequest {
                    temperature: Some(f64::NAN),
                    ..Default::default()
                },
                "temperature must be in [0, 2], got NaN",
            ),
            (
                GenerateRequest {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                "top_p must be in (0, 1], got 0",
            ),
            (
                GenerateRequest {
                    repetition_penalty: Some(f64::INFINITY),
                    ..Default::default()
                },
                "repetition_penalty must be a finite number > 0, got inf",
            ),
            (
                GenerateRequest {
                    max_new_tokens: Some(0),
                    ..Default::default()
                },
                "max_new_tokens must be at least 1, got 0",
            ),
        ];
        for (r, want) in cases {
            let e = r.resolve(&g, 0).unwrap_err();
            assert_eq!(e.to_string(), want);
        }
        let e = GenerateRequest {
            top_p: Some(2.0),
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.message_for_flags(), "--top-p must be in (0, 1], got 2");
    }

    #[test]
    fn off_values_switch_settings_off() {
        let g = sampling_checkpoint();
        let o = GenerateRequest {
            top_p: Some(1.0),
            top_k: Some(0),
            repetition_penalty: Some(1.0),
            ignore_eos: true,
            ..Default::default()
        }
        .resolve(&g, 0)
        .unwrap();
        assert!(
            matches!(o.decoding, Decoding::Sample(p) if p.top_p.is_none() && p.top_k.is_none())
        );
        assert_eq!(o.repetition_penalty, None);
        assert!(o.stop_ids.is_empty());
    }
}

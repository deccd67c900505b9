//! `--streams`: decode speed with several sequences batched together, as `serve --parallel`
//! runs them.

use std::time::Instant;

use anyhow::Result;

/// Decode speed of several sequences decoded together.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StreamsRow {
    pub streams: usize,
    pub steps: usize,
    /// Tokens per second of all streams together.
    pub aggregate_tokens_per_s: f64,
    pub per_stream_tokens_per_s: f64,
}

/// Decode speed of `streams` sequences decoded together, by the batched step the server's batch
/// runs ([`QwenLm::forward_batch`]): each stream continues its own copy of the prefilled cache
/// from its own token; `steps` steps are timed.
pub(super) fn measure_streams(
    lm: &lm::model::QwenLm,
    prefilled: &lm::model::KvCache,
    first: u32,
    streams: usize,
    steps: usize,
) -> Result<StreamsRow> {
    eprintln!("decode {steps} steps of {streams} streams together ...");
    let streams = streams.max(1);
    let mut caches: Vec<lm::model::KvCache> = (0..streams).map(|_| prefilled.clone()).collect();
    let vocab = lm.config().vocab_size as u32;
    let mut next: Vec<u32> = (0..streams as u32)
        .map(|i| (first + i * 7919) % vocab)
        .collect();
    let mut elapsed = 0.0;
    for _ in 0..steps {
        let t = Instant::now();
        let mut batch = caches
            .iter_mut()
            .zip(&next)
            .map(|(cache, &id)| {
                Ok(lm::model::BatchStep {
                    embeds: lm.embed(&[id], &[])?,
                    cache,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let logits = lm.forward_batch(&mut batch)?.to_vec2::<f32>()?;
        next = logits.iter().map(|l| lm::generate::argmax(l)).collect();
        elapsed += t.elapsed().as_secs_f64();
    }
    let per_stream = steps as f64 / elapsed;
    Ok(StreamsRow {
        streams,
        steps,
        aggregate_tokens_per_s: per_stream * streams as f64,
        per_stream_tokens_per_s: per_stream,
    })
}

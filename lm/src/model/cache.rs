//! The key/value cache: per-layer buffers grown in steps and written in place.

use candle_core::{DType, Result, Tensor};

/// Key/value cache of every layer plus the NTK alpha frozen at prefill.
///
/// Each layer's keys and values live in buffers with room to spare ([`KV_STEP`] positions at a
/// time) that new positions are written into in place; attention reads views of the filled part.
/// (Concatenating and re-transposing the whole cache on every decoded token was 30% of decode.)
#[derive(Debug, Default)]
pub struct KvCache {
    pub(super) layers: Vec<Option<LayerKv>>,
    pub(super) ntk_alpha: Option<f64>,
}

/// Positions a layer's key/value buffers grow by.
pub(super) const KV_STEP: usize = 128;

/// Keys and values `[batch, heads, capacity, head_dim]` of one layer, `len` positions filled.
#[derive(Debug)]
pub(super) struct LayerKv {
    pub(super) k: Tensor,
    pub(super) v: Tensor,
    pub(super) len: usize,
}

impl LayerKv {
    /// Writes `k`, `v` (`[batch, heads, t, head_dim]`) as `dtype` after the filled positions of
    /// `slot`, growing its buffers if needed, and returns views of all filled positions.
    pub(super) fn append(
        slot: &mut Option<LayerKv>,
        k: &Tensor,
        v: &Tensor,
        dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        let (k, v) = (&k.to_dtype(dtype)?, &v.to_dtype(dtype)?);
        let (b, h, t, d) = k.dims4()?;
        let len = slot.as_ref().map_or(0, |l| l.len);
        let cap = match slot {
            Some(l) => l.k.dim(2)?,
            None => 0,
        };
        if len + t > cap {
            let new_cap = (len + t).next_multiple_of(KV_STEP);
            let nk = Tensor::zeros((b, h, new_cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, h, new_cap, d), v.dtype(), v.device())?;
            if let Some(l) = slot.as_ref().filter(|l| l.len > 0) {
                nk.slice_set(&l.k.narrow(2, 0, l.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&l.v.narrow(2, 0, l.len)?.contiguous()?, 2, 0)?;
            }
            *slot = Some(LayerKv { k: nk, v: nv, len });
        }
        let l = slot
            .as_mut()
            .ok_or_else(|| candle_core::Error::Msg("kv cache slot missing".into()))?;
        l.k.slice_set(&k.contiguous()?, 2, len)?;
        l.v.slice_set(&v.contiguous()?, 2, len)?;
        l.len = len + t;
        Ok((l.k.narrow(2, 0, l.len)?, l.v.narrow(2, 0, l.len)?))
    }
}

impl Clone for KvCache {
    /// A deep copy: the buffers are written in place, so clones must not share them.
    fn clone(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref().and_then(|l| {
                    Some(LayerKv {
                        k: l.k.copy().ok()?,
                        v: l.v.copy().ok()?,
                        len: l.len,
                    })
                })
            })
            .collect();
        Self {
            layers,
            ntk_alpha: self.ntk_alpha,
        }
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| None).collect(),
            ntk_alpha: None,
        }
    }

    /// Number of positions already in the cache.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some(l)) => l.len,
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The NTK alpha chosen at prefill (frozen during decoding, as the reference does).
    pub fn ntk_alpha(&self) -> Option<f64> {
        self.ntk_alpha
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
        self.ntk_alpha = None;
    }

    /// Drops every position from `len` on (keeps a shared prefix for reuse).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len() {
            return Ok(());
        }
        if len == 0 {
            self.clear();
            return Ok(());
        }
        for l in self.layers.iter_mut().flatten() {
            l.len = l.len.min(len);
        }
        Ok(())
    }
}

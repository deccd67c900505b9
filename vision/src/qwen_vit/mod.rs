//! Qwen-VL's vision tower (upstream `visual.py`, `VisionTransformer`): a 14x14 patch embedding,
//! an absolute position table bicubically resized to the patch grid, `ln_pre`, pre-norm ViT
//! blocks, the cross-attention resampler that pools the patches into 256 vectors of the LM's
//! width, `ln_post` and a final `x @ proj`.
//!
//! - Config: the `visual` object of the checkpoint's `config.json`.
//! - Weights: the checkpoint's own names under `transformer.visual` (the `VarBuilder` given to
//!   [`VisualEncoder::new`] must be rooted there).
//!
//! Everything runs in the `VarBuilder`'s dtype except LayerNorm and softmax (always `f32`) and
//! the one-time position-table interpolation (`f32`, as upstream).

mod pos;
mod resampler;
mod vit;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

pub use pos::resize_square_table;
pub use resampler::{MultiheadAttention, Resampler, RESAMPLER_HEAD_DIM};
pub use vit::{
    dense_linear, Layer, LayerNorm, LinearBuilder, Mlp, ResidualAttentionBlock, VisualAttention,
    LN_EPS,
};

/// Rows of the stored ViT position table (a 16x16 grid, fixed upstream).
pub const VIT_POS_ROWS: usize = 256;

/// The `visual` section of a Qwen-VL `config.json`.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct Config {
    /// Attention heads of the ViT blocks.
    pub heads: usize,
    /// Side of the square input picture (448).
    pub image_size: usize,
    /// Token id of `<img>` (used by the prompt side, carried here for completeness).
    pub image_start_id: u32,
    /// Number of ViT blocks.
    pub layers: usize,
    /// MLP width = `int(width * mlp_ratio)`.
    pub mlp_ratio: f64,
    /// Resampler / output width (the LM's hidden size).
    pub output_dim: usize,
    /// Side of a square patch (14).
    pub patch_size: usize,
    /// ViT width.
    pub width: usize,
    /// Resampler queries: visual features per image. Qwen-VL's `config.json` leaves it out (the
    /// upstream code fixes it at 256), so that is the default.
    #[serde(default = "default_n_queries")]
    pub n_queries: usize,
}

/// Upstream's `n_queries` (`VisionTransformer(n_queries=256)`).
fn default_n_queries() -> usize {
    256
}

impl Config {
    /// Patches per side: `image_size / patch_size`.
    pub fn grid_size(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Hidden width of the ViT MLP, `int(width * mlp_ratio)` as upstream computes it.
    pub fn mlp_width(&self) -> usize {
        (self.width as f64 * self.mlp_ratio) as usize
    }

    /// Width of one ViT head.
    pub fn head_dim(&self) -> usize {
        self.width / self.heads.max(1)
    }

    /// Heads of the resampler attention (`output_dim / 128`).
    pub fn resampler_heads(&self) -> usize {
        self.output_dim / RESAMPLER_HEAD_DIM
    }

    /// Checks the relations the model relies on.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let c = self;
        if c.patch_size == 0 || c.image_size < c.patch_size {
            return Err(format!(
                "image_size {} must be at least patch_size {} (> 0)",
                c.image_size, c.patch_size
            ));
        }
        if c.heads == 0 || !c.width.is_multiple_of(c.heads) {
            return Err(format!(
                "width {} is not divisible by heads {}",
                c.width, c.heads
            ));
        }
        if c.output_dim < RESAMPLER_HEAD_DIM || !c.output_dim.is_multiple_of(RESAMPLER_HEAD_DIM) {
            return Err(format!(
                "output_dim {} must be a positive multiple of {RESAMPLER_HEAD_DIM}",
                c.output_dim
            ));
        }
        if !(c.mlp_ratio.is_finite() && c.mlp_ratio > 0.0) || c.mlp_width() == 0 {
            return Err(format!("invalid mlp_ratio {}", c.mlp_ratio));
        }
        // The queries' position table is a square grid, resized like the ViT's.
        let side = (c.n_queries as f64).sqrt().round() as usize;
        if c.n_queries == 0 || side * side != c.n_queries {
            return Err(format!(
                "n_queries {} must be a positive square number",
                c.n_queries
            ));
        }
        Ok(())
    }
}

/// Named intermediate tensors of one forward pass, in pipeline order.
///
/// Per-token stages keep the batch dimension (`[B, N, C]`): `conv1_out`, `ln_pre_out`,
/// `resblock_<i>_out`, `attn_pool_out`, `ln_post_out`, `final`. Position tables are shared by the
/// batch and have no batch dimension (`[N, C]`): `vit_pos_interp`, `resampler_pos_embed`,
/// `resampler_key_pos_interp`. Names match `visual_debug.safetensors` of the golden fixtures.
#[derive(Debug, Clone, Default)]
pub struct VisualDebug {
    pub stages: Vec<(String, Tensor)>,
}

impl VisualDebug {
    /// The stage called `name`, if recorded.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.stages.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

/// A batch of pictures part-way through the encoder ([`VisualEncoder::begin`]).
#[derive(Debug, Clone)]
pub struct Encoding {
    /// Hidden states `[B, grid², width]` after `next_block` blocks.
    xs: Tensor,
    grid: usize,
    next_block: usize,
}

impl Encoding {
    /// Transformer blocks run so far.
    pub fn blocks_done(&self) -> usize {
        self.next_block
    }
}

/// The Qwen-VL vision encoder: pixels `[B, 3, S, S]` → image features `[B, 256, output_dim]`.
#[derive(Debug, Clone)]
pub struct VisualEncoder {
    /// `conv1.weight` flattened to `[width, 3 * patch * patch]` for the im2col matmul.
    patch_embed: Tensor,
    positional_embedding: Tensor,
    /// `positional_embedding` resized to the configured patch grid.
    vit_pos: Tensor,
    ln_pre: LayerNorm,
    blocks: Vec<ResidualAttentionBlock>,
    attn_pool: Resampler,
    /// `attn_pool.pos_embed` resized to the configured patch grid.
    key_pos: Tensor,
    ln_post: LayerNorm,
    proj: Tensor,
    cfg: Config,
    dtype: DType,
}

impl VisualEncoder {
    /// Builds the encoder from weights under `transformer.visual` (`vb` rooted there), with dense
    /// linear layers in the VarBuilder's dtype.
    pub fn new(cfg: &Config, vb: VarBuilder) -> crate::Result<Self> {
        Self::new_with_linear(cfg, vb, &vit::dense_linear)
    }

    /// Like [`new`](Self::new), with the blocks' linear layers (where nearly all parameters are)
    /// built by `linear` (e.g. quantized).
    pub fn new_with_linear(
        cfg: &Config,
        vb: VarBuilder,
        linear: vit::LinearBuilder,
    ) -> crate::Result<Self> {
        cfg.validate().map_err(crate::Error::Config)?;
        let (w, p, e) = (cfg.width, cfg.patch_size, cfg.output_dim);
        let grid = cfg.grid_size();
        let patch_embed = vb
            .get((w, 3, p, p), "conv1.weight")?
            .reshape((w, 3 * p * p))?;
        let positional_embedding = vb.get((VIT_POS_ROWS, w), "positional_embedding")?;
        let vit_pos = resize_square_table(&positional_embedding, grid)?;
        let ln_pre = LayerNorm::new(w, LN_EPS, vb.pp("ln_pre"))?;
        let vb_blocks = vb.pp("transformer").pp("resblocks");
        let blocks = (0..cfg.layers)
            .map(|i| {
                ResidualAttentionBlock::new(w, cfg.heads, cfg.mlp_width(), vb_blocks.pp(i), linear)
            })
            .collect::<Result<Vec<_>>>()?;
        let attn_pool = Resampler::new(cfg.n_queries, e, w, vb.pp("attn_pool"), linear)?;
        let key_pos = resize_square_table(attn_pool.pos_embed(), grid)?;
        let ln_post = LayerNorm::new(e, LN_EPS, vb.pp("ln_post"))?;
        let proj = vb.get((e, e), "proj")?;
        Ok(Self {
            patch_embed,
            positional_embedding,
            vit_pos,
            ln_pre,
            blocks,
            attn_pool,
            key_pos,
            ln_post,
            proj,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// Computes the ViT blocks' self-attention on the CPU with bf16 products
    /// (see [`kernels::vit_attention`]). Meant for quantized towers, whose int8 activations are coarser
    /// already; f32 towers keep exact f32 attention unless this is called.
    pub fn with_bf16_attention(mut self, on: bool) -> Self {
        for b in &mut self.blocks {
            b.set_bf16_attention(on);
        }
        self
    }

    /// The configuration the encoder was built with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The dtype of the weights and of the computation.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Encodes a batch of preprocessed pictures `[B, 3, S, S]` (any float dtype; cast to the
    /// weights' dtype) into `[B, 256, output_dim]`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        self.run(pixels, &mut |_, _| {})
    }

    /// Like [`forward`](Self::forward), also returning every named intermediate stage.
    pub fn forward_debug(&self, pixels: &Tensor) -> Result<(Tensor, VisualDebug)> {
        let mut debug = VisualDebug::default();
        let out = self.run(pixels, &mut |name, t| {
            debug.stages.push((name.to_string(), t.clone()))
        })?;
        Ok((out, debug))
    }

    /// Starts encoding a batch of pictures `[B, 3, S, S]`: patch embedding, positions and
    /// `ln_pre`. [`advance`](Self::advance) then runs the transformer blocks a few at a time and
    /// [`finish`](Self::finish) the resampler, so a caller can interleave other work (a server
    /// keeps its streams decoding while a new picture is encoded). The result equals
    /// [`forward`](Self::forward)'s.
    pub fn begin(&self, pixels: &Tensor) -> Result<Encoding> {
        self.stem(pixels, &mut |_, _| {})
    }

    /// Runs up to `blocks` more transformer blocks of `enc`; returns whether all have run.
    pub fn advance(&self, enc: &mut Encoding, blocks: usize) -> Result<bool> {
        let end = enc.next_block.saturating_add(blocks).min(self.blocks.len());
        for block in &self.blocks[enc.next_block..end] {
            enc.xs = block.forward(&enc.xs)?;
        }
        enc.next_block = end;
        Ok(end == self.blocks.len())
    }

    /// The features `[B, 256, output_dim]` of an encoding that went through every block.
    pub fn finish(&self, mut enc: Encoding) -> Result<Tensor> {
        self.advance(&mut enc, usize::MAX)?;
        self.head(&enc.xs, enc.grid, &mut |_, _| {})
    }

    /// The forward pass; `tap` sees every named stage (see [`VisualDebug`]).
    fn run(&self, pixels: &Tensor, tap: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let mut enc = self.stem(pixels, tap)?;
        for (i, block) in self.blocks.iter().enumerate() {
            enc.xs = block.forward(&enc.xs)?;
            tap(&format!("resblock_{i}_out"), &enc.xs);
        }
        self.head(&enc.xs, enc.grid, tap)
    }

    /// Patch embedding, interpolated positions and `ln_pre`.
    fn stem(&self, pixels: &Tensor, tap: &mut dyn FnMut(&str, &Tensor)) -> Result<Encoding> {
        let (_, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        if c != 3 || h != w || h < p {
            candle_core::bail!(
                "vision encoder expects pixels [B, 3, S, S] with S >= {p}, got {:?}",
                pixels.dims()
            );
        }
        let grid = h / p;
        let xs = self.patchify(&pixels.to_dtype(self.dtype)?, grid)?;
        tap("conv1_out", &xs);

        let vit_pos = self.table_for_grid(&self.vit_pos, &self.positional_embedding, grid)?;
        tap("vit_pos_interp", &vit_pos);
        let xs = self.ln_pre.forward(&xs.broadcast_add(&vit_pos)?)?;
        tap("ln_pre_out", &xs);
        Ok(Encoding {
            xs,
            grid,
            next_block: 0,
        })
    }

    /// The resampler, `ln_post` and the projection after the blocks.
    fn head(&self, xs: &Tensor, grid: usize, tap: &mut dyn FnMut(&str, &Tensor)) -> Result<Tensor> {
        let pos_embed = self.attn_pool.pos_embed();
        tap("resampler_pos_embed", pos_embed);
        let key_pos = self.table_for_grid(&self.key_pos, pos_embed, grid)?;
        tap("resampler_key_pos_interp", &key_pos);
        let xs = self.attn_pool.forward(xs, &key_pos)?;
        tap("attn_pool_out", &xs);
        let xs = self.ln_post.forward(&xs)?;
        tap("ln_post_out", &xs);

        let (b, n, e) = xs.dims3()?;
        let xs = xs
            .reshape((b * n, e))?
            .matmul(&self.proj)?
            .reshape((b, n, e))?;
        tap("final", &xs);
        Ok(xs)
    }

    /// `conv1` (kernel = stride = patch, no bias) as im2col + one matmul:
    /// `[B, 3, S, S]` → `[B, grid², width]`, patches in row-major order.
    fn patchify(&self, pixels: &Tensor, grid: usize) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let p = self.cfg.patch_size;
        let side = grid * p;
        // A picture whose side is not a multiple of the patch loses the remainder, like a conv.
        let pixels = pixels.narrow(2, 0, side)?.narrow(3, 0, side)?;
        let cols = pixels
            .reshape((b, 3, grid, p, grid, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * grid * grid, 3 * p * p))?;
        cols.matmul(&self.patch_embed.t()?)?
            .reshape((b, grid * grid, self.cfg.width))
    }

    /// The precomputed table when the grid is the configured one, else a fresh resize.
    fn table_for_grid(&self, cached: &Tensor, stored: &Tensor, grid: usize) -> Result<Tensor> {
        if cached.dim(0)? == grid * grid {
            Ok(cached.clone())
        } else {
            resize_square_table(stored, grid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn tiny_config() -> Config {
        serde_json::from_str(
            r#"{"heads": 2, "image_size": 56, "image_start_id": 151857, "layers": 1,
                "mlp_ratio": 2.0, "output_dim": 128, "patch_size": 14, "width": 32}"#,
        )
        .unwrap()
    }

    #[test]
    fn config_derived_sizes_and_validation() {
        let cfg = tiny_config();
        assert_eq!(
            (cfg.grid_size(), cfg.mlp_width(), cfg.head_dim()),
            (4, 64, 16)
        );
        assert_eq!(cfg.resampler_heads(), 1);
        // Upstream's int(1664 * 4.9231) for the real model.
        let real = Config {
            width: 1664,
            mlp_ratio: 4.9231,
            ..cfg.clone()
        };
        assert_eq!(real.mlp_width(), 8192);
        assert!(cfg.validate().is_ok());
        assert!(Config {
            heads: 3,
            ..cfg.clone()
        }
        .validate()
        .is_err());
        assert!(Config {
            output_dim: 100,
            ..cfg.clone()
        }
        .validate()
        .is_err());
        assert!(Config {
            patch_size: 0,
            ..cfg.clone()
        }
        .validate()
        .is_err());
        assert_eq!(
            cfg.n_queries, 256,
            "absent from config.json: upstream's 256"
        );
        assert!(Config {
            n_queries: 255,
            ..cfg.clone()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn runs_on_random_weights_for_any_grid_and_batch() -> Result<()> {
        let cfg = tiny_config();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let enc = VisualEncoder::new(&cfg, vb).map_err(candle_core::Error::wrap)?;
        let px = Tensor::randn(0f32, 1.0, (3, 3, 56, 56), &Device::Cpu)?;
        let batch = enc.forward(&px)?;
        assert_eq!(batch.dims(), &[3, cfg.n_queries, 128]);
        let one = enc.forward(&px.narrow(0, 1, 1)?)?;
        let d = (batch.narrow(0, 1, 1)? - one)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        // Another grid than the configured one resizes the tables on the fly.
        let (out, debug) = enc.forward_debug(&px.narrow(2, 0, 28)?.narrow(3, 0, 28)?)?;
        assert_eq!(out.dims(), &[3, cfg.n_queries, 128]);
        assert_eq!(
            debug.get("vit_pos_interp").map(|t| t.dims().to_vec()),
            Some(vec![4, 32])
        );
        // Non-square or wrongly shaped input is an error, not a panic.
        assert!(enc.forward(&px.narrow(3, 0, 28)?).is_err());
        assert!(enc.forward(&px.narrow(1, 0, 2)?).is_err());
        Ok(())
    }
}

//! How linear weights are held in memory: dense (f32/f16/bf16) or quantized (candle's GGML block
//! formats), chosen at load time. A quantized weight is read from the mapped checkpoint as f32 and
//! quantized at once, so the full-precision model never sits in memory.

/// The tiled CPU weights and their kernels live in the `kernels` crate.
pub use kernels::dense16;
pub use kernels::quant as cpu;
pub use kernels::CpuMatmul;

pub mod gptq;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use cpu::CpuQWeight;

use crate::checkpoint::ReadCounter;

/// In-memory type of the linear weights (`--quant` / `--dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4K,
}

impl WeightType {
    pub const ALL: [WeightType; 6] = [
        WeightType::F32,
        WeightType::F16,
        WeightType::BF16,
        WeightType::Q8_0,
        WeightType::Q4_0,
        WeightType::Q4K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WeightType::F32 => "f32",
            WeightType::F16 => "f16",
            WeightType::BF16 => "bf16",
            WeightType::Q8_0 => "q8_0",
            WeightType::Q4_0 => "q4_0",
            WeightType::Q4K => "q4k",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.name() == s)
    }

    pub fn is_quantized(self) -> bool {
        matches!(self, WeightType::Q8_0 | WeightType::Q4_0 | WeightType::Q4K)
    }

    /// bf16 or f16: dense 16-bit weights.
    pub fn is_half(self) -> bool {
        matches!(self, WeightType::F16 | WeightType::BF16)
    }

    /// Whether the weights are held compactly on a CPU (quantized, or 16-bit in
    /// [`dense16`] tiles) behind f32 activations.
    pub fn compact_on_cpu(self) -> bool {
        self != WeightType::F32
    }

    /// The dtype activations are computed in on `device`: f32 for quantized weights, and on the
    /// CPU for 16-bit ones too (candle's CPU backend has no 16-bit GEMM: [`dense16`] widens each
    /// weight in registers instead); the 16-bit type itself on GPUs.
    pub fn compute_dtype(self, device: &Device) -> DType {
        match self {
            WeightType::F16 if !device.is_cpu() => DType::F16,
            WeightType::BF16 if !device.is_cpu() => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The GGML block type of a quantized weight type.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            WeightType::Q8_0 => Some(GgmlDType::Q8_0),
            WeightType::Q4_0 => Some(GgmlDType::Q4_0),
            WeightType::Q4K => Some(GgmlDType::Q4K),
            _ => None,
        }
    }

    /// Row length a quantized weight with `in_dim` inputs is stored with: rounded up to whole blocks
    /// (see [`QUANT_ROW_ALIGN`]; zero columns, and the input gets matching zeros), dense weights as
    /// they are.
    pub fn stored_in_dim(self, in_dim: usize) -> usize {
        if self.is_quantized() {
            in_dim.next_multiple_of(match self {
                // k-quants group 256 values; block-32 types need only whole blocks.
                WeightType::Q4K => QUANT_ROW_ALIGN,
                _ => 32,
            })
        } else {
            in_dim
        }
    }

    /// Bytes of an `[out_dim, in_dim]` weight in this type.
    pub fn weight_bytes(self, in_dim: usize, out_dim: usize) -> u64 {
        let k = self.stored_in_dim(in_dim);
        match self.ggml() {
            Some(g) => (k / g.block_size() * g.type_size() * out_dim) as u64,
            None => (k * out_dim * if self.is_half() { 2 } else { 4 }) as u64,
        }
    }
}

/// q4k rows are padded to a multiple of 256 (k-quants group 256 values), so the vision tower's
/// width 1664 is stored as 1792; block-32 types are padded to whole blocks only (our q8_0 tiles
/// need nothing more, and 1664 is already a multiple of 32).
pub const QUANT_ROW_ALIGN: usize = 256;

/// Saved by name (`"q4k"`), as `--quant` takes it.
impl serde::Serialize for WeightType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for WeightType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        WeightType::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown weight type {name:?}")))
    }
}

impl std::fmt::Display for WeightType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Quantizes a `[rows, cols]` weight with every core into GGML block bytes: rows are independent
/// blocks, so chunks of rows are quantized in parallel and their bytes concatenated. Chunks are
/// small (≤ 64 MB in f32), so a 2.5 GB embedding-sized table never exists twice in f32.
/// (candle's `QTensor::quantize` is single-threaded; this is what makes a 9.6 B-parameter load
/// take seconds per gigabyte rather than minutes.)
pub fn quantize_rows_bytes(w: &Tensor, dtype: GgmlDType) -> Result<Vec<u8>> {
    quantize_rows_chunked(w, dtype, 16 << 20)
}

/// [`quantize_rows_bytes`] with chunks of at most `chunk_elems` values (at least one row).
fn quantize_rows_chunked(w: &Tensor, dtype: GgmlDType, chunk_elems: usize) -> Result<Vec<u8>> {
    use rayon::prelude::*;
    let (rows, cols) = w.dims2()?;
    if !w.device().is_cpu() || rows == 0 {
        return Ok(QTensor::quantize(w, dtype)?.data()?.into_owned());
    }
    let chunk = (chunk_elems / cols.max(1)).clamp(1, rows);
    let parts: Vec<Result<Vec<u8>>> = (0..rows)
        .into_par_iter()
        .step_by(chunk)
        .map(|r0| {
            let n = chunk.min(rows - r0);
            // candle quantizes a tensor's whole storage, ignoring a view's offset, so each
            // chunk gets storage of its own.
            let part: Vec<f32> = w
                .narrow(0, r0, n)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let part = Tensor::from_vec(part, (n, cols), w.device())?;
            Ok(QTensor::quantize(&part, dtype)?.data()?.into_owned())
        })
        .collect();
    let mut bytes = Vec::with_capacity(rows * cols / dtype.block_size() * dtype.type_size());
    for p in parts {
        bytes.extend_from_slice(&p?);
    }
    Ok(bytes)
}

/// GGML type ids as GGUF stores them.
fn ggml_type_id(g: GgmlDType) -> u32 {
    match g {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

/// A weight quantized during this load, kept (shared, not copied) until the cache is written.
#[derive(Debug)]
enum Fresh {
    Cpu(Arc<CpuQWeight>),
    Candle(Arc<QTensor>),
}

impl Fresh {
    /// GGUF dims (innermost first), type and byte length, without touching the data.
    fn header(&self) -> (Vec<u64>, GgmlDType, usize) {
        let (dims, dtype): (Vec<usize>, GgmlDType) = match self {
            Fresh::Cpu(w) => {
                let (n, k) = w.dims();
                (vec![k, n], ggml_dtype(w.format()))
            }
            Fresh::Candle(t) => (t.shape().dims().iter().rev().copied().collect(), t.dtype()),
        };
        let len = dims.iter().product::<usize>() / dtype.block_size() * dtype.type_size();
        (dims.into_iter().map(|d| d as u64).collect(), dtype, len)
    }

    /// The GGML blocks (converted back from the tiles for CPU weights).
    fn data(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        Ok(match self {
            Fresh::Cpu(w) => std::borrow::Cow::Owned(w.to_ggml()),
            Fresh::Candle(t) => t.data()?,
        })
    }
}

/// Quantized weights of one checkpoint and weight type on disk (GGUF), so the second start reads
/// finished blocks instead of quantizing 9.6 B parameters again.
///
/// On a miss the loader quantizes as usual and [`QuantCache::save`] writes every quantized weight
/// at the end (temp file + rename: a crash never leaves a half cache behind). Biases, norms and
/// the embedding table still come from the checkpoint.
#[derive(Debug)]
pub struct QuantCache {
    path: PathBuf,
    hit: Option<(gguf_file::Content, Mutex<std::fs::File>)>,
    fresh: Mutex<Vec<(String, Fresh)>>,
}

impl QuantCache {
    /// Opens `path` if it exists and parses (a damaged cache file is ignored and rewritten).
    pub fn open(path: &Path) -> Self {
        let hit = std::fs::File::open(path).ok().and_then(|mut f| {
            let content = gguf_file::Content::read(&mut f).ok()?;
            Some((content, Mutex::new(f)))
        });
        Self {
            path: path.to_path_buf(),
            hit,
            fresh: Mutex::new(Vec::new()),
        }
    }

    /// Whether the weights come from the cache file.
    pub fn is_hit(&self) -> bool {
        self.hit.is_some()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The blocks of `name` if the cache holds it as `dtype` with GGML dims `(out, in)`.
    fn get_bytes(&self, name: &str, dtype: GgmlDType, (n, k): (usize, usize)) -> Option<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let (content, file) = self.hit.as_ref()?;
        let info = content.tensor_infos.get(name)?;
        if info.ggml_dtype != dtype || info.shape.dims() != [n, k] {
            return None;
        }
        let len = n * k / dtype.block_size() * dtype.type_size();
        let mut bytes = vec![0u8; len];
        let mut f = file.lock().ok()?;
        f.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
            .ok()?;
        f.read_exact(&mut bytes).ok()?;
        Some(bytes)
    }

    /// Keeps `t` for [`Self::save`]; a cache that was hit writes nothing, so it keeps nothing.
    fn remember(&self, name: &str, t: Fresh) {
        if self.hit.is_none() {
            if let Ok(mut fresh) = self.fresh.lock() {
                fresh.push((name.to_string(), t));
            }
        }
    }

    /// Writes what was quantized during this load (nothing on a hit), streaming each weight's
    /// blocks from where they already are in memory.
    pub fn save(&self) -> Result<()> {
        let fresh = self
            .fresh
            .lock()
            .map_err(|_| candle_core::Error::Msg("quant cache poisoned".into()))?;
        if self.hit.is_some() || fresh.is_empty() {
            return Ok(());
        }
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.path.with_extension("gguf.partial");
        {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
            write_gguf(&mut f, env!("CARGO_PKG_VERSION"), &fresh)?;
            use std::io::Write;
            f.flush()?;
            f.get_ref().sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        Ok(())
    }
}

/// GGUF v2 in the layout candle's `gguf_file::write` produces (and reads), one metadata string.
fn write_gguf<W: std::io::Write>(
    w: &mut W,
    version: &str,
    tensors: &[(String, Fresh)],
) -> Result<()> {
    fn string<W: std::io::Write>(w: &mut W, s: &str) -> std::io::Result<()> {
        w.write_all(&(s.len() as u64).to_le_bytes())?;
        w.write_all(s.as_bytes())
    }
    const ALIGN: usize = 32;
    let mut head = Vec::new();
    head.extend_from_slice(&0x4655_4747u32.to_le_bytes());
    head.extend_from_slice(&2u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&1u64.to_le_bytes());
    string(&mut head, "qwenvl.version")?;
    head.extend_from_slice(&8u32.to_le_bytes()); // string
    string(&mut head, version)?;
    let mut offset = 0usize;
    for (name, t) in tensors {
        let (dims, dtype, len) = t.header();
        string(&mut head, name)?;
        head.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in &dims {
            head.extend_from_slice(&d.to_le_bytes());
        }
        head.extend_from_slice(&ggml_type_id(dtype).to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += len.next_multiple_of(ALIGN);
    }
    let pad = head.len().next_multiple_of(ALIGN) - head.len();
    head.resize(head.len() + pad, 0);
    w.write_all(&head)?;
    for (_, t) in tensors {
        let data = t.data()?;
        w.write_all(&data)?;
        let pad = data.len().next_multiple_of(ALIGN) - data.len();
        w.write_all(&vec![0u8; pad])?;
    }
    Ok(())
}

/// How linear layers are built: the weight type, and the on-disk cache of quantized weights.
#[derive(Debug, Clone)]
pub struct Quantizer {
    pub weight_type: WeightType,
    pub cache: Option<Arc<QuantCache>>,
    /// Load progress for the weights taken from `cache` (and the mapped embedding table), which
    /// the `VarBuilder` never reads and so never counts.
    pub progress: Option<ReadCounter>,
}

impl Quantizer {
    /// Counts the checkpoint tensor `name` as read (see [`Quantizer::progress`]).
    pub fn count_read(&self, name: &str) {
        if let Some(p) = &self.progress {
            p.count(name);
        }
    }
}

impl From<WeightType> for Quantizer {
    fn from(weight_type: WeightType) -> Self {
        Self {
            weight_type,
            cache: None,
            progress: None,
        }
    }
}

/// Names of the files of a quantized-model cache: one per checkpoint identity and weight type.
/// `v2`: block-32 types stopped padding rows to 256, so older files would never match.
pub fn cache_file_name(checkpoint_identity: &str, wt: WeightType) -> String {
    // v3: the vision resampler's projections are quantized (and cached) too.
    format!("{checkpoint_identity}-{wt}-v3.gguf")
}

/// GGML blocks of `vb`'s `weight` (`[out, in]`, rows padded by `pad` zero columns) as type `g`:
/// read from the quantized-model cache when it holds them, else quantized from the checkpoint.
fn quantized_weight_bytes(
    vb: &VarBuilder,
    q: &Quantizer,
    g: GgmlDType,
    (out_dim, in_dim): (usize, usize),
    pad: usize,
) -> Result<Vec<u8>> {
    let name = format!("{}.weight", vb.prefix());
    let stored = (out_dim, in_dim + pad);
    if let Some(b) = q.cache.as_ref().and_then(|c| c.get_bytes(&name, g, stored)) {
        q.count_read(&name);
        return Ok(b);
    }
    let w = linear_weight(vb, (out_dim, in_dim))?;
    let w = if pad > 0 {
        w.pad_with_zeros(1, 0, pad)?
    } else {
        w
    };
    quantize_rows_bytes(&w, g)
}

/// A linear layer's dense `[out, in]` weight: the checkpoint's `weight`, or its GPTQ-packed
/// `qweight`/`qzeros`/`scales`/`g_idx` dequantised ([`gptq`]).
fn linear_weight(vb: &VarBuilder, (out_dim, in_dim): (usize, usize)) -> Result<Tensor> {
    if gptq::is_packed(vb) {
        return gptq::dequantize(vb, (out_dim, in_dim));
    }
    vb.get((out_dim, in_dim), "weight")
}

fn cpu_weight(
    name: &str,
    f: cpu::Format,
    (n, k): (usize, usize),
    bytes: &[u8],
) -> Result<Arc<CpuQWeight>> {
    CpuQWeight::from_ggml(f, n, k, bytes)
        .map(Arc::new)
        .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))
}

/// A `[rows, cols]` table whose rows are looked up, not multiplied (the token embeddings), held
/// quantized on the CPU like the weights it feeds: q4k for 4-bit models (as llama.cpp's Q4_K_M
/// keeps its token embeddings), q8_0 otherwise or when rows are not a whole number of 256-blocks.
/// `None` when the device is not the CPU or `cols` is not a whole number of q8_0 blocks.
pub fn load_quantized_table(
    vb: &VarBuilder,
    q: &Quantizer,
    (rows, cols): (usize, usize),
) -> Result<Option<Arc<CpuQWeight>>> {
    if !vb.device().is_cpu() || !cols.is_multiple_of(64) {
        return Ok(None);
    }
    let format = match q.weight_type {
        WeightType::Q4K | WeightType::Q4_0 if cols.is_multiple_of(256) => cpu::Format::Q4K,
        _ => cpu::Format::Q8_0,
    };
    let name = format!("{}.weight", vb.prefix());
    let bytes = quantized_weight_bytes(vb, q, ggml_dtype(format), (rows, cols), 0)?;
    let w = cpu_weight(&name, format, (rows, cols), &bytes)?;
    if let Some(c) = &q.cache {
        c.remember(&name, Fresh::Cpu(w.clone()));
    }
    Ok(Some(w))
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// Dense, or quantized through candle (GPU devices, and q4_0 on the CPU).
    Candle(QMatMul),
    /// q4k / q8_0 on the CPU: one copy of the blocks, our kernels (see [`cpu`]).
    Cpu(Arc<CpuQWeight>),
    /// bf16 / f16 on the CPU: 16-bit tiles widened in registers (see [`dense16`]).
    Dense16(Arc<dense16::HalfWeight>),
}

/// `y = x·Wᵀ + b` with W dense or quantized.
#[derive(Debug, Clone)]
pub struct QLinear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// Zero columns appended to quantized rows (and so to the inputs), see [`QUANT_ROW_ALIGN`].
    pad: usize,
}

impl QLinear {
    /// Loads `weight` (`[out, in]`) and optionally `bias` under `vb`. For quantized types `vb` must
    /// be f32: each weight is materialised in f32 only while it is being quantized (or read
    /// quantized from the cache).
    pub fn load(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: VarBuilder,
        q: impl Into<Quantizer>,
    ) -> Result<Self> {
        let q: Quantizer = q.into();
        let wt = q.weight_type;
        let pad = wt.stored_in_dim(in_dim) - in_dim;
        let weight = match wt.ggml() {
            Some(g) => {
                let name = format!("{}.weight", vb.prefix());
                let stored = (out_dim, in_dim + pad);
                let bytes = quantized_weight_bytes(&vb, &q, g, (out_dim, in_dim), pad)?;
                let cpu_format = cpu_format(g).filter(|_| vb.device().is_cpu());
                let (weight, fresh) = match cpu_format {
                    Some(f) => {
                        let w = cpu_weight(&name, f, stored, &bytes)?;
                        (LinearWeight::Cpu(w.clone()), Fresh::Cpu(w))
                    }
                    None => {
                        let storage = candle_core::quantized::QStorage::from_data(
                            std::borrow::Cow::Owned(bytes),
                            vb.device(),
                            g,
                        )?;
                        let t = Arc::new(QTensor::new(storage, stored)?);
                        (
                            LinearWeight::Candle(QMatMul::from_arc(t.clone())?),
                            Fresh::Candle(t),
                        )
                    }
                };
                if let Some(c) = &q.cache {
                    c.remember(&name, fresh);
                }
                weight
            }
            None if wt.is_half() && vb.device().is_cpu() => {
                let half = match wt {
                    WeightType::F16 => dense16::Half::F16,
                    _ => dense16::Half::Bf16,
                };
                let w = linear_weight(&vb, (out_dim, in_dim))?.to_dtype(DType::F32)?;
                let w = w.flatten_all()?.to_vec1::<f32>()?;
                LinearWeight::Dense16(Arc::new(dense16::HalfWeight::from_rows(
                    half, out_dim, in_dim, &w,
                )))
            }
            None => LinearWeight::Candle(QMatMul::Tensor(linear_weight(&vb, (out_dim, in_dim))?)),
        };
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias, pad })
    }

    /// A dense layer from an existing weight (tied embeddings).
    pub fn from_weight(weight: Tensor) -> Self {
        Self {
            weight: LinearWeight::Candle(QMatMul::Tensor(weight)),
            bias: None,
            pad: 0,
        }
    }
}

impl Module for QLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.pad > 0 {
            x.pad_with_zeros(candle_core::D::Minus1, 0, self.pad)?
        } else {
            x.clone()
        };
        let w: &dyn CpuMatmul = match &self.weight {
            LinearWeight::Candle(w) => {
                let y = w.forward(&x)?;
                return match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                };
            }
            LinearWeight::Cpu(w) => w.as_ref(),
            LinearWeight::Dense16(w) => w.as_ref(),
        };
        let (n, k) = w.dims();
        let m = x.elem_count() / k;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = n;
        }
        let xf = x.to_dtype(DType::F32)?.contiguous()?;
        let mut out = vec![0f32; m * n];
        // The activations and the bias are read in place: copying them out cost as much as a
        // tenth of the vision tower's matmul time.
        with_cpu_f32(&xf, |xs| match &self.bias {
            Some(b) => with_cpu_f32(&b.to_dtype(DType::F32)?.contiguous()?, |b| {
                w.matmul_bias(xs, m, &mut out, Some(b));
                Ok(())
            }),
            None => {
                w.matmul_bias(xs, m, &mut out, None);
                Ok(())
            }
        })?;
        Tensor::from_vec(out, dims, x.device())?.to_dtype(x.dtype())
    }
}

/// The GGML type of a CPU tile format.
pub fn ggml_dtype(f: cpu::Format) -> GgmlDType {
    match f {
        cpu::Format::Q4K => GgmlDType::Q4K,
        cpu::Format::Q8_0 => GgmlDType::Q8_0,
    }
}

/// The CPU tile format of a GGML type, if the CPU kernels run it.
pub fn cpu_format(g: GgmlDType) -> Option<cpu::Format> {
    match g {
        GgmlDType::Q4K => Some(cpu::Format::Q4K),
        GgmlDType::Q8_0 => Some(cpu::Format::Q8_0),
        _ => None,
    }
}

/// Runs `f` on the values of a contiguous f32 CPU tensor, without copying them.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    with_cpu_slice(t, f)
}

/// Runs `f` on the values of a contiguous CPU tensor of element type `T`, without copying them.
pub(crate) fn with_cpu_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("expected a CPU tensor")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous tensor")
    };
    f(&cpu.as_slice::<T>()?[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The CPU tiles decode to exactly what candle's GGML dequantization gives for the blocks
    /// candle's quantizer writes (the kernels crate tests the tiles against the format itself).
    #[test]
    fn cpu_tiles_hold_candles_blocks() {
        for format in [cpu::Format::Q4K, cpu::Format::Q8_0] {
            let (n, k) = (37, 512);
            let w = (Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu).unwrap() + 0.01).unwrap();
            let q = QTensor::quantize(&w, ggml_dtype(format)).unwrap();
            let ggml = q.data().unwrap().into_owned();
            let qw = CpuQWeight::from_ggml(format, n, k, &ggml).unwrap();
            assert_eq!(qw.to_ggml(), ggml, "{format:?} round trip");
            let deq: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut row = vec![0f32; k];
            for j in 0..n {
                qw.dequantize_row(j, &mut row);
                assert_eq!(row, deq[j * k..(j + 1) * k], "{format:?} row {j}");
            }
        }
    }

    #[test]
    fn parallel_quantization_is_byte_identical_to_candles() {
        let w = Tensor::randn(0f32, 0.02, (1000, 2048), &Device::Cpu).unwrap();
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::Q4K] {
            let a = QTensor::quantize(&w, dtype).unwrap();
            // 96-row chunks: eleven chunks, the last one short.
            let b = quantize_rows_chunked(&w, dtype, 96 * 2048).unwrap();
            assert_eq!(a.data().unwrap().as_ref(), b.as_slice(), "{dtype:?}");
            assert_eq!(quantize_rows_bytes(&w, dtype).unwrap(), b, "{dtype:?}");
        }
    }
}

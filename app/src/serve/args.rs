//! `qwenvl serve`'s command line.

use std::net::IpAddr;
use std::path::PathBuf;

use lm::quant::WeightType;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Model folder (config.json, qwen.tiktoken, weights).
    #[arg(long)]
    pub model: PathBuf,
    /// Address to listen on. The default answers this machine only; another address exposes the
    /// model to the network (use --api-key there).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port; 0 picks a free one (the address is printed either way).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on every request (also read from QWENVL_API_KEY).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model id clients name in requests (default: the model folder's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// In-memory weight type (q4k, q8_0, bf16, f32, …); default: f32 for small checkpoints, q8_0
    /// or q4k for the real model, as the app chooses.
    #[arg(long, value_parser = crate::parse_weight_type)]
    pub quant: Option<WeightType>,
    /// cpu, cuda, cuda:N, metal, metal:N, or auto (a GPU when this build supports one and it is
    /// there).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Accept `file://` URLs and plain paths in `image_url` (read with the server's rights).
    #[arg(long)]
    pub allow_local_files: bool,
    /// Largest request body, in MiB (images come inline as base64).
    #[arg(long, default_value_t = 32)]
    pub max_body_mb: usize,
    /// Most images in one request (all messages together).
    #[arg(long, default_value_t = 16)]
    pub max_images: usize,
    /// Most pixels of one image (width × height).
    #[arg(long, default_value_t = 50_000_000)]
    pub max_image_pixels: u64,
    /// Most requests waiting for a slot; more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Requests generated together (continuous batching: one pass over the weights per step
    /// feeds all of them). Default: as many as the KV-cache memory allows for full-length
    /// replies, at most 8.
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Memory the KV caches of the running requests may take together, in MiB (each request
    /// reserves what its prompt and longest reply can fill before it starts). Default: half the
    /// memory available once the model is loaded.
    #[arg(long)]
    pub kv_memory_mb: Option<usize>,
    /// Most prompt tokens fed in one step while other requests are generating (a longer prompt
    /// is fed in chunks so that their streams keep flowing).
    #[arg(long, default_value_t = 64)]
    pub prefill_chunk: usize,
    /// Answer browsers' cross-origin requests (CORS) from this origin, or `*` for any.
    #[arg(long)]
    pub cors_origin: Option<String>,
}

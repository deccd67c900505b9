//! Checking a chat request and turning it into a queued job: everything a client can get wrong
//! is answered here with 4xx, before the request waits in the queue.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Result;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, StatusCode};
use base64::Engine as _;
use lm::generate::GenerateOptions;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::args::ServeArgs;
use super::error::ApiError;
use super::state::{Job, JobEvent, Server, ToolForm};
use crate::engine::Engine;
use crate::openai::{self, ChatRequest, MessageError, ToolChoice};

pub(super) type Prepared = (Job, bool, bool, UnboundedReceiver<JobEvent>);

/// Checks the request and builds the job: everything a client can get wrong is answered here
/// with 4xx, before the request waits in the queue.
pub(super) async fn prepare(
    st: &Arc<Server>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Prepared, ApiError> {
    let arrived = std::time::Instant::now();
    let body = body.map_err(|r| {
        let status = r.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the request body is larger than the server's limit of {} MiB (--max-body-mb)",
                st.args.max_body_mb
            )
        } else {
            r.body_text()
        };
        ApiError::new(status, "invalid_request_error", None, message)
    })?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v.starts_with("application/json"));
    if !is_json {
        return Err(ApiError::invalid(
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    let req: ChatRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the body is not a valid chat request: {e}")))?;
    if req.model != st.model_id {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            format!(
                "the model `{}` is not served here; this server serves `{}`",
                req.model, st.model_id
            ),
        )
        .param("model"));
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported").param("n"));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::invalid("logprobs are not supported").param("logprobs"));
    }
    let (form, tools) = offered_tools(&req)?;
    let engine = st.engine()?.clone();
    let options = generate_options(&engine, &req)?;
    let stops = req.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
    if stops.len() > 4 {
        return Err(ApiError::invalid("at most 4 stop sequences").param("stop"));
    }

    // Images are decoded from base64 and written out off the async threads.
    let st2 = st.clone();
    let (conversation, reply_prefix, stops, images) = tokio::task::spawn_blocking(move || {
        let images = tempfile::Builder::new()
            .prefix("qwenvl-serve-")
            .tempdir()
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    None,
                    format!("cannot create a folder for the request's images: {e}"),
                )
            })?;
        if form != ToolForm::Off || openai::has_tool_exchange(&req.messages) {
            let messages = openai::to_react(&req.messages)?;
            let p = crate::session::tools::prepare(&messages, &tools, &stops)
                .map_err(|e| ApiError::invalid(e).param("messages"))?;
            engine
                .prompt_continuing(&p.conversation, &p.reply_prefix)
                .map_err(|e| ApiError::invalid(format!("{e:#}")).param("messages"))?;
            return Ok::<_, ApiError>((p.conversation, p.reply_prefix, p.stops, images));
        }
        let mut count = 0usize;
        let conversation = openai::to_conversation(&req.messages, &mut |url, param| {
            count += 1;
            if count > st2.args.max_images {
                return Err(MessageError {
                    message: format!(
                        "more than {} images in one request (--max-images)",
                        st2.args.max_images
                    ),
                    param: param.to_string(),
                });
            }
            save_image(&st2.args, url, images.path(), count).map_err(|message| MessageError {
                message,
                param: param.to_string(),
            })
        })?;
        // The prompt is built now so that a conversation too long for the context is refused
        // with 400 instead of failing in the queue.
        engine
            .prompt(&conversation)
            .map_err(|e| ApiError::invalid(format!("{e:#}")).param("messages"))?;
        Ok::<_, ApiError>((conversation, String::new(), stops, images))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            format!("internal error: {e}"),
        )
    })??;
    let (tx, rx) = unbounded_channel();
    let job = Job {
        label: String::new(),
        conversation,
        reply_prefix,
        tools: form,
        images,
        options,
        stops,
        cancel: Arc::new(AtomicBool::new(false)),
        events: tx,
        arrived,
    };
    let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
    Ok((job, req.stream, include_usage, rx))
}

/// The tools the request offers and the form its call is answered in. `tool_choice: "none"`
/// offers none (a tool exchange in the messages is still read); a choice that forces a call is
/// refused: in the ReAct format the model decides itself whether to call.
fn offered_tools(req: &ChatRequest) -> Result<(ToolForm, Vec<lm::react::Tool>), ApiError> {
    let (form, tools) = match (&req.tools, &req.functions) {
        (Some(_), Some(_)) => {
            return Err(
                ApiError::invalid("send `tools` or the older `functions`, not both")
                    .param("functions"),
            )
        }
        (Some(specs), None) => (ToolForm::Tools, openai::function_tools(specs)?),
        (None, Some(f)) => (ToolForm::Functions, f.clone()),
        (None, None) => (ToolForm::Off, Vec::new()),
    };
    if let Some(i) = tools.iter().position(|t| t.name.trim().is_empty()) {
        let field = if form == ToolForm::Tools {
            format!("tools[{i}].function.name")
        } else {
            format!("functions[{i}].name")
        };
        return Err(ApiError::invalid("every tool needs a name").param(field));
    }
    match &req.tool_choice {
        None => {}
        Some(ToolChoice::Mode(m)) if m == "auto" => {}
        Some(ToolChoice::Mode(m)) if m == "none" => return Ok((ToolForm::Off, Vec::new())),
        Some(ToolChoice::Mode(m)) if m == "required" => {
            return Err(forced_choice("`required`"));
        }
        Some(ToolChoice::Named { function, .. }) => {
            return Err(forced_choice(&format!("the tool `{}`", function.name)));
        }
        Some(ToolChoice::Mode(m)) => {
            return Err(ApiError::invalid(format!(
                "tool_choice `{m}` is not one of auto, none, required"
            ))
            .param("tool_choice"))
        }
    }
    if tools.is_empty() {
        return Ok((ToolForm::Off, tools));
    }
    Ok((form, tools))
}

fn forced_choice(what: &str) -> ApiError {
    ApiError::invalid(format!(
        "tool_choice {what} cannot be honoured: Qwen decides itself whether to call a tool \
         (ReAct prompting); send \"auto\" or \"none\""
    ))
    .param("tool_choice")
}

/// The request's settings over the checkpoint's defaults, by the rules every front end shares
/// ([`crate::session::options`]); an unseeded sampled request gets a fresh seed.
fn generate_options(engine: &Engine, req: &ChatRequest) -> Result<GenerateOptions, ApiError> {
    let request = crate::session::GenerateRequest {
        max_new_tokens: req.max_completion_tokens.or(req.max_tokens),
        greedy: false,
        temperature: req.temperature,
        top_p: req.top_p,
        // A negative top_k means "off", as in vLLM.
        top_k: req.top_k.map(|k| u64::try_from(k).unwrap_or(0)),
        repetition_penalty: req.repetition_penalty,
        seed: req.seed.map(|s| s as u64),
        ignore_eos: req.ignore_eos == Some(true),
    };
    request
        .resolve(&engine.checkpoint.generation, crate::session::fresh_seed())
        .map_err(|e| {
            // The wire format's own name for the length limit.
            let field = match e.field {
                "max_new_tokens" => "max_tokens",
                f => f,
            };
            ApiError::invalid(format!("{field} must be {}, got {}", e.range, e.value)).param(field)
        })
}

/// Writes the image at `url` into `dir` and returns its path; the error is the message for 400.
fn save_image(args: &ServeArgs, url: &str, dir: &Path, n: usize) -> Result<String, String> {
    let bytes = if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or("malformed data: URL (no comma)")?;
        if !meta.ends_with(";base64") {
            return Err("data: URLs must be base64 (data:image/png;base64,…)".into());
        }
        let data: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        base64::engine::general_purpose::STANDARD
            .decode(data.as_bytes())
            .map_err(|e| format!("the image's base64 data is invalid: {e}"))?
    } else if url.starts_with("http://") || url.starts_with("https://") {
        return Err(
            "image URLs are not fetched by this server: send the image inline as a data: URL"
                .into(),
        );
    } else if args.allow_local_files {
        let path = url.strip_prefix("file://").unwrap_or(url);
        vision::read_image_file(Path::new(path)).map_err(|e| e.to_string())?
    } else {
        return Err(
            "image_url must be a data: URL (local paths need the server's --allow-local-files)"
                .into(),
        );
    };
    let format = image::guess_format(&bytes).map_err(|_| {
        format!(
            "image {n} is not a supported image (PNG, JPEG, GIF, WebP, BMP or TIFF), {} bytes",
            bytes.len()
        )
    })?;
    let (w, h) = image::ImageReader::with_format(std::io::Cursor::new(&bytes), format)
        .into_dimensions()
        .map_err(|e| format!("image {n} cannot be read: {e}"))?;
    if u64::from(w) * u64::from(h) > args.max_image_pixels {
        return Err(format!(
            "image {n} is {w}×{h} pixels, more than the server's limit of {} (--max-image-pixels)",
            args.max_image_pixels
        ));
    }
    let ext = format.extensions_str().first().copied().unwrap_or("img");
    let path = dir.join(format!("image-{n}.{ext}"));
    std::fs::write(&path, &bytes).map_err(|e| format!("cannot store image {n}: {e}"))?;
    Ok(path.to_string_lossy().into_owned())
}

//! The web demo: static files built into `web/dist` and embedded in the binary, served at `/`
//! (index.html) and `/assets/*` when the demo is on (`--dev`, or `--web`).

use crate::api::ApiError;
use axum::{
    Router,
    extract::Path,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use rust_embed::RustEmbed;
use std::borrow::Cow;

/// The built demo. Embedded in debug builds too, so a binary never reads the source tree.
#[derive(RustEmbed)]
#[folder = "web/dist"]
struct Dist;

/// The demo talks only to its own origin (HTTP and WebSocket); inline styles are allowed for
/// its small style attributes, scripts come from files only.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                   style-src 'self' 'unsafe-inline'";
/// Asset names carry a hash of their content: a changed file is a new name.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

/// The demo's routes, to be merged into the API router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/assets/{*path}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve("index.html", "no-cache", &headers)
}

async fn asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    serve(&format!("assets/{path}"), IMMUTABLE, &headers)
}

fn serve(path: &str, cache: &'static str, headers: &HeaderMap) -> Response {
    let Some(file) = Dist::get(path) else {
        return ApiError::not_found("no such file").into_response();
    };
    let etag = format!("\"{}\"", hex::encode(&file.metadata.sha256_hash()[..16]));
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        match file.data {
            Cow::Borrowed(b) => Bytes::from_static(b).into_response(),
            Cow::Owned(v) => v.into_response(),
        }
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&content_type(file.metadata.mimetype())) {
        h.insert(header::CONTENT_TYPE, v);
    }
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// The MIME type with the charset for text (the demo's files are UTF-8).
fn content_type(mime: &str) -> String {
    if mime.starts_with("text/") || mime.ends_with("javascript") || mime.ends_with("json") {
        format!("{mime}; charset=utf-8")
    } else {
        mime.to_string()
    }
}

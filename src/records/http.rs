//! `GET|HEAD /records/<token>.<ext>`: serve a recording to a CRM player.
//!
//! Decisions, each logged: unknown extension → 404; bad, tampered or expired token → 403;
//! id not in the catalog (or file gone) → 404; otherwise 200, or 206 for a satisfiable
//! `Range: bytes=...`, or 416 for an unsatisfiable one. The file is streamed in 64 KiB
//! chunks, never read whole. Nothing from the URL is used as a path: only the signed id,
//! and the catalog decides which file that is.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::catalog::{self, RecordingCatalog};
use super::link::LinkSigner;

/// Bytes per read when streaming a file.
const CHUNK: usize = 64 * 1024;

/// What the route needs: the catalog (id → file) and the signer (token → id).
#[derive(Clone)]
pub struct RecordsHttp {
    pub catalog: Arc<dyn RecordingCatalog>,
    pub signer: LinkSigner,
}

impl RecordsHttp {
    pub fn new(catalog: Arc<dyn RecordingCatalog>, signer: LinkSigner) -> Self {
        RecordsHttp { catalog, signer }
    }
}

/// The recordings route, ready to `merge` into the daemon's router.
pub fn router(state: RecordsHttp) -> Router {
    Router::new()
        .route("/records/{file}", get(serve))
        .with_state(Arc::new(state))
}

/// A parsed `Range` header against a file of known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// No usable Range header: send everything (RFC 9110: ignore what we do not parse).
    Full,
    /// Inclusive first and last byte.
    Part(u64, u64),
    /// A valid range that lies outside the file: 416.
    Unsatisfiable,
}

/// Parse one `bytes=` range. Multiple ranges are answered with the whole file (allowed by
/// RFC 9110, and players only ever ask for one).
pub fn parse_range(value: &str, len: u64) -> ByteRange {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return ByteRange::Full;
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return ByteRange::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return ByteRange::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || s.len() > 19 || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    match (a.is_empty(), b.is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match num(b) {
            None => ByteRange::Full,
            Some(0) => ByteRange::Unsatisfiable,
            Some(_) if len == 0 => ByteRange::Unsatisfiable,
            Some(n) => ByteRange::Part(len.saturating_sub(n), len - 1),
        },
        // bytes=A-
        (false, true) => match num(a) {
            None => ByteRange::Full,
            Some(first) if first >= len => ByteRange::Unsatisfiable,
            Some(first) => ByteRange::Part(first, len - 1),
        },
        // bytes=A-B
        (false, false) => match (num(a), num(b)) {
            (Some(first), Some(last)) if first <= last => {
                if first >= len {
                    ByteRange::Unsatisfiable
                } else {
                    ByteRange::Part(first, last.min(len - 1))
                }
            }
            _ => ByteRange::Full,
        },
        (true, true) => ByteRange::Full,
    }
}

fn refuse(status: StatusCode, msg: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
        msg,
    )
        .into_response()
}

async fn serve(
    State(st): State<Arc<RecordsHttp>>,
    method: Method,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Response {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();

    let Some((token, ext)) = file.rsplit_once('.') else {
        tracing::info!(
            request_id,
            status = 404,
            "recording request without extension"
        );
        return refuse(StatusCode::NOT_FOUND, "not found\n");
    };
    if !matches!(ext, "mp3" | "wav" | "gsm") {
        tracing::info!(
            request_id,
            status = 404,
            ext,
            "recording request for an unknown extension"
        );
        return refuse(StatusCode::NOT_FOUND, "not found\n");
    }
    let id = match st.signer.verify(token) {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(request_id, status = 403, reason = %e, "recording link refused");
            return refuse(StatusCode::FORBIDDEN, "invalid or expired link\n");
        }
    };

    // The catalog may stat files or query a database: keep it off the event loop.
    let cat = st.catalog.clone();
    let lookup_id = id.clone();
    let path = match tokio::task::spawn_blocking(move || cat.path_of(&lookup_id)).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            tracing::info!(request_id, record_id = %id, status = 404, "recording not in catalog");
            return refuse(StatusCode::NOT_FOUND, "not found\n");
        }
        Err(e) => {
            tracing::error!(request_id, record_id = %id, error = %e, "catalog lookup failed");
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
        }
    };

    let mut f = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(request_id, record_id = %id, path = %path.display(), error = %e,
                status = 404, "recording file cannot be opened");
            return refuse(StatusCode::NOT_FOUND, "not found\n");
        }
    };
    let len = match f.metadata().await {
        Ok(m) if m.is_file() => m.len(),
        Ok(_) | Err(_) => {
            tracing::warn!(request_id, record_id = %id, path = %path.display(), status = 404,
                "recording path is not a readable file");
            return refuse(StatusCode::NOT_FOUND, "not found\n");
        }
    };
    let served = catalog::served_ext(&path).unwrap_or("bin");
    let ctype = catalog::content_type(served);

    // If-Range asks "only if unchanged"; we keep no validators, so answer in full.
    let range = match headers.get(header::RANGE) {
        Some(v) if !headers.contains_key(header::IF_RANGE) => match v.to_str() {
            Ok(s) => parse_range(s, len),
            Err(_) => ByteRange::Full,
        },
        _ => ByteRange::Full,
    };

    let mut builder = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CACHE_CONTROL, "private, max-age=3600");
    // Another catalog may accept ids with characters that do not belong in a header.
    if catalog::valid_id(&id) {
        builder = builder.header(
            header::CONTENT_DISPOSITION,
            format!("inline; filename=\"{id}.{served}\""),
        );
    }
    let (status, first, count) = match range {
        ByteRange::Full => (StatusCode::OK, 0, len),
        ByteRange::Part(a, b) => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {a}-{b}/{len}"));
            (StatusCode::PARTIAL_CONTENT, a, b - a + 1)
        }
        ByteRange::Unsatisfiable => {
            tracing::info!(request_id, record_id = %id, status = 416, len,
                range = ?headers.get(header::RANGE), "recording range not satisfiable");
            return builder
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .header(header::CONTENT_TYPE, "text/plain")
                .body(Body::from("range not satisfiable\n"))
                .unwrap_or_else(|_| refuse(StatusCode::RANGE_NOT_SATISFIABLE, ""));
        }
    };
    tracing::info!(request_id, record_id = %id, status = status.as_u16(), method = %method,
        first, bytes = count, len, content_type = ctype, "serving recording");

    let body = if method == Method::HEAD || count == 0 {
        Body::empty()
    } else {
        if first > 0
            && let Err(e) = f.seek(std::io::SeekFrom::Start(first)).await
        {
            tracing::warn!(request_id, record_id = %id, error = %e, "seek failed");
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
        }
        file_body(f, count)
    };
    builder
        .status(status)
        .header(header::CONTENT_TYPE, ctype)
        .header(header::CONTENT_LENGTH, count)
        .body(body)
        .unwrap_or_else(|_| refuse(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"))
}

/// Stream `len` bytes from the file's current position, one chunk at a time.
fn file_body(file: tokio::fs::File, len: u64) -> Body {
    let stream = futures::stream::unfold(Some(file.take(len)), |state| async move {
        let mut reader = state?;
        let mut buf = BytesMut::with_capacity(CHUNK);
        match reader.read_buf(&mut buf).await {
            Ok(0) => None,
            Ok(_) => Some((Ok(buf.freeze()), Some(reader))),
            Err(e) => Some((Err(e), None)),
        }
    });
    Body::from_stream(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use ByteRange::*;
        assert_eq!(parse_range("bytes=0-9", 100), Part(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=-1000", 100), Part(0, 99));
        assert_eq!(parse_range("bytes=50-1000", 100), Part(50, 99));
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=9-0", 100), Full);
        assert_eq!(parse_range("bytes=a-b", 100), Full);
        assert_eq!(parse_range("items=0-9", 100), Full);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Full);
        assert_eq!(parse_range("bytes=-", 100), Full);
        assert_eq!(parse_range("bytes=99999999999999999999999-", 100), Full);
    }
}

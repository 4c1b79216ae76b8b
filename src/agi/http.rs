//! `GET /autodistribution?phone=...&trunk=...` for dialplans that route with `CURL()`:
//!
//! ```text
//! same => n,Set(DST=${CURL(http://127.0.0.1:8088/autodistribution?phone=${CALLERID(num)}&trunk=${EXTEN})})
//! same => n,GotoIf($["${DST}" = ""]?default)
//! ```
//!
//! The body is the bare extension (`text/plain`), or empty with 404 when there is no
//! route: `CURL()` stores the body in the variable, so nothing but the extension may
//! ever be written there. The display name goes in the `X-Kolokol-Name` header.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Map, Value, json};
use tracing::warn;

use super::autodist::{AutodistRequest, Autodistributor};

/// The route fragment; the HTTP server merges it.
pub fn router(auto: Arc<Autodistributor>) -> Router {
    Router::new()
        .route("/autodistribution", get(autodistribution))
        .with_state(auto)
}

async fn autodistribution(
    State(auto): State<Arc<Autodistributor>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let phone = params.get("phone").map(|s| s.trim()).unwrap_or("");
    if phone.is_empty() {
        warn!("GET /autodistribution without ?phone=: check the CURL() URL in the dialplan");
        return (StatusCode::BAD_REQUEST, plain(), "").into_response();
    }
    let request_data: Map<String, Value> =
        params.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
    let req = AutodistRequest {
        phone: phone.to_string(),
        trunk: params.get("trunk").cloned().unwrap_or_default(),
        request_data: Value::Object(request_data),
        call_id: params
            .get("call_id")
            .or_else(|| params.get("uniqueid"))
            .cloned()
            .unwrap_or_default(),
    };
    match auto.route(&req).await {
        Some(route) => {
            let mut headers = plain();
            // Header values must be visible ASCII; a name that is not stays out.
            if !route.name.is_empty()
                && let Ok(v) = HeaderValue::from_str(&route.name)
            {
                headers.insert("x-kolokol-name", v);
            }
            (StatusCode::OK, headers, route.number).into_response()
        }
        None => (StatusCode::NOT_FOUND, plain(), "").into_response(),
    }
}

fn plain() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h
}

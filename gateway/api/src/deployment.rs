//! The configuration server's part of the API: the gateways joined to it, and the calls it
//! forwards to them over their connections (a master target's items, points and failover are
//! reached through the configuration server alone).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use haven_engine::config_server::{ConfigServer, ForwardError};
use haven_net::join::{ApiAnswer, ApiRequest, MAX_MESSAGE};
use tower::ServiceExt;

use crate::ApiError;
use crate::auth::Caller;

/// Forwards `/v1/items…` to the master target holding the item (`GET /v1/items`: to every
/// master target, the lists joined). Runs after authorization: the caller's role was checked
/// here, and the gateway trusts its configuration server.
pub(crate) async fn forward_items(
    axum::extract::State(cs): axum::extract::State<Arc<ConfigServer>>,
    req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    let rest = match crate::items_rest(&path) {
        Some(rest) => rest.to_string(),
        None => return next.run(req).await,
    };
    let method = req.method().clone();
    let target = req
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), |p| p.as_str().to_string());
    let caller = req
        .extensions()
        .get::<Caller>()
        .map_or_else(String::new, |c| format!("{} ({})", c.name, c.id));
    let request = ApiRequest {
        method: method.to_string(),
        path: target,
        caller,
    };
    if rest.is_empty() {
        if method != Method::GET {
            return next.run(req).await;
        }
        return every_item(&cs, request).await.into_response();
    }
    let item = rest.split('/').next().unwrap_or_default();
    match cs.master_target_of(item) {
        Some(gateway) => match cs.forward(&gateway, request).await {
            Ok(answer) => answer_response(answer),
            Err(e) => forward_error(e).into_response(),
        },
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no master target joined to this configuration server holds item `{item}` \
                 (a machine name or agent id); `haven status` lists the items"
            ),
        )
        .into_response(),
    }
}

/// `GET /v1/items` at every master target, joined into one list.
async fn every_item(cs: &ConfigServer, request: ApiRequest) -> Result<Response, ApiError> {
    let mut all = Vec::new();
    for gateway in cs.with_role("master-target") {
        let answer = cs
            .forward(&gateway, request.clone())
            .await
            .map_err(forward_error)?;
        if answer.status != 200 {
            return Ok(answer_response(answer));
        }
        let items: Vec<serde_json::Value> = serde_json::from_str(&answer.body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("gateway `{gateway}` answered GET /v1/items with no list: {e}"),
            )
        })?;
        all.extend(items);
    }
    let body = serde_json::to_vec_pretty(&all)
        .map_err(|e| ApiError::internal(format!("cannot write the answer as JSON: {e}")))?;
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

fn forward_error(e: ForwardError) -> ApiError {
    let status = match e {
        ForwardError::Unknown(_) => StatusCode::NOT_FOUND,
        ForwardError::Gone(..) => StatusCode::SERVICE_UNAVAILABLE,
        ForwardError::Failed(..) => StatusCode::BAD_GATEWAY,
    };
    ApiError::new(status, e.to_string())
}

fn answer_response(answer: ApiAnswer) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    (
        status,
        [(header::CONTENT_TYPE, answer.content_type)],
        answer.body,
    )
        .into_response()
}

/// This gateway's own routes without tokens, for the calls its configuration server forwards
/// (the configuration server checked the caller's token and role).
#[derive(Clone)]
pub struct LocalRoutes(pub(crate) axum::Router);

impl LocalRoutes {
    /// Runs one forwarded call.
    pub fn call(
        &self,
        request: ApiRequest,
    ) -> impl std::future::Future<Output = ApiAnswer> + Send + 'static {
        call_local(self.0.clone(), request)
    }
}

async fn call_local(router: axum::Router, request: ApiRequest) -> ApiAnswer {
    let failed = |status: StatusCode, message: String| ApiAnswer {
        status: status.as_u16(),
        content_type: "application/json".into(),
        body: serde_json::json!({ "error": message }).to_string(),
    };
    let Ok(method) = Method::from_bytes(request.method.as_bytes()) else {
        return failed(
            StatusCode::BAD_REQUEST,
            format!("method {}", request.method),
        );
    };
    let req = match axum::http::Request::builder()
        .method(method)
        .uri(&request.path)
        .body(Body::empty())
    {
        Ok(r) => r,
        Err(e) => return failed(StatusCode::BAD_REQUEST, format!("{}: {e}", request.path)),
    };
    let Ok(response) = router.oneshot(req).await;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json")
        .to_string();
    match axum::body::to_bytes(response.into_body(), MAX_MESSAGE).await {
        Ok(body) => ApiAnswer {
            status,
            content_type,
            body: String::from_utf8_lossy(&body).into_owned(),
        },
        Err(e) => failed(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the answer is too large to forward: {e}"),
        ),
    }
}

//! The web console: one HTML page, one script and one style sheet, served at `/console` by the
//! API itself and compiled into the binary (no build step, nothing fetched from elsewhere).
//!
//! | method | path                | what                                                   |
//! |--------|---------------------|--------------------------------------------------------|
//! | GET    | `/console`          | the page (`/console/` redirects to it)                 |
//! | GET    | `/console/app.js`   | its script                                             |
//! | GET    | `/console/app.css`  | its style sheet                                        |
//! | GET    | `/console/icon.svg` | its icon, so the browser asks for no `/favicon.ico`   |
//!
//! The assets are public ([`crate::auth::required_role`]): they hold no data. The page asks the
//! operator for an API token, keeps it in the tab's `sessionStorage` and calls `/v1` with it
//! like any other client, so the token's role decides what the console may do. At a
//! configuration server that is the whole deployment: it lists the joined gateways and forwards
//! item calls to the master target holding the item.
//!
//! The routes are not part of the OpenAPI document: they are a client of the API, not API.
//!
//! Every asset is sent with `Cache-Control: no-store` (a new gateway serves its own page) and a
//! Content-Security-Policy that allows this origin only and no inline script or style, so a
//! value the API returns can never run as code. The script puts API data into the page as text
//! only (`textContent`, attributes), never as HTML.

use axum::http::{HeaderName, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// The page.
const INDEX_HTML: &str = include_str!("console/index.html");
/// Its script.
const APP_JS: &str = include_str!("console/app.js");
/// Its style sheet.
const APP_CSS: &str = include_str!("console/app.css");
/// Its icon: an H on blue.
const ICON_SVG: &str = "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 16 16\">\
    <rect width=\"16\" height=\"16\" rx=\"3\" fill=\"#0b5cad\"/>\
    <path d=\"M4.5 3v10M11.5 3v10M4.5 8h7\" stroke=\"#fff\" stroke-width=\"2\"/></svg>";

/// What the console's page may load and do: this origin only, no inline script or style, no
/// plugins, no frames around it, no form posted anywhere (the login form is handled by the
/// script; without it, the token must not end up in a URL).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The console's routes, for any router state.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new()
        .route(
            "/console",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route("/console/", get(|| async { Redirect::to("/console") }))
        .route(
            "/console/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route(
            "/console/icon.svg",
            get(|| async { asset("image/svg+xml", ICON_SVG) }),
        )
}

/// `body` as `content_type`, never cached, under the console's policy.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers: [(HeaderName, &'static str); 6] = [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "no-store"),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use axum::body::Body;
    use axum::extract::ConnectInfo;
    use axum::http::{Method, Request, StatusCode};
    use haven_engine::status::GatewayStatus;
    use haven_store::tokens::ApiTokens;
    use tower::ServiceExt;

    use super::*;
    use crate::auth::{Auth, required_role};
    use crate::{Api, router};

    /// The API with tokens checked, as a gateway serves it.
    fn api(tmp: &std::path::Path) -> axum::Router {
        let tokens = Arc::new(ApiTokens::open(&tmp.join("tokens.json")).expect("tokens"));
        router(Api {
            status: Arc::new(GatewayStatus::default),
            ca: None,
            on_revoke: None,
            recovery: None,
            auth: Some(Arc::new(Auth::new(tokens, &tmp.join("audit.jsonl")))),
            deployment: None,
        })
        .expect("the router")
    }

    /// `method path` without a token: status, headers and body.
    async fn call(
        router: &axum::Router,
        method: Method,
        path: &str,
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::empty())
            .expect("a request");
        let peer: SocketAddr = "127.0.0.1:4000".parse().expect("an address");
        req.extensions_mut().insert(ConnectInfo(peer));
        let Ok(response) = router.clone().oneshot(req).await;
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .expect("the body");
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    #[test]
    fn the_console_is_public_and_the_api_is_not() {
        let get = Method::GET;
        assert_eq!(required_role(&get, "/console"), None);
        assert_eq!(required_role(&get, "/console/"), None);
        assert_eq!(required_role(&get, "/console/app.js"), None);
        assert!(required_role(&get, "/consoles").is_some());
        assert!(required_role(&get, "/v1/console").is_some());
    }

    #[tokio::test]
    async fn assets_are_served_without_a_token_under_a_strict_policy() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let router = api(tmp.path());
        for (path, content_type, start) in [
            ("/console", "text/html; charset=utf-8", "<!doctype html>"),
            ("/console/app.js", "text/javascript; charset=utf-8", "//"),
            ("/console/app.css", "text/css; charset=utf-8", "/*"),
            ("/console/icon.svg", "image/svg+xml", "<svg "),
        ] {
            let (status, headers, body) = call(&router, Method::GET, path).await;
            assert_eq!(status, StatusCode::OK, "{path}: {body}");
            let header = |name: HeaderName| {
                headers
                    .get(&name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string()
            };
            assert_eq!(header(header::CONTENT_TYPE), content_type, "{path}");
            assert_eq!(header(header::CACHE_CONTROL), "no-store", "{path}");
            let csp = header(header::CONTENT_SECURITY_POLICY);
            assert!(csp.starts_with("default-src 'self';"), "{path}: {csp}");
            assert!(!csp.contains("unsafe"), "{path}: {csp}");
            assert_eq!(header(header::X_CONTENT_TYPE_OPTIONS), "nosniff", "{path}");
            assert!(body.starts_with(start), "{path}: {body:.40}");
        }
        let (status, headers, _) = call(&router, Method::GET, "/console/").await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(
            headers.get(header::LOCATION).and_then(|v| v.to_str().ok()),
            Some("/console")
        );
        // The API still wants its token, and the console takes only GET (and HEAD).
        let (status, _, _) = call(&router, Method::GET, "/v1/status").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, body) = call(&router, Method::POST, "/console").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{body}");
        let (status, _, body) = call(&router, Method::HEAD, "/console/app.js").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, _, body) = call(&router, Method::GET, "/console/nothing").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }

    #[test]
    fn the_page_has_no_inline_code_and_loads_only_its_own_assets() {
        let html = INDEX_HTML.to_ascii_lowercase();
        // Inline script, inline style and event-handler attributes would be refused by the
        // policy; the page must not depend on them.
        assert!(!html.contains("<style"), "inline style element");
        assert!(!html.contains(" style="), "style attribute");
        let handler = html.split(" on").skip(1).find(|rest| {
            let name = rest.trim_start_matches(|c: char| c.is_ascii_lowercase());
            name.len() < rest.len() && name.starts_with('=')
        });
        assert_eq!(handler, None, "an event-handler attribute");
        assert_eq!(html.matches("<script").count(), 1);
        assert!(html.contains("<script src=\"/console/app.js\" defer></script>"));
        assert!(html.contains("<link rel=\"stylesheet\" href=\"/console/app.css\">"));
        assert!(
            html.contains("<link rel=\"icon\" href=\"/console/icon.svg\" type=\"image/svg+xml\">")
        );
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(!APP_JS.contains("http://") && !APP_JS.contains("https://"));
        assert!(!APP_CSS.contains("url("), "the style sheet loads nothing");
    }

    #[test]
    fn the_script_inserts_api_data_as_text_only() {
        for forbidden in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
            "new Function",
            "localStorage",
        ] {
            assert!(!APP_JS.contains(forbidden), "app.js uses {forbidden}");
        }
        assert!(APP_JS.contains("'use strict';"));
    }
}

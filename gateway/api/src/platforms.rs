//! The configuration server's platforms (the pipeline's adapters and their machines) and the
//! secrets their settings refer to.

use axum::extract::Path;
use axum::http::StatusCode;
use haven_engine::platforms::PlatformView;
use haven_host::platform::Machine;
use haven_store::SecretInfo;

use crate::{ApiError, Deployment, ErrorBody, Pretty, blocking};

/// The pipeline's adapters: what each checked and how many machines it saw.
#[utoipa::path(
    get,
    path = "/v1/platforms",
    tag = "deployment",
    responses(
        (status = OK, description = "The adapters of the applied pipeline", body = Vec<PlatformView>),
        (status = NOT_FOUND, description = "This gateway is no configuration server", body = ErrorBody),
    )
)]
pub(crate) async fn list_platforms(
    Deployment(cs): Deployment,
) -> Result<Pretty<Vec<PlatformView>>, ApiError> {
    Ok(Pretty(blocking(move || cs.platforms()).await?))
}

fn no_platform(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no adapter `{name}` in the applied pipeline; `haven platform list` shows them"),
    )
}

/// The machines an adapter reported at its last inventory.
#[utoipa::path(
    get,
    path = "/v1/platforms/{name}/machines",
    tag = "deployment",
    params(("name" = String, Path, description = "The adapter's name in the pipeline")),
    responses(
        (status = OK, description = "Its machines", body = Vec<Machine>),
        (status = NOT_FOUND, description = "No such adapter, or this gateway is no configuration server", body = ErrorBody),
    )
)]
pub(crate) async fn platform_machines(
    Deployment(cs): Deployment,
    Path(name): Path<String>,
) -> Result<Pretty<Vec<Machine>>, ApiError> {
    let n = name.clone();
    match blocking(move || cs.platform_machines(&n)).await? {
        Some(machines) => Ok(Pretty(machines)),
        None => Err(no_platform(&name)),
    }
}

/// Checks an adapter and takes its inventory now.
#[utoipa::path(
    post,
    path = "/v1/platforms/{name}/refresh",
    tag = "deployment",
    params(("name" = String, Path, description = "The adapter's name in the pipeline")),
    responses(
        (status = OK, description = "The adapter after its inventory", body = PlatformView),
        (status = NOT_FOUND, description = "No such adapter, or this gateway is no configuration server", body = ErrorBody),
        (status = BAD_GATEWAY, description = "The adapter or its platform failed; the message says how", body = ErrorBody),
    )
)]
pub(crate) async fn refresh_platform(
    Deployment(cs): Deployment,
    Path(name): Path<String>,
) -> Result<Pretty<PlatformView>, ApiError> {
    let known = {
        let cs = cs.clone();
        blocking(move || cs.platforms()).await?
    };
    if !known.iter().any(|p| p.name == name) {
        return Err(no_platform(&name));
    }
    if let Some(error) = cs.refresh_platform(&name).await {
        return Err(ApiError::new(StatusCode::BAD_GATEWAY, error));
    }
    let views = blocking(move || cs.platforms()).await?;
    views
        .into_iter()
        .find(|p| p.name == name)
        .map(Pretty)
        .ok_or_else(|| no_platform(&name))
}

/// The secrets held (names and times; never values).
#[utoipa::path(
    get,
    path = "/v1/secrets",
    tag = "deployment",
    responses(
        (status = OK, description = "The secrets", body = Vec<SecretView>),
        (status = NOT_FOUND, description = "This gateway is no configuration server", body = ErrorBody),
    )
)]
pub(crate) async fn list_secrets(
    Deployment(cs): Deployment,
) -> Result<Pretty<Vec<SecretView>>, ApiError> {
    let list = blocking(move || cs.secrets()).await?;
    Ok(Pretty(list.into_iter().map(SecretView::from).collect()))
}

/// A secret as the API shows it: never its value.
#[derive(serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub(crate) struct SecretView {
    name: String,
    created_ms: u64,
    updated_ms: u64,
}

impl From<SecretInfo> for SecretView {
    fn from(s: SecretInfo) -> Self {
        SecretView {
            name: s.name,
            created_ms: s.created_ms,
            updated_ms: s.updated_ms,
        }
    }
}

fn check_secret_name(name: &str) -> Result<(), ApiError> {
    haven_pipeline::check_name(name).map_err(|why| {
        ApiError::bad_request(format!(
            "`{name}` cannot name a secret: {why}; use letters, digits, `.`, `_` and `-`"
        ))
    })
}

/// Sets a secret (the body is its value, as text); adapters that use it are loaded again.
#[utoipa::path(
    put,
    path = "/v1/secrets/{name}",
    tag = "deployment",
    params(("name" = String, Path, description = "The secret's name, as `secret:NAME` settings refer to it")),
    request_body(content = String, content_type = "text/plain", description = "The value"),
    responses(
        (status = OK, description = "Stored", body = SecretView),
        (status = BAD_REQUEST, description = "A bad name, or an empty or too long value", body = ErrorBody),
        (status = NOT_FOUND, description = "This gateway is no configuration server", body = ErrorBody),
    )
)]
pub(crate) async fn put_secret(
    Deployment(cs): Deployment,
    Path(name): Path<String>,
    value: String,
) -> Result<Pretty<SecretView>, ApiError> {
    check_secret_name(&name)?;
    // A value typed at a terminal or piped from a file ends in a newline that is not part of it.
    let value = value.strip_suffix('\n').unwrap_or(&value);
    let value = value.strip_suffix('\r').unwrap_or(value).to_owned();
    if value.is_empty() {
        return Err(ApiError::bad_request(format!(
            "secret `{name}`: the value is empty; send it as the request's body"
        )));
    }
    if value.len() > haven_store::secrets::MAX_SECRET_LEN {
        return Err(ApiError::bad_request(format!(
            "secret `{name}`: the value is {} bytes; the most is {}",
            value.len(),
            haven_store::secrets::MAX_SECRET_LEN
        )));
    }
    let info = blocking(move || cs.set_secret(&name, &value)).await?;
    Ok(Pretty(info.into()))
}

/// Deletes a secret. Adapters whose settings refer to it stop loading until it is set again.
#[utoipa::path(
    delete,
    path = "/v1/secrets/{name}",
    tag = "deployment",
    params(("name" = String, Path, description = "The secret's name")),
    responses(
        (status = OK, description = "The secret that was deleted", body = SecretView),
        (status = NOT_FOUND, description = "No such secret, or this gateway is no configuration server", body = ErrorBody),
    )
)]
pub(crate) async fn delete_secret(
    Deployment(cs): Deployment,
    Path(name): Path<String>,
) -> Result<Pretty<SecretView>, ApiError> {
    let n = name.clone();
    let deleted = blocking(move || -> anyhow::Result<Option<SecretInfo>> {
        let Some(info) = cs.secrets()?.into_iter().find(|s| s.name == n) else {
            return Ok(None);
        };
        cs.remove_secret(&n)?;
        Ok(Some(info))
    })
    .await?;
    match deleted {
        Some(info) => Ok(Pretty(info.into())),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no secret `{name}` is held here; `haven secret list` shows them"),
        )),
    }
}

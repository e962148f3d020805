//! A gateway joined to a configuration server (`[join]`): it reports every second, applies the
//! assignment it gets back, and answers the API calls the server forwards (see
//! [`haven_net::join`] for the exchanges).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use haven_net::join::{self, ApiAnswer, ApiRequest, Assignment, REPORT_INTERVAL, Report};

use crate::Identity;

/// Wait before connecting again after the connection failed.
const RECONNECT: Duration = Duration::from_secs(1);

/// Where to join.
#[derive(Clone)]
pub struct JoinConfig {
    /// The configuration server's address.
    pub server: SocketAddr,
    /// The name in its certificate.
    pub server_name: String,
    /// This gateway's identity at the configuration server's CA.
    pub identity: Identity,
}

/// What a joined gateway does for its configuration server.
pub trait JoinHandler: Send + Sync + 'static {
    /// The report to send now (its `assignment_revision` is filled in by the caller).
    fn report(&self) -> Report;
    /// Runs an assignment (a new revision).
    fn apply(&self, assignment: &Assignment);
    /// The configuration server CA's revocation list, with every answer (it may change without
    /// a new revision).
    fn crl(&self, _crl_pem: Option<&str>) {}
    /// Answers a forwarded API call.
    fn call(&self, request: ApiRequest) -> Pin<Box<dyn Future<Output = ApiAnswer> + Send>>;
}

/// Keeps the gateway joined: connects, reports, answers; reconnects after any failure. Never
/// returns.
pub async fn run(config: JoinConfig, handler: Arc<dyn JoinHandler>) {
    let mut applied = 0u64;
    loop {
        let id = &config.identity;
        let conn = match haven_net::endpoint::connect(
            config.server,
            &config.server_name,
            &id.ca_pem,
            &id.cert_pem,
            &id.key_pem,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(server = %config.server, error = %e,
                    "cannot reach the configuration server; trying again");
                tokio::time::sleep(RECONNECT).await;
                continue;
            }
        };
        tracing::info!(server = %config.server, "joined the configuration server");
        let answering = tokio::spawn(answer_calls(conn.clone(), handler.clone()));
        loop {
            let h = handler.clone();
            let mut report = match tokio::task::spawn_blocking(move || h.report()).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "building a report");
                    tokio::time::sleep(REPORT_INTERVAL).await;
                    continue;
                }
            };
            report.assignment_revision = applied;
            let request = join::Request::Report(report);
            match join::exchange::<_, Assignment>(&conn, &request, Duration::from_secs(10)).await {
                Ok(a) => {
                    // Rarely a file write (when the CRL changed).
                    tokio::task::block_in_place(|| handler.crl(a.crl_pem.as_deref()));
                    if a.revision != applied {
                        if a.revision < applied {
                            tracing::warn!(
                                revision = a.revision,
                                applied,
                                "the configuration server sends an older assignment than the \
                                 one this gateway runs (its state restored or started anew?); \
                                 running it"
                            );
                        }
                        tracing::info!(revision = a.revision, "new assignment");
                        let h = handler.clone();
                        let revision = a.revision;
                        if tokio::task::spawn_blocking(move || h.apply(&a))
                            .await
                            .is_ok()
                        {
                            applied = revision;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reporting to the configuration server");
                    if conn.close_reason().is_some() {
                        break;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(REPORT_INTERVAL) => {}
                _ = conn.closed() => break,
            }
        }
        answering.abort();
        tracing::warn!(server = %config.server, "lost the configuration server; reconnecting");
        tokio::time::sleep(RECONNECT).await;
    }
}

/// Answers the calls the configuration server forwards, each on a task of its own.
async fn answer_calls(conn: haven_net::quinn::Connection, handler: Arc<dyn JoinHandler>) {
    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            let request: ApiRequest = match join::read(&mut recv).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "a bad forwarded call");
                    return;
                }
            };
            tracing::debug!(method = %request.method, path = %request.path, caller = %request.caller,
                "forwarded call");
            let answer = handler.call(request).await;
            if let Err(e) = join::write(&mut send, &answer).await {
                tracing::debug!(error = %e, "answering a forwarded call");
            }
        });
    }
}

//! Real QUIC on 127.0.0.1: enrollment, mutual TLS, refusals, revocation, CA persistence.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use haven_net::SiteCa;
use haven_net::ca::{CaError, Validity};
use haven_net::endpoint::{self, EnrollError, Refusal, Server, ServerTls};
use rcgen::{CertificateParams, KeyPair};

const NAME: &str = "127.0.0.1";

struct Site {
    _dir: tempfile::TempDir,
    ca: Arc<Mutex<SiteCa>>,
    server: Arc<Server>,
    addr: SocketAddr,
}

/// A CA, a server with enrollment, and an echo handler on every accepted connection.
async fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = SiteCa::init(dir.path().join("ca"), "test-site").unwrap();
    let (cert_pem, key_pem) = ca.issue_server_cert(&[NAME.to_string()]).unwrap();
    let tls = ServerTls {
        cert_pem,
        key_pem,
        ca_pem: ca.ca_cert_pem().to_string(),
        crl_pems: vec![ca.crl_pem().unwrap()],
        client_ca_pems: Vec::new(),
    };
    let ca = Arc::new(Mutex::new(ca));
    let server =
        Arc::new(Server::bind("127.0.0.1:0".parse().unwrap(), tls, Some(ca.clone())).unwrap());
    let addr = server.local_addr().unwrap();
    Site {
        _dir: dir,
        ca,
        server,
        addr,
    }
}

/// Accepts one connection, echoes one stream, returns the peer identity.
fn spawn_echo(server: Arc<Server>) -> tokio::task::JoinHandle<haven_net::PeerIdentity> {
    tokio::spawn(async move {
        let conn = server.accept().await.expect("server open");
        let (mut send, mut recv) = conn.connection.accept_bi().await.unwrap();
        let data = recv.read_to_end(1 << 20).await.unwrap();
        send.write_all(&data).await.unwrap();
        send.finish().unwrap();
        let _ = conn.connection.closed().await;
        conn.peer
    })
}

/// Sends bytes on a new stream and reads the echo.
async fn echo(conn: &quinn::Connection, data: &[u8]) -> Result<Vec<u8>, quinn::ConnectionError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(data).await.map_err(|e| match e {
        quinn::WriteError::ConnectionLost(c) => c,
        other => panic!("write: {other}"),
    })?;
    send.finish().unwrap();
    recv.read_to_end(1 << 20).await.map_err(|e| match e {
        quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(c)) => c,
        other => panic!("read: {other}"),
    })
}

/// Connects with `cert`/`key` and returns the refusal the server answered with.
async fn refusal(site: &Site, ca_pem: &str, cert: &str, key: &str) -> Refusal {
    let conn = endpoint::connect(site.addr, NAME, ca_pem, cert, key).await;
    let err = match conn {
        Err(endpoint::NetError::Connection { source, .. }) => source,
        Err(e) => panic!("unexpected error {e}"),
        Ok(conn) => tokio::time::timeout(Duration::from_secs(5), echo(&conn, b"x"))
            .await
            .expect("refusal in time")
            .expect_err("connection must be refused"),
    };
    Refusal::of(&err).unwrap_or_else(|| panic!("not a refusal: {err}"))
}

fn csr(machine: &str) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, machine);
    (
        p.serialize_request(&key).unwrap().pem().unwrap(),
        key.serialize_pem(),
    )
}

#[tokio::test]
async fn enroll_connect_echo_and_peer_identity() {
    let site = site().await;
    let token = site
        .ca
        .lock()
        .unwrap()
        .create_token(Duration::from_secs(600))
        .unwrap();
    let id = endpoint::enroll(site.addr, NAME, &token.to_string(), "web01")
        .await
        .unwrap();
    assert_eq!(id.ca_pem, site.ca.lock().unwrap().ca_cert_pem());

    let echo_task = spawn_echo(site.server.clone());
    let conn = endpoint::connect(site.addr, NAME, &id.ca_pem, &id.cert_pem, &id.key_pem)
        .await
        .unwrap();
    assert_eq!(echo(&conn, b"hello haven").await.unwrap(), b"hello haven");
    conn.close(0u32.into(), b"done");
    let peer = echo_task.await.unwrap();
    assert_eq!(peer.machine_name, "web01");
    assert_eq!(peer.agent_id, id.agent_id);
}

#[tokio::test]
async fn unenrolled_clients_are_refused() {
    let site = site().await;
    let ca_pem = site.ca.lock().unwrap().ca_cert_pem().to_string();

    // No certificate at all: rustls client without client auth, ALPN haven/1.
    let mut cfg = rustls::ClientConfig::builder_with_provider(haven_net::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates({
            let mut r = rustls::RootCertStore::empty();
            r.add(
                rustls::pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes())
                    .map(|c: rustls::pki_types::CertificateDer<'static>| c)
                    .unwrap(),
            )
            .unwrap();
            r
        })
        .with_no_client_auth();
    cfg.alpn_protocols = vec![haven_net::tls::ALPN_HAVEN.to_vec()];
    let qcfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg).unwrap(),
    ));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(qcfg, site.addr, NAME)
        .unwrap()
        .await
        .unwrap();
    let err = echo(&conn, b"x").await.unwrap_err();
    assert_eq!(
        Refusal::of(&err),
        Some(Refusal::CertificateRequired),
        "{err}"
    );

    // Self-signed certificate.
    let ss = rcgen::generate_simple_self_signed(vec!["web02".to_string()]).unwrap();
    let r = refusal(
        &site,
        &ca_pem,
        &ss.cert.pem(),
        &ss.signing_key.serialize_pem(),
    )
    .await;
    assert_eq!(r, Refusal::UnknownCa);

    // A certificate from another site's CA.
    let other_dir = tempfile::tempdir().unwrap();
    let mut other = SiteCa::init(other_dir.path(), "other").unwrap();
    let (csr_pem, key_pem) = csr("web03");
    let t = other.create_token(Duration::from_secs(60)).unwrap();
    let issued = other.enroll(&t.to_string(), &csr_pem, "web03").unwrap();
    let r = refusal(&site, &ca_pem, &issued.cert_pem, &key_pem).await;
    assert_eq!(r, Refusal::UnknownCa);
}

#[tokio::test]
async fn expired_and_revoked_certs_are_refused() {
    let site = site().await;
    let ca_pem = site.ca.lock().unwrap().ca_cert_pem().to_string();

    let (csr_pem, key_pem) = csr("old01");
    let now = SystemTime::now();
    let expired = site
        .ca
        .lock()
        .unwrap()
        .issue_client_cert(
            &csr_pem,
            "old01",
            Validity {
                not_before: now - Duration::from_secs(2 * 86400),
                not_after: now - Duration::from_secs(86400),
            },
        )
        .unwrap();
    assert_eq!(
        refusal(&site, &ca_pem, &expired.cert_pem, &key_pem).await,
        Refusal::CertificateExpired
    );

    // A valid certificate works, then is refused once revoked and the CRL reloaded.
    let token = site
        .ca
        .lock()
        .unwrap()
        .create_token(Duration::from_secs(600))
        .unwrap();
    let id = endpoint::enroll(site.addr, NAME, &token.to_string(), "web04")
        .await
        .unwrap();
    let echo_task = spawn_echo(site.server.clone());
    let conn = endpoint::connect(site.addr, NAME, &id.ca_pem, &id.cert_pem, &id.key_pem)
        .await
        .unwrap();
    assert_eq!(echo(&conn, b"before").await.unwrap(), b"before");
    conn.close(0u32.into(), b"done");
    let peer = echo_task.await.unwrap();

    let crl = {
        let mut ca = site.ca.lock().unwrap();
        ca.revoke(&peer.serial).unwrap();
        assert_eq!(ca.revoked().len(), 1);
        ca.crl_pem().unwrap()
    };
    site.server.set_crls(vec![crl]).unwrap();
    assert_eq!(
        refusal(&site, &id.ca_pem, &id.cert_pem, &id.key_pem).await,
        Refusal::CertificateRevoked
    );
}

#[tokio::test]
async fn tokens_are_one_time_expire_and_pin_the_ca() {
    let site = site().await;
    let token = site
        .ca
        .lock()
        .unwrap()
        .create_token(Duration::from_secs(600))
        .unwrap()
        .to_string();
    endpoint::enroll(site.addr, NAME, &token, "web05")
        .await
        .unwrap();
    match endpoint::enroll(site.addr, NAME, &token, "web06").await {
        Err(EnrollError::Refused { kind, message }) => {
            assert_eq!(kind, "token_already_used");
            assert!(message.contains("already used"), "{message}");
        }
        other => panic!("expected reuse refusal, got {other:?}"),
    }

    let expired = site
        .ca
        .lock()
        .unwrap()
        .create_token(Duration::ZERO)
        .unwrap()
        .to_string();
    match endpoint::enroll(site.addr, NAME, &expired, "web07").await {
        Err(EnrollError::Refused { kind, .. }) => assert_eq!(kind, "token_expired"),
        other => panic!("expected expiry refusal, got {other:?}"),
    }

    // A token of another CA: the client refuses the server before sending anything.
    let other_dir = tempfile::tempdir().unwrap();
    let mut other = SiteCa::init(other_dir.path(), "other").unwrap();
    let foreign = other.create_token(Duration::from_secs(600)).unwrap();
    match endpoint::enroll(site.addr, NAME, &foreign.to_string(), "web08").await {
        Err(EnrollError::CaMismatch {
            expected,
            presented,
            ..
        }) => {
            assert_eq!(expected, foreign.ca_fingerprint);
            assert!(presented.contains(&site.ca.lock().unwrap().ca_fingerprint()));
        }
        other => panic!("expected CA mismatch, got {other:?}"),
    }
}

#[test]
fn ca_state_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca");
    let (token, used, serial, fingerprint) = {
        let mut ca = SiteCa::init(&path, "site-a").unwrap();
        let token = ca.create_token(Duration::from_secs(600)).unwrap();
        let used = ca.create_token(Duration::from_secs(600)).unwrap();
        let (csr_pem, _) = csr("db01");
        let issued = ca.enroll(&used.to_string(), &csr_pem, "db01").unwrap();
        ca.revoke(&issued.serial).unwrap();
        (token, used, issued.serial, ca.ca_fingerprint())
    };
    assert!(matches!(
        SiteCa::init(&path, "site-a"),
        Err(CaError::AlreadyInitialised { .. })
    ));
    let mut ca = SiteCa::open(&path).unwrap();
    assert_eq!(ca.site_name(), "site-a");
    assert_eq!(ca.ca_fingerprint(), fingerprint);
    assert_eq!(ca.revoked().len(), 1);
    assert_eq!(ca.revoked()[0].serial, serial);
    assert!(ca.pending_tokens().iter().any(|(id, _)| *id == token.id));
    let (csr_pem, _) = csr("db02");
    assert!(matches!(
        ca.enroll(&used.to_string(), &csr_pem, "db02"),
        Err(CaError::TokenAlreadyUsed { .. })
    ));
    ca.enroll(&token.to_string(), &csr_pem, "db02").unwrap();
    // The key is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path.join("ca.key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(matches!(
        SiteCa::open(dir.path().join("none")),
        Err(CaError::NotInitialised { .. })
    ));
}

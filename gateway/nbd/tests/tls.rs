//! TLS (`NBD_OPT_STARTTLS`, required) against real clients: nbdinfo, nbdcopy and qemu with
//! certificates from a site CA made here. A client whose certificate the CA did not sign, or
//! without one, is refused; a client without TLS is told TLS is required.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{EXPORT, FileDisk, Serving, pattern, run, run_ok, sparse_file, text};
use haven_nbd::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use haven_nbd::rustls::server::WebPkiClientVerifier;
use haven_nbd::rustls::{self, RootCertStore, ServerConfig};
use haven_nbd::{Server, Tls, proto};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A CA that signs certificates.
struct Ca {
    cert: CertificateDer<'static>,
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert: cert.der().clone(),
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate: (cert PEM, key PEM, cert DER, key DER).
    fn sign(&self, name: &str, sans: &[&str], server: bool) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        // qemu checks its own client certificate has these.
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert: cert.der().clone(),
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        }
    }
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

/// A client's certificate directory as libnbd and qemu read it.
fn client_dir(dir: &Path, name: &str, ca_pem: &str, client: Option<&Leaf>) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("ca-cert.pem"), ca_pem).unwrap();
    if let Some(c) = client {
        std::fs::write(d.join("client-cert.pem"), &c.cert_pem).unwrap();
        std::fs::write(d.join("client-key.pem"), &c.key_pem).unwrap();
    }
    d
}

/// The site's server configuration: its certificate, clients must present one the CA signed.
fn server_config(ca: &Ca, server: Leaf) -> Arc<ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert.clone()).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![server.cert, ca.cert.clone()], server.key)
        .unwrap();
    Arc::new(config)
}

/// A TLS-only server of a sparse disk, and the certificate directories: `good` (signed by the
/// site CA), `rogue` (another CA's), `none` (no client certificate).
struct Site {
    _dir: tempfile::TempDir,
    serving: Serving,
    disk: Arc<FileDisk>,
    good: PathBuf,
    rogue: PathBuf,
    none: PathBuf,
    image: PathBuf,
}

impl Site {
    fn start() -> Site {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("Haven test site CA");
        let other = Ca::new("Someone else's CA");
        let server = ca.sign("nbd server", &["localhost", "127.0.0.1"], true);
        let client = ca.sign("nbd client", &[], false);
        let stranger = other.sign("nbd client", &[], false);
        let good = client_dir(dir.path(), "good", &ca.pem, Some(&client));
        // Trusting both CAs, so that the client's own checks pass and the server refuses it.
        let both = format!("{}{}", ca.pem, other.pem);
        let rogue = client_dir(dir.path(), "rogue", &both, Some(&stranger));
        let none = client_dir(dir.path(), "none", &ca.pem, None);
        let data = [(0, MIB), (32 * MIB, 8 * MIB)];
        let image = sparse_file(dir.path(), "disk.img", SIZE, &data);
        let disk = Arc::new(FileDisk::open(&image, false));
        let tls = Tls::new(server_config(&ca, server));
        let serving = Serving::start(dir.path(), Server::new(disk.clone(), EXPORT).with_tls(tls));
        Site {
            _dir: dir,
            serving,
            disk,
            good,
            rogue,
            none,
            image,
        }
    }

    fn nbds(&self, certs: &Path) -> String {
        format!(
            "nbds://127.0.0.1:{}/{EXPORT}?tls-certificates={}",
            self.serving.tcp.port(),
            certs.display()
        )
    }

    fn qemu_object(&self, certs: &Path) -> String {
        format!(
            "tls-creds-x509,id=tls0,dir={},endpoint=client",
            certs.display()
        )
    }

    fn qemu_opts(&self) -> String {
        format!(
            "driver=nbd,host=127.0.0.1,port={},export={EXPORT},tls-creds=tls0",
            self.serving.tcp.port()
        )
    }
}

#[test]
fn nbdinfo_and_nbdcopy_with_a_site_certificate_are_served_over_tls() {
    let site = Site::start();
    let json = run_ok("nbdinfo", "libnbd-bin", &["--json", &site.nbds(&site.good)]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["TLS"], true, "{json}");
    assert_eq!(v["structured"], true, "{json}");
    assert_eq!(v["exports"][0]["export-size"], SIZE, "{json}");

    // Four connections over TLS, replies from several workers each: the copy is the same.
    site.disk
        .bytes_read
        .store(0, std::sync::atomic::Ordering::SeqCst);
    let copy = site.image.with_file_name("copy.img");
    std::fs::File::create(&copy).unwrap().set_len(SIZE).unwrap();
    run_ok(
        "nbdcopy",
        "libnbd-bin",
        &[&site.nbds(&site.good), copy.to_str().unwrap()],
    );
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(&site.image).unwrap()
    );
    assert_eq!(site.disk.read(), 9 * MIB, "only the data was read");
}

#[test]
fn qemu_with_a_site_certificate_is_served_over_tls() {
    let site = Site::start();
    let object = site.qemu_object(&site.good);
    let out = run_ok(
        "qemu-img",
        "qemu-utils",
        &[
            "info",
            "--object",
            &object,
            "--image-opts",
            &site.qemu_opts(),
        ],
    );
    assert!(out.contains("virtual size: 64 MiB"), "{out}");
    run_ok(
        "qemu-io",
        "qemu-utils",
        &[
            "--object",
            &object,
            "--image-opts",
            &site.qemu_opts(),
            "-c",
            "write -P 0x3c 8M 8M",
            "-c",
            "read -P 0x3c 8M 8M",
            "-c",
            "read -P 0 16M 16M",
            "-c",
            "flush",
        ],
    );
    let written = std::fs::read(&site.image).unwrap();
    assert!(written[8 << 20..16 << 20].iter().all(|&b| b == 0x3c));
    assert_eq!(written[..4096], pattern(0, 4096)[..]);
}

#[test]
fn clients_without_a_certificate_of_the_site_are_refused() {
    let site = Site::start();
    for (certs, what) in [
        (&site.rogue, "another CA's certificate"),
        (&site.none, "no certificate"),
    ] {
        // The client accepts the server; the server refuses the client: it sends an alert
        // and closes (with TLS 1.3 the client may find the socket closed before it reads the
        // alert).
        let out = run("nbdinfo", "libnbd-bin", &[&site.nbds(certs)]);
        assert!(
            !out.status.success(),
            "nbdinfo with {what} was served:\n{}",
            text(&out)
        );
        let object = site.qemu_object(certs);
        let args = [
            "info",
            "--object",
            &object,
            "--image-opts",
            &site.qemu_opts(),
        ];
        let out = run("qemu-img", "qemu-utils", &args);
        assert!(
            !out.status.success(),
            "qemu-img with {what} was served:\n{}",
            text(&out)
        );
        let said = text(&out);
        assert!(
            ["alert", "Broken pipe", "reset", "closed"]
                .iter()
                .any(|w| said.contains(w)),
            "qemu-img with {what}: {said}"
        );
    }
    // The server goes on serving the site's clients.
    run_ok("nbdinfo", "libnbd-bin", &[&site.nbds(&site.good)]);
}

#[test]
fn a_client_without_tls_is_told_tls_is_required() {
    let site = Site::start();
    let required = "export \"vdb\" requires TLS: connect with TLS (NBD_OPT_STARTTLS)";
    // qemu shows the server's message; libnbd logs it (its own error is generic).
    let opts = format!(
        "driver=nbd,host=127.0.0.1,port={},export={EXPORT}",
        site.serving.tcp.port()
    );
    let out = run("qemu-img", "qemu-utils", &["info", "--image-opts", &opts]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("TLS negotiation required"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains(required), "{}", text(&out));
    let plain = format!("nbd://127.0.0.1:{}/{EXPORT}", site.serving.tcp.port());
    run("nbdinfo", "libnbd-bin", &["--version"]);
    let out = std::process::Command::new("nbdinfo")
        .arg(&plain)
        .env("LIBNBD_DEBUG", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains(required), "{}", text(&out));

    // On the wire: every option but STARTTLS and ABORT is answered TLS_REQD with a message,
    // and EXPORT_NAME (which has no error reply) ends the connection.
    let mut s = TcpStream::connect(site.serving.tcp).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    for option in [proto::OPT_LIST, proto::OPT_STRUCTURED_REPLY, proto::OPT_GO] {
        let data: &[u8] = if option == proto::OPT_GO {
            &[0, 0, 0, 0, 0, 0]
        } else {
            &[]
        };
        send_option(&mut s, option, data);
        let (opt, typ, msg) = option_reply(&mut s);
        assert_eq!((opt, typ), (option, proto::REP_ERR_TLS_REQD));
        assert!(msg.contains(required), "{msg}");
    }
    send_option(&mut s, proto::OPT_EXPORT_NAME, EXPORT.as_bytes());
    let mut b = [0u8; 1];
    assert!(
        matches!(s.read(&mut b), Ok(0) | Err(_)),
        "EXPORT_NAME without TLS was served"
    );
}

fn send_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).unwrap();
}

fn option_reply(s: &mut TcpStream) -> (u32, u32, String) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[0..8], proto::REPLY_MAGIC.to_be_bytes());
    let mut d = vec![0u8; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
    s.read_exact(&mut d).unwrap();
    (
        u32::from_be_bytes(h[8..12].try_into().unwrap()),
        u32::from_be_bytes(h[12..16].try_into().unwrap()),
        String::from_utf8_lossy(&d).into_owned(),
    )
}

//! TLS on the node's port, and who a connection's client certificate says
//! it is (docs/DESIGN.md §12).
//!
//! With `--tls-cert` and `--tls-key` the whole port speaks TLS (1.2 and
//! 1.3, ALPN `http/1.1`). With `--tls-client-ca` too, a client certificate
//! is asked for and, when one is sent, verified against that CA during the
//! handshake; a client that sends none still gets in. What the verified
//! certificate names becomes the connection's [`PeerIdentity`], put into
//! every request it carries; the route guard (`api::check_request`) lets
//! only a node certificate through to the routes peers and operators use.
//!
//! A certificate names a node by a URI SAN `kvd://node/<id>` ([`NODE_URI_PREFIX`]):
//! a URI cannot be mistaken for a host name, so a certificate made for a
//! client with DNS SANs never counts as a node's. A node knows its peers
//! by URL, not id, so any node certificate of the cluster CA is a member.
//!
//! [`NodeTls`] holds what the files said when last read; SIGHUP reads them
//! again. The server and peer client configurations are made once, with a
//! certificate resolver and verifiers that ask it at every handshake, so a
//! reload reaches new connections, both ways, without a restart.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    ServerConnection, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// The URI SAN prefix that makes a certificate a node's; the node id follows.
pub const NODE_URI_PREFIX: &str = "kvd://node/";

/// Largest PEM file read (a certificate chain or a CA bundle is a few KiB).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// A TLS file that cannot be used, and why.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {why}")]
pub struct TlsError {
    pub path: String,
    pub why: String,
}

impl TlsError {
    fn new(path: &Path, why: impl Into<String>) -> TlsError {
        TlsError {
            path: path.display().to_string(),
            why: why.into(),
        }
    }
}

/// Who a connection's transport says is on the other end (a request
/// extension, set by `serve` for every request of the connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// Plain HTTP: TLS is off and the transport proves nothing.
    Plain,
    /// TLS; `node` is the node id that the client certificate (verified by
    /// the cluster CA) names, if one was sent and names a node.
    Tls { node: Option<String> },
}

/// Whether `path` is one of the routes only cluster members may call: the
/// replication and masterless traffic (`/internal/*`) and the operator's
/// commands (`/v1/admin/*`, and the old `/promote_to_primary`).
pub fn is_privileged(path: &str) -> bool {
    path.starts_with("/internal/")
        || path.starts_with("/v1/admin/")
        || path == "/promote_to_primary"
}

/// Whether a connection of `identity` may call a privileged route. With TLS
/// off everything is allowed, as before TLS existed.
pub fn may_call_privileged(identity: &PeerIdentity) -> bool {
    match identity {
        PeerIdentity::Plain => true,
        PeerIdentity::Tls { node } => node.is_some(),
    }
}

/// The node id of the first `kvd://node/<id>` URI among `uris` (a
/// certificate's URI SANs); an empty id names no node.
pub fn node_from_uris<'a>(mut uris: impl Iterator<Item = &'a str>) -> Option<String> {
    uris.find_map(|u| u.strip_prefix(NODE_URI_PREFIX).filter(|id| !id.is_empty()))
        .map(str::to_string)
}

/// The node a certificate names, if it parses and names one.
pub fn node_of(cert: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    node_from_uris(cert.valid_uri_names())
}

/// The identity of a TLS connection once its handshake is done: rustls has
/// verified any client certificate against the CA by then.
pub fn identity_of(conn: &ServerConnection) -> PeerIdentity {
    let node = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(node_of);
    PeerIdentity::Tls { node }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| TlsError::new(path, e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| TlsError::new(path, e.to_string()))?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::new(
            path,
            format!("larger than {MAX_PEM_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

/// The certificates of a PEM file: at least one, or an error saying so.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(path, format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::new(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_pem(path)?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| TlsError::new(path, format!("holds no usable PEM private key: {e}")))
}

/// The CA certificates of a PEM file, as trust roots.
pub fn read_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::new(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

/// The node's TLS files (the flags).
#[derive(Debug, Clone, Copy)]
pub struct TlsFiles<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    /// The cluster CA, which client certificates are verified against.
    pub client_ca: Option<&'a Path>,
}

/// What the TLS files held when last read: the node's certificate with
/// its key, and with a client CA the verifiers built from it.
struct Material {
    key: Arc<CertifiedKey>,
    /// Client certificates, asked for and not required.
    clients: Option<Arc<dyn ClientCertVerifier>>,
    /// Peers' server certificates (mutual TLS between peers).
    peers: Option<Arc<WebPkiServerVerifier>>,
}

impl Material {
    /// Reads every file; nothing is kept unless all of them are usable.
    fn read(files: TlsFiles<'_>) -> Result<Material, TlsError> {
        let certs = read_certs(files.cert)?;
        let key = read_key(files.key)?;
        let key = CertifiedKey::from_der(certs, key, &provider())
            .map_err(|e| TlsError::new(files.key, format!("does not fit the certificate: {e}")))?;
        let (clients, peers) = match files.client_ca {
            None => (None, None),
            Some(ca) => {
                let roots = read_roots(ca)?;
                let clients =
                    WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| TlsError::new(ca, e.to_string()))?;
                let peers = WebPkiServerVerifier::builder_with_provider(roots, provider())
                    .build()
                    .map_err(|e| TlsError::new(ca, e.to_string()))?;
                (Some(clients), Some(peers))
            }
        };
        Ok(Material {
            key: Arc::new(key),
            clients,
            peers,
        })
    }
}

/// The node's TLS, read at start and again on SIGHUP: the certificate it
/// serves and presents to peers, and the CA it verifies clients and peers
/// against. Connections made after a reload use the new files; those open
/// keep what they were made with. The server and peer client configs are
/// made once and ask this for the current material at every handshake.
pub struct NodeTls {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    client_ca: Option<std::path::PathBuf>,
    current: parking_lot::RwLock<Arc<Material>>,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeTls").field("cert", &self.cert).finish()
    }
}

impl NodeTls {
    /// Reads the files; a file that cannot be used is named with the reason.
    pub fn load(files: TlsFiles<'_>) -> Result<Arc<NodeTls>, TlsError> {
        let material = Material::read(files)?;
        Ok(Arc::new(NodeTls {
            cert: files.cert.to_path_buf(),
            key: files.key.to_path_buf(),
            client_ca: files.client_ca.map(Path::to_path_buf),
            current: parking_lot::RwLock::new(Arc::new(material)),
        }))
    }

    fn files(&self) -> TlsFiles<'_> {
        TlsFiles {
            cert: &self.cert,
            key: &self.key,
            client_ca: self.client_ca.as_deref(),
        }
    }

    /// Reads the files again. Only a set that is usable whole replaces the
    /// one in force; otherwise nothing changes and the error says why.
    pub fn reload(&self) -> Result<(), TlsError> {
        let material = Material::read(self.files())?;
        *self.current.write() = Arc::new(material);
        Ok(())
    }

    fn current(&self) -> Arc<Material> {
        self.current.read().clone()
    }

    /// The server side: the node's certificate, and with a client CA,
    /// client certificates asked for (not required) and verified.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the default protocol versions suit the default provider");
        let builder = match self.client_ca {
            None => builder.with_no_client_auth(),
            Some(_) => builder.with_client_cert_verifier(Arc::new(Clients(self.clone()))),
        };
        let mut config = builder.with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// The peer client's side of mutual TLS (with a client CA only): peers'
    /// server certificates are verified against the cluster CA, and the
    /// node's own certificate is its client certificate.
    pub fn peer_client_config(self: &Arc<Self>) -> Option<ClientConfig> {
        self.client_ca.as_ref()?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the default protocol versions suit the default provider")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Peers(self.clone())))
            .with_client_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Some(config)
    }
}

impl ResolvesServerCert for NodeTls {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }
}

impl ResolvesClientCert for NodeTls {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.current().key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The handshake-signature methods of a verifier: checked by the
/// provider's algorithms, as rustls's own verifiers do, whatever CA is in
/// force (a signature does not depend on the CA).
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algorithms().supported_schemes()
        }
    };
}

fn algorithms() -> rustls::crypto::WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// Client certificates, verified by the CA in force at the handshake.
#[derive(Debug)]
struct Clients(Arc<NodeTls>);

impl Clients {
    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        // Made only when there is a client CA, so every material has one.
        self.0.current().clients.clone().expect("a client CA")
    }
}

impl ClientCertVerifier for Clients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a client has one certificate to offer, and the hints
        // would have to outlive a reload.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()
            .verify_client_cert(end_entity, intermediates, now)
    }

    signature_checks!();
}

/// Peers' server certificates, verified by the CA in force at the
/// handshake.
#[derive(Debug)]
struct Peers(Arc<NodeTls>);

impl Peers {
    fn inner(&self) -> Arc<WebPkiServerVerifier> {
        // Made only when there is a client CA, so every material has one.
        self.0.current().peers.clone().expect("a client CA")
    }
}

impl ServerCertVerifier for Peers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner()
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    signature_checks!();
}

/// How often a failed handshake is logged at warn; the others in between
/// are counted and logged at debug, so a port scanner or a client speaking
/// plain HTTP cannot fill the log.
pub const HANDSHAKE_WARN_EVERY: Duration = Duration::from_secs(10);

/// Whether a failed handshake at `now` is logged at warn, the last one
/// having been at `last`.
pub fn should_warn(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|last| now.saturating_duration_since(last) >= HANDSHAKE_WARN_EVERY)
}

/// The rate limit of handshake failure logs, and their count
/// (`kvd_tls_handshake_failures_total`), shared by a server's connections.
pub struct HandshakeLog {
    last_warn: Mutex<Option<Instant>>,
    /// Failures since the last warn.
    quiet: AtomicU64,
    total: prometheus::IntCounter,
}

impl HandshakeLog {
    pub fn new(total: prometheus::IntCounter) -> HandshakeLog {
        HandshakeLog {
            last_warn: Mutex::new(None),
            quiet: AtomicU64::new(0),
            total,
        }
    }

    pub fn failed(&self, why: &dyn std::fmt::Display) {
        self.total.inc();
        let now = Instant::now();
        let warn = {
            let mut last = self.last_warn.lock();
            let warn = should_warn(*last, now);
            if warn {
                *last = Some(now);
            }
            warn
        };
        if warn {
            let before = self.quiet.swap(0, Ordering::Relaxed);
            tracing::warn!(error = %why, failed_since_last_warn = before, "TLS handshake failed");
        } else {
            self.quiet.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(error = %why, "TLS handshake failed");
        }
    }
}

/// A connection's socket: plain TCP, or TLS over it.
pub enum Socket {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Completes the TLS handshake of an accepted connection within `timeout`
/// (the header timeout: a handshake is the start of the first request);
/// `None` if it fails or is late, logged through `log`. The connection's
/// slot is held meanwhile, so handshakes count against the connection
/// budget like any connection.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    timeout: Duration,
    log: &HandshakeLog,
) -> Option<(Socket, PeerIdentity)> {
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let identity = identity_of(tls.get_ref().1);
            Some((Socket::Tls(Box::new(tls)), identity))
        }
        Ok(Err(e)) => {
            log.failed(&e);
            None
        }
        Err(_) => {
            log.failed(&format_args!("no handshake within {timeout:?}"));
            None
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Socket::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Socket::Plain(s) => s.is_write_vectored(),
            Socket::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_is_named_by_a_kvd_uri() {
        let uris = ["spiffe://x/y", "kvd://node/n2", "kvd://node/n3"];
        assert_eq!(node_from_uris(uris.into_iter()), Some("n2".to_string()));
        assert_eq!(node_from_uris(["kvd://node/"].into_iter()), None);
        assert_eq!(node_from_uris(["kvd://client/c1"].into_iter()), None);
        assert_eq!(node_from_uris(std::iter::empty()), None);
    }

    #[test]
    fn only_a_node_certificate_may_call_privileged_routes_over_tls() {
        assert!(
            may_call_privileged(&PeerIdentity::Plain),
            "TLS off: as before"
        );
        assert!(may_call_privileged(&PeerIdentity::Tls {
            node: Some("n1".into())
        }));
        assert!(!may_call_privileged(&PeerIdentity::Tls { node: None }));
    }

    #[test]
    fn privileged_routes_are_the_internal_and_admin_ones() {
        for p in [
            "/internal/append",
            "/internal/ml/stream",
            "/v1/admin/mode",
            "/promote_to_primary",
        ] {
            assert!(is_privileged(p), "{p}");
        }
        for p in [
            "/v1/kv/a",
            "/v1/status",
            "/internal",
            "/v1/adminx",
            "/health",
        ] {
            assert!(!is_privileged(p), "{p}");
        }
    }

    #[test]
    fn handshake_failures_warn_at_most_every_ten_seconds() {
        let t0 = Instant::now();
        assert!(should_warn(None, t0));
        assert!(!should_warn(Some(t0), t0 + Duration::from_secs(9)));
        assert!(should_warn(Some(t0), t0 + HANDSHAKE_WARN_EVERY));
    }

    #[test]
    fn a_bad_file_is_named_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let e = read_certs(&missing).unwrap_err();
        assert_eq!(e.path, missing.display().to_string());
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, b"not a certificate").unwrap();
        let e = read_certs(&garbage).unwrap_err().to_string();
        assert!(
            e.contains("garbage.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        let e = read_key(&garbage).unwrap_err().to_string();
        assert!(
            e.contains("garbage.pem") && e.contains("private key"),
            "{e}"
        );
    }
}

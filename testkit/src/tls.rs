//! TLS for the tests: a CA and certificates made with rcgen into a dir,
//! TLS nodes and a three-node mutual-TLS cluster, and clients that trust
//! the CA.
//!
//! Every certificate names `localhost` and `127.0.0.1`, so it is valid for
//! the loopback URLs the kit uses. A node's also carries the URI SAN
//! `kvd://node/<id>` that makes it a cluster member (docs/DESIGN.md §12);
//! the client's ([`CLIENT`]) carries none.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::node::REQUEST_TIMEOUT;
use crate::{free_ports, Kvd};

/// The name of the certificate that names no node (an ordinary client).
pub const CLIENT: &str = "client";

/// A dir of PEM files: `ca.pem`, and `<name>.pem` with `<name>-key.pem`
/// for each node and for [`CLIENT`].
#[derive(Debug, Clone)]
pub struct TlsDir {
    pub dir: PathBuf,
}

impl TlsDir {
    /// Makes a CA and certificates for `nodes` (ids) and [`CLIENT`] in `dir`
    /// (created if missing).
    pub fn create(dir: &Path, nodes: &[&str]) -> Result<TlsDir> {
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let mut ca = CertificateParams::new(Vec::<String>::new())?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "kvstore test CA");
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca.self_signed(&ca_key)?;
        let tls = TlsDir {
            dir: dir.to_path_buf(),
        };
        std::fs::write(tls.ca(), ca.pem())?;
        let names = nodes.iter().map(|n| (*n, true)).chain([(CLIENT, false)]);
        for (name, node) in names {
            let mut p = CertificateParams::new(vec!["localhost".to_string()])?;
            p.distinguished_name.push(DnType::CommonName, name);
            p.subject_alt_names
                .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            if node {
                let uri = format!("kvd://node/{name}");
                p.subject_alt_names.push(SanType::URI(uri.try_into()?));
            }
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate()?;
            let cert = p.signed_by(&key, &ca, &ca_key)?;
            std::fs::write(tls.cert(name), cert.pem())?;
            std::fs::write(tls.key(name), key.serialize_pem())?;
        }
        Ok(tls)
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }

    /// kvd's flags for node `id`: its certificate, and the CA for clients
    /// and peers.
    pub fn node_flags(&self, id: &str) -> Vec<String> {
        let path = |p: PathBuf| p.display().to_string();
        vec![
            "--tls-cert".into(),
            path(self.cert(id)),
            "--tls-key".into(),
            path(self.key(id)),
            "--tls-client-ca".into(),
            path(self.ca()),
        ]
    }

    /// A rustls client that trusts the CA and presents certificate
    /// `identity`, if given.
    pub fn client_config(&self, identity: Option<&str>) -> Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(self.ca())? {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some(name) => {
                let certs = CertificateDer::pem_file_iter(self.cert(name))?
                    .collect::<Result<Vec<_>, _>>()?;
                let key = PrivateKeyDer::from_pem_file(self.key(name))?;
                builder.with_client_auth_cert(certs, key)?
            }
        };
        Ok(Arc::new(config))
    }

    /// The TLS files of a kvclient that trusts the CA and presents
    /// certificate `identity`, if given.
    pub fn client_files(&self, identity: Option<&str>) -> kvclient::TlsFiles {
        kvclient::TlsFiles {
            ca: Some(self.ca()),
            cert: identity.map(|n| self.cert(n)),
            key: identity.map(|n| self.key(n)),
        }
    }

    /// An HTTPS client for status codes and bodies that trusts the CA and
    /// presents certificate `identity`, if given.
    pub fn http(&self, identity: Option<&str>) -> reqwest::Client {
        let config = self
            .client_config(identity)
            .expect("a TLS client configuration");
        reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .use_preconfigured_tls((*config).clone())
            .build()
            .expect("building an HTTPS reqwest client")
    }

    /// A kvclient over `urls` that trusts the CA (no client certificate).
    pub fn kvclient(&self, urls: &[String]) -> kvclient::Client {
        kvclient::Client::builder()
            .endpoints(urls.iter().cloned())
            .request_timeout(REQUEST_TIMEOUT)
            .retry_deadline(REQUEST_TIMEOUT)
            .tls(self.client_files(None))
            .build()
            .expect("building a kvclient")
    }
}

/// Blocking HTTPS GET over loopback with `config`: (status, body). The
/// kit's readiness check of TLS nodes, usable inside and outside async
/// runtimes, like [`crate::http_get`].
pub fn https_get(
    config: &Arc<rustls::ClientConfig>,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Vec<u8>)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut tcp = TcpStream::connect_timeout(&addr, timeout)?;
    tcp.set_read_timeout(Some(timeout))?;
    tcp.set_write_timeout(Some(timeout))?;
    let name = ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into());
    let mut conn = rustls::ClientConnection::new(config.clone(), name)?;
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    // A peer that closes without close_notify ends the read with an error
    // after the whole answer: keep what arrived.
    if let Err(e) = tls.read_to_end(&mut raw) {
        if raw.is_empty() {
            return Err(e.into());
        }
    }
    crate::parse_response(&raw)
}

/// Starts a TLS node `id` (certificate from `tls`) on a free port with data
/// dir `data_dir` and `extra` flags, once it answers `/health` over TLS.
pub fn start_node(tls: &TlsDir, id: &str, data_dir: &Path, extra: &[&str]) -> Result<Kvd> {
    let mut flags = tls.node_flags(id);
    flags.extend(["--node-id".to_string(), id.to_string()]);
    flags.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();
    let health = tls.client_config(None)?;
    // A port found free can be taken before kvd binds it; try a few.
    let mut tries = 0;
    loop {
        match Kvd::start_tls_on(crate::free_port(), data_dir, &args, health.clone()) {
            Err(e) if tries < 4 && format!("{e:#}").contains("binding") => tries += 1,
            started => return started,
        }
    }
}

/// Three nodes over mutual TLS, like [`crate::start_cluster`]: `n0`
/// bootstraps as primary, `n1` and `n2` as secondaries, peers at `https://`
/// URLs; certificates in `dir/tls`, data dirs `dir/n0` .. `dir/n2`.
pub fn start_cluster(dir: &Path, extra: &[&str]) -> Result<(TlsDir, Vec<Kvd>)> {
    let tls = TlsDir::create(&dir.join("tls"), &["n0", "n1", "n2"])?;
    let ports = free_ports(3);
    let health = tls.client_config(None)?;
    let nodes = (0..3)
        .map(|i| {
            let peers: Vec<String> = (0..3)
                .filter(|&j| j != i)
                .map(|j| format!("https://127.0.0.1:{}", ports[j]))
                .collect();
            let id = format!("n{i}");
            let mut flags = tls.node_flags(&id);
            flags.extend([
                "--node-id".to_string(),
                id.clone(),
                "--peers".into(),
                peers.join(","),
                "--role".into(),
                if i == 0 { "primary" } else { "secondary" }.into(),
            ]);
            flags.extend(extra.iter().map(|s| s.to_string()));
            let args: Vec<&str> = flags.iter().map(String::as_str).collect();
            Kvd::start_tls_on(ports[i], &dir.join(&id), &args, health.clone())
        })
        .collect::<Result<_>>()?;
    Ok((tls, nodes))
}

/// After the primary died: promotes one of the nodes at `urls` over TLS
/// with `http` (a client holding a node certificate, as `/v1/admin/*`
/// needs), the most up-to-date first, retrying while the refusals are
/// those a moment of lag explains, until `timeout`; like
/// [`crate::cluster::promote_survivor`]. Returns the position in `urls` of
/// the new primary.
pub async fn promote_survivor(
    http: &reqwest::Client,
    urls: &[String],
    timeout: Duration,
) -> Result<usize> {
    let deadline = Instant::now() + timeout;
    let mut refusals = Vec::new();
    loop {
        let mut order = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let last = match http.get(format!("{url}/v1/status")).send().await {
                Ok(r) => r.json::<serde_json::Value>().await.ok(),
                Err(_) => None,
            }
            .and_then(|s| s["last_index"].as_u64())
            .unwrap_or(0);
            order.push((last, i));
        }
        order.sort_unstable_by(|a, b| b.cmp(a));
        for (_, i) in order {
            let answer = http
                .post(format!("{}/v1/admin/promote", urls[i]))
                .json(&serde_json::json!({}))
                .send()
                .await;
            let resp = match answer {
                Ok(r) => r,
                Err(e) => {
                    refusals.push(e.to_string());
                    continue;
                }
            };
            let code = resp.status().as_u16();
            if code == 200 {
                return Ok(i);
            }
            let v: serde_json::Value = resp.json().await.unwrap_or_default();
            let why = v["error"]["code"].as_str().unwrap_or_default().to_string();
            if !["behind_peer", "no_majority", "not_enough_votes"].contains(&why.as_str()) {
                bail!("promotion refused for good: {code} {v}");
            }
            refusals.push(why);
        }
        if Instant::now() >= deadline {
            bail!("nobody could be promoted in {timeout:?}: {refusals:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

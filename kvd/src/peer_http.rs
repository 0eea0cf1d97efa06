//! The HTTP client a cluster runtime (primary/secondary or masterless)
//! talks to its peers with: peers are addressed directly (no proxy), a
//! peer that does not accept within 500 ms counts as unreachable, and every
//! request is bounded by the runtime's own timeout.
//!
//! With mutual TLS on (`use_tls`, once at start-up), every client made
//! here speaks only https, verifies a peer's server certificate against
//! the cluster CA and presents the node's own certificate. The setting is
//! the process's, not a parameter: a process is one node, and its runtimes
//! (made and remade by mode switches) all reach the same peers the same way.

use std::sync::OnceLock;
use std::time::Duration;

/// How long a peer may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// The TLS of every peer client, once set.
static TLS: OnceLock<rustls::ClientConfig> = OnceLock::new();

/// Makes every peer client from now on use mutual TLS with `config`;
/// false if a configuration was already set (it is kept).
pub fn use_tls(config: rustls::ClientConfig) -> bool {
    TLS.set(config).is_ok()
}

/// Whether peer clients use TLS.
pub fn tls_on() -> bool {
    TLS.get().is_some()
}

/// A client whose every request ends within `timeout`.
pub fn client(timeout: Duration) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(CONNECT_TIMEOUT)
        .no_proxy();
    if let Some(tls) = TLS.get() {
        builder = builder.use_preconfigured_tls(tls.clone()).https_only(true);
    }
    match builder.build() {
        Ok(client) => client,
        Err(e) => {
            // Building fails only without a TLS backend or resolver. A
            // plain-HTTP client needs neither, and the default client has
            // the same settings but the timeouts, which every caller also
            // bounds itself. Under TLS that client could not reach a peer:
            // say so, as every request will fail.
            if tls_on() {
                tracing::error!(error = %e, "cannot build the TLS client to peers");
            }
            reqwest::Client::default()
        }
    }
}

/// Posts a binary `body` (an append or a stream batch) to `path` of the
/// peer at `url`.
pub async fn post_body(
    client: &reqwest::Client,
    url: &str,
    path: &str,
    body: Vec<u8>,
) -> reqwest::Result<reqwest::Response> {
    client.post(format!("{url}{path}")).body(body).send().await
}

//! The HTTP client a cluster runtime (primary/secondary or masterless)
//! talks to its peers with: peers are addressed directly (no proxy), a
//! peer that does not accept within 500 ms counts as unreachable, and every
//! request is bounded by the runtime's own timeout.

use std::time::Duration;

/// How long a peer may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A client whose every request ends within `timeout`.
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(CONNECT_TIMEOUT)
        .no_proxy()
        .build()
        // Building fails only without a TLS backend or resolver, which a
        // plain-HTTP client never needs; the default client has the same
        // settings but the timeouts, which every caller also bounds itself.
        .unwrap_or_default()
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

//! Keys that expire and leases (docs/DESIGN.md §2.15, §2.16) over plain
//! HTTP: writes with a TTL that record when they were sent and answered
//! (the window the node's deadline lies in), the lease routes, reads that
//! do not panic on a node that is down, and one sample of `/metrics`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::api::{self, encode_value, send_following, Outcome};
use crate::http_get;

/// The wall clock in Unix milliseconds: the clock the nodes on this
/// machine stamp deadlines with.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A write with a deadline, and the window its deadline lies in: the
/// taking node read its clock after `sent_ms` and before `answered_ms`,
/// so the deadline is in `[sent_ms + ttl, answered_ms + ttl]`.
#[derive(Clone, Debug)]
pub struct Timed {
    pub sent_ms: u64,
    /// One past the answer's arrival (the clock's milliseconds truncate).
    pub answered_ms: u64,
    pub outcome: Outcome,
}

impl Timed {
    /// Before this (node clock), every key it wrote with `ttl_ms` is alive.
    pub fn alive_until(&self, ttl_ms: u64) -> u64 {
        self.sent_ms + ttl_ms
    }

    /// From this on (node clock), none of them may be read.
    pub fn dead_from(&self, ttl_ms: u64) -> u64 {
        self.answered_ms + ttl_ms
    }
}

/// Runs `write`, timing it as [`Timed`] says.
pub async fn timed<F: std::future::Future<Output = Outcome>>(write: F) -> Timed {
    let sent_ms = now_ms();
    let outcome = write.await;
    Timed {
        sent_ms,
        answered_ms: now_ms() + 1,
        outcome,
    }
}

/// A bulk item's expiry: `ttl_ms`, `lease`, `keep_ttl`, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    Never,
    Ttl(u64),
    Lease(u64),
    KeepTtl,
}

impl Expiry {
    /// The fields a bulk item or a txn put adds for it.
    pub fn fields(self, obj: &mut serde_json::Map<String, Value>) {
        match self {
            Expiry::Never => {}
            Expiry::Ttl(ms) => {
                obj.insert("ttl_ms".into(), json!(ms));
            }
            Expiry::Lease(id) => {
                obj.insert("lease".into(), json!(id));
            }
            Expiry::KeepTtl => {
                obj.insert("keep_ttl".into(), json!(true));
            }
        }
    }

    /// The query string a PUT takes for it (without `?`).
    pub fn query(self) -> String {
        match self {
            Expiry::Never => String::new(),
            Expiry::Ttl(ms) => format!("ttl_ms={ms}"),
            Expiry::Lease(id) => format!("lease={id}"),
            Expiry::KeepTtl => "keep_ttl=true".into(),
        }
    }
}

/// The body of `POST /v1/bulk` for `items`.
pub fn bulk_body(items: &[(String, Vec<u8>, Expiry)]) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|(k, v, e)| {
            let mut o = serde_json::Map::new();
            o.insert("key".into(), json!(k));
            o.insert("value".into(), encode_value(v));
            e.fields(&mut o);
            Value::Object(o)
        })
        .collect();
    json!({ "items": items })
}

/// `POST /v1/bulk` of `items` to `base`, following redirects.
pub async fn bulk(
    http: &reqwest::Client,
    base: &str,
    items: &[(String, Vec<u8>, Expiry)],
) -> Outcome {
    let body = bulk_body(items);
    let url = format!("{base}/v1/bulk");
    api::outcome(send_following(&url, |u| http.post(u).json(&body)).await).await
}

/// `PUT /v1/kv/{key}` with `expiry`, following redirects.
pub async fn put(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    value: &[u8],
    expiry: Expiry,
) -> Outcome {
    let mut url = api::key_url(base, key);
    let q = expiry.query();
    if !q.is_empty() {
        url = format!("{url}?{q}");
    }
    let body = value.to_vec();
    api::outcome(send_following(&url, |u| http.put(u).body(body.clone())).await).await
}

/// `POST /v1/leases {"ttl_ms"}`: the lease's id.
pub async fn lease_grant(http: &reqwest::Client, base: &str, ttl_ms: u64) -> Result<u64> {
    let url = format!("{base}/v1/leases");
    let body = json!({ "ttl_ms": ttl_ms });
    let v = api::outcome(send_following(&url, |u| http.post(u).json(&body)).await)
        .await
        .done("lease grant");
    v["id"].as_u64().with_context(|| format!("no id in {v}"))
}

/// A lease route's answer: (status, body).
pub async fn lease_call(
    http: &reqwest::Client,
    base: &str,
    method: reqwest::Method,
    path: &str,
) -> Result<(u16, Value)> {
    let url = format!("{base}{path}");
    let resp = send_following(&url, |u| http.request(method.clone(), u)).await?;
    let status = resp.status().as_u16();
    let body = resp.bytes().await?;
    let v = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((status, v))
}

/// `POST /v1/leases/{id}/keepalive`: (status, body).
pub async fn lease_keepalive(http: &reqwest::Client, base: &str, id: u64) -> Result<(u16, Value)> {
    let path = format!("/v1/leases/{id}/keepalive");
    lease_call(http, base, reqwest::Method::POST, &path).await
}

/// `DELETE /v1/leases/{id}`: (status, body).
pub async fn lease_revoke(http: &reqwest::Client, base: &str, id: u64) -> Result<(u16, Value)> {
    let path = format!("/v1/leases/{id}");
    lease_call(http, base, reqwest::Method::DELETE, &path).await
}

/// `GET /v1/leases/{id}` of this node (no redirect): (status, body).
pub async fn lease_info(http: &reqwest::Client, base: &str, id: u64) -> Result<(u16, Value)> {
    let resp = http.get(format!("{base}/v1/leases/{id}")).send().await?;
    let status = resp.status().as_u16();
    let v = resp.json().await.unwrap_or(Value::Null);
    Ok((status, v))
}

/// The value of the first sample named `name` (with its labels, if any:
/// `kvd_watchers_cut_total{reason="watcher_too_slow"}`) on the node's
/// `/metrics`; `None` when absent or the node does not answer.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    let (code, body) = http_get(port, "/metrics", Duration::from_secs(10)).ok()?;
    if code != 200 {
        return None;
    }
    let text = String::from_utf8(body).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// `GET /v1/status` of the node on `port`, or an error if it does not
/// answer 200 within a few seconds.
pub fn status(port: u16) -> Result<Value> {
    let (code, body) = http_get(port, "/v1/status", Duration::from_secs(10))?;
    if code != 200 {
        bail!("GET /v1/status answered {code}");
    }
    Ok(serde_json::from_slice(&body)?)
}

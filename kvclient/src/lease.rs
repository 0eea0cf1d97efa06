//! Leases (docs/DESIGN.md §2.16): a deadline shared by keys, kept alive
//! by its holder, as etcd's. [`Client::lease_grant`],
//! [`Client::lease_keepalive`], [`Client::lease_revoke`],
//! [`Client::lease_info`].
//!
//! Grants and keep-alives are retried as plain writes: a repeated one only
//! moves the deadline again, or grants a lease nobody holds, which
//! expires. A revoke is retried only after failures that wrote nothing: a
//! retry after an unknown outcome would be refused (404) by its own first
//! attempt's success, and report the opposite of what happened.

use std::time::Duration;

use bytes::Bytes;
use reqwest::Method;
use serde::{Deserialize, Serialize};

use crate::client::{decode_success, Call, Client, Retry};
use crate::error::{Error, Result};
use crate::expiry::{ttl_millis, LeaseId};

/// Answer to a grant or a keep-alive: the lease, its TTL, and the log
/// index of the record that granted or renewed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseAnswer {
    /// The lease (its grant record's index).
    pub id: LeaseId,
    /// Its TTL: the deadline is the record's stamp + this.
    pub ttl_ms: u64,
    /// The record's log index.
    pub index: u64,
}

/// Answer to a revoke: the lease and its keys went in one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeAnswer {
    /// The lease.
    pub id: LeaseId,
    /// How many keys were attached to it (and are now deleted).
    pub deleted: u64,
    /// The record's log index.
    pub index: u64,
}

/// A live lease as `GET /v1/leases/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// The lease.
    pub id: LeaseId,
    /// Its TTL.
    pub ttl_ms: u64,
    /// What is left of it on the answering node's clock.
    pub remaining_ms: u64,
    /// Its keys in byte order, at most 10000.
    pub keys: Vec<String>,
    /// Whether it has keys beyond those.
    pub more: bool,
}

#[derive(Serialize)]
struct GrantBody {
    ttl_ms: u64,
}

impl Client {
    /// Grants a lease of `ttl` (1 ms to ten years) and returns its id.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<LeaseId> {
        Ok(self.lease_grant_answer(ttl).await?.id)
    }

    /// [`Client::lease_grant`] with the whole answer.
    pub async fn lease_grant_answer(&self, ttl: Duration) -> Result<LeaseAnswer> {
        let body = GrantBody {
            ttl_ms: ttl_millis(ttl)?,
        };
        // Invariant: a struct of one number always serialises.
        #[allow(clippy::expect_used)]
        let json = serde_json::to_vec(&body).expect("grant body serialises");
        let body = (Bytes::from(json), "application/json");
        let resp = self.execute(Method::POST, "/v1/leases", Some(body)).await?;
        decode_success(resp, "lease grant response")
    }

    /// Moves lease `id`'s deadline to now + its TTL. A lease that is no
    /// longer alive is [`Error::LeaseNotFound`]: its deadline has passed,
    /// for good.
    pub async fn lease_keepalive(&self, id: LeaseId) -> Result<LeaseAnswer> {
        let path = format!("/v1/leases/{id}/keepalive");
        let resp = self.execute(Method::POST, &path, None).await?;
        decode_success(resp, "lease keepalive response")
    }

    /// Ends lease `id` and deletes its keys, in one record; returns how
    /// many keys went. [`Error::LeaseNotFound`] if it is not alive.
    pub async fn lease_revoke(&self, id: LeaseId) -> Result<u64> {
        Ok(self.lease_revoke_answer(id).await?.deleted)
    }

    /// [`Client::lease_revoke`] with the whole answer.
    pub async fn lease_revoke_answer(&self, id: LeaseId) -> Result<RevokeAnswer> {
        let path = format!("/v1/leases/{id}");
        let resp = self
            .send(Call {
                method: Method::DELETE,
                path: &path,
                body: None,
                headers: Vec::new(),
                retry: Retry::UnlessMaybeWritten,
            })
            .await?;
        decode_success(resp, "lease revoke response")
    }

    /// Lease `id` with its time left and keys, or `None` once it is not
    /// alive on the answering node.
    pub async fn lease_info(&self, id: LeaseId) -> Result<Option<LeaseInfo>> {
        let path = format!("/v1/leases/{id}");
        let resp = self.execute(Method::GET, &path, None).await?;
        match decode_success(resp, "lease info") {
            Ok(info) => Ok(Some(info)),
            Err(Error::LeaseNotFound { .. }) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_decode_as_documented() {
        let grant: LeaseAnswer =
            serde_json::from_value(json!({"id": 7, "ttl_ms": 5000, "index": 7})).unwrap();
        assert_eq!((grant.id, grant.ttl_ms, grant.index), (7, 5000, 7));
        let revoke: RevokeAnswer =
            serde_json::from_value(json!({"id": 7, "deleted": 3, "index": 12})).unwrap();
        assert_eq!(revoke.deleted, 3);
        let info: LeaseInfo = serde_json::from_value(json!(
            {"id": 7, "ttl_ms": 5000, "remaining_ms": 4200, "keys": ["a", "b"], "more": false}
        ))
        .unwrap();
        assert_eq!(
            (info.remaining_ms, info.keys.len(), info.more),
            (4200, 2, false)
        );
    }
}

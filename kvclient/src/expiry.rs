//! Keys that expire (docs/DESIGN.md §2.15): the [`Expiry`] a put may
//! carry, as a query parameter of `PUT /v1/kv/{key}` or as fields of a
//! bulk item or a transaction put.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A lease's id: the log index of the record that granted it (§2.16).
pub type LeaseId = u64;

/// The longest TTL the node takes: ten years, in milliseconds.
pub use kvproto::MAX_TTL_MS;

/// `X-KV-TTL-Ms`: the milliseconds a key has left (GET/HEAD of a key with
/// a deadline); `X-KV-Lease`: the lease a key is attached to.
pub use kvproto::header::{LEASE as LEASE_HEADER, TTL_MS as TTL_MS_HEADER};

/// What a put does to its key's deadline. A put without one makes the key
/// permanent (it clears any deadline or lease the key had).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// The key expires this long after the node takes the write (whole
    /// milliseconds, 1 ms to ten years).
    Ttl(Duration),
    /// The key lives as long as this lease (§2.16).
    Lease(LeaseId),
    /// The key keeps the deadline or lease it had (Redis `KEEPTTL`); none
    /// if it had none or did not exist.
    KeepTtl,
}

impl Expiry {
    /// A TTL of `ms` milliseconds.
    pub fn ttl_ms(ms: u64) -> Self {
        Expiry::Ttl(Duration::from_millis(ms))
    }

    /// Refuses what the node would (400 `invalid_ttl`): a TTL under 1 ms
    /// or over ten years.
    pub(crate) fn check(self) -> Result<Self> {
        if let Expiry::Ttl(ttl) = self {
            ttl_millis(ttl)?;
        }
        Ok(self)
    }

    /// The query parameter of a `PUT` (`ttl_ms=N`, `lease=ID`,
    /// `keep_ttl=true`).
    pub(crate) fn query(self) -> Result<String> {
        Ok(match self.check()? {
            Expiry::Ttl(ttl) => format!("ttl_ms={}", ttl_millis(ttl)?),
            Expiry::Lease(id) => format!("lease={id}"),
            Expiry::KeepTtl => "keep_ttl=true".to_owned(),
        })
    }

    /// The fields of a bulk item or a transaction put.
    pub(crate) fn fields(expiry: Option<Expiry>) -> Result<ExpiryFields> {
        Ok(match expiry.map(Expiry::check).transpose()? {
            None => ExpiryFields::default(),
            Some(Expiry::Ttl(ttl)) => ExpiryFields {
                ttl_ms: Some(ttl_millis(ttl)?),
                ..ExpiryFields::default()
            },
            Some(Expiry::Lease(id)) => ExpiryFields {
                lease: Some(id),
                ..ExpiryFields::default()
            },
            Some(Expiry::KeepTtl) => ExpiryFields {
                keep_ttl: true,
                ..ExpiryFields::default()
            },
        })
    }
}

/// A TTL in whole milliseconds, within the node's range; a fraction of a
/// millisecond is dropped (as the node counts).
pub(crate) fn ttl_millis(ttl: Duration) -> Result<u64> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if (1..=MAX_TTL_MS).contains(&ms) {
        Ok(ms)
    } else {
        Err(Error::InvalidRequest(format!(
            "a TTL of {ttl:?} is not within 1 ms ..= ten years ({MAX_TTL_MS} ms)"
        )))
    }
}

/// An [`Expiry`] as JSON fields beside a key and value: at most one set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiryFields {
    /// `"ttl_ms"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// `"lease"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseId>,
    /// `"keep_ttl"`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_ttl: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiries_become_their_query_parameters() {
        assert_eq!(Expiry::ttl_ms(1500).query().unwrap(), "ttl_ms=1500");
        assert_eq!(Expiry::Lease(42).query().unwrap(), "lease=42");
        assert_eq!(Expiry::KeepTtl.query().unwrap(), "keep_ttl=true");
        assert_eq!(
            Expiry::Ttl(Duration::from_micros(2_999)).query().unwrap(),
            "ttl_ms=2"
        );
    }

    #[test]
    fn a_ttl_out_of_range_is_refused_before_sending() {
        for bad in [
            Duration::ZERO,
            Duration::from_micros(999),
            Duration::from_millis(MAX_TTL_MS + 1),
        ] {
            let err = Expiry::Ttl(bad).query().unwrap_err();
            assert_eq!(err.code(), "invalid_request", "{bad:?}");
        }
        assert!(Expiry::ttl_ms(MAX_TTL_MS).query().is_ok());
        assert!(Expiry::fields(Some(Expiry::ttl_ms(0))).is_err());
    }

    #[test]
    fn expiry_fields_name_at_most_one() {
        let json = |e| serde_json::to_value(Expiry::fields(e).unwrap()).unwrap();
        assert_eq!(json(None), serde_json::json!({}));
        assert_eq!(
            json(Some(Expiry::ttl_ms(5))),
            serde_json::json!({"ttl_ms": 5})
        );
        assert_eq!(
            json(Some(Expiry::Lease(7))),
            serde_json::json!({"lease": 7})
        );
        assert_eq!(
            json(Some(Expiry::KeepTtl)),
            serde_json::json!({"keep_ttl": true})
        );
    }
}

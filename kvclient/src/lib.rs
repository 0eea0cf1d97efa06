//! Rust client for kvstore, a replicated persistent key-value store.
//!
//! One [`Client`] talks to a whole cluster through a list of endpoints: it
//! follows the primary when a secondary redirects a write (307 with
//! `X-KV-Primary`), retries connection failures, timeouts and 503s with
//! capped, jittered backoff on the next node, and bounds every call in time.
//! Values are bytes ([`bytes::Bytes`]); keys are UTF-8 strings that are
//! checked against the server's rules before anything is sent.
//!
//! ```no_run
//! # async fn demo() -> kvclient::Result<()> {
//! use std::time::Duration;
//! let client = kvclient::Client::builder()
//!     .endpoints(["http://127.0.0.1:8765", "http://127.0.0.1:8766"])
//!     .request_timeout(Duration::from_secs(2))
//!     .build()?;
//! let index = client.set("users/42/name", "Ada").await?;
//! assert_eq!(client.get("users/42/name").await?.as_deref(), Some(&b"Ada"[..]));
//! println!("written at log index {index}");
//! # Ok(())
//! # }
//! ```
//!
//! Beyond get/set/delete: [`Client::get_versioned`] reads a key's versions,
//! [`Client::put_if`] / [`Client::delete_if`] write only if a
//! [`Precondition`] holds (compare-and-swap), [`Client::list`] /
//! [`Client::range`] page through keys in order, and a [`Txn`] changes
//! several keys under conditions in one log record (docs/DESIGN.md
//! §2.10-§2.13).
//!
//! Keys may expire: [`Client::put`] with [`PutOptions`] (a TTL, a
//! lease, keep-TTL), leases ([`Client::lease_grant`] and the rest), locks
//! with fencing tokens ([`lock::Lock`]) and [`Client::watch`], a stream of
//! changes that resumes by itself (docs/DESIGN.md §2.15-§2.17, §9.1).
//!
//! [`admin::switch_mode`] switches a live cluster between primary/secondary
//! and masterless (docs/DESIGN.md §6).
//!
//! Over TLS (`https://` endpoints), [`ClientBuilder::ca_file`] names the CA
//! that the nodes' certificates must chain to, and
//! [`ClientBuilder::client_cert`] a client certificate ([`TlsFiles`],
//! docs/DESIGN.md §12).
//!
//! Code map: `admin` (mode switch orchestration), `client` (endpoints,
//! redirects, retries), `versioned` (versions, conditional writes, prefix
//! deletes), `range` (ranges and their pager), `txn` (the transaction
//! builder), `error` (the error type and its classifiers), `key` (key rules
//! and URL encoding), `wire` (the API's JSON shapes), `backoff` (retry
//! delays), `tls` (CA and client certificate files). What must match kvd comes from `kvproto`, the wire types
//! kvd itself uses: header names, error codes, the key rule, the mode and
//! the status body.

pub mod admin;
mod backoff;
mod client;
mod error;
mod expiry;
mod key;
mod lease;
pub mod lock;
mod range;
mod tls;
mod txn;
mod versioned;
mod watch;
mod wire;

pub use backoff::Backoff;
pub use client::{Client, ClientBuilder, RawResponse, DEFAULT_ENDPOINT};
pub use error::{Current, Error, KeyError, Result};
pub use expiry::{Expiry, ExpiryFields, LeaseId, LEASE_HEADER, MAX_TTL_MS, TTL_MS_HEADER};
pub use key::{encode_key, validate_key, MAX_KEY_BYTES};
pub use kvproto::code::{KEY_NOT_FOUND, PRECONDITION_FAILED};
pub use kvproto::header::{
    CREATE_INDEX as CREATE_INDEX_HEADER, MOD_INDEX as MOD_INDEX_HEADER, PRIMARY as PRIMARY_HEADER,
    RETRY_AFTER_MS as RETRY_AFTER_MS_HEADER, VERSION as VERSION_HEADER,
};
pub use lease::{LeaseAnswer, LeaseInfo, RevokeAnswer};
pub use range::{KeyRange, Pager, RangeRequest, MAX_PAGE_SIZE};
pub use tls::TlsFiles;
pub use txn::{Cmp, Compare, Operand, Target, Txn, TxnOp, MAX_TXN_OPS};
pub use versioned::{Precondition, PutOptions, Versioned};
pub use watch::{
    EventKind, Watch, WatchEvent, WatchRequest, WatchTarget, DEFAULT_MAX_EVENT_BYTES,
    DEFAULT_PROGRESS, WATCH_INDEX_HEADER,
};
pub use wire::{
    BulkItem, BulkOutcome, BulkRequest, DeleteOutcome, DeletePrefixOutcome, Item, OpResult,
    RangePage, SearchHit, SearchPage, SimilarTo, Status, TxnResponse, WireValue,
};

/// Re-exported so callers need no direct `bytes`/`reqwest` dependency for
/// values, [`Client::request`] and [`RawResponse`].
pub use bytes::Bytes;
pub use reqwest::{header::HeaderMap, Method, StatusCode};

//! WAL records: the unit of durability and of replication.
//!
//! A record is one log entry. A bulk set is ONE record, which is what makes
//! it atomic across a crash: the frame checksum covers every item at once.
//!
//! # Frame format (WAL format version 3; docs/DESIGN.md §3.3), all integers little-endian
//!
//! ```text
//! +---------+---------+--------------------------------------+
//! | len u32 | crc u32 | payload (len bytes)                  |
//! +---------+---------+--------------------------------------+
//! crc = CRC32C(len bytes ++ payload): a flipped bit in the length is caught
//! too, so a corrupt length can never make us skip over good records.
//!
//! payload:
//! +-------+-----------+-----------+------------------------------+------+
//! | op u8 | index u64 | epoch u64 | ts: ms u64, logical u32,     | body |
//! |       |           |           |     node u32                 |      |
//! +-------+-----------+-----------+------------------------------+------+
//! body by op:
//!   1 Put    key_len u32, key, value_len u32, value
//!   2 Delete key_len u32, key
//!   3 Bulk   count u32, then count x (key_len u32, key, value_len u32, value)
//!   4 Noop   (empty; a new primary's first entry in its epoch)
//!   5 Txn    count u32, then count x op: tag u8 and
//!              1 put           key_len u32, key, value_len u32, value
//!              2 delete        key_len u32, key
//!              3 delete_prefix prefix_len u32, prefix
//!              4 get           key_len u32, key
//!              5 range         start_len u32, start, has_end u8, [end_len u32, end],
//!                              limit u32, keys_only u8
//!              6 put_expiring  as put, then expiry
//!   6 PutExpiring    as Put, then expiry
//!   7 BulkExpiring   as Bulk, each item followed by its expiry (kind 0 allowed)
//!   8 Expire         count u32 (1..=1000), then count x (key_len u32, key, mod_index u64)
//!   9 LeaseGrant     ttl_ms u64
//!  10 LeaseKeepAlive id u64
//!  11 LeaseRevoke    id u64, expired u8
//!  12 Config         count u16 (1..=64), then count x (role u8: 1 voter,
//!                    2 learner, url_len u16, url UTF-8)
//! expiry: kind u8 (0 never, 1 deadline, 2 lease, 3 keep), u64
//! ```
//!
//! A write without an expiry keeps the format 2 encoding (ops 1, 3, tag 1),
//! so it costs nothing more; the expiring ops are its one encoding otherwise.
//! A Txn record is the branch a transaction chose, resolved by the node that
//! took it (its compares are not logged); its reads are logged so that the
//! node answering runs them at the record's place. Version 1 (the first
//! release) has ops 1 to 4 only, version 2 ops 1 to 5.
//!
//! The timestamp is a hybrid-logical-clock triple so that masterless mode can
//! order writes last-write-wins without changing the format; a single node
//! fills it with the wall clock.

use bytes::Bytes;

use super::Error;
use crate::model::{
    Expiry, KeyRange, RangeRead, TxnOp, MAX_EXPIRE_KEYS, MAX_RANGE_LIMIT, MAX_TTL_MS, MAX_TXN_OPS,
};

/// Bytes before the payload: length and checksum.
pub const FRAME_HEADER_BYTES: usize = 8;
/// Fixed payload prefix: op, index, epoch, timestamp.
pub const PAYLOAD_FIXED_BYTES: usize = 1 + 8 + 8 + 8 + 4 + 4;
/// Hard ceiling on one record's payload. A frame claiming more is garbage
/// (or a torn length), never something we try to allocate.
pub const MAX_PAYLOAD_BYTES: usize = 1 << 30;

pub use crate::model::{Op, Record, Timestamp};

/// The highest op code (Config).
const MAX_OP_CODE: u8 = 12;

/// Bytes an encoded [`Expiry`] takes: its kind and a u64.
const EXPIRY_BYTES: usize = 9;

/// Whether a bulk needs the format 3 op (an item with an expiry).
fn bulk_expires(items: &[(Bytes, Bytes, Expiry)]) -> bool {
    items.iter().any(|(_, _, e)| *e != Expiry::Never)
}

impl Op {
    fn code(&self) -> u8 {
        match self {
            Op::Put { expiry, .. } if *expiry != Expiry::Never => 6,
            Op::Put { .. } => 1,
            Op::Delete { .. } => 2,
            Op::Bulk { items } if bulk_expires(items) => 7,
            Op::Bulk { .. } => 3,
            Op::Noop => 4,
            Op::Txn { .. } => 5,
            Op::Expire { .. } => 8,
            Op::LeaseGrant { .. } => 9,
            Op::LeaseKeepAlive { .. } => 10,
            Op::LeaseRevoke { .. } => 11,
            Op::Config { .. } => 12,
        }
    }

    /// The oldest WAL segment version that may hold this op: a segment of
    /// an older format holding it is damage (docs/DESIGN.md §3.3).
    pub fn min_segment_version(&self) -> u32 {
        match self.code() {
            1..=4 => 1,
            5 => {
                let Op::Txn { ops } = self else { return 2 };
                let expires = ops
                    .iter()
                    .any(|op| matches!(op, TxnOp::Put { expiry, .. } if *expiry != Expiry::Never));
                if expires {
                    3
                } else {
                    2
                }
            }
            _ => 3,
        }
    }

    /// Payload bytes this op will take once encoded (for batch sizing).
    pub fn encoded_len(&self) -> usize {
        PAYLOAD_FIXED_BYTES
            + match self {
                Op::Txn { ops } => 4 + ops.iter().map(txn_op_len).sum::<usize>(),
                Op::Put { key, value, expiry } => {
                    let e = if *expiry == Expiry::Never {
                        0
                    } else {
                        EXPIRY_BYTES
                    };
                    8 + key.len() + value.len() + e
                }
                Op::Delete { key } => 4 + key.len(),
                Op::Bulk { items } => {
                    let e = if bulk_expires(items) { EXPIRY_BYTES } else { 0 };
                    4 + items
                        .iter()
                        .map(|(k, v, _)| 8 + k.len() + v.len() + e)
                        .sum::<usize>()
                }
                Op::Noop => 0,
                Op::Expire { keys } => 4 + keys.iter().map(|(k, _)| 12 + k.len()).sum::<usize>(),
                Op::LeaseGrant { .. } | Op::LeaseKeepAlive { .. } => 8,
                Op::LeaseRevoke { .. } => 9,
                Op::Config { config } => config.encoded_len(),
            }
    }
}

/// Bytes one op of a Txn record takes.
fn txn_op_len(op: &TxnOp) -> usize {
    1 + match op {
        TxnOp::Put { key, value, expiry } => {
            let e = if *expiry == Expiry::Never {
                0
            } else {
                EXPIRY_BYTES
            };
            8 + key.len() + value.len() + e
        }
        TxnOp::Delete { key } | TxnOp::Get { key } => 4 + key.len(),
        TxnOp::DeletePrefix { prefix } => 4 + prefix.len(),
        TxnOp::Range(r) => {
            4 + r.range.start.len() + 1 + r.range.end.as_ref().map_or(0, |e| 4 + e.len()) + 4 + 1
        }
    }
}

/// The smallest op of a Txn record (a tag and an empty length): what
/// bounds a count by the payload.
const MIN_TXN_OP_BYTES: usize = 5;

/// `kind u8, u64`: 0 never, 1 a deadline, 2 a lease, 3 keep.
fn put_expiry(out: &mut Vec<u8>, expiry: Expiry) {
    let (kind, n) = match expiry {
        Expiry::Never => (0u8, 0u64),
        Expiry::At(deadline) => (1, deadline),
        Expiry::Lease(id) => (2, id),
        Expiry::Keep => (3, 0),
    };
    out.push(kind);
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_txn_op(out: &mut Vec<u8>, op: &TxnOp) {
    match op {
        TxnOp::Put { key, value, expiry } => {
            let expires = *expiry != Expiry::Never;
            out.push(if expires { 6 } else { 1 });
            put_bytes(out, key);
            put_bytes(out, value);
            if expires {
                put_expiry(out, *expiry);
            }
        }
        TxnOp::Delete { key } => {
            out.push(2);
            put_bytes(out, key);
        }
        TxnOp::DeletePrefix { prefix } => {
            out.push(3);
            put_bytes(out, prefix);
        }
        TxnOp::Get { key } => {
            out.push(4);
            put_bytes(out, key);
        }
        TxnOp::Range(r) => {
            out.push(5);
            put_bytes(out, &r.range.start);
            out.push(u8::from(r.range.end.is_some()));
            if let Some(end) = &r.range.end {
                put_bytes(out, end);
            }
            out.extend_from_slice(&len_u32(r.limit).to_le_bytes());
            out.push(u8::from(r.keys_only));
        }
    }
}

impl Reader<'_> {
    /// A flag byte: 0 or 1, nothing else (one encoding per record).
    fn flag(&mut self) -> Result<bool, Error> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(Error::Decode(format!(
                "flag byte {other} is neither 0 nor 1"
            ))),
        }
    }

    /// An expiry as [`put_expiry`] wrote it; `never`: whether kind 0 may
    /// appear here (only in a BulkExpiring item: elsewhere the op without
    /// an expiry is the one encoding).
    fn expiry(&mut self, never: bool) -> Result<Expiry, Error> {
        let (kind, n) = (self.u8()?, self.u64()?);
        match (kind, n) {
            (0, 0) if never => Ok(Expiry::Never),
            (1, deadline) => Ok(Expiry::At(deadline)),
            (2, id) if id > 0 => Ok(Expiry::Lease(id)),
            (3, 0) => Ok(Expiry::Keep),
            _ => Err(Error::Decode(format!(
                "invalid expiry (kind {kind}, value {n})"
            ))),
        }
    }

    fn items(&mut self, expiring: bool) -> Result<Vec<(Bytes, Bytes, Expiry)>, Error> {
        let n = self.u32()? as usize;
        // Each item takes at least 8 bytes, which bounds `n` by the
        // payload so a corrupt count cannot make us over-allocate.
        if n > (self.buf.len() - self.pos) / 8 {
            return Err(Error::Decode("bulk item count exceeds payload".into()));
        }
        let mut items = Vec::with_capacity(n);
        for _ in 0..n {
            let (key, value) = (self.bytes()?, self.bytes()?);
            let expiry = if expiring {
                self.expiry(true)?
            } else {
                Expiry::Never
            };
            items.push((key, value, expiry));
        }
        if expiring && !bulk_expires(&items) {
            return Err(Error::Decode("an expiring bulk with no expiry".into()));
        }
        Ok(items)
    }

    fn expire(&mut self) -> Result<Op, Error> {
        let n = self.u32()? as usize;
        if n == 0 || n > MAX_EXPIRE_KEYS || n > (self.buf.len() - self.pos) / 12 {
            return Err(Error::Decode(format!(
                "expire record names {n} keys; it must name 1 to {MAX_EXPIRE_KEYS}"
            )));
        }
        let keys = (0..n)
            .map(|_| Ok((self.bytes()?, self.u64()?)))
            .collect::<Result<_, Error>>()?;
        Ok(Op::Expire { keys })
    }

    fn lease_id(&mut self) -> Result<u64, Error> {
        match self.u64()? {
            0 => Err(Error::Decode("lease id 0".into())),
            id => Ok(id),
        }
    }

    fn txn_op(&mut self) -> Result<TxnOp, Error> {
        Ok(match self.u8()? {
            1 => TxnOp::Put {
                key: self.bytes()?,
                value: self.bytes()?,
                expiry: Expiry::Never,
            },
            6 => TxnOp::Put {
                key: self.bytes()?,
                value: self.bytes()?,
                expiry: self.expiry(false)?,
            },
            2 => TxnOp::Delete { key: self.bytes()? },
            3 => TxnOp::DeletePrefix {
                prefix: self.bytes()?,
            },
            4 => TxnOp::Get { key: self.bytes()? },
            5 => {
                let start = self.bytes()?;
                let end = if self.flag()? {
                    Some(self.bytes()?)
                } else {
                    None
                };
                let limit = self.u32()? as usize;
                if !(1..=MAX_RANGE_LIMIT).contains(&limit) {
                    return Err(Error::Decode(format!(
                        "range limit {limit} is not 1..={MAX_RANGE_LIMIT}"
                    )));
                }
                TxnOp::Range(RangeRead {
                    range: KeyRange { start, end },
                    limit,
                    keys_only: self.flag()?,
                })
            }
            other => return Err(Error::Decode(format!("unknown transaction op {other}"))),
        })
    }

    fn txn(&mut self) -> Result<Op, Error> {
        let n = self.u32()? as usize;
        if n > (self.buf.len() - self.pos) / MIN_TXN_OP_BYTES {
            return Err(Error::Decode("transaction op count exceeds payload".into()));
        }
        let ops = (0..n).map(|_| self.txn_op()).collect::<Result<_, _>>()?;
        Ok(Op::Txn { ops })
    }
}

impl Record {
    /// Appends the framed record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        encode(self.index, self.epoch, self.ts, &self.op, out)
    }

    /// Decodes a payload whose checksum has already been verified.
    pub fn decode_payload(p: &[u8]) -> Result<Record, Error> {
        let mut r = Reader { buf: p, pos: 0 };
        let code = r.u8()?;
        let index = r.u64()?;
        let epoch = r.u64()?;
        let ts = Timestamp {
            physical_ms: r.u64()?,
            logical: r.u32()?,
            node: r.u32()?,
        };
        let op = match code {
            1 => Op::Put {
                key: r.bytes()?,
                value: r.bytes()?,
                expiry: Expiry::Never,
            },
            2 => Op::Delete { key: r.bytes()? },
            3 => Op::Bulk {
                items: r.items(false)?,
            },
            4 => Op::Noop,
            5 => r.txn()?,
            6 => Op::Put {
                key: r.bytes()?,
                value: r.bytes()?,
                expiry: r.expiry(false)?,
            },
            7 => Op::Bulk {
                items: r.items(true)?,
            },
            8 => r.expire()?,
            9 => match r.u64()? {
                ttl_ms @ 1..=MAX_TTL_MS => Op::LeaseGrant { ttl_ms },
                ttl_ms => return Err(Error::Decode(format!("lease TTL {ttl_ms} ms"))),
            },
            10 => Op::LeaseKeepAlive { id: r.lease_id()? },
            11 => Op::LeaseRevoke {
                id: r.lease_id()?,
                expired: r.flag()?,
            },
            12 => {
                let mut body = kvproto::bytes::Reader::new(&r.buf[r.pos..]);
                let config =
                    crate::replication::config::Config::decode(&mut body).map_err(Error::Decode)?;
                r.pos += body.offset();
                Op::Config { config }
            }
            other => return Err(Error::Decode(format!("unknown op code {other}"))),
        };
        if r.pos != p.len() {
            return Err(Error::Decode(format!(
                "{} trailing bytes after record",
                p.len() - r.pos
            )));
        }
        Ok(Record {
            index,
            epoch,
            ts,
            op,
        })
    }
}

/// Reads the start of a body that [`body_with_records`] wrote: `magic`, a
/// body of at least `fixed` bytes, and `version`. `what` names the format
/// in the errors ("append", "stream"), each a 400 for the sender.
pub fn check_body_start(
    r: &mut kvproto::bytes::Reader<'_>,
    body_len: usize,
    (magic, version): (&[u8], u32),
    fixed: usize,
    what: &str,
) -> Result<(), String> {
    if r.bytes(magic.len()) != Some(magic) || body_len < fixed {
        return Err(format!("not a kvstore {what} body"));
    }
    let found = r
        .u32()
        .ok_or_else(|| format!("{what} body ends inside its header"))?;
    if found != version {
        return Err(format!("unsupported {what} version {found}"));
    }
    Ok(())
}

/// A body of the binary formats nodes send each other (`/internal/append`,
/// `/internal/ml/stream`): the format's `magic` and `version` (u32), the
/// fixed part `head` writes, then `records` framed as in the WAL. The
/// buffer is sized for all of it at once.
pub fn body_with_records(
    magic: &[u8],
    version: u32,
    records: &[Record],
    head: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        64 + records
            .iter()
            .map(|r| r.op.encoded_len() + 8)
            .sum::<usize>(),
    );
    out.extend_from_slice(magic);
    out.extend_from_slice(&version.to_le_bytes());
    head(&mut out);
    for r in records {
        r.encode_into(&mut out);
    }
    out
}

/// Appends one framed record, built from its parts, to `out` (lets the WAL
/// writer frame an op it does not own).
pub fn encode(index: u64, epoch: u64, ts: Timestamp, op: &Op, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    out.push(op.code());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&epoch.to_le_bytes());
    out.extend_from_slice(&ts.physical_ms.to_le_bytes());
    out.extend_from_slice(&ts.logical.to_le_bytes());
    out.extend_from_slice(&ts.node.to_le_bytes());
    match op {
        Op::Txn { ops } => {
            out.extend_from_slice(&len_u32(ops.len()).to_le_bytes());
            for op in ops {
                put_txn_op(out, op);
            }
        }
        Op::Put { key, value, expiry } => {
            put_bytes(out, key);
            put_bytes(out, value);
            if *expiry != Expiry::Never {
                put_expiry(out, *expiry);
            }
        }
        Op::Delete { key } => put_bytes(out, key),
        Op::Bulk { items } => {
            let expiring = bulk_expires(items);
            out.extend_from_slice(&len_u32(items.len()).to_le_bytes());
            for (k, v, e) in items {
                put_bytes(out, k);
                put_bytes(out, v);
                if expiring {
                    put_expiry(out, *e);
                }
            }
        }
        Op::Noop => {}
        Op::Expire { keys } => {
            out.extend_from_slice(&len_u32(keys.len()).to_le_bytes());
            for (k, mod_index) in keys {
                put_bytes(out, k);
                out.extend_from_slice(&mod_index.to_le_bytes());
            }
        }
        Op::LeaseGrant { ttl_ms } => out.extend_from_slice(&ttl_ms.to_le_bytes()),
        Op::LeaseKeepAlive { id } => out.extend_from_slice(&id.to_le_bytes()),
        Op::LeaseRevoke { id, expired } => {
            out.extend_from_slice(&id.to_le_bytes());
            out.push(u8::from(*expired));
        }
        Op::Config { config } => config.encode(out),
    }
    let payload_len = out.len() - start - FRAME_HEADER_BYTES;
    assert!(
        payload_len <= MAX_PAYLOAD_BYTES,
        "record payload {payload_len} exceeds MAX_PAYLOAD_BYTES; callers bound request sizes"
    );
    let len_bytes = len_u32(payload_len).to_le_bytes();
    let mut crc = crc32c::crc32c(&len_bytes);
    crc = crc32c::crc32c_append(crc, &out[start + FRAME_HEADER_BYTES..]);
    out[start..start + 4].copy_from_slice(&len_bytes);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What one client write may carry (docs/DESIGN.md §2), from the command line.
/// A record from a peer (an append, a masterless stream or repair, a
/// snapshot) is held to the same rules before anything of it is logged:
/// a key no client could have written could never be read or deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_value_bytes: usize,
    pub max_bulk_items: usize,
}

impl Default for Limits {
    /// kvd's command-line defaults.
    fn default() -> Self {
        Limits {
            max_value_bytes: 4 << 20,
            max_bulk_items: 100_000,
        }
    }
}

/// Checks a key against docs/DESIGN.md §2: UTF-8, 1..=1024 bytes, no NUL. The one
/// key rule, for client requests and peer records alike.
pub fn validate_key(key: &[u8]) -> Result<(), String> {
    kvproto::validate_key(key).map_err(|e| e.to_string())
}

/// Checks a value's size against `limits`.
pub fn validate_value(value: &[u8], limits: &Limits) -> Result<(), String> {
    if value.len() > limits.max_value_bytes {
        return Err(format!(
            "value is {} bytes; the limit is {}",
            value.len(),
            limits.max_value_bytes
        ));
    }
    Ok(())
}

/// Checks every key and value of `op` as a client write is checked (a bulk
/// needs 1..=`max_bulk_items` items; the client API refuses an empty one).
pub fn validate_op(op: &Op, limits: &Limits) -> Result<(), String> {
    match op {
        Op::Txn { ops } => validate_txn(ops, limits),
        Op::Put { key, value, .. } => validate_key(key).and_then(|_| validate_value(value, limits)),
        Op::Delete { key } => validate_key(key),
        Op::Bulk { items } => {
            if items.is_empty() || items.len() > limits.max_bulk_items {
                return Err(format!(
                    "bulk has {} items; it must have 1 to {}",
                    items.len(),
                    limits.max_bulk_items
                ));
            }
            items.iter().enumerate().try_for_each(|(i, (k, v, _))| {
                validate_key(k)
                    .and_then(|_| validate_value(v, limits))
                    .map_err(|e| format!("items[{i}]: {e}"))
            })
        }
        Op::Noop | Op::LeaseKeepAlive { .. } | Op::LeaseRevoke { .. } => Ok(()),
        Op::Expire { keys } => {
            if keys.is_empty() || keys.len() > MAX_EXPIRE_KEYS {
                return Err(format!(
                    "expire record names {} keys; it must name 1 to {MAX_EXPIRE_KEYS}",
                    keys.len()
                ));
            }
            keys.iter().try_for_each(|(k, _)| validate_key(k))
        }
        Op::LeaseGrant { ttl_ms } => {
            if (1..=MAX_TTL_MS).contains(ttl_ms) {
                Ok(())
            } else {
                Err(format!("lease TTL {ttl_ms} ms is not 1..={MAX_TTL_MS}"))
            }
        }
        Op::Config { config } => config.validate(),
    }
}

/// A Txn record's ops as a client's transaction could give them: at most
/// [`MAX_TXN_OPS`] (masterless mode resolves a prefix delete into deletes
/// of the keys under it: those may add up to `max_bulk_items` more), valid
/// keys, prefixes that are not empty, ranges of 1 to [`MAX_RANGE_LIMIT`]
/// keys whose bounds could be keys, values within the limit.
fn validate_txn(ops: &[TxnOp], limits: &Limits) -> Result<(), String> {
    let deletes = ops
        .iter()
        .filter(|op| matches!(op, TxnOp::Delete { .. }))
        .count();
    if ops.len() - deletes > MAX_TXN_OPS || ops.len() > MAX_TXN_OPS + limits.max_bulk_items {
        return Err(format!(
            "transaction has {} ops; the limit is {MAX_TXN_OPS}",
            ops.len()
        ));
    }
    let bound = |b: &[u8]| {
        if b.is_empty() {
            Ok(())
        } else {
            validate_key(b)
        }
    };
    ops.iter().enumerate().try_for_each(|(i, op)| {
        match op {
            TxnOp::Put { key, value, .. } => {
                validate_key(key).and_then(|_| validate_value(value, limits))
            }
            TxnOp::Delete { key } | TxnOp::Get { key } => validate_key(key),
            TxnOp::DeletePrefix { prefix } => {
                validate_key(prefix).map_err(|e| format!("prefix: {e}"))
            }
            TxnOp::Range(r) => {
                if !(1..=MAX_RANGE_LIMIT).contains(&r.limit) {
                    return Err(format!(
                        "range limit {} is not 1..={MAX_RANGE_LIMIT}",
                        r.limit
                    ));
                }
                bound(&r.range.start)?;
                match &r.range.end {
                    Some(end) if end[..] < r.range.start[..] => {
                        Err("range ends before it starts".into())
                    }
                    Some(end) => validate_key(end),
                    None => Ok(()),
                }
            }
        }
        .map_err(|e| format!("ops[{i}]: {e}"))
    })
}

/// Decodes contiguous frames from `off` to the end of `buf` (a body from
/// a peer: `/internal/append`, `/internal/ml/stream`, a buckets answer),
/// holding each record to `check`. Every error names the frame's offset.
pub fn decode_frames(
    buf: &[u8],
    mut off: usize,
    check: impl Fn(&Record) -> Result<(), String>,
) -> Result<Vec<Record>, String> {
    let mut records = Vec::new();
    while off < buf.len() {
        match read_frame(buf, off) {
            Frame::Valid { payload, next } => {
                let rec = Record::decode_payload(payload)
                    .map_err(|e| format!("entry at byte {off}: {e}"))?;
                check(&rec).map_err(|e| format!("entry at byte {off}: {e}"))?;
                records.push(rec);
                off = next;
            }
            Frame::Incomplete => return Err(format!("entry at byte {off} is cut short")),
            Frame::Bad { reason } => return Err(format!("entry at byte {off}: {reason}")),
        }
    }
    Ok(records)
}

/// Outcome of looking for a frame at some offset of a buffer.
#[derive(Debug)]
pub enum Frame<'a> {
    /// A whole frame whose checksum matches; `next` is the offset after it.
    Valid { payload: &'a [u8], next: usize },
    /// The buffer ends inside the frame: what a crash mid-append leaves.
    Incomplete,
    /// The frame is all there but its length or checksum is wrong.
    Bad { reason: String },
}

/// Reads the frame starting at `off` in `buf`.
pub fn read_frame(buf: &[u8], off: usize) -> Frame<'_> {
    let rest = &buf[off..];
    if rest.len() < FRAME_HEADER_BYTES {
        return Frame::Incomplete;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if !(PAYLOAD_FIXED_BYTES..=MAX_PAYLOAD_BYTES).contains(&len) {
        return Frame::Bad {
            reason: format!("implausible record length {len}"),
        };
    }
    if rest.len() < FRAME_HEADER_BYTES + len {
        return Frame::Incomplete;
    }
    let payload = &rest[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len];
    let actual = crc32c::crc32c_append(crc32c::crc32c(&rest[0..4]), payload);
    if actual != crc {
        return Frame::Bad {
            reason: format!("checksum mismatch (stored {crc:#010x}, computed {actual:#010x})"),
        };
    }
    Frame::Valid {
        payload,
        next: off + FRAME_HEADER_BYTES + len,
    }
}

/// Cheap test of whether a valid record of index at least `min_index` starts
/// at `off`; used after a bad frame to tell a torn tail (nothing valid after
/// it) from corruption in the middle of the log (valid records after it).
pub fn valid_record_at(buf: &[u8], off: usize, min_index: u64) -> bool {
    let rest = &buf[off..];
    if rest.len() < FRAME_HEADER_BYTES + PAYLOAD_FIXED_BYTES {
        return false;
    }
    let op = rest[FRAME_HEADER_BYTES];
    if !(1..=MAX_OP_CODE).contains(&op) {
        return false;
    }
    let mut idx = [0u8; 8];
    idx.copy_from_slice(&rest[FRAME_HEADER_BYTES + 1..FRAME_HEADER_BYTES + 9]);
    let index = u64::from_le_bytes(idx);
    // Any later record has an index a little above the bad one; a window
    // keeps random bytes from passing this filter and costing a CRC.
    if index < min_index || index > min_index.saturating_add(1 << 24) {
        return false;
    }
    matches!(read_frame(buf, off), Frame::Valid { .. })
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).expect("lengths are bounded by MAX_PAYLOAD_BYTES, which fits in u32")
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&len_u32(b.len()).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Error> {
        if self.buf.len() - self.pos < n {
            return Err(Error::Decode(format!(
                "record truncated: need {n} bytes at payload offset {}",
                self.pos
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, Error> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Result<Bytes, Error> {
        let n = self.u32()? as usize;
        Ok(Bytes::copy_from_slice(self.take(n)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            index: 7,
            epoch: 2,
            ts: Timestamp {
                physical_ms: 1_700_000_000_000,
                logical: 3,
                node: 1,
            },
            op: Op::Bulk {
                items: vec![
                    (
                        Bytes::from_static(b"a"),
                        Bytes::from_static(b"1"),
                        Expiry::Never,
                    ),
                    (Bytes::from_static(b"b"), Bytes::new(), Expiry::Never),
                ],
            },
        }
    }

    #[test]
    fn round_trip_every_op() {
        let ops = [
            Op::Put {
                key: Bytes::from_static(b"k"),
                value: Bytes::from_static(b"\x00\xffv"),
                expiry: Expiry::Never,
            },
            Op::Delete {
                key: Bytes::from_static(b"k"),
            },
            sample().op,
            Op::Noop,
            txn_sample(),
        ];
        for op in ops.into_iter().chain(expiring_samples()) {
            let rec = Record { op, ..sample() };
            let mut buf = Vec::new();
            rec.encode_into(&mut buf);
            assert_eq!(buf.len(), FRAME_HEADER_BYTES + rec.op.encoded_len());
            match read_frame(&buf, 0) {
                Frame::Valid { payload, next } => {
                    assert_eq!(next, buf.len());
                    assert_eq!(Record::decode_payload(payload).unwrap(), rec);
                }
                other => panic!("expected valid frame, got {other:?}"),
            }
        }
    }

    /// One of each op and field of WAL format 3.
    fn expiring_samples() -> Vec<Op> {
        let b = Bytes::from_static;
        let put = |expiry| Op::Put {
            key: b(b"k"),
            value: b(b"v"),
            expiry,
        };
        vec![
            put(Expiry::At(1_700_000_000_500)),
            put(Expiry::Lease(9)),
            put(Expiry::Keep),
            Op::Bulk {
                items: vec![
                    (b(b"a"), b(b"1"), Expiry::Never),
                    (b(b"b"), b(b""), Expiry::At(5)),
                    (b(b"c"), b(b"3"), Expiry::Lease(u64::MAX)),
                ],
            },
            Op::Txn {
                ops: vec![
                    TxnOp::Put {
                        key: b(b"k"),
                        value: b(b"x"),
                        expiry: Expiry::Keep,
                    },
                    TxnOp::Put {
                        key: b(b"j"),
                        value: b(b""),
                        expiry: Expiry::Never,
                    },
                ],
            },
            Op::Expire {
                keys: vec![(b(b"a"), 3), (b(b"b"), u64::MAX)],
            },
            Op::LeaseGrant { ttl_ms: MAX_TTL_MS },
            Op::LeaseKeepAlive { id: 1 },
            Op::LeaseRevoke {
                id: 2,
                expired: true,
            },
            Op::LeaseRevoke {
                id: 2,
                expired: false,
            },
        ]
    }

    #[test]
    fn format_3_fields_have_one_encoding() {
        let b = Bytes::from_static;
        let at = |kind: u8, n: u64, p: &mut Vec<u8>| {
            let end = p.len();
            p[end - 9] = kind;
            p[end - 8..].copy_from_slice(&n.to_le_bytes());
        };
        let put = payload(Op::Put {
            key: b(b"k"),
            value: b(b"v"),
            expiry: Expiry::At(5),
        });
        for (kind, n) in [(0, 0), (2, 0), (3, 1), (4, 0)] {
            let mut p = put.clone();
            at(kind, n, &mut p);
            assert!(Record::decode_payload(&p).is_err(), "kind {kind}, {n}");
        }
        // A bulk of the expiring op with no expiry at all.
        let mut bulk = payload(Op::Bulk {
            items: vec![(b(b"a"), b(b"1"), Expiry::At(1))],
        });
        at(0, 0, &mut bulk);
        assert!(Record::decode_payload(&bulk).is_err());
        let bad = [
            payload(Op::LeaseGrant { ttl_ms: 0 }),
            payload(Op::LeaseGrant {
                ttl_ms: MAX_TTL_MS + 1,
            }),
            payload(Op::LeaseKeepAlive { id: 0 }),
            payload(Op::Expire { keys: vec![] }),
            payload(Op::Expire {
                keys: vec![(b(b"k"), 1); MAX_EXPIRE_KEYS + 1],
            }),
        ];
        for p in bad {
            assert!(Record::decode_payload(&p).is_err(), "op {} decoded", p[0]);
        }
        let mut revoke = payload(Op::LeaseRevoke {
            id: 1,
            expired: false,
        });
        *revoke.last_mut().unwrap() = 2;
        assert!(Record::decode_payload(&revoke).is_err());
    }

    #[test]
    fn ops_know_the_oldest_segment_format_that_may_hold_them() {
        let plain = [sample().op, Op::Noop];
        assert!(plain.iter().all(|op| op.min_segment_version() == 1));
        assert_eq!(txn_sample().min_segment_version(), 2);
        for op in expiring_samples() {
            assert_eq!(op.min_segment_version(), 3, "{op:?}");
        }
    }

    #[test]
    fn peer_expiry_records_meet_the_rules() {
        let limits = Limits::default();
        let b = Bytes::from_static;
        assert!(validate_op(&Op::Expire { keys: vec![] }, &limits).is_err());
        assert!(validate_op(
            &Op::Expire {
                keys: vec![(b(b"a\0"), 1)]
            },
            &limits
        )
        .is_err());
        assert!(validate_op(
            &Op::Expire {
                keys: vec![(b(b"a"), 1)]
            },
            &limits
        )
        .is_ok());
        assert!(validate_op(&Op::LeaseGrant { ttl_ms: 0 }, &limits).is_err());
        assert!(validate_op(&Op::LeaseGrant { ttl_ms: 1 }, &limits).is_ok());
    }

    fn txn_sample() -> Op {
        let b = Bytes::from_static;
        Op::Txn {
            ops: vec![
                TxnOp::Put {
                    key: b(b"k"),
                    value: b(b"\x00\xff"),
                    expiry: Expiry::Never,
                },
                TxnOp::Delete { key: b(b"d") },
                TxnOp::DeletePrefix { prefix: b(b"p/") },
                TxnOp::Get { key: b(b"k") },
                TxnOp::Range(RangeRead {
                    range: KeyRange {
                        start: b(b"a"),
                        end: Some(b(b"b")),
                    },
                    limit: 7,
                    keys_only: true,
                }),
                TxnOp::Range(RangeRead {
                    range: KeyRange::prefix(b""),
                    limit: MAX_RANGE_LIMIT,
                    keys_only: false,
                }),
            ],
        }
    }

    fn payload(op: Op) -> Vec<u8> {
        let mut buf = Vec::new();
        Record { op, ..sample() }.encode_into(&mut buf);
        buf.split_off(FRAME_HEADER_BYTES)
    }

    #[test]
    fn transactions_round_trip_and_their_flags_and_limits_have_one_encoding() {
        for op in [txn_sample(), Op::Txn { ops: vec![] }] {
            let p = payload(op.clone());
            assert_eq!(p.len(), op.encoded_len());
            assert_eq!(Record::decode_payload(&p).unwrap().op, op);
        }
        let one = |r: RangeRead| {
            payload(Op::Txn {
                ops: vec![TxnOp::Range(r)],
            })
        };
        let read = RangeRead {
            range: KeyRange::prefix(b"a"),
            limit: 1,
            keys_only: false,
        };
        let good = one(read.clone());
        // The op's bytes: count, tag, start (len + 1), has_end, end (len + 1),
        // limit, keys_only.
        let at = PAYLOAD_FIXED_BYTES + 4 + 1 + 5;
        let mut bad_flag = good.clone();
        bad_flag[at] = 2;
        let mut bad_keys_only = good.clone();
        *bad_keys_only.last_mut().unwrap() = 7;
        let zero = one(RangeRead {
            limit: 0,
            ..read.clone()
        });
        let over = one(RangeRead {
            limit: MAX_RANGE_LIMIT + 1,
            ..read
        });
        let mut count = good.clone();
        count[PAYLOAD_FIXED_BYTES..PAYLOAD_FIXED_BYTES + 4]
            .copy_from_slice(&u32::MAX.to_le_bytes());
        for (what, p) in [
            ("has_end 2", bad_flag),
            ("keys_only 7", bad_keys_only),
            ("limit 0", zero),
            ("limit over", over),
            ("count", count),
        ] {
            assert!(Record::decode_payload(&p).is_err(), "{what} decoded");
        }
    }

    #[test]
    fn peer_transactions_meet_the_client_rules() {
        let limits = Limits {
            max_value_bytes: 4,
            max_bulk_items: 10,
        };
        let b = |s: &'static [u8]| Bytes::from_static(s);
        let txn = |ops: Vec<TxnOp>| Op::Txn { ops };
        let range = |start: &'static [u8], end: Option<&'static [u8]>, limit| {
            TxnOp::Range(RangeRead {
                range: KeyRange {
                    start: b(start),
                    end: end.map(b),
                },
                limit,
                keys_only: false,
            })
        };
        let get = TxnOp::Get { key: b(b"k") };
        let del = TxnOp::Delete { key: b(b"k") };
        #[rustfmt::skip]
        let cases: Vec<(Op, Option<&str>)> = vec![
            (txn_sample(), None),
            (txn(vec![]), None),
            (txn(vec![range(b"", None, 1)]), None),
            (txn(vec![get.clone(); MAX_TXN_OPS]), None),
            (txn(vec![get.clone(); MAX_TXN_OPS + 1]), Some("129 ops")),
            (txn([vec![get; MAX_TXN_OPS], vec![del.clone(); 10]].concat()), None),
            (txn(vec![del; MAX_TXN_OPS + 11]), Some("139 ops")),
            (txn(vec![TxnOp::DeletePrefix { prefix: b(b"") }]), Some("ops[0]: prefix: key is empty")),
            (txn(vec![TxnOp::Put { key: b(b"k"), value: b(b"12345"), expiry: Expiry::Never }]), Some("ops[0]: value is 5 bytes")),
            (txn(vec![TxnOp::Get { key: b(b"a\0") }]), Some("NUL")),
            (txn(vec![range(b"", None, 0)]), Some("range limit 0")),
            (txn(vec![range(b"", None, MAX_RANGE_LIMIT + 1)]), Some("range limit 10001")),
            (txn(vec![range(b"b", Some(b"a"), 1)]), Some("ends before it starts")),
            (txn(vec![range(b"\xff", None, 1)]), Some("not UTF-8")),
        ];
        for (op, want) in cases {
            match (validate_op(&op, &limits), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.contains(w), "{e}"),
                (got, want) => panic!("got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut buf = Vec::new();
        sample().encode_into(&mut buf);
        for bit in 0..buf.len() * 8 {
            let mut b = buf.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            assert!(
                !matches!(read_frame(&b, 0), Frame::Valid { .. }),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn peer_records_meet_the_client_rules() {
        let limits = Limits {
            max_value_bytes: 4,
            max_bulk_items: 2,
        };
        let put = |k: &[u8], v: &[u8]| Op::Put {
            key: Bytes::copy_from_slice(k),
            value: Bytes::copy_from_slice(v),
            expiry: Expiry::Never,
        };
        let bulk = |items: &[(&'static [u8], &'static [u8])]| Op::Bulk {
            items: items
                .iter()
                .map(|(k, v)| (Bytes::from_static(k), Bytes::from_static(v), Expiry::Never))
                .collect(),
        };
        let long = vec![b'k'; kvproto::MAX_KEY_BYTES + 1];
        #[rustfmt::skip]
        let cases: Vec<(Op, Option<&str>)> = vec![
            (put(b"k", b"1234"), None),
            (put("€".as_bytes(), b""), None),
            (put(&long[1..], b""), None),
            (Op::Noop, None),
            (Op::Delete { key: Bytes::from_static(b"k") }, None),
            (bulk(&[(b"a", b"1"), (b"b", b"2")]), None),
            (put(b"", b"v"), Some("key is empty")),
            (put(&long, b"v"), Some("1025 bytes")),
            (put(b"a\0b", b"v"), Some("NUL")),
            (put(b"\xff", b"v"), Some("not UTF-8")),
            (put("€".as_bytes().split_at(2).0, b""), Some("not UTF-8")),
            (put(b"k", b"12345"), Some("value is 5 bytes")),
            (Op::Delete { key: Bytes::from_static(b"\0") }, Some("NUL")),
            (bulk(&[]), Some("0 items")),
            (bulk(&[(b"a", b""), (b"b", b""), (b"c", b"")]), Some("3 items")),
            (bulk(&[(b"a", b""), (b"\xc3", b"")]), Some("items[1]: key is not UTF-8")),
            (bulk(&[(b"a", b"123456")]), Some("items[0]: value is 6 bytes")),
        ];
        for (op, want) in cases {
            match (validate_op(&op, &limits), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.contains(w), "{op:?}: {e}"),
                (got, want) => panic!("{op:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn every_prefix_is_incomplete_or_bad() {
        let mut buf = Vec::new();
        sample().encode_into(&mut buf);
        for n in 0..buf.len() {
            assert!(matches!(read_frame(&buf[..n], 0), Frame::Incomplete));
        }
    }
}

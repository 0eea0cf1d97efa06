//! The WAL's on-disk format as the tests read it (kvd/src/storage/wal.rs and
//! record.rs), so recovery tests can find and damage a record precisely.

use std::path::{Path, PathBuf};

/// Bytes of the segment header (magic, version, reserved).
pub const SEGMENT_HEADER_BYTES: usize = 16;
/// Bytes of a frame header (len u32 LE, crc32c u32 LE).
pub const FRAME_HEADER_BYTES: usize = 8;
/// Payload prefix before the op body: op u8, index u64, epoch u64,
/// ts (ms u64, logical u32, node u32).
pub const PAYLOAD_FIXED_BYTES: usize = 1 + 8 + 8 + 8 + 4 + 4;

/// WAL segment files of a data dir as (first index, path), oldest first.
pub fn wal_segments(data_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(data_dir.join("wal"))
        .expect("listing the WAL dir")
        .filter_map(|e| {
            let path = e.expect("WAL dir entry").path();
            let name = path.file_name()?.to_str()?.to_string();
            let first = name.strip_suffix(".wal")?.parse().ok()?;
            Some((first, path))
        })
        .collect();
    out.sort();
    out
}

/// Waits until the node whose data dir is `data_dir` has deleted its first
/// WAL segment (a snapshot covered it): a peer that needs those entries
/// must then take a snapshot.
pub fn wait_first_segment_gone(data_dir: &Path, timeout: std::time::Duration) -> bool {
    let first = segment_path(data_dir, 1);
    crate::wait_until(timeout, || !first.exists())
}

/// Path of the segment whose first record has index `first`.
pub fn segment_path(data_dir: &Path, first: u64) -> PathBuf {
    data_dir.join("wal").join(format!("{first:020}.wal"))
}

/// One frame of a segment.
#[derive(Debug, Clone, Copy)]
pub struct FrameAt {
    /// Offset of the frame header in the file.
    pub offset: usize,
    /// Payload length.
    pub len: usize,
}

impl FrameAt {
    pub fn payload<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.offset + FRAME_HEADER_BYTES..self.offset + FRAME_HEADER_BYTES + self.len]
    }

    pub fn end(&self) -> usize {
        self.offset + FRAME_HEADER_BYTES + self.len
    }
}

/// Walks the frames of a whole, undamaged segment from the start, up to the
/// zeros an active segment may hold after its last record (space written
/// ahead). Checks the magic and each CRC so a misreading of the format fails
/// loudly here rather than as a puzzling kvd result.
pub fn frames(buf: &[u8]) -> Vec<FrameAt> {
    assert!(
        buf.len() >= SEGMENT_HEADER_BYTES,
        "segment shorter than its header"
    );
    assert_eq!(&buf[..8], b"KVSTWAL\0", "segment magic");
    let mut out = Vec::new();
    let mut off = SEGMENT_HEADER_BYTES;
    while off < buf.len() && buf[off..].iter().any(|&b| b != 0) {
        assert!(
            off + FRAME_HEADER_BYTES <= buf.len(),
            "partial frame header at {off}"
        );
        let len = u32::from_le_bytes(buf[off..off + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(buf[off + 4..off + 8].try_into().expect("4 bytes"));
        let end = off + FRAME_HEADER_BYTES + len;
        assert!(
            end <= buf.len(),
            "frame at {off} runs past the end of the file"
        );
        let actual = crc32c_append(crc32c(&buf[off..off + 4]), &buf[off + 8..end]);
        assert_eq!(actual, crc, "CRC of the frame at {off}");
        out.push(FrameAt { offset: off, len });
        off = end;
    }
    out
}

/// Log index stored in a record payload.
pub fn payload_index(payload: &[u8]) -> u64 {
    u64::from_le_bytes(payload[1..9].try_into().expect("8 bytes"))
}

/// Key of a Put (op 1) record payload, if it is one.
pub fn payload_put_key(payload: &[u8]) -> Option<String> {
    if payload[0] != 1 {
        return None;
    }
    let at = PAYLOAD_FIXED_BYTES;
    let n = u32::from_le_bytes(payload[at..at + 4].try_into().ok()?) as usize;
    String::from_utf8(payload[at + 4..at + 4 + n].to_vec()).ok()
}

/// CRC-32C (Castagnoli), bitwise: the tests only checksum a few KiB, and
/// this keeps the kit free of a crc32c dependency.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c_append(0, data)
}

pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
        }
    }
    !c
}

//! A little-endian reader for the binary bodies between nodes
//! (`/internal/append`, `/internal/ml/stream`): fixed-width integers and
//! length-prefixed strings, each read checked against the end of the
//! buffer, so a decoder never indexes past what it was sent.

/// Reads `buf` from the front. Every read that would pass the end returns
/// `None` and consumes nothing.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    off: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, off: 0 }
    }

    /// Bytes read so far: the offset of the next read in the buffer.
    pub fn offset(&self) -> usize {
        self.off
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.off
    }

    /// The next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.off.checked_add(n).filter(|&e| e <= self.buf.len())?;
        let out = &self.buf[self.off..end];
        self.off = end;
        Some(out)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }

    /// A `u8` that is a flag: any non-zero byte is true.
    pub fn flag(&mut self) -> Option<bool> {
        self.u8().map(|b| b != 0)
    }
}

/// Appends little-endian integers and length-prefixed strings: the writing
/// side of [`Reader`].
pub trait PutLe {
    fn put_u16(&mut self, n: u16);
    fn put_u32(&mut self, n: u32);
    fn put_u64(&mut self, n: u64);
    /// `len u16 | bytes`, cut to `u16::MAX` bytes.
    fn put_str16(&mut self, s: &str);
}

impl PutLe for Vec<u8> {
    fn put_u16(&mut self, n: u16) {
        self.extend_from_slice(&n.to_le_bytes());
    }
    fn put_u32(&mut self, n: u32) {
        self.extend_from_slice(&n.to_le_bytes());
    }
    fn put_u64(&mut self, n: u64) {
        self.extend_from_slice(&n.to_le_bytes());
    }
    fn put_str16(&mut self, s: &str) {
        let b = s.as_bytes();
        let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
        self.put_u16(n);
        self.extend_from_slice(&b[..usize::from(n)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_put_wrote_and_nothing_past_the_end() {
        let mut buf = Vec::new();
        buf.put_u16(0x0102);
        buf.put_u32(7);
        buf.put_u64(u64::MAX - 1);
        buf.put_str16("héllo");
        buf.push(2);
        let mut r = Reader::new(&buf);
        assert_eq!(r.u16(), Some(0x0102));
        assert_eq!(r.u32(), Some(7));
        assert_eq!(r.u64(), Some(u64::MAX - 1));
        let n = r.u16().unwrap();
        assert_eq!(r.bytes(n.into()), Some("héllo".as_bytes()));
        assert_eq!(r.flag(), Some(true));
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.u8(), None);
        assert_eq!(r.offset(), buf.len());
    }

    #[test]
    fn a_short_read_consumes_nothing() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u32(), None);
        assert_eq!(r.offset(), 0);
        assert_eq!(r.bytes(usize::MAX), None);
        assert_eq!(r.u16(), Some(0x0201));
    }

    #[test]
    fn a_long_string_is_cut_to_its_length_field() {
        let mut buf = Vec::new();
        buf.put_str16(&"x".repeat(70_000));
        assert_eq!(buf.len(), 2 + usize::from(u16::MAX));
    }
}

//! A connection's socket as hyper sees it, noting activity for the
//! timeouts: [`Activity`] records when the first byte of a request head
//! arrives, which the connection's timer (`serve`) needs to tell an idle
//! keep-alive connection from one that is slowly sending a head.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// What the socket has seen of the request head hyper is waiting for.
/// (Touched only from the connection's own task; atomics make it `Sync`.)
pub struct Activity {
    base: Instant,
    /// Heads hyper has started waiting for on this connection.
    heads: AtomicU64,
    /// Set when hyper starts waiting for a head, cleared by the next byte read.
    awaiting_first_byte: AtomicBool,
    /// When that byte arrived, in nanoseconds after `base`.
    first_byte_ns: AtomicU64,
}

impl Activity {
    pub fn new() -> Activity {
        Activity {
            base: Instant::now(),
            heads: AtomicU64::new(0),
            awaiting_first_byte: AtomicBool::new(false),
            first_byte_ns: AtomicU64::new(0),
        }
    }

    /// hyper starts waiting for a request head; says whether it is the
    /// connection's first.
    pub fn head_wanted(&self) -> bool {
        self.awaiting_first_byte.store(true, Ordering::Relaxed);
        self.heads.fetch_add(1, Ordering::Relaxed) == 0
    }

    fn bytes_read(&self) {
        if self.awaiting_first_byte.swap(false, Ordering::Relaxed) {
            let ns = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.first_byte_ns.store(ns, Ordering::Relaxed);
        }
    }

    /// When the first byte of the awaited head arrived, if it has.
    pub fn first_byte(&self) -> Option<Instant> {
        if self.awaiting_first_byte.load(Ordering::Relaxed) {
            return None;
        }
        let ns = self.first_byte_ns.load(Ordering::Relaxed);
        Some(self.base + Duration::from_nanos(ns))
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// The socket wrapper given to hyper.
pub struct ConnIo {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl ConnIo {
    pub fn new(stream: TcpStream, activity: Arc<Activity>) -> ConnIo {
        ConnIo { stream, activity }
    }
}

impl AsyncRead for ConnIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stream).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.activity.bytes_read();
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_byte_is_noted_once_per_head() {
        let a = Activity::new();
        assert!(a.head_wanted(), "the connection's first head");
        assert_eq!(a.first_byte(), None);
        a.bytes_read();
        let first = a.first_byte().unwrap();
        a.bytes_read();
        assert_eq!(a.first_byte(), Some(first), "later bytes do not move it");
        assert!(!a.head_wanted(), "a keep-alive connection's next head");
        assert_eq!(a.first_byte(), None);
    }
}

//! A connection's socket as hyper sees it, with two additions.
//!
//! **Activity for the timeouts.** [`Activity`] notes when the first byte of
//! a request head arrives, which the connection's timer (`serve`) needs to
//! tell an idle keep-alive connection from one that is slowly sending a
//! head.
//!
//! **JSON bodies for hyper's own error responses.** When a request head
//! cannot be parsed (too large: 431; malformed request line, header or
//! framing: 400; target too long: 414), hyper writes the answer itself,
//! before any handler runs: `HTTP/1.1 431 ...`, `connection: close`,
//! `content-length: 0` and `date`, and nothing else; then it shuts the
//! socket down and returns the parse error. There is no hook for the body.
//! So when a write is exactly such a head, [`ConnIo`] holds it back instead
//! of sending it. If hyper writes or reads again, the held bytes were not an
//! error after all (say, the tail of a value that looks like one): they go
//! out unchanged, first. If hyper shuts the socket down, the socket is
//! parked with the held bytes, and the connection task decides once hyper
//! has returned: a parse error means the held head was hyper's error
//! response, which goes out with a JSON body ([`json_error_response`]);
//! anything else sends the held bytes as they were. So a response is only
//! ever rewritten on hyper's own word that it was an error response.

use kvproto::code;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
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

/// The socket and what hyper wrote last, parked when hyper shut the
/// connection down while the held bytes were not yet sent.
pub struct Parked<S = TcpStream> {
    pub stream: S,
    pub held: Vec<u8>,
}

/// The slot a connection's task reads [`Parked`] from.
pub type ParkedSlot<S = TcpStream> = Arc<Mutex<Option<Parked<S>>>>;

/// The socket wrapper given to hyper; `S` is the socket (a TCP stream, or
/// a TLS stream over one).
pub struct ConnIo<S = TcpStream> {
    /// `None` once parked.
    stream: Option<S>,
    activity: Arc<Activity>,
    /// A write that looked like one of hyper's error responses, not sent yet.
    held: Vec<u8>,
    parked: ParkedSlot<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> ConnIo<S> {
    pub fn new(stream: S, activity: Arc<Activity>, parked: ParkedSlot<S>) -> ConnIo<S> {
        ConnIo {
            stream: Some(stream),
            activity,
            held: Vec::new(),
            parked,
        }
    }

    /// Sends the held bytes as they are: hyper carried on, so they were
    /// part of an ordinary response.
    fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.held.is_empty() {
            let Some(s) = self.stream.as_mut() else {
                return Poll::Ready(Err(io::ErrorKind::NotConnected.into()));
            };
            let n = ready!(Pin::new(s).poll_write(cx, &self.held))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.held.drain(..n);
        }
        Poll::Ready(Ok(()))
    }

    fn stream(&mut self) -> io::Result<Pin<&mut S>> {
        match self.stream.as_mut() {
            Some(s) => Ok(Pin::new(s)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for ConnIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        let before = buf.filled().len();
        ready!(this.stream()?.poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.activity.bytes_read();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ConnIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        if auto_error_status(buf).is_some() {
            this.held.extend_from_slice(buf);
            return Poll::Ready(Ok(buf.len()));
        }
        this.stream()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_release(cx))?;
        // hyper's error response is a head alone, in one buffer.
        let mut nonempty = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (nonempty.next(), nonempty.next()) {
            if auto_error_status(only).is_some() {
                this.held.extend_from_slice(only);
                return Poll::Ready(Ok(only.len()));
            }
        }
        this.stream()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // Keeps hyper queueing body buffers instead of copying them.
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Held bytes stay held: hyper flushes right after writing its error.
        let this = self.get_mut();
        match this.stream.as_mut() {
            Some(s) => Pin::new(s).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.held.is_empty() {
            if let Some(stream) = this.stream.take() {
                let held = std::mem::take(&mut this.held);
                *this.parked.lock() = Some(Parked { stream, held });
            }
            return Poll::Ready(Ok(()));
        }
        match this.stream.as_mut() {
            Some(s) => Pin::new(s).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Longest the connection task spends sending a parked answer.
const FINISH_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends what was parked: the JSON form of hyper's error response if
/// hyper's connection ended with a parse error, else the held bytes.
pub async fn finish_parked<S: AsyncWrite + Unpin>(
    parked: Parked<S>,
    error: Option<&hyper::Error>,
    limits: &HeadLimits,
) {
    let Parked { mut stream, held } = parked;
    let out = match error {
        Some(e) if e.is_parse() => json_error_response(&held, &e.to_string(), limits),
        _ => None,
    }
    .unwrap_or(held);
    let _ = tokio::time::timeout(FINISH_TIMEOUT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}

/// The statuses hyper answers a head it cannot parse with.
const AUTO_ERROR_STATUSES: [&[u8]; 3] = [b"400", b"414", b"431"];

/// If `b` is exactly one of hyper's own error responses (status line, then
/// only `connection: close`, `content-length: 0` and `date` headers, then
/// the blank line and nothing more), its status.
pub fn auto_error_status(b: &[u8]) -> Option<u16> {
    // Every ordinary response fails one of these first tests.
    if b.len() < 16 || b.get(9) != Some(&b'4') || !b.starts_with(b"HTTP/1.1 ") {
        return None;
    }
    let head = b.strip_suffix(b"\r\n\r\n")?;
    let mut lines = head.split(|&c| c == b'\n');
    let status_line = lines.next()?.strip_suffix(b"\r")?;
    let status = status_line.get(9..12)?;
    if !AUTO_ERROR_STATUSES.contains(&status) || status_line.get(12) != Some(&b' ') {
        return None;
    }
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let known = line == b"connection: close"
            || line == b"content-length: 0"
            || line.starts_with(b"date: ");
        if !known {
            return None;
        }
    }
    std::str::from_utf8(status).ok()?.parse().ok()
}

/// The limits named in a 431's message.
#[derive(Debug, Clone, Copy)]
pub struct HeadLimits {
    pub max_head_bytes: usize,
    pub max_headers: usize,
}

/// hyper's error response `head` with a JSON error body; `detail` is
/// hyper's description of the parse error. `None` if `head` is not one.
pub fn json_error_response(head: &[u8], detail: &str, limits: &HeadLimits) -> Option<Vec<u8>> {
    let status = auto_error_status(head)?;
    let (code, message) = match status {
        431 => (
            code::HEADERS_TOO_LARGE,
            format!(
                "the request line and headers exceed {} bytes or {} header fields",
                limits.max_head_bytes, limits.max_headers
            ),
        ),
        414 => (
            code::URI_TOO_LONG,
            "the request target is too long".to_string(),
        ),
        _ => (
            code::MALFORMED_REQUEST,
            format!("the request is not valid HTTP/1.1: {detail}"),
        ),
    };
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let text = std::str::from_utf8(head).ok()?;
    let status_line = text.lines().next()?;
    let date = text.lines().find(|l| l.starts_with("date: "));
    let mut out = format!(
        "{status_line}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n",
        body.len()
    );
    if let Some(date) = date {
        out.push_str(date);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&body);
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: HeadLimits = HeadLimits {
        max_head_bytes: 65536,
        max_headers: 100,
    };

    /// What hyper 1.x writes for a head too large, byte for byte.
    const HYPER_431: &[u8] =
        b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\
        content-length: 0\r\ndate: Tue, 01 Dec 2026 21:54:25 GMT\r\n\r\n";
    const HYPER_400: &[u8] = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\
        content-length: 0\r\ndate: Tue, 01 Dec 2026 21:54:25 GMT\r\n\r\n";

    #[test]
    fn hyper_error_heads_are_recognised() {
        assert_eq!(auto_error_status(HYPER_431), Some(431));
        assert_eq!(auto_error_status(HYPER_400), Some(400));
    }

    #[test]
    fn ordinary_responses_are_not() {
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\
            content-length: 52\r\ndate: Tue, 01 Dec 2026 21:54:25 GMT\r\n\r\n";
        assert_eq!(
            auto_error_status(ours),
            None,
            "a handler's error has a body"
        );
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(auto_error_status(ok), None);
        let not_found = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(auto_error_status(not_found), None);
        let mut with_tail = HYPER_400.to_vec();
        with_tail.extend_from_slice(b"x");
        assert_eq!(auto_error_status(&with_tail), None, "bytes after the head");
        assert_eq!(auto_error_status(&HYPER_400[..40]), None, "half a head");
        assert_eq!(auto_error_status(b""), None);
    }

    #[test]
    fn the_json_answer_keeps_status_and_date_and_carries_the_body() {
        let out = json_error_response(HYPER_431, "message head is too large", &LIMITS).unwrap();
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains("\r\ncontent-type: application/json"));
        assert!(head.contains(&format!("\r\ncontent-length: {}", body.len())));
        assert!(head.contains("\r\nconnection: close"));
        assert!(head.contains("\r\ndate: Tue, 01 Dec 2026 21:54:25 GMT"));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "headers_too_large");
        assert!(v["error"]["message"].as_str().unwrap().contains("65536"));
    }

    #[test]
    fn a_malformed_request_names_what_hyper_found() {
        let out = json_error_response(HYPER_400, "invalid content-length parsed", &LIMITS).unwrap();
        let text = String::from_utf8(out).unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1;
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "malformed_request");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid content-length parsed"));
    }

    /// A connected pair on loopback: (kvd's side, the client's side).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (l.accept().await.unwrap().0, client)
    }

    async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await.unwrap();
        buf
    }

    #[tokio::test]
    async fn held_bytes_go_out_unchanged_when_hyper_writes_again() {
        let (server, mut client) = pair().await;
        let mut io = ConnIo::new(server, Arc::default(), ParkedSlot::default());
        io.write_all(HYPER_400).await.unwrap();
        io.flush().await.unwrap();
        io.write_all(b"more").await.unwrap();
        io.flush().await.unwrap();
        let got = read_n(&mut client, HYPER_400.len() + 4).await;
        assert_eq!(&got[..HYPER_400.len()], HYPER_400);
        assert_eq!(&got[HYPER_400.len()..], b"more");
    }

    #[tokio::test]
    async fn held_bytes_go_out_unchanged_when_hyper_reads_again() {
        use tokio::io::AsyncReadExt;
        let (server, mut client) = pair().await;
        let mut io = ConnIo::new(server, Arc::default(), ParkedSlot::default());
        io.write_all(HYPER_400).await.unwrap();
        io.flush().await.unwrap();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            io.read_exact(&mut buf).await.unwrap();
            buf
        });
        assert_eq!(read_n(&mut client, HYPER_400.len()).await, HYPER_400);
        client.write_all(b"x").await.unwrap();
        assert_eq!(&reader.await.unwrap(), b"x");
    }

    #[tokio::test]
    async fn a_shutdown_parks_the_held_bytes_which_go_out_as_they_were_without_a_parse_error() {
        use tokio::io::AsyncReadExt;
        let (server, mut client) = pair().await;
        let parked = ParkedSlot::default();
        let mut io = ConnIo::new(server, Arc::default(), parked.clone());
        io.write_all(HYPER_431).await.unwrap();
        io.flush().await.unwrap();
        io.shutdown().await.unwrap();
        let p = parked.lock().take().expect("parked");
        finish_parked(p, None, &LIMITS).await;
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, HYPER_431);
    }

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

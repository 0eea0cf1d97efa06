//! Watches (docs/DESIGN.md §2.17) for the end-to-end tests and the
//! benchmarks: a stream read event by event over a raw socket
//! ([`RawWatch`], which is also the stalled consumer when the test simply
//! stops reading it), and `kvclient watch --json` as a subprocess whose
//! events a thread collects ([`CliWatch`]).
//!
//! The raw reader decodes HTTP/1.1 chunked framing itself, so a test sees
//! exactly what the node sent, line by line, with a timeout on every wait.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::bin;

/// The head of a watch's answer is at most this long.
const MAX_HEAD: usize = 64 * 1024;
/// One event line is at most this long (a value is at most a few MiB).
const MAX_LINE: usize = 64 * 1024 * 1024;

/// Where the chunked decoder is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// Waiting for a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes left.
    Data(usize),
    /// After a chunk's data, waiting for its CRLF.
    DataEnd,
    /// The last chunk came: the stream ended cleanly.
    Done,
    /// Not chunked: the body runs to the connection's end.
    Plain,
}

/// One `GET /v1/watch` over its own connection.
pub struct RawWatch {
    sock: TcpStream,
    /// The answer's status code.
    pub status: u16,
    /// The answer's headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Bytes read off the socket, not yet decoded.
    raw: Vec<u8>,
    /// Decoded body bytes not yet returned as lines.
    body: Vec<u8>,
    framing: Framing,
    eof: bool,
}

impl RawWatch {
    /// Sends `GET /v1/watch?{query}` (with `extra` header lines, each
    /// `Name: value`) to the node on `port` and reads the answer's head.
    pub fn open(port: u16, query: &str, extra: &[&str], timeout: Duration) -> Result<RawWatch> {
        let sock = TcpStream::connect(("127.0.0.1", port)).context("connecting to kvd")?;
        sock.set_nodelay(true)?;
        sock.set_write_timeout(Some(timeout))?;
        let mut head = format!("GET /v1/watch?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
        for h in extra {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        (&sock).write_all(head.as_bytes())?;
        let mut w = RawWatch {
            sock,
            status: 0,
            headers: Vec::new(),
            raw: Vec::new(),
            body: Vec::new(),
            framing: Framing::Plain,
            eof: false,
        };
        w.read_head(Instant::now() + timeout)?;
        Ok(w)
    }

    /// The value of header `name` (lower case), if the answer has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn read_head(&mut self, deadline: Instant) -> Result<()> {
        let end = loop {
            if let Some(p) = find(&self.raw, b"\r\n\r\n") {
                break p;
            }
            if self.raw.len() > MAX_HEAD {
                bail!("answer head over {MAX_HEAD} bytes");
            }
            if self.fill(deadline)? == 0 {
                bail!("connection closed before the answer's head");
            }
        };
        let head = String::from_utf8_lossy(&self.raw[..end]).into_owned();
        self.raw.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        self.status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line {status_line:?}"))?;
        for l in lines {
            if let Some((n, v)) = l.split_once(':') {
                self.headers
                    .push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        let chunked = self
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        self.framing = if chunked {
            Framing::Size
        } else {
            Framing::Plain
        };
        Ok(())
    }

    /// Reads more bytes off the socket, waiting until `deadline`; 0 at the
    /// connection's end.
    fn fill(&mut self, deadline: Instant) -> Result<usize> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("timed out waiting for the watch");
        }
        self.sock.set_read_timeout(Some(left))?;
        let mut b = [0u8; 64 * 1024];
        match self.sock.read(&mut b) {
            Ok(n) => {
                self.raw.extend_from_slice(&b[..n]);
                if n == 0 {
                    self.eof = true;
                }
                Ok(n)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("timed out waiting for the watch")
            }
            Err(e) => Err(e).context("reading the watch"),
        }
    }

    /// Moves what `raw` holds of the body into `body`, by the framing.
    fn decode(&mut self) -> Result<()> {
        loop {
            match self.framing {
                Framing::Plain => {
                    self.body.append(&mut self.raw);
                    return Ok(());
                }
                Framing::Done => return Ok(()),
                Framing::Size => {
                    let Some(p) = find(&self.raw, b"\r\n") else {
                        return Ok(());
                    };
                    let line = String::from_utf8_lossy(&self.raw[..p]).into_owned();
                    let hex = line.split(';').next().unwrap_or_default().trim();
                    let size = usize::from_str_radix(hex, 16)
                        .with_context(|| format!("bad chunk size {line:?}"))?;
                    self.raw.drain(..p + 2);
                    self.framing = if size == 0 {
                        Framing::Done
                    } else {
                        Framing::Data(size)
                    };
                }
                Framing::Data(n) => {
                    if self.raw.is_empty() {
                        return Ok(());
                    }
                    let k = n.min(self.raw.len());
                    self.body.extend(self.raw.drain(..k));
                    self.framing = if k == n {
                        Framing::DataEnd
                    } else {
                        Framing::Data(n - k)
                    };
                }
                Framing::DataEnd => {
                    if self.raw.len() < 2 {
                        return Ok(());
                    }
                    self.raw.drain(..2);
                    self.framing = Framing::Size;
                }
            }
        }
    }

    /// The next line of the body (without its newline), waiting until
    /// `timeout`; `None` once the stream has ended.
    pub fn next_line(&mut self, timeout: Duration) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            self.decode()?;
            if let Some(p) = self.body.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.body.drain(..=p).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            if self.body.len() > MAX_LINE {
                bail!("a watch line over {MAX_LINE} bytes");
            }
            if self.framing == Framing::Done || self.eof {
                return Ok(None);
            }
            self.fill(deadline)?;
        }
    }

    /// The next event, waiting until `timeout` (an error if none comes);
    /// `None` once the stream has ended. Blank lines are skipped.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Value>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(line) = self.next_line(left)? else {
                return Ok(None);
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            return serde_json::from_slice(&line).with_context(|| {
                format!(
                    "a watch line is not JSON: {}",
                    String::from_utf8_lossy(&line)
                )
            });
        }
    }

    /// The events until the first one `stop` accepts (included), waiting
    /// at most `timeout` in all.
    pub fn events_until(
        &mut self,
        timeout: Duration,
        mut stop: impl FnMut(&Value) -> bool,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left)? {
                Some(e) => {
                    let done = stop(&e);
                    out.push(e);
                    if done {
                        return Ok(out);
                    }
                }
                None => bail!("the watch ended before the awaited event; got {out:?}"),
            }
        }
    }

    /// The whole body of a refusal (a non-200 answer) as JSON.
    pub fn error_body(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let len: usize = self
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(usize::MAX);
        loop {
            self.decode()?;
            if self.body.len() >= len || self.framing == Framing::Done || self.eof {
                break;
            }
            self.fill(deadline)?;
        }
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "a {} answer's body is not JSON: {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An event's `type`.
pub fn kind(e: &Value) -> &str {
    e["type"].as_str().unwrap_or_default()
}

/// An event's `index` (0 if it has none).
pub fn index(e: &Value) -> u64 {
    e["index"].as_u64().unwrap_or(0)
}

/// `kvclient --endpoints .. --json watch ARGS` as a subprocess; a thread
/// parses its stdout, one event per line, into a channel. Killed (by its
/// PID) and reaped on drop.
pub struct CliWatch {
    child: Child,
    rx: mpsc::Receiver<Value>,
    /// Every event taken off the channel so far, in order.
    pub events: Vec<Value>,
    stderr_path: std::path::PathBuf,
}

impl CliWatch {
    /// Starts the watch; its stderr goes to `stderr_path`.
    pub fn spawn(
        endpoints: &[String],
        args: &[&str],
        stderr_path: &std::path::Path,
    ) -> Result<CliWatch> {
        let stderr = std::fs::File::create(stderr_path)?;
        let mut child = Command::new(bin("kvclient"))
            .env_remove("KV_ENDPOINTS")
            .args(["--endpoints", &endpoints.join(","), "--json", "watch"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("spawning kvclient watch")?;
        let stdout = child.stdout.take().context("kvclient's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if line.trim().is_empty() {
                    continue;
                }
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "type": "unparsed", "line": line }));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Ok(CliWatch {
            child,
            rx,
            events: Vec::new(),
            stderr_path: stderr_path.to_path_buf(),
        })
    }

    /// Takes what has arrived into [`CliWatch::events`], waiting up to
    /// `wait` for the first new one; how many arrived.
    pub fn drain(&mut self, wait: Duration) -> usize {
        let before = self.events.len();
        if let Ok(e) = self.rx.recv_timeout(wait) {
            self.events.push(e);
            while let Ok(e) = self.rx.try_recv() {
                self.events.push(e);
            }
        }
        self.events.len() - before
    }

    /// Polls until `cond` holds over the events so far, or `timeout`, or
    /// the process has exited and everything it printed is in.
    pub fn wait_for(&mut self, timeout: Duration, mut cond: impl FnMut(&[Value]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if cond(&self.events) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let exited = self.try_exit().is_some();
            if self.drain(left.min(Duration::from_millis(100))) == 0 && exited {
                return cond(&self.events);
            }
        }
    }

    /// Whether the process has exited, and how.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// What it wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for CliWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers one connection with `answer`, then closes.
    fn serve_once(answer: &'static [u8]) -> u16 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 4096];
            let _ = s.read(&mut b);
            s.write_all(answer).unwrap();
        });
        port
    }

    #[test]
    fn chunked_lines_are_joined_across_chunks() {
        let port = serve_once(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-kv-watch-index: 7\r\n\r\n\
              5\r\n{\"typ\r\n12\r\ne\": \"put\"}\n{\"type\"\r\n\
              e\r\n: \"progress\"}\n\r\n0\r\n\r\n",
        );
        let mut w = RawWatch::open(port, "prefix=a", &[], Duration::from_secs(5)).unwrap();
        assert_eq!(w.status, 200);
        assert_eq!(w.header("x-kv-watch-index"), Some("7"));
        let t = Duration::from_secs(5);
        assert_eq!(kind(&w.next_event(t).unwrap().unwrap()), "put");
        assert_eq!(kind(&w.next_event(t).unwrap().unwrap()), "progress");
        assert!(w.next_event(t).unwrap().is_none());
    }

    #[test]
    fn a_refusal_body_is_read_by_its_length() {
        let port = serve_once(
            b"HTTP/1.1 410 Gone\r\ncontent-length: 48\r\n\r\n\
              {\"error\":{\"code\":\"compacted\"},\"oldest_index\":5}",
        );
        let mut w = RawWatch::open(port, "from_index=1", &[], Duration::from_secs(5)).unwrap();
        assert_eq!(w.status, 410);
        let v = w.error_body(Duration::from_secs(5)).unwrap();
        assert_eq!(v["oldest_index"], 5);
    }
}

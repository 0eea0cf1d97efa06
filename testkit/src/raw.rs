//! HTTP/1.1 over a plain `TcpStream`, for tests that need to control every
//! byte (half a head, a stalled body, a socket that sends nothing) and see
//! every byte of the answer (a `100 Continue`, the body of an error that
//! hyper writes itself).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// A generous bound on any wait in these tests (debug builds on a loaded
/// 2-core machine are slow; a hang must still end the test).
pub const DEADLINE: Duration = crate::node::REQUEST_TIMEOUT;

/// A connection to kvd on 127.0.0.1 with reads bounded by [`DEADLINE`].
pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connecting to kvd");
    s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    s.set_nodelay(true).expect("nodelay");
    s
}

/// One answer: status, head (status line and headers), body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body as `{"error": {"code", "message"}}`: the code, after
    /// checking the shape and that the Content-Type says JSON.
    pub fn error_code(&self) -> String {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "answer {}: {}",
            self.status,
            self.head
        );
        let v: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{} answer body is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        });
        let code = v["error"]["code"].as_str().unwrap_or_default();
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(
            !code.is_empty() && !message.is_empty(),
            "error body without code or message: {v}"
        );
        code.to_string()
    }
}

/// Reads one answer (a head, then a Content-Length body) from `s`.
pub fn read_answer(s: &mut impl Read) -> io::Result<Answer> {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&raw)
                ),
            ));
        }
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw[..raw.len() - 4]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let mut answer = Answer {
        status,
        head,
        body: Vec::new(),
    };
    let len: usize = answer
        .header("content-length")
        .map_or(0, |v| v.parse().expect("numeric content-length"));
    answer.body = vec![0u8; len];
    s.read_exact(&mut answer.body)?;
    Ok(answer)
}

/// Writes `request` and reads the answer.
pub fn exchange(s: &mut TcpStream, request: &[u8]) -> io::Result<Answer> {
    s.write_all(request)?;
    read_answer(s)
}

/// `GET path` on a keep-alive connection.
pub fn get(s: &mut TcpStream, path: &str) -> io::Result<Answer> {
    exchange(
        s,
        format!("GET {path} HTTP/1.1\r\nHost: kvd\r\n\r\n").as_bytes(),
    )
}

/// `PUT /v1/kv/key` of `value` on a keep-alive connection.
pub fn put(s: &mut TcpStream, key: &str, value: &[u8]) -> io::Result<Answer> {
    let mut req = format!(
        "PUT /v1/kv/{key} HTTP/1.1\r\nHost: kvd\r\nContent-Length: {}\r\n\r\n",
        value.len()
    )
    .into_bytes();
    req.extend_from_slice(value);
    exchange(s, &req)
}

/// Polls until the server has closed `s` (a read returns 0 or the
/// connection is reset); any bytes read meanwhile are an error. True if it
/// closed before `within` passed.
pub fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("read timeout");
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 256];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => panic!(
                "expected the server to close the connection, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break true,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= deadline {
                    break false;
                }
            }
            Err(e) => panic!("reading: {e}"),
        }
    };
    s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    closed
}

/// Polls until an answer can be read from `s` (whose request was sent),
/// within `within`.
pub fn answered_within(s: &mut TcpStream, within: Duration) -> Option<Answer> {
    s.set_read_timeout(Some(within)).expect("read timeout");
    let answer = read_answer(s).ok();
    s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    answer
}

/// A metric's value in a `/metrics` text (the first sample whose name and
/// labels start with `series`).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Polls `/metrics` on `s` until `series` satisfies `ok`; the last text.
pub fn wait_for_metric(s: &mut TcpStream, series: &str, ok: impl Fn(f64) -> bool) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let a = get(s, "/metrics").expect("GET /metrics");
        let text = String::from_utf8_lossy(&a.body).into_owned();
        if metric(&text, series).is_some_and(&ok) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached the expected value; /metrics:\n{}",
            text.lines()
                .filter(|l| l.starts_with("kvd_http"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

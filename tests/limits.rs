//! Connection limit: at `--max-connections`, a further client waits in the
//! accept backlog and is served as soon as another connection closes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::start;
use kvstore::wait_until;
use tempfile::TempDir;

/// Sends one keep-alive GET /health on `s` and reads its status line.
fn health_on(s: &mut TcpStream) -> std::io::Result<String> {
    write!(s, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string())
}

#[test]
fn a_client_over_the_connection_limit_waits_until_one_closes() {
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &["--max-connections", "2"]);
    let addr = ("127.0.0.1", kvd.port);

    // Two keep-alive connections, each proven accepted by a served request.
    let mut a = TcpStream::connect(addr).unwrap();
    let mut b = TcpStream::connect(addr).unwrap();
    assert!(health_on(&mut a).unwrap().contains("200"));
    assert!(health_on(&mut b).unwrap().contains("200"));

    // The third connects (the kernel queues it) but is not served while
    // both slots are taken.
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let waited = health_on(&mut c);
    assert!(
        waited.is_err(),
        "a third connection was served past --max-connections 2: {waited:?}"
    );

    // Closing one frees its slot: the waiting client gets its answer.
    drop(a);
    c.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut got = Vec::new();
    let served = wait_until(Duration::from_secs(10), || {
        let mut buf = [0u8; 1024];
        match c.read(&mut buf) {
            Ok(n) if n > 0 => {
                got.extend_from_slice(&buf[..n]);
                true
            }
            _ => false,
        }
    });
    assert!(served, "the waiting client was never served");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    drop(b);
}

//! kvsup's web dashboard in a real browser: headless Chromium, driven over
//! the DevTools protocol, opens the page `kvsup dashboard` prints for a
//! real 3-node cluster. The page shows the primary; after `kvsup kill` of
//! the primary it shows the failover and the new primary by itself, with
//! no reload (a value the test left in `window` is still there, and the
//! frame navigated no more). A page of another origin cannot read the API
//! with the token, nor act on the cluster without it. The screenshot is
//! the README's `docs/dashboard.png` (written there with
//! `UPDATE_SCREENSHOTS=1`, else under `target/`).
//!
//! Chromium must be installed (`chromium`, or the binary named by
//! `CHROMIUM`); without it these tests fail, they do not pass.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use kvstore_testkit::sup::{run_in, Supervised};
use kvstore_testkit::{http_get_with, raw};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpStream as AsyncTcp;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long one DevTools command may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The Chromium binary: `CHROMIUM`, else `chromium` or `chromium-browser`
/// on the PATH. A missing browser fails the test with what to install.
fn chromium_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!(
        "Chromium is not installed, so the dashboard cannot be tested: install it \
         (Debian: apt-get install -y chromium; test.sh does) or set CHROMIUM to its binary"
    );
}

/// A headless Chromium we started; killed by its PID when dropped (also
/// when a test fails half-way).
struct Browser {
    child: Child,
    _profile: TempDir,
    port: u16,
    browser_path: String,
}

impl Browser {
    fn launch() -> Result<Browser> {
        let bin = chromium_binary();
        let profile = TempDir::new()?;
        let child = Command::new(&bin)
            .args([
                "--headless=new",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-gpu",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-sync",
                "--metrics-recording-only",
                "--password-store=basic",
                // Tests run as root in CI, where Chromium's sandbox cannot run.
                "--no-sandbox",
                "--window-size=1280,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut b = Browser {
            child,
            _profile: profile,
            port: 0,
            browser_path: String::new(),
        };
        // Chromium writes its port and the browser target's path there
        // once it listens.
        let file = b._profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    b.port = port.trim().parse().context("DevToolsActivePort: port")?;
                    b.browser_path = path.trim().to_string();
                    return Ok(b);
                }
            }
            if let Some(st) = b.child.try_wait()? {
                bail!("{} exited at start: {st}", bin.display());
            }
            if Instant::now() >= deadline {
                bail!("{} wrote no DevToolsActivePort within 60 s", bin.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A DevTools protocol session with one page (a flat session on the
/// browser's socket). Events that arrive while a command waits are kept.
struct Cdp {
    ws: WebSocketStream<MaybeTlsStream<AsyncTcp>>,
    next_id: u64,
    session: Option<String>,
    events: Vec<Value>,
}

impl Cdp {
    async fn connect(b: &Browser) -> Result<Cdp> {
        let url = format!("ws://127.0.0.1:{}{}", b.port, b.browser_path);
        let (ws, _) = tokio::time::timeout(CALL_TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .context("connecting to DevTools timed out")??;
        let mut c = Cdp {
            ws,
            next_id: 0,
            session: None,
            events: Vec::new(),
        };
        let t = c
            .call("Target.createTarget", json!({"url": "about:blank"}))
            .await?;
        let target = t["targetId"].as_str().context("no targetId")?.to_string();
        let s = c
            .call(
                "Target.attachToTarget",
                json!({"targetId": target, "flatten": true}),
            )
            .await?;
        c.session = Some(s["sessionId"].as_str().context("no sessionId")?.to_string());
        c.call("Page.enable", json!({})).await?;
        c.call("Runtime.enable", json!({})).await?;
        c.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
        )
        .await?;
        Ok(c)
    }

    async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws.send(Message::text(msg.to_string())).await?;
        let deadline = tokio::time::Instant::now() + CALL_TIMEOUT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .with_context(|| format!("{method}: no answer within {CALL_TIMEOUT:?}"))?;
            let Some(frame) = next else {
                bail!("{method}: DevTools closed the socket");
            };
            let Message::Text(text) = frame? else {
                continue;
            };
            let v: Value = serde_json::from_str(text.as_str())?;
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    bail!("{method}: {e}");
                }
                return Ok(v["result"].clone());
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// The value of the JavaScript expression `expr` (promises awaited).
    async fn eval(&mut self, expr: &str) -> Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("{expr}: threw {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Main-frame navigations seen so far (`Page.frameNavigated` of a frame
    /// without a parent).
    fn navigations(&self) -> usize {
        self.events
            .iter()
            .filter(|e| e["method"] == "Page.frameNavigated")
            .filter(|e| e["params"]["frame"].get("parentId").is_none())
            .count()
    }

    /// Evaluates `expr` until `ok` holds for its value, or fails after
    /// `timeout` with the last value.
    async fn eval_until(
        &mut self,
        expr: &str,
        timeout: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expr).await?;
            if ok(&v) {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                bail!("not seen within {timeout:?}; last: {v:#}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// What the test reads of the page: its text, the primary it shows, the
/// value the test left in `window`, the page's render count, its URL (only
/// the URL while the page is still loading).
const PAGE_VIEW: &str = r#"(() => {
    const p = document.getElementById("primary");
    if (!document.body || !p) return {renders: 0, href: location.href};
    return {
        text: document.body.innerText,
        primary: p.textContent,
        mark: window.e2eMark === undefined ? null : window.e2eMark,
        renders: window.kvsupDashboard ? window.kvsupDashboard.renders : 0,
        href: location.href,
        history: history.length,
    };
})()"#;

/// What `/v1/samples` holds, fetched by the page's origin with the token
/// the page keeps: how many samples, and how many positive write rates.
const SAMPLES_VIEW: &str = r#"fetch("/v1/samples", {
        headers: {Authorization: "Bearer " + sessionStorage.getItem("kvsup.token")},
    })
    .then(r => r.json())
    .then(d => ({
        samples: d.samples.length,
        rated: d.writes_per_s.filter(r => r.per_s > 0).length,
    }))"#;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Writer `id` puts keys until told to stop, to whichever node takes them (the
/// primary), so the writes chart has something to draw. Paced: it is
/// load, not a wait for a condition.
fn writer(id: usize, ports: Vec<u16>, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    let mut at = id;
    let mut conn: Option<TcpStream> = None;
    while !stop.load(Ordering::Relaxed) {
        let s = match conn.as_mut() {
            Some(s) => s,
            None => match TcpStream::connect(("127.0.0.1", ports[at % ports.len()])) {
                Ok(s) => {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                    conn.insert(s)
                }
                Err(_) => {
                    at += 1;
                    continue;
                }
            },
        };
        let n = done.load(Ordering::Relaxed);
        match raw::put(s, &format!("dash-{id}-{n}"), b"v") {
            Ok(a) if (200..300).contains(&a.status) => {
                done.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                conn = None;
                at += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(4));
    }
}

/// The URL `kvsup dashboard -f MANIFEST` prints.
fn dashboard_url(c: &Supervised) -> String {
    let f = c.manifest.display().to_string();
    let (st, out) = run_in(
        &c.dir,
        "kvsup",
        &["dashboard", "-f", &f],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(st.success(), "kvsup dashboard: {out}");
    let url = out.trim().to_string();
    let want = format!(
        "http://127.0.0.1:{}/#token={}",
        c.sup_port,
        c.token().unwrap()
    );
    assert_eq!(url, want, "kvsup dashboard printed {out:?}");
    url
}

/// Where the screenshot goes: the README's `docs/dashboard.png` when
/// `UPDATE_SCREENSHOTS=1`, else the test's scratch dir under `target/`,
/// so that a test run leaves the work tree as it was.
fn screenshot_path() -> PathBuf {
    if std::env::var_os("UPDATE_SCREENSHOTS").is_some_and(|v| v == "1") {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png")
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png")
    }
}

#[test]
fn the_dashboard_shows_a_failover_live_without_a_reload() {
    let browser = Browser::launch().expect("headless Chromium");
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, "").unwrap();
    let url = dashboard_url(&c);
    let first = c.primary().expect("a primary");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let ports: Vec<u16> = c.nodes.iter().map(|(_, p)| *p).collect();
    // 16 writers throughout, as a user's cluster would have.
    let load: Vec<_> = (0..16)
        .map(|id| {
            let (ports, stop, done) = (ports.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || writer(id, ports, stop, done))
        })
        .collect();
    let result = runtime().block_on(drive(&browser, &c, &url, &first));
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.join().unwrap();
    }
    let shot = result.unwrap();
    assert!(
        done.load(Ordering::Relaxed) > 0,
        "no write was taken during the test"
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot)
        .unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // IHDR: the width and height, big-endian, at bytes 16..24.
    let size = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().unwrap());
    assert_eq!((size(16), size(20)), (1280, 1000), "the viewport's size");
    let path = screenshot_path();
    std::fs::write(&path, &png).unwrap();
    eprintln!("screenshot: {}", path.display());
}

/// Opens the page, checks what it shows, kills the primary, and watches
/// the page follow; returns the screenshot (base64 PNG).
async fn drive(browser: &Browser, c: &Supervised, url: &str, first: &str) -> Result<String> {
    let mut cdp = Cdp::connect(browser).await?;
    cdp.call("Page.navigate", json!({"url": url})).await?;
    let v = cdp
        .eval_until(PAGE_VIEW, Duration::from_secs(30), |v| {
            v["renders"].as_u64() >= Some(1) && v["primary"] == first
        })
        .await
        .context("the page never showed the primary")?;
    let text = v["text"].as_str().unwrap_or("");
    for want in [
        "Ready: yes",
        "n0",
        "n1",
        "n2",
        "primary",
        "secondary",
        "start",
    ] {
        anyhow::ensure!(text.contains(want), "{want:?} not on the page: {text}");
    }
    // The token left the address bar once read (and was never sent).
    let href = v["href"].as_str().unwrap_or("");
    anyhow::ensure!(
        href == format!("http://127.0.0.1:{}/", c.sup_port),
        "the address bar still holds {href:?}"
    );
    let mark = format!("mark-{}", std::process::id());
    cdp.eval(&format!("window.e2eMark = {mark:?}")).await?;
    let navigations = cdp.navigations();
    let history = v["history"].clone();
    anyhow::ensure!(navigations >= 1, "no navigation seen");

    // Writes flow: the chart's rate becomes positive. A few seconds of
    // them, so that the screenshot's charts have a history.
    cdp.eval_until(SAMPLES_VIEW, Duration::from_secs(60), |v| {
        v["rated"].as_u64() >= Some(8)
    })
    .await
    .context("no write rate in the samples")?;

    c.signal(first, "KILL")?;
    let killed = Instant::now();
    let renders_before = cdp.eval(PAGE_VIEW).await?["renders"].clone();
    let v = cdp
        .eval_until(PAGE_VIEW, Duration::from_secs(60), |v| {
            let p = v["primary"].as_str().unwrap_or("");
            let text = v["text"].as_str().unwrap_or("");
            p != first && p != "none" && text.contains("promoted to primary")
        })
        .await
        .context("the page never showed the failover")?;
    let second = v["primary"].as_str().unwrap_or("").to_string();
    eprintln!(
        "the page showed {second} as primary {} ms after kvsup kill {first}",
        killed.elapsed().as_millis()
    );
    anyhow::ensure!(
        c.primary().as_deref() == Some(second.as_str()),
        "the page shows {second}, kvsup says {:?}",
        c.primary()
    );
    anyhow::ensure!(v["mark"] == mark.as_str(), "the page was reloaded: {v:#}");
    anyhow::ensure!(
        cdp.navigations() == navigations && v["history"] == history,
        "the page navigated: {} navigations, history {}, were {navigations} and {history}",
        cdp.navigations(),
        v["history"]
    );
    anyhow::ensure!(
        v["renders"].as_u64() > renders_before.as_u64(),
        "the page did not render again"
    );
    let text = v["text"].as_str().unwrap_or("");
    anyhow::ensure!(
        text.contains("failover") && text.contains(&second) && text.contains(" ms"),
        "no failover on the page: {text}"
    );
    // The killed node comes back: wait for Ready, and a few samples more,
    // so the screenshot shows a healthy cluster with the failover in its
    // history.
    let samples = cdp.eval(SAMPLES_VIEW).await?["samples"]
        .as_u64()
        .unwrap_or(0);
    cdp.eval_until(SAMPLES_VIEW, Duration::from_secs(60), |v| {
        v["samples"].as_u64() >= Some(samples + 5)
    })
    .await
    .context("no new samples after the failover")?;
    cdp.eval_until(PAGE_VIEW, Duration::from_secs(60), |v| {
        v["text"].as_str().unwrap_or("").contains("Ready: yes")
    })
    .await
    .context("the page never showed the cluster Ready again")?;
    let shot = cdp
        .call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        )
        .await?;
    Ok(shot["data"]
        .as_str()
        .context("no screenshot data")?
        .to_string())
}

/// Opened without the token in its fragment, the page asks for it: a
/// wrong one is refused (and nothing is shown), the right one opens it.
async fn login_by_form(browser: &Browser, sup: &str, token: &str) -> Result<()> {
    let mut cdp = Cdp::connect(browser).await?;
    cdp.call("Page.navigate", json!({"url": format!("{sup}/")}))
        .await?;
    let form_shown = r#"(() => {
        const f = document.getElementById("login");
        return f ? {shown: !f.hidden, text: document.body.innerText} : {shown: false};
    })()"#;
    cdp.eval_until(form_shown, Duration::from_secs(30), |v| v["shown"] == true)
        .await
        .context("no token form")?;
    let submit = |t: &str| {
        format!(
            "document.getElementById('token-input').value = {t:?};\
             document.getElementById('login').requestSubmit()"
        )
    };
    cdp.eval(&submit(&"0".repeat(64))).await?;
    let v = cdp
        .eval_until(form_shown, Duration::from_secs(30), |v| {
            v["text"]
                .as_str()
                .unwrap_or("")
                .contains("token was refused")
        })
        .await
        .context("a wrong token was not refused")?;
    anyhow::ensure!(v["shown"] == true, "{v:#}");
    let text = v["text"].as_str().unwrap_or("");
    anyhow::ensure!(!text.contains("n0"), "data shown without the token: {text}");
    cdp.eval(&submit(token)).await?;
    cdp.eval_until(PAGE_VIEW, Duration::from_secs(30), |v| {
        v["renders"].as_u64() >= Some(1) && v["text"].as_str().unwrap_or("").contains("n0")
    })
    .await
    .context("the right token did not open the page")?;
    Ok(())
}

/// Serves `html` at `/` on a free loopback port (another origin than
/// kvsup's) for as long as the test runs.
fn foreign_site(html: String) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{html}",
                html.len()
            );
        }
    });
    port
}

fn node_pids(c: &Supervised) -> Vec<Value> {
    c.status().unwrap()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["pid"].clone())
        .collect()
}

#[test]
fn another_origin_cannot_use_the_api_and_no_token_reads_nothing() {
    let browser = Browser::launch().expect("headless Chromium");
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, "").unwrap();
    let token = c.token().unwrap();
    let before = node_pids(&c);
    let site = foreign_site("<!doctype html><title>elsewhere</title>".into());

    // Without the token: the page's files, nothing else.
    let none = Duration::from_secs(5);
    for path in ["/", "/dashboard.js", "/dashboard.css"] {
        let (code, body) = http_get_with(c.sup_port, path, &[], none).unwrap();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(code, 200, "{path}: {body}");
        assert!(
            !body.contains(&token) && !body.contains("\"n0\""),
            "{path} holds data"
        );
    }
    for path in ["/v1/status", "/v1/events", "/v1/samples", "/metrics"] {
        let (code, body) = http_get_with(c.sup_port, path, &[], none).unwrap();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(code, 401, "{path}: {body}");
        assert!(body.contains("token_required"), "{path}: {body}");
    }
    // With the token but from another origin: refused.
    let auth = format!("Bearer {token}");
    let origin = format!("http://127.0.0.1:{site}");
    let (code, body) = http_get_with(
        c.sup_port,
        "/v1/samples",
        &[("Authorization", &auth), ("Origin", &origin)],
        none,
    )
    .unwrap();
    assert_eq!(code, 403, "{}", String::from_utf8_lossy(&body));
    let (code, _) =
        http_get_with(c.sup_port, "/v1/samples", &[("Authorization", &auth)], none).unwrap();
    assert_eq!(code, 200, "the token alone is let in");

    // The page keeps to its own origin: no framing, no other sources.
    let mut s = raw::connect(c.sup_port);
    let page = raw::exchange(
        &mut s,
        format!("GET / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n", c.sup_port).as_bytes(),
    )
    .unwrap();
    assert_eq!(page.status, 200, "{}", page.head);
    let csp = page.header("content-security-policy").unwrap_or("");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{}",
        page.head
    );
    assert_eq!(page.header("x-frame-options"), Some("DENY"));

    let sup = format!("http://127.0.0.1:{}", c.sup_port);
    runtime()
        .block_on(login_by_form(&browser, &sup, &token))
        .unwrap();
    let outcome = runtime().block_on(async {
        let mut cdp = Cdp::connect(&browser).await?;
        cdp.call("Page.navigate", json!({"url": format!("{origin}/")}))
            .await?;
        cdp.eval_until("document.title", Duration::from_secs(30), |v| {
            v == "elsewhere"
        })
        .await?;
        // Reading with the token needs a preflight kvsup never answers.
        let read = cdp
            .eval(&format!(
                "fetch({:?}, {{headers: {{Authorization: {auth:?}}}}})\
                   .then(r => 'read ' + r.status, e => 'refused: ' + e)",
                format!("{sup}/v1/status")
            ))
            .await?;
        // What a page may send without one: a form-like POST, no token.
        let kill = cdp
            .eval(&format!(
                "fetch({:?}, {{method: 'POST', mode: 'no-cors', body: '{{\"node\":\"n0\"}}'}})\
                   .then(r => 'sent ' + r.type, e => 'refused: ' + e)",
                format!("{sup}/v1/kill")
            ))
            .await?;
        anyhow::Ok((read, kill))
    });
    let (read, kill) = outcome.unwrap();
    assert!(
        read.as_str().is_some_and(|r| r.starts_with("refused")),
        "a foreign page read the API: {read}"
    );
    assert_eq!(kill, json!("sent opaque"), "{kill}");
    assert_eq!(node_pids(&c), before, "the cluster was touched");
    let events = c.sup_get("/v1/events").unwrap();
    let events = String::from_utf8_lossy(&events.1);
    assert!(!events.contains("\"kill\""), "{events}");
}

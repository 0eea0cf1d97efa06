//! A real Prometheus server (Debian package `prometheus`, installed by
//! test.sh) scrapes the supervisor and every node of a kvsup cluster; its
//! query API must see them all up and a non-zero `kvd_keys`. `promtool
//! check metrics` must accept every `/metrics` page. kvsup's `/metrics`
//! needs its admin token: Prometheus reads it from the token file
//! (`authorization: credentials_file:`), as an operator's would.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kvstore_testkit::sup::Supervised;
use kvstore_testkit::{free_port, http_get, run_to_exit, wait_until};
use serde_json::Value;
use tempfile::TempDir;

fn tool(name: &str) -> String {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.exists());
    found
        .unwrap_or_else(|| {
            panic!("{name} not found: install the Debian package `prometheus` (./test.sh does)")
        })
        .display()
        .to_string()
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn query(port: u16, q: &str) -> Option<Vec<Value>> {
    let enc: String = q
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let (code, body) = http_get(
        port,
        &format!("/api/v1/query?query={enc}"),
        Duration::from_secs(5),
    )
    .ok()?;
    if code != 200 {
        return None;
    }
    let v: Value = serde_json::from_slice(&body).ok()?;
    v["data"]["result"].as_array().cloned()
}

#[test]
fn prometheus_scrapes_kvsup_and_every_node() {
    let prometheus = tool("prometheus");
    let promtool = tool("promtool");
    let tmp = TempDir::new().unwrap();
    let c = Supervised::apply(tmp.path(), 3, "").unwrap();
    let (ok, out) = run_to_exit(
        "kvclient",
        &["--endpoints", &c.urls().join(","), "set", "hello", "world"],
        Duration::from_secs(30),
    )
    .unwrap();
    assert!(ok.success(), "{out}");

    let node_targets: Vec<String> = c
        .nodes
        .iter()
        .map(|(_, p)| format!("'127.0.0.1:{p}'"))
        .collect();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         scrape_configs:\n\
         \x20 - job_name: kvsup\n\
         \x20   authorization: {{credentials_file: '{}'}}\n\
         \x20   static_configs: [{{targets: ['127.0.0.1:{}']}}]\n\
         \x20 - job_name: kvd\n\
         \x20   static_configs: [{{targets: [{}]}}]\n",
        c.token_file().display(),
        c.sup_port,
        node_targets.join(", ")
    );
    let cfg = tmp.path().join("prometheus.yml");
    std::fs::write(&cfg, config).unwrap();
    let port = free_port();
    let log = std::fs::File::create(tmp.path().join("prometheus.log")).unwrap();
    let _prom = Prometheus(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    let mut last = Vec::new();
    let all_up = wait_until(Duration::from_secs(60), || {
        last = query(port, "up").unwrap_or_default();
        last.len() == 4 && last.iter().all(|s| s["value"][1] == "1")
    });
    let plog = std::fs::read_to_string(tmp.path().join("prometheus.log")).unwrap_or_default();
    assert!(all_up, "up series: {last:#?}\nprometheus log:\n{plog}");
    let jobs: Vec<&str> = last
        .iter()
        .filter_map(|s| s["metric"]["job"].as_str())
        .collect();
    assert_eq!(jobs.iter().filter(|j| **j == "kvd").count(), 3, "{last:#?}");
    assert_eq!(
        jobs.iter().filter(|j| **j == "kvsup").count(),
        1,
        "{last:#?}"
    );
    let keys_seen = wait_until(Duration::from_secs(30), || {
        query(port, "max(kvd_keys)").is_some_and(|r| {
            r.first()
                .and_then(|s| s["value"][1].as_str())
                .and_then(|v| v.parse::<f64>().ok())
                .is_some_and(|v| v > 0.0)
        })
    });
    assert!(keys_seen, "kvd_keys never non-zero in Prometheus");
    let nodes_up = query(port, "sum(kvsup_node_up)").unwrap();
    assert_eq!(nodes_up[0]["value"][1], "3", "{nodes_up:#?}");

    // promtool's linter accepts every exposition page.
    let mut pages: Vec<(u16, Vec<u8>)> = c
        .nodes
        .iter()
        .map(|n| {
            (
                n.1,
                http_get(n.1, "/metrics", Duration::from_secs(5)).unwrap().1,
            )
        })
        .collect();
    pages.push((c.sup_port, c.metrics().unwrap().into_bytes()));
    for (p, page) in pages {
        let mut child = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&page).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool rejects /metrics of port {p}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

//! A secured cluster on test hosts ([`crate::hosts`]): three kvd nodes, each
//! in its own network namespace bound to its own address, run the way
//! systemd would run them (the `ExecStart` line of the unit `kvsup render
//! systemd` wrote, restarted after every exit), and kvsup in a fourth host
//! supervising them as `runtime: external` nodes over mutual TLS with
//! tokens (`tls: auto`).
//!
//! The test process reaches every host through its leg on the bridge; the
//! kvsup command runs inside the supervisor's host (its API listens on
//! that host's loopback). All of it lives in a directory the caller owns;
//! on drop kvsup is brought down, its daemon killed by its pid if that
//! fails, and the hosts take their processes and links with them.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::hosts::Hosts;
use crate::wait_until;

/// The port every node listens on, each on its own address.
pub const NODE_PORT: u16 = 7400;
/// The supervisor's port, on its host's loopback.
pub const SUP_PORT: u16 = 8700;
/// The supervisor's host.
pub const SUP_HOST: &str = "sup";

const CLUSTER: &str = "hosts";

pub struct HostCluster {
    pub hosts: Hosts,
    pub dir: PathBuf,
    pub manifest: PathBuf,
    pub state_dir: PathBuf,
    /// Node names, which are also their hosts' names, in manifest order.
    pub nodes: Vec<String>,
    down: bool,
}

impl HostCluster {
    /// A cluster of `n` nodes in `mode` (`primary-secondary` or
    /// `masterless`) with `extra_spec` added to the manifest's `spec:`,
    /// applied and Ready.
    pub fn start(dir: &Path, n: usize, mode: &str, extra_spec: &str) -> Result<HostCluster> {
        let nodes: Vec<String> = (0..n).map(|i| format!("n{i}")).collect();
        let mut names: Vec<&str> = nodes.iter().map(String::as_str).collect();
        names.push(SUP_HOST);
        let hosts = Hosts::create(&names)?;
        let manifest = dir.join("cluster.yaml");
        let state_dir = dir.join("state");
        let mut text = format!(
            "apiVersion: kvstore/v1\nkind: Cluster\nmetadata: {{name: {CLUSTER}}}\nspec:\n  \
             mode: {mode}\n  stateDir: {}\n  tls: auto\n  supervisor: {{port: {SUP_PORT}}}\n  \
             nodes:\n",
            state_dir.display()
        );
        for name in &nodes {
            text.push_str(&format!(
                "    - {{name: {name}, port: {NODE_PORT}, address: {}, runtime: external}}\n",
                hosts.addr(name)
            ));
        }
        text.push_str(extra_spec);
        std::fs::write(&manifest, text)?;
        let mut c = HostCluster {
            hosts,
            dir: dir.to_path_buf(),
            manifest,
            state_dir,
            nodes,
            down: true,
        };
        c.start_nodes()?;
        c.down = false;
        let (st, out) = c.kvsup(&["apply"])?;
        if !st.success() {
            bail!("kvsup apply failed ({st}): {out}");
        }
        c.wait_ready(Duration::from_secs(60))?;
        Ok(c)
    }

    /// Renders the systemd units and runs each node's `ExecStart` in its
    /// host as a service (restarted after every exit, as `Restart=always`).
    fn start_nodes(&self) -> Result<()> {
        let units = self.dir.join("units");
        let (st, out) =
            self.kvsup_here(&["render", "systemd", "--out", &units.display().to_string()])?;
        if !st.success() {
            bail!("kvsup render systemd failed ({st}): {out}");
        }
        for name in &self.nodes {
            let unit = units.join(format!("kvstore-{CLUSTER}-{name}.service"));
            let text = std::fs::read_to_string(&unit)
                .with_context(|| format!("reading {}", unit.display()))?;
            let argv = exec_start(&text).with_context(|| format!("in {}", unit.display()))?;
            let log = self.dir.join(format!("{name}.log"));
            self.hosts.service(name, name, &argv, &log)?;
        }
        Ok(())
    }

    /// `kvsup ARGS -f MANIFEST` run in the supervisor's host: exit status
    /// and output.
    pub fn kvsup(&self, args: &[&str]) -> Result<(ExitStatus, String)> {
        let mut cmd = self.hosts.command(SUP_HOST, crate::bin("kvsup"));
        cmd.args(args)
            .arg("-f")
            .arg(&self.manifest)
            .current_dir(&self.dir);
        run(cmd, Duration::from_secs(120))
    }

    /// `kvsup ARGS -f MANIFEST` run by the test process itself (no
    /// network needed: `render`).
    fn kvsup_here(&self, args: &[&str]) -> Result<(ExitStatus, String)> {
        let mut cmd = std::process::Command::new(crate::bin("kvsup"));
        cmd.args(args)
            .arg("-f")
            .arg(&self.manifest)
            .current_dir(&self.dir);
        run(cmd, Duration::from_secs(60))
    }

    /// The supervisor's status document (`kvsup status --json`).
    pub fn status(&self) -> Result<Value> {
        let (st, out) = self.kvsup(&["status", "--json"])?;
        if !st.success() {
            bail!("kvsup status failed ({st}): {out}");
        }
        Ok(serde_json::from_str(&out)?)
    }

    pub fn wait_ready(&self, timeout: Duration) -> Result<Value> {
        let mut last = Value::Null;
        let ready = wait_until(timeout, || match self.status() {
            Ok(s) => {
                let ok = s["conditions"]["Ready"] == true;
                last = s;
                ok
            }
            Err(_) => false,
        });
        if !ready {
            bail!("not Ready within {timeout:?}; last status {last:#}");
        }
        Ok(last)
    }

    /// The supervisor's events (`kvsup events --json`).
    pub fn events(&self) -> Result<Vec<Value>> {
        let (st, out) = self.kvsup(&["events", "--json"])?;
        if !st.success() {
            bail!("kvsup events failed ({st}): {out}");
        }
        let v: Value = serde_json::from_str(&out)?;
        Ok(v["events"].as_array().cloned().unwrap_or_default())
    }

    pub fn creds(&self) -> PathBuf {
        self.state_dir.join("creds")
    }

    pub fn ca(&self) -> PathBuf {
        self.creds().join("ca.pem")
    }

    /// A token of the cluster (`client` or `admin`).
    pub fn token(&self, name: &str) -> Result<String> {
        let p = self.creds().join(format!("{name}.token"));
        Ok(std::fs::read_to_string(&p)
            .with_context(|| format!("reading {}", p.display()))?
            .trim()
            .to_string())
    }

    pub fn url(&self, node: &str) -> String {
        format!("https://{}:{NODE_PORT}", self.hosts.addr(node))
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| self.url(n)).collect()
    }

    /// How the chaos clients reach the cluster: its CA and client token.
    pub fn endpoints(&self) -> Result<crate::chaos::Endpoints> {
        let token = self.token("client")?;
        Ok(crate::chaos::Endpoints {
            urls: self.urls(),
            tls: Some(kvclient::TlsFiles {
                ca: Some(self.ca()),
                cert: None,
                key: None,
            }),
            token: Some(token),
        })
    }

    /// An HTTPS client that trusts the cluster's CA, sends `token`, and
    /// follows no redirect.
    pub fn http(&self, token: &str, timeout: Duration) -> Result<reqwest::Client> {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(self.ca())?)?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse()?,
        );
        Ok(reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .default_headers(headers)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .build()?)
    }

    /// `GET /v1/status` of `node`, with the admin token.
    pub async fn node_status(&self, node: &str) -> Result<Value> {
        let http = self.http(&self.token("admin")?, Duration::from_secs(2))?;
        let r = http
            .get(format!("{}/v1/status", self.url(node)))
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "{node}: status {}", r.status());
        Ok(r.json().await?)
    }

    /// The node that leads the newest epoch, as the nodes themselves say.
    pub async fn primary(&self) -> Option<String> {
        let mut best: Option<(u64, String)> = None;
        for n in &self.nodes {
            if let Ok(s) = self.node_status(n).await {
                let e = s["epoch"].as_u64().unwrap_or(0);
                if s["role"] == "primary" && best.as_ref().is_none_or(|(b, _)| e > *b) {
                    best = Some((e, n.clone()));
                }
            }
        }
        best.map(|(_, n)| n)
    }

    /// Polls until every node answers with the same digest and commit
    /// index, for at most `timeout`; the digest.
    pub async fn converged(&self, timeout: Duration) -> Result<String> {
        let until = std::time::Instant::now() + timeout;
        let mut last = Vec::new();
        while std::time::Instant::now() < until {
            last.clear();
            for n in &self.nodes {
                let s = self.node_status(n).await.ok();
                last.push(s.map(|s| (s["digest"].clone(), s["commit_index"].clone())));
            }
            if last.iter().all(Option::is_some) && last.windows(2).all(|w| w[0] == w[1]) {
                let digest = last[0].as_ref().map(|(d, _)| d.to_string());
                return Ok(digest.unwrap_or_default());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the nodes did not converge within {timeout:?}: {last:?}")
    }

    /// `kvclient ARGS` run in `host` (on the far side of a cut, if it is
    /// cut off) with the CA and the client token, against `url`.
    pub fn kvclient_in(
        &self,
        host: &str,
        url: &str,
        args: &[&str],
    ) -> Result<(ExitStatus, String)> {
        let mut cmd = self.hosts.command(host, crate::bin("kvclient"));
        cmd.arg("--endpoints")
            .arg(url)
            .arg("--ca")
            .arg(self.ca())
            .arg("--token")
            .arg(self.token("client")?)
            .args(args);
        run(cmd, Duration::from_secs(60))
    }
}

impl Drop for HostCluster {
    fn drop(&mut self) {
        if !self.down && self.kvsup(&["down"]).is_ok_and(|(st, _)| st.success()) {
            return;
        }
        // The daemon is ours (started by our `kvsup apply`); the nodes are
        // the hosts' services, killed when the hosts are dropped.
        let pid = std::fs::read_to_string(self.state_dir.join("kvsup.pid"))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok());
        if let Some(p) = pid {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn run(cmd: std::process::Command, timeout: Duration) -> Result<(ExitStatus, String)> {
    crate::run_command(cmd, timeout)
}

/// The command line of a unit's `ExecStart=`, unquoted by systemd's rules
/// for the forms a rendered unit uses: words separated by spaces, double-
/// or single-quoted words with backslash escapes, `%%` for `%`.
pub fn exec_start(unit: &str) -> Result<Vec<String>> {
    let line = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .context("no ExecStart= line")?;
    let mut words = Vec::new();
    let mut chars = line.trim().chars().peekable();
    while chars.peek().is_some() {
        let mut word = String::new();
        let quote = match chars.peek() {
            Some(&q @ ('"' | '\'')) => {
                chars.next();
                Some(q)
            }
            _ => None,
        };
        while let Some(c) = chars.next() {
            match (c, quote) {
                ('\\', _) => word.push(chars.next().context("a trailing backslash")?),
                ('%', _) if chars.peek() == Some(&'%') => {
                    chars.next();
                    word.push('%');
                }
                (c, Some(q)) if c == q => break,
                (' ', None) => break,
                (c, _) => word.push(c),
            }
        }
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        words.push(word);
    }
    anyhow::ensure!(!words.is_empty(), "an empty ExecStart=");
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_start_is_split_by_systemd_quoting() {
        let unit = "[Service]\nExecStart=/usr/bin/kvd --port 7 \"--x=a b\" 'c d' 50%% a\\\"b\n";
        let argv = exec_start(unit).unwrap();
        assert_eq!(
            argv,
            [
                "/usr/bin/kvd",
                "--port",
                "7",
                "--x=a b",
                "c d",
                "50%",
                "a\"b"
            ]
        );
        assert!(exec_start("[Service]\n").is_err());
    }
}

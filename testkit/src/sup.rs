//! Clusters run by a real `kvsup` (started with `kvsup apply`), for the
//! end-to-end tests of the supervisor and the chaos test.
//!
//! Every cluster lives in a directory the caller owns (a `TempDir`): the
//! manifest, the supervisor's state, the nodes' data and logs. Ports are
//! free loopback ports. On drop the cluster is brought down with
//! `kvsup down`; if that fails, the processes named by the pid files in the
//! state dir (ours: started by this cluster's supervisor) are SIGKILLed.
//! Every call to the supervisor sends the admin token its daemon keeps in
//! the state dir.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{free_port, http_get, http_get_with, wait_until};

pub struct Supervised {
    pub dir: PathBuf,
    pub manifest: PathBuf,
    pub state_dir: PathBuf,
    pub sup_port: u16,
    /// `(name, port)` of every node, in manifest order.
    pub nodes: Vec<(String, u16)>,
    pub down: bool,
    /// The manifest says `tls: auto`: the nodes serve https.
    pub tls: bool,
}

/// A manifest for `nodes` with free ports; `extra_spec` is added to `spec:`
/// verbatim (two-space indented YAML lines).
pub fn manifest_text(
    name: &str,
    nodes: &[(String, u16)],
    sup_port: u16,
    extra_spec: &str,
) -> String {
    let mut s = format!(
        "apiVersion: kvstore/v1\nkind: Cluster\nmetadata: {{name: {name}}}\nspec:\n  stateDir: state\n  nodes:\n"
    );
    for (n, p) in nodes {
        s.push_str(&format!("    - {{name: {n}, port: {p}}}\n"));
    }
    s.push_str(&format!("  supervisor: {{port: {sup_port}}}\n"));
    s.push_str(extra_spec);
    s
}

/// The manifest's `kvdArgs` line (for `extra_spec`) from the environment
/// variable `var`, comma-separated kvd flags; empty when it is unset.
pub fn kvd_args_spec(var: &str) -> String {
    match std::env::var(var) {
        Ok(a) if !a.is_empty() => {
            let quoted: Vec<String> = a.split(',').map(|x| format!("{x:?}")).collect();
            format!("  kvdArgs: [{}]\n", quoted.join(", "))
        }
        _ => String::new(),
    }
}

impl Supervised {
    /// Writes a manifest of `n` nodes into `dir`, applies it, and waits
    /// until the cluster is Ready.
    pub fn apply(dir: &Path, n: usize, extra_spec: &str) -> Result<Supervised> {
        let mut c = Supervised::prepare(dir, n, extra_spec)?;
        c.start()?;
        c.wait_ready(Duration::from_secs(60))?;
        Ok(c)
    }

    /// Writes a manifest of `n` nodes into `dir` (state in `dir/state`)
    /// and applies nothing yet: for tests that set something up first.
    pub fn prepare(dir: &Path, n: usize, extra_spec: &str) -> Result<Supervised> {
        let nodes: Vec<(String, u16)> = (0..n).map(|i| (format!("n{i}"), free_port())).collect();
        let sup_port = free_port();
        let manifest = dir.join("cluster.yaml");
        std::fs::write(
            &manifest,
            manifest_text("test", &nodes, sup_port, extra_spec),
        )?;
        Ok(Supervised {
            dir: dir.to_path_buf(),
            manifest,
            state_dir: dir.join("state"),
            sup_port,
            nodes,
            // Nothing to bring down until `start`.
            down: true,
            tls: extra_spec.lines().any(|l| l.trim() == "tls: auto"),
        })
    }

    /// `kvsup apply` of the manifest; returns once the nodes are started
    /// (not Ready: see [`Supervised::wait_ready`]).
    pub fn start(&mut self) -> Result<()> {
        self.down = false;
        let (st, out) = self.kvsup(&["apply"])?;
        if !st.success() {
            self.down = true;
            bail!("kvsup apply failed ({st}): {out}");
        }
        Ok(())
    }

    /// Runs `kvsup ARGS` for this cluster from `dir`; exit status and output.
    pub fn kvsup(&self, args: &[&str]) -> Result<(ExitStatus, String)> {
        // apply reads the manifest; the others reach the daemon by URL, so
        // they work even while the file holds a broken edit.
        let m = self.manifest.display().to_string();
        let url = format!("http://127.0.0.1:{}", self.sup_port);
        let token = self.token_file().display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        if args.first() == Some(&"apply") {
            all.extend(["-f", &m]);
        } else {
            all.extend(["--supervisor", &url, "--token-file", &token]);
        }
        run_in(&self.dir, "kvsup", &all, Duration::from_secs(120))
    }

    /// The supervisor's admin token file (made by its daemon at start).
    pub fn token_file(&self) -> PathBuf {
        self.state_dir.join("admin.token")
    }

    /// The supervisor's admin token, as sent after `Bearer`.
    pub fn token(&self) -> Result<String> {
        let p = self.token_file();
        let t = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(t.trim().to_string())
    }

    /// GET `path` from the supervisor with its token: (status, body).
    pub fn sup_get(&self, path: &str) -> Result<(u16, Vec<u8>)> {
        let auth = format!("Bearer {}", self.token()?);
        http_get_with(
            self.sup_port,
            path,
            &[("Authorization", &auth)],
            Duration::from_secs(5),
        )
    }

    pub fn status(&self) -> Result<Value> {
        let (code, body) = self.sup_get("/v1/status")?;
        if code != 200 {
            bail!("supervisor status answered {code}");
        }
        Ok(serde_json::from_slice(&body)?)
    }

    pub fn metrics(&self) -> Result<String> {
        let (code, body) = self.sup_get("/metrics")?;
        if code != 200 {
            bail!("supervisor /metrics answered {code}");
        }
        Ok(String::from_utf8(body)?)
    }

    /// Value of an unlabelled sample (e.g. `kvsup_failovers_total`) on the
    /// supervisor's `/metrics`.
    pub fn metric(&self, name: &str) -> Result<f64> {
        let text = self.metrics()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .with_context(|| format!("{name} not on /metrics"))
    }

    pub fn wait_ready(&self, timeout: Duration) -> Result<Value> {
        let mut last = Value::Null;
        let ok = wait_until(timeout, || match self.status() {
            Ok(s) => {
                let ready = s["conditions"]["Ready"].as_bool() == Some(true);
                last = s;
                ready
            }
            Err(_) => false,
        });
        if !ok {
            bail!("cluster not Ready within {timeout:?}; last status: {last:#}");
        }
        Ok(last)
    }

    pub fn primary(&self) -> Option<String> {
        self.status().ok()?["primary"].as_str().map(str::to_string)
    }

    pub fn url(&self, node: &str) -> String {
        let port = self
            .nodes
            .iter()
            .find(|(n, _)| n == node)
            .map_or(0, |(_, p)| *p);
        format!("{}://127.0.0.1:{port}", self.scheme())
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|(_, p)| format!("{}://127.0.0.1:{p}", self.scheme()))
            .collect()
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// With `tls: auto`: where the daemon keeps the CA, the certificates
    /// and the tokens (`ca.pem`, `client.token`, `admin.token`, ...).
    pub fn creds_dir(&self) -> PathBuf {
        self.state_dir.join("creds")
    }

    /// The token in `creds/<name>.token` (`client` or `admin`).
    pub fn cluster_token(&self, name: &str) -> Result<String> {
        let p = self.creds_dir().join(format!("{name}.token"));
        let t = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        Ok(t.trim().to_string())
    }

    /// The pid of `node`'s kvd, from the pid file its supervisor wrote.
    pub fn node_pid(&self, node: &str) -> Result<u32> {
        let p = self.state_dir.join(format!("{node}.pid"));
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        text.trim()
            .parse()
            .with_context(|| format!("{}: not a pid", p.display()))
    }

    /// SIGKILLs `node`'s kvd by its pid, not through the supervisor: a
    /// crash the supervisor only sees.
    pub fn kill_node_process(&self, node: &str) -> Result<u32> {
        let pid = self.node_pid(node)?;
        let p = i32::try_from(pid).context("pid out of range")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        )
        .with_context(|| format!("SIGKILL to {node} (pid {pid})"))?;
        Ok(pid)
    }

    /// One node's entry in the supervisor's status.
    pub fn node_status(&self, node: &str) -> Result<Value> {
        let s = self.status()?;
        s["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == node).cloned())
            .with_context(|| format!("{node} not in status"))
    }

    /// `kvsup kill NODE --signal SIGNAL` (`KILL`, `STOP`, `CONT`): the
    /// supervisor signals the node's process.
    pub fn signal(&self, node: &str, signal: &str) -> Result<()> {
        let (st, out) = self.kvsup(&["kill", node, "--signal", signal])?;
        if !st.success() {
            bail!("kvsup kill --signal {signal} {node}: {st}: {out}");
        }
        Ok(())
    }

    /// How often the supervisor has restarted `node` (0 if unknown).
    pub fn restarts(&self, node: &str) -> u64 {
        self.node_status(node)
            .ok()
            .and_then(|s| s["restarts"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until every node reports the same digest and commit index:
    /// once writes stop, the replicas converge.
    pub fn wait_converged(&self, timeout: Duration) -> Result<()> {
        let mut last = Vec::new();
        let same = wait_until(timeout, || {
            last = self
                .nodes
                .iter()
                .map(|(_, p)| {
                    let (code, body) = http_get(*p, "/v1/status", Duration::from_secs(2)).ok()?;
                    let s: Value = (code == 200).then(|| serde_json::from_slice(&body).ok())??;
                    Some((s["digest"].clone(), s["commit_index"].clone()))
                })
                .collect();
            last.iter().all(Option::is_some) && last.windows(2).all(|w| w[0] == w[1])
        });
        if !same {
            bail!("the nodes did not converge within {timeout:?}: {last:?}");
        }
        Ok(())
    }

    /// `kvsup down`: output; the cluster is then gone.
    pub fn down(&mut self) -> Result<String> {
        self.down = true;
        let (st, out) = self.kvsup(&["down"])?;
        if !st.success() {
            bail!("kvsup down failed ({st}): {out}");
        }
        Ok(out)
    }

    /// Pids named by the pid files in the state dir (supervisor and nodes).
    pub fn pids(&self) -> Vec<u32> {
        let Ok(rd) = std::fs::read_dir(&self.state_dir) else {
            return Vec::new();
        };
        rd.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
            .collect()
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if !self.down && self.down().is_ok() {
            return;
        }
        for pid in self.pids() {
            if let Ok(p) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(p),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// [`crate::run_to_exit`] with a working directory.
pub fn run_in(
    dir: &Path,
    name: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<(ExitStatus, String)> {
    // The manifest's relative stateDir resolves against the directory
    // apply runs in: the cluster's own directory.
    crate::run_to_exit_in(Some(dir), name, args, timeout)
}

/// A kvclient that makes exactly one attempt per call (no retries), starting
/// at endpoint `first` (rotating the list): each call is then one operation
/// in a recorded history (a retried write could take effect twice), and a
/// caller that wants to move on after a failure builds one with the next
/// `first`. Redirects to the primary are still followed.
pub fn single_attempt_client(urls: &[String], first: usize, timeout: Duration) -> kvclient::Client {
    let mut order = urls.to_vec();
    order.rotate_left(first % urls.len().max(1));
    kvclient::Client::builder()
        .endpoints(order)
        .request_timeout(timeout)
        .max_retries(0)
        .build()
        .expect("a valid client configuration")
}

//! kvsup's web dashboard: the page (HTML, CSS and a script, embedded in the
//! binary) and the recent samples its charts draw, kept by the daemon in
//! bounded rings.
//!
//! The page holds no data, so it is served without the token
//! ([`crate::auth::PAGE_PATHS`]); its script reads the token from the URL
//! fragment (which a browser never sends) or a form, keeps it in
//! `sessionStorage`, and sends it in `Authorization` on every fetch of the
//! API, from the daemon's own origin. Everything here is pure: the daemon
//! feeds [`Samples`] from its status document, the API serves
//! [`Samples::to_json`].

use std::collections::{BTreeMap, VecDeque};

use serde::Serialize;
use serde_json::{json, Value};

/// A file of the page.
#[derive(Debug)]
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static str,
}

/// Every file of the page: no build step, nothing fetched from elsewhere.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("index.html"),
    },
    Asset {
        path: "/dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("dashboard.js"),
    },
    Asset {
        path: "/dashboard.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("dashboard.css"),
    },
];

/// The page may load its own script and style and fetch its own origin,
/// nothing else; no inline script, no frames (no clickjacking).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

pub fn asset(path: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.path == path)
}

/// How often the daemon samples its status for the charts.
pub const SAMPLE_EVERY_MS: u64 = 1000;
/// Samples kept: five minutes at one a second.
pub const MAX_SAMPLES: usize = 300;
/// Failover durations kept.
pub const MAX_FAILOVERS: usize = 50;

/// What the charts need of one status document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sample {
    pub t_ms: u64,
    pub primary: Option<String>,
    pub epoch: u64,
    /// The highest commit index any node reported: the cluster's committed
    /// writes so far (a node behind reports less, never more).
    pub commit_index: Option<u64>,
    /// Each node's lag in entries (`None`: unknown, e.g. the node is down).
    pub lag: BTreeMap<String, Option<u64>>,
    pub max_lag: Option<u64>,
}

impl Sample {
    /// The sample of `status` (the `/v1/status` document) taken at `t_ms`.
    pub fn from_status(t_ms: u64, status: &Value) -> Sample {
        let nodes = status["nodes"].as_array().map_or(&[][..], Vec::as_slice);
        let lag: BTreeMap<String, Option<u64>> = nodes
            .iter()
            .filter_map(|n| Some((n["name"].as_str()?.to_string(), n["lag"].as_u64())))
            .collect();
        Sample {
            t_ms,
            primary: status["primary"].as_str().map(str::to_string),
            epoch: status["epoch"].as_u64().unwrap_or(0),
            commit_index: nodes
                .iter()
                .filter_map(|n| n["commit_index"].as_u64())
                .max(),
            max_lag: lag.values().flatten().copied().max(),
            lag,
        }
    }
}

/// One failover: when it ended, who was promoted, how long the cluster
/// had no primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failover {
    pub t_ms: u64,
    pub node: String,
    pub ms: u64,
}

/// Writes per second at `t_ms`, over the interval that ends there.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rate {
    pub t_ms: u64,
    pub per_s: f64,
}

/// The rate of committed writes between consecutive samples. A commit
/// index that went down (the cluster was made anew) or is unknown gives
/// no rate for that interval rather than a negative or made-up one.
pub fn write_rates(samples: &[Sample]) -> Vec<Rate> {
    samples
        .windows(2)
        .filter_map(|w| {
            let (a, b) = (&w[0], &w[1]);
            let dt = b.t_ms.checked_sub(a.t_ms).filter(|dt| *dt > 0)?;
            let done = b.commit_index?.checked_sub(a.commit_index?)?;
            Some(Rate {
                t_ms: b.t_ms,
                per_s: done as f64 * 1000.0 / dt as f64,
            })
        })
        .collect()
}

/// The daemon's recent samples and failovers, each ring bounded.
#[derive(Debug, Default)]
pub struct Samples {
    samples: VecDeque<Sample>,
    failovers: VecDeque<Failover>,
}

impl Samples {
    pub fn push(&mut self, s: Sample) {
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    pub fn failover(&mut self, f: Failover) {
        if self.failovers.len() == MAX_FAILOVERS {
            self.failovers.pop_front();
        }
        self.failovers.push_back(f);
    }

    /// The `/v1/samples` document, oldest first.
    pub fn to_json(&self) -> Value {
        let samples: Vec<Sample> = self.samples.iter().cloned().collect();
        json!({
            "interval_ms": SAMPLE_EVERY_MS,
            "max_samples": MAX_SAMPLES,
            "writes_per_s": write_rates(&samples),
            "samples": samples,
            "failovers": self.failovers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t_ms: u64, commit: Option<u64>) -> Sample {
        Sample {
            t_ms,
            primary: Some("n0".into()),
            epoch: 1,
            commit_index: commit,
            lag: BTreeMap::new(),
            max_lag: None,
        }
    }

    #[test]
    fn a_sample_takes_the_primary_the_highest_commit_index_and_the_lags() {
        let status = json!({
            "primary": "n1", "epoch": 4,
            "nodes": [
                {"name": "n0", "commit_index": 90, "lag": 12},
                {"name": "n1", "commit_index": 102, "lag": 0},
                {"name": "n2", "commit_index": null, "lag": null},
            ],
        });
        let s = Sample::from_status(7, &status);
        assert_eq!(s.primary.as_deref(), Some("n1"));
        assert_eq!((s.t_ms, s.epoch, s.commit_index), (7, 4, Some(102)));
        assert_eq!(s.max_lag, Some(12));
        assert_eq!(s.lag["n0"], Some(12));
        assert_eq!(s.lag["n2"], None);
        let empty = Sample::from_status(1, &json!({"primary": null}));
        assert_eq!(
            (empty.primary, empty.commit_index, empty.max_lag),
            (None, None, None)
        );
    }

    #[test]
    fn rates_are_commits_over_time_and_skip_what_cannot_be_a_rate() {
        let s = [
            sample(1000, Some(10)),
            sample(2000, Some(60)),
            sample(2500, Some(110)),
            sample(2500, Some(120)), // no time passed
            sample(3500, None),      // unknown
            sample(4500, Some(130)),
            sample(5500, Some(3)), // a new cluster
            sample(6500, Some(4)),
        ];
        let r = write_rates(&s);
        let got: Vec<(u64, f64)> = r.iter().map(|r| (r.t_ms, r.per_s)).collect();
        assert_eq!(got, vec![(2000, 50.0), (2500, 100.0), (6500, 1.0)]);
        assert!(write_rates(&s[..1]).is_empty());
    }

    #[test]
    fn the_rings_are_bounded_and_keep_the_newest() {
        let mut r = Samples::default();
        for i in 0..(MAX_SAMPLES as u64 + 5) {
            r.push(sample(i * 1000, Some(i)));
        }
        for i in 0..(MAX_FAILOVERS as u64 + 3) {
            r.failover(Failover {
                t_ms: i,
                node: "n1".into(),
                ms: i,
            });
        }
        let v = r.to_json();
        let samples = v["samples"].as_array().unwrap();
        assert_eq!(samples.len(), MAX_SAMPLES);
        assert_eq!(samples[0]["t_ms"], 5000);
        assert_eq!(v["writes_per_s"].as_array().unwrap().len(), MAX_SAMPLES - 1);
        let f = v["failovers"].as_array().unwrap();
        assert_eq!((f.len(), &f[0]["ms"]), (MAX_FAILOVERS, &json!(3)));
    }

    #[test]
    fn the_page_is_self_contained_and_its_paths_are_the_open_ones() {
        let paths: Vec<&str> = ASSETS.iter().map(|a| a.path).collect();
        assert_eq!(paths, crate::auth::PAGE_PATHS);
        for a in ASSETS {
            // Nothing from another origin: no CDN, no external font (the
            // SVG namespace is a name, not something fetched).
            let body = a.body.replace("\"http://www.w3.org/2000/svg\"", "");
            assert!(
                !body.contains("http://") && !body.contains("https://"),
                "{}",
                a.path
            );
            assert!(
                !body.contains("//fonts.") && !body.contains("@import"),
                "{}",
                a.path
            );
        }
        let html = asset("/").unwrap().body;
        assert!(html.contains("src=\"/dashboard.js\"") && !html.contains("<script>"));
        assert!(asset("/v1/status").is_none());
    }
}

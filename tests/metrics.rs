//! `/metrics` (docs/DESIGN.md §10): the kvd metrics that apply to one node, in the
//! Prometheus text format, reflecting the writes actually made.

use bytes::Bytes;
use kvstore_testkit::node::{client, http, start};
use tempfile::TempDir;

/// One sample line of the text exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses sample lines (`name{a="b",c="d"} value`), skipping comments. Label
/// values here never contain `,` `"` or `}`, which keeps this small.
fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {l:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let inner = rest
                        .strip_suffix('}')
                        .unwrap_or_else(|| panic!("bad labels {l:?}"));
                    let labels = inner
                        .split(',')
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p
                                .split_once('=')
                                .unwrap_or_else(|| panic!("bad label {p:?}"));
                            (k.to_string(), v.trim_matches('"').to_string())
                        })
                        .collect();
                    (n.to_string(), labels)
                }
                None => (series.to_string(), Vec::new()),
            };
            Sample {
                name,
                labels,
                value,
            }
        })
        .collect()
}

fn sum(samples: &[Sample], name: &str, filter: impl Fn(&Sample) -> bool) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && filter(s))
        .map(|s| s.value)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_reflect_the_writes_made() {
    const PUTS: usize = 7;
    let tmp = TempDir::new().unwrap();
    let kvd = start(&tmp, &[]);
    let c = client(&kvd);
    let http = http();

    for i in 0..PUTS {
        c.set(&format!("m/{i}"), format!("v{i}")).await.unwrap();
    }
    let items: Vec<(String, Bytes)> = (0..3)
        .map(|i| (format!("bulk/{i}"), Bytes::from("b")))
        .collect();
    c.bulk_set(&items).await.unwrap();
    c.delete("m/0").await.unwrap();
    assert!(c.get("m/1").await.unwrap().is_some());
    assert!(c.get("missing").await.unwrap().is_none());
    let keys = PUTS - 1 + items.len();

    let resp = http
        .get(format!("{}/metrics", kvd.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    assert!(ctype.starts_with("text/plain"), "content-type {ctype:?}");
    let text = resp.text().await.unwrap();
    let samples = parse(&text);

    let is = |op: &'static str, code: &'static str| {
        move |s: &Sample| s.label("op") == Some(op) && s.label("code") == Some(code)
    };
    let name = "kvd_http_requests_total";
    assert_eq!(sum(&samples, name, is("put", "200")), PUTS as f64, "{text}");
    assert_eq!(sum(&samples, name, is("bulk", "200")), 1.0, "{text}");
    assert_eq!(sum(&samples, name, is("delete", "200")), 1.0, "{text}");
    assert_eq!(sum(&samples, name, is("get", "200")), 1.0, "{text}");
    assert_eq!(sum(&samples, name, is("get", "404")), 1.0, "{text}");

    // Latency histogram per op, in seconds.
    let put_latency = sum(&samples, "kvd_http_request_duration_seconds_count", |s| {
        s.label("op") == Some("put")
    });
    assert_eq!(put_latency, PUTS as f64, "{text}");

    // Every acknowledged write went through an fsync'd batch.
    let writes = (PUTS + 2) as f64; // puts, one bulk, one delete
    let fsyncs = sum(&samples, "kvd_wal_fsync_duration_seconds_count", |_| true);
    assert!(
        fsyncs >= 1.0 && fsyncs <= writes,
        "fsync count {fsyncs}:\n{text}"
    );
    assert!(
        sum(&samples, "kvd_wal_fsync_duration_seconds_sum", |_| true) > 0.0,
        "{text}"
    );
    assert!(
        samples
            .iter()
            .any(|s| s.name == "kvd_wal_fsync_duration_seconds_bucket"
                && s.label("le") == Some("+Inf")),
        "fsync duration is a histogram:\n{text}"
    );
    assert_eq!(
        sum(&samples, "kvd_wal_batch_records_sum", |_| true),
        writes,
        "batches hold every record exactly once:\n{text}"
    );
    assert_eq!(
        sum(&samples, "kvd_wal_batch_records_count", |_| true),
        fsyncs,
        "one batch per fsync:\n{text}"
    );

    assert_eq!(sum(&samples, "kvd_keys", |_| true), keys as f64, "{text}");
    assert!(
        text.lines().any(|l| l == format!("kvd_keys {keys}")),
        "a plain `kvd_keys {keys}` line:\n{text}"
    );
}

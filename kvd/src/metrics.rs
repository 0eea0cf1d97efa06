//! Prometheus metrics of a kvd node (docs/DESIGN.md §10): base units, `_total`
//! counters, histograms for latencies. One registry per process, rendered by
//! `GET /metrics`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric kvd exports.
pub struct Metrics {
    registry: Registry,
    pub http_requests_total: IntCounterVec,
    pub http_request_duration_seconds: HistogramVec,
    pub wal_fsync_seconds: Histogram,
    pub wal_batch_records: Histogram,
    pub wal_appends_per_fsync: Histogram,
    pub commit_latency_seconds: Histogram,
    pub snapshots_total: IntCounter,
    pub snapshot_seconds: Histogram,
    pub keys: IntGauge,
    pub epoch: IntGauge,
    pub is_primary: IntGauge,
    /// Primary/secondary: the configuration in effect (docs/DESIGN.md §4.11).
    pub config_index: IntGauge,
    pub config_voters: IntGauge,
    pub config_learners: IntGauge,
    pub last_index: IntGauge,
    pub commit_index: IntGauge,
    pub wal_bytes: IntGauge,
    pub wal_segments: IntGauge,
    pub storage_poisoned: IntGauge,
    pub storage_state: IntGaugeVec,
    pub wal_roll_failures_total: IntCounter,
    pub data_set_bytes: IntGauge,
    pub max_data_bytes: IntGauge,
    pub replication_lag_entries: IntGaugeVec,
    pub ml_peers: IntGauge,
    pub index: IndexMetrics,
    pub connections: ConnectionMetrics,
    pub expiry: ExpiryMetrics,
    pub watch: WatchMetrics,
}

/// Keys with a deadline and leases (gauges and the expiry count, set from
/// the engine when `/metrics` is read).
pub struct ExpiryMetrics {
    pub keys_with_ttl: IntGauge,
    pub expired_keys_total: IntCounter,
    pub leases: IntGauge,
}

impl ExpiryMetrics {
    fn new(r: &Registrar) -> Result<ExpiryMetrics, prometheus::Error> {
        Ok(ExpiryMetrics {
            keys_with_ttl: r.gauge(
                "kvd_keys_with_ttl",
                "Live keys with a deadline: a TTL or a lease",
            )?,
            expired_keys_total: r.counter(
                "kvd_expired_keys_total",
                "Keys removed because their deadline passed or their lease expired",
            )?,
            leases: r.gauge("kvd_leases", "Live leases")?,
        })
    }
}

/// Open watches and what they were sent, counted as the API serves them.
#[derive(Clone)]
pub struct WatchMetrics {
    pub watchers: IntGauge,
    pub events_sent_total: IntCounter,
    pub watchers_cut_total: IntCounterVec,
}

impl WatchMetrics {
    fn new(r: &Registrar) -> Result<WatchMetrics, prometheus::Error> {
        Ok(WatchMetrics {
            watchers: r.gauge("kvd_watchers", "Open watch streams")?,
            events_sent_total: r.counter(
                "kvd_watch_events_sent_total",
                "Events (put, delete, expire) written to watch streams",
            )?,
            watchers_cut_total: r.labelled(
                IntCounterVec::new,
                "kvd_watchers_cut_total",
                "Watch streams the node ended with an error event, by reason \
                 (watcher_too_slow, compacted)",
                &["reason"],
            )?,
        })
    }
}

/// `--index` figures (set from the index when `/metrics` is read; the
/// query histogram as queries run).
pub struct IndexMetrics {
    pub documents: IntGauge,
    pub terms: IntGauge,
    pub postings: IntGauge,
    pub memory_bytes: IntGauge,
    pub query_duration_seconds: HistogramVec,
}

impl IndexMetrics {
    fn new(r: &Registrar) -> Result<IndexMetrics, prometheus::Error> {
        Ok(IndexMetrics {
            documents: r.gauge(
                "kvd_index_documents",
                "Keys whose value has at least one indexed term",
            )?,
            terms: r.gauge("kvd_index_terms", "Distinct terms in the index")?,
            postings: r.gauge(
                "kvd_index_postings",
                "Postings (document, term) in the index",
            )?,
            memory_bytes: r.gauge(
                "kvd_index_memory_bytes",
                "Estimated heap bytes held by the index",
            )?,
            query_duration_seconds: r.histogram_vec(
                "kvd_index_query_duration_seconds",
                "Time to answer one index query, by kind (search, similar)",
                LATENCY_BUCKETS,
                &["kind"],
            )?,
        })
    }
}

/// The HTTP listener's figures: open connections and their limits per pool
/// (`client`, `reserve`), whether accepting is paused because every slot is
/// taken, failed accepts, and the request-body bytes held in memory.
#[derive(Clone)]
pub struct ConnectionMetrics {
    pub open: IntGaugeVec,
    pub limit: IntGaugeVec,
    pub accept_paused: IntGauge,
    pub accept_errors_total: IntCounter,
    pub body_bytes_inflight: IntGauge,
    pub tls_handshake_failures_total: IntCounter,
}

impl ConnectionMetrics {
    fn new(r: &Registrar) -> Result<ConnectionMetrics, prometheus::Error> {
        Ok(ConnectionMetrics {
            open: r.labelled(
                IntGaugeVec::new,
                "kvd_http_connections",
                "Open HTTP connections, by pool",
                &["pool"],
            )?,
            limit: r.labelled(
                IntGaugeVec::new,
                "kvd_http_connection_limit",
                "Most HTTP connections open at once, by pool (fitted to RLIMIT_NOFILE)",
                &["pool"],
            )?,
            accept_paused: r.gauge(
                "kvd_http_accept_paused",
                "1 while every connection slot is taken and new connections wait in the backlog",
            )?,
            accept_errors_total: r.counter(
                "kvd_http_accept_errors_total",
                "Failed accept(2) calls (EMFILE and the like)",
            )?,
            body_bytes_inflight: r.gauge(
                "kvd_http_body_bytes_inflight",
                "Request-body bytes reserved by requests being read or handled",
            )?,
            tls_handshake_failures_total: r.counter(
                "kvd_tls_handshake_failures_total",
                "TLS handshakes that failed or did not finish in time (plain HTTP to a TLS port, an untrusted certificate, a scanner)",
            )?,
        })
    }
}

/// Latency buckets from 50 µs to 10 s: a group commit on a fast disk takes
/// well under a millisecond, a snapshot of millions of keys seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Buckets of the group-commit batch size, in records.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
];

/// Makes each metric and registers it in one step, so that none is made
/// and forgotten (it would never show on `/metrics`).
struct Registrar<'a>(&'a Registry);

impl Registrar<'_> {
    fn register<M: prometheus::core::Collector + Clone + 'static>(
        &self,
        metric: M,
    ) -> Result<M, prometheus::Error> {
        self.0.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        self.register(IntGauge::new(name, help)?)
    }

    fn counter(&self, name: &str, help: &str) -> Result<IntCounter, prometheus::Error> {
        self.register(IntCounter::new(name, help)?)
    }

    /// A labelled gauge or counter: `make` is its `new`.
    fn labelled<M: prometheus::core::Collector + Clone + 'static>(
        &self,
        make: fn(Opts, &[&str]) -> Result<M, prometheus::Error>,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<M, prometheus::Error> {
        self.register(make(Opts::new(name, help), labels)?)
    }

    fn histogram(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
    ) -> Result<Histogram, prometheus::Error> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.register(Histogram::with_opts(opts)?)
    }

    fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        buckets: &[f64],
        labels: &[&str],
    ) -> Result<HistogramVec, prometheus::Error> {
        let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
        self.register(HistogramVec::new(opts, labels)?)
    }
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let r = Registrar(&registry);
        Ok(Metrics {
            http_requests_total: r.labelled(
                IntCounterVec::new,
                "kvd_http_requests_total",
                "HTTP requests served, by operation and status code",
                &["op", "code"],
            )?,
            http_request_duration_seconds: r.histogram_vec(
                "kvd_http_request_duration_seconds",
                "Time from request to response, by operation",
                LATENCY_BUCKETS,
                &["op"],
            )?,
            wal_fsync_seconds: r.histogram(
                "kvd_wal_fsync_duration_seconds",
                "Time to write and fdatasync one group-commit batch (a secondary: one \
                 group of the primary's appends)",
                LATENCY_BUCKETS,
            )?,
            wal_batch_records: r.histogram(
                "kvd_wal_batch_records",
                "Records made durable by one fdatasync (group commit batch size)",
                BATCH_BUCKETS,
            )?,
            wal_appends_per_fsync: r.histogram(
                "kvd_wal_appends_per_fsync",
                "Peers' batches made durable by one fdatasync: on a secondary the primary's \
                 appends (with entries), on a masterless node the peers' merged batches; \
                 above 1 only when several arrived at once",
                BATCH_BUCKETS,
            )?,
            commit_latency_seconds: r.histogram(
                "kvd_commit_latency_seconds",
                "A primary: time from a batch's write to the WAL to its commit (durable on \
                 a majority)",
                LATENCY_BUCKETS,
            )?,
            snapshots_total: r.counter("kvd_snapshots_total", "Snapshots written")?,
            snapshot_seconds: r.histogram(
                "kvd_snapshot_duration_seconds",
                "Time to write one snapshot",
                LATENCY_BUCKETS,
            )?,
            keys: r.gauge("kvd_keys", "Live keys in memory")?,
            epoch: r.gauge("kvd_epoch", "Current epoch of this node")?,
            is_primary: r.gauge("kvd_is_primary", "1 if this node accepts writes as primary")?,
            config_index: r.gauge(
                "kvd_config_index",
                "Log index of the configuration in effect (0: the bootstrap configuration)",
            )?,
            config_voters: r.gauge("kvd_config_voters", "Voters of the configuration in effect")?,
            config_learners: r.gauge(
                "kvd_config_learners",
                "Learners of the configuration in effect",
            )?,
            last_index: r.gauge("kvd_last_index", "Index of the last durable log entry")?,
            commit_index: r.gauge("kvd_commit_index", "Index of the last committed log entry")?,
            wal_bytes: r.gauge("kvd_wal_bytes", "Bytes in WAL segments on disk")?,
            wal_segments: r.gauge("kvd_wal_segments", "WAL segment files on disk")?,
            storage_poisoned: r.gauge(
                "kvd_storage_poisoned",
                "1 once the node refuses writes for a storage reason (see kvd_storage_state)",
            )?,
            storage_state: r.labelled(
                IntGaugeVec::new,
                "kvd_storage_state",
                "1 for the storage engine's current state: ok, poisoned (a WAL write or \
                 fsync failed), data_dir_lost (the data dir was removed or replaced)",
                &["state"],
            )?,
            wal_roll_failures_total: r.counter(
                "kvd_wal_roll_failures_total",
                "Write batches refused because no new WAL segment could be started",
            )?,
            data_set_bytes: r.gauge(
                "kvd_data_set_bytes",
                "Keys, values and per-entry overhead, as --max-memory-mib counts them",
            )?,
            max_data_bytes: r.gauge(
                "kvd_max_data_set_bytes",
                "The --max-memory-mib budget in bytes (0: no limit)",
            )?,
            replication_lag_entries: r.labelled(
                IntGaugeVec::new,
                "kvd_replication_lag_entries",
                "Log entries a peer is behind this primary's last index",
                &["peer"],
            )?,
            ml_peers: r.gauge(
                "kvd_ml_peers",
                "Peers in this masterless node's current peer set (0 in other modes)",
            )?,
            index: IndexMetrics::new(&r)?,
            connections: ConnectionMetrics::new(&r)?,
            expiry: ExpiryMetrics::new(&r)?,
            watch: WatchMetrics::new(&r)?,
            registry,
        })
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

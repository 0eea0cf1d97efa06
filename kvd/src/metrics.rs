//! Prometheus metrics of a kvd node (DESIGN §10): base units, `_total`
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
    pub snapshots_total: IntCounter,
    pub snapshot_seconds: Histogram,
    pub keys: IntGauge,
    pub epoch: IntGauge,
    pub is_primary: IntGauge,
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
    pub index: IndexMetrics,
    pub connections: ConnectionMetrics,
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
    fn new(registry: &Registry) -> Result<IndexMetrics, prometheus::Error> {
        let m = IndexMetrics {
            documents: IntGauge::new(
                "kvd_index_documents",
                "Keys whose value has at least one indexed term",
            )?,
            terms: IntGauge::new("kvd_index_terms", "Distinct terms in the index")?,
            postings: IntGauge::new(
                "kvd_index_postings",
                "Postings (document, term) in the index",
            )?,
            memory_bytes: IntGauge::new(
                "kvd_index_memory_bytes",
                "Estimated heap bytes held by the index",
            )?,
            query_duration_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "kvd_index_query_duration_seconds",
                    "Time to answer one index query, by kind (search, similar)",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["kind"],
            )?,
        };
        registry.register(Box::new(m.documents.clone()))?;
        registry.register(Box::new(m.terms.clone()))?;
        registry.register(Box::new(m.postings.clone()))?;
        registry.register(Box::new(m.memory_bytes.clone()))?;
        registry.register(Box::new(m.query_duration_seconds.clone()))?;
        Ok(m)
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
}

impl ConnectionMetrics {
    fn new(registry: &Registry) -> Result<ConnectionMetrics, prometheus::Error> {
        let m = ConnectionMetrics {
            open: IntGaugeVec::new(
                Opts::new("kvd_http_connections", "Open HTTP connections, by pool"),
                &["pool"],
            )?,
            limit: IntGaugeVec::new(
                Opts::new(
                    "kvd_http_connection_limit",
                    "Most HTTP connections open at once, by pool (fitted to RLIMIT_NOFILE)",
                ),
                &["pool"],
            )?,
            accept_paused: IntGauge::new(
                "kvd_http_accept_paused",
                "1 while every connection slot is taken and new connections wait in the backlog",
            )?,
            accept_errors_total: IntCounter::new(
                "kvd_http_accept_errors_total",
                "Failed accept(2) calls (EMFILE and the like)",
            )?,
            body_bytes_inflight: IntGauge::new(
                "kvd_http_body_bytes_inflight",
                "Request-body bytes reserved by requests being read or handled",
            )?,
        };
        registry.register(Box::new(m.open.clone()))?;
        registry.register(Box::new(m.limit.clone()))?;
        registry.register(Box::new(m.accept_paused.clone()))?;
        registry.register(Box::new(m.accept_errors_total.clone()))?;
        registry.register(Box::new(m.body_bytes_inflight.clone()))?;
        Ok(m)
    }
}

/// Latency buckets from 50 µs to 10 s: a group commit on a fast disk takes
/// well under a millisecond, a snapshot of millions of keys seconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let http_requests_total = IntCounterVec::new(
            Opts::new(
                "kvd_http_requests_total",
                "HTTP requests served, by operation and status code",
            ),
            &["op", "code"],
        )?;
        let http_request_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "kvd_http_request_duration_seconds",
                "Time from request to response, by operation",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["op"],
        )?;
        let wal_fsync_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "kvd_wal_fsync_duration_seconds",
                "Time to write and fdatasync one group-commit batch",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let wal_batch_records = Histogram::with_opts(
            HistogramOpts::new(
                "kvd_wal_batch_records",
                "Records made durable by one fdatasync (group commit batch size)",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
            ]),
        )?;
        let snapshots_total = IntCounter::new("kvd_snapshots_total", "Snapshots written")?;
        let snapshot_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "kvd_snapshot_duration_seconds",
                "Time to write one snapshot",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let keys = IntGauge::new("kvd_keys", "Live keys in memory")?;
        let epoch = IntGauge::new("kvd_epoch", "Current epoch of this node")?;
        let is_primary =
            IntGauge::new("kvd_is_primary", "1 if this node accepts writes as primary")?;
        let last_index = IntGauge::new("kvd_last_index", "Index of the last durable log entry")?;
        let commit_index =
            IntGauge::new("kvd_commit_index", "Index of the last committed log entry")?;
        let wal_bytes = IntGauge::new("kvd_wal_bytes", "Bytes in WAL segments on disk")?;
        let wal_segments = IntGauge::new("kvd_wal_segments", "WAL segment files on disk")?;
        let storage_poisoned = IntGauge::new(
            "kvd_storage_poisoned",
            "1 once the node refuses writes for a storage reason (see kvd_storage_state)",
        )?;
        let storage_state = IntGaugeVec::new(
            Opts::new(
                "kvd_storage_state",
                "1 for the storage engine's current state: ok, poisoned (a WAL write or \
                 fsync failed), data_dir_lost (the data dir was removed or replaced)",
            ),
            &["state"],
        )?;
        let wal_roll_failures_total = IntCounter::new(
            "kvd_wal_roll_failures_total",
            "Write batches refused because no new WAL segment could be started",
        )?;
        let data_set_bytes = IntGauge::new(
            "kvd_data_set_bytes",
            "Keys, values and per-entry overhead, as --max-memory-mib counts them",
        )?;
        let max_data_bytes = IntGauge::new(
            "kvd_max_data_set_bytes",
            "The --max-memory-mib budget in bytes (0: no limit)",
        )?;
        let replication_lag_entries = IntGaugeVec::new(
            Opts::new(
                "kvd_replication_lag_entries",
                "Log entries a peer is behind this primary's last index",
            ),
            &["peer"],
        )?;
        registry.register(Box::new(replication_lag_entries.clone()))?;
        registry.register(Box::new(http_requests_total.clone()))?;
        registry.register(Box::new(http_request_duration_seconds.clone()))?;
        registry.register(Box::new(wal_fsync_seconds.clone()))?;
        registry.register(Box::new(wal_batch_records.clone()))?;
        registry.register(Box::new(snapshots_total.clone()))?;
        registry.register(Box::new(snapshot_seconds.clone()))?;
        registry.register(Box::new(keys.clone()))?;
        registry.register(Box::new(epoch.clone()))?;
        registry.register(Box::new(is_primary.clone()))?;
        registry.register(Box::new(last_index.clone()))?;
        registry.register(Box::new(commit_index.clone()))?;
        registry.register(Box::new(wal_bytes.clone()))?;
        registry.register(Box::new(wal_segments.clone()))?;
        registry.register(Box::new(storage_poisoned.clone()))?;
        registry.register(Box::new(storage_state.clone()))?;
        registry.register(Box::new(wal_roll_failures_total.clone()))?;
        registry.register(Box::new(data_set_bytes.clone()))?;
        registry.register(Box::new(max_data_bytes.clone()))?;
        let index = IndexMetrics::new(&registry)?;
        let connections = ConnectionMetrics::new(&registry)?;
        Ok(Metrics {
            index,
            connections,
            registry,
            http_requests_total,
            http_request_duration_seconds,
            wal_fsync_seconds,
            wal_batch_records,
            snapshots_total,
            snapshot_seconds,
            keys,
            epoch,
            is_primary,
            last_index,
            commit_index,
            wal_bytes,
            wal_segments,
            storage_poisoned,
            storage_state,
            wal_roll_failures_total,
            data_set_bytes,
            max_data_bytes,
            replication_lag_entries,
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

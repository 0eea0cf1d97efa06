//! The supervisor's Prometheus metrics (docs/DESIGN.md §10).

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub node_up: IntGaugeVec,
    pub primary_epoch: IntGauge,
    pub failovers: IntCounter,
    pub switchovers: IntCounter,
    pub restarts: IntCounterVec,
    pub failover_duration: Histogram,
    pub reconcile_errors: IntCounter,
    pub applies: IntCounter,
    pub reseeds: IntCounter,
    pub health_check_failures: IntCounterVec,
    pub ready: IntGauge,
    pub mode_switches: IntCounter,
    pub mode_switch_pause: Histogram,
    /// Scheduled backups by result (`ok`, `failed`).
    pub backups: IntCounterVec,
    /// The index the newest scheduled backup is exact at.
    pub last_backup_index: IntGauge,
    /// The primary's configuration in effect: its record's index, its
    /// voters and its learners.
    pub config_index: IntGauge,
    pub config_voters: IntGauge,
    pub config_learners: IntGauge,
    /// Changes carried out over time (rolling, add_node, remove_node) by
    /// result (`ok`, `failed`).
    pub changes: IntCounterVec,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let r = Registry::new();
        Ok(Metrics {
            node_up: register(
                &r,
                IntGaugeVec::new(
                    Opts::new("kvsup_node_up", "1 if the node's last health check passed"),
                    &["node"],
                )?,
            )?,
            primary_epoch: gauge(
                &r,
                "kvsup_primary_epoch",
                "Epoch of the healthy primary (0: none)",
            )?,
            failovers: counter(
                &r,
                "kvsup_failovers_total",
                "Automatic promotions after the primary failed",
            )?,
            switchovers: counter(
                &r,
                "kvsup_switchovers_total",
                "Planned primary moves (kvsup promote)",
            )?,
            restarts: per_node_counter(
                &r,
                "kvsup_restarts_total",
                "Node processes restarted after exiting",
            )?,
            failover_duration: histogram(
                &r,
                "kvsup_failover_duration_seconds",
                "From the primary's failure being seen to a new primary elected",
                &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0],
            )?,
            reconcile_errors: counter(
                &r,
                "kvsup_reconcile_errors_total",
                "Reconcile steps that failed (spawn, promotion, manifest reload)",
            )?,
            applies: counter(&r, "kvsup_applies_total", "Manifests applied")?,
            reseeds: counter(
                &r,
                "kvsup_reseeds_total",
                "Nodes started again on a fresh data dir after theirs was lost",
            )?,
            health_check_failures: per_node_counter(
                &r,
                "kvsup_health_check_failures_total",
                "Failed node health checks",
            )?,
            ready: gauge(&r, "kvsup_cluster_ready", "1 when the cluster is Ready")?,
            mode_switches: counter(
                &r,
                "kvsup_mode_switches_total",
                "Live switches between primary/secondary and masterless",
            )?,
            mode_switch_pause: histogram(
                &r,
                "kvsup_mode_switch_pause_seconds",
                "How long writes were paused by a mode switch",
                &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0],
            )?,
            backups: labelled_counter(
                &r,
                "kvsup_backups_total",
                "Scheduled backups (spec.backup) by result: ok or failed",
                &["result"],
            )?,
            last_backup_index: gauge(
                &r,
                "kvsup_last_backup_index",
                "The log index the newest scheduled backup is exact at (0: none yet)",
            )?,
            config_index: gauge(
                &r,
                "kvsup_config_index",
                "Log index of the primary's configuration in effect (0: the bootstrap one)",
            )?,
            config_voters: gauge(
                &r,
                "kvsup_config_voters",
                "Voters of the primary's configuration in effect",
            )?,
            config_learners: gauge(
                &r,
                "kvsup_config_learners",
                "Learners of the primary's configuration in effect (nodes being added)",
            )?,
            changes: labelled_counter(
                &r,
                "kvsup_changes_total",
                "Changes of a running cluster by kind (rolling, add_node, remove_node) and \
                 result (ok, failed)",
                &["kind", "result"],
            )?,
            registry: r,
        })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// `metric`, registered in `r`.
fn register<M: Collector + Clone + 'static>(r: &Registry, metric: M) -> prometheus::Result<M> {
    r.register(Box::new(metric.clone()))?;
    Ok(metric)
}

fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
    register(r, IntGauge::new(name, help)?)
}

fn counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounter> {
    register(r, IntCounter::new(name, help)?)
}

/// A counter with a `node` label.
fn per_node_counter(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntCounterVec> {
    labelled_counter(r, name, help, &["node"])
}

fn labelled_counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    register(r, IntCounterVec::new(Opts::new(name, help), labels)?)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    buckets: &[f64],
) -> prometheus::Result<Histogram> {
    register(
        r,
        Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?,
    )
}

//! The supervisor's Prometheus metrics (DESIGN §10).

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
    pub health_check_failures: IntCounterVec,
    pub ready: IntGauge,
    pub mode_switches: IntCounter,
    pub mode_switch_pause: Histogram,
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let node_up = IntGaugeVec::new(
            Opts::new("kvsup_node_up", "1 if the node's last health check passed"),
            &["node"],
        )?;
        let primary_epoch = IntGauge::new(
            "kvsup_primary_epoch",
            "Epoch of the healthy primary (0: none)",
        )?;
        let failovers = IntCounter::new(
            "kvsup_failovers_total",
            "Automatic promotions after the primary failed",
        )?;
        let switchovers = IntCounter::new(
            "kvsup_switchovers_total",
            "Planned primary moves (kvsup promote)",
        )?;
        let restarts = IntCounterVec::new(
            Opts::new(
                "kvsup_restarts_total",
                "Node processes restarted after exiting",
            ),
            &["node"],
        )?;
        let failover_duration = Histogram::with_opts(
            HistogramOpts::new(
                "kvsup_failover_duration_seconds",
                "From the primary's failure being seen to a new primary elected",
            )
            .buckets(vec![
                0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0,
            ]),
        )?;
        let reconcile_errors = IntCounter::new(
            "kvsup_reconcile_errors_total",
            "Reconcile steps that failed (spawn, promotion, manifest reload)",
        )?;
        let applies = IntCounter::new("kvsup_applies_total", "Manifests applied")?;
        let health_check_failures = IntCounterVec::new(
            Opts::new(
                "kvsup_health_check_failures_total",
                "Failed node health checks",
            ),
            &["node"],
        )?;
        let ready = IntGauge::new("kvsup_cluster_ready", "1 when the cluster is Ready")?;
        let mode_switches = IntCounter::new(
            "kvsup_mode_switches_total",
            "Live switches between primary/secondary and masterless",
        )?;
        let mode_switch_pause = Histogram::with_opts(
            HistogramOpts::new(
                "kvsup_mode_switch_pause_seconds",
                "How long writes were paused by a mode switch",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
        )?;
        for c in [
            Box::new(node_up.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(primary_epoch.clone()),
            Box::new(failovers.clone()),
            Box::new(switchovers.clone()),
            Box::new(restarts.clone()),
            Box::new(failover_duration.clone()),
            Box::new(reconcile_errors.clone()),
            Box::new(applies.clone()),
            Box::new(health_check_failures.clone()),
            Box::new(ready.clone()),
            Box::new(mode_switches.clone()),
            Box::new(mode_switch_pause.clone()),
        ] {
            registry.register(c)?;
        }
        Ok(Metrics {
            registry,
            node_up,
            primary_epoch,
            failovers,
            switchovers,
            restarts,
            failover_duration,
            reconcile_errors,
            applies,
            health_check_failures,
            ready,
            mode_switches,
            mode_switch_pause,
        })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

//! Prometheus metrics of the CCM: one [`Metrics`] struct owning a prefixed registry
//! (`kuberaya_ccm_...`), a `Drop` guard timing each reconcile, and a collector exporting
//! the platform client's own counters ([`crate::platform::PlatformMetrics`]) at scrape.

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::platform::PlatformMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `success` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// [`crate::Error::metric_label`].
    pub error: String,
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<ResultLabels, Counter>,
    pub failures: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    /// Our LBs on the platform, as of the last orphan sweep.
    pub lbs_managed: Gauge,
    pub orphans_deleted: Counter,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
    /// Times this replica became (or stopped being) the leader.
    pub leader_transitions: Counter,
    /// Nodes initialised (the `uninitialized` taint removed).
    pub nodes_initialized: Counter,
    /// Nodes whose addresses, labels or provider ID the refresh corrected.
    pub node_updates: Counter,
    /// Failed node initialisations by error.
    pub node_failures: Family<ErrorLabels, Counter>,
    /// Node lifecycle actions by kind.
    pub node_lifecycle_actions: Family<ActionLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    /// `delete_node`, `add_shutdown_taint`, `remove_shutdown_taint`.
    pub action: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Metrics {
    /// The metrics, with the platform client's counters when given.
    pub fn new(platform: Option<Arc<PlatformMetrics>>) -> Self {
        let mut registry = Registry::with_prefix("kuberaya_ccm");
        let reconciles = Family::<ResultLabels, Counter>::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let lbs_managed = Gauge::default();
        let orphans_deleted = Counter::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Service reconciles by result", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Failed Service reconciles by error",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of Service reconciles",
            reconcile_duration.clone(),
        );
        registry.register(
            "load_balancers_managed",
            "Platform load balancers of this cluster",
            lbs_managed.clone(),
        );
        registry.register(
            "orphans_deleted",
            "Load balancers deleted because their Service was gone",
            orphans_deleted.clone(),
        );
        registry.register("leader", "1 while this replica is the leader", leader.clone());
        let leader_transitions = Counter::default();
        registry.register(
            "leader_transitions",
            "Times this replica became or stopped being the leader",
            leader_transitions.clone(),
        );
        let nodes_initialized = Counter::default();
        registry.register(
            "nodes_initialized",
            "Nodes initialised from their VM",
            nodes_initialized.clone(),
        );
        let node_updates = Counter::default();
        registry.register(
            "node_updates",
            "Nodes whose addresses or labels were refreshed from their VM",
            node_updates.clone(),
        );
        let node_failures = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "node_initialization_failures",
            "Failed node initialisations by error",
            node_failures.clone(),
        );
        let node_lifecycle_actions = Family::<ActionLabels, Counter>::default();
        registry.register(
            "node_lifecycle_actions",
            "Node lifecycle actions by kind",
            node_lifecycle_actions.clone(),
        );
        if let Some(p) = platform {
            registry.register_collector(Box::new(PlatformCollector(p)));
        }
        Metrics {
            registry,
            reconciles,
            failures,
            reconcile_duration,
            lbs_managed,
            orphans_deleted,
            leader,
            leader_transitions,
            nodes_initialized,
            node_updates,
            node_failures,
            node_lifecycle_actions,
        }
    }

    /// A failed node initialisation.
    pub fn record_node_failure(&self, error: &crate::Error) {
        self.node_failures
            .get_or_create(&ErrorLabels {
                error: error.metric_label(),
            })
            .inc();
    }

    /// A node lifecycle action carried out.
    pub fn record_lifecycle_action(&self, action: &str) {
        self.node_lifecycle_actions
            .get_or_create(&ActionLabels { action: action.into() })
            .inc();
    }

    /// Leadership gained (`true`) or lost: the gauge and the transitions counter.
    pub fn set_leader(&self, leader: bool) {
        let before = self.leader.set(i64::from(leader));
        if before != i64::from(leader) {
            self.leader_transitions.inc();
        }
    }

    /// Starts timing a reconcile; the duration is recorded when the guard drops.
    pub fn reconcile_timer(&self) -> ReconcileMeasurer<'_> {
        ReconcileMeasurer {
            start: Instant::now(),
            metrics: self,
        }
    }

    pub fn record_success(&self) {
        self.reconciles
            .get_or_create(&ResultLabels {
                result: "success".into(),
            })
            .inc();
    }

    pub fn record_failure(&self, error: &crate::Error) {
        self.reconciles
            .get_or_create(&ResultLabels { result: "error".into() })
            .inc();
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.metric_label(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Records a reconcile's duration on drop, so every early return is timed.
pub struct ReconcileMeasurer<'a> {
    start: Instant,
    metrics: &'a Metrics,
}

impl Drop for ReconcileMeasurer<'_> {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// Exports [`PlatformMetrics`] at scrape time.
#[derive(Debug)]
struct PlatformCollector(Arc<PlatformMetrics>);

impl Collector for PlatformCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        {
            let mut enc = encoder.encode_descriptor(
                "platform_requests",
                "Platform API requests by method, path template and status",
                None,
                MetricType::Counter,
            )?;
            for (key, n) in self.0.requests() {
                let labels = vec![
                    ("method", key.method.to_owned()),
                    ("path", key.path.to_owned()),
                    ("status", key.status.clone()),
                ];
                ConstCounter::new(n).encode(enc.encode_family(&labels)?)?;
            }
        }
        let singles = [
            (
                "platform_rate_limit_waits",
                "Platform calls that waited for the client-side rate limiter or a Retry-After",
                self.0.rate_limit_waits(),
            ),
            ("platform_retries", "Retried platform calls", self.0.retries()),
            ("platform_logins", "Platform logins", self.0.logins()),
        ];
        for (name, help, value) in singles {
            let enc = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(enc)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_reconciles_and_platform_calls() {
        let p = Arc::new(PlatformMetrics::new());
        p.record_request("PUT", "/kubernetes/v1/clusters/{cluster_id}/load-balancers/{id}", "200");
        let m = Metrics::new(Some(p));
        m.record_success();
        m.record_failure(&crate::Error::MissingObjectKey("metadata.name"));
        drop(m.reconcile_timer());
        let text = m.render();
        assert!(
            text.contains("kuberaya_ccm_reconciles_total{result=\"success\"} 1"),
            "{text}"
        );
        assert!(text.contains("kuberaya_ccm_reconcile_failures_total{error=\"missing_object_key\"} 1"));
        assert!(text.contains("kuberaya_ccm_reconcile_duration_seconds_count 1"));
        assert!(
            text.contains("kuberaya_ccm_platform_requests_total{method=\"PUT\""),
            "{text}"
        );
        assert!(
            text.contains("kuberaya_ccm_platform_rate_limit_waits_total 0"),
            "{text}"
        );
    }
}

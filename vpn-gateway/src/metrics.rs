//! Prometheus metrics, per peer: handshakes, bytes, packets dropped by reason, flows.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    pub peer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabels {
    /// `ns/name`, or empty when the datagram could not be tied to a peer.
    pub peer: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub peer: String,
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

/// Every metric of the gateway, registered under the `kuberaya_gateway` prefix.
#[derive(Default)]
pub struct Metrics {
    pub handshakes: Family<PeerLabels, Counter>,
    /// Handshake initiations answered with a cookie reply (over `--handshake-limit`).
    pub cookie_replies: Counter,
    /// Of those, the ones sent because handshakes were over their share of the gateway's
    /// time (the handshake budget) or the handshake worker was behind (its queue 1/8
    /// full), whatever the rate.
    pub cookie_replies_over_budget: Counter,
    /// Handshake initiations dropped because the handshake worker's queue was full.
    pub handshakes_dropped: Counter,
    /// Handshakes started toward a peer whose data this replica could not read.
    pub session_recoveries: Counter,
    /// Messages on the outer UDP sockets that carried a train of datagrams: sent with
    /// GSO (`UDP_SEGMENT`), received with GRO (`UDP_GRO`).
    pub udp_gso_trains: Counter,
    pub udp_gro_trains: Counter,
    /// Runs of data messages from several peers decrypted on several threads at once.
    pub decrypt_shared_runs: Counter,
    /// 1 while this replica writes status (it holds the Lease, or decides alone).
    pub leader: Gauge,
    pub rx_bytes: Family<PeerLabels, Counter>,
    pub tx_bytes: Family<PeerLabels, Counter>,
    pub dropped: Family<DropLabels, Counter>,
    pub flows: Family<FlowLabels, Counter>,
    pub peers: Family<StateLabels, Gauge>,
    pub open_flows: Family<StateLabels, Gauge>,
    pub registry: std::sync::Mutex<Registry>,
}

impl Metrics {
    pub fn new() -> Self {
        let m = Metrics::default();
        {
            let mut r = Registry::with_prefix("kuberaya_gateway");
            r.register("peer_handshakes", "Completed handshakes per peer", m.handshakes.clone());
            r.register(
                "cookie_replies",
                "Handshake messages answered with a cookie reply (over the handshake limit)",
                m.cookie_replies.clone(),
            );
            r.register(
                "cookie_replies_over_budget",
                "Cookie replies sent because handshakes used over their share of the gateway's time or the handshake worker's queue was 1/8 full",
                m.cookie_replies_over_budget.clone(),
            );
            r.register(
                "udp_gso_trains",
                "Messages sent on the outer UDP sockets that carried several datagrams to one peer (UDP GSO)",
                m.udp_gso_trains.clone(),
            );
            r.register(
                "udp_gro_trains",
                "Messages received on the outer UDP sockets that carried several datagrams from one peer (UDP GRO), each then decrypted and checked on its own",
                m.udp_gro_trains.clone(),
            );
            r.register(
                "decrypt_shared_runs",
                "Runs of data messages from several peers in one receive, decrypted on several threads at once (--decrypt-threads)",
                m.decrypt_shared_runs.clone(),
            );
            r.register(
                "handshakes_dropped",
                "Handshake initiations dropped because the handshake worker's queue was full",
                m.handshakes_dropped.clone(),
            );
            r.register(
                "leader",
                "1 while this replica is the one that writes status (it holds the gateway Lease, or runs alone)",
                m.leader.clone(),
            );
            r.register(
                "session_recoveries",
                "Handshakes started toward a peer whose data this replica had no session for (another replica's, or one from before a restart)",
                m.session_recoveries.clone(),
            );
            r.register(
                "peer_rx_bytes",
                "Bytes received from each peer (decrypted)",
                m.rx_bytes.clone(),
            );
            r.register(
                "peer_tx_bytes",
                "Bytes sent to each peer (before encryption)",
                m.tx_bytes.clone(),
            );
            r.register(
                "packets_dropped",
                "Packets dropped, by peer and reason",
                m.dropped.clone(),
            );
            r.register("flows", "New flows, by peer and verdict", m.flows.clone());
            r.register(
                "peers",
                "Peers by state (accepted, rejected, connected)",
                m.peers.clone(),
            );
            r.register("open_flows", "Open flows by protocol", m.open_flows.clone());
            if let Ok(mut g) = m.registry.lock() {
                *g = r;
            }
        }
        m
    }

    pub fn dropped_packet(&self, peer: &str, reason: &str) {
        self.dropped
            .get_or_create(&DropLabels {
                peer: peer.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_per_peer_metrics() {
        let m = Metrics::new();
        m.dropped_packet("default/alice", "spoofed");
        m.cookie_replies.inc_by(3);
        m.cookie_replies_over_budget.inc_by(2);
        m.handshakes
            .get_or_create(&PeerLabels {
                peer: "default/alice".into(),
            })
            .inc();
        let text = m.encode();
        assert!(
            text.contains("kuberaya_gateway_packets_dropped_total{peer=\"default/alice\",reason=\"spoofed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kuberaya_gateway_peer_handshakes_total{peer=\"default/alice\"} 1"),
            "{text}"
        );
        assert!(text.contains("kuberaya_gateway_cookie_replies_total 3"), "{text}");
        assert!(
            text.contains("kuberaya_gateway_cookie_replies_over_budget_total 2"),
            "{text}"
        );
    }
}

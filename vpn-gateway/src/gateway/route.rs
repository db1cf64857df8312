//! The loop's two [`TunnelIo`]s: [`Collect`] gathers the datagrams to send, and [`Route`]
//! also judges each decrypted packet and hands it to the data plane as it comes out.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Instant;

use crate::acl::{Acl, Verdict};
use crate::dataplane::{DataPlane, Inbound};
use crate::metrics::{FlowLabels, Metrics};
use crate::packet;
use crate::peers::PeerId;
use crate::tunnel::TunnelIo;

/// The datagrams the [`PeerTable`](crate::tunnel::PeerTable) asked to send, packed back to back in a buffer that
/// keeps its capacity from one round to the next: no allocation per datagram.
#[derive(Default)]
pub(super) struct Collect {
    /// (destination, start, length) in `send_buf`.
    pub(super) sends: Vec<(SocketAddr, usize, usize)>,
    pub(super) send_buf: Vec<u8>,
}

impl TunnelIo for Collect {
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.sends.push((to, self.send_buf.len(), datagram.len()));
        self.send_buf.extend_from_slice(datagram);
    }
    fn deliver(&mut self, peer: &PeerId, _: Ipv4Addr, _: &[u8]) {
        // Timers and encryption decrypt nothing; datagrams go through `Route`.
        tracing::debug!(%peer, "a packet delivered outside routing; dropped");
    }
}

/// The loop's [`TunnelIo`] while it routes datagrams: what is to be sent is collected, and
/// each decrypted packet is judged and handed to the data plane at once, from the buffer
/// it was decrypted into.
pub(super) struct Route<'a> {
    pub(super) sends: &'a mut Collect,
    pub(super) dp: &'a mut dyn DataPlane,
    pub(super) acl: &'a Acl,
    pub(super) metrics: &'a Metrics,
    pub(super) now: Instant,
    /// Packets handed to the data plane.
    pub(super) delivered: usize,
}

impl<'a> Route<'a> {
    pub(super) fn new(
        sends: &'a mut Collect,
        dp: &'a mut dyn DataPlane,
        acl: &'a Acl,
        metrics: &'a Metrics,
        now: Instant,
    ) -> Self {
        Route {
            sends,
            dp,
            acl,
            metrics,
            now,
            delivered: 0,
        }
    }
}

impl TunnelIo for Route<'_> {
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.sends.send(to, datagram);
    }

    /// Every access check runs here, on each decrypted packet, before the data plane
    /// coalesces anything.
    fn deliver(&mut self, peer: &PeerId, peer_addr: Ipv4Addr, bytes: &[u8]) {
        let metrics = self.metrics;
        let Ok(pkt) = packet::parse(bytes) else {
            metrics.dropped_packet(&peer.to_string(), "malformed_packet");
            return;
        };
        let verdict = self.acl.check(peer_addr, &pkt);
        tracing::trace!(
            peer = %peer, src = %pkt.src, dst = %pkt.dst, proto = pkt.proto, port = ?pkt.dst_port(),
            len = bytes.len(), verdict = verdict.label(), "packet from tunnel"
        );
        let flow = |verdict: &str| {
            metrics
                .flows
                .get_or_create(&FlowLabels {
                    peer: peer.to_string(),
                    verdict: verdict.into(),
                })
                .inc();
        };
        match verdict {
            Verdict::Spoofed => {
                metrics.dropped_packet(&peer.to_string(), "spoofed");
                // One counter for both families (reason `spoofed`); the log says which.
                tracing::debug!(peer = %peer, src = %pkt.src, ipv6 = pkt.src.is_ipv6(), "spoofed source dropped");
                return;
            }
            Verdict::Denied => {
                metrics.dropped_packet(&peer.to_string(), "not_allowed");
                if pkt.is_tcp_syn() {
                    flow("denied");
                }
            }
            Verdict::Allow | Verdict::Local => {
                if pkt.is_tcp_syn() {
                    flow("allowed");
                }
            }
        }
        self.delivered += 1;
        self.dp.inbound(
            Inbound {
                peer,
                peer_addr,
                bytes,
                packet: &pkt,
                verdict,
            },
            self.now,
        );
    }

    fn now(&self) -> Instant {
        self.now
    }
}

//! Data planes: what happens to a decrypted packet once the gateway has checked it, and
//! where the packets going back into the tunnels come from.
//!
//! The gateway loop owns the UDP socket and the [`crate::tunnel::PeerTable`]; it parses
//! every decrypted packet, judges it with the [`crate::acl::Acl`] and hands it, with the
//! verdict, to a [`DataPlane`]. The data plane performs (or refuses) the write and queues
//! its replies, which the loop collects with [`DataPlane::outbound`] and encrypts to the
//! peer owning each packet's destination address.
//!
//! - [`userspace::UserspaceDataPlane`]: the default, unprivileged: flows are terminated in
//!   smoltcp and carried over ordinary sockets.
//! - [`tun::TunDataPlane`]: NET_ADMIN, kernel forwarding through a TUN device with the
//!   gateway's own masquerade table; DNS and refusals stay in the userspace one. Its kernel
//!   configuration goes over netlink: [`nft`] (the table), [`forwarding`] (per-interface
//!   IPv4 forwarding, and IPv6 forwarding by sysctl), [`address`] (the TUN's IPv6 tunnel
//!   address), all on [`netlink`]'s framing.

pub mod address;
pub mod forwarding;
pub mod netlink;
pub mod nft;
pub mod tcp_gro;
pub mod tun;
pub mod userspace;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::acl::{Acl, Verdict};
use crate::catalog::Catalog;
use crate::packet::Packet;
use crate::peers::PeerId;

/// What the data plane needs to know of the rules: compiled anew on every change.
#[derive(Debug, Default)]
pub struct Policy {
    pub acl: Acl,
    pub catalog: Catalog,
}

/// One decrypted packet and the gateway's judgement of it.
#[derive(Debug, Clone, Copy)]
pub struct Inbound<'a> {
    pub peer: &'a PeerId,
    /// The tunnel address of the peer it came from.
    pub peer_addr: Ipv4Addr,
    pub bytes: &'a [u8],
    pub packet: &'a Packet<'a>,
    pub verdict: Verdict,
}

/// Counters a data plane keeps for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowCounters {
    pub tcp_flows_open: u64,
    pub udp_flows_open: u64,
}

/// A data plane. Called from the gateway loop only; never blocks.
pub trait DataPlane: Send {
    /// Handle one decrypted packet. Spoofed packets are dropped by the gateway before.
    fn inbound(&mut self, pkt: Inbound<'_>, now: Instant);
    /// The end of a burst of [`DataPlane::inbound`] calls (one batch of datagrams): write
    /// what was held back so that it goes out in one go. The TUN data plane coalesces the
    /// burst's TCP segments here; a data plane that writes at once has nothing to do.
    fn flush(&mut self) {}
    /// Advance the data plane and pass every packet bound for a tunnel to `emit`.
    fn outbound(&mut self, now: Instant, emit: &mut dyn FnMut(&[u8]));
    /// Ready when [`DataPlane::outbound`] has packets to hand out that the
    /// [`DataPlane::waker`] does not announce (the TUN device became readable). Polled by
    /// the gateway loop alongside its socket, so no task stands in between.
    fn poll_outbound(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Pending
    }
    /// How long the loop may wait before calling [`DataPlane::outbound`] again when
    /// nothing else happens.
    fn poll_delay(&mut self, now: Instant) -> Option<Duration>;
    /// Notified when flows have work (data from a Service, a connection made or failed).
    fn waker(&self) -> Arc<Notify>;
    /// New rules or Services.
    fn set_policy(&mut self, policy: Arc<Policy>);
    /// A peer is gone: end its flows.
    fn peer_removed(&mut self, peer_addr: Ipv4Addr);
    fn counters(&self) -> FlowCounters;
}

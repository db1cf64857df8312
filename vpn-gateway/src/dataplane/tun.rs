//! The kernel data plane (NET_ADMIN): allowed packets are written to a TUN device and the
//! kernel routes them to ClusterIPs; replies come back through the same device.
//!
//! - **Setup** ([`TunDataPlane::start`]): the TUN device (`--tun-name`, MTU [`MTU`]) gets the
//!   gateway's tunnel address with the tunnel range's prefix, so the kernel's connected
//!   route sends every reply for a peer back into it. IPv4 forwarding is switched on per
//!   interface over rtnetlink ([`super::forwarding`]: `/proc/sys` is read-only in a pod),
//!   and the gateway's own nftables table ([`NFT_TABLE`]) is installed over netlink
//!   ([`super::nft`]: no `nft` program in the image) in one atomic batch that first deletes
//!   any table of that name: a table left by a crashed gateway is replaced, never doubled.
//!   The table masquerades traffic from the tunnel range leaving by any other interface (so
//!   Services answer to the gateway's node), and lets into the TUN only packets of
//!   connections the peers opened (`ct state established,related`): nobody in the cluster
//!   can open a connection to an operator's laptop. All of it needs CAP_NET_ADMIN only, as
//!   a pod with `capabilities: {drop: [ALL], add: [NET_ADMIN]}` has.
//! - **IPv6** (issue 24): with an IPv6 tunnel range the device also gets the gateway's
//!   IPv6 tunnel address with the range's prefix ([`super::address`]: the connected route
//!   sends replies for peers' IPv6 addresses back into it), the `ip6` table masquerades and
//!   guards the same way (installed with the `ip` one in one transaction), and IPv6
//!   forwarding is switched on ([`forwarding::enable_v6`]). IPv6 packets are then judged,
//!   written and read exactly as IPv4 ones. When the kernel side cannot be had (no IPv6 in
//!   the namespace, `/proc/sys` read-only and forwarding off), the gateway says why once
//!   and carries IPv6 flows in the embedded userspace data plane instead, as the
//!   userspace mode does; IPv4 is unaffected.
//! - **Teardown**: dropping the data plane deletes the table; the device goes with the
//!   process (it is not persistent), so a crash leaves at most the table, which the next
//!   start replaces.
//! - **Offloads**: the device is opened with `IFF_VNET_HDR` and TSO/checksum offloads
//!   (`TUNSETOFFLOAD`), as wireguard-go does since 2023, so each read or write carries a
//!   virtio-net header and may hold a TCP super-packet of up to 64 KiB. The kernel then
//!   forwards one large segment instead of dozens of MTU-sized ones, which is where most of
//!   the CPU went (see `docs/benchmarks.md`). When the kernel refuses offloads the device
//!   is opened without them and everything goes packet by packet.
//! - **Packets from peers** (already decrypted, parsed and judged one by one by the gateway
//!   loop): `Allow` is copied into a preallocated write batch, TCP segments straight onto
//!   the end of their connection's super-packet ([`super::tcp_gro`], GRO), other packets
//!   into `tun_rs`'s batch, which coalesces UDP (`tun_rs::handle_gro`). At the end of each
//!   batch of datagrams ([`DataPlane::flush`]) both are written, one non-blocking write per
//!   packet or super-packet. `Local` (DNS and anything else addressed to the gateway) and `Denied`
//!   (audit, TCP RST) go to an embedded [`UserspaceDataPlane`], so both modes answer DNS and
//!   refuse flows alike. Coalescing happens after the checks, and only joins segments of
//!   the same connection, so it cannot let through anything the rules refused.
//! - **Packets to peers**: the gateway loop itself waits for the device to be readable
//!   ([`DataPlane::poll_outbound`]) and reads it in [`DataPlane::outbound`], without a task
//!   or a channel in between (a thread hand-off per wake-up cost latency and CPU): each read
//!   lands in preallocated slots (a super-packet split into MTU-sized segments, GSO) and every
//!   packet is encrypted at once to the peer owning its destination. At most
//!   [`READS_PER_TURN`] reads per turn, so datagrams from peers get their turn under load;
//!   what is not read waits in the kernel's device queue.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::Notify;
use tun_rs::{AsyncDevice, DeviceBuilder, DeviceImpl, GROTable, VIRTIO_NET_HDR_LEN};

use super::forwarding::{self, Forwarding, ForwardingV6};
use super::netlink::NetlinkError;
use super::tcp_gro::TcpGro;
use super::userspace::{UserspaceConfig, UserspaceDataPlane};
use super::{DataPlane, FlowCounters, Inbound, Policy, nft};
use crate::acl::Verdict;
use crate::packet::{MAX_PACKET, PROTO_TCP};

/// The device's MTU: WireGuard's usual 1420, the same as the userspace data plane.
pub const MTU: u16 = super::userspace::MTU as u16;
/// The nftables table (family `ip`) the gateway owns.
pub const NFT_TABLE: &str = nft::TABLE;
/// The default TUN device name.
pub const DEFAULT_NAME: &str = "kr-gw0";
/// Segments one read may be split into: a 64 KiB super-packet of 512-byte segments (our
/// MTU's MSS is 1380, so 48 at most in practice).
pub const BATCH: usize = 128;
/// Reads of the device per turn of the gateway loop.
pub const READS_PER_TURN: usize = 64;
/// One packet's room in a batch: the MTU, rounded up.
const SLOT: usize = 2048;
/// Decrypted packets held for one coalesced write ([`DataPlane::flush`]); the gateway
/// flushes after each batch of datagrams, which is at most this many.
const WRITE_BATCH: usize = crate::udp_batch::RECV_BATCH;
/// Where a packet starts in a write buffer: the virtio-net header goes in front.
const OFFSET: usize = VIRTIO_NET_HDR_LEN;

/// Configuration of the TUN data plane.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// The TUN device's name.
    pub name: String,
    /// The tunnel range; the device takes the gateway's address in it.
    pub range: Ipv4Net,
    /// The IPv6 tunnel range; the device takes the gateway's IPv6 address
    /// ([`UserspaceConfig::gateway_v6`]) in it. `None`: IPv6 stays in userspace.
    pub range_v6: Option<Ipv6Net>,
    /// For what stays in userspace: DNS, the gateway's own address, refusals.
    pub local: UserspaceConfig,
}

/// Why the data plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    #[error("creating TUN device {name}: {source} (needs CAP_NET_ADMIN and /dev/net/tun)")]
    Device {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("enabling IPv4 forwarding over rtnetlink: {0} (needs CAP_NET_ADMIN)")]
    Forwarding(#[source] NetlinkError),
    #[error(
        "installing nftables table {NFT_TABLE} over netlink: {0} (needs CAP_NET_ADMIN and nf_tables in the kernel)"
    )]
    Nft(#[source] NetlinkError),
}

/// One read's room: the raw bytes (virtio-net header and up to a 64 KiB super-packet) and
/// the slots it is split into.
struct Reads {
    raw: Box<[u8]>,
    slots: Box<[[u8; SLOT]]>,
    lens: [usize; BATCH],
    /// Reads that failed, since the start.
    errors: u64,
}

impl Reads {
    fn new() -> Self {
        Reads {
            raw: vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET].into_boxed_slice(),
            slots: vec![[0u8; SLOT]; BATCH].into_boxed_slice(),
            lens: [0; BATCH],
            errors: 0,
        }
    }
}

/// Allowed packets waiting for [`DataPlane::flush`]. Every buffer has room for a 64 KiB
/// super-packet from the start, so coalescing never reallocates.
struct WriteBatch {
    bufs: Vec<Vec<u8>>,
    n: usize,
    gro: GROTable,
}

impl WriteBatch {
    fn new() -> Self {
        WriteBatch {
            // Capacity only: pages are touched as packets are coalesced into them.
            bufs: (0..WRITE_BATCH)
                .map(|_| Vec::with_capacity(2 * OFFSET + MAX_PACKET))
                .collect(),
            n: 0,
            gro: GROTable::new(),
        }
    }
    /// Queue a packet; false when the batch is full (flush first).
    fn push(&mut self, packet: &[u8]) -> bool {
        let Some(b) = self.bufs.get_mut(self.n) else {
            return false;
        };
        b.clear();
        b.resize(OFFSET, 0);
        b.extend_from_slice(packet);
        self.n += 1;
        true
    }
}

/// Whether an allowed packet to `dst` goes to the kernel (else to the embedded userspace
/// data plane): IPv4 always, IPv6 when the kernel side of IPv6 is in place.
fn kernel_carries(kernel_v6: bool, dst: IpAddr) -> bool {
    dst.is_ipv4() || kernel_v6
}

/// See the module documentation.
pub struct TunDataPlane {
    dev: AsyncDevice,
    /// Whether the kernel carries IPv6 (address, table and forwarding in place); else IPv6
    /// flows go to `local`.
    kernel_v6: bool,
    local: UserspaceDataPlane,
    reads: Reads,
    /// Allowed TCP packets, coalesced as they come (`None` without offloads).
    tcp: Option<TcpGro>,
    /// The other allowed packets (UDP coalesced by `tun_rs`), or all of them without offloads.
    pending: WriteBatch,
    /// Write calls the device refused (queue full or down), since the start.
    write_drops: u64,
}

impl TunDataPlane {
    /// Create the device, the routes and the nftables table. Must run inside a tokio runtime.
    pub async fn start(cfg: TunConfig) -> Result<Self, TunError> {
        let gateway = cfg.local.gateway;
        let build = |offload: bool| {
            DeviceBuilder::new()
                .name(&cfg.name)
                .ipv4(gateway, cfg.range.prefix_len(), None)
                .mtu(MTU)
                .offload(offload)
                .build_async()
        };
        let dev = match build(true) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "TUN offloads refused; packet by packet");
                build(false).map_err(|source| TunError::Device {
                    name: cfg.name.clone(),
                    source,
                })?
            }
        };
        // The IPv6 address first: without it there is nothing to route IPv6 replies by, and
        // IPv6 stays in userspace.
        let range_v6 = cfg.range_v6.filter(|r| {
            let gateway_v6 = cfg.local.gateway_v6;
            match super::address::add_v6(&cfg.name, gateway_v6, r.prefix_len()) {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(device = %cfg.name, address = %gateway_v6, error = %e,
                        "no IPv6 on the TUN device: IPv6 flows are carried in userspace");
                    false
                }
            }
        });
        // Netlink requests are answered while they are sent: no waiting on the kernel here.
        // The tables first, so that nothing is forwarded into the TUN before its rules hold.
        nft::install_dual_stack(&cfg.name, cfg.range, range_v6).map_err(TunError::Nft)?;
        let enabled = forwarding::enable().map_err(|e| {
            if let Err(e) = nft::remove_dual_stack() {
                tracing::warn!(table = NFT_TABLE, error = %e, "removing the nftables tables");
            }
            TunError::Forwarding(e)
        })?;
        let kernel_v6 = match range_v6.map(|_| forwarding::enable_v6()) {
            None => false,
            Some(Ok(how)) => {
                match how {
                    ForwardingV6::Global => tracing::info!("IPv6 forwarding already on"),
                    ForwardingV6::All => tracing::info!("IPv6 forwarding enabled (net.ipv6.conf.all.forwarding)"),
                    ForwardingV6::Devices(devices) => tracing::info!(?devices, "IPv6 forwarding enabled per interface"),
                }
                true
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "IPv6 flows are carried in userspace");
                false
            }
        };
        match enabled {
            Forwarding::Global => tracing::info!("IPv4 forwarding already on (net.ipv4.ip_forward = 1)"),
            Forwarding::Devices(devices) => tracing::info!(
                ?devices,
                ip_forward = ?forwarding::global(),
                "IPv4 forwarding enabled per interface"
            ),
        }
        tracing::info!(device = %cfg.name, address = %gateway, range = %cfg.range, table = NFT_TABLE,
            offloads = dev.tcp_gso(), ipv6 = kernel_v6, "TUN data plane up");

        let tcp = dev.tcp_gso().then(|| TcpGro::new(WRITE_BATCH));
        Ok(TunDataPlane {
            dev,
            kernel_v6,
            local: UserspaceDataPlane::new(cfg.local),
            reads: Reads::new(),
            tcp,
            pending: WriteBatch::new(),
            write_drops: 0,
        })
    }
}

impl Drop for TunDataPlane {
    fn drop(&mut self) {
        match nft::remove_dual_stack() {
            Ok(()) => tracing::info!(table = NFT_TABLE, "nftables tables removed"),
            Err(e) => tracing::warn!(table = NFT_TABLE, error = %e, "removing the nftables tables"),
        }
    }
}

impl DataPlane for TunDataPlane {
    fn inbound(&mut self, pkt: Inbound<'_>, now: Instant) {
        match pkt.verdict {
            Verdict::Spoofed => {}
            Verdict::Allow if !kernel_carries(self.kernel_v6, pkt.packet.dst) => self.local.inbound(pkt, now),
            Verdict::Allow if pkt.packet.proto == PROTO_TCP && self.tcp.is_some() => {
                // The packet as its header says (`parse` keeps that within the buffer).
                let bytes = &pkt.bytes[..pkt.packet.len];
                if self.tcp.as_mut().is_some_and(|g| !g.push(bytes)) {
                    self.flush();
                    if let Some(g) = self.tcp.as_mut() {
                        g.push(bytes);
                    }
                }
            }
            Verdict::Allow => {
                if !self.pending.push(pkt.bytes) {
                    self.flush();
                    self.pending.push(pkt.bytes);
                }
            }
            Verdict::Local | Verdict::Denied => self.local.inbound(pkt, now),
        }
    }

    fn flush(&mut self) {
        // IPv6 without the kernel's side, DNS: what the embedded userspace plane queued.
        self.local.flush();
        let mut refused = None;
        if let Some(g) = self.tcp.as_mut().filter(|g| !g.is_empty()) {
            // Non-blocking writes (a TUN write does not wait), each packet behind its
            // virtio-net header.
            for packet in g.finish() {
                if let Err(e) = self.dev.try_send(packet) {
                    self.write_drops += 1;
                    refused = Some(e);
                }
            }
            g.clear();
        }
        let WriteBatch { bufs, n, gro } = &mut self.pending;
        if *n > 0 {
            let r = DeviceImpl::send_multiple(&self.dev, gro, &mut bufs[..*n], OFFSET);
            *n = 0;
            if let Err(e) = r {
                self.write_drops += 1;
                refused = Some(e);
            }
        }
        if let Some(e) = refused
            && self.write_drops.is_power_of_two()
        {
            tracing::warn!(error = %e, refused = self.write_drops, "writing to the TUN device");
        }
    }

    fn outbound(&mut self, now: Instant, emit: &mut dyn FnMut(&[u8])) {
        self.local.outbound(now, emit);
        let Reads {
            raw,
            slots,
            lens,
            errors,
        } = &mut self.reads;
        for _ in 0..READS_PER_TURN {
            // Non-blocking; WouldBlock also clears the readiness poll_outbound waits for.
            match self.dev.try_recv_multiple(raw, &mut slots[..], &mut lens[..], 0) {
                Ok(n) => (0..n).for_each(|i| emit(&slots[i][..lens[i]])),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // One malformed super-packet is dropped; a failing device is not spun on.
                    *errors += 1;
                    if errors.is_power_of_two() {
                        tracing::warn!(error = %e, errors = *errors, "reading the TUN device");
                    }
                    if e.raw_os_error().is_some() {
                        break;
                    }
                }
            }
        }
    }

    fn poll_outbound(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.dev.poll_readable(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(()),
            Poll::Ready(Err(e)) => {
                // Not retried: a TUN device does not recover from an error of its own.
                self.reads.errors += 1;
                if self.reads.errors.is_power_of_two() {
                    tracing::warn!(error = %e, "waiting for the TUN device");
                }
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_delay(&mut self, now: Instant) -> Option<Duration> {
        self.local.poll_delay(now)
    }

    fn waker(&self) -> Arc<Notify> {
        self.local.waker()
    }

    fn set_policy(&mut self, policy: Arc<Policy>) {
        self.local.set_policy(policy);
    }

    fn peer_removed(&mut self, peer_addr: Ipv4Addr) {
        // Kernel connections of a removed peer expire in conntrack; replies to its address
        // find no peer and are dropped by the gateway loop.
        self.local.peer_removed(peer_addr);
    }

    fn counters(&self) -> FlowCounters {
        self.local.counters()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4/UDP datagram with valid checksums (`tun_rs`'s GRO verifies them before
    /// coalescing).
    fn datagram(id: u16, payload: &[u8]) -> Vec<u8> {
        let total = 28 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&[100, 64, 0, 2]);
        p[16..20].copy_from_slice(&[10, 96, 0, 20]);
        let ip_sum = !tun_rs::checksum(&p[..20], 0);
        p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..26].copy_from_slice(&((total - 20) as u16).to_be_bytes());
        p[28..].copy_from_slice(payload);
        // Pseudo-header: addresses, protocol, UDP length.
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&((total - 20) as u16).to_be_bytes());
        let sum = !tun_rs::checksum(&p[20..], tun_rs::checksum_no_fold(&pseudo, 0));
        p[26..28].copy_from_slice(&sum.to_be_bytes());
        p
    }

    #[test]
    fn ipv6_goes_to_the_kernel_only_when_it_carries_ipv6() {
        let (v4, v6): (IpAddr, IpAddr) = ("127.96.0.10".parse().unwrap(), "fd00:96::a".parse().unwrap());
        assert!(kernel_carries(true, v4) && kernel_carries(false, v4));
        assert!(kernel_carries(true, v6));
        assert!(
            !kernel_carries(false, v6),
            "no IPv6 in the kernel: userspace carries it"
        );
    }

    #[test]
    fn datagrams_of_a_udp_flow_are_coalesced_in_place() {
        // TCP has its own coalescing (`tcp_gro`); the batch carries the rest, UDP coalesced
        // by `tun_rs` when the device takes UDP segmentation offload.
        let mut w = WriteBatch::new();
        let size = 1200;
        for i in 0..WRITE_BATCH {
            let payload = vec![i as u8; size];
            assert!(w.push(&datagram(i as u16, &payload)));
        }
        assert!(!w.push(&datagram(0, b"x")), "full: the caller flushes first");
        let n = w.n;
        w.gro.apply_gro(&mut w.bufs[..n], OFFSET, true).unwrap();
        // The buffers have room for 64 KiB, so the first datagram took the rest that fit
        // without reallocating.
        let head = &w.bufs[0];
        assert_eq!(head.capacity(), 2 * OFFSET + MAX_PACKET, "no reallocation");
        let merged = (head.len() - OFFSET - 28) / size;
        assert!(merged >= 40, "{merged} datagrams in the first write");
        let hdr = tun_rs::VirtioNetHdr::decode(&head[..OFFSET]).unwrap();
        assert_eq!(hdr.gso_type, tun_rs::VIRTIO_NET_HDR_GSO_UDP_L4);
        assert_eq!(hdr.gso_size as usize, size);
        assert_eq!(
            head[OFFSET + 28 + size],
            1,
            "the second datagram's payload follows the first"
        );
    }
}

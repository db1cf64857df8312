//! The smoltcp side: a device whose wire is two packet queues, and an interface over it
//! that accepts every destination (AnyIP).

use std::collections::VecDeque;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{Checksum, ChecksumCapabilities, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use super::MTU;

/// A smoltcp device whose wire is two queues. The packets' buffers are used again (a
/// received packet's for the next one received, a sent one's for smoltcp's next): no
/// allocation per packet at a steady rate.
#[derive(Default)]
pub(super) struct Queues {
    pub(super) rx: VecDeque<Vec<u8>>,
    pub(super) tx: VecDeque<Vec<u8>>,
    rx_free: Vec<Vec<u8>>,
    tx_free: Vec<Vec<u8>>,
}

/// Buffers kept for reuse, each way.
const POOL: usize = 512;

impl Queues {
    /// Queue a copy of `packet` for smoltcp to receive.
    pub(super) fn push_rx(&mut self, packet: &[u8]) {
        let mut b = self.rx_free.pop().unwrap_or_default();
        b.clear();
        b.extend_from_slice(packet);
        self.rx.push_back(b);
    }

    /// A sent packet's buffer, once its bytes are handed on.
    pub(super) fn recycle_tx(&mut self, b: Vec<u8>) {
        if self.tx_free.len() < POOL {
            self.tx_free.push(b);
        }
    }
}

pub(super) struct Rx<'a> {
    buf: Vec<u8>,
    free: &'a mut Vec<Vec<u8>>,
}

pub(super) struct Tx<'a> {
    queue: &'a mut VecDeque<Vec<u8>>,
    free: &'a mut Vec<Vec<u8>>,
}

impl RxToken for Rx<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let Rx { buf, free } = self;
        let r = f(&buf);
        if free.len() < POOL {
            free.push(buf);
        }
        r
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = self.free.pop().unwrap_or_default();
        buf.clear();
        buf.resize(len, 0);
        let r = f(&mut buf);
        self.queue.push_back(buf);
        r
    }
}

impl Device for Queues {
    type RxToken<'a> = Rx<'a>;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(Rx<'_>, Tx<'_>)> {
        let Queues {
            rx,
            tx,
            rx_free,
            tx_free,
        } = self;
        let buf = rx.pop_front()?;
        Some((
            Rx { buf, free: rx_free },
            Tx {
                queue: tx,
                free: tx_free,
            },
        ))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<Tx<'_>> {
        Some(Tx {
            queue: &mut self.tx,
            free: &mut self.tx_free,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        // Packets come out of an authenticated tunnel: checking their checksums adds
        // nothing, but ours must be right.
        let mut cs = ChecksumCapabilities::default();
        cs.ipv4 = Checksum::Tx;
        cs.tcp = Checksum::Tx;
        cs.udp = Checksum::Tx;
        cs.icmpv4 = Checksum::Tx;
        cs.icmpv6 = Checksum::Tx;
        caps.checksum = cs;
        caps
    }
}

/// A smoltcp interface over [`Queues`] accepting every destination.
pub(super) struct Stack {
    pub(super) iface: Interface,
    pub(super) dev: Queues,
    pub(super) sockets: SocketSet<'static>,
}

impl Stack {
    pub(super) fn new(gateway: Ipv4Addr, gateway_v6: Ipv6Addr, epoch: Instant) -> Self {
        let mut dev = Queues::default();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand::random();
        let mut iface = Interface::new(config, &mut dev, smol_now(epoch, epoch));
        iface.update_ip_addrs(|a| {
            let _ = a.push(IpCidr::new(IpAddress::Ipv4(gateway), 32));
            let _ = a.push(IpCidr::new(IpAddress::Ipv6(gateway_v6), 128));
        });
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(gateway);
        let _ = iface.routes_mut().add_default_ipv6_route(gateway_v6);
        Stack {
            iface,
            dev,
            sockets: SocketSet::new(Vec::new()),
        }
    }

    pub(super) fn poll(&mut self, now: smoltcp::time::Instant) -> bool {
        matches!(
            self.iface.poll(now, &mut self.dev, &mut self.sockets),
            smoltcp::iface::PollResult::SocketStateChanged
        )
    }
}

pub(super) fn smol_now(now: Instant, epoch: Instant) -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros(now.saturating_duration_since(epoch).as_micros() as i64)
}

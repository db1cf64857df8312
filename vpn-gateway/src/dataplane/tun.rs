//! The kernel data plane (NET_ADMIN): allowed packets are written to a TUN device and the
//! kernel routes them to ClusterIPs; replies come back through the same device.
//!
//! - **Setup** ([`TunDataPlane::start`]): the TUN device (`--tun-name`, MTU [`MTU`]) gets the
//!   gateway's tunnel address with the tunnel range's prefix, so the kernel's connected
//!   route sends every reply for a peer back into it. IPv4 forwarding is switched on and the
//!   gateway's own nftables table ([`NFT_TABLE`]) is installed in one atomic batch that first
//!   deletes any table of that name: a table left by a crashed gateway is replaced, never
//!   doubled. The table masquerades traffic from the tunnel range leaving by any other
//!   interface (so Services answer to the gateway's node), and lets into the TUN only
//!   packets of connections the peers opened (`ct state established,related`): nobody in
//!   the cluster can open a connection to an operator's laptop.
//! - **Teardown**: dropping the data plane deletes the table; the device goes with the
//!   process (it is not persistent), so a crash leaves at most the table, which the next
//!   start replaces.
//! - **Packets from peers** (already decrypted, parsed and judged by the gateway loop):
//!   `Allow` is written to the TUN at once with a non-blocking write; `Local` (DNS and
//!   anything else addressed to the gateway) and `Denied` (audit, TCP RST) go to an
//!   embedded [`UserspaceDataPlane`], so both modes answer DNS and refuse flows alike.
//! - **Packets to peers**: a task of its own reads the TUN into a small pool of
//!   preallocated batches (up to [`BATCH`] packets per wake-up, one channel message per
//!   batch) and wakes the gateway loop, which encrypts each packet to the peer owning its
//!   destination and hands the batch back to the pool. No allocation per packet: a full
//!   pool stops the reader, and the kernel's device queue absorbs (or drops) the rest.

use std::io;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tun_rs::{AsyncDevice, DeviceBuilder};

use super::userspace::{UserspaceConfig, UserspaceDataPlane};
use super::{DataPlane, FlowCounters, Inbound, Policy};
use crate::acl::Verdict;

/// The device's MTU: WireGuard's usual 1420, the same as the userspace data plane.
pub const MTU: u16 = super::userspace::MTU as u16;
/// The nftables table (family `ip`) the gateway owns.
pub const NFT_TABLE: &str = "kuberaya-gateway";
/// The default TUN device name.
pub const DEFAULT_NAME: &str = "kr-gw0";
/// Packets read from the TUN per wake-up of the reader.
pub const BATCH: usize = 64;
/// Batches in circulation between the reader and the gateway loop.
const POOL: usize = 8;
/// One packet's room in a batch: the MTU, rounded up.
const SLOT: usize = 2048;

/// Configuration of the TUN data plane.
#[derive(Debug, Clone)]
pub struct TunConfig {
    /// The TUN device's name.
    pub name: String,
    /// The tunnel range; the device takes the gateway's address in it.
    pub range: Ipv4Net,
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
    #[error("enabling IPv4 forwarding: {0}")]
    Forwarding(#[source] io::Error),
    #[error("installing nftables table {NFT_TABLE}: {0} (needs the `nft` program and CAP_NET_ADMIN)")]
    Nft(#[source] nftables::helper::NftablesError),
}

/// Up to [`BATCH`] packets read from the TUN, in one preallocated buffer.
struct Batch {
    data: Box<[u8]>,
    lens: [u16; BATCH],
    n: usize,
}

impl Batch {
    fn new() -> Self {
        Batch {
            data: vec![0u8; SLOT * BATCH].into_boxed_slice(),
            lens: [0; BATCH],
            n: 0,
        }
    }
    fn slot(&mut self, i: usize) -> &mut [u8] {
        &mut self.data[i * SLOT..(i + 1) * SLOT]
    }
    fn packets(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.n).map(|i| &self.data[i * SLOT..i * SLOT + self.lens[i] as usize])
    }
}

/// See the module documentation.
pub struct TunDataPlane {
    dev: Arc<AsyncDevice>,
    local: UserspaceDataPlane,
    full: mpsc::Receiver<Batch>,
    free: mpsc::Sender<Batch>,
    reader: JoinHandle<()>,
    /// Packets the device refused (queue full or down), since the last log line.
    write_drops: u64,
}

impl TunDataPlane {
    /// Create the device, the routes and the nftables table, and start the reader. Must run
    /// inside a tokio runtime.
    pub async fn start(cfg: TunConfig) -> Result<Self, TunError> {
        let gateway = cfg.local.gateway;
        let dev = DeviceBuilder::new()
            .name(&cfg.name)
            .ipv4(gateway, cfg.range.prefix_len(), None)
            .mtu(MTU)
            .build_async()
            .map_err(|source| TunError::Device {
                name: cfg.name.clone(),
                source,
            })?;
        enable_forwarding().map_err(TunError::Forwarding)?;
        nftables::helper::apply_ruleset_async(&ruleset(&cfg.name, cfg.range))
            .await
            .map_err(TunError::Nft)?;
        tracing::info!(device = %cfg.name, address = %gateway, range = %cfg.range, table = NFT_TABLE, "TUN data plane up");

        let dev = Arc::new(dev);
        let local = UserspaceDataPlane::new(cfg.local);
        let (full_tx, full) = mpsc::channel(POOL);
        let (free, free_rx) = mpsc::channel(POOL);
        for _ in 0..POOL {
            free.try_send(Batch::new())
                .expect("the pool channel holds POOL batches");
        }
        let reader = tokio::spawn(read_loop(dev.clone(), free_rx, full_tx, local.waker()));
        Ok(TunDataPlane {
            dev,
            local,
            full,
            free,
            reader,
            write_drops: 0,
        })
    }
}

impl Drop for TunDataPlane {
    fn drop(&mut self) {
        self.reader.abort();
        match nftables::helper::apply_ruleset(&delete_table()) {
            Ok(()) => tracing::info!(table = NFT_TABLE, "nftables table removed"),
            Err(e) => tracing::warn!(table = NFT_TABLE, error = %e, "removing the nftables table"),
        }
    }
}

/// Read packets from the TUN into pooled batches and pass them to the gateway loop.
async fn read_loop(
    dev: Arc<AsyncDevice>,
    mut free: mpsc::Receiver<Batch>,
    full: mpsc::Sender<Batch>,
    wake: Arc<Notify>,
) {
    // Waiting for a free batch is the backpressure: the kernel queues meanwhile.
    while let Some(mut batch) = free.recv().await {
        batch.n = 0;
        match dev.recv(batch.slot(0)).await {
            Ok(n) => {
                batch.lens[0] = n as u16;
                batch.n = 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the TUN device");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        while batch.n < BATCH {
            let i = batch.n;
            match dev.try_recv(batch.slot(i)) {
                Ok(n) => {
                    batch.lens[i] = n as u16;
                    batch.n += 1;
                }
                Err(_) => break,
            }
        }
        if full.send(batch).await.is_err() {
            return;
        }
        wake.notify_one();
    }
}

fn enable_forwarding() -> io::Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH)?.trim() != "1" {
        std::fs::write(PATH, "1")?;
        tracing::info!("IPv4 forwarding enabled");
    }
    Ok(())
}

/// The gateway's table, replacing any earlier one in the same transaction.
fn ruleset(device: &str, range: Ipv4Net) -> nftables::schema::Nftables<'static> {
    let table = serde_json::json!({"family": "ip", "name": NFT_TABLE});
    let chain = |name: &str, kind: &str, hook: &str, prio: i32| {
        serde_json::json!({"add": {"chain": {
            "family": "ip", "table": NFT_TABLE, "name": name,
            "type": kind, "hook": hook, "prio": prio, "policy": "accept"
        }}})
    };
    let rule = |chain: &str, expr: serde_json::Value| serde_json::json!({"add": {"rule": {"family": "ip", "table": NFT_TABLE, "chain": chain, "expr": expr}}});
    let oif =
        |op: &str| serde_json::json!({"match": {"op": op, "left": {"meta": {"key": "oifname"}}, "right": device}});
    let from_range = serde_json::json!({"match": {"op": "==",
        "left": {"payload": {"protocol": "ip", "field": "saddr"}},
        "right": {"prefix": {"addr": range.network().to_string(), "len": range.prefix_len()}}}});
    let replies = serde_json::json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}});
    let doc = serde_json::json!({"nftables": [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        chain("postrouting", "nat", "postrouting", 100),
        rule("postrouting", serde_json::json!([from_range, oif("!="), {"masquerade": null}])),
        // Into the tunnel: replies of the peers' own connections only (forwarded or local).
        chain("forward", "filter", "forward", 0),
        rule("forward", serde_json::json!([oif("=="), replies, {"accept": null}])),
        rule("forward", serde_json::json!([oif("=="), {"drop": null}])),
        chain("output", "filter", "output", 0),
        rule("output", serde_json::json!([oif("=="), replies, {"accept": null}])),
        rule("output", serde_json::json!([oif("=="), {"drop": null}])),
    ]});
    serde_json::from_value(doc).expect("the table's rules follow the nftables JSON schema")
}

/// Delete the table (an `add` first, so that a missing table is no error).
fn delete_table() -> nftables::schema::Nftables<'static> {
    let table = serde_json::json!({"family": "ip", "name": NFT_TABLE});
    let doc = serde_json::json!({"nftables": [{"add": {"table": table}}, {"delete": {"table": table}}]});
    serde_json::from_value(doc).expect("nftables JSON schema")
}

impl DataPlane for TunDataPlane {
    fn inbound(&mut self, pkt: Inbound<'_>, now: Instant) {
        match pkt.verdict {
            Verdict::Spoofed => {}
            Verdict::Allow => {
                if let Err(e) = self.dev.try_send(pkt.bytes) {
                    self.write_drops += 1;
                    if self.write_drops.is_power_of_two() {
                        tracing::warn!(error = %e, dropped = self.write_drops, "writing to the TUN device");
                    }
                }
            }
            Verdict::Local | Verdict::Denied => self.local.inbound(pkt, now),
        }
    }

    fn outbound(&mut self, now: Instant, emit: &mut dyn FnMut(&[u8])) {
        self.local.outbound(now, emit);
        for _ in 0..POOL {
            let Ok(batch) = self.full.try_recv() else { break };
            batch.packets().for_each(&mut *emit);
            // The pool channel has room for every batch, so this cannot fail while the
            // reader runs; when it has stopped the batch is simply dropped.
            let _ = self.free.try_send(batch);
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

    #[test]
    fn the_ruleset_replaces_the_table_and_guards_the_tunnel() {
        let r = ruleset("kr-gw0", "100.64.0.0/16".parse().unwrap());
        let json = serde_json::to_value(&r).unwrap();
        let cmds = json["nftables"].as_array().unwrap();
        // add, delete, add: idempotent after a crash, atomic in one `nft -j -f`.
        assert!(cmds[0]["add"]["table"].is_object());
        assert!(cmds[1]["delete"]["table"].is_object());
        assert!(cmds[2]["add"]["table"].is_object());
        let text = json.to_string();
        assert!(text.contains("\"masquerade\""), "{text}");
        assert!(text.contains("\"addr\":\"100.64.0.0\",\"len\":16"), "{text}");
        assert!(text.contains("[\"established\",\"related\"]"), "{text}");
        let drops = cmds.iter().filter(|c| c.to_string().contains("\"drop\"")).count();
        assert_eq!(drops, 2, "new connections into the tunnel dropped, forwarded and local");
    }

    #[test]
    fn a_batch_yields_exactly_the_packets_read() {
        let mut b = Batch::new();
        b.slot(0)[..3].copy_from_slice(&[1, 2, 3]);
        b.lens[0] = 3;
        b.slot(1)[..1].copy_from_slice(&[9]);
        b.lens[1] = 1;
        b.n = 2;
        let got: Vec<&[u8]> = b.packets().collect();
        assert_eq!(got, [&[1u8, 2, 3][..], &[9u8][..]]);
    }
}

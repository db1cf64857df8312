//! The gateway loop: the UDP sockets ([`crate::transport`]), the [`PeerTable`], the access
//! rules and a [`DataPlane`], driven by datagrams, flow wake-ups, timers and source
//! snapshots.
//!
//! One task does the data path and everything cheap. Handshake initiations that pass its
//! admission (MAC1, the limit, the budget, the queue's length; cookie replies otherwise)
//! go to the handshake worker thread ([`crate::handshake`]) with their X25519 work, so that
//! a flood of real handshakes does not hold data up. Without the worker (its thread could
//! not start) the loop takes them itself, as it did before.
//!
//! With `--decrypt-threads N` above 1, a receive's run of data messages from several peers
//! is decrypted on N threads at once, each peer on one (`gateway/decrypt.rs`); judging and
//! delivering stay on the loop, in order. Off by default: on 2 cores shared with other
//! work it cost more than it gave (docs/benchmarks.md).

use std::collections::HashMap;
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::acl::Acl;
use crate::budget::HandshakeBudget;
use crate::catalog::Catalog;
use crate::dataplane::{DataPlane, Policy};
use crate::handshake::{self, Worker};
use crate::http::Health;
use crate::keys::PrivateKey;
use crate::metrics::{Metrics, PeerLabels, StateLabels};
use crate::packet;
use crate::peers::{self, PeerId, PeerInput, TunnelConfig, Validation};
use crate::policy::{self, Effective};
use crate::source::{GatewayReport, PeerReport, PeerSnapshot, PolicySnapshot, ServiceSnapshot};
use crate::transport::{Bound, socket_for};
use crate::tunnel::{BUF_SIZE, PeerTable, TunnelStats};
use crate::uapi::{DeviceState, PeerState, StateRequest};

mod decrypt;
mod inbound;
mod route;

use crate::udp_batch::{Offloads, RecvBatch, enable_offloads, grow_socket_buffers, recv_batch, send_all};
use decrypt::DecryptPool;
use route::Collect;

/// How often timers run (keepalives, rekeys, expiry of peers).
pub const TICK: Duration = Duration::from_millis(250);

/// The most decrypting threads `--decrypt-threads 0` starts (one per core up to this).
pub const MAX_DECRYPT_THREADS: usize = 4;

/// The decrypting threads for `--decrypt-threads N`: N, or for 0 one per core up to
/// [`MAX_DECRYPT_THREADS`].
pub fn decrypt_threads(n: usize) -> usize {
    match n {
        0 => std::thread::available_parallelism().map_or(1, |c| c.get().min(MAX_DECRYPT_THREADS)),
        n => n,
    }
}

/// The gateway's own settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub tunnel: TunnelConfig,
    pub handshake_limit: u64,
    /// Start a handshake toward a peer whose data this replica cannot read (see
    /// [`crate::tunnel`]); off only to measure what a stock client does without it.
    pub session_recovery: bool,
    /// UDP segmentation offloads on the outer sockets (GSO and GRO) where the kernel has
    /// them; off only to measure the difference or to work around a broken driver.
    pub udp_offload: bool,
    /// Threads that decrypt data messages, the loop's included: runs of data from several
    /// peers in one receive are spread over them (`gateway/decrypt.rs`); 1: the loop alone.
    pub decrypt_threads: usize,
}

/// Everything the loop owns.
pub struct Gateway {
    cfg: GatewayConfig,
    table: PeerTable,
    dp: Box<dyn DataPlane>,
    peers: PeerSnapshot,
    services: ServiceSnapshot,
    policies: PolicySnapshot,
    validation: Validation,
    /// Every accepted peer's rules with its access policies', and the policies' reports.
    effective: Effective,
    policy: Arc<Policy>,
    metrics: Arc<Metrics>,
    buf: Vec<u8>,
    io: Collect,
    last_stats: HashMap<PeerId, TunnelStats>,
    /// When the validation can next change without a new snapshot (the earliest
    /// `expiresAt` of an accepted peer or of a granting policy): the tick re-validates
    /// only then, not every tick.
    next_expiry: Option<k8s_openapi::jiff::Timestamp>,
    /// Kept for the UAPI `get` answer (`wg show` derives the public key from it).
    private_key: PrivateKey,
    uapi: Option<mpsc::Receiver<StateRequest>>,
    /// Handshake time (the worker's, and the loop's on handshake messages) against the
    /// clock: over it, initiations get cookie replies even below `handshake_limit`, so a
    /// flood of real handshakes cannot take the machine's cores from the data.
    budget: Arc<Mutex<HandshakeBudget>>,
    /// The handshake worker, once `run` started it.
    worker: Option<Worker>,
    /// The threads that decrypt data beside the loop, once `run` started them.
    decryptors: Option<DecryptPool>,
    /// Whether this replica leads ([`crate::leader`]); `None`: it decides alone.
    leading: Option<watch::Receiver<bool>>,
    /// Not leading: serve only the peers whose status grants them an address.
    following: bool,
    /// A refresh changed who is accepted or rejected, or a policy's outcome: the report
    /// (and so the status, which followers wait for) goes out now, not at the next second.
    report_due: bool,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig, key: PrivateKey, dp: Box<dyn DataPlane>, metrics: Arc<Metrics>) -> Self {
        Gateway {
            table: PeerTable::new(key.clone(), cfg.handshake_limit).with_session_recovery(cfg.session_recovery),
            cfg,
            dp,
            peers: PeerSnapshot::default(),
            services: ServiceSnapshot::default(),
            policies: PolicySnapshot::default(),
            validation: Validation::default(),
            effective: Effective::default(),
            policy: Arc::new(Policy::default()),
            metrics,
            buf: vec![0u8; BUF_SIZE],
            io: Collect::default(),
            last_stats: HashMap::new(),
            next_expiry: None,
            private_key: key,
            uapi: None,
            budget: Arc::default(),
            worker: None,
            decryptors: None,
            leading: None,
            following: false,
            report_due: false,
        }
    }

    /// Take part in an election: while another replica leads, serve only the peers whose
    /// status (written by the leader) grants them an address, at that address.
    pub fn follow(mut self, leading: watch::Receiver<bool>) -> Self {
        self.following = !*leading.borrow();
        self.leading = Some(leading);
        self
    }

    /// Where the UAPI socket task ([`crate::uapi::UapiListener::serve`]) asks for the
    /// device's state; the loop answers between packets.
    pub fn uapi_requests(&mut self) -> mpsc::Sender<StateRequest> {
        let (tx, rx) = mpsc::channel(16);
        self.uapi = Some(rx);
        tx
    }

    /// The device as `wg show` sees it: every peer's key, endpoint, tunnel address,
    /// last handshake and byte counters.
    fn device_state(&self, listen_port: u16) -> DeviceState {
        let now = SystemTime::now();
        let psks: HashMap<_, _> = self
            .validation
            .accepted
            .iter()
            .filter_map(|p| p.preshared_key.as_ref().map(|k| (p.public_key, k)))
            .collect();
        let mut peers: Vec<PeerState> = self
            .table
            .peers()
            .map(|t| {
                let s = t.stats();
                PeerState {
                    public_key: t.public_key(),
                    preshared_key: psks.get(&t.public_key()).map(|k| (*k).clone()),
                    endpoint: t.endpoint(),
                    // The IPv4 /32 only: what `wg show` has always listed here (tests and
                    // scripts read it); the peer's IPv6 /128 is in its VpnPeer status.
                    allowed_ips: vec![ipnet::IpNet::V4(ipnet::Ipv4Net::from(t.address()))],
                    last_handshake: s.since_last_handshake.and_then(|d| now.checked_sub(d)),
                    rx_bytes: s.rx_bytes,
                    tx_bytes: s.tx_bytes,
                    persistent_keepalive: 0,
                }
            })
            .collect();
        peers.sort_by_key(|p| p.allowed_ips.first().copied());
        DeviceState {
            private_key: zeroize::Zeroizing::new(self.private_key.to_x25519().to_bytes()),
            listen_port,
            peers,
        }
    }

    /// Re-validate the peers and resolve the policies (expiry included) and apply any
    /// change.
    fn refresh(&mut self, services_changed: bool) {
        let started = Instant::now();
        let now = k8s_openapi::jiff::Timestamp::now();
        // A follower takes no decision of its own: the leader's status says which peers
        // are served, at which address (what it granted, validation keeps).
        let granted: Vec<PeerInput>;
        let inputs = if self.following {
            granted = self
                .peers
                .peers
                .iter()
                .filter(|p| p.granted.address.is_some())
                .cloned()
                .collect();
            &granted[..]
        } else {
            &self.peers.peers[..]
        };
        let role = if self.following {
            peers::Role::Following
        } else {
            peers::Role::Leading
        };
        let v = peers::validate_as(inputs, &self.validation, &self.cfg.tunnel, now, role);
        let effective = policy::effective(
            &self.peers.peers,
            &v,
            &self.policies.policies,
            &self.policies.namespaces,
            &self.cfg.tunnel.gateway_namespace,
            now,
        );
        // A label, policy or expiry change that leaves every peer's rules as they were
        // compiles nothing.
        let rules_changed = effective.rules != self.effective.rules;
        self.report_due |= v.accepted != self.validation.accepted
            || v.rejected != self.validation.rejected
            || effective.policies != self.effective.policies;
        if effective.policies != self.effective.policies {
            for r in &effective.policies {
                match &r.outcome {
                    Ok(()) => tracing::debug!(policy = %r.id, peers = r.matched_peers, "policy grants"),
                    Err(e) => {
                        tracing::info!(policy = %r.id, reason = e.reason(), message = %e, "policy grants nothing")
                    }
                }
            }
        }
        let peers_changed = v.accepted != self.validation.accepted;
        if peers_changed {
            let before: HashMap<PeerId, Ipv4Addr> = self.table.peers().map(|t| (t.id().clone(), t.address())).collect();
            let report = self.table.sync(&v.accepted);
            for id in &report.removed {
                if let Some(a) = before.get(id) {
                    self.dp.peer_removed(*a);
                }
                tracing::info!(peer = %id, "peer removed; session dropped");
            }
            for id in &report.added {
                tracing::info!(peer = %id, "peer added");
            }
        }
        if v.rejected != self.validation.rejected {
            for (id, r) in &v.rejected {
                tracing::info!(peer = %id, reason = r.reason(), message = %r, "peer rejected");
            }
        }
        if peers_changed || services_changed || rules_changed {
            let catalog = Catalog::new(self.services.services.iter().cloned());
            let acl = Acl::compile_effective(
                self.cfg.tunnel.gateway_address(),
                v.accepted
                    .iter()
                    .map(|p| p.address)
                    .zip(effective.rules.iter().map(|r| &r[..])),
                &catalog,
            )
            .with_ipv6(
                self.cfg.tunnel.gateway_address_v6(),
                v.accepted.iter().filter_map(|p| Some((p.address, p.address_v6?))),
            );
            self.policy = Arc::new(Policy { acl, catalog });
            self.dp.set_policy(self.policy.clone());
        }
        self.metrics
            .peers
            .get_or_create(&StateLabels {
                state: "accepted".into(),
            })
            .set(v.accepted.len() as i64);
        self.metrics
            .peers
            .get_or_create(&StateLabels {
                state: "rejected".into(),
            })
            .set(v.rejected.len() as i64);
        self.next_expiry = match (next_expiry(&v), effective.next_expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.validation = v;
        self.effective = effective;
        tracing::debug!(
            peers = self.peers.peers.len(),
            policies = self.policies.policies.len(),
            peers_changed,
            services_changed,
            rules_changed,
            elapsed_us = started.elapsed().as_micros() as u64,
            "peers refreshed"
        );
    }

    /// Collect the data plane's packets and encrypt them to their peers.
    fn outbound(&mut self) {
        let now = Instant::now();
        let Gateway { dp, table, buf, io, .. } = self;
        dp.outbound(now, &mut |p: &[u8]| {
            if let Ok(parsed) = packet::parse(p) {
                let r = table.send_to(parsed.dst, p, buf, io);
                tracing::trace!(dst = %parsed.dst, proto = parsed.proto, len = p.len(), result = ?r, "packet to tunnel");
            }
        });
    }

    fn tick(&mut self) {
        self.table.tick(Instant::now(), &mut self.buf, &mut self.io);
        // Re-validating 10,000 peers every tick cost CPU and allocator churn for nothing:
        // without a new snapshot only an expiry can change the outcome.
        if self
            .next_expiry
            .is_some_and(|t| t <= k8s_openapi::jiff::Timestamp::now())
        {
            self.refresh(false);
        }
    }

    /// The per-peer report, and metrics deltas since the last one.
    /// Hands the report to the status writer when it changed.
    fn send_report(&mut self, report: &watch::Sender<GatewayReport>) {
        self.report_due = false;
        let r = self.report();
        report.send_if_modified(|old| {
            if *old != r {
                *old = r;
                true
            } else {
                false
            }
        });
    }

    fn report(&mut self) -> GatewayReport {
        let now = SystemTime::now();
        let mut out = GatewayReport::default();
        let mut connected = 0;
        for t in self.table.peers() {
            let s = t.stats();
            if s.since_last_handshake.is_some_and(|d| d < Duration::from_secs(180)) {
                connected += 1;
            }
            let last = self.last_stats.get(t.id()).copied().unwrap_or_default();
            // Series are created at a peer's first traffic: a peer that never connected
            // has none (three series per idle peer were 2.7 MB at 10,000 peers).
            if !has_activity(&s, &last) {
                continue;
            }
            let labels = PeerLabels {
                peer: t.id().to_string(),
            };
            self.metrics
                .rx_bytes
                .get_or_create(&labels)
                .inc_by(s.rx_bytes.saturating_sub(last.rx_bytes));
            self.metrics
                .tx_bytes
                .get_or_create(&labels)
                .inc_by(s.tx_bytes.saturating_sub(last.tx_bytes));
            self.metrics
                .handshakes
                .get_or_create(&labels)
                .inc_by(s.handshakes.saturating_sub(last.handshakes));
            self.last_stats.insert(t.id().clone(), s);
        }
        self.metrics
            .peers
            .get_or_create(&StateLabels {
                state: "connected".into(),
            })
            .set(connected);
        let c = self.dp.counters();
        self.metrics
            .open_flows
            .get_or_create(&StateLabels { state: "tcp".into() })
            .set(c.tcp_flows_open as i64);
        self.metrics
            .open_flows
            .get_or_create(&StateLabels { state: "udp".into() })
            .set(c.udp_flows_open as i64);
        // Sized at once (grown by pushes, 10,000 reports took 16,384 slots).
        out.peers.reserve_exact(self.peers.peers.len());
        for input in self.peers.peers.iter() {
            let id = &input.id;
            let accepted = self.validation.accepted(id);
            let outcome = match (accepted, self.validation.rejection(id)) {
                (Some(a), _) => Ok(a.address),
                (None, Some(r)) => Err(r.clone()),
                (None, None) => continue,
            };
            let address_v6 = accepted.and_then(|a| a.address_v6);
            let stats = outcome
                .as_ref()
                .ok()
                .and_then(|a| self.table.by_address(*a))
                .map(|t| t.stats())
                .unwrap_or_default();
            out.peers.push(PeerReport {
                id: id.clone(),
                generation: input.generation,
                last_address: outcome.as_ref().ok().copied().or(input.previous_address),
                address_v6,
                last_address_v6: address_v6.or(input.previous_address_v6),
                outcome,
                last_handshake: stats.since_last_handshake.and_then(|d| now.checked_sub(d)),
                rx_bytes: stats.rx_bytes,
                tx_bytes: stats.tx_bytes,
            });
        }
        out.policies = self.effective.policies.clone();
        out
    }

    /// Send what the round collected, each datagram by a socket of its family; with GSO,
    /// each run of datagrams to one peer in one message.
    fn flush(&mut self, sockets: &[(UdpSocket, Bound)], offloads: &mut [Offloads]) {
        let io = &mut self.io;
        let bounds: Vec<Bound> = sockets.iter().map(|(_, b)| *b).collect();
        let mut done = 0;
        while done < io.sends.len() {
            // A run of datagrams for one socket (with one socket: all of them).
            let Some(i) = socket_for(&bounds, io.sends[done].0) else {
                tracing::debug!(to = %io.sends[done].0, "no socket of that family; datagram dropped");
                done += 1;
                continue;
            };
            let run = if sockets.len() == 1 {
                io.sends.len() - done
            } else {
                io.sends[done..]
                    .iter()
                    .take_while(|(to, _, _)| socket_for(&bounds, *to) == Some(i))
                    .count()
            };
            let (socket, bound) = &sockets[i];
            let trains = send_all(
                socket,
                bound,
                &io.sends[done..done + run],
                &io.send_buf,
                &mut offloads[i].gso,
            );
            self.metrics.udp_gso_trains.inc_by(trains as u64);
            done += run;
        }
        io.sends.clear();
        io.send_buf.clear();
    }

    /// The handshake worker, on handles of its own on `sockets`; `None` (the loop takes
    /// handshakes itself) if it cannot start.
    fn start_worker(&self, sockets: &[(UdpSocket, Bound)]) -> Option<Worker> {
        let handles = sockets
            .iter()
            .map(|(s, b)| Ok((handshake::clone_socket(s)?, *b)))
            .collect::<std::io::Result<Vec<_>>>();
        let started =
            handles.and_then(|h| Worker::spawn(self.table.handshaker(), h, self.budget.clone(), self.metrics.clone()));
        match started {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no handshake worker: handshakes are done on the data path");
                None
            }
        }
    }

    /// Run until `shutdown` resolves.
    #[allow(clippy::too_many_arguments)]
    pub async fn run(
        mut self,
        sockets: Vec<(UdpSocket, Bound)>,
        mut peers: watch::Receiver<PeerSnapshot>,
        mut services: watch::Receiver<ServiceSnapshot>,
        mut policies: watch::Receiver<PolicySnapshot>,
        report: watch::Sender<GatewayReport>,
        health: Arc<Health>,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.peers = peers.borrow_and_update().clone();
        self.services = services.borrow_and_update().clone();
        self.policies = policies.borrow_and_update().clone();
        self.refresh(true);
        self.metrics.leader.set(i64::from(!self.following));
        health.set_ready(self.peers.loaded && self.services.loaded);
        let waker = self.dp.waker();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_report = Instant::now();
        let mut recv = RecvBatch::new();
        let mut offloads: Vec<Offloads> = sockets
            .iter()
            .map(|(s, b)| {
                grow_socket_buffers(s);
                let o = enable_offloads(s, self.cfg.udp_offload);
                tracing::info!(socket = %b.local, gso = o.gso, gro = o.gro, "UDP segmentation offloads");
                o
            })
            .collect();
        self.worker = self.start_worker(&sockets);
        self.decryptors = DecryptPool::new(self.cfg.decrypt_threads, recv.buf().len());
        tracing::info!(
            threads = self.decryptors.as_ref().map_or(1, |_| self.cfg.decrypt_threads),
            "data decryptors"
        );
        let mut peers_open = true;
        let mut services_open = true;
        let mut policies_open = true;
        let listen_port = sockets.first().map_or(0, |(_, b)| b.local.port());
        let mut next_socket = 0;
        let mut uapi = self.uapi.take();
        let mut leading = self.leading.take();
        tokio::pin!(shutdown);
        loop {
            let delay = self.dp.poll_delay(Instant::now()).unwrap_or(Duration::from_secs(1));
            // Whether the data plane has work after this round (every arm but the
            // datagrams' may have given it some).
            let mut dp_due = true;
            tokio::select! {
                _ = &mut shutdown => break,
                (i, r) = std::future::poll_fn(|cx| poll_readable(&sockets, next_socket, cx)) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "waiting for datagrams");
                    }
                    next_socket = i + 1;
                    let socket = &sockets[i].0;
                    match socket.try_io(Interest::READABLE, || recv_batch(socket, &mut recv)) {
                        Ok(()) => {
                            self.metrics.udp_gro_trains.inc_by(recv.trains as u64);
                            // Handshakes, cookies and rejects give the data plane nothing
                            // to do: under a flood of them, it is not polled per datagram.
                            dp_due = self.datagrams(&recv, Instant::now());
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => tracing::debug!(error = %e, "recvmmsg"),
                    }
                }
                _ = waker.notified() => {}
                // The data plane's own device (TUN) readable: read in `outbound` below.
                _ = std::future::poll_fn(|cx| self.dp.poll_outbound(cx)) => {}
                r = async { uapi.as_mut()?.recv().await }, if uapi.is_some() => match r {
                    Some(reply) => { let _ = reply.send(self.device_state(listen_port)); }
                    None => uapi = None,
                },
                _ = tokio::time::sleep(delay) => {}
                _ = tick.tick() => {
                    self.tick();
                    if last_report.elapsed() >= Duration::from_secs(1) {
                        last_report = Instant::now();
                        self.send_report(&report);
                    }
                }
                r = async { leading.as_mut()?.changed().await.ok() }, if leading.is_some() => match r {
                    Some(()) => {
                        let following = !leading.as_mut().is_none_or(|l| *l.borrow_and_update());
                        if following != self.following {
                            tracing::info!(leading = !following, "gateway leadership changed");
                            self.following = following;
                            self.metrics.leader.set(i64::from(!following));
                            if following {
                                // What this replica decided as leader must not outrank what
                                // the new leader writes: from now on the status decides.
                                // (The peer table keeps sessions by key.)
                                self.validation = Validation::default();
                            }
                            self.refresh(false);
                        }
                    }
                    // The election ended (shutting down): keep serving as we are.
                    None => leading = None,
                },
                r = peers.changed(), if peers_open => {
                    if r.is_err() { peers_open = false; continue; }
                    self.peers = peers.borrow_and_update().clone();
                    self.refresh(false);
                    if self.report_due {
                        self.send_report(&report);
                    }
                    health.set_ready(self.peers.loaded && self.services.loaded);
                    release_freed_memory();
                }
                // Readiness does not wait for policies: without their CRD the peers are
                // served by their own rules.
                r = policies.changed(), if policies_open => {
                    if r.is_err() { policies_open = false; continue; }
                    self.policies = policies.borrow_and_update().clone();
                    self.refresh(false);
                    if self.report_due {
                        self.send_report(&report);
                    }
                }
                r = services.changed(), if services_open => {
                    if r.is_err() { services_open = false; continue; }
                    self.services = services.borrow_and_update().clone();
                    self.refresh(true);
                    health.set_ready(self.peers.loaded && self.services.loaded);
                }
            }
            // The batch's allowed packets out in one go (coalesced by the TUN data plane).
            if dp_due {
                self.dp.flush();
                self.outbound();
            }
            self.flush(&sockets, &mut offloads);
        }
        Ok(())
    }
}

/// A socket of `sockets` with datagrams to read (its index), looking from `start` on: the
/// caller starts after the one it read last, so a busy socket does not starve the others.
fn poll_readable(
    sockets: &[(UdpSocket, Bound)],
    start: usize,
    cx: &mut Context<'_>,
) -> Poll<(usize, std::io::Result<()>)> {
    for k in 0..sockets.len() {
        let i = (start + k) % sockets.len();
        if let Poll::Ready(r) = sockets[i].0.poll_recv_ready(cx) {
            return Poll::Ready((i, r));
        }
    }
    Poll::Pending
}

/// Give the memory freed by a snapshot change back to the system. Each change frees a
/// copy of every peer (snapshot, validation, ACL), and glibc keeps freed memory of each
/// thread's arena: at 10,000 peers that retention was the RSS peak. Snapshots come at most
/// every 50 ms and a trim of this heap takes well under a millisecond.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of the allocator's own heaps.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The earliest `expiresAt` of an accepted peer: with the policies' (see
/// [`Effective::next_expiry`]), the next time a re-validation of the same snapshots can
/// give another outcome.
fn next_expiry(v: &Validation) -> Option<k8s_openapi::jiff::Timestamp> {
    v.accepted.iter().filter_map(|p| p.expires_at).min()
}

/// Whether a peer's counters moved since the last report (or it never had a report).
fn has_activity(now: &TunnelStats, last: &TunnelStats) -> bool {
    now.rx_bytes != last.rx_bytes || now.tx_bytes != last.tx_bytes || now.handshakes != last.handshakes
}

#[cfg(test)]
mod tick_tests {
    use super::*;
    use crate::peers::AcceptedPeer;

    fn accepted(name: &str, expires: Option<&str>) -> AcceptedPeer {
        AcceptedPeer {
            id: PeerId::new("default", name),
            public_key: crate::keys::PrivateKey::generate().public_key(),
            address: Ipv4Addr::new(100, 64, 0, 2),
            address_v6: None,
            rules: Vec::new(),
            preshared_key: None,
            expires_at: expires.map(|t| t.parse().unwrap()),
        }
    }

    #[test]
    fn next_expiry_is_the_earliest_accepted_one() {
        let mut v = Validation::default();
        assert_eq!(next_expiry(&v), None);
        v.accepted.push(accepted("a", None));
        assert_eq!(next_expiry(&v), None, "peers without expiry never need a re-validation");
        v.accepted.push(accepted("b", Some("2030-01-01T00:00:00Z")));
        v.accepted.push(accepted("c", Some("2029-01-01T00:00:00Z")));
        assert_eq!(next_expiry(&v), Some("2029-01-01T00:00:00Z".parse().unwrap()));
    }

    #[test]
    fn activity_is_a_counter_change() {
        let idle = TunnelStats::default();
        assert!(!has_activity(&idle, &TunnelStats::default()));
        let shook = TunnelStats {
            handshakes: 1,
            since_last_handshake: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        assert!(has_activity(&shook, &idle));
        assert!(
            !has_activity(&shook, &shook),
            "no new series or increments without traffic"
        );
        let rx = TunnelStats { rx_bytes: 10, ..shook };
        assert!(has_activity(&rx, &shook));
    }
}

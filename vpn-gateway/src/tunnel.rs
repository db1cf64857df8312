//! WireGuard sessions: a [`PeerTunnel`] per accepted peer and the [`PeerTable`] that
//! routes incoming datagrams to them.
//!
//! No sockets, no tokio: callers pass datagrams and buffers in, and the table tells a
//! [`TunnelIo`] what to send where and which decrypted packets came out of which peer.
//! `tick` is given the time that decides rate-limiter resets and idle drops; the table
//! notes the monotonic time a tunnel was created and a handshake completed.
//!
//! Routing follows boringtun's own device: a handshake initiation is matched to its peer by
//! the static key it carries (`parse_handshake_anon`, after the shared [`RateLimiter`] has
//! checked its MAC and, under load, its cookie); everything else carries our receiver
//! index, whose upper 24 bits are the peer's index (`Tunn::new` shifts it left by 8).
//!
//! Threads: the gateway does an initiation's X25519 work on a worker thread
//! ([`crate::handshake`]). [`PeerTable::route`] does everything cheap and leaves the
//! initiations it takes to a [`Handshaker`], which shares the peers by key and each peer's
//! session (its `Tunn`, endpoint and counters, behind a per-peer lock) with the table. The
//! loop locks a peer's session for each of its packets (uncontended, next to the packet's
//! ChaCha20), so the packet after a handshake sees it, and one peer's handshake holds up
//! no other peer. [`PeerTable::handle_datagram`] does both steps on the caller's thread.
//!
//! Memory follows the active peers, not the configured ones: boringtun's [`Tunn`](boringtun::noise::Tunn) is about
//! 11 KB (eight session slots), so a peer gets one only at its first handshake initiation
//! (or when the gateway must send to it), and loses it after [`IDLE_DROP`] without a
//! completed handshake, by which time boringtun has zeroed every key anyway. A dropped
//! tunnel is like a gateway restart for that peer: it handshakes again; its counters and
//! last handshake time are kept.
//!
//! Replicas (issue 22): a peer's index is a keyed hash of its public key under the
//! gateway's private key ([`peer_index`]), so every replica that holds the key gives the
//! peer the same index, and a data packet of a session made with one replica names its
//! peer on any other. A replica that cannot read such a packet (it has no session with the
//! peer, or not that one) starts a handshake toward the packet's source at once
//! ([`PeerTable::handle_datagram`], "session recovery"): WireGuard lets either side
//! initiate, the client answers as responder, and its next packets use the new session.
//! Without this a stock client notices only after its own timers (about 15 s without an
//! answer). The handshake itself proves who answers; the packet that triggered it only
//! says where to send a 148-byte initiation, at most once per peer per
//! [`RECOVERY_INTERVAL`], counted against the handshake limit like any other.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use blake2::{Blake2s256, Digest};
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, TunnResult};
use foldhash::HashMap;
use parking_lot::Mutex;

use crate::keys::{PrivateKey, PublicKey};
use crate::peers::{AcceptedPeer, PeerId};

mod session;

pub use session::Handshaker;
use session::Session;

/// The size of the buffers callers pass in: the largest IP packet plus WireGuard's
/// overhead, and never less than a handshake initiation (what `encapsulate` requires).
pub const BUF_SIZE: usize = 65_536 + 148;
/// WireGuard's data overhead (header and tag) that `encapsulate` adds.
const DATA_OVERHEAD: usize = 32;
/// Flush rounds after a handshake (boringtun queues at most 256 packets).
const MAX_FLUSH: usize = 300;
/// Handshakes per second before cookie replies are required.
pub const DEFAULT_HANDSHAKE_LIMIT: u64 = 100;
/// The peer index is 24 bits.
const INDEX_MASK: u32 = 0x00ff_ffff;
/// WireGuard's REJECT_AFTER_TIME: no session is used longer than this after its handshake.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// A tunnel without a completed handshake for this long is dropped: 3 × REJECT_AFTER_TIME,
/// when boringtun itself zeroes all keys of a peer (its sessions died long before), so
/// nothing usable is lost.
pub const IDLE_DROP: Duration = Duration::from_secs(3 * 180);
/// Session recovery starts at most one handshake per peer in this time, and none within
/// it after a handshake completed (packets of the old session still in flight then).
pub const RECOVERY_INTERVAL: Duration = Duration::from_secs(2);
/// A peer heard from this recently (KEEPALIVE_TIMEOUT + REKEY_TIMEOUT, what a stock client
/// waits before it starts over) gets no session recovery: its session here is alive.
const ALIVE: Duration = Duration::from_secs(15);

/// The secret the peer indices are derived from: a hash of the gateway's private key, so
/// replicas agree without sharing anything more than the key they already share.
fn index_secret(private: &PrivateKey) -> zeroize::Zeroizing<[u8; 32]> {
    let mut h = Blake2s256::new();
    h.update(b"kuberaya-gateway peer index v1");
    h.update(private.to_x25519().as_bytes());
    zeroize::Zeroizing::new(h.finalize().into())
}

/// The `attempt`-th candidate index of the peer `key` (24 bits): attempt 0 unless that one
/// is taken by another peer. Keyed, so the index says nothing about the key to anyone
/// without the gateway's private key; per peer, as boringtun's index always was (the
/// upper 24 bits of every session index of a `Tunn`).
pub fn peer_index(secret: &[u8; 32], key: &PublicKey, attempt: u32) -> u32 {
    let mut h = Blake2s256::new();
    h.update(secret);
    h.update(key.0);
    h.update(attempt.to_le_bytes());
    let d = h.finalize();
    u32::from_le_bytes([d[0], d[1], d[2], d[3]]) & INDEX_MASK
}

/// What the table asks its caller to do.
pub trait TunnelIo {
    /// Send a datagram to `to` from the gateway's UDP socket.
    fn send(&mut self, to: SocketAddr, datagram: &[u8]);
    /// A decrypted packet came out of the tunnel of `peer`, whose tunnel address is
    /// `address`. Called with the peer's lock held, from the buffer it was decrypted into:
    /// take it from there (no copy on the way), and do not block.
    fn deliver(&mut self, peer: &PeerId, address: Ipv4Addr, packet: &[u8]);
    /// The time of the receive being handled: a peer's last authenticated packet is
    /// stamped with it, without a clock read per datagram.
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// The tunnel index a WireGuard data message (type 4) is for, from its header; `None` for
/// any other message. Data is what may be opened off the loop ([`Decryptor`]): opening it
/// changes only its peer's session, under the peer's lock.
pub fn data_index(datagram: &[u8]) -> Option<u32> {
    match datagram {
        [4, 0, 0, 0, a, b, c, d, ..] if datagram.len() >= DATA_OVERHEAD => {
            Some(u32::from_le_bytes([*a, *b, *c, *d]) >> 8)
        }
        _ => None,
    }
}

/// What opening a data message came to.
#[derive(Debug)]
pub enum Decrypted {
    /// Authenticated and handed to the [`TunnelIo`] (a keepalive delivers nothing).
    Done,
    /// No peer has the tunnel index.
    UnknownIndex,
    /// Not opened: `active` says whether the peer had a tunnel at all.
    Failed { active: bool, error: WireGuardError },
}

/// The peers' sessions, shared read-only: data messages of different peers can be opened
/// on different threads at once, each under its peer's lock (so one peer's packets stay in
/// the order they are opened in).
#[derive(Clone, Copy)]
pub struct Decryptor<'a>(&'a HashMap<u32, PeerTunnel>);

impl Decryptor<'_> {
    /// Open `datagram` from `src` for the peer at `index` into `buf` (at least the datagram's
    /// length); the packet goes to `io` from there.
    pub fn open(
        &self,
        index: u32,
        src: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
        io: &mut impl TunnelIo,
    ) -> Decrypted {
        let Some(t) = self.0.get(&index) else {
            return Decrypted::UnknownIndex;
        };
        let mut s = t.session.lock();
        if !s.is_active() {
            return Decrypted::Failed {
                active: false,
                error: WireGuardError::NoCurrentSession,
            };
        }
        match s.decapsulate(src, datagram, buf, io) {
            Ok(()) => Decrypted::Done,
            Err(error) => Decrypted::Failed { active: true, error },
        }
    }
}

/// Why an incoming datagram went nowhere.
#[derive(Debug, thiserror::Error)]
pub enum DropReason {
    #[error("not a WireGuard message: {0:?}")]
    Malformed(WireGuardError),
    #[error("handshake from an unknown key or not for our key")]
    UnknownKey,
    #[error("receiver index {0:#x} belongs to no peer")]
    UnknownIndex(u32),
    /// A data packet or handshake response for a peer whose tunnel was dropped (idle, or
    /// its preshared key changed): the peer must handshake again.
    #[error("peer {0}: no session (the peer must handshake)")]
    NoSession(PeerId),
    #[error("peer {peer}: {error:?}")]
    Rejected { peer: PeerId, error: WireGuardError },
}

impl DropReason {
    /// A metrics label.
    pub fn label(&self) -> &'static str {
        match self {
            DropReason::Malformed(WireGuardError::InvalidMac) => "invalid_mac",
            DropReason::Malformed(WireGuardError::UnderLoad) => "under_load",
            DropReason::Malformed(_) => "malformed",
            DropReason::UnknownKey => "unknown_key",
            DropReason::UnknownIndex(_) => "unknown_index",
            DropReason::NoSession(_) => "no_session",
            DropReason::Rejected {
                error: WireGuardError::DuplicateCounter | WireGuardError::InvalidCounter,
                ..
            } => "replayed",
            DropReason::Rejected { .. } => "decrypt_failed",
        }
    }
    /// The peer the datagram was for, when known.
    pub fn peer(&self) -> Option<&PeerId> {
        match self {
            DropReason::Rejected { peer, .. } | DropReason::NoSession(peer) => Some(peer),
            _ => None,
        }
    }
}

/// Why a packet could not be sent to a peer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("no peer has tunnel address {0}")]
    NoPeer(IpAddr),
    #[error("the peer has not connected yet (no endpoint)")]
    NoEndpoint,
    #[error("packet of {0} bytes does not fit the buffer")]
    TooLarge(usize),
}

/// Counters of one peer's tunnel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelStats {
    /// Since the last completed handshake (kept after the session expired, as `wg show`
    /// shows it).
    pub since_last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
    pub handshakes: u64,
}

/// One peer: what we know of it (the loop's, read without a lock), and its `Session`,
/// which the handshake worker shares.
pub struct PeerTunnel {
    id: PeerId,
    public_key: PublicKey,
    address: Ipv4Addr,
    address_v6: Option<Ipv6Addr>,
    index: u32,
    session: Arc<Mutex<Session>>,
}

impl std::fmt::Debug for PeerTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTunnel")
            .field("id", &self.id)
            .field("public_key", &self.public_key)
            .field("address", &self.address)
            .field("endpoint", &self.endpoint())
            .field("index", &self.index)
            .field("active", &self.is_active())
            .finish_non_exhaustive()
    }
}

impl PeerTunnel {
    /// A peer without a tunnel yet.
    fn new(peer: &AcceptedPeer, index: u32) -> Self {
        PeerTunnel {
            id: peer.id.clone(),
            public_key: peer.public_key,
            address: peer.address,
            address_v6: peer.address_v6,
            index,
            session: Arc::new(Mutex::new(Session {
                tunn: None,
                created: None,
                id: peer.id.clone(),
                public_key: peer.public_key,
                preshared_key: peer.preshared_key.clone(),
                index,
                address: peer.address,
                endpoint: None,
                handshakes: 0,
                last_handshake: None,
                recovery_sent: None,
                last_rx: None,
                unconfirmed: false,
                carried_tx: 0,
                carried_rx: 0,
                removed: false,
            })),
        }
    }

    pub fn id(&self) -> &PeerId {
        &self.id
    }
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }
    pub fn address_v6(&self) -> Option<Ipv6Addr> {
        self.address_v6
    }
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.session.lock().endpoint
    }
    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }
    /// Whether the peer has a WireGuard state machine now (it handshook recently).
    pub fn is_active(&self) -> bool {
        self.session.lock().is_active()
    }

    pub fn stats(&self) -> TunnelStats {
        self.session.lock().stats()
    }
}

/// Where [`PeerTable::route`] left a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// Handled: whatever it asked for is in the [`TunnelIo`].
    Done,
    /// A handshake initiation to take: the caller gives it to [`Handshaker::initiation`].
    Initiation,
}

/// What [`PeerTable::sync`] changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SyncReport {
    pub added: Vec<PeerId>,
    pub removed: Vec<PeerId>,
    /// New preshared key: their sessions were dropped.
    pub rekeyed: Vec<PeerId>,
    /// Kept their sessions (address or name changed, or nothing at all).
    pub kept: usize,
}

/// All peers, indexed for datagram routing.
pub struct PeerTable {
    private: PrivateKey,
    /// The keys, the peers by static key and the active count, shared with the handshake
    /// worker. Its `tunn_limiter` checks MAC1 only (its limit is never reached): what
    /// handshakes go through while the table is not under load, and what each `Tunn` checks
    /// again (`Tunn::decapsulate` runs its limiter's `verify_packet` too; a limiting one
    /// there counted every handshake twice and sent cookie replies of its own).
    hs: Handshaker,
    /// Always under load: checks MAC1 and demands a valid cookie (MAC2) while the table is
    /// under load — over `handshake_limit` this second, or as the caller says
    /// ([`PeerTable::set_over_budget`]: the CPU budget, a long handshake queue). One limiter
    /// for every cause, so one cookie secret: a peer's cookie stays valid whichever cause
    /// holds when it comes back.
    overload_limiter: Arc<RateLimiter>,
    /// Handshake messages taken since the last reset (every second, in `tick`).
    handshakes: u64,
    handshake_limit: u64,
    over_budget: bool,
    tunnels: HashMap<u32, PeerTunnel>,
    by_addr: HashMap<Ipv4Addr, u32>,
    by_addr6: HashMap<Ipv6Addr, u32>,
    /// See [`peer_index`].
    index_secret: zeroize::Zeroizing<[u8; 32]>,
    /// Whether unreadable data starts a handshake (see the module's documentation).
    session_recovery: bool,
    last_reset: Option<Instant>,
    idle_drop: Duration,
}

impl std::fmt::Debug for PeerTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTable")
            .field("public_key", &self.private.public_key())
            .field("peers", &self.tunnels.len())
            .field("active", &self.active())
            .finish_non_exhaustive()
    }
}

impl PeerTable {
    /// A table for the gateway's key; `handshake_limit` handshakes per second are taken
    /// before cookie replies are demanded.
    pub fn new(private: PrivateKey, handshake_limit: u64) -> Self {
        let x_private = private.to_x25519();
        let x_public = x25519_dalek::PublicKey::from(&x_private);
        let index_secret = index_secret(&private);
        PeerTable {
            hs: Handshaker {
                x_private,
                x_public,
                tunn_limiter: Arc::new(RateLimiter::new(&x_public, u64::MAX)),
                by_key: Arc::default(),
                active: Arc::default(),
            },
            overload_limiter: Arc::new(RateLimiter::new(&x_public, 0)),
            handshakes: 0,
            handshake_limit,
            over_budget: false,
            private,
            tunnels: HashMap::default(),
            by_addr: HashMap::default(),
            by_addr6: HashMap::default(),
            index_secret,
            session_recovery: true,
            last_reset: None,
            idle_drop: IDLE_DROP,
        }
    }

    /// Drop tunnels after `idle` without a handshake instead of [`IDLE_DROP`].
    pub fn with_idle_drop(mut self, idle: Duration) -> Self {
        self.idle_drop = idle;
        self
    }

    /// Without session recovery: a peer whose session this table does not have is left
    /// to its own timers, as a single WireGuard device does (the baseline of the failover
    /// bench).
    pub fn with_session_recovery(mut self, on: bool) -> Self {
        self.session_recovery = on;
        self
    }

    pub fn public_key(&self) -> PublicKey {
        self.private.public_key()
    }

    /// What takes the initiations [`PeerTable::route`] leaves, for another thread.
    pub fn handshaker(&self) -> Handshaker {
        self.hs.clone()
    }

    pub fn len(&self) -> usize {
        self.tunnels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.tunnels.is_empty()
    }
    /// How many peers have a WireGuard state machine now.
    pub fn active(&self) -> usize {
        self.hs.active.load(Ordering::Relaxed)
    }

    /// Every peer, with or without a tunnel.
    pub fn peers(&self) -> impl Iterator<Item = &PeerTunnel> {
        self.tunnels.values()
    }

    pub fn by_address(&self, a: Ipv4Addr) -> Option<&PeerTunnel> {
        self.by_addr.get(&a).and_then(|i| self.tunnels.get(i))
    }

    /// The peer at IPv6 tunnel address `a`.
    pub fn by_address_v6(&self, a: Ipv6Addr) -> Option<&PeerTunnel> {
        self.by_addr6.get(&a).and_then(|i| self.tunnels.get(i))
    }

    /// Make the table match `peers`: new ones added (without a tunnel), missing ones
    /// removed (their sessions dropped at once), a changed preshared key drops the tunnel,
    /// and everything else keeps its session.
    pub fn sync(&mut self, peers: &[AcceptedPeer]) -> SyncReport {
        let mut report = SyncReport::default();
        let wanted: HashMap<PublicKey, &AcceptedPeer> = peers.iter().map(|p| (p.public_key, p)).collect();
        let gone: Vec<u32> = self
            .tunnels
            .iter()
            .filter(|(_, t)| !wanted.contains_key(&t.public_key))
            .map(|(i, _)| *i)
            .collect();
        // The worker reads the keys between our changes, never during them.
        let mut by_key = self.hs.by_key.write();
        let active = &self.hs.active;
        for i in gone {
            if let Some(t) = self.tunnels.remove(&i) {
                by_key.remove(&t.public_key);
                // A worker may still hold the session: it must find it gone.
                let mut s = t.session.lock();
                s.removed = true;
                if s.drop_tunn() {
                    active.fetch_sub(1, Ordering::Relaxed);
                }
                drop(s);
                report.removed.push(t.id);
            }
        }
        self.by_addr.clear();
        self.by_addr.reserve(peers.len());
        self.by_addr6.clear();
        for p in peers {
            let known = by_key.get(&p.public_key).map(|s| s.lock().index);
            match known {
                Some(i) => {
                    let Some(t) = self.tunnels.get_mut(&i) else { continue };
                    let mut s = t.session.lock();
                    if s.preshared_key != p.preshared_key {
                        if s.drop_tunn() {
                            active.fetch_sub(1, Ordering::Relaxed);
                        }
                        s.preshared_key = p.preshared_key.clone();
                        report.rekeyed.push(p.id.clone());
                    } else {
                        report.kept += 1;
                    }
                    if t.id != p.id {
                        t.id = p.id.clone();
                        s.id = p.id.clone();
                    }
                    s.address = p.address;
                    drop(s);
                    t.address = p.address;
                    t.address_v6 = p.address_v6;
                    self.by_addr.insert(p.address, i);
                    if let Some(a) = p.address_v6 {
                        self.by_addr6.insert(a, i);
                    }
                }
                None => {
                    let i = allocate_index(&self.tunnels, &self.index_secret, &p.public_key);
                    let t = PeerTunnel::new(p, i);
                    by_key.insert(p.public_key, t.session.clone());
                    self.tunnels.insert(i, t);
                    self.by_addr.insert(p.address, i);
                    if let Some(a) = p.address_v6 {
                        self.by_addr6.insert(a, i);
                    }
                    report.added.push(p.id.clone());
                }
            }
        }
        report
    }

    /// Whether handshake messages are to be treated as under load for a cause of the
    /// caller's (see [`crate::budget`] and [`crate::handshake`]): while they are, each is
    /// answered with a cookie reply unless it carries a valid cookie, as above
    /// `handshake_limit`.
    pub fn set_over_budget(&mut self, over: bool) {
        self.over_budget = over;
    }

    /// Handle one datagram from `src`, handshake initiations included. `buf` must be
    /// [`BUF_SIZE`] bytes.
    pub fn handle_datagram(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
        io: &mut impl TunnelIo,
    ) -> Result<(), DropReason> {
        match self.route(src, datagram, buf, io)? {
            Routed::Done => Ok(()),
            Routed::Initiation => self.take_initiation(src, datagram, buf, io),
        }
    }

    /// Take an initiation that [`PeerTable::route`] left, on this thread.
    pub fn take_initiation(
        &self,
        src: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
        io: &mut impl TunnelIo,
    ) -> Result<(), DropReason> {
        self.hs.initiation(src, datagram, buf, io)
    }

    /// Handle one datagram from `src`, except that a handshake initiation the table takes
    /// (MAC1 valid; under load, its cookie too) is only counted and returned as
    /// [`Routed::Initiation`], for a [`Handshaker`] to do the X25519 work, possibly on
    /// another thread. Everything else (data, handshake responses, cookie replies either
    /// way) is done here. `buf` must be [`BUF_SIZE`] bytes.
    pub fn route(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
        io: &mut impl TunnelIo,
    ) -> Result<Routed, DropReason> {
        let under_load = self.over_budget || self.handshakes >= self.handshake_limit;
        let limiter = if under_load {
            &self.overload_limiter
        } else {
            &self.hs.tunn_limiter
        };
        let verified = limiter.verify_packet(Some(src.ip()), datagram, buf);
        if matches!(verified, Ok(Packet::HandshakeInit(_) | Packet::HandshakeResponse(_))) {
            self.handshakes = self.handshakes.saturating_add(1);
        }
        let data = matches!(verified, Ok(Packet::PacketData(_)));
        let index = match verified {
            Err(TunnResult::WriteToNetwork(cookie)) => {
                io.send(src, cookie);
                return Ok(Routed::Done);
            }
            Err(TunnResult::Err(e)) => return Err(DropReason::Malformed(e)),
            Err(_) => return Err(DropReason::Malformed(WireGuardError::InvalidPacket)),
            Ok(Packet::HandshakeInit(_)) => return Ok(Routed::Initiation),
            Ok(Packet::HandshakeResponse(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketCookieReply(p)) => p.receiver_idx >> 8,
            Ok(Packet::PacketData(p)) => p.receiver_idx >> 8,
        };
        match Decryptor(&self.tunnels).open(index, src, datagram, buf, io) {
            Decrypted::Done => Ok(Routed::Done),
            Decrypted::UnknownIndex => Err(DropReason::UnknownIndex(index)),
            Decrypted::Failed { active, error } => Err(self.failed(index, src, data, active, error, buf, io)),
        }
    }

    /// What may open data messages (see [`data_index`]) on any thread while the table is
    /// only read: the peers' locks are all it takes.
    pub fn decryptor(&self) -> Decryptor<'_> {
        Decryptor(&self.tunnels)
    }

    /// A data message that [`Decryptor::open`] could not open: its drop reason, after a
    /// session recovery where one is due.
    pub fn data_failed(
        &mut self,
        index: u32,
        src: SocketAddr,
        active: bool,
        error: WireGuardError,
        buf: &mut [u8],
        io: &mut impl TunnelIo,
    ) -> DropReason {
        self.failed(index, src, true, active, error, buf, io)
    }

    /// The peer at tunnel `index`.
    pub fn peer_at(&self, index: u32) -> Option<&PeerId> {
        self.tunnels.get(&index).map(|t| &t.id)
    }

    #[allow(clippy::too_many_arguments)]
    fn failed(
        &mut self,
        index: u32,
        src: SocketAddr,
        data: bool,
        active: bool,
        error: WireGuardError,
        buf: &mut [u8],
        io: &mut impl TunnelIo,
    ) -> DropReason {
        let Some(peer) = self.peer_at(index).cloned() else {
            return DropReason::UnknownIndex(index);
        };
        // Data of a session this table does not have: made with another replica, or with
        // this one before it restarted (or before its tunnel was dropped).
        if data
            && matches!(
                error,
                WireGuardError::NoCurrentSession | WireGuardError::WrongIndex | WireGuardError::InvalidAeadTag
            )
        {
            let under_load = self.over_budget || self.handshakes >= self.handshake_limit;
            self.recover(index, src, under_load, buf, io);
        }
        if active {
            DropReason::Rejected { peer, error }
        } else {
            DropReason::NoSession(peer)
        }
    }

    /// Session recovery: start a handshake toward `src` as the peer at `index`, whose data
    /// from there this table could not read; not under load, at most once per
    /// [`RECOVERY_INTERVAL`], and not right after a handshake completed. The endpoint is
    /// not taken from the unauthenticated packet: it is set when the answer comes.
    fn recover(&mut self, index: u32, src: SocketAddr, under_load: bool, buf: &mut [u8], io: &mut impl TunnelIo) {
        if !self.session_recovery || under_load {
            return;
        }
        let Some(t) = self.tunnels.get(&index) else { return };
        let mut s = t.session.lock();
        let now = Instant::now();
        let within = |at: Option<Instant>, d: Duration| at.is_some_and(|at| now.saturating_duration_since(at) < d);
        // A peer heard from (authenticated) within the time a stock client waits before it
        // gives a session up is alive here: an unreadable packet is then a forgery or a
        // straggler, and must not disturb it.
        if within(s.recovery_sent, RECOVERY_INTERVAL)
            || within(s.last_handshake, RECOVERY_INTERVAL)
            || within(s.last_rx, ALIVE)
        {
            return;
        }
        let was_active = s.is_active();
        let known_endpoint = s.endpoint.is_some();
        let tunn = s.tunn(&self.hs.x_private, &self.hs.tunn_limiter);
        // A handshake already under way toward an authenticated endpoint is left to
        // boringtun's retransmissions there: forcing a new one per forged packet would keep
        // resetting it (and after 90 s its failure clears the peer's sessions).
        let first = tunn.format_handshake_initiation(buf, false);
        let result = match first {
            TunnResult::Done if !known_endpoint => tunn.format_handshake_initiation(buf, true),
            other => other,
        };
        let sent = match result {
            TunnResult::WriteToNetwork(init) => {
                io.send(src, init);
                true
            }
            other => {
                tracing::debug!(peer = %t.id, result = ?std::mem::discriminant(&other), "session recovery: no initiation");
                false
            }
        };
        if !was_active {
            self.hs.active.fetch_add(1, Ordering::Relaxed);
        }
        if sent {
            s.recovery_sent = Some(now);
            drop(s);
            self.handshakes = self.handshakes.saturating_add(1);
            tracing::debug!(peer = %t.id, %src, "session recovery: handshake started");
        }
    }

    /// Encrypt `packet` to the peer whose tunnel address is its destination.
    pub fn send_to(
        &mut self,
        dst: IpAddr,
        packet: &[u8],
        buf: &mut [u8],
        io: &mut impl TunnelIo,
    ) -> Result<(), SendError> {
        let i = match dst {
            IpAddr::V4(a) => self.by_addr.get(&a),
            IpAddr::V6(a) => self.by_addr6.get(&a),
        }
        .ok_or(SendError::NoPeer(dst))?;
        let t = self.tunnels.get(i).ok_or(SendError::NoPeer(dst))?;
        let mut s = t.session.lock();
        let was_active = s.is_active();
        let r = s.encapsulate(packet, buf, &self.hs.x_private, &self.hs.tunn_limiter, io);
        if !was_active && s.is_active() {
            self.hs.active.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Drive the active peers' timers (call every 100-250 ms), drop tunnels idle for the
    /// idle time, and reset the handshake rate counter once a second. A peer whose lock the
    /// handshake worker holds is left to the next tick.
    pub fn tick(&mut self, now: Instant, buf: &mut [u8], io: &mut impl TunnelIo) {
        if self
            .last_reset
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.handshakes = 0;
            self.last_reset = Some(now);
        }
        if self.active() == 0 {
            return;
        }
        for t in self.tunnels.values() {
            let Some(mut s) = t.session.try_lock() else { continue };
            if s.idle(now, self.idle_drop) {
                tracing::debug!(peer = %t.id, "tunnel idle; dropped until the next handshake");
                if s.drop_tunn() {
                    self.hs.active.fetch_sub(1, Ordering::Relaxed);
                }
            } else {
                s.update_timers(buf, io);
            }
        }
    }
}

/// The first free candidate of [`peer_index`]. Two peers whose first candidates collide
/// (about 3 pairs in 10,000 peers) get them in the order they were added, which replicas
/// that loaded the peers in different orders may not share: for those few, failover falls
/// back to the client's own timers.
fn allocate_index(tunnels: &HashMap<u32, PeerTunnel>, secret: &[u8; 32], key: &PublicKey) -> u32 {
    // At most 2^24 peers; the table never gets near that, so this ends quickly.
    (0..)
        .map(|attempt| peer_index(secret, key, attempt))
        .find(|i| !tunnels.contains_key(i))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use boringtun::noise::Tunn;

    use crate::keys::PresharedKey;
    use crate::packet::tests::{ipv4, udp};
    use crate::packet::{PROTO_UDP, parse};

    #[derive(Default)]
    struct Io {
        sent: Vec<(SocketAddr, Vec<u8>)>,
        delivered: Vec<(Ipv4Addr, Vec<u8>)>,
    }
    impl TunnelIo for Io {
        fn send(&mut self, to: SocketAddr, d: &[u8]) {
            self.sent.push((to, d.to_vec()));
        }
        fn deliver(&mut self, _: &PeerId, peer: Ipv4Addr, p: &[u8]) {
            self.delivered.push((peer, p.to_vec()));
        }
    }

    struct Laptop {
        tunn: Tunn,
        key: PrivateKey,
        addr: SocketAddr,
    }

    impl Laptop {
        fn new(gateway: PublicKey, port: u16, psk: Option<&PresharedKey>) -> Self {
            let key = PrivateKey::generate();
            let tunn = Tunn::new(
                key.to_x25519(),
                gateway.to_x25519(),
                psk.map(|k| k.0),
                None,
                rand::random::<u32>() >> 8,
                None,
            );
            Laptop {
                tunn,
                key,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            }
        }
        fn accepted(&self, ns: &str, addr: [u8; 4]) -> AcceptedPeer {
            AcceptedPeer {
                id: PeerId::new(ns, format!("laptop{}", self.addr.port())),
                public_key: self.key.public_key(),
                address: Ipv4Addr::from(addr),
                address_v6: None,
                rules: vec![],
                preshared_key: None,
                expires_at: None,
            }
        }
        /// Run a packet through: laptop encrypts, gateway decrypts; return what the
        /// gateway delivered, feeding the gateway's replies back to the laptop.
        fn send(&mut self, table: &mut PeerTable, packet: &[u8]) -> Vec<(Ipv4Addr, Vec<u8>)> {
            let mut out = vec![0u8; BUF_SIZE];
            let mut to_gw = Vec::new();
            if let TunnResult::WriteToNetwork(b) = self.tunn.encapsulate(packet, &mut out) {
                to_gw.push(b.to_vec());
            }
            self.exchange(table, to_gw)
        }
        /// A forced handshake initiation through the table (as after the gateway dropped
        /// the peer's tunnel while the laptop still had a session).
        fn handshake(&mut self, table: &mut PeerTable) {
            let h = self.initiation();
            self.exchange(table, vec![h]);
        }
        /// A forced handshake initiation, for the gateway.
        fn initiation(&mut self) -> Vec<u8> {
            let mut out = vec![0u8; BUF_SIZE];
            let TunnResult::WriteToNetwork(h) = self.tunn.format_handshake_initiation(&mut out, true) else {
                panic!("no handshake initiation")
            };
            h.to_vec()
        }
        /// A data packet of the laptop's current session, for the gateway.
        fn datagram(&mut self, packet: &[u8]) -> Vec<u8> {
            let mut out = vec![0u8; BUF_SIZE];
            let TunnResult::WriteToNetwork(d) = self.tunn.encapsulate(packet, &mut out) else {
                panic!("the laptop has no session")
            };
            d.to_vec()
        }
        /// Feed `to_gw` to the table and the answers back to the laptop until both are quiet.
        fn exchange(&mut self, table: &mut PeerTable, mut to_gw: Vec<Vec<u8>>) -> Vec<(Ipv4Addr, Vec<u8>)> {
            let mut out = vec![0u8; BUF_SIZE];
            let mut buf = vec![0u8; BUF_SIZE];
            let mut io = Io::default();
            for _ in 0..10 {
                if to_gw.is_empty() {
                    break;
                }
                for d in std::mem::take(&mut to_gw) {
                    let _ = table.handle_datagram(self.addr, &d, &mut buf, &mut io);
                }
                for (_, d) in std::mem::take(&mut io.sent) {
                    let mut r = self.tunn.decapsulate(None, &d, &mut out);
                    while let TunnResult::WriteToNetwork(b) = r {
                        to_gw.push(b.to_vec());
                        r = self.tunn.decapsulate(None, &[], &mut out);
                    }
                }
            }
            io.delivered
        }
    }

    fn packet(src: [u8; 4]) -> Vec<u8> {
        ipv4(src, [127, 96, 0, 10], PROTO_UDP, &udp(1000, 53, b"ping"))
    }

    #[test]
    fn handshake_and_data_through_the_table() {
        let mut table = PeerTable::new(PrivateKey::generate(), DEFAULT_HANDSHAKE_LIMIT);
        let mut a = Laptop::new(table.public_key(), 40001, None);
        let mut b = Laptop::new(table.public_key(), 40002, None);
        table.sync(&[a.accepted("t", [100, 64, 0, 2]), b.accepted("t", [100, 64, 0, 3])]);
        let got = a.send(&mut table, &packet([100, 64, 0, 2]));
        assert_eq!(got.len(), 1, "the queued packet is delivered after the handshake");
        assert_eq!(got[0].0, Ipv4Addr::new(100, 64, 0, 2));
        assert_eq!(parse(&got[0].1).unwrap().dst_port(), Some(53));
        let got = b.send(&mut table, &packet([100, 64, 0, 3]));
        assert_eq!(got[0].0, Ipv4Addr::new(100, 64, 0, 3));
        // Data afterwards goes by receiver index, no handshake.
        let got = a.send(&mut table, &packet([100, 64, 0, 2]));
        assert_eq!(got.len(), 1);
        assert_eq!(
            table
                .by_address(Ipv4Addr::new(100, 64, 0, 2))
                .unwrap()
                .stats()
                .handshakes,
            1
        );
        assert!(table.by_address(Ipv4Addr::new(100, 64, 0, 2)).unwrap().stats().rx_bytes > 0);

        // Gateway → laptop.
        let mut buf = vec![0u8; BUF_SIZE];
        let mut io = Io::default();
        table
            .send_to(
                "100.64.0.2".parse().unwrap(),
                &packet([127, 96, 0, 10]),
                &mut buf,
                &mut io,
            )
            .unwrap();
        assert_eq!(io.sent.len(), 1);
        assert_eq!(io.sent[0].0, a.addr);
        let mut out = vec![0u8; BUF_SIZE];
        assert!(matches!(
            a.tunn.decapsulate(None, &io.sent[0].1, &mut out),
            TunnResult::WriteToTunnelV4(_, _)
        ));
        assert_eq!(
            table.send_to("100.64.0.9".parse().unwrap(), &[0x45], &mut buf, &mut io),
            Err(SendError::NoPeer("100.64.0.9".parse().unwrap()))
        );
    }

    #[test]
    fn live_changes_keep_unchanged_sessions() {
        let mut table = PeerTable::new(PrivateKey::generate(), DEFAULT_HANDSHAKE_LIMIT);
        let mut a = Laptop::new(table.public_key(), 40001, None);
        let mut b = Laptop::new(table.public_key(), 40002, None);
        let pa = a.accepted("t", [100, 64, 0, 2]);
        let pb = b.accepted("t", [100, 64, 0, 3]);
        table.sync(&[pa.clone(), pb.clone()]);
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        assert_eq!(b.send(&mut table, &packet([100, 64, 0, 3])).len(), 1);

        // Remove b, add c: a keeps its session (no new handshake).
        let c = Laptop::new(table.public_key(), 40003, None);
        let report = table.sync(&[pa.clone(), c.accepted("t", [100, 64, 0, 4])]);
        assert_eq!(report.removed, vec![pb.id.clone()]);
        assert_eq!(report.kept, 1);
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        assert_eq!(
            table
                .by_address(Ipv4Addr::new(100, 64, 0, 2))
                .unwrap()
                .stats()
                .handshakes,
            1
        );
        // b's session is gone at once: its data packets hit no peer.
        let mut out = vec![0u8; BUF_SIZE];
        let mut buf = vec![0u8; BUF_SIZE];
        let TunnResult::WriteToNetwork(d) = b.tunn.encapsulate(&packet([100, 64, 0, 3]), &mut out) else {
            panic!("b has a session")
        };
        let d = d.to_vec();
        let mut io = Io::default();
        assert!(matches!(
            table.handle_datagram(b.addr, &d, &mut buf, &mut io),
            Err(DropReason::UnknownIndex(_))
        ));
        assert!(io.delivered.is_empty());
        // And its handshakes are refused.
        let h = b.initiation();
        assert!(matches!(
            table.handle_datagram(b.addr, &h, &mut buf, &mut io),
            Err(DropReason::UnknownKey)
        ));

        // A changed address keeps the session.
        let mut moved = pa.clone();
        moved.address = Ipv4Addr::new(100, 64, 0, 20);
        table.sync(&[moved]);
        let got = a.send(&mut table, &packet([100, 64, 0, 20]));
        assert_eq!(got[0].0, Ipv4Addr::new(100, 64, 0, 20));
        assert_eq!(
            table
                .by_address(Ipv4Addr::new(100, 64, 0, 20))
                .unwrap()
                .stats()
                .handshakes,
            1
        );
    }

    #[test]
    fn preshared_keys_must_match() {
        let mut table = PeerTable::new(PrivateKey::generate(), DEFAULT_HANDSHAKE_LIMIT);
        let psk = PresharedKey([9; 32]);
        let mut good = Laptop::new(table.public_key(), 40001, Some(&psk));
        let mut bad = Laptop::new(table.public_key(), 40002, None);
        let mut pg = good.accepted("t", [100, 64, 0, 2]);
        pg.preshared_key = Some(psk.clone());
        let mut pb = bad.accepted("t", [100, 64, 0, 3]);
        pb.preshared_key = Some(psk);
        table.sync(&[pg, pb]);
        assert_eq!(good.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        assert!(bad.send(&mut table, &packet([100, 64, 0, 3])).is_empty());
    }

    #[test]
    fn roaming_updates_the_endpoint() {
        let mut table = PeerTable::new(PrivateKey::generate(), DEFAULT_HANDSHAKE_LIMIT);
        let mut a = Laptop::new(table.public_key(), 40001, None);
        table.sync(&[a.accepted("t", [100, 64, 0, 2])]);
        a.send(&mut table, &packet([100, 64, 0, 2]));
        a.addr = SocketAddr::from(([127, 0, 0, 2], 50000));
        a.send(&mut table, &packet([100, 64, 0, 2]));
        assert_eq!(
            table.by_address(Ipv4Addr::new(100, 64, 0, 2)).unwrap().endpoint(),
            Some(a.addr)
        );
    }

    #[test]
    fn garbage_truncated_and_replayed_datagrams_are_dropped() {
        let mut table = PeerTable::new(PrivateKey::generate(), DEFAULT_HANDSHAKE_LIMIT);
        let mut a = Laptop::new(table.public_key(), 40001, None);
        table.sync(&[a.accepted("t", [100, 64, 0, 2])]);
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        let mut out = vec![0u8; BUF_SIZE];
        let mut buf = vec![0u8; BUF_SIZE];
        let TunnResult::WriteToNetwork(d) = a.tunn.encapsulate(&packet([100, 64, 0, 2]), &mut out) else {
            panic!()
        };
        let d = d.to_vec();
        let mut io = Io::default();
        table.handle_datagram(a.addr, &d, &mut buf, &mut io).unwrap();
        assert_eq!(io.delivered.len(), 1);
        // Replay.
        let e = table.handle_datagram(a.addr, &d, &mut buf, &mut io).unwrap_err();
        assert_eq!(e.label(), "replayed");
        assert_eq!(io.delivered.len(), 1);
        // Truncations and bit flips of a data packet and a handshake.
        let h = a.initiation();
        for msg in [&d, &h] {
            for cut in 0..msg.len() {
                let _ = table.handle_datagram(a.addr, &msg[..cut], &mut buf, &mut io);
            }
            for i in 0..msg.len() {
                let mut m = msg.clone();
                m[i] ^= 0x5a;
                let _ = table.handle_datagram(a.addr, &m, &mut buf, &mut io);
            }
        }
        for len in [0usize, 1, 4, 32, 64, 92, 148, 200, 2000] {
            let junk: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let _ = table.handle_datagram(a.addr, &junk, &mut buf, &mut io);
        }
        assert_eq!(io.delivered.len(), 1, "nothing forged got through");
        // The established session still works.
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
    }

    #[test]
    fn handshake_flood_gets_cookie_replies_and_the_peer_keeps_working() {
        let mut table = PeerTable::new(PrivateKey::generate(), 5);
        let mut a = Laptop::new(table.public_key(), 40001, None);
        let mut flooder = Laptop::new(table.public_key(), 40009, None);
        table.sync(&[a.accepted("t", [100, 64, 0, 2]), flooder.accepted("t", [100, 64, 0, 3])]);
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        let mut buf = vec![0u8; BUF_SIZE];
        let mut io = Io::default();
        for _ in 0..50 {
            let h = flooder.initiation();
            let _ = table.handle_datagram(flooder.addr, &h, &mut buf, &mut io);
        }
        let cookies = io
            .sent
            .iter()
            .filter(|(_, d)| d.first() == Some(&3) && d.len() == 64)
            .count();
        // The limit is exact: a's handshake and 4 of the flood's pass, the other 46 get cookies.
        assert_eq!(cookies, 46, "cookie replies under load");
        // Data of the established session is not rate limited.
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        // After the reset the flooder's handshakes pass again.
        table.tick(Instant::now(), &mut buf, &mut io);
        let _ = flooder.send(&mut table, &packet([100, 64, 0, 3]));
    }

    #[test]
    fn over_budget_initiations_get_cookies_and_a_cookie_it_issued_is_accepted() {
        // No rate limit: only the budget puts the table under load.
        let mut table = PeerTable::new(PrivateKey::generate(), u64::MAX);
        let mut a = Laptop::new(table.public_key(), 40001, None);
        let mut b = Laptop::new(table.public_key(), 40002, None);
        table.sync(&[a.accepted("t", [100, 64, 0, 2]), b.accepted("t", [100, 64, 0, 3])]);
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        table.set_over_budget(true);
        let mut out = vec![0u8; BUF_SIZE];
        let mut buf = vec![0u8; BUF_SIZE];
        let mut io = Io::default();
        let h = b.initiation();
        for _ in 0..3 {
            assert!(table.handle_datagram(b.addr, &h, &mut buf, &mut io).is_ok());
        }
        let cookies: Vec<_> = io
            .sent
            .iter()
            .filter(|(to, d)| *to == b.addr && d.first() == Some(&3) && d.len() == 64)
            .map(|(_, d)| d.clone())
            .collect();
        assert_eq!(
            cookies.len(),
            3,
            "every initiation answered with a cookie: {:?}",
            io.sent.len()
        );
        assert_eq!(io.sent.len(), 3, "nothing but cookie replies");
        assert_eq!(table.active(), 1, "no tunnel for a cookie reply");
        // The established session's data is not affected.
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        // b takes the cookie and initiates again with its MAC2: the same limiter accepts it.
        assert!(matches!(
            b.tunn.decapsulate(None, &cookies[0], &mut out),
            TunnResult::Done
        ));
        b.handshake(&mut table);
        assert_eq!(table.active(), 2);
        assert_eq!(stats_of(&table, [100, 64, 0, 3]).handshakes, 1);
        assert_eq!(b.send(&mut table, &packet([100, 64, 0, 3])).len(), 1);
        // Back under budget, an initiation without a cookie is taken again.
        table.set_over_budget(false);
        let mut c = Laptop::new(table.public_key(), 40003, None);
        table.sync(&[
            a.accepted("t", [100, 64, 0, 2]),
            b.accepted("t", [100, 64, 0, 3]),
            c.accepted("t", [100, 64, 0, 4]),
        ]);
        assert_eq!(c.send(&mut table, &packet([100, 64, 0, 4])).len(), 1);
    }

    /// A cookie issued because the rate limit was reached is still accepted when the
    /// table is under load for the other cause (the CPU budget): one cookie secret.
    #[test]
    fn a_cookie_from_the_rate_limit_is_accepted_over_budget() {
        let mut table = PeerTable::new(PrivateKey::generate(), 0);
        let mut b = Laptop::new(table.public_key(), 40002, None);
        table.sync(&[b.accepted("t", [100, 64, 0, 3])]);
        let mut out = vec![0u8; BUF_SIZE];
        let mut buf = vec![0u8; BUF_SIZE];
        let mut io = Io::default();
        let h = b.initiation();
        assert!(table.handle_datagram(b.addr, &h, &mut buf, &mut io).is_ok());
        let cookie = io.sent.pop().map(|(_, d)| d).expect("a cookie reply (limit 0)");
        assert_eq!((cookie.first(), cookie.len()), (Some(&3), 64));
        assert!(matches!(b.tunn.decapsulate(None, &cookie, &mut out), TunnResult::Done));
        // Now the budget, not the rate, is what holds: the cookie still opens the door.
        table.set_over_budget(true);
        b.handshake(&mut table);
        assert_eq!(stats_of(&table, [100, 64, 0, 3]).handshakes, 1);
    }

    #[test]
    fn route_leaves_initiations_to_a_handshaker_on_another_thread() {
        let mut table = PeerTable::new(PrivateKey::generate(), DEFAULT_HANDSHAKE_LIMIT);
        let mut a = Laptop::new(table.public_key(), 40001, None);
        table.sync(&[a.accepted("t", [100, 64, 0, 2])]);
        let hs = table.handshaker();
        let init = a.initiation();
        let mut buf = vec![0u8; BUF_SIZE];
        let mut io = Io::default();
        assert_eq!(
            table.route(a.addr, &init, &mut buf, &mut io).unwrap(),
            Routed::Initiation
        );
        assert!(io.sent.is_empty());
        assert_eq!(table.active(), 0, "no X25519 work on the loop, no tunnel yet");
        // The worker's side, on a thread of its own.
        let sent = std::thread::scope(|s| {
            s.spawn(|| {
                let mut buf = vec![0u8; BUF_SIZE];
                let mut io = Io::default();
                hs.initiation(a.addr, &init, &mut buf, &mut io).unwrap();
                io.sent
            })
            .join()
            .unwrap()
        });
        assert_eq!(sent.len(), 1);
        assert_eq!((sent[0].0, sent[0].1.len(), sent[0].1[0]), (a.addr, 92, 2));
        assert_eq!(table.active(), 1, "the worker's tunnel is counted");
        // The laptop completes the handshake with its first data: the loop's side sees the
        // worker's session.
        let mut out = vec![0u8; BUF_SIZE];
        let TunnResult::WriteToNetwork(keepalive) = a.tunn.decapsulate(None, &sent[0].1, &mut out) else {
            panic!("no keepalive")
        };
        let keepalive = keepalive.to_vec();
        table.handle_datagram(a.addr, &keepalive, &mut buf, &mut io).unwrap();
        assert_eq!(stats_of(&table, [100, 64, 0, 2]).handshakes, 1);
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);

        // A peer removed while its initiation waited for the worker: refused, and no
        // tunnel comes back.
        let init = a.initiation();
        assert_eq!(
            table.route(a.addr, &init, &mut buf, &mut io).unwrap(),
            Routed::Initiation
        );
        table.sync(&[]);
        assert_eq!(table.active(), 0);
        assert!(matches!(
            hs.initiation(a.addr, &init, &mut buf, &mut io),
            Err(DropReason::UnknownKey)
        ));
        assert_eq!(table.active(), 0);
    }

    fn stats_of(table: &PeerTable, a: [u8; 4]) -> TunnelStats {
        table.by_address(Ipv4Addr::from(a)).expect("peer").stats()
    }

    #[test]
    fn each_handshake_is_counted_once_and_data_between_them_counts_none() {
        let mut table = PeerTable::new(PrivateKey::generate(), DEFAULT_HANDSHAKE_LIMIT);
        let mut a = Laptop::new(table.public_key(), 40001, None);
        table.sync(&[a.accepted("t", [100, 64, 0, 2])]);
        // The first handshake: boringtun makes the session current at the first data.
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        assert_eq!(stats_of(&table, [100, 64, 0, 2]).handshakes, 1);
        for _ in 0..5 {
            assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        }
        assert_eq!(stats_of(&table, [100, 64, 0, 2]).handshakes, 1, "data is no handshake");
        // A rekey while the old session is current: counted at the initiation (boringtun
        // stamps it with the time of its last timer tick, which the gateway runs every
        // 250 ms).
        std::thread::sleep(Duration::from_millis(2));
        table.tick(Instant::now(), &mut vec![0u8; BUF_SIZE], &mut Io::default());
        a.handshake(&mut table);
        assert_eq!(stats_of(&table, [100, 64, 0, 2]).handshakes, 2);
        for _ in 0..3 {
            assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        }
        assert_eq!(stats_of(&table, [100, 64, 0, 2]).handshakes, 2);
        let since = stats_of(&table, [100, 64, 0, 2])
            .since_last_handshake
            .expect("a handshake");
        assert!(
            since < Duration::from_secs(5),
            "the last handshake is the rekey: {since:?}"
        );
    }

    #[test]
    fn tunnels_are_created_at_the_first_handshake_only() {
        let mut table = PeerTable::new(PrivateKey::generate(), DEFAULT_HANDSHAKE_LIMIT);
        let mut laptops: Vec<Laptop> = (0..50)
            .map(|i| Laptop::new(table.public_key(), 41000 + i, None))
            .collect();
        let accepted: Vec<AcceptedPeer> = laptops
            .iter()
            .enumerate()
            .map(|(i, l)| l.accepted("t", [100, 64, 1, i as u8 + 2]))
            .collect();
        assert_eq!(table.sync(&accepted).added.len(), 50);
        assert_eq!((table.len(), table.active()), (50, 0), "no Tunn before a handshake");
        // Every peer is listed (wg show lists them all), with empty counters.
        assert_eq!(table.peers().count(), 50);
        assert!(
            table
                .peers()
                .all(|t| !t.is_active() && t.stats() == TunnelStats::default())
        );
        let mut buf = vec![0u8; BUF_SIZE];
        let mut io = Io::default();
        table.tick(Instant::now(), &mut buf, &mut io);
        assert!(io.sent.is_empty(), "peers without a tunnel have no timers");

        // A stranger's initiation creates nothing.
        let mut stranger = Laptop::new(table.public_key(), 41999, None);
        assert!(stranger.send(&mut table, &packet([100, 64, 1, 99])).is_empty());
        assert_eq!(table.active(), 0);

        // One peer handshakes: one tunnel, and data flows.
        assert_eq!(laptops[7].send(&mut table, &packet([100, 64, 1, 9])).len(), 1);
        assert_eq!(table.active(), 1);
        assert!(table.by_address(Ipv4Addr::new(100, 64, 1, 9)).unwrap().is_active());
        assert!(!table.by_address(Ipv4Addr::new(100, 64, 1, 8)).unwrap().is_active());
        let s = stats_of(&table, [100, 64, 1, 9]);
        assert_eq!(s.handshakes, 1);
        assert!(s.rx_bytes > 0 && s.since_last_handshake.is_some());

        // Removing the active peer frees its tunnel; the others are untouched.
        let report = table.sync(&accepted[..7]);
        assert_eq!(report.removed.len(), 43);
        assert_eq!((table.len(), table.active()), (7, 0));
    }

    #[test]
    fn idle_tunnels_are_dropped_and_come_back_at_the_next_handshake() {
        let idle = Duration::from_secs(60);
        let mut table = PeerTable::new(PrivateKey::generate(), DEFAULT_HANDSHAKE_LIMIT).with_idle_drop(idle);
        assert_eq!(
            PeerTable::new(PrivateKey::generate(), 1).idle_drop,
            3 * REJECT_AFTER_TIME
        );
        let mut a = Laptop::new(table.public_key(), 40001, None);
        let mut b = Laptop::new(table.public_key(), 40002, None);
        table.sync(&[a.accepted("t", [100, 64, 0, 2]), b.accepted("t", [100, 64, 0, 3])]);
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        assert_eq!(b.send(&mut table, &packet([100, 64, 0, 3])).len(), 1);
        assert_eq!(table.active(), 2);
        let before = stats_of(&table, [100, 64, 0, 2]);

        let mut buf = vec![0u8; BUF_SIZE];
        let mut io = Io::default();
        let now = Instant::now();
        table.tick(now + idle / 2, &mut buf, &mut io);
        assert_eq!(table.active(), 2, "a recent handshake keeps the tunnel");
        table.tick(now + idle + Duration::from_secs(1), &mut buf, &mut io);
        assert_eq!(
            (table.len(), table.active()),
            (2, 0),
            "idle tunnels dropped, peers kept"
        );
        // Counters and the last handshake survive the drop (wg show, status).
        let dropped = stats_of(&table, [100, 64, 0, 2]);
        assert_eq!(
            (dropped.tx_bytes, dropped.rx_bytes, dropped.handshakes),
            (before.tx_bytes, before.rx_bytes, before.handshakes)
        );
        assert!(dropped.since_last_handshake >= before.since_last_handshake);
        assert_eq!(
            table.by_address(Ipv4Addr::new(100, 64, 0, 2)).unwrap().endpoint(),
            Some(a.addr)
        );

        // The laptop's old session is gone at the gateway: its data is dropped, naming the
        // peer, and no tunnel is made for it.
        let d = a.datagram(&packet([100, 64, 0, 2]));
        let e = table.handle_datagram(a.addr, &d, &mut buf, &mut io).unwrap_err();
        assert_eq!(e.label(), "no_session");
        assert_eq!(e.peer(), Some(&PeerId::new("t", "laptop40001")));
        assert_eq!(table.active(), 0);
        assert!(io.delivered.is_empty());

        // Its next handshake makes a fresh tunnel; the counters go on from where they were.
        a.handshake(&mut table);
        assert_eq!(table.active(), 1);
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        let after = stats_of(&table, [100, 64, 0, 2]);
        assert_eq!(after.handshakes, 2);
        assert!(after.rx_bytes > before.rx_bytes);
        assert!(after.since_last_handshake.unwrap() < Duration::from_secs(5));
    }

    #[test]
    fn the_gateway_sends_to_a_peer_without_tunnel_by_handshaking() {
        let idle = Duration::from_secs(60);
        let mut table = PeerTable::new(PrivateKey::generate(), DEFAULT_HANDSHAKE_LIMIT).with_idle_drop(idle);
        let mut a = Laptop::new(table.public_key(), 40001, None);
        let never = Laptop::new(table.public_key(), 40002, None);
        table.sync(&[a.accepted("t", [100, 64, 0, 2]), never.accepted("t", [100, 64, 0, 3])]);
        let mut buf = vec![0u8; BUF_SIZE];
        let mut io = Io::default();
        // Never connected: no endpoint, no tunnel made.
        assert_eq!(
            table.send_to(
                "100.64.0.3".parse().unwrap(),
                &packet([127, 96, 0, 10]),
                &mut buf,
                &mut io
            ),
            Err(SendError::NoEndpoint)
        );
        assert_eq!(table.active(), 0);

        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        table.tick(Instant::now() + idle * 2, &mut buf, &mut io);
        assert_eq!(table.active(), 0);
        // A packet for the peer now: a tunnel, and a handshake initiation to its endpoint.
        let reply = ipv4([127, 96, 0, 10], [100, 64, 0, 2], PROTO_UDP, &udp(53, 1000, b"pong"));
        table
            .send_to("100.64.0.2".parse().unwrap(), &reply, &mut buf, &mut io)
            .unwrap();
        assert_eq!(table.active(), 1);
        assert_eq!(io.sent.len(), 1);
        let (to, init) = io.sent.remove(0);
        assert_eq!((to, init[0], init.len()), (a.addr, 1, 148));
        // The laptop answers; the queued packet follows the handshake.
        let mut out = vec![0u8; BUF_SIZE];
        let TunnResult::WriteToNetwork(resp) = a.tunn.decapsulate(None, &init, &mut out) else {
            panic!("no handshake response")
        };
        let resp = resp.to_vec();
        table.handle_datagram(a.addr, &resp, &mut buf, &mut io).unwrap();
        let (_, data) = io.sent.last().expect("the queued packet").clone();
        let got = match a.tunn.decapsulate(None, &data, &mut out) {
            TunnResult::WriteToTunnelV4(p, _) => p.to_vec(),
            _ => panic!("the laptop got no packet"),
        };
        assert_eq!(got, reply);
    }

    #[test]
    fn a_new_preshared_key_drops_the_tunnel_and_keeps_counters() {
        let mut table = PeerTable::new(PrivateKey::generate(), DEFAULT_HANDSHAKE_LIMIT);
        let mut a = Laptop::new(table.public_key(), 40001, None);
        let mut pa = a.accepted("t", [100, 64, 0, 2]);
        table.sync(std::slice::from_ref(&pa));
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        let before = stats_of(&table, [100, 64, 0, 2]);
        let psk = PresharedKey([7; 32]);
        pa.preshared_key = Some(psk.clone());
        let report = table.sync(std::slice::from_ref(&pa));
        assert_eq!(report.rekeyed, vec![pa.id.clone()]);
        assert_eq!(table.active(), 0);
        assert_eq!(stats_of(&table, [100, 64, 0, 2]).rx_bytes, before.rx_bytes);
        // The old session is cut off, and a handshake without the key fails...
        let d = a.datagram(&packet([100, 64, 0, 2]));
        let mut buf = vec![0u8; BUF_SIZE];
        let mut io = Io::default();
        assert_eq!(
            table
                .handle_datagram(a.addr, &d, &mut buf, &mut io)
                .unwrap_err()
                .label(),
            "no_session"
        );
        a.handshake(&mut table);
        assert!(a.send(&mut table, &packet([100, 64, 0, 2])).is_empty());
        // ...while one with it works.
        a.tunn = Tunn::new(
            a.key.to_x25519(),
            table.public_key().to_x25519(),
            Some(psk.0),
            None,
            77,
            None,
        );
        assert_eq!(a.send(&mut table, &packet([100, 64, 0, 2])).len(), 1);
        assert_eq!(stats_of(&table, [100, 64, 0, 2]).handshakes, 2);
    }

    /// Two replicas with the same key and peers, as the gateway's Deployment runs them.
    fn replicas() -> (PeerTable, PeerTable, Laptop) {
        let key = PrivateKey::generate();
        let mut a = PeerTable::new(key.clone(), DEFAULT_HANDSHAKE_LIMIT);
        let mut b = PeerTable::new(key, DEFAULT_HANDSHAKE_LIMIT);
        let laptop = Laptop::new(a.public_key(), 40001, None);
        // Other peers, loaded in another order on each: the indices do not depend on it.
        let others: Vec<AcceptedPeer> = (0..50u8)
            .map(|i| Laptop::new(a.public_key(), 41000 + u16::from(i), None).accepted("t", [100, 64, 1, i]))
            .collect();
        let mut on_a = others.clone();
        on_a.push(laptop.accepted("t", [100, 64, 0, 2]));
        let mut on_b = vec![laptop.accepted("t", [100, 64, 0, 2])];
        on_b.extend(others.into_iter().rev());
        a.sync(&on_a);
        b.sync(&on_b);
        (a, b, laptop)
    }

    fn index_of(table: &PeerTable, addr: [u8; 4]) -> u32 {
        table.by_address(Ipv4Addr::from(addr)).unwrap().index
    }

    #[test]
    fn replicas_with_one_key_give_a_peer_the_same_index() {
        let (a, b, _) = replicas();
        for t in a.peers() {
            assert_eq!(index_of(&b, t.address().octets()), t.index, "{}", t.id());
        }
        // Another key, other indices: the index is keyed, not the public key's own bits.
        let mut c = PeerTable::new(PrivateKey::generate(), DEFAULT_HANDSHAKE_LIMIT);
        let peers: Vec<AcceptedPeer> = a
            .peers()
            .map(|t| AcceptedPeer {
                id: t.id().clone(),
                public_key: t.public_key(),
                address: t.address(),
                address_v6: t.address_v6(),
                rules: vec![],
                preshared_key: None,
                expires_at: None,
            })
            .collect();
        c.sync(&peers);
        let same = a
            .peers()
            .filter(|t| index_of(&c, t.address().octets()) == t.index)
            .count();
        assert!(same < 3, "{same} of {} indices equal under another key", peers.len());
        // A collision takes the next candidate.
        let secret = [9u8; 32];
        let k = PublicKey([1; 32]);
        assert_ne!(peer_index(&secret, &k, 0), peer_index(&secret, &k, 1));
        assert!(peer_index(&secret, &k, 0) <= INDEX_MASK);
    }

    #[test]
    fn a_replica_without_the_session_starts_a_handshake_and_the_client_carries_on() {
        let (mut a, mut b, mut laptop) = replicas();
        assert_eq!(laptop.send(&mut a, &packet([100, 64, 0, 2])).len(), 1);
        // Replica A is gone; the laptop's next packet reaches B, which has no session.
        let stale = laptop.datagram(&packet([100, 64, 0, 2]));
        let mut buf = vec![0u8; BUF_SIZE];
        let mut io = Io::default();
        let err = b.handle_datagram(laptop.addr, &stale, &mut buf, &mut io).unwrap_err();
        assert_eq!(err.label(), "no_session");
        assert_eq!(io.sent.len(), 1, "one handshake initiation toward the packet's source");
        let (to, init) = io.sent.remove(0);
        assert_eq!((to, init[0], init.len()), (laptop.addr, 1, 148));
        // Its endpoint is not taken from the unauthenticated packet.
        assert_eq!(b.by_address(Ipv4Addr::new(100, 64, 0, 2)).unwrap().endpoint(), None);
        // The laptop answers as responder; B confirms with a keepalive.
        let mut out = vec![0u8; BUF_SIZE];
        let TunnResult::WriteToNetwork(resp) = laptop.tunn.decapsulate(None, &init, &mut out) else {
            panic!("the laptop did not answer the gateway's initiation")
        };
        let resp = resp.to_vec();
        b.handle_datagram(laptop.addr, &resp, &mut buf, &mut io).unwrap();
        let (_, keepalive) = io.sent.pop().expect("a keepalive");
        assert!(matches!(
            laptop.tunn.decapsulate(None, &keepalive, &mut out),
            TunnResult::Done
        ));
        // From now on the laptop's packets use the new session, which B reads.
        assert_eq!(laptop.send(&mut b, &packet([100, 64, 0, 2])).len(), 1);
        assert_eq!(
            b.by_address(Ipv4Addr::new(100, 64, 0, 2)).unwrap().endpoint(),
            Some(laptop.addr)
        );
        assert_eq!(stats_of(&b, [100, 64, 0, 2]).handshakes, 1);
    }

    #[test]
    fn session_recovery_is_bounded_and_can_be_switched_off() {
        let (mut a, b, mut laptop) = replicas();
        assert_eq!(laptop.send(&mut a, &packet([100, 64, 0, 2])).len(), 1);
        let mut buf = vec![0u8; BUF_SIZE];
        // Off: the packet is dropped and nothing is sent, as one WireGuard device does.
        let mut off = b.with_session_recovery(false);
        let mut io = Io::default();
        let stale = laptop.datagram(&packet([100, 64, 0, 2]));
        assert!(off.handle_datagram(laptop.addr, &stale, &mut buf, &mut io).is_err());
        assert!(io.sent.is_empty());
        // On: 100 unreadable packets (from anywhere) start one handshake, not 100.
        let mut b = off.with_session_recovery(true);
        for i in 0..100u16 {
            let from = SocketAddr::from(([127, 0, 0, 9], 50000 + i));
            assert!(b.handle_datagram(from, &stale, &mut buf, &mut io).is_err());
        }
        assert_eq!(io.sent.len(), 1);
        // Garbage with the peer's index that does not even parse as its session: the
        // same bound (the initiation above is still recent).
        let mut forged = stale.clone();
        forged[16..].fill(0xaa);
        assert!(b.handle_datagram(laptop.addr, &forged, &mut buf, &mut io).is_err());
        assert_eq!(io.sent.len(), 1);
        // Under load (over the handshake limit) no recovery is started at all.
        let key = PrivateKey::generate();
        let mut busy = PeerTable::new(key.clone(), 0);
        let mut l2 = Laptop::new(busy.public_key(), 40002, None);
        busy.sync(&[l2.accepted("t", [100, 64, 0, 3])]);
        let mut other = PeerTable::new(key, DEFAULT_HANDSHAKE_LIMIT);
        other.sync(&[l2.accepted("t", [100, 64, 0, 3])]);
        assert_eq!(l2.send(&mut other, &packet([100, 64, 0, 3])).len(), 1);
        let mut io = Io::default();
        let _ = busy.handle_datagram(l2.addr, &l2.datagram(&packet([100, 64, 0, 3])), &mut buf, &mut io);
        assert!(io.sent.is_empty());
    }

    #[test]
    fn a_replica_with_a_live_session_does_not_restart_it_for_a_forged_packet() {
        let (_, mut b, mut laptop) = replicas();
        assert_eq!(laptop.send(&mut b, &packet([100, 64, 0, 2])).len(), 1);
        let mut buf = vec![0u8; BUF_SIZE];
        let mut io = Io::default();
        let mut forged = laptop.datagram(&packet([100, 64, 0, 2]));
        let n = forged.len();
        forged[n - 1] ^= 1;
        let err = b.handle_datagram(laptop.addr, &forged, &mut buf, &mut io).unwrap_err();
        assert_eq!(err.label(), "decrypt_failed");
        // Right after the handshake: nothing started, the session stands.
        assert!(io.sent.is_empty());
        assert_eq!(laptop.send(&mut b, &packet([100, 64, 0, 2])).len(), 1);
    }
}

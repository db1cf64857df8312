//! A peer's session ([`Session`]: its `Tunn`, endpoint and counters, behind the peer's
//! lock) and the [`Handshaker`] that takes handshake initiations on any thread; the
//! [`PeerTable`](super::PeerTable) routes datagrams to them.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use parking_lot::{Mutex, RwLock};

use super::{DATA_OVERHEAD, DropReason, MAX_FLUSH, SendError, TunnelIo, TunnelStats};
use crate::keys::{PresharedKey, PublicKey};
use crate::peers::PeerId;

/// A peer's WireGuard state machine and what changes with it: everything the data path and
/// the handshake worker both touch, behind the peer's lock. Every change of `tunn` between
/// `None` and `Some` happens under that lock, with the table's `active` count.
pub(super) struct Session {
    /// Boxed so that a peer without one costs a pointer, not 11 KB.
    pub(super) tunn: Option<Box<Tunn>>,
    /// When `tunn` was created.
    pub(super) created: Option<Instant>,
    /// Copies of the peer's names, for the handshake worker (which has no [`PeerTunnel`]).
    pub(super) id: PeerId,
    pub(super) public_key: PublicKey,
    pub(super) preshared_key: Option<PresharedKey>,
    pub(super) index: u32,
    pub(super) address: Ipv4Addr,
    pub(super) endpoint: Option<SocketAddr>,
    pub(super) handshakes: u64,
    pub(super) last_handshake: Option<Instant>,
    /// When session recovery last started a handshake toward this peer.
    pub(super) recovery_sent: Option<Instant>,
    /// When an authenticated packet of this peer last arrived.
    pub(super) last_rx: Option<Instant>,
    /// A handshake was taken but boringtun has no current session yet (it switches at the
    /// peer's first data): data is checked for the handshake until then.
    pub(super) unconfirmed: bool,
    /// Byte counters of the tunnels this peer had before the current one.
    pub(super) carried_tx: u64,
    pub(super) carried_rx: u64,
    /// The peer left the table: a handshake the worker took before that must not give it a
    /// tunnel again.
    pub(super) removed: bool,
}

impl Session {
    pub(super) fn is_active(&self) -> bool {
        self.tunn.is_some()
    }

    pub(super) fn stats(&self) -> TunnelStats {
        let (tx, rx) = self.tunn.as_ref().map_or((0, 0), |t| {
            let (_, tx, rx, _, _) = t.stats();
            (tx as u64, rx as u64)
        });
        TunnelStats {
            since_last_handshake: self.last_handshake.map(|t| t.elapsed()),
            tx_bytes: self.carried_tx + tx,
            rx_bytes: self.carried_rx + rx,
            handshakes: self.handshakes,
        }
    }

    /// The tunnel, created now if the peer has none (the caller counts it active).
    pub(super) fn tunn(&mut self, private: &x25519_dalek::StaticSecret, limiter: &Arc<RateLimiter>) -> &mut Tunn {
        if self.tunn.is_none() {
            self.created = Some(Instant::now());
        }
        self.tunn.get_or_insert_with(|| {
            Box::new(Tunn::new(
                private.clone(),
                self.public_key.to_x25519(),
                self.preshared_key.as_ref().map(|k| k.0),
                None,
                self.index,
                Some(limiter.clone()),
            ))
        })
    }

    /// Drop the tunnel (its sessions with it), keeping its counters. Returns whether there
    /// was one (the caller counts it inactive).
    pub(super) fn drop_tunn(&mut self) -> bool {
        let had = self.tunn.is_some();
        if let Some(t) = self.tunn.take() {
            let (_, tx, rx, _, _) = t.stats();
            self.carried_tx += tx as u64;
            self.carried_rx += rx as u64;
        }
        self.created = None;
        had
    }

    /// Whether the tunnel has gone `idle` without a handshake at `now`.
    pub(super) fn idle(&self, now: Instant, idle: Duration) -> bool {
        let Some(created) = self.created else { return false };
        let last = self.last_handshake.map_or(created, |h| h.max(created));
        now.saturating_duration_since(last) >= idle
    }

    /// Process a datagram from `src` for this peer, then flush what the tunnel queued.
    pub(super) fn decapsulate(
        &mut self,
        src: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
        io: &mut impl TunnelIo,
    ) -> Result<(), WireGuardError> {
        let address = self.address;
        let Some(tunn) = self.tunn.as_deref_mut() else {
            return Err(WireGuardError::NoCurrentSession);
        };
        // A handshake counts when boringtun's current session is newer than before: at a
        // handshake message, or (as responder of a first handshake) at the first data of
        // the new session. Other data, nearly every datagram, pays for no clock reads.
        let timed = self.unconfirmed || datagram.first() != Some(&4);
        let before = if timed { tunn.time_since_last_handshake() } else { None };
        let mut first = true;
        let mut result = Ok(());
        for _ in 0..MAX_FLUSH {
            let r = if first {
                tunn.decapsulate(Some(src.ip()), datagram, buf)
            } else {
                tunn.decapsulate(None, &[], buf)
            };
            if first {
                match r {
                    TunnResult::Err(e) => return Err(e),
                    // Authenticated: the peer may have roamed.
                    _ => {
                        self.endpoint = Some(src);
                        self.last_rx = Some(io.now());
                    }
                }
                first = false;
            }
            match r {
                TunnResult::Done => break,
                TunnResult::Err(e) => {
                    result = Err(e);
                    break;
                }
                TunnResult::WriteToNetwork(b) => io.send(src, b),
                TunnResult::WriteToTunnelV4(b, _) | TunnResult::WriteToTunnelV6(b, _) => {
                    // Keepalives are empty.
                    if !b.is_empty() {
                        io.deliver(&self.id, address, b);
                    }
                    break;
                }
            }
        }
        let after = if timed { tunn.time_since_last_handshake() } else { None };
        if timed {
            self.unconfirmed = after.is_none();
        }
        if let Some(since) = after
            && before.is_none_or(|b| since < b)
        {
            self.handshakes += 1;
            self.last_handshake = Instant::now().checked_sub(since);
        }
        result
    }

    /// Encrypt a packet to this peer; a peer without a tunnel gets one, which starts a
    /// handshake (the packet waits in its queue).
    pub(super) fn encapsulate(
        &mut self,
        packet: &[u8],
        buf: &mut [u8],
        private: &x25519_dalek::StaticSecret,
        limiter: &Arc<RateLimiter>,
        io: &mut impl TunnelIo,
    ) -> Result<(), SendError> {
        if packet.len() + DATA_OVERHEAD > buf.len() || buf.len() < 148 {
            return Err(SendError::TooLarge(packet.len()));
        }
        let endpoint = self.endpoint.ok_or(SendError::NoEndpoint)?;
        match self.tunn(private, limiter).encapsulate(packet, buf) {
            TunnResult::WriteToNetwork(b) => io.send(endpoint, b),
            TunnResult::Err(e) => tracing::debug!(peer = %self.id, error = ?e, "encapsulate failed"),
            _ => {}
        }
        Ok(())
    }

    pub(super) fn update_timers(&mut self, buf: &mut [u8], io: &mut impl TunnelIo) {
        let Some(tunn) = self.tunn.as_deref_mut() else { return };
        match tunn.update_timers(buf) {
            TunnResult::WriteToNetwork(b) => {
                if let Some(ep) = self.endpoint {
                    io.send(ep, b);
                }
            }
            TunnResult::Err(WireGuardError::ConnectionExpired) => {}
            TunnResult::Err(e) => tracing::debug!(peer = %self.id, error = ?e, "timer error"),
            _ => {}
        }
    }
}

/// What takes handshake initiations, on whichever thread: the gateway's keys, the peers by
/// static key and the count of active tunnels, shared with the [`PeerTable`](super::PeerTable) it came from
/// ([`PeerTable::handshaker`](super::PeerTable::handshaker)). The table keeps the peers current; a peer it removed is
/// refused here even if the initiation was queued before.
#[derive(Clone)]
pub struct Handshaker {
    pub(super) x_private: x25519_dalek::StaticSecret,
    pub(super) x_public: x25519_dalek::PublicKey,
    /// See [`PeerTable`]'s `tunn_limiter`.
    pub(super) tunn_limiter: Arc<RateLimiter>,
    pub(super) by_key: Arc<RwLock<HashMap<PublicKey, Arc<Mutex<Session>>>>>,
    pub(super) active: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Handshaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshaker").finish_non_exhaustive()
    }
}

impl Handshaker {
    /// Take a handshake initiation that [`PeerTable::route`](super::PeerTable::route) let through (its MAC1 checked,
    /// and under load its cookie): identify the peer by the static key it carries (one
    /// X25519), give the peer a tunnel if it has none, and let the tunnel answer (the rest
    /// of the handshake's X25519 work), with the peer's lock held only for that.
    pub fn initiation(
        &self,
        src: SocketAddr,
        datagram: &[u8],
        buf: &mut [u8],
        io: &mut impl TunnelIo,
    ) -> Result<(), DropReason> {
        let Ok(Packet::HandshakeInit(p)) = Tunn::parse_incoming_packet(datagram) else {
            return Err(DropReason::Malformed(WireGuardError::InvalidPacket));
        };
        let half = parse_handshake_anon(&self.x_private, &self.x_public, &p).map_err(|_| DropReason::UnknownKey)?;
        let session = self
            .by_key
            .read()
            .get(&PublicKey(half.peer_static_public))
            .cloned()
            .ok_or(DropReason::UnknownKey)?;
        let mut s = session.lock();
        if s.removed {
            return Err(DropReason::UnknownKey);
        }
        if !s.is_active() {
            // The peer's static key checked out: now it is worth 11 KB.
            s.tunn(&self.x_private, &self.tunn_limiter);
            self.active.fetch_add(1, Ordering::Relaxed);
        }
        s.decapsulate(src, datagram, buf, io)
            .map_err(|error| DropReason::Rejected {
                peer: s.id.clone(),
                error,
            })
    }
}

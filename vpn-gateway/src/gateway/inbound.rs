//! A receive's datagrams through the [`PeerTable`](crate::tunnel::PeerTable): each routed on the loop, or a run of
//! several peers' data decrypted on the decrypting threads ([`super::decrypt`]) and then
//! judged and delivered here in order; and what routing them sent and dropped, counted.

use std::net::SocketAddr;
use std::time::Instant;

use super::Gateway;
use super::decrypt::Outcome;
use super::route::Route;
use crate::handshake::Worker;
use crate::tunnel::{DropReason, Routed, TunnelIo, data_index};
use crate::udp_batch::RecvBatch;

/// A WireGuard cookie reply (type 3, 64 bytes).
fn is_cookie_reply(d: &[u8]) -> bool {
    d.len() == 64 && d[..4] == [3, 0, 0, 0]
}

/// A handshake initiation (type 1, 148 bytes).
fn is_initiation(d: &[u8]) -> bool {
    d.len() == 148 && d[..4] == [1, 0, 0, 0]
}

/// A handshake initiation (type 1, 148 bytes) or response (type 2, 92 bytes): the messages
/// whose time counts against the handshake budget.
fn is_handshake(d: &[u8]) -> bool {
    is_initiation(d) || (d.len() == 92 && d[..4] == [2, 0, 0, 0])
}

impl Gateway {
    /// Route one datagram; whether it gave the data plane a packet.
    fn datagram(&mut self, from: SocketAddr, d: &[u8], now: Instant) -> bool {
        let sent = self.io.sends.len();
        // Only handshake messages are timed: data pays for no clock reads.
        let started = is_handshake(d).then(Instant::now);
        // One lock at a time (the worker takes them one after the other too).
        let over_budget = started.is_some_and(|t| {
            let over = self.budget.lock().over(t);
            over || self.worker.as_ref().is_some_and(Worker::under_load)
        });
        self.table.set_over_budget(over_budget);
        let Gateway {
            table,
            dp,
            policy,
            metrics,
            io,
            buf,
            worker,
            ..
        } = self;
        let mut route = Route::new(io, dp.as_mut(), &policy.acl, metrics, now);
        let r = match table.route(from, d, buf, &mut route) {
            Ok(Routed::Done) => Ok(()),
            Ok(Routed::Initiation) => match worker {
                Some(w) => {
                    if !w.push(from, d) {
                        tracing::debug!(%from, "handshake queue full; initiation dropped");
                        metrics.handshakes_dropped.inc();
                    }
                    Ok(())
                }
                None => table.take_initiation(from, d, buf, &mut route),
            },
            Err(e) => Err(e),
        };
        let delivered = route.delivered > 0;
        if let Some(t) = started {
            self.budget.lock().record(t, Instant::now());
        }
        self.account(from, sent, over_budget, r.err());
        delivered
    }

    /// Count what routing a datagram from `from` sent (the datagrams from `sent` on in the
    /// round's sends) and why it was dropped, if it was.
    fn account(&mut self, from: SocketAddr, sent: usize, over_budget: bool, dropped: Option<DropReason>) {
        // A handshake refused under load is answered, not dropped: count the answers.
        let cookies = self.io.sends[sent..]
            .iter()
            .filter(|&&(_, start, len)| is_cookie_reply(&self.io.send_buf[start..start + len]))
            .count() as u64;
        self.metrics.cookie_replies.inc_by(cookies);
        // An initiation sent in answer to a datagram is a session recovery.
        let recoveries = self.io.sends[sent..]
            .iter()
            .filter(|&&(_, start, len)| is_initiation(&self.io.send_buf[start..start + len]))
            .count() as u64;
        self.metrics.session_recoveries.inc_by(recoveries);
        if over_budget {
            self.metrics.cookie_replies_over_budget.inc_by(cookies);
        }
        if let Some(e) = dropped {
            let peer = e.peer().map(|p| p.to_string()).unwrap_or_default();
            let label = e.label();
            tracing::debug!(%from, error = %e, "datagram dropped");
            self.metrics.dropped_packet(&peer, label);
        }
    }

    /// Route a receive's datagrams in their order; whether the data plane got a packet.
    /// With decrypting threads, each run of data messages from several peers is decrypted on
    /// them at once ([`decrypt`]) and then judged and delivered here in the run's order.
    pub(super) fn datagrams(&mut self, recv: &RecvBatch, now: Instant) -> bool {
        let mut delivered = false;
        let mut i = 0;
        while i < recv.got.len() {
            if self.decryptors.is_some() {
                let run = recv.got[i..]
                    .iter()
                    .take_while(|&&(_, s, l)| data_index(&recv.buf()[s..s + l]).is_some())
                    .count();
                if run >= 2
                    && let Some(d) = self.decrypt_run(recv, i..i + run, now)
                {
                    delivered |= d;
                    i += run;
                    continue;
                }
                // One peer's run (or none): on the loop, as without decryptors.
                for j in i..i + run.max(1) {
                    delivered |= self.datagram(recv.got[j].0, recv.datagram(j), now);
                }
                i += run.max(1);
                continue;
            }
            delivered |= self.datagram(recv.got[i].0, recv.datagram(i), now);
            i += 1;
        }
        delivered
    }

    /// Decrypt the data messages `run` of `recv` on the decrypting threads, then judge and deliver
    /// their packets in order; `None` when the run has a single peer (nothing decrypted).
    fn decrypt_run(&mut self, recv: &RecvBatch, run: std::ops::Range<usize>, now: Instant) -> Option<bool> {
        let Gateway {
            table,
            dp,
            policy,
            metrics,
            io,
            decryptors,
            ..
        } = self;
        let decryptors = decryptors.as_mut()?;
        let outcomes = decryptors.open(table.decryptor(), recv.buf(), &recv.got, run.clone(), now)?;
        metrics.decrypt_shared_runs.inc();
        for (to, start, len) in decryptors.sends.sends.drain(..) {
            io.send(to, &decryptors.sends.send_buf[start..start + len]);
        }
        decryptors.sends.send_buf.clear();
        let mut route = Route::new(io, dp.as_mut(), &policy.acl, metrics, now);
        let mut failed = Vec::new();
        for (k, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Outcome::Packet {
                    index,
                    address,
                    start,
                    len,
                } => {
                    if let Some(peer) = table.peer_at(index) {
                        route.deliver(peer, address, &decryptors.decrypted()[start..start + len]);
                    }
                }
                Outcome::Nothing => {}
                other => failed.push((recv.got[run.start + k].0, other)),
            }
        }
        let delivered = route.delivered > 0;
        for (from, outcome) in failed {
            let sent = self.io.sends.len();
            let reason = match outcome {
                Outcome::Failed { index, active, error } => {
                    self.table
                        .data_failed(index, from, active, error, &mut self.buf, &mut self.io)
                }
                Outcome::UnknownIndex(index) => DropReason::UnknownIndex(index),
                Outcome::Packet { .. } | Outcome::Nothing => continue,
            };
            self.account(from, sent, false, Some(reason));
        }
        Some(delivered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_handshake_messages_are_timed() {
        let mut init = vec![0u8; 148];
        init[0] = 1;
        let mut response = vec![0u8; 92];
        response[0] = 2;
        assert!(is_handshake(&init) && is_handshake(&response));
        let mut cookie = vec![0u8; 64];
        cookie[0] = 3;
        let mut data = vec![0u8; 148];
        data[0] = 4;
        let mut odd = init.clone();
        odd[1] = 1;
        for d in [&cookie, &data, &odd, &init[..147].to_vec(), &vec![]] {
            assert!(!is_handshake(d), "{d:?}");
        }
        assert!(is_cookie_reply(&cookie) && !is_cookie_reply(&init));
    }
}

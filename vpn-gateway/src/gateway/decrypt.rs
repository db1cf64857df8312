//! Data messages decrypted on several cores: the run of data messages in a receive batch is
//! split by peer over a small thread pool, each thread decrypting its peers' messages in
//! their order under each peer's lock, into a buffer laid out like the receive buffer (a
//! message's packet lands where the message lay). The loop then judges and delivers the
//! packets in the batch's order ([`super::Route`]), so the data plane and every access
//! check stay on one thread and no peer's packets are reordered.
//!
//! boringtun's `Tunn` decrypts with `&mut self`, so one peer's messages cannot be spread
//! over cores; spreading peers is what it allows. A run of one peer's messages is decrypted
//! on the loop itself: there is nothing to share out, and no hand-off to pay for.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::time::Instant;

use boringtun::noise::errors::WireGuardError;

use super::route::Collect;
use crate::peers::PeerId;
use crate::tunnel::{Decrypted, Decryptor, TunnelIo, data_index};

/// What decrypting one message of the run came to.
#[derive(Debug)]
pub(super) enum Outcome {
    /// A packet of `len` bytes at `start` in [`DecryptPool::decrypted`], from the peer at `index`.
    Packet {
        index: u32,
        address: Ipv4Addr,
        start: usize,
        len: usize,
    },
    /// Authenticated, nothing to deliver (a keepalive).
    Nothing,
    UnknownIndex(u32),
    Failed {
        index: u32,
        active: bool,
        error: WireGuardError,
    },
}

/// The threads and buffers for decrypting runs of data messages.
pub(super) struct DecryptPool {
    /// `threads - 1` threads: the loop decrypts one share itself.
    pool: rayon::ThreadPool,
    threads: usize,
    /// The decrypted packets, at the offsets their messages had in the receive buffer.
    plaintext: Vec<u8>,
    /// What the decryption asked to send (rare for data: a tunnel's queued packets).
    pub(super) sends: Collect,
}

impl DecryptPool {
    /// A pool of `threads` decryptors in all (the loop and `threads - 1` threads); `None` for
    /// fewer than two or when the threads cannot start.
    pub(super) fn new(threads: usize, buffer_len: usize) -> Option<DecryptPool> {
        if threads < 2 {
            return None;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads - 1)
            .thread_name(|i| format!("kr-decrypt-{i}"))
            .build();
        match pool {
            Ok(pool) => Some(DecryptPool {
                pool,
                threads,
                plaintext: vec![0; buffer_len],
                sends: Collect::default(),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "no decrypting threads: data is decrypted on the loop alone");
                None
            }
        }
    }

    pub(super) fn decrypted(&self) -> &[u8] {
        &self.plaintext
    }

    /// Decrypt the data messages `run` of `got` (datagrams at increasing offsets of `buf`)
    /// spread over the threads by peer; one [`Outcome`] per message, in the run's order.
    /// `None`: the run has one peer (or cannot be laid out), so the caller decrypts it as
    /// usual, on the loop.
    pub(super) fn open(
        &mut self,
        decryptor: Decryptor<'_>,
        buf: &[u8],
        got: &[(SocketAddr, usize, usize)],
        run: Range<usize>,
        now: Instant,
    ) -> Option<Vec<Outcome>> {
        let messages = &got[run];
        let indices: Vec<u32> = messages
            .iter()
            .map(|&(_, s, l)| data_index(&buf[s..s + l]))
            .collect::<Option<_>>()?;
        let shard_of = share_out(&indices, self.threads)?;
        if self.plaintext.len() < buf.len() {
            self.plaintext.resize(buf.len(), 0);
        }
        // Each message's slot of `plaintext`, split off in order: disjoint by construction.
        let mut shards: Vec<Vec<(usize, &mut [u8])>> = (0..self.threads).map(|_| Vec::new()).collect();
        let mut rest: &mut [u8] = &mut self.plaintext;
        let mut consumed = 0;
        for (k, &(_, start, len)) in messages.iter().enumerate() {
            let gap = start.checked_sub(consumed)?;
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(gap);
            let (slot, tail) = tail.split_at_mut(len);
            rest = tail;
            consumed = start + len;
            shards[shard_of[k]].push((k, slot));
        }
        let mut results: Vec<Vec<(usize, Outcome)>> = (0..self.threads).map(|_| Vec::new()).collect();
        let mut sends: Vec<Collect> = (0..self.threads).map(|_| Collect::default()).collect();
        let open_shard = |slots: Vec<(usize, &mut [u8])>, out: &mut Vec<(usize, Outcome)>, sends: &mut Collect| {
            for (k, slot) in slots {
                let (from, start, len) = messages[k];
                let index = indices[k];
                let mut io = Slot {
                    sends,
                    base: slot.as_ptr() as usize,
                    got: None,
                    now,
                };
                let outcome = match decryptor.open(index, from, &buf[start..start + len], slot, &mut io) {
                    Decrypted::Done => match io.got {
                        Some((address, offset, n)) => Outcome::Packet {
                            index,
                            address,
                            start: start + offset,
                            len: n,
                        },
                        None => Outcome::Nothing,
                    },
                    Decrypted::UnknownIndex => Outcome::UnknownIndex(index),
                    Decrypted::Failed { active, error } => Outcome::Failed { index, active, error },
                };
                out.push((k, outcome));
            }
        };
        let mut shard_iter = shards.into_iter();
        let mine = shard_iter.next().unwrap_or_default();
        let (my_results, other_results) = results.split_first_mut()?;
        let (my_sends, other_sends) = sends.split_first_mut()?;
        self.pool.in_place_scope(|scope| {
            for ((slots, out), sends) in shard_iter.zip(other_results.iter_mut()).zip(other_sends.iter_mut()) {
                if !slots.is_empty() {
                    let open_shard = &open_shard;
                    scope.spawn(move |_| open_shard(slots, out, sends));
                }
            }
            open_shard(mine, my_results, my_sends);
        });
        for s in &sends {
            for &(to, start, len) in &s.sends {
                self.sends.send(to, &s.send_buf[start..start + len]);
            }
        }
        let mut outcomes: Vec<Option<Outcome>> = (0..messages.len()).map(|_| None).collect();
        for (k, o) in results.into_iter().flatten() {
            outcomes[k] = Some(o);
        }
        outcomes.into_iter().collect()
    }
}

/// Which of `threads` shares each message goes to: a peer's messages all to one share,
/// the peers spread so that the shares carry about as many messages each (the largest
/// peers first, each to the lightest share; the loop's share, 0, first). `None` when the
/// run has one peer.
fn share_out(indices: &[u32], threads: usize) -> Option<Vec<usize>> {
    let mut order: Vec<usize> = (0..indices.len()).collect();
    order.sort_by_key(|&k| indices[k]);
    let mut peers: Vec<&[usize]> = order.chunk_by(|&a, &b| indices[a] == indices[b]).collect();
    if peers.len() < 2 {
        return None;
    }
    peers.sort_by(|a, b| b.len().cmp(&a.len()).then(indices[a[0]].cmp(&indices[b[0]])));
    let mut load = vec![0usize; threads];
    let mut share = vec![0usize; indices.len()];
    for messages in peers {
        let lightest = (0..threads).min_by_key(|&t| load[t]).unwrap_or(0);
        load[lightest] += messages.len();
        for &k in messages {
            share[k] = lightest;
        }
    }
    Some(share)
}

/// The [`TunnelIo`] of one decryption: where its packet landed in the slot.
struct Slot<'a> {
    sends: &'a mut Collect,
    base: usize,
    got: Option<(Ipv4Addr, usize, usize)>,
    now: Instant,
}

impl TunnelIo for Slot<'_> {
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.sends.send(to, datagram);
    }
    fn deliver(&mut self, _: &PeerId, address: Ipv4Addr, packet: &[u8]) {
        self.got = Some((address, packet.as_ptr() as usize - self.base, packet.len()));
    }
    fn now(&self) -> Instant {
        self.now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_peer_is_not_shared_out() {
        assert_eq!(share_out(&[7, 7, 7], 2), None);
        assert_eq!(share_out(&[], 2), None);
    }

    #[test]
    fn a_peer_stays_on_one_share_and_the_shares_are_balanced() {
        // Peer 1 has 4 messages, 2 has 3, 3 has 1: 1 → share 0, 2 → share 1, 3 → share 1.
        let s = share_out(&[1, 2, 1, 3, 2, 1, 2, 1], 2).unwrap();
        assert_eq!(s, vec![0, 1, 0, 1, 1, 0, 1, 0]);
        // More threads than peers: each peer its own share.
        let s = share_out(&[5, 6, 5, 6], 4).unwrap();
        assert_ne!(s[0], s[1]);
        assert_eq!(s[0], s[2]);
        assert_eq!(s[1], s[3]);
    }
}

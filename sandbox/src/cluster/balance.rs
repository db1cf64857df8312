//! Which endpoint a Service's connection or flow goes to: round robin over the ready
//! endpoints, with client-IP affinity when the Service asks for it (kube-proxy's choice).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Affinity entries kept before expired ones are swept.
const MAX_STICKY: usize = 4096;

/// Where a forwarding listener sends traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Endpoint addresses (pod IP and target port), sorted.
    pub backends: Vec<SocketAddr>,
    /// Client-IP affinity timeout, when the Service asks for it.
    pub affinity: Option<Duration>,
}

/// Endpoint choice: round robin, with client-IP affinity when the target asks for it.
#[derive(Debug, Default)]
pub struct Balancer {
    turn: usize,
    sticky: HashMap<IpAddr, (SocketAddr, Instant)>,
}

impl Balancer {
    /// The endpoint for a new connection or flow of `client` at `now`, not one of `exclude`.
    pub fn pick(
        &mut self,
        client: IpAddr,
        target: &Target,
        exclude: &[SocketAddr],
        now: Instant,
    ) -> Option<SocketAddr> {
        let candidates: Vec<SocketAddr> = target
            .backends
            .iter()
            .filter(|b| !exclude.contains(b))
            .copied()
            .collect();
        if candidates.is_empty() {
            return None;
        }
        if let Some(timeout) = target.affinity
            && let Some((backend, last)) = self.sticky.get_mut(&client)
            && now.saturating_duration_since(*last) <= timeout
            && candidates.contains(backend)
        {
            *last = now;
            return Some(*backend);
        }
        let backend = candidates[self.turn % candidates.len()];
        self.turn = self.turn.wrapping_add(1);
        if let Some(timeout) = target.affinity {
            if self.sticky.len() >= MAX_STICKY {
                self.sticky
                    .retain(|_, (_, last)| now.saturating_duration_since(*last) <= timeout);
            }
            self.sticky.insert(client, (backend, now));
        }
        Some(backend)
    }
}

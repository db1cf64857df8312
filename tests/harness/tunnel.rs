//! A WireGuard tunnel of a test peer through the sandbox's gateway: one `onetun`
//! forwarding a local port to an HTTP Service's ClusterIP, and probes that tell whether
//! requests get through (answered by a pod) or are cut off.
//!
//! onetun 0.3.10 supports one TCP forward per process, so each tunnel is its own onetun.

use std::time::{Duration, Instant};

use crate::sandbox::{WgPeer, curl_local, free_port};
use crate::{Process, poll_until_blocking};

/// Requests through a working tunnel answer in milliseconds; a cut-off one gets nothing.
pub const PROBE_TIMEOUT_S: f64 = 1.0;

/// What the `api` Deployment's pods answer (`User::http_service("api")`).
const API_ANSWER: &str = "pod=api-";

/// A running onetun forwarding a local port to the `api` Service.
pub struct Tunnel {
    pub port: u16,
    pub onetun: Process,
}

impl Tunnel {
    /// A tunnel to the `api` Service at `api_ip`, port 80.
    pub fn open(peer: &WgPeer, api_ip: &str) -> Tunnel {
        Tunnel::open_with_psk(peer, api_ip, None)
    }

    /// [`Tunnel::open`] with the peer's preshared key (the `PresharedKey` of its config).
    pub fn open_with_psk(peer: &WgPeer, api_ip: &str, psk: Option<&str>) -> Tunnel {
        let port = free_port();
        let mut cmd = peer.onetun_command(port, &format!("{api_ip}:80:TCP"));
        if let Some(psk) = psk {
            cmd.env("ONETUN_PRESHARED_KEY", psk);
        }
        Tunnel {
            port,
            onetun: Process::spawn_command(cmd).expect("onetun starts"),
        }
    }

    /// One request through the tunnel that an api pod answered.
    pub fn answers(&self) -> bool {
        let (ok, body) = curl_local(self.port, PROBE_TIMEOUT_S);
        ok && body.contains(API_ANSWER)
    }

    /// Wait (at most `timeout`) until a request gets through; returns how long it took.
    pub fn wait_answers(&self, timeout: Duration, what: &str) -> Duration {
        let start = Instant::now();
        poll_until_blocking(timeout, || {
            let (ok, body) = curl_local(self.port, 3.0);
            (ok && body.contains(API_ANSWER)).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "{what}: no answer through the tunnel within {timeout:?}\n{}",
                self.onetun.output_tails()
            )
        });
        start.elapsed()
    }

    /// Probe until a request gets nothing (at most `timeout`); returns when, after
    /// `since`, the first failing request started.
    pub fn wait_cut_off(&self, since: Instant, timeout: Duration, what: &str) -> Duration {
        loop {
            let probe = Instant::now();
            if !self.answers() {
                return probe - since;
            }
            assert!(
                since.elapsed() < timeout,
                "{what}: the tunnel still answers {:?} later\n{}",
                since.elapsed(),
                self.onetun.output_tails()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `count` requests over about `count` seconds, none of which gets through.
    pub fn stays_cut_off(&self, count: usize, what: &str) {
        for i in 0..count {
            let (ok, body) = curl_local(self.port, PROBE_TIMEOUT_S);
            assert!(
                !(ok && body.contains("pod=")),
                "{what}: request {i} got through: {body}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

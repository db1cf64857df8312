//! Health checks: the threshold state machine (pure) and the probes (the task that runs
//! one backend's checks is the rule's, [`super::rule`]).

use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{HealthState, Probe};

/// The health of one (rule, backend) as successive check results move it.
///
/// `Unknown` (nothing decided yet) is in rotation, like `Healthy`. A first success makes it
/// `Healthy`; `unhealthy_threshold` failures in a row make `Unknown` or `Healthy` go
/// `Unhealthy`; `healthy_threshold` successes in a row bring `Unhealthy` back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HealthTracker {
    state: HealthState,
    successes: u32,
    failures: u32,
}

impl Default for HealthTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl HealthTracker {
    pub(crate) fn new() -> Self {
        Self {
            state: HealthState::Unknown,
            successes: 0,
            failures: 0,
        }
    }

    pub(crate) fn state(&self) -> HealthState {
        self.state
    }

    /// May get new connections.
    pub(crate) fn in_rotation(&self) -> bool {
        self.state != HealthState::Unhealthy
    }

    /// Records one check result and returns the state after it.
    pub(crate) fn record(&mut self, success: bool, healthy_threshold: u32, unhealthy_threshold: u32) -> HealthState {
        if success {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            let promote = match self.state {
                HealthState::Unknown => true,
                HealthState::Unhealthy => self.successes >= healthy_threshold.max(1),
                HealthState::Healthy => false,
            };
            if promote {
                self.state = HealthState::Healthy;
                self.successes = 0;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if self.state != HealthState::Unhealthy && self.failures >= unhealthy_threshold.max(1) {
                self.state = HealthState::Unhealthy;
                self.failures = 0;
            }
        }
        self.state
    }

    /// The VM is stopped: out of rotation at once, and back only after `healthy_threshold`
    /// successful checks once it runs again.
    pub(crate) fn mark_down(&mut self) {
        *self = Self {
            state: HealthState::Unhealthy,
            successes: 0,
            failures: 0,
        };
    }
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK`), if `line` is one.
pub(crate) fn parse_status_line(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (_minor, rest) = rest.split_first()?;
    let rest = rest.strip_prefix(b" ")?;
    let code = rest.get(..3)?;
    if !code.iter().all(u8::is_ascii_digit) || rest.get(3).is_some_and(|b| *b != b' ' && *b != b'\r') {
        return None;
    }
    code.iter()
        .try_fold(0u16, |acc, d| Some(acc * 10 + u16::from(d - b'0')))
}

/// Runs one probe against the backend at `ip` (no timeout here: the caller bounds it).
pub(crate) async fn probe(probe: &Probe, ip: IpAddr) -> io::Result<()> {
    match probe {
        Probe::Tcp { port } => {
            let stream = TcpStream::connect(SocketAddr::new(ip, *port)).await?;
            // Reset rather than close: checks every few seconds must not pile up TIME_WAITs.
            let _ = stream.set_zero_linger();
            Ok(())
        }
        Probe::Http { port, path } => {
            let addr = SocketAddr::new(ip, *port);
            let mut stream = TcpStream::connect(addr).await?;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: cloudraya-lb-health\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).await?;
            let mut buf = [0u8; 512];
            let mut len = 0;
            loop {
                if let Some(end) = buf[..len].windows(2).position(|w| w == b"\r\n") {
                    return match parse_status_line(&buf[..end]) {
                        Some(code) if (200..300).contains(&code) => Ok(()),
                        Some(code) => Err(io::Error::other(format!("HTTP status {code}"))),
                        None => Err(io::Error::other("not an HTTP/1.x status line")),
                    };
                }
                if len == buf.len() {
                    return Err(io::Error::other("status line too long"));
                }
                let n = stream.read(&mut buf[len..]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "closed before the status line",
                    ));
                }
                len += n;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_is_in_rotation_and_first_success_makes_healthy() {
        let mut t = HealthTracker::new();
        assert_eq!(t.state(), HealthState::Unknown);
        assert!(t.in_rotation());
        assert_eq!(t.record(true, 3, 3), HealthState::Healthy);
    }

    #[test]
    fn unknown_goes_unhealthy_after_threshold_failures() {
        let mut t = HealthTracker::new();
        assert_eq!(t.record(false, 2, 3), HealthState::Unknown);
        assert_eq!(t.record(false, 2, 3), HealthState::Unknown);
        assert!(t.in_rotation());
        assert_eq!(t.record(false, 2, 3), HealthState::Unhealthy);
        assert!(!t.in_rotation());
    }

    #[test]
    fn failures_must_be_in_a_row() {
        let mut t = HealthTracker::new();
        t.record(true, 2, 2);
        assert_eq!(t.record(false, 2, 2), HealthState::Healthy);
        assert_eq!(t.record(true, 2, 2), HealthState::Healthy);
        assert_eq!(t.record(false, 2, 2), HealthState::Healthy);
        assert_eq!(t.record(false, 2, 2), HealthState::Unhealthy);
    }

    #[test]
    fn recovery_needs_healthy_threshold_successes_in_a_row() {
        let mut t = HealthTracker::new();
        t.record(false, 3, 1);
        assert_eq!(t.state(), HealthState::Unhealthy);
        assert_eq!(t.record(true, 3, 1), HealthState::Unhealthy);
        assert_eq!(t.record(true, 3, 1), HealthState::Unhealthy);
        assert_eq!(t.record(false, 3, 1), HealthState::Unhealthy);
        assert_eq!(t.record(true, 3, 1), HealthState::Unhealthy);
        assert_eq!(t.record(true, 3, 1), HealthState::Unhealthy);
        assert_eq!(t.record(true, 3, 1), HealthState::Healthy);
        assert!(t.in_rotation());
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut t = HealthTracker::new();
        assert_eq!(t.record(false, 0, 0), HealthState::Unhealthy);
        assert_eq!(t.record(true, 0, 0), HealthState::Healthy);
    }

    #[test]
    fn mark_down_is_immediate_and_recovery_needs_threshold() {
        let mut t = HealthTracker::new();
        t.record(true, 2, 3);
        t.mark_down();
        assert_eq!(t.state(), HealthState::Unhealthy);
        assert!(!t.in_rotation());
        assert_eq!(t.record(true, 2, 3), HealthState::Unhealthy);
        assert_eq!(t.record(true, 2, 3), HealthState::Healthy);
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 204"), Some(204));
        assert_eq!(parse_status_line(b"HTTP/1.1 503 Service Unavailable"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/2 200"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 20"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 2000 OK"), None);
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(parse_status_line(b""), None);
    }
}

//! Probes of what the tests expose, with the real clients where there is one: `curl` for
//! HTTP, `dig` for DNS, a UDP socket for echo, and a bounded HTTP/1.0 GET for metrics.
//!
//! The sandbox's pods answer HTTP with `pod=NAME namespace=NS node=NODE`
//! ([`answered_by`] reads the name out).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::poll_until_blocking;
use crate::sandbox::curl_local;

/// `curl -s --max-time 2 URL`: the body, or `None` when it fails.
pub fn curl(url: &str) -> Option<String> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "2", url])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The pod name out of a responder's answer `pod=NAME namespace=NS node=NODE`.
pub fn answered_by(body: &str) -> Option<String> {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("pod="))
        .map(String::from)
}

/// Which pods answered `n` requests to `url`; every request must be answered.
pub fn pods_answering(url: &str, n: usize) -> Result<BTreeSet<String>> {
    let mut seen = BTreeSet::new();
    for i in 0..n {
        let body = curl(url).with_context(|| format!("request {i} to {url} failed"))?;
        seen.insert(answered_by(&body).with_context(|| format!("unexpected answer {body:?}"))?);
    }
    Ok(seen)
}

/// Waits (at most `within`) until a round of `n` requests to `url` is all answered and
/// the set of pods that answered passes `settled`; returns that set. A proxy follows
/// EndpointSlices through its own watch, a moment after the API shows the change (as
/// kube-proxy does), so traffic is checked by rounds, not by one look.
pub fn wait_pods_answering(
    url: &str,
    n: usize,
    within: Duration,
    settled: impl Fn(&BTreeSet<String>) -> bool,
) -> Result<BTreeSet<String>> {
    let mut last = Err(anyhow::anyhow!("no round of requests finished"));
    let got = poll_until_blocking(within, || {
        last = pods_answering(url, n);
        last.as_ref().ok().filter(|seen| settled(seen)).cloned()
    });
    match (got, last) {
        (Some(seen), _) => Ok(seen),
        (None, Ok(seen)) => bail!("{url}: after {within:?} the last {n} requests were answered by {seen:?}"),
        (None, Err(e)) => Err(e.context(format!("{url}: not settled after {within:?}"))),
    }
}

/// Waits (at most 15 s) until a pod answers `url` (a load balancer's data plane may still
/// be applying its rules); returns the pod's name.
pub fn wait_answering(url: &str) -> Result<String> {
    poll_until_blocking(Duration::from_secs(15), || curl(url).and_then(|b| answered_by(&b)))
        .with_context(|| format!("{url} answers"))
}

/// Waits (at most 20 s) until `url` answers no more (a load balancer's rule removed or
/// restricted, its backends gone).
pub fn wait_silent(url: &str) -> Result<()> {
    poll_until_blocking(Duration::from_secs(20), || curl(url).is_none().then_some(()))
        .with_context(|| format!("{url} stops answering"))
}

/// Sends `payload` to `addr` over UDP, up to `tries` times 500 ms apart, and returns the
/// first answer.
pub fn udp_roundtrip(addr: &str, payload: &[u8], tries: usize) -> Result<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    for _ in 0..tries {
        socket.send_to(payload, addr)?;
        let mut buf = [0u8; 1500];
        if let Ok((n, _)) = socket.recv_from(&mut buf) {
            return Ok(buf[..n].to_vec());
        }
    }
    bail!("no UDP answer from {addr}")
}

/// Five requests to `http://127.0.0.1:PORT/` (3 s each, 300 ms apart, at most 6 s in all),
/// none of which may get an answer for which `answered` holds: a port forward to a
/// Service the peer must not reach.
pub fn assert_never_answers(port: u16, answered: impl Fn(&str) -> bool) {
    let started = Instant::now();
    let mut attempts = 0;
    while started.elapsed() < Duration::from_secs(6) && attempts < 5 {
        attempts += 1;
        let (ok, body) = curl_local(port, 3.0);
        assert!(!(ok && answered(&body)), "a denied Service answered: {body}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// `dig +time=2 +tries=1 -p PORT @127.0.0.1 NAME A`: what it printed.
pub fn dig(port: u16, name: &str) -> String {
    let out = Command::new("dig")
        .args(["+time=2", "+tries=1", "-p", &port.to_string(), "@127.0.0.1", name, "A"])
        .output()
        .expect("dig is installed (apt package dnsutils)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A minimal HTTP/1.0 GET of `path` on `addr` (`host:port`, e.g. a metrics endpoint),
/// bounded by 2 s timeouts: the whole response, or empty when it fails.
pub fn http_get(addr: &str, path: &str) -> String {
    http_get_within(addr, path, Duration::from_secs(2))
}

/// [`http_get`] with `read_timeout` for each read (a loaded gateway's large `/metrics`).
pub fn http_get_within(addr: &str, path: &str, read_timeout: Duration) -> String {
    let Ok(addr) = addr.parse() else {
        return String::new();
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(read_timeout));
    let _ = write!(s, "GET {path} HTTP/1.0\r\nhost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The value of the Prometheus sample `name` (the whole series name, labels included,
/// as in `x_total{result="success"}`) in a metrics text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_name_and_metric_values_are_read_out() {
        assert_eq!(
            answered_by("pod=web-1 namespace=default node=w2").as_deref(),
            Some("web-1")
        );
        assert_eq!(answered_by("hello"), None);
        let text = "# HELP x\nx_total{result=\"success\"} 3\nx_total 7\nx_totally 9\n";
        assert_eq!(metric_value(text, "x_total"), Some(7.0));
        assert_eq!(metric_value(text, "x_total{result=\"success\"}"), Some(3.0));
        assert_eq!(metric_value(text, "y"), None);
    }
}

//! Forwarding over real sockets on loopback. Every test uses its own addresses: backends
//! in 127.10.150-159.x, public addresses in 127.203.150-159.x, clients in 127.55-77.x.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::*;

const T: Duration = Duration::from_secs(5);
const BACKEND_PORT: u16 = 9000;
const HEALTH_PORT: u16 = 9100;

fn ip(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

fn fast_check(port: u16) -> HealthCheck {
    HealthCheck {
        probe: Probe::Tcp { port },
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(100),
        healthy_threshold: 2,
        unhealthy_threshold: 2,
    }
}

fn backend(vm_id: &str, private_ip: IpAddr) -> Backend {
    Backend {
        vm_id: vm_id.to_owned(),
        private_ip,
        private_ipv6: None,
        running: true,
    }
}

fn rule(protocol: Protocol, listen: SocketAddr, algorithm: Algorithm, backends: Vec<Backend>) -> Listener {
    Listener {
        rule: "r".to_owned(),
        protocol,
        listen: vec![listen],
        private_port: BACKEND_PORT,
        algorithm,
        allowed_sources: Vec::new(),
        health_check: fast_check(BACKEND_PORT),
        check_ipv6: false,
        backends,
    }
}

/// A TCP backend: says its name on a line, echoes until EOF, then says "bye" and closes.
struct TcpBackend {
    task: JoinHandle<()>,
}

impl TcpBackend {
    async fn start(addr: SocketAddr, name: &'static str) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind test backend");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    if stream.write_all(format!("{name}\n").as_bytes()).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) => {
                                let _ = stream.write_all(b"bye\n").await;
                                return;
                            }
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                });
            }
        });
        Self { task }
    }

    /// Stops listening (the port is closed when this returns).
    async fn stop(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for TcpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_line(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = stream.read(&mut byte).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if byte[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte[0]);
    }
}

/// Connects (from `from` if given) and reads the backend's name.
async fn connect_from(listen: SocketAddr, from: Option<IpAddr>) -> std::io::Result<(TcpStream, String)> {
    timeout(T, async {
        let socket = if listen.is_ipv6() {
            TcpSocket::new_v6()?
        } else {
            TcpSocket::new_v4()?
        };
        if let Some(from) = from {
            socket.bind(sa(from, 0))?;
        }
        let mut stream = socket.connect(listen).await?;
        let name = read_line(&mut stream).await?;
        Ok((stream, name))
    })
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn identify(listen: SocketAddr) -> String {
    connect_from(listen, None).await.expect("connection through the LB").1
}

async fn tally(listen: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        *counts.entry(identify(listen).await).or_default() += 1;
    }
    counts
}

/// True when the connection is refused: reset or closed without a byte.
async fn refused(listen: SocketAddr, from: Option<IpAddr>) -> bool {
    matches!(
        connect_from(listen, from).await,
        Err(e) if e.kind() != std::io::ErrorKind::TimedOut
    )
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn state_of(fwd: &Forwarder, lb: &str, vm: &str) -> Option<HealthState> {
    fwd.health(lb).into_iter().find(|(_, v, _)| v == vm).map(|(_, _, s)| s)
}

fn open_of(fwd: &Forwarder, lb: &str, vm: &str) -> usize {
    fwd.open_connections(lb)
        .into_iter()
        .filter(|(_, v, _)| v == vm)
        .map(|(_, _, n)| n)
        .sum()
}

#[test]
fn source_filter() {
    let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "192.0.2.7/32".parse().unwrap()];
    assert!(source_allowed(&[], "203.0.113.1".parse().unwrap()));
    assert!(source_allowed(&nets, "10.1.2.3".parse().unwrap()));
    assert!(source_allowed(&nets, "192.0.2.7".parse().unwrap()));
    assert!(!source_allowed(&nets, "192.0.2.8".parse().unwrap()));
    assert!(source_allowed(&nets, "::ffff:10.9.9.9".parse().unwrap()));
    assert!(!source_allowed(&nets, "2001:db8::1".parse().unwrap()));
}

#[tokio::test]
async fn tcp_round_robin_splits_evenly() {
    let (b1, b2, public) = (ip(10, 150, 11), ip(10, 150, 12), ip(203, 150, 10));
    let _s1 = TcpBackend::start(sa(b1, BACKEND_PORT), "b1").await;
    let _s2 = TcpBackend::start(sa(b2, BACKEND_PORT), "b2").await;
    let fwd = Forwarder::new();
    let listen = sa(public, 8080);
    let backends = vec![backend("vm-1", b1), backend("vm-2", b2)];
    fwd.apply_lb(
        "lb-rr",
        vec![rule(Protocol::Tcp, listen, Algorithm::RoundRobin, backends)],
    )
    .await
    .unwrap();
    let counts = tally(listen, 100).await;
    assert_eq!(counts.get("b1"), Some(&50), "{counts:?}");
    assert_eq!(counts.get("b2"), Some(&50), "{counts:?}");
    fwd.shutdown().await;
}

#[tokio::test]
async fn tcp_source_is_sticky() {
    let (b1, b2, public) = (ip(10, 151, 11), ip(10, 151, 12), ip(203, 151, 10));
    let _s1 = TcpBackend::start(sa(b1, BACKEND_PORT), "b1").await;
    let _s2 = TcpBackend::start(sa(b2, BACKEND_PORT), "b2").await;
    let fwd = Forwarder::new();
    let listen = sa(public, 8080);
    let backends = vec![backend("vm-1", b1), backend("vm-2", b2)];
    fwd.apply_lb("lb-src", vec![rule(Protocol::Tcp, listen, Algorithm::Source, backends)])
        .await
        .unwrap();
    let mut used = HashMap::new();
    for client in 1..=20u8 {
        let from = ip(55, 151, client);
        let first = connect_from(listen, Some(from)).await.unwrap().1;
        for _ in 0..4 {
            assert_eq!(connect_from(listen, Some(from)).await.unwrap().1, first);
        }
        *used.entry(first).or_insert(0) += 1;
    }
    assert_eq!(used.len(), 2, "20 clients all on one backend: {used:?}");
    fwd.shutdown().await;
}

#[tokio::test]
async fn tcp_least_connection_prefers_the_idle_backend() {
    let (b1, b2, public) = (ip(10, 152, 11), ip(10, 152, 12), ip(203, 152, 10));
    let _s1 = TcpBackend::start(sa(b1, BACKEND_PORT), "b1").await;
    let _s2 = TcpBackend::start(sa(b2, BACKEND_PORT), "b2").await;
    let fwd = Forwarder::new();
    let listen = sa(public, 8080);
    let backends = vec![backend("vm-1", b1), backend("vm-2", b2)];
    fwd.apply_lb(
        "lb-lc",
        vec![rule(Protocol::Tcp, listen, Algorithm::LeastConnection, backends)],
    )
    .await
    .unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from(listen, None).await.unwrap());
    }
    let on_b1 = held.iter().filter(|(_, n)| n == "b1").count();
    assert_eq!(on_b1, 2, "4 concurrent connections not split 2/2");
    assert_eq!(open_of(&fwd, "lb-lc", "vm-1"), 2);
    // Close b1's two: new connections go there until it catches up.
    held.retain(|(_, n)| n != "b1");
    wait_for("b1's connections to close", || open_of(&fwd, "lb-lc", "vm-1") == 0).await;
    for _ in 0..2 {
        let conn = connect_from(listen, None).await.unwrap();
        assert_eq!(conn.1, "b1");
        held.push(conn);
    }
    let next = connect_from(listen, None).await.unwrap();
    held.push(next);
    assert_eq!(open_of(&fwd, "lb-lc", "vm-1") + open_of(&fwd, "lb-lc", "vm-2"), 5);
    fwd.shutdown().await;
}

#[tokio::test]
async fn tcp_allowed_sources_and_no_backend_refuse() {
    let (b1, public) = (ip(10, 153, 11), ip(203, 153, 10));
    let _s1 = TcpBackend::start(sa(b1, BACKEND_PORT), "b1").await;
    let fwd = Forwarder::new();
    let listen = sa(public, 8080);
    let mut filtered = rule(Protocol::Tcp, listen, Algorithm::RoundRobin, vec![backend("vm-1", b1)]);
    filtered.allowed_sources = vec!["127.66.0.0/16".parse().unwrap()];
    let empty_listen = sa(public, 8081);
    let mut empty = rule(Protocol::Tcp, empty_listen, Algorithm::RoundRobin, Vec::new());
    empty.rule = "empty".to_owned();
    fwd.apply_lb("lb-acl", vec![filtered, empty]).await.unwrap();

    let (_, name) = connect_from(listen, Some(ip(66, 153, 5))).await.unwrap();
    assert_eq!(name, "b1");
    assert!(refused(listen, Some(ip(77, 153, 1))).await);
    assert!(refused(listen, None).await);
    assert!(refused(empty_listen, None).await);
    fwd.shutdown().await;
}

#[tokio::test]
async fn tcp_half_close_passes_through() {
    let (b1, public) = (ip(10, 154, 11), ip(203, 154, 10));
    let _s1 = TcpBackend::start(sa(b1, BACKEND_PORT), "b1").await;
    let fwd = Forwarder::new();
    let listen = sa(public, 8080);
    fwd.apply_lb(
        "lb-hc",
        vec![rule(
            Protocol::Tcp,
            listen,
            Algorithm::RoundRobin,
            vec![backend("vm-1", b1)],
        )],
    )
    .await
    .unwrap();
    let (mut stream, name) = connect_from(listen, None).await.unwrap();
    assert_eq!(name, "b1");
    timeout(T, async {
        stream.write_all(b"hello\n").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut rest = String::new();
        stream.read_to_string(&mut rest).await.unwrap();
        // "bye" is only sent once the backend has seen our FIN.
        assert_eq!(rest, "hello\nbye\n");
    })
    .await
    .expect("half-closed exchange");
    fwd.shutdown().await;
}

#[tokio::test]
async fn tcp_stopped_vm_is_out_at_once_and_back_after_checks() {
    let (b1, b2, public) = (ip(10, 155, 11), ip(10, 155, 12), ip(203, 155, 10));
    let _s1 = TcpBackend::start(sa(b1, BACKEND_PORT), "b1").await;
    let _s2 = TcpBackend::start(sa(b2, BACKEND_PORT), "b2").await;
    let fwd = Forwarder::new();
    let listen = sa(public, 8080);
    let mut stopped = backend("vm-1", b1);
    stopped.running = false;
    let listener = rule(
        Protocol::Tcp,
        listen,
        Algorithm::RoundRobin,
        vec![stopped, backend("vm-2", b2)],
    );
    fwd.apply_lb("lb-stop", vec![listener.clone()]).await.unwrap();
    assert_eq!(state_of(&fwd, "lb-stop", "vm-1"), Some(HealthState::Unhealthy));
    assert_eq!(tally(listen, 20).await.get("b2"), Some(&20));

    let mut started = listener;
    started.backends[0].running = true;
    fwd.apply_lb("lb-stop", vec![started]).await.unwrap();
    wait_for("vm-1 healthy again", || {
        state_of(&fwd, "lb-stop", "vm-1") == Some(HealthState::Healthy)
    })
    .await;
    let counts = tally(listen, 20).await;
    assert_eq!(counts.get("b1"), Some(&10), "{counts:?}");
    fwd.shutdown().await;
}

#[tokio::test]
async fn tcp_dead_backend_leaves_after_unhealthy_threshold() {
    let (b1, b2, public) = (ip(10, 156, 11), ip(10, 156, 12), ip(203, 156, 10));
    let s1 = TcpBackend::start(sa(b1, BACKEND_PORT), "b1").await;
    let _s2 = TcpBackend::start(sa(b2, BACKEND_PORT), "b2").await;
    let fwd = Forwarder::new();
    let listen = sa(public, 8080);
    let backends = vec![backend("vm-1", b1), backend("vm-2", b2)];
    fwd.apply_lb(
        "lb-dead",
        vec![rule(Protocol::Tcp, listen, Algorithm::RoundRobin, backends)],
    )
    .await
    .unwrap();
    wait_for("both healthy", || {
        fwd.health("lb-dead").iter().all(|(_, _, s)| *s == HealthState::Healthy)
    })
    .await;
    s1.stop().await;
    // Until the checks notice, a failed connect is retried on the next backend.
    assert_eq!(tally(listen, 10).await.get("b2"), Some(&10));
    wait_for("vm-1 unhealthy", || {
        state_of(&fwd, "lb-dead", "vm-1") == Some(HealthState::Unhealthy)
    })
    .await;
    assert_eq!(state_of(&fwd, "lb-dead", "vm-2"), Some(HealthState::Healthy));
    assert_eq!(tally(listen, 20).await.get("b2"), Some(&20));

    let _s1 = TcpBackend::start(sa(b1, BACKEND_PORT), "b1").await;
    wait_for("vm-1 healthy again", || {
        state_of(&fwd, "lb-dead", "vm-1") == Some(HealthState::Healthy)
    })
    .await;
    assert_eq!(tally(listen, 20).await.get("b1"), Some(&10));
    fwd.shutdown().await;
}

/// An HTTP health endpoint: 200 on `/healthz`, 503 elsewhere.
async fn http_health_server(addr: SocketAddr) -> JoinHandle<()> {
    let listener = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1024];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") && len < buf.len() {
                    match stream.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                }
                let status = if buf.starts_with(b"GET /healthz HTTP/1.1\r\n") {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let _ = stream
                    .write_all(
                        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
                    )
                    .await;
            });
        }
    })
}

#[tokio::test]
async fn http_probe_wants_2xx() {
    let b = ip(10, 157, 21);
    let server = http_health_server(sa(b, HEALTH_PORT)).await;
    let ok = Probe::Http {
        port: HEALTH_PORT,
        path: "/healthz".to_owned(),
    };
    let bad = Probe::Http {
        port: HEALTH_PORT,
        path: "/nope".to_owned(),
    };
    let closed = Probe::Http {
        port: HEALTH_PORT + 1,
        path: "/healthz".to_owned(),
    };
    assert!(timeout(T, health::probe(&ok, b)).await.unwrap().is_ok());
    assert!(timeout(T, health::probe(&bad, b)).await.unwrap().is_err());
    assert!(timeout(T, health::probe(&closed, b)).await.unwrap().is_err());
    assert!(
        timeout(T, health::probe(&Probe::Tcp { port: HEALTH_PORT }, b))
            .await
            .unwrap()
            .is_ok()
    );
    server.abort();
}

#[tokio::test]
async fn tcp_http_health_check_excludes_failing_backend() {
    let (b1, b2, public) = (ip(10, 157, 11), ip(10, 157, 12), ip(203, 157, 10));
    let _s1 = TcpBackend::start(sa(b1, BACKEND_PORT), "b1").await;
    let _s2 = TcpBackend::start(sa(b2, BACKEND_PORT), "b2").await;
    // Only b2 has a health endpoint.
    let h2 = http_health_server(sa(b2, HEALTH_PORT)).await;
    let fwd = Forwarder::new();
    let listen = sa(public, 8080);
    let mut listener = rule(
        Protocol::Tcp,
        listen,
        Algorithm::RoundRobin,
        vec![backend("vm-1", b1), backend("vm-2", b2)],
    );
    listener.health_check.probe = Probe::Http {
        port: HEALTH_PORT,
        path: "/healthz".to_owned(),
    };
    fwd.apply_lb("lb-http", vec![listener]).await.unwrap();
    wait_for("vm-1 unhealthy", || {
        state_of(&fwd, "lb-http", "vm-1") == Some(HealthState::Unhealthy)
    })
    .await;
    assert_eq!(state_of(&fwd, "lb-http", "vm-2"), Some(HealthState::Healthy));
    assert_eq!(tally(listen, 10).await.get("b2"), Some(&10));
    fwd.shutdown().await;
    h2.abort();
}

#[tokio::test]
async fn apply_update_keeps_open_connections_and_health() {
    let (b1, b2, public) = (ip(10, 158, 11), ip(10, 158, 12), ip(203, 158, 10));
    let _s1 = TcpBackend::start(sa(b1, BACKEND_PORT), "b1").await;
    let _s2 = TcpBackend::start(sa(b2, BACKEND_PORT), "b2").await;
    let fwd = Forwarder::new();
    let listen = sa(public, 8080);
    let listener = rule(
        Protocol::Tcp,
        listen,
        Algorithm::RoundRobin,
        vec![backend("vm-1", b1), backend("vm-2", b2)],
    );
    fwd.apply_lb("lb-upd", vec![listener.clone()]).await.unwrap();
    wait_for("both healthy", || {
        fwd.health("lb-upd").iter().all(|(_, _, s)| *s == HealthState::Healthy)
    })
    .await;
    let (mut open, name) = connect_from(listen, None).await.unwrap();
    assert_eq!(name, "b1");

    // vm-1 leaves, algorithm and rule name change: same socket, same connection.
    let mut changed = listener;
    changed.rule = "renamed".to_owned();
    changed.algorithm = Algorithm::LeastConnection;
    changed.backends.remove(0);
    fwd.apply_lb("lb-upd", vec![changed]).await.unwrap();
    assert_eq!(
        fwd.health("lb-upd"),
        vec![("renamed".to_owned(), "vm-2".to_owned(), HealthState::Healthy)]
    );
    timeout(T, async {
        open.write_all(b"still there\n").await.unwrap();
        assert_eq!(read_line(&mut open).await.unwrap(), "still there");
    })
    .await
    .expect("open connection survives the update");
    assert_eq!(tally(listen, 10).await.get("b2"), Some(&10));
    fwd.shutdown().await;
}

#[tokio::test]
async fn remove_lb_frees_ports_and_cuts_connections() {
    let (b1, public) = (ip(10, 159, 11), ip(203, 159, 10));
    let _s1 = TcpBackend::start(sa(b1, BACKEND_PORT), "b1").await;
    let fwd = Forwarder::new();
    let tcp_listen = sa(public, 8080);
    let udp_listen = sa(public, 5353);
    fwd.apply_lb(
        "lb-rm",
        vec![
            rule(
                Protocol::Tcp,
                tcp_listen,
                Algorithm::RoundRobin,
                vec![backend("vm-1", b1)],
            ),
            rule(
                Protocol::Udp,
                udp_listen,
                Algorithm::RoundRobin,
                vec![backend("vm-1", b1)],
            ),
        ],
    )
    .await
    .unwrap();
    let (mut open, _) = connect_from(tcp_listen, None).await.unwrap();
    assert_eq!(fwd.health("lb-rm").len(), 2);
    timeout(T, fwd.remove_lb("lb-rm")).await.unwrap();
    assert!(fwd.health("lb-rm").is_empty());
    let mut buf = [0u8; 16];
    let cut = timeout(T, open.read(&mut buf)).await.expect("cut connection ends");
    assert!(matches!(cut, Ok(0) | Err(_)));
    drop(TcpListener::bind(tcp_listen).await.expect("TCP port free again"));
    drop(UdpSocket::bind(udp_listen).await.expect("UDP port free again"));
    // And the LB can come back on the same ports.
    fwd.apply_lb(
        "lb-rm",
        vec![rule(
            Protocol::Tcp,
            tcp_listen,
            Algorithm::RoundRobin,
            vec![backend("vm-1", b1)],
        )],
    )
    .await
    .unwrap();
    assert_eq!(identify(tcp_listen).await, "b1");
    timeout(T, fwd.shutdown()).await.unwrap();
    drop(
        TcpListener::bind(tcp_listen)
            .await
            .expect("TCP port free after shutdown"),
    );
}

#[tokio::test]
async fn bind_error_keeps_the_other_listeners() {
    let (b1, public) = (ip(10, 159, 21), ip(203, 159, 20));
    let _s1 = TcpBackend::start(sa(b1, BACKEND_PORT), "b1").await;
    let blocker = TcpListener::bind(sa(public, 8080)).await.unwrap();
    let fwd = Forwarder::new();
    let taken = rule(
        Protocol::Tcp,
        sa(public, 8080),
        Algorithm::RoundRobin,
        vec![backend("vm-1", b1)],
    );
    let mut free = rule(
        Protocol::Tcp,
        sa(public, 8081),
        Algorithm::RoundRobin,
        vec![backend("vm-1", b1)],
    );
    free.rule = "free".to_owned();
    let err = fwd
        .apply_lb("lb-bind", vec![taken.clone(), free.clone()])
        .await
        .unwrap_err();
    let ForwardError::Bind { protocol, addr, .. } = err;
    assert_eq!((protocol, addr), (Protocol::Tcp, sa(public, 8080)));
    assert_eq!(identify(sa(public, 8081)).await, "b1");
    drop(blocker);
    fwd.apply_lb("lb-bind", vec![taken, free]).await.unwrap();
    assert_eq!(identify(sa(public, 8080)).await, "b1");
    fwd.shutdown().await;
}

/// A UDP backend answering `name:payload`, with a TCP health port.
struct UdpBackend {
    tasks: Vec<JoinHandle<()>>,
}

impl UdpBackend {
    async fn start(ip: IpAddr, name: &'static str) -> Self {
        let socket = UdpSocket::bind(sa(ip, BACKEND_PORT)).await.unwrap();
        let health = TcpListener::bind(sa(ip, HEALTH_PORT)).await.unwrap();
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let mut reply = format!("{name}:").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                let _ = socket.send_to(&reply, from).await;
            }
        });
        let health = tokio::spawn(async move {
            while let Ok((stream, _)) = health.accept().await {
                drop(stream);
            }
        });
        Self {
            tasks: vec![echo, health],
        }
    }
}

impl Drop for UdpBackend {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn udp_rule(listen: SocketAddr, backends: Vec<Backend>) -> Listener {
    let mut l = rule(Protocol::Udp, listen, Algorithm::RoundRobin, backends);
    l.health_check = fast_check(HEALTH_PORT);
    l
}

/// Sends `payload` from `client` and returns the answering backend's name, checking the
/// reply comes from the public address. `None` when nothing comes back in `wait`.
async fn udp_ask(client: &UdpSocket, listen: SocketAddr, payload: &str, wait: Duration) -> Option<String> {
    client.send_to(payload.as_bytes(), listen).await.unwrap();
    let mut buf = [0u8; 2048];
    let (n, from) = timeout(wait, client.recv_from(&mut buf)).await.ok()?.ok()?;
    assert_eq!(from, listen, "reply not from the public address");
    let reply = std::str::from_utf8(&buf[..n]).unwrap();
    let (name, echoed) = reply.split_once(':').unwrap();
    assert_eq!(echoed, payload);
    Some(name.to_owned())
}

#[tokio::test]
async fn udp_flows_spread_stick_and_reply_from_public_address() {
    let (b1, b2, public) = (ip(10, 159, 31), ip(10, 159, 32), ip(203, 159, 30));
    let _u1 = UdpBackend::start(b1, "b1").await;
    let _u2 = UdpBackend::start(b2, "b2").await;
    let fwd = Forwarder::new();
    let listen = sa(public, 5353);
    fwd.apply_lb(
        "lb-udp",
        vec![udp_rule(listen, vec![backend("vm-1", b1), backend("vm-2", b2)])],
    )
    .await
    .unwrap();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut clients = Vec::new();
    for _ in 0..6 {
        let client = UdpSocket::bind(sa(ip(55, 159, 1), 0)).await.unwrap();
        let name = udp_ask(&client, listen, "ping", T).await.expect("UDP reply");
        *counts.entry(name.clone()).or_default() += 1;
        clients.push((client, name));
    }
    assert_eq!(counts.get("b1"), Some(&3), "{counts:?}");
    assert_eq!(counts.get("b2"), Some(&3), "{counts:?}");
    for (client, name) in &clients {
        for i in 0..3 {
            let got = udp_ask(client, listen, &format!("again {i}"), T).await;
            assert_eq!(got.as_ref(), Some(name), "flow moved");
        }
    }
    assert_eq!(open_of(&fwd, "lb-udp", "vm-1") + open_of(&fwd, "lb-udp", "vm-2"), 6);

    // A client outside allowed_sources is dropped.
    let mut filtered = udp_rule(listen, vec![backend("vm-1", b1), backend("vm-2", b2)]);
    filtered.allowed_sources = vec!["127.55.159.0/24".parse().unwrap()];
    fwd.apply_lb("lb-udp", vec![filtered]).await.unwrap();
    let outsider = UdpSocket::bind(sa(ip(77, 159, 1), 0)).await.unwrap();
    assert_eq!(udp_ask(&outsider, listen, "hi", Duration::from_millis(300)).await, None);
    assert!(udp_ask(&clients[0].0, listen, "hi", T).await.is_some());
    timeout(T, fwd.shutdown()).await.unwrap();
    drop(UdpSocket::bind(listen).await.expect("UDP port free after shutdown"));
}

#[tokio::test]
async fn udp_flows_expire_and_are_bounded() {
    let (b1, b2, public) = (ip(10, 159, 41), ip(10, 159, 42), ip(203, 159, 40));
    let _u1 = UdpBackend::start(b1, "b1").await;
    let _u2 = UdpBackend::start(b2, "b2").await;
    let fwd = Forwarder::with_settings(ForwarderSettings {
        udp_idle_timeout: Duration::from_millis(300),
        max_udp_flows: 2,
        ..ForwarderSettings::default()
    });
    let listen = sa(public, 5353);
    fwd.apply_lb(
        "lb-exp",
        vec![udp_rule(listen, vec![backend("vm-1", b1), backend("vm-2", b2)])],
    )
    .await
    .unwrap();
    let flows = |fwd: &Forwarder| open_of(fwd, "lb-exp", "vm-1") + open_of(fwd, "lb-exp", "vm-2");
    let a = UdpSocket::bind(sa(ip(55, 159, 41), 0)).await.unwrap();
    let b = UdpSocket::bind(sa(ip(55, 159, 42), 0)).await.unwrap();
    let c = UdpSocket::bind(sa(ip(55, 159, 43), 0)).await.unwrap();
    assert_eq!(udp_ask(&a, listen, "1", T).await.as_deref(), Some("b1"));
    assert_eq!(udp_ask(&b, listen, "1", T).await.as_deref(), Some("b2"));
    // The table is full: a third client gets nothing.
    assert_eq!(udp_ask(&c, listen, "1", Duration::from_millis(100)).await, None);
    assert_eq!(flows(&fwd), 2);
    // Traffic keeps a flow alive past the idle timeout (300 ms).
    for _ in 0..6 {
        assert_eq!(udp_ask(&a, listen, "keep", T).await.as_deref(), Some("b1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(open_of(&fwd, "lb-exp", "vm-1"), 1);
    wait_for("idle flows to expire", || flows(&fwd) == 0).await;
    // Room again; a new flow takes the next turn.
    assert_eq!(udp_ask(&c, listen, "2", T).await.as_deref(), Some("b1"));
    assert_eq!(udp_ask(&a, listen, "2", T).await.as_deref(), Some("b2"));
    fwd.shutdown().await;
}

/// The API layer spawns these futures and shares the forwarder between tasks.
#[test]
fn forwarder_futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<Forwarder>();
    let fwd = Forwarder::new();
    is_send(&fwd.apply_lb("lb", Vec::new()));
    is_send(&fwd.remove_lb("lb"));
    is_send(&fwd.shutdown());
}

#[tokio::test]
async fn udp_flow_moves_when_its_backend_leaves_the_rotation() {
    let (b1, b2, public) = (ip(10, 159, 51), ip(10, 159, 52), ip(203, 159, 50));
    let _u1 = UdpBackend::start(b1, "b1").await;
    let _u2 = UdpBackend::start(b2, "b2").await;
    let fwd = Forwarder::new();
    let listen = sa(public, 5353);
    let listener = udp_rule(listen, vec![backend("vm-1", b1), backend("vm-2", b2)]);
    fwd.apply_lb("lb-udp-move", vec![listener.clone()]).await.unwrap();
    let client = UdpSocket::bind(sa(ip(55, 159, 51), 0)).await.unwrap();
    assert_eq!(udp_ask(&client, listen, "x", T).await.as_deref(), Some("b1"));
    // vm-1 stops: UDP has no connection to keep, so the flow moves on its next packet.
    let mut stopped = listener;
    stopped.backends[0].running = false;
    fwd.apply_lb("lb-udp-move", vec![stopped]).await.unwrap();
    for _ in 0..3 {
        assert_eq!(udp_ask(&client, listen, "y", T).await.as_deref(), Some("b2"));
    }
    wait_for("the old flow to close", || open_of(&fwd, "lb-udp-move", "vm-1") == 0).await;
    assert_eq!(open_of(&fwd, "lb-udp-move", "vm-2"), 1);
    fwd.shutdown().await;
}

/// Changes to different LBs run together, to one LB one after the other, `lock_all`
/// waits for every change under way, and no entry outlives its last holder.
#[tokio::test]
async fn keyed_locks_serialise_one_key_only() {
    let locks = KeyedLocks::default();
    let a = locks.lock("lb-a").await;
    // Another key is free while lb-a is held.
    let b = timeout(T, locks.lock("lb-b"))
        .await
        .expect("lb-b is not blocked by lb-a");
    // The same key waits.
    assert!(
        timeout(Duration::from_millis(50), locks.lock("lb-a")).await.is_err(),
        "lb-a taken twice"
    );
    drop(b);
    assert!(
        timeout(Duration::from_millis(50), locks.lock_all()).await.is_err(),
        "lock_all while lb-a is held"
    );
    drop(a);
    assert_eq!(locks.entries(), 0, "entries of released keys are dropped");
    let all = timeout(T, locks.lock_all())
        .await
        .expect("lock_all once nothing is held");
    assert!(
        timeout(Duration::from_millis(50), locks.lock("lb-c")).await.is_err(),
        "a key taken under lock_all"
    );
    drop(all);
    let _c = timeout(T, locks.lock("lb-c")).await.expect("lb-c after lock_all");
}

// ---------------------------------------------------------------------------------------
// Both families. IPv6 on the host's loopback has only ::1, so the IPv6 public address and
// the one IPv6 backend are both ::1, on ports no other test uses; the sandbox's fd00:
// ranges are tried in a network namespace by tests/platform_forwarding.rs.

const V6_LOOPBACK: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// A rule on `v4_public:8080` and `v6_public`, backends on `port`.
fn dual_rule(
    protocol: Protocol,
    v4_public: SocketAddr,
    v6_public: SocketAddr,
    port: u16,
    backends: Vec<Backend>,
) -> Listener {
    let mut l = rule(protocol, v4_public, Algorithm::RoundRobin, backends);
    l.listen.push(v6_public);
    l.private_port = port;
    l.health_check = fast_check(port);
    l
}

#[tokio::test]
async fn tcp_dual_stack_sends_each_family_to_its_backend_address() {
    const PORT: u16 = 19461;
    let (b1, b2, public) = (ip(10, 161, 11), ip(10, 161, 12), ip(203, 161, 10));
    let (v4_public, v6_public) = (sa(public, 8080), sa(V6_LOOPBACK, 19462));
    let _s1 = TcpBackend::start(sa(b1, PORT), "b1").await;
    let _s2 = TcpBackend::start(sa(b2, PORT), "b2").await;
    let _s1v6 = TcpBackend::start(sa(V6_LOOPBACK, PORT), "b1-v6").await;
    let mut vm1 = backend("vm-1", b1);
    vm1.private_ipv6 = Some(Ipv6Addr::LOCALHOST);
    // vm-2 has no private_ipv6: IPv4 traffic only.
    let listener = dual_rule(
        Protocol::Tcp,
        v4_public,
        v6_public,
        PORT,
        vec![vm1, backend("vm-2", b2)],
    );
    let fwd = Forwarder::new();
    fwd.apply_lb("lb-dual", vec![listener.clone()]).await.unwrap();

    let v4 = tally(v4_public, 10).await;
    assert_eq!((v4.get("b1"), v4.get("b2")), (Some(&5), Some(&5)), "{v4:?}");
    let v6 = tally(v6_public, 6).await;
    assert_eq!(v6.get("b1-v6"), Some(&6), "{v6:?}");
    // One health entry per rule and backend, as for an IPv4 LB.
    assert_eq!(fwd.health("lb-dual").len(), 2);

    // Only IPv4 sources listed: IPv6 clients are refused, IPv4 ones are not.
    let mut v4_sources = listener.clone();
    v4_sources.allowed_sources = vec!["127.0.0.0/8".parse().unwrap()];
    fwd.apply_lb("lb-dual", vec![v4_sources.clone()]).await.unwrap();
    assert!(refused(v6_public, None).await);
    assert!(!identify(v4_public).await.is_empty());
    // An IPv6 CIDR lets IPv6 clients in again.
    let mut both = v4_sources.clone();
    both.allowed_sources.push("::1/128".parse().unwrap());
    fwd.apply_lb("lb-dual", vec![both]).await.unwrap();
    assert_eq!(identify(v6_public).await, "b1-v6");
    // Only an IPv6 CIDR: now IPv4 clients are the ones refused.
    let mut v6_sources = listener.clone();
    v6_sources.allowed_sources = vec!["::/0".parse().unwrap()];
    fwd.apply_lb("lb-dual", vec![v6_sources]).await.unwrap();
    assert!(refused(v4_public, None).await);
    assert_eq!(identify(v6_public).await, "b1-v6");

    // The backend with an IPv6 address leaves: IPv6 clients are refused (vm-2 has none),
    // IPv4 clients still get vm-2.
    fwd.apply_lb(
        "lb-dual",
        vec![dual_rule(
            Protocol::Tcp,
            v4_public,
            v6_public,
            PORT,
            vec![backend("vm-2", b2)],
        )],
    )
    .await
    .unwrap();
    assert!(refused(v6_public, None).await);
    assert_eq!(identify(v4_public).await, "b2");

    // Removing the IPv6 address closes only that socket: an open IPv4 connection lives on.
    fwd.apply_lb("lb-dual", vec![listener.clone()]).await.unwrap();
    let (mut open, _) = connect_from(v4_public, None).await.unwrap();
    let mut v4_only = listener.clone();
    v4_only.listen.truncate(1);
    fwd.apply_lb("lb-dual", vec![v4_only]).await.unwrap();
    assert!(refused(v6_public, None).await);
    timeout(T, async {
        open.write_all(b"still here\n").await.unwrap();
        assert_eq!(read_line(&mut open).await.unwrap(), "still here");
    })
    .await
    .expect("the IPv4 connection survives");
    // And adding it back binds it again.
    fwd.apply_lb("lb-dual", vec![listener]).await.unwrap();
    assert_eq!(identify(v6_public).await, "b1-v6");
    fwd.shutdown().await;
}

/// A UDP backend at `addr` answering `name:payload`.
fn udp_echo(socket: UdpSocket, name: &'static str) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let mut reply = format!("{name}:").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = socket.send_to(&reply, from).await;
        }
    })
}

#[tokio::test]
async fn udp_dual_stack_sends_each_family_to_its_backend_address() {
    const PORT: u16 = 19471;
    let (b1, b2, public) = (ip(10, 162, 11), ip(10, 162, 12), ip(203, 162, 10));
    let (v4_public, v6_public) = (sa(public, 5353), sa(V6_LOOPBACK, 19472));
    // TCP health ports on the IPv4 addresses (checks of a dual-stack LB go there).
    let _h1 = TcpBackend::start(sa(b1, PORT), "h1").await;
    let _h2 = TcpBackend::start(sa(b2, PORT), "h2").await;
    let echoes = [
        udp_echo(UdpSocket::bind(sa(b1, PORT)).await.unwrap(), "b1"),
        udp_echo(UdpSocket::bind(sa(b2, PORT)).await.unwrap(), "b2"),
        udp_echo(UdpSocket::bind(sa(V6_LOOPBACK, PORT)).await.unwrap(), "b1-v6"),
    ];
    let mut vm1 = backend("vm-1", b1);
    vm1.private_ipv6 = Some(Ipv6Addr::LOCALHOST);
    let listener = dual_rule(
        Protocol::Udp,
        v4_public,
        v6_public,
        PORT,
        vec![vm1, backend("vm-2", b2)],
    );
    let fwd = Forwarder::new();
    fwd.apply_lb("lb-udp-dual", vec![listener.clone()]).await.unwrap();

    let mut v4 = HashMap::<String, usize>::new();
    for _ in 0..4 {
        let client = UdpSocket::bind(sa(ip(55, 162, 1), 0)).await.unwrap();
        *v4.entry(udp_ask(&client, v4_public, "ping", T).await.expect("v4 reply"))
            .or_default() += 1;
    }
    assert_eq!((v4.get("b1"), v4.get("b2")), (Some(&2), Some(&2)), "{v4:?}");
    for _ in 0..4 {
        // udp_ask checks the reply comes from the IPv6 public address.
        let client = UdpSocket::bind(sa(V6_LOOPBACK, 0)).await.unwrap();
        assert_eq!(udp_ask(&client, v6_public, "ping6", T).await.as_deref(), Some("b1-v6"));
    }

    // Only IPv4 sources: IPv6 clients are dropped, IPv4 ones answered.
    let mut v4_sources = listener.clone();
    v4_sources.allowed_sources = vec!["127.55.162.0/24".parse().unwrap()];
    fwd.apply_lb("lb-udp-dual", vec![v4_sources]).await.unwrap();
    let v6_client = UdpSocket::bind(sa(V6_LOOPBACK, 0)).await.unwrap();
    assert_eq!(
        udp_ask(&v6_client, v6_public, "hi", Duration::from_millis(300)).await,
        None
    );
    let v4_client = UdpSocket::bind(sa(ip(55, 162, 2), 0)).await.unwrap();
    assert!(udp_ask(&v4_client, v4_public, "hi", T).await.is_some());

    // No backend with an IPv6 address: IPv6 clients get nothing.
    fwd.apply_lb(
        "lb-udp-dual",
        vec![dual_rule(
            Protocol::Udp,
            v4_public,
            v6_public,
            PORT,
            vec![backend("vm-2", b2)],
        )],
    )
    .await
    .unwrap();
    let v6_client = UdpSocket::bind(sa(V6_LOOPBACK, 0)).await.unwrap();
    assert_eq!(
        udp_ask(&v6_client, v6_public, "hi", Duration::from_millis(300)).await,
        None
    );
    fwd.shutdown().await;
    for e in echoes {
        e.abort();
    }
}

/// An IPv6-only LB checks its backends on `private_ipv6`; a backend without one has
/// nothing to check and goes unhealthy.
#[tokio::test]
async fn ipv6_only_rule_checks_private_ipv6() {
    const PORT: u16 = 19481;
    let (b1, b2) = (ip(10, 163, 11), ip(10, 163, 12));
    let v6_public = sa(V6_LOOPBACK, 19482);
    // Nothing listens on the IPv4 addresses: only checks of ::1 can pass.
    let _s1v6 = TcpBackend::start(sa(V6_LOOPBACK, PORT), "b1-v6").await;
    let mut vm1 = backend("vm-1", b1);
    vm1.private_ipv6 = Some(Ipv6Addr::LOCALHOST);
    let mut listener = rule(
        Protocol::Tcp,
        v6_public,
        Algorithm::RoundRobin,
        vec![vm1, backend("vm-2", b2)],
    );
    listener.private_port = PORT;
    listener.health_check = fast_check(PORT);
    listener.check_ipv6 = true;
    let fwd = Forwarder::new();
    fwd.apply_lb("lb-v6", vec![listener]).await.unwrap();
    wait_for("vm-1 healthy", || {
        state_of(&fwd, "lb-v6", "vm-1") == Some(HealthState::Healthy)
    })
    .await;
    wait_for("vm-2 unhealthy", || {
        state_of(&fwd, "lb-v6", "vm-2") == Some(HealthState::Unhealthy)
    })
    .await;
    assert_eq!(identify(v6_public).await, "b1-v6");
    fwd.shutdown().await;
}

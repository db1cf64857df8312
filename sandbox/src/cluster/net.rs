//! The cluster's sockets: L4 forwarding (kube-proxy's data path), a minimal HTTP/1.1
//! answerer (health servers, pod responders) and binding helpers.
//!
//! The platform's data plane (`platform::forward`) is not reused here: its backends are VMs
//! with one port per rule and mandatory health checks, while a Service's backends are
//! endpoints with their own ports, no health checks, and client-IP affinity with a timeout.
//! The shape is the same: an accept or receive loop per listener, one task per TCP
//! connection or UDP flow, a swappable target read on every new connection, everything
//! ended by a cancellation token.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::balance::{Balancer, Target};

/// Bound on connecting to an endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A UDP flow without traffic either way for this long is closed.
const UDP_IDLE: Duration = Duration::from_secs(30);
/// Most UDP flows per listener; new clients beyond it are dropped.
const MAX_UDP_FLOWS: usize = 4096;
/// Largest HTTP request head read.
const MAX_HEAD: usize = 16 * 1024;
/// Bound on reading a request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes read (and dropped) after an answer, and for how long.
const MAX_DRAIN: usize = 1024 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed `accept` before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Binds a TCP listener with `SO_REUSEADDR` (so a restart rebinds at once). An IPv6
/// address is bound with `IPV6_FREEBIND`: the dual-stack sandbox's IPv6 ranges are `local`
/// routes on `lo`, not addresses of an interface.
pub(crate) fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if addr.is_ipv4() {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        return socket.listen(1024);
    }
    let socket = ipv6_socket(socket2::Type::STREAM, addr)?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Binds a UDP socket (IPv6 with `IPV6_FREEBIND`, as [`bind_tcp`]).
pub(crate) fn bind_udp(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    if addr.is_ipv4() {
        let socket = std::net::UdpSocket::bind(addr)?;
        socket.set_nonblocking(true)?;
        return UdpSocket::from_std(socket);
    }
    let socket = ipv6_socket(socket2::Type::DGRAM, addr)?;
    UdpSocket::from_std(socket.into())
}

fn ipv6_socket(ty: socket2::Type, addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV6, ty, None)?;
    socket.set_only_v6(true)?;
    socket.set_reuse_address(true)?;
    socket.set_freebind_v6(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

/// Accepts until `cancel`, handing each connection to `handle` as a tracked task.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, cancel: CancellationToken, tasks: TaskTracker, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let work = handle(stream, peer);
                let cancel = cancel.clone();
                tasks.spawn(async move {
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = work => {}
                    }
                });
            }
            Err(e) => {
                tracing::debug!(listen = ?listener.local_addr().ok(), error = %e, "accept failed");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

/// Where a forwarding listener sends new connections: its target (swapped on changes)
/// and the balancer state (turn, client affinity).
#[derive(Debug)]
pub(crate) struct Route {
    target: RwLock<Arc<Target>>,
    balancer: Mutex<Balancer>,
}

impl Route {
    pub fn new(target: Target) -> Self {
        Self {
            target: RwLock::new(Arc::new(target)),
            balancer: Mutex::new(Balancer::default()),
        }
    }

    pub fn target(&self) -> Arc<Target> {
        Arc::clone(&self.target.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn set_target(&self, target: Target) {
        *self.target.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(target);
    }

    /// The endpoint for a new connection or flow of `client`, not one of `exclude`.
    fn pick(&self, client: SocketAddr, exclude: &[SocketAddr]) -> Option<SocketAddr> {
        let target = self.target();
        let mut balancer = self.balancer.lock().unwrap_or_else(PoisonError::into_inner);
        balancer.pick(client.ip(), &target, exclude, std::time::Instant::now())
    }
}

/// Proxies every TCP connection accepted on `listener` to an endpoint of `route`, both
/// ways with half-close; refused (reset) when there is none.
pub(crate) async fn forward_tcp(
    listener: TcpListener,
    route: Arc<Route>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    accept_loop(listener, cancel, tasks, move |client, peer| {
        proxy_tcp(client, peer, Arc::clone(&route))
    })
    .await;
}

async fn proxy_tcp(mut client: TcpStream, peer: SocketAddr, route: Arc<Route>) {
    let mut tried = Vec::new();
    let mut upstream = loop {
        let Some(backend) = route.pick(peer, &tried) else {
            let _ = client.set_zero_linger();
            return;
        };
        match timeout(CONNECT_TIMEOUT, TcpStream::connect(backend)).await {
            Ok(Ok(s)) => break s,
            Ok(Err(e)) => tracing::debug!(%peer, %backend, error = %e, "endpoint connect failed"),
            Err(_) => tracing::debug!(%peer, %backend, "endpoint connect timed out"),
        }
        tried.push(backend);
        if tried.len() >= 2 {
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::trace!(%peer, error = %e, "proxied connection ended with an error");
        let _ = client.set_zero_linger();
    }
}

struct Flow {
    upstream: UdpSocket,
    backend: SocketAddr,
    last_seen: Mutex<Instant>,
    cancel: CancellationToken,
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<Flow>>>>;

fn flows_lock(flows: &Flows) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Flow>>> {
    flows.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Forwards UDP datagrams received on `socket`: a flow per client address with its own
/// upstream socket to the endpoint picked for it; replies go back through `socket`.
pub(crate) async fn forward_udp(socket: UdpSocket, route: Arc<Route>, cancel: CancellationToken, tasks: TaskTracker) {
    let socket = Arc::new(socket);
    let flows: Flows = Arc::default();
    let mut buf = vec![0u8; 65_536];
    loop {
        let (len, client) = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(e) => {
                    tracing::trace!(error = %e, "UDP receive failed");
                    continue;
                }
            },
        };
        let existing = flows_lock(&flows).get(&client).cloned();
        let target = route.target();
        let flow = match existing {
            Some(flow) if target.backends.contains(&flow.backend) => flow,
            stale => {
                if let Some(stale) = stale {
                    stale.cancel.cancel();
                    flows_lock(&flows).remove(&client);
                }
                if flows_lock(&flows).len() >= MAX_UDP_FLOWS {
                    continue;
                }
                let Some(backend) = route.pick(client, &[]) else {
                    continue;
                };
                let upstream = match connect_udp(backend) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!(%client, %backend, error = %e, "cannot open a UDP flow");
                        continue;
                    }
                };
                let flow = Arc::new(Flow {
                    upstream,
                    backend,
                    last_seen: Mutex::new(Instant::now()),
                    cancel: cancel.child_token(),
                });
                flows_lock(&flows).insert(client, Arc::clone(&flow));
                tasks.spawn(udp_replies(
                    Arc::clone(&flow),
                    client,
                    Arc::clone(&socket),
                    Arc::clone(&flows),
                ));
                flow
            }
        };
        *flow.last_seen.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
        if let Err(e) = flow.upstream.send(&buf[..len]).await {
            tracing::trace!(%client, backend = %flow.backend, error = %e, "UDP send to endpoint failed");
        }
    }
    for (_, flow) in flows_lock(&flows).drain() {
        flow.cancel.cancel();
    }
}

fn connect_udp(backend: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = match backend {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.connect(backend)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

async fn udp_replies(flow: Arc<Flow>, client: SocketAddr, listen: Arc<UdpSocket>, flows: Flows) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let idle_until = *flow.last_seen.lock().unwrap_or_else(PoisonError::into_inner) + UDP_IDLE;
        tokio::select! {
            _ = flow.cancel.cancelled() => break,
            _ = tokio::time::sleep_until(idle_until) => {
                if *flow.last_seen.lock().unwrap_or_else(PoisonError::into_inner) + UDP_IDLE <= Instant::now() {
                    break;
                }
            }
            received = flow.upstream.recv(&mut buf) => match received {
                Ok(len) => {
                    *flow.last_seen.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
                    let _ = listen.send_to(&buf[..len], client).await;
                }
                // E.g. ICMP port unreachable from a gone endpoint: the flow is useless.
                Err(_) => break,
            },
        }
    }
    let mut map = flows_lock(&flows);
    if map.get(&client).is_some_and(|f| Arc::ptr_eq(f, &flow)) {
        map.remove(&client);
    }
}

/// The request line of an HTTP request: method and path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestHead {
    pub method: String,
    pub path: String,
}

/// Whether the first bytes of a connection look like an HTTP/1 request line.
pub(crate) fn looks_like_http(prefix: &[u8]) -> bool {
    const METHODS: [&[u8]; 9] = [
        b"GET ",
        b"HEAD ",
        b"POST ",
        b"PUT ",
        b"DELETE ",
        b"OPTIONS ",
        b"PATCH ",
        b"CONNECT ",
        b"TRACE ",
    ];
    METHODS.iter().any(|m| prefix.starts_with(m))
}

/// Parses the request line out of a complete head (`None` when malformed).
pub(crate) fn parse_head(head: &[u8]) -> Option<RequestHead> {
    let text = std::str::from_utf8(head).ok()?;
    let line = text.lines().next()?;
    let mut parts = line.split(' ');
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    parts
        .next()?
        .starts_with("HTTP/")
        .then_some(RequestHead { method, path })
}

/// Reads until the end of the request head (`\r\n\r\n`), starting with `buf`'s bytes.
/// `None` when the peer closed, the head is too large, or it took too long.
pub(crate) async fn read_head(stream: &mut TcpStream, mut buf: Vec<u8>) -> Option<RequestHead> {
    let deadline = Instant::now() + READ_TIMEOUT;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return parse_head(&buf[..end]);
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Writes one complete response and closes the connection's write side.
pub(crate) async fn write_response(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
) {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Unknown",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(body);
    }
    let _ = stream.write_all(out.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Read what the client still sends (a request body) before closing, so the close is
    // not a reset that could destroy the answer in flight.
    let mut sink = [0u8; 4096];
    let drain = async {
        let mut left = MAX_DRAIN;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = timeout(DRAIN_TIMEOUT, drain).await;
}

/// Serves HTTP on `listener`: every request is answered by `answer(path)` as
/// `(status, content type, body)`.
pub(crate) async fn serve_http<A>(listener: TcpListener, answer: Arc<A>, cancel: CancellationToken, tasks: TaskTracker)
where
    A: Fn(&str) -> (u16, &'static str, String) + Send + Sync + 'static,
{
    accept_loop(listener, cancel, tasks, move |mut stream, _| {
        let answer = Arc::clone(&answer);
        async move {
            if let Some(head) = read_head(&mut stream, Vec::new()).await {
                let (status, content_type, body) = answer(&head.path);
                write_response(&mut stream, status, content_type, &body, head.method == "HEAD").await;
            }
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_told_from_other_bytes() {
        assert!(looks_like_http(b"GET / HTTP/1.1\r\n"));
        assert!(looks_like_http(b"HEAD /x HTTP/1.0\r\n"));
        assert!(!looks_like_http(b"hello\n"));
        assert!(!looks_like_http(b"GE"));
    }

    #[test]
    fn request_line_is_parsed() {
        assert_eq!(
            parse_head(b"GET /healthz HTTP/1.1\r\nHost: x"),
            Some(RequestHead {
                method: "GET".into(),
                path: "/healthz".into()
            })
        );
        assert_eq!(parse_head(b"GET /healthz\r\n"), None);
        assert_eq!(parse_head(b"\xff\xfe"), None);
    }

    #[tokio::test]
    async fn forwards_tcp_and_refuses_without_endpoints() {
        let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = backend.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap()).unwrap();
        let front = listener.local_addr().unwrap();
        let route = Arc::new(Route::new(Target {
            backends: vec![backend_addr],
            affinity: None,
        }));
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tokio::spawn(forward_tcp(listener, Arc::clone(&route), cancel.clone(), tasks.clone()));
        let mut c = TcpStream::connect(front).await.unwrap();
        c.write_all(b"ping").await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"ping");

        route.set_target(Target {
            backends: vec![],
            affinity: None,
        });
        let mut c = TcpStream::connect(front).await.unwrap();
        let mut got = Vec::new();
        let r = c.read_to_end(&mut got).await;
        assert!(r.is_err() || got.is_empty(), "no endpoint: closed without data");
        cancel.cancel();
    }

    #[tokio::test]
    async fn forwards_udp_both_ways() {
        let backend = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let backend_addr = backend.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            while let Ok((n, from)) = backend.recv_from(&mut buf).await {
                let mut reply = b"re:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = backend.send_to(&reply, from).await;
            }
        });
        let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let route = Arc::new(Route::new(Target {
            backends: vec![backend_addr],
            affinity: None,
        }));
        let cancel = CancellationToken::new();
        tokio::spawn(forward_udp(front, route, cancel.clone(), TaskTracker::new()));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"x", front_addr).await.unwrap();
        let mut buf = [0u8; 100];
        let (n, from) = timeout(Duration::from_secs(2), client.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"re:x");
        assert_eq!(from, front_addr);
        cancel.cancel();
    }
}

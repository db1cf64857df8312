//! Handshakes off the data path: a worker thread takes the handshake initiations the
//! gateway loop lets through, from a bounded queue, so that no data packet waits behind
//! their X25519 work (~250 µs each).
//!
//! The loop keeps admission, all of it cheap: it checks an initiation's MAC1 (under load,
//! its cookie too) and counts it against `--handshake-limit` ([`PeerTable::route`]),
//! answers it with a cookie reply when under load, and queues the rest. It is under load
//! over the limit, over the CPU budget ([`crate::budget`]: the worker's handshake time plus
//! the loop's own on handshake messages), or while the queue is at least 1/8 full
//! ([`Queue::under_load`], kernel WireGuard's rule). A full queue drops the initiation,
//! counted in `kuberaya_gateway_handshakes_dropped_total`; its peer tries again.
//!
//! The worker ([`Handshaker::initiation`]) identifies the peer by the static key the
//! initiation carries, locks that peer's session (the loop locks it for each of the peer's
//! data packets, so the loop's next packet of the peer sees the handshake's outcome, and
//! other peers' packets never wait), lets its `Tunn` answer, and sends the answer from its
//! own handle on the gateway's socket. It runs at nice 10 and charges the budget its
//! thread's CPU time; while the budget is over it pauses, and what is queued waits.
//!
//! Handshake responses (to initiations the gateway sent) stay on the loop: boringtun drops
//! a response whose index is not its pending handshake's before any X25519, so they
//! cannot be flooded, and the packets a completed handshake releases must leave in order
//! with the loop's own.
//!
//! [`PeerTable::route`]: crate::tunnel::PeerTable::route

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::budget::HandshakeBudget;
use crate::metrics::Metrics;
use crate::transport::{Bound, socket_for, wire_address};
use crate::tunnel::{BUF_SIZE, Handshaker, TunnelIo};

/// Initiations the queue holds at most: ~250 ms of X25519 work. Past it they are dropped.
pub const CAPACITY: usize = 1024;
/// A handshake initiation's size (WireGuard message type 1).
const INITIATION: usize = 148;

/// One queued initiation: where it came from, and its bytes.
type Job = (SocketAddr, [u8; INITIATION]);

/// The bounded queue between the loop and the worker; no locks (see [`Worker`]).
#[derive(Debug)]
pub struct Queue {
    jobs: VecDeque<Job>,
    capacity: usize,
    closed: bool,
}

impl Queue {
    /// A queue of at most `capacity` initiations (at least 1); room is taken as it fills.
    pub fn new(capacity: usize) -> Self {
        Queue {
            jobs: VecDeque::new(),
            capacity: capacity.max(1),
            closed: false,
        }
    }

    /// Queue an initiation; false (and nothing queued) when the queue is full or closed or
    /// `datagram` is not an initiation's size.
    pub fn push(&mut self, from: SocketAddr, datagram: &[u8]) -> bool {
        let Ok(bytes) = <[u8; INITIATION]>::try_from(datagram) else {
            return false;
        };
        if self.closed || self.jobs.len() >= self.capacity {
            return false;
        }
        self.jobs.push_back((from, bytes));
        true
    }

    /// The oldest initiation.
    pub fn pop(&mut self) -> Option<Job> {
        self.jobs.pop_front()
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Whether the worker is behind: at least 1/8 of the queue waits (kernel WireGuard's
    /// "under load"). Initiations then need a cookie, so that a flood fills the queue only
    /// with peers that answer from their address, and real peers' handshakes are not stuck
    /// behind it.
    pub fn under_load(&self) -> bool {
        self.jobs.len() >= (self.capacity / 8).max(1)
    }

    /// Stop: nothing more is queued, and what waits is dropped.
    fn close(&mut self) {
        self.closed = true;
        self.jobs.clear();
    }
}

/// What the loop and the worker share.
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// The loop's handle on the handshake worker thread: queue initiations, ask whether the
/// worker is behind. Dropping it stops the thread (after the handshake it is doing).
pub struct Worker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("queued", &self.shared.queue.lock().len())
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Start the worker: it takes initiations with `hs`, charges its time to `budget`,
    /// sends the answers on `sockets` (its own handles on the gateway's sockets), and
    /// counts its drops in `metrics`.
    pub fn spawn(
        hs: Handshaker,
        sockets: Vec<(std::net::UdpSocket, Bound)>,
        budget: Arc<Mutex<HandshakeBudget>>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::new(CAPACITY)),
            ready: Condvar::new(),
        });
        let thread = std::thread::Builder::new().name("handshakes".into()).spawn({
            let shared = shared.clone();
            move || work(&shared, &hs, &SocketIo::new(sockets), &budget, &metrics)
        })?;
        Ok(Worker {
            shared,
            thread: Some(thread),
        })
    }

    /// Queue an initiation from `from` for the worker; false when the queue is full (the
    /// initiation is dropped: the caller counts it).
    pub fn push(&self, from: SocketAddr, datagram: &[u8]) -> bool {
        let queued = self.shared.queue.lock().push(from, datagram);
        if queued {
            self.shared.ready.notify_one();
        }
        queued
    }

    /// See [`Queue::under_load`].
    pub fn under_load(&self) -> bool {
        self.shared.queue.lock().under_load()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.shared.queue.lock().close();
        self.shared.ready.notify_all();
        if let Some(t) = self.thread.take() {
            // At most one handshake's time: the queue is closed and empty.
            let _ = t.join();
        }
    }
}

/// The worker thread: one initiation at a time until the queue is closed, pausing while
/// handshakes are over their budget.
fn work(shared: &Shared, hs: &Handshaker, sockets: &SocketIo, budget: &Mutex<HandshakeBudget>, metrics: &Metrics) {
    lower_priority();
    let mut buf = vec![0u8; BUF_SIZE];
    let mut out = Sends::default();
    loop {
        // Never both locks at once (the loop takes them one after the other too).
        let pause = budget.lock().over_until(Instant::now());
        let mut q = shared.queue.lock();
        if q.closed {
            return;
        }
        // Over budget: what is queued waits (past 1/8 full the loop answers with cookie
        // replies, when full it drops), so that a flood takes no more than the budget.
        if let Some(until) = pause {
            shared.ready.wait_until(&mut q, until);
            continue;
        }
        let Some((from, datagram)) = q.pop() else {
            shared.ready.wait(&mut q);
            continue;
        };
        drop(q);
        let started = Instant::now();
        let cpu = thread_cpu_time();
        let r = hs.initiation(from, &datagram, &mut buf, &mut out);
        // Sent after the peer's lock is released.
        sockets.send(&mut out);
        // Charged the thread's CPU time, not the time it waited for a core.
        let spent = match (cpu, thread_cpu_time()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => started.elapsed(),
        };
        budget.lock().record(started, started + spent);
        if let Err(e) = r {
            let peer = e.peer().map(|p| p.to_string()).unwrap_or_default();
            tracing::debug!(%from, error = %e, "handshake initiation dropped");
            metrics.dropped_packet(&peer, e.label());
        }
    }
}

/// The worker's scheduling priority (nice): when the cores are short, the data path and the
/// other processes on them go first and the queue grows instead, which makes initiations
/// get cookie replies; with a core to spare the worker takes it whole.
const NICE: libc::c_int = 10;

/// Give this thread [`NICE`] (on Linux a thread's own priority; raising it needs no
/// privilege).
fn lower_priority() {
    // SAFETY: gettid takes nothing and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    // SAFETY: a priority change of this thread only.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, NICE) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "handshake worker keeps its priority");
    }
}

/// The CPU time this thread has used.
fn thread_cpu_time() -> Option<Duration> {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: writes one timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return None;
    }
    Some(Duration::new(t.tv_sec as u64, t.tv_nsec as u32))
}

/// The answers of one initiation (one response, as a rule), until they are sent.
#[derive(Default)]
struct Sends(Vec<(SocketAddr, Vec<u8>)>);

impl TunnelIo for Sends {
    fn send(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.0.push((to, datagram.to_vec()));
    }
    fn deliver(&mut self, _peer: &crate::peers::PeerId, _address: std::net::Ipv4Addr, _packet: &[u8]) {
        // An initiation carries no data.
        tracing::debug!("a handshake initiation delivered a packet; dropped");
    }
}

/// The worker's handles on the gateway's sockets (duplicated descriptors of the loop's:
/// sending on one UDP socket from two threads is fine).
struct SocketIo {
    sockets: Vec<std::net::UdpSocket>,
    bounds: Vec<Bound>,
}

impl SocketIo {
    fn new(sockets: Vec<(std::net::UdpSocket, Bound)>) -> Self {
        let (sockets, bounds) = sockets.into_iter().unzip();
        SocketIo { sockets, bounds }
    }

    fn send(&self, out: &mut Sends) {
        for (to, d) in out.0.drain(..) {
            let Some(i) = socket_for(&self.bounds, to) else {
                continue;
            };
            // Non-blocking (the loop's socket): a full socket buffer drops, as a network would.
            if let Err(e) = self.sockets[i].send_to(&d, wire_address(&self.bounds[i], to)) {
                tracing::debug!(%to, error = %e, "handshake answer not sent");
            }
        }
    }
}

/// A handle of the worker's own on `socket` (a duplicated descriptor, non-blocking like it).
pub fn clone_socket(socket: &tokio::net::UdpSocket) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsFd;
    Ok(std::net::UdpSocket::from(socket.as_fd().try_clone_to_owned()?))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::keys::PrivateKey;
    use crate::peers::{AcceptedPeer, PeerId};
    use crate::tunnel::PeerTable;

    fn from(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    fn initiation(n: u8) -> Vec<u8> {
        let mut d = vec![0u8; INITIATION];
        d[0] = 1;
        d[4] = n;
        d
    }

    #[test]
    fn the_queue_is_bounded_and_first_in_first_out() {
        let mut q = Queue::new(16);
        for n in 0..16 {
            assert!(q.push(from(n.into()), &initiation(n)), "{n}");
        }
        assert!(!q.push(from(99), &initiation(99)), "full: dropped");
        assert_eq!(q.len(), 16);
        let (src, d) = q.pop().unwrap();
        assert_eq!((src, d[4]), (from(0), 0));
        assert!(q.push(from(99), &initiation(99)), "room again");
        let order: Vec<u8> = std::iter::from_fn(|| q.pop()).map(|(_, d)| d[4]).collect();
        assert_eq!(order, (1..16).chain([99]).collect::<Vec<u8>>());
        assert!(q.is_empty());
    }

    #[test]
    fn only_initiations_are_queued() {
        let mut q = Queue::new(4);
        assert!(!q.push(from(1), &[1, 0, 0, 0]));
        assert!(!q.push(from(1), &[0u8; INITIATION + 1]));
        assert!(q.is_empty());
    }

    #[test]
    fn under_load_from_an_eighth_full() {
        let mut q = Queue::new(CAPACITY);
        for n in 0..CAPACITY / 8 - 1 {
            assert!(!q.under_load(), "{n} queued");
            assert!(q.push(from(1), &initiation(0)));
        }
        assert!(!q.under_load());
        assert!(q.push(from(1), &initiation(0)));
        assert!(q.under_load(), "{} queued", q.len());
        q.pop();
        assert!(!q.under_load(), "below an eighth again");
        // A tiny queue is under load from its first entry, never at zero.
        let mut tiny = Queue::new(3);
        assert!(!tiny.under_load());
        tiny.push(from(1), &initiation(0));
        assert!(tiny.under_load());
    }

    #[test]
    fn a_closed_queue_takes_nothing_and_drops_what_waits() {
        let mut q = Queue::new(8);
        q.push(from(1), &initiation(0));
        q.close();
        assert!(q.is_empty());
        assert!(!q.push(from(1), &initiation(1)));
    }

    #[test]
    fn the_worker_answers_on_the_socket_and_the_loop_sees_the_session() {
        use boringtun::noise::{Tunn, TunnResult};
        let mut table = PeerTable::new(PrivateKey::generate(), 100);
        let laptop_key = PrivateKey::generate();
        table.sync(&[AcceptedPeer {
            id: PeerId::new("t", "laptop"),
            public_key: laptop_key.public_key(),
            address: Ipv4Addr::new(100, 64, 0, 2),
            address_v6: None,
            rules: vec![],
            preshared_key: None,
            expires_at: None,
        }]);
        let gateway = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let bound = Bound {
            local: gateway.local_addr().unwrap(),
            dual_stack: false,
        };
        let laptop = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        laptop.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut tunn = Tunn::new(
            laptop_key.to_x25519(),
            table.public_key().to_x25519(),
            None,
            None,
            7,
            None,
        );
        let mut out = vec![0u8; BUF_SIZE];
        let TunnResult::WriteToNetwork(init) = tunn.format_handshake_initiation(&mut out, true) else {
            panic!("no initiation")
        };
        let init = init.to_vec();
        let metrics = Arc::new(Metrics::new());
        let budget = Arc::new(Mutex::new(HandshakeBudget::default()));
        let w = Worker::spawn(table.handshaker(), vec![(gateway, bound)], budget, metrics.clone()).unwrap();
        let laptop_addr = laptop.local_addr().unwrap();
        // From a key the table does not know (a valid MAC1 is the loop's check): dropped.
        let stranger = {
            let mut t = Tunn::new(
                PrivateKey::generate().to_x25519(),
                table.public_key().to_x25519(),
                None,
                None,
                8,
                None,
            );
            let TunnResult::WriteToNetwork(d) = t.format_handshake_initiation(&mut out, true) else {
                panic!("no initiation")
            };
            d.to_vec()
        };
        assert!(w.push(laptop_addr, &stranger));
        assert!(w.push(laptop_addr, &init));
        let mut buf = vec![0u8; 256];
        let n = laptop.recv(&mut buf).expect("the worker's answer");
        assert_eq!(
            (n, buf[0]),
            (92, 2),
            "one handshake response, and nothing for the stranger"
        );
        assert_eq!(table.active(), 1, "the worker gave the peer its tunnel");
        // The laptop's first data (a keepalive) goes through the loop's side of the table.
        let TunnResult::WriteToNetwork(keepalive) = tunn.decapsulate(None, &buf[..n], &mut out) else {
            panic!("no keepalive")
        };
        let keepalive = keepalive.to_vec();
        let mut io = Io;
        let mut tbuf = vec![0u8; BUF_SIZE];
        table
            .handle_datagram(laptop_addr, &keepalive, &mut tbuf, &mut io)
            .unwrap();
        let peer = table.by_address(Ipv4Addr::new(100, 64, 0, 2)).unwrap();
        assert_eq!(peer.stats().handshakes, 1);
        assert_eq!(peer.endpoint(), Some(laptop_addr));
        drop(w);
        assert_eq!(
            metrics
                .dropped
                .get_or_create(&crate::metrics::DropLabels {
                    peer: String::new(),
                    reason: "unknown_key".into(),
                })
                .get(),
            1
        );
    }

    struct Io;
    impl TunnelIo for Io {
        fn send(&mut self, _: SocketAddr, _: &[u8]) {}
        fn deliver(&mut self, _: &crate::peers::PeerId, _: Ipv4Addr, _: &[u8]) {}
    }

    #[test]
    fn the_charge_is_the_threads_cpu_time() {
        let a = thread_cpu_time().expect("thread CPU clock");
        // Sleeping takes no CPU time; spinning does.
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(5) {}
        let spent = thread_cpu_time().unwrap() - a;
        assert!(spent < Duration::from_millis(20), "{spent:?}");
        assert!(spent > Duration::ZERO);
    }

    #[test]
    fn a_dropped_worker_stops_its_thread() {
        let table = PeerTable::new(PrivateKey::generate(), 100);
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let bound = Bound {
            local: sock.local_addr().unwrap(),
            dual_stack: false,
        };
        let w = Worker::spawn(table.handshaker(), vec![(sock, bound)], Arc::default(), Arc::default()).unwrap();
        for n in 0..100 {
            w.push(from(1), &initiation(n));
        }
        // Returns: the queue is closed, what waits is dropped, the thread ends.
        drop(w);
    }
}

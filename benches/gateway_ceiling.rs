//! The gateway's own ceiling: `cargo bench --bench gateway_ceiling` (root).
//!
//! `gateway_tun` measures the gateway behind one stock wireguard-go client, which on this
//! machine is the bottleneck (it sends one datagram per system call). Here the load comes
//! from clients that are not: `KR_BENCH_CEILING_PEERS` (4) registered peers, each boringtun's
//! noise `Tunn` over its own UDP socket, sending UDP datagrams to a Service as UDP GSO
//! trains of 44 WireGuard datagrams (64 KiB) (as wireguard-go since 2023 and the Linux kernel's
//! GRO do), for `KR_BENCH_WINDOW_S` (5) seconds. A sink on the Service's ClusterIP counts
//! what arrives.
//!
//! ```text
//! laptop (load: N peers) --veth 192.0.2.0/24, GRO on-- gateway --veth-- services (sink 10.96.0.30:9000/udp)
//! ```
//!
//! With `KR_BENCH_PIN=1` (the default) the gateway process is pinned to CPU 0 and the
//! load and the sink to CPU 1, so that the gateway has one core to itself: what arrives
//! per second of that core's busy time is the gateway's Gbit/s per core. The kernel's work
//! for the gateway (its system calls, the TUN and the forwarding to the services' veth)
//! runs on CPU 0 as well; the receive side of the laptop's veth runs on the sender's CPU.
//! `KURAYA_BENCH_BASELINE_BIN` is measured in TUN mode, or in userspace mode when
//! `KURAYA_BENCH_GATEWAYS=userspace`. `KR_BENCH_PIN=0` leaves the scheduler free (to see whether more gateway threads help);
//! `KR_BENCH_DECRYPT_THREADS=1,2` measures the TUN gateway once per `--decrypt-threads`
//! value.
//!
//! Measured, in turn: `KURAYA_BENCH_BASELINE_BIN` in TUN mode (if set), our gateway in TUN
//! mode and in the default userspace mode (`KURAYA_BENCH_GATEWAYS` picks), and wireguard-go
//! with `ip_forward` and a masquerade as the reference of the ratios. Printed: offered and
//! delivered Gbit/s, the gateway process's CPU seconds per GB delivered, CPU 0's busy share,
//! Gbit delivered per CPU-second of the gateway process (which other load on CPU 0 does
//! not skew), delivered Gbit/s per busy gateway core (which includes the kernel's softirq
//! work on CPU 0, and anything else that ran there), and for ours the UDP GRO trains
//! received.
//! `KURAYA_BENCH_PERF=DIR` records a `perf record -e cpu-clock -g` profile of each gateway
//! process over its window into `DIR/ceiling-<gateway>-<pid>.data`.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::wg::{
    GW_VETH, LAPTOP_VETH, Topology, forward_for_wireguard_go, gateway_args, gateway_bin, wireguard_go, write,
};
use common::{knob, pin_thread};
use kuberaya_e2e::gateway::{PeerKey, peer_address, udp_packet};
use kuberaya_e2e::netns::{Netns, require_programs, require_root};
use kuberaya_e2e::wg_client::{Client, send_gso};
use kuberaya_e2e::{Process, b64, b64_decode};

const CMD: Duration = Duration::from_secs(30);
const SINK_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const SINK_PORT: u16 = 9000;
const PORT: u16 = 51820;
/// Datagrams per GSO train: as many as fit the 64 KiB a UDP send takes.
const TRAIN: usize = 44;
/// An IPv4/UDP packet of 1,400 bytes: fits the 1,420 MTU of a WireGuard interface.
const PAYLOAD: usize = 1_400 - 28;
/// The metrics port inside the gateway's namespace (its own, so fixed).
const METRICS: &str = "127.0.0.1:9464";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Tun,
    Userspace,
    WireguardGo,
}

impl Kind {
    fn short(self) -> &'static str {
        match self {
            Kind::Tun => "tun",
            Kind::Userspace => "userspace",
            Kind::WireguardGo => "wireguard-go",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    offered_gbit: f64,
    delivered_gbit: f64,
    cpu_per_gb: f64,
    /// Busy share of CPU 0 (pinned) or of all CPUs (not pinned), 0..=1 each, summed.
    busy_cores: f64,
    gro_trains: u64,
}

impl Figures {
    /// Gbit delivered per CPU-second of the gateway process (its threads, their system
    /// calls; not softirq work the kernel charges to no process): robust to other load.
    fn per_cpu_second(&self) -> f64 {
        if self.cpu_per_gb > 0.0 {
            8.0 / self.cpu_per_gb
        } else {
            0.0
        }
    }

    fn per_core(&self) -> f64 {
        if self.busy_cores > 0.0 {
            self.delivered_gbit / self.busy_cores
        } else {
            0.0
        }
    }
}

/// Busy and total jiffies of CPU `cpu` (or all of them) from /proc/stat; steal is neither
/// (the hypervisor's, not ours).
fn cpu_jiffies(cpu: Option<usize>) -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let name = cpu.map_or("cpu".to_string(), |c| format!("cpu{c}"));
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))
        .unwrap();
    let v: Vec<u64> = line.split_whitespace().skip(1).map(|x| x.parse().unwrap()).collect();
    // user nice system idle iowait irq softirq steal
    let busy = v[0] + v[1] + v[2] + v[5] + v[6];
    (busy, busy + v[3] + v[4])
}

/// A UDP sink on the Service's address in `ns`: counts the bytes it receives (with UDP GRO,
/// so that the sink's own cost stays small) until `stop`.
fn sink(ns: Netns, cpu: Option<usize>, stop: Arc<AtomicBool>, bytes: Arc<AtomicU64>, ready: Arc<Barrier>) {
    ns.enter().unwrap();
    if let Some(c) = cpu {
        pin_thread(c);
    }
    let sock = UdpSocket::bind((SINK_IP, SINK_PORT)).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    set_int(&sock, libc::SOL_UDP, libc::UDP_GRO, 1);
    set_int(&sock, libc::SOL_SOCKET, libc::SO_RCVBUF, 8 << 20);
    ready.wait();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        if let Ok(n) = sock.recv(&mut buf) {
            bytes.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
}

fn set_int(sock: &UdpSocket, level: i32, name: i32, value: i32) {
    if let Err(e) = common::set_int(sock, level, name, value) {
        eprintln!("setsockopt({level}, {name}): {e}");
    }
}

/// The load: every peer handshakes from its own socket in `ns`, then all of them send GSO
/// trains in turn until `stop`; counts the IP payload bytes sent in `sent`.
#[allow(clippy::too_many_arguments)]
fn load(
    ns: Netns,
    cpu: Option<usize>,
    peers: Vec<PeerKey>,
    gateway_public: [u8; 32],
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    ready: Arc<Barrier>,
) {
    ns.enter().unwrap();
    if let Some(c) = cpu {
        pin_thread(c);
    }
    let gateway = SocketAddr::new(GW_VETH.parse().unwrap(), PORT);
    let mut clients: Vec<Client> = peers
        .iter()
        .map(|p| {
            let sock = UdpSocket::bind((LAPTOP_VETH, 0)).unwrap();
            set_int(&sock, libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20);
            let mut c = Client::on(sock, p, gateway_public, gateway);
            c.connect();
            c
        })
        .collect();
    let packets: Vec<Vec<u8>> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| udp_packet(p.address, SINK_IP, 40_000 + i as u16, SINK_PORT, &[0x5a; PAYLOAD]))
        .collect();
    let mut train = vec![0u8; TRAIN * 2048];
    ready.wait();
    while !stop.load(Ordering::Relaxed) {
        for (c, packet) in clients.iter_mut().zip(&packets) {
            let mut len = 0;
            let mut seg = 0;
            for _ in 0..TRAIN {
                match c.tunn.encapsulate(packet, &mut train[len..len + 2048]) {
                    boringtun::noise::TunnResult::WriteToNetwork(d) => {
                        seg = d.len();
                        len += seg;
                    }
                    _ => panic!("encapsulate: no datagram (session gone?)"),
                }
            }
            // A full socket buffer (ENOBUFS/EAGAIN) is a dropped train, as on a NIC.
            match send_gso(&c.sock, gateway, &train[..len], seg) {
                Ok(()) => {
                    sent.fetch_add((TRAIN * (packet.len() - 28)) as u64, Ordering::Relaxed);
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                Err(e) => panic!("sending a GSO train of {TRAIN} x {seg} B: {e}"),
            }
        }
    }
}

fn metric(gw: &Netns, name: &str) -> u64 {
    let Ok(out) = gw.exec(&["curl", "-s", &format!("http://{METRICS}/metrics")], CMD) else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

fn measure(kind: Kind, bin: &Path, extra: &[String], dir: &Path, peers: usize, pin: bool, window: Duration) -> Figures {
    let Topology { laptop, gw, svc } = Topology::new("ceil");
    let gw_secret: [u8; 32] = kuberaya_e2e::gateway::random_bytes();
    let gw_key = PeerKey::new(gw_secret, Ipv4Addr::new(100, 64, 0, 1));
    let gw_public: [u8; 32] = b64_decode(&gw_key.public)
        .expect("a public key in base64")
        .try_into()
        .expect("32 bytes");
    let keys: Vec<PeerKey> = (0..peers).map(|i| PeerKey::random(peer_address(i as u64))).collect();
    let listen = format!("{GW_VETH}:{PORT}");
    let taskset: Vec<&str> = if pin { vec!["taskset", "-c", "0"] } else { vec![] };
    let gateway: Process = match kind {
        Kind::Tun | Kind::Userspace => {
            let key = write(dir, "gw.key", &b64(&gw_secret));
            let list: Vec<_> = keys
                .iter()
                .enumerate()
                .map(|(i, p)| p.file_entry(&format!("p{i}"), &["sink"]))
                .collect();
            let services = serde_json::json!([{"namespace": "default", "name": "sink", "clusterIP": SINK_IP.to_string(),
                "ports": [{"name": "load", "port": SINK_PORT, "protocol": "UDP"}]}]);
            let peers_file = write(dir, "peers.json", &serde_json::Value::from(list).to_string());
            let services_file = write(dir, "services.json", &services.to_string());
            let mut args = gateway_args(
                &taskset,
                bin,
                &listen,
                &key,
                &peers_file,
                &services_file,
                METRICS,
                kind == Kind::Tun,
            );
            args.extend(extra.iter().cloned());
            let mut p = gw.spawn(&args).unwrap();
            p.wait_for_stdout_line("kuberaya-gateway listening", CMD).unwrap();
            // The file source loads the peers within its 500 ms re-read.
            std::thread::sleep(Duration::from_secs(1));
            p
        }
        Kind::WireguardGo => {
            let peers_conf: String = keys
                .iter()
                .map(|k| format!("[Peer]\nPublicKey = {}\nAllowedIPs = {}/32\n\n", k.public, k.address))
                .collect();
            let conf = write(
                dir,
                "wg1.conf",
                &format!(
                    "[Interface]\nPrivateKey = {}\nListenPort = {PORT}\n\n{peers_conf}",
                    gw_key.private_key()
                ),
            );
            forward_for_wireguard_go(&gw);
            wireguard_go(&gw, &taskset, "wg1", &conf, "100.64.0.1/16", &[])
        }
    };
    // taskset execs the gateway: the pid is the gateway's.
    let pid = gateway.pid();

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(Barrier::new(3));
    let load_cpu = pin.then_some(1);
    let sink_thread = {
        let (stop, received, ready) = (stop.clone(), received.clone(), ready.clone());
        let ns = Netns::attach(svc.name());
        std::thread::spawn(move || sink(ns, load_cpu, stop, received, ready))
    };
    let load_thread = {
        let (stop, sent, ready) = (stop.clone(), sent.clone(), ready.clone());
        let ns = Netns::attach(laptop.name());
        let keys = keys.clone();
        std::thread::spawn(move || load(ns, load_cpu, keys, gw_public, stop, sent, ready))
    };
    ready.wait();
    // A second to reach the steady state, then the window.
    std::thread::sleep(Duration::from_secs(1));
    let cpu_of = if pin { Some(0) } else { None };
    let trains = || (kind != Kind::WireguardGo).then(|| metric(&gw, "kuberaya_gateway_udp_gro_trains_total"));
    // The metrics are read outside the window: a curl takes its time.
    let trains0 = trains();
    // KURAYA_BENCH_PERF=DIR: a cpu-clock profile of the gateway process over the window.
    let perf = std::env::var_os("KURAYA_BENCH_PERF").map(|d| {
        let out = Path::new(&d).join(format!("ceiling-{}-{pid}.data", kind.short()));
        std::process::Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-g", "-p", &pid.to_string(), "-o"])
            .arg(out)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("perf record (linux-perf)")
    });
    let started = Instant::now();
    let (busy0, total0) = cpu_jiffies(cpu_of);
    let (cpu0, rx0, tx0) = (
        common::cpu_time(pid).unwrap(),
        received.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed),
    );
    std::thread::sleep(window);
    let (busy1, total1) = cpu_jiffies(cpu_of);
    let (cpu1, rx1, tx1) = (
        common::cpu_time(pid).unwrap(),
        received.load(Ordering::Relaxed),
        sent.load(Ordering::Relaxed),
    );
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(mut p) = perf {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
        let _ = p.wait();
    }
    let trains1 = trains();
    stop.store(true, Ordering::Relaxed);
    load_thread.join().unwrap();
    sink_thread.join().unwrap();

    let delivered = (rx1 - rx0) as f64;
    let cores = if pin {
        1.0
    } else {
        std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
    };
    let f = Figures {
        offered_gbit: (tx1 - tx0) as f64 * 8.0 / elapsed / 1e9,
        delivered_gbit: delivered * 8.0 / elapsed / 1e9,
        cpu_per_gb: (cpu1 - cpu0).as_secs_f64() / (delivered / 1e9),
        busy_cores: (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64 * cores,
        gro_trains: trains1.zip(trains0).map_or(0, |(a, b)| a - b),
    };
    assert!(
        f.delivered_gbit > 0.0,
        "{kind:?}: nothing reached the sink (offered {:.2} Gbit/s)\n{}\n{}",
        f.offered_gbit,
        gateway.output_tails(),
        gw.exec(&["curl", "-s", &format!("http://{METRICS}/metrics")], CMD)
            .map(|o| String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n"))
            .unwrap_or_default()
    );
    drop(gateway);
    f
}

fn main() {
    require_root(
        "gateway_ceiling bench",
        "it creates network namespaces, TUN devices and nftables tables",
    );
    require_programs(&[
        ("wireguard-go", "wireguard-go"),
        ("wg", "wireguard-tools"),
        ("nft", "nftables"),
        ("ip", "iproute2"),
        ("ethtool", "ethtool"),
        ("taskset", "util-linux"),
        ("curl", "curl"),
    ]);
    let peers = knob("KR_BENCH_CEILING_PEERS", 4) as usize;
    let window = Duration::from_secs(knob("KR_BENCH_WINDOW_S", 5));
    let pin = knob("KR_BENCH_PIN", 1) != 0;
    let bin = gateway_bin();
    let dir = tempfile::tempdir().unwrap();
    let only = std::env::var("KURAYA_BENCH_GATEWAYS").unwrap_or_default();
    // KR_BENCH_DECRYPT_THREADS=1,2: one TUN row per value (`--decrypt-threads N`).
    let threads: Vec<String> = std::env::var("KR_BENCH_DECRYPT_THREADS")
        .map(|v| {
            v.split(',')
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let mut runs: Vec<(String, Kind, PathBuf, Vec<String>)> = Vec::new();
    for k in [Kind::Tun, Kind::Userspace, Kind::WireguardGo]
        .into_iter()
        .filter(|k| *k == Kind::WireguardGo || only.is_empty() || only.split(',').any(|w| w.trim() == k.short()))
    {
        if k == Kind::Tun && !threads.is_empty() {
            for t in &threads {
                let args = vec!["--decrypt-threads".to_string(), t.clone()];
                runs.push((format!("tun, {t} decrypt thread(s)"), k, bin.clone(), args));
            }
        } else {
            runs.push((k.short().to_string(), k, bin.clone(), Vec::new()));
        }
    }
    if let Some(b) = std::env::var_os("KURAYA_BENCH_BASELINE_BIN") {
        // In the mode measured: TUN, or userspace when only that is asked for.
        let kind = if only.trim() == "userspace" {
            Kind::Userspace
        } else {
            Kind::Tun
        };
        runs.insert(
            0,
            (
                format!("{} (baseline {})", kind.short(), Path::new(&b).display()),
                kind,
                PathBuf::from(b),
                Vec::new(),
            ),
        );
    }
    let figures: Vec<(String, Kind, Figures)> = runs
        .into_iter()
        .map(|(label, k, bin, extra)| (label, k, measure(k, &bin, &extra, dir.path(), peers, pin, window)))
        .collect();
    let wg = figures.iter().find(|(_, k, _)| *k == Kind::WireguardGo).unwrap().2;

    println!("{}", common::machine());
    println!(
        "{peers} peers, GSO trains of {TRAIN} x {} B datagrams, {} s window, {}",
        1_400 + 32,
        window.as_secs(),
        if pin {
            "gateway pinned to CPU 0, load and sink to CPU 1"
        } else {
            "not pinned"
        }
    );
    println!(
        "| gateway | offered Gbit/s | delivered Gbit/s | gateway CPU s/GB | Gbit per gateway CPU-second | busy cores | Gbit/s per busy core | UDP GRO trains |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (label, _, f) in &figures {
        println!(
            "| {label} | {:.2} | {:.2} ({}) | {:.2} ({}) | {:.2} | {:.2} | {:.2} ({}) | {} |",
            f.offered_gbit,
            f.delivered_gbit,
            common::ratio(f.delivered_gbit, wg.delivered_gbit),
            f.cpu_per_gb,
            common::ratio(f.cpu_per_gb, wg.cpu_per_gb),
            f.per_cpu_second(),
            f.busy_cores,
            f.per_core(),
            common::ratio(f.per_core(), wg.per_core()),
            f.gro_trains,
        );
        common::result(
            &format!("ceiling {label} Gbit/s per busy core"),
            format!("{:.2}", f.per_core()),
        );
    }
    println!("(ratios are to wireguard-go in the same run)");
}

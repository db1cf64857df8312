//! Gateway data planes against wireguard-go: `cargo bench --bench gateway_tun` (root).
//!
//! One topology for all three, in namespaces this program creates and removes:
//!
//! ```text
//! laptop (wireguard-go wg0, 100.64.0.2) --veth 192.0.2.0/24-- gateway --veth 198.51.100.0/24-- services
//! ```
//!
//! The "services" namespace owns the Service range 10.96.0.0/16 (a local route) and runs
//! `iperf3 -s` on a ClusterIP; the gateway namespace routes that range to it. Through each
//! gateway in turn: our `kuberaya-gateway` (release build) with `--dataplane tun`, with the
//! default userspace data plane, and a stock wireguard-go interface as the server peer with
//! `ip_forward` and an nftables masquerade in the gateway namespace; it runs TCP iperf3 with
//! one and four streams (`-t 5`) and one stream the other way (`-R`), and `ping -c 40 -i 0.05` (idle, before iperf3, and again right after it), and prints throughput, CPU time
//! of the gateway process per GB received (utime+stime from /proc/<pid>/stat), latency, and
//! the ratios to wireguard-go. Needs root, /dev/net/tun, wireguard-go, wg, iperf3, nft.
//! `KURAYA_BENCH_GATEWAYS=tun` (or `userspace`, comma-separated) measures only those of
//! ours, against wireguard-go. `KURAYA_BENCH_PERF=DIR` records a `perf record -e cpu-clock
//! -g` profile of each gateway process during its one-stream run into `DIR/<gateway>-<pid>.data`
//! (and of the download into `DIR/<gateway>-R-<pid>.data`); `KURAYA_BENCH_PERF_GRAPH=dwarf`
//! records the stacks by DWARF unwinding (the release build has no frame pointers);
//! `KURAYA_BENCH_PERF_STAT=1` counts instead (`perf stat`: CPU time, context switches,
//! preemptions, and the data plane's system calls) into `DIR/<gateway>[-R]-<pid>.stat`.
//! `KURAYA_BENCH_GATEWAY_BIN=PATH` measures that gateway binary instead of building one;
//! `KURAYA_BENCH_BASELINE_BIN=PATH` measures another one in TUN mode as well (in userspace
//! mode when `KURAYA_BENCH_GATEWAYS=userspace`), before/after a change in one run. `KR_BENCH_PIN=1` pins the gateway to CPU 0 and the clients, the
//! Services and the receive processing of the veths' far ends (RPS) to CPU 1, so that the
//! gateway's CPU is its own work (else the kernel runs the Service's TCP receive inside the
//! gateway's write). `KURAYA_BENCH_CLIENT=gso` replaces the laptop's wireguard-go with
//! a client that sends UDP GSO trains and takes GRO trains (`common::gso_client`), as
//! wireguard-go has since 2023: the one here sends a datagram per system call, which makes
//! the gateway pay a receive per datagram.

mod common;

use common::wg::{
    GW_VETH, LAPTOP_VETH, Topology, forward_for_wireguard_go, gateway_args, gateway_bin, keypair, wireguard_go, write,
};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kuberaya_e2e::gateway::PeerKey;
use kuberaya_e2e::netns::{Netns, require_programs, require_root};
use kuberaya_e2e::{Process, b64_decode, poll_until_blocking};

const CMD: Duration = Duration::from_secs(30);
const SECONDS: u32 = 5;
const PERF_IP: &str = "10.96.0.20";
const PEER: &str = "100.64.0.2";
const GW_TUNNEL: &str = "100.64.0.1";
const PORT: u16 = 51820;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gateway {
    Tun,
    Userspace,
    WireguardGo,
}

impl Gateway {
    fn short(self) -> &'static str {
        match self {
            Gateway::Tun => "tun",
            Gateway::Userspace => "userspace",
            Gateway::WireguardGo => "wireguard-go",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Gateway::Tun => "kuberaya-gateway --dataplane tun",
            Gateway::Userspace => "kuberaya-gateway (userspace)",
            Gateway::WireguardGo => "wireguard-go + ip_forward + masquerade",
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Figures {
    /// Mbit/s received, one stream and four.
    mbps: [f64; 2],
    /// Gateway CPU seconds per GB received, one stream and four.
    cpu_per_gb: [f64; 2],
    /// One stream the other way (`iperf3 -R`: Service → laptop, the gateway encrypts):
    /// Mbit/s and gateway CPU seconds per GB.
    down_mbps: f64,
    down_cpu_per_gb: f64,
    /// ping min/median/avg/max in ms, on the idle tunnel (before iperf3).
    rtt: [f64; 4],
    /// The same right after the four-stream iperf3 run.
    rtt_after: [f64; 4],
}

/// utime + stime of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    common::cpu_time(pid)
        .expect("the gateway's /proc/<pid>/stat")
        .as_secs_f64()
}

/// `KR_BENCH_PIN=1`: the gateway on CPU 0, everything else on CPU 1; `2`: the gateway on
/// CPU 0 and the veths' far-end receive on CPU 1, the rest where the scheduler puts it.
fn pinned() -> bool {
    common::knob("KR_BENCH_PIN", 0) != 0
}

/// What runs a program on the CPU of the clients and the Services when pinned.
fn on_cpu1() -> Vec<&'static str> {
    if common::knob("KR_BENCH_PIN", 0) == 1 {
        vec!["taskset", "-c", "1"]
    } else {
        vec![]
    }
}

/// The receive processing of `dev` in `ns` (the kernel's backlog, and for a Service its
/// TCP) on CPU 1: with `KR_BENCH_PIN=1` the gateway's sends end, as on a real node, where
/// the packet leaves; what the receiver's kernel does with it is not the gateway's cost.
fn receive_on_cpu1(ns: &Netns, dev: &str) {
    let set = format!("echo 2 > /sys/class/net/{dev}/queues/rx-0/rps_cpus");
    let out = ns.exec(&["sh", "-c", &set], CMD).unwrap();
    assert!(out.status.success(), "{set}: {}", String::from_utf8_lossy(&out.stderr));
}

fn iperf(laptop: &Netns, streams: u32, reverse: bool) -> (f64, u64) {
    let (t, p) = (SECONDS.to_string(), streams.to_string());
    let mut args = on_cpu1();
    args.extend([
        "iperf3",
        "-c",
        PERF_IP,
        "-t",
        &t,
        "-P",
        &p,
        "-J",
        "--connect-timeout",
        "3000",
    ]);
    if reverse {
        args.push("-R");
    }
    let out = laptop.exec(&args, Duration::from_secs(60)).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "iperf3 -P {streams}: {}", v["error"]);
    let sum = &v["end"]["sum_received"];
    (
        sum["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6,
        sum["bytes"].as_u64().unwrap_or(0),
    )
}

/// min/median/avg/max of 40 pings, in ms. The median, which a few descheduled replies on
/// a busy machine do not move, is what the ratio is taken of.
fn ping(laptop: &Netns) -> [f64; 4] {
    let out = laptop.exec(&["ping", "-c", "40", "-i", "0.05", PERF_IP], CMD).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // 64 bytes from 10.96.0.20: icmp_seq=1 ttl=63 time=0.153 ms
    let mut times: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert!(!times.is_empty(), "ping: {text}");
    times.sort_by(f64::total_cmp);
    let avg = times.iter().sum::<f64>() / times.len() as f64;
    [times[0], times[times.len() / 2], avg, times[times.len() - 1]]
}

/// `KURAYA_BENCH_CLIENT=gso`: the laptop's client sends and receives in UDP GSO/GRO trains.
fn gso_client() -> bool {
    std::env::var("KURAYA_BENCH_CLIENT").is_ok_and(|c| c == "gso")
}

/// KURAYA_BENCH_PERF=DIR: a cpu-clock profile of the gateway process (all its threads,
/// kernel included) until [`perf_stop`], in DIR/<gateway><what>-<pid>.data.
fn perf_record(kind: Gateway, pid: u32, what: &str) -> Option<std::process::Child> {
    let d = std::env::var_os("KURAYA_BENCH_PERF")?;
    if std::env::var_os("KURAYA_BENCH_PERF_STAT").is_some() {
        return Some(perf_stat(
            &Path::new(&d).join(format!("{}{what}-{pid}.stat", kind.short())),
            pid,
        ));
    }
    let out = Path::new(&d).join(format!("{}{what}-{pid}.data", kind.short()));
    // KURAYA_BENCH_PERF_GRAPH=dwarf: stacks through code built without frame pointers.
    let graph = std::env::var("KURAYA_BENCH_PERF_GRAPH").unwrap_or_else(|_| "fp".into());
    let p = Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "--call-graph",
            &graph,
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(out)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("perf record (linux-perf)");
    Some(p)
}

/// Counts for the gateway process (all its threads): a switch away while still runnable
/// (`prev_state == 0`) is a preemption; the rest are waits for I/O.
fn perf_stat(out: &Path, pid: u32) -> std::process::Child {
    const SYSCALLS: &str = "syscalls:sys_enter_read,syscalls:sys_enter_write,syscalls:sys_enter_recvmmsg,\
                            syscalls:sys_enter_sendmmsg,syscalls:sys_enter_epoll_wait";
    Command::new("perf")
        .args(["stat", "-e", "task-clock,context-switches", "-e", "sched:sched_switch"])
        .args([
            "--filter",
            "prev_state == 0",
            "-e",
            SYSCALLS,
            "-p",
            &pid.to_string(),
            "-o",
        ])
        .arg(out)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("perf stat (linux-perf)")
}

fn perf_stop(perf: Option<std::process::Child>) {
    if let Some(mut p) = perf {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(p.id() as i32, libc::SIGINT) };
        let _ = p.wait();
    }
}

fn measure(kind: Gateway, gateway_bin: &Path, dir: &Path) -> Figures {
    let Topology { laptop, gw, svc } = Topology::new("bench");
    let mut server = on_cpu1();
    server.extend(["iperf3", "-s", "-B", PERF_IP]);
    let _iperf = svc.spawn(&server).unwrap();
    if pinned() {
        receive_on_cpu1(&svc, "to-gw");
        receive_on_cpu1(&laptop, "to-gw");
    }
    let gw_cpu: &[&str] = if pinned() { &["taskset", "-c", "0"] } else { &[] };

    let (gw_private, gw_public) = keypair();
    let (peer_private, peer_public) = keypair();
    let listen = format!("{GW_VETH}:{PORT}");
    let gateway: Process = match kind {
        Gateway::Tun | Gateway::Userspace => {
            let key = write(dir, "gw.key", &gw_private);
            let peers = serde_json::json!([{"namespace": "default", "name": "alice",
                "spec": {"publicKey": peer_public, "address": PEER, "allow": [{"service": "perf"}]}}]);
            let services = serde_json::json!([{"namespace": "default", "name": "perf", "clusterIP": PERF_IP,
                "ports": [{"name": "iperf", "port": 5201}]}]);
            let peers = write(dir, "peers.json", &peers.to_string());
            let services = write(dir, "services.json", &services.to_string());
            let args = gateway_args(
                gw_cpu,
                gateway_bin,
                &listen,
                &key,
                &peers,
                &services,
                "127.0.0.1:0",
                kind == Gateway::Tun,
            );
            let mut p = gw.spawn(&args).unwrap();
            p.wait_for_stdout_line("kuberaya-gateway listening", CMD).unwrap();
            p
        }
        Gateway::WireguardGo => {
            let conf = write(
                dir,
                "wg1.conf",
                &format!(
                    "[Interface]\nPrivateKey = {gw_private}\nListenPort = {PORT}\n\n\
                     [Peer]\nPublicKey = {peer_public}\nAllowedIPs = {PEER}/32\n"
                ),
            );
            forward_for_wireguard_go(&gw);
            wireguard_go(&gw, gw_cpu, "wg1", &conf, &format!("{GW_TUNNEL}/16"), &[])
        }
    };
    let routes = ["10.96.0.0/16", &format!("{GW_TUNNEL}/32")];
    // The laptop's client: Debian's wireguard-go, or (KURAYA_BENCH_CLIENT=gso) one that
    // sends GSO trains and receives GRO trains, as wireguard-go has since 2023.
    let mut counts = None;
    let _client: Box<dyn std::any::Any> = if gso_client() {
        let secret: [u8; 32] = b64_decode(&peer_private).unwrap().try_into().unwrap();
        let gw_key: [u8; 32] = b64_decode(&gw_public).unwrap().try_into().unwrap();
        let c = common::gso_client::start(
            &laptop,
            (common::knob("KR_BENCH_PIN", 0) == 1).then_some(1),
            "wg0",
            LAPTOP_VETH.parse().unwrap(),
            &PeerKey::new(secret, PEER.parse().unwrap()),
            gw_key,
            listen.parse().unwrap(),
            &routes,
        );
        counts = Some(c.counts.clone());
        Box::new(c)
    } else {
        let conf = write(
            dir,
            "wg0.conf",
            &format!(
                "[Interface]\nPrivateKey = {peer_private}\n\n[Peer]\nPublicKey = {gw_public}\n\
                 Endpoint = {listen}\nAllowedIPs = 10.96.0.0/16, {GW_TUNNEL}/32\nPersistentKeepalive = 25\n"
            ),
        );
        Box::new(wireguard_go(
            &laptop,
            &on_cpu1(),
            "wg0",
            &conf,
            &format!("{PEER}/32"),
            &routes,
        ))
    };
    // The first handshake and the iperf3 server.
    let ready = poll_until_blocking(Duration::from_secs(20), || {
        let o = laptop
            .exec(&["iperf3", "-c", PERF_IP, "-t", "1", "--connect-timeout", "1000"], CMD)
            .ok()?;
        o.status.success().then_some(())
    });
    assert!(
        ready.is_some(),
        "{kind:?}: no iperf3 through the gateway\n{}",
        gateway.output_tails()
    );

    let pid = gateway.pid();
    let mut f = Figures {
        rtt: ping(&laptop),
        ..Figures::default()
    };
    for (i, streams) in [1, 4].into_iter().enumerate() {
        let perf = (streams == 1).then(|| perf_record(kind, pid, "")).flatten();
        let before = cpu_seconds(pid);
        let moved = counts.as_ref().map(|c| c.snapshot());
        let (mbps, bytes) = iperf(&laptop, streams, false);
        let cpu = cpu_seconds(pid) - before;
        if let (Some(c), Some(b)) = (&counts, moved) {
            let [s, t, r, rr] = c.snapshot();
            let [s, t, r, rr] = [s - b[0], t - b[1], r - b[2], rr - b[3]];
            eprintln!(
                "{kind:?} -P {streams}: the client sent {s} datagrams in {t} trains ({:.1} each), \
                 received {r} in {rr} receives ({:.1} each)",
                s as f64 / t.max(1) as f64,
                r as f64 / rr.max(1) as f64
            );
        }
        perf_stop(perf);
        f.mbps[i] = mbps;
        f.cpu_per_gb[i] = cpu / (bytes as f64 / 1e9);
    }
    f.rtt_after = ping(&laptop);
    let perf = perf_record(kind, pid, "-R");
    let before = cpu_seconds(pid);
    let (mbps, bytes) = iperf(&laptop, 1, true);
    perf_stop(perf);
    f.down_mbps = mbps;
    f.down_cpu_per_gb = (cpu_seconds(pid) - before) / (bytes as f64 / 1e9);
    f
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter we do not have.
    require_root(
        "gateway_tun bench",
        "it creates network namespaces, TUN devices and nftables tables",
    );
    require_programs(&[
        ("wireguard-go", "wireguard-go"),
        ("wg", "wireguard-tools"),
        ("iperf3", "iperf3"),
        ("nft", "nftables"),
        ("ping", "iputils-ping"),
        ("ip", "iproute2"),
        ("ethtool", "ethtool"),
        ("taskset", "util-linux"),
    ]);
    let bin = gateway_bin();

    let dir = tempfile::tempdir().unwrap();
    // KURAYA_BENCH_GATEWAYS=tun,userspace (a subset) skips the others; wireguard-go, the
    // reference of the ratios, is always measured.
    let only = std::env::var("KURAYA_BENCH_GATEWAYS").unwrap_or_default();
    let mut runs: Vec<(String, Gateway, PathBuf)> = [Gateway::Tun, Gateway::Userspace, Gateway::WireguardGo]
        .into_iter()
        .filter(|k| *k == Gateway::WireguardGo || only.is_empty() || only.split(',').any(|w| w.trim() == k.short()))
        .map(|k| (k.label().to_string(), k, bin.clone()))
        .collect();
    // KURAYA_BENCH_BASELINE_BIN: another build (say, before a change) in TUN mode too, first,
    // so that before and after are measured in one run, under the same load.
    // In userspace mode when only that one is asked for.
    if let Some(b) = std::env::var_os("KURAYA_BENCH_BASELINE_BIN") {
        let mode = if only.trim() == "userspace" {
            Gateway::Userspace
        } else {
            Gateway::Tun
        };
        let label = format!("{} (baseline {})", mode.label(), Path::new(&b).display());
        runs.insert(0, (label, mode, PathBuf::from(b)));
    }
    let figures: Vec<(String, Gateway, Figures)> = runs
        .into_iter()
        .map(|(label, k, bin)| {
            let f = measure(k, &bin, dir.path());
            (label, k, f)
        })
        .collect();
    let wg = figures.iter().find(|(_, k, _)| *k == Gateway::WireguardGo).unwrap().2;

    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "host {} ({cpus} CPUs), load {}",
        host.trim(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!(
        "| gateway | 1 stream Mbit/s | 4 streams Mbit/s | CPU s/GB (1) | CPU s/GB (4) | download (-R) Mbit/s | CPU s/GB (-R) | ping idle min/med/avg/max ms | ping after iperf3 min/med/avg/max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (label, _, f) in &figures {
        println!(
            "| {} | {:.0} ({:.2}x) | {:.0} ({:.2}x) | {:.2} ({:.2}x) | {:.2} ({:.2}x) | {:.0} ({:.2}x) | {:.2} ({:.2}x) | {:.3}/{:.3}/{:.3}/{:.3} ({:.2}x med) | {:.3}/{:.3}/{:.3}/{:.3} ({:.2}x med) |",
            label,
            f.mbps[0],
            f.mbps[0] / wg.mbps[0],
            f.mbps[1],
            f.mbps[1] / wg.mbps[1],
            f.cpu_per_gb[0],
            f.cpu_per_gb[0] / wg.cpu_per_gb[0],
            f.cpu_per_gb[1],
            f.cpu_per_gb[1] / wg.cpu_per_gb[1],
            f.down_mbps,
            f.down_mbps / wg.down_mbps,
            f.down_cpu_per_gb,
            f.down_cpu_per_gb / wg.down_cpu_per_gb,
            f.rtt[0],
            f.rtt[1],
            f.rtt[2],
            f.rtt[3],
            f.rtt[1] / wg.rtt[1],
            f.rtt_after[0],
            f.rtt_after[1],
            f.rtt_after[2],
            f.rtt_after[3],
            f.rtt_after[1] / wg.rtt_after[1],
        );
    }
    println!("(ratios are to wireguard-go; the gateway process only: wireguard-go's CPU includes its TUN I/O)");
    if gso_client() {
        println!("(the laptop's client: GSO/GRO trains, common::gso_client)");
    }
    if pinned() {
        println!("(pinned: the gateway on CPU 0; clients, Services and the veths' far-end receive on CPU 1)");
    }
}

//! wireguard-go as a bench's reference peer, and the files and keys it takes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kuberaya_e2e::netns::{self, Netns, VethEnd, in_namespaces_of, run_ok};
use kuberaya_e2e::{Process, poll_until_blocking};

const CMD: Duration = Duration::from_secs(30);

/// A fresh WireGuard key pair (private, public) in base64, from `wg genkey | wg pubkey`.
pub fn keypair() -> (String, String) {
    let private = run_ok(cmd("wg", &["genkey"]), CMD).unwrap().trim().to_string();
    let mut pubkey = Command::new("sh");
    pubkey.args(["-c", "printf %s \"$0\" | wg pubkey", &private]);
    let public = run_ok(pubkey, CMD).unwrap().trim().to_string();
    (private, public)
}

pub fn cmd(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// `text` written to `dir/name`; its path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// A wireguard-go interface `iface` in `ns`, configured with `wg setconf` from `conf`;
/// `prefix` goes before the program (say `taskset -c 0`).
pub fn wireguard_go(ns: &Netns, prefix: &[&str], iface: &str, conf: &Path, address: &str, routes: &[&str]) -> Process {
    let mut args: Vec<&str> = prefix.to_vec();
    args.extend(["wireguard-go", "-f", iface]);
    let p = ns.spawn_with_private_dir("/var/run/wireguard", &args).unwrap();
    let pid = p.pid();
    let up = poll_until_blocking(Duration::from_secs(15), || {
        run_ok(in_namespaces_of(pid, &["wg", "show", iface]), CMD).ok()
    });
    assert!(
        up.is_some(),
        "wireguard-go {iface} did not come up\n{}",
        p.output_tails()
    );
    run_ok(
        in_namespaces_of(
            pid,
            &["wg".as_ref(), "setconf".as_ref(), iface.as_ref(), conf.as_os_str()],
        ),
        CMD,
    )
    .unwrap();
    ns.ip(["address", "add", address, "dev", iface]).unwrap();
    ns.ip(["link", "set", "mtu", "1420", "up", "dev", iface]).unwrap();
    for r in routes {
        ns.ip(["route", "add", r, "dev", iface]).unwrap();
    }
    p
}

/// The gateway's address on the laptop's veth, where it listens.
pub const GW_VETH: &str = "192.0.2.1";
pub const LAPTOP_VETH: &str = "192.0.2.2";

/// The namespaces of the gateway benches, which remove themselves when dropped:
///
/// ```text
/// laptop --veth 192.0.2.0/24-- gw --veth 198.51.100.0/24-- svc (owns 10.96.0.0/16)
/// ```
///
/// GRO is on at the gateway's side of the laptop's veth, UDP included
/// (`rx-udp-gro-forwarding`: a veth hands a local sender's datagrams to GRO only with it),
/// as a NIC would do it, so that a client's UDP GSO train reaches the gateway whole.
pub struct Topology {
    pub laptop: Netns,
    pub gw: Netns,
    pub svc: Netns,
}

impl Topology {
    pub fn new(prefix: &str) -> Topology {
        let laptop = Netns::unique(&format!("{prefix}-laptop")).unwrap();
        let gw = Netns::unique(&format!("{prefix}-gw")).unwrap();
        let svc = Netns::unique(&format!("{prefix}-svc")).unwrap();
        netns::veth_pair(
            VethEnd {
                ns: &laptop,
                name: "to-gw",
                address: &format!("{LAPTOP_VETH}/24"),
            },
            VethEnd {
                ns: &gw,
                name: "to-laptop",
                address: &format!("{GW_VETH}/24"),
            },
        )
        .unwrap();
        netns::veth_pair(
            VethEnd {
                ns: &gw,
                name: "to-svc",
                address: "198.51.100.1/24",
            },
            VethEnd {
                ns: &svc,
                name: "to-gw",
                address: "198.51.100.2/24",
            },
        )
        .unwrap();
        let gro = gw.exec(
            &["ethtool", "-K", "to-laptop", "gro", "on", "rx-udp-gro-forwarding", "on"],
            CMD,
        );
        if !gro.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("ethtool -K to-laptop gro on: {gro:?} (measuring without veth GRO)");
        }
        svc.ip(["route", "add", "local", "10.96.0.0/16", "dev", "lo"]).unwrap();
        gw.ip(["route", "add", "10.96.0.0/16", "via", "198.51.100.2"]).unwrap();
        Topology { laptop, gw, svc }
    }
}

/// What a stock wireguard-go server in `gw` needs to forward its peers (100.64.0.0/16) to
/// the services: `ip_forward` and a masquerade.
pub fn forward_for_wireguard_go(gw: &Netns) {
    gw.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"], CMD).unwrap();
    let nft = "table ip bench { chain post { type nat hook postrouting priority 100; \
               ip saddr 100.64.0.0/16 oifname != \"wg1\" masquerade; }; }";
    let out = gw.exec(&["nft", nft], CMD).unwrap();
    assert!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr));
}

/// `kuberaya-gateway` (`bin`, after `prefix`) listening on `listen` with static files, its
/// health endpoint on a free port and metrics on `metrics`; `--dataplane tun` if `tun`.
#[allow(clippy::too_many_arguments)]
pub fn gateway_args(
    prefix: &[&str],
    bin: &Path,
    listen: &str,
    key: &Path,
    peers: &Path,
    services: &Path,
    metrics: &str,
    tun: bool,
) -> Vec<String> {
    let mut args: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
    args.push(bin.display().to_string());
    for (flag, value) in [
        ("--listen", listen),
        ("--private-key-file", key.to_str().unwrap()),
        ("--peers-file", peers.to_str().unwrap()),
        ("--services-file", services.to_str().unwrap()),
        ("--metrics-bind-address", metrics),
        ("--health-bind-address", "127.0.0.1:0"),
    ] {
        args.extend([flag.to_string(), value.to_string()]);
    }
    if tun {
        args.extend(["--dataplane", "tun"].map(String::from));
    }
    args
}

/// `KURAYA_BENCH_GATEWAY_BIN`, or else a `cargo build --release` of the gateway binary:
/// the binary the gateway benches measure.
pub fn gateway_bin() -> PathBuf {
    if let Some(b) = std::env::var_os("KURAYA_BENCH_GATEWAY_BIN") {
        return PathBuf::from(b);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = super::release_build(&["-p", "kuberaya-gateway", "--bin", "kuberaya-gateway"]).unwrap();
    assert!(status.success(), "building the gateway in release");
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    target.join("release").join("kuberaya-gateway")
}

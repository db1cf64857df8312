//! The TUN data plane's kernel configuration over netlink, against the real kernel and read
//! back with the real tools: the gateway's nftables table (`kuberaya_gateway::dataplane::nft`)
//! as `nft -j list` prints it, and per-interface IPv4 forwarding
//! (`kuberaya_gateway::dataplane::forwarding`) as `/proc/sys/net/ipv4/conf/*/forwarding`
//! shows it, with `net.ipv4.ip_forward` left at 0 as in a pod.
//!
//! Three namespaces: a "peer" on the tunnel range (100.64.0.0/16), the "gateway" between
//! it and a "service" host on TEST-NET-1. The gateway's device in the rules is its veth
//! to the peer (standing for the TUN device: the rules only look at names). Then real
//! traffic checks what the rules and the forwarding are for: the peer reaches the service
//! (forwarded with `ip_forward` 0, masqueraded: the service has no route back), and the
//! service cannot open a connection to the peer.
//!
//! Needs root and `nft` (`nftables`); without them the test fails saying so.

use std::os::fd::AsRawFd;
use std::time::Duration;

use ipnet::Ipv4Net;
use kuberaya_e2e::netns::{self, Netns, VethEnd, require_programs, require_root, run_ok};
use kuberaya_gateway::dataplane::{forwarding, nft};
use serde_json::Value;

const CMD: Duration = Duration::from_secs(15);
/// The gateway's device in the rules: its interface towards the peer.
const DEVICE: &str = "to-peer";
const PEER: &str = "100.64.0.2";
const SERVICE: &str = "192.0.2.2";

/// Run `f` on a thread inside `ns`'s network namespace (`setns` moves the calling thread
/// only), as the gateway runs in its pod's.
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let path = format!("/run/netns/{}", ns.name());
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a namespace file this test created; it affects this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns into {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    })
}

fn sh(ns: &Netns, script: &str) -> String {
    run_ok(ns.command(&["sh", "-c", script]), CMD)
        .unwrap()
        .trim()
        .to_string()
}

/// `nft -j list table ip kuberaya-gateway` without handles and metainfo: what compares.
fn listed(ns: &Netns) -> Option<Vec<Value>> {
    let out = netns::run(ns.command(&["nft", "-j", "list", "table", "ip", nft::TABLE]), CMD).unwrap();
    if !out.status.success() {
        return None;
    }
    let mut doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = doc["nftables"].as_array_mut().unwrap();
    items.retain(|i| i.get("metainfo").is_none());
    for i in items.iter_mut() {
        for v in i.as_object_mut().unwrap().values_mut() {
            v.as_object_mut().unwrap().remove("handle");
        }
    }
    Some(items.clone())
}

/// The table as the gateway's earlier versions had `nft` compile it, in nft's own syntax.
fn reference(range: Ipv4Net) -> String {
    let tunnel = |chain: &str| {
        format!(
            "  chain {chain} {{\n    type filter hook {chain} priority 0; policy accept;\n    \
             oifname \"{DEVICE}\" ct state established,related accept\n    oifname \"{DEVICE}\" drop\n  }}\n"
        )
    };
    format!(
        "table ip {} {{\n  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    \
         ip saddr {range} oifname != \"{DEVICE}\" masquerade\n  }}\n{}{}}}\n",
        nft::TABLE,
        tunnel("forward"),
        tunnel("output")
    )
}

fn ping(ns: &Netns, to: &str) -> bool {
    netns::run(ns.command(&["ping", "-c", "1", "-W", "1", to]), CMD)
        .unwrap()
        .status
        .success()
}

#[test]
fn the_gateway_table_and_forwarding_over_netlink_as_nft_and_the_kernel_see_them() {
    require_root(
        "the_gateway_table_and_forwarding_over_netlink_as_nft_and_the_kernel_see_them",
        "it creates network namespaces, veth pairs and nftables tables",
    );
    require_programs(&[("ip", "iproute2"), ("nft", "nftables"), ("ping", "iputils-ping")]);
    let range: Ipv4Net = "100.64.0.0/16".parse().unwrap();

    // Namespaces are deleted on drop, also when an assertion fails.
    let peer = Netns::unique("nl-peer").unwrap();
    let gw = Netns::unique("nl-gw").unwrap();
    let service = Netns::unique("nl-svc").unwrap();
    let reference_ns = Netns::unique("nl-ref").unwrap();
    let veth = |a: (&Netns, &str, &str), b: (&Netns, &str, &str)| {
        netns::veth_pair(
            VethEnd {
                ns: a.0,
                name: a.1,
                address: a.2,
            },
            VethEnd {
                ns: b.0,
                name: b.1,
                address: b.2,
            },
        )
        .unwrap()
    };
    veth((&peer, "to-gw", "100.64.0.2/16"), (&gw, DEVICE, "100.64.0.1/16"));
    veth((&gw, "to-svc", "192.0.2.1/24"), (&service, "to-gw", "192.0.2.2/24"));
    peer.ip(["route", "add", "192.0.2.0/24", "via", "100.64.0.1"]).unwrap();
    service
        .ip(["route", "add", "100.64.0.0/16", "via", "192.0.2.1"])
        .unwrap();

    // As in a pod: no global forwarding (and none per interface yet).
    let proc = |path: &str| sh(&gw, &format!("cat /proc/sys/net/ipv4/{path}"));
    sh(&gw, "echo 0 > /proc/sys/net/ipv4/ip_forward");
    assert_eq!(proc("ip_forward"), "0");
    assert_eq!(proc(&format!("conf/{DEVICE}/forwarding")), "0");
    assert!(!ping(&peer, SERVICE), "forwarded before forwarding was switched on");

    // A table left by a crashed gateway, with a chain of an older version.
    sh(
        &gw,
        &format!("nft add table ip {0} && nft add chain ip {0} stale", nft::TABLE),
    );

    let done = in_netns(&gw, || {
        let done = forwarding::enable().expect("forwarding over rtnetlink");
        nft::install(DEVICE, range).expect("the table over netlink");
        done
    });
    let mut devices = match done {
        forwarding::Forwarding::Devices(d) => d,
        other => panic!("ip_forward is 0, yet {other:?}"),
    };
    devices.sort();
    assert_eq!(devices, [DEVICE, "to-svc"]);
    assert_eq!(proc("ip_forward"), "0", "the global switch is left alone");
    assert_eq!(proc(&format!("conf/{DEVICE}/forwarding")), "1");
    assert_eq!(proc("conf/to-svc/forwarding"), "1");
    assert_eq!(proc("conf/lo/forwarding"), "0", "loopback is left alone");

    // The same table as nft compiles from the rules in its own syntax.
    run_ok(reference_ns.command(&["nft", &reference(range)]), CMD).unwrap();
    let expected = listed(&reference_ns).expect("the reference table");
    let got = listed(&gw).expect("the gateway's table");
    assert_eq!(
        got,
        expected,
        "ours:\n{}\nnft's:\n{}",
        serde_json::to_string_pretty(&got).unwrap(),
        serde_json::to_string_pretty(&expected).unwrap()
    );
    let text = sh(&gw, &format!("nft list table ip {}", nft::TABLE));
    assert!(
        !text.contains("stale"),
        "the crashed gateway's table was not replaced: {text}"
    );
    assert!(
        text.contains(&format!("ip saddr {range} oifname != \"{DEVICE}\" masquerade")),
        "{text}"
    );
    assert!(text.contains("ct state established,related accept"), "{text}");

    // Installed again (a restart): still one table, the same rules.
    in_netns(&gw, || nft::install(DEVICE, range)).expect("the table, again");
    assert_eq!(listed(&gw).as_ref(), Some(&expected), "installed twice");
    let tables = sh(&gw, "nft list tables");
    assert_eq!(tables.matches(nft::TABLE).count(), 1, "{tables}");

    // What the rules are for. Into the tunnel, the service cannot open a connection...
    assert!(!ping(&service, PEER), "a new connection into the tunnel got through");
    // ...and the peer reaches the service, forwarded with ip_forward 0 and masqueraded:
    // without its route back, the service can only answer the gateway.
    service.ip(["route", "del", "100.64.0.0/16"]).unwrap();
    assert!(
        ping(&peer, SERVICE),
        "the peer's ping was not forwarded and masqueraded"
    );

    // Removed, and removing again is no error.
    in_netns(&gw, nft::remove).expect("removing the table");
    assert_eq!(listed(&gw), None, "the table is still there");
    in_netns(&gw, nft::remove).expect("removing a missing table");
}

/// Without CAP_NET_ADMIN the kernel refuses, and the error says so by its errno.
#[test]
fn without_net_admin_the_kernel_refuses_with_eperm() {
    require_root(
        "without_net_admin_the_kernel_refuses_with_eperm",
        "it creates a network namespace and drops a capability in it",
    );
    let ns = Netns::unique("nl-noadm").unwrap();
    let err = in_netns(&ns, || {
        drop_net_admin();
        nft::install(DEVICE, "100.64.0.0/16".parse().unwrap()).expect_err("installed without CAP_NET_ADMIN")
    });
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert!(err.to_string().contains("Operation not permitted"), "{err}");
}

/// Drop CAP_NET_ADMIN from the calling thread's effective set (capset, version 3).
fn drop_net_admin() {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    const CAP_NET_ADMIN: u32 = 12;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data words, for this thread only.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()), 0);
        d[0].effective &= !(1 << CAP_NET_ADMIN);
        assert_eq!(libc::syscall(libc::SYS_capset, &h, d.as_ptr()), 0);
    }
}

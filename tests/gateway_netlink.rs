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
//! The IPv6 half (`the_ipv6_table_forwarding_and_address_...`) does the same over IPv6: the
//! `ip6` table of a dual-stack install, `force_forwarding` per interface with
//! `net.ipv6.conf.all.forwarding` left at 0, the gateway's tunnel address put on its device
//! over rtnetlink, and the peer (on the tunnel ULA range) reaching a service on an IPv6
//! "ClusterIP" range, masqueraded, the service unable to reach the peer. With `/proc/sys`
//! read-only, as in a pod, enabling IPv6 forwarding fails naming the pod sysctl.
//!
//! Needs root and `nft` (`nftables`); without them the test fails saying so.

use std::os::fd::AsRawFd;
use std::time::Duration;

use std::net::Ipv6Addr;

use ipnet::{Ipv4Net, Ipv6Net};
use kuberaya_e2e::netns::{self, Netns, VethEnd, require_programs, require_root, run_ok};
use kuberaya_gateway::dataplane::{address, forwarding, nft};
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
    listed_family(ns, "ip")
}

/// [`listed`] for the table of `family` (`ip`, `ip6`).
fn listed_family(ns: &Netns, family: &str) -> Option<Vec<Value>> {
    let out = netns::run(ns.command(&["nft", "-j", "list", "table", family, nft::TABLE]), CMD).unwrap();
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
    reference_family("ip", &range.to_string())
}

/// [`reference`] for the table of `family` (`ip`, `ip6`) and a range of that family.
fn reference_family(family: &str, range: &str) -> String {
    let tunnel = |chain: &str| {
        format!(
            "  chain {chain} {{\n    type filter hook {chain} priority 0; policy accept;\n    \
             oifname \"{DEVICE}\" ct state established,related accept\n    oifname \"{DEVICE}\" drop\n  }}\n"
        )
    };
    format!(
        "table {family} {} {{\n  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    \
         {family} saddr {range} oifname != \"{DEVICE}\" masquerade\n  }}\n{}{}}}\n",
        nft::TABLE,
        tunnel("forward"),
        tunnel("output")
    )
}

fn ping(ns: &Netns, to: &str) -> bool {
    let family = if to.contains(':') { "-6" } else { "-4" };
    netns::run(ns.command(&["ping", family, "-c", "1", "-W", "1", to]), CMD)
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

const PEER_V6: &str = "fd6b:7261:7961::2";
const GATEWAY_V6: &str = "fd6b:7261:7961::1";
const SERVICE_V6: &str = "fd00:96::2";

/// `ip -6 addr add <address> dev <device> nodad` in `ns` (usable at once, no DAD wait).
fn add_v6(ns: &Netns, address: &str, device: &str) {
    ns.ip(["-6", "addr", "add", address, "dev", device, "nodad"]).unwrap();
}

#[test]
fn the_ipv6_table_forwarding_and_address_over_netlink_as_nft_and_the_kernel_see_them() {
    require_root(
        "the_ipv6_table_forwarding_and_address_over_netlink_as_nft_and_the_kernel_see_them",
        "it creates network namespaces, veth pairs and nftables tables",
    );
    require_programs(&[("ip", "iproute2"), ("nft", "nftables"), ("ping", "iputils-ping")]);
    let range: Ipv4Net = "100.64.0.0/16".parse().unwrap();
    let range_v6: Ipv6Net = "fd6b:7261:7961::/64".parse().unwrap();

    let peer = Netns::unique("nl6-peer").unwrap();
    let gw = Netns::unique("nl6-gw").unwrap();
    let service = Netns::unique("nl6-svc").unwrap();
    let reference_ns = Netns::unique("nl6-ref").unwrap();
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
    add_v6(&peer, &format!("{PEER_V6}/64"), "to-gw");
    add_v6(&gw, "fd00:96::1/64", "to-svc");
    add_v6(&service, &format!("{SERVICE_V6}/64"), "to-gw");
    peer.ip(["-6", "route", "add", "fd00:96::/64", "via", GATEWAY_V6])
        .unwrap();
    service
        .ip(["-6", "route", "add", &range_v6.to_string(), "via", "fd00:96::1"])
        .unwrap();

    // The gateway's tunnel address over rtnetlink: the address and its connected route.
    let gateway: Ipv6Addr = GATEWAY_V6.parse().unwrap();
    in_netns(&gw, || address::add_v6(DEVICE, gateway, range_v6.prefix_len())).expect("the address over rtnetlink");
    in_netns(&gw, || address::add_v6(DEVICE, gateway, range_v6.prefix_len())).expect("added again (a restart)");
    let addrs = sh(&gw, &format!("ip -6 addr show dev {DEVICE} scope global"));
    assert_eq!(addrs.matches(&format!("inet6 {GATEWAY_V6}/64")).count(), 1, "{addrs}");
    assert!(!addrs.contains("tentative"), "nodad: usable at once: {addrs}");
    let routes = sh(&gw, &format!("ip -6 route show dev {DEVICE}"));
    assert!(routes.contains(&format!("{range_v6} proto kernel")), "{routes}");
    let missing = in_netns(&gw, || address::add_v6("kr-nope", gateway, 64)).unwrap_err();
    assert!(missing.to_string().contains("no interface kr-nope"), "{missing}");

    // As in a pod: no IPv6 forwarding anywhere.
    let proc = |path: &str| sh(&gw, &format!("cat /proc/sys/net/ipv6/conf/{path}"));
    sh(&gw, "echo 0 > /proc/sys/net/ipv6/conf/all/forwarding");
    assert_eq!(proc("all/forwarding"), "0");
    assert!(ping(&peer, GATEWAY_V6), "the gateway's own tunnel address answers");
    assert!(!ping(&peer, SERVICE_V6), "forwarded before forwarding was switched on");

    let done = in_netns(&gw, || {
        let done = forwarding::enable_v6().expect("IPv6 forwarding");
        nft::install_dual_stack(DEVICE, range, Some(range_v6)).expect("both tables over netlink");
        done
    });
    let mut devices = match done {
        forwarding::ForwardingV6::Devices(d) => d,
        other => panic!("all.forwarding is 0 and the kernel has force_forwarding, yet {other:?}"),
    };
    devices.sort();
    assert_eq!(devices, [DEVICE, "to-svc"]);
    assert_eq!(proc("all/forwarding"), "0", "the global switch is left alone");
    assert_eq!(proc(&format!("{DEVICE}/force_forwarding")), "1");
    assert_eq!(proc("to-svc/force_forwarding"), "1");
    assert_eq!(proc("lo/force_forwarding"), "0", "loopback is left alone");

    // Both tables, each as nft compiles it from the rules in its own syntax.
    run_ok(reference_ns.command(&["nft", &reference(range)]), CMD).unwrap();
    run_ok(
        reference_ns.command(&["nft", &reference_family("ip6", &range_v6.to_string())]),
        CMD,
    )
    .unwrap();
    for family in ["ip", "ip6"] {
        let expected = listed_family(&reference_ns, family).expect("the reference table");
        let got = listed_family(&gw, family).expect("the gateway's table");
        assert_eq!(
            got,
            expected,
            "{family}: ours:\n{}\nnft's:\n{}",
            serde_json::to_string_pretty(&got).unwrap(),
            serde_json::to_string_pretty(&expected).unwrap()
        );
    }
    let text = sh(&gw, &format!("nft list table ip6 {}", nft::TABLE));
    assert!(
        text.contains(&format!("ip6 saddr {range_v6} oifname != \"{DEVICE}\" masquerade")),
        "{text}"
    );

    // Into the tunnel, the service cannot open a connection over IPv6...
    assert!(
        !ping(&service, PEER_V6),
        "a new IPv6 connection into the tunnel got through"
    );
    // ...and the peer reaches the service, forwarded with all.forwarding 0 and masqueraded.
    service.ip(["-6", "route", "del", &range_v6.to_string()]).unwrap();
    assert!(
        ping(&peer, SERVICE_V6),
        "the peer's IPv6 ping was not forwarded and masqueraded"
    );

    // Installed again without an IPv6 range: the ip6 table goes, the ip one stays.
    in_netns(&gw, || nft::install_dual_stack(DEVICE, range, None)).expect("IPv4 only");
    assert_eq!(listed_family(&gw, "ip6"), None, "the ip6 table is still there");
    assert!(listed_family(&gw, "ip").is_some());
    in_netns(&gw, || nft::install_dual_stack(DEVICE, range, Some(range_v6))).unwrap();
    in_netns(&gw, nft::remove_dual_stack).expect("removing both tables");
    assert_eq!(listed_family(&gw, "ip"), None);
    assert_eq!(listed_family(&gw, "ip6"), None);
    in_netns(&gw, nft::remove_dual_stack).expect("removing missing tables");
}

/// With `/proc/sys` read-only, as a container runtime mounts it in a pod, IPv6 forwarding
/// cannot be switched on, and the error names the pod sysctl that does it; IPv4's, over
/// rtnetlink, still works.
#[test]
fn with_a_read_only_proc_sys_ipv6_forwarding_names_the_pod_sysctl() {
    require_root(
        "with_a_read_only_proc_sys_ipv6_forwarding_names_the_pod_sysctl",
        "it creates a network namespace and a private mount namespace",
    );
    let ns = Netns::unique("nl6-ro").unwrap();
    // Both ends of a veth pair in the namespace (this kernel has no dummy devices).
    ns.ip(["link", "add", "eth0", "type", "veth", "peer", "name", "eth1"])
        .unwrap();
    sh(
        &ns,
        "echo 0 > /proc/sys/net/ipv6/conf/all/forwarding; echo 0 > /proc/sys/net/ipv4/ip_forward",
    );
    let (v6, v4) = in_netns(&ns, || {
        read_only_proc_sys();
        (forwarding::enable_v6(), forwarding::enable())
    });
    let e = v6.expect_err("IPv6 forwarding switched on through a read-only /proc/sys");
    let text = e.to_string();
    assert!(matches!(e, forwarding::ForwardingV6Error::NotWritable { .. }), "{text}");
    assert!(
        text.contains("/force_forwarding") && text.contains("Read-only file system"),
        "{text}"
    );
    assert!(text.contains("net.ipv6.conf.all.forwarding=1"), "{text}");
    let forwarding::Forwarding::Devices(mut v4) = v4.expect("IPv4 forwarding over rtnetlink") else {
        panic!("ip_forward is 0");
    };
    v4.sort();
    assert_eq!(v4, ["eth0", "eth1"]);
    assert_eq!(sh(&ns, "cat /proc/sys/net/ipv6/conf/eth0/force_forwarding"), "0");
    assert_eq!(sh(&ns, "cat /proc/sys/net/ipv4/conf/eth0/forwarding"), "1");
}

/// Give the calling thread its own mount namespace with `/proc/sys` bound read-only over
/// itself (what runc's `readonlyPaths` does), nothing propagating back to the host.
fn read_only_proc_sys() {
    use std::ffi::CString;
    let c = |s: &str| CString::new(s).unwrap();
    let (root, sys) = (c("/"), c("/proc/sys"));
    // SAFETY: unshare and mount on this thread's own new mount namespace; the strings live
    // across the calls.
    unsafe {
        assert_eq!(
            libc::unshare(libc::CLONE_NEWNS),
            0,
            "unshare: {}",
            std::io::Error::last_os_error()
        );
        let rc = libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        assert_eq!(rc, 0, "making / private: {}", std::io::Error::last_os_error());
        let rc = libc::mount(
            sys.as_ptr(),
            sys.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        );
        assert_eq!(rc, 0, "binding /proc/sys: {}", std::io::Error::last_os_error());
        let rc = libc::mount(
            std::ptr::null(),
            sys.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
            std::ptr::null(),
        );
        assert_eq!(
            rc,
            0,
            "remounting /proc/sys read-only: {}",
            std::io::Error::last_os_error()
        );
    }
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

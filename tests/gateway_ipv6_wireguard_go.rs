//! Issue 24, measured end to end: a wireguard-go peer connecting over an IPv6 endpoint
//! reaches an IPv6 ClusterIP by name (`dig AAAA`), and is denied a Service it may not
//! reach, in both data planes.
//!
//! The test builds its own hosts, as tests/gateway_wireguard_go.rs does: a "laptop" and a
//! "cluster" network namespace joined by a veth pair with IPv4 (TEST-NET-1) and ULA IPv6
//! addresses (`fd00:1::2` ↔ `fd00:1::1`). Everything of the cluster runs inside its
//! namespace: the Kubernetes API stand-in as a dual-stack kube-apiserver
//! (`--service-cidr 10.96.0.0/16,fd00:96::/112`), `kuberaya-gateway` in Kubernetes mode
//! listening on `[::]:51820`, `kubectl` and `kuberaya`. Two `PreferDualStack` Services get a
//! ClusterIP of each family from the stand-in, and python's http.server answers on each
//! (the IPv4 range is local to the host, each IPv6 ClusterIP an address on `lo`). The
//! gateway Service's load-balancer ingress lists the cluster's veth addresses (IPv4
//! first, as a CCM writes them).
//!
//! The laptop's config is what `kuberaya peer add --endpoint-family ipv6` writes
//! (`Endpoint = [fd00:1::1]:51820`, both tunnel addresses, both DNS servers), brought up on
//! wireguard-go with `wg setconf` and `ip`. Then, through the tunnel: `dig AAAA` of the
//! allowed Service answers its IPv6 ClusterIP (asked of the gateway's IPv6 and IPv4 tunnel
//! addresses), `curl -6` gets its page; the other Service is NXDOMAIN and its IPv6
//! ClusterIP does not answer; `wg show` has the gateway at its IPv6 endpoint.
//!
//! Needs root; without it the tests fail with a message saying so.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kuberaya_e2e::netns::{self, Netns, VethEnd, in_namespaces_of, require_programs, require_root, run};
use kuberaya_e2e::wg_quick::WgQuick;
use kuberaya_e2e::{Process, binary, poll_until_blocking};

/// The longest one client command (curl, dig, wg, kubectl) may take.
const CMD: Duration = Duration::from_secs(20);
const LAPTOP_VETH: &str = "192.0.2.2";
const CLUSTER_VETH: &str = "192.0.2.1";
const LAPTOP_VETH6: &str = "fd00:1::2";
const CLUSTER_VETH6: &str = "fd00:1::1";
const SERVICE_CIDRS: &str = "10.96.0.0/16,fd00:96::/112";
const GATEWAY_NS: &str = "kuberaya-system";
const APPS: &str = "apps";
const BODY: &str = "hello from web over IPv6";
const SECRET_BODY: &str = "the secret service";
/// The gateway's tunnel addresses (its defaults: `--tunnel-cidr`, `--tunnel-range-v6`).
const GATEWAY_TUNNEL: &str = "100.64.0.1";
const GATEWAY_TUNNEL6: &str = "fd6b:7261:7961::1";
const GW_TUN: &str = "kr-gw0";

/// Which data plane the gateway runs (`--dataplane`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plane {
    Userspace,
    Tun,
    /// TUN mode where `/proc/sys` is read-only, as in a pod without the IPv6 forwarding
    /// sysctl: IPv4 in the kernel, the peers' IPv6 through userspace.
    TunReadOnlySysctls,
}

#[test]
fn wireguard_go_over_ipv6_reaches_an_ipv6_cluster_ip_by_name_and_nothing_else() {
    require_root(
        "wireguard_go_over_ipv6_reaches_an_ipv6_cluster_ip_by_name_and_nothing_else",
        "it creates network namespaces, a veth pair, a TUN device and tmpfs mounts",
    );
    scenario(Plane::Userspace);
}

/// The same with `--dataplane tun`: the kernel forwards the peer's IPv6 (the gateway's
/// `ip6` table masquerades it), with `net.ipv6.conf.all.forwarding` left at 0.
#[test]
fn wireguard_go_over_ipv6_through_the_tun_data_plane() {
    require_root(
        "wireguard_go_over_ipv6_through_the_tun_data_plane",
        "it creates network namespaces, a veth pair, TUN devices, nftables tables and tmpfs mounts",
    );
    let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun");
    assert!(tun.is_ok(), "the TUN data plane needs /dev/net/tun: {:?}", tun.err());
    require_programs(&[("nft", "nftables")]);
    scenario(Plane::Tun);
}

/// TUN mode in a pod that does not set `net.ipv6.conf.all.forwarding` (`/proc/sys`
/// read-only): the gateway still starts, says why IPv6 stays in userspace, and the peer
/// gets everything it gets in the other modes.
#[test]
fn wireguard_go_over_ipv6_through_tun_mode_without_ipv6_forwarding() {
    require_root(
        "wireguard_go_over_ipv6_through_tun_mode_without_ipv6_forwarding",
        "it creates network namespaces, a veth pair, TUN devices, nftables tables and mounts",
    );
    require_programs(&[("nft", "nftables")]);
    scenario(Plane::TunReadOnlySysctls);
}

/// Everything inside one namespace, at most [`CMD`]; panics when the command cannot run.
fn exec(ns: &Netns, args: &[&str]) -> std::process::Output {
    ns.exec(args, CMD).unwrap_or_else(|e| panic!("{e:#}"))
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The cluster's API: the stand-in's admin kubeconfig, used from inside the cluster's
/// namespace, with a HOME of the test's own.
struct Api<'a> {
    ns: &'a Netns,
    kubeconfig: PathBuf,
    home: PathBuf,
}

impl Api<'_> {
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut cmd = self.ns.command(&[program]);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd.env("HOME", &self.home).env_remove("KUBECONFIG");
        cmd
    }

    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = run(self.command(program, args), CMD).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.run("kubectl", args)
    }

    fn apply(&self, dir: &Path, name: &str, yaml: &str) {
        let file = dir.join(name);
        std::fs::write(&file, yaml).unwrap();
        self.kubectl(&["apply", "-f", file.to_str().unwrap()]);
    }

    /// The ClusterIPs of Service `ns/name`, in its order (IPv4 first here).
    fn cluster_ips(&self, ns: &str, name: &str) -> Vec<String> {
        self.kubectl(&["get", "service", "-n", ns, name, "-o", "jsonpath={.spec.clusterIPs[*]}"])
            .split_whitespace()
            .map(String::from)
            .collect()
    }
}

fn service_yaml(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  \
         ipFamilyPolicy: PreferDualStack\n  ports:\n  - name: http\n    port: 80\n"
    )
}

/// Serve `body` on `[ip]:80` inside `ns` with python's http.server; waits until it answers.
fn http_server(ns: &Netns, dir: &Path, ip: &str, body: &str) -> Process {
    let root = dir.join(ip.replace(':', "_"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("index.html"), body).unwrap();
    let p = ns
        .spawn(&[
            "python3",
            "-m",
            "http.server",
            "--bind",
            ip,
            "--directory",
            root.to_str().unwrap(),
            "80",
        ])
        .unwrap();
    let url = url(ip);
    let up = poll_until_blocking(Duration::from_secs(15), || {
        (curl(ns, &[], &url).1 == body).then_some(())
    });
    assert!(
        up.is_some(),
        "the fake Service on {ip} did not come up\n{}",
        p.output_tails()
    );
    p
}

fn url(ip: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]/")
    } else {
        format!("http://{ip}/")
    }
}

fn curl(ns: &Netns, extra: &[&str], url: &str) -> (bool, String) {
    let mut args = vec!["curl", "-sS", "-g", "-m", "3"];
    args.extend_from_slice(extra);
    args.push(url);
    let out = exec(ns, &args);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `dig TYPE name @server`: the answer's status and the records of the type.
fn dig(ns: &Netns, server: &str, name: &str, ty: &str) -> (String, Vec<String>) {
    let at = format!("@{server}");
    let out = exec(ns, &["dig", "+time=2", "+tries=2", &at, name, ty]);
    let full = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = full
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("no answer")
        .to_string();
    let records = full
        .lines()
        .filter(|l| !l.starts_with(';'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[3] == ty).then(|| f[4].to_string())
        })
        .collect();
    (status, records)
}

fn scenario(plane: Plane) {
    require_programs(&[
        ("wireguard-go", "wireguard-go"),
        ("wg", "wireguard-tools"),
        ("wg-quick", "wireguard-tools"),
        ("dig", "dnsutils"),
        ("curl", "curl"),
        ("ip", "iproute2"),
        ("nsenter", "util-linux"),
        ("python3", "python3"),
        ("kubectl", "kubectl"),
        ("ping", "iputils-ping"),
    ]);
    let dir = tempfile::tempdir().unwrap();

    // Hosts first: dropped last, after every process below is stopped.
    let laptop = Netns::unique("laptop6").unwrap();
    let cluster = Netns::unique("cluster6").unwrap();
    netns::veth_pair(
        VethEnd {
            ns: &laptop,
            name: "to-cluster",
            address: &format!("{LAPTOP_VETH}/24"),
        },
        VethEnd {
            ns: &cluster,
            name: "to-laptop",
            address: &format!("{CLUSTER_VETH}/24"),
        },
    )
    .unwrap();
    // IPv6 on the veth, usable at once (no duplicate address detection to wait for).
    laptop
        .ip([
            "-6",
            "addr",
            "add",
            &format!("{LAPTOP_VETH6}/64"),
            "dev",
            "to-cluster",
            "nodad",
        ])
        .unwrap();
    cluster
        .ip([
            "-6",
            "addr",
            "add",
            &format!("{CLUSTER_VETH6}/64"),
            "dev",
            "to-laptop",
            "nodad",
        ])
        .unwrap();
    // The IPv4 Service range is local to the cluster host (ClusterIPs bind without an
    // address each); IPv6 has no such binding, so each IPv6 ClusterIP goes on `lo` below.
    cluster
        .ip(["route", "add", "local", "10.96.0.0/16", "dev", "lo"])
        .unwrap();

    // The API server stand-in, dual-stack, inside the cluster.
    let kubeconfig = dir.path().join("kubeconfig");
    let mut stand_in_cmd = vec![binary("kuberaya-sandbox").to_str().unwrap().to_string()];
    stand_in_cmd.extend(
        [
            "kube",
            "--state-dir",
            dir.path().join("kube").to_str().unwrap(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--service-cidr",
            SERVICE_CIDRS,
        ]
        .map(String::from),
    );
    let mut stand_in = cluster.spawn(&stand_in_cmd).unwrap();
    kuberaya_e2e::kube_stand_in::wait_listening(&mut stand_in, Duration::from_secs(60)).unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let api = Api {
        ns: &cluster,
        kubeconfig: kubeconfig.clone(),
        home,
    };
    let root = env!("CARGO_MANIFEST_DIR");
    api.kubectl(&["apply", "-k", &format!("{root}/deploy/crds")]);
    api.kubectl(&["create", "namespace", GATEWAY_NS]);
    api.kubectl(&["create", "namespace", APPS]);
    api.kubectl(&[
        "create",
        "configmap",
        "kuberaya-config",
        "-n",
        GATEWAY_NS,
        &format!("--from-literal=service-cidr={SERVICE_CIDRS}"),
    ]);
    api.apply(dir.path(), "web.yaml", &service_yaml(APPS, "web"));
    api.apply(dir.path(), "secret.yaml", &service_yaml(APPS, "secret"));
    let web = api.cluster_ips(APPS, "web");
    let secret = api.cluster_ips(APPS, "secret");
    assert_eq!(web.len(), 2, "web is dual-stack: {web:?}");
    assert_eq!(secret.len(), 2, "secret is dual-stack: {secret:?}");
    let (web4, web6) = (web[0].as_str(), web[1].as_str());
    let secret6 = secret[1].as_str();
    assert!(
        web6.starts_with("fd00:96::") && secret6.starts_with("fd00:96::"),
        "{web:?} {secret:?}"
    );
    for ip in [web6, secret6] {
        cluster
            .ip(["-6", "addr", "add", &format!("{ip}/128"), "dev", "lo", "nodad"])
            .unwrap();
    }
    let _web4 = http_server(&cluster, dir.path(), web4, BODY);
    let _web6 = http_server(&cluster, dir.path(), web6, BODY);
    let secret6_server = http_server(&cluster, dir.path(), secret6, SECRET_BODY);

    // The gateway's Service, with the load balancer's two addresses (as the CCM writes
    // them: IPv4 first, ipMode VIP); the gateway annotates it with its key and addresses.
    api.apply(
        dir.path(),
        "gateway.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: kuberaya-gateway\n  namespace: {GATEWAY_NS}\nspec:\n  \
             type: LoadBalancer\n  ipFamilyPolicy: PreferDualStack\n  ports:\n  - name: wireguard\n    port: 51820\n    \
             protocol: UDP\n"
        ),
    );
    let ingress = format!(
        r#"{{"status":{{"loadBalancer":{{"ingress":[{{"ip":"{CLUSTER_VETH}","ipMode":"VIP"}},{{"ip":"{CLUSTER_VETH6}","ipMode":"VIP"}}]}}}}}}"#
    );
    api.kubectl(&[
        "patch",
        "service",
        "kuberaya-gateway",
        "-n",
        GATEWAY_NS,
        "--subresource=status",
        "--type=merge",
        "-p",
        &ingress,
    ]);

    // The gateway, in Kubernetes mode, on both families of its one UDP socket.
    let mut gw_cmd = vec![binary("kuberaya-gateway").to_str().unwrap().to_string()];
    gw_cmd.extend(
        [
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--namespace",
            GATEWAY_NS,
            "--listen",
            "[::]:51820",
            "--metrics-bind-address",
            "127.0.0.1:0",
            "--health-bind-address",
            "127.0.0.1:0",
        ]
        .map(String::from),
    );
    let tun = plane != Plane::Userspace;
    if tun {
        gw_cmd.extend(["--dataplane", "tun", "--tun-name", GW_TUN].map(String::from));
        // As in a pod: no global forwarding of either family.
        let off = exec(
            &cluster,
            &[
                "sh",
                "-c",
                "echo 0 > /proc/sys/net/ipv4/ip_forward && echo 0 > /proc/sys/net/ipv6/conf/all/forwarding",
            ],
        );
        assert!(off.status.success(), "{}", text(&off));
    }
    if plane == Plane::TunReadOnlySysctls {
        // The gateway's own mount namespace (`ip netns exec` makes one) with /proc/sys
        // bound read-only over itself, as a container runtime mounts it.
        let mut wrapped: Vec<String> = [
            "sh",
            "-c",
            "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$@\"",
            "sh",
        ]
        .map(String::from)
        .to_vec();
        wrapped.append(&mut gw_cmd);
        gw_cmd = wrapped;
    }
    let mut gw = cluster.spawn_with_private_dir("/var/run/wireguard", &gw_cmd).unwrap();
    gw.wait_for_stdout_line("kuberaya-gateway listening", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", gw.output_tails()));
    let sysctl = |path: &str| {
        let out = exec(&cluster, &["cat", &format!("/proc/sys/net/{path}")]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    match plane {
        Plane::Userspace => {}
        Plane::Tun => {
            assert_eq!(
                sysctl("ipv6/conf/all/forwarding"),
                "0",
                "the gateway wrote the global switch"
            );
            for dev in [GW_TUN, "to-laptop"] {
                assert_eq!(sysctl(&format!("ipv6/conf/{dev}/force_forwarding")), "1", "{dev}");
            }
        }
        Plane::TunReadOnlySysctls => {
            for dev in [GW_TUN, "to-laptop"] {
                assert_eq!(sysctl(&format!("ipv6/conf/{dev}/force_forwarding")), "0", "{dev}");
            }
            let warned = poll_until_blocking(Duration::from_secs(5), || {
                gw.stderr().contains("net.ipv6.conf.all.forwarding=1").then_some(())
            });
            assert!(warned.is_some(), "no warning naming the sysctl:\n{}", gw.output_tails());
            // IPv4 forwarding needs no /proc/sys: still per interface over rtnetlink.
            assert_eq!(sysctl(&format!("ipv4/conf/{GW_TUN}/forwarding")), "1");
        }
    }
    if tun {
        let addrs = cluster.ip(["-6", "addr", "show", "dev", GW_TUN]).unwrap();
        assert!(addrs.contains(&format!("{GATEWAY_TUNNEL6}/64")), "{addrs}");
        let table = exec(&cluster, &["nft", "list", "table", "ip6", "kuberaya-gateway"]);
        assert!(table.status.success(), "no ip6 table: {}", text(&table));
        assert!(
            String::from_utf8_lossy(&table.stdout).contains("masquerade"),
            "{}",
            text(&table)
        );
    }

    // The peer, as an admin would make it: the gateway's IPv6 endpoint.
    let conf_path = dir.path().join("alice.conf");
    let printed = api.run(
        binary("kuberaya").to_str().unwrap(),
        &[
            "peer",
            "add",
            "alice",
            "--allow",
            "apps/web",
            "--endpoint-family",
            "ipv6",
            "--out",
            conf_path.to_str().unwrap(),
        ],
    );
    let conf_text = std::fs::read_to_string(&conf_path).unwrap();
    let conf = WgQuick {
        path: conf_path.clone(),
        text: conf_text.clone(),
    };
    assert!(
        printed.contains(&format!("endpoint [{CLUSTER_VETH6}]:51820")),
        "{printed}"
    );
    assert_eq!(
        conf.values("Endpoint"),
        [format!("[{CLUSTER_VETH6}]:51820")],
        "{conf_text}"
    );
    let addresses = conf.values("Address");
    assert_eq!(addresses.len(), 2, "both tunnel addresses: {conf_text}");
    let peer6 = addresses[1].trim_end_matches("/128").to_string();
    assert!(peer6.starts_with("fd6b:7261:7961::"), "{conf_text}");
    let dns = conf.values("DNS");
    assert_eq!(
        &dns[..2],
        [GATEWAY_TUNNEL, GATEWAY_TUNNEL6],
        "both DNS servers: {conf_text}"
    );
    let allowed = conf.values("AllowedIPs");
    for net in ["10.96.0.0/16", "fd00:96::/112", &format!("{GATEWAY_TUNNEL6}/128")] {
        assert!(allowed.iter().any(|a| a == net), "{net} not routed: {conf_text}");
    }

    // The laptop: wireguard-go with that config.
    let wg_go = laptop
        .spawn_with_private_dir("/var/run/wireguard", &["wireguard-go", "-f", "wg0"])
        .unwrap();
    let wg_pid = wg_go.pid();
    let ready = poll_until_blocking(Duration::from_secs(15), || {
        run(in_namespaces_of(wg_pid, &["wg", "show", "wg0"]), CMD)
            .ok()
            .filter(|o| o.status.success())
    });
    assert!(
        ready.is_some(),
        "wireguard-go did not come up\n{}",
        wg_go.output_tails()
    );
    conf.up(&laptop, wg_pid, "wg0", dir.path()).unwrap();

    // By name over IPv6: AAAA from the gateway's IPv6 tunnel address (and its IPv4 one).
    let name = format!("web.{APPS}.svc.cluster.local");
    let answered = poll_until_blocking(Duration::from_secs(20), || {
        let (status, records) = dig(&laptop, GATEWAY_TUNNEL6, &name, "AAAA");
        (status == "NOERROR" && !records.is_empty()).then_some(records)
    });
    let records = answered.unwrap_or_else(|| {
        panic!(
            "no AAAA for {name} through the tunnel: {:?}\ngateway:\n{}\nwireguard-go:\n{}",
            dig(&laptop, GATEWAY_TUNNEL6, &name, "AAAA"),
            gw.output_tails(),
            wg_go.output_tails()
        )
    });
    assert_eq!(records, [web6], "the IPv6 ClusterIP of web");
    assert_eq!(dig(&laptop, GATEWAY_TUNNEL, &name, "AAAA").1, [web6], "asked over IPv4");
    assert_eq!(dig(&laptop, GATEWAY_TUNNEL6, &name, "A").1, [web4], "A asked over IPv6");

    // The handshake went over IPv6.
    let show = run(in_namespaces_of(wg_pid, &["wg", "show", "wg0", "endpoints"]), CMD).unwrap();
    assert!(
        String::from_utf8_lossy(&show.stdout).contains(&format!("[{CLUSTER_VETH6}]:51820")),
        "{}",
        text(&show)
    );

    // The page, over IPv6 inside the tunnel, by name and by address.
    let (ok, body) = curl(
        &laptop,
        &["-6", "--resolve", &format!("{name}:80:[{web6}]")],
        &format!("http://{name}/"),
    );
    assert!(
        ok && body == BODY,
        "curl -6 {name}: {ok} {body:?}\n{}",
        gw.output_tails()
    );
    let (ok, body) = curl(&laptop, &["-6"], &url(web6));
    assert!(ok && body == BODY, "curl -6 {web6}: {ok} {body:?}");
    // The tunnel's inner families do not depend on the endpoint's: IPv4 through it too.
    let (ok, body) = curl(&laptop, &["-4"], &url(web4));
    assert!(
        ok && body == BODY,
        "curl -4 {web4} over the IPv6 endpoint: {ok} {body:?}"
    );

    // The Service the peer may not reach: NXDOMAIN for AAAA as for A, and its IPv6
    // ClusterIP does not answer (the cluster side serves it, as the check above showed).
    let secret_name = format!("secret.{APPS}.svc.cluster.local");
    for ty in ["AAAA", "A"] {
        let (status, records) = dig(&laptop, GATEWAY_TUNNEL6, &secret_name, ty);
        assert_eq!((status.as_str(), records.len()), ("NXDOMAIN", 0), "{ty} {secret_name}");
    }
    assert_eq!(
        curl(&cluster, &[], &url(secret6)).1,
        SECRET_BODY,
        "secret serves in the cluster"
    );
    let requests = |p: &Process| p.stderr().matches("\"GET /").count();
    let seen_before = requests(&secret6_server);
    let (ok, body) = curl(&laptop, &["-6"], &url(secret6));
    assert!(!ok && body.is_empty(), "the peer reached secret over IPv6: {body:?}");
    assert_eq!(
        requests(&secret6_server),
        seen_before,
        "the denied Service saw a request"
    );

    // ICMPv6 echo: answered for the allowed ClusterIP, not for the denied one.
    let ping = |ip: &str| exec(&laptop, &["ping", "-6", "-c", "3", "-i", "0.2", "-W", "2", ip]);
    let out = ping(web6);
    assert!(out.status.success(), "ping -6 to an allowed ClusterIP: {}", text(&out));
    let out = ping(secret6);
    assert!(
        !out.status.success(),
        "ping -6 to a denied ClusterIP answered: {}",
        text(&out)
    );
    // ...and the allowed one still does (the refusal cut nothing else).
    assert_eq!(curl(&laptop, &["-6"], &url(web6)).1, BODY);
    drop(wg_go);
    drop(gw);
    if tun {
        let gone = exec(&cluster, &["nft", "list", "table", "ip6", "kuberaya-gateway"]);
        assert!(
            !gone.status.success(),
            "the ip6 table outlived the gateway: {}",
            text(&gone)
        );
    }
}

//! `kuberaya sandbox up --ip-family dual`, run inside a network namespace the test makes
//! (the sandbox's IPv6 ranges are `local` routes on that namespace's `lo`, never the
//! host's), met with the real `kubectl` and `curl`: dual-stack Services get a ClusterIP of
//! each family, pods an address of each, EndpointSlices one per family, and kube-proxy
//! serves the IPv6 ClusterIP; `sandbox down` removes the routes. With the sandbox's CCM
//! and gateway: load balancers of both families, source ranges by family, and a VPN peer
//! over the gateway's IPv6 endpoint.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::netns::require_programs;
use kuberaya_e2e::sandbox::{User, WgPeer, conf_value, onetun_path, output_text};
use kuberaya_e2e::{Netns, Process, binary, poll_until_blocking, require_root};
use serde_json::Value;

const TEST: &str = "sandbox_dual_stack";

/// A dual-stack sandbox running in its own network namespace; `sandbox down --purge`
/// (inside the namespace, where its routes are) on drop, then the namespace goes.
struct DualSandbox {
    state: PathBuf,
    user: User,
    /// Dropped after the sandbox is down.
    ns: Netns,
    dir: tempfile::TempDir,
}

impl DualSandbox {
    fn up(extra: &[&str]) -> Result<DualSandbox> {
        let dir = tempfile::tempdir()?;
        let ns = Netns::unique("dual")?;
        let state = dir.path().join("sb");
        let sandbox = DualSandbox {
            user: User {
                kubeconfig: state.join("kubeconfig"),
                work: dir.path().to_path_buf(),
                netns: Some(ns.name().to_string()),
            },
            state,
            ns,
            dir,
        };
        let mut args = vec!["sandbox", "up", "--detach", "--ip-family", "dual", "--workers", "2"];
        args.extend_from_slice(extra);
        let up = sandbox.kuberaya(&args, Duration::from_secs(150))?;
        ensure!(up.status.success(), "sandbox up --ip-family dual: {}", output_text(&up));
        Ok(sandbox)
    }

    /// `kuberaya ARGS --state-dir STATE` inside the namespace, with a registry of sandbox
    /// ranges of its own (the namespace is a machine of its own).
    fn kuberaya(&self, args: &[&str], timeout: Duration) -> Result<Output> {
        let tmp = self.dir.path().join("tmp");
        std::fs::create_dir_all(&tmp)?;
        let mut cmd = self.ns.command(&[binary("kuberaya").as_os_str()]);
        cmd.args(args).arg("--state-dir").arg(&self.state).env("TMPDIR", &tmp);
        kuberaya_e2e::netns::run(cmd, timeout)
    }

    fn in_ns(&self, args: &[&str]) -> Result<Output> {
        self.ns.exec(args, Duration::from_secs(20))
    }

    fn local_routes(&self) -> Result<String> {
        self.ns.ip(["-6", "route", "show", "table", "local"])
    }
}

impl Drop for DualSandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- sandbox.log (tail) ---\n{}",
                kuberaya_e2e::sandbox::log_tail(&self.state, 60)
            );
        }
        let _ = self.kuberaya(&["sandbox", "down", "--purge"], Duration::from_secs(30));
    }
}

fn json(text: &str) -> Result<Value> {
    serde_json::from_str(text).with_context(|| format!("not JSON: {text}"))
}

fn write(dir: &Path, name: &str, text: &str) -> Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    Ok(path.to_str().context("utf-8")?.to_string())
}

const WEB: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: any
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  ipFamilyPolicy: PreferDualStack
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web6
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 8080
";

/// `curl` inside the namespace; the body when it answered 200.
fn curl(sb: &DualSandbox, family: &str, url: &str) -> Option<String> {
    curl_with(sb, &[family], url)
}

/// [`curl`] with more options (`-6 --interface ADDR`).
fn curl_with(sb: &DualSandbox, options: &[&str], url: &str) -> Option<String> {
    let mut args = vec!["curl"];
    args.extend_from_slice(options);
    args.extend_from_slice(&["-sS", "--fail", "--max-time", "3", url]);
    let out = sb.in_ns(&args).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_dual_stack_sandbox_gives_services_pods_and_slices_both_families() -> Result<()> {
    require_root(TEST, "it creates a network namespace and adds IPv6 routes inside it");
    require_programs(&[("ip", "iproute2"), ("curl", "curl"), ("kubectl", "kubectl")]);
    let sb = DualSandbox::up(&["--no-gateway"])?;
    // One local route per IPv6 range, on the namespace's lo.
    let routes = sb.local_routes()?;
    for range in ["fd00:203::/112", "fd00:10::/112", "fd00:96::/112", "fd00:244::/48"] {
        ensure!(
            routes.contains(&format!("local {range} dev lo")),
            "no local route of {range}:\n{routes}"
        );
    }
    let status = sb.kuberaya(&["sandbox", "status"], Duration::from_secs(20))?;
    ensure!(
        String::from_utf8_lossy(&status.stdout).contains("IP families: IPv4, IPv6"),
        "sandbox status: {}",
        output_text(&status)
    );

    let file = write(sb.dir.path(), "web.yaml", WEB)?;
    sb.user.kubectl(&["apply", "-f", &file])?;
    let svc = json(&sb.user.kubectl(&["get", "service", "web", "-o", "json"])?)?;
    ensure!(
        svc["spec"]["ipFamilies"] == serde_json::json!(["IPv4", "IPv6"]),
        "{svc}"
    );
    let ips: Vec<String> = serde_json::from_value(svc["spec"]["clusterIPs"].clone())?;
    ensure!(ips.len() == 2, "two ClusterIPs: {ips:?}");
    let (v4, v6) = (ips[0].clone(), ips[1].clone());
    ensure!(v4.starts_with("127.96.") && v6.starts_with("fd00:96::"), "{ips:?}");
    let described = sb.user.kubectl(&["describe", "service", "web6"])?;
    ensure!(
        described.contains("IP Families:              IPv6,IPv4")
            && described.contains("IP Family Policy:         RequireDualStack"),
        "{described}"
    );
    let web6_ip = sb
        .user
        .kubectl(&["get", "service", "web6", "-o", "jsonpath={.spec.clusterIP}"])?;
    ensure!(web6_ip.starts_with("fd00:96::"), "IPv6 first: {web6_ip}");

    // Pods: an address of each family, IPv4 first; slices: one per family.
    let pods = poll_until_blocking(Duration::from_secs(30), || {
        let out = sb
            .user
            .kubectl(&[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={range .items[*]}{.status.podIPs[*].ip}{\"\\n\"}{end}",
            ])
            .ok()?;
        let lines: Vec<String> = out.lines().map(str::to_string).filter(|l| l.contains(' ')).collect();
        (lines.len() == 2).then_some(lines)
    })
    .context("two pods with two addresses each")?;
    for p in &pods {
        let (a, b) = p.split_once(' ').context("two addresses")?;
        ensure!(
            a.starts_with("127.244.") && b.starts_with("fd00:244:0:"),
            "pod addresses {p}"
        );
    }
    let slices = poll_until_blocking(Duration::from_secs(30), || {
        let out = sb
            .user
            .kubectl(&[
                "get",
                "endpointslices",
                "-l",
                "kubernetes.io/service-name=web",
                "-o",
                "jsonpath={range .items[*]}{.addressType} {.endpoints[*].addresses[0]}{\"\\n\"}{end}",
            ])
            .ok()?;
        let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
        lines.sort();
        (lines.len() == 2 && lines.iter().all(|l| l.split(' ').count() == 3)).then_some(lines)
    })
    .context("an EndpointSlice per family with both pods")?;
    ensure!(
        slices[0].starts_with("IPv4 127.244.") && slices[1].starts_with("IPv6 fd00:244:0:"),
        "{slices:?}"
    );

    // kube-proxy serves both ClusterIPs; the pods answer on both of their addresses.
    let six = poll_until_blocking(Duration::from_secs(30), || curl(&sb, "-6", &format!("http://[{v6}]/")))
        .context("the IPv6 ClusterIP answers")?;
    ensure!(six.starts_with("pod=web-"), "{six}");
    let four = curl(&sb, "-4", &format!("http://{v4}/")).context("the IPv4 ClusterIP answers")?;
    ensure!(four.starts_with("pod=web-"), "{four}");
    let first = pods[0].split_once(' ').context("two addresses")?.1.to_string();
    let direct = curl(&sb, "-6", &format!("http://[{first}]:8080/")).context("a pod's IPv6 address answers")?;
    ensure!(direct.starts_with("pod=web-"), "{direct}");

    // Back to single-stack: the IPv6 ClusterIP goes and is served no more.
    sb.user.kubectl(&[
        "patch",
        "service",
        "web",
        "-p",
        r#"{"spec":{"ipFamilyPolicy":"SingleStack"}}"#,
    ])?;
    let gone = poll_until_blocking(Duration::from_secs(15), || {
        curl(&sb, "-6", &format!("http://[{v6}]/")).is_none().then_some(())
    });
    ensure!(gone.is_some(), "{v6} still answers after SingleStack");

    // Down removes the routes.
    let down = sb.kuberaya(&["sandbox", "down"], Duration::from_secs(30))?;
    ensure!(down.status.success(), "sandbox down: {}", output_text(&down));
    let routes = sb.local_routes()?;
    ensure!(!routes.contains("fd00:"), "routes left after down:\n{routes}");
    Ok(())
}

/// A Service's `status.loadBalancer.ingress` as (ip, ipMode).
fn ingress(sb: &DualSandbox, ns: &str, name: &str) -> Result<Vec<(String, String)>> {
    let svc = json(&sb.user.kubectl(&["get", "service", "-n", ns, name, "-o", "json"])?)?;
    Ok(svc["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["ip"].as_str().unwrap_or_default().to_string(),
                i["ipMode"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// Waits for two ingress entries (IPv4, then IPv6 from the platform's IPv6 pool), each
/// `ipMode: VIP`; returns the two addresses.
fn wait_dual_ingress(sb: &DualSandbox, ns: &str, name: &str) -> Result<(String, String)> {
    let entries = poll_until_blocking(Duration::from_secs(60), || {
        let e = ingress(sb, ns, name).ok()?;
        (e.len() == 2).then_some(e)
    })
    .with_context(|| format!("{ns}/{name}: two ingress entries"))?;
    ensure!(
        entries.iter().all(|(_, mode)| mode == "VIP"),
        "{ns}/{name}: ipMode VIP on each: {entries:?}"
    );
    let (v4, v6) = (entries[0].0.clone(), entries[1].0.clone());
    ensure!(
        v4.parse::<std::net::Ipv4Addr>().is_ok() && v6.starts_with("fd00:203::"),
        "{ns}/{name}: IPv4 first, then IPv6 of fd00:203::/112: {entries:?}"
    );
    Ok((v4, v6))
}

const LB: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: any
        ports:
        - containerPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: LoadBalancer
  ipFamilyPolicy: PreferDualStack
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 8080
---
apiVersion: v1
kind: Service
metadata:
  name: guarded
spec:
  type: LoadBalancer
  ipFamilyPolicy: RequireDualStack
  loadBalancerSourceRanges: [\"127.0.0.0/8\", \"fd00:99::/64\"]
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 8080
";

/// The issue's measured end to end, in the dual-stack sandbox with its CCM and gateway:
/// a `PreferDualStack` LoadBalancer Service gets two ingress IPs (IPv4 first, `ipMode:
/// VIP`) and answers curl on both; with `loadBalancerSourceRanges` of both families,
/// `curl -6` from a source outside them is refused while one inside is served;
/// `RequireDualStack` works; kubectl shows both ClusterIPs; the gateway's own Service is
/// dual-stack too, and a peer (`kuberaya peer add --endpoint-family ipv6`, onetun)
/// connecting over its IPv6 address reaches an IPv6 ClusterIP.
#[test]
fn a_prefer_dual_stack_load_balancer_answers_on_both_families() -> Result<()> {
    require_root(TEST, "it creates a network namespace and adds IPv6 routes inside it");
    require_programs(&[("ip", "iproute2"), ("curl", "curl"), ("kubectl", "kubectl")]);
    let sb = DualSandbox::up(&[])?;
    // Nodes: the VMs' IPv6 addresses as second InternalIPs (the CCM's node controller).
    let internal = poll_until_blocking(Duration::from_secs(30), || {
        let out = sb
            .user
            .kubectl(&[
                "get",
                "nodes",
                "-o",
                "jsonpath={range .items[*]}{.status.addresses[?(@.type==\"InternalIP\")].address}{\"\\n\"}{end}",
            ])
            .ok()?;
        let lines: Vec<String> = out.lines().map(str::to_string).collect();
        (lines.len() == 2 && lines.iter().all(|l| l.contains(" fd00:10::"))).then_some(lines)
    })
    .context("both nodes with an IPv6 InternalIP from fd00:10::/112")?;
    ensure!(
        internal.iter().all(|l| l.starts_with("127.")),
        "IPv4 first: {internal:?}"
    );

    let file = write(sb.dir.path(), "lb.yaml", LB)?;
    sb.user.kubectl(&["apply", "-f", &file])?;
    let (v4, v6) = wait_dual_ingress(&sb, "default", "web")?;
    let four = poll_until_blocking(Duration::from_secs(30), || curl(&sb, "-4", &format!("http://{v4}/")))
        .context("the LB's IPv4 address answers")?;
    ensure!(four.starts_with("pod=web-"), "{four}");
    let six = poll_until_blocking(Duration::from_secs(30), || curl(&sb, "-6", &format!("http://[{v6}]/")))
        .context("the LB's IPv6 address answers")?;
    ensure!(six.starts_with("pod=web-"), "{six}");
    let described = sb.user.kubectl(&["describe", "service", "web"])?;
    let ips = sb.user.kubectl(&[
        "get",
        "service",
        "web",
        "-o",
        "jsonpath={.spec.clusterIPs[0]},{.spec.clusterIPs[1]}",
    ])?;
    ensure!(
        described.contains(&format!("IPs:                      {ips}")) && ips.contains(",fd00:96::"),
        "kubectl describe shows both ClusterIPs ({ips}):\n{described}"
    );
    let table = sb.user.kubectl(&["get", "service", "web", "--no-headers"])?;
    ensure!(table.contains(&format!("{v4},{v6}")), "EXTERNAL-IP lists both: {table}");

    // Source ranges of both families: an IPv6 source outside them is refused, one inside
    // (an address of the namespace's lo in fd00:99::/64, bound with --interface) served.
    let (g4, g6) = wait_dual_ingress(&sb, "default", "guarded")?;
    sb.ns.ip(["-6", "addr", "add", "fd00:99::5/128", "dev", "lo"])?;
    let inside = poll_until_blocking(Duration::from_secs(30), || {
        curl_with(&sb, &["-6", "--interface", "fd00:99::5"], &format!("http://[{g6}]/"))
    });
    let inside = match inside {
        Some(body) => body,
        None => {
            let out = sb.in_ns(&[
                "curl",
                "-6",
                "-sS",
                "--max-time",
                "3",
                "--interface",
                "fd00:99::5",
                &format!("http://[{g6}]/"),
            ])?;
            anyhow::bail!("an IPv6 source inside the ranges is not served: {}", output_text(&out));
        }
    };
    ensure!(inside.starts_with("pod=web-"), "{inside}");
    let outside = sb.in_ns(&["curl", "-6", "-sS", "--max-time", "3", &format!("http://[{g6}]/")])?;
    ensure!(
        !outside.status.success(),
        "curl -6 from ::1 (outside the ranges) must be refused: {}",
        output_text(&outside)
    );
    let v4_inside = curl(&sb, "-4", &format!("http://{g4}/")).context("IPv4 from 127.0.0.0/8 is let in")?;
    ensure!(v4_inside.starts_with("pod=web-"), "{v4_inside}");
    let policy = sb.user.kubectl(&[
        "get",
        "service",
        "guarded",
        "-o",
        "jsonpath={.spec.ipFamilyPolicy} {.spec.ipFamilies}",
    ])?;
    ensure!(policy == r#"RequireDualStack ["IPv4","IPv6"]"#, "{policy}");

    // The gateway's Service: a load balancer of both families too, and a peer connecting
    // over its IPv6 address (onetun, a userspace WireGuard client, in the namespace)
    // reaches web's IPv6 ClusterIP through the tunnel, from its IPv6 tunnel address.
    let (_, gw6) = wait_dual_ingress(&sb, "kuberaya-system", "kuberaya-gateway")?;
    let conf_path = sb.dir.path().join("alice.conf");
    let conf_arg = conf_path.to_str().context("utf-8")?;
    sb.user.kuberaya_ok(&[
        "peer",
        "add",
        "alice",
        "--allow",
        "default/web",
        "--endpoint-family",
        "ipv6",
        "--out",
        conf_arg,
    ])?;
    let conf = std::fs::read_to_string(&conf_path)?;
    let peer = WgPeer::from_conf(&conf);
    ensure!(
        peer.endpoint.starts_with(&format!("[{gw6}]:")),
        "the IPv6 endpoint:\n{conf}"
    );
    let tunnel_v6 = conf_value(&conf, "Address")
        .split(',')
        .map(str::trim)
        .find(|a| a.contains(':'))
        .and_then(|a| a.split('/').next())
        .map(str::to_string)
        .with_context(|| format!("an IPv6 tunnel address:\n{conf}"))?;
    let web_v6 = ips.split(',').nth(1).context("web's IPv6 ClusterIP")?.to_string();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", sb.ns.name()])
        .arg(onetun_path())
        .args([
            "--endpoint-addr",
            &peer.endpoint,
            "--endpoint-public-key",
            &peer.gateway_key,
            "--source-peer-ip",
            &tunnel_v6,
            "--keep-alive",
            "5",
            &format!("127.0.0.1:18090:[{web_v6}]:80:TCP"),
        ])
        .env("ONETUN_PRIVATE_KEY", &peer.private_key);
    let onetun = Process::spawn_command(cmd)?;
    let through = poll_until_blocking(Duration::from_secs(30), || curl(&sb, "-4", "http://127.0.0.1:18090/"));
    let Some(through) = through else {
        anyhow::bail!(
            "no answer through the tunnel to [{web_v6}]:80\n{conf}\n{}",
            onetun.output_tails()
        );
    };
    ensure!(through.starts_with("pod=web-"), "{through}");
    Ok(())
}

#[test]
fn dual_stack_needs_root_and_says_so() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let help = Command::new(binary("kuberaya"))
        .args(["sandbox", "up", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    ensure!(
        help.contains("--ip-family") && help.contains("Dual needs root"),
        "{help}"
    );
    require_root(TEST, "it runs kuberaya as another user with setpriv");
    require_programs(&[("setpriv", "util-linux")]);
    let state = dir.path().join("sb");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary("kuberaya"))
        .args(["sandbox", "up", "--ip-family", "dual", "--state-dir"])
        .arg(&state)
        .stdin(Stdio::null())
        .output()?;
    let text = output_text(&out);
    ensure!(!out.status.success(), "a non-root dual-stack up must fail: {text}");
    ensure!(text.contains("--ip-family dual needs root"), "{text}");
    ensure!(!state.exists(), "nothing made before the refusal");
    // --detach says so at once too, before starting anything in the background.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(binary("kuberaya"))
        .args(["sandbox", "up", "--detach", "--ip-family", "dual", "--state-dir"])
        .arg(&state)
        .stdin(Stdio::null())
        .output()?;
    let text = output_text(&out);
    ensure!(
        !out.status.success() && text.contains("--ip-family dual needs root") && !state.exists(),
        "{text}"
    );
    Ok(())
}

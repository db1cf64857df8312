//! `kuberaya sandbox up --ip-family dual`, run inside a network namespace the test makes
//! (the sandbox's IPv6 ranges are `local` routes on that namespace's `lo`, never the
//! host's), met with the real `kubectl` and `curl`: dual-stack Services get a ClusterIP of
//! each family, pods an address of each, EndpointSlices one per family, and kube-proxy
//! serves the IPv6 ClusterIP; `sandbox down` removes the routes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::netns::require_programs;
use kuberaya_e2e::sandbox::{User, output_text};
use kuberaya_e2e::{Netns, binary, poll_until_blocking, require_root};
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
    let out = sb
        .in_ns(&["curl", family, "-sS", "--fail", "--max-time", "3", url])
        .ok()?;
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
    Ok(())
}

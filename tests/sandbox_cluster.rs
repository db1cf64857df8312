//! The sandbox cluster as a user meets it: `kuberaya sandbox up`, then the real `kubectl`
//! (v1.32) and `curl` against Deployments and Services whose pods really answer, on
//! ClusterIPs, NodePorts and kube-proxy's health check ports.
//!
//! Every test runs its own sandbox (`--detach`, address ranges of its own), stopped by a
//! drop guard. The sandbox's CCM does not run (`--no-ccm`: the node agents initialise the
//! nodes; `--external-ccm`: nobody does), so what is tested here is the cluster alone.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kuberaya_e2e::cluster::{Cluster, is_ready, node_address, ready_condition};
use kuberaya_e2e::poll_until_blocking;
use kuberaya_e2e::probe::{answered_by, curl, pods_answering, udp_roundtrip, wait_pods_answering};
use kuberaya_e2e::sandbox::Ranges;
use serde_json::Value;

/// A /24 index `n` for this file's sandboxes (`127.10.n.0/24` VMs, `127.203.n.0/24` public
/// IPs, `127.97.n.0/24` Services, `127.n.0.0/16` pods), held through an exclusive lock file
/// so that test processes running at the same time never share one. Indexes 100-199: the
/// other end-to-end tests take theirs from 60-99.
struct NetClaim {
    n: u8,
    _lock: std::fs::File,
}

impl NetClaim {
    fn take() -> Result<NetClaim> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join("kuberaya-e2e-nets");
        std::fs::create_dir_all(&dir)?;
        let start = std::process::id().wrapping_add(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        for i in 0..100u32 {
            let n = u8::try_from(100 + (start.wrapping_add(i)) % 100)?;
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{n}.lock")))?;
            // Exclusive and non-blocking (flock): taken means another process holds it.
            if lock.try_lock().is_ok() {
                return Ok(NetClaim { n, _lock: lock });
            }
        }
        bail!("every address range of {} is taken", dir.display())
    }
}

/// A running sandbox of three nodes in a temporary state dir (the harness's
/// [`kuberaya_e2e::sandbox::Sandbox`]: `sandbox down --purge` on drop, before its address
/// ranges are released).
struct Sandbox {
    sb: kuberaya_e2e::sandbox::Sandbox,
    _dir: tempfile::TempDir,
    _net: NetClaim,
}

impl Deref for Sandbox {
    type Target = kuberaya_e2e::sandbox::Sandbox;
    fn deref(&self) -> &kuberaya_e2e::sandbox::Sandbox {
        &self.sb
    }
}

impl Sandbox {
    /// A sandbox whose node agents remove the `uninitialized` taint themselves (`no_ccm`),
    /// or leave it to a CCM that does not run (`--external-ccm`).
    fn up(no_ccm: bool) -> Result<Sandbox> {
        let dir = tempfile::tempdir()?;
        let net = NetClaim::take()?;
        let n = net.n;
        let ranges = Ranges {
            net: n,
            service_cidr: format!("127.97.{n}.0/24"),
            pod_cidr: format!("127.{n}.0.0/16"),
        };
        let ccm = if no_ccm { "--no-ccm" } else { "--external-ccm" };
        let sandbox = Sandbox {
            sb: kuberaya_e2e::sandbox::Sandbox::up_on(&dir.path().join("sb"), &ranges, &["--nodes", "3", ccm])?,
            _dir: dir,
            _net: net,
        };
        let exported = sandbox.kuberaya(&["sandbox", "env"])?;
        ensure!(
            exported.contains(&format!("export KUBECONFIG={}", sandbox.kubeconfig().display())),
            "sandbox env exports KUBECONFIG: {exported}"
        );
        let nodes = sandbox.wait_nodes_ready(3, Duration::from_secs(20));
        ensure!(nodes.is_some(), "three Ready nodes: {}", sandbox.log());
        Ok(sandbox)
    }

    fn log(&self) -> String {
        self.log_tail(40)
    }

    /// `kubectl create deployment NAME --image=any --port=PORT --replicas=N` (kubectl sends
    /// it as protobuf).
    fn create_deployment(&self, name: &str, port: u16, replicas: u32) -> Result<()> {
        let port = format!("--port={port}");
        let replicas = format!("--replicas={replicas}");
        self.kubectl(&["create", "deployment", name, "--image=any", &port, &replicas])?;
        Ok(())
    }

    /// Waits until the Deployment's pods are all Running and ready: their names and nodes.
    fn wait_ready_pods(&self, app: &str, count: usize) -> Result<BTreeMap<String, String>> {
        Cluster::wait_ready_pods(&self.sb, app, count, Duration::from_secs(20))
    }

    /// The InternalIP of each node.
    fn node_ips(&self) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        for (name, n) in self.nodes()? {
            let ip = node_address(&n, "InternalIP").with_context(|| format!("InternalIP of {name}: {n}"))?;
            out.insert(name, ip);
        }
        Ok(out)
    }

    fn service(&self, name: &str) -> Result<Value> {
        self.get_json(&["get", "service", name])
    }

    /// The endpoints of the Service's slices: (pod name, ready).
    fn slice_endpoints(&self, service: &str) -> Result<Vec<(String, bool)>> {
        let slices = self.get_json(&[
            "get",
            "endpointslices",
            "-l",
            &format!("kubernetes.io/service-name={service}"),
        ])?;
        let mut out = Vec::new();
        for s in slices["items"].as_array().context("slices")? {
            for e in s["endpoints"].as_array().into_iter().flatten() {
                let pod = e["targetRef"]["name"].as_str().unwrap_or_default().to_string();
                out.push((pod, e["conditions"]["ready"] != false));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Runs `test` against a fresh sandbox (see [`Sandbox::up`]); a failure carries the
    /// tail of the sandbox's log.
    fn run(no_ccm: bool, test: impl FnOnce(&Sandbox) -> Result<()>) -> Result<()> {
        let sb = Sandbox::up(no_ccm)?;
        test(&sb).map_err(|e| e.context(format!("sandbox log (tail):\n{}", sb.log())))
    }
}

fn cluster_ip(svc: &Value) -> Result<String> {
    Ok(svc["spec"]["clusterIP"].as_str().context("clusterIP")?.to_string())
}

fn node_port(svc: &Value) -> Result<u64> {
    svc["spec"]["ports"][0]["nodePort"].as_u64().context("nodePort")
}

#[test]
fn deployment_answers_from_every_pod_on_the_cluster_ip_and_on_every_node_port() -> Result<()> {
    Sandbox::run(true, |sb| {
        sb.create_deployment("web", 8080, 3)?;
        sb.kubectl(&["expose", "deployment", "web", "--port=80", "--target-port=8080"])?;
        let pods = sb.wait_ready_pods("web", 3)?;
        let ip = cluster_ip(&sb.service("web")?)?;
        let url = format!("http://{ip}:80/");
        let ready = poll_until_blocking(Duration::from_secs(10), || {
            (sb.slice_endpoints("web").ok()?.len() == 3).then_some(())
        });
        ensure!(ready.is_some(), "three endpoints: {:?}", sb.slice_endpoints("web"));
        let expected: BTreeSet<String> = pods.keys().cloned().collect();
        wait_pods_answering(&url, 30, Duration::from_secs(5), |seen| *seen == expected)
            .context("over 30 requests every pod answers")?;
        let body = curl(&url).context("answer")?;
        let (pod, node) = pods
            .iter()
            .find(|(p, _)| body.contains(&format!("pod={p} ")))
            .context("a known pod")?;
        assert_eq!(body, format!("pod={pod} namespace=default node={node}\n"));

        sb.kubectl(&[
            "expose",
            "deployment",
            "web",
            "--name=web-np",
            "--type=NodePort",
            "--port=80",
            "--target-port=8080",
        ])?;
        let port = node_port(&sb.service("web-np")?)?;
        for (node, node_ip) in sb.node_ips()? {
            let url = format!("http://{node_ip}:{port}/");
            let answered = poll_until_blocking(Duration::from_secs(5), || curl(&url).and_then(|b| answered_by(&b)));
            let pod = answered.with_context(|| format!("NodePort on {node} ({url}) answers"))?;
            assert!(expected.contains(&pod), "{pod} is one of the deployment's pods");
        }

        // sessionAffinity: ClientIP keeps this client on one pod.
        sb.kubectl(&[
            "patch",
            "service",
            "web",
            "-p",
            r#"{"spec":{"sessionAffinity":"ClientIP"}}"#,
        ])?;
        let sticky = poll_until_blocking(Duration::from_secs(5), || {
            let seen = pods_answering(&url, 10).ok()?;
            (seen.len() == 1).then_some(seen)
        });
        ensure!(sticky.is_some(), "with ClientIP affinity one pod answers every request");
        Ok(())
    })
}

#[test]
fn scale_down_shrinks_the_slice_and_not_ready_pods_get_no_traffic() -> Result<()> {
    Sandbox::run(true, |sb| {
        sb.create_deployment("web", 8080, 3)?;
        sb.kubectl(&["expose", "deployment", "web", "--port=80", "--target-port=8080"])?;
        let pods = sb.wait_ready_pods("web", 3)?;
        let url = format!("http://{}:80/", cluster_ip(&sb.service("web")?)?);

        // A pod made not ready: its endpoint goes not-ready and it gets no more traffic.
        let victim = pods.keys().next().context("a pod")?.clone();
        sb.kubectl(&["annotate", "pod", &victim, "sandbox.kuberaya.io/ready=false"])?;
        let not_ready = poll_until_blocking(Duration::from_secs(5), || {
            let eps = sb.slice_endpoints("web").ok()?;
            eps.iter().any(|(p, ready)| p == &victim && !ready).then_some(eps)
        });
        ensure!(
            not_ready.is_some(),
            "the endpoint of {victim} goes not-ready: {:?}",
            sb.slice_endpoints("web")
        );
        let seen = wait_pods_answering(&url, 30, Duration::from_secs(5), |seen| !seen.contains(&victim))
            .with_context(|| format!("{victim} (not ready) gets no more traffic"))?;
        assert_eq!(seen.len(), 2, "the two ready pods share the traffic: {seen:?}");
        sb.kubectl(&["annotate", "pod", &victim, "sandbox.kuberaya.io/ready-"])?;
        let back = poll_until_blocking(Duration::from_secs(5), || {
            sb.slice_endpoints("web")
                .ok()?
                .iter()
                .all(|(_, ready)| *ready)
                .then_some(())
        });
        ensure!(back.is_some(), "readiness comes back: {:?}", sb.slice_endpoints("web"));

        // Scale to 1: the slice shrinks within 2 s and the Service still answers.
        sb.kubectl(&["scale", "deployment", "web", "--replicas=1"])?;
        let scaled = Instant::now();
        let mut last = Vec::new();
        let shrunk = poll_until_blocking(Duration::from_secs(2), || {
            last = sb.slice_endpoints("web").ok()?;
            (last.len() == 1).then(|| scaled.elapsed())
        });
        let took = shrunk.with_context(|| format!("the slice still lists {last:?} 2 s after scaling to 1"))?;
        eprintln!("slice shrank {took:?} after the scale");
        let remaining = sb.wait_ready_pods("web", 1)?;
        let remaining: BTreeSet<String> = remaining.keys().cloned().collect();
        wait_pods_answering(&url, 5, Duration::from_secs(5), |seen| *seen == remaining)
            .context("the remaining pod answers")?;
        Ok(())
    })
}

#[test]
fn local_traffic_policy_health_checks_and_no_forwarding_without_a_local_pod() -> Result<()> {
    Sandbox::run(true, |sb| {
        sb.create_deployment("web", 8080, 1)?;
        sb.apply(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web-local\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  selector:\n    app: web\n  ports:\n  - port: 80\n    targetPort: 8080\n",
    )?;
        let pods = sb.wait_ready_pods("web", 1)?;
        let (pod, pod_node) = pods.iter().next().context("the pod")?;
        let svc = sb.service("web-local")?;
        let hc_port = svc["spec"]["healthCheckNodePort"]
            .as_u64()
            .context("healthCheckNodePort allocated")?;
        let port = node_port(&svc)?;
        let ips = sb.node_ips()?;
        ensure!(ips.len() == 3, "three nodes: {ips:?}");
        for (node, ip) in &ips {
            let url = format!("http://{ip}:{hc_port}/healthz");
            let want = if node == pod_node { 200 } else { 503 };
            let got = poll_until_blocking(Duration::from_secs(5), || {
                let out = Command::new("curl")
                    .args([
                        "-s",
                        "--max-time",
                        "2",
                        "-o",
                        "/dev/stdout",
                        "-w",
                        "\n%{http_code}",
                        &url,
                    ])
                    .output()
                    .ok()?;
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let (body, code) = text.rsplit_once('\n')?;
                (code.parse::<u16>().ok()? == want).then(|| body.to_string())
            });
            let body = got.with_context(|| format!("healthCheckNodePort on {node} answers {want}"))?;
            let doc: Value = serde_json::from_str(&body).with_context(|| format!("JSON health answer: {body}"))?;
            assert_eq!(
                doc["localEndpoints"],
                if node == pod_node { 1 } else { 0 },
                "{node}: {doc}"
            );
            assert_eq!(doc["service"]["name"], "web-local");

            let healthz =
                curl(&format!("http://{ip}:10256/healthz")).with_context(|| format!("{node}: :10256/healthz"))?;
            assert!(healthz.contains("\"nodeEligible\":true"), "{healthz}");

            let answer = curl(&format!("http://{ip}:{port}/"));
            if node == pod_node {
                assert_eq!(
                    answer.as_deref().and_then(answered_by).as_deref(),
                    Some(pod.as_str()),
                    "local NodePort forwards"
                );
            } else {
                assert_eq!(answer, None, "NodePort on {node} (no local pod) must not forward");
            }
        }
        Ok(())
    })
}

#[test]
fn stopped_node_vm_makes_the_node_and_its_pods_not_ready() -> Result<()> {
    Sandbox::run(true, |sb| {
        sb.create_deployment("web", 8080, 3)?;
        sb.kubectl(&["expose", "deployment", "web", "--port=80", "--target-port=8080"])?;
        let pods = sb.wait_ready_pods("web", 3)?;
        let nodes: BTreeSet<&String> = pods.values().collect();
        ensure!(nodes.len() == 3, "one pod per node: {pods:?}");
        let on_w2: Vec<String> = pods
            .iter()
            .filter(|(_, n)| n.as_str() == "w2")
            .map(|(p, _)| p.clone())
            .collect();
        ensure!(!on_w2.is_empty(), "a pod on w2: {pods:?}");

        sb.kuberaya(&["sandbox", "node", "stop", "w2"])?;
        let not_ready = poll_until_blocking(Duration::from_secs(10), || {
            let node = sb.get_json(&["get", "node", "w2"]).ok()?;
            (ready_condition(&node) == Some(false)).then_some(())
        });
        ensure!(
            not_ready.is_some(),
            "Node w2 goes NotReady: {}",
            sb.kubectl(&["get", "nodes"])?
        );
        let pods_not_ready = poll_until_blocking(Duration::from_secs(10), || {
            let all = sb.get_json(&["get", "pods", "-l", "app=web"]).ok()?;
            let items = all["items"].as_array()?;
            items
                .iter()
                .filter(|p| p["spec"]["nodeName"] == "w2")
                .all(|p| !is_ready(p))
                .then_some(())
        });
        ensure!(
            pods_not_ready.is_some(),
            "pods on w2 are not ready: {}",
            sb.kubectl(&["get", "pods", "-o", "wide"])?
        );
        let eps = sb.slice_endpoints("web")?;
        for p in &on_w2 {
            assert!(
                eps.contains(&(p.clone(), false)),
                "{p}'s endpoint is not ready: {eps:?}"
            );
        }
        let url = format!("http://{}:80/", cluster_ip(&sb.service("web")?)?);
        wait_pods_answering(&url, 12, Duration::from_secs(5), |seen| {
            on_w2.iter().all(|p| !seen.contains(p))
        })
        .context("no traffic to the stopped node's pods")?;

        sb.kuberaya(&["sandbox", "node", "start", "w2"])?;
        let ready = poll_until_blocking(Duration::from_secs(10), || {
            let node = sb.get_json(&["get", "node", "w2"]).ok()?;
            (ready_condition(&node) == Some(true)).then_some(())
        });
        ensure!(ready.is_some(), "Node w2 is Ready again after start");
        sb.wait_ready_pods("web", 3)?;
        Ok(())
    })
}

const UDP_ECHO: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
spec:
  replicas: 2
  selector:
    matchLabels:
      app: echo
  template:
    metadata:
      labels:
        app: echo
    spec:
      containers:
      - name: echo
        image: any
        ports:
        - containerPort: 5353
          protocol: UDP
---
apiVersion: v1
kind: Service
metadata:
  name: echo
spec:
  type: NodePort
  selector:
    app: echo
  ports:
  - name: dns
    port: 53
    targetPort: 5353
    protocol: UDP
"#;

#[test]
fn udp_echo_through_cluster_ip_and_node_port() -> Result<()> {
    Sandbox::run(true, |sb| {
        sb.apply(UDP_ECHO)?;
        let pods = sb.wait_ready_pods("echo", 2)?;
        let svc = sb.service("echo")?;
        let ip = cluster_ip(&svc)?;
        let port = node_port(&svc)?;
        let ready = poll_until_blocking(Duration::from_secs(10), || {
            (sb.slice_endpoints("echo").ok()?.len() == 2).then_some(())
        });
        ensure!(ready.is_some(), "two endpoints: {:?}", sb.slice_endpoints("echo"));
        let mut targets = vec![format!("{ip}:53")];
        targets.extend(sb.node_ips()?.values().map(|node_ip| format!("{node_ip}:{port}")));
        for target in targets {
            let answer = String::from_utf8(udp_roundtrip(&target, b"hello over udp", 6)?)?;
            let (prefix, rest) = answer.split_once(' ').context("prefixed answer")?;
            let pod = prefix
                .strip_prefix("pod=")
                .with_context(|| format!("pod prefix in {answer:?}"))?;
            assert!(pods.contains_key(pod), "{target}: answered by {pod}, one of {pods:?}");
            assert_eq!(rest, "hello over udp", "{target}: echoed");
        }
        Ok(())
    })
}

#[test]
fn uninitialized_nodes_hold_pods_until_the_taint_is_removed() -> Result<()> {
    Sandbox::run(false, |sb| {
        // As a kubelet under --cloud-provider=external: tainted, no providerID, no addresses.
        let nodes = sb.get_json(&["get", "nodes"])?;
        for n in nodes["items"].as_array().context("nodes")? {
            let taints = n["spec"]["taints"].as_array().context("taints")?;
            assert!(
                taints.iter().any(
                    |t| t["key"] == "node.cloudprovider.kubernetes.io/uninitialized" && t["effect"] == "NoSchedule"
                ),
                "{n}"
            );
            assert!(n["spec"]["providerID"].is_null(), "the CCM sets providerID: {n}");
            assert!(
                n["status"]["addresses"].as_array().is_none_or(|a| a.is_empty()),
                "the CCM sets addresses: {n}"
            );
        }
        sb.create_deployment("web", 8080, 2)?;
        let unschedulable = poll_until_blocking(Duration::from_secs(10), || {
            let pods = sb.get_json(&["get", "pods", "-l", "app=web"]).ok()?;
            let items = pods["items"].as_array()?;
            let held = items.iter().all(|p| {
                p["spec"]["nodeName"].is_null()
                    && p["status"]["conditions"].as_array().is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "PodScheduled" && c["reason"] == "Unschedulable")
                    })
            });
            (items.len() == 2 && held).then_some(())
        });
        ensure!(
            unschedulable.is_some(),
            "pods wait, Unschedulable: {}",
            sb.kubectl(&["get", "pods", "-o", "wide"])?
        );
        // What the CCM does once it has initialized a node.
        sb.kubectl(&[
            "taint",
            "nodes",
            "--all",
            "node.cloudprovider.kubernetes.io/uninitialized-",
        ])?;
        sb.wait_ready_pods("web", 2)?;
        Ok(())
    })
}

#[test]
fn deleted_node_vm_takes_its_node_and_pods_away() -> Result<()> {
    Sandbox::run(true, |sb| {
        sb.create_deployment("web", 8080, 3)?;
        let pods = sb.wait_ready_pods("web", 3)?;
        let on_w3: Vec<&String> = pods
            .iter()
            .filter(|(_, n)| n.as_str() == "w3")
            .map(|(p, _)| p)
            .collect();
        sb.kuberaya(&["sandbox", "node", "delete", "w3"])?;
        let gone = poll_until_blocking(Duration::from_secs(10), || {
            let nodes = sb.get_json(&["get", "nodes"]).ok()?;
            let names: Vec<&str> = nodes["items"]
                .as_array()?
                .iter()
                .filter_map(|n| n["metadata"]["name"].as_str())
                .collect();
            (names == ["w1", "w2"]).then_some(())
        });
        ensure!(
            gone.is_some(),
            "without a CCM the Node of a deleted VM goes: {}",
            sb.kubectl(&["get", "nodes"])?
        );
        // Its pods are collected and the Deployment replaces them on the other nodes.
        let replaced = sb.wait_ready_pods("web", 3)?;
        assert!(
            on_w3.iter().all(|p| !replaced.contains_key(*p)),
            "{on_w3:?} replaced: {replaced:?}"
        );
        assert!(replaced.values().all(|n| n != "w3"), "{replaced:?}");

        sb.kuberaya(&["sandbox", "node", "add", "w4"])?;
        let added = poll_until_blocking(Duration::from_secs(10), || {
            let node = sb.get_json(&["get", "node", "w4"]).ok()?;
            (ready_condition(&node) == Some(true)).then_some(())
        });
        ensure!(
            added.is_some(),
            "an added VM registers a Ready node: {}",
            sb.kubectl(&["get", "nodes"])?
        );
        Ok(())
    })
}

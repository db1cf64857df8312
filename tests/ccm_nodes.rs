//! Issue 7 end to end: the CCM's node controller, node lifecycle controller, IP changes
//! that reach the load balancers, and leader election, driven by the real binaries.
//!
//! Every test runs its own sandbox (`kuberaya sandbox up --detach --no-ccm` on unique
//! address ranges, `sandbox down --purge` in a drop guard) and starts the `kuberaya-ccm`
//! binary itself with a cloud config written from `kuberaya sandbox env`. The cluster is
//! driven with the real `kubectl` (explicit `--kubeconfig`), the VMs with `kuberaya
//! sandbox node ...` and the stand-in's `/_sandbox/` control API, the load balancers are
//! read through the platform's public API and reached with the real `curl`.
//!
//! With `--no-ccm` the sandbox's node agents also remove the `uninitialized` taint and set
//! the InternalIP themselves (so that a sandbox without a CCM is usable); the CCM's node
//! controller still gives every Node its provider ID, topology labels and addresses (its
//! refresh covers untainted Nodes without a provider ID), which is what these tests check.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use kuberaya_e2e::ccm::Ccm;
use kuberaya_e2e::cloud::CloudSandbox;
use kuberaya_e2e::cluster::{Cluster, FAST_HEALTH, deployment, has_taint, is_ready, lb_service, node_address};
use kuberaya_e2e::probe::wait_answering;
use kuberaya_e2e::sandbox::Ranges;
use kuberaya_e2e::{poll_until_blocking, unique_net_index};
use serde_json::{Value, json};

const UNINITIALIZED: &str = "node.cloudprovider.kubernetes.io/uninitialized";
const SHUTDOWN: &str = "node.cloudprovider.kubernetes.io/shutdown";

/// The namespace of the tests' Services (not, say, a sandbox gateway Service's).
const NS: &str = "default";
/// How long `kubectl wait` waits for a Service's ingress.
const INGRESS_TIMEOUT: &str = "60s";

/// A running sandbox of three nodes (no CCM inside) in a temporary state dir.
fn sandbox_up() -> Result<CloudSandbox> {
    let n = unique_net_index();
    let ranges = Ranges {
        net: n,
        service_cidr: format!("127.99.{n}.0/24"),
        // A /21 (eight /24s, one per node) of 127.241-242.x.x, unique per net index.
        pod_cidr: format!(
            "127.{}.{}.0/21",
            241 + (n.saturating_sub(60)) / 32,
            (n.saturating_sub(60) % 32) * 8
        ),
    };
    let extra = ["--no-ccm", "--nodes", "3", "--provisioning-delay-ms", "200"];
    CloudSandbox::up(&ranges, &extra, 3)
}

/// Starts a `kuberaya-ccm` replica against `sb` (fast periods for the tests).
fn spawn_ccm(sb: &CloudSandbox) -> Result<Ccm> {
    Ccm::spawn(
        sb,
        "info,kube_runtime=warn",
        &[
            "--leader-elect-lease-duration",
            "4s",
            "--leader-elect-renew-grace",
            "2s",
            "--resync-period",
            "5s",
            "--poll-period",
            "300ms",
            "--node-sync-debounce",
            "300ms",
            "--node-status-update-frequency",
            "1s",
            "--node-monitor-period",
            "1s",
        ],
    )
}

/// Why `node` is not initialised from `vm` yet (`None`: it is).
fn not_initialised(node: &Value, vm: &Value) -> Option<String> {
    let vm_id = vm["id"].as_str().unwrap_or_default();
    let want_pid = format!("cloudraya://{vm_id}");
    if node["spec"]["providerID"].as_str() != Some(want_pid.as_str()) {
        return Some(format!("providerID {} (want {want_pid})", node["spec"]["providerID"]));
    }
    if node_address(node, "InternalIP").as_deref() != vm["private_ip"].as_str() {
        return Some(format!(
            "InternalIP {:?} (want {})",
            node_address(node, "InternalIP"),
            vm["private_ip"]
        ));
    }
    if node_address(node, "Hostname").as_deref() != node["metadata"]["name"].as_str() {
        return Some("no Hostname address".into());
    }
    for (label, field) in [
        ("topology.kubernetes.io/region", "region"),
        ("topology.kubernetes.io/zone", "zone"),
        ("node.kubernetes.io/instance-type", "package"),
    ] {
        let want = vm[field].as_str().unwrap_or_default();
        if !want.is_empty() && node["metadata"]["labels"][label].as_str() != Some(want) {
            return Some(format!(
                "label {label}={} (want {want})",
                node["metadata"]["labels"][label]
            ));
        }
    }
    has_taint(node, UNINITIALIZED).then(|| "still tainted uninitialized".into())
}

/// Waits until the nodes `names` are initialised from their VMs.
fn wait_initialised(sb: &CloudSandbox, names: &[&str], within: Duration) -> Result<()> {
    let mut last = String::new();
    let done = poll_until_blocking(within, || {
        let (nodes, vms) = (sb.nodes().ok()?, sb.vms().ok()?);
        for name in names {
            let why = match (nodes.get(*name), vms.get(*name)) {
                (Some(n), Some(vm)) => not_initialised(n, vm),
                (n, vm) => Some(format!("node present {}, VM present {}", n.is_some(), vm.is_some())),
            };
            if let Some(why) = why {
                last = format!("{name}: {why}");
                return None;
            }
        }
        Some(())
    });
    done.with_context(|| format!("nodes {names:?} initialised within {within:?}: {last}"))
}

/// Backend VM ID → private IP of an LB.
fn backends(lb: &Value) -> BTreeMap<String, String> {
    lb["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| {
            Some((
                b["vm_id"].as_str()?.to_string(),
                b["private_ip"].as_str().unwrap_or_default().to_string(),
            ))
        })
        .collect()
}

/// Runs `test` with a fresh sandbox; a failure carries the sandbox log.
fn with_sandbox(test: impl FnOnce(&CloudSandbox) -> Result<()>) -> Result<()> {
    let started = Instant::now();
    let sb = sandbox_up()?;
    eprintln!("sandbox ready in {:?}", started.elapsed());
    let result = test(&sb).map_err(|e| e.context(format!("sandbox log (tail):\n{}", sb.log())));
    eprintln!("test took {:?}", started.elapsed());
    result
}

#[test]
fn nodes_are_initialised_kept_true_to_their_vms_and_reach_every_lb() -> Result<()> {
    with_sandbox(|sb| {
        let mut ccm = spawn_ccm(sb)?;
        let mut run = || -> Result<()> {
            ccm.wait_leader(Duration::from_secs(20))?;
            wait_initialised(sb, &["w1", "w2", "w3"], Duration::from_secs(20))?;
            ensure!(ccm.metric("kuberaya_ccm_leader") == Some(1.0), "leader gauge");

            // Two LBs on every node, one only on w2 (node selector).
            sb.apply(&deployment("web", 3, false))?;
            sb.apply(&lb_service("web-a", "web", FAST_HEALTH, ""))?;
            sb.apply(&lb_service("web-b", "web", FAST_HEALTH, ""))?;
            let mut only_w2: Vec<(&str, &str)> = FAST_HEALTH.to_vec();
            only_w2.push(("lb.cloudraya.com/node-selector", "kubernetes.io/hostname=w2"));
            sb.apply(&lb_service("web-c", "web", &only_w2, ""))?;
            let ip_a = sb.wait_ingress("web-a", INGRESS_TIMEOUT)?;
            sb.wait_ingress("web-b", INGRESS_TIMEOUT)?;
            sb.wait_ingress("web-c", INGRESS_TIMEOUT)?;
            wait_answering(&format!("http://{ip_a}/"))?;
            let vms = sb.vms()?;
            let vm_id = |name: &str| -> Result<String> {
                Ok(vms
                    .get(name)
                    .and_then(|v| v["id"].as_str())
                    .context(name.to_string())?
                    .to_string())
            };
            let all_lbs = ["web-a", "web-b"];

            // A new node: initialised, then a backend of every LB (but the selected one).
            sb.kuberaya(&["sandbox", "node", "add", "w4"])?;
            wait_initialised(sb, &["w4"], Duration::from_secs(20))?;
            let w4 = sb
                .vms()?
                .get("w4")
                .and_then(|v| v["id"].as_str().map(String::from))
                .context("w4")?;
            let added = poll_until_blocking(Duration::from_secs(15), || {
                all_lbs
                    .iter()
                    .all(|s| sb.lb_in(NS, s).is_ok_and(|lb| backends(&lb).contains_key(&w4)))
                    .then_some(())
            });
            ensure!(
                added.is_some(),
                "w4 ({w4}) is a backend of every LB: {:?}",
                sb.lbs_in(NS)?
            );
            ensure!(
                !backends(&sb.lb_in(NS, "web-c")?).contains_key(&w4),
                "web-c stays on w2 only"
            );

            // A stopped VM: shutdown taint; started again: the taint goes.
            sb.kuberaya(&["sandbox", "node", "stop", "w2"])?;
            let tainted = poll_until_blocking(Duration::from_secs(15), || {
                sb.nodes()
                    .ok()?
                    .get("w2")
                    .is_some_and(|n| has_taint(n, SHUTDOWN))
                    .then_some(())
            });
            ensure!(
                tainted.is_some(),
                "w2 gets the shutdown taint: {:?}",
                sb.nodes()?.get("w2")
            );
            sb.kuberaya(&["sandbox", "node", "start", "w2"])?;
            let untainted = poll_until_blocking(Duration::from_secs(15), || {
                sb.nodes()
                    .ok()?
                    .get("w2")
                    .is_some_and(|n| !has_taint(n, SHUTDOWN) && is_ready(n))
                    .then_some(())
            });
            ensure!(
                untainted.is_some(),
                "w2 loses the shutdown taint: {:?}",
                sb.nodes()?.get("w2")
            );
            wait_answering(&format!("http://{ip_a}/"))?;

            // A changed private IP: the Node's InternalIP and both LBs that target w1
            // follow within 5 s; web-c (w2 only) is not touched; traffic still answers.
            let w1 = vm_id("w1")?;
            let web_c_before = sb.lb_in(NS, "web-c")?;
            let new_ip = format!("127.10.{}.201", sb.net());
            let a = sb.control(
                reqwest::Method::PUT,
                &format!("/_sandbox/vms/{w1}/private-ip"),
                Some(&json!({"private_ip": new_ip})),
            );
            ensure!(a.status == 200, "PUT private-ip: {}", a.describe());
            let changed = Instant::now();
            let followed = poll_until_blocking(Duration::from_secs(5), || {
                let node_ok = node_address(sb.nodes().ok()?.get("w1")?, "InternalIP")? == new_ip;
                let lbs_ok = all_lbs
                    .iter()
                    .all(|s| sb.lb_in(NS, s).is_ok_and(|lb| backends(&lb).get(&w1) == Some(&new_ip)));
                (node_ok && lbs_ok).then_some(())
            });
            ensure!(
                followed.is_some(),
                "w1's new IP {new_ip} on its Node and LBs within 5 s: node {:?}, LBs {:?}",
                sb.nodes()?.get("w1").and_then(|n| node_address(n, "InternalIP")),
                sb.lbs_in(NS)?
            );
            eprintln!("IP change reached the Node and the LBs in {:?}", changed.elapsed());
            let web_c_after = sb.lb_in(NS, "web-c")?;
            ensure!(
                web_c_after["updated_at"] == web_c_before["updated_at"],
                "web-c, which does not target w1, was not updated: {web_c_before} -> {web_c_after}"
            );
            for s in ["web-a", "web-b"] {
                let ip = sb.wait_ingress(s, INGRESS_TIMEOUT)?;
                for _ in 0..6 {
                    wait_answering(&format!("http://{ip}/"))?;
                }
            }

            // A deleted VM: the Node goes, and so does its backend from every LB.
            let w3 = vm_id("w3")?;
            sb.kuberaya(&["sandbox", "node", "delete", "w3"])?;
            let gone = poll_until_blocking(Duration::from_secs(20), || {
                (!sb.nodes().ok()?.contains_key("w3")).then_some(())
            });
            ensure!(gone.is_some(), "node w3 deleted");
            let removed = poll_until_blocking(Duration::from_secs(15), || {
                sb.lbs_in(NS)
                    .ok()?
                    .values()
                    .flatten()
                    .all(|lb| !backends(lb).contains_key(&w3))
                    .then_some(())
            });
            ensure!(removed.is_some(), "w3 in no LB: {:?}", sb.lbs_in(NS)?);
            wait_answering(&format!("http://{ip_a}/"))?;
            Ok(())
        };
        run().map_err(|e| e.context(format!("CCM output:\n{}", ccm.process.output_tails())))
    })
}

#[test]
fn two_replicas_one_leads_and_a_killed_leader_loses_no_service() -> Result<()> {
    with_sandbox(|sb| {
        let mut ccms = [spawn_ccm(sb)?, spawn_ccm(sb)?];
        let tails = |ccms: &[Ccm]| {
            ccms.iter()
                .map(|c| c.process.output_tails())
                .collect::<Vec<_>>()
                .join("\n----\n")
        };
        let run = |ccms: &mut [Ccm; 2]| -> Result<()> {
            let leader = poll_until_blocking(Duration::from_secs(20), || ccms.iter().position(Ccm::leads))
                .context("a replica leads")?;
            let follower = 1 - leader;
            wait_initialised(sb, &["w1", "w2", "w3"], Duration::from_secs(20))?;
            sb.apply(&deployment("web", 2, false))?;
            sb.apply(&lb_service("svc-0", "web", &[], ""))?;
            sb.wait_ingress("svc-0", INGRESS_TIMEOUT)?;
            // Exactly one reconciles: the follower has no leadership and no reconcile.
            ensure!(!ccms[follower].leads(), "only one replica leads");
            ensure!(
                ccms[leader].metric("kuberaya_ccm_leader") == Some(1.0),
                "leader gauge on the leader"
            );
            ensure!(
                ccms[follower].metric("kuberaya_ccm_leader") == Some(0.0),
                "leader gauge on the follower"
            );
            ensure!(
                ccms[leader]
                    .metric("kuberaya_ccm_reconciles_total{result=\"success\"}")
                    .unwrap_or(0.0)
                    > 0.0,
                "the leader reconciles"
            );
            ensure!(
                ccms[follower]
                    .metric("kuberaya_ccm_reconciles_total{result=\"success\"}")
                    .is_none(),
                "the follower does not reconcile"
            );

            // A burst of 20 Services, the leader SIGKILLed in the middle of it.
            let mut killed_at = None;
            for i in 1..=20 {
                sb.apply(&lb_service(&format!("svc-{i}"), "web", &[], ""))?;
                if i == 8 {
                    ccms[leader].process.signal(libc::SIGKILL);
                    killed_at = Some(Instant::now());
                }
            }
            let killed_at = killed_at.context("killed")?;
            poll_until_blocking(Duration::from_secs(20), || ccms[follower].leads().then_some(()))
                .context("the other replica takes over")?;
            eprintln!("takeover after {:?}", killed_at.elapsed());
            for i in 0..=20 {
                sb.wait_ingress(&format!("svc-{i}"), INGRESS_TIMEOUT)?;
            }
            let by_service = sb.lbs_in(NS)?;
            let total: usize = by_service.values().map(Vec::len).sum();
            let dupes: Vec<&String> = by_service
                .iter()
                .filter(|(_, v)| v.len() != 1)
                .map(|(k, _)| k)
                .collect();
            ensure!(dupes.is_empty(), "one LB per Service, duplicates for {dupes:?}");
            ensure!(
                total == 21,
                "21 LBs, found {total}: {:?}",
                by_service.keys().collect::<BTreeSet<_>>()
            );
            ensure!(
                ccms[follower].metric("kuberaya_ccm_leader") == Some(1.0),
                "the new leader's gauge"
            );
            Ok(())
        };
        let result = run(&mut ccms);
        result.map_err(|e| e.context(format!("CCM outputs:\n{}", tails(&ccms))))
    })
}

/// A leader whose Lease is taken over stops at once (it exits rather than reconcile
/// beside the new holder).
#[test]
fn a_leader_that_loses_its_lease_stops() -> Result<()> {
    with_sandbox(|sb| {
        let mut ccm = spawn_ccm(sb)?;
        ccm.wait_leader(Duration::from_secs(20))?;
        let lease = sb.get_json(&["get", "lease", "kuberaya-ccm", "-n", "default"])?;
        ensure!(lease["spec"]["holderIdentity"].is_string(), "{lease}");
        let now = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"]).output()?;
        let now = String::from_utf8_lossy(&now.stdout).trim().to_string();
        let patch = json!({"spec": {"holderIdentity": "someone-else", "renewTime": now, "leaseDurationSeconds": 60}})
            .to_string();
        sb.kubectl(&[
            "patch",
            "lease",
            "kuberaya-ccm",
            "-n",
            "default",
            "--type",
            "merge",
            "-p",
            &patch,
        ])?;
        let exited = poll_until_blocking(Duration::from_secs(15), || (!ccm.process.is_running()).then_some(()));
        if exited.is_none() {
            bail!(
                "the CCM kept running after losing its Lease\n{}",
                ccm.process.output_tails()
            );
        }
        ensure!(
            ccm.process.stdout().contains("leadership lost") || ccm.process.stderr().contains("leadership lost"),
            "it says why\n{}",
            ccm.process.output_tails()
        );
        Ok(())
    })
}

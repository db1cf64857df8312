//! `deploy/`: every kustomization builds with the real `kubectl kustomize`; the workloads
//! are hardened as the issue asks; the RBAC rules grant exactly what the code calls (a
//! table below, checked both ways, and a scan of the sources for the kinds they use);
//! the Dockerfiles are multi-stage, locked and non-root. The end-to-end test applies the
//! whole bundle to a sandbox and runs the CCM and the gateway from the rendered
//! Deployments' args with their own ServiceAccount tokens: least privilege is proven by
//! running, not only by reading.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kuberaya_e2e::{Process, binary, poll_until_blocking, unique_net_index};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn run(cmd: &mut Command, stdin: Option<&str>) -> Result<Output> {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    Ok(child.wait_with_output()?)
}

/// `kubectl kustomize deploy/<dir>`, as YAML.
fn kustomize_yaml(dir: &str) -> Result<String> {
    let out = run(
        Command::new("kubectl")
            .arg("kustomize")
            .arg(repo().join("deploy").join(dir)),
        None,
    )?;
    ensure!(out.status.success(), "kubectl kustomize deploy/{dir}: {}", text(&out));
    Ok(String::from_utf8(out.stdout)?)
}

/// YAML documents as JSON objects, converted offline by kubectl itself (`--local`: no
/// server is asked), so the test needs no YAML library of its own.
fn yaml_to_objects(yaml: &str) -> Result<Vec<Value>> {
    let out = run(
        Command::new("kubectl").args([
            "annotate",
            "--local",
            "--kubeconfig=/dev/null",
            "-f",
            "-",
            "-o",
            "json",
            "kuberaya.test/none-",
        ]),
        Some(yaml),
    )?;
    ensure!(out.status.success(), "kubectl annotate --local: {}", text(&out));
    let body = String::from_utf8(out.stdout)?;
    let mut objects = Vec::new();
    for v in serde_json::Deserializer::from_str(&body).into_iter::<Value>() {
        let v = v?;
        match v["kind"].as_str() {
            Some("List") => objects.extend(v["items"].as_array().cloned().unwrap_or_default()),
            _ => objects.push(v),
        }
    }
    Ok(objects)
}

fn kustomize(dir: &str) -> Result<Vec<Value>> {
    yaml_to_objects(&kustomize_yaml(dir)?)
}

fn key(o: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (s(&o["kind"]), s(&o["metadata"]["namespace"]), s(&o["metadata"]["name"]))
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} in the rendered manifests"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
        .unwrap_or_default()
}

/// The value of `--flag=value` in `args`.
fn flag(args: &[String], name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix).map(String::from))
}

#[test]
fn every_kustomization_builds_and_the_top_level_includes_all() -> Result<()> {
    let mut parts = BTreeSet::new();
    for dir in ["crds", "ccm", "gateway", "gateway/overlays/tun"] {
        let objs = kustomize(dir)?;
        ensure!(!objs.is_empty(), "deploy/{dir} renders nothing");
        for o in &objs {
            ensure!(
                o["apiVersion"].is_string() && o["kind"].is_string() && o["metadata"]["name"].is_string(),
                "deploy/{dir}: an object without apiVersion/kind/name: {o}"
            );
        }
        if dir != "gateway/overlays/tun" {
            parts.extend(objs.iter().map(key));
        }
    }
    let all: BTreeSet<_> = kustomize(".")?.iter().map(key).collect();
    assert_eq!(all, parts, "deploy/kustomization.yaml is crds + ccm + gateway");
    let crd = find(
        &kustomize("crds")?,
        "CustomResourceDefinition",
        "vpnpeers.vpn.cloudraya.com",
    )?
    .clone();
    assert_eq!(crd["spec"]["group"], "vpn.cloudraya.com");
    let policy = find(
        &kustomize("crds")?,
        "CustomResourceDefinition",
        "vpnaccesspolicies.vpn.cloudraya.com",
    )?
    .clone();
    assert_eq!(policy["spec"]["group"], "vpn.cloudraya.com");
    Ok(())
}

fn pod_spec(deploy: &Value) -> &Value {
    &deploy["spec"]["template"]["spec"]
}

fn container(deploy: &Value) -> &Value {
    &pod_spec(deploy)["containers"][0]
}

/// Non-root at pod level (and at container level, unless it runs as root with only
/// added capabilities), no privilege escalation, every capability dropped, read-only root
/// filesystem.
fn assert_hardened(deploy: &Value) {
    let name = &deploy["metadata"]["name"];
    let pod = &pod_spec(deploy)["securityContext"];
    assert_eq!(pod["runAsNonRoot"], true, "{name}: runAsNonRoot");
    assert!(
        pod["runAsUser"].as_i64().is_some_and(|u| u > 0),
        "{name}: runAsUser not root"
    );
    let c = &container(deploy)["securityContext"];
    if c["runAsUser"] == 0 {
        assert!(
            !strings(&c["capabilities"]["add"]).is_empty(),
            "{name}: root only for a capability"
        );
    }
    assert_eq!(c["allowPrivilegeEscalation"], false, "{name}");
    assert_eq!(c["readOnlyRootFilesystem"], true, "{name}");
    assert_eq!(strings(&c["capabilities"]["drop"]), ["ALL"], "{name}");
}

fn added_capabilities(deploy: &Value) -> Vec<String> {
    strings(&container(deploy)["securityContext"]["capabilities"]["add"])
}

#[test]
fn ccm_deployment_is_highly_available_critical_and_non_root() -> Result<()> {
    let objs = kustomize("ccm")?;
    let d = find(&objs, "Deployment", "kuberaya-ccm")?;
    assert_eq!(d["metadata"]["namespace"], "kube-system");
    assert_eq!(d["spec"]["replicas"], 2);
    assert_hardened(d);
    assert!(added_capabilities(d).is_empty());
    let pod = pod_spec(d);
    assert_eq!(pod["priorityClassName"], "system-cluster-critical");
    assert_eq!(pod["hostNetwork"], true, "a CCM runs before the CNI");
    assert_eq!(pod["serviceAccountName"], "kuberaya-ccm");
    let tolerated: BTreeSet<String> = pod["tolerations"]
        .as_array()
        .context("tolerations")?
        .iter()
        .filter_map(|t| t["key"].as_str().map(String::from))
        .collect();
    for taint in [
        "node.cloudprovider.kubernetes.io/uninitialized",
        "node-role.kubernetes.io/control-plane",
    ] {
        assert!(tolerated.contains(taint), "tolerates {taint}: {tolerated:?}");
    }
    let args = strings(&container(d)["args"]);
    assert_eq!(flag(&args, "leader-elect").as_deref(), Some("true"), "{args:?}");
    assert_eq!(
        flag(&args, "leader-elect-resource-namespace").as_deref(),
        Some("kube-system")
    );
    // Nothing in plain HTTP on the node (hostNetwork): /metrics, /healthz and /readyz
    // are on the secure address, and the probes hit its port over HTTPS.
    assert_eq!(flag(&args, "metrics-bind-address").as_deref(), Some("0"), "{args:?}");
    assert_eq!(flag(&args, "health-bind-address").as_deref(), Some("0"), "{args:?}");
    let secure = flag(&args, "secure-bind-address").context("--secure-bind-address")?;
    let secure_port: u16 = secure.rsplit(':').next().context("port")?.parse()?;
    assert_eq!(secure_port, 10258, "upstream CCMs' secure port");
    let ports = container(d)["ports"].as_array().context("ports")?;
    assert_eq!(ports.len(), 1, "one port: {ports:?}");
    let named = ports
        .iter()
        .find(|p| p["name"] == "https")
        .context("a port named https")?;
    assert_eq!(named["containerPort"], secure_port);
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let p = &container(d)[probe]["httpGet"];
        assert_eq!(p["path"], path, "{probe}");
        assert_eq!(p["scheme"], "HTTPS", "{probe}");
        assert!(p["port"] == "https" || p["port"] == secure_port, "{probe}: {p}");
    }
    // The PDB covers the pods.
    let pdb = find(&objs, "PodDisruptionBudget", "kuberaya-ccm")?;
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    let labels = &d["spec"]["template"]["metadata"]["labels"];
    for (k, v) in pdb["spec"]["selector"]["matchLabels"].as_object().context("selector")? {
        assert_eq!(&labels[k], v, "the PDB selects the CCM's pods");
    }
    // The cloud config: one Secret, mounted and read for the credentials; the example
    // (not part of the base, so an apply never overwrites real credentials) has its keys.
    let secret_name = pod["volumes"][0]["secret"]["secretName"]
        .as_str()
        .context("secret volume")?;
    let example = yaml_to_objects(&std::fs::read_to_string(
        repo().join("deploy/ccm/cloud-config.example.yaml"),
    )?)?;
    let example = &example[0];
    assert_eq!(example["metadata"]["name"], secret_name);
    assert_eq!(example["metadata"]["namespace"], "kube-system");
    for k in ["cloud-config.yaml", "email", "password"] {
        assert!(example["stringData"][k].is_string(), "the example Secret has {k}");
    }
    for env in container(d)["env"].as_array().context("env")? {
        if let Some(r) = env["valueFrom"]["secretKeyRef"].as_object() {
            assert_eq!(r["name"], secret_name);
            assert!(example["stringData"][r["key"].as_str().unwrap_or_default()].is_string());
        }
    }
    assert!(
        objs.iter().all(|o| o["kind"] != "Secret"),
        "no Secret in the base: applying it must not overwrite real credentials"
    );
    Ok(())
}

#[test]
fn gateway_runs_two_replicas_that_roll_without_loss_and_one_lb_rule_per_client() -> Result<()> {
    let base = kustomize("gateway")?;
    let d = find(&base, "Deployment", "kuberaya-gateway")?;
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
    let pod = pod_spec(d);
    let anti =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(
        anti["labelSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "kuberaya-gateway"
    );
    let c = &pod["containers"][0];
    // Ready only once every peer is loaded (/readyz), and checked often.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(c["readinessProbe"]["periodSeconds"].as_u64().unwrap_or(99) <= 2);
    // The Lease identity.
    assert!(
        c["env"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["name"] == "POD_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"),
        "POD_NAME from the downward API"
    );
    let pdb = find(&base, "PodDisruptionBudget", "kuberaya-gateway")?;
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "kuberaya-gateway"
    );
    // One replica per client, and only nodes with a ready replica in the LB.
    let svc = find(&base, "Service", "kuberaya-gateway")?;
    assert_eq!(svc["spec"]["sessionAffinity"], "ClientIP");
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
    let a = &svc["metadata"]["annotations"];
    assert_eq!(a["lb.cloudraya.com/health-check-interval"], "2");
    assert_eq!(a["lb.cloudraya.com/health-check-unhealthy-threshold"], "1");
    Ok(())
}

#[test]
fn gateway_has_no_capabilities_in_the_base_and_net_admin_only_in_the_tun_overlay() -> Result<()> {
    let base = kustomize("gateway")?;
    let d = find(&base, "Deployment", "kuberaya-gateway")?;
    assert_eq!(d["metadata"]["namespace"], "kuberaya-system");
    assert_hardened(d);
    assert!(added_capabilities(d).is_empty(), "userspace mode needs no capability");
    let args = strings(&container(d)["args"]);
    assert!(
        flag(&args, "dataplane").is_none(),
        "userspace is the default data plane"
    );
    assert_eq!(pod_spec(d)["serviceAccountName"], "kuberaya-gateway");

    // The Service `kuberaya peer add` looks for (cli/src/gateway.rs).
    let svc = find(&base, "Service", "kuberaya-gateway")?;
    assert_eq!(svc["metadata"]["namespace"], "kuberaya-system");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    let port = &svc["spec"]["ports"][0];
    assert_eq!(
        (port["protocol"].as_str(), port["port"].as_i64()),
        (Some("UDP"), Some(51820))
    );
    let listen = flag(&args, "listen").context("--listen")?;
    let cport = container(d)["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .find(|p| p["name"] == port["targetPort"])
        .context("targetPort names a container port")?;
    assert_eq!(cport["protocol"], "UDP");
    assert_eq!(
        Some(cport["containerPort"].to_string().as_str()),
        listen.rsplit(':').next()
    );
    let labels = &d["spec"]["template"]["metadata"]["labels"];
    for (k, v) in svc["spec"]["selector"].as_object().context("selector")? {
        assert_eq!(&labels[k], v, "the Service selects the gateway");
    }
    // The gateway annotates this Service itself (publish.rs): the manifest carries none of
    // those annotations (a re-apply would undo them), the Deployment leaves publishing on
    // and names this Service, and the Role lets it patch exactly this one.
    let annotations = svc["metadata"]["annotations"].as_object().cloned().unwrap_or_default();
    assert!(
        !annotations.keys().any(|k| k.starts_with("vpn.cloudraya.com/")),
        "{annotations:?}"
    );
    assert_eq!(
        flag(&args, "publish-key-to-service").unwrap_or_else(|| "kuberaya-gateway".into()),
        "kuberaya-gateway"
    );
    let role = find(&base, "Role", "kuberaya-gateway")?;
    assert!(
        role["rules"].as_array().context("rules")?.iter().any(|r| {
            strings(&r["resources"]) == ["services"]
                && strings(&r["resourceNames"]) == ["kuberaya-gateway"]
                && strings(&r["verbs"]).contains(&"patch".to_string())
        }),
        "{role}"
    );
    let cm = find(&base, "ConfigMap", "kuberaya-config")?;
    assert!(cm["data"]["service-cidr"].is_string());
    // Metrics name peers: HTTPS on the pod network, plain HTTP only on its loopback; the
    // probes' health port stays plain.
    let secure = flag(&args, "secure-bind-address").context("--secure-bind-address")?;
    let https = container(d)["ports"]
        .as_array()
        .context("ports")?
        .iter()
        .find(|p| p["name"] == "https")
        .context("a port named https")?;
    assert_eq!(
        Some(https["containerPort"].to_string().as_str()),
        secure.rsplit(':').next()
    );
    let plain = flag(&args, "metrics-bind-address").context("--metrics-bind-address")?;
    assert!(plain.starts_with("127.0.0.1:"), "plain metrics on loopback: {plain}");

    let tun = kustomize("gateway/overlays/tun")?;
    let t = find(&tun, "Deployment", "kuberaya-gateway")?;
    assert_hardened(t);
    assert_eq!(added_capabilities(t), ["NET_ADMIN"]);
    // A non-root process gets no added capability in Kubernetes (no ambient set): the
    // container, and only it, runs as root, with NET_ADMIN alone.
    let sc = &container(t)["securityContext"];
    assert_eq!((&sc["runAsUser"], &sc["runAsNonRoot"]), (&json!(0), &json!(false)));
    assert!(sc["privileged"].is_null(), "not privileged");
    assert!(pod_spec(t)["initContainers"].is_null(), "no init container");
    assert!(pod_spec(t)["securityContext"]["sysctls"].is_null(), "no unsafe sysctl");
    assert_eq!(
        flag(&strings(&container(t)["args"]), "dataplane").as_deref(),
        Some("tun")
    );
    // Everything else is the base.
    let others =
        |objs: &[Value]| -> Vec<Value> { objs.iter().filter(|o| o["kind"] != "Deployment").cloned().collect() };
    assert_eq!(others(&tun), others(&base));
    Ok(())
}

/// The dual-stack TUN overlay is the TUN overlay plus one pod sysctl, IPv6 forwarding
/// (the kernel has no netlink switch for it, and /proc/sys is read-only in a pod).
#[test]
fn the_tun_ipv6_overlay_adds_only_the_ipv6_forwarding_sysctl() -> Result<()> {
    let tun = kustomize("gateway/overlays/tun")?;
    let v6 = kustomize("gateway/overlays/tun-ipv6")?;
    let d = find(&v6, "Deployment", "kuberaya-gateway")?;
    assert_eq!(
        pod_spec(d)["securityContext"]["sysctls"],
        json!([{"name": "net.ipv6.conf.all.forwarding", "value": "1"}])
    );
    assert_hardened(d);
    assert_eq!(added_capabilities(d), ["NET_ADMIN"]);
    assert!(pod_spec(d)["initContainers"].is_null(), "no init container");
    assert!(
        container(d)["securityContext"]["privileged"].is_null(),
        "not privileged"
    );
    // Everything else is the TUN overlay's.
    let mut without = d.clone();
    without["spec"]["template"]["spec"]["securityContext"]
        .as_object_mut()
        .context("the pod's securityContext")?
        .remove("sysctls");
    assert_eq!(&without, find(&tun, "Deployment", "kuberaya-gateway")?);
    let others =
        |objs: &[Value]| -> Vec<Value> { objs.iter().filter(|o| o["kind"] != "Deployment").cloned().collect() };
    assert_eq!(others(&v6), others(&tun));
    Ok(())
}

/// One permission: scope (`*cluster*` or a namespace), API group, resource, verb, and the
/// object name it is limited to.
type Grant = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
);

/// A permission as granted or needed, owned.
type Perm = (String, String, String, String, Option<String>);

const CLUSTER: &str = "*cluster*";

/// What kuberaya-ccm calls (ccm/src and the libraries it drives):
const CCM_NEEDS: &[Grant] = &[
    // service controller: kube-runtime Controller over every Service (list, watch), the
    // finalizer (JSON patches of metadata.finalizers), status (merge patch), the orphan
    // sweep's fresh list.
    (CLUSTER, "", "services", "list", None),
    (CLUSTER, "", "services", "watch", None),
    (CLUSTER, "", "services", "patch", None),
    (CLUSTER, "", "services/status", "patch", None),
    // node reflector of the service controller; node controller (providerID, labels,
    // taints: patch, and a fresh get when a taint patch's `test` fails; addresses: status
    // patch); node lifecycle (list, delete).
    (CLUSTER, "", "nodes", "get", None),
    (CLUSTER, "", "nodes", "list", None),
    (CLUSTER, "", "nodes", "watch", None),
    (CLUSTER, "", "nodes", "patch", None),
    (CLUSTER, "", "nodes", "delete", None),
    (CLUSTER, "", "nodes/status", "patch", None),
    // kube-runtime's Recorder: events.k8s.io/v1, create (new) and patch (series); in the
    // Services' namespaces and `default` (for Nodes).
    (CLUSTER, "events.k8s.io", "events", "create", None),
    (CLUSTER, "events.k8s.io", "events", "patch", None),
    // kube-lease-manager on the Lease kube-system/kuberaya-ccm.
    ("kube-system", "coordination.k8s.io", "leases", "create", None),
    (
        "kube-system",
        "coordination.k8s.io",
        "leases",
        "get",
        Some("kuberaya-ccm"),
    ),
    (
        "kube-system",
        "coordination.k8s.io",
        "leases",
        "patch",
        Some("kuberaya-ccm"),
    ),
    // The HTTPS /metrics (secure_http.rs): who a scraper is, and whether it may `get
    // /metrics` (system:auth-delegator).
    (CLUSTER, "authentication.k8s.io", "tokenreviews", "create", None),
    (CLUSTER, "authorization.k8s.io", "subjectaccessreviews", "create", None),
];

/// What kuberaya-gateway calls (vpn-gateway/src/source/kube/):
const GATEWAY_NEEDS: &[Grant] = &[
    // Service and VpnPeer reflectors.
    (CLUSTER, "", "services", "list", None),
    (CLUSTER, "", "services", "watch", None),
    (CLUSTER, "vpn.cloudraya.com", "vpnpeers", "list", None),
    (CLUSTER, "vpn.cloudraya.com", "vpnpeers", "watch", None),
    // Accepted condition, address, handshake and counters.
    (CLUSTER, "vpn.cloudraya.com", "vpnpeers/status", "patch", None),
    // The VpnAccessPolicy reflector, and each policy's condition and matched peers.
    (CLUSTER, "vpn.cloudraya.com", "vpnaccesspolicies", "list", None),
    (CLUSTER, "vpn.cloudraya.com", "vpnaccesspolicies", "watch", None),
    (CLUSTER, "vpn.cloudraya.com", "vpnaccesspolicies/status", "patch", None),
    // Namespace labels, for policies' namespaceSelector.
    (CLUSTER, "", "namespaces", "list", None),
    (CLUSTER, "", "namespaces", "watch", None),
    // Preshared keys: a Secret in each peer's namespace, by name (get_opt); its own key.
    (CLUSTER, "", "secrets", "get", None),
    // Its key Secret, created on first start.
    ("kuberaya-system", "", "secrets", "create", None),
    // Its own Service, annotated with its public key and tunnel address (publish.rs).
    ("kuberaya-system", "", "services", "get", Some("kuberaya-gateway")),
    ("kuberaya-system", "", "services", "patch", Some("kuberaya-gateway")),
    // kube-lease-manager on the Lease kuberaya-system/kuberaya-gateway (leader.rs): the
    // one replica that writes status.
    ("kuberaya-system", "coordination.k8s.io", "leases", "create", None),
    (
        "kuberaya-system",
        "coordination.k8s.io",
        "leases",
        "get",
        Some("kuberaya-gateway"),
    ),
    (
        "kuberaya-system",
        "coordination.k8s.io",
        "leases",
        "patch",
        Some("kuberaya-gateway"),
    ),
    // The HTTPS /metrics (the CCM's secure_http.rs, included): system:auth-delegator.
    (CLUSTER, "authentication.k8s.io", "tokenreviews", "create", None),
    (CLUSTER, "authorization.k8s.io", "subjectaccessreviews", "create", None),
];

/// The Kubernetes kinds each binary's sources name in `Api<K>` (outside tests), and the
/// resource each is granted as. A kind missing here fails the scan below: add it to the
/// tables and to the RBAC manifest.
const KINDS: &[(&str, &str)] = &[
    ("Service", "services"),
    ("K8sService", "services"),
    ("Node", "nodes"),
    ("Secret", "secrets"),
    ("VpnPeer", "vpnpeers"),
    ("VpnAccessPolicy", "vpnaccesspolicies"),
    ("Namespace", "namespaces"),
    ("Lease", "leases"),
    ("Event", "events"),
    ("TokenReview", "tokenreviews"),
    ("SubjectAccessReview", "subjectaccessreviews"),
];

/// Bootstrap ClusterRoles the bundle binds without shipping them (kube-apiserver makes
/// them): their rules, after its bootstrap policy.
fn bootstrap_cluster_role(name: &str) -> Option<Value> {
    (name == "system:auth-delegator").then(|| {
        json!({"kind": "ClusterRole", "metadata": {"name": name}, "rules": [
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]}
        ]})
    })
}

/// Every (scope, group, resource, verb, name) the RBAC objects bound to the
/// ServiceAccount `namespace/sa` grant. Fails on wildcards.
fn granted(objs: &[Value], namespace: &str, sa: &str) -> Result<BTreeSet<Perm>> {
    let mut out = BTreeSet::new();
    for binding in objs
        .iter()
        .filter(|o| o["kind"] == "ClusterRoleBinding" || o["kind"] == "RoleBinding")
    {
        let ours = binding["subjects"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == sa && s["namespace"] == namespace);
        if !ours {
            continue;
        }
        let role_kind = binding["roleRef"]["kind"].as_str().context("roleRef.kind")?;
        let role_name = binding["roleRef"]["name"].as_str().context("roleRef.name")?;
        let bootstrap = (role_kind == "ClusterRole")
            .then(|| bootstrap_cluster_role(role_name))
            .flatten();
        let role = objs
            .iter()
            .find(|o| {
                o["kind"] == role_kind
                    && o["metadata"]["name"] == role_name
                    && (role_kind == "ClusterRole" || o["metadata"]["namespace"] == binding["metadata"]["namespace"])
            })
            .or(bootstrap.as_ref())
            .with_context(|| format!("{role_kind} {role_name} of a binding is in the manifests"))?;
        let scope = if binding["kind"] == "ClusterRoleBinding" {
            CLUSTER.to_string()
        } else {
            binding["metadata"]["namespace"]
                .as_str()
                .context("namespace")?
                .to_string()
        };
        for rule in role["rules"].as_array().context("rules")? {
            ensure!(rule["nonResourceURLs"].is_null(), "no nonResourceURLs: {rule}");
            let names: Vec<Option<String>> = match strings(&rule["resourceNames"]) {
                n if n.is_empty() => vec![None],
                n => n.into_iter().map(Some).collect(),
            };
            for g in strings(&rule["apiGroups"]) {
                for r in strings(&rule["resources"]) {
                    for v in strings(&rule["verbs"]) {
                        for n in &names {
                            ensure!(
                                ![&g, &r, &v].iter().any(|s| s.contains('*')),
                                "{role_name}: a wildcard in {rule}"
                            );
                            out.insert((scope.clone(), g.clone(), r.clone(), v.clone(), n.clone()));
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

fn needs(table: &[Grant]) -> BTreeSet<Perm> {
    table
        .iter()
        .map(|(s, g, r, v, n)| {
            (
                s.to_string(),
                g.to_string(),
                r.to_string(),
                v.to_string(),
                n.map(String::from),
            )
        })
        .collect()
}

#[test]
fn rbac_grants_exactly_what_the_code_calls() -> Result<()> {
    let all = kustomize(".")?;
    assert_eq!(
        granted(&all, "kube-system", "kuberaya-ccm")?,
        needs(CCM_NEEDS),
        "deploy/ccm/rbac.yaml against CCM_NEEDS (left: granted, right: needed)"
    );
    assert_eq!(
        granted(&all, "kuberaya-system", "kuberaya-gateway")?,
        needs(GATEWAY_NEEDS),
        "deploy/gateway/base/rbac.yaml against GATEWAY_NEEDS (left: granted, right: needed)"
    );
    // Scrapers get `get /metrics` and nothing else, and the bundle binds it to nobody.
    let reader = find(&all, "ClusterRole", "kuberaya-metrics-reader")?;
    assert_eq!(
        reader["rules"],
        json!([{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]),
        "{reader}"
    );
    assert!(
        !all.iter()
            .any(|o| o["kind"].as_str().is_some_and(|k| k.ends_with("Binding"))
                && o["roleRef"]["name"] == "kuberaya-metrics-reader"),
        "the operator binds the scraper role to their scraper"
    );
    // The lease the CCM elects on is the one the Role names.
    let d = find(&all, "Deployment", "kuberaya-ccm")?;
    let args = strings(&container(d)["args"]);
    assert_eq!(
        flag(&args, "leader-elect-resource-name").as_deref(),
        Some("kuberaya-ccm")
    );
    Ok(())
}

/// The `Api<K>` kinds named in the non-test code of `paths` (directories or files).
fn api_kinds(paths: &[PathBuf]) -> Result<BTreeSet<String>> {
    let mut kinds = BTreeSet::new();
    let mut stack: Vec<PathBuf> = paths.iter().filter(|p| p.is_dir()).cloned().collect();
    let mut files: Vec<PathBuf> = paths.iter().filter(|p| p.is_file()).cloned().collect();
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if p.is_dir() {
                if !name.contains("test") {
                    stack.push(p);
                }
                continue;
            }
            if !name.ends_with(".rs") || name.contains("test") || name == "fake.rs" {
                continue;
            }
            files.push(p);
        }
    }
    for p in files {
        let src = std::fs::read_to_string(&p)?;
        let src = src.split("#[cfg(test)]").next().unwrap_or_default();
        for pat in ["Api<", "Api::<"] {
            for piece in src.split(pat).skip(1) {
                let kind: String = piece.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !kind.is_empty() && kind != "K" {
                    kinds.insert(kind);
                }
            }
        }
    }
    Ok(kinds)
}

#[test]
fn the_sources_use_no_kind_the_tables_miss() -> Result<()> {
    // The gateway includes the CCM's secure_http.rs (#[path]): its kinds are the gateway's too.
    for (dir, also, table) in [
        ("ccm/src", None, CCM_NEEDS),
        ("vpn-gateway/src", Some("ccm/src/secure_http.rs"), GATEWAY_NEEDS),
    ] {
        let paths: Vec<PathBuf> = std::iter::once(dir).chain(also).map(|p| repo().join(p)).collect();
        let kinds = api_kinds(&paths)?;
        ensure!(!kinds.is_empty(), "{dir}: no Api<K> found; is the scan broken?");
        for k in &kinds {
            let Some((_, resource)) = KINDS.iter().find(|(n, _)| n == k) else {
                bail!("{dir} uses Api<{k}>: add its resource to the RBAC table and manifest");
            };
            assert!(
                table.iter().any(|(_, _, r, _, _)| r == resource),
                "{dir} uses Api<{k}> but its table grants nothing on {resource}"
            );
        }
    }
    Ok(())
}

#[test]
fn dockerfiles_are_multi_stage_locked_and_non_root() -> Result<()> {
    for (file, bin) in [
        ("Dockerfile.ccm", "kuberaya-ccm"),
        ("Dockerfile.gateway", "kuberaya-gateway"),
        ("Dockerfile.cli", "kuberaya"),
    ] {
        let path = repo().join("deploy/images").join(file);
        let src = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
        // Instructions, with continuation lines joined and comments dropped.
        let joined = src.replace("\\\n", " ");
        let lines: Vec<&str> = joined
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let froms: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("FROM ")).collect();
        assert!(froms.len() >= 2, "{file}: multi-stage");
        assert!(
            froms[0].starts_with("FROM rust:1.95-bookworm AS "),
            "{file}: {}",
            froms[0]
        );
        // The runtime base, written out or through `ARG BASE=...` (whose default is the
        // published one; deploy/images/build passes a local base made from Debian's packages).
        let mut runtime = froms.last().copied().unwrap_or_default().to_string();
        if runtime == "FROM ${BASE}" {
            runtime = lines
                .iter()
                .find_map(|l| l.strip_prefix("ARG BASE="))
                .with_context(|| format!("{file}: ARG BASE with a default"))?
                .to_string();
        }
        assert!(
            runtime.contains("distroless") || runtime.contains("debian:bookworm-slim"),
            "{file}: a small runtime image: {runtime}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("cargo build --release --locked --bin ") && l.contains(&format!("--bin {bin}"))),
            "{file}: cargo build --release --locked --bin {bin}"
        );
        // The last USER, after the last FROM, is not root.
        let last_from = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap_or(0);
        let user = lines[last_from..]
            .iter()
            .rev()
            .find_map(|l| l.strip_prefix("USER "))
            .with_context(|| format!("{file}: a USER in the runtime stage"))?;
        let uid = user.split(':').next().unwrap_or_default().trim();
        assert!(uid != "root" && uid != "0" && !uid.is_empty(), "{file}: USER {user}");
        assert!(
            lines[last_from..]
                .iter()
                .any(|l| l.starts_with("COPY --from=") && l.contains(bin)),
            "{file}: the runtime stage copies {bin} from the build"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("ENTRYPOINT [") && l.contains(bin)),
            "{file}: ENTRYPOINT runs {bin}"
        );
    }
    let ignore = std::fs::read_to_string(repo().join(".dockerignore"))?;
    assert!(
        ignore.lines().any(|l| l.trim() == "target/"),
        ".dockerignore leaves target/ out"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The one-file install, deploy/release/kuberaya.yaml.

const RELEASE_FILE: &str = "deploy/release/kuberaya.yaml";
const REGENERATE: &str = "deploy/release/generate";

/// The comment deploy/release/generate puts before the kustomize output.
fn release_header(version: &str) -> String {
    format!(
        "# KubeRaya {version}: the CRDs, the CCM and the gateway in one file, images pinned to {version}.\n\
         # Generated by deploy/release/generate from deploy/release/kustomization.yaml; do not edit.\n\
         # Install, upgrade and uninstall: docs/installing.md.\n"
    )
}

/// Every `image` of a container, init container or ephemeral container anywhere in `v`.
fn container_images(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                if matches!(k.as_str(), "containers" | "initContainers" | "ephemeralContainers") {
                    for c in child.as_array().into_iter().flatten() {
                        out.extend(c["image"].as_str().map(String::from));
                    }
                }
                container_images(child, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|c| container_images(c, out)),
        _ => {}
    }
}

/// The tag of an image reference (`None` when untagged; a digest counts as a pin). The
/// tag follows the last `:` after the last `/`, so a registry's port is not a tag.
fn image_pin(image: &str) -> Option<&str> {
    if let Some((_, digest)) = image.split_once('@') {
        return Some(digest);
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split_once(':').map(|(_, tag)| tag)
}

#[test]
fn the_release_file_is_the_kustomize_output_with_every_image_pinned() -> Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let committed = std::fs::read_to_string(repo().join(RELEASE_FILE))
        .with_context(|| format!("{RELEASE_FILE} is missing: run {REGENERATE}"))?;
    // Byte for byte what the generator writes: its header, then `kubectl kustomize`.
    let rendered = format!("{}{}", release_header(version), kustomize_yaml("release")?);
    if committed != rendered {
        let (n, (old, new)) = committed
            .lines()
            .chain(std::iter::repeat("<end of file>"))
            .zip(rendered.lines().chain(std::iter::repeat("<end of file>")))
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .unwrap_or((0, ("", "")));
        bail!(
            "{RELEASE_FILE} differs from `kubectl kustomize deploy/release` (first at line {}: committed {old:?}, rendered {new:?}); regenerate it with `{REGENERATE}`",
            n + 1
        );
    }

    // Pinned: the kustomization's newTag is the workspace version.
    let kustomization = std::fs::read_to_string(repo().join("deploy/release/kustomization.yaml"))?;
    let tags: Vec<&str> = kustomization
        .lines()
        .filter_map(|l| l.trim().strip_prefix("newTag:"))
        .map(str::trim)
        .collect();
    ensure!(!tags.is_empty(), "deploy/release/kustomization.yaml pins no newTag");
    for t in &tags {
        assert_eq!(
            *t, version,
            "deploy/release/kustomization.yaml: newTag is the workspace version (Cargo.toml); set it and run {REGENERATE}"
        );
    }
    // Every image in the file, found two ways (each `image:` line, and each container of
    // every object) so that none hides from the check.
    let objs = yaml_to_objects(&committed)?;
    let mut images = Vec::new();
    for o in &objs {
        container_images(o, &mut images);
    }
    let lines: Vec<&str> = committed
        .lines()
        .filter_map(|l| l.trim_start().trim_start_matches("- ").strip_prefix("image:"))
        .map(|s| s.trim().trim_matches('"'))
        .collect();
    assert_eq!(lines, images, "every image: line is a container's image");
    ensure!(images.len() >= 2, "the CCM's and the gateway's images: {images:?}");
    for image in &images {
        let pin = image_pin(image);
        assert!(
            pin.is_some_and(|t| !t.is_empty() && t != "latest"),
            "{RELEASE_FILE}: {image} is not pinned (no tag, or :latest)"
        );
        if image.starts_with("ghcr.io/cloudraya/") {
            assert_eq!(pin, Some(version), "{image}: our images carry the workspace version");
        }
    }
    for name in ["kuberaya-ccm", "kuberaya-gateway"] {
        let d = find(&objs, "Deployment", name)?;
        assert_eq!(
            container(d)["image"],
            format!("ghcr.io/cloudraya/{name}:{version}"),
            "the release runs {name} {version}"
        );
    }

    // The whole bundle: the objects of `kubectl apply -k deploy`, equal but for the images.
    let strip = |objs: &[Value]| -> Result<BTreeMap<(String, String, String), Value>> {
        let mut out = BTreeMap::new();
        for o in objs {
            let mut o = o.clone();
            if o["kind"] == "Deployment" {
                for c in o["spec"]["template"]["spec"]["containers"]
                    .as_array_mut()
                    .context("containers")?
                {
                    c["image"] = Value::Null;
                }
            }
            out.insert(key(&o), o);
        }
        Ok(out)
    };
    assert_eq!(
        strip(&objs)?,
        strip(&kustomize(".")?)?,
        "{RELEASE_FILE} is deploy/ (crds, ccm, gateway) with pinned images"
    );
    Ok(())
}

#[test]
fn image_pins_are_read_as_a_container_runtime_reads_them() {
    assert_eq!(image_pin("ghcr.io/cloudraya/kuberaya-ccm:0.1.0"), Some("0.1.0"));
    assert_eq!(image_pin("registry:5000/kuberaya-ccm"), None);
    assert_eq!(image_pin("registry:5000/kuberaya-ccm:1.2"), Some("1.2"));
    assert_eq!(image_pin("busybox"), None);
    assert_eq!(image_pin("busybox:latest"), Some("latest"));
    assert_eq!(image_pin("busybox@sha256:abcd"), Some("sha256:abcd"));
}

// ---------------------------------------------------------------------------------------
// End to end: the bundle on a sandbox, the CCM and gateway on their own tokens.

/// A detached sandbox, stopped and purged on drop.
struct Sandbox {
    state: PathBuf,
    kubeconfig: PathBuf,
    env: BTreeMap<String, String>,
    _dir: tempfile::TempDir,
}

impl Sandbox {
    fn up() -> Result<Sandbox> {
        let dir = tempfile::tempdir()?;
        let state = dir.path().join("sandbox");
        let n = unique_net_index();
        let out = run(
            Command::new(binary("kuberaya"))
                .args(["sandbox", "up", "--detach", "--no-ccm", "--state-dir"])
                .arg(&state)
                .arg(format!("--public-ip-range=127.203.{n}.0/24"))
                .arg(format!("--vm-ip-range=127.10.{n}.0/24"))
                .arg(format!("--service-cidr=127.97.{n}.0/24"))
                .arg(format!("--pod-cidr=127.{}.0.0/16", u16::from(n) + 100)),
            None,
        )?;
        let mut sb = Sandbox {
            kubeconfig: state.join("kubeconfig"),
            state,
            env: BTreeMap::new(),
            _dir: dir,
        };
        ensure!(out.status.success(), "sandbox up: {}", text(&out));
        let out = run(
            Command::new(binary("kuberaya"))
                .args(["sandbox", "env", "--state-dir"])
                .arg(&sb.state),
            None,
        )?;
        ensure!(out.status.success(), "sandbox env: {}", text(&out));
        let env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
            .collect();
        sb.env = env;
        Ok(sb)
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String> {
        let out = run(
            Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args),
            stdin,
        )?;
        ensure!(out.status.success(), "kubectl {args:?}: {}", text(&out));
        Ok(String::from_utf8(out.stdout)?)
    }

    fn get(&self, key: &str) -> Result<String> {
        self.env
            .get(key)
            .cloned()
            .with_context(|| format!("sandbox env exports {key}"))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("sandbox.log")).unwrap_or_default()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- sandbox.log (tail) ---");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
        let _ = Command::new(binary("kuberaya"))
            .args(["sandbox", "down", "--purge", "--state-dir"])
            .arg(&self.state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Standard base64 (the API's encoding of Secret data).
fn base64_decode(s: &str) -> Result<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = ALPHABET.iter().position(|&a| a == c).context("base64 character")? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

/// A kubeconfig for the sandbox's API server that authenticates as `namespace/sa` with a
/// fresh TokenRequest token.
fn service_account_kubeconfig(sb: &Sandbox, namespace: &str, sa: &str, path: &Path) -> Result<()> {
    let token = sb.kubectl(&["create", "token", sa, "-n", namespace], None)?;
    let mut kc: Value = serde_json::from_str(&sb.kubectl(
        &["config", "view", "--raw", "--minify", "--flatten", "-o", "json"],
        None,
    )?)?;
    kc["users"][0]["user"] = json!({ "token": token.trim() });
    std::fs::write(path, serde_json::to_vec_pretty(&kc)?)?;
    Ok(())
}

/// Start `bin` as the rendered Deployment `deploy` would: its args, with the Secret
/// volumes written to `root` (paths under their mount points rewritten there), its
/// environment resolved from Secrets and the downward API, and `overrides` replacing the
/// flags of the same name (bind addresses on 127.0.0.1, the kubeconfig).
fn start_like_the_deployment(
    sb: &Sandbox,
    bin: &str,
    deploy: &Value,
    root: &Path,
    overrides: &[(&str, String)],
) -> Result<Process> {
    let namespace = deploy["metadata"]["namespace"].as_str().context("namespace")?;
    let secret_data = |name: &str, key: &str| -> Result<Vec<u8>> {
        let s: Value =
            serde_json::from_str(&sb.kubectl(&["get", "secret", name, "-n", namespace, "-o", "json"], None)?)?;
        base64_decode(
            s["data"][key]
                .as_str()
                .with_context(|| format!("Secret {name} has {key}"))?,
        )
    };
    let c = container(deploy);
    let mut mounts = Vec::new();
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        let mount = m["mountPath"].as_str().context("mountPath")?;
        let vol = pod_spec(deploy)["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == m["name"])
            .context("volume of a mount")?;
        let Some(secret) = vol["secret"]["secretName"].as_str() else {
            continue;
        };
        let local = root.join(mount.trim_start_matches('/'));
        std::fs::create_dir_all(&local)?;
        for item in vol["secret"]["items"].as_array().context("secret items")? {
            let data = secret_data(secret, item["key"].as_str().context("key")?)?;
            std::fs::write(local.join(item["path"].as_str().context("path")?), data)?;
        }
        mounts.push((mount.to_string(), local));
    }
    let mut args: Vec<String> = strings(&c["args"])
        .into_iter()
        .map(|a| {
            let mut a = a;
            for (mount, local) in &mounts {
                a = a.replace(&format!("={mount}/"), &format!("={}/", local.display()));
            }
            a
        })
        .filter(|a| !overrides.iter().any(|(f, _)| a.starts_with(&format!("--{f}="))))
        .collect();
    args.extend(overrides.iter().map(|(f, v)| format!("--{f}={v}")));
    let mut cmd = Command::new(binary(bin));
    cmd.args(&args)
        .env_remove("KUBECONFIG")
        .env_remove("CLOUDRAYA_EMAIL")
        .env_remove("CLOUDRAYA_PASSWORD");
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().context("env name")?;
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
            String::from_utf8(secret_data(
                r["name"].as_str().context("name")?,
                r["key"].as_str().context("key")?,
            )?)?
        } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
            format!("{bin}-e2e")
        } else {
            bail!("env {name} of {bin}: unsupported source {e}");
        };
        cmd.env(name, value);
    }
    eprintln!("[deploy] starting {bin} {args:?}");
    Process::spawn_command(cmd)
}

fn jsonpath(sb: &Sandbox, args: &[&str], path: &str) -> String {
    let mut a = args.to_vec();
    let p = format!("jsonpath={path}");
    a.extend(["-o", &p]);
    sb.kubectl(&a, None).unwrap_or_default()
}

fn assert_no_denials(p: &Process) {
    let out = format!("{}{}", p.stdout(), p.stderr()).to_ascii_lowercase();
    assert!(
        !out.contains("forbidden") && !out.contains(" 403"),
        "{} was denied something its RBAC should grant:\n{}",
        p.name(),
        p.output_tails()
    );
}

#[test]
fn the_bundle_is_accepted_and_runs_on_its_own_service_account_tokens() -> Result<()> {
    let sb = Sandbox::up()?;
    let work = tempfile::tempdir()?;
    let deploy = repo().join("deploy");
    // As docs/installing.md: the cloud config Secret, then the one file. (The example,
    // filled in from the sandbox.)
    let example = std::fs::read_to_string(deploy.join("ccm/cloud-config.example.yaml"))?
        .replace("REPLACE_ME_API_URL", &sb.get("CLOUDRAYA_API_URL")?)
        .replace("REPLACE_ME_CLUSTER_ID", &sb.get("KUBERAYA_CLUSTER_ID")?)
        .replace("REPLACE_ME_EMAIL", &sb.get("CLOUDRAYA_EMAIL")?)
        .replace("REPLACE_ME_PASSWORD", &sb.get("CLOUDRAYA_PASSWORD")?);
    ensure!(!example.contains("REPLACE_ME"), "every placeholder is filled");
    sb.kubectl(&["apply", "-f", "-"], Some(&example))?;
    let release = repo().join(RELEASE_FILE);
    let release = release.to_str().context("utf-8")?;
    let applied = sb.kubectl(&["apply", "-f", release], None)?;
    let rendered = yaml_to_objects(&std::fs::read_to_string(release)?)?;
    for o in &rendered {
        let (kind, _, name) = key(o);
        let kind = kind.to_ascii_lowercase();
        assert!(
            applied.lines().any(|l| {
                let (k, rest) = l.split_once('/').unwrap_or_default();
                (k == kind || k.starts_with(&format!("{kind}."))) && rest.starts_with(&format!("{name} "))
            }),
            "apply -f {RELEASE_FILE} reports {kind}/{name} created: {applied}"
        );
    }
    ensure!(
        applied.lines().all(|l| l.ends_with(" created")),
        "a fresh cluster: everything created\n{applied}"
    );

    // Least privilege, as the API server decides it.
    let ccm_sa = "--as=system:serviceaccount:kube-system:kuberaya-ccm";
    for (verb, resource, ok) in [
        ("patch", "services/status", "yes"),
        ("delete", "nodes", "yes"),
        ("list", "secrets", "no"),
        ("create", "services", "no"),
        ("delete", "services", "no"),
    ] {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&sb.kubeconfig)
            .args(["auth", "can-i", verb, resource, "-A", ccm_sa])
            .output()?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            ok,
            "can-i {verb} {resource}"
        );
    }

    // The CCM, from the release file's Deployment, on its own token.
    let ccm_kc = work.path().join("ccm.kubeconfig");
    service_account_kubeconfig(&sb, "kube-system", "kuberaya-ccm", &ccm_kc)?;
    let start_ccm = || -> Result<Process> {
        start_like_the_deployment(
            &sb,
            "kuberaya-ccm",
            find(&rendered, "Deployment", "kuberaya-ccm")?,
            &work.path().join("ccm-root"),
            &[
                ("health-bind-address", "127.0.0.1:0".into()),
                ("metrics-bind-address", "127.0.0.1:0".into()),
                ("secure-bind-address", "127.0.0.1:0".into()),
                ("kubeconfig", ccm_kc.display().to_string()),
            ],
        )
    };
    let mut ccm = start_ccm()?;

    // The gateway, likewise.
    let gw_kc = work.path().join("gateway.kubeconfig");
    service_account_kubeconfig(&sb, "kuberaya-system", "kuberaya-gateway", &gw_kc)?;
    let start_gateway = || -> Result<Process> {
        let mut gateway = start_like_the_deployment(
            &sb,
            "kuberaya-gateway",
            find(&rendered, "Deployment", "kuberaya-gateway")?,
            &work.path().join("gateway-root"),
            &[
                ("listen", "127.0.0.1:0".into()),
                ("health-bind-address", "127.0.0.1:0".into()),
                ("metrics-bind-address", "127.0.0.1:0".into()),
                ("secure-bind-address", "127.0.0.1:0".into()),
                ("kubeconfig", gw_kc.display().to_string()),
            ],
        )?;
        gateway.wait_for_stdout_line_or_stderr("kuberaya-gateway listening", Duration::from_secs(30))?;
        Ok(gateway)
    };
    let mut gateway = start_gateway()?;

    // An application's LoadBalancer Service gets a public IP that answers.
    sb.kubectl(
        &[
            "create",
            "deployment",
            "web",
            "--image=any",
            "--port=8080",
            "--replicas=2",
        ],
        None,
    )?;
    sb.kubectl(
        &[
            "expose",
            "deployment",
            "web",
            "--type=LoadBalancer",
            "--port=80",
            "--target-port=8080",
        ],
        None,
    )?;
    let ingress = |ns: &str, name: &str| {
        jsonpath(
            &sb,
            &["get", "svc", name, "-n", ns],
            "{.status.loadBalancer.ingress[0].ip}",
        )
    };
    let ip = poll_until_blocking(Duration::from_secs(30), || {
        Some(ingress("default", "web")).filter(|s| !s.is_empty())
    });
    let ip = ip.with_context(|| format!("web gets an ingress IP\n{}", ccm.output_tails()))?;
    let body = poll_until_blocking(Duration::from_secs(15), || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "2", &format!("http://{ip}/")])
            .output()
            .ok()?;
        let b = String::from_utf8_lossy(&out.stdout).to_string();
        b.starts_with("pod=web-").then_some(b)
    });
    assert!(body.is_some(), "curl http://{ip}/ reaches a web pod");
    // The gateway's own Service too (UDP).
    let gw_ip = poll_until_blocking(Duration::from_secs(30), || {
        Some(ingress("kuberaya-system", "kuberaya-gateway")).filter(|s| !s.is_empty())
    });
    assert!(
        gw_ip.is_some(),
        "the gateway Service gets an ingress IP\n{}",
        ccm.output_tails()
    );
    // Leader election ran on the Role's Lease.
    let holder = jsonpath(
        &sb,
        &["get", "lease", "kuberaya-ccm", "-n", "kube-system"],
        "{.spec.holderIdentity}",
    );
    assert!(holder.starts_with("kuberaya-ccm-e2e"), "lease holder {holder:?}");

    // The gateway made its key Secret and accepts a peer with a preshared key from the
    // peer's namespace (status patched).
    let keys = run(Command::new(binary("kuberaya-gateway")).arg("--generate-keypair"), None)?;
    let keys = String::from_utf8(keys.stdout)?;
    let (psk, public) = keys.trim().split_once(' ').context("keypair")?;
    sb.kubectl(
        &["apply", "-f", "-"],
        Some(
            &json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "e2e-psk", "namespace": "default"},
                "stringData": {"presharedKey": psk}
            })
            .to_string(),
        ),
    )?;
    sb.kubectl(
        &["apply", "-f", "-"],
        Some(
            &json!({
                "apiVersion": "vpn.cloudraya.com/v1alpha1", "kind": "VpnPeer",
                "metadata": {"name": "e2e", "namespace": "default"},
                "spec": {
                    "publicKey": public,
                    "allow": [{"service": "web"}],
                    "presharedKeySecretRef": {"name": "e2e-psk"}
                }
            })
            .to_string(),
        ),
    )?;
    let accepted = poll_until_blocking(Duration::from_secs(20), || {
        let s = jsonpath(
            &sb,
            &["get", "vpnpeer", "e2e", "-n", "default"],
            "{.status.conditions[?(@.type==\"Accepted\")].status}",
        );
        (s == "True").then_some(())
    });
    assert!(
        accepted.is_some(),
        "the gateway accepts the peer: {}\n{}",
        sb.kubectl(&["get", "vpnpeer", "e2e", "-n", "default", "-o", "json"], None)?,
        gateway.output_tails()
    );
    sb.kubectl(
        &["get", "secret", "kuberaya-gateway-key", "-n", "kuberaya-system"],
        None,
    )?;
    // It published its public key and tunnel address on its Service, on its own token.
    let line = gateway
        .stdout()
        .lines()
        .find(|l| l.starts_with("kuberaya-gateway listening"))
        .map(str::to_string)
        .context("the gateway's start line")?;
    let key = kuberaya_e2e::process::line_field(&line, "public_key")?;
    let published = poll_until_blocking(Duration::from_secs(20), || {
        let a = jsonpath(
            &sb,
            &["get", "svc", "kuberaya-gateway", "-n", "kuberaya-system"],
            "{.metadata.annotations.vpn\\.cloudraya\\.com/public-key} {.metadata.annotations.vpn\\.cloudraya\\.com/tunnel-address}",
        );
        (a == format!("{key} 100.64.0.1/16")).then_some(())
    });
    assert!(
        published.is_some(),
        "the gateway annotates its Service\n{}",
        gateway.output_tails()
    );

    // docs/installing.md, "Verify": `kuberaya peer add` writes a config for the gateway's
    // public IP, and `kuberaya lb list` shows both LBs.
    let op = Operator::from_secret(&sb, work.path())?;
    let conf = work.path().join("ops.conf");
    op.kuberaya(&[
        "peer",
        "add",
        "ops",
        "--allow",
        "default",
        "--out",
        conf.to_str().context("utf-8")?,
    ])?;
    let conf = std::fs::read_to_string(&conf)?;
    let gw_ip = gw_ip.context("gateway ip")?;
    assert!(conf.contains(&format!("Endpoint = {gw_ip}:51820")), "{conf}");
    let lbs = op.lb_ids()?;
    assert_eq!(lbs.len(), 2, "web's and the gateway's LBs: {lbs:?}");
    assert_no_denials(&ccm);
    assert_no_denials(&gateway);

    upgrade_keeps_lbs_keys_and_peers(
        &sb,
        &op,
        release,
        &lbs,
        &key,
        [&mut ccm, &mut gateway],
        [&start_ccm, &start_gateway],
    )?;
    uninstall_in_order_leaks_no_lb(&sb, &op, release, ccm, gateway)
}

/// The operator's `kuberaya` as docs/installing.md sets it up: the cluster's kubeconfig,
/// and for `kuberaya lb` the cloud config and credentials taken from the CCM's Secret
/// (nothing from the sandbox's environment).
struct Operator {
    kubeconfig: PathBuf,
    cloud_config: PathBuf,
    email: String,
    password: String,
}

impl Operator {
    fn from_secret(sb: &Sandbox, dir: &Path) -> Result<Operator> {
        let key = |k: &str| -> Result<String> {
            let b64 = jsonpath(
                sb,
                &["-n", "kube-system", "get", "secret", "kuberaya-ccm-cloud-config"],
                &format!("{{.data.{}}}", k.replace('.', "\\.")),
            );
            Ok(String::from_utf8(base64_decode(&b64)?)?)
        };
        let cloud_config = dir.join("cloud-config.yaml");
        std::fs::write(&cloud_config, key("cloud-config.yaml")?)?;
        Ok(Operator {
            kubeconfig: sb.kubeconfig.clone(),
            cloud_config,
            email: key("email")?,
            password: key("password")?,
        })
    }

    /// `kuberaya ARGS`; `lb` commands get `--cloud-config`.
    fn kuberaya(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(binary("kuberaya"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        if args.first() == Some(&"lb") {
            cmd.arg("--cloud-config").arg(&self.cloud_config);
        }
        for k in ["KUBECONFIG", "CLOUDRAYA_API_URL", "KUBERAYA_CLUSTER_ID"] {
            cmd.env_remove(k);
        }
        cmd.env("CLOUDRAYA_EMAIL", &self.email)
            .env("CLOUDRAYA_PASSWORD", &self.password);
        let out = run(&mut cmd, None)?;
        ensure!(out.status.success(), "kuberaya {args:?}: {}", text(&out));
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The cluster's LBs on the platform (`kuberaya lb list -A`): Service to LB id.
    fn lb_ids(&self) -> Result<BTreeMap<String, String>> {
        let list: Value = serde_json::from_str(&self.kuberaya(&["lb", "list", "-A", "-o", "json"])?)?;
        let mut out = BTreeMap::new();
        for i in list["items"].as_array().context("items")? {
            let svc = format!(
                "{}/{}",
                i["namespace"].as_str().unwrap_or("?"),
                i["service"].as_str().unwrap_or("?")
            );
            out.insert(svc, i["id"].as_str().context("id")?.to_string());
        }
        Ok(out)
    }
}

/// docs/installing.md, "Upgrade": a newer file (here: the same objects with the next
/// images) applied over a running install changes the Deployments only; the restarted
/// CCM adopts its LBs (no new LB, same ids), the restarted gateway keeps its key and every
/// peer its address.
fn upgrade_keeps_lbs_keys_and_peers(
    sb: &Sandbox,
    op: &Operator,
    release: &str,
    lbs: &BTreeMap<String, String>,
    gateway_key: &str,
    running: [&mut Process; 2],
    start: [&dyn Fn() -> Result<Process>; 2],
) -> Result<()> {
    // What the CCM and the gateway wrote (finalizers, ingress, annotations, the key
    // Secret) is not in the file, so applying it again undoes none of it.
    // (Less the CRDs: the stand-in restamps a CRD's condition times on every update,
    // dry runs too, where kube-apiserver keeps them; a stand-in quirk, not ours.)
    let text = std::fs::read_to_string(release)?;
    let without_crd: Vec<&str> = text
        .split("\n---\n")
        .filter(|doc| !doc.contains("\nkind: CustomResourceDefinition\n"))
        .collect();
    ensure!(
        without_crd.len() + 2 == text.split("\n---\n").count(),
        "two CRDs in the file (VpnPeer, VpnAccessPolicy)"
    );
    sb.kubectl(&["diff", "-f", "-"], Some(&without_crd.join("\n---\n")))
        .context("kubectl diff -f the release file: no difference on a running install")?;
    let version = env!("CARGO_PKG_VERSION");
    let newer = std::fs::read_to_string(release)?.replace(&format!(":{version}\n"), &format!(":{version}-next\n"));
    ensure!(newer.contains("-next"), "the images were renamed");
    let addresses = || jsonpath(sb, &["get", "vpnpeers", "-A"], "{.items[*].status.address}");
    let secret_uid = || {
        jsonpath(
            sb,
            &["get", "secret", "kuberaya-gateway-key", "-n", "kuberaya-system"],
            "{.metadata.uid}",
        )
    };
    let (addresses_before, uid_before) = (addresses(), secret_uid());
    ensure!(
        addresses_before.split(' ').count() == 2,
        "two peers: {addresses_before:?}"
    );
    let applied = sb.kubectl(&["apply", "-f", "-"], Some(&newer))?;
    for l in applied.lines() {
        let changed = !(l.ends_with(" unchanged") || l.ends_with(" configured"));
        ensure!(!changed, "an upgrade creates nothing: {l}\n{applied}");
        if l.starts_with("deployment.apps/") {
            ensure!(l.ends_with(" configured"), "the Deployments roll: {l}");
        }
    }
    // The pods are replaced.
    let [ccm, gateway] = running;
    ccm.stop();
    gateway.stop();
    *ccm = start[0]()?;
    *gateway = start[1]()?;
    let line = gateway
        .stdout()
        .lines()
        .find(|l| l.starts_with("kuberaya-gateway listening"))
        .map(str::to_string)
        .context("the gateway's start line")?;
    assert_eq!(
        kuberaya_e2e::process::line_field(&line, "public_key")?,
        gateway_key,
        "the gateway keeps its key"
    );
    assert_eq!(secret_uid(), uid_before, "the key Secret is the same object");
    // A new Service gets its LB from the new CCM, so the new CCM has led and gone
    // through every Service by then: the old LBs are still the only ones.
    sb.kubectl(
        &[
            "expose",
            "deployment",
            "web",
            "--name=web2",
            "--type=LoadBalancer",
            "--port=81",
            "--target-port=8080",
        ],
        None,
    )?;
    let ip = poll_until_blocking(Duration::from_secs(30), || {
        Some(jsonpath(
            sb,
            &["get", "svc", "web2"],
            "{.status.loadBalancer.ingress[0].ip}",
        ))
        .filter(|s| !s.is_empty())
    });
    ensure!(ip.is_some(), "web2 gets an LB from the new CCM\n{}", ccm.output_tails());
    let mut after = op.lb_ids()?;
    ensure!(after.remove("default/web2").is_some(), "web2's LB: {after:?}");
    assert_eq!(&after, lbs, "the same LBs, adopted, none new");
    let accepted = poll_until_blocking(Duration::from_secs(20), || {
        let s = jsonpath(
            sb,
            &["get", "vpnpeers", "-A"],
            "{.items[*].status.conditions[?(@.type==\"Accepted\")].status}",
        );
        (s == "True True").then_some(())
    });
    ensure!(
        accepted.is_some(),
        "the new gateway accepts the peers\n{}",
        gateway.output_tails()
    );
    assert_eq!(addresses(), addresses_before, "every peer keeps its address");
    assert_no_denials(ccm);
    assert_no_denials(gateway);
    Ok(())
}

/// docs/installing.md, "Uninstall", in its order: the LoadBalancer Services while the
/// CCM runs (each `kubectl delete` returns once the CCM removed its finalizer and LB),
/// the gateway's namespace (its Service's LB with it), the CCM, the CRDs; no LB is left.
fn uninstall_in_order_leaks_no_lb(
    sb: &Sandbox,
    op: &Operator,
    release: &str,
    mut ccm: Process,
    mut gateway: Process,
) -> Result<()> {
    let lbs_left =
        |want: usize| poll_until_blocking(Duration::from_secs(30), || op.lb_ids().ok().filter(|l| l.len() == want));
    // 1. Applications' LoadBalancer Services.
    let listed = sb.kubectl(
        &[
            "get",
            "services",
            "-A",
            "-o",
            "jsonpath={range .items[?(@.spec.type==\"LoadBalancer\")]}{.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}",
        ],
        None,
    )?;
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        ["default/web", "default/web2", "kuberaya-system/kuberaya-gateway"]
    );
    sb.kubectl(
        &["-n", "default", "delete", "service", "web", "web2", "--timeout=60s"],
        None,
    )?;
    let left = lbs_left(1).context("web's and web2's LBs deleted")?;
    assert_eq!(left.keys().collect::<Vec<_>>(), ["kuberaya-system/kuberaya-gateway"]);
    // 2. The gateway: its namespace (Service and LB, Deployment, key, admin peers), then
    //    its cluster-wide RBAC.
    sb.kubectl(&["delete", "namespace", "kuberaya-system", "--timeout=60s"], None)?;
    gateway.stop();
    sb.kubectl(&["delete", "clusterrolebinding,clusterrole", "kuberaya-gateway"], None)?;
    sb.kubectl(
        &["delete", "clusterrolebinding", "kuberaya-gateway:auth-delegator"],
        None,
    )?;
    lbs_left(0).context("the gateway's LB deleted")?;
    // 3. Nothing left behind, while the CCM still runs.
    let orphans: Value = serde_json::from_str(&op.kuberaya(&["lb", "orphans", "-o", "json"])?)?;
    assert_eq!(orphans["items"], json!([]), "{orphans}");
    assert_eq!(orphans["unknown"], json!([]), "{orphans}");
    // 4. The CCM.
    sb.kubectl(
        &[
            "-n",
            "kube-system",
            "delete",
            "deployment,poddisruptionbudget,rolebinding,role,serviceaccount,lease",
            "kuberaya-ccm",
        ],
        None,
    )?;
    ccm.stop();
    sb.kubectl(&["delete", "clusterrolebinding,clusterrole", "kuberaya-ccm"], None)?;
    sb.kubectl(&["delete", "clusterrolebinding", "kuberaya-ccm:auth-delegator"], None)?;
    sb.kubectl(&["delete", "clusterrole", "kuberaya-metrics-reader"], None)?;
    sb.kubectl(
        &["-n", "kube-system", "delete", "secret", "kuberaya-ccm-cloud-config"],
        None,
    )?;
    // 5. The CRDs, and with them every VpnPeer and VpnAccessPolicy.
    sb.kubectl(
        &[
            "delete",
            "crd",
            "vpnpeers.vpn.cloudraya.com",
            "vpnaccesspolicies.vpn.cloudraya.com",
        ],
        None,
    )?;
    let left = sb.kubectl(&["get", "-f", release, "--ignore-not-found"], None)?;
    assert_eq!(left.trim(), "", "nothing of the release file is left");
    assert_eq!(op.lb_ids()?.len(), 0, "no LB is left");
    Ok(())
}

trait WaitLine {
    fn wait_for_stdout_line_or_stderr(&mut self, needle: &str, timeout: Duration) -> Result<()>;
}

impl WaitLine for Process {
    /// Wait until `needle` shows in stdout or stderr (the gateway logs to stderr).
    fn wait_for_stdout_line_or_stderr(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let found = poll_until_blocking(timeout, || {
            (self.stdout().contains(needle) || self.stderr().contains(needle) || !self.is_running()).then_some(())
        });
        ensure!(
            found.is_some() && (self.stdout().contains(needle) || self.stderr().contains(needle)),
            "{} did not print {needle:?}\n{}",
            self.name(),
            self.output_tails()
        );
        Ok(())
    }
}

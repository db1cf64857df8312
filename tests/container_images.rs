//! The images, built here and run the way the manifests run them.
//!
//! `deploy/images/build` builds `ghcr.io/cloudraya/kuberaya-{ccm,gateway}:<version>` (the
//! names the manifests pull) from this test binary's own builds of the two binaries, on a
//! base made from Debian's packages (no registry is reachable here). Each container is then
//! started with podman from its Deployment as the API server holds it after `kubectl
//! apply -k deploy/...` ([`Pod::run`]):
//!
//! - the image's entrypoint, the container's `args` and `env` (values, Secret keys, the
//!   pod's name), its volumes (Secret and ConfigMap files, `/dev/net/tun`), and the
//!   ServiceAccount token a kubelet mounts, with `KUBERNETES_SERVICE_HOST/PORT`;
//! - `runAsUser`/`runAsGroup`, `readOnlyRootFilesystem` (without podman's extra tmpfs),
//!   `allowPrivilegeEscalation: false`, dropped and added capabilities, with Kubernetes'
//!   rule for a non-root user: added capabilities reach only the bounding set, never the
//!   process (containerd sets no ambient capabilities; podman would, so they are not given);
//! - `hostNetwork` is the host's network, with each listening port moved to a free one on
//!   127.0.0.1 (so that tests run side by side); the probes follow the move.
//!
//! What runs is then checked from the outside: the process's uid, gid and capabilities in
//! `/proc`, the probes as a kubelet sends them, and the flows: the CCM initialises the
//! nodes and gives a LoadBalancer Service an LB that curl reaches; the gateway accepts a
//! VpnPeer and onetun reaches a ClusterIP Service through it.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kuberaya_e2e::netns::{Netns, VethEnd, in_namespaces_of, on_path, require_programs, require_root, veth_pair};
use kuberaya_e2e::process::line_field;
use kuberaya_e2e::sandbox::{TempSandbox, User, WgPeer, free_port, gateway_keypair, output_text};
use kuberaya_e2e::wg_quick::WgQuick;
use kuberaya_e2e::{b64_decode, binary, poll_until_blocking};
use serde_json::{Value, json};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// podman as deploy/images/build runs it: runc, cgroupfs, the repository's containers.conf.
fn podman() -> Command {
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", repo().join("deploy/images/containers.conf"))
        .args(["--runtime", "/usr/sbin/runc", "--cgroup-manager", "cgroupfs"])
        .stdin(Stdio::null());
    cmd
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

fn podman_ok(args: &[&str]) -> Result<String> {
    let out = output(podman().args(args))?;
    ensure!(out.status.success(), "podman {args:?}: {}", output_text(&out));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn require_tools(test: &str) {
    require_root(test, "podman runs the images as root");
    let missing: Vec<&str> = ["podman", "mmdebstrap", "kubectl", "curl"]
        .into_iter()
        .filter(|p| !on_path(p))
        .collect();
    assert!(
        missing.is_empty() && Path::new("/usr/sbin/runc").exists(),
        "{test} needs podman, runc, mmdebstrap, kubectl and curl (scripts/test installs them); missing: {missing:?}"
    );
}

/// `deploy/images/build` once per test binary, from the binaries the tests run.
fn build_images() {
    static BUILT: OnceLock<Result<String, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let bin = binary("kuberaya-ccm");
        let dir = bin.parent().expect("a directory").to_path_buf();
        binary("kuberaya-gateway");
        let out = Command::new(repo().join("deploy/images/build"))
            .arg("--binaries")
            .arg(&dir)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(output_text(&out))
        }
    });
    if let Err(e) = built {
        panic!("deploy/images/build failed: {e}");
    }
}

/// `kubectl apply -k deploy/<dir>` and the Deployment `namespace/name` as the API server
/// then holds it.
fn apply_and_get_deployment(user: &User, dir: &str, namespace: &str, name: &str) -> Result<Value> {
    user.kubectl(&[
        "apply",
        "-k",
        repo().join("deploy").join(dir).to_str().context("utf-8")?,
    ])?;
    Ok(serde_json::from_str(&user.kubectl(&[
        "get",
        "deployment",
        name,
        "-n",
        namespace,
        "-o",
        "json",
    ])?)?)
}

/// Ports a binary listens on by default, without a flag in `args` (the flag to move it).
const DEFAULT_PORTS: &[(&str, u16, &str)] = &[("kuberaya-ccm", 10258, "secure-bind-address")];

/// One pod of a Deployment, its first container run with podman.
struct Pod {
    name: String,
    /// containerPort (or a port in the args) → where it listens here.
    ports: BTreeMap<u16, u16>,
    container: Value,
    uid: u32,
    /// The network namespace it runs in (`None`: the host's).
    netns: Option<String>,
}

impl Pod {
    /// Runs the Deployment's pod template as a kubelet would (see the module doc).
    /// `network`: `None` for hostNetwork, else the pod's network namespace.
    fn run(user: &User, deploy: &Value, files: &Path, network: Option<&Netns>) -> Result<Pod> {
        let namespace = deploy["metadata"]["namespace"].as_str().context("namespace")?;
        let spec = &deploy["spec"]["template"]["spec"];
        let c = &spec["containers"][0];
        let cname = c["name"].as_str().context("container name")?;
        // Unique among the tests of this process, which run side by side.
        static PODS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = PODS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{cname}-e2e-{}-{n}", std::process::id());
        let _ = output(podman().args(["rm", "-f", &name]));
        let host_network = spec["hostNetwork"] == true;
        ensure!(
            host_network == network.is_none(),
            "{cname}: hostNetwork is {host_network}, run it accordingly"
        );
        let secret = |secret: &str, key: &str| -> Result<Vec<u8>> {
            let s: Value =
                serde_json::from_str(&user.kubectl(&["get", "secret", secret, "-n", namespace, "-o", "json"])?)?;
            Ok(b64_decode(
                s["data"][key]
                    .as_str()
                    .with_context(|| format!("Secret {secret} has {key}"))?,
            )?)
        };

        let mut args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            name.clone(),
            "--pull=never".into(),
        ];

        // Security context: the container's over the pod's.
        let sc = |k: &str| {
            let v = &c["securityContext"][k];
            if v.is_null() {
                spec["securityContext"][k].clone()
            } else {
                v.clone()
            }
        };
        let uid = sc("runAsUser").as_u64().map(|u| u as u32);
        let gid = sc("runAsGroup").as_u64().map(|g| g as u32);
        let uid = uid.context("runAsUser is set (the image's USER would be used otherwise)")?;
        if sc("runAsNonRoot") == true {
            ensure!(uid != 0, "{cname}: runAsNonRoot with runAsUser 0");
        }
        args.push(format!("--user={uid}:{}", gid.unwrap_or(uid)));
        if sc("readOnlyRootFilesystem") == true {
            args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
        }
        if sc("allowPrivilegeEscalation") == false {
            args.push("--security-opt=no-new-privileges".into());
        }
        if sc("privileged") == true {
            bail!("{cname}: privileged containers are not what we ship");
        }
        let caps = &c["securityContext"]["capabilities"];
        for d in caps["drop"].as_array().into_iter().flatten() {
            args.push(format!("--cap-drop={}", d.as_str().context("cap")?));
        }
        for a in caps["add"].as_array().into_iter().flatten() {
            // Kubernetes: a non-root process gets no added capability (no ambient set).
            if uid == 0 {
                args.push(format!("--cap-add={}", a.as_str().context("cap")?));
            }
        }
        match network {
            None => args.push("--network=host".into()),
            Some(ns) => args.push(format!("--network=ns:/run/netns/{}", ns.name())),
        }

        // Volumes.
        let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let mount = m["mountPath"].as_str().context("mountPath")?;
            let vol = volumes
                .iter()
                .find(|v| v["name"] == m["name"])
                .with_context(|| format!("{cname}: volume {}", m["name"]))?;
            if let Some(path) = vol["hostPath"]["path"].as_str() {
                ensure!(
                    vol["hostPath"]["type"] == "CharDevice",
                    "{cname}: hostPath {path} other than a device"
                );
                args.push(format!("--device={path}:{mount}"));
                continue;
            }
            let dir = files.join(m["name"].as_str().context("name")?);
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            if let Some(s) = vol["secret"]["secretName"].as_str() {
                for item in vol["secret"]["items"].as_array().context("secret items")? {
                    let data = secret(s, item["key"].as_str().context("key")?)?;
                    write_0644(&dir.join(item["path"].as_str().context("path")?), &data)?;
                }
            } else if let Some(cm) = vol["configMap"]["name"].as_str() {
                let cm: Value =
                    serde_json::from_str(&user.kubectl(&["get", "configmap", cm, "-n", namespace, "-o", "json"])?)?;
                for (k, v) in cm["data"].as_object().context("configMap data")? {
                    write_0644(&dir.join(k), v.as_str().context("text")?.as_bytes())?;
                }
            } else if vol["emptyDir"].is_object() {
                args.push(format!("--tmpfs={mount}"));
                continue;
            } else {
                bail!("{cname}: volume kind of {vol}");
            }
            let ro = if m["readOnly"] == true { ":ro" } else { "" };
            args.push(format!("--volume={}:{mount}{ro}", dir.display()));
        }

        // The ServiceAccount token, CA and namespace a kubelet mounts, and the API's address.
        if spec["automountServiceAccountToken"] != false {
            let sa = spec["serviceAccountName"].as_str().unwrap_or("default");
            let dir = files.join("serviceaccount");
            std::fs::create_dir_all(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            let token = user.kubectl(&["create", "token", sa, "-n", namespace])?;
            write_0644(&dir.join("token"), token.trim().as_bytes())?;
            write_0644(&dir.join("namespace"), namespace.as_bytes())?;
            let kc: Value = serde_json::from_str(&user.kubectl(&[
                "config",
                "view",
                "--raw",
                "--minify",
                "--flatten",
                "-o",
                "json",
            ])?)?;
            let cluster = &kc["clusters"][0]["cluster"];
            let ca = b64_decode(cluster["certificate-authority-data"].as_str().context("CA data")?)?;
            write_0644(&dir.join("ca.crt"), &ca)?;
            // Like a kubelet: the `kubernetes` Service's ClusterIP and port.
            let service = |path: &str| user.kubectl(&["get", "service", "kubernetes", "-n", "default", "-o", path]);
            let host = service("jsonpath={.spec.clusterIP}")?;
            let port = service("jsonpath={.spec.ports[?(@.name==\"https\")].port}")?;
            ensure!(
                !host.is_empty() && !port.is_empty(),
                "the kubernetes Service: {host}:{port}"
            );
            args.push(format!(
                "--volume={}:/var/run/secrets/kubernetes.io/serviceaccount:ro",
                dir.display()
            ));
            args.push(format!("--env=KUBERNETES_SERVICE_HOST={host}"));
            args.push(format!("--env=KUBERNETES_SERVICE_PORT={port}"));
        }

        // Environment.
        for e in c["env"].as_array().into_iter().flatten() {
            let k = e["name"].as_str().context("env name")?;
            let v = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if let Some(r) = e["valueFrom"]["secretKeyRef"].as_object() {
                String::from_utf8(secret(
                    r["name"].as_str().context("name")?,
                    r["key"].as_str().context("key")?,
                )?)?
            } else {
                match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some("metadata.name") => name.clone(),
                    Some("metadata.namespace") => namespace.to_string(),
                    _ => bail!("{cname}: env {k} from {e}"),
                }
            };
            args.push(format!("--env={k}={v}"));
        }

        // Arguments, with the host's listening ports moved to free loopback ports.
        let mut ports = BTreeMap::new();
        let mut cargs: Vec<String> = c["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(String::from))
            .collect();
        if host_network {
            for a in &mut cargs {
                let Some((flag, value)) = a.split_once('=') else {
                    continue;
                };
                let Ok(addr) = value.parse::<std::net::SocketAddr>() else {
                    continue;
                };
                if addr.port() == 0 {
                    continue;
                }
                let moved = free_port();
                ports.insert(addr.port(), moved);
                *a = format!("{flag}=127.0.0.1:{moved}");
            }
            for (bin, port, flag) in DEFAULT_PORTS {
                if *bin == cname
                    && !ports.contains_key(port)
                    && !cargs.iter().any(|a| a.starts_with(&format!("--{flag}=")))
                {
                    let moved = free_port();
                    ports.insert(*port, moved);
                    cargs.push(format!("--{flag}=127.0.0.1:{moved}"));
                }
            }
        }
        if let Some(cmd) = c["command"].as_array() {
            args.push(format!("--entrypoint={}", serde_json::to_string(cmd)?));
        }
        args.push(c["image"].as_str().context("image")?.to_string());
        args.extend(cargs);
        eprintln!("[pod] podman {}", args.join(" "));
        let out = output(podman().args(&args))?;
        ensure!(out.status.success(), "podman run {cname}: {}", output_text(&out));
        Ok(Pod {
            name,
            ports,
            container: c.clone(),
            uid,
            netns: network.map(|n| n.name().to_string()),
        })
    }

    fn logs(&self) -> String {
        output(podman().args(["logs", "--tail", "40", &self.name]))
            .map(|o| output_text(&o))
            .unwrap_or_else(|e| e.to_string())
    }

    fn pid(&self) -> Result<u32> {
        Ok(podman_ok(&["inspect", "-f", "{{.State.Pid}}", &self.name])?.parse()?)
    }

    /// `Key:` of the container's main process's `/proc/PID/status`.
    fn status(&self, key: &str) -> Result<String> {
        let pid = self.pid()?;
        let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}:")))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("{key} in /proc/{pid}/status"))
    }

    /// The process runs as the manifest's user with `effective` capabilities exactly (a
    /// bit mask), no ambient ones, no new privileges, and a seccomp filter.
    fn assert_process(&self, effective: u64) -> Result<()> {
        let uid = self.status("Uid")?;
        ensure!(
            uid.split_whitespace().all(|u| u == self.uid.to_string()),
            "{}: Uid {uid}, the manifest says {}",
            self.name,
            self.uid
        );
        let cap = |k: &str| -> Result<u64> { Ok(u64::from_str_radix(&self.status(k)?, 16)?) };
        ensure!(
            cap("CapEff")? == effective,
            "{}: CapEff {:x}, want {effective:x}",
            self.name,
            cap("CapEff")?
        );
        ensure!(
            cap("CapAmb")? == 0,
            "{}: ambient capabilities {:x}",
            self.name,
            cap("CapAmb")?
        );
        ensure!(self.status("NoNewPrivs")? == "1", "{}: NoNewPrivs", self.name);
        ensure!(
            self.status("Seccomp")? == "2",
            "{}: a seccomp filter (RuntimeDefault)",
            self.name
        );
        Ok(())
    }

    /// The probe `kind` (`readinessProbe`, `livenessProbe`) as a kubelet sends it: the
    /// HTTP status (`None`: no answer). HTTPS probes do not verify the certificate.
    fn probe(&self, kind: &str) -> Result<Option<u16>> {
        let get = &self.container[kind]["httpGet"];
        ensure!(get.is_object(), "{}: an httpGet {kind}", self.name);
        let port = match &get["port"] {
            Value::Number(n) => n.as_u64().context("port")? as u16,
            Value::String(named) => self.container["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == named.as_str())
                .and_then(|p| p["containerPort"].as_u64())
                .with_context(|| format!("port {named}"))? as u16,
            other => bail!("port {other}"),
        };
        let port = self.ports.get(&port).copied().unwrap_or(port);
        let scheme = get["scheme"].as_str().unwrap_or("HTTP").to_ascii_lowercase();
        let url = format!("{scheme}://127.0.0.1:{port}{}", get["path"].as_str().context("path")?);
        let curl = [
            "curl",
            "-sk",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "3",
            &url,
        ];
        let out = match &self.netns {
            Some(ns) => output(Command::new("ip").args(["netns", "exec", ns]).args(curl))?,
            None => output(Command::new(curl[0]).args(&curl[1..]))?,
        };
        Ok(String::from_utf8_lossy(&out.stdout).parse().ok().filter(|c| *c != 0))
    }

    fn wait_probe(&self, kind: &str, within: Duration) -> Result<()> {
        let ok = poll_until_blocking(within, || (self.probe(kind).ok().flatten() == Some(200)).then_some(()));
        ensure!(
            ok.is_some(),
            "{}: {kind} answers 200 (last {:?})\n{}",
            self.name,
            self.probe(kind),
            self.logs()
        );
        Ok(())
    }

    /// SIGTERM, as a kubelet stops a pod, and the exit code.
    fn stop(&self) -> Result<i64> {
        podman_ok(&["stop", "-t", "20", &self.name])?;
        Ok(podman_ok(&["inspect", "-f", "{{.State.ExitCode}}", &self.name])?.parse()?)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = output(podman().args(["rm", "-f", "-t", "2", &self.name]));
    }
}

fn write_0644(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    Ok(())
}

fn jsonpath(user: &User, args: &[&str], path: &str) -> String {
    let p = format!("jsonpath={path}");
    let mut a = args.to_vec();
    a.extend(["-o", &p]);
    user.kubectl(&a).unwrap_or_default()
}

/// A VpnPeer `default/name` allowed to reach `web`, with a fresh key pair, once the
/// gateway in `pod` accepted it: its private key, its tunnel address (`status.address`) and the
/// gateway's public key as published on its Service.
fn accepted_peer(user: &User, dir: &Path, name: &str, pod: &Pod) -> Result<(String, String, String)> {
    let (private, public) = gateway_keypair();
    let peer = json!({
        "apiVersion": "vpn.cloudraya.com/v1alpha1", "kind": "VpnPeer",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"publicKey": public, "allow": [{"service": "web"}]}
    });
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, peer.to_string())?;
    user.kubectl(&["apply", "-f", path.to_str().context("utf-8")?])?;
    let address = poll_until_blocking(Duration::from_secs(20), || {
        let a = jsonpath(user, &["get", "vpnpeer", name], "{.status.address}");
        (!a.is_empty()).then_some(a)
    });
    let address = address.with_context(|| format!("the gateway accepts the peer\n{}", pod.logs()))?;
    let key = poll_until_blocking(Duration::from_secs(20), || {
        let k = jsonpath(
            user,
            &["get", "svc", "kuberaya-gateway", "-n", "kuberaya-system"],
            "{.metadata.annotations.vpn\\.cloudraya\\.com/public-key}",
        );
        (!k.is_empty()).then_some(k)
    });
    let key = key.with_context(|| format!("the gateway publishes its key\n{}", pod.logs()))?;
    Ok((private, address, key))
}

/// The cloud-config Secret of docs/installing.md, from the example filled in for `sb`.
fn cloud_config_secret(sb: &TempSandbox, user: &User) -> Result<()> {
    let env = sb.env()?;
    let get = |k: &str| env.get(k).cloned().with_context(|| format!("sandbox env {k}"));
    let example = std::fs::read_to_string(repo().join("deploy/ccm/cloud-config.example.yaml"))?
        .replace("REPLACE_ME_API_URL", &get("CLOUDRAYA_API_URL")?)
        .replace("REPLACE_ME_CLUSTER_ID", &get("KUBERAYA_CLUSTER_ID")?)
        .replace("REPLACE_ME_EMAIL", &get("CLOUDRAYA_EMAIL")?)
        .replace("REPLACE_ME_PASSWORD", &get("CLOUDRAYA_PASSWORD")?);
    ensure!(!example.contains("REPLACE_ME"), "every placeholder is filled");
    let path = sb.dir.path().join("cloud-config-secret.yaml");
    std::fs::write(&path, example)?;
    user.kubectl(&["apply", "-f", path.to_str().context("utf-8")?])?;
    Ok(())
}

#[test]
fn the_ccm_image_runs_as_its_manifest_says_and_gives_a_service_a_load_balancer() -> Result<()> {
    require_tools("the_ccm_image_runs_as_its_manifest_says_and_gives_a_service_a_load_balancer");
    build_images();
    // Nodes wait, tainted uninitialized, for this CCM.
    let sb = TempSandbox::up(&["--external-ccm"])?;
    let work = tempfile::tempdir()?;
    let user = sb.user(work.path());
    cloud_config_secret(&sb, &user)?;
    let deploy = apply_and_get_deployment(&user, "ccm", "kube-system", "kuberaya-ccm")?;
    let pod = Pod::run(&user, &deploy, work.path(), None)?;

    pod.wait_probe("readinessProbe", Duration::from_secs(30))?;
    pod.wait_probe("livenessProbe", Duration::from_secs(5))?;
    // Non-root, every capability dropped.
    pod.assert_process(0)?;

    // The node controller initialises the nodes from the platform.
    let initialised = poll_until_blocking(Duration::from_secs(30), || {
        let ids = jsonpath(&user, &["get", "nodes"], "{.items[*].spec.providerID}");
        let taints = jsonpath(&user, &["get", "nodes"], "{.items[*].spec.taints[*].key}");
        (ids.split_whitespace().count() >= 1
            && ids.split_whitespace().all(|i| i.starts_with("cloudraya://"))
            && !taints.contains("node.cloudprovider.kubernetes.io/uninitialized"))
        .then_some(ids)
    });
    ensure!(
        initialised.is_some(),
        "nodes initialised by the CCM image\n{}",
        pod.logs()
    );

    // A LoadBalancer Service gets an LB that answers.
    user.kubectl(&[
        "create",
        "deployment",
        "web",
        "--image=any",
        "--port=8080",
        "--replicas=2",
    ])?;
    user.kubectl(&[
        "expose",
        "deployment",
        "web",
        "--type=LoadBalancer",
        "--port=80",
        "--target-port=8080",
    ])?;
    let ip = poll_until_blocking(Duration::from_secs(30), || {
        Some(jsonpath(
            &user,
            &["get", "svc", "web"],
            "{.status.loadBalancer.ingress[0].ip}",
        ))
        .filter(|s| !s.is_empty())
    });
    let ip = ip.with_context(|| format!("web gets an ingress IP\n{}", pod.logs()))?;
    let body = poll_until_blocking(Duration::from_secs(15), || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "2", &format!("http://{ip}/")])
            .output()
            .ok()?;
        let b = String::from_utf8_lossy(&out.stdout).to_string();
        b.starts_with("pod=web-").then_some(b)
    });
    ensure!(body.is_some(), "curl http://{ip}/ reaches a web pod through the LB");
    let logs = pod.logs();
    ensure!(
        !logs.to_ascii_lowercase().contains("forbidden"),
        "denied something its RBAC should grant:\n{logs}"
    );

    // Stopped as a kubelet stops it: it exits cleanly.
    ensure!(pod.stop()? == 0, "exit code 0 on SIGTERM\n{}", pod.logs());
    Ok(())
}

#[test]
fn the_gateway_image_runs_as_its_manifest_says_and_serves_a_peer() -> Result<()> {
    require_tools("the_gateway_image_runs_as_its_manifest_says_and_serves_a_peer");
    build_images();
    let sb = TempSandbox::up(&["--no-gateway"])?;
    let work = tempfile::tempdir()?;
    let user = sb.user(work.path());
    user.kubectl(&["apply", "-k", repo().join("deploy/crds").to_str().context("utf-8")?])?;
    let deploy = apply_and_get_deployment(&user, "gateway", "kuberaya-system", "kuberaya-gateway")?;
    ensure!(
        deploy["spec"]["template"]["spec"]["hostNetwork"] != true,
        "the gateway is not on hostNetwork"
    );
    // The pod's network is played by the host's loopback: the same addresses, ports moved.
    let mut on_host = deploy.clone();
    on_host["spec"]["template"]["spec"]["hostNetwork"] = json!(true);
    let pod = Pod::run(&user, &on_host, work.path(), None)?;

    pod.wait_probe("readinessProbe", Duration::from_secs(30))?;
    pod.wait_probe("livenessProbe", Duration::from_secs(5))?;
    pod.assert_process(0)?;

    // A peer allowed to reach web, through the gateway's WireGuard port.
    let web = user.http_service("web")?;
    let (private, address, key) = accepted_peer(&user, work.path(), "e2e", &pod)?;
    let udp = *pod.ports.get(&51820).context("the WireGuard port")?;
    let wg = WgPeer {
        private_key: private,
        gateway_key: key,
        endpoint: format!("127.0.0.1:{udp}"),
        address: address.split('/').next().unwrap_or_default().to_string(),
    };
    let local = free_port();
    let mut onetun = wg.onetun(local, &format!("{web}:80:TCP"));
    let body = poll_until_blocking(Duration::from_secs(20), || {
        let (ok, body) = kuberaya_e2e::sandbox::curl_local(local, 2.0);
        (ok && !body.is_empty()).then_some(body)
    });
    ensure!(
        body.is_some(),
        "onetun reaches web ({web}) through the gateway image\n{}\n{}",
        onetun.output_tails(),
        pod.logs()
    );
    onetun.stop();
    // Its metrics name the peer, over HTTPS to a token allowed to read them only; the
    // plain port stays on the pod's loopback.
    let logs = pod.logs();
    ensure!(
        !logs.to_ascii_lowercase().contains("forbidden"),
        "denied something its RBAC should grant:\n{logs}"
    );
    let line = logs
        .lines()
        .find(|l| l.starts_with("kuberaya-gateway listening"))
        .context("the start line")?;
    ensure!(line_field(line, "tunnel_address")? == "100.64.0.1", "{line}");
    ensure!(pod.stop()? == 0, "exit code 0 on SIGTERM\n{}", pod.logs());
    Ok(())
}

/// CAP_NET_ADMIN's bit in /proc's capability masks.
const CAP_NET_ADMIN: u64 = 1 << 12;

/// The TUN overlay as shipped: root with NET_ADMIN alone, a read-only root filesystem and
/// /proc/sys, no `nft` in the image; a stock wireguard-go peer reaches a ClusterIP through
/// it. Everything in namespaces the test makes, as a node lays them out:
///
/// - `cluster`, the node: a sandbox (its API on the node's loopback, its Services on
///   10.96.0.0/24, local to the node as kube-proxy makes them);
/// - `pod`, the gateway's pod network (`eth0` 10.244.0.2, default route to the node), so
///   that allowed packets are forwarded from the TUN device to `eth0` and masqueraded, and
///   replies forwarded back, as in a cluster;
/// - `laptop`, a WireGuard client reaching the pod's UDP port over a veth pair.
///
/// The pod reaches the API server as pods do, through the `kubernetes` Service's ClusterIP
/// (routed to the node, where the sandbox's kube-proxy forwards it to the API server).
#[test]
fn the_tun_overlay_runs_as_shipped_and_carries_a_wireguard_go_peer() -> Result<()> {
    let test = "the_tun_overlay_runs_as_shipped_and_carries_a_wireguard_go_peer";
    require_tools(test);
    require_programs(&[
        ("wireguard-go", "wireguard-go"),
        ("wg", "wireguard-tools"),
        ("wg-quick", "wireguard-tools"),
        ("ip", "iproute2"),
        ("nft", "nftables"),
    ]);
    ensure!(Path::new("/dev/net/tun").exists(), "{test} needs /dev/net/tun");
    build_images();
    let dir = tempfile::tempdir()?;
    let laptop = Netns::unique("laptop")?;
    let pod_ns = Netns::unique("pod")?;
    let cluster = Netns::unique("cluster")?;
    veth_pair(
        VethEnd {
            ns: &laptop,
            name: "to-pod",
            address: "192.0.2.2/24",
        },
        VethEnd {
            ns: &pod_ns,
            name: "to-laptop",
            address: "192.0.2.1/24",
        },
    )?;
    veth_pair(
        VethEnd {
            ns: &pod_ns,
            name: "eth0",
            address: "10.244.0.2/24",
        },
        VethEnd {
            ns: &cluster,
            name: "to-pod",
            address: "10.244.0.1/24",
        },
    )?;
    pod_ns.ip(["route", "add", "default", "via", "10.244.0.1"])?;
    cluster.ip(["route", "add", "local", "10.96.0.0/24", "dev", "lo"])?;
    // A pod cannot write /proc/sys; the namespace starts with forwarding off, so the
    // gateway must switch it on per interface itself.
    let show = |ns: &Netns, args: &[&str]| -> Result<String> {
        Ok(String::from_utf8_lossy(&ns.exec(args, Duration::from_secs(5))?.stdout).into_owned())
    };
    ensure!(
        show(&pod_ns, &["cat", "/proc/sys/net/ipv4/ip_forward"])?.trim() == "0",
        "a fresh namespace forwards nothing"
    );

    // The cluster: a sandbox inside the cluster namespace (its API on that namespace's
    // loopback, its ClusterIPs on 10.96.0.0/24).
    let state = dir.path().join("sb");
    let state_arg = state.to_str().context("utf-8")?;
    let kuberaya = binary("kuberaya");
    let kuberaya = kuberaya.to_str().context("utf-8")?;
    let up = cluster.exec(
        &[
            kuberaya,
            "sandbox",
            "up",
            "--detach",
            "--no-ccm",
            "--workers",
            "1",
            "--service-cidr",
            "10.96.0.0/24",
            "--state-dir",
            state_arg,
        ],
        Duration::from_secs(120),
    )?;
    ensure!(
        up.status.success(),
        "sandbox up in the cluster namespace: {}",
        output_text(&up)
    );
    let user = User {
        kubeconfig: state.join("kubeconfig"),
        work: dir.path().to_path_buf(),
        netns: Some(cluster.name().to_string()),
    };
    user.kubectl(&["apply", "-k", repo().join("deploy/crds").to_str().context("utf-8")?])?;
    let deploy = apply_and_get_deployment(&user, "gateway/overlays/tun", "kuberaya-system", "kuberaya-gateway")?;
    let files = dir.path().join("pod");
    std::fs::create_dir_all(&files)?;
    let pod = Pod::run(&user, &deploy, &files, Some(&pod_ns))?;
    pod.wait_probe("readinessProbe", Duration::from_secs(30))?;
    pod.wait_probe("livenessProbe", Duration::from_secs(5))?;
    // Root, with NET_ADMIN and nothing else.
    pod.assert_process(CAP_NET_ADMIN)?;

    let web = user.http_service("web")?;
    let (private, address, key) = accepted_peer(&user, dir.path(), "laptop", &pod)?;
    // The kernel data plane is up: the device, per-interface forwarding, the table.
    ensure!(
        show(&pod_ns, &["ip", "-br", "link", "show", "kr-gw0"])?.contains("kr-gw0"),
        "the TUN device\n{}",
        pod.logs()
    );
    for dev in ["kr-gw0", "eth0"] {
        ensure!(
            show(&pod_ns, &["cat", &format!("/proc/sys/net/ipv4/conf/{dev}/forwarding")])?.trim() == "1",
            "forwarding on {dev}\n{}",
            pod.logs()
        );
    }
    ensure!(
        show(&pod_ns, &["nft", "list", "table", "ip", "kuberaya-gateway"])?.contains("masquerade"),
        "the gateway's nftables table\n{}",
        pod.logs()
    );

    // The laptop: wireguard-go with the peer's config, to the pod's WireGuard port.
    let conf = WgQuick::write(
        dir.path(),
        "wg0.conf",
        &format!(
            "[Interface]\nPrivateKey = {private}\nAddress = {address}/32\n\n\
             [Peer]\nPublicKey = {key}\nEndpoint = 192.0.2.1:51820\n\
             AllowedIPs = 10.96.0.0/24\nPersistentKeepalive = 25\n"
        ),
    )?;
    let mut wg_go = laptop.spawn_with_private_dir("/var/run/wireguard", &["wireguard-go", "-f", "wg0"])?;
    let wg_pid = wg_go.pid();
    let ready = poll_until_blocking(Duration::from_secs(15), || {
        output(&mut in_namespaces_of(wg_pid, &["wg", "show", "wg0"]))
            .ok()
            .filter(|o| o.status.success())
    });
    ensure!(ready.is_some(), "wireguard-go comes up\n{}", wg_go.output_tails());
    conf.up(&laptop, wg_pid, "wg0", dir.path())?;
    let url = format!("http://{web}/");
    let body = poll_until_blocking(Duration::from_secs(30), || {
        let out = laptop
            .exec(&["curl", "-sS", "-m", "3", &url], Duration::from_secs(5))
            .ok()?;
        (out.status.success() && !out.stdout.is_empty()).then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    ensure!(
        body.is_some(),
        "curl through wireguard-go and the TUN image to web ({web})\n{}\n{}",
        wg_go.output_tails(),
        pod.logs()
    );
    wg_go.stop();

    // Stopped as a kubelet stops it: a clean exit that takes its table along.
    ensure!(pod.stop()? == 0, "exit code 0 on SIGTERM\n{}", pod.logs());
    let left = cluster.exec(
        &["nft", "list", "table", "ip", "kuberaya-gateway"],
        Duration::from_secs(5),
    )?;
    ensure!(!left.status.success(), "the table is removed on exit");
    drop(pod);
    let _ = cluster.exec(
        &[kuberaya, "sandbox", "down", "--purge", "--state-dir", state_arg],
        Duration::from_secs(30),
    );
    Ok(())
}

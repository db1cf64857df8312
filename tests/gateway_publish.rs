//! The gateway publishes its own public key: the real `kuberaya-gateway` against the
//! Kubernetes API stand-in (`kuberaya-sandbox kube`), on its ServiceAccount's token under
//! the shipped RBAC (deploy/gateway/base/rbac.yaml), with the real `kubectl` reading the
//! Service it annotates.
//!
//! - Started before its Service exists, it annotates the Service once it is applied
//!   (`vpn.cloudraya.com/public-key`, `tunnel-address`, `cluster-domain`: what `kuberaya
//!   peer add` reads), with the key it keeps in its Secret.
//! - A Service edited to a wrong key is corrected on the next start.
//! - Without the RBAC to patch it, the gateway keeps serving and logs the exact `kubectl
//!   annotate` to run instead.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::cluster::{Cluster, Kubectl};
use kuberaya_e2e::gateway::{self, Gateway};
use kuberaya_e2e::kube_stand_in;
use kuberaya_e2e::{Process, poll_until_blocking};

const NS: &str = "kuberaya-system";
const SERVICE: &str = "kuberaya-gateway";

fn manifest(rel: &str) -> String {
    format!("{}/deploy/{rel}", env!("CARGO_MANIFEST_DIR"))
}

/// The stand-in's directory: its state, the admin kubeconfig, the gateway's (its
/// ServiceAccount's token), and kubectl's HOME (never the user's).
struct StandIn {
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    gateway_kubeconfig: PathBuf,
    _process: Process,
}

impl StandIn {
    fn start() -> Result<StandIn> {
        let dir = tempfile::tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        let mut cmd = kube_stand_in::command(&dir.path().join("kube"), &kubeconfig);
        cmd.args(["--listen", "127.0.0.1:0"]);
        let mut p = Process::spawn_command(cmd)?;
        kube_stand_in::wait_listening(&mut p, Duration::from_secs(60))?;
        let gateway_kubeconfig = dir.path().join("kubeconfig-gateway");
        Ok(StandIn {
            dir,
            kubeconfig,
            gateway_kubeconfig,
            _process: p,
        })
    }

    /// The gateway's kubeconfig: its ServiceAccount's token (TokenRequest).
    fn service_account_kubeconfig(&self) -> Result<()> {
        let token = self.kubectl(&["create", "token", "kuberaya-gateway", "-n", NS])?;
        let mut kc: serde_json::Value = serde_json::from_str(&self.kubectl(&[
            "config",
            "view",
            "--raw",
            "--minify",
            "--flatten",
            "-o",
            "json",
        ])?)?;
        kc["users"][0]["user"] = serde_json::json!({ "token": token.trim() });
        std::fs::write(&self.gateway_kubeconfig, serde_json::to_vec_pretty(&kc)?)?;
        Ok(())
    }

    /// `kubectl ARGS` as the admin.
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.admin().kubectl(args)
    }

    fn admin(&self) -> Kubectl {
        Kubectl {
            kubeconfig: self.kubeconfig.clone(),
            home: self.dir.path().to_owned(),
            request_timeout: Duration::from_secs(20),
        }
    }

    /// The gateway Service's annotation `vpn.cloudraya.com/<name>` (empty when absent).
    fn annotation(&self, name: &str) -> Result<String> {
        self.kubectl(&[
            "get",
            "service",
            "-n",
            NS,
            SERVICE,
            "-o",
            &format!("jsonpath={{.metadata.annotations.vpn\\.cloudraya\\.com/{name}}}"),
        ])
    }

    /// Edits the gateway Service's key annotation behind the gateway's back.
    fn annotate_key(&self, key: &str) -> Result<()> {
        let annotation = format!("vpn.cloudraya.com/public-key={key}");
        self.kubectl(&["annotate", "service", "-n", NS, SERVICE, "--overwrite", &annotation])?;
        Ok(())
    }

    /// Polls until the public-key annotation is `key`; how long that took.
    fn wait_key(&self, key: &str, since: Instant) -> Result<Duration> {
        poll_until_blocking(Duration::from_secs(30), || {
            (self.annotation("public-key").ok()? == key).then(|| since.elapsed())
        })
        .with_context(|| {
            format!(
                "the Service's public-key annotation is {:?}, want {key}",
                self.annotation("public-key")
            )
        })
    }

    /// The gateway as its ServiceAccount; its process and public key.
    fn gateway(&self) -> Result<(Process, String)> {
        let mut cmd = gateway::kube_command(&self.gateway_kubeconfig, NS);
        cmd.args(["--listen", "127.0.0.1:0"]);
        let gw = Gateway::spawn(cmd, Duration::from_secs(60))?;
        Ok((gw.process, gw.public_key))
    }
}

/// A Role like the shipped one, without the Service rule: the gateway may not annotate.
const ROLE_WITHOUT_SERVICES: &str = r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: kuberaya-gateway
  namespace: kuberaya-system
rules:
  - apiGroups: [""]
    resources: ["secrets"]
    verbs: ["create"]
  - apiGroups: ["coordination.k8s.io"]
    resources: ["leases"]
    verbs: ["create"]
  - apiGroups: ["coordination.k8s.io"]
    resources: ["leases"]
    resourceNames: ["kuberaya-gateway"]
    verbs: ["get", "patch"]
"#;

#[test]
fn the_gateway_publishes_its_key_on_its_service() -> Result<()> {
    let k = StandIn::start()?;
    k.kubectl(&["apply", "-f", &manifest("crds/vpnpeer.yaml")])?;
    for m in ["namespace.yaml", "serviceaccount.yaml", "rbac.yaml"] {
        k.kubectl(&["apply", "-f", &manifest(&format!("gateway/base/{m}"))])?;
    }
    k.service_account_kubeconfig()?;

    // Started before its Service exists: it annotates the Service once applied.
    let (mut gw, key) = k.gateway()?;
    std::thread::sleep(Duration::from_millis(500));
    let applied = Instant::now();
    k.kubectl(&["apply", "-f", &manifest("gateway/base/service.yaml")])?;
    let took = k.wait_key(&key, applied)?;
    eprintln!(
        "measured: public key on the Service {} ms after it was applied",
        took.as_millis()
    );
    ensure!(k.annotation("tunnel-address")? == "100.64.0.1/16");
    ensure!(k.annotation("cluster-domain")? == "cluster.local");
    // The key is the one in its Secret.
    let secret = k.kubectl(&[
        "get",
        "secret",
        "-n",
        NS,
        "kuberaya-gateway-key",
        "-o",
        "jsonpath={.data.privateKey}",
    ])?;
    ensure!(!secret.is_empty(), "the key Secret");
    ensure!(gw.is_running(), "the gateway exited\n{}", gw.output_tails());
    gw.stop();
    drop(gw);

    // Edited to a wrong key: corrected on the next start.
    let (_, wrong) = kuberaya_e2e::sandbox::gateway_keypair();
    k.annotate_key(&wrong)?;
    let started = Instant::now();
    let (mut gw, again) = k.gateway()?;
    ensure!(again == key, "the same key from the Secret: {again} vs {key}");
    let took = k.wait_key(&key, started)?;
    eprintln!(
        "measured: a wrong key corrected {} ms after the gateway started",
        took.as_millis()
    );
    ensure!(gw.is_running(), "the gateway exited\n{}", gw.output_tails());
    gw.stop();
    drop(gw);

    // Forbidden: the gateway serves on and says what to run.
    k.admin().apply(ROLE_WITHOUT_SERVICES)?;
    k.annotate_key(&wrong)?;
    let (mut gw, _) = k.gateway()?;
    let fallback = format!("kubectl -n {NS} annotate service {SERVICE} --overwrite");
    let warned = poll_until_blocking(Duration::from_secs(20), || {
        let err = gw.stderr();
        err.lines()
            .find(|l| l.contains(&fallback) && l.contains(&format!("vpn.cloudraya.com/public-key={key}")))
            .map(str::to_string)
    })
    .with_context(|| format!("no fallback command logged\n{}", gw.output_tails()))?;
    eprintln!("the gateway's warning: {warned}");
    std::thread::sleep(Duration::from_secs(1));
    ensure!(
        gw.is_running(),
        "forbidden must not stop the gateway\n{}",
        gw.output_tails()
    );
    ensure!(k.annotation("public-key")? == wrong, "nothing written without the RBAC");
    Ok(())
}

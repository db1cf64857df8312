//! `kuberaya-sandbox kube`: the API server stand-in as a process, driven by the real
//! kubectl, stopped with SIGTERM and started again on the same state.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::Process;
use kuberaya_e2e::cluster::{Cluster, Kubectl};
use kuberaya_e2e::kube_stand_in;

/// One stand-in's temporary directory: its state, the kubeconfig it writes, and the HOME
/// of the real kubectl that reads it (never the user's).
struct StandIn {
    dir: tempfile::TempDir,
    state: String,
    kubeconfig: String,
}

impl StandIn {
    fn new() -> Result<StandIn> {
        let dir = tempfile::tempdir()?;
        let state = dir.path().join("kube").to_str().context("utf-8")?.to_string();
        let kubeconfig = dir.path().join("kubeconfig").to_str().context("utf-8")?.to_string();
        Ok(StandIn { dir, state, kubeconfig })
    }

    /// `kuberaya-sandbox kube` on this state; the process and its URL.
    fn start(&self) -> Result<(Process, String)> {
        let mut cmd = kube_stand_in::command(self.state.as_ref(), self.kubeconfig.as_ref());
        cmd.args(["--listen", "127.0.0.1:0"]);
        let mut p = Process::spawn_command(cmd)?;
        let url = kube_stand_in::wait_listening(&mut p, Duration::from_secs(60))?;
        Ok((p, url))
    }

    /// `kubectl ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> Result<String> {
        let kubectl = Kubectl {
            kubeconfig: self.kubeconfig.clone().into(),
            home: self.dir.path().to_owned(),
            request_timeout: Duration::from_secs(20),
        };
        kubectl.kubectl(args)
    }
}

#[test]
fn kube_stand_in_binary_serves_kubectl_and_keeps_state() -> Result<()> {
    let kube = StandIn::new()?;
    let resource_version = || -> Result<u64> {
        let rv = kube.ok(&[
            "get",
            "cm",
            "c",
            "-n",
            "kept",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])?;
        Ok(rv.parse()?)
    };
    let (mut p, _url) = kube.start()?;
    let out = kube.ok(&["get", "ns"])?;
    ensure!(out.contains("kube-system"), "{out}");
    kube.ok(&["create", "namespace", "kept"])?;
    kube.ok(&["create", "configmap", "c", "-n", "kept", "--from-literal=a=1"])?;
    let rv_before = resource_version()?;
    let status = p.stop();
    ensure!(
        status.is_some_and(|s| s.success()),
        "SIGTERM should stop it cleanly: {}",
        p.output_tails()
    );
    let (_p, _url) = kube.start()?;
    let out = kube.ok(&["get", "cm", "c", "-n", "kept", "-o", "jsonpath={.data.a}"])?;
    ensure!(out == "1", "{out}");
    kube.ok(&["label", "cm", "c", "-n", "kept", "x=y"])?;
    let rv_after = resource_version()?;
    ensure!(
        rv_after > rv_before,
        "resourceVersion went from {rv_before} to {rv_after}"
    );
    Ok(())
}

/// docs/sandbox.md: a crash (SIGKILL, no clean stop) loses at most the last ~100 ms of
/// writes. Writes acknowledged a second before the kill are there after a restart.
#[test]
fn kube_stand_in_keeps_acknowledged_writes_across_a_crash() -> Result<()> {
    let kube = StandIn::new()?;
    let (mut p, _url) = kube.start()?;
    kube.ok(&["create", "configmap", "before-crash", "--from-literal=a=1"])?;
    kube.ok(&["label", "cm", "before-crash", "x=y"])?;
    std::thread::sleep(Duration::from_secs(1));
    p.signal(libc::SIGKILL);
    p.stop();
    let (_p, _url) = kube.start()?;
    let out = kube.ok(&[
        "get",
        "cm",
        "before-crash",
        "-o",
        "jsonpath={.data.a}{.metadata.labels.x}",
    ])?;
    ensure!(out == "1y", "{out}");
    Ok(())
}

//! The Kubernetes API stand-in (`kuberaya-sandbox kube`) as a process of its own, for tests
//! and benches that want an API server without the rest of the sandbox.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, ensure};

use crate::{Process, binary};

/// `kuberaya-sandbox kube` keeping its objects in `state_dir` and writing an admin
/// kubeconfig to `kubeconfig`; the caller adds `--listen`, `--service-cidr`, a wrapper.
pub fn command(state_dir: &Path, kubeconfig: &Path) -> Command {
    let mut cmd = Command::new(binary("kuberaya-sandbox"));
    cmd.arg("kube")
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--kubeconfig")
        .arg(kubeconfig);
    cmd
}

/// Waits (at most `within`) for the stand-in's `listening on URL` line; the URL.
pub fn wait_listening(process: &mut Process, within: Duration) -> Result<String> {
    let line = process.wait_for_stdout_line("listening on ", within)?;
    let url = line.trim().trim_start_matches("listening on ").to_string();
    ensure!(url.starts_with("https://127."), "unexpected address line: {line}");
    Ok(url)
}

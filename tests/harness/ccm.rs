//! The `kuberaya-ccm` binary run against a [`CloudSandbox`] as a Deployment would run it:
//! a cloud config file, the platform credentials in its environment, leader election in
//! namespace `default`, metrics and health on free loopback ports (plain HTTP; the HTTPS
//! server is off unless the caller's arguments give it an address).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Result, bail};

use crate::cloud::CloudSandbox;
use crate::cluster::Cluster;
use crate::probe::{curl, metric_value};
use crate::sandbox::free_port;
use crate::{Process, binary, poll_until_blocking};

/// Writes the CCM's cloud config (`api_url`, `cluster_id`) to `path`.
pub fn write_cloud_config(path: &Path, api_url: &str, cluster_id: &str) -> Result<()> {
    std::fs::write(path, format!("api_url: {api_url}\ncluster_id: {cluster_id}\n"))?;
    Ok(())
}

/// A running `kuberaya-ccm` (terminated on drop by the harness's [`Process`]).
pub struct Ccm {
    pub process: Process,
    /// Its metrics address, `127.0.0.1:PORT`.
    pub metrics: String,
}

impl Ccm {
    /// Starts a `kuberaya-ccm` replica against `sb` with `RUST_LOG=rust_log` and `args`
    /// (periods, lease timings) after the common ones.
    pub fn spawn(sb: &CloudSandbox, rust_log: &str, args: &[&str]) -> Result<Ccm> {
        let config = sb.state().join("cloud-config.yaml");
        write_cloud_config(&config, &sb.url, &sb.cluster_id)?;
        Ccm::spawn_with(sb.kubeconfig(), &config, (&sb.email, &sb.password), rust_log, args)
    }

    /// [`Ccm::spawn`] against any cluster (`kubeconfig`) and platform (the cloud config
    /// file `config`, and `credentials`: email, password).
    pub fn spawn_with(
        kubeconfig: &Path,
        config: &Path,
        credentials: (&str, &str),
        rust_log: &str,
        args: &[&str],
    ) -> Result<Ccm> {
        let (cmd, metrics) = Ccm::command(kubeconfig, config, credentials, rust_log, args);
        Ccm::start(cmd, metrics)
    }

    /// The command line of [`Ccm::spawn_with`] and its metrics address, for a caller to
    /// wrap (a bench makes it die with its parent) and start with [`Ccm::start`].
    pub fn command(
        kubeconfig: &Path,
        config: &Path,
        credentials: (&str, &str),
        rust_log: &str,
        args: &[&str],
    ) -> (Command, String) {
        let metrics = format!("127.0.0.1:{}", free_port());
        let health = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(binary("kuberaya-ccm"));
        cmd.env("CLOUDRAYA_EMAIL", credentials.0)
            .env("CLOUDRAYA_PASSWORD", credentials.1)
            .env("RUST_LOG", rust_log)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cloud-config")
            .arg(config)
            .args([
                "--leader-elect-resource-namespace",
                "default",
                "--metrics-bind-address",
                &metrics,
                "--health-bind-address",
                &health,
            ]);
        // Its default, 0.0.0.0:10258, would be one port for every CCM of the tests.
        if !args.iter().any(|a| a.starts_with("--secure-bind-address")) {
            cmd.arg("--secure-bind-address=0");
        }
        cmd.args(args);
        (cmd, metrics)
    }

    /// Starts `cmd` (of [`Ccm::command`]), whose metrics listen on `metrics`.
    pub fn start(cmd: Command, metrics: String) -> Result<Ccm> {
        Ok(Ccm {
            process: Process::spawn_command(cmd)?,
            metrics,
        })
    }

    /// The value of the sample `name` (labels included) on its metrics endpoint.
    pub fn metric(&self, name: &str) -> Option<f64> {
        metric_value(&curl(&format!("http://{}/metrics", self.metrics))?, name)
    }

    /// Whether it has said that it became leader.
    pub fn leads(&self) -> bool {
        self.process.stdout().contains("became leader")
    }

    /// Waits (at most `within`) until it leads; fails at once if it exits first.
    pub fn wait_leader(&mut self, within: Duration) -> Result<()> {
        let outcome = poll_until_blocking(within, || {
            if self.leads() {
                Some(true)
            } else {
                (!self.process.is_running()).then_some(false)
            }
        });
        if outcome != Some(true) {
            bail!(
                "kuberaya-ccm did not become leader within {within:?} (running: {})\n{}",
                self.process.is_running(),
                self.process.output_tails()
            );
        }
        Ok(())
    }
}

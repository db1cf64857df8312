//! `kuberaya`: the KubeRaya networking admin CLI.
//!
//! A thin layer over the `kuberaya-ccm`, `kuberaya-gateway` and `kuberaya-sandbox`
//! libraries; it follows kubectl's habits (`-o table|json`, exit codes 0/1/2). The
//! `sandbox` subcommand (and the `kuberaya-sandbox` library) is the default-on `sandbox`
//! feature; without it the CLI is a slim admin build.

pub mod access;
pub mod audit;
pub mod gateway;
#[cfg(test)]
mod golden;
pub mod kube;
pub mod lb;
pub mod logging;
pub mod output;
pub mod peer;
pub mod reach;
#[cfg(feature = "sandbox")]
pub mod sandbox;
pub mod wgquick;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kuberaya",
    version,
    about = "KubeRaya networking: load balancers, VPN peers, exposure audit, local sandbox"
)]
pub struct Cli {
    /// More log output on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(flatten)]
    pub kube: kube::KubeArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole system on this machine: the CloudRaya platform stand-in and its cluster.
    #[cfg(feature = "sandbox")]
    #[command(subcommand)]
    Sandbox(sandbox::SandboxCommand),
    /// VPN peers of the gateway: add, list, show, remove, disable, enable, rotate.
    #[command(subcommand)]
    Peer(peer::PeerCommand),
    /// Access granted by VpnAccessPolicies: grant (expiring), revoke, list, explain.
    #[command(subcommand)]
    Access(access::AccessCommand),
    /// Platform load balancers of the cluster's Services: list, describe, orphans.
    #[command(subcommand)]
    Lb(lb::LbCommand),
    /// How the cluster is reachable from outside: `expose audit`.
    #[command(subcommand)]
    Expose(audit::ExposeCommand),
    /// Print a shell completion script.
    #[command(after_help = "Examples:
  kuberaya completion bash > /etc/bash_completion.d/kuberaya
  kuberaya completion zsh > \"${fpath[1]}/_kuberaya\"
  kuberaya completion fish > ~/.config/fish/completions/kuberaya.fish")]
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        #[cfg(feature = "sandbox")]
        Command::Sandbox(cmd) => sandbox::run(cmd).await,
        Command::Peer(cmd) => peer::run(cmd, &cli.kube).await.map(|()| ExitCode::SUCCESS),
        Command::Access(cmd) => access::run(cmd, &cli.kube).await,
        Command::Lb(cmd) => lb::run(cmd, &cli.kube).await.map(|()| ExitCode::SUCCESS),
        Command::Expose(cmd) => audit::run(cmd, &cli.kube).await,
        Command::Completion { shell } => {
            use clap::CommandFactory;
            use std::io::Write;
            // Into a buffer first: a closed pipe (`| head`) must not panic inside clap_complete.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "kuberaya", &mut script);
            match std::io::stdout().write_all(&script) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// `sandbox` is there exactly when the `sandbox` feature is.
    #[test]
    fn the_sandbox_subcommand_follows_its_feature() {
        let cli = super::Cli::command();
        let has = cli.get_subcommands().any(|c| c.get_name() == "sandbox");
        assert_eq!(has, cfg!(feature = "sandbox"));
        assert!(cli.get_subcommands().any(|c| c.get_name() == "peer"));
    }
}

//! `kuberaya peer ...`: VPN peers of the gateway as `VpnPeer` resources.
//!
//! Keys are made here, on the admin's machine, or on the user's own device
//! (`--public-key`): the cluster only ever gets the public key (and, with `--psk`, a
//! preshared key in a Secret). A private key made here goes into the wg-quick file (mode
//! 0600) and nowhere else; one made on the device never leaves it.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use ipnet::IpNet;
use kube::Api;
use kuberaya_gateway::crd::{AllowRule, VpnPeer};
use kuberaya_gateway::keys::PublicKey;

use crate::gateway::{EndpointFamily, GatewayArgs};
use crate::kube::{Kube, KubeArgs, api_error, is_not_found};
use crate::output::OutputArg;

mod add;
mod config;
mod lifecycle;
mod list;
mod parse;
mod psk;
mod rotate;
mod state;
#[cfg(test)]
pub(crate) mod tests;
mod view;
mod wait;

pub use list::list_services;
pub use parse::{check_rules, parse_allow, parse_duration, parse_endpoint, parse_name, rule_text};
pub use state::{Acceptance, acceptance, state};
pub use view::{PeerDetail, PeerList, PeerRow, list_table, row_of, show_text};

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Create a peer: make its key pair here, create the VpnPeer with the public key only,
    /// wait until the gateway accepts it, and write its wg-quick config (mode 0600).
    #[command(after_help = "Examples:
  # An admin peer (in the gateway's namespace) reaching two namespaces:
  kuberaya peer add alice --allow team-a --allow team-b/db:5432 --expires 30d
  # A team peer in team-a, reaching only team-a's web Service on port http, with a QR code:
  kuberaya peer add -n team-a bob --allow team-a/web:http --psk --qr
  # Bring your own key: carol made her key pair on her laptop (wg genkey | tee k | wg pubkey);
  # the config comes without PrivateKey, for her to add:
  kuberaya peer add carol --allow team-a --public-key 'xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg='
  # A phone on an IPv6-only mobile network: the gateway's IPv6 endpoint ([IPv6]:PORT), when its
  # load balancer has one (a dual-stack gateway also gives the peer an IPv6 tunnel address):
  kuberaya peer add dana --allow team-a --endpoint-family ipv6 --qr")]
    Add(AddArgs),
    /// List peers: address, what they may reach, last handshake, traffic, expiry, state.
    #[command(
        after_help = "A peer not served (disabled, expired, rejected) holds no address: ADDRESS shows the one
it last had, `100.64.0.3 (not in use)` (JSON: `address` null, `lastAddress`). It gets that
address back when it is served again (enabled, renewed) if still free, so its config stays valid.

Examples:
  kuberaya peer list            # the gateway's namespace
  kuberaya peer list -A -o json | jq '.items[] | select(.state != \"Accepted\")'"
    )]
    List(ListArgs),
    /// Show one peer, with the Services and ports it can reach now.
    #[command(after_help = "Examples:
  kuberaya peer show alice
  kuberaya peer show -n team-a bob -o yaml")]
    Show(NameArgs),
    /// Delete a peer (and the preshared-key Secret `kuberaya peer add --psk` made).
    #[command(after_help = "Example:\n  kuberaya peer remove -n team-a bob")]
    Remove(NameArgs),
    /// Keep a peer but cut it off.
    #[command(after_help = "Example:\n  kuberaya peer disable alice")]
    Disable(NameArgs),
    /// Let a disabled peer in again.
    #[command(after_help = "Example:\n  kuberaya peer enable alice")]
    Enable(NameArgs),
    /// New key pair: the resource gets the new public key, a new config is written, the old
    /// key stops working.
    #[command(
        after_help = "Examples:\n  kuberaya peer rotate alice --out alice.conf\n  kuberaya peer rotate carol --public-key 'NEW_PUBLIC_KEY_FROM_HER_DEVICE'"
    )]
    Rotate(RotateArgs),
    /// Preshared keys.
    #[command(subcommand)]
    Psk(PskCommand),
}

#[derive(Debug, Subcommand)]
pub enum PskCommand {
    /// A new preshared key in the peer's Secret, written into its existing config file.
    #[command(after_help = "Example:\n  kuberaya peer psk rotate alice --config alice.conf")]
    Rotate(PskRotateArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The peer's name (a DNS label).
    #[arg(value_parser = parse_name)]
    pub name: String,
    /// What the peer may reach: NS, NS/SVC or NS/SVC:PORT[,PORT...] (numbers or port names). Repeatable.
    #[arg(long, value_name = "NS[/SVC[:PORTS]]", value_parser = parse_allow)]
    pub allow: Vec<AllowRule>,
    /// Cut the peer off after this long: 90m, 12h, 30d, 4w.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub expires: Option<Duration>,
    /// Add a preshared key (kept in a Secret `NAME-psk` next to the peer).
    #[arg(long)]
    pub psk: bool,
    /// The tunnel address [default: the gateway allocates one].
    #[arg(long)]
    pub address: Option<Ipv4Addr>,
    /// The IPv6 tunnel address, in the gateway's IPv6 tunnel range [default: the gateway's, the
    /// range's prefix + the IPv4 address's offset].
    #[arg(long, value_name = "ADDRESS")]
    pub address_v6: Option<Ipv6Addr>,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// Whose key: made here, or on the user's own device.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The public key of a key pair made on the user's own device (`wg genkey | wg pubkey`,
    /// or a phone's WireGuard app): no private key is made here, and the config is written
    /// without one, for the user to add.
    #[arg(long, value_name = "KEY", value_parser = parse_public_key)]
    pub public_key: Option<PublicKey>,
}

fn parse_public_key(s: &str) -> Result<PublicKey, String> {
    PublicKey::parse(s.trim()).map_err(|e| format!("{e} (a WireGuard public key: 44 characters of base64)"))
}

/// Where and how the wg-quick config goes.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Write the config here [default: ./NAME.conf]; `-` prints it (with the private key) on stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also print the config as a QR code (for mobile WireGuard apps).
    #[arg(long)]
    pub qr: bool,
    /// The ranges routed through the tunnel, one per family, comma-separated or repeated [default: `service-cidr` of the kuberaya-config ConfigMap, else 10.96.0.0/12]. IPv6 ranges are routed for a peer with an IPv6 tunnel address.
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    pub service_cidr: Vec<IpNet>,
    /// The gateway endpoint's family when its load balancer has both: ipv6 names `[IPv6]:PORT` [default: ipv4, or the only one there is].
    #[arg(long, value_name = "FAMILY", conflicts_with = "endpoint")]
    pub endpoint_family: Option<EndpointFamily>,
    /// The endpoint the config names, instead of the gateway's load balancer (HOST:PORT, IPv4:PORT or [IPv6]:PORT).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_endpoint)]
    pub endpoint: Option<String>,
    /// How long to wait for the gateway to accept the peer, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub timeout: u64,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub output: OutputArg,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    #[arg(value_parser = parse_name)]
    pub name: String,
    #[command(flatten)]
    pub output: OutputArg,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Debug, Args)]
pub struct RotateArgs {
    #[arg(value_parser = parse_name)]
    pub name: String,
    #[command(flatten)]
    pub key: KeyArgs,
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Debug, Args)]
pub struct PskRotateArgs {
    #[arg(value_parser = parse_name)]
    pub name: String,
    /// The peer's wg-quick config file; its PresharedKey line is replaced.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// How long to wait for the gateway to accept the peer again, in seconds.
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    pub timeout: u64,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

pub async fn run(cmd: PeerCommand, kube_args: &KubeArgs) -> anyhow::Result<()> {
    match cmd {
        PeerCommand::Add(a) => add::add(kube_args, a).await,
        PeerCommand::List(a) => list::list(kube_args, a).await,
        PeerCommand::Show(a) => list::show(kube_args, a).await,
        PeerCommand::Remove(a) => lifecycle::remove(kube_args, a).await,
        PeerCommand::Disable(a) => lifecycle::set_disabled(kube_args, a, true).await,
        PeerCommand::Enable(a) => lifecycle::set_disabled(kube_args, a, false).await,
        PeerCommand::Rotate(a) => rotate::rotate(kube_args, a).await,
        PeerCommand::Psk(PskCommand::Rotate(a)) => psk::psk_rotate(kube_args, a).await,
    }
}

fn peer_namespace(kube_args: &KubeArgs, gw: &GatewayArgs) -> String {
    kube_args
        .namespace
        .clone()
        .unwrap_or_else(|| gw.gateway_namespace.clone())
}

fn psk_secret_name(peer: &str) -> String {
    format!("{peer}-psk")
}

async fn get_peer(k: &Kube, ns: &str, name: &str) -> anyhow::Result<VpnPeer> {
    let api: Api<VpnPeer> = Api::namespaced(k.client.clone(), ns);
    match api.get(name).await {
        Ok(p) => Ok(p),
        Err(e) if is_not_found(&e) => {
            bail!("peer {ns}/{name} not found; see `kuberaya peer list -n {ns}` (or -A)")
        }
        Err(e) => Err(api_error(e, &format!("reading peer {ns}/{name}"))),
    }
}

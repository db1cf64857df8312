//! `kuberaya peer ...`: VPN peers of the gateway as `VpnPeer` resources.
//!
//! Keys are made here, on the admin's machine: the cluster only ever gets the public key
//! (and, with `--psk`, a preshared key in a Secret). The private key goes into the wg-quick
//! file (mode 0600) and nowhere else.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use ipnet::IpNet;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret, Service as K8sService};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Resource, ResourceExt};
use kuberaya_gateway::crd::{AllowRule, CONDITION_ACCEPTED, PortRef, SecretKeyRef, VpnPeer, VpnPeerSpec};
use kuberaya_gateway::keys::{PresharedKey, PrivateKey};
use kuberaya_gateway::peers::PeerId;
use kuberaya_gateway::source::kube::{PRESHARED_KEY_KEY, psk_from_secret, service_from_k8s};
use serde::Serialize;

use crate::gateway::{self, GatewayArgs, GatewayInfo};
use crate::kube::{Kube, KubeArgs, Scope, api_error, connect, is_not_found};
use crate::output::{Color, OutputArg, Progress, Style, age, bytes, render, table};
use crate::reach::{Reach, reach_of_all};
use crate::wgquick::{self, WgConfig};

#[derive(Debug, Subcommand)]
pub enum PeerCommand {
    /// Create a peer: make its key pair here, create the VpnPeer with the public key only,
    /// wait until the gateway accepts it, and write its wg-quick config (mode 0600).
    #[command(after_help = "Examples:
  # An admin peer (in the gateway's namespace) reaching two namespaces:
  kuberaya peer add alice --allow team-a --allow team-b/db:5432 --expires 30d
  # A team peer in team-a, reaching only team-a's web Service on port http, with a QR code:
  kuberaya peer add -n team-a bob --allow team-a/web:http --psk --qr")]
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
    #[command(after_help = "Example:\n  kuberaya peer rotate alice --out alice.conf")]
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
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub gateway: GatewayArgs,
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
    /// The range routed through the tunnel [default: `service-cidr` of the kuberaya-config ConfigMap, else 10.96.0.0/12].
    #[arg(long, value_name = "CIDR")]
    pub service_cidr: Option<IpNet>,
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

// ---------------------------------------------------------------------------------------
// Parsing (pure)

/// A DNS-1123 label, as Kubernetes names of namespaces and Services are.
pub fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a valid name: lowercase letters, digits and '-', at most 63, not starting or ending with '-'"
        ))
    }
}

/// `NS`, `NS/SVC` or `NS/SVC:PORT[,PORT...]`.
pub fn parse_allow(s: &str) -> Result<AllowRule, String> {
    let hint = "expected NS, NS/SVC or NS/SVC:PORT[,PORT...]";
    let (ns, rest) = match s.split_once('/') {
        Some((ns, rest)) => (ns, Some(rest)),
        None => (s, None),
    };
    if ns.contains(':') {
        return Err(format!("{s:?}: ports need a Service ({hint})"));
    }
    let namespace = parse_name(ns).map_err(|e| format!("{s:?}: namespace {e} ({hint})"))?;
    let mut rule = AllowRule {
        namespace: Some(namespace),
        service: None,
        ports: None,
    };
    let Some(rest) = rest else { return Ok(rule) };
    let (svc, ports) = match rest.split_once(':') {
        Some((svc, ports)) => (svc, Some(ports)),
        None => (rest, None),
    };
    rule.service = Some(parse_name(svc).map_err(|e| format!("{s:?}: Service {e} ({hint})"))?);
    if let Some(ports) = ports {
        let mut list = Vec::new();
        for p in ports.split(',') {
            let p = p.trim();
            if p.is_empty() {
                return Err(format!("{s:?}: empty port ({hint})"));
            }
            if p.bytes().all(|b| b.is_ascii_digit()) {
                let n: u16 = p
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("{s:?}: port {p} is not in 1-65535"))?;
                list.push(PortRef::Number(n));
            } else {
                parse_name(p).map_err(|e| format!("{s:?}: port name {e}"))?;
                list.push(PortRef::Name(p.to_string()));
            }
        }
        rule.ports = Some(list);
    }
    Ok(rule)
}

/// `90s`, `90m`, `12h`, `30d`, `4w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 90m, 12h, 30d or 4w"))?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return Err(format!("{s:?}: unit must be s, m, h, d or w")),
    };
    if n == 0 {
        return Err(format!("{s:?}: must be more than zero"));
    }
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// `ns/svc:80,http` for one rule.
pub fn rule_text(r: &AllowRule, own_namespace: &str) -> String {
    let ns = r.namespace.as_deref().unwrap_or(own_namespace);
    let mut s = ns.to_string();
    if let Some(svc) = &r.service {
        s.push('/');
        s.push_str(svc);
    } else {
        s.push_str("/*");
    }
    if let Some(ports) = &r.ports {
        let p: Vec<String> = ports
            .iter()
            .map(|p| match p {
                PortRef::Number(n) => n.to_string(),
                PortRef::Name(n) => n.clone(),
            })
            .collect();
        s.push(':');
        s.push_str(&p.join(","));
    }
    s
}

/// A team peer (outside the gateway's namespace) may only name its own namespace.
pub fn check_rules(peer_namespace: &str, gateway_namespace: &str, rules: &[AllowRule]) -> Result<(), String> {
    if peer_namespace == gateway_namespace {
        return Ok(());
    }
    for r in rules {
        if let Some(ns) = &r.namespace
            && ns != peer_namespace
        {
            return Err(format!(
                "--allow {}: a team peer in {peer_namespace} reaches only {peer_namespace}; create an admin peer (without -n) to reach other namespaces",
                rule_text(r, peer_namespace)
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// State (pure)

/// What the gateway last said about a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acceptance {
    Accepted {
        address: Option<Ipv4Addr>,
    },
    Rejected {
        reason: String,
        message: String,
    },
    /// No answer for the current generation yet.
    Pending,
}

pub fn acceptance(p: &VpnPeer) -> Acceptance {
    let Some(status) = &p.status else {
        return Acceptance::Pending;
    };
    if let (Some(seen), Some(generation)) = (status.observed_generation, p.metadata.generation)
        && seen < generation
    {
        return Acceptance::Pending;
    }
    match status.conditions.iter().find(|c| c.type_ == CONDITION_ACCEPTED) {
        Some(c) if c.status == "True" => Acceptance::Accepted {
            address: status
                .address
                .as_deref()
                .and_then(|a| a.split('/').next()?.parse().ok()),
        },
        Some(c) if c.status == "False" => Acceptance::Rejected {
            reason: c.reason.clone(),
            message: c.message.clone(),
        },
        _ => Acceptance::Pending,
    }
}

/// `Disabled`, `Expired`, `Accepted`, `Rejected` or `Pending`, with the rejection reason.
pub fn state(p: &VpnPeer, now: Timestamp) -> (&'static str, Option<String>) {
    if p.spec.disabled {
        return ("Disabled", None);
    }
    if p.spec.expires_at.as_ref().is_some_and(|t| t.0 <= now) {
        return ("Expired", None);
    }
    match acceptance(p) {
        Acceptance::Accepted { .. } => ("Accepted", None),
        Acceptance::Rejected { reason, .. } => ("Rejected", Some(reason)),
        Acceptance::Pending => ("Pending", None),
    }
}

fn paint_state(style: &Style, state: &str) -> String {
    match state {
        "Accepted" => style.paint(state, Color::Green),
        "Pending" | "Disabled" => style.paint(state, Color::Yellow),
        _ => style.paint(state, Color::Red),
    }
}

/// One peer as `list` shows it (and as JSON/YAML print it).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRow {
    pub namespace: String,
    pub name: String,
    /// The tunnel address in use (or asked for, while the gateway has not answered).
    pub address: Option<String>,
    /// For a peer not served (disabled, expired, rejected): the address it last had,
    /// given back when it is served again if still free (`status.lastAddress`).
    pub last_address: Option<String>,
    pub allow: Vec<String>,
    pub last_handshake: Option<Timestamp>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub expires_at: Option<Timestamp>,
    pub disabled: bool,
    pub state: String,
    pub reason: Option<String>,
    pub public_key: String,
    pub preshared_key: bool,
}

pub fn row_of(p: &VpnPeer, now: Timestamp) -> PeerRow {
    let ns = p.namespace().unwrap_or_default();
    let status = p.status.clone().unwrap_or_default();
    let (state, reason) = state(p, now);
    let (address, last_address) = addresses(p, state);
    PeerRow {
        allow: p.spec.allow.iter().map(|r| rule_text(r, &ns)).collect(),
        namespace: ns,
        name: p.name_any(),
        address,
        last_address,
        last_handshake: status.last_handshake.map(|t| t.0),
        rx_bytes: status.rx_bytes,
        tx_bytes: status.tx_bytes,
        expires_at: p.spec.expires_at.as_ref().map(|t| t.0),
        disabled: p.spec.disabled,
        state: state.to_string(),
        reason,
        public_key: p.spec.public_key.clone(),
        preshared_key: p.spec.preshared_key_secret_ref.is_some(),
    }
}

/// The address in use, else the one last had: a peer not served holds none (the
/// gateway clears `status.address`, or will), so its address is only the last one.
fn addresses(p: &VpnPeer, state: &str) -> (Option<String>, Option<String>) {
    let status = p.status.as_ref();
    let current = status.and_then(|s| s.address.clone());
    let served = matches!(state, "Accepted" | "Pending");
    match current.or_else(|| p.spec.address.clone()) {
        Some(a) if served => (Some(a), None),
        given => (None, status.and_then(|s| s.last_address.clone()).or(given)),
    }
}

/// The address column: in use, last had (not in use), or none.
fn address_text(r: &PeerRow) -> String {
    match (&r.address, &r.last_address) {
        (Some(a), _) => a.clone(),
        (None, Some(last)) => format!("{last} (not in use)"),
        (None, None) => "-".into(),
    }
}

/// `kuberaya peer list` output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerList {
    pub items: Vec<PeerRow>,
}

pub fn list_table(list: &PeerList, all_namespaces: bool, wide: bool, now: Timestamp, style: &Style) -> String {
    let mut headers = Vec::new();
    if all_namespaces {
        headers.push("namespace");
    }
    headers.extend([
        "name",
        "address",
        "allowed",
        "handshake",
        "rx",
        "tx",
        "expires",
        "state",
    ]);
    if wide {
        headers.extend(["reason", "public-key", "psk"]);
    }
    let rows: Vec<Vec<String>> = list
        .items
        .iter()
        .map(|r| {
            let mut row = Vec::new();
            if all_namespaces {
                row.push(r.namespace.clone());
            }
            row.push(r.name.clone());
            row.push(address_text(r));
            row.push(if r.allow.is_empty() {
                "-".into()
            } else {
                r.allow.join(" ")
            });
            row.push(match r.last_handshake {
                None => "never".into(),
                t => age(now, t),
            });
            row.push(bytes(r.rx_bytes));
            row.push(bytes(r.tx_bytes));
            row.push(match r.expires_at {
                None => "never".into(),
                t => age(now, t),
            });
            row.push(paint_state(style, &r.state));
            if wide {
                row.push(r.reason.clone().unwrap_or_else(|| "-".into()));
                row.push(r.public_key.clone());
                row.push(if r.preshared_key { "yes" } else { "no" }.into());
            }
            row
        })
        .collect();
    if rows.is_empty() {
        return "No peers found.\n".into();
    }
    table(&headers, &rows)
}

/// `kuberaya peer show` output.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerDetail {
    #[serde(flatten)]
    pub peer: PeerRow,
    pub message: Option<String>,
    /// The Services and ports the peer's rules reach now (by the gateway's own rules).
    pub reach: Vec<Reach>,
}

pub fn show_text(d: &PeerDetail, wide: bool, now: Timestamp, style: &Style) -> String {
    let p = &d.peer;
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{:<16}{v}\n", format!("{k}:")));
    line("Name", p.name.clone());
    line("Namespace", p.namespace.clone());
    line("State", paint_state(style, &p.state));
    if let Some(r) = &p.reason {
        line("Reason", r.clone());
    }
    if let Some(m) = d.message.as_ref().filter(|m| !m.is_empty()) {
        line("Message", m.clone());
    }
    line("Address", address_text(p));
    line("Public key", p.public_key.clone());
    line("Preshared key", if p.preshared_key { "yes" } else { "no" }.into());
    line(
        "Allowed",
        if p.allow.is_empty() {
            "nothing (default deny)".into()
        } else {
            p.allow.join(" ")
        },
    );
    line(
        "Last handshake",
        match p.last_handshake {
            None => "never".into(),
            t => age(now, t),
        },
    );
    line(
        "Transfer",
        format!("{} received, {} sent", bytes(p.rx_bytes), bytes(p.tx_bytes)),
    );
    line(
        "Expires",
        match p.expires_at {
            None => "never".into(),
            Some(t) => format!("{t} ({})", age(now, Some(t))),
        },
    );
    s.push_str("Reaches:\n");
    if d.reach.is_empty() {
        s.push_str("  nothing\n");
    } else {
        let mut headers = vec!["service", "cluster-ip", "ports"];
        if wide {
            headers.push("port-names");
        }
        let rows: Vec<Vec<String>> = d
            .reach
            .iter()
            .map(|r| {
                let mut row = vec![
                    format!("{}/{}", r.namespace, r.service),
                    r.cluster_ip.map(|i| i.to_string()).unwrap_or_else(|| "None".into()),
                    r.ports
                        .iter()
                        .map(|p| format!("{}/{}", p.port, p.protocol))
                        .collect::<Vec<_>>()
                        .join(","),
                ];
                if wide {
                    row.push(
                        r.ports
                            .iter()
                            .map(|p| p.name.clone().unwrap_or_else(|| "-".into()))
                            .collect::<Vec<_>>()
                            .join(","),
                    );
                }
                row
            })
            .collect();
        for l in table(&headers, &rows).lines() {
            s.push_str("  ");
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

// ---------------------------------------------------------------------------------------
// Commands

pub async fn run(cmd: PeerCommand, kube_args: &KubeArgs) -> anyhow::Result<()> {
    match cmd {
        PeerCommand::Add(a) => add(kube_args, a).await,
        PeerCommand::List(a) => list(kube_args, a).await,
        PeerCommand::Show(a) => show(kube_args, a).await,
        PeerCommand::Remove(a) => remove(kube_args, a).await,
        PeerCommand::Disable(a) => set_disabled(kube_args, a, true).await,
        PeerCommand::Enable(a) => set_disabled(kube_args, a, false).await,
        PeerCommand::Rotate(a) => rotate(kube_args, a).await,
        PeerCommand::Psk(PskCommand::Rotate(a)) => psk_rotate(kube_args, a).await,
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

async fn ensure_namespace(k: &Kube, ns: &str, what: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(k.client.clone());
    match api.get_opt(ns).await.map_err(|e| api_error(e, "reading namespaces"))? {
        Some(_) => Ok(()),
        None => bail!("namespace {ns:?} ({what}) does not exist; see `kubectl get namespaces`"),
    }
}

fn out_path(config: &ConfigArgs, name: &str) -> Option<PathBuf> {
    match &config.out {
        Some(p) if p.as_os_str() == "-" => None,
        Some(p) => Some(p.clone()),
        None => Some(PathBuf::from(format!("{name}.conf"))),
    }
}

async fn add(kube_args: &KubeArgs, a: AddArgs) -> anyhow::Result<()> {
    let ns = peer_namespace(kube_args, &a.gateway);
    check_rules(&ns, &a.gateway.gateway_namespace, &a.allow).map_err(|e| anyhow!(e))?;
    let out = out_path(&a.config, &a.name);
    if let Some(p) = &out {
        wgquick::check_creatable(p).map_err(|e| anyhow!(e))?;
    }
    let k = connect(kube_args).await?;
    ensure_namespace(&k, &ns, "the peer's namespace, -n").await?;
    for r in &a.allow {
        if let Some(n) = &r.namespace {
            ensure_namespace(&k, n, "in --allow").await?;
        }
    }
    let gw = gateway::discover(&k.client, &a.gateway).await?;
    let cidr = gateway::discover_service_cidr(&k.client, &a.gateway, a.config.service_cidr).await?;
    let peers: Api<VpnPeer> = Api::namespaced(k.client.clone(), &ns);
    if peers
        .get_opt(&a.name)
        .await
        .map_err(|e| api_error(e, "reading VpnPeers"))?
        .is_some()
    {
        bail!(
            "peer {ns}/{} already exists; pick another name, or `kuberaya peer rotate {}` for new keys",
            a.name,
            a.name
        );
    }

    let key = PrivateKey::generate();
    let psk = a.psk.then(|| PresharedKey(rand::random::<[u8; 32]>()));
    let secrets: Api<Secret> = Api::namespaced(k.client.clone(), &ns);
    let secret_name = psk_secret_name(&a.name);
    if let Some(psk) = &psk {
        secrets
            .create(&PostParams::default(), &psk_secret(&ns, &secret_name, psk))
            .await
            .map_err(|e| api_error(e, &format!("creating Secret {ns}/{secret_name}")))?;
    }
    let spec = VpnPeerSpec {
        public_key: key.public_key().to_base64(),
        address: a.address.map(|x| x.to_string()),
        allow: a.allow.clone(),
        expires_at: a.expires.map(|d| {
            Time(Timestamp::now() + SignedDuration::from_secs(i64::try_from(d.as_secs()).unwrap_or(i64::MAX / 2)))
        }),
        preshared_key_secret_ref: psk.as_ref().map(|_| SecretKeyRef {
            name: secret_name.clone(),
            key: Some(PRESHARED_KEY_KEY.into()),
        }),
        disabled: false,
    };
    let mut resource = VpnPeer::new(&a.name, spec);
    resource.metadata.namespace = Some(ns.clone());
    let created = match peers.create(&PostParams::default(), &resource).await {
        Ok(p) => p,
        Err(e) => {
            if psk.is_some() {
                let _ = secrets.delete(&secret_name, &DeleteParams::default()).await;
            }
            return Err(api_error(e, &format!("creating VpnPeer {ns}/{}", a.name)));
        }
    };
    if psk.is_some()
        && let Some(owner) = created.controller_owner_ref(&())
    {
        let owner = OwnerReference {
            controller: None,
            ..owner
        };
        let patch = serde_json::json!({"metadata": {"ownerReferences": [owner]}});
        if let Err(e) = secrets
            .patch(&secret_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            tracing::warn!("could not make the Secret owned by the peer: {e}");
        }
    }

    let outcome = wait_accepted(&peers, &a.name, created.metadata.generation, a.config.timeout).await;
    let address = match outcome {
        Ok(addr) => addr,
        Err(e) => {
            let _ = peers.delete(&a.name, &DeleteParams::default()).await;
            if psk.is_some() {
                let _ = secrets.delete(&secret_name, &DeleteParams::default()).await;
            }
            return Err(e.context("the peer was removed again; nothing was kept"));
        }
    };
    let config = WgConfig {
        title: format!("kuberaya peer {ns}/{} (gateway {})", a.name, gw.endpoint),
        private_key: key,
        address,
        dns_server: gw.tunnel_address,
        search: wgquick::search_domains(&ns, &gw.cluster_domain),
        gateway_public_key: gw.public_key,
        preshared_key: psk,
        endpoint: gw.endpoint.clone(),
        allowed_ips: allowed_ips(cidr, &gw),
        persistent_keepalive: wgquick::DEFAULT_KEEPALIVE,
    };
    deliver(&config, out.as_deref(), a.config.qr, false)?;
    let summary = format!(
        "peer {ns}/{} accepted: address {address}, endpoint {}{}",
        a.name,
        gw.endpoint,
        out.as_ref()
            .map(|p| format!(", config written to {} (mode 0600)", p.display()))
            .unwrap_or_default()
    );
    if out.is_some() {
        println!("{summary}");
    } else {
        eprintln!("{summary}");
    }
    Ok(())
}

fn allowed_ips(cidr: IpNet, gw: &GatewayInfo) -> Vec<IpNet> {
    let gw32 = IpNet::from(ipnet::Ipv4Net::new(gw.tunnel_address, 32).expect("/32 is valid"));
    if cidr.contains(&gw32) {
        vec![cidr]
    } else {
        vec![cidr, gw32]
    }
}

/// Write the config (or print it when `out` is `None`) and the QR code.
fn deliver(config: &WgConfig, out: Option<&Path>, qr: bool, replace: bool) -> anyhow::Result<()> {
    let text = wgquick::render(config);
    match out {
        Some(p) if replace => wgquick::replace(p, &text)?,
        Some(p) => wgquick::write_new(p, &text)?,
        None => print!("{text}"),
    }
    if qr {
        print!("{}", wgquick::qr(&text)?);
    }
    Ok(())
}

fn psk_secret(ns: &str, name: &str, psk: &PresharedKey) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(name.to_string());
    s.metadata.namespace = Some(ns.to_string());
    s.metadata.labels = Some([("app.kubernetes.io/managed-by".to_string(), "kuberaya".to_string())].into());
    s.type_ = Some("Opaque".into());
    s.data = Some(BTreeMap::from([(
        PRESHARED_KEY_KEY.to_string(),
        ByteString(psk.to_base64().into_bytes()),
    )]));
    s
}

/// Wait until the gateway accepts generation `generation` (or later) of the peer.
async fn wait_accepted(
    api: &Api<VpnPeer>,
    name: &str,
    generation: Option<i64>,
    timeout_s: u64,
) -> anyhow::Result<Ipv4Addr> {
    let progress = Progress::start(format!("waiting for the gateway to accept peer {name}"));
    let deadline = Instant::now() + Duration::from_secs(timeout_s);
    loop {
        let p = api.get(name).await.map_err(|e| api_error(e, "reading the peer"))?;
        let stale = match (generation, p.status.as_ref().and_then(|s| s.observed_generation)) {
            (Some(want), Some(seen)) => seen < want,
            _ => false,
        };
        if !stale {
            match acceptance(&p) {
                Acceptance::Accepted { address: Some(a) } => {
                    progress.finish("accepted");
                    return Ok(a);
                }
                Acceptance::Rejected { reason, message } => {
                    progress.finish("rejected");
                    bail!("the gateway rejected peer {name}: {reason}: {message}");
                }
                _ => {}
            }
        }
        if Instant::now() >= deadline {
            progress.finish("timed out");
            bail!(
                "the gateway did not accept peer {name} within {timeout_s}s; is it running? (kubectl -n kuberaya-system get pods,svc)"
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn list(kube_args: &KubeArgs, a: ListArgs) -> anyhow::Result<()> {
    let k = connect(kube_args).await?;
    let scope = Scope::from_args(kube_args, &a.gateway.gateway_namespace);
    let api: Api<VpnPeer> = match &scope {
        Scope::All => Api::all(k.client.clone()),
        Scope::One(ns) => Api::namespaced(k.client.clone(), ns),
    };
    let mut items = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing VpnPeers"))?
        .items;
    items.sort_by_key(|p| (p.namespace(), p.name_any()));
    let now = Timestamp::now();
    let list = PeerList {
        items: items.iter().map(|p| row_of(p, now)).collect(),
    };
    let style = Style::detect();
    print!(
        "{}",
        render(a.output.output, &list, |wide| list_table(
            &list,
            scope == Scope::All,
            wide,
            now,
            &style
        ))?
    );
    Ok(())
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

async fn show(kube_args: &KubeArgs, a: NameArgs) -> anyhow::Result<()> {
    let ns = peer_namespace(kube_args, &a.gateway);
    let k = connect(kube_args).await?;
    let peer = get_peer(&k, &ns, &a.name).await?;
    let all: Api<VpnPeer> = Api::all(k.client.clone());
    let peers = all
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing VpnPeers"))?
        .items;
    let services = list_services(&k).await?;
    let now = Timestamp::now();
    let reach = reach_of_all(&peers, &services, &a.gateway.gateway_namespace, now)
        .remove(&PeerId::new(ns.clone(), a.name.clone()))
        .unwrap_or_default();
    let detail = PeerDetail {
        peer: row_of(&peer, now),
        message: match acceptance(&peer) {
            Acceptance::Rejected { message, .. } => Some(message),
            _ => None,
        },
        reach,
    };
    let style = Style::detect();
    print!(
        "{}",
        render(a.output.output, &detail, |wide| show_text(&detail, wide, now, &style))?
    );
    Ok(())
}

/// Every Service, as the gateway sees them.
pub async fn list_services(k: &Kube) -> anyhow::Result<Vec<kuberaya_gateway::catalog::Service>> {
    let api: Api<K8sService> = Api::all(k.client.clone());
    let list = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing Services"))?;
    Ok(list.items.iter().filter_map(service_from_k8s).collect())
}

async fn remove(kube_args: &KubeArgs, a: NameArgs) -> anyhow::Result<()> {
    let ns = peer_namespace(kube_args, &a.gateway);
    let k = connect(kube_args).await?;
    let peer = get_peer(&k, &ns, &a.name).await?;
    let owned_secret = peer
        .spec
        .preshared_key_secret_ref
        .as_ref()
        .map(|r| r.name.clone())
        .filter(|n| *n == psk_secret_name(&a.name));
    println!("- vpnpeer {ns}/{} (public key {})", a.name, peer.spec.public_key);
    if let Some(s) = &owned_secret {
        println!("- secret {ns}/{s}");
    }
    let api: Api<VpnPeer> = Api::namespaced(k.client.clone(), &ns);
    api.delete(&a.name, &DeleteParams::default())
        .await
        .map_err(|e| api_error(e, &format!("deleting peer {ns}/{}", a.name)))?;
    if let Some(s) = owned_secret {
        let secrets: Api<Secret> = Api::namespaced(k.client.clone(), &ns);
        match secrets.delete(&s, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_error(e, &format!("deleting Secret {ns}/{s}"))),
        }
    }
    println!("peer {ns}/{} removed; its key no longer works", a.name);
    Ok(())
}

async fn set_disabled(kube_args: &KubeArgs, a: NameArgs, disabled: bool) -> anyhow::Result<()> {
    let ns = peer_namespace(kube_args, &a.gateway);
    let k = connect(kube_args).await?;
    let peer = get_peer(&k, &ns, &a.name).await?;
    let word = if disabled { "disabled" } else { "enabled" };
    if peer.spec.disabled == disabled {
        println!("peer {ns}/{} is already {word}", a.name);
        return Ok(());
    }
    println!(
        "~ vpnpeer {ns}/{}: spec.disabled {} -> {disabled}",
        a.name, peer.spec.disabled
    );
    let api: Api<VpnPeer> = Api::namespaced(k.client.clone(), &ns);
    let patch = serde_json::json!({"spec": {"disabled": disabled}});
    api.patch(&a.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(e, &format!("updating peer {ns}/{}", a.name)))?;
    println!("peer {ns}/{} {word}", a.name);
    Ok(())
}

async fn read_psk(k: &Kube, ns: &str, peer: &VpnPeer) -> anyhow::Result<Option<PresharedKey>> {
    let Some(r) = &peer.spec.preshared_key_secret_ref else {
        return Ok(None);
    };
    let secrets: Api<Secret> = Api::namespaced(k.client.clone(), ns);
    let s = secrets
        .get(&r.name)
        .await
        .map_err(|e| api_error(e, &format!("reading Secret {ns}/{}", r.name)))?;
    psk_from_secret(&s, r.key.as_deref().unwrap_or(PRESHARED_KEY_KEY))
        .map(Some)
        .map_err(|e| anyhow!(e))
}

async fn rotate(kube_args: &KubeArgs, a: RotateArgs) -> anyhow::Result<()> {
    let ns = peer_namespace(kube_args, &a.gateway);
    let out = out_path(&a.config, &a.name);
    if let Some(p) = &out
        && !p.exists()
    {
        wgquick::check_creatable(p).map_err(|e| anyhow!(e))?;
    }
    let k = connect(kube_args).await?;
    let peer = get_peer(&k, &ns, &a.name).await?;
    let gw = gateway::discover(&k.client, &a.gateway).await?;
    let cidr = gateway::discover_service_cidr(&k.client, &a.gateway, a.config.service_cidr).await?;
    let psk = read_psk(&k, &ns, &peer).await?;
    let key = PrivateKey::generate();
    let new_public = key.public_key().to_base64();
    println!(
        "~ vpnpeer {ns}/{}: spec.publicKey {} -> {new_public}",
        a.name, peer.spec.public_key
    );
    let api: Api<VpnPeer> = Api::namespaced(k.client.clone(), &ns);
    let patch = serde_json::json!({"spec": {"publicKey": new_public}});
    let updated = api
        .patch(&a.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| api_error(e, &format!("updating peer {ns}/{}", a.name)))?;
    let address = wait_accepted(&api, &a.name, updated.metadata.generation, a.config.timeout).await?;
    let config = WgConfig {
        title: format!("kuberaya peer {ns}/{} (gateway {})", a.name, gw.endpoint),
        private_key: key,
        address,
        dns_server: gw.tunnel_address,
        search: wgquick::search_domains(&ns, &gw.cluster_domain),
        gateway_public_key: gw.public_key,
        preshared_key: psk,
        endpoint: gw.endpoint.clone(),
        allowed_ips: allowed_ips(cidr, &gw),
        persistent_keepalive: wgquick::DEFAULT_KEEPALIVE,
    };
    deliver(&config, out.as_deref(), a.config.qr, true)?;
    let msg = format!(
        "peer {ns}/{} has a new key; the old one no longer works{}",
        a.name,
        out.as_ref()
            .map(|p| format!("; config written to {} (mode 0600)", p.display()))
            .unwrap_or_default()
    );
    if out.is_some() {
        println!("{msg}");
    } else {
        eprintln!("{msg}");
    }
    Ok(())
}

async fn psk_rotate(kube_args: &KubeArgs, a: PskRotateArgs) -> anyhow::Result<()> {
    let ns = peer_namespace(kube_args, &a.gateway);
    let text = std::fs::read_to_string(&a.config).map_err(|e| {
        anyhow!(
            "cannot read {}: {e}; pass the peer's config file to --config",
            a.config.display()
        )
    })?;
    let psk = PresharedKey(rand::random::<[u8; 32]>());
    let new_text = wgquick::set_preshared_key(&text, &psk).map_err(|e| anyhow!("{}: {e}", a.config.display()))?;
    let k = connect(kube_args).await?;
    let peer = get_peer(&k, &ns, &a.name).await?;
    let secrets: Api<Secret> = Api::namespaced(k.client.clone(), &ns);
    let api: Api<VpnPeer> = Api::namespaced(k.client.clone(), &ns);
    let mut generation = peer.metadata.generation;
    match &peer.spec.preshared_key_secret_ref {
        Some(r) => {
            let key = r.key.clone().unwrap_or_else(|| PRESHARED_KEY_KEY.into());
            println!("~ secret {ns}/{}: {key} replaced", r.name);
            let patch = serde_json::json!({"data": {key: ByteString(psk.to_base64().into_bytes())}});
            secrets
                .patch(&r.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| api_error(e, &format!("updating Secret {ns}/{}", r.name)))?;
        }
        None => {
            let name = psk_secret_name(&a.name);
            println!("+ secret {ns}/{name}");
            println!("~ vpnpeer {ns}/{}: spec.presharedKeySecretRef -> {name}", a.name);
            secrets
                .create(&PostParams::default(), &psk_secret(&ns, &name, &psk))
                .await
                .map_err(|e| api_error(e, &format!("creating Secret {ns}/{name}")))?;
            let patch =
                serde_json::json!({"spec": {"presharedKeySecretRef": {"name": name, "key": PRESHARED_KEY_KEY}}});
            let updated = api
                .patch(&a.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| api_error(e, &format!("updating peer {ns}/{}", a.name)))?;
            generation = updated.metadata.generation;
        }
    }
    wait_accepted(&api, &a.name, generation, a.timeout).await?;
    wgquick::replace(&a.config, &new_text)?;
    println!(
        "peer {ns}/{} has a new preshared key; {} updated",
        a.name,
        a.config.display()
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kuberaya_gateway::crd::{Condition, VpnPeerStatus};

    #[test]
    fn allow_forms() {
        let r = parse_allow("team-a").unwrap();
        assert_eq!(
            (r.namespace.as_deref(), r.service.as_deref(), r.ports),
            (Some("team-a"), None, None)
        );
        let r = parse_allow("team-b/db:5432,metrics").unwrap();
        assert_eq!(r.service.as_deref(), Some("db"));
        assert_eq!(
            r.ports,
            Some(vec![PortRef::Number(5432), PortRef::Name("metrics".into())])
        );
        for bad in ["", "Team", "a/", "a/b:", "a/b:0", "a/b:70000", "a:80", "a/b:x_y", "a/B"] {
            assert!(parse_allow(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(rule_text(&parse_allow("a/b:1,x").unwrap(), "z"), "a/b:1,x");
        assert_eq!(rule_text(&AllowRule::default(), "z"), "z/*");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), Duration::from_secs(30 * 86400));
        assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("0d").is_err());
        assert!(parse_duration("3y").is_err());
        assert!(parse_duration("d").is_err());
    }

    #[test]
    fn team_peers_stay_in_their_namespace() {
        let rules = vec![parse_allow("team-a/web").unwrap(), parse_allow("team-b").unwrap()];
        assert!(check_rules("kuberaya-system", "kuberaya-system", &rules).is_ok());
        let e = check_rules("team-a", "kuberaya-system", &rules).unwrap_err();
        assert!(e.contains("team-b/*") && e.contains("without -n"), "{e}");
        assert!(check_rules("team-a", "kuberaya-system", &rules[..1]).is_ok());
    }

    pub(crate) fn with_status(mut p: VpnPeer, accepted: Option<(&str, &str)>, address: Option<&str>) -> VpnPeer {
        p.status = Some(VpnPeerStatus {
            conditions: accepted
                .map(|(status, reason)| Condition {
                    type_: CONDITION_ACCEPTED.into(),
                    status: status.into(),
                    reason: reason.into(),
                    message: format!("{reason} message"),
                    last_transition_time: Time(Timestamp::UNIX_EPOCH),
                })
                .into_iter()
                .collect(),
            address: address.map(Into::into),
            ..Default::default()
        });
        p
    }

    #[test]
    fn acceptance_and_state() {
        let base = crate::reach::tests::peer("ns", "p", 1, vec![]);
        assert_eq!(acceptance(&base), Acceptance::Pending);
        let ok = with_status(base.clone(), Some(("True", "Accepted")), Some("100.64.0.2"));
        assert_eq!(
            acceptance(&ok),
            Acceptance::Accepted {
                address: Some(Ipv4Addr::new(100, 64, 0, 2))
            }
        );
        let mut stale = ok.clone();
        stale.metadata.generation = Some(2);
        stale.status.as_mut().unwrap().observed_generation = Some(1);
        assert_eq!(acceptance(&stale), Acceptance::Pending);
        let bad = with_status(base.clone(), Some(("False", "DuplicatePublicKey")), None);
        assert_eq!(
            state(&bad, Timestamp::UNIX_EPOCH),
            ("Rejected", Some("DuplicatePublicKey".into()))
        );
        let mut off = ok.clone();
        off.spec.disabled = true;
        assert_eq!(state(&off, Timestamp::UNIX_EPOCH).0, "Disabled");
        let mut old = ok;
        old.spec.expires_at = Some(Time(Timestamp::UNIX_EPOCH));
        assert_eq!(state(&old, Timestamp::from_second(10).unwrap()).0, "Expired");
    }

    #[test]
    fn a_peer_not_served_shows_its_last_address_as_not_in_use() {
        let now = Timestamp::from_second(10).unwrap();
        let base = crate::reach::tests::peer("ns", "p", 1, vec![]);
        let ok = with_status(base.clone(), Some(("True", "Accepted")), Some("100.64.0.2"));
        let r = row_of(&ok, now);
        assert_eq!(
            (r.address.as_deref(), r.last_address.as_deref()),
            (Some("100.64.0.2"), None)
        );
        assert_eq!(address_text(&r), "100.64.0.2");
        // Disabled, as the gateway writes it: no address, the last one kept.
        let mut off = with_status(base.clone(), Some(("False", "Disabled")), None);
        off.spec.disabled = true;
        off.status.as_mut().unwrap().last_address = Some("100.64.0.2".into());
        let r = row_of(&off, now);
        assert_eq!(
            (r.address.as_deref(), r.last_address.as_deref()),
            (None, Some("100.64.0.2"))
        );
        assert_eq!(address_text(&r), "100.64.0.2 (not in use)");
        // Disabled before the gateway has answered: the address it still lists is not in use.
        let mut off = ok.clone();
        off.spec.disabled = true;
        assert_eq!(address_text(&row_of(&off, now)), "100.64.0.2 (not in use)");
        // Rejected with a fixed address it never had: that address, not in use.
        let mut dup = with_status(base.clone(), Some(("False", "AddressInUse")), None);
        dup.spec.address = Some("100.64.0.9".into());
        assert_eq!(address_text(&row_of(&dup, now)), "100.64.0.9 (not in use)");
        // Pending: the address asked for, as before; nothing at all: `-`.
        let mut asked = base.clone();
        asked.spec.address = Some("100.64.0.7".into());
        assert_eq!(row_of(&asked, now).address.as_deref(), Some("100.64.0.7"));
        assert_eq!(address_text(&row_of(&base, now)), "-");
    }
}

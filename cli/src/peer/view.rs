//! How `peer list` and `peer show` print peers (pure): rows, tables and the detail text.

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kuberaya_gateway::crd::VpnPeer;
use serde::Serialize;

use super::parse::rule_text;
use super::state::state;
use crate::output::{Color, Style, age, bytes, table};
use crate::reach::Reach;

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
    /// The IPv6 tunnel address, likewise (dual-stack; absent when the peer has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_v6: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_address_v6: Option<String>,
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
    let served = matches!(state, "Accepted" | "Pending");
    let (address, last_address) = in_use_or_last(
        served,
        status.address.clone().or_else(|| p.spec.address.clone()),
        status.last_address.clone(),
    );
    let (address_v6, last_address_v6) = in_use_or_last(
        served,
        status.address_v6.clone().or_else(|| p.spec.address_v6.clone()),
        status.last_address_v6.clone(),
    );
    PeerRow {
        allow: p.spec.allow.iter().map(|r| rule_text(r, &ns)).collect(),
        namespace: ns,
        name: p.name_any(),
        address,
        last_address,
        address_v6,
        last_address_v6,
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

/// The address in use (`current`: the status's, else the spec's), else the one last
/// had: a peer not served holds none (the gateway clears `status.address`, or will), so
/// its address is only the last one. The same rule for either family.
fn in_use_or_last(served: bool, current: Option<String>, last: Option<String>) -> (Option<String>, Option<String>) {
    match current {
        Some(a) if served => (Some(a), None),
        given => (None, last.or(given)),
    }
}

/// The IPv6 address as [`address_text`] tells the IPv4 one.
pub(super) fn address_v6_text(r: &PeerRow) -> String {
    in_use_text(&r.address_v6, &r.last_address_v6)
}

/// The address column: in use, last had (not in use), or none.
pub(super) fn address_text(r: &PeerRow) -> String {
    in_use_text(&r.address, &r.last_address)
}

fn in_use_text(address: &Option<String>, last: &Option<String>) -> String {
    match (address, last) {
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
    if p.address_v6.is_some() || p.last_address_v6.is_some() {
        line("Address (IPv6)", address_v6_text(p));
    }
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

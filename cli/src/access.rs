//! `kuberaya access ...`: access granted by `VpnAccessPolicy` resources, beside each
//! peer's own `allow`: just-in-time grants that expire, their list, their revocation, and
//! `explain`, which answers "may this peer reach that port, and why" with the gateway
//! library's own validation, policy resolution and ACL (not a second reading of the rules).

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use k8s_openapi::api::core::v1::{Namespace, Service as K8sService};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};
use kuberaya_gateway::crd::{
    AllowRule, LabelSelector, LabelSelectorRequirement, PortRef, VpnAccessPolicy, VpnAccessPolicySpec, VpnPeer,
};
use kuberaya_gateway::peers::{PeerId, TunnelConfig};
use kuberaya_gateway::policy::{self, NAMESPACE_NAME_LABEL};
use kuberaya_gateway::source::kube::{peer_from_k8s, policy_from_k8s, service_from_k8s};
use serde::Serialize;

use crate::gateway::{self, GatewayArgs};
use crate::kube::{KubeArgs, api_error, connect, is_not_found};
use crate::output::{OutputArg, render};
use crate::peer::{parse_allow, parse_duration, parse_name, rule_text};

#[derive(Debug, Subcommand)]
pub enum AccessCommand {
    /// Grant a peer (or the peers a label selector picks) access to NS/SVC[:PORTS] for a
    /// while: an expiring VpnAccessPolicy, enforced by the gateway within seconds.
    #[command(
        after_help = "The policy lives in the peers' namespace (-n, default the gateway's) when the Service
is there too; otherwise in the gateway's namespace, selecting the peers' namespace.

Examples:
  # The admin peer alice may reach team-b's web Service for an hour:
  kuberaya access grant alice team-b/web --for 1h
  # The on-call peers of team-a may reach the payments database for two hours:
  kuberaya access grant -n team-a -l role=oncall team-a/payments-db:5432 --for 2h
  # Admin peers labelled team=sre reach team-b's web Service:
  kuberaya access grant -l team=sre team-b/web --for 30m"
    )]
    Grant(GrantArgs),
    /// Delete an access policy (the grant ends within seconds; established sessions stay,
    /// flows it alone allowed stop).
    #[command(after_help = "Example:\n  kuberaya access revoke grant-payments-db-4k2q -n team-a")]
    Revoke(RevokeArgs),
    /// List access policies: whom they select, what they grant, until when, how many peers
    /// they match now.
    #[command(after_help = "Examples:\n  kuberaya access list -A\n  kuberaya access list -n team-a -o json")]
    List(ListArgs),
    /// Whether a peer may reach NS/SVC:PORT now, and why: its own rule, a policy, or
    /// nothing (exit 0 allowed, 1 denied, like `kubectl auth can-i`).
    #[command(after_help = "Example:\n  kuberaya access explain -n team-a bob team-a/payments-db:5432")]
    Explain(ExplainArgs),
}

#[derive(Debug, Args)]
pub struct GrantArgs {
    /// `[PEER] NS/SVC[:PORTS]`: the peer (in the namespace -n; or -l for a selector), and
    /// what it may reach: NS/SVC or NS/SVC:PORT[,PORT...].
    #[arg(value_name = "[PEER] NS/SVC[:PORTS]", num_args = 1..=2, required = true)]
    pub args: Vec<String>,
    /// Which peers (in the namespace -n), instead of one by name: a label selector, as
    /// kubectl takes it (`team=sre`, `role in (oncall,lead)`, `!contractor`).
    #[arg(short = 'l', long, value_name = "SELECTOR", value_parser = parse_selector)]
    pub selector: Option<LabelSelector>,
    /// How long the grant lasts: 30m, 2h, 1d.
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Duration,
    /// The policy's name [default: grant-SVC-<random>].
    #[arg(long, value_parser = parse_name)]
    pub name: Option<String>,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    #[arg(value_parser = parse_name)]
    pub name: String,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    /// Every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    #[command(flatten)]
    pub output: OutputArg,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The peer (in the namespace -n, default the gateway's).
    #[arg(value_parser = parse_name)]
    pub peer: String,
    /// NS/SVC:PORT (a port number or name).
    #[arg(value_name = "NS/SVC:PORT", value_parser = parse_target)]
    pub target: Target,
    #[command(flatten)]
    pub gateway: GatewayArgs,
}

/// One port of one Service.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub namespace: String,
    pub service: String,
    pub port: PortRef,
}

fn parse_target(s: &str) -> Result<Target, String> {
    let rule = parse_allow(s)?;
    match (rule.namespace, rule.service, rule.ports.as_deref()) {
        (Some(namespace), Some(service), Some([port])) => Ok(Target {
            namespace,
            service,
            port: port.clone(),
        }),
        _ => Err(format!("{s:?}: expected NS/SVC:PORT, one port")),
    }
}

/// A kubectl label selector: `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`,
/// `!k`, joined by commas.
pub fn parse_selector(s: &str) -> Result<LabelSelector, String> {
    let mut out = LabelSelector::default();
    // Split on commas outside parentheses.
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.checked_sub(1).ok_or_else(|| format!("{s:?}: unbalanced ')'"))?,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("{s:?}: unbalanced '('"));
    }
    parts.push(&s[start..]);
    let req = |key: &str, operator: &str, values: Vec<String>| LabelSelectorRequirement {
        key: key.trim().to_string(),
        operator: operator.to_string(),
        values,
    };
    for part in parts.iter().map(|p| p.trim()) {
        if part.is_empty() {
            return Err(format!("{s:?}: an empty requirement"));
        }
        let set = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("{part:?}: values in parentheses"))?;
            Ok(inner
                .split(',')
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect())
        };
        if let Some((k, v)) = part.split_once("!=") {
            out.match_expressions.push(req(k, "NotIn", vec![v.trim().to_string()]));
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            out.match_labels.insert(k.trim().to_string(), v.trim().to_string());
        } else if let Some((k, rest)) = part.split_once(" notin ") {
            out.match_expressions.push(req(k, "NotIn", set(rest)?));
        } else if let Some((k, rest)) = part.split_once(" in ") {
            out.match_expressions.push(req(k, "In", set(rest)?));
        } else if let Some(k) = part.strip_prefix('!') {
            out.match_expressions.push(req(k, "DoesNotExist", vec![]));
        } else {
            out.match_expressions.push(req(part, "Exists", vec![]));
        }
    }
    policy::check_selector(&out).map_err(|e| format!("{s:?}: {e}"))?;
    Ok(out)
}

/// Where a grant's policy lives, and whom it selects: the peers' namespace when the
/// Service is there (or the peers are admin peers), else the gateway's namespace selecting
/// the peers' namespace (only there may a policy grant another namespace).
pub fn grant_placement(peers_ns: &str, target_ns: &str, gateway_ns: &str) -> (String, Option<LabelSelector>) {
    if peers_ns == target_ns || peers_ns == gateway_ns {
        (peers_ns.to_string(), None)
    } else {
        let ns = LabelSelector {
            match_labels: BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), peers_ns.to_string())]),
            ..LabelSelector::default()
        };
        (gateway_ns.to_string(), Some(ns))
    }
}

pub async fn run(cmd: AccessCommand, kube_args: &KubeArgs) -> anyhow::Result<ExitCode> {
    match cmd {
        AccessCommand::Grant(a) => grant(kube_args, a).await.map(|()| ExitCode::SUCCESS),
        AccessCommand::Revoke(a) => revoke(kube_args, a).await.map(|()| ExitCode::SUCCESS),
        AccessCommand::List(a) => list(kube_args, a).await.map(|()| ExitCode::SUCCESS),
        AccessCommand::Explain(a) => explain(kube_args, a).await,
    }
}

fn namespace_of(kube_args: &KubeArgs, gw: &GatewayArgs) -> String {
    kube_args
        .namespace
        .clone()
        .unwrap_or_else(|| gw.gateway_namespace.clone())
}

/// Whom a grant selects and what it grants, from `[PEER] NS/SVC[:PORTS]` and `-l`.
pub fn grant_subject(args: &[String], selector: Option<&LabelSelector>) -> Result<(LabelSelector, AllowRule), String> {
    let (selector, target) = match (args, selector) {
        ([target], Some(sel)) => (sel.clone(), target),
        ([peer, target], None) => {
            let peer = parse_name(peer).map_err(|e| format!("peer {e}"))?;
            let by_name = LabelSelector {
                match_labels: BTreeMap::from([(policy::PEER_NAME_LABEL.to_string(), peer)]),
                ..LabelSelector::default()
            };
            (by_name, target)
        }
        ([_], None) => return Err("name a peer, or select peers with -l".into()),
        (_, Some(_)) => return Err("a peer name or -l, not both".into()),
        _ => return Err("expected [PEER] NS/SVC[:PORTS]".into()),
    };
    let target = parse_allow(target)?;
    if target.service.is_none() {
        return Err("a grant names a Service: NS/SVC[:PORTS]".into());
    }
    Ok((selector, target))
}

async fn grant(kube_args: &KubeArgs, a: GrantArgs) -> anyhow::Result<()> {
    let peers_ns = namespace_of(kube_args, &a.gateway);
    let (selector, target) = grant_subject(&a.args, a.selector.as_ref()).map_err(|e| anyhow!(e))?;
    let target = AllowRule {
        namespace: Some(target.namespace.clone().unwrap_or_else(|| peers_ns.clone())),
        ..target
    };
    let target_ns = target.namespace.clone().unwrap_or_default();
    let service = target.service.clone().unwrap_or_default();
    let (ns, namespace_selector) = grant_placement(&peers_ns, &target_ns, &a.gateway.gateway_namespace);
    let name = a.name.clone().unwrap_or_else(|| {
        let suffix: String = (0..4)
            .map(|_| char::from(b"bcdfghjklmnpqrstvwxz2456789"[rand::random_range(0..27)]))
            .collect();
        let head: String = format!("grant-{service}").chars().take(57).collect();
        format!("{}-{suffix}", head.trim_end_matches('-'))
    });
    let expires =
        Timestamp::now() + SignedDuration::from_secs(i64::try_from(a.duration.as_secs()).unwrap_or(i64::MAX / 2));
    let spec = VpnAccessPolicySpec {
        peer_selector: selector.clone(),
        namespace_selector,
        allow: vec![target.clone()],
        expires_at: Some(Time(expires)),
    };
    let mut p = VpnAccessPolicy::new(&name, spec);
    p.metadata.namespace = Some(ns.clone());
    p.metadata.labels = Some(BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_string(),
        "kuberaya".to_string(),
    )]));
    let k = connect(kube_args).await?;
    let api: Api<VpnAccessPolicy> = Api::namespaced(k.client.clone(), &ns);
    api.create(&PostParams::default(), &p)
        .await
        .map_err(|e| api_error(e, &format!("creating VpnAccessPolicy {ns}/{name}")))?;
    println!(
        "vpnaccesspolicy {ns}/{name} created: peers {} in {peers_ns} may reach {} until {expires} (revoke: kuberaya access revoke {name} -n {ns})",
        selector_text(&selector),
        rule_text(&target, ""),
    );
    Ok(())
}

async fn revoke(kube_args: &KubeArgs, a: RevokeArgs) -> anyhow::Result<()> {
    let ns = namespace_of(kube_args, &a.gateway);
    let k = connect(kube_args).await?;
    let api: Api<VpnAccessPolicy> = Api::namespaced(k.client.clone(), &ns);
    match api.delete(&a.name, &DeleteParams::default()).await {
        Ok(_) => {
            println!("vpnaccesspolicy {ns}/{} deleted", a.name);
            Ok(())
        }
        Err(e) if is_not_found(&e) => {
            bail!("access policy {ns}/{} not found; see `kuberaya access list -A`", a.name)
        }
        Err(e) => Err(api_error(e, &format!("deleting VpnAccessPolicy {ns}/{}", a.name))),
    }
}

/// One policy, as `access list` shows it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRow {
    pub namespace: String,
    pub name: String,
    pub peers: String,
    pub namespaces: Option<String>,
    pub allow: Vec<String>,
    pub expires_at: Option<String>,
    pub matched_peers: u32,
    /// `Accepted`, or the reason it grants nothing.
    pub state: String,
}

pub fn selector_text(s: &LabelSelector) -> String {
    let mut parts: Vec<String> = s.match_labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    for e in &s.match_expressions {
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({})", e.key, e.values.join(",")),
            "NotIn" => format!("{} notin ({})", e.key, e.values.join(",")),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    if parts.is_empty() {
        "<all>".into()
    } else {
        parts.join(",")
    }
}

fn row_of(p: &VpnAccessPolicy) -> PolicyRow {
    let own = p.namespace().unwrap_or_default();
    let status = p.status.as_ref();
    let accepted = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Accepted"));
    PolicyRow {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        peers: selector_text(&p.spec.peer_selector),
        namespaces: p.spec.namespace_selector.as_ref().map(selector_text),
        allow: p.spec.allow.iter().map(|r| rule_text(r, &own)).collect(),
        expires_at: p.spec.expires_at.as_ref().map(|t| t.0.to_string()),
        matched_peers: status.map_or(0, |s| s.matched_peers),
        state: match accepted {
            Some(c) if c.status == "True" => "Accepted".into(),
            Some(c) => c.reason.clone(),
            None => "Pending".into(),
        },
    }
}

async fn list(kube_args: &KubeArgs, a: ListArgs) -> anyhow::Result<()> {
    let k = connect(kube_args).await?;
    let api: Api<VpnAccessPolicy> = if a.all_namespaces {
        Api::all(k.client.clone())
    } else {
        Api::namespaced(k.client.clone(), &namespace_of(kube_args, &a.gateway))
    };
    let mut items = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing VpnAccessPolicies"))?
        .items;
    items.sort_by_key(|p| (p.namespace(), p.name_any()));
    let rows: Vec<PolicyRow> = items.iter().map(row_of).collect();
    let text = render(a.output.output, &serde_json::json!({"items": rows}), |_| {
        if rows.is_empty() {
            return "No access policies found.\n".into();
        }
        let mut t = vec![[
            "NAMESPACE".to_string(),
            "NAME".into(),
            "PEERS".into(),
            "ALLOW".into(),
            "EXPIRES".into(),
            "MATCHED".into(),
            "STATE".into(),
        ]];
        for r in &rows {
            let peers = match &r.namespaces {
                Some(ns) => format!("{} (namespaces {ns})", r.peers),
                None => r.peers.clone(),
            };
            t.push([
                r.namespace.clone(),
                r.name.clone(),
                peers,
                r.allow.join(" "),
                r.expires_at.clone().unwrap_or_else(|| "never".into()),
                r.matched_peers.to_string(),
                r.state.clone(),
            ]);
        }
        let widths: Vec<usize> = (0..7)
            .map(|i| t.iter().map(|r| r[i].len()).max().unwrap_or(0))
            .collect();
        t.iter()
            .map(|r| {
                let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
                format!("{}\n", cells.join("   ").trim_end())
            })
            .collect()
    })?;
    print!("{text}");
    Ok(())
}

async fn explain(kube_args: &KubeArgs, a: ExplainArgs) -> anyhow::Result<ExitCode> {
    let ns = namespace_of(kube_args, &a.gateway);
    let k = connect(kube_args).await?;
    let gw = gateway::discover(&k.client, &a.gateway).await?;
    let peers = Api::<VpnPeer>::all(k.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing VpnPeers"))?;
    let policies = Api::<VpnAccessPolicy>::all(k.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing VpnAccessPolicies"))?;
    let services = Api::<K8sService>::all(k.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing Services"))?;
    let namespaces = Api::<Namespace>::all(k.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing Namespaces"))?;
    let inputs: Vec<_> = peers.items.iter().filter_map(peer_from_k8s).collect();
    let policies: Vec<_> = policies.items.iter().filter_map(policy_from_k8s).collect();
    let services: Vec<_> = services.items.iter().filter_map(service_from_k8s).collect();
    let labels: HashMap<String, BTreeMap<String, String>> = namespaces
        .items
        .iter()
        .map(|n| (n.name_any(), n.metadata.labels.clone().unwrap_or_default()))
        .collect();
    let tunnel = TunnelConfig {
        range: gw.tunnel_range,
        range_v6: TunnelConfig::default_range_v6(),
        gateway_namespace: a.gateway.gateway_namespace.clone(),
    };
    let peer = PeerId::new(&ns, &a.peer);
    if !inputs.iter().any(|i| i.id == peer) {
        return Err(anyhow!("peer {ns}/{} not found; see `kuberaya peer list -A`", a.peer));
    }
    let t = &a.target;
    let answer = kuberaya_gateway::access::explain(
        &inputs,
        &policies,
        &services,
        &labels,
        &tunnel,
        Timestamp::now(),
        &peer,
        &t.namespace,
        &t.service,
        &t.port,
    );
    let port = match &t.port {
        PortRef::Number(n) => n.to_string(),
        PortRef::Name(n) => n.clone(),
    };
    println!("{ns}/{} -> {}/{}:{port}: {answer}", a.peer, t.namespace, t.service);
    Ok(match answer {
        kuberaya_gateway::acl::Explanation::Allowed { .. } => ExitCode::SUCCESS,
        kuberaya_gateway::acl::Explanation::Denied(_) => ExitCode::from(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_as_kubectl_reads_them() {
        let s = parse_selector("team=sre, role in (oncall, lead),tier!=db,!contractor,badge").unwrap();
        assert_eq!(s.match_labels, BTreeMap::from([("team".into(), "sre".into())]));
        let ops: Vec<(&str, &str, Vec<String>)> = s
            .match_expressions
            .iter()
            .map(|e| (e.key.as_str(), e.operator.as_str(), e.values.clone()))
            .collect();
        assert_eq!(
            ops,
            vec![
                ("role", "In", vec!["oncall".to_string(), "lead".to_string()]),
                ("tier", "NotIn", vec!["db".to_string()]),
                ("contractor", "DoesNotExist", vec![]),
                ("badge", "Exists", vec![]),
            ]
        );
        assert_eq!(
            selector_text(&s),
            "team=sre,role in (oncall,lead),tier notin (db),!contractor,badge"
        );
        for bad in ["", "a=b,", "role in (x", "role in x)", "k in ()"] {
            assert!(parse_selector(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_grant_names_one_peer_or_a_selector() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (sel, target) = grant_subject(&args(&["alice", "team-b/web:80"]), None).unwrap();
        assert_eq!(
            sel.match_labels,
            BTreeMap::from([(policy::PEER_NAME_LABEL.to_string(), "alice".to_string())])
        );
        assert_eq!(target.service.as_deref(), Some("web"));
        let l = parse_selector("role=oncall").unwrap();
        let (sel, _) = grant_subject(&args(&["team-b/web"]), Some(&l)).unwrap();
        assert_eq!(sel, l);
        for (a, l) in [
            (args(&["team-b/web"]), None),
            (args(&["alice", "team-b/web"]), Some(&l)),
            (args(&["alice", "team-b"]), None),
            (args(&["Alice!", "team-b/web"]), None),
        ] {
            assert!(grant_subject(&a, l).is_err(), "{a:?}");
        }
    }

    #[test]
    fn a_grant_lives_where_it_may_grant() {
        let gw = "kuberaya-system";
        // Same namespace: the peers' own.
        assert_eq!(grant_placement("team-a", "team-a", gw), ("team-a".into(), None));
        // Admin peers: the gateway's namespace grants anything.
        assert_eq!(grant_placement(gw, "team-b", gw), (gw.into(), None));
        // Another namespace: only the gateway's namespace may grant it, selecting team-a.
        let (ns, sel) = grant_placement("team-a", "team-b", gw);
        assert_eq!(ns, gw);
        assert_eq!(
            sel.unwrap().match_labels,
            BTreeMap::from([(NAMESPACE_NAME_LABEL.to_string(), "team-a".to_string())])
        );
    }

    #[test]
    fn explain_targets_name_one_port() {
        assert_eq!(
            parse_target("db/pg:5432").unwrap(),
            Target {
                namespace: "db".into(),
                service: "pg".into(),
                port: PortRef::Number(5432)
            }
        );
        assert!(parse_target("db/pg").is_err());
        assert!(parse_target("db/pg:1,2").is_err());
        assert!(parse_target("db").is_err());
    }
}

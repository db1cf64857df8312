//! `kuberaya lb ...`: the platform load balancers of the cluster's `LoadBalancer`
//! Services, found by the labels the CCM puts on them (`kuberaya_ccm::platform::labels`),
//! through the CCM's own platform client.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail};
use clap::{Args, Subcommand};
use k8s_openapi::api::core::v1::{Event, Service};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use kuberaya_ccm::annotations::{LbAnnotations, PREFIX};
use kuberaya_ccm::config::{CloudConfig, ENV_EMAIL, ENV_PASSWORD};
use kuberaya_ccm::platform::{
    Error as PlatformError, HealthState, HttpPlatform, LABEL_CLUSTER_ID, LABEL_SERVICE_NAME, LABEL_SERVICE_NAMESPACE,
    LABEL_SERVICE_UID, Labels, LbStatus, LoadBalancer, Platform, PlatformClientConfig,
};
use kuberaya_ccm::service::orphans::judge;
use serde::Serialize;

use crate::kube::{KubeArgs, api_error, connect, is_not_found};
use crate::output::{Color, OutputArg, Style, render, table};

/// Env var with the platform API URL (as `kuberaya sandbox env` exports it).
pub const ENV_API_URL: &str = "CLOUDRAYA_API_URL";
/// Env var with the platform cluster ID when no cloud config is given.
pub const ENV_CLUSTER_ID: &str = "KUBERAYA_CLUSTER_ID";

#[derive(Debug, Subcommand)]
pub enum LbCommand {
    /// List the cluster's load balancers: Service, public IP:ports, LB id, status, healthy backends.
    #[command(after_help = "Examples:
  eval \"$(kuberaya sandbox env)\"; kuberaya lb list
  kuberaya lb list --cloud-config /etc/kubernetes/cloud.yaml -n shop -o json | jq '.items[].publicIp'")]
    List(ListArgs),
    /// One Service's load balancer: rules, backend health, annotations in effect, Events,
    /// and what is wrong when it is pending.
    #[command(after_help = "Examples:\n  kuberaya lb describe shop/web\n  kuberaya lb describe -n shop web -o yaml")]
    Describe(DescribeArgs),
    /// Load balancers labelled with this cluster whose Service is gone.
    ///
    /// The same judgement as the CCM's orphan sweep: an LB with a Service UID whose Service
    /// is gone, or exists but neither wants an LB nor carries the CCM's finalizer. LBs with
    /// the cluster's label but no Service UID were not created by the CCM: they are listed
    /// apart ("unknown") and never deleted.
    #[command(after_help = "Examples:
  kuberaya lb orphans
  kuberaya lb orphans --delete          # asks for confirmation
  kuberaya lb orphans --delete --yes    # for scripts")]
    Orphans(OrphansArgs),
}

/// Platform credentials.
#[derive(Debug, Clone, Default, Args)]
pub struct PlatformArgs {
    /// The CCM's cloud config file [default: CLOUDRAYA_API_URL, CLOUDRAYA_EMAIL, CLOUDRAYA_PASSWORD and KUBERAYA_CLUSTER_ID from the environment].
    #[arg(long, global = true, value_name = "FILE")]
    pub cloud_config: Option<PathBuf>,
    /// The platform cluster ID (overrides the cloud config's and KUBERAYA_CLUSTER_ID).
    #[arg(long, global = true, value_name = "ID")]
    pub cluster_id: Option<String>,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub platform: PlatformArgs,
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// NS/SVC, or SVC with -n.
    pub service: String,
    #[command(flatten)]
    pub platform: PlatformArgs,
    #[command(flatten)]
    pub output: OutputArg,
}

#[derive(Debug, Args)]
pub struct OrphansArgs {
    /// Delete the orphans (asks first unless --yes); never the unknown LBs.
    #[arg(long)]
    pub delete: bool,
    /// Do not ask before deleting.
    #[arg(long, requires = "delete")]
    pub yes: bool,
    #[command(flatten)]
    pub platform: PlatformArgs,
    #[command(flatten)]
    pub output: OutputArg,
}

// ---------------------------------------------------------------------------------------
// Credentials (pure)

/// The client settings and cluster ID from `--cloud-config` (a loaded [`CloudConfig`]) or
/// the environment.
pub fn resolve_platform(
    cloud: Option<CloudConfig>,
    cluster_flag: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<(PlatformClientConfig, String), String> {
    let (mut config, cluster) = match cloud {
        Some(c) => (c.client_config(), c.cluster_id),
        None => {
            let url = env(ENV_API_URL).ok_or_else(|| {
                format!("no platform credentials: pass --cloud-config FILE or set {ENV_API_URL}, {ENV_EMAIL} and {ENV_PASSWORD} (for the sandbox: eval \"$(kuberaya sandbox env)\")")
            })?;
            let email = env(ENV_EMAIL).ok_or_else(|| format!("{ENV_API_URL} is set but {ENV_EMAIL} is not"))?;
            let password =
                env(ENV_PASSWORD).ok_or_else(|| format!("{ENV_API_URL} is set but {ENV_PASSWORD} is not"))?;
            let cluster = env(ENV_CLUSTER_ID).unwrap_or_default();
            (PlatformClientConfig::new(url, email, password), cluster)
        }
    };
    let cluster = cluster_flag.map(str::to_string).unwrap_or(cluster);
    if cluster.is_empty() {
        return Err(format!(
            "no cluster ID: pass --cluster-id, set {ENV_CLUSTER_ID}, or use --cloud-config"
        ));
    }
    // A CLI fails fast rather than retrying for a minute.
    config.max_retries = 1;
    config.timeout = config.timeout.min(Duration::from_secs(10));
    Ok((config, cluster))
}

/// A platform error as one line that says what to check.
pub fn platform_error(e: PlatformError, what: &str) -> anyhow::Error {
    match &e {
        PlatformError::Unauthorized { .. } | PlatformError::Forbidden { .. } => anyhow!(
            "{what}: the platform refused the credentials ({e}); check {ENV_EMAIL}/{ENV_PASSWORD} or the cloud config's credential files"
        ),
        PlatformError::Transport(_) | PlatformError::Timeout { .. } => anyhow!(
            "{what}: {}; check {ENV_API_URL} or the cloud config's api_url",
            crate::kube::one_line(&e)
        ),
        _ => anyhow!("{what}: {}", crate::kube::one_line(&e)),
    }
}

struct Connected {
    platform: HttpPlatform,
    cluster: String,
}

fn platform(args: &PlatformArgs) -> anyhow::Result<Connected> {
    let cloud = match &args.cloud_config {
        Some(p) => Some(
            CloudConfig::load(p)
                .map_err(|e| anyhow!("--cloud-config {}: {}", p.display(), crate::kube::one_line(&e)))?,
        ),
        None => None,
    };
    let (config, cluster) =
        resolve_platform(cloud, args.cluster_id.as_deref(), |k| std::env::var(k).ok()).map_err(|e| anyhow!(e))?;
    let platform = HttpPlatform::new(config).map_err(|e| platform_error(e, "platform client"))?;
    Ok(Connected { platform, cluster })
}

fn cluster_labels(cluster: &str) -> Labels {
    Labels::from([(LABEL_CLUSTER_ID.to_string(), cluster.to_string())])
}

// ---------------------------------------------------------------------------------------
// Rows (pure)

/// Backends whose every health entry is `healthy`, and all backends.
pub fn backend_health(lb: &LoadBalancer) -> (usize, usize) {
    let healthy = lb
        .backends
        .iter()
        .filter(|b| {
            let mine: Vec<_> = lb.health.iter().filter(|h| h.vm_id == b.vm_id).collect();
            !mine.is_empty() && mine.iter().all(|h| h.state == HealthState::Healthy)
        })
        .count();
    (healthy, lb.backends.len())
}

/// `ns/name` of the Service an LB belongs to, from its labels.
pub fn service_of(lb: &LoadBalancer) -> Option<(String, String)> {
    Some((
        lb.labels.get(LABEL_SERVICE_NAMESPACE)?.clone(),
        lb.labels.get(LABEL_SERVICE_NAME)?.clone(),
    ))
}

/// One LB in `lb list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LbRow {
    pub namespace: Option<String>,
    pub service: Option<String>,
    pub service_uid: Option<String>,
    pub public_ip: Option<String>,
    /// `80/tcp` for each rule's public port.
    pub ports: Vec<String>,
    pub id: String,
    pub name: String,
    pub status: String,
    pub status_message: String,
    pub healthy_backends: usize,
    pub backends: usize,
}

pub fn row_of(lb: &LoadBalancer) -> LbRow {
    let (healthy, total) = backend_health(lb);
    let svc = service_of(lb);
    LbRow {
        namespace: svc.as_ref().map(|s| s.0.clone()),
        service: svc.map(|s| s.1),
        service_uid: lb.labels.get(LABEL_SERVICE_UID).cloned(),
        public_ip: lb.public_ip.as_ref().map(|p| p.address.to_string()),
        ports: lb
            .rules
            .iter()
            .map(|r| format!("{}/{}", r.public_port, r.protocol))
            .collect(),
        id: lb.id.clone(),
        name: lb.name.clone(),
        status: lb.status.to_string(),
        status_message: lb.status_message.clone(),
        healthy_backends: healthy,
        backends: total,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LbList {
    pub items: Vec<LbRow>,
}

fn paint_status(style: &Style, s: &str) -> String {
    match s {
        "active" => style.paint(s, Color::Green),
        "provisioning" | "updating" | "deleting" => style.paint(s, Color::Yellow),
        _ => style.paint(s, Color::Red),
    }
}

fn endpoint(ip: &Option<String>, ports: &[String]) -> String {
    match ip {
        None => "<pending>".into(),
        Some(ip) if ports.is_empty() => ip.clone(),
        Some(ip) => ports.iter().map(|p| format!("{ip}:{p}")).collect::<Vec<_>>().join(","),
    }
}

pub fn list_table(list: &LbList, wide: bool, style: &Style) -> String {
    if list.items.is_empty() {
        return "No load balancers found.\n".into();
    }
    let mut headers = vec!["service", "public", "lb-id", "status", "backends"];
    if wide {
        headers.extend(["lb-name", "service-uid", "message"]);
    }
    let rows: Vec<Vec<String>> = list
        .items
        .iter()
        .map(|r| {
            let mut row = vec![
                match (&r.namespace, &r.service) {
                    (Some(ns), Some(s)) => format!("{ns}/{s}"),
                    _ => "-".into(),
                },
                endpoint(&r.public_ip, &r.ports),
                r.id.clone(),
                paint_status(style, &r.status),
                format!("{}/{}", r.healthy_backends, r.backends),
            ];
            if wide {
                row.push(r.name.clone());
                row.push(r.service_uid.clone().unwrap_or_else(|| "-".into()));
                row.push(if r.status_message.is_empty() {
                    "-".into()
                } else {
                    r.status_message.clone()
                });
            }
            row
        })
        .collect();
    table(&headers, &rows)
}

/// An Event of the Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRow {
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    pub count: i32,
}

/// `kuberaya lb describe` output.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LbDescribe {
    pub namespace: String,
    pub service: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub ingress: Vec<String>,
    pub load_balancer_source_ranges: Vec<String>,
    /// `lb.cloudraya.com/*` annotations of the Service.
    pub annotations: BTreeMap<String, String>,
    pub annotation_error: Option<String>,
    pub load_balancer: Option<LoadBalancer>,
    pub healthy_backends: usize,
    pub backends: usize,
    pub conditions: Vec<String>,
    pub events: Vec<EventRow>,
    /// What is wrong, in words; empty when all is well.
    pub problems: Vec<String>,
}

/// What is wrong with a Service's load balancer.
pub fn diagnose(d: &LbDescribe) -> Vec<String> {
    let mut p = Vec::new();
    if d.type_ != "LoadBalancer" {
        p.push(format!(
            "the Service is of type {}, not LoadBalancer: no platform load balancer is made for it",
            d.type_
        ));
        return p;
    }
    if let Some(e) = &d.annotation_error {
        p.push(format!("invalid annotation: {e}"));
    }
    match &d.load_balancer {
        None => p.push(
            "no platform load balancer carries this Service's labels: the CCM has not created one yet; is it running? (see the Events below and the CCM's logs)"
                .into(),
        ),
        Some(lb) => {
            match &lb.status {
                LbStatus::Error => p.push(format!("the platform reports an error: {}", lb.status_message)),
                LbStatus::Provisioning | LbStatus::Updating => {
                    p.push(format!("the platform is still {} the load balancer", lb.status))
                }
                LbStatus::Deleting => p.push("the platform is deleting the load balancer".into()),
                _ => {}
            }
            if lb.backends.is_empty() {
                p.push("the load balancer has no backends: no Ready node is selected (check the nodes and lb.cloudraya.com/node-selector)".into());
            } else if d.healthy_backends == 0 {
                p.push("no backend is healthy: check the Service's endpoints (kubectl get endpointslices) and the health check".into());
            }
            if d.ingress.is_empty() && lb.public_ip.is_some() {
                p.push("the load balancer has a public IP but the Service's status does not show it yet: the CCM has not written it back".into());
            }
        }
    }
    for e in d.events.iter().filter(|e| e.type_ == "Warning") {
        p.push(format!("event {}: {}", e.reason, e.message));
    }
    p
}

pub fn describe_text(d: &LbDescribe, wide: bool, style: &Style) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| s.push_str(&format!("{:<18}{v}\n", format!("{k}:")));
    line("Service", format!("{}/{}", d.namespace, d.service));
    line("Type", d.type_.clone());
    line(
        "Ingress",
        if d.ingress.is_empty() {
            "<pending>".into()
        } else {
            d.ingress.join(", ")
        },
    );
    line(
        "Source ranges",
        if d.load_balancer_source_ranges.is_empty() {
            "any".into()
        } else {
            d.load_balancer_source_ranges.join(", ")
        },
    );
    match &d.load_balancer {
        None => line("Load balancer", "none".into()),
        Some(lb) => {
            line("Load balancer", format!("{} ({})", lb.id, lb.name));
            line("Status", paint_status(style, lb.status.as_str()));
            if !lb.status_message.is_empty() {
                line("Message", lb.status_message.clone());
            }
            line(
                "Public IP",
                lb.public_ip
                    .as_ref()
                    .map(|p| format!("{} ({})", p.address, p.id))
                    .unwrap_or_else(|| "<pending>".into()),
            );
            line("Backends", format!("{}/{} healthy", d.healthy_backends, d.backends));
        }
    }
    if let Some(lb) = &d.load_balancer {
        s.push_str("Rules:\n");
        let mut headers = vec![
            "name",
            "protocol",
            "public",
            "private",
            "algorithm",
            "sources",
            "health-check",
        ];
        if wide {
            headers.push("interval");
        }
        let rows: Vec<Vec<String>> = lb
            .rules
            .iter()
            .map(|r| {
                let hc = r.health_check.as_ref().map(|h| h.with_defaults(r.private_port));
                let mut row = vec![
                    r.name.clone(),
                    r.protocol.to_string(),
                    r.public_port.to_string(),
                    r.private_port.to_string(),
                    r.algorithm.to_string(),
                    if r.allowed_sources.is_empty() {
                        "any".into()
                    } else {
                        r.allowed_sources
                            .iter()
                            .map(|n| n.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    },
                    match &hc {
                        None => format!("tcp:{}", r.private_port),
                        Some(h) => format!(
                            "{}:{}{}",
                            h.protocol,
                            h.port.unwrap_or(r.private_port),
                            h.path.clone().unwrap_or_default()
                        ),
                    },
                ];
                if wide {
                    row.push(
                        hc.and_then(|h| h.interval_s)
                            .map(|i| format!("{i}s"))
                            .unwrap_or_else(|| "-".into()),
                    );
                }
                row
            })
            .collect();
        indent(&mut s, &table(&headers, &rows));
        s.push_str("Backends:\n");
        let rows: Vec<Vec<String>> = lb
            .backends
            .iter()
            .map(|b| {
                let health: Vec<String> = lb
                    .health
                    .iter()
                    .filter(|h| h.vm_id == b.vm_id)
                    .map(|h| format!("{}={}", h.rule, h.state))
                    .collect();
                vec![
                    b.vm_id.clone(),
                    b.private_ip.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                    if health.is_empty() {
                        "unknown".into()
                    } else {
                        health.join(",")
                    },
                ]
            })
            .collect();
        if rows.is_empty() {
            s.push_str("  none\n");
        } else {
            indent(&mut s, &table(&["vm", "private-ip", "health"], &rows));
        }
    }
    s.push_str("Annotations:\n");
    if d.annotations.is_empty() {
        s.push_str("  none (defaults)\n");
    }
    for (k, v) in &d.annotations {
        s.push_str(&format!("  {k}: {v}\n"));
    }
    if !d.conditions.is_empty() {
        s.push_str("Conditions:\n");
        for c in &d.conditions {
            s.push_str(&format!("  {c}\n"));
        }
    }
    s.push_str("Events:\n");
    if d.events.is_empty() {
        s.push_str("  none\n");
    } else {
        let rows: Vec<Vec<String>> = d
            .events
            .iter()
            .map(|e| {
                vec![
                    e.type_.clone(),
                    e.reason.clone(),
                    e.count.to_string(),
                    e.message.clone(),
                ]
            })
            .collect();
        indent(&mut s, &table(&["type", "reason", "count", "message"], &rows));
    }
    if d.problems.is_empty() {
        s.push_str("Problems:         none\n");
    } else {
        s.push_str("Problems:\n");
        for p in &d.problems {
            s.push_str(&format!("  - {}\n", style.paint(p, Color::Red)));
        }
    }
    s
}

fn indent(s: &mut String, t: &str) {
    for l in t.lines() {
        s.push_str("  ");
        s.push_str(l);
        s.push('\n');
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OrphanRow {
    #[serde(flatten)]
    pub lb: LbRow,
    pub retain_public_ip: bool,
}

/// What `lb orphans` shows: the orphans the CCM would delete too (the judgement is the
/// CCM library's, [`kuberaya_ccm::service::orphans::judge`]), and apart from them the LBs
/// of this cluster that nobody can judge. `--delete` deletes only the former.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OrphanList {
    pub items: Vec<OrphanRow>,
    /// Labelled with this cluster but with no Service UID: not created by the CCM.
    pub unknown: Vec<LbRow>,
}

pub fn orphans_table(list: &OrphanList, wide: bool) -> String {
    let mut out = if list.items.is_empty() {
        "No orphaned load balancers.\n".to_string()
    } else {
        let mut headers = vec!["lb-id", "public", "was-service", "status", "retain-ip"];
        if wide {
            headers.extend(["lb-name", "service-uid"]);
        }
        let rows: Vec<Vec<String>> = list
            .items
            .iter()
            .map(|o| {
                let r = &o.lb;
                let mut row = vec![
                    r.id.clone(),
                    endpoint(&r.public_ip, &r.ports),
                    match (&r.namespace, &r.service) {
                        (Some(ns), Some(s)) => format!("{ns}/{s}"),
                        _ => "-".into(),
                    },
                    r.status.clone(),
                    if o.retain_public_ip { "yes" } else { "no" }.into(),
                ];
                if wide {
                    row.push(r.name.clone());
                    row.push(r.service_uid.clone().unwrap_or_else(|| "-".into()));
                }
                row
            })
            .collect();
        table(&headers, &rows)
    };
    if !list.unknown.is_empty() {
        out.push_str(&format!(
            "\nUnknown: not created by the CCM ({} with this cluster's label but no Service UID; never deleted by --delete):\n",
            list.unknown.len()
        ));
        let rows: Vec<Vec<String>> = list
            .unknown
            .iter()
            .map(|r| {
                vec![
                    r.id.clone(),
                    endpoint(&r.public_ip, &r.ports),
                    r.name.clone(),
                    r.status.clone(),
                ]
            })
            .collect();
        out.push_str(&table(&["lb-id", "public", "lb-name", "status"], &rows));
    }
    out
}

/// The CCM's judgement of `lbs` against `services`, as rows.
pub fn orphan_list(cluster: &str, lbs: &[LoadBalancer], services: &[Service]) -> OrphanList {
    let judged = judge(cluster, lbs, services);
    let by_id = |id: &str| lbs.iter().find(|lb| lb.id == id).map(row_of);
    OrphanList {
        items: judged
            .orphans
            .iter()
            .filter_map(|o| {
                Some(OrphanRow {
                    lb: by_id(&o.id)?,
                    retain_public_ip: o.keep_public_ip == Some(true),
                })
            })
            .collect(),
        unknown: judged.unknown.iter().filter_map(|u| by_id(&u.id)).collect(),
    }
}

// ---------------------------------------------------------------------------------------
// Commands

pub async fn run(cmd: LbCommand, kube_args: &KubeArgs) -> anyhow::Result<()> {
    match cmd {
        LbCommand::List(a) => list(kube_args, a).await,
        LbCommand::Describe(a) => describe(kube_args, a).await,
        LbCommand::Orphans(a) => orphans(kube_args, a).await,
    }
}

async fn cluster_lbs(c: &Connected) -> anyhow::Result<Vec<LoadBalancer>> {
    let mut lbs = c
        .platform
        .list_load_balancers(&c.cluster, &cluster_labels(&c.cluster))
        .await
        .map_err(|e| platform_error(e, "listing load balancers"))?;
    lbs.sort_by_key(|lb| (service_of(lb), lb.id.clone()));
    Ok(lbs)
}

async fn list(kube_args: &KubeArgs, a: ListArgs) -> anyhow::Result<()> {
    let c = platform(&a.platform)?;
    let lbs = cluster_lbs(&c).await?;
    let ns = if kube_args.all_namespaces {
        None
    } else {
        kube_args.namespace.clone()
    };
    let list = LbList {
        items: lbs
            .iter()
            .map(row_of)
            .filter(|r| ns.is_none() || r.namespace == ns)
            .collect(),
    };
    let style = Style::detect();
    print!(
        "{}",
        render(a.output.output, &list, |wide| list_table(&list, wide, &style))?
    );
    Ok(())
}

/// `NS/SVC`, or `SVC` in `-n NS` (default `default`).
pub fn parse_service_ref(s: &str, namespace: Option<&str>) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        None if !s.is_empty() => Ok((namespace.unwrap_or("default").to_string(), s.to_string())),
        _ => Err(format!("{s:?} is not NS/SVC or SVC")),
    }
}

async fn describe(kube_args: &KubeArgs, a: DescribeArgs) -> anyhow::Result<()> {
    let (ns, name) = parse_service_ref(&a.service, kube_args.namespace.as_deref()).map_err(|e| anyhow!(e))?;
    let c = platform(&a.platform)?;
    let k = connect(kube_args).await?;
    let api: Api<Service> = Api::namespaced(k.client.clone(), &ns);
    let svc = match api.get(&name).await {
        Ok(s) => s,
        Err(e) if is_not_found(&e) => bail!("Service {ns}/{name} not found; see `kubectl get svc -n {ns}`"),
        Err(e) => return Err(api_error(e, &format!("reading Service {ns}/{name}"))),
    };
    let uid = svc.metadata.uid.clone().unwrap_or_default();
    let mut labels = cluster_labels(&c.cluster);
    labels.insert(LABEL_SERVICE_UID.into(), uid);
    let mut found = c
        .platform
        .list_load_balancers(&c.cluster, &labels)
        .await
        .map_err(|e| platform_error(e, "listing load balancers"))?;
    if found.is_empty() {
        let mut by_name = cluster_labels(&c.cluster);
        by_name.insert(LABEL_SERVICE_NAMESPACE.into(), ns.clone());
        by_name.insert(LABEL_SERVICE_NAME.into(), name.clone());
        found = c
            .platform
            .list_load_balancers(&c.cluster, &by_name)
            .await
            .map_err(|e| platform_error(e, "listing load balancers"))?;
    }
    let events: Api<Event> = Api::namespaced(k.client.clone(), &ns);
    let mut evs: Vec<Event> = events
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing Events"))?
        .items
        .into_iter()
        .filter(|e| {
            e.involved_object.kind.as_deref() == Some("Service") && e.involved_object.name.as_deref() == Some(&name)
        })
        .collect();
    evs.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
    let d = describe_of(&svc, found.into_iter().next(), &evs);
    let style = Style::detect();
    print!(
        "{}",
        render(a.output.output, &d, |wide| describe_text(&d, wide, &style))?
    );
    Ok(())
}

/// How often an Event was seen: an events.k8s.io/v1 Event (what the CCM's Recorder
/// writes) counts its repeats in `series.count` and leaves the deprecated `count` unset;
/// an older one counts in `count`.
fn times_seen(e: &Event) -> i32 {
    let series = e.series.as_ref().and_then(|s| s.count);
    series.max(e.count).unwrap_or(1).max(1)
}

/// Put together what `describe` shows (pure).
pub fn describe_of(svc: &Service, lb: Option<LoadBalancer>, events: &[Event]) -> LbDescribe {
    let spec = svc.spec.clone().unwrap_or_default();
    let annotations = svc.annotations().clone();
    let ours: BTreeMap<String, String> = annotations
        .iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let annotation_error = LbAnnotations::parse(&annotations).err().map(|e| e.to_string());
    let (healthy, total) = lb.as_ref().map(backend_health).unwrap_or((0, 0));
    let status = svc.status.clone().unwrap_or_default();
    let mut d = LbDescribe {
        namespace: svc.namespace().unwrap_or_default(),
        service: svc.name_any(),
        type_: spec.type_.unwrap_or_else(|| "ClusterIP".into()),
        ingress: status
            .load_balancer
            .and_then(|l| l.ingress)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|i| i.ip.or(i.hostname))
            .collect(),
        load_balancer_source_ranges: spec.load_balancer_source_ranges.unwrap_or_default(),
        annotations: ours,
        annotation_error,
        load_balancer: lb,
        healthy_backends: healthy,
        backends: total,
        conditions: status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
            .collect(),
        events: events
            .iter()
            .map(|e| EventRow {
                type_: e.type_.clone().unwrap_or_else(|| "Normal".into()),
                reason: e.reason.clone().unwrap_or_default(),
                message: e.message.clone().unwrap_or_default().replace('\n', " "),
                count: times_seen(e),
            })
            .collect(),
        problems: Vec::new(),
    };
    d.problems = diagnose(&d);
    d
}

async fn orphans(kube_args: &KubeArgs, a: OrphansArgs) -> anyhow::Result<()> {
    let c = platform(&a.platform)?;
    let lbs = cluster_lbs(&c).await?;
    let k = connect(kube_args).await?;
    let api: Api<Service> = Api::all(k.client.clone());
    // Listed after the LBs: an LB of a Service created in between is never an orphan.
    let services = api
        .list(&ListParams::default())
        .await
        .map_err(|e| api_error(e, "listing Services"))?
        .items;
    let list = orphan_list(&c.cluster, &lbs, &services);
    print!("{}", render(a.output.output, &list, |wide| orphans_table(&list, wide))?);
    if !a.delete || list.items.is_empty() {
        return Ok(());
    }
    for o in &list.items {
        eprintln!(
            "- load balancer {} ({}){}",
            o.lb.id,
            o.lb.public_ip.as_deref().unwrap_or("no IP"),
            if o.retain_public_ip {
                ", keeping its public IP"
            } else {
                ""
            }
        );
    }
    if !a.yes {
        if !std::io::stdin().is_terminal() {
            bail!(
                "refusing to delete {} load balancers without confirmation; pass --yes",
                list.items.len()
            );
        }
        eprint!("Delete {} load balancers? [y/N] ", list.items.len());
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing deleted");
            return Ok(());
        }
    }
    for o in &list.items {
        let keep = o.retain_public_ip.then_some(true);
        match c.platform.delete_load_balancer(&c.cluster, &o.lb.id, keep).await {
            Ok(()) | Err(PlatformError::NotFound { .. }) => eprintln!("load balancer {} deleted", o.lb.id),
            Err(e) => return Err(platform_error(e, &format!("deleting load balancer {}", o.lb.id))),
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kuberaya_ccm::platform::{Algorithm, Backend, BackendHealth, HealthCheck, LbPublicIp, Rule, RuleProtocol};

    pub(crate) fn lb(id: &str, ns: &str, name: &str, uid: &str, ip: Option<&str>) -> LoadBalancer {
        LoadBalancer {
            id: id.into(),
            name: format!("{ns}-{name}"),
            region: "jkt".into(),
            vpc_id: "vpc-1".into(),
            subnet_id: "subnet-1".into(),
            public_ip: ip.map(|a| LbPublicIp {
                id: format!("pip-{id}"),
                address: a.parse().unwrap(),
            }),
            labels: Labels::from([
                (LABEL_CLUSTER_ID.to_string(), "cl-1".to_string()),
                (LABEL_SERVICE_UID.to_string(), uid.to_string()),
                (LABEL_SERVICE_NAMESPACE.to_string(), ns.to_string()),
                (LABEL_SERVICE_NAME.to_string(), name.to_string()),
            ]),
            status: LbStatus::Active,
            status_message: String::new(),
            rules: vec![Rule {
                name: "http".into(),
                protocol: RuleProtocol::Tcp,
                public_port: 80,
                private_port: 30080,
                algorithm: Algorithm::RoundRobin,
                allowed_sources: vec![],
                health_check: Some(HealthCheck::tcp(30080)),
            }],
            backends: vec![
                Backend {
                    vm_id: "vm-1".into(),
                    private_ip: Some("127.10.0.11".parse().unwrap()),
                },
                Backend {
                    vm_id: "vm-2".into(),
                    private_ip: Some("127.10.0.12".parse().unwrap()),
                },
            ],
            health: vec![
                BackendHealth {
                    rule: "http".into(),
                    vm_id: "vm-1".into(),
                    state: HealthState::Healthy,
                },
                BackendHealth {
                    rule: "http".into(),
                    vm_id: "vm-2".into(),
                    state: HealthState::Unhealthy,
                },
            ],
            created_at: None,
            updated_at: None,
        }
    }

    #[test]
    fn health_counts_backends_healthy_for_every_rule() {
        let mut l = lb("lb-1", "shop", "web", "u1", Some("127.203.0.10"));
        assert_eq!(backend_health(&l), (1, 2));
        l.health.clear();
        assert_eq!(backend_health(&l), (0, 2), "unchecked backends are not healthy");
    }

    #[test]
    fn orphans_are_the_ccms_and_unknown_lbs_are_apart() {
        let service = |name: &str, uid: &str, type_: &str| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"namespace": "shop", "name": name, "uid": uid},
                "spec": {"type": type_, "ports": [{"port": 80}]}
            }))
            .unwrap()
        };
        let mut hand = lb("lb-4", "shop", "hand", "-", None);
        hand.labels.remove(LABEL_SERVICE_UID);
        let mut deleting = lb("lb-5", "shop", "gone-too", "u5", None);
        deleting.status = kuberaya_ccm::platform::LbStatus::Deleting;
        let lbs = vec![
            lb("lb-1", "shop", "web", "u1", None),
            lb("lb-2", "shop", "gone", "u2", None),
            // Its Service was recreated while the CCM was down: adopted by its LB name.
            LoadBalancer {
                name: "kr-shop-recreated".into(),
                ..lb("lb-3", "shop", "recreated", "u3-old", None)
            },
            hand,
            deleting,
            lb("lb-6", "shop", "internal", "u6", None),
        ];
        let live = vec![
            service("web", "u1", "LoadBalancer"),
            service("recreated", "u3-new", "LoadBalancer"),
            // Exists, but is ClusterIP now and has no finalizer: no reconcile will clean up.
            service("internal", "u6", "ClusterIP"),
        ];
        let list = orphan_list("cl-1", &lbs, &live);
        let ids: Vec<&str> = list.items.iter().map(|o| o.lb.id.as_str()).collect();
        assert_eq!(ids, ["lb-2", "lb-6"]);
        let unknown: Vec<&str> = list.unknown.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(unknown, ["lb-4"]);
        let text = orphans_table(&list, false);
        assert!(text.contains("Unknown: not created by the CCM"), "{text}");
    }

    #[test]
    fn credentials_from_env_or_say_what_is_missing() {
        let env = |k: &str| match k {
            ENV_API_URL => Some("http://127.0.0.1:9".to_string()),
            ENV_EMAIL => Some("a@b".to_string()),
            ENV_PASSWORD => Some("pw".to_string()),
            ENV_CLUSTER_ID => Some("cl-1".to_string()),
            _ => None,
        };
        let (c, cluster) = resolve_platform(None, None, env).unwrap();
        assert_eq!((c.base_url.as_str(), cluster.as_str()), ("http://127.0.0.1:9", "cl-1"));
        assert_eq!(resolve_platform(None, Some("cl-9"), env).unwrap().1, "cl-9");
        let e = resolve_platform(None, None, |_| None).unwrap_err();
        assert!(e.contains("--cloud-config") && e.contains(ENV_API_URL), "{e}");
    }

    #[test]
    fn service_refs() {
        assert_eq!(parse_service_ref("a/b", None).unwrap(), ("a".into(), "b".into()));
        assert_eq!(parse_service_ref("b", Some("x")).unwrap(), ("x".into(), "b".into()));
        assert!(parse_service_ref("a/b/c", None).is_err());
        assert!(parse_service_ref("/b", None).is_err());
    }

    #[test]
    fn events_count_their_series_or_their_deprecated_count() {
        use k8s_openapi::api::core::v1::EventSeries;
        let event = |count: Option<i32>, series: Option<i32>| Event {
            count,
            series: series.map(|n| EventSeries {
                count: Some(n),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut svc = Service::default();
        svc.metadata.name = Some("web".into());
        let events = [
            event(None, Some(3)),
            event(Some(4), None),
            event(None, None),
            event(Some(0), None),
        ];
        let d = describe_of(&svc, None, &events);
        let counts: Vec<i32> = d.events.iter().map(|e| e.count).collect();
        assert_eq!(counts, [3, 4, 1, 1]);
    }

    #[test]
    fn diagnosis_names_the_problem() {
        let mut svc = Service::default();
        svc.metadata.name = Some("web".into());
        svc.metadata.namespace = Some("shop".into());
        svc.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
            type_: Some("LoadBalancer".into()),
            ..Default::default()
        });
        let d = describe_of(&svc, None, &[]);
        assert!(d.problems[0].contains("CCM has not created"), "{:?}", d.problems);
        let mut l = lb("lb-1", "shop", "web", "u1", Some("127.203.0.10"));
        l.status = LbStatus::Error;
        l.status_message = "no capacity".into();
        l.health.clear();
        let d = describe_of(&svc, Some(l), &[]);
        assert!(d.problems.iter().any(|p| p.contains("no capacity")));
        assert!(d.problems.iter().any(|p| p.contains("no backend is healthy")));
        assert!(d.problems.iter().any(|p| p.contains("not written it back")));
        svc.metadata.annotations = Some([("lb.cloudraya.com/algorithm".to_string(), "fastest".to_string())].into());
        let d = describe_of(&svc, None, &[]);
        assert!(
            d.problems.iter().any(|p| p.starts_with("invalid annotation")),
            "{:?}",
            d.problems
        );
    }
}

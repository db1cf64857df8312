//! The gateway's facts on its own Service: `kuberaya peer add` (cli/src/gateway.rs) reads
//! the public key, the tunnel address and the cluster domain from annotations of the
//! gateway's `LoadBalancer` Service. On start, in Kubernetes mode, the gateway
//! merge-patches them there when they differ, retrying while the API server does not
//! answer or the Service does not exist yet. It never stops the gateway: when RBAC forbids
//! the patch it logs the `kubectl annotate` an operator can run instead.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use crate::keys::PublicKey;

/// On the gateway Service: its WireGuard public key (base64).
pub const ANNOTATION_PUBLIC_KEY: &str = "vpn.cloudraya.com/public-key";
/// On the gateway Service: its tunnel address with the range's prefix, `100.64.0.1/16`.
pub const ANNOTATION_TUNNEL_ADDRESS: &str = "vpn.cloudraya.com/tunnel-address";
/// On the gateway Service: its IPv6 tunnel address with the range's prefix,
/// `fd6b:7261:7961::1/64` (what `kuberaya peer add` puts in `DNS =` and `AllowedIPs`).
pub const ANNOTATION_TUNNEL_ADDRESS_V6: &str = "vpn.cloudraya.com/tunnel-address-v6";
/// On the gateway Service: the cluster DNS domain the gateway answers for.
pub const ANNOTATION_CLUSTER_DOMAIN: &str = "vpn.cloudraya.com/cluster-domain";
/// The default name of the gateway's Service (deploy/gateway/base/service.yaml).
pub const DEFAULT_SERVICE: &str = "kuberaya-gateway";
/// The field manager of the patch.
const MANAGER: &str = "kuberaya-gateway";
/// The first and the largest delay between attempts.
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);
/// A missing Service is warned about at this attempt (about 8 s after the start).
const NO_SERVICE_WARN: u32 = 6;

/// What the gateway publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Facts {
    pub public_key: PublicKey,
    /// The gateway's tunnel address and the range's prefix: `100.64.0.1/16`.
    pub tunnel_address: String,
    /// The IPv6 one, `fd6b:7261:7961::1/64`; not published when `None`.
    pub tunnel_address_v6: Option<String>,
    pub cluster_domain: String,
}

impl Facts {
    /// The annotations, in a stable order.
    pub fn annotations(&self) -> BTreeMap<String, String> {
        let mut a = BTreeMap::from([
            (ANNOTATION_PUBLIC_KEY.to_string(), self.public_key.to_base64()),
            (ANNOTATION_TUNNEL_ADDRESS.to_string(), self.tunnel_address.clone()),
            (ANNOTATION_CLUSTER_DOMAIN.to_string(), self.cluster_domain.clone()),
        ]);
        if let Some(v6) = &self.tunnel_address_v6 {
            a.insert(ANNOTATION_TUNNEL_ADDRESS_V6.to_string(), v6.clone());
        }
        a
    }
}

/// The merge patch that brings `current` (the Service's annotations) to `want`: only the
/// annotations that differ, so others' annotations are left alone; `None` when nothing
/// differs (no write at all).
pub fn patch_for(
    current: Option<&BTreeMap<String, String>>,
    want: &BTreeMap<String, String>,
) -> Option<serde_json::Value> {
    let differing: serde_json::Map<String, serde_json::Value> = want
        .iter()
        .filter(|(k, v)| current.and_then(|c| c.get(*k)) != Some(*v))
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    if differing.is_empty() {
        return None;
    }
    Some(serde_json::json!({ "metadata": { "annotations": differing } }))
}

/// The command an operator runs when the gateway may not patch its Service.
pub fn kubectl_fallback(namespace: &str, service: &str, want: &BTreeMap<String, String>) -> String {
    let mut cmd = format!("kubectl -n {namespace} annotate service {service} --overwrite");
    for (k, v) in want {
        cmd.push_str(&format!(" {k}={v}"));
    }
    cmd
}

/// What became of one attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    /// The annotations were already right.
    Unchanged,
    /// These annotations were written.
    Patched(Vec<String>),
}

/// What to do after a failed attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum Failure {
    /// RBAC forbids it (403): the operator can annotate by hand; retried rarely, in case
    /// the Role is fixed.
    Forbidden,
    /// The Service does not exist yet (404): it may be applied after the gateway.
    NoService,
    /// The API server did not answer, or answered something else: retried.
    Other,
}

impl Failure {
    pub fn of(e: &kube::Error) -> Failure {
        match e {
            kube::Error::Api(s) if s.code == 403 => Failure::Forbidden,
            kube::Error::Api(s) if s.code == 404 => Failure::NoService,
            _ => Failure::Other,
        }
    }
}

/// Delays between attempts: doubling from `RETRY_MIN` to `RETRY_MAX` with up to 20%
/// jitter; a forbidden attempt waits the longest (only a Role change can fix it).
#[derive(Clone, Debug)]
pub struct Retry {
    next: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { next: RETRY_MIN }
    }
}

impl Retry {
    pub fn after(&mut self, f: &Failure) -> Duration {
        let base = match f {
            Failure::Forbidden => RETRY_MAX,
            _ => self.next,
        };
        self.next = (self.next * 2).min(RETRY_MAX);
        base.mul_f64(1.0 - 0.2 * rand::random::<f64>())
    }
}

/// One attempt: read the Service, patch what differs.
pub async fn publish_once(
    api: &Api<Service>,
    service: &str,
    want: &BTreeMap<String, String>,
) -> kube::Result<Published> {
    let svc = api.get(service).await?;
    let Some(patch) = patch_for(svc.metadata.annotations.as_ref(), want) else {
        return Ok(Published::Unchanged);
    };
    let keys = patch["metadata"]["annotations"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let params = PatchParams {
        field_manager: Some(MANAGER.to_string()),
        ..Default::default()
    };
    api.patch(service, &params, &Patch::Merge(&patch)).await?;
    Ok(Published::Patched(keys))
}

/// Publish `facts` on `namespace/service` until it is done, once this replica leads;
/// failures are logged (each kind once at warning level) and retried.
pub async fn publish(
    client: Client,
    namespace: String,
    service: String,
    facts: Facts,
    mut leading: tokio::sync::watch::Receiver<bool>,
) {
    // One writer among replicas: the Lease holder.
    if !crate::leader::until_leading(&mut leading).await {
        return;
    }
    let api: Api<Service> = Api::namespaced(client, &namespace);
    let want = facts.annotations();
    let mut retry = Retry::default();
    let mut warned: Vec<Failure> = Vec::new();
    let mut attempts = 0u32;
    let at = format!("{namespace}/{service}");
    loop {
        attempts += 1;
        match publish_once(&api, &service, &want).await {
            Ok(Published::Unchanged) => {
                tracing::info!(service = %at, "the gateway Service's annotations are up to date");
                return;
            }
            Ok(Published::Patched(keys)) => {
                tracing::info!(service = %at, annotations = %keys.join(","), "published the gateway's public key on its Service");
                return;
            }
            Err(e) => {
                let failure = Failure::of(&e);
                // `kuberaya sandbox up` applies the Service right after starting the
                // gateway: a missing Service is worth a warning only once it stays missing.
                let first =
                    !warned.contains(&failure) && (failure != Failure::NoService || attempts >= NO_SERVICE_WARN);
                let delay = retry.after(&failure);
                match (&failure, first) {
                    (Failure::Forbidden, true) => tracing::warn!(
                        service = %at,
                        error = %e,
                        fallback = %kubectl_fallback(&namespace, &service, &want),
                        "may not annotate the gateway Service (RBAC: services get/patch); `kuberaya peer add` needs these annotations: run the fallback command"
                    ),
                    (Failure::NoService, true) => tracing::warn!(
                        service = %at,
                        "the gateway Service does not exist; its annotations are written once it does (is --publish-key-to-service its name?)"
                    ),
                    (Failure::Other, true) => {
                        tracing::warn!(service = %at, error = %e, "annotating the gateway Service; retrying")
                    }
                    _ => tracing::debug!(service = %at, error = %e, ?delay, "annotating the gateway Service; retrying"),
                }
                if first {
                    warned.push(failure);
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            public_key: PublicKey([7; 32]),
            tunnel_address: "100.64.0.1/16".into(),
            tunnel_address_v6: None,
            cluster_domain: "cluster.local".into(),
        }
    }

    #[test]
    fn the_ipv6_tunnel_address_is_published_beside_the_ipv4_one() {
        let f = Facts {
            tunnel_address_v6: Some("fd6b:7261:7961::1/64".into()),
            ..facts()
        };
        let want = f.annotations();
        assert_eq!(want[ANNOTATION_TUNNEL_ADDRESS_V6], "fd6b:7261:7961::1/64");
        assert_eq!(want.len(), 4);
        // A Service annotated by a gateway without IPv6: only the new one is written.
        let current = facts().annotations();
        assert_eq!(
            patch_for(Some(&current), &want),
            Some(
                serde_json::json!({"metadata": {"annotations": {ANNOTATION_TUNNEL_ADDRESS_V6: "fd6b:7261:7961::1/64"}}})
            )
        );
    }

    #[test]
    fn patches_only_what_differs() {
        let want = facts().annotations();
        let key = PublicKey([7; 32]).to_base64();
        // No annotations at all: all three.
        assert_eq!(
            patch_for(None, &want),
            Some(serde_json::json!({"metadata": {"annotations": {
                ANNOTATION_PUBLIC_KEY: key,
                ANNOTATION_TUNNEL_ADDRESS: "100.64.0.1/16",
                ANNOTATION_CLUSTER_DOMAIN: "cluster.local",
            }}}))
        );
        // Already right, with someone else's annotation beside: no write.
        let mut current = want.clone();
        current.insert("example.com/owner".into(), "ops".into());
        assert_eq!(patch_for(Some(&current), &want), None);
        // A wrong key (a Service edited by hand, or a key Secret replaced): only the key,
        // and nothing removed.
        current.insert(ANNOTATION_PUBLIC_KEY.into(), PublicKey([8; 32]).to_base64());
        assert_eq!(
            patch_for(Some(&current), &want),
            Some(serde_json::json!({"metadata": {"annotations": {ANNOTATION_PUBLIC_KEY: key}}}))
        );
        // The manifest's static tunnel address of another range is corrected too.
        let mut current = want.clone();
        current.insert(ANNOTATION_TUNNEL_ADDRESS.into(), "100.64.0.1".into());
        assert_eq!(
            patch_for(Some(&current), &want),
            Some(serde_json::json!({"metadata": {"annotations": {ANNOTATION_TUNNEL_ADDRESS: "100.64.0.1/16"}}}))
        );
    }

    #[test]
    fn the_fallback_is_a_complete_kubectl_command() {
        let want = facts().annotations();
        let cmd = kubectl_fallback("kuberaya-system", "kuberaya-gateway", &want);
        assert_eq!(
            cmd,
            format!(
                "kubectl -n kuberaya-system annotate service kuberaya-gateway --overwrite \
                 vpn.cloudraya.com/cluster-domain=cluster.local \
                 vpn.cloudraya.com/public-key={} vpn.cloudraya.com/tunnel-address=100.64.0.1/16",
                PublicKey([7; 32]).to_base64()
            )
        );
    }

    #[test]
    fn failures_are_classified_and_retried_with_backoff() {
        let api = |code: u16| kube::Error::Api(kube::core::Status::failure("x", "X").with_code(code).boxed());
        assert_eq!(Failure::of(&api(403)), Failure::Forbidden);
        assert_eq!(Failure::of(&api(404)), Failure::NoService);
        assert_eq!(Failure::of(&api(503)), Failure::Other);
        let down = kube::Error::Service(Box::new(std::io::Error::other("connection refused")));
        assert_eq!(Failure::of(&down), Failure::Other);

        let mut r = Retry::default();
        let d: Vec<Duration> = (0..10).map(|_| r.after(&Failure::Other)).collect();
        assert!(d[0] <= RETRY_MIN && d[0] >= RETRY_MIN.mul_f64(0.8), "{d:?}");
        assert!(d.windows(2).take(5).all(|w| w[1] > w[0]), "doubling: {d:?}");
        assert!(
            d.iter().all(|x| *x <= RETRY_MAX) && d[9] >= RETRY_MAX.mul_f64(0.8),
            "{d:?}"
        );
        // Forbidden: only a Role change helps; no hammering.
        assert!(Retry::default().after(&Failure::Forbidden) >= RETRY_MAX.mul_f64(0.8));
    }
}

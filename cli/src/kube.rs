//! Connecting to the cluster the kubectl way (`--kubeconfig`, `--context`, `-n`, `-A`), and
//! turning Kubernetes API errors into one line that says what to do next.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::anyhow;
use clap::Args;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The flags every command that talks to the cluster takes.
#[derive(Debug, Clone, Default, Args)]
pub struct KubeArgs {
    /// The kubeconfig file [default: $KUBECONFIG, else ~/.kube/config].
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use [default: its current context].
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace to act on.
    #[arg(short = 'n', long, global = true, value_name = "NS")]
    pub namespace: Option<String>,
    /// Every namespace (read commands).
    #[arg(short = 'A', long, global = true)]
    pub all_namespaces: bool,
}

/// Which namespaces a read command covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    All,
    One(String),
}

impl Scope {
    /// `-A` wins, then `-n`, then `default`.
    pub fn from_args(args: &KubeArgs, default: &str) -> Scope {
        if args.all_namespaces {
            Scope::All
        } else {
            Scope::One(args.namespace.clone().unwrap_or_else(|| default.to_string()))
        }
    }

    pub fn contains(&self, ns: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::One(n) => n == ns,
        }
    }
}

/// A connected client.
#[derive(Clone)]
pub struct Kube {
    pub client: Client,
    /// The server's URL, for messages.
    pub server: String,
}

/// How long to wait for the API server to answer the first call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Load the kubeconfig, build a client and check that the API server answers.
pub async fn connect(args: &KubeArgs) -> anyhow::Result<Kube> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        cluster: None,
        user: None,
    };
    let mut config = match &args.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| {
                anyhow!(
                    "cannot read the kubeconfig {}: {e}; pass an existing file to --kubeconfig",
                    path.display()
                )
            })?;
            Config::from_custom_kubeconfig(kc, &options).await
        }
        None => Config::from_kubeconfig(&options).await,
    }
    .map_err(|e| {
        anyhow!("cannot load the kubeconfig: {e}; pass --kubeconfig FILE (and --context NAME) or set KUBECONFIG")
    })?;
    config.connect_timeout = Some(CONNECT_TIMEOUT);
    config.read_timeout = Some(Duration::from_secs(30));
    let server = config.cluster_url.to_string();
    let client = Client::try_from(config).map_err(|e| anyhow!("cannot build a client for {server}: {e}"))?;
    let unreachable = |detail: String| {
        anyhow!(
            "cannot reach the cluster at {server}: {detail}; check --kubeconfig/--context (for the sandbox: `kuberaya sandbox status`)"
        )
    };
    match tokio::time::timeout(CONNECT_TIMEOUT * 2, client.apiserver_version()).await {
        Err(_) => return Err(unreachable("no answer".into())),
        Ok(Err(e)) => return Err(unreachable(one_line(&e))),
        Ok(Ok(_)) => {}
    }
    Ok(Kube { client, server })
}

/// An error's whole chain on one line.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s.replace('\n', " ")
}

/// `what` failed with `e`: a one-line message with a hint for the usual causes.
pub fn api_error(e: kube::Error, what: &str) -> anyhow::Error {
    match &e {
        kube::Error::Api(s) if s.code == 404 && s.message.contains("the server could not find") => anyhow!(
            "{what}: the VpnPeer CRD is not installed; apply deploy/crds/vpnpeer.yaml (kubectl apply -f deploy/crds/vpnpeer.yaml)"
        ),
        kube::Error::Api(s) if s.is_not_found() => anyhow!("{what}: not found ({})", s.message),
        kube::Error::Api(s) if s.is_forbidden() => {
            anyhow!(
                "{what}: forbidden ({}); ask for RBAC access or use another --context",
                s.message
            )
        }
        kube::Error::Api(s) if s.is_already_exists() => {
            anyhow!("{what}: already exists; pick another name or remove the old one first")
        }
        _ => anyhow!("{what}: {}", one_line(&e)),
    }
}

/// Whether `e` is a 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.is_not_found())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_prefers_all_then_namespace_then_default() {
        let mut a = KubeArgs::default();
        assert_eq!(
            Scope::from_args(&a, "kuberaya-system"),
            Scope::One("kuberaya-system".into())
        );
        a.namespace = Some("team-a".into());
        assert_eq!(Scope::from_args(&a, "x"), Scope::One("team-a".into()));
        a.all_namespaces = true;
        assert_eq!(Scope::from_args(&a, "x"), Scope::All);
        assert!(Scope::All.contains("anything"));
        assert!(!Scope::One("a".into()).contains("b"));
    }

    #[test]
    fn api_errors_say_what_to_do() {
        let status = |code: u16, reason: &str| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                reason: reason.into(),
                message: "m".into(),
                ..Default::default()
            }))
        };
        let e = api_error(status(403, "Forbidden"), "listing peers").to_string();
        assert!(e.contains("RBAC"), "{e}");
        let e = api_error(status(409, "AlreadyExists"), "creating peer a/b").to_string();
        assert!(e.contains("already exists"), "{e}");
        let e = api_error(status(404, "NotFound"), "reading x").to_string();
        assert!(e.contains("not found"), "{e}");
        assert!(is_not_found(&status(404, "NotFound")));
    }
}

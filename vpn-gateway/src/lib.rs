//! KubeRaya WireGuard gateway: operators reach private `ClusterIP` services, by DNS name,
//! within their peer's rules.
//!
//! Module map:
//! - [`crd`]: the `VpnPeer` and `VpnAccessPolicy` custom resources (spec, status, CRD
//!   generation).
//! - [`keys`]: WireGuard keys in base64, with redacting `Debug`.
//! - [`peers`]: validation of peer inputs into accepted peers or rejection reasons, and
//!   tunnel address allocation.
//! - [`catalog`]: the Services the gateway knows, by name and by ClusterIP.
//! - [`policy`]: access policies: which peers each selects, the effective rules of every
//!   peer (its own plus its policies'), policy status.
//! - [`access`]: whether a peer may reach a Service port now, and why (`kuberaya access
//!   explain`), composing validation, policies and the ACL.
//! - [`acl`]: allow rules compiled against the Service catalog into a fast lookup; the
//!   decision for each packet.
//! - [`packet`]: zero-copy IPv4/IPv6 header parsing of decrypted packets.
//! - [`dns`]: the gateway's DNS answers (cluster Services, per-peer policy).
//! - [`tunnel`]: one boringtun `Tunn` per peer ([`tunnel::PeerTunnel`]) and the
//!   [`tunnel::PeerTable`] routing datagrams to them. No sockets inside.
//! - [`handshake`]: the worker thread that does the handshake initiations' X25519 work,
//!   off the data path, fed by a bounded queue.
//! - [`budget`]: the share of a core handshakes may take before initiations get cookie
//!   replies, whatever `--handshake-limit` says.
//! - [`dataplane`]: what happens to decrypted, checked packets ([`dataplane::DataPlane`]);
//!   the userspace implementation terminates flows in smoltcp.
//! - [`source`]: where peers and Services come from (Kubernetes watchers or static files).
//! - [`gateway`]: the UDP socket loop tying it together; `udp_batch` holds its batched
//!   `sendmmsg`/`recvmmsg` system calls.
//! - [`audit`]: a per-peer budget of audit lines for denied flows.
//! - [`metrics`], [`http`]: Prometheus metrics, `/metrics`, `/healthz`, `/readyz`.
//! - [`uapi`]: the standard WireGuard UAPI socket, read-only, so `wg show` works.
//! - [`publish`]: the gateway's public key and tunnel address on its own Service.
//! - [`manifests`]: the CRD, Namespace and ConfigMap of `deploy/`, for installers.
//! - [`run`]: the whole gateway in-process ([`run::start`], [`run::run`]); the binary
//!   and `kuberaya sandbox up` use it.

pub mod access;
pub mod acl;
pub mod audit;
pub mod budget;
pub mod catalog;
pub mod crd;
pub mod dataplane;
pub mod dns;
pub mod gateway;
pub mod handshake;
pub mod http;
pub mod keys;
pub mod leader;
pub mod manifests;
pub mod metrics;
pub mod packet;
pub mod peers;
pub mod policy;
pub mod publish;
pub mod run;
pub use kuberaya_serving as secure_http;
pub mod source;
pub mod transport;
pub mod tunnel;
pub mod uapi;
mod udp_batch;

/// The crate-wide error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid key: {0}")]
    InvalidKey(#[from] keys::KeyError),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("kubernetes API: {0}")]
    Kube(#[source] Box<kube::Error>),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Net {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the secure metrics server: {0}")]
    Secure(#[from] secure_http::Error),
}

impl From<kube::Error> for Error {
    fn from(e: kube::Error) -> Self {
        Error::Kube(Box::new(e))
    }
}

impl Error {
    /// A short lowercase label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidKey(_) => "invalid_key",
            Error::Io { .. } => "io",
            Error::Json { .. } => "json",
            Error::Kube(_) => "kube",
            Error::Config(_) => "config",
            Error::Net { .. } => "net",
            Error::Secure(_) => "secure",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

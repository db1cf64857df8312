//! Kubernetes API server stand-in: the real REST API over HTTPS for the resources our
//! controllers and `kubectl` use, with the semantics they depend on.
//!
//! Layout: `store` (objects, resourceVersions, write semantics, watch history) is pure and
//! synchronous; `hooks`, `schema`, `patch`, `fields`, `selectors` are the per-kind and
//! per-format rules it applies; `http` maps requests onto it; `discovery` and `table`
//! render the read-only documents; `tls` and `persist` deal with the state dir.

mod discovery;
mod faults;
mod fields;
mod hooks;
mod http;
mod omitempty;
mod patch;
mod persist;
mod proto;
mod rbac;
mod registry;
mod schema;
mod selectors;
pub mod service_ips;
mod status;
mod store;
mod table;
mod tls;
pub(crate) mod util;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub use service_ips::ServiceCidrs;
pub use status::ApiError;
use store::Store;

/// How many changes watches can resume from; older resourceVersions get 410 Gone.
const HISTORY: usize = 10_000;
const STATE_FILE: &str = "kube-state.json";
/// Changes since the last snapshot, one line per write to the state dir.
const JOURNAL_FILE: &str = "kube-state.journal";
/// How often pending changes are appended to the journal: a crash loses at most this
/// much (plus one write in progress); a clean stop loses nothing.
const PERSIST_EVERY: Duration = Duration::from_millis(100);
/// The journal is folded into a new snapshot once it is larger than this and than the
/// last snapshot.
const COMPACT_AT: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("state dir: {0}")]
    Io(#[from] std::io::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error("state file {path}: {message}")]
    State { path: PathBuf, message: String },
}

/// Configuration of the stand-in.
#[derive(Clone, Debug)]
pub struct KubeApiConfig {
    /// Where certificates, the admin token and the objects are kept.
    pub state_dir: PathBuf,
    /// Service ClusterIP ranges, primary first (the sandbox default is `127.96.0.0/16`;
    /// dual-stack adds `fd00:96::/112`).
    pub service_cidrs: ServiceCidrs,
    /// HTTPS (the default); plain HTTP only when false.
    pub tls: bool,
    /// The admin bearer token; generated and kept in the state dir when None.
    pub admin_token: Option<String>,
}

impl KubeApiConfig {
    /// HTTPS, `127.96.0.0/16`, a generated token.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        KubeApiConfig {
            state_dir: state_dir.into(),
            service_cidrs: "127.96.0.0/16".parse().expect("valid default range"),
            tls: true,
            admin_token: None,
        }
    }
}

/// The API server stand-in.
pub struct KubeApi {
    config: KubeApiConfig,
    store: Mutex<Store>,
    admin_token: String,
    pki: Option<tls::Pki>,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Ends open watches at shutdown.
    stop: tokio::sync::watch::Sender<bool>,
    /// How often watches with `allowWatchBookmarks` get a BOOKMARK.
    bookmark_every: Duration,
    /// The state dir's writer; its lock serializes writes, so they land in order.
    writer: Mutex<Writer>,
    /// Injected faults and request counts (`/_sandbox/`).
    faults: faults::Faults,
}

/// The journal, the number of its last entry and the size of the last snapshot.
struct Writer {
    journal: persist::Journal,
    seq: u64,
    snapshot_len: u64,
}

impl KubeApi {
    /// Opens (or creates) the state in `config.state_dir`.
    pub async fn open(config: KubeApiConfig) -> Result<Arc<Self>, Error> {
        std::fs::create_dir_all(&config.state_dir)?;
        let admin_token = match &config.admin_token {
            Some(t) => t.clone(),
            None => {
                let p = config.state_dir.join("admin-token");
                match std::fs::read_to_string(&p) {
                    Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
                    _ => {
                        let t = util::random_token();
                        persist::write_atomic(&p, t.as_bytes())?;
                        restrict(&p);
                        t
                    }
                }
            }
        };
        let (pki, tls) = if config.tls {
            let pki = tls::load_or_create(&config.state_dir, config.service_cidrs.first_address())?;
            let cfg = tls::server_config(&pki)?;
            (Some(pki), Some(cfg))
        } else {
            (None, None)
        };
        let mut store = Store::new(config.service_cidrs.clone(), HISTORY);
        let state_path = config.state_dir.join(STATE_FILE);
        let journal_path = config.state_dir.join(JOURNAL_FILE);
        let snapshot = std::fs::read(&state_path).ok();
        // Complete journal lines after the snapshot; a line that does not parse was cut
        // by a crash while being written, so it and anything after it never were acknowledged.
        let entries: Vec<store::JournalEntry> = persist::Journal::read(&journal_path)?
            .iter()
            .map_while(|l| serde_json::from_slice(l).ok())
            .collect();
        let restored_seq = match (&snapshot, entries.is_empty()) {
            (None, true) => Ok(0),
            // Nothing to replay: the snapshot as it is (replaying would only re-encode it).
            (Some(data), true) => store.restore(data),
            (_, false) => {
                store::replay(snapshot.as_deref().unwrap_or_default(), &entries).and_then(|data| store.restore(&data))
            }
        }
        .map_err(|message| Error::State {
            path: state_path.clone(),
            message,
        })?;
        let seq = entries.last().map_or(restored_seq, |e| e.seq.max(restored_seq));
        store.bootstrap();
        let journal = persist::Journal::open(&journal_path)?;
        // A snapshot with an empty journal that bootstrapping left as it was is already
        // what the snapshot below would write.
        let snapshot_len = match &snapshot {
            Some(data) if entries.is_empty() && journal.len == 0 && !store.dirty => Some(data.len() as u64),
            _ => None,
        };
        let (stop, _) = tokio::sync::watch::channel(false);
        let api = Arc::new(KubeApi {
            config,
            store: Mutex::new(store),
            admin_token,
            pki,
            tls,
            stop,
            bookmark_every: Duration::from_secs(15),
            writer: Mutex::new(Writer {
                journal,
                seq,
                snapshot_len: snapshot_len.unwrap_or(0),
            }),
            faults: faults::Faults::default(),
        });
        // One snapshot with everything, and an empty journal (also cuts a torn line).
        if snapshot_len.is_none() {
            api.write_snapshot()?;
        }
        let weak = Arc::downgrade(&api);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PERSIST_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(api) = weak.upgrade() else { break };
                if !api.lock().dirty {
                    continue;
                }
                match tokio::task::spawn_blocking(move || api.flush()).await {
                    Ok(Err(e)) => tracing::warn!(error = %e, "persisting the kube state failed"),
                    Err(e) => tracing::warn!(error = %e, "the kube state writer panicked"),
                    Ok(Ok(())) => {}
                }
            }
        });
        Ok(api)
    }

    /// The axum router serving the whole API.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        http::router(self.clone())
    }

    /// The admin bearer token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The CA certificate (PEM) clients must trust, when serving HTTPS.
    pub fn ca_pem(&self) -> Option<&str> {
        self.pki.as_ref().map(|p| p.ca_pem.as_str())
    }

    /// Writes a kubeconfig for `kubectl` (mode 0600) with the CA, server URL, admin
    /// token and one context named `context_name`.
    pub fn write_kubeconfig(&self, path: &Path, server_url: &str, context_name: &str) -> Result<(), Error> {
        use base64::Engine;
        let ca = match self.ca_pem() {
            Some(pem) => format!(
                "    certificate-authority-data: {}\n",
                base64::engine::general_purpose::STANDARD.encode(pem.as_bytes())
            ),
            None => String::new(),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: {ctx}\n  cluster:\n    server: {server_url}\n{ca}users:\n- name: {ctx}-admin\n  user:\n    token: {token}\ncontexts:\n- name: {ctx}\n  context:\n    cluster: {ctx}\n    user: {ctx}-admin\n    namespace: default\ncurrent-context: {ctx}\n",
            ctx = yaml_quote(context_name),
            token = self.admin_token,
        );
        persist::write_atomic(path, text.as_bytes())?;
        restrict(path);
        Ok(())
    }

    /// Forgets the watch history, as an etcd compaction does: open watches end with
    /// `410 Gone` and resuming from any earlier resourceVersion is refused.
    pub fn compact_history(&self) {
        self.lock().compact();
    }

    /// Breaks every open watch's connection (no ERROR event, no clean end), as a dying
    /// server or load balancer does; returns how many were open.
    pub fn cut_watches(&self) -> usize {
        self.faults.cut_watches()
    }

    /// The newest resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Writes the changes since the last write to the state dir now: the objects written
    /// since, appended to the journal (O(changes)); a new snapshot once the journal has
    /// grown past the snapshot's size.
    pub fn flush(&self) -> Result<(), Error> {
        let mut w = self.writer();
        if w.journal.len > COMPACT_AT.max(w.snapshot_len) {
            drop(w);
            return self.write_snapshot();
        }
        let seq = w.seq + 1;
        let Some(entry) = self.lock().take_changes(seq) else {
            return Ok(());
        };
        let line = serde_json::to_vec(&entry).map_err(|e| Error::State {
            path: w.journal.path().to_path_buf(),
            message: e.to_string(),
        })?;
        if let Err(e) = w.journal.append(&line) {
            // The changes taken are in no file now: the next write is a whole snapshot.
            w.snapshot_len = 0;
            w.journal.len = u64::MAX;
            return Err(e.into());
        }
        w.seq = seq;
        Ok(())
    }

    /// Writes the whole state as a new snapshot and empties the journal.
    fn write_snapshot(&self) -> Result<(), Error> {
        let mut w = self.writer();
        let all = self.lock().take_all(w.seq);
        let path = self.config.state_dir.join(STATE_FILE);
        let data = serde_json::to_vec(&all).map_err(|e| Error::State {
            path: path.clone(),
            message: e.to_string(),
        })?;
        drop(all);
        if let Err(e) = persist::write_atomic(&path, &data) {
            // Taken but not written: try again with a whole snapshot.
            self.lock().dirty = true;
            w.journal.len = u64::MAX;
            return Err(e.into());
        }
        w.snapshot_len = data.len() as u64;
        // Entries up to `seq` are in the snapshot; a crash before this clear replays none.
        w.journal.clear()?;
        Ok(())
    }

    fn writer(&self) -> MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn yaml_quote(s: &str) -> String {
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) && !s.is_empty() {
        s.to_string()
    } else {
        serde_json::Value::String(s.to_string()).to_string()
    }
}

#[cfg(unix)]
fn restrict(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict(_: &Path) {}

/// Serves `api` on `listener` (HTTPS when configured) until `shutdown` completes, then
/// ends open watches and writes the state.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<KubeApi>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // A KubeApi may be served again after an earlier serve() stopped.
    api.stop.send_replace(false);
    if let Ok(addr) = listener.local_addr() {
        api.lock().advertise_apiserver(addr);
    }
    let router = api.router();
    let acceptor = api.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let mut stop_rx = api.stop.subscribe();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (tcp, _) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let router = router.clone();
                let acceptor = acceptor.clone();
                let stop = api.stop.subscribe();
                tokio::spawn(async move {
                    match acceptor {
                        Some(acc) => {
                            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(10), acc.accept(tcp)).await {
                                serve_conn(tls, router, stop).await;
                            }
                        }
                        None => serve_conn(tcp, router, stop).await,
                    }
                });
            }
        }
    }
    let _ = api.stop.send(true);
    let _ = stop_rx.changed().await;
    api.write_snapshot().map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(())
}

async fn serve_conn<I>(io: I, router: axum::Router, mut stop: tokio::sync::watch::Receiver<bool>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper_util::service::TowerToHyperService::new(router);
    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let conn = builder.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn open(dir: &Path) -> Arc<KubeApi> {
        let mut config = KubeApiConfig::new(dir);
        config.tls = false;
        config.admin_token = Some("t".into());
        KubeApi::open(config).await.expect("open")
    }

    /// Creates a ConfigMap and journals it, then drops the server without its shutdown
    /// snapshot, as a crash would.
    async fn create_and_crash(api: Arc<KubeApi>, name: &str) {
        {
            let mut store = api.lock();
            let cm = store.find("", "v1", "configmaps").cloned().expect("configmaps");
            let opts = store::WriteOpts {
                manager: "test".into(),
                ..Default::default()
            };
            store
                .create(&cm, Some("default"), json!({"metadata": {"name": name}}), &opts)
                .expect("create");
        }
        api.flush().expect("journalled");
    }

    /// A restart with nothing to replay keeps the snapshot as it is (no rewrite), and
    /// what is journalled after it is numbered after what the snapshot holds, so that a
    /// crash loses none of it.
    #[tokio::test]
    async fn a_quiet_restart_keeps_the_snapshot_and_journals_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        create_and_crash(open(&state).await, "a").await;
        // Replays "a" (journal entry 1) and writes a snapshot holding it.
        drop(open(&state).await);
        let snapshot = std::fs::read(state.join(STATE_FILE)).unwrap();
        let written = std::fs::metadata(state.join(STATE_FILE)).unwrap().modified().unwrap();
        // Nothing to replay: the snapshot is kept, byte for byte and unwritten.
        let api = open(&state).await;
        assert_eq!(std::fs::read(state.join(STATE_FILE)).unwrap(), snapshot);
        assert_eq!(
            std::fs::metadata(state.join(STATE_FILE)).unwrap().modified().unwrap(),
            written
        );
        create_and_crash(api, "b").await;
        let api = open(&state).await;
        let store = api.lock();
        let cm = store.find("", "v1", "configmaps").cloned().unwrap();
        for name in ["a", "b"] {
            assert!(store.get(&cm, "default", name).is_ok(), "{name} lost");
        }
    }
}

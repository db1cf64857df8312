//! The state directory of a sandbox and what says whether one runs there: the lock
//! (`sandbox.lock`, held with an exclusive `flock` by the running `sandbox up`), the
//! runtime file (`sandbox.json`, how to reach it) and the platform credentials made once
//! per state dir (`credentials.json`, 0600).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::StateDirArg;

/// How to reach a running sandbox (`sandbox.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Runtime {
    pub pid: u32,
    pub platform_url: String,
    pub email: String,
    pub password: String,
    pub cluster_id: String,
    pub started_at_unix: u64,
    /// The sandbox cluster's kubeconfig.
    #[serde(default)]
    pub kubeconfig: Option<PathBuf>,
    /// IPv4 only, or dual-stack (IPv6 ranges with local routes on lo).
    #[serde(default)]
    pub ip_family: super::IpFamily,
    /// The WireGuard gateway's replicas (none with `--no-gateway`).
    #[serde(default)]
    pub gateway_replicas: Vec<GatewayReplica>,
}

/// A gateway replica as `sandbox status` finds it: where it listens and serves metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayReplica {
    pub name: String,
    pub udp: std::net::SocketAddr,
    pub metrics: std::net::SocketAddr,
    pub health: std::net::SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Credentials {
    pub email: String,
    pub password: String,
}

pub(super) const RUNTIME_FILE: &str = "sandbox.json";
const LOCK_FILE: &str = "sandbox.lock";
const CREDENTIALS_FILE: &str = "credentials.json";
pub(super) const LOG_FILE: &str = "sandbox.log";
pub(super) const KUBECONFIG_FILE: &str = "kubeconfig";
const SANDBOX_EMAIL: &str = "admin@sandbox.local";

pub fn default_state_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("kuberaya/sandbox"));
    }
    let home = std::env::var_os("HOME")
        .filter(|d| !d.is_empty())
        .context("neither XDG_STATE_HOME nor HOME is set; pass --state-dir")?;
    Ok(PathBuf::from(home).join(".local/state/kuberaya/sandbox"))
}

pub(super) fn state_dir(arg: &StateDirArg) -> anyhow::Result<PathBuf> {
    match &arg.state_dir {
        Some(dir) => Ok(dir.clone()),
        None => default_state_dir(),
    }
}

/// An exclusive, non-blocking lock (`flock`) on `sandbox.lock`: `Ok(None)` when another
/// process holds it. Held until the file is dropped.
pub(super) fn try_lock(dir: &Path) -> anyhow::Result<Option<File>> {
    let path = dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("cannot lock {}", path.display())),
    }
}

/// The error for a second `sandbox up` on a state directory in use.
pub(super) fn already_running(dir: &Path) -> anyhow::Error {
    let pid = read_runtime(dir)
        .ok()
        .flatten()
        .map(|rt| rt.pid.to_string())
        .unwrap_or_else(|| "?".into());
    anyhow::anyhow!(
        "a sandbox is already running in {} (pid {pid}); see `kuberaya sandbox status`, or stop it with `kuberaya sandbox down`",
        dir.display()
    )
}

pub(super) fn is_running(dir: &Path) -> anyhow::Result<bool> {
    if !dir.join(LOCK_FILE).exists() {
        return Ok(false);
    }
    Ok(try_lock(dir)?.is_none())
}

pub(super) fn read_runtime(dir: &Path) -> anyhow::Result<Option<Runtime>> {
    let path = dir.join(RUNTIME_FILE);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid", path.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Write `contents` to `path` with mode 0600, atomically (temp file + rename).
pub(super) fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

pub(super) fn load_or_make_credentials(dir: &Path) -> anyhow::Result<Credentials> {
    let path = dir.join(CREDENTIALS_FILE);
    if let Ok(bytes) = fs::read(&path) {
        return serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not valid; delete it to make new credentials", path.display()));
    }
    let password: String = {
        let bytes: [u8; 18] = rand::random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let creds = Credentials {
        email: SANDBOX_EMAIL.to_string(),
        password,
    };
    write_private(&path, &serde_json::to_vec_pretty(&creds)?)?;
    Ok(creds)
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether `pid` is a live process (a zombie, exited but not yet reaped, is not).
pub(super) fn process_alive(pid: libc::pid_t) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')),
        // SAFETY: signal 0 only checks that the process exists.
        Err(_) => unsafe { libc::kill(pid, 0) == 0 },
    }
}

pub(super) fn running_runtime(dir: &Path) -> anyhow::Result<Option<Runtime>> {
    if !dir.exists() || !is_running(dir)? {
        return Ok(None);
    }
    read_runtime(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = try_lock(dir.path()).unwrap();
        assert!(first.is_some());
        assert!(is_running(dir.path()).unwrap(), "a held lock means running");
        drop(first);
        assert!(!is_running(dir.path()).unwrap());
    }

    #[test]
    fn the_runtime_file_records_the_ip_family_and_old_ones_read_as_ipv4() {
        let old = r#"{"pid": 1, "platform_url": "http://127.0.0.1:1", "email": "e", "password": "p",
            "cluster_id": "cl", "started_at_unix": 0}"#;
        let rt: Runtime = serde_json::from_str(old).unwrap();
        assert_eq!(rt.ip_family, super::super::IpFamily::Ipv4);
        let mut dual = rt.clone();
        dual.ip_family = super::super::IpFamily::Dual;
        let text = serde_json::to_string(&dual).unwrap();
        assert!(text.contains(r#""ip_family":"dual""#), "{text}");
        let back: Runtime = serde_json::from_str(&text).unwrap();
        assert_eq!(back.ip_family, super::super::IpFamily::Dual);
    }

    #[test]
    fn credentials_are_private_and_stable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_make_credentials(dir.path()).unwrap();
        let b = load_or_make_credentials(dir.path()).unwrap();
        assert_eq!(a.password, b.password);
        assert_eq!(a.password.len(), 36);
        let mode = fs::metadata(dir.path().join(CREDENTIALS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

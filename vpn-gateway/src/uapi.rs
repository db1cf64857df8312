//! The standard WireGuard cross-platform userspace API (<https://www.wireguard.com/xplatform/>)
//! on a unix socket, so that the stock `wg show <iface>` (and `wg show <iface> dump`) works
//! against the gateway as it does against wireguard-go.
//!
//! Read-only: `get=1` answers the device and its peers; `set=1` is refused with EPERM,
//! because peers come from `VpnPeer` resources (or the static files), not from `wg set`.
//!
//! The sign of `errno=` follows what `wg` and wireguard-go do rather than the prose of the
//! page: `wg` reads a `set` answer's errno as a negated errno (wireguard-go writes
//! `errno=-22`), and a `get` answer's as a positive one. So `set` is answered `errno=-1`
//! (`wg set` prints "Operation not permitted") and a failed `get` `errno=5` (EIO). Like wireguard-go, `get` includes the private key (`wg` derives the
//! interface's public key from it); the socket is created mode 0600, so only the gateway's
//! own user can read it.
//!
//! The socket task never touches the peer table: it asks the gateway loop for a
//! [`DeviceState`] over a channel ([`StateRequest`]) and formats the answer itself.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use crate::keys::{PresharedKey, PublicKey};

/// Where `wg` looks for userspace implementations' sockets.
pub const DEFAULT_DIR: &str = "/var/run/wireguard";
/// Refuses `set=1` (sent negated, see the module documentation).
pub const EPERM: i32 = 1;
/// Refuses an operation other than `get` and `set` (sent negated, as wireguard-go does).
pub const EINVAL: i32 = 22;
/// Answers a `get` when the gateway loop did not produce the state in time.
pub const EIO: i32 = 5;
/// The longest request line we read (a `set` line is at most a key and a hex value).
const MAX_LINE: u64 = 4096;
/// Lines of a `set` request read before it is refused all the same.
const MAX_SET_LINES: usize = 100_000;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the gateway loop may take to answer a `get`.
const STATE_TIMEOUT: Duration = Duration::from_secs(2);

/// A `get` waiting for the gateway loop's answer.
pub type StateRequest = oneshot::Sender<DeviceState>;

/// The device as `get=1` reports it.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceState {
    pub private_key: [u8; 32],
    pub listen_port: u16,
    pub peers: Vec<PeerState>,
}

impl std::fmt::Debug for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceState")
            .field("private_key", &"<redacted>")
            .field("listen_port", &self.listen_port)
            .field("peers", &self.peers)
            .finish()
    }
}

/// One peer as `get=1` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub public_key: PublicKey,
    pub preshared_key: Option<PresharedKey>,
    /// Where its last authenticated datagram came from; none before its first handshake.
    pub endpoint: Option<SocketAddr>,
    /// What it may send from: its tunnel address.
    pub allowed_ips: Vec<IpNet>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// Seconds; 0 when off.
    pub persistent_keepalive: u16,
}

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UapiError {
    #[error("interface name {0:?} is not 1-15 characters of [A-Za-z0-9_=+.-]")]
    InvalidInterface(String),
    #[error("{0} is in use by a running process")]
    InUse(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The operation a client asked for (the first line of its request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Get,
    Set,
    Unknown(String),
}

impl Operation {
    pub fn parse(line: &str) -> Operation {
        match line.trim_end_matches(['\n', '\r']) {
            "get=1" => Operation::Get,
            "set=1" => Operation::Set,
            other => Operation::Unknown(other.to_string()),
        }
    }
}

fn hex(bytes: &[u8; 32]) -> String {
    let mut s = String::with_capacity(64);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The answer to `get=1`: `key=value` lines, `errno=0`, and the blank line that ends it.
pub fn format_get(state: &DeviceState) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "private_key={}", hex(&state.private_key));
    let _ = writeln!(out, "listen_port={}", state.listen_port);
    for p in &state.peers {
        let _ = writeln!(out, "public_key={}", hex(&p.public_key.0));
        let psk = p.preshared_key.as_ref().map(|k| k.0).unwrap_or([0; 32]);
        let _ = writeln!(out, "preshared_key={}", hex(&psk));
        let _ = writeln!(out, "protocol_version=1");
        if let Some(ep) = p.endpoint {
            // SocketAddr's Display brackets IPv6 addresses, as the format wants.
            let _ = writeln!(out, "endpoint={ep}");
        }
        let since_epoch = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .unwrap_or_default();
        let _ = writeln!(out, "last_handshake_time_sec={}", since_epoch.as_secs());
        let _ = writeln!(out, "last_handshake_time_nsec={}", since_epoch.subsec_nanos());
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(out, "persistent_keepalive_interval={}", p.persistent_keepalive);
        for net in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={net}");
        }
    }
    out.push_str(&errno(0));
    out
}

/// An `errno=N` answer with its terminating blank line (`n` as sent: see the module
/// documentation for the sign).
pub fn errno(n: i32) -> String {
    format!("errno={n}\n\n")
}

/// Whether `name` is a valid interface name (what `wg` and `wg-quick` accept).
pub fn valid_interface(name: &str) -> bool {
    (1..=15).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_=+.-".contains(&b))
}

/// The bound socket `<dir>/<interface>.sock`; the file is removed on drop.
#[derive(Debug)]
pub struct UapiListener {
    listener: UnixListener,
    path: PathBuf,
}

impl UapiListener {
    /// Bind `<dir>/<interface>.sock` (mode 0600), creating `dir` (mode 0755) when missing.
    /// A stale socket nobody answers on is replaced; a live one is an error, as in
    /// wireguard-go. Must be called inside a tokio runtime.
    pub fn bind(dir: &Path, interface: &str) -> Result<UapiListener, UapiError> {
        if !valid_interface(interface) {
            return Err(UapiError::InvalidInterface(interface.to_string()));
        }
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| UapiError::Io { path, source }
        };
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io(dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io(dir))?;
        }
        let path = dir.join(format!("{interface}.sock"));
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Err(UapiError::InUse(path));
            }
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        let listener = UnixListener::bind(&path).map_err(io(&path))?;
        let bound = UapiListener { listener, path };
        std::fs::set_permissions(&bound.path, std::fs::Permissions::from_mode(0o600)).map_err(io(&bound.path))?;
        Ok(bound)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answer clients until the task is dropped; each `get` asks `states` for the device.
    pub async fn serve(self, states: mpsc::Sender<StateRequest>) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let states = states.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, states).await {
                            tracing::debug!(error = %e, "uapi connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "uapi accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for UapiListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Read one line (at most [`MAX_LINE`] bytes) within the request timeout; `None` at EOF.
async fn read_line(reader: &mut BufReader<UnixStream>) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    let n = tokio::time::timeout(REQUEST_TIMEOUT, (&mut *reader).take(MAX_LINE).read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??;
    Ok((n > 0).then_some(line))
}

/// Serve one connection: requests one after the other until the client closes.
async fn handle(stream: UnixStream, states: mpsc::Sender<StateRequest>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let Some(first) = read_line(&mut reader).await? else {
            return Ok(());
        };
        if first == "\n" {
            continue;
        }
        match Operation::parse(&first) {
            Operation::Get => {
                // The request ends with a blank line.
                while let Some(l) = read_line(&mut reader).await? {
                    if l == "\n" {
                        break;
                    }
                }
                let answer = match request_state(&states).await {
                    Some(state) => format_get(&state),
                    None => errno(EIO),
                };
                reader.get_mut().write_all(answer.as_bytes()).await?;
            }
            Operation::Set => {
                let mut lines = 0;
                while let Some(l) = read_line(&mut reader).await? {
                    lines += 1;
                    if l == "\n" || lines >= MAX_SET_LINES {
                        break;
                    }
                }
                tracing::warn!(
                    lines,
                    "uapi set refused (EPERM): peers come from VpnPeer resources, not from `wg set`"
                );
                reader.get_mut().write_all(errno(-EPERM).as_bytes()).await?;
            }
            Operation::Unknown(op) => {
                tracing::warn!(operation = %op, "uapi: unknown operation refused (EINVAL)");
                reader.get_mut().write_all(errno(-EINVAL).as_bytes()).await?;
                return Ok(());
            }
        }
    }
}

async fn request_state(states: &mpsc::Sender<StateRequest>) -> Option<DeviceState> {
    let (tx, rx) = oneshot::channel();
    tokio::time::timeout(STATE_TIMEOUT, async {
        states.send(tx).await.ok()?;
        rx.await.ok()
    })
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> [u8; 32] {
        [b; 32]
    }

    fn peer() -> PeerState {
        PeerState {
            public_key: PublicKey(key(0xab)),
            preshared_key: None,
            endpoint: Some("192.0.2.2:51820".parse().unwrap()),
            allowed_ips: vec!["100.64.0.2/32".parse().unwrap()],
            last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)),
            rx_bytes: 1234,
            tx_bytes: 5678,
            persistent_keepalive: 0,
        }
    }

    #[test]
    fn get_answer_has_the_xplatform_shape() {
        let state = DeviceState {
            private_key: key(0x01),
            listen_port: 51820,
            peers: vec![peer()],
        };
        let text = format_get(&state);
        let expected = format!(
            "private_key={}\nlisten_port=51820\npublic_key={}\npreshared_key={}\nprotocol_version=1\n\
             endpoint=192.0.2.2:51820\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=123456789\n\
             tx_bytes=5678\nrx_bytes=1234\npersistent_keepalive_interval=0\nallowed_ip=100.64.0.2/32\nerrno=0\n\n",
            "01".repeat(32),
            "ab".repeat(32),
            "00".repeat(32),
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn peer_before_its_first_handshake_has_no_endpoint_and_zero_time() {
        let mut p = peer();
        p.endpoint = None;
        p.last_handshake = None;
        p.preshared_key = Some(PresharedKey(key(0x7f)));
        let text = format_get(&DeviceState {
            private_key: key(2),
            listen_port: 1,
            peers: vec![p],
        });
        assert!(!text.contains("endpoint="));
        assert!(text.contains("last_handshake_time_sec=0\nlast_handshake_time_nsec=0\n"));
        assert!(text.contains(&format!("preshared_key={}\n", "7f".repeat(32))));
    }

    #[test]
    fn ipv6_endpoints_are_bracketed_and_every_line_is_key_equals_value() {
        let mut p = peer();
        p.endpoint = Some("[2001:db8::1]:4242".parse().unwrap());
        p.allowed_ips.push("fd00::2/128".parse().unwrap());
        let text = format_get(&DeviceState {
            private_key: key(3),
            listen_port: 2,
            peers: vec![p.clone(), p],
        });
        assert!(text.contains("endpoint=[2001:db8::1]:4242\n"));
        assert!(text.contains("allowed_ip=fd00::2/128\n"));
        assert_eq!(text.matches("public_key=").count(), 2);
        let body = text.strip_suffix("\n\n").expect("ends with a blank line");
        assert!(body.ends_with("errno=0"));
        for line in body.lines() {
            let (k, v) = line.split_once('=').expect("key=value");
            assert!(!k.is_empty() && !v.is_empty(), "{line}");
        }
    }

    #[test]
    fn empty_device_and_errno_answers() {
        let text = format_get(&DeviceState {
            private_key: key(0),
            listen_port: 0,
            peers: vec![],
        });
        assert_eq!(
            text,
            format!("private_key={}\nlisten_port=0\nerrno=0\n\n", "00".repeat(32))
        );
        assert_eq!(errno(-EPERM), "errno=-1\n\n");
        assert_eq!(errno(EIO), "errno=5\n\n");
    }

    #[test]
    fn operations_and_interface_names() {
        assert_eq!(Operation::parse("get=1\n"), Operation::Get);
        assert_eq!(Operation::parse("set=1\n"), Operation::Set);
        assert_eq!(Operation::parse("get=2\n"), Operation::Unknown("get=2".into()));
        assert!(valid_interface("wg0"));
        assert!(valid_interface("kr-gw.1_a+b=c"));
        assert!(!valid_interface(""));
        assert!(!valid_interface("sixteen-chars-xx"));
        assert!(!valid_interface("../etc"));
        assert!(!valid_interface("a b"));
    }

    #[test]
    fn debug_redacts_the_private_key() {
        let s = format!(
            "{:?}",
            DeviceState {
                private_key: key(0xcd),
                listen_port: 1,
                peers: vec![],
            }
        );
        assert!(s.contains("redacted"));
        assert!(!s.contains("205"), "{s}");
    }

    /// A client speaking the protocol over a real socket; the "gateway loop" is a task.
    #[tokio::test]
    async fn socket_answers_get_refuses_set_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let listener = UapiListener::bind(dir.path(), "kr-test").unwrap();
        let path = listener.path().to_path_buf();
        assert_eq!(path, dir.path().join("kr-test.sock"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A second instance on the same socket is refused while the first is alive.
        assert!(matches!(
            UapiListener::bind(dir.path(), "kr-test"),
            Err(UapiError::InUse(_))
        ));

        let (tx, mut rx) = mpsc::channel::<StateRequest>(4);
        tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                let _ = reply.send(DeviceState {
                    private_key: key(9),
                    listen_port: 4242,
                    peers: vec![peer()],
                });
            }
        });
        let server = tokio::spawn(listener.serve(tx));

        let ask = |req: &'static str| {
            let path = path.clone();
            async move {
                let mut s = UnixStream::connect(&path).await.unwrap();
                s.write_all(req.as_bytes()).await.unwrap();
                let mut out = String::new();
                let mut r = BufReader::new(s);
                loop {
                    let mut l = String::new();
                    if r.read_line(&mut l).await.unwrap() == 0 || l == "\n" {
                        break;
                    }
                    out.push_str(&l);
                }
                out
            }
        };
        let got = tokio::time::timeout(Duration::from_secs(5), ask("get=1\n\n"))
            .await
            .unwrap();
        assert!(got.starts_with(&format!("private_key={}\nlisten_port=4242\n", "09".repeat(32))));
        assert!(got.ends_with("errno=0\n"));
        let set = tokio::time::timeout(Duration::from_secs(5), ask("set=1\nlisten_port=1\n\n"))
            .await
            .unwrap();
        assert_eq!(set, "errno=-1\n");
        let bad = tokio::time::timeout(Duration::from_secs(5), ask("frobnicate=1\n\n"))
            .await
            .unwrap();
        assert_eq!(bad, "errno=-22\n");

        server.abort();
        let _ = server.await;
        assert!(!path.exists(), "the socket file is removed with the listener");
        // A stale socket file (nobody listening) is replaced.
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale);
        assert!(path.exists());
        let again = UapiListener::bind(dir.path(), "kr-test").unwrap();
        assert!(again.path().exists());
    }

    #[tokio::test]
    async fn get_without_a_gateway_loop_answers_eio() {
        let (tx, rx) = mpsc::channel::<StateRequest>(1);
        drop(rx);
        assert_eq!(request_state(&tx).await, None);
    }
}

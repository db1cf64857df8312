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
//! Which request a line belongs to and what each request is answered is [`Session`]'s
//! decision, pure (lines in, [`Step`]s out; the caller owns the device state), so that it
//! is unit-tested and fuzzed (`fuzz/fuzz_targets/gateway_uapi.rs`) without a socket.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
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
/// The most bytes one read of a request line takes (a `set` line is at most a key and a
/// hex value); a longer line arrives in pieces of this size (see [`Session::line`]).
pub const MAX_LINE: usize = 4096;
/// Lines (or pieces of a long line) of a `set` request read before it is refused all the
/// same.
pub const MAX_SET_LINES: usize = 100_000;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the gateway loop may take to answer a `get`.
const STATE_TIMEOUT: Duration = Duration::from_secs(2);

/// A `get` waiting for the gateway loop's answer.
pub type StateRequest = oneshot::Sender<DeviceState>;

/// The device as `get=1` reports it.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceState {
    /// Wiped from memory when the answer drops.
    pub private_key: zeroize::Zeroizing<[u8; 32]>,
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

/// Where a connection is in its stream of requests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests: the next line names an operation.
    #[default]
    Idle,
    /// In a `get` request, until its blank line.
    Get,
    /// In a `set` request, until its blank line; `lines` read so far.
    Set { lines: usize },
}

/// One connection's requests, fed line by line: which request a line belongs to and when
/// a request is to be answered. Requests follow one another on a connection, each ended
/// by a blank line (or the end of the stream); an unknown operation ends the connection.
#[derive(Debug, Default)]
pub struct Session {
    phase: Phase,
    /// The last piece did not end with a newline: the next one continues its line.
    mid_line: bool,
}

/// What to do after a line ([`Session::line`]) or the end of the stream ([`Session::end`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to answer yet: read on.
    Read,
    /// A `get` request ended: answer it with the device state.
    Get,
    /// A `set` request ended (its blank line, the end of the stream, or [`MAX_SET_LINES`]
    /// lines): refused with EPERM, since peers come from `VpnPeer` resources.
    RefuseSet { lines: usize },
    /// Not an operation we know: refused with EINVAL, then the connection is closed.
    RefuseUnknown(String),
}

impl Step {
    /// The text to send for this step; `state` is the device for a [`Step::Get`] (`None`:
    /// the gateway loop did not give it, answered EIO). `None` for [`Step::Read`].
    pub fn answer(&self, state: Option<&DeviceState>) -> Option<String> {
        match self {
            Step::Read => None,
            Step::Get => Some(state.map_or_else(|| errno(EIO), format_get)),
            Step::RefuseSet { .. } => Some(errno(-EPERM)),
            Step::RefuseUnknown(_) => Some(errno(-EINVAL)),
        }
    }

    /// Whether the connection ends after this step's answer.
    pub fn closes(&self) -> bool {
        matches!(self, Step::RefuseUnknown(_))
    }
}

impl Session {
    /// Takes one piece of the request stream as one bounded read returns it: a line with
    /// its `\n`, or the first [`MAX_LINE`] bytes of a longer one (whose rest comes in the
    /// next pieces and is never taken for a line of its own: a blank line, or an
    /// operation). Bytes that are not UTF-8 are no operation; inside a request they are
    /// read past like any other line.
    pub fn line(&mut self, piece: &[u8]) -> Step {
        let continues = std::mem::replace(&mut self.mid_line, !piece.ends_with(b"\n"));
        let blank = piece == b"\n" && !continues;
        match self.phase {
            Phase::Idle if blank || continues => Step::Read,
            Phase::Idle => match Operation::parse(&String::from_utf8_lossy(piece)) {
                Operation::Get => {
                    self.phase = Phase::Get;
                    Step::Read
                }
                Operation::Set => {
                    self.phase = Phase::Set { lines: 0 };
                    Step::Read
                }
                Operation::Unknown(op) => Step::RefuseUnknown(op),
            },
            Phase::Get if blank => {
                self.phase = Phase::Idle;
                Step::Get
            }
            Phase::Get => Step::Read,
            Phase::Set { lines } => {
                let lines = lines + 1;
                if blank || lines >= MAX_SET_LINES {
                    self.phase = Phase::Idle;
                    Step::RefuseSet { lines }
                } else {
                    self.phase = Phase::Set { lines };
                    Step::Read
                }
            }
        }
    }

    /// The stream ended: a request its blank line did not end is answered all the same.
    pub fn end(&mut self) -> Step {
        match std::mem::take(&mut self.phase) {
            Phase::Idle => Step::Read,
            Phase::Get => Step::Get,
            Phase::Set { lines } => Step::RefuseSet { lines },
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

/// Read one piece of a line (at most [`MAX_LINE`] bytes, with its `\n` when it has one)
/// within the request timeout; `None` at EOF.
async fn read_piece<S: AsyncRead + Unpin>(reader: &mut BufReader<S>) -> std::io::Result<Option<Vec<u8>>> {
    let mut piece = Vec::new();
    let n = tokio::time::timeout(
        REQUEST_TIMEOUT,
        (&mut *reader).take(MAX_LINE as u64).read_until(b'\n', &mut piece),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request timed out"))??;
    Ok((n > 0).then_some(piece))
}

/// Serve one connection: requests one after the other until the client closes.
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    states: mpsc::Sender<StateRequest>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut session = Session::default();
    loop {
        let piece = read_piece(&mut reader).await?;
        let step = match &piece {
            Some(p) => session.line(p),
            None => session.end(),
        };
        let state = match step {
            Step::Get => request_state(&states).await,
            _ => None,
        };
        match &step {
            Step::RefuseSet { lines } => tracing::warn!(
                lines,
                "uapi set refused (EPERM): peers come from VpnPeer resources, not from `wg set`"
            ),
            Step::RefuseUnknown(op) => tracing::warn!(operation = %op, "uapi: unknown operation refused (EINVAL)"),
            Step::Read | Step::Get => {}
        }
        if let Some(answer) = step.answer(state.as_ref()) {
            reader.get_mut().write_all(answer.as_bytes()).await?;
        }
        if piece.is_none() || step.closes() {
            return Ok(());
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
    use tokio::net::UnixStream;

    /// Feeds `stream` to a new session as the socket task reads it (pieces of at most
    /// MAX_LINE bytes, then the end) and returns every step that is not `Read`.
    fn steps(stream: &[u8]) -> Vec<Step> {
        let mut session = Session::default();
        let mut out = Vec::new();
        let mut rest = stream;
        while !rest.is_empty() {
            let window = &rest[..rest.len().min(MAX_LINE)];
            let n = window.iter().position(|&b| b == b'\n').map_or(window.len(), |i| i + 1);
            let step = session.line(&rest[..n]);
            rest = &rest[n..];
            let closes = step.closes();
            if step != Step::Read {
                out.push(step);
            }
            if closes {
                return out;
            }
        }
        out.push(session.end());
        out.retain(|s| *s != Step::Read);
        out
    }

    #[test]
    fn requests_follow_one_another_each_ended_by_its_blank_line() {
        let set = format!(
            "set=1\nprivate_key={k}\npublic_key={k}\nget=1\nallowed_ip=10.0.0.0/8\n\n",
            k = "ab".repeat(32)
        );
        let stream = format!("get=1\n\n\n{set}get=1\n\n");
        assert_eq!(
            steps(stream.as_bytes()),
            [Step::Get, Step::RefuseSet { lines: 5 }, Step::Get],
            "a get=1 line inside a set is part of the set"
        );
        // What the stream does not end is answered at its end.
        assert_eq!(steps(b"get=1\n"), [Step::Get]);
        assert_eq!(steps(b"set=1\nlisten_port=1\n"), [Step::RefuseSet { lines: 1 }]);
        assert_eq!(steps(b""), []);
        // An unknown operation closes the connection: nothing after it is read.
        assert_eq!(steps(b"get=2\n\nget=1\n\n"), [Step::RefuseUnknown("get=2".into())]);
        assert_eq!(
            steps(b"\xff\xfeget=1\n\n"),
            [Step::RefuseUnknown("\u{fffd}\u{fffd}get=1".into())]
        );
        // Bytes that are not UTF-8 inside a request are read past.
        assert_eq!(
            steps(b"set=1\nkey=\xff\n\nget=1\n\n"),
            [Step::RefuseSet { lines: 2 }, Step::Get]
        );
    }

    #[test]
    fn the_rest_of_a_long_line_is_never_a_line_of_its_own() {
        // A line of exactly MAX_LINE bytes before its newline: the newline comes alone in
        // the next read, and is not the blank line that ends the request, so the line
        // after it is still in the get.
        let mut stream = b"get=1\n".to_vec();
        stream.extend(std::iter::repeat_n(b'x', MAX_LINE));
        stream.extend_from_slice(b"\nset=1\n\n");
        assert_eq!(steps(&stream), [Step::Get]);
    }

    #[test]
    fn a_set_ends_after_max_set_lines() {
        let mut session = Session::default();
        assert_eq!(session.line(b"set=1\n"), Step::Read);
        for _ in 1..MAX_SET_LINES {
            assert_eq!(session.line(b"listen_port=1\n"), Step::Read);
        }
        // The last line it reads is the start of a long one: its rest, although it reads
        // like an operation, is no request.
        assert_eq!(
            session.line(&[b'x'; MAX_LINE]),
            Step::RefuseSet { lines: MAX_SET_LINES }
        );
        assert_eq!(session.line(b"get=1\n"), Step::Read);
        assert_eq!(session.line(b"\n"), Step::Read);
        assert_eq!(session.line(b"get=1\n"), Step::Read);
        assert_eq!(session.line(b"\n"), Step::Get);
        assert_eq!(session.end(), Step::Read);
    }

    #[test]
    fn answers_of_each_step() {
        let state = DeviceState {
            private_key: key(1).into(),
            listen_port: 7,
            peers: vec![peer()],
        };
        assert_eq!(Step::Read.answer(Some(&state)), None);
        assert_eq!(Step::Get.answer(Some(&state)), Some(format_get(&state)));
        assert_eq!(Step::Get.answer(None).as_deref(), Some("errno=5\n\n"));
        assert_eq!(
            Step::RefuseSet { lines: 3 }.answer(Some(&state)).as_deref(),
            Some("errno=-1\n\n")
        );
        let unknown = Step::RefuseUnknown("x".into());
        assert_eq!(unknown.answer(None).as_deref(), Some("errno=-22\n\n"));
        assert!(unknown.closes() && !Step::Get.closes() && !Step::RefuseSet { lines: 0 }.closes());
    }

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
            private_key: key(0x01).into(),
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
            private_key: key(2).into(),
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
            private_key: key(3).into(),
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
            private_key: key(0).into(),
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
                private_key: key(0xcd).into(),
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
                    private_key: key(9).into(),
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

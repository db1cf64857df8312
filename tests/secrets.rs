//! Issue 13, "Secrets": private keys and platform credentials never appear in logs,
//! Kubernetes Events, metrics or error messages; files holding them are 0600; the gateway
//! runs as a non-root user in userspace mode.
//!
//! - `no_secret_in_the_sandboxs_logs_events_or_cli_errors_and_secret_files_are_private`:
//!   a sandbox (its own CCM and gateway), a LoadBalancer Service, `kuberaya peer add
//!   --psk`, `peer list`, `lb list`, `lb describe`, a peer connected with `onetun`, and
//!   failures (a wrong platform password, a wrong cluster token). Every secret (the
//!   platform password, the wrong password tried, any platform token, the API server's
//!   admin token and TLS key, the gateway's private key, the peer's private and preshared
//!   keys; raw and base64) is searched in `sandbox.log`, every Event, VpnPeer, Service,
//!   ConfigMap and Lease, and every CLI output and error. Every file under the sandbox's
//!   state dir and the user's work dir that holds one must be 0600 (this found the API
//!   stand-in's journal of objects, Secrets included, at 0644).
//! - `the_ccm_binary_logs_and_metrics_hold_no_credentials`: `kuberaya-ccm` at debug level
//!   provisions an LB; another one runs with a wrong password; their output, `/metrics`,
//!   Events and Services hold no credential.
//! - `gateway_runs_as_nobody_in_userspace_mode_and_serves_a_peer`: the gateway binary
//!   under `setpriv --reuid=65534 --regid=65534 --clear-groups` (no capabilities) serves
//!   an `onetun` peer (with a preshared key); its `/metrics` and output hold no key.
//! - `userspace_manifests_run_as_non_root`: `deploy/` runs the gateway (userspace, the
//!   base) and the CCM as non-root without privilege escalation or capabilities; only the
//!   TUN overlay's container runs as root, with NET_ADMIN alone.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use kuberaya_e2e::ccm::Ccm;
use kuberaya_e2e::cloud::CloudSandbox;
use kuberaya_e2e::cluster::{Cluster, deployment, lb_service};
use kuberaya_e2e::gateway::{self, Gateway, StaticFiles};
use kuberaya_e2e::probe::{curl, dig};
use kuberaya_e2e::sandbox::{Ranges, WgPeer, conf_value, free_port, gateway_keypair, output_text};
use kuberaya_e2e::{Process, b64, b64_decode, binary, poll_until_blocking, unique_net_index};

/// The header of every platform token (the stand-in's JWTs, `{"alg":"HS256","typ":"JWT"}`):
/// any token in a text is a leak, whichever it is.
const JWT_HEADER: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.";

/// The secrets of a run, by name, each with the forms it may leak in.
#[derive(Default)]
struct Secrets(BTreeMap<String, Vec<String>>);

impl Secrets {
    /// `value` itself and its base64 (how a Secret's `data` holds it).
    fn add(&mut self, name: &str, value: &str) {
        let value = value.trim();
        assert!(value.len() >= 16, "secret {name} is too short to search for: {value:?}");
        self.0
            .insert(name.to_string(), vec![value.to_string(), b64(value.as_bytes())]);
    }

    /// The secrets found in `text` (with the platform token header).
    fn found_in(&self, text: &str) -> Vec<String> {
        let mut found: Vec<String> = self
            .0
            .iter()
            .filter(|(_, forms)| forms.iter().any(|f| text.contains(f.as_str())))
            .map(|(n, _)| n.clone())
            .collect();
        if text.contains(JWT_HEADER) {
            found.push("a platform token".into());
        }
        found
    }

    fn found_in_bytes(&self, bytes: &[u8]) -> Vec<String> {
        self.found_in(&String::from_utf8_lossy(bytes))
    }
}

/// Texts to search: (where it came from, the text).
#[derive(Default)]
struct Texts(Vec<(String, String)>);

impl Texts {
    fn add(&mut self, origin: impl Into<String>, text: impl Into<String>) {
        self.0.push((origin.into(), text.into()));
    }
    fn add_output(&mut self, origin: &str, out: &Output) {
        self.add(format!("{origin} (stdout)"), String::from_utf8_lossy(&out.stdout));
        self.add(format!("{origin} (stderr)"), String::from_utf8_lossy(&out.stderr));
    }
    /// Every (origin, secret) found, and a line of what was searched.
    fn leaks(&self, secrets: &Secrets) -> (Vec<String>, String) {
        let mut leaks = Vec::new();
        for (origin, text) in &self.0 {
            for s in secrets.found_in(text) {
                leaks.push(format!("{s} in {origin}"));
            }
        }
        let searched = self
            .0
            .iter()
            .map(|(o, t)| format!("{o}: {} lines", t.lines().count()))
            .collect::<Vec<_>>()
            .join(", ");
        (leaks, searched)
    }
}

/// Every regular file under `dir` (not following links).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(t) = e.file_type() else { continue };
        if t.is_dir() {
            files_under(&e.path(), out);
        } else if t.is_file() {
            out.push(e.path());
        }
    }
}

/// Files under `dirs` holding a secret whose mode lets anyone but the owner read them,
/// and how many files hold one.
fn exposed_secret_files(dirs: &[&Path], secrets: &Secrets) -> (Vec<String>, Vec<String>) {
    let mut files = Vec::new();
    for d in dirs {
        files_under(d, &mut files);
    }
    let (mut exposed, mut holding) = (Vec::new(), Vec::new());
    for f in files {
        let Ok(bytes) = std::fs::read(&f) else { continue };
        let found = secrets.found_in_bytes(&bytes);
        if found.is_empty() {
            continue;
        }
        let mode = std::fs::metadata(&f)
            .map(|m| m.permissions().mode() & 0o777)
            .unwrap_or(0);
        holding.push(format!("{} ({mode:o})", f.display()));
        if mode & 0o077 != 0 {
            exposed.push(format!("{} is {mode:o} and holds {found:?}", f.display()));
        }
    }
    (exposed, holding)
}

fn run(cmd: &mut Command) -> Result<Output> {
    cmd.output().with_context(|| format!("running {cmd:?}"))
}

#[test]
fn no_secret_in_the_sandboxs_logs_events_or_cli_errors_and_secret_files_are_private() -> Result<()> {
    let n = unique_net_index();
    // The sandbox's own CCM and gateway (in-process, logging to sandbox.log).
    let sb = CloudSandbox::up(&Ranges::standard(n), &["--nodes", "1"], 1)?;
    let state = sb.state().to_path_buf();
    let work = sb.sandbox.dir.path().join("work");
    std::fs::create_dir_all(&work)?;
    let mut texts = Texts::default();
    let kuberaya = |args: &[&str], env: &[(&str, &str)]| -> Result<Output> {
        let mut cmd = Command::new(binary("kuberaya"));
        cmd.args(args).env("KUBECONFIG", sb.kubeconfig()).current_dir(&work);
        for (k, v) in env {
            cmd.env(k, v);
        }
        run(&mut cmd)
    };
    let platform_env = [
        ("CLOUDRAYA_API_URL", sb.url.as_str()),
        ("CLOUDRAYA_EMAIL", sb.email.as_str()),
        ("CLOUDRAYA_PASSWORD", sb.password.as_str()),
        ("KUBERAYA_CLUSTER_ID", sb.cluster_id.as_str()),
    ];

    // A LoadBalancer Service the CCM provisions (its platform calls carry a token).
    sb.apply(&deployment("web", 1, false))?;
    sb.apply(&lb_service("web", "web", &[], ""))?;
    let ip = sb.wait_ingress("web", "60s")?;
    eprintln!("web has {ip}");

    // The CLI: a peer with a preshared key, lists, and failures.
    let add = kuberaya(
        &[
            "peer",
            "add",
            "-n",
            "default",
            "alice",
            "--allow",
            "default/web",
            "--psk",
            "--out",
            "alice.conf",
        ],
        &[],
    )?;
    ensure!(add.status.success(), "peer add: {}", output_text(&add));
    texts.add_output("kuberaya peer add", &add);
    for (what, args) in [
        ("kuberaya peer list", vec!["peer", "list", "-A"]),
        ("kuberaya peer list -o json", vec!["peer", "list", "-A", "-o", "json"]),
        ("kuberaya lb list", vec!["lb", "list"]),
        ("kuberaya lb list -o json", vec!["lb", "list", "-o", "json"]),
        ("kuberaya lb describe web", vec!["lb", "describe", "default/web"]),
    ] {
        let out = kuberaya(&args, &platform_env)?;
        ensure!(out.status.success(), "{what}: {}", output_text(&out));
        texts.add_output(what, &out);
    }
    let wrong_password = format!("wrong-{}", b64(&std::fs::read("/proc/sys/kernel/random/uuid")?));
    let mut bad_env = platform_env;
    bad_env[2].1 = &wrong_password;
    let bad = kuberaya(&["lb", "list"], &bad_env)?;
    ensure!(!bad.status.success(), "lb list with a wrong password succeeded");
    texts.add_output("kuberaya lb list with a wrong password", &bad);
    // A kubeconfig with a wrong token.
    let admin_token = std::fs::read_to_string(state.join("kube/admin-token"))?;
    let wrong_token = format!("{}x", admin_token.trim());
    let bad_kubeconfig = work.join("bad-kubeconfig");
    std::fs::write(
        &bad_kubeconfig,
        std::fs::read_to_string(sb.kubeconfig())?.replace(admin_token.trim(), &wrong_token),
    )?;
    std::fs::set_permissions(&bad_kubeconfig, std::fs::Permissions::from_mode(0o600))?;
    let mut cmd = Command::new(binary("kuberaya"));
    cmd.args(["peer", "list"])
        .env("KUBECONFIG", &bad_kubeconfig)
        .current_dir(&work);
    let bad = run(&mut cmd)?;
    ensure!(!bad.status.success(), "peer list with a wrong token succeeded");
    texts.add_output("kuberaya peer list with a wrong cluster token", &bad);
    let mut cmd = Command::new(binary("kuberaya"));
    cmd.args([
        "peer",
        "add",
        "-n",
        "default",
        "mallory",
        "--allow",
        "default/web",
        "--out",
        "mallory.conf",
    ])
    .env("KUBECONFIG", &bad_kubeconfig)
    .current_dir(&work);
    let bad = run(&mut cmd)?;
    ensure!(!bad.status.success(), "peer add with a wrong token succeeded");
    texts.add_output("kuberaya peer add with a wrong cluster token", &bad);
    std::fs::remove_file(&bad_kubeconfig)?;

    // The peer connects (handshake, DNS) so the gateway logs its session.
    let conf = std::fs::read_to_string(work.join("alice.conf"))?;
    let peer = WgPeer::from_conf(&conf);
    let psk = conf_value(&conf, "PresharedKey");
    let port = free_port();
    let mut cmd = peer.onetun_command(port, "100.64.0.1:53:UDP");
    cmd.env("ONETUN_PRESHARED_KEY", &psk);
    let mut t = Process::spawn_command(cmd)?;
    let answered = poll_until_blocking(Duration::from_secs(30), || {
        dig(port, "web.default.svc.cluster.local")
            .contains("status: NOERROR")
            .then_some(())
    });
    ensure!(
        answered.is_some(),
        "no DNS answer through the tunnel\n{}",
        t.output_tails()
    );
    t.stop();

    // The secrets.
    let mut secrets = Secrets::default();
    secrets.add("the platform password", &sb.password);
    secrets.add("the wrong platform password tried", &wrong_password);
    secrets.add("the API server's admin token", &admin_token);
    secrets.add("the wrong cluster token tried", &wrong_token);
    secrets.add(
        "the API server's TLS key",
        &std::fs::read_to_string(state.join("kube/apiserver.key"))?,
    );
    secrets.add("the peer's private key", &peer.private_key);
    secrets.add("the peer's preshared key", &psk);
    let gw_key_b64 = sb.kubectl(&[
        "get",
        "secret",
        "-n",
        "kuberaya-system",
        "kuberaya-gateway-key",
        "-o",
        "jsonpath={.data.privateKey}",
    ])?;
    let gw_key = String::from_utf8(b64_decode(&gw_key_b64)?)?;
    ensure!(
        b64_decode(&gw_key).is_ok_and(|k| k.len() == 32),
        "the gateway key Secret holds a WireGuard key: {} bytes",
        gw_key.len()
    );
    secrets.add("the gateway's private key", &gw_key);

    // Where they must not be.
    texts.add("sandbox.log", std::fs::read_to_string(state.join("sandbox.log"))?);
    for (what, args) in [
        ("Events", vec!["get", "events", "-A", "-o", "json"]),
        (
            "events.k8s.io Events",
            vec!["get", "events.events.k8s.io", "-A", "-o", "json"],
        ),
        ("VpnPeers", vec!["get", "vpnpeers", "-A", "-o", "json"]),
        ("Services", vec!["get", "services", "-A", "-o", "json"]),
        ("ConfigMaps", vec!["get", "configmaps", "-A", "-o", "json"]),
        ("Leases", vec!["get", "leases", "-A", "-o", "json"]),
    ] {
        let text = sb.kubectl(&args)?;
        texts.add(format!("kubectl {}", args.join(" ")), text);
        eprintln!("searched {what}");
    }
    let events = sb.kubectl(&["get", "events", "-A", "-o", "name"])?;
    ensure!(!events.trim().is_empty(), "the run made Events to search");

    let (leaks, searched) = texts.leaks(&secrets);
    eprintln!("searched: {searched}");
    ensure!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    // The failures say what went wrong, without the secret.
    let bad_out = &texts
        .0
        .iter()
        .find(|(o, _)| o.contains("wrong password (stderr)"))
        .unwrap()
        .1;
    ensure!(
        bad_out.to_lowercase().contains("credentials") || bad_out.contains("401") || bad_out.contains("login"),
        "the wrong password's error says what failed: {bad_out}"
    );

    // Files holding a secret are private to their owner.
    let (exposed, holding) = exposed_secret_files(&[&state, &work], &secrets);
    eprintln!("files holding a secret: {holding:?}");
    ensure!(
        holding.iter().any(|f| f.contains("alice.conf")),
        "the peer config is among them: {holding:?}"
    );
    ensure!(
        exposed.is_empty(),
        "secret files readable by others:\n{}",
        exposed.join("\n")
    );
    Ok(())
}

#[test]
fn the_ccm_binary_logs_and_metrics_hold_no_credentials() -> Result<()> {
    let n = unique_net_index();
    let sb = CloudSandbox::up(&Ranges::standard(n), &["--nodes", "1", "--external-ccm"], 1)?;
    // Debug logs: the platform client's requests and retries are there.
    let mut ccm = Ccm::spawn(&sb, "debug,hyper=info,h2=info,rustls=info,tower=info", &[])?;
    ccm.wait_leader(Duration::from_secs(30))?;
    sb.apply(&deployment("web", 1, false))?;
    sb.apply(&lb_service("web", "web", &[], ""))?;
    sb.wait_ingress("web", "60s")?;
    // A CCM with a wrong password: it fails to log in, and says so.
    let wrong_password = format!("wrong-{}", b64(&std::fs::read("/proc/sys/kernel/random/uuid")?));
    let config = sb.state().join("cloud-config.yaml");
    let mut cmd = Command::new(binary("kuberaya-ccm"));
    cmd.env("CLOUDRAYA_EMAIL", &sb.email)
        .env("CLOUDRAYA_PASSWORD", &wrong_password)
        .env("RUST_LOG", "debug,hyper=info,h2=info,rustls=info,tower=info")
        .arg("--kubeconfig")
        .arg(sb.kubeconfig())
        .arg("--cloud-config")
        .arg(&config)
        .args([
            "--leader-elect-resource-namespace",
            "wrong-password",
            "--metrics-bind-address",
            &format!("127.0.0.1:{}", free_port()),
            "--health-bind-address",
            &format!("127.0.0.1:{}", free_port()),
            "--secure-bind-address=0",
        ]);
    let mut bad = Process::spawn_command(cmd)?;
    let said = poll_until_blocking(Duration::from_secs(30), || {
        let all = format!("{}{}", bad.stdout(), bad.stderr());
        let lower = all.to_lowercase();
        (lower.contains("401") || lower.contains("credential") || lower.contains("unauthori")).then_some(())
    });
    let bad_out = format!("{}{}", bad.stdout(), bad.stderr());
    bad.stop();
    ensure!(
        said.is_some(),
        "the CCM with a wrong password says why it fails:\n{bad_out}"
    );

    let mut secrets = Secrets::default();
    secrets.add("the platform password", &sb.password);
    secrets.add("the wrong platform password tried", &wrong_password);
    secrets.add(
        "the API server's admin token",
        &std::fs::read_to_string(sb.state().join("kube/admin-token"))?,
    );
    let mut texts = Texts::default();
    texts.add("kuberaya-ccm stdout", ccm.process.stdout());
    texts.add("kuberaya-ccm stderr (debug)", ccm.process.stderr());
    texts.add("kuberaya-ccm with a wrong password (debug)", bad_out);
    let metrics = curl(&format!("http://{}/metrics", ccm.metrics)).context("the CCM's /metrics")?;
    ensure!(metrics.contains("# TYPE"), "CCM metrics: {metrics}");
    texts.add("kuberaya-ccm /metrics", metrics);
    texts.add("Events", sb.kubectl(&["get", "events", "-A", "-o", "json"])?);
    texts.add("Services", sb.kubectl(&["get", "services", "-A", "-o", "json"])?);
    texts.add("sandbox.log", std::fs::read_to_string(sb.state().join("sandbox.log"))?);
    let (leaks, searched) = texts.leaks(&secrets);
    eprintln!("searched: {searched}");
    ensure!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    let (exposed, holding) = exposed_secret_files(&[sb.state()], &secrets);
    eprintln!("files holding a secret: {holding:?}");
    ensure!(
        exposed.is_empty(),
        "secret files readable by others:\n{}",
        exposed.join("\n")
    );
    Ok(())
}

/// A fake Service answering every connection with a fixed HTTP response (bounded).
fn fake_http(addr: Ipv4Addr) -> SocketAddr {
    let l = TcpListener::bind((addr, 0)).unwrap();
    let a = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in l.incoming().take(32).flatten() {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello");
        }
    });
    a
}

const NOBODY: u32 = 65534;

#[test]
fn gateway_runs_as_nobody_in_userspace_mode_and_serves_a_peer() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test starts the gateway as uid 65534 with setpriv, which needs root"
    );
    let net = unique_net_index();
    let web_ip = Ipv4Addr::new(127, 96, net, 10);
    let web = fake_http(web_ip);
    // Everything the gateway reads belongs to nobody, in a directory only nobody can enter.
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let (gw_private, gw_public) = gateway_keypair();
    let (peer_private, peer_public) = gateway_keypair();
    let psk = gateway_keypair().0;
    let key_file = gateway::write_key(root, &gw_private)?;
    let files = StaticFiles::write(
        root,
        &[
            serde_json::json!({"namespace": "default", "name": "alice", "presharedKey": psk,
            "spec": {"publicKey": peer_public, "address": "100.64.0.2", "allow": [{"service": "web"}]}}),
        ],
        &serde_json::json!([{"namespace": "default", "name": "web", "clusterIP": web_ip.to_string(),
            "ports": [{"name": "http", "port": web.port()}]}]),
    )?;
    let uapi_dir = root.join("uapi");
    std::fs::create_dir(&uapi_dir)?;
    for p in [
        root.to_path_buf(),
        key_file.clone(),
        files.peers.clone(),
        files.services.clone(),
        uapi_dir.clone(),
    ] {
        std::os::unix::fs::chown(&p, Some(NOBODY), Some(NOBODY))?;
    }
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))?;
    // The gateway's own command line, run by setpriv.
    let gateway = gateway::command(&key_file);
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
    ])
    .arg(gateway.get_program())
    .args(gateway.get_args())
    .args(files.args())
    .args(["--uapi-interface", "krnobody", "--uapi-dir"])
    .arg(&uapi_dir)
    .env("RUST_LOG", "debug");
    let Gateway {
        process: mut gw,
        line,
        udp,
        public_key,
        metrics: metrics_addr,
        ..
    } = Gateway::spawn(cmd, Duration::from_secs(30))?;
    ensure!(public_key == gw_public, "{line}");

    // It runs as nobody, with no capability at all.
    let status = std::fs::read_to_string(format!("/proc/{}/status", gw.pid()))?;
    let value = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(|v| v.split_whitespace().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    // setpriv execs the gateway in place: the pid is the gateway's.
    ensure!(status.contains("kuberaya-gatewa"), "{status}");
    ensure!(value("Uid:").iter().all(|u| *u == "65534"), "uids: {:?}", value("Uid:"));
    ensure!(value("Gid:").iter().all(|g| *g == "65534"), "gids: {:?}", value("Gid:"));
    ensure!(
        value("CapEff:") == ["0000000000000000"],
        "CapEff {:?}",
        value("CapEff:")
    );
    ensure!(
        value("CapPrm:") == ["0000000000000000"],
        "CapPrm {:?}",
        value("CapPrm:")
    );
    let sock = uapi_dir.join("krnobody.sock");
    let meta = std::fs::metadata(&sock).context("the UAPI socket")?;
    ensure!(meta.uid() == NOBODY, "UAPI socket owner {}", meta.uid());
    ensure!(
        meta.permissions().mode() & 0o777 == 0o600,
        "UAPI socket mode {:o}",
        meta.mode()
    );

    // It serves a peer: curl through onetun (with the preshared key) reaches web.
    let port = free_port();
    let laptop = WgPeer {
        private_key: peer_private.clone(),
        gateway_key: gw_public.clone(),
        endpoint: udp.to_string(),
        address: "100.64.0.2".into(),
    };
    let mut cmd = laptop.onetun_command(port, &format!("{web}:TCP"));
    cmd.env("ONETUN_PRESHARED_KEY", &psk);
    let mut t = Process::spawn_command(cmd)?;
    let got = poll_until_blocking(Duration::from_secs(30), || {
        curl(&format!("http://127.0.0.1:{port}/")).filter(|b| b.contains("hello"))
    });
    ensure!(
        got.is_some(),
        "curl through onetun to the gateway run as nobody\n{}\n{}",
        t.output_tails(),
        gw.output_tails()
    );
    t.stop();

    // Its metrics (once the handshake is reported, every second) and output name no key.
    let metrics = poll_until_blocking(Duration::from_secs(10), || {
        curl(&format!("http://{metrics_addr}/metrics"))
            .filter(|m| m.contains("kuberaya_gateway_peer_handshakes_total{peer=\"default/alice\"}"))
    })
    .context("the peer's handshake in /metrics")?;
    let mut secrets = Secrets::default();
    secrets.add("the gateway's private key", &gw_private);
    secrets.add("the peer's private key", &peer_private);
    secrets.add("the preshared key", &psk);
    let mut texts = Texts::default();
    texts.add("gateway /metrics", metrics);
    texts.add("gateway stdout", gw.stdout());
    texts.add("gateway stderr (debug)", gw.stderr());
    let (leaks, searched) = texts.leaks(&secrets);
    eprintln!("searched: {searched}");
    ensure!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    ensure!(gw.is_running(), "the gateway exited\n{}", gw.output_tails());
    Ok(())
}

#[test]
fn userspace_manifests_run_as_non_root() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for (file, what) in [
        ("gateway/base/deployment.yaml", "the gateway (userspace data plane)"),
        ("ccm/deployment.yaml", "the CCM"),
    ] {
        let text = std::fs::read_to_string(root.join(file))?;
        for needed in [
            "runAsNonRoot: true",
            "runAsUser: 65532",
            "allowPrivilegeEscalation: false",
            "readOnlyRootFilesystem: true",
            "drop:",
        ] {
            ensure!(text.contains(needed), "{what} ({file}) lacks `{needed}`");
        }
        ensure!(!text.contains("privileged: true"), "{what} ({file}) is privileged");
        ensure!(
            !text.contains("NET_ADMIN"),
            "{what} ({file}) asks for NET_ADMIN in the userspace base"
        );
        ensure!(!text.contains("runAsUser: 0"), "{what} ({file}) runs as root");
    }
    // Only the TUN overlay adds a capability, and (Kubernetes gives added capabilities to
    // root only) runs that one container as root with NET_ADMIN alone: never privileged,
    // no other capability (tests/container_images.rs runs it and checks CapEff).
    let tun = std::fs::read_to_string(root.join("gateway/overlays/tun/kustomization.yaml"))?;
    ensure!(
        tun.contains("value: [\"NET_ADMIN\"]"),
        "the TUN overlay adds NET_ADMIN alone"
    );
    ensure!(
        tun.contains("/spec/template/spec/containers/0/securityContext/runAsUser"),
        "the TUN overlay's root is the container's, not the pod's"
    );
    ensure!(!tun.contains("/privileged"), "the TUN overlay is not privileged");
    Ok(())
}

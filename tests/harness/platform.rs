//! The CloudRaya platform a test talks to: a real endpoint given by the environment, or a
//! fresh platform stand-in (`kuberaya-sandbox platform`) on unique loopback ranges.

use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use crate::http::JsonApi;
use crate::process::Process;

/// The stand-in binary.
pub const SANDBOX_BIN: &str = "kuberaya-sandbox";
/// The stand-in's default credentials.
pub const SANDBOX_EMAIL: &str = "admin@sandbox.local";
pub const SANDBOX_PASSWORD: &str = "sandbox";
/// The stand-in's default cluster ID.
pub const SANDBOX_CLUSTER_ID: &str = "cl-sandbox";
/// How long to wait for the stand-in's `listening on` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

static NET_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A third octet in 60..=99 for this process's next stand-in: an atomic counter plus a
/// pid-based offset, so that parallel tests (and, mostly, parallel test processes) get
/// distinct loopback ranges: public `127.203.<n>.0/24`, VM `127.10.<n>.0/24`.
pub fn unique_net_index() -> u8 {
    let n = NET_COUNTER.fetch_add(1, Ordering::Relaxed);
    let offset = std::process::id() % 40;
    (60 + (offset + n) % 40) as u8
}

/// An identifier for this test run: `KURAYA_RUN_ID` when set, otherwise made from the
/// time and pid; lowercase letters and digits, starting with a letter, at most 12
/// characters (usable in names and label values).
pub fn run_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        if let Ok(id) = std::env::var("KURAYA_RUN_ID") {
            return id;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut v = (now.as_millis() as u64) ^ (u64::from(std::process::id()) << 40);
        let mut s = String::from("r");
        const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        for _ in 0..9 {
            s.push(DIGITS[(v % 36) as usize] as char);
            v /= 36;
        }
        s
    })
}

/// Options of a platform stand-in. `None` leaves the stand-in's default, except the IP
/// ranges, which default to unique ranges (see [`unique_net_index`]).
#[derive(Debug, Clone, Default)]
pub struct SandboxOptions {
    pub public_ip_range: Option<String>,
    pub vm_ip_range: Option<String>,
    /// `--public-ipv6-range` (the region's IPv6 public IPs); `None`: the region has none.
    /// Only inside a network namespace of the test (see `netns::Netns::add_local_route`).
    pub public_ipv6_range: Option<String>,
    /// `--vm-ipv6-range` (the seeded subnet's `ipv6_cidr`); `None`: IPv4 only.
    pub vm_ipv6_range: Option<String>,
    pub cluster_id: Option<String>,
    pub workers: Option<u32>,
    pub provisioning_delay_ms: Option<u64>,
    /// `--no-udp` when true.
    pub no_udp: bool,
    pub extra_args: Vec<String>,
}

/// Where the platform is and how to log in.
pub struct PlatformTarget {
    /// Base URL of the platform API (no trailing slash).
    pub url: String,
    pub email: String,
    pub password: String,
    pub cluster_id: String,
    /// Base URL under which the stand-in's control API lives (paths as in the contract:
    /// `{control}/_sandbox/state`); `None` for a real endpoint.
    pub control: Option<String>,
    /// The stand-in's public IP range (`None` for a real endpoint).
    pub public_ip_range: Option<String>,
    /// The stand-in's VM private IP range (`None` for a real endpoint).
    pub vm_ip_range: Option<String>,
    /// The stand-in's IPv6 public IP range, when it was given one.
    pub public_ipv6_range: Option<String>,
    /// The stand-in's VM IPv6 range, when it was given one.
    pub vm_ipv6_range: Option<String>,
    /// The stand-in's process (`None` for a real endpoint).
    pub process: Option<Process>,
    args: Vec<String>,
    // Declared after `process`, so the state is removed after the process is gone.
    state_dir: Option<tempfile::TempDir>,
}

impl PlatformTarget {
    /// A real endpoint from `CLOUDRAYA_API_URL`, `CLOUDRAYA_EMAIL`, `CLOUDRAYA_PASSWORD` and
    /// `KUBERAYA_CLUSTER_ID`; `None` when `CLOUDRAYA_API_URL` is not set. Panics when it is
    /// set but the rest is missing.
    pub fn from_env() -> Option<PlatformTarget> {
        let url = std::env::var("CLOUDRAYA_API_URL").ok().filter(|u| !u.is_empty())?;
        let need =
            |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("CLOUDRAYA_API_URL is set, so {k} must be too"));
        Some(PlatformTarget {
            url: url.trim_end_matches('/').to_string(),
            email: need("CLOUDRAYA_EMAIL"),
            password: need("CLOUDRAYA_PASSWORD"),
            cluster_id: need("KUBERAYA_CLUSTER_ID"),
            control: None,
            public_ip_range: None,
            vm_ip_range: None,
            public_ipv6_range: None,
            vm_ipv6_range: None,
            process: None,
            args: Vec::new(),
            state_dir: None,
        })
    }

    /// The real endpoint when configured, otherwise a fresh stand-in with default options.
    pub fn acquire() -> Result<PlatformTarget> {
        PlatformTarget::acquire_with(SandboxOptions::default())
    }

    /// The real endpoint when configured (`opts` are then ignored), otherwise a fresh
    /// stand-in started with `opts`.
    pub fn acquire_with(opts: SandboxOptions) -> Result<PlatformTarget> {
        match PlatformTarget::from_env() {
            Some(t) => Ok(t),
            None => PlatformTarget::start_sandbox(opts),
        }
    }

    /// Start a platform stand-in with its own state directory and (unless given) unique
    /// loopback IP ranges, and wait until it prints `listening on http://<addr>`.
    pub fn start_sandbox(opts: SandboxOptions) -> Result<PlatformTarget> {
        let n = unique_net_index();
        let public = opts
            .public_ip_range
            .clone()
            .unwrap_or_else(|| format!("127.203.{n}.0/24"));
        let vm = opts.vm_ip_range.clone().unwrap_or_else(|| format!("127.10.{n}.0/24"));
        let cluster_id = opts
            .cluster_id
            .clone()
            .unwrap_or_else(|| SANDBOX_CLUSTER_ID.to_string());
        let state_dir = tempfile::Builder::new()
            .prefix("kuberaya-e2e-platform-state-")
            .tempdir()
            .context("creating a state directory")?;
        let mut args: Vec<String> = vec![
            "platform".into(),
            "--state-dir".into(),
            state_dir.path().display().to_string(),
            "--email".into(),
            SANDBOX_EMAIL.into(),
            "--password".into(),
            SANDBOX_PASSWORD.into(),
            "--public-ip-range".into(),
            public.clone(),
            "--vm-ip-range".into(),
            vm.clone(),
            "--cluster-id".into(),
            cluster_id.clone(),
        ];
        if let Some(w) = opts.workers {
            args.extend(["--workers".into(), w.to_string()]);
        }
        if let Some(d) = opts.provisioning_delay_ms {
            args.extend(["--provisioning-delay-ms".into(), d.to_string()]);
        }
        if opts.no_udp {
            args.push("--no-udp".into());
        }
        if let Some(r) = &opts.public_ipv6_range {
            args.extend(["--public-ipv6-range".into(), r.clone()]);
        }
        if let Some(r) = &opts.vm_ipv6_range {
            args.extend(["--vm-ipv6-range".into(), r.clone()]);
        }
        args.extend(opts.extra_args.iter().cloned());
        let (process, url) = spawn_sandbox(&args, "127.0.0.1:0")?;
        Ok(PlatformTarget {
            control: Some(url.clone()),
            url,
            email: SANDBOX_EMAIL.into(),
            password: SANDBOX_PASSWORD.into(),
            cluster_id,
            public_ip_range: Some(public),
            vm_ip_range: Some(vm),
            public_ipv6_range: opts.public_ipv6_range.clone(),
            vm_ipv6_range: opts.vm_ipv6_range.clone(),
            process: Some(process),
            args,
            state_dir: Some(state_dir),
        })
    }

    /// Whether this is a stand-in (the control API is available).
    pub fn is_sandbox(&self) -> bool {
        self.control.is_some()
    }

    /// Restart the stand-in on the same address with the same state directory (its state
    /// must survive). Panics for a real endpoint.
    pub fn restart(&mut self) -> Result<()> {
        let mut old = self.process.take().expect("restart() needs a platform stand-in");
        old.stop();
        drop(old);
        let listen = self.url.strip_prefix("http://").unwrap_or(&self.url).to_string();
        let (process, url) = spawn_sandbox(&self.args, &listen)?;
        self.process = Some(process);
        self.url = url.clone();
        self.control = Some(url);
        Ok(())
    }

    /// Log in and return an API client carrying the token.
    pub async fn login(&self) -> Result<JsonApi> {
        JsonApi::login(&self.url, &self.email, &self.password).await
    }

    /// A client for the control API (no token). Panics for a real endpoint.
    pub fn control_api(&self) -> JsonApi {
        JsonApi::new(
            self.control
                .as_deref()
                .expect("control_api() needs a platform stand-in"),
        )
    }

    /// The stand-in's state directory.
    pub fn state_dir(&self) -> Option<&std::path::Path> {
        self.state_dir.as_ref().map(|d| d.path())
    }
}

fn spawn_sandbox(args: &[String], listen: &str) -> Result<(Process, String)> {
    let mut full: Vec<String> = args.to_vec();
    // `platform` first, then the listen address.
    full.splice(1..1, ["--listen".to_string(), listen.to_string()]);
    let mut process = Process::start(SANDBOX_BIN, &full)?;
    let line = process.wait_for_stdout_line("listening on ", STARTUP_TIMEOUT)?;
    let url = line
        .trim_start_matches("listening on ")
        .trim()
        .trim_end_matches('/')
        .to_string();
    anyhow::ensure!(url.starts_with("http://"), "unexpected listening line {line:?}");
    Ok((process, url))
}

/// Removes, when dropped, the platform objects a test created on a real endpoint (even
/// when the test failed): tracked load balancers first (waiting for them to go), then
/// tracked public IPs. Does nothing for a stand-in, which dies with the test.
pub struct Janitor {
    enabled: bool,
    url: String,
    email: String,
    password: String,
    cluster_id: String,
    lbs: Mutex<Vec<String>>,
    ips: Mutex<Vec<String>>,
}

impl Janitor {
    pub fn new(target: &PlatformTarget) -> Janitor {
        Janitor {
            enabled: !target.is_sandbox(),
            url: target.url.clone(),
            email: target.email.clone(),
            password: target.password.clone(),
            cluster_id: target.cluster_id.clone(),
            lbs: Mutex::new(Vec::new()),
            ips: Mutex::new(Vec::new()),
        }
    }

    /// Delete this load balancer of the target's cluster at the end.
    pub fn track_lb(&self, id: &str) {
        self.lbs.lock().unwrap().push(id.to_string());
    }

    /// Delete this public IP at the end (after the load balancers).
    pub fn track_ip(&self, id: &str) {
        self.ips.lock().unwrap().push(id.to_string());
    }

    async fn clean(
        url: String,
        email: String,
        password: String,
        cluster: String,
        lbs: Vec<String>,
        ips: Vec<String>,
    ) -> Result<()> {
        let api = JsonApi::login(&url, &email, &password).await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        for id in &lbs {
            let path = format!("/kubernetes/v1/clusters/{cluster}/load-balancers/{id}");
            let _ = api.try_request(reqwest::Method::DELETE, &path, None).await;
        }
        for id in &lbs {
            let path = format!("/kubernetes/v1/clusters/{cluster}/load-balancers/{id}");
            while Instant::now() < deadline {
                match api.try_request(reqwest::Method::GET, &path, None).await {
                    Ok(a) if a.status == 404 => break,
                    _ => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        }
        for id in &ips {
            let path = format!("/network/v1/public-ips/{id}");
            while Instant::now() < deadline {
                match api.try_request(reqwest::Method::DELETE, &path, None).await {
                    Ok(a) if a.status == 409 || a.status >= 500 || a.status == 429 => {
                        tokio::time::sleep(Duration::from_millis(500)).await
                    }
                    _ => break,
                }
            }
        }
        Ok(())
    }
}

impl Drop for Janitor {
    fn drop(&mut self) {
        if !self.enabled {
            return;
        }
        let lbs = std::mem::take(&mut *self.lbs.lock().unwrap_or_else(|e| e.into_inner()));
        let ips = std::mem::take(&mut *self.ips.lock().unwrap_or_else(|e| e.into_inner()));
        if lbs.is_empty() && ips.is_empty() {
            return;
        }
        let (url, email, password, cluster) = (
            self.url.clone(),
            self.email.clone(),
            self.password.clone(),
            self.cluster_id.clone(),
        );
        // A thread of its own with its own runtime: drop may run inside a runtime.
        let joined = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            rt.block_on(Janitor::clean(url, email, password, cluster, lbs.clone(), ips.clone()))
                .map_err(|e| format!("{e:#} (load balancers {lbs:?}, public IPs {ips:?})"))
        })
        .join();
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("[harness] cleanup failed: {e}"),
            Err(_) => eprintln!("[harness] cleanup panicked"),
        }
    }
}

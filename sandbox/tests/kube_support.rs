//! Shared by the `kube_*` tests: start the API server stand-in on 127.0.0.1:0 with a
//! temporary state dir, and run the real kubectl against it (never ~/.kube).
#![allow(dead_code)]

use kuberaya_sandbox::kube::{KubeApi, KubeApiConfig, serve};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;

pub const KUBECTL: &str = "/usr/bin/kubectl";

pub struct Server {
    pub api: Arc<KubeApi>,
    pub addr: SocketAddr,
    pub dir: TempDir,
    pub kubeconfig: PathBuf,
    /// Dropping it (with the Server) stops the server too.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    pub async fn start() -> Server {
        Self::start_in(tempfile::tempdir().expect("tempdir")).await
    }

    /// Starts on an existing state dir (for restart tests).
    pub async fn start_in(dir: TempDir) -> Server {
        let config = KubeApiConfig::new(dir_state(&dir));
        Self::start_with(dir, config).await
    }

    /// Starts with these Service CIDRs (`127.96.0.0/16,fd00:96::/112`: dual-stack).
    pub async fn start_with_service_cidrs(cidrs: &str) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = KubeApiConfig {
            service_cidrs: cidrs.parse().expect("service CIDRs"),
            ..KubeApiConfig::new(dir_state(&dir))
        };
        Self::start_with(dir, config).await
    }

    async fn start_with(dir: TempDir, config: KubeApiConfig) -> Server {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let api = KubeApi::open(config).await.expect("open");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let kubeconfig = dir.path().join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, &format!("https://{addr}"), "sandbox")
            .expect("kubeconfig");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, api.clone(), async move {
            let _ = rx.await;
        }));
        Server {
            api,
            addr,
            dir,
            kubeconfig,
            stop: Some(tx),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Stops the server (state written) and hands back its directory.
    pub async fn stop(mut self) -> TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let task = std::mem::replace(&mut self.task, tokio::spawn(async { Ok(()) }));
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("server stops")
            .expect("join")
            .expect("serve");
        self.dir
    }

    /// A reqwest client trusting the stand-in's CA.
    pub fn http(&self) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.api.ca_pem().expect("tls").as_bytes()).expect("ca");
        reqwest::Client::builder()
            .tls_backend_rustls()
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(20))
            .build()
            .expect("client")
    }

    pub fn token(&self) -> String {
        self.api.admin_token().to_string()
    }
}

fn dir_state(dir: &TempDir) -> PathBuf {
    dir.path().join("state")
}

fn command(s: &Server, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(KUBECTL);
    c.arg("--kubeconfig")
        .arg(&s.kubeconfig)
        .arg("--cache-dir")
        .arg(s.dir.path().join("kube-cache"))
        .args(args)
        .env("HOME", s.dir.path())
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    c
}

/// Runs kubectl (bounded to 60 s).
pub async fn kubectl(s: &Server, args: &[&str]) -> Output {
    let child = command(s, args).spawn().expect("spawn kubectl");
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} timed out"))
        .expect("kubectl output")
}

/// Runs kubectl with `input` on stdin.
pub async fn kubectl_stdin(s: &Server, args: &[&str], input: &str) -> Output {
    let mut c = command(s, args);
    c.stdin(Stdio::piped());
    let mut child = c.spawn().expect("spawn kubectl");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.as_bytes()).await.expect("write stdin");
    drop(stdin);
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("kubectl {args:?} timed out"))
        .expect("kubectl output")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs kubectl, asserts success and an empty stderr (no warnings), returns stdout.
pub async fn ok(s: &Server, args: &[&str]) -> String {
    let o = kubectl(s, args).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "kubectl {args:?} failed: {err}\n{out}");
    assert!(err.trim().is_empty(), "kubectl {args:?} warned: {err}");
    out
}

/// Like `ok` with stdin.
pub async fn ok_stdin(s: &Server, args: &[&str], input: &str) -> String {
    let o = kubectl_stdin(s, args, input).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "kubectl {args:?} failed: {err}\n{out}");
    assert!(err.trim().is_empty(), "kubectl {args:?} warned: {err}");
    out
}

/// Runs kubectl expecting failure; returns stderr.
pub async fn fails(s: &Server, args: &[&str]) -> String {
    let o = kubectl(s, args).await;
    let (out, err) = text(&o);
    assert!(!o.status.success(), "kubectl {args:?} should fail: {out}");
    err
}

pub fn write(dir: &Path, name: &str, content: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, content).expect("write file");
    p
}

/// Polls `f` until it returns Some, for at most `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

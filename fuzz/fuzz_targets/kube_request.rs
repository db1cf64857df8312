//! The Kubernetes API stand-in's request decoding, through its public router: paths and
//! query parameters (label and field selectors, watch and list options), JSON, YAML
//! and protobuf bodies, the four patch types, content negotiation.
//!
//! Input: up to 8 requests separated by a line `====`. Each is a request line
//! `METHOD /path?query`, header lines `name: value`, an empty line, then the body. An
//! `Authorization: Bearer <admin token>` header is added unless the request has one.
//! Every input starts from a fresh API server (default namespaces and the `kubernetes`
//! Service, as at startup), so a crash reproduces from its input alone. The state it
//! starts from is made once per process ([`TEMPLATE`]) and copied into the input's state
//! dir, so each server opens as after a restart instead of bootstrapping its default
//! objects anew, which was half of each input's time.
//!
//! Checked: no panic, and no 500 InternalError (the stand-in's "this cannot happen"),
//! unless the input injected faults through `/_sandbox/`.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

use axum::body::Body;
use http::{HeaderName, HeaderValue, Method, Request, Uri, header};
use kuberaya_sandbox::kube::{KubeApi, KubeApiConfig};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const TOKEN: &str = "fuzz-admin-token";
const MAX_REQUESTS: usize = 8;

/// A worker thread of its own drives the timers between inputs: each server's state
/// flush task ends on its next tick after the server is dropped. (On a current-thread
/// runtime those ticks never came and the tasks piled up, 15 KB a run.)
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a tokio runtime")
});

/// The state directory of this process, removed before each input: `$KUBERAYA_FUZZ_STATE`
/// (fuzz/run puts it on a tmpfs, as the stand-in fsyncs every write), else one in the
/// temporary directory.
static STATE: LazyLock<PathBuf> = LazyLock::new(|| match std::env::var_os("KUBERAYA_FUZZ_STATE") {
    Some(dir) => PathBuf::from(dir).join(format!("kube-{}", std::process::id())),
    None => std::env::temp_dir().join(format!("kuberaya-fuzz-kube-{}", std::process::id())),
});

fn config(dir: &Path) -> KubeApiConfig {
    let mut config = KubeApiConfig::new(dir);
    config.tls = false;
    config.admin_token = Some(TOKEN.to_owned());
    config
}

/// The files of a new server's state dir (its snapshot of the default objects and an empty
/// journal), made once: a server opened on them starts as a fresh one does.
static TEMPLATE: LazyLock<Vec<(PathBuf, Vec<u8>)>> = LazyLock::new(|| {
    let dir = STATE.with_extension("template");
    let _ = std::fs::remove_dir_all(&dir);
    RUNTIME.block_on(async {
        let api = KubeApi::open(config(&dir)).await.expect("the API server starts");
        drop(api);
    });
    let files = std::fs::read_dir(&dir)
        .expect("the template state dir")
        .map(|e| {
            let e = e.expect("a state file");
            (
                PathBuf::from(e.file_name()),
                std::fs::read(e.path()).expect("a state file"),
            )
        })
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    files
});

fn request(text: &[u8]) -> Option<Request<Body>> {
    let (head, body) = match text.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&text[..i], &text[i + 2..]),
        None => (text, &[][..]),
    };
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.lines();
    let (method, target) = lines.next()?.split_once(' ')?;
    let mut req = Request::new(Body::from(body.to_vec()));
    *req.method_mut() = Method::from_bytes(method.as_bytes()).ok()?;
    *req.uri_mut() = Uri::try_from(target).ok()?;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(n), Ok(v)) = (HeaderName::try_from(name.trim()), HeaderValue::try_from(value.trim())) {
            req.headers_mut().append(n, v);
        }
    }
    if !req.headers().contains_key(header::AUTHORIZATION) {
        let bearer = HeaderValue::from_str(&format!("Bearer {TOKEN}")).unwrap();
        req.headers_mut().insert(header::AUTHORIZATION, bearer);
    }
    Some(req)
}

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() < MAX_REQUESTS {
        match rest.windows(6).position(|w| w == b"\n====\n") {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + 6..];
            }
            None => {
                parts.push(rest);
                break;
            }
        }
    }
    parts
}

fuzz_target!(|data: &[u8]| {
    let requests: Vec<Request<Body>> = split(data).into_iter().filter_map(request).collect();
    if requests.is_empty() {
        return;
    }
    let _ = std::fs::remove_dir_all(STATE.as_path());
    std::fs::create_dir_all(STATE.as_path()).expect("the state dir");
    for (name, data) in TEMPLATE.iter() {
        std::fs::write(STATE.join(name), data).expect("a state file");
    }
    RUNTIME.block_on(async {
        let api = KubeApi::open(config(&STATE)).await.expect("the API server starts");
        let router = api.router();
        let mut faults = false;
        for req in requests {
            faults |= req.uri().path().starts_with("/_sandbox");
            let what = format!("{} {}", req.method(), req.uri());
            // Watches stream until their timeout: only their start is looked at.
            let resp = tokio::time::timeout(Duration::from_secs(5), router.clone().oneshot(req))
                .await
                .unwrap_or_else(|_| panic!("{what}: no answer within 5 s"))
                .expect("the router is infallible");
            let status = resp.status();
            if status.is_server_error() && !faults {
                let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                    .await
                    .unwrap_or_default();
                assert_ne!(status.as_u16(), 500, "{what}: {}", String::from_utf8_lossy(&body));
            }
        }
    });
});

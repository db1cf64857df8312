//! The `--cloud-config` file (YAML or JSON; JSON is read as YAML flow style).
//!
//! ```yaml
//! api_url: https://api.cloudraya.com   # the platform base URL
//! region: jkt                          # optional; else the cluster's
//! vpc_id: vpc-1                        # optional; else the cluster's
//! subnet_id: subnet-1                  # optional; else the cluster's
//! cluster_id: cl-1                     # the platform cluster ID (labels every object)
//! email_file: /etc/cloudraya/email     # optional; else env CLOUDRAYA_EMAIL (or `email:`)
//! password_file: /etc/cloudraya/password  # optional; else env CLOUDRAYA_PASSWORD
//! udp_supported: true                  # optional, default true
//! rate_limit: {qps: 20, burst: 40}     # optional client-side token bucket
//! timeout_s: 10                        # optional per-call timeout
//! ```
//!
//! Credentials never live in the file itself: the password comes from a file (a mounted
//! Secret) or the environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::platform::{PlatformClientConfig, TokenBucketConfig};
use crate::{Error, Result};

/// Env var with the platform account's e-mail when no `email_file`/`email` is given.
pub const ENV_EMAIL: &str = "CLOUDRAYA_EMAIL";
/// Env var with the password when no `password_file` is given.
pub const ENV_PASSWORD: &str = "CLOUDRAYA_PASSWORD";

/// Client-side rate limit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub qps: f64,
    pub burst: u32,
}

/// The file as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfigFile {
    pub api_url: String,
    pub cluster_id: String,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub vpc_id: Option<String>,
    #[serde(default)]
    pub subnet_id: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub email_file: Option<PathBuf>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub udp_supported: Option<bool>,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// The resolved configuration: file, credential files and environment combined.
#[derive(Clone)]
pub struct CloudConfig {
    pub api_url: String,
    pub cluster_id: String,
    pub region: Option<String>,
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
    pub email: String,
    pub password: String,
    pub udp_supported: bool,
    pub rate_limit: Option<RateLimit>,
    pub timeout: Option<Duration>,
}

impl std::fmt::Debug for CloudConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudConfig")
            .field("api_url", &self.api_url)
            .field("cluster_id", &self.cluster_id)
            .field("region", &self.region)
            .field("vpc_id", &self.vpc_id)
            .field("subnet_id", &self.subnet_id)
            .field("email", &self.email)
            .field("password", &"<redacted>")
            .field("udp_supported", &self.udp_supported)
            .finish_non_exhaustive()
    }
}

fn config_error(message: impl Into<String>) -> Error {
    Error::Config {
        message: message.into(),
        source: None,
    }
}

fn read_secret(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| Error::Config {
            message: format!("cannot read {}", path.display()),
            source: Some(Box::new(e)),
        })
}

impl CloudConfigFile {
    /// Parses the file's text (YAML or JSON).
    pub fn parse(text: &str) -> Result<Self> {
        let f: CloudConfigFile = serde_saphyr::from_str(text).map_err(|e| Error::Config {
            message: "cannot parse the cloud config".into(),
            source: Some(Box::new(e)),
        })?;
        if f.api_url.trim().is_empty() {
            return Err(config_error("api_url is empty"));
        }
        if f.cluster_id.trim().is_empty() {
            return Err(config_error("cluster_id is empty"));
        }
        Ok(f)
    }

    /// Combines the file with credential files and the environment (`env` is a lookup
    /// so tests need not touch the process environment).
    pub fn resolve(self, env: impl Fn(&str) -> Option<String>) -> Result<CloudConfig> {
        let email = match (&self.email_file, &self.email) {
            (Some(p), _) => read_secret(p)?,
            (None, Some(e)) => e.clone(),
            (None, None) => env(ENV_EMAIL)
                .ok_or_else(|| config_error(format!("no credentials: set email_file or email, or {ENV_EMAIL}")))?,
        };
        let password = match &self.password_file {
            Some(p) => read_secret(p)?,
            None => env(ENV_PASSWORD)
                .ok_or_else(|| config_error(format!("no credentials: set password_file or {ENV_PASSWORD}")))?,
        };
        Ok(CloudConfig {
            api_url: self.api_url,
            cluster_id: self.cluster_id,
            region: self.region,
            vpc_id: self.vpc_id,
            subnet_id: self.subnet_id,
            email,
            password,
            udp_supported: self.udp_supported.unwrap_or(true),
            rate_limit: self.rate_limit,
            timeout: self.timeout_s.map(Duration::from_secs),
        })
    }
}

impl CloudConfig {
    /// Reads and resolves `path` against the process environment.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            message: format!("cannot read {}", path.display()),
            source: Some(Box::new(e)),
        })?;
        CloudConfigFile::parse(&text)?.resolve(|k| std::env::var(k).ok())
    }

    /// The platform client's settings.
    pub fn client_config(&self) -> PlatformClientConfig {
        let mut c = PlatformClientConfig::new(&self.api_url, &self.email, &self.password);
        if let Some(t) = self.timeout {
            c.timeout = t;
        }
        c.rate_limit = self.rate_limit.as_ref().map(|r| TokenBucketConfig {
            qps: r.qps,
            burst: r.burst,
        });
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_with_env_credentials() {
        let f = CloudConfigFile::parse("api_url: http://127.0.0.1:9\ncluster_id: cl-1\nregion: jkt\n").expect("parses");
        let c = f
            .resolve(|k| match k {
                ENV_EMAIL => Some("ops@example.com".into()),
                ENV_PASSWORD => Some("s3cret".into()),
                _ => None,
            })
            .expect("resolves");
        assert_eq!(c.cluster_id, "cl-1");
        assert_eq!(c.region.as_deref(), Some("jkt"));
        assert!(c.udp_supported);
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.client_config().base_url, "http://127.0.0.1:9");
    }

    #[test]
    fn json_with_credential_files() {
        let dir = std::env::temp_dir().join(format!("kuberaya-ccm-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (e, p) = (dir.join("email"), dir.join("password"));
        std::fs::write(&e, "a@b.c\n").expect("write");
        std::fs::write(&p, "pw\n").expect("write");
        let text = format!(
            r#"{{"api_url": "http://x", "cluster_id": "cl-2", "email_file": "{}", "password_file": "{}", "udp_supported": false, "rate_limit": {{"qps": 5, "burst": 10}}}}"#,
            e.display(),
            p.display()
        );
        let c = CloudConfigFile::parse(&text)
            .expect("json")
            .resolve(|_| None)
            .expect("resolves");
        assert_eq!((c.email.as_str(), c.password.as_str()), ("a@b.c", "pw"));
        assert!(!c.udp_supported);
        assert!(c.client_config().rate_limit.is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_are_clear() {
        assert!(CloudConfigFile::parse("cluster_id: x\n").is_err(), "api_url missing");
        assert!(
            CloudConfigFile::parse("api_url: x\ncluster_id: y\nbogus: 1\n").is_err(),
            "unknown key"
        );
        let f = CloudConfigFile::parse("api_url: x\ncluster_id: y\n").expect("parses");
        let e = f.resolve(|_| None).expect_err("no credentials");
        assert!(e.to_string().contains(ENV_EMAIL), "{e}");
    }
}

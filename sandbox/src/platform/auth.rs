//! Bearer tokens: JWT-shaped (`header.payload.signature`, base64url) but only valid while
//! this process remembers issuing them, so a restart or a revoke is a 401.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::error::{Error, Result};

#[derive(Debug, Default)]
pub struct Tokens {
    issued: Mutex<HashMap<String, SystemTime>>,
}

impl Tokens {
    /// A new token for `subject`, valid for `ttl` from `now`; returns it and its expiry.
    pub fn issue(&self, subject: &str, ttl: Duration, now: SystemTime) -> (String, SystemTime) {
        let expires_at = now + ttl;
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let header = serde_json::json!({"alg": "HS256", "typ": "JWT"});
        let payload = serde_json::json!({
            "sub": subject,
            "iat": unix(now),
            "exp": unix(expires_at),
            "jti": hex(&rand::random::<[u8; 8]>()),
        });
        // Nobody verifies the signature: the token is valid because it is in `issued`.
        let token = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string()),
            URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()),
        );
        let mut issued = self.lock();
        issued.retain(|_, exp| *exp > now);
        issued.insert(token.clone(), expires_at);
        (token, expires_at)
    }

    /// Checks an `Authorization` header value.
    pub fn check(&self, authorization: Option<&str>, now: SystemTime) -> Result<()> {
        let Some(value) = authorization else {
            return Err(Error::Unauthorized("missing bearer token".into()));
        };
        let Some(token) = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")) else {
            return Err(Error::Unauthorized(
                "authorization header must be \"Bearer <token>\"".into(),
            ));
        };
        match self.lock().get(token.trim()) {
            Some(exp) if *exp > now => Ok(()),
            Some(_) => Err(Error::Unauthorized("token expired".into())),
            None => Err(Error::Unauthorized("invalid or revoked token".into())),
        }
    }

    /// Forgets every token; returns how many were still valid.
    pub fn revoke_all(&self, now: SystemTime) -> usize {
        let mut issued = self.lock();
        let valid = issued.values().filter(|exp| **exp > now).count();
        issued.clear();
        valid
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, SystemTime>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.issued.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_jwt_shaped() {
        let tokens = Tokens::default();
        let now = SystemTime::now();
        let (token, exp) = tokens.issue("admin@sandbox.local", Duration::from_secs(60), now);
        assert_eq!(exp, now + Duration::from_secs(60));
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let payload: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(payload["sub"], "admin@sandbox.local");
    }

    #[test]
    fn check_expiry_and_revoke() {
        let tokens = Tokens::default();
        let now = SystemTime::now();
        let (token, _) = tokens.issue("a", Duration::from_secs(60), now);
        let header = format!("Bearer {token}");
        assert!(tokens.check(Some(&header), now).is_ok());
        assert!(tokens.check(None, now).is_err());
        assert!(tokens.check(Some(&token), now).is_err());
        assert!(tokens.check(Some("Bearer nope"), now).is_err());
        let later = now + Duration::from_secs(61);
        assert!(matches!(
            tokens.check(Some(&header), later),
            Err(Error::Unauthorized(m)) if m == "token expired"
        ));
        assert_eq!(tokens.revoke_all(now), 1);
        assert!(tokens.check(Some(&header), now).is_err());
    }
}

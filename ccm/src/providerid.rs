//! The node `spec.providerID` format of CloudRaya VMs: `cloudraya://<vm-id>`.
//!
//! **Never change the format we write.** Provider IDs are stored on live Node objects
//! and are immutable once set (the API server refuses to change `spec.providerID`), and
//! load balancers are built from them. If the format ever has to evolve, keep writing
//! what old nodes carry and teach [`parse`] every format we have ever written.

use std::fmt;

/// The provider name as it appears before `://`. Never change.
pub const PROVIDER_NAME: &str = "cloudraya";

/// The prefix of every provider ID we write. Never change.
pub const PREFIX: &str = "cloudraya://";

/// Why a provider ID is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderIdError {
    #[error("provider ID {0:?} is empty")]
    Empty(String),
    #[error("provider ID {0:?} does not start with {PREFIX:?}")]
    ForeignProvider(String),
    #[error("provider ID {0:?} has no valid VM ID after {PREFIX:?}")]
    InvalidVmId(String),
}

/// A parsed provider ID: the CloudRaya VM ID.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProviderId {
    vm_id: String,
}

impl ProviderId {
    /// The provider ID of a VM. Panics never; an invalid VM ID is the caller's input.
    pub fn new(vm_id: impl Into<String>) -> Self {
        ProviderId { vm_id: vm_id.into() }
    }

    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }
}

impl fmt::Display for ProviderId {
    /// The format written to `spec.providerID`. Never change.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.vm_id)
    }
}

/// Parses every provider-ID format we have ever written. Today that is only
/// `cloudraya://<vm-id>`; also accepted: `cloudraya:///<vm-id>` (a triple slash, which
/// some tools produce when they treat the ID as a URL with an empty host).
pub fn parse(s: &str) -> Result<ProviderId, ProviderIdError> {
    if s.is_empty() {
        return Err(ProviderIdError::Empty(s.to_owned()));
    }
    let rest = s
        .strip_prefix(PREFIX)
        .ok_or_else(|| ProviderIdError::ForeignProvider(s.to_owned()))?;
    let vm_id = rest.strip_prefix('/').unwrap_or(rest);
    let valid = !vm_id.is_empty()
        && vm_id.len() <= 253
        && vm_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && vm_id != "."
        && vm_id != "..";
    if !valid {
        return Err(ProviderIdError::InvalidVmId(s.to_owned()));
    }
    Ok(ProviderId::new(vm_id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_is_stable() {
        // Stored on live Nodes: this string must never change.
        assert_eq!(ProviderId::new("vm-3f2a9c").to_string(), "cloudraya://vm-3f2a9c");
    }

    #[test]
    fn parses_what_we_write_and_the_triple_slash_form() {
        assert_eq!(
            parse("cloudraya://vm-1").map(|p| p.vm_id().to_owned()),
            Ok("vm-1".into())
        );
        assert_eq!(
            parse("cloudraya:///vm-1").map(|p| p.vm_id().to_owned()),
            Ok("vm-1".into())
        );
        let p = ProviderId::new("vm-42");
        assert_eq!(parse(&p.to_string()), Ok(p));
    }

    #[test]
    fn rejects_other_providers_and_garbage() {
        assert!(matches!(parse(""), Err(ProviderIdError::Empty(_))));
        assert!(matches!(
            parse("aws:///i-123"),
            Err(ProviderIdError::ForeignProvider(_))
        ));
        assert!(matches!(
            parse("kind://docker/kind/n1"),
            Err(ProviderIdError::ForeignProvider(_))
        ));
        assert!(matches!(parse("cloudraya://"), Err(ProviderIdError::InvalidVmId(_))));
        assert!(matches!(parse("cloudraya://a/b"), Err(ProviderIdError::InvalidVmId(_))));
        assert!(matches!(parse("cloudraya://.."), Err(ProviderIdError::InvalidVmId(_))));
    }
}

//! The CloudRaya platform stand-in: `docs/platform-api.md`, implemented.

pub mod forward;

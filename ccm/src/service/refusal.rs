//! Why a Service cannot get the load balancer it asks for ([`Refusal`]): what the
//! desired-state functions return instead of a load balancer.

use std::fmt;

use crate::annotations::AnnotationError;

/// Why a Service cannot get the load balancer it asks for. Each is reported as a
/// Warning Event and a condition; no platform call is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// An `lb.cloudraya.com/` annotation is invalid.
    Annotation(AnnotationError),
    /// A Service field the platform cannot honour.
    Unsupported { field: String, message: String },
    /// The Service needs IPv6 (`RequireDualStack`, or IPv6 only) and the platform
    /// cluster has none.
    Ipv6Unavailable { field: String, message: String },
}

impl Refusal {
    pub(crate) fn unsupported(field: impl Into<String>, message: impl Into<String>) -> Self {
        Refusal::Unsupported {
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn ipv6_unavailable(field: impl Into<String>, message: impl Into<String>) -> Self {
        Refusal::Ipv6Unavailable {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Annotation(_) => "InvalidAnnotation",
            Refusal::Unsupported { .. } => "UnsupportedServiceSpec",
            Refusal::Ipv6Unavailable { .. } => "IPv6Unavailable",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Annotation(e) => e.fmt(f),
            Refusal::Unsupported { field, message } | Refusal::Ipv6Unavailable { field, message } => {
                write!(f, "{field}: {message}")
            }
        }
    }
}

impl std::error::Error for Refusal {}

impl From<AnnotationError> for Refusal {
    fn from(e: AnnotationError) -> Self {
        Refusal::Annotation(e)
    }
}

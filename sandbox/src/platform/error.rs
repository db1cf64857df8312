//! The stand-in's one error type, and the one place that decides each error's status code
//! and envelope (innernet's `server/src/error.rs` shape).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::model::Envelope;

/// One invalid field of a request body (a 422 lists them all).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("invalid fields: {}", fields_text(.0))]
    Invalid(Vec<FieldError>),
    #[error("{message}")]
    TooManyRequests { message: String, retry_after_s: u64 },
    /// A status chosen by an injected fault rule.
    #[error("{message}")]
    Injected { status: StatusCode, message: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {source}")]
    StateFile {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{0}")]
    Internal(String),
}

fn fields_text(fields: &[FieldError]) -> String {
    fields
        .iter()
        .map(|f| format!("{}: {}", f.field, f.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Error::NotFound(format!("{what} {id} not found"))
    }

    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid(vec![FieldError::new(field, message)])
    }
}

impl From<&Error> for StatusCode {
    fn from(e: &Error) -> StatusCode {
        match e {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Injected { status, .. } => *status,
            Error::Io { .. } | Error::StateFile { .. } | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from(&self);
        if status.is_server_error() && !matches!(self, Error::Injected { .. }) {
            tracing::error!(error = %self, "request failed");
        }
        let error = match &self {
            Error::Invalid(fields) => serde_json::to_value(fields).unwrap_or_default(),
            other => serde_json::Value::String(other.to_string()),
        };
        let mut response = Envelope::error(status, &error).into_response();
        if let Error::TooManyRequests { retry_after_s, .. } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        response
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

//! The one error type of the HTTP layer. Each API surface renders it in its own envelope;
//! internal details (database errors) are logged, never sent.

use std::marker::PhantomData;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::service::ServiceError;
use crate::store::StoreError;

/// How a surface wraps an error.
pub trait Envelope: Send + Sync + 'static {
    /// The JSON body for an error.
    fn body(code: &str, message: &str, long_message: &str, field: Option<&str>) -> Vec<u8>;
}

/// The error object both envelopes share (serialised from borrowed text: an error answer on the
/// verify hot path builds no intermediate JSON tree).
#[derive(Serialize)]
struct ErrorObject<'a> {
    code: &'a str,
    message: &'a str,
    long_message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    meta: Option<Meta<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

#[derive(Serialize)]
struct Meta<'a> {
    param_name: &'a str,
}

/// Clerk's Backend API envelope: `{"errors":[{"code","message","long_message","meta"}]}`.
#[derive(Debug)]
pub enum Clerk {}

impl Envelope for Clerk {
    fn body(code: &str, message: &str, long_message: &str, field: Option<&str>) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            errors: [ErrorObject<'a>; 1],
        }
        let error = ErrorObject {
            code,
            message,
            long_message,
            meta: field.map(|param_name| Meta { param_name }),
            field: None,
        };
        serde_json::to_vec(&Body { errors: [error] }).unwrap_or_default()
    }
}

/// The tutorial's envelope: `{"success":false,"error":{"code","message","field"}}`, which its
/// samples read as `result.success` / `result.error`.
#[derive(Debug)]
pub enum Tutorial {}

impl Envelope for Tutorial {
    fn body(code: &str, message: &str, long_message: &str, field: Option<&str>) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            success: bool,
            error: ErrorObject<'a>,
        }
        let error = ErrorObject {
            code,
            message,
            long_message,
            meta: None,
            field,
        };
        serde_json::to_vec(&Body {
            success: false,
            error,
        })
        .unwrap_or_default()
    }
}

/// An error answer: status, stable code, human message, and the offending field if any.
#[derive(Debug)]
pub struct ApiError<E> {
    status: StatusCode,
    code: &'static str,
    message: String,
    long_message: String,
    field: Option<String>,
    envelope: PhantomData<E>,
}

impl<E> ApiError<E> {
    /// An error with a one-line message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            status,
            code,
            long_message: message.clone(),
            message,
            field: None,
            envelope: PhantomData,
        }
    }

    /// Names the field at fault.
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Adds a longer explanation (Clerk's `long_message`).
    pub fn long(mut self, long_message: impl Into<String>) -> Self {
        self.long_message = long_message.into();
        self
    }

    /// Missing or wrong admin credentials.
    pub fn unauthorized(message: &str) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "authentication_invalid", message)
    }

    /// An unknown key id (malformed ids included: they cannot exist).
    pub fn key_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "resource_not_found",
            "No API key was found with this id.",
        )
    }
}

impl<E: Envelope> IntoResponse for ApiError<E> {
    fn into_response(self) -> Response {
        let body = E::body(
            self.code,
            &self.message,
            &self.long_message,
            self.field.as_deref(),
        );
        let mut response = (
            self.status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl<E> From<ServiceError> for ApiError<E> {
    fn from(error: ServiceError) -> Self {
        match error {
            ServiceError::Invalid { field, message } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "form_param_invalid",
                format!("{field}: {message}"),
            )
            .field(field),
            ServiceError::NotFound => Self::key_not_found(),
            ServiceError::Revoked => Self::new(
                StatusCode::CONFLICT,
                "api_key_revoked",
                "The API key is revoked; a revoked key cannot be changed.",
            ),
            ServiceError::Expired => Self::new(
                StatusCode::CONFLICT,
                "api_key_expired",
                "The API key has expired; an expired key cannot be rolled.",
            ),
            ServiceError::AlreadyRolled(successor) => Self::new(
                StatusCode::CONFLICT,
                "api_key_already_rolled",
                format!("The API key was already rolled, to {successor}; roll that key instead."),
            ),
            ServiceError::Conflict => Self::new(
                StatusCode::CONFLICT,
                "conflict",
                "The API key was changed concurrently; retry the request.",
            ),
            ServiceError::Store(e) => Self::from(e),
        }
    }
}

impl<E> From<StoreError> for ApiError<E> {
    fn from(error: StoreError) -> Self {
        tracing::error!(%error, "storage failure");
        if let Some(why) = error.unavailable() {
            return Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_unavailable",
                format!("The key store cannot take writes right now ({why}); retry later."),
            );
        }
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "Something went wrong on our side.",
        )
    }
}

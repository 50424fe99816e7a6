//! An HTTP answer that is not a success: a status, a message for a person,
//! and the protocol headers that go with it.

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use behest_stream::HubError;

/// A refusal, sent before any byte of a body.
#[derive(Debug, Clone)]
pub struct Problem {
    status: StatusCode,
    message: String,
    headers: Vec<(HeaderName, String)>,
}

impl Problem {
    /// A refusal with `status` and `message`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404.
    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "no such stream")
    }

    /// 409.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    /// 410: the stream was deleted, and forks of it still read it.
    pub fn gone() -> Self {
        Self::new(StatusCode::GONE, "stream deleted")
    }

    /// Adds a header to the answer.
    #[must_use]
    pub fn with(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers
            .push((HeaderName::from_static(name), value.into()));
        self
    }

    /// The status it answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<HubError> for Problem {
    fn from(error: HubError) -> Self {
        let status = match &error {
            HubError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            HubError::RunClosed { .. } => StatusCode::CONFLICT,
            HubError::RunRemoved { .. } => StatusCode::GONE,
            HubError::CursorEpoch { .. } => StatusCode::CONFLICT,
            HubError::CursorAhead { .. } => StatusCode::BAD_REQUEST,
            HubError::Closed => StatusCode::SERVICE_UNAVAILABLE,
            HubError::RoomUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            HubError::Store(e) if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, error.to_string())
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut response = (self.status, self.message).into_response();
        for (name, value) in self.headers {
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

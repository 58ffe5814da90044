//! A client of the admin API, for `tollgate admin` (and scripts in Rust): so that an operator
//! never hand-writes `curl` lines.

use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Calls the admin API at `base` with the bearer `token`.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    client: Client<HttpConnector, Full<bytes::Bytes>>,
}

/// An answer: its status and body.
#[derive(Debug, Clone)]
pub struct AdminReply {
    /// The HTTP status.
    pub status: u16,
    /// The body (JSON, or a problem document).
    pub body: serde_json::Value,
}

/// Why a call could not be made.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The URL is not one.
    #[error("`{0}` is not an admin URL like `http://127.0.0.1:9091`")]
    Url(String),
    /// Nothing answered.
    #[error("cannot reach the admin API at {base}: {reason}")]
    Unreachable {
        /// Where.
        base: String,
        /// Why.
        reason: String,
    },
}

impl AdminClient {
    /// A client of the admin API at `base` (`http://127.0.0.1:9091`).
    pub fn new(base: &str, token: &str) -> Result<Self, AdminError> {
        let base = base.trim_end_matches('/').to_owned();
        if base.parse::<http::Uri>().is_err() || !base.starts_with("http://") {
            return Err(AdminError::Url(base));
        }
        Ok(AdminClient {
            base,
            token: token.to_owned(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// Calls `method` on `path_and_query` with an optional JSON `body`.
    pub async fn call(
        &self,
        method: http::Method,
        path_and_query: &str,
        body: Option<serde_json::Value>,
    ) -> Result<AdminReply, AdminError> {
        let uri = format!("{}{path_and_query}", self.base);
        let unreachable = |reason: String| AdminError::Unreachable {
            base: self.base.clone(),
            reason,
        };
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let request = http::Request::builder()
            .method(method)
            .uri(&uri)
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token),
            )
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(bytes)))
            .map_err(|e| AdminError::Url(format!("{uri}: {e}")))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let body = serde_json::from_slice(&body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into()));
        Ok(AdminReply { status, body })
    }
}

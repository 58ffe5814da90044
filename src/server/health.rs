//! Health (`/healthz`, `/readyz`) and the answer to unknown paths.

use super::*;

pub(super) async fn ready<S: Store, C: Clock>(State(app): State<Arc<AppState<S, C>>>) -> Response {
    let engine = app.pipeline.engine();
    match engine.store().ping().await {
        Ok(()) => (
            StatusCode::OK,
            format!("ready: plan {}", engine.plan().version()),
        )
            .into_response(),
        Err(e) => problem_response(
            Problem::new(
                "urn:tollgate:problem:not-ready",
                "Service Unavailable",
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {e}"),
            ),
            &crate::request::request_id(&HeaderMap::new()),
        ),
    }
}

pub(super) async fn not_found(request: Request) -> Response {
    let request_id = crate::request::request_id(request.headers());
    problem_response(
        Problem::new(
            "urn:tollgate:problem:not-found",
            "Not Found",
            StatusCode::NOT_FOUND,
            format!("no endpoint at `{}`", request.uri().path()),
        ),
        &request_id,
    )
}

pub(super) fn set_request_id(headers: &mut HeaderMap, request_id: &str) {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
}

//! Forward-auth (`GET|POST /v1/auth`) for Traefik `ForwardAuth` and nginx
//! `auth_request`.

use super::extract::RequestId;
use super::*;

/// Traefik sends `X-Forwarded-Method`, `-Uri`, `-Host`, `-For`; nginx `X-Original-URI` and
/// `X-Original-Method` (and the `X-Forwarded-For` its config sets). The answer: 200 to allow;
/// to refuse, Traefik gets the real status, headers and body; nginx, which understands only
/// 401 and 403 from an auth endpoint, gets 403 with the real status in `X-Tollgate-Status`.
pub(super) async fn forward_auth<S: Store, C: Clock>(
    State(app): State<Arc<AppState<S, C>>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RequestId(request_id): RequestId,
    request: Request,
) -> Response {
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let nginx = headers.contains_key("x-original-uri");
    let method = text("x-forwarded-method")
        .or_else(|| text("x-original-method"))
        .and_then(|m| Method::from_bytes(m.as_bytes()).ok())
        .unwrap_or_else(|| request.method().clone());
    let uri = text("x-forwarded-uri")
        .or_else(|| text("x-original-uri"))
        .unwrap_or("/")
        .to_owned();
    let mut ctx = match RequestCtx::try_new(method, &uri) {
        Ok(ctx) => ctx,
        Err(e) => {
            let problem = Problem::bad_request(format!("the forwarded URI `{uri}`: {e}"));
            return problem_response(problem, &request_id);
        }
    };
    let host = text("x-forwarded-host")
        .or_else(|| text("host"))
        .map(str::to_owned);
    ctx.headers = headers.clone();
    if let Some(host) = host {
        ctx = ctx.with_host(&host);
    }
    if !app.options.identifier.is_trusted(peer.ip()) && ctx.headers.contains_key("x-forwarded-for")
    {
        tracing::debug!(peer = %peer.ip(), "forward-auth from an untrusted peer: X-Forwarded-For ignored; add the proxy to trusted_proxies");
    }
    app.options.identifier.identify(&mut ctx, Some(peer.ip()));
    let admission = app.pipeline.admit(&ctx, request_id, None).await;
    admission.hold().await;
    let headers_to_send = app.options.headers;
    let mut response = match &admission.problem {
        None => {
            let mut r = StatusCode::OK.into_response();
            response::write_rate_limit_headers(
                &admission.verdict,
                headers_to_send,
                r.headers_mut(),
            );
            r
        }
        Some(problem) => {
            let mut r = crate::response::refusal(
                &admission.verdict,
                problem,
                headers_to_send,
                admission.request_id(),
            );
            if let Some(policy) = problem
                .policy
                .as_deref()
                .and_then(|p| HeaderValue::from_str(p).ok())
            {
                r.headers_mut().insert(X_TOLLGATE_POLICY.clone(), policy);
            }
            r.headers_mut()
                .insert(X_TOLLGATE_STATUS.clone(), HeaderValue::from(problem.status));
            if nginx && !matches!(problem.status, 401 | 403) {
                *r.status_mut() = StatusCode::FORBIDDEN;
            }
            r
        }
    };
    set_request_id(response.headers_mut(), admission.request_id());
    let status = admission.status();
    // The gateway's `/v1/report` settles what the request reserved, once it has the
    // response; never at this answer.
    let mut admission = admission;
    admission.verdict.reservations.clear();
    app.pipeline.engine().await_report(&mut admission.verdict);
    admission.complete(status);
    response
}

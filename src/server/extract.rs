//! The preamble every handler shares, decision API and admin API alike: the request's id
//! (read once, kept in the request's extensions), a JSON body read strictly, query
//! parameters; a bad one is refused with a problem document carrying that id.

use axum::extract::{FromRequest, FromRequestParts, Query};
use http::request::Parts;

use super::*;

/// The request's id: its `X-Request-Id` when well-formed, else a new one — the same for every
/// extractor of one request.
#[derive(Debug, Clone)]
pub(super) struct RequestId(pub(super) String);

impl RequestId {
    fn of(parts: &mut Parts) -> String {
        if let Some(RequestId(id)) = parts.extensions.get::<RequestId>() {
            return id.clone();
        }
        let id = crate::request::request_id(&parts.headers);
        parts.extensions.insert(RequestId(id.clone()));
        id
    }
}

impl<St: Send + Sync> FromRequestParts<St> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &St) -> Result<Self, Self::Rejection> {
        Ok(RequestId(RequestId::of(parts)))
    }
}

/// A refusal before the handler ran: a problem document, with the request's id.
#[derive(Debug)]
pub(super) struct Refused {
    problem: Box<Problem>,
    request_id: String,
}

impl Refused {
    pub(super) fn new(problem: Box<Problem>, request_id: &str) -> Self {
        Refused {
            problem,
            request_id: request_id.to_owned(),
        }
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        problem_response(*self.problem, &self.request_id)
    }
}

/// What bounds the bodies a listener reads.
pub(super) trait BodyLimit {
    /// The largest body accepted, in bytes.
    fn max_body_bytes(&self) -> usize;
}

/// A JSON body of type `T`, read strictly (see [`read_json`]).
#[derive(Debug)]
pub(super) struct JsonBody<T>(pub(super) T);

impl<T, St> FromRequest<Arc<St>> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    St: BodyLimit + Send + Sync,
{
    type Rejection = Refused;

    async fn from_request(request: Request, state: &Arc<St>) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = request.into_parts();
        let request_id = RequestId::of(&mut parts);
        let request = Request::from_parts(parts, body);
        read_json(request, state.max_body_bytes())
            .await
            .map(JsonBody)
            .map_err(|problem| Refused::new(problem, &request_id))
    }
}

/// Query parameters of type `T`, unknown ones refused.
#[derive(Debug)]
pub(super) struct QueryParams<T>(pub(super) T);

impl<T, St> FromRequestParts<St> for QueryParams<T>
where
    T: serde::de::DeserializeOwned,
    St: Send + Sync,
{
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, state: &St) -> Result<Self, Self::Rejection> {
        let request_id = RequestId::of(parts);
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(query)) => Ok(QueryParams(query)),
            Err(e) => Err(Refused::new(
                Box::new(Problem::bad_request(e.body_text())),
                &request_id,
            )),
        }
    }
}

/// The body as JSON of type `T`, or a problem naming what is wrong and where: at most
/// `limit` bytes, one document, every field known.
pub(super) async fn read_json<T: serde::de::DeserializeOwned>(
    request: Request,
    limit: usize,
) -> Result<T, Box<Problem>> {
    let bytes = axum::body::to_bytes(request.into_body(), limit)
        .await
        .map_err(|_| {
            Box::new(Problem::new(
                "urn:tollgate:problem:too-large",
                "Content Too Large",
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {limit} bytes"),
            ))
        })?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = without_position(&inner.to_string());
        let mut p = Problem::bad_request(if path == "." || inner.is_syntax() || inner.is_eof() {
            format!("invalid JSON: {message}")
        } else {
            format!("invalid field `{path}`: {message}")
        });
        if path != "." {
            p.field = Some(path);
        }
        Box::new(p)
    })?;
    // One JSON document: anything after it but whitespace is refused, not ignored.
    de.end().map_err(|e| {
        let message = without_position(&e.to_string());
        Box::new(Problem::bad_request(format!("invalid JSON: {message}")))
    })?;
    Ok(value)
}

/// serde_json's message without its "at line 1 column 7": the field path says more.
fn without_position(message: &str) -> String {
    message
        .rsplit_once(" at line ")
        .map_or(message, |(m, _)| m)
        .to_owned()
}

/// The problem of a request field.
pub(super) fn field_problem(field: &str, message: String) -> Box<Problem> {
    let mut p = Problem::bad_request(format!("invalid field `{field}`: {message}"));
    p.field = Some(field.to_owned());
    Box::new(p)
}

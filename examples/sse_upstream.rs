//! An OpenAI-style streaming upstream for `scripts/bench-usage.sh`: every request to
//! `/v1/chat/completions` (any method) is answered as a `text/event-stream` of `CHUNKS`
//! content chunks and a last chunk with `usage` (its `total_tokens` cycling through 10 to
//! 2,000), then `data: [DONE]`, as OpenAI answers with `stream_options.include_usage`.
//!
//! `cargo run --release --example sse_upstream -- PORT [CHUNKS]`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Body;
use axum::routing::any;
use bytes::Bytes;
use http::{Response, header};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(9000);
    let chunks: usize = args.next().and_then(|c| c.parse().ok()).unwrap_or(8);
    let served = Arc::new(AtomicU64::new(0));
    let app = Router::new().route(
        "/v1/chat/completions",
        any(move || {
            let n = served.fetch_add(1, Ordering::Relaxed);
            async move { stream(chunks, 10 + n % 1_991) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .expect("the port is free");
    // Each frame goes out as it is written, as a streaming API's do.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await.expect("serves");
}

/// `chunks` content chunks, then the usage, then `[DONE]`, as separate body frames.
fn stream(chunks: usize, total: u64) -> Response<Body> {
    let content = Bytes::from_static(
        b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"token \"}}],\"usage\":null}\n\n",
    );
    let usage = Bytes::from(format!(
        "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"choices\":[],\"usage\":{{\"prompt_tokens\":5,\"completion_tokens\":{},\"total_tokens\":{total}}}}}\n\n",
        total - 5
    ));
    let frames = std::iter::repeat_n(content, chunks)
        .chain([usage, Bytes::from_static(b"data: [DONE]\n\n")])
        .map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(futures_util::stream::iter(frames)))
        .expect("a response")
}

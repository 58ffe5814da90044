//! Byte limits pace streamed responses, on paused tokio time.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, to_bytes};
use http::Method;
use tollgate::store::MemoryStore;
use tollgate::{Engine, PolicySet, RequestCtx, Timestamp, TokioClock, compile};

#[tokio::test(start_paused = true)]
#[expect(clippy::disallowed_methods, reason = "measures paused tokio time")]
async fn a_byte_limit_paces_a_streamed_body() {
    // 200 KB per second, 200 KB at once: ten 100 KB chunks take (1000 - 200) / 200 = 4 s.
    let policy = r#"limit download { key connection; counts bytes; algorithm token_bucket;
                    rate 200_000/s burst 200_000; }"#;
    let plan = compile(&PolicySet::from_sources([("p.rl", policy)])).unwrap();
    let clock = TokioClock::starting_at(Timestamp::from_secs(1_700_006_400));
    let engine = Arc::new(Engine::with_clock(plan, MemoryStore::new(), clock));
    let mut ctx = RequestCtx::new(Method::GET, "/download");
    ctx.connection_id = Some(7);
    let chunks = futures_util::stream::iter(
        (0..10).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![0u8; 100_000]))),
    );
    let start = tokio::time::Instant::now();
    let body = tollgate::proxy::pace(engine, ctx, Body::from_stream(chunks));
    let bytes = to_bytes(body, usize::MAX).await.unwrap();
    assert_eq!(bytes.len(), 1_000_000);
    assert_eq!(start.elapsed(), Duration::from_secs(4));
}

#[tokio::test(start_paused = true)]
#[expect(clippy::disallowed_methods, reason = "measures paused tokio time")]
async fn without_byte_limits_bodies_pass_untouched() {
    let plan = compile(&PolicySet::from_sources([(
        "p.rl",
        "limit l { rate 1/min; }",
    )]))
    .unwrap();
    let engine = Arc::new(Engine::new(plan, MemoryStore::new()));
    let start = tokio::time::Instant::now();
    let body = tollgate::proxy::pace(
        engine,
        RequestCtx::new(Method::GET, "/"),
        Body::from(vec![1u8; 10]),
    );
    assert_eq!(to_bytes(body, 100).await.unwrap().len(), 10);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

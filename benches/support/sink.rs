//! A stand-in ClickHouse for export figures: answers 200 to every request, reading its body
//! (the insert), so that what is measured is Tollgate's side. Included by the benchmarks and
//! the load examples.

/// Serves on a free local port, on the current runtime; its address.
pub(crate) async fn insert_sink() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|body: axum::body::Bytes| async move {
        std::hint::black_box(body.len());
        ""
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A client for the stand-in at `addr`.
pub(crate) fn sink_client(addr: std::net::SocketAddr) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(format!("http://{addr}"))
        .with_validation(false)
}

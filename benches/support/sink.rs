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

/// The stand-in on a thread and runtime of its own, as a ClickHouse elsewhere would be: its
/// work never holds up the workers of the app measured.
#[allow(dead_code, reason = "not every benchmark or example uses it")]
pub(crate) fn insert_sink_apart() -> std::net::SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            tx.send(insert_sink().await).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}

/// A client for the stand-in at `addr`.
pub(crate) fn sink_client(addr: std::net::SocketAddr) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(format!("http://{addr}"))
        .with_validation(false)
}

/// A client for the ClickHouse at `url`, its schema migrated into `tollgate`.
#[allow(dead_code, reason = "not every benchmark or example uses it")]
pub(crate) async fn migrated_client(url: &str) -> clickhouse::Client {
    let client = tollgate::analytics::client(url)
        .await
        .expect("ClickHouse answers");
    tollgate::analytics::migrate(&client, "tollgate")
        .await
        .expect("migrations run");
    client
}

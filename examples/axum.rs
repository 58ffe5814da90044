//! An axum service rate-limited by the shipped policies.
//!
//! `cargo run --example axum`, then
//! `for i in $(seq 6); do curl -si -XPOST localhost:3000/auth/login | head -1; done`:
//! the sixth login in a minute gets `429 Too Many Requests` with a problem+json body.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use tollgate::store::MemoryStore;
use tollgate::{Engine, PolicySet, RateLimitLayer, compile};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let plan = match compile(&PolicySet::load(&["policies"])) {
        Ok(plan) => plan,
        Err(errors) => {
            eprintln!("{}", errors.render_plain(100));
            std::process::exit(1);
        }
    };
    let engine = Arc::new(Engine::new(plan, MemoryStore::new()));

    let app = Router::new()
        .route("/auth/login", post(|| async { "welcome" }))
        .route("/api/v1/items/{id}", get(|| async { "an item" }))
        // Every limit of the policies applies by its `match` block; a route could also name
        // its limit with `.route_layer(tollgate::middleware::limit(&engine, "login"))`.
        .layer(RateLimitLayer::new(engine));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    println!("listening on http://127.0.0.1:3000");
    // The peer address is how clients are told apart.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await?;
    Ok(())
}

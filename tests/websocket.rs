//! WebSockets through `tollgate serve --upstream`: messages are relayed both ways, and a
//! message limit closes the connection with 1008 and the policy's reason.

mod support;

use futures_util::{SinkExt, StreamExt};
use support::{TestApp, TestServer};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

async fn connect(
    proxy: &TestServer,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let (socket, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", proxy.addr))
        .await
        .expect("the handshake goes through the proxy");
    socket
}

/// Sends `n` messages and reads their echoes.
async fn exchange(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    n: usize,
) {
    for i in 0..n {
        socket
            .send(Message::text(format!("hello {i}")))
            .await
            .unwrap();
        match socket.next().await {
            Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), format!("hello {i}")),
            other => panic!("expected an echo, got {other:?}"),
        }
    }
}

/// The next message must be a close frame with 1008 and `reason`.
async fn expect_policy_close(
    socket: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    reason: &str,
) {
    socket.send(Message::text("one too many")).await.unwrap();
    match socket.next().await {
        Some(Ok(Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Policy);
            assert_eq!(frame.reason.as_str(), reason);
        }
        other => panic!("expected a 1008 close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_connection_message_limit_closes_with_1008() {
    let app = TestApp::start();
    let proxy = TestServer::start_proxy(
        r#"limit chat { match { route GET "/ws"; } key connection; counts messages;
           algorithm fixed_window; rate 3/min; on_exceed reject 429 reason "too many messages"; }"#,
        app.addr,
    );
    let mut socket = connect(&proxy).await;
    exchange(&mut socket, 3).await;
    expect_policy_close(&mut socket, "too many messages").await;
    // A new connection has its own count.
    let mut again = connect(&proxy).await;
    exchange(&mut again, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_key_message_limit_spans_connections() {
    let app = TestApp::start();
    let proxy = TestServer::start_proxy(
        r#"limit chat { match { route GET "/ws"; } key ip; counts messages;
           algorithm fixed_window; rate 4/min; }"#,
        app.addr,
    );
    let mut first = connect(&proxy).await;
    exchange(&mut first, 2).await;
    let mut second = connect(&proxy).await;
    exchange(&mut second, 2).await;
    expect_policy_close(&mut second, "message limit `chat` exceeded").await;
}

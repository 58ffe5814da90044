//! A TCP proxy between regions, for tests: it forwards to one address, delaying what passes
//! each way (the one-way latency, drawn per chunk from a range, order kept), and can be cut
//! — every connection through it closed and new ones refused — then healed.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

struct State {
    /// The one-way latency's range, ms.
    min_ms: AtomicU64,
    max_ms: AtomicU64,
    cut: AtomicBool,
    /// Bumped on every cut: connections opened before it close.
    cuts: watch::Sender<u64>,
}

/// A running proxy, stopped on drop.
pub struct Netem {
    /// Where to connect to be forwarded.
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Netem {
    /// A proxy to `target` on a free port, with no latency.
    pub fn start(target: SocketAddr) -> Netem {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let (cuts, _) = watch::channel(0);
        let state = Arc::new(State {
            min_ms: AtomicU64::new(0),
            max_ms: AtomicU64::new(0),
            cut: AtomicBool::new(false),
            cuts,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = Arc::clone(&state);
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener).unwrap();
                tokio::select! {
                    _ = stopped => {}
                    () = accept(listener, target, shared) => {}
                }
            });
        });
        Netem {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Delays what passes each way by a latency drawn from `range` per chunk.
    pub fn set_latency(&self, range: Range<Duration>) {
        self.state
            .min_ms
            .store(range.start.as_millis() as u64, Ordering::Relaxed);
        self.state
            .max_ms
            .store(range.end.as_millis() as u64, Ordering::Relaxed);
    }

    /// Cuts the link (every connection closed, new ones refused) or heals it.
    pub fn cut(&self, cut: bool) {
        self.state.cut.store(cut, Ordering::Relaxed);
        if cut {
            self.state.cuts.send_modify(|n| *n += 1);
        }
    }
}

impl Drop for Netem {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if state.cut.load(Ordering::Relaxed) {
            drop(client);
            continue;
        }
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let mut cuts = state.cuts.subscribe();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::select! {
                () = forward(client_read, server_write, &state) => {}
                () = forward(server_read, client_write, &state) => {}
                _ = cuts.changed() => {}
            }
        });
    }
}

/// One direction: each chunk read is written once its latency has passed, in order.
#[expect(
    clippy::disallowed_methods,
    reason = "network emulation: latency is real time on the wire"
)]
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: &State,
) {
    let (chunks, mut queued) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let reading = async move {
        let mut buf = vec![0u8; 16 * 1024];
        let mut last = tokio::time::Instant::now();
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let (min, max) = (
                state.min_ms.load(Ordering::Relaxed),
                state.max_ms.load(Ordering::Relaxed),
            );
            let ms = if max > min {
                rand::random_range(min..max)
            } else {
                min
            };
            // Order is kept: a chunk never overtakes the one before it.
            let due = (tokio::time::Instant::now() + Duration::from_millis(ms)).max(last);
            last = due;
            if chunks.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    let writing = async move {
        while let Some((due, bytes)) = queued.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    tokio::join!(reading, writing);
}

//! Drives a future that completes without waiting (the memory store never waits), without a
//! runtime, so that a figure is the code measured itself. Included by the benchmarks.

use std::pin::pin;
use std::task::{Context, Poll, Waker};

pub(crate) fn ready<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let mut cx = Context::from_waker(Waker::noop());
    match future.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store never waits"),
    }
}

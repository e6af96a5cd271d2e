//! Time limits on HBONE connections, on whatever runtime the [`Executor`] is: a bounded wait for
//! any future, and the HTTP/2 PING keepalive that declares a silent peer gone.
//!
//! Keepalive: after every [`Timeouts::ping_interval`] a PING is sent; an answer within
//! [`Timeouts::ping_timeout`] keeps the connection, silence ends it (the caller drops the h2
//! connection, which fails its streams with an error, and the pool dials afresh). A peer that
//! vanished (power off, partition, blackholed packets) is so detected within interval +
//! timeout, 30 s with the defaults, instead of at the kernel's retransmission limit
//! (~15 minutes).

use std::{future::Future, pin::pin, time::Duration};

use futures_util::future::{select, Either};

use crate::{
    settings::{TimeoutKind, Timeouts},
    Executor,
};

/// `fut`'s output, or `None` if `limit` passed first (then `fut` is dropped).
pub async fn within<X: Executor, F: Future>(
    executor: &X,
    limit: Duration,
    fut: F,
) -> Option<F::Output> {
    match select(pin!(fut), executor.sleep(limit)).await {
        Either::Left((out, _)) => Some(out),
        Either::Right(_) => None,
    }
}

/// Ping the peer until it stops answering; completes only then (or never, when keepalive is
/// off or the connection ends on its own, which makes `ping` fail: the caller sees the end
/// through the connection itself).
pub(crate) async fn until_peer_silent<X: Executor>(
    ping_pong: Option<h2::PingPong>,
    timeouts: &Timeouts,
    executor: &X,
) {
    let Some(mut pp) = ping_pong.filter(|_| !timeouts.ping_interval.is_zero()) else {
        return std::future::pending().await;
    };
    loop {
        executor.sleep(timeouts.ping_interval).await;
        match within(executor, timeouts.ping_timeout, pp.ping(h2::Ping::opaque())).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                // The connection is closing (or closed): it ends by itself.
                tracing::trace!(error = %e, "HBONE ping failed");
                return std::future::pending().await;
            }
            None => {
                timeouts.fired(TimeoutKind::Keepalive);
                tracing::warn!(
                    timeout_ms = timeouts.ping_timeout.as_millis() as u64,
                    "HBONE peer did not answer an HTTP/2 PING in time; closing the connection (its streams fail, new ones dial afresh)"
                );
                return;
            }
        }
    }
}

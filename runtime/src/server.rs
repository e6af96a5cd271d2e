//! The accept loop every zring listener runs on a worker.

use std::{future::Future, net::SocketAddr, time::Duration};

use monoio::net::{TcpListener, TcpStream};

use crate::drain::Drain;

/// How long to back off after an accept error that is about resources (`EMFILE`, `ENFILE`,
/// `ENOBUFS`, `ENOMEM`): long enough not to spin, short enough to recover quickly once
/// connections close.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Accept connections until `drain` starts, calling `on_accept` for each; then drop the listener,
/// so the kernel refuses new connections to this worker. `on_accept` should spawn the connection
/// task (tracking it with [`Drain::track`]) and return at once.
pub async fn accept_loop<F>(listener: TcpListener, drain: &Drain, mut on_accept: F)
where
    F: FnMut(TcpStream, SocketAddr),
{
    let local = listener.local_addr().ok();
    loop {
        monoio::select! {
            _ = drain.signaled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => on_accept(stream, peer),
                Err(e) => {
                    let transient = matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED) | Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EPROTO)
                    );
                    if transient {
                        tracing::debug!(listener = ?local, error = %e, "accept: transient error");
                    } else {
                        tracing::warn!(listener = ?local, error = %e, "accept failed; backing off (raise the fd limit if this is EMFILE)");
                        monoio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    }
                }
            },
        }
    }
    drop(listener);
}

/// Spawn `fut` on the current worker as a tracked connection of `drain`.
///
/// The task holds `fut` once. An `async move { fut.await }` wrapper would keep room for it
/// twice (the captured value and the awaited one), and connection futures are several KiB: the
/// task is the largest per-connection allocation of an idle connection.
pub fn spawn_tracked<F>(drain: &Drain, fut: F)
where
    F: Future<Output = ()> + 'static,
{
    monoio::spawn(Tracked {
        fut,
        _guard: drain.track(),
    });
}

/// A future that keeps a connection counted in its drain until it completes or is dropped.
struct Tracked<F> {
    fut: F,
    _guard: crate::drain::ConnGuard,
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        // SAFETY: structural pinning of `fut`: it is never moved out of `Tracked` (no method
        // hands it out by value, `Tracked` has no `Drop` impl that could move it, and it is not
        // `Unpin` unless `F` is), so pinning `Tracked` pins `fut` for its whole life.
        unsafe { self.map_unchecked_mut(|t| &mut t.fut) }.poll(cx)
    }
}

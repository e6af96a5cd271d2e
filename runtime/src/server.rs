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
pub fn spawn_tracked<F>(drain: &Drain, fut: F)
where
    F: Future<Output = ()> + 'static,
{
    let guard = drain.track();
    monoio::spawn(async move {
        fut.await;
        drop(guard);
    });
}

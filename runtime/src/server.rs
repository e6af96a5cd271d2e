//! The accept loop every zring listener runs on a worker.

use std::{
    cell::Cell,
    future::Future,
    net::SocketAddr,
    sync::atomic::{AtomicU64, Ordering},
    task::Poll,
    time::Duration,
};

use monoio::net::{TcpListener, TcpStream};

use crate::drain::Drain;

/// How long to back off after an accept error that is about resources (`EMFILE`, `ENFILE`,
/// `ENOBUFS`, `ENOMEM`): long enough not to spin, short enough to recover quickly once
/// connections close.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Accept connections until `drain` starts, calling `on_accept` for each with its addresses;
/// then drop the listener, so the kernel refuses new connections to this worker. `on_accept`
/// should spawn the connection task ([`spawn_tracked`]) and return at once.
pub async fn accept_loop<F>(listener: TcpListener, drain: &Drain, mut on_accept: F)
where
    F: FnMut(TcpStream, ConnAddrs),
{
    let local = listener.local_addr().ok();
    loop {
        monoio::select! {
            _ = drain.signaled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => on_accept(stream, ConnAddrs { peer, local }),
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
///
/// A panic inside `fut` is contained: the task ends (dropping, and so closing, the connection's
/// sockets), [`task_panics`] counts it and one error line names `conn` (the connection's
/// addresses) and the panic message; the worker and its other connections go on.
pub fn spawn_tracked<F>(drain: &Drain, conn: ConnAddrs, fut: F)
where
    F: Future<Output = ()> + 'static,
{
    monoio::spawn(Tracked {
        fut,
        conn,
        panicked: false,
        _guard: drain.track(),
    });
}

/// A connection's addresses, for the one log line of a contained panic.
#[derive(Debug, Clone, Copy)]
pub struct ConnAddrs {
    /// The peer that connected.
    pub peer: SocketAddr,
    /// The listener's address.
    pub local: Option<SocketAddr>,
}

static TASK_PANICS: AtomicU64 = AtomicU64::new(0);

/// Connection tasks that panicked (and were contained) since the process started.
pub fn task_panics() -> u64 {
    TASK_PANICS.load(Ordering::Relaxed)
}

thread_local! {
    /// Set while a connection task is polled: the panic hook then stays quiet, and the task's
    /// wrapper logs the panic once with the connection's addresses.
    static IN_CONN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// Install a panic hook that stays quiet for panics contained in connection tasks (they are
/// logged once by the task's wrapper) and defers to the previous hook for every other panic.
/// Idempotent enough for one call from `main`.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !IN_CONN_TASK.with(Cell::get) {
            previous(info);
        }
    }));
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not a string)")
}

/// A future that keeps a connection counted in its drain until it completes or is dropped, and
/// contains panics of the connection's future.
struct Tracked<F> {
    fut: F,
    conn: ConnAddrs,
    panicked: bool,
    _guard: crate::drain::ConnGuard,
}

impl<F: Future<Output = ()>> Future for Tracked<F> {
    type Output = ();
    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        // SAFETY: structural pinning of `fut`: it is never moved out of `Tracked` (no method
        // hands it out by value, `Tracked` has no `Drop` impl that could move it, and it is not
        // `Unpin` unless `F` is), so pinning `Tracked` pins `fut` for its whole life. The other
        // fields are not pinned and are only read or assigned in place.
        let this = unsafe { self.get_unchecked_mut() };
        if this.panicked {
            return Poll::Ready(());
        }
        // SAFETY: see above: `fut` stays where it is until `Tracked` is dropped.
        let fut = unsafe { std::pin::Pin::new_unchecked(&mut this.fut) };
        IN_CONN_TASK.with(|f| f.set(true));
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx)));
        IN_CONN_TASK.with(|f| f.set(false));
        match polled {
            Ok(p) => p,
            Err(payload) => {
                // The future is left as the panic found it and is never polled again; it is
                // dropped with the task, closing the connection's sockets.
                this.panicked = true;
                TASK_PANICS.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    src.addr = %this.conn.peer,
                    dst.addr = ?this.conn.local,
                    panic = panic_message(&*payload),
                    "connection task panicked; that connection was closed, the worker goes on"
                );
                Poll::Ready(())
            }
        }
    }
}

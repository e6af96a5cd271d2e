//! Shutdown and draining.
//!
//! Steps, in order, when the process is asked to stop (SIGTERM or SIGINT, or
//! [`ShutdownTrigger::trigger`]):
//! 1. The trigger closes one end of a socketpair per worker; each worker is blocked on reading
//!    the other end (an ordinary io_uring/epoll read, so no polling and no cross-thread waker).
//! 2. The worker sets its local [`Drain`]: accept loops stop and drop their listeners, so the
//!    kernel refuses new connections (with `SO_REUSEPORT`, once every worker has closed its copy).
//! 3. Live connections keep running; the worker waits until their count reaches zero or the
//!    drain deadline passes.
//! 4. The worker returns from its runtime; dropping the runtime drops the connections still
//!    left, which closes their sockets.
//!
//! Nothing here is shared across workers on the data path: the [`Drain`] and the connection
//! count are `Rc`s local to one worker.

use std::{
    cell::{Cell, RefCell},
    future::Future,
    io,
    os::unix::net::UnixStream,
    pin::Pin,
    rc::Rc,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

/// The process-wide side: fires once, wakes every worker.
#[derive(Debug, Clone, Default)]
pub struct ShutdownTrigger {
    inner: Arc<Mutex<TriggerState>>,
}

#[derive(Debug, Default)]
struct TriggerState {
    fired: bool,
    senders: Vec<UnixStream>,
}

/// A worker's end of the shutdown signal; await it with [`ShutdownListener::wait`].
#[derive(Debug)]
pub struct ShutdownListener {
    stream: Option<UnixStream>,
}

impl ShutdownTrigger {
    /// A trigger nobody has fired yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new listener. If the trigger has fired already, the listener is ready at once.
    pub fn subscribe(&self) -> io::Result<ShutdownListener> {
        let (tx, rx) = UnixStream::pair()?;
        let mut state = lock(&self.inner);
        if !state.fired {
            state.senders.push(tx);
        }
        Ok(ShutdownListener { stream: Some(rx) })
    }

    /// Fire: every listener, present and future, completes.
    pub fn trigger(&self) {
        let mut state = lock(&self.inner);
        state.fired = true;
        state.senders.clear();
    }

    /// Whether [`trigger`](Self::trigger) was called.
    pub fn is_triggered(&self) -> bool {
        lock(&self.inner).fired
    }

    /// Fire on the first SIGTERM or SIGINT, from a small signal thread.
    pub fn on_signals(&self) -> io::Result<()> {
        let mut signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGINT,
        ])?;
        let this = self.clone();
        std::thread::Builder::new()
            .name("zring-signals".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!(signal = sig, "shutdown requested; draining");
                    this.trigger();
                }
            })?;
        Ok(())
    }
}

fn lock(m: &Mutex<TriggerState>) -> std::sync::MutexGuard<'_, TriggerState> {
    // A poisoned lock only means a panic elsewhere while pushing to a Vec; the state is still
    // consistent, so keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ShutdownListener {
    /// Completes when the trigger fires. Must be awaited on a monoio runtime.
    pub async fn wait(mut self) {
        let Some(std) = self.stream.take() else {
            return;
        };
        let stream = match std
            .set_nonblocking(true)
            .and_then(|()| monoio::net::UnixStream::from_std(std))
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "shutdown listener could not be registered; shutdown will not drain");
                return std::future::pending().await;
            }
        };
        let mut stream = stream;
        let buf = vec![0u8; 1];
        // EOF (the trigger dropped its end) or any error means: shut down.
        let _ = monoio::io::AsyncReadRent::read(&mut stream, buf).await;
    }
}

/// A one-shot event local to a worker: set once, wakes all waiters.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    inner: Rc<EventState>,
}

#[derive(Debug, Default)]
struct EventState {
    set: Cell<bool>,
    waiters: RefCell<WakerSet>,
    live: Cell<usize>,
    idle_waiters: RefCell<WakerSet>,
}

/// Wakers of pending futures, each under a key its future removes when dropped. A waker keeps
/// its task's allocation alive, so a connection that ended while waiting must take its waker
/// out: a plain list kept every finished connection's task (tens of KiB each) until the drain
/// fired, and made every registration scan all of them.
/// A [`WakerSet`] of up to this many slots is never shrunk (no churn for ordinary loads).
const WAKER_SET_KEEP: usize = 256;

#[derive(Debug, Default)]
struct WakerSet {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
    /// [`Self::shrink`] runs when fewer waiters than this are left.
    shrink_below: usize,
}

impl WakerSet {
    /// Store `waker` under `key` (a new key when `None`); returns the key.
    fn register(&mut self, key: Option<usize>, waker: &Waker) -> usize {
        if let Some(k) = key {
            if let Some(slot) = self.slots.get_mut(k) {
                match slot {
                    Some(w) if w.will_wake(waker) => {}
                    _ => *slot = Some(waker.clone()),
                }
                return k;
            }
        }
        match self.free.pop() {
            Some(k) => {
                self.slots[k] = Some(waker.clone());
                k
            }
            None => {
                self.slots.push(Some(waker.clone()));
                self.shrink_below = self.shrink_below.max(self.slots.len() / 4);
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, key: usize) {
        if let Some(slot) = self.slots.get_mut(key) {
            if slot.take().is_some() {
                self.free.push(key);
                if self.slots.len() > WAKER_SET_KEEP && self.len() < self.shrink_below {
                    self.shrink();
                    // A held key may pin the table's end: scan again only after another
                    // half of the waiters has gone (or the table grew), never per removal,
                    // and always once the table is empty (half of one waiter is still one).
                    self.shrink_below = (self.len() / 2).max(1);
                }
            }
        }
    }

    /// Give back what a burst grew: drop the free slots at the end and the spare capacity.
    /// Keys still held stay where they are (a held key is always a filled slot). It runs when
    /// fewer than a quarter of the slots are in use, or half as many as at the last run, so
    /// its cost is paid by the removals before it.
    fn shrink(&mut self) {
        let used = self
            .slots
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |i| i + 1);
        self.slots.truncate(used);
        self.slots.shrink_to_fit();
        self.free.clear();
        self.free
            .extend((0..used).filter(|&k| self.slots[k].is_none()).rev());
        self.free.shrink_to_fit();
    }

    /// Wake every waiter. Their keys stay reserved until their futures drop or poll again,
    /// so a key is never handed to a second future while the first still holds it.
    fn wake_all(&mut self) {
        for w in self.slots.iter().flatten() {
            w.wake_by_ref();
        }
    }

    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

impl Drain {
    /// A fresh, unset drain.
    pub fn new() -> Self {
        Self::default()
    }

    /// A drain that starts when `shutdown` fires: spawns a small waiter task on the current
    /// worker. Every worker's main starts with this.
    pub fn on_shutdown(shutdown: ShutdownListener) -> Self {
        let drain = Self::new();
        let d = drain.clone();
        monoio::spawn(async move {
            shutdown.wait().await;
            d.start();
        });
        drain
    }

    /// Start draining: wake everyone waiting in [`Drain::signaled`].
    pub fn start(&self) {
        if !self.inner.set.replace(true) {
            self.inner.waiters.borrow_mut().wake_all();
        }
    }

    /// Whether draining has started.
    pub fn is_draining(&self) -> bool {
        self.inner.set.get()
    }

    /// Completes once draining has started.
    pub fn signaled(&self) -> Signaled<'_> {
        Signaled {
            drain: self,
            key: None,
        }
    }

    /// Futures currently waiting in [`Drain::signaled`] or [`Drain::idle`] (for tests and
    /// diagnostics: it must not grow with connections that have ended).
    pub fn waiters(&self) -> usize {
        self.inner.waiters.borrow().len() + self.inner.idle_waiters.borrow().len()
    }

    /// Count a live connection until the returned guard drops.
    pub fn track(&self) -> ConnGuard {
        self.inner.live.set(self.inner.live.get() + 1);
        ConnGuard {
            inner: self.inner.clone(),
        }
    }

    /// Connections currently tracked.
    pub fn live(&self) -> usize {
        self.inner.live.get()
    }

    /// Completes when no tracked connection is left.
    pub fn idle(&self) -> Idle<'_> {
        Idle {
            drain: self,
            key: None,
        }
    }

    /// Wait for the tracked connections to finish, at most `deadline`. Returns how many were
    /// still open when the deadline passed (0 when all finished).
    pub async fn wait_idle(&self, deadline: Duration) -> usize {
        monoio::select! {
            _ = self.idle() => 0,
            _ = monoio::time::sleep(deadline) => self.live(),
        }
    }
}

/// Future of [`Drain::signaled`]; takes its waker out of the drain when dropped.
#[derive(Debug)]
pub struct Signaled<'a> {
    drain: &'a Drain,
    key: Option<usize>,
}

impl Future for Signaled<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.drain.inner.set.get() {
            return Poll::Ready(());
        }
        let key = this
            .drain
            .inner
            .waiters
            .borrow_mut()
            .register(this.key, cx.waker());
        this.key = Some(key);
        Poll::Pending
    }
}

impl Drop for Signaled<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.drain.inner.waiters.borrow_mut().remove(k);
        }
    }
}

/// Future of [`Drain::idle`]; takes its waker out of the drain when dropped.
#[derive(Debug)]
pub struct Idle<'a> {
    drain: &'a Drain,
    key: Option<usize>,
}

impl Future for Idle<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.drain.inner.live.get() == 0 {
            return Poll::Ready(());
        }
        let key = this
            .drain
            .inner
            .idle_waiters
            .borrow_mut()
            .register(this.key, cx.waker());
        this.key = Some(key);
        Poll::Pending
    }
}

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        if let Some(k) = self.key.take() {
            self.drain.inner.idle_waiters.borrow_mut().remove(k);
        }
    }
}

/// Keeps a connection counted in its worker's [`Drain`].
#[derive(Debug)]
pub struct ConnGuard {
    inner: Rc<EventState>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let left = self.inner.live.get().saturating_sub(1);
        self.inner.live.set(left);
        if left == 0 {
            self.inner.idle_waiters.borrow_mut().wake_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> monoio::Runtime<monoio::time::TimeDriver<monoio::LegacyDriver>> {
        monoio::RuntimeBuilder::<monoio::time::TimeDriver<monoio::LegacyDriver>>::new()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_bursts_waker_table_is_given_back_and_held_keys_stay_valid() {
        let w = Waker::noop();
        let mut set = WakerSet::default();
        let keys: Vec<usize> = (0..10_000).map(|_| set.register(None, w)).collect();
        assert!(set.slots.capacity() >= 10_000);
        // Two waiters outlive the burst: one early, one late in the table.
        let held = [keys[7], keys[5_000]];
        for &k in &keys {
            if !held.contains(&k) {
                set.remove(k);
            }
        }
        assert_eq!(set.len(), 2);
        assert!(
            set.slots.capacity() <= 5_001 && set.free.capacity() <= 5_001,
            "the table shrank to the last held key: {} slots, {} free",
            set.slots.capacity(),
            set.free.capacity()
        );
        // Held keys still name their own slots; new keys never take a held one.
        assert_eq!(set.register(Some(held[1]), w), held[1]);
        let fresh: Vec<usize> = (0..6_000).map(|_| set.register(None, w)).collect();
        assert!(fresh.iter().all(|k| !held.contains(k)));
        let mut all: Vec<usize> = fresh.iter().chain(&held).copied().collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 6_002, "every key is distinct");
        for k in fresh.into_iter().chain(held) {
            set.remove(k);
        }
        assert_eq!(set.len(), 0);
        assert!(
            set.slots.capacity() <= WAKER_SET_KEEP,
            "empty again: {}",
            set.slots.capacity()
        );
    }

    /// Connections of a burst end in any order. When one waiter was left at a run, the next
    /// run was set for below 0 waiters, so its removal never ran one: the table stayed at the
    /// length its key had pinned (a node proxy kept about 135 KiB per worker after a
    /// 10,000-connection burst). Empty must always give the table back.
    #[test]
    fn a_burst_ending_in_any_order_leaves_an_empty_table() {
        let w = Waker::noop();
        let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
        for n in [1_000, 5_000, 10_000] {
            for _ in 0..10 {
                let mut set = WakerSet::default();
                let mut keys: Vec<usize> = (0..n).map(|_| set.register(None, w)).collect();
                // Fisher-Yates with xorshift: a fixed, arbitrary closing order.
                for i in (1..keys.len()).rev() {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    keys.swap(i, (seed % (i as u64 + 1)) as usize);
                }
                for k in keys {
                    set.remove(k);
                }
                assert_eq!(set.len(), 0);
                // A table of up to WAKER_SET_KEEP slots is kept as it is.
                assert!(
                    set.slots.capacity() <= 2 * WAKER_SET_KEEP
                        && set.free.capacity() <= 2 * WAKER_SET_KEEP,
                    "a burst of {n}, all gone: {} slots, {} free",
                    set.slots.capacity(),
                    set.free.capacity()
                );
            }
        }
    }

    #[test]
    fn finished_connections_leave_no_waker_behind_and_the_drain_still_wakes_the_rest() {
        rt().block_on(async {
            let drain = Drain::new();
            // 1000 "connections" that end on their own while waiting for the drain, as a
            // connection task does with `select!`.
            let mut done = Vec::new();
            for _ in 0..1000 {
                let d = drain.clone();
                done.push(monoio::spawn(async move {
                    let _guard = d.track();
                    monoio::select! {
                        _ = monoio::time::sleep(Duration::from_millis(5)) => true,
                        _ = d.signaled() => false,
                    }
                }));
            }
            for h in done {
                assert!(h.await, "ended by its own work, not the drain");
            }
            assert_eq!(drain.waiters(), 0, "ended connections keep no waker");
            assert_eq!(drain.live(), 0);

            // Long-lived ones are still woken by start(), and their wakers go when they end.
            let mut waiting = Vec::new();
            for _ in 0..10 {
                let d = drain.clone();
                waiting.push(monoio::spawn(async move {
                    let _guard = d.track();
                    d.signaled().await;
                }));
            }
            monoio::time::sleep(Duration::from_millis(10)).await;
            assert_eq!(drain.waiters(), 10);
            assert_eq!(drain.live(), 10);
            let left = drain.clone();
            let idle = monoio::spawn(async move { left.wait_idle(Duration::from_secs(5)).await });
            drain.start();
            for h in waiting {
                h.await;
            }
            assert_eq!(idle.await, 0, "idle() saw every connection finish");
            assert_eq!(drain.waiters(), 0);
            // A signaled() after the start completes at once.
            drain.signaled().await;
        });
    }
}

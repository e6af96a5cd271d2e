//! Send times at microsecond precision.
//!
//! tokio's timer wheel counts in whole milliseconds: a sleep ends at the first tick after its
//! deadline, up to 1 ms late. An open-loop schedule at 1000 or 2000 requests per second on one
//! connection was then sent in uneven bursts, and a request that a slow response had put
//! behind schedule stayed counted from its intended time (coordinated-omission correction)
//! while the timer, not the target, kept the connection late. A `timerfd` per connection
//! wakes within tens of microseconds of the deadline.

use std::{io, os::fd::OwnedFd};

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};
use tokio::{io::unix::AsyncFd, time::Instant};

/// Waits until deadlines with a one-shot `timerfd` (tokio's sleep if one cannot be made).
#[derive(Debug)]
pub struct Pacer {
    fd: Option<AsyncFd<OwnedFd>>,
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new()
    }
}

impl Pacer {
    /// A pacer for the current tokio runtime.
    // `AsyncFd::new` is deprecated because the fd of an arbitrary `AsRawFd` may be closed or
    // replaced while registered; an `OwnedFd` moved into the `AsyncFd` stays open and the same
    // until the `AsyncFd` drops, which is the condition its `unsafe` replacement states (and
    // this crate forbids `unsafe`).
    #[allow(deprecated)]
    pub fn new() -> Self {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )
        .map_err(io::Error::from)
        .and_then(AsyncFd::new)
        .ok();
        Self { fd }
    }

    /// Whether the precise timer is in use (otherwise tokio's millisecond timer).
    pub fn is_precise(&self) -> bool {
        self.fd.is_some()
    }

    /// Return at `deadline` (at once if it has passed).
    pub async fn until(&mut self, deadline: Instant) {
        let now = Instant::now();
        if deadline <= now {
            return;
        }
        if self.wait_timerfd(deadline - now).await.is_err() {
            self.fd = None;
            tokio::time::sleep_until(deadline).await;
        }
    }

    async fn wait_timerfd(&self, after: std::time::Duration) -> io::Result<()> {
        let fd = self
            .fd
            .as_ref()
            .ok_or_else(|| io::Error::from(io::ErrorKind::Unsupported))?;
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let spec = Itimerspec {
            it_interval: zero,
            // `after` is above zero here, and a zero value would disarm the timer.
            it_value: Timespec {
                tv_sec: after.as_secs() as _,
                tv_nsec: after.subsec_nanos().max(1) as _,
            },
        };
        timerfd_settime(fd.get_ref(), TimerfdTimerFlags::empty(), &spec)?;
        loop {
            let mut ready = fd.readable().await?;
            let mut expirations = [0u8; 8];
            match ready.try_io(|f| {
                rustix::io::read(f.get_ref(), &mut expirations).map_err(io::Error::from)
            }) {
                Ok(r) => return r.map(drop),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn deadlines_are_met_within_a_fraction_of_a_millisecond() {
        let mut p = Pacer::new();
        assert!(p.is_precise(), "timerfd is available on Linux");
        // 400 sends at 250 us spacing, as a 4000 rps schedule on one connection.
        let start = Instant::now() + Duration::from_millis(5);
        let mut late = Vec::new();
        for i in 0..400u32 {
            let deadline = start + Duration::from_micros(250) * i;
            p.until(deadline).await;
            let now = Instant::now();
            assert!(now >= deadline, "never early");
            late.push((now - deadline).as_micros());
        }
        late.sort_unstable();
        // tokio's millisecond timer is late by 0-1 ms, about 500 us at the median; a timerfd
        // by tens of microseconds. The bound leaves room for a busy CI machine.
        assert!(
            late[200] < 300,
            "median lateness {} us: {late:?}",
            late[200]
        );
    }
}

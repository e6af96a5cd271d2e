//! Choosing the I/O backend: io_uring, or epoll (monoio's "legacy" driver) as the fallback.
//!
//! io_uring is refused in many places zring runs: `kernel.io_uring_disabled` set to 1 or 2, the
//! default seccomp profiles of container runtimes (they fail `io_uring_setup` with `EPERM`), gVisor
//! and old kernels. `auto` probes once at start-up by building a real io_uring runtime; if that
//! fails, it logs why and runs every worker on epoll. `uring` turns the same failure into an error.

use std::{fmt, io, str::FromStr};

use crate::Runtime;

/// Default submission queue size of each worker's ring. Large enough that a burst of accepts and
/// reads on a busy worker does not force an early `io_uring_enter`; small enough that the rings
/// of all workers stay well under a MiB of locked memory.
pub const DEFAULT_RING_ENTRIES: u32 = 1024;

/// What the operator asked for with `--io`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// io_uring where it can be set up, epoll otherwise.
    #[default]
    Auto,
    /// io_uring or fail.
    Uring,
    /// epoll, even where io_uring works.
    Epoll,
}

impl FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "uring" | "io_uring" | "io-uring" => Ok(Self::Uring),
            "epoll" | "legacy" => Ok(Self::Epoll),
            other => Err(format!(
                "unknown io backend {other:?}: expected auto, uring or epoll"
            )),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Uring => "uring",
            Self::Epoll => "epoll",
        })
    }
}

/// The backend the workers actually run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    /// io_uring through monoio's `IoUringDriver`.
    Uring,
    /// epoll through monoio's `LegacyDriver`.
    Epoll,
}

impl IoBackend {
    /// The name used in logs and the `zring_io_backend` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Uring => "io_uring",
            Self::Epoll => "epoll",
        }
    }
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of [`select`]: which backend, and the sentence that explains why.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The backend every worker will build.
    pub backend: IoBackend,
    /// Why, in words fit for the start-up log line.
    pub reason: String,
}

/// Errors from choosing or building a backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// `--io uring` was asked for and io_uring cannot be set up here.
    #[error("--io uring was requested but io_uring is unavailable: {0}; run with --io auto or --io epoll, or allow io_uring (kernel.io_uring_disabled=0, a seccomp profile that permits io_uring_setup)")]
    UringUnavailable(String),
    /// Building a worker's runtime failed.
    #[error("building the {backend} runtime failed: {source}")]
    Build {
        /// The backend being built.
        backend: IoBackend,
        /// The OS error.
        source: io::Error,
    },
}

/// Decide the backend once, at start-up, by probing io_uring for real.
pub fn select(choice: BackendChoice) -> Result<Selection, BackendError> {
    match choice {
        BackendChoice::Epoll => Ok(Selection {
            backend: IoBackend::Epoll,
            reason: "--io epoll was requested".into(),
        }),
        BackendChoice::Uring => match probe_uring() {
            Ok(()) => Ok(Selection {
                backend: IoBackend::Uring,
                reason: "--io uring was requested and io_uring is available".into(),
            }),
            Err(why) => Err(BackendError::UringUnavailable(why)),
        },
        BackendChoice::Auto => Ok(match probe_uring() {
            Ok(()) => Selection {
                backend: IoBackend::Uring,
                reason: "io_uring is available".into(),
            },
            Err(why) => Selection {
                backend: IoBackend::Epoll,
                reason: format!("io_uring is unavailable ({why}); falling back to epoll"),
            },
        }),
    }
}

/// Try to set up a ring; on failure describe why as precisely as we can.
///
/// The probe runs on a throw-away thread: tearing a ring down queues io_uring task work on the
/// thread that created it, which interrupts that thread's next blocking syscall with `EINTR`
/// (a `recv` with `SO_RCVTIMEO`, for instance). The caller's thread must not inherit that.
fn probe_uring() -> Result<(), String> {
    std::thread::Builder::new()
        .name("zring-uring-probe".into())
        .spawn(probe_uring_here)
        .map_err(|e| format!("cannot start the probe thread: {e}"))?
        .join()
        .map_err(|_| "the io_uring probe panicked".to_owned())?
}

fn probe_uring_here() -> Result<(), String> {
    match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().build() {
        Ok(_rt) => Ok(()),
        Err(e) => {
            let sysctl = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
                .ok()
                .map(|s| s.trim().to_owned());
            let mut why = format!("io_uring_setup failed: {e}");
            match sysctl.as_deref() {
                Some("1") | Some("2") => {
                    why.push_str(&format!(
                        "; kernel.io_uring_disabled = {}",
                        sysctl.as_deref().unwrap_or_default()
                    ));
                }
                _ if e.raw_os_error() == Some(libc::EPERM) => {
                    why.push_str("; a seccomp filter (container runtime default profile?) denies io_uring_setup");
                }
                _ if e.raw_os_error() == Some(libc::ENOSYS) => {
                    why.push_str("; the kernel has no io_uring");
                }
                _ => {}
            }
            Err(why)
        }
    }
}

/// Build one worker's runtime on the chosen backend.
pub fn build_runtime(backend: IoBackend, entries: u32) -> Result<Runtime, BackendError> {
    let built = match backend {
        IoBackend::Uring => {
            monoio::RuntimeBuilder::<monoio::time::TimeDriver<monoio::IoUringDriver>>::new()
                .with_entries(entries)
                .build()
                .map(Runtime::from)
        }
        IoBackend::Epoll => {
            monoio::RuntimeBuilder::<monoio::time::TimeDriver<monoio::LegacyDriver>>::new()
                .with_entries(entries)
                .build()
                .map(Runtime::from)
        }
    };
    built.map_err(|source| BackendError::Build { backend, source })
}

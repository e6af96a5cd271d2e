//! Counters and histograms shared by the connection tasks.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use hdrhistogram::Histogram;

/// Highest latency the histograms track: 60 s, in microseconds. Larger values are clamped.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// What went wrong with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Connection refused (nothing listening, or a proxy refused the CONNECT).
    Refused,
    /// Connection reset or broken pipe.
    Reset,
    /// No complete answer within `--timeout`.
    Timeout,
    /// The answer was not what was asked for: malformed HTTP, wrong echoed bytes.
    BadResponse,
    /// The peer closed the connection before answering.
    Closed,
    /// Anything else (address errors, out of descriptors...).
    Other,
}

impl ErrorKind {
    /// All kinds, in report order.
    pub const ALL: [ErrorKind; 6] = [
        Self::Refused,
        Self::Reset,
        Self::Timeout,
        Self::BadResponse,
        Self::Closed,
        Self::Other,
    ];

    /// Classify an I/O error.
    pub fn of(e: &std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => Self::Refused,
            K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted => Self::Reset,
            K::TimedOut => Self::Timeout,
            K::UnexpectedEof => Self::Closed,
            K::InvalidData => Self::BadResponse,
            _ => Self::Other,
        }
    }

    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::BadResponse => "bad_response",
            Self::Closed => "closed",
            Self::Other => "other",
        }
    }
}

/// A fresh latency histogram (microseconds, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    // 1 us .. 60 s with 3 significant digits is a valid configuration; the constructor cannot fail
    // for these constants.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Live counters every task updates.
#[derive(Debug, Default)]
pub struct Live {
    /// Requests completed in the measured window.
    pub completed: AtomicU64,
    /// Payload bytes moved in the measured window (both directions).
    pub bytes: AtomicU64,
    errors: [AtomicU64; 6],
    /// Latencies of the current progress interval (only filled when progress is shown).
    pub interval: Mutex<Option<Histogram<u64>>>,
}

impl Live {
    /// Count an error.
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Errors so far, by kind (only kinds seen).
    pub fn errors(&self) -> BTreeMap<ErrorKind, u64> {
        ErrorKind::ALL
            .iter()
            .filter_map(|k| {
                let n = self.errors[*k as usize].load(Ordering::Relaxed);
                (n > 0).then_some((*k, n))
            })
            .collect()
    }

    /// Total errors so far.
    pub fn error_total(&self) -> u64 {
        self.errors.iter().map(|e| e.load(Ordering::Relaxed)).sum()
    }
}

/// What one connection task recorded; merged at the end.
#[derive(Debug)]
pub struct TaskResult {
    /// Latencies in microseconds.
    pub hist: Histogram<u64>,
    /// HTTP status codes seen.
    pub codes: BTreeMap<u16, u64>,
    /// Connections opened (for keep-alive efficiency, like fortio's "Sockets used").
    pub sockets: u64,
}

impl TaskResult {
    /// Empty result.
    pub fn new() -> Self {
        Self {
            hist: histogram(),
            codes: BTreeMap::new(),
            sockets: 0,
        }
    }
}

impl Default for TaskResult {
    fn default() -> Self {
        Self::new()
    }
}

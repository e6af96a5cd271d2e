//! Log set-up: human-readable text by default, JSON with `--log-format json`. The level comes
//! from `RUST_LOG` (or `--log-level`), default `info`.
//!
//! Lines never block the thread that logs them (a worker writing an access-log line): they go
//! into a bounded lock-free queue of [`LOG_BUFFER_LINES`] lines that one writer thread drains
//! to stderr. When stderr is slow (a full pipe, a stalled collector), the queue fills and new
//! lines are dropped and counted ([`dropped_lines`], `zring_log_lines_dropped_total`) instead of
//! waiting. Call [`flush`] before exit so the last lines are written.

use std::{
    str::FromStr,
    sync::{Mutex, OnceLock},
};

use tracing_subscriber::{fmt, layer::SubscriberExt, reload, util::SubscriberInitExt, EnvFilter};

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `2026-11-22T02:31:43Z  INFO zring: message key=value`.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" | "plain" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected text or json"
            )),
        }
    }
}

/// Lines the log queue holds before new ones are dropped: room for bursts (a few MiB at most)
/// without letting a stalled sink grow memory without bound.
pub const LOG_BUFFER_LINES: usize = 16 * 1024;

type Setter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// The writer thread's guard (flushes on drop) and its count of dropped lines.
static WRITER: OnceLock<(
    Mutex<Option<tracing_appender::non_blocking::WorkerGuard>>,
    tracing_appender::non_blocking::ErrorCounter,
)> = OnceLock::new();

/// Log lines dropped because the sink did not keep up.
pub fn dropped_lines() -> u64 {
    WRITER.get().map_or(0, |(_, c)| c.dropped_lines() as u64)
}

/// Write out the lines still queued (at exit).
pub fn flush() {
    if let Some((guard, _)) = WRITER.get() {
        drop(guard.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// The installed subscriber's filter: its text, and how to replace it (admin `/logging`).
static FILTER: OnceLock<(Mutex<String>, Setter)> = OnceLock::new();

/// Install the global subscriber. `level` overrides `RUST_LOG` when given.
pub fn init(format: LogFormat, level: Option<&str>) {
    let text = match level {
        Some(l) => l.to_string(),
        None => std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    };
    let filter = EnvFilter::try_new(&text).unwrap_or_else(|e| {
        eprintln!("zring: ignoring the log filter {text:?} ({e}); using info");
        EnvFilter::new("info")
    });
    let (filter, handle) = reload::Layer::new(filter);
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_BUFFER_LINES)
        .thread_name("zring-log")
        .finish(std::io::stderr());
    let _ = WRITER.set((Mutex::new(Some(guard)), writer.error_counter()));
    let fmt_layer = fmt::layer().with_writer(writer).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Text => registry.with(fmt_layer.with_target(false)).try_init(),
        LogFormat::Json => registry
            .with(fmt_layer.json().flatten_event(true))
            .try_init(),
    };
    if installed.is_ok() {
        let setter: Setter = Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()));
        let _ = FILTER.set((Mutex::new(text), setter));
    }
}

/// The current log filter.
pub fn current_filter() -> String {
    FILTER
        .get()
        .map(|(t, _)| t.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .unwrap_or_default()
}

/// Replace the log filter at runtime (`info`, `debug`, `zring_core=debug,warn`...).
pub fn set_filter(text: &str) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(text).map_err(|e| format!("invalid log filter {text:?}: {e}"))?;
    if text.is_empty() {
        return Err("empty log filter: use ?level=info (or debug, warn, a directive list)".into());
    }
    let (current, set) = FILTER.get().ok_or("logging is not initialised")?;
    set(filter)?;
    *current.lock().unwrap_or_else(|p| p.into_inner()) = text.to_string();
    Ok(())
}

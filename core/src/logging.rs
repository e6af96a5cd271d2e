//! Log set-up: human-readable text by default, JSON with `--log-format json`. The level comes
//! from `RUST_LOG` (or `--log-level`), default `info`.

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

type Setter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

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
    let fmt_layer = fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
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

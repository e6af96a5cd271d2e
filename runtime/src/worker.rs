//! Worker threads: one per allowed CPU, each running its own monoio runtime, and pinned to its
//! CPU when there is one worker for every allowed CPU ([`Pinning`]). A connection lives and dies on the worker that accepted it; workers share nothing on
//! the data path.

use std::{
    fmt,
    future::Future,
    str::FromStr,
    sync::{mpsc, Arc},
    thread::JoinHandle,
};

use crate::{
    backend::{self, BackendChoice, BackendError, IoBackend, Selection, DEFAULT_RING_ENTRIES},
    drain::{ShutdownListener, ShutdownTrigger},
    sys,
};

/// How to start the workers.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Number of workers; `None` = [`default_worker_count`].
    pub workers: Option<usize>,
    /// `--io auto|uring|epoll`.
    pub io: BackendChoice,
    /// Submission queue entries per ring.
    pub ring_entries: u32,
    /// Whether each worker is pinned to one CPU.
    pub pin: Pinning,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            workers: None,
            io: BackendChoice::Auto,
            ring_entries: DEFAULT_RING_ENTRIES,
            pin: Pinning::Auto,
        }
    }
}

/// Whether workers are pinned to CPUs (`--pin`, `ZRING_PIN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pinning {
    /// Pin when there is one worker for every CPU the process may run on (a node to itself,
    /// or CPUs given to it exclusively); otherwise let the workers float. Two workers of a
    /// container limited to 2 CPUs on a 64-CPU node would otherwise sit on CPUs 0 and 1,
    /// whatever else runs there, where the scheduler can move them to idle ones.
    #[default]
    Auto,
    /// Always pin worker `i` to the `i`-th allowed CPU (wrapping).
    On,
    /// Never pin: the scheduler places the workers. For hosts where the proxy shares its
    /// CPUs with busy neighbours, e.g. two node proxies on one small test machine.
    Off,
}

impl Pinning {
    /// Whether `workers` workers are pinned, given the CPUs this process may run on.
    pub fn pins(self, workers: usize, allowed_cpus: usize) -> bool {
        match self {
            Self::On => allowed_cpus > 0,
            Self::Off => false,
            Self::Auto => allowed_cpus > 0 && workers == allowed_cpus,
        }
    }
}

impl FromStr for Pinning {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" | "true" | "1" => Ok(Self::On),
            "off" | "false" | "0" => Ok(Self::Off),
            other => Err(format!(
                "unknown pinning {other:?}: expected auto, on or off"
            )),
        }
    }
}

impl fmt::Display for Pinning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::On => "on",
            Self::Off => "off",
        })
    }
}

/// What each worker is told about itself.
#[derive(Debug)]
pub struct WorkerContext {
    /// 0-based worker index.
    pub index: usize,
    /// The CPU this worker is pinned to, if pinned.
    pub cpu: Option<usize>,
    /// The backend this worker's runtime uses.
    pub backend: IoBackend,
    /// Completes when the process is asked to shut down.
    pub shutdown: ShutdownListener,
}

/// Errors from starting or running workers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// Choosing or building the I/O backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A worker thread could not be created or set up.
    #[error("worker {index}: {source}")]
    Setup {
        /// Worker index.
        index: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// A worker's main future returned an error.
    #[error("worker {index}: {message}")]
    Failed {
        /// Worker index.
        index: usize,
        /// What the worker reported.
        message: String,
    },
    /// A worker thread panicked.
    #[error("worker {0} panicked")]
    Panicked(usize),
}

/// The CPUs this process may run on, capped by the cgroup CPU quota (what
/// `std::thread::available_parallelism` reports, which reads both cgroup v1 and v2).
pub fn default_worker_count() -> usize {
    let affinity = sys::thread_affinity().map(|c| c.len()).unwrap_or(1).max(1);
    let quota = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(affinity);
    affinity.min(quota).max(1)
}

/// Running workers.
#[derive(Debug)]
pub struct Workers {
    selection: Selection,
    handles: Vec<JoinHandle<()>>,
    results: mpsc::Receiver<(usize, Result<(), WorkerError>)>,
    trigger: ShutdownTrigger,
}

impl Workers {
    /// Choose the backend, then start the workers, each running `main(ctx)` to completion on its
    /// own runtime. `main` returning ends that worker.
    pub fn start<F, Fut, E>(
        cfg: &WorkerConfig,
        trigger: &ShutdownTrigger,
        main: F,
    ) -> Result<Self, WorkerError>
    where
        F: Fn(WorkerContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + 'static,
        E: std::fmt::Display,
    {
        let selection = backend::select(cfg.io)?;
        tracing::info!(backend = %selection.backend, reason = %selection.reason, "io backend selected");
        let count = cfg.workers.unwrap_or_else(default_worker_count).max(1);
        let cpus = sys::thread_affinity().unwrap_or_default();
        let pinned = cfg.pin.pins(count, cpus.len());
        tracing::info!(
            workers = count,
            allowed_cpus = cpus.len(),
            pin = %cfg.pin,
            pinned,
            "starting workers"
        );
        let main = Arc::new(main);
        let (tx, results) = mpsc::channel();
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let cpu = pinned.then(|| cpus[index % cpus.len()]);
            let shutdown = trigger
                .subscribe()
                .map_err(|source| WorkerError::Setup { index, source })?;
            let main = main.clone();
            let tx = tx.clone();
            let backend = selection.backend;
            let entries = cfg.ring_entries;
            let handle = std::thread::Builder::new()
                .name(format!("zring-worker-{index}"))
                .spawn(move || {
                    // A worker that dies (a panic outside any connection task, which
                    // `server::spawn_tracked` contains) is reported like a failure, so `join`
                    // stops the others and the process exits non-zero instead of serving with
                    // one worker short.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run_worker(index, cpu, backend, entries, shutdown, &*main)
                    }))
                    .unwrap_or(Err(WorkerError::Panicked(index)));
                    let _ = tx.send((index, result));
                })
                .map_err(|source| WorkerError::Setup { index, source })?;
            handles.push(handle);
        }
        Ok(Self {
            selection,
            handles,
            results,
            trigger: trigger.clone(),
        })
    }

    /// The backend the workers run.
    pub fn backend(&self) -> IoBackend {
        self.selection.backend
    }

    /// Why that backend was chosen.
    pub fn backend_reason(&self) -> &str {
        &self.selection.reason
    }

    /// Number of workers.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are no workers (never true after a successful start).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Wait for every worker to finish. If one fails, the others are told to shut down, and the
    /// first failure is returned once all have stopped.
    pub fn join(self) -> Result<(), WorkerError> {
        let mut first_err = None;
        for _ in 0..self.handles.len() {
            match self.results.recv() {
                Ok((_, Ok(()))) => {}
                Ok((index, Err(e))) => {
                    tracing::error!(worker = index, error = %e, "worker failed; shutting down the others");
                    self.trigger.trigger();
                    first_err.get_or_insert(e);
                }
                Err(_) => break,
            }
        }
        for (index, h) in self.handles.into_iter().enumerate() {
            if h.join().is_err() {
                self.trigger.trigger();
                first_err.get_or_insert(WorkerError::Panicked(index));
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

fn run_worker<F, Fut, E>(
    index: usize,
    cpu: Option<usize>,
    backend: IoBackend,
    entries: u32,
    shutdown: ShutdownListener,
    main: &F,
) -> Result<(), WorkerError>
where
    F: Fn(WorkerContext) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    if let Some(cpu) = cpu {
        sys::pin_thread_to(cpu).map_err(|source| WorkerError::Setup { index, source })?;
    }
    let mut rt = backend::build_runtime(backend, entries)?;
    tracing::debug!(worker = index, ?cpu, %backend, tid = sys::gettid(), "worker started");
    let ctx = WorkerContext {
        index,
        cpu,
        backend,
        shutdown,
    };
    rt.block_on(main(ctx)).map_err(|e| WorkerError::Failed {
        index,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_pins_only_with_a_worker_for_every_allowed_cpu() {
        assert!(Pinning::Auto.pins(2, 2));
        assert!(Pinning::Auto.pins(1, 1));
        // A CPU quota of 2 on a 64-CPU node: float, do not take CPUs 0 and 1.
        assert!(!Pinning::Auto.pins(2, 64));
        assert!(!Pinning::Auto.pins(4, 2));
        assert!(!Pinning::Auto.pins(2, 0));
        assert!(Pinning::On.pins(2, 64));
        assert!(!Pinning::On.pins(2, 0));
        assert!(!Pinning::Off.pins(2, 2));
        assert_eq!("off".parse::<Pinning>(), Ok(Pinning::Off));
        assert_eq!("auto".parse::<Pinning>(), Ok(Pinning::Auto));
        assert!("maybe".parse::<Pinning>().is_err());
    }
}

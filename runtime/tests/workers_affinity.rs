//! Each worker runs on exactly its one CPU when pinned; unpinned workers keep every allowed CPU.

use std::sync::{Arc, Mutex};

use zring_runtime::{sys, BackendChoice, Pinning, ShutdownTrigger, WorkerConfig, Workers};

#[test]
fn each_worker_is_pinned_to_exactly_one_cpu() {
    let allowed = sys::thread_affinity().unwrap();
    for io in [BackendChoice::Uring, BackendChoice::Epoll] {
        let seen = affinities(allowed.len(), Pinning::Auto, io);
        assert_eq!(seen.len(), allowed.len());
        for (index, cpu, affinity) in seen {
            let cpu = cpu.expect("pinned");
            assert_eq!(cpu, allowed[index], "worker {index} on the expected cpu");
            assert_eq!(
                affinity,
                vec![cpu],
                "worker {index} affinity is exactly its cpu"
            );
        }
    }
}

/// Start `workers` workers with `pin` on `io` and return what each saw: (index, ctx.cpu,
/// affinity), by index.
fn affinities(
    workers: usize,
    pin: Pinning,
    io: BackendChoice,
) -> Vec<(usize, Option<usize>, Vec<usize>)> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let trigger = ShutdownTrigger::new();
    let cfg = WorkerConfig {
        workers: Some(workers),
        pin,
        io,
        ..WorkerConfig::default()
    };
    let started = Workers::start(&cfg, &trigger, move |ctx| {
        let s = s.clone();
        async move {
            s.lock()
                .unwrap()
                .push((ctx.index, ctx.cpu, sys::thread_affinity()?));
            Ok::<(), std::io::Error>(())
        }
    })
    .unwrap();
    started.join().unwrap();
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    seen
}

#[test]
fn unpinned_workers_keep_every_allowed_cpu() {
    let allowed = sys::thread_affinity().unwrap();
    // Off: never pinned. Auto with one worker fewer than the CPUs (or more, on one CPU): the
    // process does not own a CPU per worker, so the scheduler places them.
    let fewer_or_more = if allowed.len() > 1 {
        allowed.len() - 1
    } else {
        2
    };
    for (workers, pin) in [
        (allowed.len(), Pinning::Off),
        (fewer_or_more, Pinning::Auto),
    ] {
        let seen = affinities(workers, pin, BackendChoice::Auto);
        assert_eq!(seen.len(), workers);
        for (index, cpu, affinity) in seen {
            assert_eq!(cpu, None, "worker {index} with {pin} and {workers} workers");
            assert_eq!(affinity, allowed, "worker {index} keeps the process's CPUs");
        }
    }
    // On pins even when the counts differ.
    for (index, cpu, affinity) in affinities(fewer_or_more, Pinning::On, BackendChoice::Auto) {
        let cpu = cpu.expect("pinned");
        assert_eq!(cpu, allowed[index % allowed.len()]);
        assert_eq!(affinity, vec![cpu]);
    }
}

#[test]
fn forced_uring_reports_a_clear_error_or_runs_on_uring() {
    // Where io_uring works, --io uring must run on it; the refusal path is covered by the
    // seccomp test of the zring binary.
    let trigger = ShutdownTrigger::new();
    let cfg = WorkerConfig {
        workers: Some(1),
        io: BackendChoice::Uring,
        ..WorkerConfig::default()
    };
    match Workers::start(&cfg, &trigger, |_| async { Ok::<(), std::io::Error>(()) }) {
        Ok(w) => {
            assert_eq!(w.backend(), zring_runtime::IoBackend::Uring);
            w.join().unwrap();
        }
        Err(e) => assert!(e.to_string().contains("io_uring is unavailable"), "{e}"),
    }
}

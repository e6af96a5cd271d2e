//! `zring relay`: a plain TCP port forwarder on zring's runtime.
//!
//! Every worker binds its own `SO_REUSEPORT` listener on each `--listen`; each accepted
//! connection is connected to that listener's `--to` from the same worker and relayed (splice or
//! copy) until both directions end. `--listen`/`--to` may be repeated: the n-th `--to` is where
//! the n-th `--listen`'s connections go, so one process forwards several ports. One access-log
//! line per connection at close. SIGTERM drains: listeners close at once, live connections get
//! `--drain-timeout` to finish.

use std::{net::SocketAddr, sync::Arc, time::Duration, time::Instant};

pub use crate::proxy::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT};
use zring_runtime::{
    drain::Drain,
    net::{self, ConnectOptions, ListenOptions},
    relay::{self, RelayMode, RelayOptions},
    server, ShutdownTrigger, WorkerConfig, WorkerContext, Workers,
};

/// Everything `zring relay` needs.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where clients connect, and where each listener's connections are forwarded (at least
    /// one pair).
    pub routes: Vec<Route>,
    /// Relay settings (mode, pipe size, idle timeout).
    pub relay: RelayOptions,
    /// Upstream connect settings (mark, timeout).
    pub connect: ConnectOptions,
    /// Worker settings.
    pub workers: WorkerConfig,
    /// Drain period after SIGTERM.
    pub drain_timeout: Duration,
}

/// One forwarded address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// Where this listener's connections are forwarded.
    pub to: SocketAddr,
}

impl Route {
    /// Pair the n-th `--listen` with the n-th `--to`; the counts must match.
    pub fn pair(listen: &[SocketAddr], to: &[SocketAddr]) -> anyhow::Result<Vec<Route>> {
        if listen.is_empty() || listen.len() != to.len() {
            anyhow::bail!(
                "--listen and --to come in pairs (the n-th --to is where the n-th --listen forwards): got {} --listen and {} --to",
                listen.len(),
                to.len()
            );
        }
        Ok(listen
            .iter()
            .zip(to)
            .map(|(&listen, &to)| Route { listen, to })
            .collect())
    }
}

/// Run the relay until shutdown. Blocks the calling thread.
pub fn run(cfg: RelayConfig, trigger: &ShutdownTrigger) -> anyhow::Result<()> {
    if let Err(e) = zring_runtime::sys::raise_nofile_limit() {
        tracing::warn!(error = %e, "could not raise the open-file limit");
    }
    let cfg = Arc::new(cfg);
    let worker_cfg = cfg.workers.clone();
    let c = cfg.clone();
    let workers = Workers::start(&worker_cfg, trigger, move |ctx| worker_main(ctx, c.clone()))?;
    for r in &cfg.routes {
        tracing::info!(
            listen = %r.listen,
            to = %r.to,
            mode = %cfg.relay.mode,
            workers = workers.len(),
            io = %workers.backend(),
            "relay listening"
        );
    }
    workers.join()?;
    tracing::info!("relay stopped");
    Ok(())
}

async fn worker_main(ctx: WorkerContext, cfg: Arc<RelayConfig>) -> std::io::Result<()> {
    let mut listeners = Vec::with_capacity(cfg.routes.len());
    for r in &cfg.routes {
        let l = net::bind_monoio_listener(r.listen, &ListenOptions::default()).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {}: {e}", r.listen))
        })?;
        listeners.push((l, r.to));
    }
    let drain = Drain::on_shutdown(ctx.shutdown);
    let loops = listeners.into_iter().map(|(listener, to)| {
        let (drain, cfg) = (&drain, &cfg);
        async move {
            server::accept_loop(listener, drain, |client, conn| {
                server::spawn_tracked(drain, conn, handle(client, conn.peer, to, cfg.clone()));
            })
            .await
        }
    });
    futures_util::future::join_all(loops).await;
    let left = drain.wait_idle(cfg.drain_timeout).await;
    if left > 0 {
        tracing::warn!(worker = ctx.index, connections = left, timeout = ?cfg.drain_timeout, "drain deadline passed; closing the connections still open");
    }
    Ok(())
}

async fn handle(
    client: monoio::net::TcpStream,
    peer: SocketAddr,
    to: SocketAddr,
    cfg: Arc<RelayConfig>,
) {
    let start = Instant::now();
    let upstream = match net::connect(to, &cfg.connect).await {
        Ok(u) => u,
        Err(e) => {
            // Reset rather than FIN: the client must not mistake a failed forward for an empty
            // answer.
            let _ = net::set_reset_on_close(&client);
            tracing::warn!(
                src.addr = %peer,
                dst.addr = %to,
                error = %e,
                "upstream connect failed; is anything listening on the --to address?"
            );
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let out = relay::relay(client, upstream, &cfg.relay).await;
    let duration_ms = start.elapsed().as_secs_f64() * 1e3;
    match &out.error {
        None => tracing::info!(
            src.addr = %peer,
            dst.addr = %to,
            bytes_sent = out.client_to_upstream,
            bytes_recv = out.upstream_to_client,
            duration_ms,
            "connection complete"
        ),
        Some(e) => tracing::info!(
            src.addr = %peer,
            dst.addr = %to,
            bytes_sent = out.client_to_upstream,
            bytes_recv = out.upstream_to_client,
            duration_ms,
            error = %e,
            "connection complete"
        ),
    }
}

/// Parse `--mode` with an explicit copy buffer size.
pub fn mode_with_buffer(mode: RelayMode, buffer: usize) -> RelayMode {
    match mode {
        RelayMode::Copy { .. } => RelayMode::Copy { buffer },
        other => other,
    }
}

//! Prometheus metrics with Istio's names and labels, so existing Istio dashboards read zring.
//!
//! Connection metrics (`istio_tcp_connections_opened_total`, `..._closed_total`,
//! `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`) carry Istio's standard TCP
//! labels. `reporter` is `source` on the outbound side and `destination` on the inbound side,
//! as in ztunnel; bytes are from the reporter's point of view (sent = towards the destination
//! workload, received = back from it). A connection's label set is put together when it opens
//! from per-workload parts made once ([`crate::config::Workload::peer`]); it finds its
//! [`Series`] then, under the table's lock, and adds its bytes and its close to that series
//! without the lock.
//!
//! zring's own: `zring_config_reloads_total{result="success"|"failure"}` and
//! `zring_config_generation` (the config in force; a rejected file leaves it unchanged);
//! `zring_config_apply_seconds` (summary: time to put each config version in force);
//! `zring_timeouts_total{kind}` (handshake, response and keepalive limits that fired),
//! `zring_handshake_limit_rejected_total{listener}` (connections closed at once because their
//! listener had too many unfinished handshakes on that worker), `zring_task_panics_total`
//! (connection tasks that panicked and were contained) and `zring_log_lines_dropped_total`
//! (log lines dropped because the log sink was slow).
//!
//! Byte counters are updated while a connection lives (every [`LIVE_BYTES_INTERVAL`]) and at
//! its close, so a long-lived connection's traffic shows before it ends.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, LazyLock, Mutex,
    },
};

use zring_hbone::{settings::TimeoutKind, SpiffeId};

/// How often a live connection's byte counters are added to the metrics.
pub const LIVE_BYTES_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

use crate::config::{Service, Workload};

/// Label values of one peer (source or destination side) of a connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Peer {
    /// Workload (owner) name.
    pub workload: String,
    /// Namespace.
    pub namespace: String,
    /// SPIFFE principal, `spiffe://...`.
    pub principal: String,
    /// Canonical service (also `app`).
    pub canonical_service: String,
    /// Canonical revision (also `version`).
    pub canonical_revision: String,
    /// Cluster.
    pub cluster: String,
}

impl Peer {
    /// The labels of a known workload, with the principal it proved (or would present).
    pub fn of(w: &Workload, principal: Option<&SpiffeId>) -> Self {
        let workload = if w.workload_name.is_empty() {
            w.name.clone()
        } else {
            w.workload_name.clone()
        };
        let canonical_service = if w.canonical_name.is_empty() {
            workload.clone()
        } else {
            w.canonical_name.clone()
        };
        Peer {
            workload,
            namespace: w.namespace.clone(),
            principal: principal.map(|p| p.to_string()).unwrap_or_default(),
            canonical_service,
            canonical_revision: if w.canonical_revision.is_empty() {
                "latest".into()
            } else {
                w.canonical_revision.clone()
            },
            cluster: if w.cluster_id.is_empty() {
                "Kubernetes".into()
            } else {
                w.cluster_id.clone()
            },
        }
    }

    /// An unknown peer with maybe a proven principal.
    pub fn unknown(principal: Option<&SpiffeId>) -> Arc<Self> {
        match principal {
            Some(p) => Arc::new(Peer {
                principal: p.to_string(),
                ..Default::default()
            }),
            None => Peer::none(),
        }
    }

    /// The labels of a connection's source: the workload at its address when the identity it
    /// proved (if any) is that workload's own, else an unknown peer with the proven principal.
    pub fn source(w: Option<&Workload>, proven: Option<&SpiffeId>) -> Arc<Self> {
        match (w, proven) {
            (Some(w), Some(p)) if w.identity_ref() == Ok(p) => w.peer(),
            (Some(w), None) => Arc::new(Peer::of(w, None)),
            _ => Peer::unknown(proven),
        }
    }

    /// The peer nothing is known of (every label `unknown`), shared.
    pub fn none() -> Arc<Self> {
        static NONE: LazyLock<Arc<Peer>> = LazyLock::new(Arc::default);
        NONE.clone()
    }
}

/// Who reports a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The source side's proxy (outbound).
    Source,
    /// The destination side's proxy (inbound).
    Destination,
    /// A waypoint (L7, per request).
    Waypoint,
}

/// The full label set of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnLabels {
    /// Reporter.
    pub reporter: Reporter,
    /// Source side (shared with the workload's other connections).
    pub source: Arc<Peer>,
    /// Destination side.
    pub destination: Arc<Peer>,
    /// Destination service hostname, name and namespace, if the destination was a service.
    pub service: Option<(String, String, String)>,
    /// `mutual_tls` when the connection crossed HBONE, else `unknown`.
    pub mtls: bool,
    /// Istio's response flags: `-`, `DENY`, `UF`, `NR`...
    pub response_flags: &'static str,
}

impl ConnLabels {
    /// Set the destination service labels from a service.
    pub fn set_service(&mut self, s: &Service) {
        self.service = Some((s.hostname.clone(), s.name.clone(), s.namespace.clone()));
    }
}

/// A metric family: name, help, and which counter it shows.
type Family = (&'static str, &'static str, fn(&Series) -> u64);

/// The counters of one label set, shared by the connections that carry it: a connection finds
/// its series once, when it opens, and counts its bytes and its close without any lock.
#[derive(Debug)]
pub struct Series {
    /// The label set as the exposition writes it, made when the series is.
    text: String,
    opened: AtomicU64,
    closed: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

impl Series {
    /// A connection of this series closed; `sent` and `received` are the bytes not yet added
    /// by [`Series::bytes`].
    pub fn closed(&self, sent: u64, received: u64) {
        self.bytes(sent, received);
        self.closed.fetch_add(1, Ordering::Relaxed);
    }

    /// A live connection moved `sent` more bytes towards the destination and `received` back.
    pub fn bytes(&self, sent: u64, received: u64) {
        if sent != 0 {
            self.sent.fetch_add(sent, Ordering::Relaxed);
        }
        if received != 0 {
            self.received.fetch_add(received, Ordering::Relaxed);
        }
    }
}

/// The process's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    conns: Mutex<HashMap<ConnLabels, Arc<Series>>>,
    reload_ok: AtomicU64,
    reload_failed: AtomicU64,
    apply_nanos: AtomicU64,
    applies: AtomicU64,
    generation: AtomicU64,
    timeouts: [AtomicU64; TimeoutKind::ALL.len()],
    handshake_rejected: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    io: std::sync::OnceLock<(String, usize)>,
    xds: Mutex<Option<XdsStats>>,
}

/// The xDS client's state, for `zring_xds_*`.
#[derive(Debug, Default)]
struct XdsStats {
    connected: bool,
    connects: u64,
    pushes: std::collections::BTreeMap<String, u64>,
    held: std::collections::BTreeMap<String, usize>,
    nacks: u64,
    dropped_matchers: usize,
    stalls: u64,
}

impl Metrics {
    /// A connection labelled `l` opened: counted in its series, which it keeps to count the
    /// rest. The label set is cloned (a few reference counts) only for a new series.
    pub fn opened(&self, l: &ConnLabels) -> Arc<Series> {
        let mut m = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let series = match m.get(l) {
            Some(s) => s.clone(),
            None => m
                .entry(l.clone())
                .or_insert_with(|| {
                    Arc::new(Series {
                        text: labels(l),
                        opened: AtomicU64::new(0),
                        closed: AtomicU64::new(0),
                        sent: AtomicU64::new(0),
                        received: AtomicU64::new(0),
                    })
                })
                .clone(),
        };
        drop(m);
        series.opened.fetch_add(1, Ordering::Relaxed);
        series
    }

    /// A time limit fired.
    pub fn timeout(&self, kind: TimeoutKind) {
        if let Some(i) = TimeoutKind::ALL.iter().position(|k| *k == kind) {
            self.timeouts[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How often `kind` fired.
    pub fn timeouts(&self, kind: TimeoutKind) -> u64 {
        TimeoutKind::ALL
            .iter()
            .position(|k| *k == kind)
            .map_or(0, |i| self.timeouts[i].load(Ordering::Relaxed))
    }

    /// A connection to `listener` was closed at once: too many unfinished handshakes.
    pub fn handshake_rejected(&self, listener: &'static str) {
        *self
            .handshake_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(listener)
            .or_default() += 1;
    }

    /// The I/O backend the workers run on (`io_uring` or `epoll`) and how many workers.
    pub fn set_io(&self, backend: String, workers: usize) {
        let _ = self.io.set((backend, workers));
    }

    /// Something the xDS client did.
    pub fn xds_event(&self, e: &crate::xds::client::Event<'_>) {
        use crate::xds::client::Event;
        let mut x = self.xds.lock().unwrap_or_else(|p| p.into_inner());
        let x = x.get_or_insert_with(XdsStats::default);
        match e {
            Event::Connected(c) => {
                x.connected = *c;
                if *c {
                    x.connects += 1;
                }
            }
            Event::Stalled => x.stalls += 1,
            Event::Push {
                type_url,
                held,
                nacked,
                dropped_matchers,
            } => {
                x.dropped_matchers = *dropped_matchers;
                *x.pushes.entry(type_url.to_string()).or_default() += 1;
                x.held.insert(type_url.to_string(), *held);
                if *nacked {
                    x.nacks += 1;
                }
            }
        }
    }

    /// A config reload ended; `generation` is the config in force afterwards.
    pub fn reload(&self, ok: bool, generation: u64) {
        if ok {
            self.reload_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.reload_failed.fetch_add(1, Ordering::Relaxed);
        }
        self.generation.store(generation, Ordering::Relaxed);
    }

    /// A new config version took `d` to put in force (index built or changed, certificates of
    /// new local identities fetched).
    pub fn config_applied(&self, d: std::time::Duration) {
        self.apply_nanos.fetch_add(
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.applies.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Held only to take the series out: connections opening meanwhile wait for a copy of
        // pointers, not for the text to be written.
        let mut rows: Vec<Arc<Series>> = self
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        rows.sort_by(|a, b| a.text.cmp(&b.text));
        let families: [Family; 4] = [
            (
                "istio_tcp_connections_opened_total",
                "The total number of TCP connections opened.",
                |c| c.opened.load(Ordering::Relaxed),
            ),
            (
                "istio_tcp_connections_closed_total",
                "The total number of TCP connections closed.",
                |c| c.closed.load(Ordering::Relaxed),
            ),
            (
                "istio_tcp_sent_bytes_total",
                "The size of total bytes sent during response in case of a TCP connection.",
                |c| c.sent.load(Ordering::Relaxed),
            ),
            (
                "istio_tcp_received_bytes_total",
                "The size of total bytes received during request in case of a TCP connection.",
                |c| c.received.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, get) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for c in &rows {
                let _ = writeln!(out, "{name}{{{}}} {}", c.text, get(c));
            }
        }
        let _ = writeln!(
            out,
            "# HELP zring_config_reloads_total Config reloads by result.\n# TYPE zring_config_reloads_total counter\nzring_config_reloads_total{{result=\"success\"}} {}\nzring_config_reloads_total{{result=\"failure\"}} {}",
            self.reload_ok.load(Ordering::Relaxed),
            self.reload_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP zring_config_generation The config in force (1 = the file read at start).\n# TYPE zring_config_generation gauge\nzring_config_generation {}",
            self.generation.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP zring_config_apply_seconds Time to put a config version in force (a file's whole config, or one xDS push's changes).\n# TYPE zring_config_apply_seconds summary\nzring_config_apply_seconds_sum {:.9}\nzring_config_apply_seconds_count {}",
            self.apply_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            self.applies.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP zring_timeouts_total Time limits that fired, by kind.\n# TYPE zring_timeouts_total counter");
        for (i, k) in TimeoutKind::ALL.iter().enumerate() {
            let _ = writeln!(
                out,
                "zring_timeouts_total{{kind=\"{}\"}} {}",
                k.as_str(),
                self.timeouts[i].load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(out, "# HELP zring_handshake_limit_rejected_total Connections closed at once because their listener had too many unfinished handshakes on that worker.\n# TYPE zring_handshake_limit_rejected_total counter");
        for (l, n) in self
            .handshake_rejected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "zring_handshake_limit_rejected_total{{listener=\"{l}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP zring_task_panics_total Connection tasks that panicked; each closed its connection only.\n# TYPE zring_task_panics_total counter\nzring_task_panics_total {}",
            zring_runtime::server::task_panics()
        );
        let _ = writeln!(
            out,
            "# HELP zring_log_lines_dropped_total Log lines dropped because the log sink did not keep up.\n# TYPE zring_log_lines_dropped_total counter\nzring_log_lines_dropped_total {}",
            crate::logging::dropped_lines()
        );
        if let Some(x) = &*self.xds.lock().unwrap_or_else(|p| p.into_inner()) {
            let _ = writeln!(
                out,
                "# HELP zring_xds_connected Whether the xDS stream to the control plane is up.\n# TYPE zring_xds_connected gauge\nzring_xds_connected {}\n# HELP zring_xds_connections_total xDS streams opened.\n# TYPE zring_xds_connections_total counter\nzring_xds_connections_total {}\n# HELP zring_xds_nacks_total xDS pushes refused in part or whole.\n# TYPE zring_xds_nacks_total counter\nzring_xds_nacks_total {}",
                u8::from(x.connected),
                x.connects,
                x.nacks
            );
            let _ = writeln!(out, "# HELP zring_xds_pushes_total xDS pushes received, by type.\n# TYPE zring_xds_pushes_total counter");
            for (t, n) in &x.pushes {
                let _ = writeln!(out, "zring_xds_pushes_total{{type_url=\"{t}\"}} {n}");
            }
            let _ = writeln!(
                out,
                "# HELP zring_xds_matchers_dropped_total String matchers of an unknown or empty type dropped from xDS policies.\n# TYPE zring_xds_matchers_dropped_total counter\nzring_xds_matchers_dropped_total {}\n# HELP zring_xds_stalled_streams_total xDS streams given up because the control plane sent nothing in time.\n# TYPE zring_xds_stalled_streams_total counter\nzring_xds_stalled_streams_total {}",
                x.dropped_matchers,
                x.stalls
            );
            let _ = writeln!(out, "# HELP zring_xds_resources Resources held, by type.\n# TYPE zring_xds_resources gauge");
            for (t, n) in &x.held {
                let _ = writeln!(out, "zring_xds_resources{{type_url=\"{t}\"}} {n}");
            }
        }
        if let Some((backend, workers)) = self.io.get() {
            let _ = writeln!(
                out,
                "# HELP zring_io_backend The I/O backend the workers run on (1 for the one in use).\n# TYPE zring_io_backend gauge\nzring_io_backend{{backend=\"{backend}\"}} 1\n# HELP zring_workers Worker threads (one per core).\n# TYPE zring_workers gauge\nzring_workers {workers}"
            );
        }
        out
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "unknown"
    } else {
        s
    }
}

/// Escape a label value per the exposition format.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(l: &ConnLabels) -> String {
    render_labels(l, "tcp")
}

/// Istio's standard labels of `l`, with `request_protocol` = `protocol`.
pub fn render_labels(l: &ConnLabels, protocol: &str) -> String {
    let mut out = String::with_capacity(512);
    let mut put = |k: &str, v: &str| {
        if !out.is_empty() {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape(or_unknown(v)));
    };
    put(
        "reporter",
        match l.reporter {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
            Reporter::Waypoint => "waypoint",
        },
    );
    for (side, p) in [("source", &l.source), ("destination", &l.destination)] {
        put(&format!("{side}_workload"), &p.workload);
        put(&format!("{side}_canonical_service"), &p.canonical_service);
        put(&format!("{side}_canonical_revision"), &p.canonical_revision);
        put(&format!("{side}_workload_namespace"), &p.namespace);
        put(&format!("{side}_principal"), &p.principal);
        put(&format!("{side}_app"), &p.canonical_service);
        put(&format!("{side}_version"), &p.canonical_revision);
        put(&format!("{side}_cluster"), &p.cluster);
    }
    let (host, name, ns) = l.service.clone().unwrap_or_default();
    put("destination_service", &host);
    put("destination_service_name", &name);
    put("destination_service_namespace", &ns);
    put("request_protocol", protocol);
    put("response_flags", l.response_flags);
    put(
        "connection_security_policy",
        if l.mtls { "mutual_tls" } else { "unknown" },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_istio_names_and_escapes_values() {
        let m = Metrics::default();
        let l = ConnLabels {
            reporter: Reporter::Destination,
            source: Arc::new(Peer {
                workload: "sle\"ep".into(),
                ..Default::default()
            }),
            destination: Peer::none(),
            service: None,
            mtls: true,
            response_flags: "-",
        };
        m.opened(&l).closed(10, 20);
        let text = m.render();
        assert!(text.contains("istio_tcp_connections_opened_total{reporter=\"destination\",source_workload=\"sle\\\"ep\""));
        assert!(text.contains("connection_security_policy=\"mutual_tls\"} 1"));
        assert!(text.contains("istio_tcp_sent_bytes_total{") && text.contains("} 10\n"));
        assert!(text.contains("} 20\n"));
    }

    /// Connections with equal labels share one series even when their label parts are separate
    /// allocations (a config reload makes new ones); another flag is another series; live and
    /// closing bytes add up; /metrics renders while connections hold their series.
    #[test]
    fn equal_labels_share_a_series_and_counts_add_up() {
        let m = Metrics::default();
        let peer = |w: &str| {
            Arc::new(Peer {
                workload: w.into(),
                namespace: "default".into(),
                ..Default::default()
            })
        };
        let l = |flags| ConnLabels {
            reporter: Reporter::Source,
            source: peer("sleep"),
            destination: peer("httpbin"),
            service: None,
            mtls: true,
            response_flags: flags,
        };
        let a = m.opened(&l("-"));
        let b = m.opened(&l("-"));
        assert!(Arc::ptr_eq(&a, &b));
        a.bytes(100, 7);
        let held = m.render();
        assert!(held.contains(
            "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"sleep\""
        ));
        assert!(
            held.contains(",response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 2\n")
        );
        assert!(
            held.contains(",response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 100\n")
        );
        a.closed(1, 0);
        b.closed(10, 3);
        m.opened(&l("DENY")).closed(0, 0);
        let text = m.render();
        let series = |name: &str, flags: &str| {
            let key =
                format!(",response_flags=\"{flags}\",connection_security_policy=\"mutual_tls\"}} ");
            text.lines()
                .find(|line| line.starts_with(name) && line.contains(&key))
                .and_then(|line| line.rsplit(' ').next())
                .and_then(|v| v.parse::<u64>().ok())
        };
        assert_eq!(series("istio_tcp_connections_opened_total", "-"), Some(2));
        assert_eq!(series("istio_tcp_connections_closed_total", "-"), Some(2));
        assert_eq!(series("istio_tcp_sent_bytes_total", "-"), Some(111));
        assert_eq!(series("istio_tcp_received_bytes_total", "-"), Some(10));
        assert_eq!(
            series("istio_tcp_connections_opened_total", "DENY"),
            Some(1)
        );
        assert_eq!(
            series("istio_tcp_connections_closed_total", "DENY"),
            Some(1)
        );
    }
}

//! Istio's request metrics as the waypoint reports them (`reporter="waypoint"`):
//! `istio_requests_total` (counter), `istio_request_duration_milliseconds`,
//! `istio_request_bytes` and `istio_response_bytes` (histograms), with Istio's labels plus
//! `response_code`, `request_protocol` and `response_flags`.

use std::{
    fmt::Write as _,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use super::FastMap;
use crate::metrics::{ConnLabels, Reporter};

/// Istio's default latency buckets (ms).
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Size buckets (bytes): powers of ten, as Istio's.
const SIZE_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// One request's label set.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    /// The peer labels (reporter, source, destination, service, flags).
    pub conn: ConnLabels,
    /// HTTP status.
    pub code: u16,
    /// `http` or `grpc`.
    pub protocol: &'static str,
}

#[derive(Debug, Default, Clone)]
struct Histogram {
    buckets: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.buckets.is_empty() {
            self.buckets = vec![0; bounds.len()];
        }
        for (i, b) in bounds.iter().enumerate() {
            if v <= *b {
                self.buckets[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

#[derive(Debug, Default)]
struct Series {
    requests: u64,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// Why the waypoint refused a CONNECT (400, flag `NR`), as `zring_waypoint_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The target is neither a service VIP nor a workload address of the mesh.
    Unknown,
    /// The target is in the mesh but not bound to this waypoint.
    NotBound,
    /// The target is the waypoint's own address (it would loop).
    OwnAddress,
}

impl Refused {
    const ALL: [Refused; 3] = [Refused::Unknown, Refused::NotBound, Refused::OwnAddress];

    /// The metric's `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Unknown => "unknown_destination",
            Refused::NotBound => "not_bound",
            Refused::OwnAddress => "own_address",
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::Unknown => "the target is neither a service nor a workload of the mesh",
            Refused::NotBound => "the target's service or workload does not use this waypoint",
            Refused::OwnAddress => "the target is the waypoint's own address",
        })
    }
}

/// The waypoint's request metrics.
#[derive(Debug, Default)]
pub struct RequestMetrics {
    series: Mutex<FastMap<RequestLabels, Series>>,
    reload_ok: AtomicU64,
    reload_failed: AtomicU64,
    retries: AtomicU64,
    ejections: AtomicU64,
    overflows: AtomicU64,
    mirrored_ok: AtomicU64,
    mirrored_failed: AtomicU64,
    refused: [AtomicU64; 3],
}

impl RequestMetrics {
    /// A request ended.
    pub fn request(&self, l: &RequestLabels, duration_ms: f64, req_bytes: u64, resp_bytes: u64) {
        let mut m = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let s = match m.get_mut(l) {
            Some(s) => s,
            None => m.entry(l.clone()).or_default(),
        };
        s.requests += 1;
        s.duration.observe(&DURATION_BUCKETS, duration_ms);
        s.request_bytes.observe(&SIZE_BUCKETS, req_bytes as f64);
        s.response_bytes.observe(&SIZE_BUCKETS, resp_bytes as f64);
    }

    /// A resource reload ended.
    pub fn reload(&self, ok: bool) {
        match ok {
            true => self.reload_ok.fetch_add(1, Ordering::Relaxed),
            false => self.reload_failed.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// A request was tried again.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// An endpoint was skipped for a while after failing.
    pub fn ejected(&self) {
        self.ejections.fetch_add(1, Ordering::Relaxed);
    }

    /// A request found no room under a DestinationRule's connection-pool limits.
    pub fn overflowed(&self) {
        self.overflows.fetch_add(1, Ordering::Relaxed);
    }

    /// A mirrored copy of a request was answered (`ok`), or failed.
    pub fn mirrored(&self, ok: bool) {
        match ok {
            true => self.mirrored_ok.fetch_add(1, Ordering::Relaxed),
            false => self.mirrored_failed.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// A CONNECT was refused before any byte of it was served.
    pub fn refused(&self, why: Refused) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Append the Prometheus text.
    pub fn render(&self, out: &mut String) {
        let m = self.series.lock().unwrap_or_else(|p| p.into_inner());
        let mut rows: Vec<(String, &Series)> = m
            .iter()
            .map(|(l, s)| {
                let mut labels = crate::metrics::render_labels(&l.conn, l.protocol);
                let _ = write!(labels, ",response_code=\"{}\"", l.code);
                (labels, s)
            })
            .collect();
        rows.sort_by(|a, b| a.0.cmp(&b.0));
        let _ = writeln!(
            out,
            "# HELP istio_requests_total Requests through the waypoint.\n# TYPE istio_requests_total counter"
        );
        for (l, s) in &rows {
            let _ = writeln!(out, "istio_requests_total{{{l}}} {}", s.requests);
        }
        let hist = |out: &mut String,
                    name: &str,
                    help: &str,
                    bounds: &[f64],
                    get: fn(&Series) -> &Histogram| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (l, s) in &rows {
                let h = get(s);
                for (i, b) in bounds.iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{{l},le=\"{b}\"}} {}",
                        h.buckets.get(i).copied().unwrap_or(0)
                    );
                }
                let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {}", h.count);
                let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum);
                let _ = writeln!(out, "{name}_count{{{l}}} {}", h.count);
            }
        };
        hist(
            out,
            "istio_request_duration_milliseconds",
            "Request duration at the waypoint (ms).",
            &DURATION_BUCKETS,
            |s| &s.duration,
        );
        hist(
            out,
            "istio_request_bytes",
            "Request sizes (bytes of body).",
            &SIZE_BUCKETS,
            |s| &s.request_bytes,
        );
        hist(
            out,
            "istio_response_bytes",
            "Response sizes (bytes of body).",
            &SIZE_BUCKETS,
            |s| &s.response_bytes,
        );
        drop(m);
        let _ = writeln!(
            out,
            "# HELP zring_waypoint_reloads_total Reads of the waypoint's L7 resources by result.\n# TYPE zring_waypoint_reloads_total counter\nzring_waypoint_reloads_total{{result=\"success\"}} {}\nzring_waypoint_reloads_total{{result=\"failure\"}} {}",
            self.reload_ok.load(Ordering::Relaxed),
            self.reload_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP zring_waypoint_retries_total Requests tried again on another endpoint.\n# TYPE zring_waypoint_retries_total counter\nzring_waypoint_retries_total {}\n# HELP zring_waypoint_ejections_total Endpoints skipped for a while after a failure.\n# TYPE zring_waypoint_ejections_total counter\nzring_waypoint_ejections_total {}\n# HELP zring_waypoint_overflows_total Requests refused (503, UO) by a DestinationRule's connection-pool limits.\n# TYPE zring_waypoint_overflows_total counter\nzring_waypoint_overflows_total {}",
            self.retries.load(Ordering::Relaxed),
            self.ejections.load(Ordering::Relaxed),
            self.overflows.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP zring_waypoint_mirrored_requests_total Mirrored copies of requests by result (success: the mirror answered, any status).\n# TYPE zring_waypoint_mirrored_requests_total counter\nzring_waypoint_mirrored_requests_total{{result=\"success\"}} {}\nzring_waypoint_mirrored_requests_total{{result=\"failure\"}} {}",
            self.mirrored_ok.load(Ordering::Relaxed),
            self.mirrored_failed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP zring_waypoint_refused_total CONNECTs refused with 400 (NR) by reason.\n# TYPE zring_waypoint_refused_total counter"
        );
        for why in Refused::ALL {
            let _ = writeln!(
                out,
                "zring_waypoint_refused_total{{reason=\"{}\"}} {}",
                why.label(),
                self.refused[why as usize].load(Ordering::Relaxed)
            );
        }
    }
}

/// The reporter value of waypoint series.
pub const REPORTER: Reporter = Reporter::Waypoint;

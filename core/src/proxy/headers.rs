//! The headers an outbound CONNECT carries, as ztunnel sends them:
//! - `Forwarded: for="<client ip>:<port>"`, plus `;host=<service hostname>` when the client
//!   dialed a service (the destination labels its metrics with that service);
//! - `baggage`: the source workload's telemetry (`k8s.cluster.name`, `k8s.namespace.name`,
//!   `k8s.<kind>.name`, `service.name`, `service.version`);
//! - `traceparent`: a fresh W3C trace context per connection (`00-<trace>-<parent>-00`), so
//!   both ends' logs can be joined.

use std::{cell::Cell, net::SocketAddr};

use zring_hbone::client::ConnectHeaders;

use crate::config::Workload;

/// The headers of a CONNECT from `src` (the connection came from `client`), towards the
/// service `service_host` if the client dialed one.
pub(super) fn connect_headers(
    src: &Workload,
    client: SocketAddr,
    service_host: Option<&str>,
) -> ConnectHeaders {
    ConnectHeaders {
        forwarded_for: Some(client),
        forwarded_host: service_host.map(str::to_string),
        baggage: Some(baggage(src)),
        traceparent: Some(traceparent()),
    }
}

/// ztunnel's baggage value for a source workload.
pub(crate) fn baggage(w: &Workload) -> String {
    let kind = if w.workload_type.is_empty() {
        "deployment"
    } else {
        w.workload_type.as_str()
    };
    let name = if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    };
    let cluster = if w.cluster_id.is_empty() {
        "Kubernetes"
    } else {
        &w.cluster_id
    };
    let mut parts = vec![
        format!("k8s.cluster.name={cluster}"),
        format!("k8s.namespace.name={}", w.namespace),
        format!("k8s.{kind}.name={name}"),
    ];
    if !w.canonical_name.is_empty() {
        parts.push(format!("service.name={}", w.canonical_name));
    }
    if !w.canonical_revision.is_empty() {
        parts.push(format!("service.version={}", w.canonical_revision));
    }
    parts.join(",")
}

thread_local! {
    /// xorshift64* state per worker: trace ids need to be unique, not secret.
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let here = &t as *const u64 as u64;
    (t ^ here.rotate_left(32)) | 1
}

/// The worker's next pseudo-random number (trace ids, the waypoint's weighted choices).
pub(crate) fn next() -> u64 {
    RNG.with(|r| {
        let mut x = r.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        r.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A fresh `traceparent` (version 00, random trace and parent ids, flags 00).
pub(crate) fn traceparent() -> String {
    let (hi, lo, parent) = (next(), next(), next().max(1));
    format!("00-{hi:016x}{lo:016x}-{parent:016x}-00")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_are_well_formed_and_distinct() {
        let a = traceparent();
        let b = traceparent();
        assert_eq!(a.len(), 55, "{a}");
        assert_ne!(a, b);
        let parts: Vec<&str> = a.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!((parts[0], parts[3]), ("00", "00"));
        assert!(parts[1..3]
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit())));
    }
}

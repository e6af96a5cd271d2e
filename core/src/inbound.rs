//! Inbound HBONE (port 15008): what the destination node proxy decides for each CONNECT.
//!
//! Order of checks, each with the status the client sees:
//! 1. The target must be a workload on this node that speaks HBONE (else 503 "not local"; a
//!    TCP-only workload is never reached through HBONE).
//! 2. If the workload has a waypoint, only the waypoint's identity may connect (401): traffic
//!    that bypasses the waypoint is refused by the destination.
//! 3. L4 authorization with the peer's proven identity (401 on deny, naming the policy).
//!
//! The transport (TLS accept, HTTP/2, relaying) is `zring_hbone::server` plus
//! `zring_hbone::relay`; this module is the decision, kept free of I/O so it is tested directly.

use std::net::SocketAddr;

use zring_hbone::{server::StatusCode, SpiffeId};

use crate::config::{
    index::MeshIndex,
    policy::{evaluate, ConnInfo, Verdict},
    InboundProtocol,
};

/// Why a CONNECT was refused, with the status to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status for the CONNECT response.
    pub status: StatusCode,
    /// Log text (also the access log's error field).
    pub reason: String,
    /// Istio's `response_flags` for telemetry (`DENY` for policy, `UF` for unreachable...).
    pub response_flags: &'static str,
}

/// Decide one inbound CONNECT on the proxy of `node`.
///
/// `client` is the original client address (from `Forwarded` when the peer is a trusted
/// waypoint, else the TCP peer), `peer` the identity proven by TLS.
pub fn decide(
    index: &MeshIndex,
    node: &str,
    client: SocketAddr,
    target: SocketAddr,
    peer: Option<&SpiffeId>,
) -> Result<(), Refusal> {
    decide_for(index, node, client, target, peer, true)
}

/// Decide one inbound plaintext connection (15006): the same checks with no identity, so a
/// policy that requires a principal denies, and a workload behind a waypoint refuses it.
pub fn decide_plaintext(
    index: &MeshIndex,
    node: &str,
    client: SocketAddr,
    target: SocketAddr,
) -> Result<(), Refusal> {
    decide_for(index, node, client, target, None, false)
}

fn decide_for(
    index: &MeshIndex,
    node: &str,
    client: SocketAddr,
    target: SocketAddr,
    peer: Option<&SpiffeId>,
    hbone: bool,
) -> Result<(), Refusal> {
    let Some(workload) = index.workload_by_ip(target.ip()).filter(|w| w.node == node) else {
        return Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!("{} is not a workload on node {node}", target.ip()),
            response_flags: "NR",
        });
    };
    if hbone && workload.protocol != InboundProtocol::Hbone {
        return Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!(
                "workload {} does not accept HBONE (protocol TCP)",
                workload.name
            ),
            response_flags: "NR",
        });
    }
    if let Some(wp) = &workload.waypoint {
        let waypoint_id = index
            .workload_by_ip(wp.destination.address)
            .and_then(|w| w.identity().ok());
        if waypoint_id.is_none() || peer != waypoint_id.as_ref() {
            return Err(Refusal {
                status: StatusCode::UNAUTHORIZED,
                reason: format!(
                    "workload {} only accepts traffic through its waypoint {}; peer {} bypassed it",
                    workload.name,
                    wp.destination,
                    peer.map(|p| p.to_string())
                        .unwrap_or_else(|| "(no identity)".into())
                ),
                response_flags: "DENY",
            });
        }
    }
    let conn = ConnInfo {
        src: client,
        dst: target,
        src_identity: peer,
    };
    match evaluate(&index.config.policies, workload, &conn) {
        Verdict::Allow => Ok(()),
        Verdict::Deny(why) => Err(Refusal {
            status: StatusCode::UNAUTHORIZED,
            reason: format!("denied by policy: {why}"),
            response_flags: "DENY",
        }),
    }
}

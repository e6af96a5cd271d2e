//! Every allow/deny decision zring makes, in one place and free of I/O (tested directly):
//!
//! - [`evaluate`]: L4 authorization with ztunnel's semantics. A policy's `rules` nest three
//!   levels: rules (OR) -> clauses (AND) -> matches (OR); inside one match every field present
//!   must hold (AND), each field holds if any of its values does (OR), and a `not*` field holds
//!   if none of its values does. Decision for a connection to a workload: any matching DENY
//!   denies; otherwise, if no ALLOW policy applies, allow; otherwise allow only if some ALLOW
//!   matches. Dry-run policies are evaluated and logged, never enforced.
//! - [`decide`] / [`decide_plaintext`]: what the destination node proxy answers to an inbound
//!   CONNECT (15008) or plaintext connection (15006), and what the source proxy checks before
//!   delivering to a workload on its own node.
//!
//! Order of checks in [`decide`], each with the status the client sees:
//! 1. The target must be a workload on this node that speaks HBONE (else 503 "not local"; a
//!    TCP-only workload is never reached through HBONE).
//! 2. If the workload has a waypoint, only the waypoint's identity may connect (401): traffic
//!    that bypasses the waypoint is refused by the destination.
//! 3. L4 authorization with the peer's proven identity (401 on deny, naming the policy).
//!
//! The transport (TLS accept, HTTP/2, relaying) is `crate::proxy`'s inbound side.

use std::net::SocketAddr;

use zring_hbone::{server::StatusCode, SpiffeId};

use crate::config::{
    index::MeshIndex, policy::StringMatch, Authorization, InboundProtocol, PolicyAction,
    PolicyScope, RbacMatch, Workload,
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

/// ztunnel's checks of a CONNECT's target before any policy (its `validate_destination` and
/// self-call check), with ztunnel's statuses:
/// 1. a port of zring's own listeners (`own_port`: 15001, 15006, 15008, ...) is a self-call
///    (503): a tunnel nested through it would arrive from zring's own address, laundering the
///    client's past `sourceIps`/`ipBlocks` rules;
/// 2. the target must be the address whose listener (and certificate) took the connection,
///    `local`, unless that workload is the target's waypoint (a waypoint sandwich): else 400,
///    so a peer cannot reach one workload through another's listener.
pub fn check_target(
    index: &MeshIndex,
    local: std::net::IpAddr,
    target: SocketAddr,
    own_port: impl Fn(u16) -> bool,
) -> Result<(), Refusal> {
    if own_port(target.port()) {
        return Err(Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            reason: format!(
                "{target} is one of zring's own ports (a self-call through the node proxy)"
            ),
            response_flags: "NR",
        });
    }
    if target.ip() == local {
        return Ok(());
    }
    let sandwich = index.workload_by_ip(local).is_some_and(
        |me| matches!(index.waypoint_at(target.ip()), Some(Some(gw)) if index.gateway_is(gw, me)),
    );
    match sandwich {
        true => Ok(()),
        false => Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            reason: format!(
                "the CONNECT names {target}, but the connection was made to {local} (another workload's listener)"
            ),
            response_flags: "NR",
        }),
    }
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
    match evaluate(index.policies_for(workload), workload, &conn) {
        Verdict::Allow => Ok(()),
        Verdict::Deny(why) => Err(Refusal {
            status: StatusCode::UNAUTHORIZED,
            reason: format!("denied by policy: {why}"),
            response_flags: "DENY",
        }),
    }
}

/// The facts a decision is made on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo<'a> {
    /// Client address as the destination sees it.
    pub src: SocketAddr,
    /// Destination workload address and port.
    pub dst: SocketAddr,
    /// The client's proven identity (None for plaintext).
    pub src_identity: Option<&'a SpiffeId>,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Refuse, naming the policy that decided (`namespace/name`) or why none allowed.
    Deny(String),
}

impl StringMatch {
    fn matches(&self, s: &str) -> bool {
        match self {
            Self::Exact(e) => s == e,
            Self::Prefix(p) => s.starts_with(p.as_str()),
            Self::Suffix(x) => s.ends_with(x.as_str()),
            Self::Presence(_) => !s.is_empty(),
        }
    }
}

fn field<T>(pos: &[T], neg: &[T], mut pred: impl FnMut(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&mut pred)) && (neg.is_empty() || !neg.iter().any(&mut pred))
}

impl RbacMatch {
    fn is_empty(&self) -> bool {
        *self == RbacMatch::default()
    }

    fn matches(&self, c: &ConnInfo<'_>) -> bool {
        let principal = c.src_identity.map(|i| i.principal()).unwrap_or_default();
        let ns = c.src_identity.map(|i| i.namespace()).unwrap_or_default();
        field(&self.destination_ips, &self.not_destination_ips, |b| {
            b.0.contains(&c.dst.ip())
        }) && field(&self.source_ips, &self.not_source_ips, |b| {
            b.0.contains(&c.src.ip())
        }) && field(&self.destination_ports, &self.not_destination_ports, |p| {
            *p == c.dst.port()
        }) && field(&self.service_accounts, &self.not_service_accounts, |m| {
            c.src_identity.is_some_and(|i| {
                i.namespace() == m.namespace && i.service_account() == m.service_account
            })
        }) && field(&self.principals, &self.not_principals, |m| {
            c.src_identity.is_some() && m.matches(&principal)
        }) && field(&self.namespaces, &self.not_namespaces, |m| m.matches(ns))
    }
}

impl Authorization {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether this policy applies to `w`.
    pub fn applies_to(&self, w: &Workload) -> bool {
        match self.scope {
            PolicyScope::Global => true,
            PolicyScope::Namespace => self.namespace == w.namespace,
            PolicyScope::WorkloadSelector => {
                w.authorization_policies.iter().any(|p| *p == self.key())
            }
        }
    }

    /// Whether the connection matches any rule.
    pub fn matches(&self, c: &ConnInfo<'_>) -> bool {
        self.rules.iter().any(|rule| {
            rule.iter().all(|clause| {
                clause.is_empty() || clause.iter().any(|m| !m.is_empty() && m.matches(c))
            })
        })
    }
}

/// Decide a connection to `dst_workload` against the policies that apply to it.
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p Authorization>,
    dst_workload: &Workload,
    c: &ConnInfo<'_>,
) -> Verdict {
    let applicable: Vec<&Authorization> = policies
        .into_iter()
        .filter(|p| p.applies_to(dst_workload))
        .collect();
    for p in applicable.iter().filter(|p| p.action == PolicyAction::Deny) {
        if p.matches(c) {
            if p.dry_run {
                tracing::info!(policy = %p.key(), "dry-run DENY policy would deny this connection");
                continue;
            }
            return Verdict::Deny(p.key());
        }
    }
    let allows: Vec<&&Authorization> = applicable
        .iter()
        .filter(|p| p.action == PolicyAction::Allow && !p.dry_run)
        .collect();
    for p in applicable
        .iter()
        .filter(|p| p.action == PolicyAction::Allow && p.dry_run)
    {
        tracing::info!(policy = %p.key(), matches = p.matches(c), "dry-run ALLOW policy evaluated");
    }
    if allows.is_empty() || allows.iter().any(|p| p.matches(c)) {
        Verdict::Allow
    } else {
        let names: Vec<String> = allows.iter().map(|p| p.key()).collect();
        Verdict::Deny(format!("no ALLOW policy matched ({})", names.join(", ")))
    }
}

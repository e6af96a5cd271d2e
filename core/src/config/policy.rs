//! L4 authorization with ztunnel's semantics.
//!
//! A policy's `rules` nest three levels: rules (OR) -> clauses (AND) -> matches (OR); inside one
//! match every field present must hold (AND), each field holds if any of its values does (OR),
//! and a `not*` field holds if none of its values does. Decision for a connection to a
//! workload: any matching DENY denies; otherwise, if no ALLOW policy applies, allow; otherwise
//! allow only if some ALLOW matches. Dry-run policies are evaluated and logged, never enforced.

use std::net::{IpAddr, SocketAddr};

use serde::Deserialize;
use zring_hbone::SpiffeId;

use super::Workload;

/// Which workloads a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum PolicyScope {
    /// Every workload in the mesh.
    Global,
    /// Every workload in the policy's namespace.
    Namespace,
    /// Workloads that list the policy (`namespace/name`) in `authorizationPolicies`.
    WorkloadSelector,
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum PolicyAction {
    /// Allow what matches.
    Allow,
    /// Deny what matches.
    Deny,
}

/// A string matcher (`!Exact`, `!Prefix`, `!Suffix`, `!Presence` in YAML).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Present and non-empty.
    Presence(#[serde(default)] Ignored),
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

/// Accepts and discards any value (`!Presence`, `!Presence {}`, `!Presence []`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ignored;

impl<'de> Deserialize<'de> for Ignored {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        serde::de::IgnoredAny::deserialize(d)?;
        Ok(Ignored)
    }
}

impl serde::Serialize for Ignored {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_unit()
    }
}

/// `namespace` + `serviceAccount`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

/// An IP block, `10.0.0.0/8` or a bare address.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IpBlock(pub ipnet::IpNet);

impl<'de> Deserialize<'de> for IpBlock {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(net) = s.parse::<ipnet::IpNet>() {
            return Ok(Self(net));
        }
        s.parse::<IpAddr>().map(|ip| Self(ip.into())).map_err(|_| {
            serde::de::Error::custom(format!("{s:?} is neither an IP address nor a CIDR block"))
        })
    }
}

/// One match: all fields present must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase", default)]
#[allow(missing_docs)]
pub struct RbacMatch {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpBlock>,
    pub not_source_ips: Vec<IpBlock>,
    pub destination_ips: Vec<IpBlock>,
    pub not_destination_ips: Vec<IpBlock>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// An AuthorizationPolicy as ztunnel receives it.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    /// Policy name.
    pub name: String,
    /// Policy namespace.
    pub namespace: String,
    /// Where it applies.
    pub scope: PolicyScope,
    /// Allow or deny.
    pub action: PolicyAction,
    /// rules -> clauses -> matches.
    #[serde(default)]
    pub rules: Vec<Vec<Vec<RbacMatch>>>,
    /// Evaluate and log only.
    pub dry_run: bool,
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

//! L4 authorization policies as ztunnel's config carries them (data only; how they decide is
//! `crate::authz`).

use std::net::IpAddr;

use serde::Deserialize;

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

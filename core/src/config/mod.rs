//! The mesh configuration: ztunnel's local YAML (`LOCAL_XDS_PATH`) as a typed, validated model.
//!
//! The file shape is ztunnel's `LocalConfig`: `workloads:`, `services:`, `policies:`. Unknown
//! fields are accepted and ignored (ztunnel grows fields; a file it accepts must load here).
//! Errors name the file, the field path and the problem, e.g.
//! `mesh.yaml: workloads[2].workloadIps[0]: invalid IP address syntax at line 31 column 17`.

pub mod index;
pub mod policy;

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use serde::{Deserialize, Deserializer};

pub use policy::{Authorization, PolicyAction, PolicyScope, RbacMatch};

/// ztunnel's default HBONE port, used when a gateway address gives none.
pub const DEFAULT_HBONE_PORT: u16 = 15008;
/// Trust domain of workloads that do not name one (Kubernetes' default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The YAML is malformed or a field has the wrong shape.
    #[error("{path}: {field}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Path of the offending field (`workloads[2].workloadIps[0]`), or `.` for the document.
        field: String,
        /// What is wrong, with line and column where the parser knows them.
        message: String,
    },
    /// The file parsed but is inconsistent.
    #[error("{path}: {field}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The offending field.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// How a workload accepts inbound traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
pub enum InboundProtocol {
    /// Plain TCP: the workload is not captured; traffic to it is passed through.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// HBONE on port 15008 of its node proxy.
    #[serde(rename = "HBONE")]
    Hbone,
}

/// `network/ip`, as ztunnel writes service VIPs and gateway addresses (`"/10.96.0.20"` for the
/// default network).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct NetworkAddress {
    /// Network name ("" = default).
    pub network: String,
    /// The address.
    pub address: IpAddr,
}

impl FromStr for NetworkAddress {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (network, ip) = s.split_once('/').ok_or_else(|| {
            format!("{s:?} is not network/ip (use \"/{s}\" for the default network)")
        })?;
        let address = ip.parse().map_err(|e| format!("{ip:?}: {e}"))?;
        Ok(Self {
            network: network.to_string(),
            address,
        })
    }
}

impl<'de> Deserialize<'de> for NetworkAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

/// Where a waypoint (or network gateway) is reached.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayAddress {
    /// The gateway's address.
    pub destination: NetworkAddress,
    /// Its HBONE port.
    #[serde(default = "default_hbone_port")]
    pub hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    DEFAULT_HBONE_PORT
}

fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_string()
}

fn default_service_account() -> String {
    "default".to_string()
}

/// One workload (a pod or VM).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Workload {
    /// Unique id, e.g. `cluster1//v1/Pod/default/sleep`.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account (identity).
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Trust domain (identity).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// The workload's addresses.
    #[serde(default)]
    pub workload_ips: Vec<IpAddr>,
    /// HBONE or TCP.
    #[serde(default)]
    pub protocol: InboundProtocol,
    /// The node it runs on; local workloads are those whose node is `--node-name`.
    #[serde(default)]
    pub node: String,
    /// Network name.
    #[serde(default)]
    pub network: String,
    /// The workload's waypoint, if traffic to it must go through one.
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    /// `namespace/hostname` -> {service port: target port}.
    #[serde(default)]
    pub services: HashMap<String, HashMap<u16, u16>>,
    /// WorkloadSelector policies that apply to it, as `namespace/name`.
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    /// Istio's canonical service name (telemetry).
    #[serde(default)]
    pub canonical_name: String,
    /// Istio's canonical revision (telemetry).
    #[serde(default)]
    pub canonical_revision: String,
    /// Owning workload's name, e.g. the Deployment (telemetry).
    #[serde(default)]
    pub workload_name: String,
    /// Cluster id (telemetry).
    #[serde(default)]
    pub cluster_id: String,
    /// Owning workload's kind, lower case (`deployment`, `statefulset`...): names the
    /// `k8s.<kind>.name` baggage entry. Empty means `deployment`, as in ztunnel.
    #[serde(default)]
    pub workload_type: String,
    /// Pod labels (a zring extension of the local format, read by the waypoint's
    /// DestinationRule subsets; ztunnel ignores it). Without it, `app` and `version` are the
    /// canonical name and revision, as Istio derives those from the labels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Its identity and metric labels, worked out on first use and shared by its connections.
    #[serde(skip)]
    pub derived: Derived,
}

/// What a connection needs of its workloads and would otherwise rebuild each time: the SPIFFE
/// id (formatted and parsed) and the metric label set (six strings). Made once per workload
/// version: a clone starts empty, so a changed copy never carries its original's values.
#[derive(Default)]
pub struct Derived(
    std::sync::OnceLock<(
        Result<zring_hbone::SpiffeId, zring_hbone::identity::IdentityError>,
        std::sync::Arc<crate::metrics::Peer>,
    )>,
);

impl Clone for Derived {
    fn clone(&self) -> Self {
        Derived::default()
    }
}

impl fmt::Debug for Derived {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Derived(made)"
        } else {
            "Derived(not yet)"
        })
    }
}

/// Whether workload `w` carries every label in `want` (`app` and `version` fall back to its
/// canonical name and revision).
pub fn labels_match(w: &Workload, want: &std::collections::BTreeMap<String, String>) -> bool {
    want.iter().all(|(k, v)| match w.labels.get(k) {
        Some(have) => have == v,
        None => match k.as_str() {
            "version" | "service.istio.io/canonical-revision" => &w.canonical_revision == v,
            "app" | "service.istio.io/canonical-name" => &w.canonical_name == v,
            _ => false,
        },
    })
}

impl Workload {
    /// The workload's SPIFFE identity.
    pub fn identity(&self) -> Result<zring_hbone::SpiffeId, zring_hbone::identity::IdentityError> {
        self.derived().0.clone()
    }

    /// Its SPIFFE identity, borrowed (no copy: for comparisons on a connection's path).
    pub fn identity_ref(
        &self,
    ) -> Result<&zring_hbone::SpiffeId, &zring_hbone::identity::IdentityError> {
        self.derived().0.as_ref()
    }

    /// Its metric labels, with its own identity as principal (shared: a clone is a count).
    pub fn peer(&self) -> std::sync::Arc<crate::metrics::Peer> {
        self.derived().1.clone()
    }

    fn derived(
        &self,
    ) -> &(
        Result<zring_hbone::SpiffeId, zring_hbone::identity::IdentityError>,
        std::sync::Arc<crate::metrics::Peer>,
    ) {
        self.derived.0.get_or_init(|| {
            let id = zring_hbone::SpiffeId::new(
                &self.trust_domain,
                &self.namespace,
                &self.service_account,
            );
            let peer = crate::metrics::Peer::of(self, id.as_ref().ok());
            (id, std::sync::Arc::new(peer))
        })
    }
}

/// A service: VIPs, ports, optionally a waypoint.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// `name.namespace.svc.cluster.local`.
    pub hostname: String,
    /// Virtual IPs.
    #[serde(default)]
    pub vips: Vec<NetworkAddress>,
    /// Service port -> target port.
    #[serde(default)]
    pub ports: HashMap<u16, u16>,
    /// Extra identities the service's endpoints may present.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// The service's waypoint.
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    /// Endpoint preference (Istio's `LoadBalancing`): none means round robin over all.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
}

/// A locality scope an endpoint can share with the client (Istio's `LoadBalancing.Scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Scope {
    /// Same region (not evaluated: no locality in the local config; always matches).
    Region,
    /// Same zone (not evaluated; always matches).
    Zone,
    /// Same subzone (not evaluated; always matches).
    Subzone,
    /// Same node.
    Node,
    /// Same cluster.
    Cluster,
    /// Same network.
    Network,
}

/// What to do with endpoints that do not match every preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
pub enum LoadBalancerMode {
    /// Only endpoints that match every preference; none is an error.
    Strict,
    /// Prefer the endpoints that match the most leading preferences; fall back to the others.
    #[default]
    Failover,
}

/// Istio's `LoadBalancing`: ordered routing preferences and a mode.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    /// Scopes in order of preference.
    #[serde(default)]
    pub routing_preferences: Vec<Scope>,
    /// Strict or failover.
    #[serde(default)]
    pub mode: LoadBalancerMode,
}

impl LoadBalancer {
    /// How many leading preferences `endpoint` shares with `client` (a client on `node`).
    pub fn rank(&self, client: &Workload, node: &str, endpoint: &Workload) -> usize {
        self.routing_preferences
            .iter()
            .take_while(|s| match s {
                Scope::Node => endpoint.node == node,
                Scope::Cluster => endpoint.cluster_id == client.cluster_id,
                Scope::Network => endpoint.network == client.network,
                Scope::Region | Scope::Zone | Scope::Subzone => true,
            })
            .count()
    }

    /// The endpoints to choose from: the best-ranked group (failover), or only those that match
    /// every preference (strict, possibly none).
    pub fn select<'a, T>(
        &self,
        client: &Workload,
        node: &str,
        endpoints: &[(&'a Workload, T)],
    ) -> Vec<(&'a Workload, T)>
    where
        T: Copy,
    {
        let ranks: Vec<usize> = endpoints
            .iter()
            .map(|(w, _)| self.rank(client, node, w))
            .collect();
        let want = match self.mode {
            LoadBalancerMode::Strict => self.routing_preferences.len(),
            LoadBalancerMode::Failover => ranks.iter().copied().max().unwrap_or(0),
        };
        endpoints
            .iter()
            .zip(ranks)
            .filter(|(_, r)| *r >= want)
            .map(|(e, _)| *e)
            .collect()
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalConfig {
    /// Workloads.
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// Services.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Authorization policies.
    #[serde(default)]
    pub policies: Vec<Authorization>,
}

impl LocalConfig {
    /// Parse YAML text; `origin` names the file in errors.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let cfg: LocalConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let message = e.into_inner().to_string();
            // The YAML parser already starts some messages with the field path.
            let message = match message.strip_prefix(&format!("{field}: ")) {
                Some(rest) => rest.to_string(),
                None => message,
            };
            ConfigError::Parse {
                path: origin.to_path_buf(),
                field,
                message,
            }
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Read and parse a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text, path)
    }

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        let invalid = |field: String, message: String| ConfigError::Invalid {
            path: origin.to_path_buf(),
            field,
            message,
        };
        let mut uids = std::collections::HashSet::new();
        let mut ips = HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            if !uids.insert(w.uid.as_str()) {
                return Err(invalid(
                    format!("workloads[{i}].uid"),
                    format!("duplicate uid {:?}", w.uid),
                ));
            }
            w.identity().map_err(|e| {
                invalid(format!("workloads[{i}]"), format!("no valid identity: {e}"))
            })?;
            for (j, ip) in w.workload_ips.iter().enumerate() {
                if let Some(other) = ips.insert((w.network.as_str(), *ip), w.uid.as_str()) {
                    return Err(invalid(
                        format!("workloads[{i}].workloadIps[{j}]"),
                        format!("{ip} is also the address of {other:?}"),
                    ));
                }
            }
            for (j, p) in w.authorization_policies.iter().enumerate() {
                if p.split_once('/').is_none() {
                    return Err(invalid(
                        format!("workloads[{i}].authorizationPolicies[{j}]"),
                        format!("{p:?} is not namespace/name"),
                    ));
                }
            }
        }
        for (i, p) in self.policies.iter().enumerate() {
            if p.name.is_empty() {
                return Err(invalid(
                    format!("policies[{i}].name"),
                    "empty policy name".into(),
                ));
            }
        }
        Ok(())
    }
}

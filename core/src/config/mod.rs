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

fn default_capacity() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

/// Where a workload runs (Istio's `Locality`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Locality {
    /// `topology.kubernetes.io/region`.
    #[serde(default)]
    pub region: String,
    /// `topology.kubernetes.io/zone`.
    #[serde(default)]
    pub zone: String,
    /// `topology.istio.io/subzone`.
    #[serde(default)]
    pub subzone: String,
}

impl Locality {
    /// No region, zone or subzone.
    pub fn is_empty(&self) -> bool {
        self.region.is_empty() && self.zone.is_empty() && self.subzone.is_empty()
    }
}

/// A workload's readiness as istiod reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum HealthStatus {
    /// Ready: an endpoint of its services.
    #[default]
    Healthy,
    /// Not ready: left out of its services' endpoints (unless they allow all).
    Unhealthy,
}

impl HealthStatus {
    /// Ready.
    pub fn is_healthy(&self) -> bool {
        *self == HealthStatus::Healthy
    }
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
    /// Region, zone and subzone (the node's `topology.kubernetes.io` labels): what a service's
    /// `Region`/`Zone`/`Subzone` routing preferences compare.
    #[serde(default, skip_serializing_if = "Locality::is_empty")]
    pub locality: Locality,
    /// `Healthy` (ready) or `Unhealthy`: services send nothing to an unhealthy endpoint unless
    /// their health policy is `AllowAll`.
    #[serde(default, skip_serializing_if = "HealthStatus::is_healthy")]
    pub status: HealthStatus,
    /// Relative weight among a service's endpoints (istiod's `capacity`, 1 when unset; 0 takes
    /// no new connections).
    #[serde(default = "default_capacity", skip_serializing_if = "is_one")]
    pub capacity: u32,
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
/// The longest duration zring takes from any config, flag or resource: a century. Past it a
/// value is refused with an error naming it, rather than overflowing a deadline (`now + d`)
/// and panicking the thread that computes it.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86400);

/// `d` if it is at most [`MAX_DURATION`]; else why not.
pub fn bounded(d: std::time::Duration, what: &str) -> Result<std::time::Duration, String> {
    match d <= MAX_DURATION {
        true => Ok(d),
        false => Err(format!(
            "{what:?} is longer than a century, the longest duration zring accepts"
        )),
    }
}

/// Seconds (a float, as flags and Istio's `1.5s` write them) as a duration, refused when
/// negative, not finite or past [`MAX_DURATION`].
pub fn seconds(v: f64, what: &str) -> Result<std::time::Duration, String> {
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{what:?} is not a duration"));
    }
    let d = std::time::Duration::try_from_secs_f64(v).map_err(|_| {
        format!("{what:?} is longer than a century, the longest duration zring accepts")
    })?;
    bounded(d, what)
}

/// A duration flag (`10s`, `1h30m`, `500ms`), refused past [`MAX_DURATION`]: the value parser
/// of every duration flag and environment variable.
pub fn duration_flag(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))?;
    bounded(d, s)
}

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

impl Service {
    /// Whether `w` counts as one of its endpoints: healthy, or any when its health policy
    /// allows all (ztunnel's `should_include_endpoint`).
    pub fn admits(&self, w: &Workload) -> bool {
        w.status.is_healthy()
            || self
                .load_balancer
                .as_ref()
                .is_some_and(|lb| lb.health_policy == HealthPolicy::AllowAll)
    }
}

/// A locality scope an endpoint can share with the client (Istio's `LoadBalancing.Scope`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum Scope {
    /// Same region.
    Region,
    /// Same zone.
    Zone,
    /// Same subzone.
    Subzone,
    /// Same node.
    Node,
    /// Same cluster.
    Cluster,
    /// Same network.
    Network,
}

/// How a service's routing preferences choose endpoints (Istio's `LoadBalancing.Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
pub enum LoadBalancerMode {
    /// Preferences are not considered (istiod's `UNSPECIFIED_MODE`): any endpoint.
    Standard,
    /// Only endpoints that match every preference; none is an error.
    Strict,
    /// Prefer the endpoints that match the most leading preferences; fall back to the others.
    #[default]
    Failover,
    /// No endpoint is chosen: the connection goes to the address the client dialed.
    Passthrough,
}

/// Which endpoints a service may send to (Istio's `LoadBalancing.HealthPolicy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
pub enum HealthPolicy {
    /// Healthy endpoints only.
    #[default]
    OnlyHealthy,
    /// Unhealthy ones too (a service that publishes not-ready addresses).
    AllowAll,
}

/// Istio's `LoadBalancing`: ordered routing preferences, a mode and a health policy.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancer {
    /// Scopes in order of preference.
    #[serde(default)]
    pub routing_preferences: Vec<Scope>,
    /// Standard, strict, failover or passthrough.
    #[serde(default)]
    pub mode: LoadBalancerMode,
    /// Whether unhealthy endpoints count.
    #[serde(default)]
    pub health_policy: HealthPolicy,
}

impl LoadBalancer {
    /// How closely `endpoint` matches the preferences for `client` (a client on `node`): the
    /// number of leading preferences it shares, as ztunnel ranks them. When `Network` comes
    /// first it is a requirement of its own: an endpoint on another network is ranked by the
    /// other scopes alone, and one on the same network above every such endpoint.
    pub fn rank(&self, client: &Workload, node: &str, endpoint: &Workload) -> usize {
        let prefs = &self.routing_preferences;
        let network_first = prefs.first() == Some(&Scope::Network);
        let mut rank = 0;
        let mut bonus = 0;
        for s in prefs {
            let same = match s {
                Scope::Region => endpoint.locality.region == client.locality.region,
                Scope::Zone => endpoint.locality.zone == client.locality.zone,
                Scope::Subzone => endpoint.locality.subzone == client.locality.subzone,
                Scope::Node => endpoint.node == node,
                Scope::Cluster => endpoint.cluster_id == client.cluster_id,
                Scope::Network => {
                    let same = endpoint.network == client.network;
                    if network_first {
                        if !same {
                            continue;
                        }
                        bonus = prefs.len() - 1;
                    }
                    same
                }
            };
            if !same {
                break;
            }
            rank += 1;
        }
        rank + bonus
    }

    /// The endpoints to choose from: the best-ranked group (failover), only those that match
    /// every preference (strict, possibly none), or all of them (standard, passthrough).
    pub fn select<'a, T>(
        &self,
        client: &Workload,
        node: &str,
        endpoints: &[(&'a Workload, T)],
    ) -> Vec<(&'a Workload, T)>
    where
        T: Copy,
    {
        if matches!(
            self.mode,
            LoadBalancerMode::Standard | LoadBalancerMode::Passthrough
        ) {
            return endpoints.to_vec();
        }
        let ranks: Vec<usize> = endpoints
            .iter()
            .map(|(w, _)| self.rank(client, node, w))
            .collect();
        let want = match self.mode {
            // Every preference matched (with the network-first bonus when it applies).
            LoadBalancerMode::Strict => {
                let n = self.routing_preferences.len();
                match self.routing_preferences.first() {
                    Some(Scope::Network) => 2 * n - 1,
                    _ => n,
                }
            }
            _ => ranks.iter().copied().max().unwrap_or(0),
        };
        endpoints
            .iter()
            .zip(ranks)
            .filter(|(_, r)| *r >= want)
            .map(|(e, _)| *e)
            .collect()
    }
}

/// The index of the `n`th pick among `weights`, in turn by weight (weighted round robin: over
/// `sum` picks, each index comes up its weight's number of times); `None` when every weight is
/// zero.
pub fn weighted_turn(weights: impl Iterator<Item = u32> + Clone, n: usize) -> Option<usize> {
    let sum: u64 = weights.clone().map(u64::from).sum();
    if sum == 0 {
        return None;
    }
    let mut k = n as u64 % sum;
    for (i, w) in weights.enumerate() {
        if k < u64::from(w) {
            return Some(i);
        }
        k -= u64::from(w);
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> LocalConfig {
        LocalConfig::from_yaml(yaml, Path::new("t")).expect("test config")
    }

    /// A workload `name` on `node` in `network`, region/zone/subzone from `at` (`r/z/s`).
    fn at(name: &str, node: &str, network: &str, at: &str) -> Workload {
        let mut l = at.split('/');
        let mut part = || l.next().unwrap_or_default().to_string();
        let mut w = parse(&format!(
            "workloads:\n- uid: c//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  \
             node: {node}\n  network: \"{network}\"\n"
        ))
        .workloads
        .remove(0);
        w.locality = Locality {
            region: part(),
            zone: part(),
            subzone: part(),
        };
        w
    }

    fn chosen(lb: &LoadBalancer, client: &Workload, eps: &[Workload]) -> Vec<String> {
        let eps: Vec<(&Workload, u16)> = eps.iter().map(|w| (w, 80)).collect();
        lb.select(client, "n1", &eps)
            .iter()
            .map(|(w, _)| w.name.clone())
            .collect()
    }

    #[test]
    fn prefer_close_takes_the_nearest_locality_and_falls_back_in_order() {
        let client = at("client", "n1", "", "r1/z1/s1");
        let lb = LoadBalancer {
            routing_preferences: vec![Scope::Network, Scope::Region, Scope::Zone, Scope::Subzone],
            mode: LoadBalancerMode::Failover,
            health_policy: HealthPolicy::OnlyHealthy,
        };
        let mut eps = vec![
            at("other-network-same-subzone", "n9", "far", "r1/z1/s1"),
            at("other-region", "n2", "", "r2/z1/s1"),
            at("same-region", "n2", "", "r1/z2/s1"),
            at("same-zone", "n2", "", "r1/z1/s2"),
            at("same-subzone", "n2", "", "r1/z1/s1"),
        ];
        // Each removal of the best falls back one scope; the same network outranks a closer
        // locality on another network.
        for want in [
            "same-subzone",
            "same-zone",
            "same-region",
            "other-region",
            "other-network-same-subzone",
        ] {
            assert_eq!(chosen(&lb, &client, &eps), [want]);
            eps.pop();
        }
        // Strict: only a full match (network included), else nothing.
        let strict = LoadBalancer {
            mode: LoadBalancerMode::Strict,
            ..lb.clone()
        };
        let eps = [
            at("same-zone", "n2", "", "r1/z1/s2"),
            at("same-subzone", "n2", "", "r1/z1/s1"),
        ];
        assert_eq!(chosen(&strict, &client, &eps), ["same-subzone"]);
        assert!(chosen(&strict, &client, &eps[..1]).is_empty());
        // Standard ignores the preferences.
        let standard = LoadBalancer {
            mode: LoadBalancerMode::Standard,
            ..lb
        };
        assert_eq!(chosen(&standard, &client, &eps).len(), 2);
        // Without Network first, a mismatch ends the rank where it happens.
        let zone_first = LoadBalancer {
            routing_preferences: vec![Scope::Zone, Scope::Node],
            mode: LoadBalancerMode::Failover,
            health_policy: HealthPolicy::OnlyHealthy,
        };
        let eps = [
            at("other-zone-same-node", "n1", "", "r1/z2/s1"),
            at("same-zone-other-node", "n2", "", "r1/z1/s1"),
        ];
        assert_eq!(chosen(&zone_first, &client, &eps), ["same-zone-other-node"]);
    }

    #[test]
    fn weighted_turns_follow_capacity() {
        let count = |w: &[u32], n: usize| {
            let mut c = vec![0; w.len()];
            for i in 0..n {
                c[weighted_turn(w.iter().copied(), i).unwrap()] += 1;
            }
            c
        };
        assert_eq!(count(&[1, 1, 1], 9), [3, 3, 3]);
        assert_eq!(count(&[3, 1], 8), [6, 2]);
        assert_eq!(count(&[0, 2], 5), [0, 5]);
        assert_eq!(weighted_turn([0, 0].into_iter(), 3), None);
        assert_eq!(weighted_turn(std::iter::empty(), 0), None);
        // No overflow with the largest weights.
        assert_eq!(
            weighted_turn([u32::MAX, u32::MAX].into_iter(), usize::MAX),
            Some(1)
        );
    }

    #[test]
    fn ztunnels_locality_status_capacity_and_load_balancer_fields_load() {
        let cfg = parse(
            "workloads:\n- uid: c//v1/Pod/default/a\n  name: a\n  namespace: default\n  \
             locality: {region: r1, zone: z1}\n  status: Unhealthy\n  capacity: 0\n\
             - uid: c//v1/Pod/default/b\n  name: b\n  namespace: default\n\
             services:\n- name: s\n  namespace: default\n  hostname: s.default.svc.cluster.local\n  \
             vips: []\n  ports: {}\n  loadBalancer:\n    routingPreferences: [Network, Region]\n    \
             mode: Standard\n    healthPolicy: AllowAll\n",
        );
        let (a, b) = (&cfg.workloads[0], &cfg.workloads[1]);
        assert_eq!(
            (a.locality.region.as_str(), a.locality.zone.as_str()),
            ("r1", "z1")
        );
        assert_eq!((a.status, a.capacity), (HealthStatus::Unhealthy, 0));
        assert_eq!((b.status, b.capacity), (HealthStatus::Healthy, 1));
        assert!(b.locality.is_empty());
        let s = &cfg.services[0];
        assert!(s.admits(a) && s.admits(b));
        let lb = s.load_balancer.as_ref().unwrap();
        assert_eq!(
            (lb.mode, lb.health_policy),
            (LoadBalancerMode::Standard, HealthPolicy::AllowAll)
        );
        let mut only_healthy = s.clone();
        only_healthy.load_balancer = None;
        assert!(!only_healthy.admits(a) && only_healthy.admits(b));
        // Defaults are left out of a dump; the rest is shown.
        let dump = serde_json::to_value(&cfg.workloads).unwrap();
        assert_eq!(dump[0]["status"], "Unhealthy");
        assert_eq!(dump[0]["capacity"], 0);
        assert_eq!(dump[0]["locality"]["zone"], "z1");
        assert!(dump[1].get("status").is_none() && dump[1].get("locality").is_none());
        // An unknown mode is refused with its field.
        let err = LocalConfig::from_yaml(
            "services:\n- name: s\n  namespace: default\n  hostname: h\n  vips: []\n  ports: {}\n  \
             loadBalancer: {mode: Sometimes}\n",
            Path::new("t"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("services[0].loadBalancer.mode"), "{err}");
    }
}

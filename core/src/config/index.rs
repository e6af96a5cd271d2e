//! Lookups the data path makes, kept up to date one resource at a time: workload by IP, by pod
//! and by node; service by VIP and by hostname with its endpoints; the policies that apply to
//! a workload.
//!
//! Every map is a persistent one (`imbl`): a new config version is the old one with a change
//! applied ([`MeshIndex::apply`]), sharing everything the change did not touch, so a change
//! costs O(what changed x log total) and never a rebuild. Workers hold an `Arc` of the version
//! they route with; a change makes a new version beside it, with no lock on the data path.
//!
//! Resources are keyed by their name, the xDS resource name (for a local file: a workload's
//! `uid`, a service's `namespace/hostname`, a policy's `namespace/name`).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use imbl::{HashMap as PMap, OrdMap};

use super::{
    Authorization, GatewayAddress, InboundProtocol, LocalConfig, PolicyScope, Service, Workload,
};

/// What an original destination resolves to.
#[derive(Debug, Clone)]
pub enum Resolved<'a> {
    /// A workload's own address.
    Workload {
        /// The workload.
        workload: &'a Workload,
        /// The port asked for.
        port: u16,
    },
    /// A service VIP.
    Service {
        /// The service.
        service: &'a Service,
        /// The service port asked for.
        port: u16,
        /// Endpoints with their target port for this service port.
        endpoints: Vec<(&'a Workload, u16)>,
    },
    /// Not in the mesh: pass through.
    Unknown,
}

/// One resource added, replaced or removed, by name.
#[derive(Debug, Clone)]
pub enum Change {
    /// A workload (`istio.workload.Address` holding a workload).
    Workload(Box<Workload>),
    /// A service (`istio.workload.Address` holding a service).
    Service(Service),
    /// An authorization policy.
    Policy(Authorization),
    /// The address (workload or service) of this name is gone.
    RemoveAddress,
    /// The policy of this name is gone.
    RemovePolicy,
}

/// Changes to apply in order, each with its resource name.
pub type Delta = Vec<(String, Change)>;

type Name = Arc<str>;
/// A set of resources by name, in name order.
type Set<T> = OrdMap<Name, Arc<T>>;

/// An indexed, immutable config version (workers share it through an `Arc`).
#[derive(Debug, Clone, Default)]
pub struct MeshIndex {
    workloads: Set<Workload>,
    services: Set<Service>,
    policies: Set<Authorization>,
    by_ip: PMap<IpAddr, (Name, Arc<Workload>)>,
    /// VIP -> (resource name, service, its `namespace/hostname`: the endpoints' key).
    by_vip: PMap<IpAddr, (Name, Arc<Service>, Name)>,
    /// Lower-case hostname -> its services (one, unless namespaces share a hostname).
    by_hostname: PMap<String, Set<Service>>,
    /// `namespace/hostname` -> the workloads that name the service.
    endpoints: PMap<String, Set<Workload>>,
    /// `namespace/name` of a pod -> its workloads.
    by_pod: PMap<String, Set<Workload>>,
    by_node: PMap<String, Set<Workload>>,
    global_policies: Set<Authorization>,
    namespace_policies: PMap<String, Set<Authorization>>,
    /// `namespace/name` -> policy (what workloads' `authorizationPolicies` name).
    policy_by_key: PMap<String, Arc<Authorization>>,
    /// Cluster DNS domain -> services whose hostname uses it.
    domains: OrdMap<String, usize>,
}

/// `map[key]` with `f` applied to its set (created empty), the entry dropped once empty.
fn update_set<T>(map: &mut PMap<String, Set<T>>, key: &str, f: impl FnOnce(&mut Set<T>)) {
    let mut set = map.get(key).cloned().unwrap_or_default();
    f(&mut set);
    if set.is_empty() {
        map.remove(key);
    } else {
        map.insert(key.to_string(), set);
    }
}

fn pod_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

fn service_key(s: &Service) -> String {
    format!("{}/{}", s.namespace, s.hostname)
}

fn cluster_domain_of(s: &Service) -> Option<&str> {
    s.hostname.split_once(".svc.").map(|(_, d)| d)
}

impl MeshIndex {
    /// Index a whole config (a local file): workloads by `uid`, services by
    /// `namespace/hostname`, policies by `namespace/name`.
    pub fn new(config: LocalConfig) -> Self {
        let mut index = Self::default();
        let delta: Delta = config
            .workloads
            .into_iter()
            .map(|w| (w.uid.clone(), Change::Workload(Box::new(w))))
            .chain(
                config
                    .services
                    .into_iter()
                    .map(|s| (service_key(&s), Change::Service(s))),
            )
            .chain(
                config
                    .policies
                    .into_iter()
                    .map(|p| (p.key(), Change::Policy(p))),
            )
            .collect();
        index.apply_in_place(delta);
        index
    }

    /// This version with `delta` applied (this one is left as it is).
    pub fn apply(&self, delta: Delta) -> Self {
        let mut next = self.clone();
        next.apply_in_place(delta);
        next
    }

    fn apply_in_place(&mut self, delta: Delta) {
        for (name, change) in delta {
            let name: Name = name.into();
            match change {
                Change::Workload(w) => {
                    self.remove_service(&name);
                    self.put_workload(name, Arc::new(*w));
                }
                Change::Service(s) => {
                    self.remove_workload(&name);
                    self.put_service(name, Arc::new(s));
                }
                Change::Policy(p) => self.put_policy(name, Arc::new(p)),
                Change::RemoveAddress => {
                    self.remove_workload(&name);
                    self.remove_service(&name);
                }
                Change::RemovePolicy => self.remove_policy(&name),
            }
        }
    }

    fn put_workload(&mut self, name: Name, w: Arc<Workload>) {
        self.remove_workload(&name);
        for ip in &w.workload_ips {
            if let Some((other, _)) = self.by_ip.get(ip) {
                tracing::warn!(ip = %ip, workload = %name, also = %other, "two workloads claim one address; the later one wins");
            }
            self.by_ip.insert(*ip, (name.clone(), w.clone()));
        }
        for svc in w.services.keys() {
            update_set(&mut self.endpoints, svc, |s| {
                s.insert(name.clone(), w.clone());
            });
        }
        update_set(&mut self.by_pod, &pod_key(&w.namespace, &w.name), |s| {
            s.insert(name.clone(), w.clone());
        });
        update_set(&mut self.by_node, &w.node, |s| {
            s.insert(name.clone(), w.clone());
        });
        self.workloads.insert(name, w);
    }

    fn remove_workload(&mut self, name: &Name) {
        let Some(w) = self.workloads.remove(name) else {
            return;
        };
        for ip in &w.workload_ips {
            if self.by_ip.get(ip).is_some_and(|(n, _)| n == name) {
                self.by_ip.remove(ip);
            }
        }
        for svc in w.services.keys() {
            update_set(&mut self.endpoints, svc, |s| {
                s.remove(name);
            });
        }
        update_set(&mut self.by_pod, &pod_key(&w.namespace, &w.name), |s| {
            s.remove(name);
        });
        update_set(&mut self.by_node, &w.node, |s| {
            s.remove(name);
        });
    }

    fn put_service(&mut self, name: Name, s: Arc<Service>) {
        self.remove_service(&name);
        let key: Name = service_key(&s).into();
        for v in &s.vips {
            self.by_vip
                .insert(v.address, (name.clone(), s.clone(), key.clone()));
        }
        update_set(
            &mut self.by_hostname,
            &s.hostname.to_ascii_lowercase(),
            |set| {
                set.insert(name.clone(), s.clone());
            },
        );
        if let Some(d) = cluster_domain_of(&s) {
            *self.domains.entry(d.to_string()).or_default() += 1;
        }
        self.services.insert(name, s);
    }

    fn remove_service(&mut self, name: &Name) {
        let Some(s) = self.services.remove(name) else {
            return;
        };
        for v in &s.vips {
            if self
                .by_vip
                .get(&v.address)
                .is_some_and(|(n, _, _)| n == name)
            {
                self.by_vip.remove(&v.address);
            }
        }
        update_set(
            &mut self.by_hostname,
            &s.hostname.to_ascii_lowercase(),
            |set| {
                set.remove(name);
            },
        );
        if let Some(d) = cluster_domain_of(&s) {
            match self.domains.get(d).copied() {
                Some(n) if n > 1 => {
                    self.domains.insert(d.to_string(), n - 1);
                }
                _ => {
                    self.domains.remove(d);
                }
            }
        }
    }

    fn put_policy(&mut self, name: Name, p: Arc<Authorization>) {
        self.remove_policy(&name);
        match p.scope {
            PolicyScope::Global => {
                self.global_policies.insert(name.clone(), p.clone());
            }
            PolicyScope::Namespace => {
                update_set(&mut self.namespace_policies, &p.namespace, |s| {
                    s.insert(name.clone(), p.clone());
                });
            }
            PolicyScope::WorkloadSelector => {}
        }
        self.policy_by_key.insert(p.key(), p.clone());
        self.policies.insert(name, p);
    }

    fn remove_policy(&mut self, name: &Name) {
        let Some(p) = self.policies.remove(name) else {
            return;
        };
        self.global_policies.remove(name);
        update_set(&mut self.namespace_policies, &p.namespace, |s| {
            s.remove(name);
        });
        let key = p.key();
        if self
            .policy_by_key
            .get(&key)
            .is_some_and(|q| Arc::ptr_eq(q, &p))
        {
            self.policy_by_key.remove(&key);
        }
    }

    /// Every workload, in name order.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> + '_ {
        self.workloads.values().map(|w| &**w)
    }

    /// Every service, in name order.
    pub fn services(&self) -> impl Iterator<Item = &Service> + '_ {
        self.services.values().map(|s| &**s)
    }

    /// Every policy, in name order.
    pub fn policies(&self) -> impl Iterator<Item = &Authorization> + '_ {
        self.policies.values().map(|p| &**p)
    }

    /// How many workloads, services and policies there are.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.workloads.len(),
            self.services.len(),
            self.policies.len(),
        )
    }

    /// The workload that owns `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|(_, w)| &**w)
    }

    /// The workloads of pod `name` in `namespace` (usually one).
    pub fn workloads_of_pod<'a>(
        &'a self,
        namespace: &str,
        name: &str,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        self.by_pod
            .get(&pod_key(namespace, name))
            .into_iter()
            .flat_map(|s| s.values().map(|w| &**w))
    }

    /// The service `namespace/hostname` (as workloads name the services they belong to).
    pub fn service_by_key(&self, key: &str) -> Option<&Service> {
        let (namespace, hostname) = key.split_once('/')?;
        self.by_hostname
            .get(&hostname.to_ascii_lowercase())?
            .values()
            .find(|s| s.namespace == namespace)
            .map(|s| &**s)
    }

    /// The service a VIP belongs to, with its key (`namespace/hostname`), without resolving
    /// its endpoints (the waypoint picks them per route).
    pub fn service_at(&self, ip: IpAddr) -> Option<(&Service, &str)> {
        self.by_vip.get(&ip).map(|(_, s, key)| (&**s, &**key))
    }

    /// Resolve an original destination.
    pub fn resolve(&self, dst: SocketAddr) -> Resolved<'_> {
        if let Some((_, service, key)) = self.by_vip.get(&dst.ip()) {
            return Resolved::Service {
                service,
                port: dst.port(),
                endpoints: self.endpoints_of(service, key, dst.port()),
            };
        }
        match self.workload_by_ip(dst.ip()) {
            Some(workload) => Resolved::Workload {
                workload,
                port: dst.port(),
            },
            None => Resolved::Unknown,
        }
    }

    /// The endpoints of the service `key` (`namespace/hostname`) for its port `port`, with
    /// each one's target port (empty when the service is unknown). Unhealthy workloads are
    /// left out unless the service's health policy allows all.
    pub fn service_endpoints(&self, key: &str, port: u16) -> Vec<(&Workload, u16)> {
        match self.service_by_key(key) {
            Some(service) => self.endpoints_of(service, key, port),
            None => Vec::new(),
        }
    }

    fn endpoints_of<'a>(
        &'a self,
        service: &'a Service,
        key: &str,
        port: u16,
    ) -> Vec<(&'a Workload, u16)> {
        self.endpoints
            .get(key)
            .into_iter()
            .flat_map(|s| s.values())
            .filter(|w| service.admits(w))
            .filter_map(|w| {
                let target = w
                    .services
                    .get(key)
                    .and_then(|ports| ports.get(&port))
                    .copied()
                    .or_else(|| service.ports.get(&port).copied())?;
                Some((&**w, target))
            })
            .collect()
    }

    /// The service with this exact hostname (`name.namespace.svc.cluster.local`).
    pub fn service_by_hostname(&self, hostname: &str) -> Option<&Service> {
        let hostname = hostname.strip_suffix('.').unwrap_or(hostname);
        self.by_hostname
            .get(&hostname.to_ascii_lowercase())?
            .values()
            .next()
            .map(|s| &**s)
    }

    /// The cluster's DNS domain (`cluster.local`): the one most services' hostnames use.
    pub fn cluster_domain(&self) -> &str {
        self.domains
            .iter()
            .max_by_key(|(_, n)| **n)
            .map_or(crate::config::DEFAULT_TRUST_DOMAIN, |(d, _)| d.as_str())
    }

    /// The addresses a name of `service` resolves to: its VIPs, or for a service without
    /// one (headless), its endpoints' addresses (the ready ones, unless it allows all).
    pub fn service_addresses(&self, service: &Service) -> Vec<IpAddr> {
        if !service.vips.is_empty() {
            return service.vips.iter().map(|v| v.address).collect();
        }
        self.endpoints
            .get(&service_key(service))
            .into_iter()
            .flat_map(|s| s.values())
            .filter(|w| service.admits(w))
            .flat_map(|w| w.workload_ips.iter().copied())
            .collect()
    }

    /// A mesh service named as a pod in `client_namespace` would name it: the full hostname, or
    /// the short forms its DNS search path completes (`reviews`, `reviews.default`,
    /// `reviews.default.svc`).
    pub fn service_by_name(&self, name: &str, client_namespace: &str) -> Option<&Service> {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return None;
        }
        let domain = self.cluster_domain();
        [
            name.to_string(),
            format!("{name}.{client_namespace}.svc.{domain}"),
            format!("{name}.svc.{domain}"),
            format!("{name}.{domain}"),
        ]
        .iter()
        .find_map(|h| self.service_by_hostname(h))
    }

    /// Workloads on `node` (the ones this proxy serves).
    pub fn local_workloads<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.by_node
            .get(node)
            .into_iter()
            .flat_map(|s| s.values().map(|w| &**w))
    }

    /// The policies that apply to `w`: global ones, its namespace's, and those it names.
    pub fn policies_for<'a>(
        &'a self,
        w: &'a Workload,
    ) -> impl Iterator<Item = &'a Authorization> + 'a {
        self.global_policies
            .values()
            .chain(
                self.namespace_policies
                    .get(&w.namespace)
                    .into_iter()
                    .flat_map(|s| s.values()),
            )
            .chain(
                w.authorization_policies
                    .iter()
                    .filter_map(|k| self.policy_by_key.get(k))
                    .filter(|p| p.scope == PolicyScope::WorkloadSelector),
            )
            .map(|p| &**p)
    }

    /// The waypoint traffic to this destination must go through, if any: the service's for a
    /// VIP, else the workload's.
    pub fn waypoint_for<'a>(&'a self, r: &Resolved<'a>) -> Option<&'a GatewayAddress> {
        match r {
            Resolved::Service { service, .. } => service.waypoint.as_ref(),
            Resolved::Workload { workload, .. } => workload.waypoint.as_ref(),
            Resolved::Unknown => None,
        }
    }

    /// The waypoint bound to traffic addressed to `ip`, and whether `ip` is in the mesh at all:
    /// a VIP's service's waypoint, else the workload's (`None` inside: no waypoint).
    pub fn waypoint_at(&self, ip: IpAddr) -> Option<Option<&GatewayAddress>> {
        if let Some((_, s, _)) = self.by_vip.get(&ip) {
            return Some(s.waypoint.as_ref());
        }
        self.workload_by_ip(ip).map(|w| w.waypoint.as_ref())
    }

    /// Whether the gateway address `gw` names workload `w`: one of its own addresses, or a VIP
    /// of a service it serves (Istio points workloads and services at the waypoint's Service).
    pub fn gateway_is(&self, gw: &GatewayAddress, w: &Workload) -> bool {
        let ip = gw.destination.address;
        w.workload_ips.contains(&ip)
            || self
                .service_at(ip)
                .is_some_and(|(_, key)| w.services.contains_key(key))
    }

    /// Whether traffic to this workload is tunnelled (HBONE) or passed through (TCP).
    pub fn speaks_hbone(w: &Workload) -> bool {
        w.protocol == InboundProtocol::Hbone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> LocalConfig {
        LocalConfig::from_yaml(yaml, std::path::Path::new("t")).expect("test config")
    }

    fn workload(name: &str, ip: &str, node: &str, service: Option<&str>) -> Workload {
        let services = service
            .map(|s| {
                format!(
                    "  services:\n    \"default/{s}.default.svc.cluster.local\":\n      80: 8080\n"
                )
            })
            .unwrap_or_default();
        let yaml = format!(
            "workloads:\n- uid: c//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n{services}"
        );
        config(&yaml).workloads.remove(0)
    }

    fn service(name: &str, vip: &str) -> Service {
        config(&format!(
            "services:\n- name: {name}\n  namespace: default\n  hostname: {name}.default.svc.cluster.local\n  vips: [\"/{vip}\"]\n  ports:\n    80: 8080\n"
        ))
        .services
        .remove(0)
    }

    fn policy(name: &str, scope: &str) -> Authorization {
        config(&format!(
            "policies:\n- name: {name}\n  namespace: default\n  scope: {scope}\n  action: Deny\n  dryRun: false\n  rules: []\n"
        ))
        .policies
        .remove(0)
    }

    /// Everything the data path asks, as text, to compare two indexes.
    fn answers(i: &MeshIndex) -> Vec<String> {
        let mut out = Vec::new();
        for ip in [
            "10.200.0.1",
            "10.200.0.2",
            "10.200.0.3",
            "10.200.9.1",
            "10.200.9.2",
        ] {
            let dst = SocketAddr::new(ip.parse().unwrap(), 80);
            out.push(match i.resolve(dst) {
                Resolved::Workload { workload, .. } => format!("{ip} -> {}", workload.name),
                Resolved::Service {
                    service, endpoints, ..
                } => {
                    let e: Vec<String> = endpoints
                        .iter()
                        .map(|(w, p)| format!("{}:{p}", w.name))
                        .collect();
                    format!("{ip} -> {} {e:?}", service.name)
                }
                Resolved::Unknown => format!("{ip} -> unknown"),
            });
        }
        for node in ["n1", "n2"] {
            let l: Vec<&str> = i.local_workloads(node).map(|w| w.name.as_str()).collect();
            out.push(format!("{node}: {l:?}"));
        }
        for w in i.workloads() {
            let p: Vec<&str> = i.policies_for(w).map(|p| p.name.as_str()).collect();
            let pod: Vec<&str> = i
                .workloads_of_pod("default", &w.name)
                .map(|w| w.uid.as_str())
                .collect();
            out.push(format!("{}: policies {p:?}, pod {pod:?}", w.name));
        }
        for s in i.services() {
            out.push(format!(
                "{} = {:?}",
                s.hostname,
                i.service_by_name(&s.name, "default").map(|s| &s.name)
            ));
        }
        out.push(format!(
            "domain {} counts {:?}",
            i.cluster_domain(),
            i.counts()
        ));
        out
    }

    #[test]
    fn changes_applied_one_by_one_answer_as_a_rebuild_would() {
        let a = workload("a", "10.200.0.1", "n1", Some("web"));
        let b = workload("b", "10.200.0.2", "n2", Some("web"));
        let c = workload("c", "10.200.0.3", "n1", None);
        let mut a_moved = workload("a", "10.200.0.3", "n2", None);
        a_moved.authorization_policies = vec!["default/selected".into()];
        let steps: Vec<(Delta, LocalConfig)> = vec![
            (
                vec![
                    (
                        "c//v1/Pod/default/a".into(),
                        Change::Workload(Box::new(a.clone())),
                    ),
                    (
                        "c//v1/Pod/default/b".into(),
                        Change::Workload(Box::new(b.clone())),
                    ),
                    (
                        "default/web.default.svc.cluster.local".into(),
                        Change::Service(service("web", "10.200.9.1")),
                    ),
                    (
                        "default/ns-wide".into(),
                        Change::Policy(policy("ns-wide", "Namespace")),
                    ),
                ],
                LocalConfig {
                    workloads: vec![a.clone(), b.clone()],
                    services: vec![service("web", "10.200.9.1")],
                    policies: vec![policy("ns-wide", "Namespace")],
                },
            ),
            (
                // a moves node, drops its service, takes c's address... after c came and went.
                vec![
                    ("c//v1/Pod/default/c".into(), Change::Workload(Box::new(c))),
                    ("c//v1/Pod/default/c".into(), Change::RemoveAddress),
                    (
                        "c//v1/Pod/default/a".into(),
                        Change::Workload(Box::new(a_moved.clone())),
                    ),
                    (
                        "default/selected".into(),
                        Change::Policy(policy("selected", "WorkloadSelector")),
                    ),
                    ("default/ns-wide".into(), Change::RemovePolicy),
                    (
                        "default/api.default.svc.cluster.local".into(),
                        Change::Service(service("api", "10.200.9.2")),
                    ),
                ],
                LocalConfig {
                    workloads: vec![a_moved, b.clone()],
                    services: vec![service("web", "10.200.9.1"), service("api", "10.200.9.2")],
                    policies: vec![policy("selected", "WorkloadSelector")],
                },
            ),
            (
                vec![
                    (
                        "default/web.default.svc.cluster.local".into(),
                        Change::RemoveAddress,
                    ),
                    ("c//v1/Pod/default/a".into(), Change::RemoveAddress),
                    ("gone".into(), Change::RemoveAddress),
                    (
                        "default/global".into(),
                        Change::Policy(policy("global", "Global")),
                    ),
                ],
                LocalConfig {
                    workloads: vec![b],
                    services: vec![service("api", "10.200.9.2")],
                    policies: vec![
                        policy("selected", "WorkloadSelector"),
                        policy("global", "Global"),
                    ],
                },
            ),
        ];
        let mut index = MeshIndex::default();
        for (n, (delta, whole)) in steps.into_iter().enumerate() {
            let before = answers(&index);
            let next = index.apply(delta);
            assert_eq!(answers(&index), before, "step {n}: the old version changed");
            assert_eq!(answers(&next), answers(&MeshIndex::new(whole)), "step {n}");
            index = next;
        }
        assert!(matches!(
            index.resolve("10.200.0.1:80".parse().unwrap()),
            Resolved::Unknown
        ));
        assert_eq!(index.counts(), (1, 1, 2));
    }

    #[test]
    fn a_service_shared_by_two_namespaces_keeps_answering_when_one_goes() {
        let mut other = service("web", "10.200.9.2");
        other.namespace = "other".into();
        let i = MeshIndex::default().apply(vec![
            (
                "default/web.default.svc.cluster.local".into(),
                Change::Service(service("web", "10.200.9.1")),
            ),
            (
                "other/web.default.svc.cluster.local".into(),
                Change::Service(other),
            ),
        ]);
        assert_eq!(
            i.service_by_key("other/web.default.svc.cluster.local")
                .map(|s| s.namespace.as_str()),
            Some("other")
        );
        let i = i.apply(vec![(
            "default/web.default.svc.cluster.local".into(),
            Change::RemoveAddress,
        )]);
        assert_eq!(
            i.service_by_hostname("web.default.svc.cluster.local")
                .map(|s| s.namespace.as_str()),
            Some("other")
        );
        assert!(i
            .service_by_key("default/web.default.svc.cluster.local")
            .is_none());
    }
}

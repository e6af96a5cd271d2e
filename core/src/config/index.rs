//! Lookups the data path makes, precomputed once per config version: workload by IP, service by
//! VIP with its endpoints, the workloads local to this node.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use super::{GatewayAddress, InboundProtocol, LocalConfig, Service, Workload};

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

/// An indexed, immutable config (one per config version; workers share it through an `Arc`).
#[derive(Debug)]
pub struct MeshIndex {
    /// The config itself.
    pub config: LocalConfig,
    by_ip: HashMap<IpAddr, usize>,
    by_vip: HashMap<IpAddr, usize>,
    endpoints: HashMap<String, Vec<usize>>,
    by_hostname: HashMap<String, usize>,
    cluster_domain: String,
}

impl MeshIndex {
    /// Index a validated config.
    pub fn new(config: LocalConfig) -> Self {
        let mut by_ip = HashMap::new();
        let mut endpoints: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, w) in config.workloads.iter().enumerate() {
            for ip in &w.workload_ips {
                by_ip.insert(*ip, i);
            }
            for svc in w.services.keys() {
                endpoints.entry(svc.clone()).or_default().push(i);
            }
        }
        let mut by_vip = HashMap::new();
        let mut by_hostname = HashMap::new();
        for (i, s) in config.services.iter().enumerate() {
            for v in &s.vips {
                by_vip.insert(v.address, i);
            }
            by_hostname
                .entry(s.hostname.to_ascii_lowercase())
                .or_insert(i);
        }
        let cluster_domain = config
            .services
            .iter()
            .find_map(|s| s.hostname.split_once(".svc.").map(|(_, d)| d.to_string()))
            .unwrap_or_else(|| crate::config::DEFAULT_TRUST_DOMAIN.to_string());
        Self {
            config,
            by_ip,
            by_vip,
            endpoints,
            by_hostname,
            cluster_domain,
        }
    }

    /// The workload that owns `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_ip.get(&ip).map(|&i| &self.config.workloads[i])
    }

    /// Resolve an original destination.
    pub fn resolve(&self, dst: SocketAddr) -> Resolved<'_> {
        if let Some(&i) = self.by_vip.get(&dst.ip()) {
            let service = &self.config.services[i];
            let key = format!("{}/{}", service.namespace, service.hostname);
            let endpoints = self
                .endpoints
                .get(&key)
                .into_iter()
                .flatten()
                .filter_map(|&wi| {
                    let w = &self.config.workloads[wi];
                    let target = w
                        .services
                        .get(&key)
                        .and_then(|ports| ports.get(&dst.port()))
                        .copied()
                        .or_else(|| service.ports.get(&dst.port()).copied())?;
                    Some((w, target))
                })
                .collect();
            return Resolved::Service {
                service,
                port: dst.port(),
                endpoints,
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

    /// The service with this exact hostname (`name.namespace.svc.cluster.local`).
    pub fn service_by_hostname(&self, hostname: &str) -> Option<&Service> {
        let hostname = hostname.strip_suffix('.').unwrap_or(hostname);
        self.by_hostname
            .get(&hostname.to_ascii_lowercase())
            .map(|&i| &self.config.services[i])
    }

    /// The cluster's DNS domain (`cluster.local`), from the services' hostnames.
    pub fn cluster_domain(&self) -> &str {
        &self.cluster_domain
    }

    /// The addresses a name of `service` resolves to: its VIPs, or for a service without
    /// one (headless), its endpoints' addresses.
    pub fn service_addresses(&self, service: &Service) -> Vec<IpAddr> {
        if !service.vips.is_empty() {
            return service.vips.iter().map(|v| v.address).collect();
        }
        let key = format!("{}/{}", service.namespace, service.hostname);
        self.endpoints
            .get(&key)
            .into_iter()
            .flatten()
            .flat_map(|&wi| self.config.workloads[wi].workload_ips.iter().copied())
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
        let domain = &self.cluster_domain;
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
    pub fn local_workloads<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.config.workloads.iter().filter(move |w| w.node == node)
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

    /// Whether traffic to this workload is tunnelled (HBONE) or passed through (TCP).
    pub fn speaks_hbone(w: &Workload) -> bool {
        w.protocol == InboundProtocol::Hbone
    }
}

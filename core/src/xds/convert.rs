//! ztunnel's local config (the YAML model in `crate::config`) as the resources istiod sends:
//! `istio.workload.Address` (a Workload or a Service) and `istio.security.Authorization`, each
//! with istiod's resource name (a workload's uid, `namespace/hostname` for a service,
//! `namespace/name` for a policy).

use std::net::IpAddr;

use super::proto::istio::{security as sec, workload as wl};
use crate::config::{
    policy::{IpBlock, RbacMatch, StringMatch},
    Authorization, GatewayAddress, InboundProtocol, LoadBalancerMode, LocalConfig, NetworkAddress,
    PolicyAction, PolicyScope, Scope, Service, Workload,
};

/// `type.googleapis.com/istio.workload.Address`.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// `type.googleapis.com/istio.security.Authorization`.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn network_address(a: &NetworkAddress) -> wl::NetworkAddress {
    wl::NetworkAddress {
        network: a.network.clone(),
        address: ip_bytes(a.address),
        length: None,
    }
}

fn gateway(g: &GatewayAddress) -> wl::GatewayAddress {
    wl::GatewayAddress {
        destination: Some(wl::gateway_address::Destination::Address(network_address(
            &g.destination,
        ))),
        hbone_mtls_port: u32::from(g.hbone_mtls_port),
    }
}

fn ports(map: &std::collections::HashMap<u16, u16>) -> Vec<wl::Port> {
    let mut v: Vec<wl::Port> = map
        .iter()
        .map(|(s, t)| wl::Port {
            service_port: u32::from(*s),
            target_port: u32::from(*t),
            app_protocol: wl::AppProtocol::Unknown as i32,
        })
        .collect();
    v.sort_by_key(|p| p.service_port);
    v
}

/// A workload as istiod sends it.
pub fn workload(w: &Workload) -> wl::Workload {
    wl::Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: w.workload_ips.iter().map(|ip| ip_bytes(*ip)).collect(),
        network: w.network.clone(),
        tunnel_protocol: match w.protocol {
            InboundProtocol::Hbone => wl::TunnelProtocol::Hbone,
            InboundProtocol::Tcp => wl::TunnelProtocol::None,
        } as i32,
        trust_domain: w.trust_domain.clone(),
        service_account: w.service_account.clone(),
        waypoint: w.waypoint.as_ref().map(gateway),
        node: w.node.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_type: match w.workload_type.to_ascii_lowercase().as_str() {
            "cronjob" => wl::WorkloadType::Cronjob,
            "job" => wl::WorkloadType::Job,
            "pod" => wl::WorkloadType::Pod,
            _ => wl::WorkloadType::Deployment,
        } as i32,
        workload_name: w.workload_name.clone(),
        services: w
            .services
            .iter()
            .map(|(k, v)| (k.clone(), wl::PortList { ports: ports(v) }))
            .collect(),
        authorization_policies: w.authorization_policies.clone(),
        cluster_id: w.cluster_id.clone(),
        ..Default::default()
    }
}

/// A service as istiod sends it.
pub fn service(s: &Service) -> wl::Service {
    wl::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: s.vips.iter().map(network_address).collect(),
        ports: ports(&s.ports),
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(gateway),
        load_balancing: s.load_balancer.as_ref().map(|lb| wl::LoadBalancing {
            routing_preference: lb
                .routing_preferences
                .iter()
                .map(|p| {
                    (match p {
                        Scope::Region => wl::load_balancing::Scope::Region,
                        Scope::Zone => wl::load_balancing::Scope::Zone,
                        Scope::Subzone => wl::load_balancing::Scope::Subzone,
                        Scope::Node => wl::load_balancing::Scope::Node,
                        Scope::Cluster => wl::load_balancing::Scope::Cluster,
                        Scope::Network => wl::load_balancing::Scope::Network,
                    }) as i32
                })
                .collect(),
            mode: match lb.mode {
                LoadBalancerMode::Strict => wl::load_balancing::Mode::Strict,
                LoadBalancerMode::Failover => wl::load_balancing::Mode::Failover,
            } as i32,
            health_policy: 0,
        }),
        ..Default::default()
    }
}

fn string_match(m: &StringMatch) -> sec::StringMatch {
    use sec::string_match::MatchType;
    sec::StringMatch {
        match_type: Some(match m {
            StringMatch::Exact(s) => MatchType::Exact(s.clone()),
            StringMatch::Prefix(s) => MatchType::Prefix(s.clone()),
            StringMatch::Suffix(s) => MatchType::Suffix(s.clone()),
            StringMatch::Presence(_) => MatchType::Presence(()),
        }),
    }
}

fn block(b: &IpBlock) -> sec::Address {
    sec::Address {
        address: ip_bytes(b.0.addr()),
        length: u32::from(b.0.prefix_len()),
    }
}

fn rbac(m: &RbacMatch) -> sec::Match {
    let sm = |v: &[StringMatch]| v.iter().map(string_match).collect();
    let sa = |v: &[crate::config::policy::ServiceAccountMatch]| {
        v.iter()
            .map(|s| sec::ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect()
    };
    let ips = |v: &[IpBlock]| v.iter().map(block).collect();
    let ports = |v: &[u16]| v.iter().map(|p| u32::from(*p)).collect();
    sec::Match {
        namespaces: sm(&m.namespaces),
        not_namespaces: sm(&m.not_namespaces),
        service_accounts: sa(&m.service_accounts),
        not_service_accounts: sa(&m.not_service_accounts),
        principals: sm(&m.principals),
        not_principals: sm(&m.not_principals),
        source_ips: ips(&m.source_ips),
        not_source_ips: ips(&m.not_source_ips),
        destination_ips: ips(&m.destination_ips),
        not_destination_ips: ips(&m.not_destination_ips),
        destination_ports: ports(&m.destination_ports),
        not_destination_ports: ports(&m.not_destination_ports),
        extensions: Vec::new(),
    }
}

/// A policy as istiod sends it.
pub fn authorization(p: &Authorization) -> sec::Authorization {
    sec::Authorization {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        scope: match p.scope {
            PolicyScope::Global => sec::Scope::Global,
            PolicyScope::Namespace => sec::Scope::Namespace,
            PolicyScope::WorkloadSelector => sec::Scope::WorkloadSelector,
        } as i32,
        action: match p.action {
            PolicyAction::Allow => sec::Action::Allow,
            PolicyAction::Deny => sec::Action::Deny,
        } as i32,
        rules: p
            .rules
            .iter()
            .map(|rule| sec::Rule {
                clauses: rule
                    .iter()
                    .map(|clause| sec::Clause {
                        matches: clause.iter().map(rbac).collect(),
                    })
                    .collect(),
            })
            .collect(),
        dry_run: p.dry_run,
        extensions: Vec::new(),
    }
}

/// One resource of a type: its name and its encoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Named {
    /// istiod's name for it.
    pub name: String,
    /// The protobuf bytes (the `Any`'s value).
    pub bytes: Vec<u8>,
}

/// Every resource of `config`, by type: (Address resources, Authorization resources).
pub fn resources(config: &LocalConfig) -> (Vec<Named>, Vec<Named>) {
    use prost::Message as _;
    let mut addresses = Vec::new();
    for w in &config.workloads {
        let a = wl::Address {
            r#type: Some(wl::address::Type::Workload(workload(w))),
        };
        addresses.push(Named {
            name: w.uid.clone(),
            bytes: a.encode_to_vec(),
        });
    }
    for s in &config.services {
        let a = wl::Address {
            r#type: Some(wl::address::Type::Service(service(s))),
        };
        addresses.push(Named {
            name: format!("{}/{}", s.namespace, s.hostname),
            bytes: a.encode_to_vec(),
        });
    }
    let policies = config
        .policies
        .iter()
        .map(|p| Named {
            name: format!("{}/{}", p.namespace, p.name),
            bytes: authorization(p).encode_to_vec(),
        })
        .collect();
    (addresses, policies)
}

//! ztunnel's local config (the YAML model in `crate::config`) as the resources istiod sends:
//! `istio.workload.Address` (a Workload or a Service) and `istio.security.Authorization`, each
//! with istiod's resource name (a workload's uid, `namespace/hostname` for a service,
//! `namespace/name` for a policy).

use std::net::IpAddr;

use super::proto::istio::{security as sec, workload as wl};
use crate::config::{
    policy::{IpBlock, RbacMatch, StringMatch},
    Authorization, GatewayAddress, HealthPolicy, HealthStatus, InboundProtocol, LoadBalancerMode,
    LocalConfig, Locality, NetworkAddress, PolicyAction, PolicyScope, Scope, Service, Workload,
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
        status: match w.status {
            HealthStatus::Healthy => wl::WorkloadStatus::Healthy,
            HealthStatus::Unhealthy => wl::WorkloadStatus::Unhealthy,
        } as i32,
        locality: (!w.locality.is_empty()).then(|| wl::Locality {
            region: w.locality.region.clone(),
            zone: w.locality.zone.clone(),
            subzone: w.locality.subzone.clone(),
        }),
        capacity: (w.capacity != 1).then_some(w.capacity),
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
                LoadBalancerMode::Standard => wl::load_balancing::Mode::UnspecifiedMode,
                LoadBalancerMode::Strict => wl::load_balancing::Mode::Strict,
                LoadBalancerMode::Failover => wl::load_balancing::Mode::Failover,
                LoadBalancerMode::Passthrough => wl::load_balancing::Mode::Passthrough,
            } as i32,
            health_policy: match lb.health_policy {
                HealthPolicy::OnlyHealthy => wl::load_balancing::HealthPolicy::OnlyHealthy,
                HealthPolicy::AllowAll => wl::load_balancing::HealthPolicy::AllowAll,
            } as i32,
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

// ---- istiod's resources back into the local config's model (the xDS client) ----

fn ip_from(bytes: &[u8]) -> Result<IpAddr, String> {
    match bytes.len() {
        4 => Ok(IpAddr::from(
            <[u8; 4]>::try_from(bytes).map_err(|e| e.to_string())?,
        )),
        16 => Ok(IpAddr::from(
            <[u8; 16]>::try_from(bytes).map_err(|e| e.to_string())?,
        )),
        n => Err(format!("an address of {n} bytes (4 or 16 expected)")),
    }
}

fn network_address_from(a: &wl::NetworkAddress) -> Result<NetworkAddress, String> {
    Ok(NetworkAddress {
        network: a.network.clone(),
        address: ip_from(&a.address)?,
    })
}

fn gateway_from(g: &wl::GatewayAddress) -> Result<GatewayAddress, String> {
    let port = u16::try_from(g.hbone_mtls_port).map_err(|_| "hbone_mtls_port out of range")?;
    match &g.destination {
        Some(wl::gateway_address::Destination::Address(a)) => Ok(GatewayAddress {
            destination: network_address_from(a)?,
            hbone_mtls_port: if port == 0 {
                crate::config::DEFAULT_HBONE_PORT
            } else {
                port
            },
        }),
        Some(wl::gateway_address::Destination::Hostname(h)) => Err(format!(
            "a waypoint by hostname ({}/{}) is not supported yet",
            h.namespace, h.hostname
        )),
        None => Err("a waypoint without a destination".into()),
    }
}

fn port_map(ports: &[wl::Port]) -> Result<std::collections::HashMap<u16, u16>, String> {
    ports
        .iter()
        .map(|p| {
            let s =
                u16::try_from(p.service_port).map_err(|_| format!("port {}", p.service_port))?;
            let t = u16::try_from(p.target_port).map_err(|_| format!("port {}", p.target_port))?;
            Ok((s, if t == 0 { s } else { t }))
        })
        .collect()
}

/// A workload istiod sent, in the local config's model.
pub fn workload_from(w: &wl::Workload) -> Result<Workload, String> {
    let identity = Workload {
        uid: w.uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: if w.service_account.is_empty() {
            "default".into()
        } else {
            w.service_account.clone()
        },
        trust_domain: if w.trust_domain.is_empty() {
            crate::config::DEFAULT_TRUST_DOMAIN.into()
        } else {
            w.trust_domain.clone()
        },
        workload_ips: w
            .addresses
            .iter()
            .map(|a| ip_from(a))
            .collect::<Result<_, _>>()?,
        protocol: if w.tunnel_protocol == wl::TunnelProtocol::Hbone as i32 {
            InboundProtocol::Hbone
        } else {
            InboundProtocol::Tcp
        },
        node: w.node.clone(),
        network: w.network.clone(),
        waypoint: w.waypoint.as_ref().map(gateway_from).transpose()?,
        services: w
            .services
            .iter()
            .map(|(k, v)| Ok((k.clone(), port_map(&v.ports)?)))
            .collect::<Result<_, String>>()?,
        authorization_policies: w.authorization_policies.clone(),
        canonical_name: w.canonical_name.clone(),
        canonical_revision: w.canonical_revision.clone(),
        workload_name: w.workload_name.clone(),
        cluster_id: w.cluster_id.clone(),
        workload_type: match wl::WorkloadType::try_from(w.workload_type) {
            Ok(wl::WorkloadType::Cronjob) => "cronjob",
            Ok(wl::WorkloadType::Job) => "job",
            Ok(wl::WorkloadType::Pod) => "pod",
            _ => "deployment",
        }
        .into(),
        labels: Default::default(),
        locality: w
            .locality
            .as_ref()
            .map(|l| Locality {
                region: l.region.clone(),
                zone: l.zone.clone(),
                subzone: l.subzone.clone(),
            })
            .unwrap_or_default(),
        // An unknown status (a newer istiod's) is not taken as ready.
        status: match wl::WorkloadStatus::try_from(w.status) {
            Ok(wl::WorkloadStatus::Healthy) => HealthStatus::Healthy,
            _ => HealthStatus::Unhealthy,
        },
        capacity: w.capacity.unwrap_or(1),
        derived: Default::default(),
    };
    if identity.uid.is_empty() {
        return Err("a workload without a uid".into());
    }
    identity
        .identity()
        .map_err(|e| format!("no valid identity: {e}"))?;
    Ok(identity)
}

/// A service istiod sent, in the local config's model.
pub fn service_from(s: &wl::Service) -> Result<Service, String> {
    if s.hostname.is_empty() {
        return Err("a service without a hostname".into());
    }
    Ok(Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        vips: s
            .addresses
            .iter()
            .map(network_address_from)
            .collect::<Result<_, _>>()?,
        ports: port_map(&s.ports)?,
        subject_alt_names: s.subject_alt_names.clone(),
        waypoint: s.waypoint.as_ref().map(gateway_from).transpose()?,
        load_balancer: s
            .load_balancing
            .as_ref()
            .map(|lb| crate::config::LoadBalancer {
                routing_preferences: lb
                    .routing_preference
                    .iter()
                    .filter_map(|p| match wl::load_balancing::Scope::try_from(*p) {
                        Ok(wl::load_balancing::Scope::Region) => Some(Scope::Region),
                        Ok(wl::load_balancing::Scope::Zone) => Some(Scope::Zone),
                        Ok(wl::load_balancing::Scope::Subzone) => Some(Scope::Subzone),
                        Ok(wl::load_balancing::Scope::Node) => Some(Scope::Node),
                        Ok(wl::load_balancing::Scope::Cluster) => Some(Scope::Cluster),
                        Ok(wl::load_balancing::Scope::Network) => Some(Scope::Network),
                        _ => None,
                    })
                    .collect(),
                mode: match wl::load_balancing::Mode::try_from(lb.mode) {
                    Ok(wl::load_balancing::Mode::Strict) => LoadBalancerMode::Strict,
                    Ok(wl::load_balancing::Mode::Failover) => LoadBalancerMode::Failover,
                    Ok(wl::load_balancing::Mode::Passthrough) => LoadBalancerMode::Passthrough,
                    Ok(wl::load_balancing::Mode::UnspecifiedMode) | Err(_) => {
                        LoadBalancerMode::Standard
                    }
                },
                health_policy: match wl::load_balancing::HealthPolicy::try_from(lb.health_policy) {
                    Ok(wl::load_balancing::HealthPolicy::AllowAll) => HealthPolicy::AllowAll,
                    _ => HealthPolicy::OnlyHealthy,
                },
            }),
    })
}

fn string_match_from(m: &sec::StringMatch) -> Result<StringMatch, String> {
    use sec::string_match::MatchType;
    match &m.match_type {
        Some(MatchType::Exact(s)) => Ok(StringMatch::Exact(s.clone())),
        Some(MatchType::Prefix(s)) => Ok(StringMatch::Prefix(s.clone())),
        Some(MatchType::Suffix(s)) => Ok(StringMatch::Suffix(s.clone())),
        Some(MatchType::Presence(())) => Ok(StringMatch::Presence(Default::default())),
        None => Err("a string match without a match type".into()),
    }
}

fn block_from(a: &sec::Address) -> Result<IpBlock, String> {
    let ip = ip_from(&a.address)?;
    let len = u8::try_from(a.length).map_err(|_| format!("prefix length {}", a.length))?;
    let net = ipnet::IpNet::new(ip, len).map_err(|e| format!("{ip}/{len}: {e}"))?;
    Ok(IpBlock(net))
}

/// String matchers of one field: the ones zring reads, and how many it could not (an
/// unknown or empty match type, from a newer istiod), dropped as ztunnel drops them.
fn string_matches(v: &[sec::StringMatch]) -> (Vec<StringMatch>, usize) {
    let kept: Vec<StringMatch> = v.iter().filter_map(|m| string_match_from(m).ok()).collect();
    let dropped = v.len() - kept.len();
    (kept, dropped)
}

/// A match that holds for every connection (a DENY whose matchers were all dropped: fail
/// closed).
fn everyone() -> RbacMatch {
    let any = |s: &str| s.parse::<ipnet::IpNet>().map(IpBlock).ok();
    RbacMatch {
        source_ips: [any("0.0.0.0/0"), any("::/0")]
            .into_iter()
            .flatten()
            .collect(),
        ..RbacMatch::default()
    }
}

/// One match of a policy with `action`, and how many string matchers were dropped from it.
/// Dropping never lets more through: a DENY match left empty applies to everyone (stricter
/// than ztunnel); an ALLOW match that lost a matcher from a `not*` field, or every matcher of
/// a field, matches nothing (an empty match never matches), since what is left would admit
/// more than the rule did.
fn rbac_from(m: &sec::Match, action: PolicyAction) -> Result<(RbacMatch, usize), String> {
    let mut dropped = 0;
    let mut widened = false;
    let mut sm = |v: &[sec::StringMatch], negative: bool| {
        let (kept, n) = string_matches(v);
        dropped += n;
        widened |= n > 0 && (negative || kept.is_empty());
        kept
    };
    let (namespaces, not_namespaces) = (sm(&m.namespaces, false), sm(&m.not_namespaces, true));
    let (principals, not_principals) = (sm(&m.principals, false), sm(&m.not_principals, true));
    let sa = |v: &[sec::ServiceAccountMatch]| {
        v.iter()
            .map(|s| crate::config::policy::ServiceAccountMatch {
                namespace: s.namespace.clone(),
                service_account: s.service_account.clone(),
            })
            .collect::<Vec<_>>()
    };
    let ips = |v: &[sec::Address]| v.iter().map(block_from).collect::<Result<Vec<_>, _>>();
    let ports = |v: &[u32]| {
        v.iter()
            .map(|p| u16::try_from(*p).map_err(|_| format!("port {p}")))
            .collect::<Result<Vec<_>, _>>()
    };
    let out = RbacMatch {
        namespaces,
        not_namespaces,
        service_accounts: sa(&m.service_accounts),
        not_service_accounts: sa(&m.not_service_accounts),
        principals,
        not_principals,
        source_ips: ips(&m.source_ips)?,
        not_source_ips: ips(&m.not_source_ips)?,
        destination_ips: ips(&m.destination_ips)?,
        not_destination_ips: ips(&m.not_destination_ips)?,
        destination_ports: ports(&m.destination_ports)?,
        not_destination_ports: ports(&m.not_destination_ports)?,
    };
    let out = match (action, dropped > 0) {
        (_, false) => out,
        (PolicyAction::Allow, true) if widened => RbacMatch::default(),
        (PolicyAction::Allow, true) => out,
        (PolicyAction::Deny, true) if out == RbacMatch::default() => everyone(),
        (PolicyAction::Deny, true) => out,
    };
    Ok((out, dropped))
}

/// A policy istiod sent, in the local config's model, with how many string matchers zring
/// could not read and dropped (see [`rbac_from`] for why that never lets more through).
pub fn authorization_from(p: &sec::Authorization) -> Result<(Authorization, usize), String> {
    if p.name.is_empty() {
        return Err("a policy without a name".into());
    }
    let action = match sec::Action::try_from(p.action) {
        Ok(sec::Action::Allow) => PolicyAction::Allow,
        Ok(sec::Action::Deny) => PolicyAction::Deny,
        Err(_) => return Err(format!("unknown action {}", p.action)),
    };
    let mut dropped = 0;
    let mut rules = Vec::with_capacity(p.rules.len());
    for r in &p.rules {
        let mut clauses = Vec::with_capacity(r.clauses.len());
        for c in &r.clauses {
            let mut matches = Vec::with_capacity(c.matches.len());
            for m in &c.matches {
                let (m, n) = rbac_from(m, action)?;
                dropped += n;
                matches.push(m);
            }
            clauses.push(matches);
        }
        rules.push(clauses);
    }
    Ok((
        Authorization {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            scope: match sec::Scope::try_from(p.scope) {
                Ok(sec::Scope::Global) => PolicyScope::Global,
                Ok(sec::Scope::Namespace) => PolicyScope::Namespace,
                Ok(sec::Scope::WorkloadSelector) => PolicyScope::WorkloadSelector,
                Err(_) => return Err(format!("unknown scope {}", p.scope)),
            },
            action,
            rules,
            dry_run: p.dry_run,
        },
        dropped,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_mesh_survives_the_round_trip() {
        let path = std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/bookinfo-mesh.yaml"
        ));
        let Ok(cfg) = LocalConfig::load(path) else {
            panic!("{} does not load", path.display());
        };
        for w in &cfg.workloads {
            let back = workload_from(&workload(w)).unwrap();
            let mut want = w.clone();
            if want.workload_type.is_empty() {
                // istiod's default, DEPLOYMENT (0), is what an unset type means.
                want.workload_type = "deployment".into();
            }
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(&want).unwrap(),
                "{}",
                w.uid
            );
        }
        for s in &cfg.services {
            let back = service_from(&service(s)).unwrap();
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(s).unwrap()
            );
        }
        for p in &cfg.policies {
            let (back, _) = authorization_from(&authorization(p)).unwrap();
            assert_eq!(
                serde_json::to_value(&back).unwrap(),
                serde_json::to_value(p).unwrap()
            );
        }
        assert!(!cfg.policies.is_empty() && !cfg.services.is_empty());
    }

    #[test]
    fn locality_readiness_capacity_and_load_balancing_survive_the_round_trip() {
        let cfg = LocalConfig::from_yaml(
            "workloads:\n- uid: c//v1/Pod/default/a\n  name: a\n  namespace: default\n  \
             locality: {region: r1, zone: z1, subzone: s1}\n  status: Unhealthy\n  capacity: 5\n\
             - uid: c//v1/Pod/default/b\n  name: b\n  namespace: default\n\
             services:\n- name: s\n  namespace: default\n  hostname: s.default.svc.cluster.local\n  \
             vips: []\n  ports: {}\n  loadBalancer:\n    routingPreferences: [Network, Region, Zone, Subzone]\n    \
             mode: Failover\n    healthPolicy: AllowAll\n",
            std::path::Path::new("t"),
        )
        .unwrap();
        let a = workload(&cfg.workloads[0]);
        assert_eq!(a.status, wl::WorkloadStatus::Unhealthy as i32);
        assert_eq!(a.capacity, Some(5));
        assert_eq!(a.locality.as_ref().map(|l| l.subzone.as_str()), Some("s1"));
        // Defaults go as istiod leaves them: no locality, no capacity (1).
        let b = workload(&cfg.workloads[1]);
        assert_eq!((b.locality.is_none(), b.capacity), (true, None));
        for w in &cfg.workloads {
            let mut want = w.clone();
            want.workload_type = "deployment".into();
            assert_eq!(
                serde_json::to_value(workload_from(&workload(w)).unwrap()).unwrap(),
                serde_json::to_value(&want).unwrap()
            );
        }
        let s = &cfg.services[0];
        assert_eq!(
            serde_json::to_value(service_from(&service(s)).unwrap()).unwrap(),
            serde_json::to_value(s).unwrap()
        );
        // Every mode both ways; istiod's unspecified mode is Standard (preferences unused).
        for mode in [
            LoadBalancerMode::Standard,
            LoadBalancerMode::Strict,
            LoadBalancerMode::Failover,
            LoadBalancerMode::Passthrough,
        ] {
            let mut s = s.clone();
            if let Some(lb) = s.load_balancer.as_mut() {
                lb.mode = mode;
            }
            let back = service_from(&service(&s)).unwrap();
            assert_eq!(back.load_balancer.map(|lb| lb.mode), Some(mode));
        }
        let mut x = service(s);
        if let Some(lb) = x.load_balancing.as_mut() {
            lb.mode = wl::load_balancing::Mode::UnspecifiedMode as i32;
        }
        let back = service_from(&x).unwrap();
        assert_eq!(
            back.load_balancer.map(|lb| lb.mode),
            Some(LoadBalancerMode::Standard)
        );
    }

    /// Security review L4: a string matcher of an unknown or empty type drops only itself
    /// (the policy stays in force, unlike the NACK before, which left a new DENY unenforced),
    /// and dropping never lets more through.
    #[test]
    fn unreadable_string_matchers_are_dropped_without_letting_more_through() {
        use sec::string_match::MatchType;
        let exact = |s: &str| sec::StringMatch {
            match_type: Some(MatchType::Exact(s.into())),
        };
        let unknown = sec::StringMatch { match_type: None };
        let policy = |action: sec::Action, m: sec::Match| sec::Authorization {
            name: "p".into(),
            namespace: "default".into(),
            scope: sec::Scope::Global as i32,
            action: action as i32,
            rules: vec![sec::Rule {
                clauses: vec![sec::Clause { matches: vec![m] }],
            }],
            ..Default::default()
        };
        let who = |sa: &str| -> zring_hbone::SpiffeId {
            format!("spiffe://cluster.local/ns/default/sa/{sa}")
                .parse()
                .unwrap()
        };
        let (sleep, evil) = (who("sleep"), who("evil"));
        fn conn(id: &zring_hbone::SpiffeId) -> crate::authz::ConnInfo<'_> {
            crate::authz::ConnInfo {
                src: "10.0.0.1:5000".parse().unwrap(),
                dst: "10.0.0.2:80".parse().unwrap(),
                src_identity: Some(id),
            }
        }
        let read = |p: sec::Authorization| authorization_from(&p).expect("kept, not refused");
        // DENY: the readable matcher stays; a match left empty denies everyone.
        let (p, n) = read(policy(
            sec::Action::Deny,
            sec::Match {
                principals: vec![unknown.clone(), exact("cluster.local/ns/default/sa/evil")],
                ..Default::default()
            },
        ));
        assert_eq!(n, 1);
        assert!(p.matches(&conn(&evil)) && !p.matches(&conn(&sleep)));
        let (p, _) = read(policy(
            sec::Action::Deny,
            sec::Match {
                principals: vec![unknown.clone()],
                ..Default::default()
            },
        ));
        assert!(p.matches(&conn(&sleep)) && p.matches(&conn(&evil)));
        // ALLOW: the readable matcher stays; a field emptied, or a not-field touched, admits no one.
        let (p, _) = read(policy(
            sec::Action::Allow,
            sec::Match {
                principals: vec![unknown.clone(), exact("cluster.local/ns/default/sa/sleep")],
                ..Default::default()
            },
        ));
        assert!(p.matches(&conn(&sleep)) && !p.matches(&conn(&evil)));
        for m in [
            sec::Match {
                principals: vec![unknown.clone()],
                destination_ports: vec![80],
                ..Default::default()
            },
            sec::Match {
                not_principals: vec![unknown.clone(), exact("cluster.local/ns/default/sa/evil")],
                ..Default::default()
            },
        ] {
            let (p, _) = read(policy(sec::Action::Allow, m));
            assert!(!p.matches(&conn(&sleep)) && !p.matches(&conn(&evil)));
        }
    }

    #[test]
    fn bad_resources_are_named_with_a_reason() {
        let mut w = wl::Workload {
            uid: "c//Pod/default/x".into(),
            name: "x".into(),
            namespace: "default".into(),
            ..Default::default()
        };
        w.addresses = vec![vec![10, 0, 0]];
        assert!(workload_from(&w).unwrap_err().contains("3 bytes"));
        w.addresses = vec![vec![10, 0, 0, 1]];
        w.waypoint = Some(wl::GatewayAddress {
            destination: Some(wl::gateway_address::Destination::Hostname(
                wl::NamespacedHostname {
                    namespace: "default".into(),
                    hostname: "wp.default.svc.cluster.local".into(),
                },
            )),
            hbone_mtls_port: 15008,
        });
        assert!(workload_from(&w).unwrap_err().contains("by hostname"));
        let p = sec::Authorization {
            name: "p".into(),
            scope: 9,
            ..Default::default()
        };
        assert!(authorization_from(&p).unwrap_err().contains("scope"));
    }
}

//! Arbitrary text as ztunnel's local YAML: parsing either succeeds or fails with an error; a
//! config that parses is indexed and queried (addresses, names, identities) without panicking.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use zring_core::config::{index::MeshIndex, LocalConfig};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(config) = LocalConfig::from_yaml(&text, std::path::Path::new("fuzz.yaml")) else {
        return;
    };
    let index = MeshIndex::new(config);
    for w in index.workloads() {
        let _ = w.identity();
        for ip in &w.workload_ips {
            let _ = index.resolve(SocketAddr::new(*ip, 9080));
        }
    }
    for s in index.services() {
        let _ = index.service_by_name(&s.name, &s.namespace);
        for v in &s.vips {
            let _ = index.resolve(SocketAddr::new(v.address, 80));
        }
    }
    let _ = index.resolve(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1));
});

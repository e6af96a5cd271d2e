//! Arbitrary text as the waypoint's L7 resources (VirtualService, DestinationRule, HTTPRoute,
//! AuthorizationPolicy, RequestAuthentication, the mesh ConfigMap): parsing succeeds or fails
//! with an error naming the file; it never panics, whatever the values (durations included).
#![no_main]

use libfuzzer_sys::fuzz_target;
use zring_core::waypoint::resources::{parse, WaypointIdentity};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let me = WaypointIdentity {
        gateway_name: "waypoint".into(),
        namespace: "default".into(),
        root_namespace: "istio-system".into(),
        domain: "cluster.local".into(),
    };
    if let Err(e) = parse(&text, "fuzz.yaml", &me) {
        assert!(e.to_string().contains("fuzz.yaml"), "{e}");
    }
});

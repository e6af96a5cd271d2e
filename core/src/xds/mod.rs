//! Istio's control-plane protocols: the protobuf messages (in-repo `.proto` files under
//! `core/proto/`, compiled by `build.rs` with protox and tonic-prost-build), the local config
//! as istiod's resources and back (`convert`), the xDS client (`client`), the Istio CA client (`ca_client`), and
//! `zring control-plane` (`server`).

pub mod authn;
pub mod ca_client;
pub mod client;
pub mod conn;
pub mod convert;
pub mod server;

/// The generated messages and services, in their protobuf packages.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod proto {
    pub mod envoy {
        pub mod service {
            pub mod discovery {
                pub mod v3 {
                    tonic::include_proto!("envoy.service.discovery.v3");
                }
            }
            /// External authorization (the waypoint's `envoyExtAuthzGrpc` providers).
            pub mod auth {
                pub mod v3 {
                    tonic::include_proto!("envoy.service.auth.v3");
                }
            }
        }
    }
    pub mod istio {
        pub mod workload {
            tonic::include_proto!("istio.workload");
        }
        pub mod security {
            tonic::include_proto!("istio.security");
        }
        pub mod v1 {
            pub mod auth {
                tonic::include_proto!("istio.v1.auth");
            }
        }
    }
}

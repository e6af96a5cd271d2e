//! The xDS client against a control plane written here that sends what `zring control-plane`
//! never would: a push with one good and one malformed workload is NACKed with the bad
//! resource's name and reason while the good one applies; a later bad version of a known
//! workload is NACKed and its previous state stays in force.

use std::{net::SocketAddr, pin::Pin, time::Duration};

use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use zring_core::xds::{
    convert::{ADDRESS_TYPE, AUTHORIZATION_TYPE},
    proto::{
        envoy::service::discovery::v3::{
            aggregated_discovery_service_server::{
                AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
            },
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            Resource,
        },
        istio::workload as wl,
    },
};

mod common;

use common::{mesh::http_get, tmp, Proc};

const ADDR: &str = "127.0.62.1:15012";

fn workload(uid: &str, name: &str, ip: Vec<u8>) -> Resource {
    let w = wl::Workload {
        uid: uid.into(),
        name: name.into(),
        namespace: "default".into(),
        service_account: name.into(),
        addresses: vec![ip],
        node: "node-a".into(),
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        ..Default::default()
    };
    let a = wl::Address {
        r#type: Some(wl::address::Type::Workload(w)),
    };
    Resource {
        name: uid.into(),
        version: format!("v{}", a.encoded_len()),
        resource: Some(prost_types::Any {
            type_url: ADDRESS_TYPE.into(),
            value: a.encode_to_vec(),
        }),
        ..Default::default()
    }
}

struct Script {
    /// The requests the client sent (ACKs and NACKs included).
    seen: mpsc::UnboundedSender<DeltaDiscoveryRequest>,
    /// The responses to send, in order, once the client has subscribed to both types.
    pushes: std::sync::Mutex<Option<mpsc::UnboundedReceiver<DeltaDiscoveryResponse>>>,
}

type Out = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type Sotw = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Script {
    type StreamAggregatedResourcesStream = Sotw;
    type DeltaAggregatedResourcesStream = Out;
    async fn stream_aggregated_resources(
        &self,
        _r: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Sotw>, Status> {
        Err(Status::unimplemented("sotw"))
    }
    async fn delta_aggregated_resources(
        &self,
        r: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Out>, Status> {
        let mut incoming = r.into_inner();
        let seen = self.seen.clone();
        let mut pushes = self
            .pushes
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| Status::unavailable("one stream only"))?;
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(async move {
            while let Some(Ok(req)) = incoming.next().await {
                let _ = seen.send(req);
            }
        });
        tokio::spawn(async move {
            while let Some(p) = pushes.recv().await {
                if tx.send(Ok(p)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn push(type_url: &str, nonce: &str, resources: Vec<Resource>) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        ..Default::default()
    }
}

#[test]
fn a_bad_resource_is_nacked_by_name_and_the_rest_applies() {
    let dir = tmp("xds-nack");
    let ca_dir = common::ca_init(&dir);
    let ca = zring_hbone::ca::LocalCa::load_dir(&ca_dir).unwrap();
    let (chain, key) = ca
        .issue_server(
            &["istiod.istio-system.svc".to_string()],
            &[],
            Duration::from_secs(3600),
        )
        .unwrap();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let (push_tx, push_rx) = mpsc::unbounded_channel();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr: SocketAddr = ADDR.parse().unwrap();
    rt.spawn(async move {
        tonic::transport::Server::builder()
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(chain, key)),
            )
            .unwrap()
            .add_service(AggregatedDiscoveryServiceServer::new(Script {
                seen: seen_tx,
                pushes: std::sync::Mutex::new(Some(push_rx)),
            }))
            .serve(addr)
            .await
            .unwrap();
    });
    let root = ca_dir.join("root-cert.pem");
    let node = Proc::spawn(&[
        "run",
        "--node-name",
        "node-a",
        "--xds-address",
        &format!("https://{ADDR}"),
        "--xds-root-ca",
        root.to_str().unwrap(),
        "--alt-xds-hostname",
        "istiod.istio-system.svc",
        "--ca-dir",
        ca_dir.to_str().unwrap(),
        "--packet-mark",
        "0",
        "--workers",
        "1",
        "--dns-proxy",
        "false",
        "--admin-addr",
        "127.0.62.2:15000",
        "--stats-addr",
        "127.0.62.2:15020",
        "--readiness-addr",
        "127.0.62.2:15021",
    ]);
    let next = |seen: &mut mpsc::UnboundedReceiver<DeltaDiscoveryRequest>| {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), seen.recv())
                .await
                .ok()
                .flatten()
        })
        .unwrap_or_else(|| panic!("no request from zring:\n{}", node.log()))
    };
    // The two subscriptions (wildcard), the node on the first.
    let first = next(&mut seen);
    assert_eq!(first.type_url, ADDRESS_TYPE);
    assert!(first.resource_names_subscribe.is_empty());
    assert!(first
        .node
        .as_ref()
        .is_some_and(|n| n.id.starts_with("ztunnel~")));
    assert_eq!(next(&mut seen).type_url, AUTHORIZATION_TYPE);

    let good = workload("c//v1/Pod/default/sleep", "sleep", vec![127, 0, 62, 5]);
    let bad = workload("c//v1/Pod/default/broken", "broken", vec![127, 0, 62]);
    push_tx
        .send(push(ADDRESS_TYPE, "n1", vec![good, bad]))
        .unwrap();
    push_tx
        .send(push(AUTHORIZATION_TYPE, "n2", vec![]))
        .unwrap();
    let nack = next(&mut seen);
    assert_eq!(nack.response_nonce, "n1");
    let detail = nack.error_detail.expect("a NACK");
    assert!(
        detail.message.contains("c//v1/Pod/default/broken") && detail.message.contains("3 bytes"),
        "{}",
        detail.message
    );
    let ack = next(&mut seen);
    assert_eq!(ack.response_nonce, "n2");
    assert!(ack.error_detail.is_none());

    let admin: SocketAddr = "127.0.62.2:15000".parse().unwrap();
    let ready: SocketAddr = "127.0.62.2:15021".parse().unwrap();
    common::wait_until(
        Duration::from_secs(10),
        || http_get(ready, "GET", "/healthz/ready").0 == 200,
        || format!("not ready:\n{}", node.log()),
    );
    let (_, dump) = http_get(admin, "GET", "/config_dump");
    assert!(dump.contains("c//v1/Pod/default/sleep"), "{dump}");
    assert!(!dump.contains("broken"), "{dump}");

    // A bad new version of a known workload: NACKed, the old version stays.
    push_tx
        .send(push(
            ADDRESS_TYPE,
            "n3",
            vec![workload(
                "c//v1/Pod/default/sleep",
                "sleep",
                vec![1, 2, 3, 4, 5],
            )],
        ))
        .unwrap();
    let nack = next(&mut seen);
    assert_eq!(nack.response_nonce, "n3");
    assert!(nack.error_detail.is_some());
    let (_, dump) = http_get(admin, "GET", "/config_dump");
    assert!(
        dump.contains("127.0.62.5"),
        "the previous state was lost:\n{dump}"
    );
    let (_, metrics) = http_get("127.0.62.2:15020".parse().unwrap(), "GET", "/metrics");
    assert_eq!(
        common::mesh::metric(&metrics, "zring_xds_nacks_total", &[]),
        Some(2),
        "{metrics}"
    );
    assert!(node.log().contains("xDS push partly refused (NACK)"));
}

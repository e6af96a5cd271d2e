//! `zring control-plane`: a small istiod stand-in. It serves, over TLS on one port (istiod's
//! 15012):
//! - delta ADS (`envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources`)
//!   with the resources of ztunnel's local config file (`Address` = workloads and services,
//!   `Authorization` = policies), watched: a change pushes only the resources that changed
//!   (by version, a hash of their bytes) and the names that went away; a file that does not
//!   parse is logged and the previous state stays. A client's `initial_resource_versions`
//!   (after a reconnect) spare it what it already has. NACKs are logged and counted.
//! - `istio.v1.auth.IstioCertificateService/CreateCertificate`: signs a CSR with the CA
//!   directory's root for the SPIFFE identity the CSR names, which must equal the
//!   `ImpersonatedIdentity` metadata when the client sends one (as ztunnel does in its shared
//!   mode); the answer is `[leaf, root]`, as istiod's.
//!
//! The serving certificate is issued at start by the same root, for `istiod.istio-system.svc`,
//! `istiod` and the listen IP. Callers are named by bearer tokens (`--token-file`, see
//! [`super::authn`]): every call must carry one of them, and CreateCertificate signs only an
//! identity the caller may hold (a workload its own, a node proxy its node's workloads').
//! Without a token file it listens on loopback only.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{
    authn::{Caller, Holders, Tokens},
    convert::{self, Named, ADDRESS_TYPE, AUTHORIZATION_TYPE},
    proto::{
        envoy::service::discovery::v3::{
            aggregated_discovery_service_server::{
                AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
            },
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            Resource,
        },
        istio::v1::auth::{
            istio_certificate_service_server::{
                IstioCertificateService, IstioCertificateServiceServer,
            },
            IstioCertificateRequest, IstioCertificateResponse,
        },
    },
};
use crate::config::LocalConfig;

/// Settings of `zring control-plane`.
#[derive(Debug, Clone)]
pub struct ControlPlaneConfig {
    /// ztunnel's local config file, watched.
    pub config: PathBuf,
    /// CA directory (`root-cert.pem`, `root-key.pem`): signs the workloads' CSRs and the
    /// serving certificate.
    pub ca_dir: PathBuf,
    /// Listen address (istiod: 15012).
    pub listen: SocketAddr,
    /// The bearer tokens callers must carry, each naming whom it stands for
    /// ([`super::authn::Tokens`]); None: loopback only, any node proxy.
    pub token_file: Option<PathBuf>,
    /// How often the config file is checked.
    pub poll: Duration,
}

/// Longest certificate lifetime the CA grants.
const MAX_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

/// One type's resources: name -> (version, bytes).
type Table = BTreeMap<String, (String, Arc<Vec<u8>>)>;

/// The resources in force, by type url.
#[derive(Debug, Default)]
struct Snapshot {
    by_type: HashMap<&'static str, Table>,
    /// Who holds which identity (what CreateCertificate may sign).
    holders: Holders,
}

fn version_of(bytes: &[u8]) -> String {
    // FNV-1a: stable across runs (a restarted control plane gives the same versions, so a
    // reconnecting client's initial_resource_versions spare it the unchanged resources).
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

impl Snapshot {
    fn of(config: &LocalConfig) -> Self {
        let (addresses, policies) = convert::resources(config);
        let table = |v: Vec<Named>| {
            v.into_iter()
                .map(|n| {
                    let version = version_of(&n.bytes);
                    (n.name, (version, Arc::new(n.bytes)))
                })
                .collect()
        };
        let mut by_type = HashMap::new();
        by_type.insert(ADDRESS_TYPE, table(addresses));
        by_type.insert(AUTHORIZATION_TYPE, table(policies));
        Snapshot {
            by_type,
            holders: Holders::of(config),
        }
    }
}

/// Counters of the control plane (logged; `zring control-plane` has no metrics port).
#[derive(Debug, Default)]
struct Counters {
    pushes: AtomicU64,
    nacks: AtomicU64,
    certificates: AtomicU64,
}

#[derive(Clone)]
struct Ads {
    snapshot: watch::Receiver<Arc<Snapshot>>,
    token: Option<Arc<Tokens>>,
    counters: Arc<Counters>,
}

/// Who a call comes from: the caller its bearer token stands for, or (no tokens configured,
/// loopback only) any node proxy.
fn authenticate<T>(tokens: &Option<Arc<Tokens>>, req: &Request<T>) -> Result<Caller, Status> {
    let Some(tokens) = tokens else {
        return Ok(Caller::AnyNode);
    };
    let bearer = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match tokens.caller(bearer) {
        Some(c) => Ok(c.clone()),
        None => {
            tracing::info!(peer = ?req.remote_addr(), "control plane: call refused: missing or unknown bearer token");
            Err(Status::unauthenticated(
                "missing or unknown bearer token (authorization: Bearer <token>)",
            ))
        }
    }
}

type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        _req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented(
            "state-of-the-world ADS is not served; use DeltaAggregatedResources (as ztunnel does)",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        authenticate(&self.token, &req)?;
        let peer = req.remote_addr();
        let incoming = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let ads = self.clone();
        tokio::spawn(async move {
            if let Err(e) = delta_stream(ads, incoming, tx.clone()).await {
                tracing::info!(peer = ?peer, error = %e, "xDS stream ended");
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One client's delta ADS stream: subscriptions, what it has, pushes.
async fn delta_stream(
    ads: Ads,
    mut incoming: Streaming<DeltaDiscoveryRequest>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) -> anyhow::Result<()> {
    let mut snapshot = ads.snapshot.clone();
    // type url -> name -> version the client has.
    let mut has: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut nonce = 0u64;
    let mut node_id = String::new();
    loop {
        tokio::select! {
            msg = incoming.next() => {
                let req = match msg {
                    None => return Ok(()),
                    Some(Err(e)) => return Err(anyhow::anyhow!("{e}")),
                    Some(Ok(r)) => r,
                };
                if let Some(n) = &req.node {
                    if node_id.is_empty() {
                        node_id = n.id.clone();
                        tracing::info!(node = %n.id, "xDS client connected");
                    }
                }
                if let Some(err) = &req.error_detail {
                    ads.counters.nacks.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(node = %node_id, type_url = %req.type_url, nonce = %req.response_nonce, error = %err.message, "xDS NACK");
                    continue;
                }
                if !req.response_nonce.is_empty() {
                    continue; // an ACK
                }
                if req.type_url != ADDRESS_TYPE && req.type_url != AUTHORIZATION_TYPE {
                    tracing::warn!(node = %node_id, type_url = %req.type_url, "xDS subscription to a type this control plane does not serve");
                    continue;
                }
                // A (re)subscription: the client holds what initial_resource_versions says.
                has.insert(req.type_url.clone(), req.initial_resource_versions.clone());
                let current = snapshot.borrow().clone();
                // Always answered, empty or not: a client is not synced until it hears back.
                if let Some(resp) = diff(&req.type_url, &current, has.get_mut(&req.type_url), &mut nonce, true) {
                    ads.counters.pushes.fetch_add(1, Ordering::Relaxed);
                    tx.send(Ok(resp)).await.context("client gone")?;
                }
            }
            changed = snapshot.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                let current = snapshot.borrow_and_update().clone();
                let types: Vec<String> = has.keys().cloned().collect();
                for t in types {
                    if let Some(resp) = diff(&t, &current, has.get_mut(&t), &mut nonce, false) {
                        ads.counters.pushes.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(node = %node_id, type_url = %t, resources = resp.resources.len(), removed = resp.removed_resources.len(), "xDS push");
                        tx.send(Ok(resp)).await.context("client gone")?;
                    }
                }
            }
        }
    }
}

/// What the client lacks of `type_url` in `snapshot` (and updates what it has); None when it
/// is up to date, unless `always` (the answer to a subscription).
fn diff(
    type_url: &str,
    snapshot: &Snapshot,
    has: Option<&mut HashMap<String, String>>,
    nonce: &mut u64,
    always: bool,
) -> Option<DeltaDiscoveryResponse> {
    let has = has?;
    let empty = BTreeMap::new();
    let current = snapshot.by_type.get(type_url).unwrap_or(&empty);
    let mut resources = Vec::new();
    for (name, (version, bytes)) in current {
        if has.get(name) != Some(version) {
            resources.push(Resource {
                name: name.clone(),
                version: version.clone(),
                resource: Some(prost_types::Any {
                    type_url: type_url.to_string(),
                    value: bytes.as_ref().clone(),
                }),
                ..Default::default()
            });
            has.insert(name.clone(), version.clone());
        }
    }
    let removed: Vec<String> = has
        .keys()
        .filter(|n| !current.contains_key(*n))
        .cloned()
        .collect();
    for n in &removed {
        has.remove(n);
    }
    if resources.is_empty() && removed.is_empty() && !always {
        return None;
    }
    *nonce += 1;
    Some(DeltaDiscoveryResponse {
        system_version_info: String::new(),
        resources,
        type_url: type_url.to_string(),
        removed_resources: removed,
        nonce: nonce.to_string(),
    })
}

struct Ca {
    ca: Arc<zring_hbone::ca::LocalCa>,
    snapshot: watch::Receiver<Arc<Snapshot>>,
    token: Option<Arc<Tokens>>,
    counters: Arc<Counters>,
}

#[tonic::async_trait]
impl IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = authenticate(&self.token, &req)?;
        let peer = req.remote_addr();
        let r = req.into_inner();
        let impersonated = r.metadata.as_ref().and_then(|m| {
            m.fields
                .get("ImpersonatedIdentity")
                .and_then(|v| match &v.kind {
                    Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
        });
        let ttl = match r.validity_duration {
            d if d <= 0 => zring_hbone::ca::DEFAULT_WORKLOAD_TTL,
            d => Duration::from_secs(d as u64).min(MAX_TTL),
        };
        let expected = impersonated
            .as_deref()
            .map(|s| {
                s.parse::<zring_hbone::SpiffeId>().map_err(|e| {
                    Status::invalid_argument(format!("ImpersonatedIdentity {s:?}: {e}"))
                })
            })
            .transpose()?;
        let asked = match expected {
            Some(id) => id,
            None => zring_hbone::ca::LocalCa::csr_identity(&r.csr)
                .map_err(|e| Status::invalid_argument(format!("{e}")))?,
        };
        // istiod's rule: a certificate only for an identity the caller may hold.
        let holders = self.snapshot.borrow().holders.clone();
        if let Err(why) = holders.may_hold(&caller, &asked) {
            tracing::warn!(peer = ?peer, caller = %caller, identity = %asked, "certificate refused: {why}");
            return Err(Status::permission_denied(format!(
                "{caller} may not have a certificate for {asked}: {why}"
            )));
        }
        let leaf = self
            .ca
            .sign_csr(&r.csr, Some(&asked), ttl)
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        self.counters.certificates.fetch_add(1, Ordering::Relaxed);
        tracing::info!(identity = %leaf.0, ttl = ?ttl, "certificate signed");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![leaf.1, self.ca.root_pem().to_string()],
        }))
    }
}

/// Run the control plane until `shutdown` resolves.
pub async fn serve(
    cfg: ControlPlaneConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ca = Arc::new(
        zring_hbone::ca::LocalCa::load_dir(&cfg.ca_dir)
            .with_context(|| format!("loading the CA from {}", cfg.ca_dir.display()))?,
    );
    let token = match &cfg.token_file {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the token file {}", p.display()))?;
            let tokens = Tokens::parse(&text)
                .map_err(|e| anyhow::anyhow!("the token file {}: {e}", p.display()))?;
            Some(Arc::new(tokens))
        }
        None if !cfg.listen.ip().is_loopback() => anyhow::bail!(
            "refusing to listen on {} without --token-file: anyone who reaches it could get the mesh's certificates (give each node proxy a token, `TOKEN node=NAME`)",
            cfg.listen
        ),
        None => {
            tracing::warn!(listen = %cfg.listen, "no --token-file: any local caller may get a certificate for any workload of the mesh (loopback only)");
            None
        }
    };
    let first = LocalConfig::load(&cfg.config)?;
    let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::of(&first)));
    let counters = Arc::new(Counters::default());
    let mut dns = vec![
        "istiod.istio-system.svc".to_string(),
        "istiod".to_string(),
        "istiod.istio-system.svc.cluster.local".to_string(),
    ];
    if cfg.listen.ip().is_loopback() {
        dns.push("localhost".into());
    }
    let (chain, key) = ca
        .issue_server(
            &dns,
            &[cfg.listen.ip()],
            Duration::from_secs(365 * 24 * 3600),
        )
        .context("issuing the serving certificate")?;
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(chain, key));

    // The file watcher.
    let path = cfg.config.clone();
    let poll = cfg.poll;
    tokio::spawn(async move {
        let mut last = std::fs::read(&path).ok();
        loop {
            tokio::time::sleep(poll).await;
            let Ok(bytes) = std::fs::read(&path) else {
                continue;
            };
            if last.as_deref() == Some(&bytes[..]) {
                continue;
            }
            last = Some(bytes.clone());
            match LocalConfig::from_yaml(&String::from_utf8_lossy(&bytes), &path) {
                Ok(c) => {
                    tracing::info!(file = %path.display(), workloads = c.workloads.len(), services = c.services.len(), policies = c.policies.len(), "config changed; pushing what changed");
                    let _ = snap_tx.send(Arc::new(Snapshot::of(&c)));
                }
                Err(e) => {
                    tracing::error!(error = %e, "config rejected; clients keep the previous state")
                }
            }
        }
    });

    let ads = Ads {
        snapshot: snap_rx,
        token: token.clone(),
        counters: counters.clone(),
    };
    let ca_svc = Ca {
        ca,
        snapshot: ads.snapshot.clone(),
        token,
        counters,
    };
    tracing::info!(listen = %cfg.listen, config = %cfg.config.display(), "zring control-plane serving xDS and CreateCertificate");
    tonic::transport::Server::builder()
        .tls_config(tls)
        .context("TLS settings")?
        .add_service(AggregatedDiscoveryServiceServer::new(ads))
        .add_service(IstioCertificateServiceServer::new(ca_svc))
        .serve_with_shutdown(cfg.listen, shutdown)
        .await
        .with_context(|| format!("serving on {}", cfg.listen))?;
    Ok(())
}

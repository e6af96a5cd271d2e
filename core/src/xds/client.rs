//! The xDS client: workloads, services and policies from istiod (or `zring control-plane`)
//! over delta ADS, as ztunnel takes them.
//!
//! - TLS to `XDS_ADDRESS` with the root of `XDS_ROOT_CA`, the server name from
//!   `ALT_XDS_HOSTNAME` (else the address's host); headers `authorization: Bearer <token>` (the
//!   token file is re-read for every new stream), `clusterid`, and `XDS_HEADER_*` extras.
//! - Node id `ztunnel~<INSTANCE_IP>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local`
//!   with the proxy's metadata.
//! - Subscribes (wildcard) to `istio.workload.Address` and `istio.security.Authorization`;
//!   applies adds and removals incrementally; ACKs with the nonce, or NACKs with
//!   `error_detail` naming each bad resource and why, the good resources of that response
//!   still applying; on reconnect `initial_resource_versions` carries what it holds.
//!   Reconnects with back-off from 10 ms doubling to 15 s.
//! - The first config is put in force once both types have arrived; until then zring is not
//!   ready. A lost control plane never stops traffic: the last good config stays in force.
//! - What reaches the proxy is the change, resource by resource ([`Delta`]), never the whole
//!   state: applying one changed workload costs the same with ten or ten thousand present.

use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use anyhow::Context;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    convert::{self, ADDRESS_TYPE, AUTHORIZATION_TYPE},
    proto::{
        envoy::service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status,
        },
        istio::{security, workload},
    },
};
use crate::config::index::{Change, Delta};

/// Where and how to reach the control plane, and who this proxy is.
#[derive(Debug, Clone)]
pub struct XdsSettings {
    /// The control plane (`XDS_ADDRESS`, `XDS_ROOT_CA`, `ALT_XDS_HOSTNAME`, `AUTH_TOKEN`,
    /// `XDS_HEADER_*`, `CLUSTER_ID`).
    pub upstream: super::conn::Upstream,
    /// Node id.
    pub node_id: String,
    /// Node metadata.
    pub metadata: BTreeMap<String, String>,
}

impl XdsSettings {
    /// ztunnel's node id for this proxy.
    pub fn node_id(instance_ip: &str, pod_name: &str, pod_namespace: &str) -> String {
        format!(
            "ztunnel~{instance_ip}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local"
        )
    }
}

/// A resource's version changed: type url, resource name, its version (None: removed).
pub type VersionChange = (String, String, Option<String>);

/// What the client reports to the proxy.
pub trait Sink: Send + 'static {
    /// Apply these changes to the config in force; errors (each naming a resource) are NACKed,
    /// the changes still apply. `versions`: the versions the changes bring (for
    /// `/config_dump`).
    fn apply(&self, delta: Delta, versions: Vec<VersionChange>) -> Result<(), Vec<String>>;
    /// The connection state changed, or a push arrived (for metrics and logs).
    fn event(&self, e: Event<'_>);
}

/// Something the client did.
#[derive(Debug)]
pub enum Event<'a> {
    /// Connected (true) or lost (false).
    Connected(bool),
    /// A stream was given up because the control plane sent nothing on it in time.
    Stalled,
    /// A push of `type_url` was applied (`nacked`: some of it was refused).
    Push {
        /// Resource type.
        type_url: &'a str,
        /// Resources of that type now held.
        held: usize,
        /// Whether it was NACKed.
        nacked: bool,
        /// String matchers dropped from policies since the client started.
        dropped_matchers: usize,
    },
}

const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// How long an opened stream may go without its first push before it is opened again
/// (istiod answers at once; a control plane that does not is stuck or overloaded).
const FIRST_PUSH: Duration = Duration::from_secs(20);
const FIRST_BACKOFF: Duration = Duration::from_millis(10);

/// The versions of the resources held, by type, and the changes not yet handed over (until
/// both types have arrived once).
#[derive(Debug, Default)]
struct Held {
    versions: HashMap<String, HashMap<String, String>>,
    synced: HashMap<String, bool>,
    pending: Delta,
    pending_versions: Vec<VersionChange>,
    /// String matchers dropped from policies so far (`zring_xds_matchers_dropped_total`).
    dropped_matchers: usize,
}

impl Held {
    fn count(&self, type_url: &str) -> usize {
        self.versions.get(type_url).map_or(0, |v| v.len())
    }

    /// Take one response into `pending`; the errors name each refused resource (its previous
    /// state stays).
    fn apply(&mut self, r: &DeltaDiscoveryResponse) -> Vec<String> {
        let mut errors = Vec::new();
        let versions = self.versions.entry(r.type_url.clone()).or_default();
        for name in &r.removed_resources {
            if versions.remove(name).is_none() {
                continue;
            }
            let change = match r.type_url == ADDRESS_TYPE {
                true => Change::RemoveAddress,
                false => Change::RemovePolicy,
            };
            self.pending.push((name.clone(), change));
            self.pending_versions
                .push((r.type_url.clone(), name.clone(), None));
        }
        for res in &r.resources {
            let Some(any) = &res.resource else {
                errors.push(format!("{}: no resource", res.name));
                continue;
            };
            let outcome = if r.type_url == ADDRESS_TYPE {
                match workload::Address::decode(any.value.as_slice()) {
                    Err(e) => Err(format!("not an istio.workload.Address: {e}")),
                    Ok(workload::Address {
                        r#type: Some(workload::address::Type::Workload(w)),
                    }) => convert::workload_from(&w).map(|w| Change::Workload(Box::new(w))),
                    Ok(workload::Address {
                        r#type: Some(workload::address::Type::Service(s)),
                    }) => convert::service_from(&s).map(Change::Service),
                    Ok(_) => Err("an Address that is neither a workload nor a service".into()),
                }
            } else {
                match security::Authorization::decode(any.value.as_slice()) {
                    Err(e) => Err(format!("not an istio.security.Authorization: {e}")),
                    Ok(p) => convert::authorization_from(&p).map(|(p, dropped)| {
                        if dropped > 0 {
                            self.dropped_matchers += dropped;
                            tracing::warn!(policy = %res.name, dropped, action = ?p.action, "xDS: string matchers of an unknown or empty type dropped from a policy (a DENY match left empty applies to everyone, an ALLOW match that would admit more matches no one)");
                        }
                        Change::Policy(p)
                    }),
                }
            };
            match outcome {
                Ok(change) => {
                    versions.insert(res.name.clone(), res.version.clone());
                    self.pending.push((res.name.clone(), change));
                    self.pending_versions.push((
                        r.type_url.clone(),
                        res.name.clone(),
                        Some(res.version.clone()),
                    ));
                }
                // The previous state of a refused resource stays.
                Err(e) => errors.push(format!("{}: {e}", res.name)),
            }
        }
        self.synced.insert(r.type_url.clone(), true);
        errors
    }
}

/// Run the client on the current thread until `stop` says so (its own tokio runtime).
pub fn run(
    settings: XdsSettings,
    sink: impl Sink,
    stop: impl Fn() -> bool + Send + 'static,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut held = Held::default();
        let mut backoff = FIRST_BACKOFF;
        while !stop() {
            let started = std::time::Instant::now();
            match stream(&settings, &sink, &mut held, &stop).await {
                Ok(()) => return,
                Err(e) => {
                    sink.event(Event::Connected(false));
                    if stop() {
                        // Shutting down: the control plane (or the stream) going away now is
                        // expected, not a warning.
                        tracing::debug!(error = %format!("{e:#}"), "xDS stream ended during shutdown");
                        return;
                    }
                    tracing::warn!(address = %settings.upstream.address, error = %format!("{e:#}"), retry_in = ?backoff, "xDS stream failed; the config in force stays");
                }
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = FIRST_BACKOFF;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    });
    Ok(())
}

async fn stream(
    s: &XdsSettings,
    sink: &impl Sink,
    held: &mut Held,
    stop: &impl Fn() -> bool,
) -> anyhow::Result<()> {
    let channel = s.upstream.channel().await?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    s.upstream.decorate(&mut req)?;
    let node = Node {
        id: s.node_id.clone(),
        cluster: String::new(),
        metadata: Some(prost_types::Struct {
            fields: s
                .metadata
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::StringValue(v.clone())),
                        },
                    )
                })
                .collect(),
        }),
        build_version: String::new(),
    };
    for (i, t) in [ADDRESS_TYPE, AUTHORIZATION_TYPE].into_iter().enumerate() {
        tx.send(DeltaDiscoveryRequest {
            node: (i == 0).then(|| node.clone()),
            type_url: t.to_string(),
            initial_resource_versions: held.versions.get(t).cloned().unwrap_or_default(),
            ..Default::default()
        })
        .await
        .context("request stream closed")?;
    }
    // A control plane that takes the stream but never answers would leave zring not ready
    // for ever: past FIRST_PUSH the stream is dropped and opened again (logged, counted).
    let opened = tokio::time::timeout(FIRST_PUSH, client.delta_aggregated_resources(req)).await;
    let mut responses = match opened {
        Ok(r) => r.context("opening the delta ADS stream")?.into_inner(),
        Err(_) => {
            sink.event(Event::Stalled);
            anyhow::bail!(
                "the control plane did not answer the stream within {FIRST_PUSH:?}; reconnecting"
            )
        }
    };
    sink.event(Event::Connected(true));
    tracing::info!(address = %s.upstream.address, node = %s.node_id, "xDS stream open");
    let first_by = tokio::time::Instant::now() + FIRST_PUSH;
    let mut pushed = false;
    loop {
        let msg = tokio::select! {
            m = responses.message() => m.context("receiving")?,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if stop() { return Ok(()); }
                if !pushed && tokio::time::Instant::now() >= first_by {
                    sink.event(Event::Stalled);
                    anyhow::bail!("no push within {FIRST_PUSH:?} of opening the stream; reconnecting");
                }
                continue;
            }
        };
        let Some(r) = msg else {
            anyhow::bail!("the control plane closed the stream");
        };
        pushed = true;
        if r.type_url != ADDRESS_TYPE && r.type_url != AUTHORIZATION_TYPE {
            // Not asked for: NACKed, so the control plane knows it was not taken.
            tracing::warn!(type_url = %r.type_url, "xDS push of a type not asked for; NACKed");
            tx.send(DeltaDiscoveryRequest {
                type_url: r.type_url.clone(),
                response_nonce: r.nonce.clone(),
                error_detail: Some(Status {
                    code: 3, // INVALID_ARGUMENT
                    message: format!("type {} was not subscribed to", r.type_url),
                    details: Vec::new(),
                }),
                ..Default::default()
            })
            .await
            .context("request stream closed")?;
            continue;
        }
        let mut errors = held.apply(&r);
        let both = [ADDRESS_TYPE, AUTHORIZATION_TYPE]
            .iter()
            .all(|t| held.synced.get(*t).copied().unwrap_or(false));
        if both {
            let delta = std::mem::take(&mut held.pending);
            let versions = std::mem::take(&mut held.pending_versions);
            if let Err(e) = sink.apply(delta, versions) {
                errors.extend(e);
            }
        }
        let nacked = !errors.is_empty();
        if nacked {
            tracing::warn!(type_url = %r.type_url, nonce = %r.nonce, errors = %errors.join("; "), "xDS push partly refused (NACK); the rest applies");
        }
        sink.event(Event::Push {
            type_url: &r.type_url,
            held: held.count(&r.type_url),
            nacked,
            dropped_matchers: held.dropped_matchers,
        });
        tx.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: nacked.then(|| Status {
                code: 3, // INVALID_ARGUMENT
                message: errors.join("; "),
                details: Vec::new(),
            }),
            ..Default::default()
        })
        .await
        .context("request stream closed")?;
    }
}

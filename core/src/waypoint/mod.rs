//! `zring waypoint`: the L7 half of the mesh in the same binary.
//!
//! A waypoint is a workload of the mesh config (its own identity, e.g.
//! `spiffe://cluster.local/ns/default/sa/bookinfo-reviews-waypoint`) on a node of its own. It
//! runs the node proxy's machinery (workers, inbound HBONE on `<its ip>:15008`, certificates,
//! metrics, admin, readiness, drain), but each CONNECT stream is served here instead of being
//! delivered to a pod:
//!
//! 1. The CONNECT's authority is the original destination: a service VIP:port (service
//!    waypoint) or a workload IP:port (workload waypoint).
//! 2. The first bytes decide the protocol: the HTTP/2 preface (h2c, gRPC), an HTTP/1.x request
//!    line, or anything else, relayed as TCP (L4 policy only).
//! 3. Each HTTP request: L7 authorization (`policy`), then a route (`resources`: VirtualService
//!    with DestinationRule subsets, or HTTPRoute), a weighted backend, an endpoint of it; then
//!    HBONE to that endpoint's node at `<pod ip>:<target port>`, presenting the waypoint's own
//!    certificate (the destination node proxy authorizes the waypoint's identity).
//! 4. Telemetry: Istio's request metrics with `reporter="waypoint"`, one access-log line per
//!    request.
//!
//! The L7 resources (`--resources`, a file or folder) are re-read when they change; a bad file
//! is refused with the file, resource and field named, and the rules in force are kept.

pub mod cors;
pub mod ext_authz;
pub mod headers;
pub mod http;
pub mod jwt;
pub mod metrics;
pub(crate) mod mirror;
pub mod normalize;
pub mod policy;
pub mod resources;
pub mod traffic;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use resources::{L7Config, WaypointIdentity};

/// The maps a request looks up (routes, policies, metrics series, pooled connections), hashed
/// with foldhash: std's SipHash was a visible share of a request's CPU, and their keys come from
/// the mesh config and the waypoint's own state, not from the client.
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Settings of `zring waypoint`.
#[derive(Debug, Clone)]
pub struct WaypointSettings {
    /// File or folder of Kubernetes resources (VirtualService, DestinationRule, HTTPRoute,
    /// AuthorizationPolicy, RequestAuthentication, the `istio` ConfigMap); None: no L7 rules (route to the original destination, no policy).
    pub resources: Option<PathBuf>,
    /// The waypoint's Gateway name (`istio.io/gateway-name`), for policy attachment.
    pub gateway_name: String,
    /// The Gateway's namespace.
    pub namespace: String,
    /// Istio's root namespace.
    pub root_namespace: String,
    /// How long to wait for the first bytes of a stream before treating it as TCP (a
    /// server-first protocol sends nothing).
    pub sniff_timeout: Duration,
    /// Limit on one request's header block.
    pub max_header_bytes: usize,
    /// Limit on concurrent HTTP/2 streams per client connection.
    pub max_concurrent_streams: u32,
    /// A client connection with no request in flight is closed after this long (this also
    /// bounds a client that trickles a request head).
    pub idle_timeout: Duration,
    /// Default whole-request limit (routes may set their own).
    pub request_timeout: Duration,
    /// How long an endpoint that failed is skipped.
    pub ejection: Duration,
}

impl Default for WaypointSettings {
    fn default() -> Self {
        Self {
            resources: None,
            gateway_name: "waypoint".into(),
            namespace: "default".into(),
            root_namespace: "istio-system".into(),
            sniff_timeout: Duration::from_secs(5),
            max_header_bytes: 64 * 1024,
            max_concurrent_streams: 100,
            idle_timeout: Duration::from_secs(300),
            request_timeout: Duration::from_secs(60),
            ejection: Duration::from_secs(10),
        }
    }
}

/// The waypoint's shared state: the L7 rules in force and the request metrics.
#[derive(Debug)]
pub struct Waypoint {
    /// Settings.
    pub settings: WaypointSettings,
    rules: RwLock<Arc<L7Config>>,
    /// Request metrics (`istio_requests_total`...).
    pub metrics: metrics::RequestMetrics,
    /// Endpoint health under DestinationRules' outlier detection.
    pub health: traffic::Health,
    /// Requests in flight per destination, under DestinationRules' connection-pool limits.
    pub gates: traffic::Gates,
    /// Requests in flight per endpoint, for least request.
    pub in_flight: traffic::InFlight,
    /// When each endpoint was first seen, for slow start.
    pub births: traffic::Births,
    last_error: Mutex<Option<String>>,
}

impl Waypoint {
    /// A waypoint with no rules yet.
    pub fn new(settings: WaypointSettings) -> Self {
        Self {
            settings,
            rules: RwLock::new(Arc::new(L7Config::default())),
            metrics: Default::default(),
            health: Default::default(),
            gates: Default::default(),
            in_flight: Default::default(),
            births: Default::default(),
            last_error: Mutex::new(None),
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<L7Config> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn identity(&self, domain: &str) -> WaypointIdentity {
        WaypointIdentity {
            gateway_name: self.settings.gateway_name.clone(),
            namespace: self.settings.namespace.clone(),
            root_namespace: self.settings.root_namespace.clone(),
            domain: domain.to_string(),
        }
    }

    /// Read the resources now; on success they are in force.
    pub fn reload(&self, domain: &str) -> Result<usize, String> {
        let Some(path) = &self.settings.resources else {
            return Ok(0);
        };
        let me = self.identity(domain);
        // A panic while reading is a bug, but it must cost one refused reload, never the rules
        // thread (which would then never read a fixed file again).
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            resources::load(path, &me).map_err(|e| e.to_string())
        }))
        .unwrap_or_else(|p| {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!("internal error while reading the resources: {why}"))
        });
        match result {
            Ok(cfg) => {
                let n = cfg.loaded.len();
                tracing::info!(
                    resources = n,
                    routes = cfg.routes.values().map(Vec::len).sum::<usize>(),
                    policies = cfg.policies.len(),
                    "waypoint L7 resources in force"
                );
                *self.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg);
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.metrics.reload(true);
                Ok(n)
            }
            Err(msg) => {
                tracing::error!(error = %msg, "waypoint L7 resources rejected; the rules in force are kept");
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg.clone());
                self.metrics.reload(false);
                Err(msg)
            }
        }
    }

    /// The last rejection, if the latest read failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// A fingerprint of the resource files (names, sizes, modification times), to see changes.
    fn fingerprint(&self) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
        let Some(path) = &self.settings.resources else {
            return Vec::new();
        };
        let entry = |p: PathBuf| {
            let m = std::fs::metadata(&p).ok();
            let len = m.as_ref().map_or(0, |m| m.len());
            let modified = m.and_then(|m| m.modified().ok());
            (p, len, modified)
        };
        match std::fs::read_dir(path) {
            Ok(rd) => {
                let mut v: Vec<_> = rd.filter_map(|e| e.ok().map(|e| entry(e.path()))).collect();
                v.sort();
                v
            }
            Err(_) => vec![entry(path.clone())],
        }
    }

    /// Watch the resources (checked every second) and the cluster domain of the mesh config;
    /// reload when either changes.
    pub fn spawn_watch(
        self: &Arc<Self>,
        domain: impl Fn() -> String + Send + 'static,
        stop: impl Fn() -> bool + Send + 'static,
    ) -> std::io::Result<()> {
        let wp = self.clone();
        std::thread::Builder::new()
            .name("zring-waypoint-rules".into())
            .spawn(move || {
                let mut seen = (wp.fingerprint(), domain());
                let mut read_at = std::time::Instant::now();
                while !stop() {
                    std::thread::sleep(Duration::from_millis(200));
                    let now = (wp.fingerprint(), domain());
                    // Keys from a `jwksUri` are fetched again after a while (key rotation).
                    let refetch = wp
                        .rules()
                        .authn
                        .iter()
                        .filter_map(jwt::RequestAuthn::refetch_after)
                        .min()
                        .is_some_and(|d| read_at.elapsed() >= d);
                    if now != seen || refetch {
                        let _ = wp.reload(&now.1);
                        seen = now;
                        read_at = std::time::Instant::now();
                    }
                }
            })?;
        Ok(())
    }

    /// The rules for `/config_dump`.
    pub fn dump(&self) -> serde_json::Value {
        let r = self.rules();
        let mut routes: Vec<_> = r
            .routes
            .iter()
            .map(|(svc, rs)| {
                serde_json::json!({
                    "service": svc,
                    "rules": rs.iter().map(|x| serde_json::json!({
                        "origin": x.origin,
                        "backends": x.backends.iter().map(|b| serde_json::json!({
                            "service": b.service, "port": b.port, "subset": b.subset, "weight": b.weight,
                            "headers": b.headers.dump(),
                        })).collect::<Vec<_>>(),
                        "headers": x.headers.dump(),
                        "fault": x.fault.as_deref().map(resources::Fault::dump),
                        "redirect": x.redirect.as_deref().map(|r| format!("{r:?}")),
                        "cors": x.cors.as_deref().map(|c| serde_json::json!({
                            "origins": c.origins.iter().map(|o| format!("{o:?}")).collect::<Vec<_>>(),
                            "methods": c.methods.as_ref().and_then(|v| v.to_str().ok()),
                            "credentials": c.credentials,
                        })),
                        "directResponse": x.direct.as_deref().map(|d| serde_json::json!({
                            "status": d.status, "bodyBytes": d.body.len(),
                        })),
                        "mirrors": x.mirrors.iter().map(|m| serde_json::json!({
                            "service": m.backend.service, "port": m.backend.port,
                            "subset": m.backend.subset, "percent": m.share,
                        })).collect::<Vec<_>>(),
                        "rewrite": x.rewrite.as_deref().map(|r| serde_json::json!({
                            "path": r.path.as_ref().map(|p| format!("{p:?}")),
                            "authority": r.authority,
                        })),
                        "timeoutMs": x.timeout.map(|d| d.as_millis() as u64),
                        "retries": x.retry.attempts,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        routes.sort_by(|a, b| a["service"].as_str().cmp(&b["service"].as_str()));
        let mut traffic: Vec<_> = r
            .traffic
            .iter()
            .map(|(svc, t)| (svc.as_str(), None, t))
            .chain(r.subset_traffic.iter().flat_map(|(svc, subs)| {
                subs.iter()
                    .map(move |(sub, t)| (svc.as_str(), Some(sub.as_str()), t))
            }))
            .map(|(svc, sub, t)| {
                serde_json::json!({"service": svc, "subset": sub, "policy": t.dump()})
            })
            .collect();
        traffic.sort_by_key(|t| t.to_string());
        serde_json::json!({
            "gatewayName": self.settings.gateway_name,
            "namespace": self.settings.namespace,
            "resources": r.loaded,
            "routes": routes,
            "trafficPolicies": traffic,
            "policies": r.policies.iter().map(|p| &p.name).collect::<Vec<_>>(),
            "requestAuthentications": r.authn.iter().map(|a| serde_json::json!({
                "name": a.name, "issuers": a.rules.iter().map(|r| &r.issuer).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
            "lastError": self.last_error(),
        })
    }
}

//! The L7 resources a waypoint reads, in the shapes users `kubectl apply`: Istio's
//! `VirtualService`, `DestinationRule`, `AuthorizationPolicy` and `RequestAuthentication` (the
//! seeds' forms), and Gateway API's `HTTPRoute` (today's recommended form). One file or a folder
//! of files (`*.yaml`, `*.yml`, `*.json`, name order), each any number of YAML documents or a
//! `List`.
//!
//! Other kinds (`Gateway`, `Service`, ...) are skipped. Fields zring's waypoint does not
//! implement (Gateway filters other than header modifiers, URL rewrites, redirects, mirrors and
//! CORS; a check request's body for external authorization) are refused rather than ignored: a rule that
//! silently did less than it says would let traffic through that the user meant to stop. Every
//! error names the file, the resource and the field, e.g. `routes.yaml: VirtualService
//! default/reviews: spec.http[0].route[1].weight: invalid type: string "ten", expected u32`.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::{
    cors::{self, Cors},
    headers::{
        self, HeaderRules, PathRewrite, Redirect, RedirectPort, Rewrite, VsHeaders, REDIRECT_CODES,
    },
    policy::{L7Policy, PolicyTarget},
    traffic::{self, TrafficPolicy},
    FastMap,
};

/// Why a resource file was refused.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {resource}: {field}: {message}")]
pub struct ResourceError {
    /// The file.
    pub file: String,
    /// `Kind namespace/name`, or `document N` when it has no kind.
    pub resource: String,
    /// The offending field (`spec.http[0].route`), or `.`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Matches a string the way Istio's `StringMatch` (and Gateway API's match types) do.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// A whole-string RE2-style regular expression.
    Regex(regex::Regex),
}

impl ValueMatch {
    /// Whether `v` matches.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::Exact(s) => v == s,
            ValueMatch::Prefix(p) => v.starts_with(p.as_str()),
            ValueMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// A path match: Gateway API's `PathPrefix` matches whole segments (`/foo` matches `/foo/bar`,
/// not `/foobar`); Istio's `prefix` is a plain string prefix.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Istio's exact/prefix/regex on the path (query excluded for exact and prefix as Envoy).
    Value(ValueMatch),
    /// Gateway API `PathPrefix`.
    SegmentPrefix(String),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Value(v) => v.matches(path),
            PathMatch::SegmentPrefix(p) => {
                let p = p.trim_end_matches('/');
                p.is_empty()
                    || path == p
                    || (path.starts_with(p) && path.as_bytes().get(p.len()) == Some(&b'/'))
            }
        }
    }
}

/// How much of `path` a rule's match matched, for a path rewrite: the prefix of a prefix match,
/// all of an exact match; without a path condition, `/` for a VirtualService rule (the prefix
/// match Istio gives it) and nothing for Gateway API segments.
pub fn matched_len(m: Option<&RequestMatch>, path: &str, rw: &PathRewrite) -> usize {
    match m.and_then(|m| m.path.as_ref()) {
        Some(PathMatch::Value(ValueMatch::Prefix(p))) => p.len(),
        Some(PathMatch::Value(_)) => path.len(),
        Some(PathMatch::SegmentPrefix(p)) => p.trim_end_matches('/').len(),
        None => match rw {
            PathRewrite::Prefix(_) => path.len().min(1),
            _ => 0,
        },
    }
}

/// One request match: every part given must hold.
#[derive(Debug, Clone, Default)]
pub struct RequestMatch {
    /// On the path (without the query).
    pub path: Option<PathMatch>,
    /// On the method.
    pub method: Option<ValueMatch>,
    /// On headers (lower-case names).
    pub headers: Vec<(String, ValueMatch)>,
    /// On query parameters.
    pub query: Vec<(String, ValueMatch)>,
    /// On the authority (`Host`).
    pub authority: Option<ValueMatch>,
    /// On the destination port.
    pub port: Option<u16>,
}

/// What a match looks at.
#[derive(Debug)]
pub struct RequestView<'a> {
    /// Method.
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// The query string, if any.
    pub query: Option<&'a str>,
    /// Headers.
    pub headers: &'a http::HeaderMap,
    /// Authority.
    pub authority: &'a str,
    /// Destination port (the CONNECT's).
    pub port: u16,
}

impl RequestMatch {
    /// Whether the request matches.
    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        if self.path.as_ref().is_some_and(|p| !p.matches(r.path)) {
            return false;
        }
        if self.method.as_ref().is_some_and(|m| !m.matches(r.method)) {
            return false;
        }
        if self.port.is_some_and(|p| p != r.port) {
            return false;
        }
        if self
            .authority
            .as_ref()
            .is_some_and(|a| !a.matches(r.authority))
        {
            return false;
        }
        // A repeated header is matched as Envoy's router matches it: its values joined with
        // commas (`x-role: user` + `x-role: admin` is `user,admin`), never only the first.
        let header_ok = |(name, m): &(String, ValueMatch)| {
            let mut vals = r
                .headers
                .get_all(name.as_str())
                .iter()
                .map(|v| v.to_str().ok());
            match (vals.next(), vals.next()) {
                (None, _) | (Some(None), _) => false,
                (Some(Some(v)), None) => m.matches(v),
                (Some(first), Some(second)) => {
                    let all: Option<Vec<&str>> = [first, second].into_iter().chain(vals).collect();
                    all.is_some_and(|all| m.matches(&all.join(",")))
                }
            }
        };
        if !self.headers.iter().all(header_ok) {
            return false;
        }
        self.query.iter().all(|(name, m)| {
            super::headers::query_pairs(r.query).any(|(k, v)| k == name && m.matches(v))
        })
    }

    /// Gateway API precedence among rules: exact path, then longer prefixes, then method, then
    /// more headers, then more query parameters (higher sorts first).
    fn specificity(&self) -> (u8, usize, bool, usize, usize) {
        let (kind, len) = match &self.path {
            Some(PathMatch::Value(ValueMatch::Exact(s))) => (3, s.len()),
            Some(PathMatch::SegmentPrefix(s)) | Some(PathMatch::Value(ValueMatch::Prefix(s))) => {
                (2, s.len())
            }
            Some(PathMatch::Value(ValueMatch::Regex(r))) => (1, r.as_str().len()),
            None => (0, 0),
        };
        (
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }
}

/// Where a route sends a request.
#[derive(Debug, Clone)]
pub struct Backend {
    /// The service, `namespace/hostname`.
    pub service: String,
    /// Service port; None: the port the client dialed.
    pub port: Option<u16>,
    /// A DestinationRule subset of the service.
    pub subset: Option<String>,
    /// Relative weight.
    pub weight: u32,
    /// Header changes when this backend is picked (VirtualService destination `headers`,
    /// backendRef `filters`); applied before the route's.
    pub headers: Arc<HeaderRules>,
}

/// When and how often to try again.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Limit of each try (None: only the route's timeout).
    pub per_try_timeout: Option<Duration>,
    /// Retry on these response codes (`5xx` adds 500-599; `gateway-error` 502-504).
    pub codes: Vec<u16>,
    /// Retry connect failures and streams reset before a response (always, as Envoy's
    /// `connect-failure,refused-stream,reset`).
    pub on_connect_failure: bool,
    /// Wait between tries.
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    /// Istio's default: 2 retries on connect failure, refused stream, and 503.
    fn default() -> Self {
        Self {
            attempts: 2,
            per_try_timeout: None,
            codes: vec![503],
            on_connect_failure: true,
            backoff: Duration::from_millis(25),
        }
    }
}

/// One routing rule.
#[derive(Debug, Clone)]
pub struct Route {
    /// Where it comes from, for logs and `/config_dump`: `VirtualService default/reviews
    /// http[0]`.
    pub origin: String,
    /// Any of these (none: every request).
    pub matches: Vec<RequestMatch>,
    /// Weighted backends.
    pub backends: Vec<Backend>,
    /// Whole-request limit, response body included (None: only `--request-timeout`, on the
    /// response head; `Some(ZERO)`: no limit at all, as `0s` means to Envoy and Istio).
    pub timeout: Option<Duration>,
    /// Retries.
    pub retry: RetryPolicy,
    /// Header changes (VirtualService rule `headers`, rule `filters` of an HTTPRoute).
    pub headers: Arc<HeaderRules>,
    /// Faults injected into the requests this rule matches (VirtualService `fault`).
    pub fault: Option<Arc<Fault>>,
    /// URL rewrite (VirtualService `rewrite`, HTTPRoute `URLRewrite`).
    pub rewrite: Option<Arc<Rewrite>>,
    /// Answered with a redirect instead of routed (VirtualService `redirect`, HTTPRoute
    /// `RequestRedirect`).
    pub redirect: Option<Arc<Redirect>>,
    /// Answered with a fixed status and body instead of routed (VirtualService
    /// `directResponse`).
    pub direct: Option<Arc<DirectResponse>>,
    /// Copies of the request sent elsewhere, their answers dropped (VirtualService `mirror` /
    /// `mirrors`, HTTPRoute `RequestMirror`).
    pub mirrors: Vec<Mirror>,
    /// CORS (VirtualService `corsPolicy`, HTTPRoute `CORS`).
    pub cors: Option<Arc<Cors>>,
}

/// A VirtualService `directResponse`: the waypoint answers the rule's requests itself.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectResponse {
    pub status: u16,
    /// `body.string`, or `body.bytes` decoded; empty without a body.
    pub body: bytes::Bytes,
}

/// The largest `directResponse` body taken.
const DIRECT_BODY_LIMIT: usize = 1 << 20;

/// A copy of (a share of) the requests a rule routes, sent to another destination with its
/// answer dropped: Envoy's request mirroring ("shadowing"). The copy's authority carries a
/// `-shadow` suffix, as Envoy's.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// Where: service, port and subset (the weight is unused).
    pub backend: Backend,
    /// Percent of requests copied.
    pub share: f64,
}

impl Mirror {
    fn to(service: String, port: Option<u16>, subset: Option<String>, share: f64) -> Mirror {
        Mirror {
            backend: Backend {
                service,
                port,
                subset,
                weight: 0,
                headers: Default::default(),
            },
            share,
        }
    }
}

/// VirtualService `fault`: a delay, then an abort, each for a share of requests, applied after
/// authorization and before the request goes upstream (Envoy's fault filter runs between RBAC
/// and the router). The delay does not count against the route's timeout, as in Envoy.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// `delay.fixedDelay`, and the percentage of requests delayed.
    pub delay: Option<(Duration, f64)>,
    /// `abort`, and the percentage of requests aborted.
    pub abort: Option<(Abort, f64)>,
}

impl Fault {
    /// For `/config_dump`, in VirtualService's field names.
    pub fn dump(&self) -> serde_json::Value {
        serde_json::json!({
            "delay": self.delay.map(|(d, p)| serde_json::json!({
                "fixedDelay": format!("{}ms", d.as_millis()), "percentage": p,
            })),
            "abort": self.abort.map(|(a, p)| match a {
                Abort::Http(c) => serde_json::json!({"httpStatus": c, "percentage": p}),
                Abort::Grpc(c) => serde_json::json!({"grpcStatus": GRPC_CODES[c as usize], "percentage": p}),
            }),
        })
    }
}

/// How an injected abort answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Abort {
    /// `httpStatus`: that status, body `fault filter abort`.
    Http(u16),
    /// `grpcStatus`: HTTP 200 with `grpc-status` (the code's number) and no body.
    Grpc(u32),
}

/// Everything the waypoint applies at L7.
#[derive(Debug, Default)]
pub struct L7Config {
    /// Service (`namespace/hostname`) -> its rules, in the order they are tried.
    pub routes: FastMap<String, Vec<Route>>,
    /// (service, subset name) -> the pod labels the subset selects.
    pub subsets: HashMap<(String, String), BTreeMap<String, String>>,
    /// Service -> its DestinationRule's traffic policy (outlier detection, connection pool).
    pub traffic: FastMap<String, Arc<TrafficPolicy>>,
    /// Service -> subset name -> the subset's traffic policy, merged over its rule's.
    pub subset_traffic: FastMap<String, FastMap<String, Arc<TrafficPolicy>>>,
    /// Authorization policies attached to this waypoint or a service behind it.
    pub policies: Vec<L7Policy>,
    /// RequestAuthentications attached to this waypoint (JWT rules).
    pub authn: Vec<super::jwt::RequestAuthn>,
    /// The mesh config's extension providers (the `istio` ConfigMap), for CUSTOM policies.
    pub providers: Vec<super::ext_authz::Provider>,
    /// The mesh config's `pathNormalization.normalization` (`BASE` when unset, as Istio).
    pub path_normalization: super::normalize::PathNormalization,
    /// What was read: `Kind namespace/name (file)`.
    pub loaded: Vec<String>,
}

impl L7Config {
    /// The traffic policy for requests to `service` (its `subset`), if a DestinationRule sets
    /// one.
    pub fn traffic_for(&self, service: &str, subset: Option<&str>) -> Option<&Arc<TrafficPolicy>> {
        subset
            .and_then(|sub| self.subset_traffic.get(service)?.get(sub))
            .or_else(|| self.traffic.get(service))
    }
}

/// Who the waypoint is, for attaching policies and resolving short host names.
#[derive(Debug, Clone)]
pub struct WaypointIdentity {
    /// Its `istio.io/gateway-name` (the Gateway's name).
    pub gateway_name: String,
    /// Its namespace.
    pub namespace: String,
    /// Istio's root namespace (policies there apply mesh-wide).
    pub root_namespace: String,
    /// The cluster's DNS domain (`cluster.local`).
    pub domain: String,
}

impl WaypointIdentity {
    /// `reviews` (in `ns`), `reviews.ns`, `reviews.ns.svc` or the full name -> `ns/fqdn`.
    pub fn service_key(&self, host: &str, ns: &str) -> String {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        let parts: Vec<&str> = host.split('.').collect();
        let domain = &self.domain;
        match parts.len() {
            1 => format!("{ns}/{host}.{ns}.svc.{domain}"),
            2 => format!("{}/{host}.svc.{domain}", parts[1]),
            3 if parts[2] == "svc" => format!("{}/{host}.{domain}", parts[1]),
            _ => {
                let svc_ns = match parts.get(2) {
                    Some(&"svc") => parts[1],
                    _ => ns,
                };
                format!("{svc_ns}/{host}")
            }
        }
    }
}

/// Read a file or a folder of resources.
pub fn load(path: &Path, me: &WaypointIdentity) -> Result<L7Config, ResourceError> {
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| io_error(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(
                        p.extension().and_then(|e| e.to_str()),
                        Some("yaml" | "yml" | "json")
                    )
            })
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut b = Builder::default();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| io_error(&f, e))?;
        parse_into(&mut b, &text, &f.display().to_string(), me)?;
    }
    checked(b.finish(), &path.display().to_string())
}

/// Parse one file's text.
pub fn parse(text: &str, file: &str, me: &WaypointIdentity) -> Result<L7Config, ResourceError> {
    let mut b = Builder::default();
    parse_into(&mut b, text, file, me)?;
    checked(b.finish(), file)
}

/// Checks across resources: every CUSTOM policy names an external authorization provider of
/// the mesh config (which may come from any file).
fn checked(cfg: L7Config, file: &str) -> Result<L7Config, ResourceError> {
    use super::ext_authz::Provider;
    for p in &cfg.policies {
        let Some(name) = &p.provider else { continue };
        let why = match cfg.providers.iter().find(|x| x.name() == name) {
            Some(Provider::Http(_) | Provider::Grpc(_)) => continue,
            Some(Provider::Other { kind, .. }) => {
                format!("provider {name:?} is {kind}, not an envoyExtAuthzHttp or envoyExtAuthzGrpc provider")
            }
            None => format!(
                "no extension provider {name:?} in the mesh config (ConfigMap istio, data.mesh, extensionProviders)"
            ),
        };
        return Err(ResourceError {
            file: file.into(),
            resource: p.name.clone(),
            field: "spec.provider.name".into(),
            message: why,
        });
    }
    Ok(cfg)
}

fn io_error(p: &Path, e: std::io::Error) -> ResourceError {
    ResourceError {
        file: p.display().to_string(),
        resource: "-".into(),
        field: ".".into(),
        message: e.to_string(),
    }
}

/// Routes from VirtualServices keep their order; HTTPRoute rules are sorted by precedence.
#[derive(Default)]
struct Builder {
    vs: HashMap<String, Vec<Route>>,
    hr: HashMap<String, Vec<(RequestMatch, usize, Route)>>,
    cfg: L7Config,
}

impl Builder {
    fn finish(mut self) -> L7Config {
        for (svc, mut rules) in self.hr {
            // Each HTTPRoute rule is split per match, most specific first; ties keep file order.
            rules.sort_by(|a, b| {
                b.0.specificity()
                    .cmp(&a.0.specificity())
                    .then(a.1.cmp(&b.1))
            });
            let routes = self.cfg.routes.entry(svc).or_default();
            routes.extend(rules.into_iter().map(|(m, _, mut r)| {
                r.matches = vec![m];
                r
            }));
        }
        for (svc, routes) in self.vs {
            // A service with both: the VirtualService's rules first (Istio merges them
            // unpredictably; zring documents an order).
            let e = self.cfg.routes.entry(svc).or_default();
            let hr = std::mem::take(e);
            e.extend(routes);
            e.extend(hr);
        }
        self.cfg
    }
}

fn parse_into(
    b: &mut Builder,
    text: &str,
    file: &str,
    me: &WaypointIdentity,
) -> Result<(), ResourceError> {
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| ResourceError {
            file: file.into(),
            resource: format!("document {}", i + 1),
            field: ".".into(),
            message: e.to_string(),
        })?;
        if value.is_null() {
            continue;
        }
        let items = match value.get("kind").and_then(Value::as_str) {
            Some("List") => value
                .get("items")
                .and_then(Value::as_sequence)
                .cloned()
                .unwrap_or_default(),
            _ => vec![value],
        };
        for item in items {
            resource(b, item, file, i + 1, me)?;
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct Meta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

fn resource(
    b: &mut Builder,
    v: Value,
    file: &str,
    doc: usize,
    me: &WaypointIdentity,
) -> Result<(), ResourceError> {
    let kind = v
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let api = v
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let err = |resource: String, field: String, message: String| ResourceError {
        file: file.into(),
        resource,
        field,
        message,
    };
    if kind.is_empty() {
        return Err(err(
            format!("document {doc}"),
            "kind".into(),
            "missing: every resource needs a kind".into(),
        ));
    }
    let group = api.split('/').next().unwrap_or("");
    if api == "v1" && kind == "ConfigMap" {
        return mesh_config(b, &v, file, doc, me);
    }
    let ours = matches!(
        (group, kind.as_str()),
        ("networking.istio.io", "VirtualService" | "DestinationRule")
            | (
                "security.istio.io",
                "AuthorizationPolicy" | "RequestAuthentication"
            )
            | ("gateway.networking.k8s.io", "HTTPRoute")
    );
    if !ours {
        tracing::debug!(
            file,
            kind,
            api,
            "resource skipped: not an L7 resource of the waypoint"
        );
        return Ok(());
    }
    let meta: Meta =
        typed(v.get("metadata").cloned().unwrap_or(Value::Null)).map_err(|(f, m)| {
            err(
                format!("{kind} (document {doc})"),
                format!("metadata.{f}"),
                m,
            )
        })?;
    let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
    let name = format!("{kind} {ns}/{}", meta.name);
    let spec = v.get("spec").cloned().unwrap_or(Value::Null);
    let at = |f: String| format!("spec.{f}");
    match kind.as_str() {
        "VirtualService" => {
            let s: VsSpec = typed(spec).map_err(|(f, m)| err(name.clone(), at(f), m))?;
            virtual_service(b, s, &ns, &name, me).map_err(|(f, m)| err(name.clone(), at(f), m))?
        }
        "DestinationRule" => {
            let s: DrSpec = typed(spec).map_err(|(f, m)| err(name.clone(), at(f), m))?;
            let host = me.service_key(&s.host, &ns);
            destination_rule(b, s, host).map_err(|(f, m)| err(name.clone(), at(f), m))?;
        }
        "HTTPRoute" => {
            let s: HrSpec = typed(spec).map_err(|(f, m)| err(name.clone(), at(f), m))?;
            http_route(b, s, &ns, &name, me).map_err(|(f, m)| err(name.clone(), at(f), m))?
        }
        "AuthorizationPolicy" => {
            let s: super::policy::ApSpec =
                typed(spec).map_err(|(f, m)| err(name.clone(), at(f), m))?;
            let refs = s.target_refs.iter().chain(s.target_ref.as_ref()).collect();
            let target = attachment(s.selector.as_ref(), refs, &ns, me)
                .map_err(|(f, m)| err(name.clone(), at(f), m))?;
            let Some(target) = target else {
                tracing::debug!(policy = %name, "policy not attached to this waypoint; skipped");
                return Ok(());
            };
            let p = L7Policy::from_spec(name.clone(), ns.clone(), target, s)
                .map_err(|(f, m)| err(name.clone(), at(f), m))?;
            b.cfg.policies.push(p);
        }
        "RequestAuthentication" => {
            let s: super::jwt::RaSpec =
                typed(spec).map_err(|(f, m)| err(name.clone(), at(f), m))?;
            let refs = s.target_refs.iter().chain(s.target_ref.as_ref()).collect();
            let target = attachment(s.selector.as_ref(), refs, &ns, me)
                .map_err(|(f, m)| err(name.clone(), at(f), m))?;
            let Some(target) = target else {
                tracing::debug!(policy = %name, "RequestAuthentication not attached to this waypoint; skipped");
                return Ok(());
            };
            let a = super::jwt::RequestAuthn::from_spec(name.clone(), target, s)
                .map_err(|(f, m)| err(name.clone(), at(f), m))?;
            b.cfg.authn.push(a);
        }
        _ => {}
    }
    b.cfg.loaded.push(format!("{name} ({file})"));
    Ok(())
}

/// Istio's mesh config ConfigMap (`istio` in the root namespace): its extension providers.
/// Other ConfigMaps are skipped.
fn mesh_config(
    b: &mut Builder,
    v: &Value,
    file: &str,
    doc: usize,
    me: &WaypointIdentity,
) -> Result<(), ResourceError> {
    let meta = |k: &str| {
        v.get("metadata")
            .and_then(|m| m.get(k))
            .and_then(Value::as_str)
    };
    let ours =
        meta("name") == Some("istio") && meta("namespace").is_none_or(|n| n == me.root_namespace);
    if !ours {
        tracing::debug!(file, doc, "ConfigMap skipped: not Istio's mesh config");
        return Ok(());
    }
    let name = format!("ConfigMap {}/istio", me.root_namespace);
    let mesh = v
        .get("data")
        .and_then(|d| d.get("mesh"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let providers = super::ext_authz::providers(mesh).map_err(|(f, m)| ResourceError {
        file: file.into(),
        resource: name.clone(),
        field: format!("data.mesh.{f}"),
        message: m,
    })?;
    b.cfg.providers = providers;
    b.cfg.path_normalization = path_normalization(mesh).map_err(|m| ResourceError {
        file: file.into(),
        resource: name.clone(),
        field: "data.mesh.pathNormalization.normalization".into(),
        message: m,
    })?;
    b.cfg.loaded.push(format!("{name} ({file})"));
    Ok(())
}

/// `pathNormalization.normalization` of a mesh config's text (`BASE` when unset).
fn path_normalization(mesh: &str) -> Result<super::normalize::PathNormalization, String> {
    let v: Value = serde_yaml_ng::from_str(mesh).map_err(|e| e.to_string())?;
    match v
        .get("pathNormalization")
        .and_then(|p| p.get("normalization"))
    {
        None | Some(Value::Null) => Ok(Default::default()),
        Some(n) => super::normalize::PathNormalization::parse(
            n.as_str().ok_or_else(|| "not a string".to_string())?,
        ),
    }
}

/// Deserialize with the path of the field that failed.
fn typed<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let field = e.path().to_string();
        (field, e.into_inner().to_string())
    })
}

/// A duration as Istio writes them (`1.5s`, `100ms`) or Gateway API (`1h30m`, `500ms`).
pub fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let num = |t: &str| t.parse::<f64>().ok();
    if let Some(v) = s.strip_suffix("ms").and_then(num) {
        return crate::config::seconds(v / 1000.0, s);
    }
    if let Some(v) = s.strip_suffix('s').and_then(num) {
        return crate::config::seconds(v, s);
    }
    crate::config::duration_flag(s)
}

// --- Istio networking ---------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VsSpec {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    http: Vec<VsHttp>,
    #[serde(default)]
    tcp: Vec<Value>,
    #[serde(default)]
    tls: Vec<Value>,
    #[serde(default)]
    gateways: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VsHttp {
    #[serde(default, rename = "match")]
    matches: Vec<VsMatch>,
    #[serde(default)]
    route: Vec<VsRoute>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    retries: Option<VsRetries>,
    #[serde(default)]
    headers: Option<Value>,
    #[serde(default)]
    fault: Option<Value>,
    #[serde(default)]
    rewrite: Option<VsRewrite>,
    #[serde(default)]
    redirect: Option<VsRedirect>,
    #[serde(default)]
    mirror: Option<VsDestination>,
    #[serde(default)]
    mirror_percentage: Option<VsPercentage>,
    #[serde(default)]
    mirror_percent: Option<u32>,
    #[serde(default)]
    mirrors: Vec<VsMirror>,
    #[serde(default)]
    direct_response: Option<VsDirect>,
    #[serde(default)]
    cors_policy: Option<VsCors>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsCors {
    #[serde(default)]
    allow_origin: Vec<String>,
    #[serde(default)]
    allow_origins: Vec<IstioString>,
    #[serde(default)]
    allow_methods: Vec<String>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    #[serde(default)]
    max_age: Option<String>,
    #[serde(default)]
    allow_credentials: Option<bool>,
    #[serde(default)]
    unmatched_preflights: Option<String>,
}

/// A `corsPolicy`, checked; errors name the field below it. The deprecated `allowOrigin`
/// strings are exact origins, as Istio reads them.
fn vs_cors(c: VsCors) -> Result<Cors, (String, String)> {
    let mut origins: Vec<ValueMatch> = c.allow_origin.into_iter().map(ValueMatch::Exact).collect();
    for (i, o) in c.allow_origins.into_iter().enumerate() {
        origins.push(
            o.into_match()
                .map_err(|e| (format!("allowOrigins[{i}]"), e))?,
        );
    }
    let max_age = match c.max_age.as_deref() {
        None => None,
        Some(d) => {
            let secs = duration(d)
                .map_err(|e| ("maxAge".to_string(), e))?
                .as_secs();
            Some(http::HeaderValue::from(secs))
        }
    };
    let ignore_unmatched = match c.unmatched_preflights.as_deref() {
        None | Some("UNSPECIFIED") | Some("FORWARD") => false,
        Some("IGNORE") => true,
        Some(other) => {
            return Err((
                "unmatchedPreflights".into(),
                format!("{other:?}: FORWARD or IGNORE"),
            ))
        }
    };
    let list = |items: &[String], name: &str| cors::list(items).map_err(|e| (name.to_string(), e));
    Ok(Cors {
        origins,
        methods: list(&c.allow_methods, "allowMethods")?,
        headers: list(&c.allow_headers, "allowHeaders")?,
        expose: list(&c.expose_headers, "exposeHeaders")?,
        max_age,
        credentials: c.allow_credentials.unwrap_or(false),
        ignore_unmatched,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VsDirect {
    status: u16,
    #[serde(default)]
    body: Option<VsBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VsBody {
    #[serde(default)]
    string: Option<String>,
    #[serde(default)]
    bytes: Option<String>,
}

/// A `directResponse`, checked; errors name the field below it.
fn vs_direct(d: VsDirect) -> Result<DirectResponse, (String, String)> {
    use base64::Engine as _;
    if !(200..=599).contains(&d.status) {
        return Err((
            "status".into(),
            format!("{} is not between 200 and 599", d.status),
        ));
    }
    let body = match d.body {
        None => bytes::Bytes::new(),
        Some(VsBody {
            string: Some(s),
            bytes: None,
        }) => s.into(),
        Some(VsBody {
            string: None,
            bytes: Some(b),
        }) => base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .map_err(|e| ("body.bytes".to_string(), format!("not base64: {e}")))?
            .into(),
        Some(_) => return Err(("body".into(), "exactly one of string, bytes".into())),
    };
    if body.len() > DIRECT_BODY_LIMIT {
        return Err((
            "body".into(),
            format!("{} bytes; at most {DIRECT_BODY_LIMIT}", body.len()),
        ));
    }
    Ok(DirectResponse {
        status: d.status,
        body,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VsMirror {
    destination: VsDestination,
    #[serde(default)]
    percentage: Option<VsPercentage>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VsMatch {
    #[serde(default)]
    uri: Option<IstioString>,
    #[serde(default)]
    method: Option<IstioString>,
    #[serde(default)]
    authority: Option<IstioString>,
    #[serde(default)]
    headers: BTreeMap<String, IstioString>,
    #[serde(default)]
    query_params: BTreeMap<String, IstioString>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IstioString {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
}

impl IstioString {
    fn into_match(self) -> Result<ValueMatch, String> {
        match (self.exact, self.prefix, self.regex) {
            (Some(e), None, None) => Ok(ValueMatch::Exact(e)),
            (None, Some(p), None) => Ok(ValueMatch::Prefix(p)),
            (None, None, Some(r)) => regex_match(&r),
            _ => Err("exactly one of exact, prefix, regex".into()),
        }
    }
}

fn regex_match(r: &str) -> Result<ValueMatch, String> {
    regex::Regex::new(&format!("^(?:{r})$"))
        .map(ValueMatch::Regex)
        .map_err(|e| format!("bad regular expression {r:?}: {e}"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VsRoute {
    destination: VsDestination,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    headers: Option<Value>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VsDestination {
    host: String,
    #[serde(default)]
    subset: Option<String>,
    #[serde(default)]
    port: Option<VsPort>,
}

#[derive(Deserialize)]
struct VsPort {
    number: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VsRetries {
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    per_try_timeout: Option<String>,
    #[serde(default)]
    retry_on: Option<String>,
}

fn unsupported(rest: &BTreeMap<String, Value>, at: &str) -> Result<(), (String, String)> {
    // Fields that only describe, or select what this waypoint never sees.
    const HARMLESS: &[&str] = &[
        "name",
        "sourceLabels",
        "sourceNamespace",
        "gateways",
        "ignoreUriCase",
    ];
    match rest.keys().find(|k| !HARMLESS.contains(&k.as_str())) {
        Some(k) => Err((
            format!("{at}.{k}"),
            "not supported by zring's waypoint (refused rather than ignored)".into(),
        )),
        None => Ok(()),
    }
}

fn virtual_service(
    b: &mut Builder,
    s: VsSpec,
    ns: &str,
    name: &str,
    me: &WaypointIdentity,
) -> Result<(), (String, String)> {
    if s.hosts.is_empty() {
        return Err(("hosts".into(), "at least one host".into()));
    }
    if !s.tcp.is_empty() || !s.tls.is_empty() {
        return Err((
            if s.tcp.is_empty() { "tls" } else { "tcp" }.into(),
            "TCP/TLS routes are not supported by zring's waypoint".into(),
        ));
    }
    if !s.gateways.is_empty() && !s.gateways.iter().any(|g| g == "mesh") {
        tracing::debug!(
            resource = name,
            "VirtualService bound to gateways only; skipped"
        );
        return Ok(());
    }
    let mut routes = Vec::new();
    for (i, h) in s.http.into_iter().enumerate() {
        let at = format!("http[{i}]");
        unsupported(&h.rest, &at)?;
        let mut matches = Vec::new();
        for (j, m) in h.matches.into_iter().enumerate() {
            let mat = format!("{at}.match[{j}]");
            unsupported(&m.rest, &mat)?;
            let f = |what: &str, e: String| (format!("{mat}.{what}"), e);
            matches.push(RequestMatch {
                path: m
                    .uri
                    .map(|u| u.into_match().map(PathMatch::Value))
                    .transpose()
                    .map_err(|e| f("uri", e))?,
                method: m
                    .method
                    .map(IstioString::into_match)
                    .transpose()
                    .map_err(|e| f("method", e))?,
                authority: m
                    .authority
                    .map(IstioString::into_match)
                    .transpose()
                    .map_err(|e| f("authority", e))?,
                headers: m
                    .headers
                    .into_iter()
                    .map(|(k, v)| Ok((k.to_ascii_lowercase(), v.into_match()?)))
                    .collect::<Result<_, String>>()
                    .map_err(|e| f("headers", e))?,
                query: m
                    .query_params
                    .into_iter()
                    .map(|(k, v)| Ok((k, v.into_match()?)))
                    .collect::<Result<_, String>>()
                    .map_err(|e| f("queryParams", e))?,
                port: m.port,
            });
        }
        let redirect = match h.redirect {
            None => None,
            Some(r) => {
                Some(Arc::new(vs_redirect(r).map_err(|(f, e)| {
                    (below(&format!("{at}.redirect"), &f), e)
                })?))
            }
        };
        let direct = match h.direct_response {
            None => None,
            Some(d) => {
                Some(Arc::new(vs_direct(d).map_err(|(f, e)| {
                    (below(&format!("{at}.directResponse"), &f), e)
                })?))
            }
        };
        match (!h.route.is_empty(), redirect.is_some(), direct.is_some()) {
            (false, false, false) => {
                return Err((format!("{at}.route"), "at least one destination".into()))
            }
            (true, true, _) => {
                return Err((
                    format!("{at}.redirect"),
                    "a rule has a route or a redirect, not both".into(),
                ))
            }
            (true, _, true) | (_, true, true) => {
                return Err((
                    format!("{at}.directResponse"),
                    "a rule with a directResponse has no route or redirect".into(),
                ))
            }
            _ => {}
        }
        let single = h.route.len() == 1;
        let mut backends = Vec::new();
        for (j, r) in h.route.into_iter().enumerate() {
            let rat = format!("{at}.route[{j}]");
            const ROUTE_HARMLESS: &[&str] = &[];
            if let Some(k) = r
                .rest
                .keys()
                .find(|k| !ROUTE_HARMLESS.contains(&k.as_str()))
            {
                return Err((
                    format!("{rat}.{k}"),
                    "not supported by zring's waypoint (refused rather than ignored)".into(),
                ));
            }
            backends.push(Backend {
                service: me.service_key(&r.destination.host, ns),
                port: r.destination.port.map(|p| p.number),
                subset: r.destination.subset,
                // Istio: a lone destination takes all; otherwise an unset weight is 0.
                weight: r.weight.unwrap_or(if single { 100 } else { 0 }),
                headers: vs_headers(r.headers)
                    .map_err(|(f, e)| (below(&format!("{rat}.headers"), &f), e))?,
            });
        }
        if redirect.is_none() && direct.is_none() && backends.iter().all(|b| b.weight == 0) {
            return Err((format!("{at}.route"), "the weights add up to 0".into()));
        }
        let timeout = h
            .timeout
            .as_deref()
            .map(duration)
            .transpose()
            .map_err(|e| (format!("{at}.timeout"), e))?;
        let retry = match h.retries {
            None => RetryPolicy::default(),
            Some(r) => vs_retry(r).map_err(|(f, e)| (format!("{at}.retries.{f}"), e))?,
        };
        let headers =
            vs_headers(h.headers).map_err(|(f, e)| (below(&format!("{at}.headers"), &f), e))?;
        let fault = h
            .fault
            .map(vs_fault)
            .transpose()
            .map_err(|(f, e)| (below(&format!("{at}.fault"), &f), e))?
            .map(Arc::new);
        let rewrite = match h.rewrite {
            None => None,
            Some(r) => {
                let rat = format!("{at}.rewrite");
                let regex = match r.uri_regex_rewrite {
                    None => None,
                    Some(_) if r.uri.is_some() => {
                        return Err((
                            format!("{rat}.uriRegexRewrite"),
                            "uri and uriRegexRewrite are exclusive".into(),
                        ))
                    }
                    Some(x) => Some(PathRewrite::Regex(
                        headers::RegexRewrite::new(&x.pattern, &x.rewrite)
                            .map_err(|e| (format!("{rat}.uriRegexRewrite.match"), e))?,
                    )),
                };
                if r.uri.is_some()
                    && matches
                        .iter()
                        .any(|m| matches!(m.path, Some(PathMatch::Value(ValueMatch::Regex(_)))))
                {
                    return Err((
                        format!("{rat}.uri"),
                        "a prefix rewrite needs exact or prefix uri matches, not regex".into(),
                    ));
                }
                Some(Arc::new(Rewrite {
                    path: r.uri.map(PathRewrite::Prefix).or(regex),
                    authority: r.authority,
                }))
            }
        };
        let mirrors = vs_mirrors(
            me,
            ns,
            (h.mirror, h.mirror_percentage, h.mirror_percent),
            h.mirrors,
        )
        .map_err(|(f, e)| (below(&at, &f), e))?;
        if (redirect.is_some() || direct.is_some()) && !mirrors.is_empty() {
            return Err((
                format!(
                    "{at}.{}",
                    if direct.is_some() {
                        "directResponse"
                    } else {
                        "redirect"
                    }
                ),
                "a local answer goes nowhere to mirror from".into(),
            ));
        }
        let cors = h
            .cors_policy
            .map(vs_cors)
            .transpose()
            .map_err(|(f, e)| (below(&format!("{at}.corsPolicy"), &f), e))?
            .map(Arc::new);
        routes.push(Route {
            origin: format!("{name} http[{i}]"),
            matches,
            backends,
            timeout,
            retry,
            headers,
            fault,
            rewrite,
            redirect,
            direct,
            mirrors,
            cors,
        });
    }
    for h in &s.hosts {
        if h == "*" || h.starts_with("*.") {
            return Err((
                "hosts".into(),
                format!("wildcard host {h:?} is not supported"),
            ));
        }
        b.vs.entry(me.service_key(h, ns))
            .or_default()
            .extend(routes.iter().cloned());
    }
    Ok(())
}

/// A VirtualService rule's `mirror` (with `mirrorPercentage`, or the deprecated integer
/// `mirrorPercent`; neither: every request, as Istio reads it) or its `mirrors` list.
fn vs_mirrors(
    me: &WaypointIdentity,
    ns: &str,
    (one, share, legacy): (Option<VsDestination>, Option<VsPercentage>, Option<u32>),
    list: Vec<VsMirror>,
) -> Result<Vec<Mirror>, (String, String)> {
    let checked = |p: Option<VsPercentage>, at: &str| -> Result<f64, (String, String)> {
        let v = p.map_or(100.0, |p| p.value);
        match (0.0..=100.0).contains(&v) {
            true => Ok(v),
            false => Err((at.into(), format!("{v} is not between 0 and 100"))),
        }
    };
    let mirror = |d: VsDestination, share: f64| {
        Mirror::to(
            me.service_key(&d.host, ns),
            d.port.map(|p| p.number),
            d.subset,
            share,
        )
    };
    match one {
        Some(_) if !list.is_empty() => {
            Err(("mirrors".into(), "mirror and mirrors are exclusive".into()))
        }
        Some(d) => {
            let share = match (share, legacy) {
                (None, Some(n)) => checked(
                    Some(VsPercentage {
                        value: f64::from(n),
                    }),
                    "mirrorPercent",
                )?,
                (p, _) => checked(p, "mirrorPercentage.value")?,
            };
            Ok(vec![mirror(d, share)])
        }
        None if share.is_some() || legacy.is_some() => Err((
            if share.is_some() {
                "mirrorPercentage"
            } else {
                "mirrorPercent"
            }
            .into(),
            "a share of requests with no mirror to send them to".into(),
        )),
        None => list
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let share = checked(m.percentage, &format!("mirrors[{i}].percentage.value"))?;
                Ok(mirror(m.destination, share))
            })
            .collect(),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsRedirect {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    derive_port: Option<String>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    redirect_code: Option<u16>,
}

/// A VirtualService `redirect`: `uri` replaces the whole path (Istio), `authority` the host and
/// port, `port` or `derivePort` the port; default code 301.
fn vs_redirect(r: VsRedirect) -> Result<Redirect, (String, String)> {
    let code = r.redirect_code.unwrap_or(301);
    if !REDIRECT_CODES.contains(&code) {
        return Err((
            "redirectCode".into(),
            format!("{code} is not one of {REDIRECT_CODES:?}"),
        ));
    }
    if let Some(p) = r.uri.as_deref().filter(|p| !p.starts_with('/')) {
        return Err(("uri".into(), format!("{p:?} is not a path")));
    }
    // `authority` may carry a port; `port` / `derivePort` override it.
    let (host, auth_port) = match r.authority.as_deref().map(headers::split_authority) {
        Some((h, p)) => (Some(h.to_string()), p),
        None => (None, None),
    };
    let port = match (r.port, r.derive_port.as_deref(), auth_port) {
        (Some(p), None, _) => RedirectPort::Set(p),
        (None, Some("FROM_PROTOCOL_DEFAULT"), _) => RedirectPort::Default,
        (None, Some("FROM_REQUEST_PORT") | None, None) => RedirectPort::Keep,
        (None, None, Some(p)) => RedirectPort::Set(p),
        (None, Some("FROM_REQUEST_PORT"), Some(_)) => RedirectPort::Keep,
        (Some(_), Some(_), _) => {
            return Err(("port".into(), "port and derivePort are exclusive".into()))
        }
        (None, Some(other), _) => {
            return Err((
                "derivePort".into(),
                format!("{other:?}: FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT"),
            ))
        }
    };
    if let Some(s) = r
        .scheme
        .as_deref()
        .filter(|s| !matches!(*s, "http" | "https"))
    {
        return Err(("scheme".into(), format!("{s:?}: http or https")));
    }
    Ok(Redirect {
        scheme: r.scheme,
        host,
        port,
        path: r.uri.map(PathRewrite::Full),
        code,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsRewrite {
    #[serde(default)]
    uri: Option<String>,
    #[serde(default)]
    authority: Option<String>,
    #[serde(default)]
    uri_regex_rewrite: Option<VsRegexRewrite>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsRegexRewrite {
    #[serde(rename = "match")]
    pattern: String,
    rewrite: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsFault {
    #[serde(default)]
    delay: Option<VsDelay>,
    #[serde(default)]
    abort: Option<VsAbort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsDelay {
    #[serde(default)]
    fixed_delay: Option<String>,
    #[serde(default)]
    exponential_delay: Option<String>,
    #[serde(default)]
    percentage: Option<VsPercentage>,
    #[serde(default)]
    percent: Option<i32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct VsAbort {
    #[serde(default)]
    http_status: Option<i64>,
    #[serde(default)]
    grpc_status: Option<String>,
    #[serde(default)]
    http2_error: Option<String>,
    #[serde(default)]
    percentage: Option<VsPercentage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VsPercentage {
    #[serde(default)]
    value: f64,
}

/// gRPC status codes by the names Istio's `grpcStatus` takes.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// A percentage: `percentage.value` (0-100), else the deprecated integer `percent`; neither
/// means no request, as Istio reads it.
fn percentage(
    p: Option<VsPercentage>,
    legacy: Option<i32>,
    at: &str,
) -> Result<f64, (String, String)> {
    let v = match (p, legacy) {
        (Some(p), _) => p.value,
        (None, Some(n)) => f64::from(n),
        (None, None) => 0.0,
    };
    if !(0.0..=100.0).contains(&v) {
        return Err((
            format!("{at}.percentage.value"),
            format!("{v} is not between 0 and 100"),
        ));
    }
    Ok(v)
}

/// A VirtualService `fault` block, checked; errors name the field below `fault`.
fn vs_fault(v: Value) -> Result<Fault, (String, String)> {
    let f: VsFault = serde_yaml_ng::from_value(v).map_err(|e| (String::new(), e.to_string()))?;
    let delay = match f.delay {
        None => None,
        Some(d) => {
            if d.exponential_delay.is_some() {
                return Err((
                    "delay.exponentialDelay".into(),
                    "not supported by zring's waypoint (refused rather than ignored)".into(),
                ));
            }
            let Some(fixed) = d.fixed_delay else {
                return Err(("delay.fixedDelay".into(), "missing".into()));
            };
            let fixed = duration(&fixed).map_err(|e| ("delay.fixedDelay".to_string(), e))?;
            Some((fixed, percentage(d.percentage, d.percent, "delay")?))
        }
    };
    let abort = match f.abort {
        None => None,
        Some(a) => {
            if a.http2_error.is_some() {
                return Err((
                    "abort.http2Error".into(),
                    "not supported by zring's waypoint (refused rather than ignored)".into(),
                ));
            }
            let how = match (a.http_status, a.grpc_status) {
                (Some(c), None) if (200..=599).contains(&c) => Abort::Http(c as u16),
                (Some(c), None) => {
                    return Err((
                        "abort.httpStatus".into(),
                        format!("{c} is not an HTTP status (200-599)"),
                    ))
                }
                (None, Some(g)) => match GRPC_CODES.iter().position(|n| *n == g) {
                    Some(code) => Abort::Grpc(code as u32),
                    None => {
                        return Err((
                            "abort.grpcStatus".into(),
                            format!("unknown gRPC status {g:?}"),
                        ))
                    }
                },
                _ => {
                    return Err((
                        "abort".into(),
                        "exactly one of httpStatus, grpcStatus".into(),
                    ))
                }
            };
            Some((how, percentage(a.percentage, None, "abort")?))
        }
    };
    if delay.is_none() && abort.is_none() {
        return Err((String::new(), "a delay or an abort".into()));
    }
    Ok(Fault { delay, abort })
}

/// `field` below `at` (`at` itself when the error is about the whole block).
fn below(at: &str, field: &str) -> String {
    match field {
        "" => at.to_string(),
        f => format!("{at}.{f}"),
    }
}

/// A VirtualService `headers` block, checked.
fn vs_headers(v: Option<Value>) -> Result<Arc<HeaderRules>, (String, String)> {
    let Some(v) = v else {
        return Ok(Arc::default());
    };
    let h: VsHeaders = serde_yaml_ng::from_value(v).map_err(|e| (String::new(), e.to_string()))?;
    h.rules().map(Arc::new)
}

fn vs_retry(r: VsRetries) -> Result<RetryPolicy, (String, String)> {
    let mut p = RetryPolicy {
        attempts: r.attempts,
        per_try_timeout: r
            .per_try_timeout
            .as_deref()
            .map(duration)
            .transpose()
            .map_err(|e| ("perTryTimeout".to_string(), e))?,
        codes: Vec::new(),
        on_connect_failure: false,
        backoff: Duration::from_millis(25),
    };
    let on = r
        .retry_on
        .unwrap_or_else(|| "connect-failure,refused-stream,unavailable,cancelled,503".into());
    for item in on.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item {
            "5xx" => p.codes.extend(500..=599),
            "gateway-error" => p.codes.extend([502, 503, 504]),
            "connect-failure" | "refused-stream" | "reset" | "reset-before-request" => {
                p.on_connect_failure = true
            }
            "retriable-status-codes"
            | "unavailable"
            | "cancelled"
            | "deadline-exceeded"
            | "resource-exhausted"
            | "internal"
            | "retriable-4xx" => {}
            code => match code.parse::<u16>() {
                Ok(c) if (100..600).contains(&c) => p.codes.push(c),
                _ => {
                    return Err((
                        "retryOn".into(),
                        format!("unknown retry condition {code:?}"),
                    ))
                }
            },
        }
    }
    Ok(p)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DrSpec {
    host: String,
    #[serde(default)]
    subsets: Vec<DrSubset>,
    #[serde(default)]
    traffic_policy: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct DrSubset {
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    traffic_policy: Option<Value>,
}

/// A DestinationRule: its subsets' labels, and its traffic policies (a subset's over the
/// rule's).
fn destination_rule(b: &mut Builder, s: DrSpec, host: String) -> Result<(), (String, String)> {
    let dr = match s.traffic_policy {
        Some(v) => traffic::parse("trafficPolicy", v)?,
        None => TrafficPolicy::default(),
    };
    for (i, sub) in s.subsets.into_iter().enumerate() {
        if let Some(v) = sub.traffic_policy {
            let own = traffic::parse(&format!("subsets[{i}].trafficPolicy"), v)?;
            let mut merged = dr.overridden_by(&own);
            merged.destination = format!("{host}#{}", sub.name);
            b.cfg
                .subset_traffic
                .entry(host.clone())
                .or_default()
                .insert(sub.name.clone(), Arc::new(merged));
        }
        b.cfg.subsets.insert((host.clone(), sub.name), sub.labels);
    }
    if dr != TrafficPolicy::default() {
        let mut dr = dr;
        dr.destination = host.clone();
        b.cfg.traffic.insert(host, Arc::new(dr));
    }
    Ok(())
}

// --- Gateway API ------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HrSpec {
    #[serde(default)]
    parent_refs: Vec<ObjectRef>,
    #[serde(default)]
    rules: Vec<HrRule>,
}

/// A Gateway API reference to an object (a `parentRef`, a `RequestMirror`'s `backendRef`).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ObjectRef {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HrRule {
    #[serde(default)]
    matches: Vec<HrMatch>,
    #[serde(default)]
    backend_refs: Vec<BackendRef>,
    #[serde(default)]
    timeouts: Option<HrTimeouts>,
    #[serde(default)]
    retry: Option<HrRetry>,
    #[serde(default)]
    filters: Vec<Value>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct HrMatch {
    #[serde(default)]
    path: Option<HrPath>,
    #[serde(default)]
    headers: Vec<HrNameValue>,
    #[serde(default)]
    query_params: Vec<HrNameValue>,
    #[serde(default)]
    method: Option<String>,
}

#[derive(Deserialize)]
struct HrPath {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Deserialize)]
struct HrNameValue {
    name: String,
    value: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct BackendRef {
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    filters: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HrTimeouts {
    #[serde(default)]
    request: Option<String>,
    #[serde(default)]
    backend_request: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HrRetry {
    #[serde(default)]
    attempts: Option<u32>,
    #[serde(default)]
    codes: Vec<u16>,
    #[serde(default)]
    backoff: Option<String>,
}

/// Whether a reference's group and kind name a core `Service` (both may be left out).
pub(crate) fn core_service(group: &Option<String>, kind: &Option<String>) -> bool {
    matches!(group.as_deref(), None | Some("") | Some("core"))
        && matches!(kind.as_deref(), None | Some("Service"))
}

fn http_route(
    b: &mut Builder,
    s: HrSpec,
    ns: &str,
    name: &str,
    me: &WaypointIdentity,
) -> Result<(), (String, String)> {
    // Mesh routes attach to Services; a route for an ingress Gateway is not the waypoint's.
    let mut parents = Vec::new();
    for (i, p) in s.parent_refs.iter().enumerate() {
        let pns = p.namespace.as_deref().unwrap_or(ns);
        match p.kind.as_deref() {
            Some("Service") if core_service(&p.group, &p.kind) => {
                parents.push((format!("{pns}/{}.{pns}.svc.{}", p.name, me.domain), p.port))
            }
            Some("Service") => {
                return Err((
                    format!("parentRefs[{i}].group"),
                    "a Service's group is \"\"".into(),
                ))
            }
            _ => {
                tracing::debug!(resource = name, parent = %p.name, "HTTPRoute parent is not a Service; skipped")
            }
        }
    }
    if parents.is_empty() {
        return Ok(());
    }
    for (i, rule) in s.rules.into_iter().enumerate() {
        let at = format!("rules[{i}]");
        let filters = headers::gateway_filters(&rule.filters, true)
            .map_err(|(f, e)| (format!("{at}.filters{f}"), e))?;
        let rule_headers = Arc::new(filters.headers);
        let rewrite = filters.rewrite.map(Arc::new);
        let redirect = filters.redirect.map(Arc::new);
        let cors = filters.cors.map(Arc::new);
        if redirect.is_some() && !filters.mirrors.is_empty() {
            return Err((
                format!("{at}.filters"),
                "a local answer goes nowhere to mirror from".into(),
            ));
        }
        let mirrors: Vec<Mirror> = filters
            .mirrors
            .into_iter()
            .map(|m| {
                let mns = m.namespace.as_deref().unwrap_or(ns);
                Mirror::to(
                    format!("{mns}/{}.{mns}.svc.{}", m.name, me.domain),
                    m.port,
                    None,
                    m.share,
                )
            })
            .collect();
        let mut backends = Vec::new();
        for (j, br) in rule.backend_refs.iter().enumerate() {
            let bat = format!("{at}.backendRefs[{j}]");
            if !core_service(&br.group, &br.kind) {
                return Err((
                    format!("{bat}.kind"),
                    "only Service backends are supported".into(),
                ));
            }
            let bns = br.namespace.as_deref().unwrap_or(ns);
            backends.push(Backend {
                service: format!("{bns}/{}.{bns}.svc.{}", br.name, me.domain),
                port: br.port,
                subset: None,
                weight: br.weight.unwrap_or(1),
                headers: headers::gateway_filters(&br.filters, false)
                    .map(|f| Arc::new(f.headers))
                    .map_err(|(f, e)| (format!("{bat}.filters{f}"), e))?,
            });
        }
        let timeout = match &rule.timeouts {
            Some(t) => t
                .request
                .as_deref()
                .or(t.backend_request.as_deref())
                .map(duration)
                .transpose()
                .map_err(|e| (format!("{at}.timeouts.request"), e))?,
            None => None,
        };
        let retry = match &rule.retry {
            None => RetryPolicy::default(),
            Some(r) => RetryPolicy {
                attempts: r.attempts.unwrap_or(2),
                per_try_timeout: None,
                codes: r.codes.clone(),
                on_connect_failure: true,
                backoff: r
                    .backoff
                    .as_deref()
                    .map(duration)
                    .transpose()
                    .map_err(|e| (format!("{at}.retry.backoff"), e))?
                    .unwrap_or(Duration::from_millis(25)),
            },
        };
        let matches = if rule.matches.is_empty() {
            vec![HrMatch::default()]
        } else {
            rule.matches
        };
        for (j, m) in matches.into_iter().enumerate() {
            let mat = format!("{at}.matches[{j}]");
            let rm = hr_match(m).map_err(|(f, e)| (format!("{mat}.{f}"), e))?;
            let segments = rewrite
                .as_ref()
                .is_some_and(|r| matches!(r.path, Some(PathRewrite::Segments(_))))
                || redirect
                    .as_ref()
                    .is_some_and(|r| matches!(r.path, Some(PathRewrite::Segments(_))));
            if segments && !matches!(rm.path, None | Some(PathMatch::SegmentPrefix(_))) {
                return Err((
                    format!("{mat}.path"),
                    "ReplacePrefixMatch needs a PathPrefix match".into(),
                ));
            }
            for (svc, port) in &parents {
                let mut rm = rm.clone();
                rm.port = *port;
                let route = Route {
                    origin: format!("{name} rules[{i}]"),
                    matches: Vec::new(),
                    // No backends: Gateway API answers 500 for such a rule.
                    backends: backends.clone(),
                    timeout,
                    retry: retry.clone(),
                    headers: rule_headers.clone(),
                    fault: None,
                    rewrite: rewrite.clone(),
                    redirect: redirect.clone(),
                    direct: None,
                    mirrors: mirrors.clone(),
                    cors: cors.clone(),
                };
                let order = b.hr.get(svc).map_or(0, Vec::len);
                b.hr.entry(svc.clone())
                    .or_default()
                    .push((rm, order, route));
            }
        }
    }
    Ok(())
}

fn hr_match(m: HrMatch) -> Result<RequestMatch, (String, String)> {
    let value = |kind: Option<&str>, v: String, f: &str| -> Result<ValueMatch, (String, String)> {
        match kind.unwrap_or("Exact") {
            "Exact" => Ok(ValueMatch::Exact(v)),
            "RegularExpression" => regex_match(&v).map_err(|e| (f.to_string(), e)),
            other => Err((format!("{f}.type"), format!("unknown match type {other:?}"))),
        }
    };
    let path = match m.path {
        None => None,
        Some(p) => {
            let v = p.value.unwrap_or_else(|| "/".into());
            Some(match p.kind.as_deref().unwrap_or("PathPrefix") {
                "PathPrefix" => PathMatch::SegmentPrefix(v),
                "Exact" => PathMatch::Value(ValueMatch::Exact(v)),
                "RegularExpression" => {
                    PathMatch::Value(regex_match(&v).map_err(|e| ("path.value".to_string(), e))?)
                }
                other => {
                    return Err((
                        "path.type".into(),
                        format!("unknown path match type {other:?}"),
                    ))
                }
            })
        }
    };
    let mut headers = Vec::new();
    for (i, h) in m.headers.into_iter().enumerate() {
        let f = format!("headers[{i}]");
        headers.push((
            h.name.to_ascii_lowercase(),
            value(h.kind.as_deref(), h.value, &f)?,
        ));
    }
    let mut query = Vec::new();
    for (i, q) in m.query_params.into_iter().enumerate() {
        let f = format!("queryParams[{i}]");
        query.push((q.name, value(q.kind.as_deref(), q.value, &f)?));
    }
    Ok(RequestMatch {
        path,
        method: m.method.map(ValueMatch::Exact),
        headers,
        query,
        authority: None,
        port: None,
    })
}

// --- AuthorizationPolicy attachment -------------------------------------------------------

/// Which traffic of this waypoint a policy applies to, if any: `selector` on the waypoint's
/// `istio.io/gateway-name` (the seeds' form), `targetRefs` to its Gateway (all of its traffic)
/// or to a Service (traffic to that service), or the `istio-waypoint` GatewayClass from the
/// root namespace (every waypoint).
fn attachment(
    selector: Option<&super::policy::Selector>,
    refs: Vec<&super::policy::TargetRef>,
    ns: &str,
    me: &WaypointIdentity,
) -> Result<Option<PolicyTarget>, (String, String)> {
    let same_ns = ns == me.namespace || ns == me.root_namespace;
    if !refs.is_empty() && selector.is_some() {
        return Err((
            "selector".into(),
            "selector and targetRefs are exclusive".into(),
        ));
    }
    if let Some(sel) = selector {
        let labels = &sel.match_labels;
        return Ok(match (same_ns, labels.get("istio.io/gateway-name")) {
            (true, Some(g)) if g == &me.gateway_name && labels.len() == 1 => {
                Some(PolicyTarget::All)
            }
            _ => None,
        });
    }
    let mut services = Vec::new();
    for (i, r) in refs.iter().enumerate() {
        match (r.group.as_deref().unwrap_or(""), r.kind.as_str()) {
            ("gateway.networking.k8s.io", "Gateway") if ns == me.namespace => {
                if r.name == me.gateway_name {
                    return Ok(Some(PolicyTarget::All));
                }
            }
            ("gateway.networking.k8s.io", "GatewayClass") if ns == me.root_namespace => {
                if r.name == "istio-waypoint" {
                    return Ok(Some(PolicyTarget::All));
                }
            }
            ("gateway.networking.k8s.io", "Gateway" | "GatewayClass") => {}
            ("" | "core", "Service") => {
                services.push(format!("{ns}/{}.{ns}.svc.{}", r.name, me.domain));
            }
            ("networking.istio.io", "ServiceEntry") => {
                return Err((
                    format!("targetRefs[{i}]"),
                    "ServiceEntry targets are not supported".into(),
                ))
            }
            (g, k) => {
                return Err((
                    format!("targetRefs[{i}]"),
                    format!("unknown target {k} in group {g:?}"),
                ))
            }
        }
    }
    Ok((!services.is_empty()).then_some(PolicyTarget::Services(services)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> WaypointIdentity {
        WaypointIdentity {
            gateway_name: "bookinfo-reviews".into(),
            namespace: "default".into(),
            root_namespace: "istio-system".into(),
            domain: "cluster.local".into(),
        }
    }

    /// A route's header match sees a repeated header's values joined with commas, as
    /// Envoy's router: never only the first one.
    #[test]
    fn route_header_matches_see_repeated_headers_joined() {
        let m = RequestMatch {
            headers: vec![("x-role".into(), ValueMatch::Exact("user".into()))],
            ..Default::default()
        };
        let view = |h: &http::HeaderMap| {
            m.matches(&RequestView {
                method: "GET",
                path: "/",
                query: None,
                headers: h,
                authority: "reviews",
                port: 9080,
            })
        };
        let mut h = http::HeaderMap::new();
        h.append("x-role", "user".parse().unwrap());
        assert!(view(&h));
        h.append("x-role", "admin".parse().unwrap());
        assert!(!view(&h), "user,admin is not user");
        let joined = RequestMatch {
            headers: vec![("x-role".into(), ValueMatch::Exact("user,admin".into()))],
            ..Default::default()
        };
        assert!(joined.matches(&RequestView {
            method: "GET",
            path: "/",
            query: None,
            headers: &h,
            authority: "reviews",
            port: 9080,
        }));
    }

    /// Robustness: a duration no deadline can hold is refused with its source and field, and
    /// a mesh config's path normalisation is read (and a bad one refused).
    #[test]
    fn unrepresentable_durations_and_bad_normalisations_are_refused_by_name() {
        for t in [
            "1e20s",
            "1e300ms",
            "200000000000s",
            "-1s",
            "nans",
            "1000000y",
        ] {
            let vs = format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: r, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n  - timeout: {t}\n    route:\n    - destination: {{host: reviews}}\n");
            let e = parse(&vs, "vs.yaml", &me()).unwrap_err().to_string();
            assert!(
                e.contains("vs.yaml")
                    && e.contains("VirtualService default/r")
                    && e.contains("timeout"),
                "{t}: {e}"
            );
        }
        assert_eq!(duration("1.5s"), Ok(Duration::from_millis(1500)));
        let mesh = |n: &str| {
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |-\n    pathNormalization:\n      normalization: {n}\n")
        };
        let c = parse(&mesh("MERGE_SLASHES"), "m.yaml", &me()).unwrap();
        assert_eq!(
            c.path_normalization,
            super::super::normalize::PathNormalization::MergeSlashes
        );
        let e = parse(&mesh("SOMETIMES"), "m.yaml", &me())
            .unwrap_err()
            .to_string();
        assert!(e.contains("pathNormalization.normalization"), "{e}");
    }

    #[test]
    fn short_and_long_hosts_name_one_service() {
        let m = me();
        for h in [
            "reviews",
            "reviews.default",
            "reviews.default.svc",
            "reviews.default.svc.cluster.local",
        ] {
            assert_eq!(
                m.service_key(h, "default"),
                "default/reviews.default.svc.cluster.local",
                "{h}"
            );
        }
        assert_eq!(
            m.service_key("ratings.other", "default"),
            "other/ratings.other.svc.cluster.local"
        );
    }

    #[test]
    fn custom_policies_need_an_ext_authz_provider_of_the_mesh_config() {
        let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext-authz, namespace: default}\nspec:\n  selector: {matchLabels: {istio.io/gateway-name: bookinfo-reviews}}\n  action: CUSTOM\n  provider: {name: sample-ext-authz-http}\n  rules:\n  - to: [{operation: {paths: [/headers]}}]\n";
        let e = parse(policy, "p.yaml", &me()).unwrap_err().to_string();
        assert!(
            e.contains("AuthorizationPolicy default/ext-authz: spec.provider.name: no extension provider \"sample-ext-authz-http\""),
            "{e}"
        );
        let mesh = |provider: &str| {
            format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |-\n    extensionProviders:\n    - name: sample-ext-authz-http\n      {provider}:\n        service: ext-authz.foo.svc.cluster.local\n        port: \"8000\"\n---\n{policy}")
        };
        let c = parse(&mesh("envoyExtAuthzHttp"), "p.yaml", &me()).unwrap();
        assert_eq!(c.providers.len(), 1);
        assert_eq!(
            c.policies[0].provider.as_deref(),
            Some("sample-ext-authz-http")
        );
        assert!(parse(&mesh("envoyExtAuthzGrpc"), "p.yaml", &me()).is_ok());
        let e = parse(&mesh("envoyOtelAls"), "p.yaml", &me())
            .unwrap_err()
            .to_string();
        assert!(e.contains("is envoyOtelAls, not an"), "{e}");
        let other = mesh("envoyExtAuthzHttp").replace("name: istio,", "name: other,");
        assert!(
            parse(&other, "p.yaml", &me()).is_err(),
            "only the istio ConfigMap counts"
        );
    }

    #[test]
    fn errors_name_the_file_resource_and_field() {
        let bad = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: default}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews, subset: v1}\n      weight: ten\n";
        let e = parse(bad, "r.yaml", &me()).unwrap_err().to_string();
        assert!(
            e.starts_with("r.yaml: VirtualService default/reviews: spec.http[0].route[0].weight:"),
            "{e}"
        );
        let fault = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - fault: {abort: {httpStatus: 500}}\n    route:\n    - destination: {host: reviews}\n";
        let c = parse(fault, "f.yaml", &me()).unwrap();
        let f = c.routes["default/reviews.default.svc.cluster.local"][0]
            .fault
            .clone()
            .unwrap();
        assert_eq!(
            *f,
            Fault {
                delay: None,
                abort: Some((Abort::Http(500), 0.0))
            },
            "no percentage: no request, as Istio reads it"
        );
        for (bad, want) in [
            (
                "{abort: {httpStatus: 500}}",
                "{delay: {exponentialDelay: 1s, percentage: {value: 5}}}",
            ),
            (
                "{abort: {httpStatus: 500}}",
                "{abort: {http2Error: REFUSED_STREAM}}",
            ),
            ("{abort: {httpStatus: 500}}", "{abort: {httpStatus: 700}}"),
            ("{abort: {httpStatus: 500}}", "{abort: {grpcStatus: NOPE}}"),
            (
                "{abort: {httpStatus: 500}}",
                "{abort: {httpStatus: 500, grpcStatus: UNAVAILABLE}}",
            ),
            (
                "{abort: {httpStatus: 500}}",
                "{delay: {fixedDelay: 1s, percentage: {value: 101}}}",
            ),
            ("{abort: {httpStatus: 500}}", "{delay: {percent: 5}}"),
            ("{abort: {httpStatus: 500}}", "{}"),
            (
                "{abort: {httpStatus: 500}}",
                "{abort: {httpStatus: 500}, other: 1}",
            ),
        ] {
            let e = parse(&fault.replace(bad, want), "f.yaml", &me())
                .unwrap_err()
                .to_string();
            assert!(e.contains("spec.http[0].fault"), "{want}: {e}");
        }
        let vs = |rule: &str| {
            format!("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews}}\nspec:\n  hosts: [reviews]\n  http:\n  - {rule}\n")
        };
        for (rule, field) in [
            (
                "redirect: {uri: /x, redirectCode: 200}",
                "spec.http[0].redirect.redirectCode",
            ),
            ("redirect: {uri: x}", "spec.http[0].redirect.uri"),
            (
                "redirect: {derivePort: NOPE}",
                "spec.http[0].redirect.derivePort",
            ),
            ("redirect: {uri: /x, other: 1}", "spec.http[0].redirect"),
            (
                "redirect: {uri: /x}\n    route: [{destination: {host: reviews}}]",
                "spec.http[0].redirect: a rule has a route or a redirect",
            ),
            (
                "redirect: {uri: /x}\n    mirror: {host: reviews}",
                "spec.http[0].redirect: a local answer goes nowhere to mirror from",
            ),
            (
                "route: [{destination: {host: reviews}}]\n    mirror: {host: v2}\n    mirrors: [{destination: {host: v3}}]",
                "spec.http[0].mirrors: mirror and mirrors are exclusive",
            ),
            (
                "route: [{destination: {host: reviews}}]\n    mirror: {host: v2}\n    mirrorPercentage: {value: 150}",
                "spec.http[0].mirrorPercentage.value: 150 is not between 0 and 100",
            ),
            (
                "route: [{destination: {host: reviews}}]\n    mirrorPercentage: {value: 5}",
                "spec.http[0].mirrorPercentage: a share of requests with no mirror",
            ),
            (
                "route: [{destination: {host: reviews}}]\n    mirrors: [{destination: {host: v2}, percentage: {value: -1}}]",
                "spec.http[0].mirrors[0].percentage.value",
            ),
            (
                "corsPolicy: {maxAge: soon}\n    route: [{destination: {host: reviews}}]",
                "spec.http[0].corsPolicy.maxAge",
            ),
            (
                "corsPolicy: {unmatchedPreflights: DROP}\n    route: [{destination: {host: reviews}}]",
                "spec.http[0].corsPolicy.unmatchedPreflights: \"DROP\": FORWARD or IGNORE",
            ),
            (
                "corsPolicy: {allowOrigins: [{exact: a, prefix: b}]}\n    route: [{destination: {host: reviews}}]",
                "spec.http[0].corsPolicy.allowOrigins[0]: exactly one of exact, prefix, regex",
            ),
            (
                "corsPolicy: {allowOrigin: [a], allowMethod: [GET]}\n    route: [{destination: {host: reviews}}]",
                "spec.http[0].corsPolicy.allowMethod: unknown field `allowMethod`",
            ),
            (
                "directResponse: {status: 99}",
                "spec.http[0].directResponse.status: 99 is not between 200 and 599",
            ),
            (
                "directResponse: {status: 200, body: {string: a, bytes: YQ==}}",
                "spec.http[0].directResponse.body: exactly one of string, bytes",
            ),
            (
                "directResponse: {status: 200, body: {bytes: '!!'}}",
                "spec.http[0].directResponse.body.bytes: not base64",
            ),
            (
                "directResponse: {status: 200}\n    route: [{destination: {host: reviews}}]",
                "spec.http[0].directResponse: a rule with a directResponse has no route",
            ),
            (
                "directResponse: {status: 200}\n    mirror: {host: reviews}",
                "spec.http[0].directResponse: a local answer goes nowhere to mirror from",
            ),
        ] {
            let e = parse(&vs(rule), "f.yaml", &me()).unwrap_err().to_string();
            assert!(e.contains(field), "{rule}: {e}");
        }
        let direct = parse(
            &vs("directResponse: {status: 200, body: {bytes: aGVsbG8=}}"),
            "d.yaml",
            &me(),
        )
        .unwrap()
        .routes["default/reviews.default.svc.cluster.local"][0]
            .direct
            .clone()
            .unwrap();
        assert_eq!((direct.status, &direct.body[..]), (200, &b"hello"[..]));
        let mirrored = |rule: &str| -> Vec<(String, Option<u16>, Option<String>, f64)> {
            parse(&vs(rule), "m.yaml", &me()).unwrap().routes
                ["default/reviews.default.svc.cluster.local"][0]
                .mirrors
                .iter()
                .map(|m| {
                    let b = &m.backend;
                    (b.service.clone(), b.port, b.subset.clone(), m.share)
                })
                .collect()
        };
        let v2 = "default/reviews-v2.default.svc.cluster.local".to_string();
        assert_eq!(
            mirrored("route: [{destination: {host: reviews}}]\n    mirror: {host: reviews-v2, subset: s, port: {number: 80}}"),
            [(v2.clone(), Some(80), Some("s".into()), 100.0)],
            "no percentage: every request, as Istio reads it"
        );
        assert_eq!(
            mirrored("route: [{destination: {host: reviews}}]\n    mirror: {host: reviews-v2}\n    mirrorPercent: 7"),
            [(v2.clone(), None, None, 7.0)]
        );
        assert_eq!(
            mirrored("route: [{destination: {host: reviews}}]\n    mirrors: [{destination: {host: reviews-v2}, percentage: {value: 2.5}}, {destination: {host: reviews-v2, subset: b}}]"),
            [(v2.clone(), None, None, 2.5), (v2, None, Some("b".into()), 100.0)]
        );
        let redirect = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - redirect: {authority: \"v2:8080\", derivePort: FROM_PROTOCOL_DEFAULT}\n";
        let c = parse(redirect, "r.yaml", &me()).unwrap();
        let rd = c.routes["default/reviews.default.svc.cluster.local"][0]
            .redirect
            .clone()
            .unwrap();
        assert_eq!(
            (rd.code, rd.port, rd.host.as_deref()),
            (301, RedirectPort::Default, Some("v2"))
        );
        let both = fault.replace(
            "{abort: {httpStatus: 500}}",
            "{delay: {fixedDelay: 7s, percent: 10}, abort: {grpcStatus: UNAVAILABLE, percentage: {value: 12.5}}}",
        );
        let c = parse(&both, "f.yaml", &me()).unwrap();
        let f = c.routes["default/reviews.default.svc.cluster.local"][0]
            .fault
            .clone()
            .unwrap();
        assert_eq!(f.delay, Some((Duration::from_secs(7), 10.0)));
        assert_eq!(f.abort, Some((Abort::Grpc(14), 12.5)));
        let hdr = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: reviews}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {host: reviews}\n      headers: {request: {set: {connection: close}}}\n";
        let e = parse(hdr, "h.yaml", &me()).unwrap_err().to_string();
        assert!(
            e.contains("spec.http[0].route[0].headers.request.set.connection: header \"connection\" cannot be changed"),
            "{e}"
        );
        let e = parse(&hdr.replace("{request:", "{requests:"), "h.yaml", &me())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("spec.http[0].route[0].headers: unknown field `requests`"),
            "{e}"
        );
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: reviews}\nspec:\n  host: reviews\n  trafficPolicy:\n    loadBalancer: {simple: RANDOM}\n    outlierDetection: {consecutive5xxErrors: 1, splitExternalLocalOriginErrors: true}\n  subsets:\n  - name: v1\n    labels: {version: v1}\n    trafficPolicy: {connectionPool: {tcp: {maxConnections: 1}}}\n";
        let e = parse(dr, "d.yaml", &me()).unwrap_err().to_string();
        assert!(
            e.contains("DestinationRule default/reviews: spec.trafficPolicy.outlierDetection.splitExternalLocalOriginErrors: not supported"),
            "{e}"
        );
        let dr = dr.replace(", splitExternalLocalOriginErrors: true", "");
        let c = parse(&dr, "d.yaml", &me()).unwrap();
        let svc = "default/reviews.default.svc.cluster.local";
        let v1 = c.traffic_for(svc, Some("v1")).unwrap();
        assert_eq!(v1.outlier.as_ref().unwrap().consecutive_5xx, 1);
        assert_eq!(v1.pool.as_ref().unwrap().max_connections, 1);
        assert_eq!(
            v1.destination,
            format!("{svc}#v1"),
            "v1 has a gate of its own"
        );
        let other = c.traffic_for(svc, Some("v2")).unwrap();
        assert!(other.pool.is_none(), "v2 has the rule's policy only");
        assert_eq!(other.destination, svc);
        let e = parse(
            &dr.replace("maxConnections: 1", "maxConnections: 1, maxRetries: 3"),
            "d.yaml",
            &me(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(
                "spec.subsets[0].trafficPolicy.connectionPool.tcp.maxRetries: not supported"
            ),
            "{e}"
        );
    }

    #[test]
    fn httproute_rules_sort_by_precedence() {
        let y = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{kind: Service, group: "", name: reviews, port: 9080}]
  rules:
  - backendRefs: [{name: reviews-v1, port: 9080}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: reviews-v2, port: 9080}]
  - matches: [{path: {type: Exact, value: /api/x}}]
    backendRefs: [{name: reviews-v3, port: 9080}]
"#;
        let c = parse(y, "r.yaml", &me()).unwrap();
        let r = &c.routes["default/reviews.default.svc.cluster.local"];
        let names: Vec<&str> = r.iter().map(|r| r.backends[0].service.as_str()).collect();
        assert_eq!(
            names,
            [
                "default/reviews-v3.default.svc.cluster.local",
                "default/reviews-v2.default.svc.cluster.local",
                "default/reviews-v1.default.svc.cluster.local"
            ]
        );
        let h = http::HeaderMap::new();
        let view = |path| RequestView {
            method: "GET",
            path,
            query: None,
            headers: &h,
            authority: "reviews:9080",
            port: 9080,
        };
        assert!(r[1].matches[0].matches(&view("/api/y")));
        assert!(!r[1].matches[0].matches(&view("/apix")));
        assert!(r[2].matches[0].matches(&view("/anything")));
    }
}

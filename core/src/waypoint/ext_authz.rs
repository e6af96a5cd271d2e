//! External authorization (`AuthorizationPolicy` with `action: CUSTOM`): the extension providers
//! of Istio's mesh config (the `istio` ConfigMap's `data.mesh`, `extensionProviders`), which
//! zring's waypoint calls as Envoy's `ext_authz` filter does.
//! - `envoyExtAuthzHttp`: a check request with the original method, the path under
//!   `pathPrefix`, the authority, and the headers the provider names (plus `authorization`), no
//!   body; 200 allows (copying `headersToUpstreamOnAllow` into the request and
//!   `headersToDownstreamOnAllow` onto the client's answer), anything else is the answer the
//!   client gets (its status, body and `headersToDownstreamOnDeny`).
//! - `envoyExtAuthzGrpc`: `envoy.service.auth.v3.Authorization/Check` over HTTP/2 with the
//!   request's attributes (every header, method, path, host, peers); status OK allows with the
//!   `ok_response`'s header changes, any other status denies with the `denied_response`'s status
//!   (403 when unset), headers and body ([`check_request`], [`verdict`]).
//!
//! Either way, no answer within `timeout` (or a failed call) denies with `statusOnError` (403)
//! unless `failOpen`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};
use prost::Message;
use serde::Deserialize;

use crate::xds::proto::envoy::service::auth::v3 as pb;

/// One extension provider.
#[derive(Debug, Clone)]
pub enum Provider {
    /// `envoyExtAuthzHttp`.
    Http(HttpProvider),
    /// `envoyExtAuthzGrpc`.
    Grpc(GrpcProvider),
    /// Another kind (tracing, logging): named, not callable here.
    Other { name: String, kind: String },
}

impl Provider {
    pub fn name(&self) -> &str {
        match self {
            Provider::Http(h) => &h.name,
            Provider::Grpc(g) => &g.name,
            Provider::Other { name, .. } => name,
        }
    }

    /// Where and how to call it (not for `Other`).
    pub fn call(&self) -> Option<&Call> {
        match self {
            Provider::Http(h) => Some(&h.call),
            Provider::Grpc(g) => Some(&g.call),
            Provider::Other { .. } => None,
        }
    }
}

/// What both kinds say about the authorization service and a check's failure.
#[derive(Debug, Clone)]
pub struct Call {
    /// The authorization service's hostname (`ext-authz.foo.svc.cluster.local`).
    pub service: String,
    pub port: u16,
    pub timeout: Duration,
    pub fail_open: bool,
    pub status_on_error: u16,
    /// `includeRequestBodyInCheck`: the request body (its start) goes with the check.
    pub body: Option<BodyInCheck>,
}

/// `includeRequestBodyInCheck`, as Envoy's `with_request_body`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BodyInCheck {
    /// `maxRequestBytes`: at most this much of the body is buffered and sent.
    pub max: usize,
    /// `allowPartialMessage`: a longer body sends its first `max` bytes; else the client gets
    /// 413.
    pub partial: bool,
    /// `packAsBytes`: a gRPC check carries it in `raw_body` (else `body`, as text).
    pub as_bytes: bool,
}

/// The header a check with a body carries: whether the body was cut at `maxRequestBytes`.
pub const PARTIAL_BODY: &str = "x-envoy-auth-partial-body";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BodySpec {
    #[serde(default)]
    max_request_bytes: Option<u32>,
    #[serde(default)]
    allow_partial_message: bool,
    #[serde(default)]
    pack_as_bytes: bool,
}

/// An `envoyExtAuthzGrpc` provider.
#[derive(Debug, Clone)]
pub struct GrpcProvider {
    pub name: String,
    pub call: Call,
}

/// An `envoyExtAuthzHttp` provider.
#[derive(Debug, Clone)]
pub struct HttpProvider {
    pub name: String,
    pub call: Call,
    pub path_prefix: String,
    /// Request headers copied into the check (lower case; `prefix*` and `*suffix` allowed).
    pub include_headers: Vec<String>,
    /// Headers added to every check.
    pub additional_headers: Vec<(String, String)>,
    /// Check-response headers copied into the allowed request.
    pub to_upstream_on_allow: Vec<String>,
    /// Check-response headers copied into a denial (empty: all of them).
    pub to_downstream_on_deny: Vec<String>,
    /// Check-response headers added to the client's answer when allowed.
    pub to_downstream_on_allow: Vec<String>,
}

/// Whether header `name` is one of `patterns`, in Istio's value forms (exact, `prefix*`,
/// `*suffix`, `*`), case-insensitive.
pub fn listed(patterns: &[String], name: &str) -> bool {
    patterns
        .iter()
        .any(|p| super::policy::value_matches(p, name, true))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshConfig {
    #[serde(default)]
    extension_providers: Vec<serde_yaml_ng::Value>,
}

/// The fields both kinds have.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CallSpec {
    service: String,
    port: serde_yaml_ng::Value,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    status_on_error: Option<String>,
    #[serde(default)]
    include_request_body_in_check: Option<serde_yaml_ng::Value>,
}

/// An `envoyExtAuthzHttp`'s fields beyond [`CallSpec`]'s.
const HTTP_FIELDS: &[&str] = &[
    "pathPrefix",
    "includeRequestHeadersInCheck",
    "includeAdditionalHeadersInCheck",
    "headersToUpstreamOnAllow",
    "headersToDownstreamOnDeny",
    "headersToDownstreamOnAllow",
];

/// Refuse a field of provider `spec` that is neither [`CallSpec`]'s nor in `more`, by name.
fn known(at: &str, spec: &serde_yaml_ng::Value, more: &[&str]) -> Result<(), (String, String)> {
    const SHARED: &[&str] = &[
        "service",
        "port",
        "timeout",
        "failOpen",
        "statusOnError",
        "includeRequestBodyInCheck",
    ];
    let keys = spec.as_mapping().into_iter().flat_map(|m| m.keys());
    for k in keys {
        let k = k.as_str().unwrap_or("?");
        if !SHARED.contains(&k) && !more.contains(&k) {
            return Err((
                format!("{at}.{k}"),
                "not a field zring's waypoint knows (refused rather than ignored)".into(),
            ));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpSpec {
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    include_request_headers_in_check: Vec<String>,
    #[serde(default)]
    include_additional_headers_in_check: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    headers_to_upstream_on_allow: Vec<String>,
    #[serde(default)]
    headers_to_downstream_on_deny: Vec<String>,
    #[serde(default)]
    headers_to_downstream_on_allow: Vec<String>,
}

/// The extension providers of a mesh config (YAML); errors name the field.
pub fn providers(mesh: &str) -> Result<Vec<Provider>, (String, String)> {
    let m: MeshConfig = serde_yaml_ng::from_str(mesh).map_err(|e| (".".into(), e.to_string()))?;
    let mut out = Vec::new();
    for (i, p) in m.extension_providers.into_iter().enumerate() {
        let at = format!("extensionProviders[{i}]");
        let name = p
            .get("name")
            .and_then(serde_yaml_ng::Value::as_str)
            .ok_or_else(|| (format!("{at}.name"), "required".to_string()))?
            .to_string();
        if let Some(spec) = p.get("envoyExtAuthzGrpc") {
            let at = format!("{at}.envoyExtAuthzGrpc");
            // zring routes after the check in any case (as `clearRouteCache: true`), so
            // either value of it reads the same.
            known(&at, spec, &["clearRouteCache"])?;
            let call = call(&at, spec)?;
            out.push(Provider::Grpc(GrpcProvider { name, call }));
            continue;
        }
        let Some(spec) = p.get("envoyExtAuthzHttp") else {
            let kind = p
                .as_mapping()
                .and_then(|m| m.keys().filter_map(|k| k.as_str()).find(|k| *k != "name"))
                .unwrap_or("unknown")
                .to_string();
            out.push(Provider::Other { name, kind });
            continue;
        };
        let at = format!("{at}.envoyExtAuthzHttp");
        known(&at, spec, HTTP_FIELDS)?;
        let s: HttpSpec =
            serde_yaml_ng::from_value(spec.clone()).map_err(|e| (at.clone(), e.to_string()))?;
        let call = call(&at, spec)?;
        let lower = |v: Vec<String>| {
            v.into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect::<Vec<_>>()
        };
        out.push(Provider::Http(HttpProvider {
            name,
            call,
            path_prefix: s.path_prefix.unwrap_or_default(),
            include_headers: lower(s.include_request_headers_in_check),
            additional_headers: s
                .include_additional_headers_in_check
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            to_upstream_on_allow: lower(s.headers_to_upstream_on_allow),
            to_downstream_on_deny: lower(s.headers_to_downstream_on_deny),
            to_downstream_on_allow: lower(s.headers_to_downstream_on_allow),
        }));
    }
    Ok(out)
}

/// The fields both kinds share (`spec` is the provider's), checked.
fn call(at: &str, spec: &serde_yaml_ng::Value) -> Result<Call, (String, String)> {
    let s: CallSpec =
        serde_yaml_ng::from_value(spec.clone()).map_err(|e| (at.to_string(), e.to_string()))?;
    let body = match s.include_request_body_in_check {
        None => None,
        Some(v) => {
            let b: BodySpec = serde_path_to_error::deserialize(v).map_err(|e| {
                let field = e.path().to_string();
                (
                    format!("{at}.includeRequestBodyInCheck.{field}")
                        .trim_end_matches(".")
                        .to_string(),
                    e.into_inner().to_string(),
                )
            })?;
            Some(BodyInCheck {
                // Envoy's limit when none is given is the buffer limit; Istio's examples give
                // one. 1 MiB keeps a check request bounded either way.
                max: b.max_request_bytes.map_or(1 << 20, |m| m as usize),
                partial: b.allow_partial_message,
                as_bytes: b.pack_as_bytes,
            })
        }
    };
    // Istio writes the port as a number or a string.
    let port = match &s.port {
        serde_yaml_ng::Value::Number(n) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        serde_yaml_ng::Value::String(t) => t.parse().ok(),
        _ => None,
    }
    .ok_or_else(|| (format!("{at}.port"), "a port number".to_string()))?;
    let timeout = match s.timeout.as_deref() {
        Some(t) => super::resources::duration(t).map_err(|e| (format!("{at}.timeout"), e))?,
        None => Duration::from_secs(600),
    };
    let status_on_error = match s.status_on_error.as_deref() {
        None => 403,
        Some(c) => c
            .parse::<u16>()
            .ok()
            .filter(|c| (200..=599).contains(c))
            .ok_or_else(|| {
                (
                    format!("{at}.statusOnError"),
                    format!("{c:?} is not an HTTP status"),
                )
            })?,
    };
    // `namespace/hostname` names the same service as `hostname`.
    let service = match s.service.split_once('/') {
        Some((_, h)) => h.to_string(),
        None => s.service,
    };
    Ok(Call {
        service,
        port,
        timeout,
        fail_open: s.fail_open,
        status_on_error,
        body,
    })
}

/// The gRPC method a `envoyExtAuthzGrpc` provider serves.
pub const GRPC_CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// Largest check answer read (either kind).
pub const MAX_ANSWER: usize = 64 * 1024;

/// What a gRPC check is about: the request as the waypoint received it and its two peers.
#[derive(Debug)]
pub struct Attributes<'a> {
    pub method: &'a str,
    /// Path and query, as in the request line.
    pub path: &'a str,
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'a str,
    /// The request body's length when declared.
    pub size: Option<u64>,
    pub source: SocketAddr,
    /// The client's SPIFFE id (`spiffe://...`), when authenticated.
    pub source_principal: Option<String>,
    pub destination: SocketAddr,
    pub destination_principal: String,
    /// The body (or its start) when the provider asks for it, whether it was cut, and
    /// whether it goes as bytes.
    pub body: Option<(&'a [u8], bool, bool)>,
}

fn peer(addr: SocketAddr, principal: String) -> pb::attribute_context::Peer {
    pb::attribute_context::Peer {
        address: Some(pb::Address {
            socket_address: Some(pb::SocketAddress {
                protocol: 0,
                address: addr.ip().to_string(),
                port_value: addr.port().into(),
            }),
        }),
        principal,
        ..Default::default()
    }
}

/// A gRPC `CheckRequest` for `a`, framed as a gRPC message (not compressed) as it goes in the
/// call's body. Headers as Envoy gives them: lower-case names (the pseudo-headers
/// `:authority`, `:method`, `:path` and `:scheme` among them), repeated ones joined with `,`,
/// values that are not UTF-8 with `!` for each byte that is not.
pub fn check_request(a: &Attributes<'_>, now: std::time::SystemTime) -> Bytes {
    let mut headers = std::collections::HashMap::with_capacity(a.headers.keys_len() + 4);
    for (k, v) in [
        (":authority", a.authority),
        (":method", a.method),
        (":path", a.path),
        (":scheme", "http"),
    ] {
        headers.insert(k.to_string(), v.to_string());
    }
    for (k, v) in a.headers {
        let v = String::from_utf8(v.as_bytes().to_vec()).unwrap_or_else(|e| {
            e.as_bytes()
                .iter()
                .map(|&b| if b.is_ascii() { b as char } else { '!' })
                .collect()
        });
        headers
            .entry(k.as_str().to_string())
            .and_modify(|old: &mut String| {
                old.push(',');
                old.push_str(&v);
            })
            .or_insert(v);
    }
    if let Some((_, partial, _)) = a.body {
        headers.insert(PARTIAL_BODY.into(), partial.to_string());
    }
    let (body, raw_body) = match a.body {
        Some((b, _, true)) => (String::new(), b.to_vec()),
        Some((b, _, false)) => (String::from_utf8_lossy(b).into_owned(), Vec::new()),
        None => (String::new(), Vec::new()),
    };
    let since = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let id = a
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let msg = pb::CheckRequest {
        attributes: Some(pb::AttributeContext {
            source: Some(peer(
                a.source,
                a.source_principal.clone().unwrap_or_default(),
            )),
            destination: Some(peer(a.destination, a.destination_principal.clone())),
            request: Some(pb::attribute_context::Request {
                time: Some(pb::Timestamp {
                    seconds: since.as_secs() as i64,
                    nanos: since.subsec_nanos() as i32,
                }),
                http: Some(pb::attribute_context::HttpRequest {
                    id,
                    method: a.method.to_string(),
                    headers,
                    path: a.path.to_string(),
                    host: a.authority.to_string(),
                    scheme: "http".into(),
                    size: a.size.map_or(-1, |s| s as i64),
                    protocol: a.protocol.to_string(),
                    body,
                    raw_body,
                    ..Default::default()
                }),
            }),
            context_extensions: Default::default(),
        }),
    };
    let mut out = BytesMut::with_capacity(5 + msg.encoded_len());
    out.put_u8(0);
    out.put_u32(msg.encoded_len() as u32);
    // Cannot fail: the buffer has room for the whole message.
    let _ = msg.encode(&mut out);
    out.freeze()
}

/// How a check response's header change applies (Envoy's `HeaderAppendAction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Replace any value (`append: false`, the default in check responses, or
    /// `OVERWRITE_IF_EXISTS_OR_ADD`).
    Set,
    /// Add beside any value (`append: true`).
    Append,
    /// Only when the header is absent (`ADD_IF_ABSENT`).
    AddIfAbsent,
    /// Only when the header is present (`OVERWRITE_IF_EXISTS`).
    OverwriteIfExists,
}

/// Header changes a provider asked for, in its order.
#[derive(Debug, Default)]
pub struct Changes(pub Vec<(HeaderName, HeaderValue, Action)>);

impl Changes {
    pub fn apply(&self, h: &mut HeaderMap) {
        for (k, v, how) in &self.0 {
            match how {
                Action::Set => {
                    h.insert(k, v.clone());
                }
                Action::Append => {
                    h.append(k, v.clone());
                }
                Action::AddIfAbsent if !h.contains_key(k) => {
                    h.insert(k, v.clone());
                }
                Action::OverwriteIfExists if h.contains_key(k) => {
                    h.insert(k, v.clone());
                }
                _ => {}
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A provider's allowance and what it changes.
#[derive(Debug, Default)]
pub struct Allowed {
    /// Changes to the request.
    pub request: Changes,
    /// Removed from the request.
    pub remove: Vec<HeaderName>,
    /// Changes to the response the client gets.
    pub response: Changes,
}

/// A gRPC provider's denial.
#[derive(Debug)]
pub struct Denied {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Read a gRPC check's answer: the body (one framed `CheckResponse`) and the call's status (the
/// `grpc-status` trailer, or header for a trailers-only answer). A call that failed is an
/// error (the provider's `statusOnError` applies), as in Envoy; so is a compressed or
/// malformed message.
pub fn verdict(grpc_status: Option<&str>, body: &[u8]) -> Result<Result<Allowed, Denied>, String> {
    match grpc_status.map(str::trim) {
        Some("0") => {}
        Some(s) => return Err(format!("the check call failed with grpc-status {s}")),
        None => return Err("the check call's answer has no grpc-status".into()),
    }
    let [flag, a, b, c, d, rest @ ..] = body else {
        return Err("the check call's answer has no message".into());
    };
    if *flag != 0 {
        return Err("the check call's answer is compressed (none was offered)".into());
    }
    let len = u32::from_be_bytes([*a, *b, *c, *d]) as usize;
    let msg = rest
        .get(..len)
        .ok_or("the check call's answer is cut short")?;
    let r = pb::CheckResponse::decode(msg).map_err(|e| format!("CheckResponse: {e}"))?;
    let changes =
        |hs: &[pb::HeaderValueOption]| Changes(hs.iter().filter_map(header_option).collect());
    if r.status.as_ref().map_or(0, |s| s.code) == 0 {
        let mut allowed = Allowed::default();
        if let Some(pb::check_response::HttpResponse::OkResponse(ok)) = r.http_response {
            allowed.request = changes(&ok.headers);
            allowed.remove = ok
                .headers_to_remove
                .iter()
                .filter_map(|k| HeaderName::from_bytes(k.as_bytes()).ok())
                // Envoy never removes `host` (nor a pseudo-header, which no name here is).
                .filter(|k| *k != http::header::HOST)
                .collect();
            allowed.response = changes(&ok.response_headers_to_add);
        }
        return Ok(Ok(allowed));
    }
    let mut denied = Denied {
        status: 403,
        headers: HeaderMap::new(),
        body: Bytes::new(),
    };
    if let Some(pb::check_response::HttpResponse::DeniedResponse(d)) = r.http_response {
        if let Some(s) = d.status.filter(|s| (200..=599).contains(&s.code)) {
            denied.status = s.code as u16;
        }
        changes(&d.headers).apply(&mut denied.headers);
        denied.body = Bytes::from(d.body);
    }
    Ok(Err(denied))
}

/// One header change of a check response. `append` (when given) decides between adding and
/// replacing, else `append_action`, whose default reads as replacing here: in check responses
/// `append` defaults to false. Names that are not header names are skipped.
fn header_option(h: &pb::HeaderValueOption) -> Option<(HeaderName, HeaderValue, Action)> {
    let hv = h.header.as_ref()?;
    let k = HeaderName::from_bytes(hv.key.as_bytes()).ok()?;
    let raw = match hv.raw_value.is_empty() {
        true => hv.value.as_bytes(),
        false => &hv.raw_value,
    };
    let v = HeaderValue::from_bytes(raw).ok()?;
    let how = match (&h.append, h.append_action) {
        (Some(b), _) if b.value => Action::Append,
        (Some(_), _) | (None, 0) | (None, 2) => Action::Set,
        (None, 1) => Action::AddIfAbsent,
        (None, 3) => Action::OverwriteIfExists,
        (None, _) => return None,
    };
    Some((k, v, how))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istios_sample_providers_are_read() {
        let mesh = "extensionProviders:\n- name: sample-ext-authz-http\n  envoyExtAuthzHttp:\n    service: ext-authz.foo.svc.cluster.local\n    port: \"8000\"\n    includeRequestHeadersInCheck: [\"x-ext-authz\"]\n- name: sample-ext-authz-grpc\n  envoyExtAuthzGrpc:\n    service: ext-authz.foo.svc.cluster.local\n    port: \"9000\"\n- name: otel\n  opentelemetry: {service: otel.x, port: 4317}\n";
        let p = providers(mesh).unwrap();
        let Provider::Http(h) = &p[0] else {
            panic!("http")
        };
        assert_eq!(
            (h.call.service.as_str(), h.call.port, h.call.status_on_error),
            ("ext-authz.foo.svc.cluster.local", 8000, 403)
        );
        assert_eq!(h.include_headers, ["x-ext-authz"]);
        assert_eq!(h.call.timeout, Duration::from_secs(600));
        let Provider::Grpc(g) = &p[1] else {
            panic!("grpc")
        };
        assert_eq!(
            (g.name.as_str(), g.call.service.as_str(), g.call.port),
            (
                "sample-ext-authz-grpc",
                "ext-authz.foo.svc.cluster.local",
                9000
            )
        );
        assert!(p[1].call().is_some());
        assert!(matches!(&p[2], Provider::Other { kind, .. } if kind == "opentelemetry"));
        assert!(p[2].call().is_none());
        assert_eq!(p[2].name(), "otel");
        for (bad, field) in [
            ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: s, port: x}\n", "extensionProviders[0].envoyExtAuthzHttp.port"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: s, port: 1, statusOnError: \"9\"}\n", "extensionProviders[0].envoyExtAuthzHttp.statusOnError"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: s, port: 1, includeRequestBodyInCheck: {maxRequestBytes: -1}}\n", "extensionProviders[0].envoyExtAuthzHttp.includeRequestBodyInCheck.maxRequestBytes"),
            ("extensionProviders:\n- envoyExtAuthzHttp: {service: s, port: 1}\n", "extensionProviders[0].name"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzGrpc: {service: s, port: 1, includeRequestBodyInCheck: {maxRequestBytes: 10, packAsText: true}}\n", "extensionProviders[0].envoyExtAuthzGrpc.includeRequestBodyInCheck.packAsText"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzGrpc: {service: s, port: 70000}\n", "extensionProviders[0].envoyExtAuthzGrpc.port"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzGrpc: {service: s, port: 1, pathPrefix: /x}\n", "extensionProviders[0].envoyExtAuthzGrpc.pathPrefix"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: s, port: 1, clearRouteCache: true}\n", "extensionProviders[0].envoyExtAuthzHttp.clearRouteCache"),
        ] {
            assert_eq!(providers(bad).unwrap_err().0, field, "{bad}");
        }
        assert!(listed(&["x-ext-*".into()], "x-ext-authz"));
        assert!(!listed(&["x-ext-authz".into()], "x-other"));
    }

    fn attrs(headers: &HeaderMap) -> Attributes<'_> {
        Attributes {
            method: "POST",
            path: "/headers?x=1",
            authority: "reviews:9080",
            headers,
            protocol: "HTTP/1.1",
            size: Some(3),
            source: "127.0.0.2:40000".parse().unwrap(),
            source_principal: Some("spiffe://cluster.local/ns/default/sa/sleep".into()),
            destination: "10.96.0.1:9080".parse().unwrap(),
            destination_principal: "spiffe://cluster.local/ns/default/sa/waypoint".into(),
            body: None,
        }
    }

    #[test]
    fn a_body_goes_with_the_check_when_the_provider_asks() {
        let ps = providers(
            "extensionProviders:\n- name: a\n  envoyExtAuthzGrpc:\n    service: s\n    port: 1\n    \
             includeRequestBodyInCheck: {maxRequestBytes: 10, allowPartialMessage: true, packAsBytes: true}\n\
             - name: b\n  envoyExtAuthzHttp: {service: s, port: 1, includeRequestBodyInCheck: {}}\n",
        )
        .unwrap();
        let body = |i: usize| ps[i].call().unwrap().body;
        assert_eq!(
            body(0),
            Some(BodyInCheck {
                max: 10,
                partial: true,
                as_bytes: true
            })
        );
        assert_eq!(
            body(1).map(|b| (b.max, b.partial, b.as_bytes)),
            Some((1 << 20, false, false))
        );
        let h = HeaderMap::new();
        let t = std::time::UNIX_EPOCH;
        let http = |a: &Attributes<'_>| {
            pb::CheckRequest::decode(&check_request(a, t)[5..])
                .unwrap()
                .attributes
                .unwrap()
                .request
                .unwrap()
                .http
                .unwrap()
        };
        let mut a = attrs(&h);
        a.body = Some((b"caf\xc3\xa9\xff", true, false));
        let r = http(&a);
        assert_eq!(
            (r.body.as_str(), r.raw_body.len()),
            ("caf\u{e9}\u{fffd}", 0)
        );
        assert_eq!(r.headers[PARTIAL_BODY], "true");
        a.body = Some((b"\x00\xff", false, true));
        let r = http(&a);
        assert_eq!((r.body.as_str(), &r.raw_body[..]), ("", &b"\x00\xff"[..]));
        assert_eq!(r.headers[PARTIAL_BODY], "false");
        assert!(!http(&attrs(&h)).headers.contains_key(PARTIAL_BODY));
    }

    /// The request carries what Envoy's filter sends, and decodes as Envoy's own message.
    #[test]
    fn a_grpc_check_carries_the_requests_attributes() {
        let mut h = HeaderMap::new();
        h.insert("x-ext-authz", HeaderValue::from_static("allow"));
        h.append("x-many", HeaderValue::from_static("a"));
        h.append("x-many", HeaderValue::from_static("b"));
        h.insert("x-request-id", HeaderValue::from_static("rid-1"));
        h.insert("x-bin", HeaderValue::from_bytes(b"ok\xffok").unwrap());
        let t = std::time::UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let framed = check_request(&attrs(&h), t);
        assert_eq!(framed[0], 0, "not compressed");
        let len = u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, framed.len() - 5);
        let r = pb::CheckRequest::decode(&framed[5..]).unwrap();
        let a = r.attributes.unwrap();
        let http = a.request.as_ref().unwrap().http.as_ref().unwrap();
        assert_eq!(
            (http.method.as_str(), http.path.as_str(), http.host.as_str()),
            ("POST", "/headers?x=1", "reviews:9080")
        );
        assert_eq!(
            (http.size, http.protocol.as_str(), http.id.as_str()),
            (3, "HTTP/1.1", "rid-1")
        );
        assert_eq!(http.headers["x-ext-authz"], "allow");
        assert_eq!(http.headers["x-many"], "a,b");
        assert_eq!(http.headers["x-bin"], "ok!ok");
        assert_eq!(http.headers[":authority"], "reviews:9080");
        assert_eq!(http.headers[":method"], "POST");
        assert_eq!(http.headers[":path"], "/headers?x=1");
        let time = a.request.unwrap().time.unwrap();
        assert_eq!((time.seconds, time.nanos), (1_700_000_000, 5));
        let src = a.source.unwrap();
        assert_eq!(src.principal, "spiffe://cluster.local/ns/default/sa/sleep");
        let sa = src.address.unwrap().socket_address.unwrap();
        assert_eq!((sa.address.as_str(), sa.port_value), ("127.0.0.2", 40000));
        let dst = a.destination.unwrap();
        assert_eq!(
            dst.principal,
            "spiffe://cluster.local/ns/default/sa/waypoint"
        );
        assert_eq!(
            dst.address.unwrap().socket_address.unwrap().port_value,
            9080
        );
        let mut none = attrs(&h);
        none.size = None;
        let r = pb::CheckRequest::decode(&check_request(&none, t)[5..]).unwrap();
        assert_eq!(
            r.attributes.unwrap().request.unwrap().http.unwrap().size,
            -1
        );
    }

    fn framed(m: &pb::CheckResponse) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
        v.extend_from_slice(&m.encode_to_vec());
        v
    }

    fn opt(k: &str, v: &str, append: Option<bool>, action: i32) -> pb::HeaderValueOption {
        pb::HeaderValueOption {
            header: Some(pb::HeaderValue {
                key: k.into(),
                value: v.into(),
                raw_value: vec![],
            }),
            append: append.map(|value| pb::BoolValue { value }),
            append_action: action,
            keep_empty_value: false,
        }
    }

    #[test]
    fn a_grpc_answer_allows_with_header_changes_or_denies_with_its_response() {
        use pb::check_response::HttpResponse;
        let ok = pb::CheckResponse {
            status: Some(pb::RpcStatus {
                code: 0,
                message: String::new(),
            }),
            http_response: Some(HttpResponse::OkResponse(pb::OkHttpResponse {
                headers: vec![
                    opt("x-ext-authz-check-result", "allowed", Some(false), 0),
                    opt("x-tag", "b", Some(true), 0),
                    opt("x-default", "new", None, 0),
                    opt("x-if-absent", "new", None, 1),
                    opt("x-if-present", "new", None, 3),
                    opt("bad name", "v", None, 0),
                ],
                headers_to_remove: vec!["authorization".into(), "host".into()],
                response_headers_to_add: vec![opt("x-said", "yes", None, 0)],
                ..Default::default()
            })),
        };
        let a = verdict(Some("0"), &framed(&ok)).unwrap().unwrap();
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-ext-authz-check-result", "old"),
            ("x-tag", "a"),
            ("x-default", "old"),
            ("x-if-absent", "old"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        a.request.apply(&mut h);
        assert_eq!(h["x-ext-authz-check-result"], "allowed");
        let tags: Vec<_> = h.get_all("x-tag").iter().collect();
        assert_eq!(tags, ["a", "b"]);
        assert_eq!(
            h["x-default"], "new",
            "append defaults to false in check answers"
        );
        assert_eq!(h["x-if-absent"], "old");
        assert!(!h.contains_key("x-if-present"));
        assert_eq!(a.request.0.len(), 5, "the bad name is skipped");
        assert_eq!(a.remove, [http::header::AUTHORIZATION]);
        let mut r = HeaderMap::new();
        a.response.apply(&mut r);
        assert_eq!(r["x-said"], "yes");

        let denied = pb::CheckResponse {
            status: Some(pb::RpcStatus {
                code: 7,
                message: "PERMISSION_DENIED".into(),
            }),
            http_response: Some(HttpResponse::DeniedResponse(pb::DeniedHttpResponse {
                status: Some(pb::HttpStatus { code: 401 }),
                headers: vec![opt("x-ext-authz-check-result", "denied", Some(false), 0)],
                body: "denied by ext_authz".into(),
            })),
        };
        let d = verdict(Some("0"), &framed(&denied)).unwrap().unwrap_err();
        assert_eq!((d.status, &d.body[..]), (401, &b"denied by ext_authz"[..]));
        assert_eq!(d.headers["x-ext-authz-check-result"], "denied");
        // A denial with no HTTP response is Envoy's 403.
        let bare = pb::CheckResponse {
            status: Some(pb::RpcStatus {
                code: 16,
                message: String::new(),
            }),
            http_response: None,
        };
        let d = verdict(Some("0"), &framed(&bare)).unwrap().unwrap_err();
        assert_eq!((d.status, d.body.len()), (403, 0));

        // Failed calls and bad answers are errors (statusOnError).
        assert!(verdict(Some("14"), &framed(&ok)).is_err());
        assert!(verdict(None, &framed(&ok)).is_err());
        assert!(verdict(Some("0"), &[]).is_err());
        let mut compressed = framed(&ok);
        compressed[0] = 1;
        assert!(verdict(Some("0"), &compressed).is_err());
        let cut = framed(&ok);
        assert!(verdict(Some("0"), &cut[..cut.len() - 1]).is_err());
        assert!(verdict(Some("0"), &[0, 0, 0, 0, 2, 0xff, 0xff]).is_err());
    }
}

//! Header changes a route makes: VirtualService `headers` (on a rule and on each of its
//! destinations) and Gateway API `RequestHeaderModifier` / `ResponseHeaderModifier` filters (on
//! a rule and on each backendRef).
//!
//! Applied as Envoy applies the configuration Istio generates from them: within one level,
//! `remove` first, then `set` (replaces every value), then `add` (appends a value); the
//! destination's (backend's) changes before the rule's, so for the same header the rule's
//! `set` wins. Setting `host` or `:authority` on the request rewrites the authority sent
//! upstream, as Istio turns it into Envoy's host rewrite. Pseudo-headers other than that, and
//! hop-by-hop headers, are refused: Envoy rejects a configuration that changes them.

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Changes to one message's headers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderOps {
    /// Removed first.
    pub remove: Vec<HeaderName>,
    /// Then set: every value of the header replaced by this one.
    pub set: Vec<(HeaderName, HeaderValue)>,
    /// Then added: one more value.
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderOps {
    /// No change at all.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    /// Change `h`.
    pub fn apply(&self, h: &mut HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
    }
}

/// What a route (or one of its backends) changes in requests and responses.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeaderRules {
    /// Request headers (`host` excluded: see [`HeaderRules::authority`]).
    pub request: HeaderOps,
    /// The authority sent upstream instead of the client's (`set` of `host`/`:authority`).
    pub authority: Option<String>,
    /// Response headers, on the upstream's answer.
    pub response: HeaderOps,
}

impl HeaderRules {
    /// No change at all.
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.authority.is_none() && self.response.is_empty()
    }

    /// For `/config_dump`, in VirtualService's shape (null when there is no change).
    pub fn dump(&self) -> serde_json::Value {
        fn ops(o: &HeaderOps, authority: Option<&str>) -> serde_json::Value {
            let text = |v: &HeaderValue| String::from_utf8_lossy(v.as_bytes()).into_owned();
            let mut set: serde_json::Map<_, _> = o
                .set
                .iter()
                .map(|(n, v)| (n.to_string(), text(v).into()))
                .collect();
            if let Some(a) = authority {
                set.insert("host".into(), a.into());
            }
            serde_json::json!({
                "set": set,
                "add": o.add.iter().map(|(n, v)| serde_json::json!([n.as_str(), text(v)])).collect::<Vec<_>>(),
                "remove": o.remove.iter().map(HeaderName::as_str).collect::<Vec<_>>(),
            })
        }
        if self.is_empty() {
            return serde_json::Value::Null;
        }
        serde_json::json!({
            "request": ops(&self.request, self.authority.as_deref()),
            "response": ops(&self.response, None),
        })
    }
}

/// A URL rewrite (VirtualService `rewrite`, HTTPRoute `URLRewrite` filter on a rule).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rewrite {
    /// The new path (the query is kept).
    pub path: Option<PathRewrite>,
    /// The authority sent upstream.
    pub authority: Option<String>,
}

/// How a path is rewritten.
#[derive(Debug, Clone, PartialEq)]
pub enum PathRewrite {
    /// Replaced whole (HTTPRoute `ReplaceFullPath`).
    Full(String),
    /// The matched prefix replaced by this, as Envoy's `prefix_rewrite` that Istio generates for
    /// `rewrite.uri`: an exact match is the whole path, a rule without a uri match matched `/`.
    Prefix(String),
    /// The matched path segments replaced by this (HTTPRoute `ReplacePrefixMatch`).
    Segments(String),
    /// Every match of a regular expression replaced (VirtualService `uriRegexRewrite`, Envoy's
    /// `regex_rewrite`).
    Regex(RegexRewrite),
}

/// A regular expression and what replaces each of its matches (`$1` for a capture group).
#[derive(Debug, Clone)]
pub struct RegexRewrite {
    re: regex::Regex,
    with: String,
}

impl PartialEq for RegexRewrite {
    fn eq(&self, o: &Self) -> bool {
        self.re.as_str() == o.re.as_str() && self.with == o.with
    }
}

impl RegexRewrite {
    /// From Istio's form: RE2 `match`, and `rewrite` with `\1` for capture groups.
    pub fn new(pattern: &str, rewrite: &str) -> Result<Self, String> {
        let re = regex::Regex::new(pattern)
            .map_err(|e| format!("bad regular expression {pattern:?}: {e}"))?;
        let mut with = String::new();
        let mut chars = rewrite.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, chars.peek()) {
                ('\\', Some(d)) if d.is_ascii_digit() => {
                    with.push_str(&format!("${{{d}}}"));
                    chars.next();
                }
                ('$', _) => with.push_str("$$"),
                (c, _) => with.push(c),
            }
        }
        Ok(Self { re, with })
    }
}

impl PathRewrite {
    /// The new path of `path`, whose first `matched` bytes the rule's match matched.
    pub fn apply(&self, path: &str, matched: usize) -> String {
        let rest = path.get(matched..).unwrap_or("");
        match self {
            PathRewrite::Full(v) => v.clone(),
            PathRewrite::Prefix(v) => format!("{v}{rest}"),
            PathRewrite::Segments(v) => match (v.as_str(), rest) {
                ("", "") => "/".into(),
                (v, "") => v.into(),
                (v, rest) if v.ends_with('/') && rest.starts_with('/') => {
                    format!("{}{rest}", v.trim_end_matches('/'))
                }
                (v, rest) => format!("{v}{rest}"),
            },
            PathRewrite::Regex(r) => r.re.replace_all(path, r.with.as_str()).into_owned(),
        }
    }
}

/// A redirect answered by the waypoint (VirtualService `redirect`, HTTPRoute
/// `RequestRedirect`): `Location` is the request's URL with these parts replaced.
#[derive(Debug, Clone, PartialEq)]
pub struct Redirect {
    /// `http`, `https`; None: the request's (`http` inside the mesh).
    pub scheme: Option<String>,
    /// Host (without port); None: the request's.
    pub host: Option<String>,
    /// The port in `Location`: keep the request's, drop it, or set one.
    pub port: RedirectPort,
    /// The new path; None: the request's. The query is kept.
    pub path: Option<PathRewrite>,
    /// 301, 302, 303, 307 or 308.
    pub code: u16,
}

/// The port a redirect's `Location` carries.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RedirectPort {
    /// The request's authority's port, if it had one.
    Keep,
    /// None (the scheme's default).
    Default,
    /// This one.
    Set(u16),
}

/// A query's `name=value` pairs in order (a bare `name` has an empty value); none for `None`.
pub fn query_pairs(query: Option<&str>) -> impl Iterator<Item = (&str, &str)> {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}

/// The first non-empty value of cookie `name` in a request's `Cookie` headers (several on
/// HTTP/2), its quotes removed.
pub fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            let v = v.trim_matches('"');
            (k == name && !v.is_empty()).then_some(v)
        })
}

/// An authority's host and port: `host:80` -> (`host`, 80), `[::1]:80` -> (`[::1]`, 80);
/// `host`, `[::1]` and a bare IPv6 address have no port.
pub fn split_authority(a: &str) -> (&str, Option<u16>) {
    match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || h.starts_with('[') && h.ends_with(']') => {
            match p.parse() {
                Ok(port) => (h, Some(port)),
                Err(_) => (a, None),
            }
        }
        _ => (a, None),
    }
}

/// The authority of a mirrored copy: `-shadow` after the host, as Envoy marks them
/// (`reviews:9080` -> `reviews-shadow:9080`).
pub fn shadow_authority(a: &str) -> String {
    match split_authority(a) {
        (h, Some(p)) => format!("{h}-shadow:{p}"),
        (h, None) => format!("{h}-shadow"),
    }
}

impl Redirect {
    /// `Location` for a request to `authority` with `path` (the new path already applied by
    /// the caller when `self.path` is set) and `query`.
    pub fn location(&self, authority: &str, path: &str, query: Option<&str>) -> String {
        let (req_host, req_port) = split_authority(authority);
        let host = self.host.as_deref().unwrap_or(req_host);
        let port = match self.port {
            RedirectPort::Keep => req_port,
            RedirectPort::Default => None,
            RedirectPort::Set(p) => Some(p),
        };
        let scheme = self.scheme.as_deref().unwrap_or("http");
        let mut out = format!("{scheme}://{host}");
        if let Some(p) = port {
            out.push_str(&format!(":{p}"));
        }
        out.push_str(path);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

/// Redirect status codes Istio and Gateway API accept.
pub const REDIRECT_CODES: [u16; 5] = [301, 302, 303, 307, 308];

/// What an HTTPRoute rule's filters do.
#[derive(Debug, Default)]
pub(crate) struct GatewayFilters {
    pub headers: HeaderRules,
    pub rewrite: Option<Rewrite>,
    pub redirect: Option<Redirect>,
    /// `RequestMirror` filters, in order.
    pub mirrors: Vec<MirrorRef>,
    /// A `CORS` filter.
    pub cors: Option<super::cors::Cors>,
}

/// A `RequestMirror` filter as written: the Service its copies go to and the share of requests
/// copied (percent).
#[derive(Debug)]
pub(crate) struct MirrorRef {
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<u16>,
    pub share: f64,
}

/// A field and what is wrong with it (the caller adds file, resource and the path above).
type FieldError = (String, String);

/// Headers nobody may change through a route (Envoy refuses them in `request_headers_to_add`
/// and `_to_remove`, or they describe the connection, not the message).
const FORBIDDEN: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

/// Which message a name is changed on.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    Request,
    Response,
}

/// The name, checked; `Ok(None)` for `host`/`:authority` on a request (an authority rewrite).
fn name(raw: &str, side: Side, at: &str) -> Result<Option<HeaderName>, FieldError> {
    let lower = raw.to_ascii_lowercase();
    if side == Side::Request && (lower == "host" || lower == ":authority") {
        return Ok(None);
    }
    if lower.starts_with(':') || lower == "host" || FORBIDDEN.contains(&lower.as_str()) {
        return Err((
            at.to_string(),
            format!("header {raw:?} cannot be changed by a route"),
        ));
    }
    HeaderName::from_bytes(lower.as_bytes())
        .map(Some)
        .map_err(|_| (at.to_string(), format!("{raw:?} is not a header name")))
}

/// A value, checked. VirtualService values go to Envoy as header formatters, in which `%...%`
/// names a substitution and `%%` is a literal `%`: the literal kind is taken, substitutions are
/// refused (a rule that sent the text of the operator would not do what it says).
fn value(raw: &str, envoy_format: bool, at: &str) -> Result<HeaderValue, FieldError> {
    let text = if envoy_format {
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                out.push(c);
            } else if chars.peek() == Some(&'%') {
                chars.next();
                out.push('%');
            } else {
                return Err((
                    at.to_string(),
                    format!("{raw:?}: Envoy's %COMMAND% substitutions are not supported by zring's waypoint (write %% for a literal %)"),
                ));
            }
        }
        out
    } else {
        raw.to_string()
    };
    HeaderValue::from_str(&text)
        .map_err(|_| (at.to_string(), format!("{raw:?} is not a header value")))
}

/// One `set`/`add` entry into `ops` (or the authority).
fn put(
    rules: &mut HeaderRules,
    side: Side,
    add: bool,
    (n, v): (&str, &str),
    envoy_format: bool,
    at: &str,
) -> Result<(), FieldError> {
    let v = value(v, envoy_format, at)?;
    let ops = match side {
        Side::Request => &mut rules.request,
        Side::Response => &mut rules.response,
    };
    match name(n, side, at)? {
        Some(n) if add => ops.add.push((n, v)),
        Some(n) => ops.set.push((n, v)),
        None if add => {
            return Err((
                at.to_string(),
                "the authority can be set, not added to".into(),
            ))
        }
        None => {
            rules.authority = Some(
                v.to_str()
                    .map_err(|_| (at.to_string(), "not an authority".to_string()))?
                    .to_string(),
            )
        }
    }
    Ok(())
}

fn remove(rules: &mut HeaderRules, side: Side, n: &str, at: &str) -> Result<(), FieldError> {
    let ops = match side {
        Side::Request => &mut rules.request,
        Side::Response => &mut rules.response,
    };
    match name(n, side, at)? {
        Some(n) => ops.remove.push(n),
        None => return Err((at.to_string(), "the authority cannot be removed".into())),
    }
    Ok(())
}

// --- VirtualService `headers` ---------------------------------------------------------------

/// `headers` of a VirtualService rule or destination.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct VsHeaders {
    #[serde(default)]
    request: Option<VsHeaderOps>,
    #[serde(default)]
    response: Option<VsHeaderOps>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VsHeaderOps {
    #[serde(default)]
    set: BTreeMap<String, String>,
    #[serde(default)]
    add: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
}

impl VsHeaders {
    /// Checked; errors name the field below `headers` (`request.set.x-foo`).
    pub(crate) fn rules(self) -> Result<HeaderRules, FieldError> {
        let mut r = HeaderRules::default();
        for (side, ops, at) in [
            (Side::Request, self.request, "request"),
            (Side::Response, self.response, "response"),
        ] {
            let Some(ops) = ops else { continue };
            for (i, n) in ops.remove.iter().enumerate() {
                remove(&mut r, side, n, &format!("{at}.remove[{i}]"))?;
            }
            for (add, map, what) in [(false, &ops.set, "set"), (true, &ops.add, "add")] {
                for (n, v) in map {
                    put(&mut r, side, add, (n, v), true, &format!("{at}.{what}.{n}"))?;
                }
            }
        }
        Ok(r)
    }
}

// --- Gateway API filters --------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HrFilter {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    request_header_modifier: Option<HrModifier>,
    #[serde(default)]
    response_header_modifier: Option<HrModifier>,
    #[serde(default)]
    url_rewrite: Option<HrUrlRewrite>,
    #[serde(default)]
    request_redirect: Option<HrRedirect>,
    #[serde(default)]
    request_mirror: Option<HrMirror>,
    #[serde(default)]
    cors: Option<HrCors>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrCors {
    #[serde(default)]
    allow_origins: Vec<String>,
    #[serde(default)]
    allow_credentials: Option<bool>,
    #[serde(default)]
    allow_methods: Vec<String>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    #[serde(default)]
    max_age: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrMirror {
    backend_ref: super::resources::ObjectRef,
    #[serde(default)]
    percent: Option<u32>,
    #[serde(default)]
    fraction: Option<HrFraction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HrFraction {
    numerator: u32,
    #[serde(default)]
    denominator: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrRedirect {
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    path: Option<HrPathModifier>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    status_code: Option<u16>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrUrlRewrite {
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    path: Option<HrPathModifier>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HrPathModifier {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    replace_full_path: Option<String>,
    #[serde(default)]
    replace_prefix_match: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HrModifier {
    #[serde(default)]
    set: Vec<HrHeader>,
    #[serde(default)]
    add: Vec<HrHeader>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HrHeader {
    name: String,
    value: String,
}

/// An HTTPRoute rule's (`rule: true`) or backendRef's `filters`: header modifiers are
/// applied, and on a rule `URLRewrite`; every other type is refused by name. Errors name the
/// field below `filters`.
pub(crate) fn gateway_filters(
    filters: &[serde_yaml_ng::Value],
    rule: bool,
) -> Result<GatewayFilters, FieldError> {
    let mut out = GatewayFilters::default();
    let r = &mut out.headers;
    let mut seen = Vec::new();
    for (i, f) in filters.iter().enumerate() {
        let at = format!("[{i}]");
        let f: HrFilter =
            serde_yaml_ng::from_value(f.clone()).map_err(|e| (at.clone(), e.to_string()))?;
        if f.kind == "RequestMirror" && rule {
            let Some(m) = f.request_mirror else {
                return Err((format!("{at}.requestMirror"), "missing".into()));
            };
            out.mirrors
                .push(mirror_filter(m, &format!("{at}.requestMirror"))?);
            continue;
        }
        if seen.contains(&f.kind) {
            return Err((
                format!("{at}.type"),
                format!("{} may be used once per rule", f.kind),
            ));
        }
        seen.push(f.kind.clone());
        if f.kind == "URLRewrite" && rule {
            let Some(u) = f.url_rewrite else {
                return Err((format!("{at}.urlRewrite"), "missing".into()));
            };
            let path = u
                .path
                .map(|p| path_modifier(p, &format!("{at}.urlRewrite.path")))
                .transpose()?;
            out.rewrite = Some(Rewrite {
                path,
                authority: u.hostname,
            });
            continue;
        }
        if f.kind == "CORS" && rule {
            let Some(c) = f.cors else {
                return Err((format!("{at}.cors"), "missing".into()));
            };
            out.cors = Some(gateway_cors(c, &format!("{at}.cors"))?);
            continue;
        }
        if f.kind == "RequestRedirect" && rule {
            let Some(r) = f.request_redirect else {
                return Err((format!("{at}.requestRedirect"), "missing".into()));
            };
            let path = r
                .path
                .map(|p| path_modifier(p, &format!("{at}.requestRedirect.path")))
                .transpose()?;
            let code = r.status_code.unwrap_or(302);
            if !REDIRECT_CODES.contains(&code) {
                return Err((
                    format!("{at}.requestRedirect.statusCode"),
                    format!("{code} is not one of {REDIRECT_CODES:?}"),
                ));
            }
            if let Some(s) = r
                .scheme
                .as_deref()
                .filter(|s| !matches!(*s, "http" | "https"))
            {
                return Err((
                    format!("{at}.requestRedirect.scheme"),
                    format!("{s:?}: http or https"),
                ));
            }
            out.redirect = Some(Redirect {
                // Gateway API: a new scheme without a port drops the port (the scheme's own).
                port: match (r.port, &r.scheme) {
                    (Some(p), _) => RedirectPort::Set(p),
                    (None, Some(_)) => RedirectPort::Default,
                    (None, None) => RedirectPort::Keep,
                },
                scheme: r.scheme,
                host: r.hostname,
                path,
                code,
            });
            continue;
        }
        let (side, modifier, field) = match f.kind.as_str() {
            "RequestHeaderModifier" => (Side::Request, f.request_header_modifier, "requestHeaderModifier"),
            "ResponseHeaderModifier" => (
                Side::Response,
                f.response_header_modifier,
                "responseHeaderModifier",
            ),
            other => {
                return Err((
                    format!("{at}.type"),
                    format!("filter {other:?} is not supported by zring's waypoint (refused rather than ignored)"),
                ))
            }
        };
        let Some(m) = modifier else {
            return Err((format!("{at}.{field}"), "missing".into()));
        };
        let at = format!("{at}.{field}");
        for (i, n) in m.remove.iter().enumerate() {
            remove(r, side, n, &format!("{at}.remove[{i}]"))?;
        }
        for (add, list, what) in [(false, &m.set, "set"), (true, &m.add, "add")] {
            for (j, h) in list.iter().enumerate() {
                put(
                    r,
                    side,
                    add,
                    (&h.name, &h.value),
                    false,
                    &format!("{at}.{what}[{j}]"),
                )?;
            }
        }
    }
    if out.redirect.is_some() && out.rewrite.is_some() {
        return Err((
            String::new(),
            "RequestRedirect and URLRewrite cannot be used together".into(),
        ));
    }
    Ok(out)
}

/// A `CORS` filter (Gateway API's `HTTPCORSFilter`): origins may hold `*` wildcards;
/// `maxAge` defaults to 5 seconds, as the spec says.
fn gateway_cors(c: HrCors, at: &str) -> Result<super::cors::Cors, FieldError> {
    use super::cors;
    let mut origins = Vec::new();
    for (i, o) in c.allow_origins.iter().enumerate() {
        origins.push(cors::wildcard_origin(o).map_err(|e| (format!("{at}.allowOrigins[{i}]"), e))?);
    }
    let list =
        |items: &[String], name: &str| cors::list(items).map_err(|e| (format!("{at}.{name}"), e));
    Ok(cors::Cors {
        origins,
        methods: list(&c.allow_methods, "allowMethods")?,
        headers: list(&c.allow_headers, "allowHeaders")?,
        expose: list(&c.expose_headers, "exposeHeaders")?,
        max_age: Some(HeaderValue::from(c.max_age.unwrap_or(5))),
        credentials: c.allow_credentials.unwrap_or(false),
        ignore_unmatched: false,
    })
}

/// A `RequestMirror` filter, checked: a core Service, and `percent` or `fraction` (neither:
/// every request).
fn mirror_filter(m: HrMirror, at: &str) -> Result<MirrorRef, FieldError> {
    let b = m.backend_ref;
    if !super::resources::core_service(&b.group, &b.kind) {
        return Err((
            format!("{at}.backendRef.kind"),
            "only Service backends are supported".into(),
        ));
    }
    let share = match (m.percent, m.fraction) {
        (None, None) => 100.0,
        (Some(p), None) if p <= 100 => f64::from(p),
        (None, Some(f)) => {
            let d = f.denominator.unwrap_or(100);
            if d == 0 || f.numerator > d {
                return Err((
                    format!("{at}.fraction"),
                    format!(
                        "{}/{d}: the numerator must not exceed a denominator above 0",
                        f.numerator
                    ),
                ));
            }
            f64::from(f.numerator) * 100.0 / f64::from(d)
        }
        (Some(p), None) => {
            return Err((
                format!("{at}.percent"),
                format!("{p} is not between 0 and 100"),
            ))
        }
        (Some(_), Some(_)) => {
            return Err((at.to_string(), "percent and fraction are exclusive".into()))
        }
    };
    Ok(MirrorRef {
        name: b.name,
        namespace: b.namespace,
        port: b.port,
        share,
    })
}

/// A Gateway API path modifier (`URLRewrite` or `RequestRedirect` `path`).
fn path_modifier(p: HrPathModifier, at: &str) -> Result<PathRewrite, FieldError> {
    let r = match (p.kind.as_str(), p.replace_full_path, p.replace_prefix_match) {
        ("ReplaceFullPath", Some(v), None) => PathRewrite::Full(v),
        ("ReplacePrefixMatch", None, Some(v)) => PathRewrite::Segments(v),
        (kind, _, _) => {
            return Err((
                at.to_string(),
                format!("type {kind:?} with its one field (ReplaceFullPath: replaceFullPath, ReplacePrefixMatch: replacePrefixMatch)"),
            ))
        }
    };
    let v = match &r {
        PathRewrite::Full(v) | PathRewrite::Segments(v) | PathRewrite::Prefix(v) => v,
        PathRewrite::Regex(_) => return Ok(r),
    };
    if !(v.starts_with('/') || v.is_empty() && matches!(r, PathRewrite::Segments(_))) {
        return Err((at.to_string(), format!("{v:?} is not a path")));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(y: &str) -> Result<HeaderRules, FieldError> {
        serde_yaml_ng::from_str::<VsHeaders>(y).unwrap().rules()
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn values<'a>(h: &'a HeaderMap, n: &str) -> Vec<&'a str> {
        h.get_all(n).iter().map(|v| v.to_str().unwrap()).collect()
    }

    #[test]
    fn remove_then_set_then_add() {
        let r = vs("request:\n  set: {x-env: prod, X-Mixed: Case}\n  add: {x-tag: route, x-env: more}\n  remove: [x-secret, x-env]\nresponse:\n  remove: [server]\n").unwrap();
        let mut h = map(&[
            ("x-env", "client"),
            ("x-tag", "client"),
            ("x-secret", "s"),
            ("x-keep", "k"),
        ]);
        r.request.apply(&mut h);
        assert_eq!(
            values(&h, "x-env"),
            ["prod", "more"],
            "removed, set, then added to"
        );
        assert_eq!(values(&h, "x-tag"), ["client", "route"]);
        assert_eq!(
            values(&h, "x-mixed"),
            ["Case"],
            "names are case-insensitive, values kept"
        );
        assert!(h.get("x-secret").is_none());
        assert_eq!(values(&h, "x-keep"), ["k"]);
        let mut resp = map(&[("server", "upstream"), ("x-a", "1")]);
        r.response.apply(&mut resp);
        assert!(resp.get("server").is_none());
        assert_eq!(values(&resp, "x-a"), ["1"]);
        assert!(r.authority.is_none());
    }

    #[test]
    fn host_is_an_authority_rewrite_and_connection_headers_are_refused() {
        let r = vs("request:\n  set: {Host: reviews-v2.default.svc.cluster.local}\n").unwrap();
        assert_eq!(
            r.authority.as_deref(),
            Some("reviews-v2.default.svc.cluster.local")
        );
        assert!(r.request.is_empty());
        let r = vs("request:\n  set: {':authority': other:9080}\n").unwrap();
        assert_eq!(r.authority.as_deref(), Some("other:9080"));
        for (y, field) in [
            ("request:\n  add: {host: x}\n", "request.add.host"),
            ("request:\n  remove: [host]\n", "request.remove[0]"),
            (
                "request:\n  set: {connection: close}\n",
                "request.set.connection",
            ),
            (
                "response:\n  set: {transfer-encoding: chunked}\n",
                "response.set.transfer-encoding",
            ),
            ("request:\n  set: {':path': /x}\n", "request.set.:path"),
            ("response:\n  set: {host: x}\n", "response.set.host"),
            ("request:\n  set: {'bad name': x}\n", "request.set.bad name"),
            (
                "request:\n  set: {x-a: \"line\\nbreak\"}\n",
                "request.set.x-a",
            ),
        ] {
            let e = vs(y).unwrap_err();
            assert_eq!(e.0, field, "{y}: {e:?}");
        }
        assert!(serde_yaml_ng::from_str::<VsHeaders>("request: {append: {a: b}}\n").is_err());
    }

    #[test]
    fn envoy_substitutions_are_refused_and_double_percent_is_a_percent() {
        let r = vs("request:\n  set: {x-rate: 100%%}\n").unwrap();
        assert_eq!(r.request.set[0].1, "100%");
        let e = vs("request:\n  set: {x-peer: '%DOWNSTREAM_REMOTE_ADDRESS%'}\n").unwrap_err();
        assert_eq!(e.0, "request.set.x-peer");
        assert!(e.1.contains("substitutions are not supported"), "{}", e.1);
    }

    #[test]
    fn gateway_filters_modify_headers_and_refuse_the_rest() {
        let f: Vec<serde_yaml_ng::Value> = serde_yaml_ng::from_str(
            "- type: RequestHeaderModifier\n  requestHeaderModifier:\n    set: [{name: x-env, value: '50%'}]\n    add: [{name: x-tag, value: gw}]\n    remove: [x-secret]\n- type: ResponseHeaderModifier\n  responseHeaderModifier:\n    add: [{name: x-route, value: r1}]\n",
        )
        .unwrap();
        let r = gateway_filters(&f, false).unwrap().headers;
        assert_eq!(r.request.set[0].1, "50%", "Gateway API values are literal");
        assert_eq!(r.request.add.len(), 1);
        assert_eq!(r.request.remove, [HeaderName::from_static("x-secret")]);
        assert_eq!(r.response.add[0].0, "x-route");
        for (y, field) in [
            ("- type: URLRewrite\n  urlRewrite: {path: {type: ReplaceFullPath, replacePrefixMatch: /}}\n", "[0].urlRewrite.path"),
            ("- type: URLRewrite\n  urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: x}}\n", "[0].urlRewrite.path"),
            ("- type: RequestRedirect\n  requestRedirect: {statusCode: 200}\n", "[0].requestRedirect.statusCode"),
            ("- type: ExtensionRef\n  extensionRef: {group: example.io, kind: Filter, name: x}\n", "[0].type"),
            ("- type: RequestMirror\n  requestMirror: {backendRef: {name: m}, percent: 101}\n", "[0].requestMirror.percent"),
            ("- type: RequestMirror\n  requestMirror: {backendRef: {name: m}, percent: 5, fraction: {numerator: 1}}\n", "[0].requestMirror"),
            ("- type: RequestMirror\n  requestMirror: {backendRef: {name: m}, fraction: {numerator: 3, denominator: 2}}\n", "[0].requestMirror.fraction"),
            ("- type: RequestMirror\n  requestMirror: {backendRef: {kind: ServiceImport, name: m}}\n", "[0].requestMirror.backendRef.kind"),
            ("- type: RequestHeaderModifier\n", "[0].requestHeaderModifier"),
            ("- type: RequestHeaderModifier\n  requestHeaderModifier: {set: [{name: a, value: b}]}\n- type: RequestHeaderModifier\n  requestHeaderModifier: {remove: [c]}\n", "[1].type"),
            ("- type: ResponseHeaderModifier\n  responseHeaderModifier: {remove: [content-length]}\n", "[0].responseHeaderModifier.remove[0]"),
        ] {
            let f: Vec<serde_yaml_ng::Value> = serde_yaml_ng::from_str(y).unwrap();
            let e = gateway_filters(&f, true).unwrap_err();
            assert_eq!(e.0, field, "{y}: {e:?}");
        }
    }

    #[test]
    fn authorities_split_and_take_the_shadow_suffix_before_the_port() {
        for (a, want) in [
            ("reviews:9080", ("reviews", Some(9080))),
            ("reviews", ("reviews", None)),
            ("[::1]:80", ("[::1]", Some(80))),
            ("[::1]", ("[::1]", None)),
            ("::1", ("::1", None)),
            ("host:http", ("host:http", None)),
        ] {
            assert_eq!(split_authority(a), want, "{a}");
        }
        assert_eq!(shadow_authority("reviews:9080"), "reviews-shadow:9080");
        assert_eq!(
            shadow_authority("reviews.default.svc"),
            "reviews.default.svc-shadow"
        );
        assert_eq!(shadow_authority("[fd00::1]:80"), "[fd00::1]-shadow:80");
    }

    #[test]
    fn a_gateway_cors_filter_takes_wildcard_origins_and_a_default_max_age() {
        let f: Vec<serde_yaml_ng::Value> = serde_yaml_ng::from_str(
            "- type: CORS\n  cors: {allowOrigins: ['https://*.example.com'], allowMethods: [GET, PUT], allowCredentials: true}\n",
        )
        .unwrap();
        let c = gateway_filters(&f, true).unwrap().cors.unwrap();
        assert!(c.origins[0].matches("https://app.example.com"));
        assert!(!c.origins[0].matches("https://example.com"));
        assert_eq!(c.methods.unwrap(), "GET,PUT");
        assert_eq!(c.max_age.unwrap(), "5");
        assert!(c.credentials);
        let twice = [f[0].clone(), f[0].clone()];
        assert_eq!(gateway_filters(&twice, true).unwrap_err().0, "[1].type");
        assert_eq!(gateway_filters(&f, false).unwrap_err().0, "[0].type");
    }

    #[test]
    fn gateway_mirrors_may_repeat_and_take_a_percent_or_a_fraction() {
        let f: Vec<serde_yaml_ng::Value> = serde_yaml_ng::from_str(
            "- type: RequestMirror\n  requestMirror: {backendRef: {name: a, port: 80}}\n- type: RequestMirror\n  requestMirror: {backendRef: {group: '', kind: Service, name: b, namespace: other}, fraction: {numerator: 1, denominator: 8}}\n- type: RequestMirror\n  requestMirror: {backendRef: {name: c}, percent: 30}\n",
        )
        .unwrap();
        let m = gateway_filters(&f, true).unwrap().mirrors;
        let got: Vec<_> = m
            .iter()
            .map(|m| (m.name.as_str(), m.namespace.as_deref(), m.port, m.share))
            .collect();
        assert_eq!(
            got,
            [
                ("a", None, Some(80), 100.0),
                ("b", Some("other"), None, 12.5),
                ("c", None, None, 30.0)
            ]
        );
        assert_eq!(
            gateway_filters(&f, false).unwrap_err().0,
            "[0].type",
            "not on a backendRef"
        );
    }

    #[test]
    fn regex_rewrites_replace_every_match_with_capture_groups() {
        let r = PathRewrite::Regex(
            RegexRewrite::new("^/service/([^/]+)(/.*)$", "\\2/instance/\\1").unwrap(),
        );
        assert_eq!(r.apply("/service/foo/v1/api", 0), "/v1/api/instance/foo");
        let all = PathRewrite::Regex(RegexRewrite::new("one", "two$").unwrap());
        assert_eq!(
            all.apply("/one/one", 0),
            "/two$/two$",
            "every match; `$` is literal"
        );
        assert!(RegexRewrite::new("(", "x").is_err());
    }

    #[test]
    fn path_rewrites_as_envoy_and_gateway_api_define_them() {
        let prefix = PathRewrite::Prefix("/v2".into());
        assert_eq!(prefix.apply("/api/x", 4), "/v2/x", "prefix /api");
        assert_eq!(prefix.apply("/api", 4), "/v2", "exact /api");
        assert_eq!(
            prefix.apply("/x", 1),
            "/v2x",
            "no uri match: `/` was matched"
        );
        let seg = |v: &str, path: &str, matched: usize| {
            PathRewrite::Segments(v.into()).apply(path, matched)
        };
        assert_eq!(seg("/xyz", "/foo/bar", 4), "/xyz/bar");
        assert_eq!(seg("/xyz", "/foo", 4), "/xyz");
        assert_eq!(seg("/", "/foo/bar", 4), "/bar");
        assert_eq!(seg("/", "/foo", 4), "/");
        assert_eq!(seg("/xyz/", "/foo/bar", 4), "/xyz/bar");
        assert_eq!(seg("/xyz", "/foo", 0), "/xyz/foo", "prefix `/`");
        assert_eq!(
            PathRewrite::Full("/new".into()).apply("/any/thing", 4),
            "/new"
        );
        let f: Vec<serde_yaml_ng::Value> = serde_yaml_ng::from_str(
            "- type: URLRewrite\n  urlRewrite: {hostname: other.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}\n",
        )
        .unwrap();
        let g = gateway_filters(&f, true).unwrap();
        assert_eq!(
            g.rewrite,
            Some(Rewrite {
                path: Some(PathRewrite::Segments("/v2".into())),
                authority: Some("other.example".into())
            })
        );
        assert_eq!(
            gateway_filters(&f, false).unwrap_err().0,
            "[0].type",
            "not on a backendRef"
        );
    }

    #[test]
    fn redirect_locations_keep_what_they_do_not_replace() {
        let r = |scheme: Option<&str>, host: Option<&str>, port, code| Redirect {
            scheme: scheme.map(Into::into),
            host: host.map(Into::into),
            port,
            path: None,
            code,
        };
        let keep = r(None, None, RedirectPort::Keep, 301);
        assert_eq!(
            keep.location("reviews:9080", "/a", Some("x=1")),
            "http://reviews:9080/a?x=1"
        );
        assert_eq!(keep.location("reviews", "/a", None), "http://reviews/a");
        assert_eq!(
            keep.location("[fd00::1]:80", "/", None),
            "http://[fd00::1]:80/"
        );
        let moved = r(
            Some("https"),
            Some("example.com"),
            RedirectPort::Default,
            302,
        );
        assert_eq!(
            moved.location("reviews:9080", "/a", None),
            "https://example.com/a"
        );
        let port = r(None, Some("v2"), RedirectPort::Set(8080), 308);
        assert_eq!(
            port.location("reviews:9080", "/a", None),
            "http://v2:8080/a"
        );
        let f: Vec<serde_yaml_ng::Value> = serde_yaml_ng::from_str(
            "- type: RequestRedirect\n  requestRedirect: {scheme: https, hostname: example.com, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}\n- type: URLRewrite\n  urlRewrite: {hostname: x}\n",
        )
        .unwrap();
        assert!(gateway_filters(&f, true)
            .unwrap_err()
            .1
            .contains("cannot be used together"));
        let g = gateway_filters(&f[..1], true).unwrap().redirect.unwrap();
        assert_eq!(
            (g.code, g.port),
            (302, RedirectPort::Default),
            "Gateway API's default code"
        );
    }
}

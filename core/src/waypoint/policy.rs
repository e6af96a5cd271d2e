//! L7 authorization in the waypoint, with Istio's `AuthorizationPolicy` semantics:
//!
//! 1. If any DENY policy matches the request, it is denied.
//! 2. If no ALLOW policy applies, it is allowed; otherwise it is allowed only if one matches.
//! 3. AUDIT policies only mark what they match (the access log's `audit` field).
//!
//! A rule matches when every part it has matches: one of its `from` sources, one of its `to`
//! operations, and every `when` condition. An ALLOW policy with no rules matches nothing (denies
//! all); `rules: [{}]` matches everything. Values use Istio's forms: exact, `prefix*`,
//! `*suffix`, and `*` (present).

use std::{collections::BTreeMap, net::IpAddr};

use serde::Deserialize;

/// What the policy governs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyTarget {
    /// Everything through the waypoint.
    All,
    /// Requests to these services (`namespace/hostname`).
    Services(Vec<String>),
}

impl PolicyTarget {
    /// Whether a request to `service` is governed.
    pub fn covers(&self, service: Option<&str>) -> bool {
        match self {
            PolicyTarget::All => true,
            PolicyTarget::Services(s) => service.is_some_and(|svc| s.iter().any(|x| x == svc)),
        }
    }
}

/// The action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Allow what matches.
    Allow,
    /// Deny what matches.
    Deny,
    /// Mark what matches in the access log.
    Audit,
    /// Ask the extension provider about what matches (external authorization).
    Custom,
}

/// One parsed policy.
#[derive(Debug, Clone)]
pub struct L7Policy {
    /// `AuthorizationPolicy ns/name`.
    pub name: String,
    /// Its namespace.
    pub namespace: String,
    /// What it governs.
    pub target: PolicyTarget,
    /// Its action.
    pub action: Action,
    /// CUSTOM: the extension provider's name.
    pub provider: Option<String>,
    rules: Vec<Rule>,
}

#[derive(Debug, Clone, Default)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

#[derive(Debug, Clone, Default)]
struct Source {
    principals: Vec<String>,
    not_principals: Vec<String>,
    request_principals: Vec<String>,
    not_request_principals: Vec<String>,
    namespaces: Vec<String>,
    not_namespaces: Vec<String>,
    ip_blocks: Vec<ipnet::IpNet>,
    not_ip_blocks: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Default)]
struct Operation {
    hosts: Vec<String>,
    not_hosts: Vec<String>,
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    methods: Vec<String>,
    not_methods: Vec<String>,
    paths: Vec<String>,
    not_paths: Vec<String>,
}

#[derive(Debug, Clone)]
enum Key {
    Header(String),
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
    DestinationIp,
    /// `request.auth.principal`: the verified JWT's `iss/sub`.
    RequestPrincipal,
    /// `request.auth.claims[a][b]...`, and `audiences` (`aud`) and `presenter` (`azp`).
    Claim(Vec<String>),
}

#[derive(Debug, Clone)]
struct Condition {
    key: Key,
    values: Vec<String>,
    not_values: Vec<String>,
}

/// What a policy looks at in one request.
#[derive(Debug)]
pub struct RequestContext<'a> {
    /// The peer's principal without `spiffe://` (`cluster.local/ns/default/sa/sleep`).
    pub principal: Option<&'a str>,
    /// The peer's namespace (from its identity).
    pub namespace: Option<&'a str>,
    /// The client's address (from the CONNECT's `Forwarded`, else the peer's).
    pub source_ip: IpAddr,
    /// The destination (the CONNECT's authority).
    pub destination: std::net::SocketAddr,
    /// The service the request is for.
    pub service: Option<&'a str>,
    /// Method.
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// Host, without a port.
    pub host: &'a str,
    /// Request headers.
    pub headers: &'a http::HeaderMap,
    /// The request's verified JWT, if it carried one (RequestAuthentication).
    pub auth: Option<&'a super::jwt::Authenticated>,
    /// Not HTTP (relayed as TCP): HTTP-only fields cannot be evaluated. As Istio, an ALLOW rule
    /// that needs them does not match, a DENY rule that has them matches on its other fields.
    pub tcp: bool,
}

/// The outcome for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed here; `audit` when an AUDIT policy matched; `check`: the extension provider a
    /// CUSTOM policy asks to decide too.
    Allow {
        /// An AUDIT policy matched.
        audit: bool,
        /// A matching CUSTOM policy's provider.
        check: Option<String>,
    },
    /// Denied, with the reason for the log.
    Deny(String),
}

/// Istio's value match: exact, `prefix*`, `*suffix`, `*`.
pub(super) fn value_matches(pattern: &str, v: &str, ignore_case: bool) -> bool {
    let eq = |a: &str, b: &str| match ignore_case {
        true => a.eq_ignore_ascii_case(b),
        false => a == b,
    };
    if pattern == "*" {
        return !v.is_empty();
    }
    if let Some(p) = pattern.strip_suffix('*') {
        return v.len() >= p.len() && v.is_char_boundary(p.len()) && eq(&v[..p.len()], p);
    }
    if let Some(s) = pattern.strip_prefix('*') {
        return v.len() >= s.len()
            && v.is_char_boundary(v.len() - s.len())
            && eq(&v[v.len() - s.len()..], s);
    }
    eq(pattern, v)
}

/// `values` empty: no constraint; else one must match. `not` values must all miss.
fn field(values: &[String], not: &[String], v: Option<&str>, ignore_case: bool) -> bool {
    let any =
        |list: &[String]| v.is_some_and(|v| list.iter().any(|p| value_matches(p, v, ignore_case)));
    (values.is_empty() || any(values)) && (not.is_empty() || !any(not))
}

impl Source {
    fn matches(&self, c: &RequestContext<'_>, deny: bool) -> bool {
        let ip_in = |blocks: &[ipnet::IpNet]| blocks.iter().any(|b| b.contains(&c.source_ip));
        let jwt = !(self.request_principals.is_empty() && self.not_request_principals.is_empty());
        // Request principals are HTTP-only: ignored for DENY, never matching for ALLOW on TCP.
        let request_principal = match (c.tcp && jwt, deny) {
            (true, true) => true,
            (true, false) => false,
            (false, _) => field(
                &self.request_principals,
                &self.not_request_principals,
                c.auth.map(|a| a.principal.as_str()),
                false,
            ),
        };
        request_principal
            && field(&self.principals, &self.not_principals, c.principal, false)
            && field(&self.namespaces, &self.not_namespaces, c.namespace, false)
            && (self.ip_blocks.is_empty() || ip_in(&self.ip_blocks))
            && (self.not_ip_blocks.is_empty() || !ip_in(&self.not_ip_blocks))
    }
}

impl Operation {
    fn http_only(&self) -> bool {
        !(self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty())
    }

    fn matches(&self, c: &RequestContext<'_>, deny: bool) -> bool {
        let port = c.destination.port();
        if c.tcp && self.http_only() {
            // The HTTP fields are ignored for DENY (stricter) and never match for ALLOW.
            return deny
                && (self.ports.is_empty() || self.ports.contains(&port))
                && !self.not_ports.contains(&port);
        }
        field(&self.hosts, &self.not_hosts, Some(c.host), true)
            && field(&self.methods, &self.not_methods, Some(c.method), false)
            && field(&self.paths, &self.not_paths, Some(c.path), false)
            && (self.ports.is_empty() || self.ports.contains(&port))
            && !self.not_ports.contains(&port)
    }
}

impl Condition {
    fn matches(&self, c: &RequestContext<'_>, deny: bool) -> bool {
        if c.tcp
            && matches!(
                self.key,
                Key::Header(_) | Key::RequestPrincipal | Key::Claim(_)
            )
        {
            return deny;
        }
        // Claims and headers can hold several values: each is matched on its own (a repeated
        // header as Envoy's RBAC matches it since CVE-2026-26308), so `x-role: user` beside
        // `x-role: admin` meets a DENY on admin, and never only the first value counts.
        let many = match &self.key {
            Key::Claim(path) => Some(
                c.auth
                    .map(|a| super::jwt::claim_values(&a.claims, path))
                    .unwrap_or_default(),
            ),
            Key::Header(h) => Some(
                c.headers
                    .get_all(h.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect(),
            ),
            _ => None,
        };
        if let Some(vals) = many {
            let any = |list: &[String]| {
                vals.iter()
                    .any(|v| list.iter().any(|p| value_matches(p, v, false)))
            };
            return (self.values.is_empty() || any(&self.values))
                && (self.not_values.is_empty() || !any(&self.not_values));
        }
        let owned;
        let v: Option<&str> = match &self.key {
            Key::Header(_) | Key::Claim(_) => None,
            Key::SourceIp => {
                owned = c.source_ip.to_string();
                Some(&owned)
            }
            Key::SourceNamespace => c.namespace,
            Key::SourcePrincipal => c.principal,
            Key::RequestPrincipal => c.auth.map(|a| a.principal.as_str()),
            Key::DestinationPort => {
                owned = c.destination.port().to_string();
                Some(&owned)
            }
            Key::DestinationIp => {
                owned = c.destination.ip().to_string();
                Some(&owned)
            }
        };
        match &self.key {
            Key::SourceIp | Key::DestinationIp => {
                let ip = v.and_then(|v| v.parse::<IpAddr>().ok());
                let in_list = |list: &[String]| {
                    ip.is_some_and(|ip| {
                        list.iter().any(|b| match b.parse::<ipnet::IpNet>() {
                            Ok(n) => n.contains(&ip),
                            Err(_) => b.parse::<IpAddr>().ok() == Some(ip),
                        })
                    })
                };
                (self.values.is_empty() || in_list(&self.values))
                    && (self.not_values.is_empty() || !in_list(&self.not_values))
            }
            _ => field(&self.values, &self.not_values, v, false),
        }
    }
}

impl Rule {
    fn matches(&self, c: &RequestContext<'_>, deny: bool) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(c, deny)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(c, deny)))
            && self.when.iter().all(|w| w.matches(c, deny))
    }
}

impl L7Policy {
    fn matches(&self, c: &RequestContext<'_>) -> bool {
        let deny = self.action == Action::Deny;
        self.rules.iter().any(|r| r.matches(c, deny))
    }

    /// Build from a parsed spec; errors name the field.
    pub(super) fn from_spec(
        name: String,
        namespace: String,
        target: PolicyTarget,
        s: ApSpec,
    ) -> Result<Self, (String, String)> {
        let action = match s.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => Action::Audit,
            "CUSTOM" => Action::Custom,
            a => return Err(("action".into(), format!("unknown action {a:?}"))),
        };
        let mut rules = Vec::new();
        for (i, r) in s.rules.unwrap_or_default().into_iter().enumerate() {
            let at = |f: String| format!("rules[{i}].{f}");
            let mut rule = Rule::default();
            for (j, f) in r.from.into_iter().enumerate() {
                let src = f.source;
                let blocks = |v: Vec<String>, what: &str| {
                    v.iter()
                        .map(|b| {
                            b.parse::<ipnet::IpNet>()
                                .or_else(|_| b.parse::<IpAddr>().map(ipnet::IpNet::from))
                                .map_err(|_| {
                                    (
                                        at(format!("from[{j}].source.{what}")),
                                        format!("{b:?} is not an IP or CIDR"),
                                    )
                                })
                        })
                        .collect::<Result<Vec<_>, _>>()
                };
                let mut ip_blocks = blocks(src.ip_blocks, "ipBlocks")?;
                ip_blocks.extend(blocks(src.remote_ip_blocks, "remoteIpBlocks")?);
                let mut not_ip_blocks = blocks(src.not_ip_blocks, "notIpBlocks")?;
                not_ip_blocks.extend(blocks(src.not_remote_ip_blocks, "notRemoteIpBlocks")?);
                rule.from.push(Source {
                    principals: src.principals,
                    not_principals: src.not_principals,
                    request_principals: src.request_principals,
                    not_request_principals: src.not_request_principals,
                    namespaces: src.namespaces,
                    not_namespaces: src.not_namespaces,
                    ip_blocks,
                    not_ip_blocks,
                });
            }
            for (j, t) in r.to.into_iter().enumerate() {
                let o = t.operation;
                let ports = |v: Vec<String>, what: &str| {
                    v.iter()
                        .map(|p| {
                            p.parse::<u16>().map_err(|_| {
                                (
                                    at(format!("to[{j}].operation.{what}")),
                                    format!("{p:?} is not a port"),
                                )
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()
                };
                rule.to.push(Operation {
                    hosts: o.hosts,
                    not_hosts: o.not_hosts,
                    ports: ports(o.ports, "ports")?,
                    not_ports: ports(o.not_ports, "notPorts")?,
                    methods: o.methods,
                    not_methods: o.not_methods,
                    paths: o.paths,
                    not_paths: o.not_paths,
                });
            }
            for (j, w) in r.when.into_iter().enumerate() {
                let key = match w.key.as_str() {
                    "source.ip" | "remote.ip" => Key::SourceIp,
                    "source.namespace" => Key::SourceNamespace,
                    "source.principal" => Key::SourcePrincipal,
                    "destination.port" => Key::DestinationPort,
                    "destination.ip" => Key::DestinationIp,
                    "request.auth.principal" => Key::RequestPrincipal,
                    "request.auth.audiences" => Key::Claim(vec!["aud".into()]),
                    "request.auth.presenter" => Key::Claim(vec!["azp".into()]),
                    k if k.starts_with("request.auth.claims[") => {
                        claim_path(&k["request.auth.claims".len()..]).ok_or_else(|| {
                            (
                                at(format!("when[{j}].key")),
                                format!("{k:?}: request.auth.claims[name] or [name][nested]"),
                            )
                        })?
                    }
                    k => match k
                        .strip_prefix("request.headers[")
                        .and_then(|h| h.strip_suffix(']'))
                    {
                        Some(h) => Key::Header(h.to_ascii_lowercase()),
                        None => {
                            return Err((
                                at(format!("when[{j}].key")),
                                format!("condition key {k:?} is not supported"),
                            ))
                        }
                    },
                };
                if w.values.is_empty() && w.not_values.is_empty() {
                    return Err((
                        at(format!("when[{j}]")),
                        "values or notValues is required".into(),
                    ));
                }
                rule.when.push(Condition {
                    key,
                    values: w.values,
                    not_values: w.not_values,
                });
            }
            rules.push(rule);
        }
        let provider = match (action, s.provider) {
            (Action::Custom, Some(p)) => Some(p.name),
            (Action::Custom, None) => {
                return Err(("provider.name".into(), "required for CUSTOM".into()))
            }
            (_, Some(_)) => return Err(("provider".into(), "only for action CUSTOM".into())),
            (_, None) => None,
        };
        Ok(Self {
            name,
            namespace,
            target,
            action,
            provider,
            rules,
        })
    }
}

/// `[a][b]` -> a claim path.
fn claim_path(s: &str) -> Option<Key> {
    let mut path = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (name, after) = rest.strip_prefix('[')?.split_once(']')?;
        if name.is_empty() {
            return None;
        }
        path.push(name.to_string());
        rest = after;
    }
    (!path.is_empty()).then_some(Key::Claim(path))
}

/// Decide one request against `policies`.
pub fn decide(policies: &[L7Policy], c: &RequestContext<'_>) -> Decision {
    let mut allows = false;
    let mut allowed = false;
    let mut audit = false;
    let mut check = None;
    for p in policies.iter().filter(|p| p.target.covers(c.service)) {
        match p.action {
            // Like ALLOW, HTTP-only fields never match a TCP stream.
            Action::Custom if check.is_none() && p.matches(c) => check = p.provider.clone(),
            Action::Custom => {}
            Action::Deny if p.matches(c) => {
                return Decision::Deny(format!("denied by {}", p.name));
            }
            Action::Deny => {}
            Action::Allow => {
                allows = true;
                allowed = allowed || p.matches(c);
            }
            Action::Audit => audit = audit || p.matches(c),
        }
    }
    if allows && !allowed {
        return Decision::Deny("no ALLOW policy matched".into());
    }
    Decision::Allow { audit, check }
}

// --- The spec as users write it -----------------------------------------------------------

/// `spec` of an AuthorizationPolicy.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ApSpec {
    #[serde(default)]
    pub(super) selector: Option<Selector>,
    #[serde(default)]
    pub(super) target_ref: Option<TargetRef>,
    #[serde(default)]
    pub(super) target_refs: Vec<TargetRef>,
    #[serde(default)]
    action: Option<String>,
    #[serde(default)]
    provider: Option<ApProvider>,
    #[serde(default)]
    rules: Option<Vec<ApRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApProvider {
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Selector {
    #[serde(default)]
    pub(super) match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct TargetRef {
    #[serde(default)]
    pub(super) group: Option<String>,
    pub(super) kind: String,
    pub(super) name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApRule {
    #[serde(default)]
    from: Vec<From>,
    #[serde(default)]
    to: Vec<To>,
    #[serde(default)]
    when: Vec<When>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct From {
    source: ApSource,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ApSource {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    request_principals: Vec<String>,
    #[serde(default)]
    not_request_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<String>,
    #[serde(default)]
    not_ip_blocks: Vec<String>,
    #[serde(default)]
    remote_ip_blocks: Vec<String>,
    #[serde(default)]
    not_remote_ip_blocks: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct To {
    operation: ApOperation,
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ApOperation {
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    not_ports: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct When {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str, target: PolicyTarget) -> L7Policy {
        let s: ApSpec = serde_yaml_ng::from_str(yaml).unwrap();
        L7Policy::from_spec(
            "AuthorizationPolicy default/p".into(),
            "default".into(),
            target,
            s,
        )
        .unwrap()
    }

    fn ctx<'a>(principal: &'a str, method: &'a str, h: &'a http::HeaderMap) -> RequestContext<'a> {
        RequestContext {
            principal: Some(principal),
            namespace: principal.split('/').nth(2),
            source_ip: "10.0.0.1".parse().unwrap(),
            destination: "10.96.0.20:9080".parse().unwrap(),
            service: Some("default/productpage.default.svc.cluster.local"),
            method,
            path: "/productpage",
            host: "productpage",
            headers: h,
            auth: None,
            tcp: false,
        }
    }

    /// Security review L1: a repeated header is matched value by value, as Envoy's RBAC
    /// matches it since CVE-2026-26308: `x-role: user` + `x-role: admin` meets a DENY on
    /// admin (only the first value counted before) and an ALLOW on user; notValues hold only
    /// when no value matches.
    #[test]
    fn repeated_headers_are_matched_value_by_value() {
        let mut h = http::HeaderMap::new();
        h.append("x-role", "user".parse().unwrap());
        h.append("x-role", "admin".parse().unwrap());
        let c = ctx("cluster.local/ns/default/sa/sleep", "GET", &h);
        let when = |action: &str, field: &str, v: &str| {
            policy(
                &format!("action: {action}\nrules:\n- when:\n  - key: request.headers[x-role]\n    {field}: [\"{v}\"]\n"),
                PolicyTarget::All,
            )
        };
        assert!(matches!(
            decide(&[when("DENY", "values", "admin")], &c),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide(&[when("ALLOW", "values", "user")], &c),
            Decision::Allow { .. }
        ));
        assert!(matches!(
            decide(&[when("ALLOW", "values", "user,admin")], &c),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide(&[when("ALLOW", "notValues", "admin")], &c),
            Decision::Deny(_)
        ));
        let one = {
            let mut h = http::HeaderMap::new();
            h.insert("x-role", "user".parse().unwrap());
            h
        };
        let c1 = ctx("cluster.local/ns/default/sa/sleep", "GET", &one);
        assert!(matches!(
            decide(&[when("ALLOW", "notValues", "admin")], &c1),
            Decision::Allow { .. }
        ));
    }

    #[test]
    fn custom_policies_name_the_provider_to_ask_and_deny_still_wins() {
        let h = http::HeaderMap::new();
        let c = ctx("cluster.local/ns/default/sa/sleep", "GET", &h);
        let custom = policy(
            "action: CUSTOM\nprovider: {name: authz}\nrules:\n- to:\n  - operation:\n      paths: [\"/product*\"]\n",
            PolicyTarget::All,
        );
        assert_eq!(
            decide(std::slice::from_ref(&custom), &c),
            Decision::Allow {
                audit: false,
                check: Some("authz".into())
            }
        );
        let deny = policy("action: DENY\nrules:\n- {}\n", PolicyTarget::All);
        assert!(matches!(
            decide(&[custom.clone(), deny], &c),
            Decision::Deny(_)
        ));
        let tcp = RequestContext {
            tcp: true,
            ..ctx("cluster.local/ns/default/sa/sleep", "", &h)
        };
        assert_eq!(
            decide(&[custom], &tcp),
            Decision::Allow {
                audit: false,
                check: None
            },
            "paths never match a TCP stream"
        );
        for (y, field) in [
            ("action: CUSTOM\nrules:\n- {}\n", "provider.name"),
            ("action: ALLOW\nprovider: {name: a}\n", "provider"),
        ] {
            let s: ApSpec = serde_yaml_ng::from_str(y).unwrap();
            let e = L7Policy::from_spec("p".into(), "default".into(), PolicyTarget::All, s)
                .unwrap_err();
            assert_eq!(e.0, field, "{y}");
        }
    }

    #[test]
    fn request_principals_and_claims_come_from_the_verified_token() {
        let auth = super::super::jwt::Authenticated {
            principal: "testing@secure.istio.io/alice".into(),
            claims: serde_json::from_str(
                r#"{"groups":["dev","ops"],"aud":"bookinfo","org":{"team":"reviews"}}"#,
            )
            .unwrap(),
        };
        let h = http::HeaderMap::new();
        let with = |a| RequestContext {
            auth: a,
            ..ctx("cluster.local/ns/default/sa/sleep", "GET", &h)
        };
        let any_token = [policy(
            "rules:\n- from:\n  - source:\n      requestPrincipals: [\"*\"]\n",
            PolicyTarget::All,
        )];
        assert_eq!(
            decide(&any_token, &with(Some(&auth))),
            Decision::Allow {
                audit: false,
                check: None
            }
        );
        assert!(
            matches!(decide(&any_token, &with(None)), Decision::Deny(_)),
            "no token"
        );
        let no_token = [policy(
            "action: DENY\nrules:\n- from:\n  - source:\n      notRequestPrincipals: [\"*\"]\n",
            PolicyTarget::All,
        )];
        assert!(matches!(decide(&no_token, &with(None)), Decision::Deny(_)));
        assert_eq!(
            decide(&no_token, &with(Some(&auth))),
            Decision::Allow {
                audit: false,
                check: None
            }
        );
        let claims = [policy(
            "rules:\n- when:\n  - key: request.auth.claims[groups]\n    values: [ops]\n  - key: request.auth.claims[org][team]\n    values: [rev*]\n  - key: request.auth.audiences\n    values: [bookinfo]\n  - key: request.auth.principal\n    values: [\"testing@secure.istio.io/*\"]\n",
            PolicyTarget::All,
        )];
        assert_eq!(
            decide(&claims, &with(Some(&auth))),
            Decision::Allow {
                audit: false,
                check: None
            }
        );
        assert!(matches!(decide(&claims, &with(None)), Decision::Deny(_)));
        let admins = [policy(
            "rules:\n- when:\n  - key: request.auth.claims[groups]\n    values: [admin]\n",
            PolicyTarget::All,
        )];
        assert!(matches!(
            decide(&admins, &with(Some(&auth))),
            Decision::Deny(_)
        ));
        let s: ApSpec = serde_yaml_ng::from_str(
            "rules:\n- when:\n  - key: request.auth.claims[]\n    values: [x]\n",
        )
        .unwrap();
        let e =
            L7Policy::from_spec("p".into(), "default".into(), PolicyTarget::All, s).unwrap_err();
        assert_eq!(e.0, "rules[0].when[0].key");
    }

    #[test]
    fn the_seeds_get_only_policy() {
        let p = policy(
            "action: ALLOW\nrules:\n- from:\n  - source:\n      principals: [cluster.local/ns/default/sa/sleep]\n  to:\n  - operation:\n      methods: [\"GET\"]\n",
            PolicyTarget::All,
        );
        let h = http::HeaderMap::new();
        let ps = [p];
        assert_eq!(
            decide(&ps, &ctx("cluster.local/ns/default/sa/sleep", "GET", &h)),
            Decision::Allow {
                audit: false,
                check: None
            }
        );
        assert!(matches!(
            decide(&ps, &ctx("cluster.local/ns/default/sa/sleep", "POST", &h)),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide(&ps, &ctx("cluster.local/ns/default/sa/notsleep", "GET", &h)),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn deny_wins_empty_allow_denies_all_and_audit_marks() {
        let h: http::HeaderMap = [(
            http::header::HeaderName::from_static("x-user"),
            http::HeaderValue::from_static("mallory"),
        )]
        .into_iter()
        .collect();
        let deny = policy(
            "action: DENY\nrules:\n- when:\n  - key: request.headers[X-User]\n    values: [\"mal*\"]\n",
            PolicyTarget::All,
        );
        let allow_all = policy("rules:\n- {}\n", PolicyTarget::All);
        let c = ctx("cluster.local/ns/default/sa/sleep", "GET", &h);
        assert!(matches!(
            decide(&[allow_all.clone(), deny], &c),
            Decision::Deny(_)
        ));
        let nothing = policy("action: ALLOW\n", PolicyTarget::All);
        assert!(matches!(decide(&[nothing], &c), Decision::Deny(_)));
        let audit = policy(
            "action: AUDIT\nrules:\n- to:\n  - operation:\n      paths: [\"/product*\"]\n",
            PolicyTarget::All,
        );
        assert_eq!(
            decide(&[audit, allow_all], &c),
            Decision::Allow {
                audit: true,
                check: None
            }
        );
        let other = policy(
            "action: DENY\nrules:\n- {}\n",
            PolicyTarget::Services(vec!["default/reviews.default.svc.cluster.local".into()]),
        );
        assert_eq!(
            decide(&[other], &c),
            Decision::Allow {
                audit: false,
                check: None
            }
        );
    }
}

//! External authorization (`AuthorizationPolicy` with `action: CUSTOM`): the extension providers
//! of Istio's mesh config (the `istio` ConfigMap's `data.mesh`, `extensionProviders`), of which
//! zring's waypoint calls `envoyExtAuthzHttp` ones as Envoy's HTTP `ext_authz` filter does: a
//! check request with the original method, the path under `pathPrefix`, the authority, and the
//! headers the provider names (plus `authorization`), no body; 200 allows (copying
//! `headersToUpstreamOnAllow` into the request), anything else is the answer the client gets
//! (its status, body and `headersToDownstreamOnDeny`); no answer within `timeout` denies with
//! `statusOnError` (403) unless `failOpen`.

use std::time::Duration;

use serde::Deserialize;

/// One extension provider.
#[derive(Debug, Clone)]
pub enum Provider {
    /// `envoyExtAuthzHttp`.
    Http(HttpProvider),
    /// Another kind (`envoyExtAuthzGrpc`, tracing, logging): named, not callable here.
    Other { name: String, kind: String },
}

impl Provider {
    pub fn name(&self) -> &str {
        match self {
            Provider::Http(h) => &h.name,
            Provider::Other { name, .. } => name,
        }
    }
}

/// An `envoyExtAuthzHttp` provider.
#[derive(Debug, Clone)]
pub struct HttpProvider {
    pub name: String,
    /// The authorization service's hostname (`ext-authz.foo.svc.cluster.local`).
    pub service: String,
    pub port: u16,
    pub path_prefix: String,
    /// Request headers copied into the check (lower case; `prefix*` and `*suffix` allowed).
    pub include_headers: Vec<String>,
    /// Headers added to every check.
    pub additional_headers: Vec<(String, String)>,
    /// Check-response headers copied into the allowed request.
    pub to_upstream_on_allow: Vec<String>,
    /// Check-response headers copied into a denial (empty: all of them).
    pub to_downstream_on_deny: Vec<String>,
    pub timeout: Duration,
    pub fail_open: bool,
    pub status_on_error: u16,
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

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HttpSpec {
    service: String,
    port: serde_yaml_ng::Value,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default)]
    status_on_error: Option<String>,
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
    #[serde(default)]
    include_request_body_in_check: Option<serde_yaml_ng::Value>,
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
        let s: HttpSpec =
            serde_yaml_ng::from_value(spec.clone()).map_err(|e| (at.clone(), e.to_string()))?;
        if s.include_request_body_in_check.is_some() {
            return Err((
                format!("{at}.includeRequestBodyInCheck"),
                "not supported by zring's waypoint (refused rather than ignored)".into(),
            ));
        }
        if !s.headers_to_downstream_on_allow.is_empty() {
            return Err((
                format!("{at}.headersToDownstreamOnAllow"),
                "not supported by zring's waypoint (refused rather than ignored)".into(),
            ));
        }
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
        let service = s
            .service
            .split_once('/')
            .map_or(s.service.as_str(), |(_, h)| h)
            .to_string();
        let lower = |v: Vec<String>| {
            v.into_iter()
                .map(|h| h.to_ascii_lowercase())
                .collect::<Vec<_>>()
        };
        out.push(Provider::Http(HttpProvider {
            name,
            service,
            port,
            path_prefix: s.path_prefix.unwrap_or_default(),
            include_headers: lower(s.include_request_headers_in_check),
            additional_headers: s
                .include_additional_headers_in_check
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            to_upstream_on_allow: lower(s.headers_to_upstream_on_allow),
            to_downstream_on_deny: lower(s.headers_to_downstream_on_deny),
            timeout,
            fail_open: s.fail_open,
            status_on_error,
        }));
    }
    Ok(out)
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
            (h.service.as_str(), h.port, h.status_on_error),
            ("ext-authz.foo.svc.cluster.local", 8000, 403)
        );
        assert_eq!(h.include_headers, ["x-ext-authz"]);
        assert_eq!(h.timeout, Duration::from_secs(600));
        assert!(matches!(&p[1], Provider::Other { kind, .. } if kind == "envoyExtAuthzGrpc"));
        assert_eq!(p[2].name(), "otel");
        for (bad, field) in [
            ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: s, port: x}\n", "extensionProviders[0].envoyExtAuthzHttp.port"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: s, port: 1, statusOnError: \"9\"}\n", "extensionProviders[0].envoyExtAuthzHttp.statusOnError"),
            ("extensionProviders:\n- name: a\n  envoyExtAuthzHttp: {service: s, port: 1, includeRequestBodyInCheck: {}}\n", "extensionProviders[0].envoyExtAuthzHttp.includeRequestBodyInCheck"),
            ("extensionProviders:\n- envoyExtAuthzHttp: {service: s, port: 1}\n", "extensionProviders[0].name"),
        ] {
            assert_eq!(providers(bad).unwrap_err().0, field, "{bad}");
        }
        assert!(listed(&["x-ext-*".into()], "x-ext-authz"));
        assert!(!listed(&["x-ext-authz".into()], "x-other"));
    }
}

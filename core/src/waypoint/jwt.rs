//! Request authentication with JWTs, as Istio's `RequestAuthentication` configures Envoy's
//! `jwt_authn` filter in a waypoint: a request may carry no token (it passes, with no request
//! principal); a token it carries must verify against a rule of its issuer (signature with the
//! rule's JWKS, `exp`/`nbf` with 60 s of clock skew, `aud` against the rule's audiences) or the
//! request is answered 401. A verified token gives the request principal `iss/sub` and its
//! claims to authorization (`requestPrincipals`, `request.auth.*`).
//!
//! Keys come inline (`jwks`) or from `jwksUri` (http or https, fetched when the rules are read
//! and again every 5 minutes, as Envoy caches them; a key set that cannot be fetched leaves the
//! issuer with no keys, so its tokens are refused until a later fetch works: closed, not open).
//! RSA (RS256/384/512, PS256/384/512), EC (ES256, ES384) and Ed25519 (EdDSA) keys are verified
//! with ring.

use std::{
    io::{Read, Write},
    net::{TcpStream, ToSocketAddrs},
    sync::Arc,
    time::Duration,
};

use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::policy::PolicyTarget;

/// Clock skew allowed on `exp` and `nbf` (Envoy's default).
const SKEW_SECS: u64 = 60;

fn b64url(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
}

#[derive(Debug, Clone)]
enum KeyKind {
    Rsa { n: Vec<u8>, e: Vec<u8> },
    P256(Vec<u8>),
    P384(Vec<u8>),
    Ed25519(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Key {
    kid: Option<String>,
    alg: Option<String>,
    kind: KeyKind,
}

impl Key {
    /// Verify `sig` over `msg` with this key for the token's `alg` (a key only verifies the
    /// algorithms of its type, so a token cannot pick a weaker one).
    fn verify(&self, alg: &str, msg: &[u8], sig: &[u8]) -> bool {
        use ring::signature as s;
        if self.alg.as_deref().is_some_and(|a| a != alg) {
            return false;
        }
        match (&self.kind, alg) {
            (KeyKind::Rsa { n, e }, _) => {
                let params: &s::RsaParameters = match alg {
                    "RS256" => &s::RSA_PKCS1_2048_8192_SHA256,
                    "RS384" => &s::RSA_PKCS1_2048_8192_SHA384,
                    "RS512" => &s::RSA_PKCS1_2048_8192_SHA512,
                    "PS256" => &s::RSA_PSS_2048_8192_SHA256,
                    "PS384" => &s::RSA_PSS_2048_8192_SHA384,
                    "PS512" => &s::RSA_PSS_2048_8192_SHA512,
                    _ => return false,
                };
                s::RsaPublicKeyComponents { n, e }
                    .verify(params, msg, sig)
                    .is_ok()
            }
            (KeyKind::P256(p), "ES256") => {
                s::UnparsedPublicKey::new(&s::ECDSA_P256_SHA256_FIXED, p)
                    .verify(msg, sig)
                    .is_ok()
            }
            (KeyKind::P384(p), "ES384") => {
                s::UnparsedPublicKey::new(&s::ECDSA_P384_SHA384_FIXED, p)
                    .verify(msg, sig)
                    .is_ok()
            }
            (KeyKind::Ed25519(p), "EdDSA") => s::UnparsedPublicKey::new(&s::ED25519, p)
                .verify(msg, sig)
                .is_ok(),
            _ => false,
        }
    }
}

#[derive(Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
}

/// The signing keys of a JWKS document; errors name the key.
fn parse_jwks(text: &str) -> Result<Vec<Key>, String> {
    let set: Jwks = serde_json::from_str(text).map_err(|e| format!("not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for (i, k) in set.keys.into_iter().enumerate() {
        if k.usage.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let part = |v: &Option<String>, name: &str| {
            v.as_deref()
                .and_then(b64url)
                .ok_or_else(|| format!("keys[{i}].{name}: missing or not base64url"))
        };
        let kind = match (k.kty.as_str(), k.crv.as_deref()) {
            ("RSA", _) => KeyKind::Rsa {
                n: part(&k.n, "n")?,
                e: part(&k.e, "e")?,
            },
            ("EC", Some(crv @ ("P-256" | "P-384"))) => {
                let mut point = vec![4u8];
                point.extend(part(&k.x, "x")?);
                point.extend(part(&k.y, "y")?);
                match crv {
                    "P-256" => KeyKind::P256(point),
                    _ => KeyKind::P384(point),
                }
            }
            ("OKP", Some("Ed25519")) => KeyKind::Ed25519(part(&k.x, "x")?),
            (kty, crv) => {
                return Err(format!(
                "keys[{i}]: key type {kty:?}{} is not supported (RSA, EC P-256/P-384, OKP Ed25519)",
                crv.map(|c| format!(" curve {c:?}")).unwrap_or_default()
            ))
            }
        };
        keys.push(Key {
            kid: k.kid,
            alg: k.alg,
            kind,
        });
    }
    if keys.is_empty() {
        return Err("no signing key".into());
    }
    Ok(keys)
}

/// Where a token is looked for.
#[derive(Debug, Clone, PartialEq)]
enum Location {
    /// A header, the token after `prefix`.
    Header(HeaderName, String),
    /// A query parameter.
    Param(String),
    /// A cookie (`Cookie: name=token`).
    Cookie(String),
}

/// One `jwtRules` entry.
#[derive(Debug, Clone)]
pub struct JwtRule {
    pub issuer: String,
    audiences: Vec<String>,
    keys: Vec<Key>,
    /// `jwksUri`, when the keys come from there.
    remote: Option<String>,
    locations: Vec<Location>,
    forward_original_token: bool,
    output_payload_to_header: Option<HeaderName>,
    output_claim_to_headers: Vec<(HeaderName, String)>,
}

/// A `RequestAuthentication` attached to this waypoint.
#[derive(Debug, Clone)]
pub struct RequestAuthn {
    /// `RequestAuthentication ns/name`.
    pub name: String,
    pub target: PolicyTarget,
    pub rules: Vec<JwtRule>,
}

/// `spec` of a RequestAuthentication.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RaSpec {
    #[serde(default)]
    pub(super) selector: Option<super::policy::Selector>,
    #[serde(default)]
    pub(super) target_ref: Option<super::policy::TargetRef>,
    #[serde(default)]
    pub(super) target_refs: Vec<super::policy::TargetRef>,
    #[serde(default)]
    pub(super) jwt_rules: Vec<RaRule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(super) struct RaRule {
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    jwks_uri: Option<String>,
    #[serde(default)]
    jwks: Option<String>,
    #[serde(default)]
    from_headers: Vec<RaHeader>,
    #[serde(default)]
    from_params: Vec<String>,
    #[serde(default)]
    from_cookies: Vec<String>,
    #[serde(default)]
    output_payload_to_header: Option<String>,
    #[serde(default)]
    forward_original_token: bool,
    #[serde(default)]
    output_claim_to_headers: Vec<RaClaimHeader>,
    #[serde(default)]
    timeout: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RaHeader {
    name: String,
    #[serde(default)]
    prefix: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RaClaimHeader {
    header: String,
    claim: String,
}

fn header_name(n: &str, at: &str) -> Result<HeaderName, (String, String)> {
    HeaderName::from_bytes(n.as_bytes())
        .map_err(|_| (at.to_string(), format!("{n:?} is not a header name")))
}

impl RequestAuthn {
    /// Build from a parsed spec; errors name the field below `spec`.
    pub(super) fn from_spec(
        name: String,
        target: PolicyTarget,
        s: RaSpec,
    ) -> Result<Self, (String, String)> {
        let mut rules = Vec::new();
        for (i, r) in s.jwt_rules.into_iter().enumerate() {
            let at = |f: &str| format!("jwtRules[{i}].{f}");
            if r.issuer.is_empty() {
                return Err((at("issuer"), "required".into()));
            }
            let timeout = match r.timeout.as_deref() {
                Some(t) => super::resources::duration(t).map_err(|e| (at("timeout"), e))?,
                None => DEFAULT_FETCH_TIMEOUT,
            };
            let (keys, remote) = match (r.jwks, r.jwks_uri) {
                (Some(j), _) => (parse_jwks(&j).map_err(|e| (at("jwks"), e))?, None),
                (None, Some(uri)) => {
                    if !(uri.starts_with("http://") || uri.starts_with("https://")) {
                        return Err((at("jwksUri"), format!("{uri:?}: an http or https URI")));
                    }
                    let keys = match fetch(&uri, timeout, None).and_then(|t| parse_jwks(&t)) {
                        Ok(k) => k,
                        Err(e) => {
                            tracing::warn!(issuer = %r.issuer, uri = %uri, error = %e, "JWKS not fetched: tokens of this issuer are refused until a later fetch works");
                            Vec::new()
                        }
                    };
                    (keys, Some(uri))
                }
                (None, None) => {
                    return Err((
                        at("jwks"),
                        "required: jwks or jwksUri (the issuer's keys)".into(),
                    ))
                }
            };
            let mut locations = Vec::new();
            for (j, h) in r.from_headers.iter().enumerate() {
                let n = header_name(
                    &h.name.to_ascii_lowercase(),
                    &at(&format!("fromHeaders[{j}].name")),
                )?;
                locations.push(Location::Header(n, h.prefix.clone()));
            }
            locations.extend(r.from_params.into_iter().map(Location::Param));
            locations.extend(r.from_cookies.into_iter().map(Location::Cookie));
            if locations.is_empty() {
                // Envoy's defaults: `Authorization: Bearer <token>`, or `?access_token=`.
                locations.push(Location::Header(
                    http::header::AUTHORIZATION,
                    "Bearer ".into(),
                ));
                locations.push(Location::Param("access_token".into()));
            }
            let output_payload_to_header = r
                .output_payload_to_header
                .as_deref()
                .map(|h| header_name(&h.to_ascii_lowercase(), &at("outputPayloadToHeader")))
                .transpose()?;
            let mut output_claim_to_headers = Vec::new();
            for (j, c) in r.output_claim_to_headers.into_iter().enumerate() {
                let n = header_name(
                    &c.header.to_ascii_lowercase(),
                    &at(&format!("outputClaimToHeaders[{j}].header")),
                )?;
                output_claim_to_headers.push((n, c.claim));
            }
            rules.push(JwtRule {
                issuer: r.issuer,
                audiences: r.audiences,
                keys,
                remote,
                locations,
                forward_original_token: r.forward_original_token,
                output_payload_to_header,
                output_claim_to_headers,
            });
        }
        Ok(RequestAuthn {
            name,
            target,
            rules,
        })
    }

    /// When the rules should be read again for their keys: every 5 minutes when some come
    /// from a `jwksUri`, every 30 s while one of those could not be fetched; never otherwise.
    pub fn refetch_after(&self) -> Option<Duration> {
        self.rules
            .iter()
            .filter(|r| r.remote.is_some())
            .map(|r| match r.keys.is_empty() {
                true => Duration::from_secs(30),
                false => Duration::from_secs(300),
            })
            .min()
    }
}

/// How long a `jwksUri` fetch may take (Envoy's default remote JWKS timeout is 5 s).
const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest key set read.
const FETCH_LIMIT: u64 = 1 << 20;

/// Trusted roots for https fetches: `SSL_CERT_FILE`, else the system bundle.
fn roots(file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let path = match (file, std::env::var_os("SSL_CERT_FILE")) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(p)) => p.into(),
        (None, None) => "/etc/ssl/certs/ca-certificates.crt".into(),
    };
    let mut store = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&path)
        .map_err(|e| format!("trusted roots {}: {e}", path.display()))?;
    for c in certs.flatten() {
        let _ = store.add(c);
    }
    if store.is_empty() {
        return Err(format!("no trusted roots in {}", path.display()));
    }
    Ok(store)
}

/// GET `uri` (http or https, HTTP/1.1, `Connection: close`), within `timeout` per step; the
/// body of a 200 answer. `roots_file` overrides where https finds its trusted roots.
pub(super) fn fetch(
    uri: &str,
    timeout: Duration,
    roots_file: Option<&std::path::Path>,
) -> Result<String, String> {
    let (tls, rest) = match (uri.strip_prefix("https://"), uri.strip_prefix("http://")) {
        (Some(r), _) => (true, r),
        (None, Some(r)) => (false, r),
        _ => return Err(format!("{uri:?} is not an http or https URI")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = super::headers::split_authority(authority);
    let port = port.unwrap_or(if tls { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addr = (bare, port)
        .to_socket_addrs()
        .map_err(|e| format!("{authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority}: no address"))?;
    let tcp = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    let _ = tcp.set_read_timeout(Some(timeout));
    let _ = tcp.set_write_timeout(Some(timeout));
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nAccept: application/json\r\nUser-Agent: zring\r\nConnection: close\r\n\r\n"
    );
    let mut raw = Vec::new();
    let read = |s: &mut dyn Read, raw: &mut Vec<u8>| match s.take(FETCH_LIMIT).read_to_end(raw) {
        // A peer that closes without TLS's close_notify still sent a whole answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => Ok(()),
        r => r.map(|_| ()),
    };
    if tls {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(roots_file)?)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(bare.to_string())
            .map_err(|e| format!("{bare}: {e}"))?;
        let conn =
            rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        s.write_all(req.as_bytes())
            .map_err(|e| format!("{uri}: {e}"))?;
        read(&mut s, &mut raw).map_err(|e| format!("{uri}: {e}"))?;
    } else {
        let mut s = tcp;
        s.write_all(req.as_bytes())
            .map_err(|e| format!("{uri}: {e}"))?;
        read(&mut s, &mut raw).map_err(|e| format!("{uri}: {e}"))?;
    }
    let mut heads = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut heads);
    let head_len = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(format!("{uri}: not an HTTP answer")),
    };
    if resp.code != Some(200) {
        return Err(format!("{uri}: answered {}", resp.code.unwrap_or(0)));
    }
    let chunked = resp.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            && String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .contains("chunked")
    });
    let body = &raw[head_len..];
    let body = match chunked {
        false => body.to_vec(),
        true => dechunk(body).ok_or_else(|| format!("{uri}: bad chunked body"))?,
    };
    String::from_utf8(body).map_err(|_| format!("{uri}: not UTF-8"))
}

/// A chunked body's bytes.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Authenticated {
    /// `iss/sub`, as authorization policies name request principals.
    pub principal: String,
    /// The payload's claims.
    pub claims: Map<String, Value>,
}

/// The outcome of request authentication.
#[derive(Debug, PartialEq)]
pub enum Outcome {
    /// No token: the request goes on without a request principal.
    Missing,
    Verified(Authenticated),
    /// A token that did not verify: answer 401 with this reason (Envoy's wording).
    Failed(&'static str),
}

fn find_token(loc: &Location, h: &HeaderMap, query: Option<&str>) -> Option<String> {
    match loc {
        Location::Header(n, prefix) => h.get_all(n).iter().find_map(|v| {
            let v = v.to_str().ok()?;
            let t = match prefix.is_empty() {
                true => Some(v),
                false => v
                    .get(..prefix.len())
                    .filter(|p| p.eq_ignore_ascii_case(prefix))
                    .map(|_| &v[prefix.len()..]),
            }?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        }),
        Location::Param(p) => super::headers::query_pairs(query)
            .find_map(|(k, v)| (k == p && !v.is_empty()).then(|| v.to_string())),
        Location::Cookie(c) => super::headers::cookie(h, c).map(str::to_string),
    }
}

/// Check `token` against the rules of its issuer, at `now` (seconds since the epoch).
fn verify<'a>(
    rules: &[&'a JwtRule],
    token: &str,
    now: u64,
) -> Result<(&'a JwtRule, Map<String, Value>, String), &'static str> {
    const MALFORMED: &str =
        "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections";
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(MALFORMED);
    };
    let json = |s: &str| -> Option<Map<String, Value>> { serde_json::from_slice(&b64url(s)?).ok() };
    let (Some(header), Some(claims), Some(sig)) = (json(h), json(p), b64url(s)) else {
        return Err("Jwt header or payload is an invalid JSON");
    };
    let Some(iss) = claims.get("iss").and_then(Value::as_str) else {
        return Err("Jwt issuer is not configured");
    };
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    let kid = header.get("kid").and_then(Value::as_str);
    let msg = &token.as_bytes()[..h.len() + 1 + p.len()];
    let mut of_issuer = rules.iter().filter(|r| r.issuer == iss).peekable();
    if of_issuer.peek().is_none() {
        return Err("Jwt issuer is not configured");
    }
    for rule in of_issuer {
        let signed = rule
            .keys
            .iter()
            .filter(|k| kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
            .any(|k| k.verify(alg, msg, &sig));
        if !signed {
            continue;
        }
        let exp = numeric_date(&claims, "exp", "Jwt payload exp is not a NumericDate")?;
        let nbf = numeric_date(&claims, "nbf", "Jwt payload nbf is not a NumericDate")?;
        let iat = numeric_date(&claims, "iat", "Jwt payload iat is not a NumericDate")?;
        if exp.is_some_and(|exp| now > exp.saturating_add(SKEW_SECS)) {
            return Err("Jwt is expired");
        }
        if nbf.is_some_and(|nbf| now.saturating_add(SKEW_SECS) < nbf) {
            return Err("Jwt not yet valid");
        }
        if iat.is_some_and(|iat| now.saturating_add(SKEW_SECS) < iat) {
            return Err("Jwt was issued in the future");
        }
        if !rule.audiences.is_empty() {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => rule.audiences.contains(a),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|a| rule.audiences.iter().any(|x| x == a)),
                _ => false,
            };
            if !ok {
                return Err("Audiences in Jwt are not allowed");
            }
        }
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
        let principal = format!("{iss}/{sub}");
        return Ok((rule, claims, principal));
    }
    Err("Jwt verification fails")
}

/// A NumericDate claim (RFC 7519 section 2): a JSON number of seconds, fractions allowed and
/// truncated (as Envoy); a string, a negative or a value past `u64` is refused with `bad`
/// rather than read as absent (which would switch the check off).
fn numeric_date(
    claims: &Map<String, Value>,
    name: &str,
    bad: &'static str,
) -> Result<Option<u64>, &'static str> {
    let Some(v) = claims.get(name) else {
        return Ok(None);
    };
    let n = v.as_number().ok_or(bad)?;
    if let Some(u) = n.as_u64() {
        return Ok(Some(u));
    }
    match n.as_f64() {
        // 2^64: the first value `as u64` would saturate at.
        Some(f) if (0.0..18_446_744_073_709_551_616.0).contains(&f) => Ok(Some(f as u64)),
        _ => Err(bad),
    }
}

/// Authenticate a request to `service` with the RequestAuthentications in force: find its
/// token, verify it, and on success apply the rule's header changes to `h` (the token's header
/// removed unless `forwardOriginalToken`, the payload or claims copied to headers).
pub fn authenticate(
    policies: &[RequestAuthn],
    service: Option<&str>,
    h: &mut HeaderMap,
    query: Option<&str>,
    now: u64,
) -> Outcome {
    let rules: Vec<&JwtRule> = policies
        .iter()
        .filter(|p| p.target.covers(service))
        .flat_map(|p| &p.rules)
        .collect();
    if rules.is_empty() {
        return Outcome::Missing;
    }
    // The headers the rules write from a verified token are the waypoint's alone: whatever
    // the client sent under those names goes first, token or not, so a backend that trusts
    // them can never be fed a client's value.
    for r in &rules {
        if let Some(n) = &r.output_payload_to_header {
            h.remove(n);
        }
        for (n, _) in &r.output_claim_to_headers {
            h.remove(n);
        }
    }
    // Every token the rules' locations hold; each must verify (Envoy's requires_any with
    // allow_missing: a missing token passes, a bad one does not).
    let mut found: Vec<(String, &Location)> = Vec::new();
    for r in &rules {
        for loc in &r.locations {
            if let Some(t) = find_token(loc, h, query) {
                if !found.iter().any(|(f, _)| *f == t) {
                    found.push((t, loc));
                }
            }
        }
    }
    if found.is_empty() {
        return Outcome::Missing;
    }
    // Every token must verify, as in Envoy: a good token beside a bad one must not carry the
    // bad one to a backend that may read it. The first one found gives the principal.
    let mut verified = Vec::with_capacity(found.len());
    for (t, loc) in &found {
        match verify(&rules, t, now) {
            Ok(v) => verified.push((v, *loc)),
            Err(why) => return Outcome::Failed(why),
        }
    }
    for ((rule, _, _), loc) in &verified {
        if let (false, Location::Header(n, _)) = (rule.forward_original_token, loc) {
            h.remove(n);
        }
    }
    let token = &found[0].0;
    let ((rule, claims, principal), _) = verified.swap_remove(0);
    if let Some(n) = &rule.output_payload_to_header {
        if let Some(v) = token
            .split('.')
            .nth(1)
            .and_then(|p| HeaderValue::from_str(p).ok())
        {
            h.insert(n.clone(), v);
        }
    }
    for (n, claim) in &rule.output_claim_to_headers {
        let v = match claims.get(claim) {
            Some(Value::String(s)) => s.clone(),
            Some(v @ (Value::Number(_) | Value::Bool(_))) => v.to_string(),
            _ => continue,
        };
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(n.clone(), v);
        }
    }
    Outcome::Verified(Authenticated { principal, claims })
}

/// The values of claim path `path` (`["groups"]`, `["a", "b"]` for nested), as strings: a
/// string claim's value, an array's string items.
pub fn claim_values<'a>(claims: &'a Map<String, Value>, path: &[String]) -> Vec<&'a str> {
    let mut v = match path.first().and_then(|k| claims.get(k)) {
        Some(v) => v,
        None => return Vec::new(),
    };
    for k in &path[1..] {
        match v.get(k) {
            Some(x) => v = x,
            None => return Vec::new(),
        }
    }
    match v {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Istio's sample JWKS and its `demo.jwt` (RS256, issuer and subject
    /// `testing@secure.istio.io`, `foo: bar`, expiring in 2118), from istio/istio's
    /// `security/tools/jwt/samples`.
    pub(crate) const ISTIO_JWKS: &str = r#"{"keys":[{"e":"AQAB","kid":"DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ","kty":"RSA","n":"xAE7eB6qugXyCAG3yhh7pkDkT65pHymX-P7KfIupjf59vsdo91bSP9C8H07pSAGQO1MV_xFj9VswgsCg4R6otmg5PV2He95lZdHtOcU5DXIg_pbhLdKXbi66GlVeK6ABZOUW3WYtnNHD-91gVuoeJT_DwtGGcp4ignkgXfkiEm4sw-4sfb4qdt5oLbyVpmW6x9cfa7vs2WTfURiCrBoUqgBo_-4WTiULmmHSGZHOjzwa8WtrtOQGsAFjIbno85jp6MnGGGZPYZbDAa_b3y5u-YpW7ypZrvD8BgtKVjgtQgZhLAGezMt0ua3DRrWnKqTZ0BJ_EyxOGuHJrLsn00fnMQ"}]}"#;
    pub(crate) const ISTIO_DEMO_JWT: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IkRIRmJwb0lVcXJZOHQyenBBMnFYZkNtcjVWTzVaRXI0UnpIVV8tZW52dlEiLCJ0eXAiOiJKV1QifQ.eyJleHAiOjQ2ODU5ODk3MDAsImZvbyI6ImJhciIsImlhdCI6MTUzMjM4OTcwMCwiaXNzIjoidGVzdGluZ0BzZWN1cmUuaXN0aW8uaW8iLCJzdWIiOiJ0ZXN0aW5nQHNlY3VyZS5pc3Rpby5pbyJ9.CfNnxWP2tcnR9q0vxyxweaF3ovQYHYZl82hAUsn21bwQd9zP7c-LS9qd_vpdLG4Tn1A15NxfCjp5f7QNBUo-KC9PJqYpgGbaXhaGx7bEdFWjcwv3nZzvc7M__ZpaCERdwU7igUmJqYGBYQ51vr2njU9ZimyKkfDe3axcyiBZde7G6dabliUosJvvKOPcKIWPccCgefSj_GNfwIip3-SsFdlR7BtbVUcqR-yv-XOxJ3Uc1MI0tz3uMiiZcyPV7sNCU4KRnemRIMHVOfuvHsU60_GhGbiSFzgPTAa9WTltbnarTbxudb_YEOx12JiwYToeX0DCPb43W1tzIBxgm8NxUg";

    fn authn(rule_yaml: &str) -> Vec<RequestAuthn> {
        let s: RaSpec = serde_yaml_ng::from_str(rule_yaml).unwrap();
        vec![RequestAuthn::from_spec(
            "RequestAuthentication default/jwt".into(),
            PolicyTarget::All,
            s,
        )
        .unwrap()]
    }

    fn istio_rule(extra: &str) -> Vec<RequestAuthn> {
        authn(&format!(
            "jwtRules:\n- issuer: testing@secure.istio.io\n  jwks: '{ISTIO_JWKS}'\n{extra}"
        ))
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {t}").parse().unwrap());
        h
    }

    const NOW: u64 = 1_800_000_000;

    #[test]
    fn istios_demo_token_verifies_with_its_jwks_and_tampering_fails() {
        let p = istio_rule("");
        let mut h = bearer(ISTIO_DEMO_JWT);
        let Outcome::Verified(a) = authenticate(&p, None, &mut h, None, NOW) else {
            panic!("verified")
        };
        assert_eq!(
            a.principal,
            "testing@secure.istio.io/testing@secure.istio.io"
        );
        assert_eq!(claim_values(&a.claims, &["foo".into()]), ["bar"]);
        assert!(
            h.get("authorization").is_none(),
            "the token is not forwarded by default"
        );
        // The same token from the default query parameter.
        let q = format!("x=1&access_token={ISTIO_DEMO_JWT}");
        assert!(matches!(
            authenticate(&p, None, &mut HeaderMap::new(), Some(&q), NOW),
            Outcome::Verified(_)
        ));
        // One byte of the payload changed: the signature no longer holds.
        let mut parts: Vec<String> = ISTIO_DEMO_JWT.split('.').map(str::to_string).collect();
        let mut claims: Map<String, Value> =
            serde_json::from_slice(&b64url(&parts[1]).unwrap()).unwrap();
        claims.insert("foo".into(), "baz".into());
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&claims).unwrap());
        let forged = parts.join(".");
        assert_eq!(
            authenticate(&p, None, &mut bearer(&forged), None, NOW),
            Outcome::Failed("Jwt verification fails")
        );
        assert_eq!(
            authenticate(&p, None, &mut bearer("abc.def"), None, NOW),
            Outcome::Failed(
                "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
            )
        );
        assert_eq!(
            authenticate(&p, None, &mut HeaderMap::new(), None, NOW),
            Outcome::Missing
        );
        assert_eq!(
            authenticate(
                &p,
                None,
                &mut bearer(ISTIO_DEMO_JWT),
                None,
                4_685_989_700 + 61
            ),
            Outcome::Failed("Jwt is expired")
        );
    }

    #[test]
    fn issuers_audiences_locations_and_outputs_follow_the_rule() {
        let other = authn(&format!(
            "jwtRules:\n- issuer: someone-else\n  jwks: '{ISTIO_JWKS}'\n"
        ));
        assert_eq!(
            authenticate(&other, None, &mut bearer(ISTIO_DEMO_JWT), None, NOW),
            Outcome::Failed("Jwt issuer is not configured")
        );
        let aud = istio_rule("  audiences: [bookinfo]\n");
        assert_eq!(
            authenticate(&aud, None, &mut bearer(ISTIO_DEMO_JWT), None, NOW),
            Outcome::Failed("Audiences in Jwt are not allowed")
        );
        let custom = istio_rule(
            "  fromHeaders: [{name: X-Jwt, prefix: 'Token '}]\n  forwardOriginalToken: true\n  outputPayloadToHeader: x-jwt-payload\n  outputClaimToHeaders: [{header: x-foo, claim: foo}]\n",
        );
        let mut h = HeaderMap::new();
        h.insert("x-jwt", format!("token {ISTIO_DEMO_JWT}").parse().unwrap());
        assert!(matches!(
            authenticate(&custom, None, &mut h, None, NOW),
            Outcome::Verified(_)
        ));
        assert!(h.contains_key("x-jwt"), "forwarded");
        assert_eq!(h["x-foo"], "bar");
        assert_eq!(
            h["x-jwt-payload"],
            ISTIO_DEMO_JWT.split('.').nth(1).unwrap()
        );
        assert_eq!(
            authenticate(&custom, None, &mut bearer(ISTIO_DEMO_JWT), None, NOW),
            Outcome::Missing,
            "Authorization is not one of this rule's locations"
        );
    }

    #[test]
    fn every_token_a_request_carries_must_verify() {
        let p = istio_rule("");
        let mut h = bearer(ISTIO_DEMO_JWT);
        // The demo token with another signature.
        let forged = format!("{}AAAA", &ISTIO_DEMO_JWT[..ISTIO_DEMO_JWT.len() - 4]);
        let q = format!("access_token={forged}");
        assert_eq!(
            authenticate(&p, None, &mut h, Some(&q), NOW),
            Outcome::Failed("Jwt verification fails"),
            "a good header token does not carry a bad query token"
        );
        assert!(
            h.contains_key("authorization"),
            "nothing removed on failure"
        );
        let mut h = bearer(ISTIO_DEMO_JWT);
        let q = format!("x=1&access_token={ISTIO_DEMO_JWT}");
        assert!(matches!(
            authenticate(&p, None, &mut h, Some(&q), NOW),
            Outcome::Verified(_)
        ));
        assert!(
            !h.contains_key("authorization"),
            "the verified header token is removed"
        );
    }

    #[test]
    fn a_token_in_a_cookie_verifies_where_the_rule_names_the_cookie() {
        let p = istio_rule("  fromCookies: [session]\n");
        let mut h = HeaderMap::new();
        h.append("cookie", "theme=dark; session=".parse().unwrap());
        h.append(
            "cookie",
            format!("a=1; session={ISTIO_DEMO_JWT}; b=2")
                .parse()
                .unwrap(),
        );
        let Outcome::Verified(a) = authenticate(&p, None, &mut h, None, NOW) else {
            panic!("verified")
        };
        assert_eq!(
            a.principal,
            "testing@secure.istio.io/testing@secure.istio.io"
        );
        assert_eq!(
            h.get_all("cookie").iter().count(),
            2,
            "cookies are left as they were"
        );
        let mut quoted = HeaderMap::new();
        quoted.insert(
            "cookie",
            format!("session=\"{ISTIO_DEMO_JWT}\"").parse().unwrap(),
        );
        assert!(matches!(
            authenticate(&p, None, &mut quoted, None, NOW),
            Outcome::Verified(_)
        ));
        let mut bad = HeaderMap::new();
        bad.insert("cookie", "session=a.b.c".parse().unwrap());
        assert!(matches!(
            authenticate(&p, None, &mut bad, None, NOW),
            Outcome::Failed(_)
        ));
        let mut other = HeaderMap::new();
        other.insert(
            "cookie",
            format!("sessionx={ISTIO_DEMO_JWT}").parse().unwrap(),
        );
        assert_eq!(
            authenticate(&p, None, &mut other, None, NOW),
            Outcome::Missing,
            "only the named cookie"
        );
        assert_eq!(
            authenticate(&p, None, &mut bearer(ISTIO_DEMO_JWT), None, NOW),
            Outcome::Missing,
            "naming a cookie replaces the default locations"
        );
    }

    #[test]
    fn es256_and_eddsa_tokens_verify_and_alg_confusion_fails() {
        use ring::signature::{
            EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING,
        };
        let rng = ring::rand::SystemRandom::new();
        let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let ec = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let pt = ec.public_key().as_ref();
        let ed8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed = Ed25519KeyPair::from_pkcs8(ed8.as_ref()).unwrap();
        let jwks = format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"ec","x":"{}","y":"{}"}},{{"kty":"OKP","crv":"Ed25519","kid":"ed","x":"{}"}}]}}"#,
            enc(&pt[1..33]),
            enc(&pt[33..]),
            enc(ed.public_key().as_ref())
        );
        let p = authn(&format!("jwtRules:\n- issuer: me\n  jwks: '{jwks}'\n"));
        let token = |alg: &str, kid: &str, sign: &dyn Fn(&[u8]) -> Vec<u8>| {
            let head = enc(format!(r#"{{"alg":"{alg}","kid":"{kid}"}}"#).as_bytes());
            let body =
                enc(br#"{"iss":"me","sub":"alice","groups":["dev","ops"],"exp":1900000000}"#);
            let msg = format!("{head}.{body}");
            format!("{msg}.{}", enc(&sign(msg.as_bytes())))
        };
        let es = token("ES256", "ec", &|m| {
            ec.sign(&rng, m).unwrap().as_ref().to_vec()
        });
        let Outcome::Verified(a) = authenticate(&p, None, &mut bearer(&es), None, NOW) else {
            panic!("ES256")
        };
        assert_eq!(a.principal, "me/alice");
        assert_eq!(claim_values(&a.claims, &["groups".into()]), ["dev", "ops"]);
        let eddsa = token("EdDSA", "ed", &|m| ed.sign(m).as_ref().to_vec());
        assert!(matches!(
            authenticate(&p, None, &mut bearer(&eddsa), None, NOW),
            Outcome::Verified(_)
        ));
        // An EC signature presented as EdDSA, or with no algorithm at all.
        let confused = token("EdDSA", "ec", &|m| {
            ec.sign(&rng, m).unwrap().as_ref().to_vec()
        });
        let none = token("none", "ec", &|_| Vec::new());
        for t in [confused, none] {
            assert_eq!(
                authenticate(&p, None, &mut bearer(&t), None, NOW),
                Outcome::Failed("Jwt verification fails")
            );
        }
        assert_eq!(
            authenticate(&p, None, &mut bearer(&es), None, 1_900_000_000 + 61),
            Outcome::Failed("Jwt is expired")
        );
    }

    /// Security review M1 and L2: NumericDate claims are numbers (fractions truncated, as
    /// Envoy reads them); a string, a negative or a fraction can no longer switch the expiry
    /// or not-before check off. Headers the rule writes from claims never carry a client's
    /// value, with or without a token.
    #[test]
    fn time_claims_must_be_numeric_dates_and_claim_headers_are_the_waypoints_alone() {
        use ring::signature::{Ed25519KeyPair, KeyPair};
        let enc = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let rng = ring::rand::SystemRandom::new();
        let ed8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed = Ed25519KeyPair::from_pkcs8(ed8.as_ref()).unwrap();
        let jwks = format!(
            r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{}"}}]}}"#,
            enc(ed.public_key().as_ref())
        );
        let p = authn(&format!(
            "jwtRules:\n- issuer: me\n  jwks: '{jwks}'\n  outputClaimToHeaders: [{{header: x-jwt-group, claim: group}}]\n"
        ));
        let token = |claims: &str| {
            let msg = format!(
                "{}.{}",
                enc(br#"{"alg":"EdDSA"}"#),
                enc(format!(r#"{{"iss":"me","sub":"a"{claims}}}"#).as_bytes())
            );
            format!("{msg}.{}", enc(ed.sign(msg.as_bytes()).as_ref()))
        };
        let past = NOW - 3600;
        let soon = NOW + 86400;
        for (claims, want) in [
            (format!(r#","exp":{past}.5"#), "Jwt is expired"),
            (
                format!(r#","exp":"{past}""#),
                "Jwt payload exp is not a NumericDate",
            ),
            (
                r#","exp":-1"#.to_string(),
                "Jwt payload exp is not a NumericDate",
            ),
            (
                r#","exp":1e300"#.to_string(),
                "Jwt payload exp is not a NumericDate",
            ),
            (format!(r#","nbf":{soon}.5"#), "Jwt not yet valid"),
            (
                format!(r#","nbf":"{soon}""#),
                "Jwt payload nbf is not a NumericDate",
            ),
            (format!(r#","iat":{soon}"#), "Jwt was issued in the future"),
        ] {
            assert_eq!(
                authenticate(&p, None, &mut bearer(&token(&claims)), None, NOW),
                Outcome::Failed(want),
                "{claims}"
            );
        }
        // A fraction in the future is still valid; no exp at all is valid (as Envoy).
        for claims in [format!(r#","exp":{soon}.9,"nbf":{past}.1"#), String::new()] {
            assert!(matches!(
                authenticate(&p, None, &mut bearer(&token(&claims)), None, NOW),
                Outcome::Verified(_)
            ));
        }
        // A client's own x-jwt-group goes, token or not, and is written only from a claim.
        for (h, group) in [
            (HeaderMap::new(), None),
            (bearer(&token("")), None),
            (bearer(&token(r#","group":"dev""#)), Some("dev")),
        ] {
            let mut h = h;
            h.insert("x-jwt-group", "admins".parse().unwrap());
            authenticate(&p, None, &mut h, None, NOW);
            assert_eq!(
                h.get("x-jwt-group").map(|v| v.to_str().unwrap()),
                group,
                "{h:?}"
            );
        }
    }

    /// Serve `answer` (a whole HTTP response) to one connection, over TLS with `tls`.
    fn serve_once(answer: Vec<u8>, tls: Option<Arc<rustls::ServerConfig>>) -> std::net::SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut io: Box<dyn ReadWrite> = match tls {
                Some(cfg) => Box::new(rustls::StreamOwned::new(
                    rustls::ServerConnection::new(cfg).unwrap(),
                    s,
                )),
                None => Box::new(s),
            };
            let mut req = Vec::new();
            let mut b = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") && io.read(&mut b).unwrap_or(0) == 1 {
                req.push(b[0]);
            }
            if !req.starts_with(b"GET /keys/jwks.json HTTP/1.1\r\n") {
                return; // no answer: the fetch fails
            }
            let _ = io.write_all(&answer);
            let _ = io.flush();
        });
        addr
    }

    trait ReadWrite: Read + Write {}
    impl<T: Read + Write> ReadWrite for T {}

    #[test]
    fn keys_are_fetched_from_a_jwks_uri_over_http_and_https() {
        // Plain HTTP, a chunked answer.
        let chunked = format!(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{ISTIO_JWKS}\r\n0\r\n\r\n",
            ISTIO_JWKS.len()
        );
        let addr = serve_once(chunked.into_bytes(), None);
        let p = authn(&format!(
            "jwtRules:\n- issuer: testing@secure.istio.io\n  jwksUri: http://{addr}/keys/jwks.json\n"
        ));
        assert!(matches!(
            authenticate(&p, None, &mut bearer(ISTIO_DEMO_JWT), None, NOW),
            Outcome::Verified(_)
        ));
        assert_eq!(p[0].refetch_after(), Some(Duration::from_secs(300)));
        // HTTPS, trusting a self-signed certificate for localhost.
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let dir = std::env::temp_dir().join(format!("zring-jwks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let roots = dir.join("roots.pem");
        std::fs::write(&roots, cert.cert.pem()).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .unwrap();
        let plain = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{ISTIO_JWKS}",
            ISTIO_JWKS.len()
        );
        let server = Arc::new(server);
        let addr = serve_once(plain.clone().into_bytes(), Some(server.clone()));
        let uri = format!("https://localhost:{}/keys/jwks.json", addr.port());
        let got = fetch(&uri, Duration::from_secs(5), Some(&roots));
        assert_eq!(got.unwrap(), ISTIO_JWKS);
        // The same server, checked against roots that do not hold its certificate.
        let other = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&roots, other.cert.pem()).unwrap();
        let addr = serve_once(plain.into_bytes(), Some(server));
        let uri = format!("https://localhost:{}/keys/jwks.json", addr.port());
        let e = fetch(&uri, Duration::from_secs(5), Some(&roots));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            e.as_ref().is_err_and(|e| e.contains("certificate")),
            "{e:?}"
        );
    }

    #[test]
    fn keys_that_cannot_be_fetched_refuse_the_issuers_tokens() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let p = authn(&format!(
            "jwtRules:\n- issuer: testing@secure.istio.io\n  jwksUri: http://{addr}/keys/jwks.json\n  timeout: 1s\n"
        ));
        assert_eq!(
            authenticate(&p, None, &mut bearer(ISTIO_DEMO_JWT), None, NOW),
            Outcome::Failed("Jwt verification fails"),
            "closed, not open"
        );
        assert_eq!(p[0].refetch_after(), Some(Duration::from_secs(30)));
        assert_eq!(authn("jwtRules:\n- issuer: a\n  jwks: '{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"AA\",\"y\":\"AA\"}]}'\n")[0].refetch_after(), None);
    }

    #[test]
    fn rules_are_checked_when_loaded() {
        for (y, field) in [
            (
                "jwtRules:\n- issuer: a\n  jwksUri: ftp://example.com/jwks\n",
                "jwtRules[0].jwksUri",
            ),
            ("jwtRules:\n- issuer: a\n", "jwtRules[0].jwks"),
            (
                "jwtRules:\n- issuer: a\n  jwks: '{\"keys\":[{\"kty\":\"oct\",\"k\":\"AA\"}]}'\n",
                "jwtRules[0].jwks",
            ),
        ] {
            let s: RaSpec = serde_yaml_ng::from_str(y).unwrap();
            let e = RequestAuthn::from_spec("r".into(), PolicyTarget::All, s).unwrap_err();
            assert_eq!(e.0, field, "{y}: {e:?}");
        }
    }
}

//! CORS as Envoy's filter applies a route's policy (VirtualService `corsPolicy`, HTTPRoute
//! `CORS` filter): a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
//! from an allowed origin is answered by the waypoint with the allow headers; any other request
//! from an allowed origin goes upstream and its answer gets `Access-Control-Allow-Origin` (the
//! request's origin), `-Allow-Credentials` and `-Expose-Headers`. Requests from other origins
//! pass untouched; so do their preflights, unless the policy says to answer them (`IGNORE`).

use http::{header, HeaderMap, HeaderValue, Method};

use super::resources::ValueMatch;

/// A route's CORS policy, its header values made once.
#[derive(Debug, Clone)]
pub struct Cors {
    /// Origins allowed; a matcher that matches `*` allows every origin, as in Envoy.
    pub origins: Vec<ValueMatch>,
    pub methods: Option<HeaderValue>,
    pub headers: Option<HeaderValue>,
    pub expose: Option<HeaderValue>,
    pub max_age: Option<HeaderValue>,
    pub credentials: bool,
    /// A preflight from an origin not allowed is answered 200 without CORS headers (Istio's
    /// `unmatchedPreflights: IGNORE`) instead of forwarded (the default).
    pub ignore_unmatched: bool,
}

/// What CORS makes of a request.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// Not a cross-origin request, or one from an origin not allowed: as if no policy.
    Pass,
    /// From an allowed origin: forward, then add the allow headers to the answer.
    Allowed(HeaderValue),
    /// A preflight to answer here, 200 with these headers.
    Answer(HeaderMap),
}

/// Header names as one comma-separated value (None for none); errors name the bad entry.
pub fn list(items: &[String]) -> Result<Option<HeaderValue>, String> {
    if items.is_empty() {
        return Ok(None);
    }
    let joined = items.join(",");
    HeaderValue::from_str(&joined)
        .map(Some)
        .map_err(|_| format!("{joined:?} is not a header value"))
}

impl Cors {
    fn allows(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|m| m.matches("*") || m.matches(origin))
    }

    /// What to do with a request of `method` with headers `h`.
    pub fn check(&self, method: &Method, h: &HeaderMap) -> Step {
        let Some(origin) = h.get(header::ORIGIN) else {
            return Step::Pass;
        };
        let preflight =
            method == Method::OPTIONS && h.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        let allowed = origin.to_str().is_ok_and(|o| self.allows(o));
        match (preflight, allowed) {
            (true, true) => {
                let mut out = HeaderMap::new();
                out.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
                if self.credentials {
                    out.insert(
                        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                        HeaderValue::from_static("true"),
                    );
                }
                for (name, v) in [
                    (header::ACCESS_CONTROL_ALLOW_METHODS, &self.methods),
                    (header::ACCESS_CONTROL_ALLOW_HEADERS, &self.headers),
                    (header::ACCESS_CONTROL_MAX_AGE, &self.max_age),
                ] {
                    if let Some(v) = v {
                        out.insert(name, v.clone());
                    }
                }
                Step::Answer(out)
            }
            (true, false) if self.ignore_unmatched => Step::Answer(HeaderMap::new()),
            (false, true) => Step::Allowed(origin.clone()),
            _ => Step::Pass,
        }
    }

    /// The allow headers on the answer to a request from allowed `origin`.
    pub fn apply(&self, origin: &HeaderValue, h: &mut HeaderMap) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.credentials {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.expose {
            h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

/// A Gateway API origin (`https://*.example.com`, `*`) as a matcher: `*` stands for any run of
/// characters.
pub fn wildcard_origin(o: &str) -> Result<ValueMatch, String> {
    if !o.contains('*') {
        return Ok(ValueMatch::Exact(o.to_string()));
    }
    let re = o
        .split('*')
        .map(regex::escape)
        .collect::<Vec<_>>()
        .join(".*");
    regex::Regex::new(&format!("^(?:{re})$"))
        .map(ValueMatch::Regex)
        .map_err(|e| format!("origin {o:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(ignore_unmatched: bool) -> Cors {
        Cors {
            origins: vec![
                ValueMatch::Exact("https://app.example.com".into()),
                wildcard_origin("https://*.test.io").unwrap(),
            ],
            methods: list(&["GET".into(), "POST".into()]).unwrap(),
            headers: list(&["x-token".into()]).unwrap(),
            expose: list(&["x-trace".into()]).unwrap(),
            max_age: Some(HeaderValue::from_static("86400")),
            credentials: true,
            ignore_unmatched,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::HeaderName::from_static(k),
                    HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn preflights_from_allowed_origins_are_answered_others_forwarded_or_ignored() {
        let p = policy(false);
        let pre = headers(&[
            ("origin", "https://a.test.io"),
            ("access-control-request-method", "POST"),
        ]);
        let Step::Answer(h) = p.check(&Method::OPTIONS, &pre) else {
            panic!("answered")
        };
        assert_eq!(h["access-control-allow-origin"], "https://a.test.io");
        assert_eq!(h["access-control-allow-methods"], "GET,POST");
        assert_eq!(h["access-control-allow-headers"], "x-token");
        assert_eq!(h["access-control-max-age"], "86400");
        assert_eq!(h["access-control-allow-credentials"], "true");
        let other = headers(&[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ]);
        assert_eq!(p.check(&Method::OPTIONS, &other), Step::Pass);
        assert_eq!(
            policy(true).check(&Method::OPTIONS, &other),
            Step::Answer(HeaderMap::new())
        );
        // OPTIONS without the request-method header is an ordinary request.
        let plain = headers(&[("origin", "https://app.example.com")]);
        assert!(matches!(
            p.check(&Method::OPTIONS, &plain),
            Step::Allowed(_)
        ));
        assert_eq!(p.check(&Method::GET, &HeaderMap::new()), Step::Pass);
        assert_eq!(
            p.check(&Method::GET, &headers(&[("origin", "https://test.io")])),
            Step::Pass,
            "the wildcard needs a subdomain"
        );
    }

    #[test]
    fn answers_to_allowed_origins_get_the_allow_headers() {
        let p = policy(false);
        let Step::Allowed(o) = p.check(
            &Method::GET,
            &headers(&[("origin", "https://app.example.com")]),
        ) else {
            panic!("allowed")
        };
        let mut h = HeaderMap::new();
        p.apply(&o, &mut h);
        assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
        assert_eq!(h["access-control-expose-headers"], "x-trace");
        assert_eq!(h["access-control-allow-credentials"], "true");
        let star = Cors {
            origins: vec![ValueMatch::Exact("*".into())],
            ..policy(false)
        };
        assert!(matches!(
            star.check(&Method::GET, &headers(&[("origin", "https://any.where")])),
            Step::Allowed(_)
        ));
    }
}

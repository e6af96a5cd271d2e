//! Request path normalisation before anything reads the path, as Istio configures Envoy
//! (`meshConfig.pathNormalization.normalization`, istio.io's "Authorization policy
//! normalization" page): authentication, authorization and routing all see the normalised path,
//! and it is also what the backend receives, so a policy on `/admin` cannot be walked around
//! with `/%61dmin`, `/./admin` or `/public/../admin` (CVE-2021-31920 class).
//!
//! The steps run in Envoy's order (`ConnectionManagerUtility::maybeNormalizePath`):
//! 1. `DECODE_AND_MERGE_SLASHES` only: `%2F`/`%2f` -> `/`, `%5C`/`%5c` -> `\`;
//! 2. every mode but `NONE` (RFC 3986 normalisation, Envoy's `normalize_path`): `%00` refuses the
//!    request; percent-encoded unreserved characters (`%2D %2E %30-%39 %41-%5A %5F %61-%7A %7E`,
//!    either case) are decoded; `\` becomes `/`; dot segments are removed (RFC 3986 5.2.4);
//! 3. `MERGE_SLASHES` and `DECODE_AND_MERGE_SLASHES`: runs of `/` become one.
//!
//! Nothing is decoded twice: `%2561` is `%25` (not unreserved) then `61`, and stays. The result
//! is a fixed point (normalising it again changes nothing), which the fuzz target checks.

use std::borrow::Cow;

/// Which normalisation the mesh config asks for (Istio's `PathNormalization.NormalizationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PathNormalization {
    /// No normalisation at all: the path is matched and forwarded as received.
    None,
    /// RFC 3986 normalisation plus `\` -> `/` (Istio's default).
    #[default]
    Base,
    /// `Base`, then runs of slashes merged.
    MergeSlashes,
    /// Escaped slashes decoded, then `MergeSlashes`.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    /// The mesh config's spelling (`NONE`, `BASE`, `MERGE_SLASHES`, `DECODE_AND_MERGE_SLASHES`;
    /// `DEFAULT` is `BASE`, as in Istio).
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "NONE" => Self::None,
            "BASE" | "DEFAULT" => Self::Base,
            "MERGE_SLASHES" => Self::MergeSlashes,
            "DECODE_AND_MERGE_SLASHES" => Self::DecodeAndMergeSlashes,
            other => {
                return Err(format!(
                    "unknown normalization {other:?} (NONE, BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES)"
                ))
            }
        })
    }
}

/// Why a path was refused (the request gets 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadPath {
    /// The path holds `%00` (a NUL once decoded).
    EncodedNul,
    /// The normalised path is not a valid request target.
    Unrepresentable,
}

impl std::fmt::Display for BadPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadPath::EncodedNul => f.write_str("the path holds %00"),
            BadPath::Unrepresentable => f.write_str("the normalised path is not a valid target"),
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte `%XY` at `p[i..]` stands for, if `p[i]` starts a valid escape.
fn escape_at(p: &[u8], i: usize) -> Option<u8> {
    match p.get(i..i + 3)? {
        [b'%', h, l] => Some(hex(*h)? << 4 | hex(*l)?),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Decode the escapes `decode` accepts. With `canonical` also: turn `\` into `/`, refuse `%00`,
/// and escape a `%` that starts no valid escape as `%25` (as Chromium's canonicaliser, Envoy's,
/// does), so that `%%32%65` cannot become `%2e` for whoever decodes the result again.
fn decode(p: &[u8], decode: impl Fn(u8) -> bool, canonical: bool) -> Result<Vec<u8>, BadPath> {
    let (backslash, nul) = (canonical, canonical);
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        match escape_at(p, i) {
            Some(0) if nul => return Err(BadPath::EncodedNul),
            Some(b) if decode(b) => {
                out.push(if backslash && b == b'\\' { b'/' } else { b });
                i += 3;
                continue;
            }
            None if canonical && p[i] == b'%' => {
                out.extend_from_slice(b"%25");
                i += 1;
                continue;
            }
            _ => {}
        }
        out.push(if backslash && p[i] == b'\\' {
            b'/'
        } else {
            p[i]
        });
        i += 1;
    }
    Ok(out)
}

/// RFC 3986 5.2.4 "remove_dot_segments" on an absolute path.
fn remove_dot_segments(p: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(p.len());
    let mut input = p;
    while !input.is_empty() {
        if let Some(rest) = input
            .strip_prefix(b"../")
            .or_else(|| input.strip_prefix(b"./"))
        {
            input = rest;
        } else if input.starts_with(b"/./") {
            input = &input[2..];
        } else if input == b"/." {
            input = b"/";
        } else if input.starts_with(b"/../") || input == b"/.." {
            input = if input.len() == 3 { b"/" } else { &input[3..] };
            let cut = out.iter().rposition(|&b| b == b'/').unwrap_or(0);
            out.truncate(cut);
        } else if input == b"." || input == b".." {
            input = b"";
        } else {
            // Move the first segment (with its leading '/', if any) to the output.
            let start = usize::from(input[0] == b'/');
            let end = input[start..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(input.len(), |e| e + start);
            out.extend_from_slice(&input[..end]);
            input = &input[end..];
        }
    }
    out
}

fn merge_slashes(p: Vec<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.len());
    for b in p {
        if !(b == b'/' && out.last() == Some(&b'/')) {
            out.push(b);
        }
    }
    out
}

/// The path (no query) `path` normalises to under `mode`. Only absolute paths are touched
/// (`*` of `OPTIONS *` and an empty path come back as they are).
pub fn normalize_path(path: &str, mode: PathNormalization) -> Result<Cow<'_, str>, BadPath> {
    if mode == PathNormalization::None || !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    let needs = path.bytes().any(|b| matches!(b, b'%' | b'\\' | b'.'))
        || (mode != PathNormalization::Base && path.contains("//"));
    if !needs {
        return Ok(Cow::Borrowed(path));
    }
    let mut p = path.as_bytes().to_vec();
    if mode == PathNormalization::DecodeAndMergeSlashes {
        p = decode(&p, |b| b == b'/' || b == b'\\', false)?;
    }
    p = decode(&p, unreserved, true)?;
    p = remove_dot_segments(&p);
    if p.is_empty() {
        p.push(b'/');
    }
    if mode != PathNormalization::Base {
        p = merge_slashes(p);
    }
    // Only ASCII escapes were decoded into ASCII bytes, and the input was a str: still UTF-8.
    Ok(Cow::Owned(String::from_utf8_lossy(&p).into_owned()))
}

/// Whether an HTTP method is acceptable to policy matching: Istio's normalisation refuses
/// methods that are not all upper case (`get` would otherwise miss a `methods: [GET]` DENY).
pub fn method_ok(m: &str) -> bool {
    !m.bytes().any(|b| b.is_ascii_lowercase())
}

/// Why a request was refused before anything read it (the client gets 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BadRequest {
    /// The method is not all upper case.
    Method,
    /// The path cannot be normalised.
    Path(BadPath),
    /// The authority cannot be a `Host` header.
    Authority,
}

impl std::fmt::Display for BadRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadRequest::Method => f.write_str("the method is not all upper case"),
            BadRequest::Path(p) => p.fmt(f),
            BadRequest::Authority => f.write_str("the request's authority is not a valid host"),
        }
    }
}

/// Bring a request to the one form everything after this reads (JWT, policy, routing, the
/// upstream request):
/// - the path normalised under `mode` (the query kept as it is);
/// - one authority: when the target carries one (HTTP/1.1 absolute form, RFC 9112 3.2.2: a
///   server ignores `Host` then; HTTP/2 `:authority`), it is the request's `Host`. Over HTTP/2
///   a `host` header beside `:authority` is dropped, as Envoy drops it (RFC 9113 8.3.1); over
///   HTTP/1.1 `Host` is set to the target's authority.
pub fn request<B>(req: &mut http::Request<B>, mode: PathNormalization) -> Result<(), BadRequest> {
    if !method_ok(req.method().as_str()) {
        return Err(BadRequest::Method);
    }
    if let Some(a) = req.uri().authority().map(|a| a.as_str().to_string()) {
        if req.version() == http::Version::HTTP_2 {
            req.headers_mut().remove(http::header::HOST);
        } else {
            let v = http::HeaderValue::from_str(&a).map_err(|_| BadRequest::Authority)?;
            req.headers_mut().insert(http::header::HOST, v);
        }
    }
    let uri = req.uri();
    let Cow::Owned(path) = normalize_path(uri.path(), mode).map_err(BadRequest::Path)? else {
        return Ok(());
    };
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|_| BadRequest::Path(BadPath::Unrepresentable))?,
    );
    *req.uri_mut() =
        http::Uri::from_parts(parts).map_err(|_| BadRequest::Path(BadPath::Unrepresentable))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{normalize_path, BadPath, PathNormalization as N};

    fn norm(p: &str, m: N) -> String {
        normalize_path(p, m).expect(p).into_owned()
    }

    #[test]
    fn base_decodes_unreserved_escapes_and_removes_dot_segments() {
        for (raw, want) in [
            ("/admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%41DMIN", "/ADMIN"),
            ("/./admin", "/admin"),
            ("/public/../admin", "/admin"),
            ("/x/%2e%2e/admin", "/admin"),
            ("/x/%2E%2E/admin", "/admin"),
            ("/x/.%2e/admin", "/admin"),
            ("/a\\..\\admin", "/admin"),
            ("/../../admin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/..", "/"),
            ("/%7euser/%5Fx%2D", "/~user/_x-"),
            ("/%2561dmin", "/%2561dmin"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%20b", "/a%20b"),
            ("/a%zzb%4", "/a%25zzb%254"),
            ("/x/%%32%65%%32%65/admin", "/x/%252e%252e/admin"),
            ("//admin", "//admin"),
            ("/caf\u{e9}/./x", "/caf\u{e9}/x"),
            ("*", "*"),
        ] {
            assert_eq!(norm(raw, N::Base), want, "{raw}");
        }
    }

    #[test]
    fn merge_modes_merge_slashes_and_only_decode_and_merge_decodes_escaped_slashes() {
        assert_eq!(norm("//admin", N::MergeSlashes), "/admin");
        assert_eq!(norm("/a///b//", N::MergeSlashes), "/a/b/");
        assert_eq!(norm("/a%2F%2Fadmin", N::MergeSlashes), "/a%2F%2Fadmin");
        assert_eq!(norm("/a%2F%2Fadmin", N::DecodeAndMergeSlashes), "/a/admin");
        assert_eq!(norm("/x%5c..%5cadmin", N::DecodeAndMergeSlashes), "/admin");
        assert_eq!(norm("/x/%2e%2e//admin", N::None), "/x/%2e%2e//admin");
    }

    #[test]
    fn an_encoded_nul_is_refused_in_every_mode_but_none() {
        for m in [N::Base, N::MergeSlashes, N::DecodeAndMergeSlashes] {
            assert_eq!(normalize_path("/a%00b", m), Err(BadPath::EncodedNul));
        }
        assert!(normalize_path("/a%00b", N::None).is_ok());
    }

    #[test]
    fn normalising_twice_changes_nothing() {
        for raw in [
            "/a//../b",
            "/a/..//b",
            "/.//x",
            "/%2e%2e%2f%2e%2e/x",
            "/a%2F..%2Fb",
            "/%25%32%65/x",
            "/x/%2e%2e%5c%2e%2e/admin",
            "/%%32%65/%2%46/%",
        ] {
            for m in [N::Base, N::MergeSlashes, N::DecodeAndMergeSlashes] {
                let once = norm(raw, m);
                assert_eq!(norm(&once, m), once, "{raw} under {m:?}");
            }
        }
    }

    fn req(v: http::Version, target: &str, host: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::get(target).version(v);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).expect("test request")
    }

    #[test]
    fn a_request_gets_its_normalised_path_its_query_and_one_authority() {
        let mut r = req(
            http::Version::HTTP_11,
            "http://app.default/public/../%61dmin?x=/../y",
            Some("secret.example"),
        );
        super::request(&mut r, N::Base).expect("normalised");
        assert_eq!(r.uri().path(), "/admin");
        assert_eq!(r.uri().query(), Some("x=/../y"));
        assert_eq!(r.headers()["host"], "app.default");
        let mut r = req(http::Version::HTTP_2, "http://app.default/x", Some("b"));
        super::request(&mut r, N::Base).expect("normalised");
        assert!(r.headers().get("host").is_none());
        assert_eq!(r.uri().authority().map(|a| a.as_str()), Some("app.default"));
        let mut r = req(http::Version::HTTP_11, "/a", Some("b"));
        super::request(&mut r, N::Base).expect("normalised");
        assert_eq!(r.headers()["host"], "b");
        let mut r = req(http::Version::HTTP_11, "/a%00", None);
        assert_eq!(
            super::request(&mut r, N::Base),
            Err(super::BadRequest::Path(BadPath::EncodedNul))
        );
        let mut r = http::Request::builder()
            .method("get")
            .uri("/")
            .body(())
            .expect("test request");
        assert_eq!(
            super::request(&mut r, N::Base),
            Err(super::BadRequest::Method)
        );
    }

    #[test]
    fn only_upper_case_methods_pass() {
        assert!(super::method_ok("GET") && super::method_ok("M-SEARCH"));
        assert!(!super::method_ok("get") && !super::method_ok("Get"));
    }

    #[test]
    fn mesh_config_spellings_parse() {
        assert_eq!(N::parse("DEFAULT"), Ok(N::Base));
        assert_eq!(
            N::parse("DECODE_AND_MERGE_SLASHES"),
            Ok(N::DecodeAndMergeSlashes)
        );
        assert!(N::parse("base").is_err());
    }
}

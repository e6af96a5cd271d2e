//! SPIFFE identities as Istio uses them: `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.

use std::{fmt, str::FromStr};

/// Why a string is not a SPIFFE id of Istio's shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// It does not start with `spiffe://`.
    #[error("{0:?} is not a SPIFFE id: it must start with spiffe://")]
    Scheme(String),
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error(
        "{0:?} is not an Istio SPIFFE id: the path must be /ns/<namespace>/sa/<service-account>"
    )]
    Path(String),
    /// A component is empty or has characters SPIFFE forbids.
    #[error("{id:?}: invalid {part} {value:?} (allowed: letters, digits, '.', '-', '_')")]
    Component {
        /// The whole input.
        id: String,
        /// Which part.
        part: &'static str,
        /// The offending value.
        value: String,
    },
}

/// A trust domain such as `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validate a trust domain name.
    pub fn new(s: &str) -> Result<Self, IdentityError> {
        check(s, s, "trust domain")?;
        Ok(Self(s.to_ascii_lowercase()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

fn check(id: &str, value: &str, part: &'static str) -> Result<(), IdentityError> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Component {
            id: id.to_string(),
            part,
            value: value.to_string(),
        })
    }
}

impl SpiffeId {
    /// Build from parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let id = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}");
        id.parse()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The id without `spiffe://`, as Istio's authorization policies write principals
    /// (`cluster.local/ns/default/sa/sleep`).
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::Scheme(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                check(s, td, "trust domain")?;
                check(s, ns, "namespace")?;
                check(s, sa, "service account")?;
                Ok(Self {
                    trust_domain: TrustDomain(td.to_ascii_lowercase()),
                    namespace: (*ns).to_string(),
                    service_account: (*sa).to_string(),
                })
            }
            _ => Err(IdentityError::Path(s.to_string())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_istio_ids_and_prints_them_back() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
    }

    #[test]
    fn rejects_other_shapes_with_a_reason() {
        for (bad, what) in [
            ("http://cluster.local/ns/a/sa/b", "spiffe://"),
            ("spiffe://cluster.local/ns/a", "path"),
            ("spiffe://cluster.local/ns/a/sa/b/extra", "path"),
            ("spiffe://cluster.local/ns//sa/b", "namespace"),
            ("spiffe:///ns/a/sa/b", "trust domain"),
            ("spiffe://cluster.local/ns/a b/sa/b", "namespace"),
        ] {
            let e = bad.parse::<SpiffeId>().unwrap_err().to_string();
            assert!(e.contains(what), "{bad}: {e}");
        }
    }

    proptest! {
        #[test]
        fn round_trips(td in "[a-z0-9]{1,10}(\\.[a-z0-9]{1,10}){0,2}", ns in "[a-z0-9-]{1,20}", sa in "[a-zA-Z0-9_.-]{1,20}") {
            let id = SpiffeId::new(&td, &ns, &sa).unwrap();
            let back: SpiffeId = id.to_string().parse().unwrap();
            prop_assert_eq!(back, id);
        }

        #[test]
        fn never_panics_on_arbitrary_input(s in ".{0,80}") {
            let _ = s.parse::<SpiffeId>();
        }
    }
}

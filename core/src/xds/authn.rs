//! Who may call `zring control-plane`, and which certificates each caller may have: istiod's
//! rule without Kubernetes. A workload's token gets its own identity only; a node proxy's
//! token gets the identities of the workloads the served config places on its node (istiod's
//! impersonation rule for ztunnel); nothing gets an identity no workload of the mesh holds
//! (`istio-system/ztunnel`, a made-up service account). No I/O: the server calls these.
//!
//! The token file (`--token-file`) holds one token a line, with whom it stands for:
//! ```text
//! # comments and blank lines are skipped
//! 9f2c...  node=node-a                                   # the node proxy of node-a
//! 41aa...  identity=spiffe://cluster.local/ns/default/sa/sleep   # one workload
//! 77b0...                                                # any node proxy (older files)
//! ```
//! A bare token (the file format before) stands for every node proxy: it still gets only
//! identities that some workload of the mesh holds.

use std::collections::{HashMap, HashSet};

use zring_hbone::SpiffeId;

use crate::config::LocalConfig;

/// Whom a token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// One workload: its own identity only.
    Workload(SpiffeId),
    /// The node proxy of this node: its workloads' identities.
    Node(String),
    /// Any node proxy (a bare token, or no tokens configured on loopback): any identity a
    /// workload of the mesh holds.
    AnyNode,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Workload(id) => write!(f, "workload {id}"),
            Caller::Node(n) => write!(f, "the node proxy of {n}"),
            Caller::AnyNode => f.write_str("a node proxy (bare token)"),
        }
    }
}

/// The tokens a control plane accepts.
#[derive(Debug, Clone, Default)]
pub struct Tokens(Vec<(String, Caller)>);

impl Tokens {
    /// Read a token file's text; errors name the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut words = line.split_whitespace();
            let token = words.next().unwrap_or_default().to_string();
            let caller = match words.next() {
                None => Caller::AnyNode,
                Some(w) => match w.split_once('=') {
                    Some(("node", n)) if !n.is_empty() => Caller::Node(n.to_string()),
                    Some(("identity", id)) => Caller::Workload(
                        id.parse()
                            .map_err(|e| format!("line {}: identity {id:?}: {e}", i + 1))?,
                    ),
                    _ => {
                        return Err(format!(
                            "line {}: {w:?} is neither node=NAME nor identity=SPIFFE_ID",
                            i + 1
                        ))
                    }
                },
            };
            if let Some(extra) = words.next() {
                return Err(format!("line {}: unexpected {extra:?}", i + 1));
            }
            out.push((token, caller));
        }
        if out.is_empty() {
            return Err("no token in the file".into());
        }
        Ok(Self(out))
    }

    /// The caller a bearer token stands for. Every token is compared, each in constant time,
    /// so the answer's timing tells nothing about how much of a token matched.
    pub fn caller(&self, bearer: Option<&str>) -> Option<&Caller> {
        let got = bearer?.trim().as_bytes();
        let mut found = None;
        for (t, c) in &self.0 {
            if constant_time_eq(t.as_bytes(), got) && found.is_none() {
                found = Some(c);
            }
        }
        found
    }
}

/// Equal bytes, compared without an early exit (lengths are not secret: tokens are long).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The identities the served config gives, by node.
#[derive(Debug, Clone, Default)]
pub struct Holders {
    by_node: HashMap<String, HashSet<SpiffeId>>,
}

impl Holders {
    /// The identities of `config`'s workloads, by the node each runs on.
    pub fn of(config: &LocalConfig) -> Self {
        let mut by_node: HashMap<String, HashSet<SpiffeId>> = HashMap::new();
        for w in &config.workloads {
            if let Ok(id) = w.identity() {
                by_node.entry(w.node.clone()).or_default().insert(id);
            }
        }
        Self { by_node }
    }

    /// Whether `caller` may have a certificate for `id`; the refusal says why.
    pub fn may_hold(&self, caller: &Caller, id: &SpiffeId) -> Result<(), String> {
        let ok = match caller {
            Caller::Workload(me) => me == id,
            Caller::Node(n) => self.by_node.get(n).is_some_and(|ids| ids.contains(id)),
            Caller::AnyNode => self.by_node.values().any(|ids| ids.contains(id)),
        };
        match (ok, caller) {
            (true, _) => Ok(()),
            (false, Caller::Workload(_)) => Err(format!("{caller} may not have {id}")),
            (false, Caller::Node(n)) => Err(format!("no workload on node {n} has {id}")),
            (false, Caller::AnyNode) => Err(format!("no workload of the mesh has {id}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        format!("spiffe://cluster.local/ns/default/sa/{s}")
            .parse()
            .expect("test id")
    }

    #[test]
    fn token_lines_name_their_callers_and_bad_lines_are_refused() {
        let t = Tokens::parse(
            "# a comment\n\nn-a node=node-a\nw-s identity=spiffe://cluster.local/ns/default/sa/sleep # sleep\nbare\n",
        )
        .expect("parsed");
        assert_eq!(t.caller(Some("n-a")), Some(&Caller::Node("node-a".into())));
        assert_eq!(
            t.caller(Some(" w-s ")),
            Some(&Caller::Workload(id("sleep")))
        );
        assert_eq!(t.caller(Some("bare")), Some(&Caller::AnyNode));
        assert_eq!(t.caller(Some("n-")), None);
        assert_eq!(t.caller(Some("n-a2")), None);
        assert_eq!(t.caller(None), None);
        for bad in [
            "x node=",
            "x who=me",
            "x identity=nope",
            "x node=a b",
            "# none\n",
        ] {
            assert!(Tokens::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn callers_get_only_identities_they_may_hold() {
        let cfg = LocalConfig::from_yaml(
            "workloads:\n- uid: a\n  name: sleep\n  namespace: default\n  serviceAccount: sleep\n  workloadIps: [\"10.0.0.1\"]\n  node: node-a\n- uid: b\n  name: pp\n  namespace: default\n  serviceAccount: productpage\n  workloadIps: [\"10.0.0.2\"]\n  node: node-b\n",
            std::path::Path::new("t"),
        )
        .expect("config");
        let h = Holders::of(&cfg);
        let ztunnel: SpiffeId = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
            .parse()
            .expect("id");
        let node_b = Caller::Node("node-b".into());
        assert!(h.may_hold(&node_b, &id("productpage")).is_ok());
        assert!(h.may_hold(&node_b, &id("sleep")).is_err());
        assert!(h.may_hold(&node_b, &ztunnel).is_err());
        assert!(h
            .may_hold(&Caller::Workload(id("sleep")), &id("sleep"))
            .is_ok());
        assert!(h
            .may_hold(&Caller::Workload(id("sleep")), &id("productpage"))
            .is_err());
        assert!(h.may_hold(&Caller::AnyNode, &id("sleep")).is_ok());
        assert!(h.may_hold(&Caller::AnyNode, &ztunnel).is_err());
        assert!(h.may_hold(&Caller::AnyNode, &id("vault")).is_err());
    }
}

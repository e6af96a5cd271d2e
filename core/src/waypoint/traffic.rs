//! A DestinationRule's `trafficPolicy` at the waypoint: outlier detection (ejecting endpoints
//! that keep failing), connection-pool limits (circuit breaking) and the load balancer (least
//! request, Istio's default; round robin; random; or a consistent hash of a header, cookie,
//! query parameter or the client's address; slow start for new endpoints; locality failover by
//! priority level), with Istio's field names, defaults and override rules;
//! `tls.mode: ISTIO_MUTUAL` is accepted as what HBONE already does.
//!
//! A subset's `trafficPolicy` overrides the DestinationRule's field by field (`outlierDetection`,
//! `connectionPool` and `loadBalancer` each replace the rule's whole field, as Istio merges them). Fields the
//! waypoint does not implement are refused by name rather than ignored.
//!
//! State is process-wide, as Envoy's per-cluster state is shared by its workers: endpoint health
//! in one map, and one gate per destination (service, or service and subset) counting active
//! and pending requests.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_yaml_ng::Value;

use super::{resources::duration, FastMap};
use crate::config::{LoadBalancer, LoadBalancerMode, Workload};

/// Fields refused, with the reason given to the user.
const NOT_SUPPORTED: &str = "not supported by zring's waypoint (refused rather than ignored)";

/// Envoy's cap on one ejection (`max_ejection_time`, 300 s by default).
const MAX_EJECTION: Duration = Duration::from_secs(300);

/// Requests that may wait for room under a destination's limits when
/// `http1MaxPendingRequests` is unset (Envoy's default `max_pending_requests`): past it a
/// request gets 503 `UO` at once instead of joining an unbounded queue.
pub const DEFAULT_MAX_PENDING: u32 = 1024;

/// A DestinationRule's (or subset's) traffic policy; `None`: the field was not given.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrafficPolicy {
    /// `outlierDetection`.
    pub outlier: Option<Outlier>,
    /// `loadBalancer`.
    pub balance: Option<Balance>,
    /// `loadBalancer.localityLbSetting` (part of `loadBalancer`: a subset's replaces it with
    /// the rest of that field).
    pub locality: Option<LocalityLb>,
    /// `loadBalancer.warmup` (or the older `warmupDurationSecs`), likewise part of
    /// `loadBalancer`.
    pub warmup: Option<Warmup>,
    /// `connectionPool`.
    pub pool: Option<Pool>,
    /// The destination it applies to (`namespace/host`, `#subset` for a subset's), which
    /// names its connection-pool gate; set when the policy is put in force.
    pub destination: String,
    /// That gate, once a request has looked it up: later requests skip the process-wide map.
    gate: GateCell,
}

/// A policy's connection-pool gate, found in [`Gates`] by the first request that needs it.
/// Gates outlive policies (a reload makes new policies, the counts in flight carry over), so
/// a copy of a policy starts empty and finds the same gate by its destination.
#[derive(Debug, Default)]
struct GateCell(std::sync::OnceLock<Arc<Gate>>);

impl Clone for GateCell {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for GateCell {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl TrafficPolicy {
    /// For `/config_dump`, in Istio's field names (limits left at "no limit" are left out).
    pub fn dump(&self) -> serde_json::Value {
        let mut v = serde_json::Map::new();
        if let Some(o) = &self.outlier {
            v.insert(
                "outlierDetection".into(),
                serde_json::json!({
                    "consecutive5xxErrors": o.consecutive_5xx,
                    "consecutiveGatewayErrors": o.consecutive_gateway,
                    "baseEjectionTimeMs": o.base_ejection.as_millis() as u64,
                    "maxEjectionPercent": o.max_ejection_percent,
                    "minHealthPercent": o.min_health_percent,
                }),
            );
        }
        if let Some(p) = &self.pool {
            let limit = |n: u32| (n != u32::MAX).then_some(n);
            v.insert(
                "connectionPool".into(),
                serde_json::json!({
                    "maxConnections": limit(p.max_connections),
                    "http1MaxPendingRequests": limit(p.max_pending),
                    "http2MaxRequests": limit(p.max_requests),
                    "maxRequestsPerConnection": p.max_requests_per_connection,
                    "connectTimeoutMs": p.connect_timeout.map(|d| d.as_millis() as u64),
                }),
            );
        }
        if let Some(b) = &self.balance {
            let lb = match b {
                Balance::LeastRequest => serde_json::json!({"simple": "LEAST_REQUEST"}),
                Balance::RoundRobin => serde_json::json!({"simple": "ROUND_ROBIN"}),
                Balance::Random => serde_json::json!({"simple": "RANDOM"}),
                Balance::Hash(HashKey::Header(h)) => {
                    serde_json::json!({"consistentHash": {"httpHeaderName": h.as_str()}})
                }
                Balance::Hash(HashKey::Cookie { name, path, ttl }) => serde_json::json!({
                    "consistentHash": {"httpCookie": {
                        "name": name, "path": path, "ttlMs": ttl.map(|t| t.as_millis() as u64),
                    }}
                }),
                Balance::Hash(HashKey::SourceIp) => {
                    serde_json::json!({"consistentHash": {"useSourceIp": true}})
                }
                Balance::Hash(HashKey::Query(q)) => {
                    serde_json::json!({"consistentHash": {"httpQueryParameterName": q}})
                }
            };
            let mut lb = lb;
            if let (Some(l), Some(o)) = (&self.locality, lb.as_object_mut()) {
                o.insert(
                    "localityLbSetting".into(),
                    serde_json::json!({
                        "enabled": l.enabled,
                        "failover": l.failover.iter()
                            .map(|(f, t)| serde_json::json!({"from": f, "to": t}))
                            .collect::<Vec<_>>(),
                        "distribute": l.distribute.iter()
                            .map(|(f, to)| serde_json::json!({
                                "from": f,
                                "to": to.iter().cloned().collect::<BTreeMap<_, _>>(),
                            }))
                            .collect::<Vec<_>>(),
                        "failoverPriority": l.failover_priority.iter()
                            .map(|(k, v)| match v {
                                Some(v) => format!("{k}={v}"),
                                None => k.clone(),
                            })
                            .collect::<Vec<_>>(),
                    }),
                );
            }
            if let (Some(w), Some(o)) = (&self.warmup, lb.as_object_mut()) {
                o.insert(
                    "warmup".into(),
                    serde_json::json!({
                        "durationMs": w.window.as_millis() as u64,
                        "minimumPercent": w.minimum_percent,
                        "aggression": w.aggression,
                    }),
                );
            }
            v.insert("loadBalancer".into(), lb);
        }
        serde_json::Value::Object(v)
    }

    /// This policy with `over`'s fields in place of its own where `over` sets them (a subset's
    /// policy over its DestinationRule's).
    pub fn overridden_by(&self, over: &TrafficPolicy) -> TrafficPolicy {
        TrafficPolicy {
            outlier: over.outlier.clone().or_else(|| self.outlier.clone()),
            balance: over.balance.clone().or_else(|| self.balance.clone()),
            locality: match over.balance.is_some() {
                true => over.locality.clone(),
                false => self.locality.clone(),
            },
            warmup: match over.balance.is_some() {
                true => over.warmup.clone(),
                false => self.warmup.clone(),
            },
            pool: over.pool.clone().or_else(|| self.pool.clone()),
            destination: self.destination.clone(),
            gate: GateCell::default(),
        }
    }
}

/// `loadBalancer`: how an endpoint is chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Balance {
    /// `simple: LEAST_REQUEST` (also `LEAST_CONN`, `UNSPECIFIED` and no `simple` at all: Istio's
    /// default), as Envoy does it: with equal weights, the one of two candidates (the next in
    /// turn and a random other) with fewer requests in flight; with unequal weights (capacity,
    /// slow start), a weighted choice by weight / (requests in flight + 1).
    LeastRequest,
    /// `simple: ROUND_ROBIN`: in turn per worker, by weight.
    RoundRobin,
    /// `simple: RANDOM`: any endpoint, uniformly (Envoy's random balancer ignores weights).
    Random,
    /// `consistentHash`: requests with the same key go to the same endpoint while it stays.
    Hash(HashKey),
}

/// `loadBalancer.warmup`: Envoy's slow start. An endpoint the waypoint has known for less than
/// `window` gets its weight scaled by `max(minimum_percent / 100, (age / window) ^ (1 /
/// aggression))`, its age counted from 1 s at least; only under round robin and least request,
/// as Istio configures it.
#[derive(Debug, Clone, PartialEq)]
pub struct Warmup {
    /// `duration` (or `warmupDurationSecs`).
    pub window: Duration,
    /// `minimumPercent` (10 when not set).
    pub minimum_percent: f64,
    /// `aggression` (1.0, a linear ramp, when not set).
    pub aggression: f64,
}

impl Warmup {
    /// The share of its weight an endpoint first seen `age` ago gets now (1.0: warm).
    pub fn factor(&self, age: Duration) -> f64 {
        if age >= self.window || self.window.is_zero() {
            return 1.0;
        }
        let t = age.max(Duration::from_secs(1)).as_secs_f64() / self.window.as_secs_f64();
        t.min(1.0)
            .powf(1.0 / self.aggression)
            .max(self.minimum_percent / 100.0)
            .min(1.0)
    }
}

/// When the waypoint first saw each endpoint as a candidate, for slow start (kept only for
/// destinations with `warmup`), shared by the workers.
#[derive(Debug, Default)]
pub struct Births {
    seen: Mutex<FastMap<SocketAddr, (Instant, Instant)>>,
}

/// Endpoints remembered by [`Births`] before the oldest are forgotten.
const MAX_BIRTHS: usize = 16 * 1024;

impl Births {
    /// The slow-start factor of each of `eps` now. An endpoint not seen among the candidates for
    /// longer than the window (it left the service and came back) starts again, as Envoy starts
    /// a host it is given again.
    pub fn factors(&self, eps: &[SocketAddr], w: &Warmup, now: Instant) -> Vec<f64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() > MAX_BIRTHS {
            seen.retain(|_, (_, last)| now.saturating_duration_since(*last) <= w.window);
        }
        eps.iter()
            .map(|a| {
                let (born, last) = seen.entry(*a).or_insert((now, now));
                if now.saturating_duration_since(*last) > w.window {
                    *born = now;
                }
                *last = now;
                w.factor(now.saturating_duration_since(*born))
            })
            .collect()
    }
}

/// Requests in flight per endpoint, for least request, shared by the workers as Envoy's host
/// counters are. Counted only for requests that had a choice (two or more candidates).
#[derive(Debug, Default)]
pub struct InFlight {
    counts: Mutex<FastMap<SocketAddr, u32>>,
}

impl InFlight {
    /// Run `f` with the counts locked.
    pub fn with<R>(&self, f: impl FnOnce(&mut FastMap<SocketAddr, u32>) -> R) -> R {
        f(&mut self.counts.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// One request to `a` ended.
    pub fn done(&self, a: SocketAddr) {
        self.with(|m| {
            if let Some(n) = m.get_mut(&a) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(&a);
                }
            }
        });
    }
}

/// A candidate endpoint for [`choose`]: its weight (capacity) and its slow-start factor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Capacity (istiod's endpoint weight); 0 takes nothing.
    pub weight: u32,
    /// Slow start's share of that weight, 1.0 when warm.
    pub warm: f64,
}

/// Which of `c` a request goes to under `balance` (not a consistent hash), with `turn` this
/// worker's round-robin counter, `rand` a random number and `active(i)` the requests in flight
/// to candidate `i`. Equal weights and nothing in flight anywhere make least request a round
/// robin, as Envoy's scheduler is then.
pub fn choose(
    balance: &Balance,
    c: &[Candidate],
    turn: usize,
    rand: u64,
    active: impl Fn(usize) -> u32,
) -> Option<usize> {
    let live: Vec<usize> = (0..c.len()).filter(|i| c[*i].weight > 0).collect();
    let n = live.len();
    if n <= 1 {
        return live.first().copied();
    }
    let warm = c.iter().all(|x| x.warm >= 1.0);
    let equal = warm && live.iter().all(|i| c[*i].weight == c[live[0]].weight);
    let weighted = |scale: &dyn Fn(usize) -> f64| -> Option<usize> {
        let w: Vec<f64> = live
            .iter()
            .map(|i| f64::from(c[*i].weight) * c[*i].warm * scale(*i))
            .collect();
        let sum: f64 = w.iter().sum();
        if sum <= 0.0 {
            return None;
        }
        let mut r = (rand >> 11) as f64 / (1u64 << 53) as f64 * sum;
        for (k, x) in w.iter().enumerate() {
            if r < *x {
                return Some(live[k]);
            }
            r -= x;
        }
        live.last().copied()
    };
    match balance {
        Balance::Random => Some(live[(rand % n as u64) as usize]),
        Balance::RoundRobin | Balance::Hash(_) => match warm {
            true => crate::config::weighted_turn(c.iter().map(|x| x.weight), turn),
            false => weighted(&|_| 1.0),
        },
        Balance::LeastRequest if equal => {
            // Power of two choices: the next in turn against a random other.
            let first = live[turn % n];
            let other = live[(turn % n + 1 + (rand % (n as u64 - 1)) as usize) % n];
            Some(match active(other) < active(first) {
                true => other,
                false => first,
            })
        }
        Balance::LeastRequest => {
            let counts: Vec<u32> = (0..c.len()).map(&active).collect();
            match warm && live.iter().all(|i| counts[*i] == counts[live[0]]) {
                true => crate::config::weighted_turn(c.iter().map(|x| x.weight), turn),
                false => weighted(&|i| 1.0 / f64::from(counts[i].saturating_add(1))),
            }
        }
    }
}

/// What a consistent hash is of.
#[derive(Debug, Clone, PartialEq)]
pub enum HashKey {
    /// `httpHeaderName`.
    Header(http::HeaderName),
    /// `httpCookie`: with a `ttl`, a request without the cookie gets one (`Set-Cookie`), as
    /// Envoy does, so its next requests stick.
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    /// `useSourceIp`.
    SourceIp,
    /// `httpQueryParameterName`.
    Query(String),
}

/// The endpoint of `candidates` that `key` goes to: rendezvous (highest random weight) hashing,
/// so a key moves only when its endpoint leaves or one joins that outranks it. Stable across
/// workers and restarts (a fixed hash function, no per-process seed).
pub fn rendezvous(key: &[u8], candidates: impl Iterator<Item = SocketAddr>) -> Option<usize> {
    use std::hash::{Hash, Hasher};
    let k = {
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        h.finish()
    };
    let rank = |a: SocketAddr| {
        let mut h = std::hash::DefaultHasher::new();
        k.hash(&mut h);
        a.hash(&mut h);
        h.finish()
    };
    candidates
        .enumerate()
        .max_by_key(|(_, a)| rank(*a))
        .map(|(i, _)| i)
}

/// `outlierDetection`, with Istio's defaults for what is not set.
#[derive(Debug, Clone, PartialEq)]
pub struct Outlier {
    /// Ejected after this many 5xx answers (or connect failures, resets) in a row; 0: off.
    pub consecutive_5xx: u32,
    /// Ejected after this many 502/503/504 answers (or connect failures, resets) in a row; 0:
    /// off.
    pub consecutive_gateway: u32,
    /// The first ejection's length; the n-th lasts n times this (at most 300 s).
    pub base_ejection: Duration,
    /// At most this share of a destination's endpoints ejected at once (one may always be).
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, ejections are ignored and every endpoint serves.
    pub min_health_percent: u32,
}

/// `connectionPool`; `u32::MAX`: no limit (Istio's default).
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    /// `tcp.maxConnections`: HTTP/1.1 carries one request per connection at a time, so this
    /// bounds the requests in flight to HTTP/1.1 upstreams.
    pub max_connections: u32,
    /// `http.http1MaxPendingRequests`: requests that may wait for room; beyond, 503 `UO`.
    pub max_pending: u32,
    /// `http.http2MaxRequests`: requests in flight to the destination, any protocol.
    pub max_requests: u32,
    /// `http.maxRequestsPerConnection`: an upstream connection is retired after this many
    /// requests; 0: no limit.
    pub max_requests_per_connection: u32,
    /// `tcp.connectTimeout`.
    pub connect_timeout: Option<Duration>,
}

impl Pool {
    /// Requests allowed in flight at once to an upstream speaking HTTP/2 (`h2`) or HTTP/1.1.
    pub fn limit(&self, h2: bool) -> u32 {
        match h2 {
            true => self.max_requests,
            false => self.max_requests.min(self.max_connections),
        }
    }
}

/// A field and what is wrong with it (the caller adds file and resource).
pub type FieldError = (String, String);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    #[serde(default)]
    load_balancer: Option<LbSpec>,
    #[serde(default)]
    tls: Option<TlsSpec>,
    #[serde(default)]
    outlier_detection: Option<OutlierSpec>,
    #[serde(default)]
    connection_pool: Option<PoolSpec>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LbSpec {
    #[serde(default)]
    simple: Option<String>,
    #[serde(default)]
    consistent_hash: Option<HashSpec>,
    #[serde(default)]
    locality_lb_setting: Option<LocalitySpec>,
    #[serde(default)]
    warmup: Option<WarmupSpec>,
    #[serde(default)]
    warmup_duration_secs: Option<String>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WarmupSpec {
    #[serde(default)]
    duration: Option<String>,
    #[serde(default)]
    minimum_percent: Option<f64>,
    #[serde(default)]
    aggression: Option<f64>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LocalitySpec {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    failover: Vec<FailoverSpec>,
    #[serde(default)]
    failover_priority: Vec<String>,
    #[serde(default)]
    distribute: Vec<DistributeSpec>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct DistributeSpec {
    from: String,
    to: BTreeMap<String, u32>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct FailoverSpec {
    from: String,
    to: String,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HashSpec {
    #[serde(default)]
    http_header_name: Option<String>,
    #[serde(default)]
    http_cookie: Option<CookieSpec>,
    #[serde(default)]
    use_source_ip: Option<bool>,
    #[serde(default)]
    http_query_parameter_name: Option<String>,
    /// How Envoy lays out its hash (`ringHash`, `maglev`, `minimumRingSize`): the choice of
    /// endpoint is rendezvous hashing here whatever they say, with the same stickiness.
    #[serde(default)]
    ring_hash: Option<Value>,
    #[serde(default)]
    maglev: Option<Value>,
    #[serde(default)]
    minimum_ring_size: Option<Value>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct CookieSpec {
    name: String,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    ttl: Option<String>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
struct TlsSpec {
    #[serde(default)]
    mode: Option<String>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OutlierSpec {
    #[serde(default, rename = "consecutive5xxErrors")]
    consecutive_5xx_errors: Option<u32>,
    #[serde(default)]
    consecutive_gateway_errors: Option<u32>,
    #[serde(default)]
    interval: Option<String>,
    #[serde(default)]
    base_ejection_time: Option<String>,
    #[serde(default)]
    max_ejection_percent: Option<u32>,
    #[serde(default)]
    min_health_percent: Option<u32>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PoolSpec {
    #[serde(default)]
    tcp: Option<TcpPoolSpec>,
    #[serde(default)]
    http: Option<HttpPoolSpec>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TcpPoolSpec {
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default)]
    connect_timeout: Option<String>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HttpPoolSpec {
    #[serde(default, rename = "http1MaxPendingRequests")]
    http1_max_pending_requests: Option<u32>,
    #[serde(default, rename = "http2MaxRequests")]
    http2_max_requests: Option<u32>,
    #[serde(default)]
    max_requests_per_connection: Option<u32>,
    #[serde(flatten)]
    rest: BTreeMap<String, Value>,
}

/// Refuse the first field of `rest` (those the waypoint does not implement), under `at`.
fn refuse_rest(at: &str, rest: &BTreeMap<String, Value>) -> Result<(), FieldError> {
    match rest.keys().next() {
        Some(k) => Err((format!("{at}.{k}"), NOT_SUPPORTED.into())),
        None => Ok(()),
    }
}

/// A `localityLbSetting` at `at`.
fn locality(at: &str, l: LocalitySpec) -> Result<LocalityLb, FieldError> {
    refuse_rest(at, &l.rest)?;
    for (i, f) in l.failover.iter().enumerate() {
        let at = format!("{at}.failover[{i}]");
        refuse_rest(&at, &f.rest)?;
        if f.from.is_empty() || f.to.is_empty() || f.from == f.to {
            return Err((at, "from and to are two different regions".into()));
        }
    }
    let mut failover_priority = Vec::new();
    for (i, p) in l.failover_priority.iter().enumerate() {
        let (label, value) = match p.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (p.as_str(), None),
        };
        if label.is_empty() {
            return Err((
                format!("{at}.failoverPriority[{i}]"),
                "an empty label".into(),
            ));
        }
        failover_priority.push((label.to_string(), value));
    }
    if !l.distribute.is_empty() && (!l.failover.is_empty() || !failover_priority.is_empty()) {
        return Err((
            format!("{at}.distribute"),
            "distribute and failover (or failoverPriority) are one choice: give one".into(),
        ));
    }
    let mut distribute = Vec::new();
    for (i, d) in l.distribute.into_iter().enumerate() {
        let at = format!("{at}.distribute[{i}]");
        refuse_rest(&at, &d.rest)?;
        let sum: u64 = d.to.values().map(|w| u64::from(*w)).sum();
        if sum != 100 {
            return Err((
                format!("{at}.to"),
                format!("weights add up to {sum}, not 100"),
            ));
        }
        distribute.push((d.from, d.to.into_iter().collect()));
    }
    Ok(LocalityLb {
        enabled: l.enabled.unwrap_or(true),
        failover: l.failover.into_iter().map(|f| (f.from, f.to)).collect(),
        failover_priority,
        distribute,
    })
}

/// `localityLbSetting`: which endpoints are tried first, or how much each locality takes, by
/// where they run.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalityLb {
    /// `distribute`: (from locality, [(to locality, weight)]): a waypoint in `from` sends each
    /// `to` locality its weight's share; localities no `to` names get nothing.
    pub distribute: Vec<(String, Vec<(String, u32)>)>,
    /// `enabled: false` turns locality preference off for this destination.
    pub enabled: bool,
    /// `failover`: (from region, to region): when the waypoint's region has no healthy
    /// endpoint, `to` comes before the other regions.
    pub failover: Vec<(String, String)>,
    /// `failoverPriority`: labels (with an optional `=value` that replaces the waypoint's
    /// own) that an endpoint shares with the waypoint, in order of importance.
    pub failover_priority: Vec<(String, Option<String>)>,
}

/// The topology labels Istio puts on every endpoint, from the workload's locality, network
/// and node, unless its own labels set them.
fn label<'a>(w: &'a Workload, name: &str) -> Option<&'a str> {
    if let Some(v) = w.labels.get(name) {
        return Some(v);
    }
    let v = match name {
        "topology.kubernetes.io/region" => &w.locality.region,
        "topology.kubernetes.io/zone" => &w.locality.zone,
        "topology.istio.io/subzone" => &w.locality.subzone,
        "topology.istio.io/network" => &w.network,
        "kubernetes.io/hostname" => &w.node,
        _ => return None,
    };
    Some(v.as_str())
}

/// Istio's `LbPriority`, with `failover`: 0 same region, zone and subzone; 1 same zone; 2 same
/// region; 3 another region (the failover region when a rule names one for ours); 4 the other
/// regions when it does.
fn locality_level(me: &Workload, ep: &Workload, failover: &[(String, String)]) -> u32 {
    let (a, b) = (&me.locality, &ep.locality);
    match (
        a.region == b.region,
        a.zone == b.zone,
        a.subzone == b.subzone,
    ) {
        (true, true, true) => 0,
        (true, true, false) => 1,
        (true, false, _) => 2,
        (false, ..) => match failover.iter().find(|(from, _)| *from == a.region) {
            Some((_, to)) if *to != b.region => 4,
            _ => 3,
        },
    }
}

/// Istio's failover priority by labels: 0 when every label matches, else the number of labels
/// from the first mismatch on; a first `topology.istio.io/network` that differs puts the
/// endpoint below every same-network one and goes on with the other labels.
fn label_level(me: &Workload, ep: &Workload, labels: &[(String, Option<String>)]) -> u32 {
    let n = labels.len() as u32;
    let network_first = labels
        .first()
        .is_some_and(|(k, _)| k == "topology.istio.io/network");
    let mut adjust = 0;
    for (j, (k, over)) in labels.iter().enumerate() {
        let mine = over.as_deref().or_else(|| label(me, k));
        if mine != label(ep, k) {
            if j == 0 && network_first {
                adjust = n;
                continue;
            }
            return n - j as u32 + adjust;
        }
    }
    adjust
}

/// The priority level of each endpoint (0 is tried first), as istiod orders a waypoint's
/// endpoints: a DestinationRule's `localityLbSetting` when it has one (failover needs
/// `outlierDetection`, as in Istio), else the service's routing preferences
/// (`trafficDistribution`, always in force at a waypoint), else the mesh default (locality
/// failover when the rule has outlier detection).
pub fn levels(
    me: Option<&Workload>,
    node: &str,
    eps: &[(&Workload, u16)],
    service: Option<&LoadBalancer>,
    policy: Option<&TrafficPolicy>,
) -> Vec<u32> {
    let flat = || vec![0; eps.len()];
    let Some(me) = me else {
        return flat();
    };
    let outlier = policy.is_some_and(|p| p.outlier.is_some());
    match (policy.and_then(|p| p.locality.as_ref()), service) {
        (Some(l), _) if !l.enabled || !outlier || !l.distribute.is_empty() => flat(),
        (Some(l), _) => eps
            .iter()
            .map(|(w, _)| match l.failover_priority.is_empty() {
                true => locality_level(me, w, &l.failover),
                false => {
                    let by_label = label_level(me, w, &l.failover_priority);
                    match l.failover.is_empty() {
                        true => by_label,
                        false => by_label * 5 + locality_level(me, w, &l.failover),
                    }
                }
            })
            .collect(),
        (None, Some(lb)) if lb.mode == LoadBalancerMode::Failover => {
            let ranks: Vec<usize> = eps.iter().map(|(w, _)| lb.rank(me, node, w)).collect();
            let best = ranks.iter().copied().max().unwrap_or(0);
            ranks.into_iter().map(|r| (best - r) as u32).collect()
        }
        (None, _) if outlier => eps
            .iter()
            .map(|(w, _)| locality_level(me, w, &[]))
            .collect(),
        (None, _) => flat(),
    }
}

/// Whether locality `l` is in `rule` (`region/zone/subzone`, `*` for any, missing parts
/// match all), as Istio's `LocalityMatch`.
pub fn locality_matches(l: &crate::config::Locality, rule: &str) -> bool {
    let mut parts = rule.splitn(3, '/');
    let (r, z, s) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    (r == "*" || r == l.region)
        && (z == "*" || z.is_empty() || z == l.zone)
        && (s == "*" || s.is_empty() || s == l.subzone)
}

/// Under `distribute`, the weight of each endpoint's locality as Istio computes it (the `to`
/// weight spread over the localities it matches by their capacity, rounded up), or `None` for an
/// endpoint no `to` names; `None` overall when no rule is `from` the waypoint's locality.
pub fn distributed(
    me: &Workload,
    eps: &[(&Workload, u16)],
    rules: &[(String, Vec<(String, u32)>)],
) -> Option<Vec<Option<u64>>> {
    let (_, to) = rules
        .iter()
        .find(|(from, _)| locality_matches(&me.locality, from))?;
    let mut out: Vec<Option<u64>> = vec![None; eps.len()];
    for (rule, weight) in to {
        let members: Vec<usize> = (0..eps.len())
            .filter(|i| out[*i].is_none() && locality_matches(&eps[*i].0.locality, rule))
            .collect();
        let total: u64 = members.iter().map(|i| u64::from(eps[*i].0.capacity)).sum();
        for i in &members {
            // Per endpoint here (its locality's weight is the sum over its endpoints).
            let cap = u64::from(eps[*i].0.capacity);
            out[*i] = Some(match total {
                0 => 0,
                t => (cap * u64::from(*weight) * 1000).div_ceil(t),
            });
        }
    }
    Some(out)
}

/// Envoy's default overprovisioning factor, in percent: a level with 1/1.4 of its endpoints
/// healthy still takes its whole share.
const OVERPROVISION: u64 = 140;

/// The level a request goes to, of `levels` (each: its number, its endpoints, how many of them
/// are healthy), given a draw `r` in 0..100: Envoy's priority load. Each level takes as much
/// of the load as its health (healthy share x 1.4, at most 100%) allows, the best first; what
/// no level can take is spread in proportion to health. With none healthy, the best level.
pub fn pick_level(levels: &[(u32, usize, usize)], r: u64) -> Option<u32> {
    let health: Vec<u64> = levels
        .iter()
        .map(|(_, total, healthy)| match *total {
            0 => 0,
            t => (OVERPROVISION * *healthy as u64 / t as u64).min(100),
        })
        .collect();
    let sum: u64 = health.iter().sum::<u64>().min(100);
    if sum == 0 {
        return levels.first().map(|l| l.0);
    }
    let mut left = 100u64;
    let mut r = r % 100;
    for (l, h) in levels.iter().zip(health) {
        let load = (h * 100 / sum).min(left);
        if r < load {
            return Some(l.0);
        }
        r -= load;
        left -= load;
    }
    // Rounding left a little over: the best level with any health takes it.
    levels
        .iter()
        .zip(levels.iter().map(|(_, t, h)| *t > 0 && *h > 0))
        .find(|(_, ok)| *ok)
        .map(|(l, _)| l.0)
}

/// A `loadBalancer` at `at`.
fn balance(at: &str, lb: LbSpec) -> Result<Balance, FieldError> {
    refuse_rest(at, &lb.rest)?;
    match (lb.simple.as_deref(), lb.consistent_hash) {
        (Some(_), Some(_)) => Err((
            format!("{at}.consistentHash"),
            "simple and consistentHash are one choice: give one".into(),
        )),
        (None | Some("UNSPECIFIED" | "LEAST_REQUEST" | "LEAST_CONN"), None) => {
            Ok(Balance::LeastRequest)
        }
        (Some("ROUND_ROBIN"), None) => Ok(Balance::RoundRobin),
        (Some("RANDOM"), None) => Ok(Balance::Random),
        (Some(other), None) => Err((
            format!("{at}.simple"),
            format!("{other}: not supported by zring's waypoint (LEAST_REQUEST, LEAST_CONN, ROUND_ROBIN, RANDOM and UNSPECIFIED are)"),
        )),
        (None, Some(h)) => {
            let at = format!("{at}.consistentHash");
            refuse_rest(&at, &h.rest)?;
            let _ = (h.ring_hash, h.maglev, h.minimum_ring_size);
            let mut keys = Vec::new();
            if let Some(name) = h.http_header_name {
                let n = http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
                    .map_err(|_| {
                        (
                            format!("{at}.httpHeaderName"),
                            format!("{name:?} is not a header name"),
                        )
                    })?;
                keys.push(HashKey::Header(n));
            }
            if let Some(c) = h.http_cookie {
                let at = format!("{at}.httpCookie");
                refuse_rest(&at, &c.rest)?;
                if c.name.is_empty() {
                    return Err((format!("{at}.name"), "required".into()));
                }
                let ttl = match c.ttl.as_deref() {
                    Some(t) => Some(dur(format!("{at}.ttl"), t)?).filter(|t| !t.is_zero()),
                    None => None,
                };
                keys.push(HashKey::Cookie {
                    name: c.name,
                    path: c.path.filter(|p| !p.is_empty()),
                    ttl,
                });
            }
            if h.use_source_ip == Some(true) {
                keys.push(HashKey::SourceIp);
            }
            if let Some(q) = h.http_query_parameter_name {
                keys.push(HashKey::Query(q));
            }
            match keys.len() {
                1 => Ok(Balance::Hash(keys.remove(0))),
                0 => Err((at, "one of httpHeaderName, httpCookie, useSourceIp, httpQueryParameterName".into())),
                _ => Err((at, "httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName are one choice: give one".into())),
            }
        }
    }
}

/// `warmup` (or the older `warmupDurationSecs`, used when `warmup` is absent, as istiod does) of
/// the `loadBalancer` at `at`, with Istio's validation.
fn warmup(
    at: &str,
    w: Option<WarmupSpec>,
    secs: Option<String>,
) -> Result<Option<Warmup>, FieldError> {
    let positive = |at: String, s: &str| {
        let d = dur(at.clone(), s)?;
        match d >= Duration::from_millis(1) {
            true => Ok(d),
            false => Err((at, "must be at least 1ms".to_string())),
        }
    };
    if let Some(w) = w {
        let at = format!("{at}.warmup");
        refuse_rest(&at, &w.rest)?;
        let window = match &w.duration {
            Some(d) => positive(format!("{at}.duration"), d)?,
            None => return Err((format!("{at}.duration"), "required".into())),
        };
        let minimum_percent = w.minimum_percent.unwrap_or(10.0);
        if !(0.0..=100.0).contains(&minimum_percent) {
            return Err((
                format!("{at}.minimumPercent"),
                format!("{minimum_percent} is not a percentage (0-100)"),
            ));
        }
        let aggression = w.aggression.unwrap_or(1.0);
        if !(aggression > 0.0 && aggression.is_finite()) {
            return Err((
                format!("{at}.aggression"),
                format!("{aggression}: must be greater than 0"),
            ));
        }
        return Ok(Some(Warmup {
            window,
            minimum_percent,
            aggression,
        }));
    }
    match secs {
        Some(s) => Ok(Some(Warmup {
            window: positive(format!("{at}.warmupDurationSecs"), &s)?,
            minimum_percent: 10.0,
            aggression: 1.0,
        })),
        None => Ok(None),
    }
}

fn dur(at: String, s: &str) -> Result<Duration, FieldError> {
    duration(s).map_err(|m| (at, m))
}

fn percent(at: String, v: u32) -> Result<u32, FieldError> {
    match v {
        0..=100 => Ok(v),
        _ => Err((at, format!("{v} is not a percentage (0-100)"))),
    }
}

/// Parse a `trafficPolicy` found at `at` (e.g. `trafficPolicy`, `subsets[1].trafficPolicy`).
pub fn parse(at: &str, v: Value) -> Result<TrafficPolicy, FieldError> {
    let spec: Spec = serde_path_to_error::deserialize(v)
        .map_err(|e| (format!("{at}.{}", e.path()), e.into_inner().to_string()))?;
    refuse_rest(at, &spec.rest)?;
    let (balance, locality, warmup) = match spec.load_balancer {
        None => (None, None, None),
        Some(mut lb) => {
            let at = format!("{at}.loadBalancer");
            let locality = match lb.locality_lb_setting.take() {
                Some(l) => Some(locality(&format!("{at}.localityLbSetting"), l)?),
                None => None,
            };
            let warmup = warmup(&at, lb.warmup.take(), lb.warmup_duration_secs.take())?;
            (Some(balance(&at, lb)?), locality, warmup)
        }
    };
    if let Some(tls) = spec.tls {
        refuse_rest(&format!("{at}.tls"), &tls.rest)?;
        match tls.mode.as_deref() {
            // Mutual TLS with the mesh's identities: what HBONE to an endpoint always is.
            None | Some("ISTIO_MUTUAL") => {}
            Some(other) => {
                return Err((
                    format!("{at}.tls.mode"),
                    format!("{other}: not supported by zring's waypoint (only ISTIO_MUTUAL, which HBONE already is)"),
                ))
            }
        }
    }
    let outlier = match spec.outlier_detection {
        None => None,
        Some(o) => {
            let at = format!("{at}.outlierDetection");
            refuse_rest(&at, &o.rest)?;
            if let Some(i) = &o.interval {
                // Envoy's sweep interval: consecutive errors eject at once here, and ejections
                // end by time, so only its syntax matters.
                dur(format!("{at}.interval"), i)?;
            }
            Some(Outlier {
                consecutive_5xx: o.consecutive_5xx_errors.unwrap_or(5),
                consecutive_gateway: o.consecutive_gateway_errors.unwrap_or(0),
                base_ejection: match &o.base_ejection_time {
                    Some(s) => dur(format!("{at}.baseEjectionTime"), s)?,
                    None => Duration::from_secs(30),
                },
                max_ejection_percent: percent(
                    format!("{at}.maxEjectionPercent"),
                    o.max_ejection_percent.unwrap_or(10),
                )?,
                min_health_percent: percent(
                    format!("{at}.minHealthPercent"),
                    o.min_health_percent.unwrap_or(0),
                )?,
            })
        }
    };
    let pool = match spec.connection_pool {
        None => None,
        Some(p) => {
            let at = format!("{at}.connectionPool");
            refuse_rest(&at, &p.rest)?;
            let mut pool = Pool {
                max_connections: u32::MAX,
                max_pending: DEFAULT_MAX_PENDING,
                max_requests: u32::MAX,
                max_requests_per_connection: 0,
                connect_timeout: None,
            };
            // Istio reads 0 (proto3's unset) in these limits as "no limit".
            let limit = |v: Option<u32>| v.filter(|n| *n > 0).unwrap_or(u32::MAX);
            if let Some(t) = p.tcp {
                refuse_rest(&format!("{at}.tcp"), &t.rest)?;
                pool.max_connections = limit(t.max_connections);
                if let Some(c) = &t.connect_timeout {
                    pool.connect_timeout = Some(dur(format!("{at}.tcp.connectTimeout"), c)?);
                }
            }
            if let Some(h) = p.http {
                refuse_rest(&format!("{at}.http"), &h.rest)?;
                pool.max_pending = h
                    .http1_max_pending_requests
                    .filter(|n| *n > 0)
                    .unwrap_or(DEFAULT_MAX_PENDING);
                pool.max_requests = limit(h.http2_max_requests);
                pool.max_requests_per_connection = h.max_requests_per_connection.unwrap_or(0);
            }
            Some(pool)
        }
    };
    Ok(TrafficPolicy {
        outlier,
        balance,
        locality,
        warmup,
        pool,
        destination: String::new(),
        gate: GateCell::default(),
    })
}

/// What one try at an endpoint came to, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer below 500.
    Success,
    /// An answer of 500 or more.
    Status(u16),
    /// No answer: the connection failed or was reset, or the try timed out.
    Failed,
}

#[derive(Debug, Default)]
struct EndpointState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// Endpoint health under outlier detection, shared by the workers.
#[derive(Debug, Default)]
pub struct Health {
    endpoints: Mutex<FastMap<SocketAddr, EndpointState>>,
}

impl Health {
    /// Whether `addr` is ejected now.
    pub fn ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        let map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&addr)
            .and_then(|s| s.ejected_until)
            .is_some_and(|until| until > now)
    }

    /// Of `eps`, those not ejected now; all of them when fewer than `min_health_percent` are
    /// healthy (Envoy's panic mode: better a failing endpoint than none).
    pub fn healthy(&self, eps: &[SocketAddr], o: &Outlier, now: Instant) -> Vec<SocketAddr> {
        let map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let up: Vec<SocketAddr> = eps
            .iter()
            .copied()
            .filter(|a| {
                map.get(a)
                    .and_then(|s| s.ejected_until)
                    .is_none_or(|until| until <= now)
            })
            .collect();
        match (up.len() as u64) * 100 < (o.min_health_percent as u64) * (eps.len() as u64) {
            true => eps.to_vec(),
            false => up,
        }
    }

    /// Count one try's outcome at `addr` (an endpoint of a destination whose endpoints are
    /// `eps`); returns how long it was ejected for, if this ejected it.
    pub fn record(
        &self,
        addr: SocketAddr,
        outcome: Outcome,
        o: &Outlier,
        eps: &[SocketAddr],
        now: Instant,
    ) -> Option<Duration> {
        let mut map = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        let (fivexx, gateway) = match outcome {
            Outcome::Success => {
                if let Some(s) = map.get_mut(&addr) {
                    s.consecutive_5xx = 0;
                    s.consecutive_gateway = 0;
                }
                return None;
            }
            Outcome::Status(c) => (c >= 500, matches!(c, 502..=504)),
            Outcome::Failed => (true, true),
        };
        let already = eps
            .iter()
            .filter(|a| **a != addr)
            .filter(|a| {
                map.get(a)
                    .and_then(|s| s.ejected_until)
                    .is_some_and(|until| until > now)
            })
            .count();
        let s = map.entry(addr).or_default();
        if s.ejected_until.is_some_and(|until| until > now) {
            return None;
        }
        s.consecutive_5xx = if fivexx { s.consecutive_5xx + 1 } else { 0 };
        s.consecutive_gateway = if gateway {
            s.consecutive_gateway + 1
        } else {
            0
        };
        let tripped = (o.consecutive_5xx > 0 && s.consecutive_5xx >= o.consecutive_5xx)
            || (o.consecutive_gateway > 0 && s.consecutive_gateway >= o.consecutive_gateway);
        // Envoy ejects while the share already ejected is below the maximum, so one endpoint
        // may always be ejected.
        let room = (already as u64) * 100 < (o.max_ejection_percent as u64) * (eps.len() as u64)
            || already == 0;
        if !tripped || !room {
            return None;
        }
        s.ejections += 1;
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        let d = o
            .base_ejection
            .saturating_mul(s.ejections)
            .min(MAX_EJECTION);
        s.ejected_until = Some(now + d);
        Some(d)
    }
}

/// Requests active and waiting towards one destination.
#[derive(Debug, Default)]
struct Gate {
    active: AtomicU32,
    pending: AtomicU32,
}

/// How often a waiter looks again for room given back on another worker. Room given back on
/// the waiter's own worker wakes it at once ([`LOCAL_WAITERS`]); a worker's wakers cannot be
/// used from another thread (monoio without its `sync` feature panics), so across workers
/// the waiters look again at this pace: 20 looks a second each, not a thousand, and the queue
/// is bounded ([`DEFAULT_MAX_PENDING`]).
const CROSS_WORKER_RECHECK: Duration = Duration::from_millis(50);

thread_local! {
    /// This worker's waiters, by gate: woken when a permit of that gate is given back here.
    static LOCAL_WAITERS: std::cell::RefCell<FastMap<usize, std::rc::Rc<tokio::sync::Notify>>> =
        Default::default();
}

fn gate_key(g: &Gate) -> usize {
    g as *const Gate as usize
}

/// Room for one request under a destination's connection-pool limits; given back on drop.
#[derive(Debug)]
pub struct Permit(Arc<Gate>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
        if self.0.pending.load(Ordering::Acquire) > 0 {
            let key = gate_key(&self.0);
            let _ = LOCAL_WAITERS.try_with(|w| {
                if let Some(n) = w.borrow().get(&key) {
                    n.notify_one();
                }
            });
        }
    }
}

/// Why a request got no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// The limit was reached and the pending queue was full.
    Full,
    /// It waited in the queue until the request's deadline.
    TimedOut,
}

/// The connection-pool gates, one per destination, shared by the workers.
#[derive(Debug, Default)]
pub struct Gates {
    gates: Mutex<FastMap<String, Arc<Gate>>>,
}

impl Gates {
    fn gate(&self, key: &str) -> Arc<Gate> {
        let mut g = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gate) = g.get(key) {
            return gate.clone();
        }
        let gate = Arc::new(Gate::default());
        g.insert(key.to_string(), gate.clone());
        gate
    }

    /// Room for a request under `policy`'s destination with at most `limit` in flight and
    /// `max_pending` waiting; a request that finds no room waits (if the queue has room) until
    /// `deadline`.
    pub async fn acquire(
        &self,
        policy: &TrafficPolicy,
        limit: u32,
        max_pending: u32,
        deadline: Instant,
    ) -> Result<Permit, Overflow> {
        let gate = policy
            .gate
            .0
            .get_or_init(|| self.gate(&policy.destination))
            .clone();
        let take = |g: &Gate| {
            g.active
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok()
        };
        if take(&gate) {
            return Ok(Permit(gate));
        }
        if gate
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_pending).then_some(n + 1)
            })
            .is_err()
        {
            return Err(Overflow::Full);
        }
        // Boxed: the wait is rare, and its timer would otherwise enlarge every request's future.
        Box::pin(Self::wait(gate, take, deadline)).await
    }

    /// Wait in `gate`'s queue (already counted in `pending`) until `take` gets room or
    /// `deadline` passes.
    async fn wait(
        gate: Arc<Gate>,
        take: impl Fn(&Gate) -> bool,
        deadline: Instant,
    ) -> Result<Permit, Overflow> {
        let key = gate_key(&gate);
        let local = LOCAL_WAITERS.with(|w| w.borrow_mut().entry(key).or_default().clone());
        let result = loop {
            // Registered before the check, so room given back between the check and the wait
            // still wakes this waiter.
            let released = local.notified();
            let mut released = std::pin::pin!(released);
            released.as_mut().enable();
            if take(&gate) {
                break Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(Overflow::TimedOut);
            }
            let _ = monoio::time::timeout(left.min(CROSS_WORKER_RECHECK), released).await;
        };
        // The last waiter of this gate on this worker takes the entry away.
        if std::rc::Rc::strong_count(&local) == 2 {
            LOCAL_WAITERS.with(|w| w.borrow_mut().remove(&key));
        }
        gate.pending.fetch_sub(1, Ordering::AcqRel);
        result.map(|()| Permit(gate))
    }

    /// Requests in flight to `key`.
    #[cfg(test)]
    fn active(&self, key: &str) -> u32 {
        self.gate(key).active.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(y: &str) -> Result<TrafficPolicy, FieldError> {
        parse("trafficPolicy", serde_yaml_ng::from_str(y).unwrap())
    }

    #[test]
    fn load_balancers_are_read_and_a_subsets_replaces_the_rules() {
        let lb = |y: &str| tp(&format!("loadBalancer: {y}\n")).map(|p| p.balance.unwrap());
        for (simple, want) in [
            ("ROUND_ROBIN", Balance::RoundRobin),
            ("RANDOM", Balance::Random),
            ("LEAST_REQUEST", Balance::LeastRequest),
            ("LEAST_CONN", Balance::LeastRequest),
            ("UNSPECIFIED", Balance::LeastRequest),
        ] {
            assert_eq!(lb(&format!("{{simple: {simple}}}")).unwrap(), want);
        }
        // Istio's default is least request, also when only other load-balancer fields are set.
        assert_eq!(
            lb("{localityLbSetting: {enabled: false}}").unwrap(),
            Balance::LeastRequest
        );
        assert_eq!(
            lb("{consistentHash: {httpHeaderName: X-User}}").unwrap(),
            Balance::Hash(HashKey::Header(http::HeaderName::from_static("x-user")))
        );
        assert_eq!(
            lb("{consistentHash: {httpCookie: {name: user, path: /, ttl: 0s}, ringHash: {minimumRingSize: 1024}}}").unwrap(),
            Balance::Hash(HashKey::Cookie { name: "user".into(), path: Some("/".into()), ttl: None })
        );
        assert_eq!(
            lb("{consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}").unwrap(),
            Balance::Hash(HashKey::SourceIp)
        );
        assert_eq!(
            lb("{consistentHash: {httpQueryParameterName: user}}").unwrap(),
            Balance::Hash(HashKey::Query("user".into()))
        );
        for (y, field) in [
            ("{simple: PASSTHROUGH}", "trafficPolicy.loadBalancer.simple"),
            (
                "{simple: RANDOM, consistentHash: {useSourceIp: true}}",
                "trafficPolicy.loadBalancer.consistentHash",
            ),
            (
                "{consistentHash: {}}",
                "trafficPolicy.loadBalancer.consistentHash",
            ),
            (
                "{consistentHash: {useSourceIp: false}}",
                "trafficPolicy.loadBalancer.consistentHash",
            ),
            (
                "{consistentHash: {useSourceIp: true, httpHeaderName: x}}",
                "trafficPolicy.loadBalancer.consistentHash",
            ),
            (
                "{consistentHash: {httpCookie: {name: a, ttl: soon}}}",
                "trafficPolicy.loadBalancer.consistentHash.httpCookie.ttl",
            ),
            (
                "{consistentHash: {httpHeaderName: 'bad name'}}",
                "trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
            ),
            (
                "{localityLbSetting: {distribute: [{from: r1/*, to: {r1/*: 90}}]}}",
                "trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to",
            ),
            (
                "{localityLbSetting: {distribute: [{from: r1/*, to: {r1/*: 100}}], failover: [{from: r1, to: r2}]}}",
                "trafficPolicy.loadBalancer.localityLbSetting.distribute",
            ),
            (
                "{localityLbSetting: {failover: [{from: r1, to: r1}]}}",
                "trafficPolicy.loadBalancer.localityLbSetting.failover[0]",
            ),
            (
                "{simple: RANDOM, warmupDurationSecs: soon}",
                "trafficPolicy.loadBalancer.warmupDurationSecs",
            ),
            (
                "{warmup: {minimumPercent: 5}}",
                "trafficPolicy.loadBalancer.warmup.duration",
            ),
            (
                "{warmup: {duration: 0s}}",
                "trafficPolicy.loadBalancer.warmup.duration",
            ),
            (
                "{warmup: {duration: 10s, minimumPercent: 101}}",
                "trafficPolicy.loadBalancer.warmup.minimumPercent",
            ),
            (
                "{warmup: {duration: 10s, aggression: 0}}",
                "trafficPolicy.loadBalancer.warmup.aggression",
            ),
            (
                "{warmup: {duration: 10s, ramp: fast}}",
                "trafficPolicy.loadBalancer.warmup.ramp",
            ),
        ] {
            assert_eq!(lb(y).unwrap_err().0, field, "{y}");
        }
        let rule = tp("loadBalancer: {consistentHash: {useSourceIp: true}}\n").unwrap();
        let subset = tp("loadBalancer: {simple: ROUND_ROBIN}\n").unwrap();
        assert_eq!(
            rule.overridden_by(&subset).balance,
            Some(Balance::RoundRobin)
        );
        let other = tp("outlierDetection: {consecutive5xxErrors: 1}\n").unwrap();
        assert_eq!(
            rule.overridden_by(&other).balance,
            Some(Balance::Hash(HashKey::SourceIp))
        );
        assert!(rule.dump()["loadBalancer"]["consistentHash"]["useSourceIp"] == true);
    }

    /// A workload `name` at region/zone/subzone `at`, on `node`, with labels `labels`.
    fn placed(name: &str, at: &str, node: &str, labels: &[(&str, &str)]) -> Workload {
        let mut w = crate::config::LocalConfig::from_yaml(
            &format!("workloads:\n- uid: c//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  node: {node}\n"),
            std::path::Path::new("t"),
        )
        .unwrap()
        .workloads
        .remove(0);
        let mut l = at.split('/').map(str::to_string);
        w.locality.region = l.next().unwrap_or_default();
        w.locality.zone = l.next().unwrap_or_default();
        w.locality.subzone = l.next().unwrap_or_default();
        w.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        w
    }

    #[test]
    fn locality_settings_order_endpoints_as_istio_does() {
        let me = placed("waypoint", "r1/z1/s1", "n1", &[("tier", "gold")]);
        let eps_w = [
            placed("same-subzone", "r1/z1/s1", "n2", &[]),
            placed("same-zone", "r1/z1/s2", "n2", &[]),
            placed("same-region", "r1/z2/s1", "n2", &[("tier", "gold")]),
            placed("failover-region", "r2/z1/s1", "n1", &[("tier", "gold")]),
            placed("other-region", "r3/z1/s1", "n1", &[]),
        ];
        let eps: Vec<(&Workload, u16)> = eps_w.iter().map(|w| (w, 80)).collect();
        let with = |y: &str| tp(y).unwrap();
        let lv = |p: &TrafficPolicy| levels(Some(&me), "n1", &eps, None, Some(p));
        // The mesh default: locality failover once the rule has outlier detection.
        assert_eq!(
            lv(&with(
                "outlierDetection: {}
"
            )),
            [0, 1, 2, 3, 3]
        );
        assert_eq!(
            lv(&with(
                "connectionPool: {}
"
            )),
            [0; 5]
        );
        // A failover region goes before the other regions.
        let failover = with(
            "outlierDetection: {}
loadBalancer:
  localityLbSetting:
    failover: [{from: r1, to: r2}]
",
        );
        assert_eq!(lv(&failover), [0, 1, 2, 3, 4]);
        assert_eq!(
            failover.dump()["loadBalancer"]["localityLbSetting"]["failover"][0]["to"],
            "r2"
        );
        // Turned off, or without outlier detection: no order.
        let off = "outlierDetection: {}
loadBalancer: {localityLbSetting: {enabled: false}}
";
        assert_eq!(lv(&with(off)), [0; 5]);
        let no_outlier = "loadBalancer: {localityLbSetting: {failover: [{from: r1, to: r2}]}}
";
        assert_eq!(lv(&with(no_outlier)), [0; 5]);
        // Failover priority by labels (topology ones included): first mismatch decides; a
        // value after `=` stands for the waypoint's own.
        let fp = with(
            "outlierDetection: {}
loadBalancer:
  localityLbSetting:
    failoverPriority: [tier, topology.kubernetes.io/region, kubernetes.io/hostname]
",
        );
        assert_eq!(lv(&fp), [3, 3, 1, 2, 3]);
        let over = with(
            "outlierDetection: {}
loadBalancer:
  localityLbSetting:
    failoverPriority: [tier=silver]
",
        );
        assert_eq!(lv(&over), [1, 1, 1, 1, 1]);
        // Both: labels first, then locality within.
        let both = with(
            "outlierDetection: {}
loadBalancer:
  localityLbSetting:
    failoverPriority: [tier]
    failover: [{from: r1, to: r2}]
",
        );
        assert_eq!(lv(&both), [5, 6, 2, 3, 9]);
        // A subset's loadBalancer replaces the rule's locality setting with the rest of it.
        let subset = with(
            "loadBalancer: {simple: ROUND_ROBIN}
",
        );
        assert_eq!(failover.overridden_by(&subset).locality, None);
        assert!(failover
            .overridden_by(&with(
                "outlierDetection: {}
"
            ))
            .locality
            .is_some());
        // No DestinationRule setting: the service's PreferClose orders them, outlier or not.
        let prefer_close = LoadBalancer {
            routing_preferences: vec![
                crate::config::Scope::Network,
                crate::config::Scope::Region,
                crate::config::Scope::Zone,
                crate::config::Scope::Subzone,
            ],
            mode: LoadBalancerMode::Failover,
            health_policy: Default::default(),
        };
        assert_eq!(
            levels(Some(&me), "n1", &eps, Some(&prefer_close), None),
            [0, 1, 2, 3, 3]
        );
        // A network-first label: another network goes below every same-network endpoint.
        let mut far = placed("far", "r1/z1/s1", "n2", &[]);
        far.network = "other".into();
        let net = with(
            "outlierDetection: {}
loadBalancer:
  localityLbSetting:
    failoverPriority: [topology.istio.io/network, topology.kubernetes.io/zone]
",
        );
        let eps2 = [(&far, 80), (&eps_w[2], 80), (&eps_w[0], 80)];
        assert_eq!(levels(Some(&me), "n1", &eps2, None, Some(&net)), [2, 1, 0]);
    }

    #[test]
    fn distribute_gives_each_named_locality_its_share() {
        let l = |at: &str| {
            let w = placed("x", at, "n", &[]);
            w.locality
        };
        assert!(locality_matches(&l("r1/z1/s1"), "r1/z1/*"));
        assert!(locality_matches(&l("r1/z1/s1"), "r1"));
        assert!(locality_matches(&l("r1/z1/s1"), "*"));
        assert!(!locality_matches(&l("r1/z2/s1"), "r1/z1/*"));
        assert!(!locality_matches(&l("r2/z1/s1"), "r1/*"));
        let me = placed("waypoint", "r1/z1/s1", "n1", &[]);
        let mut big = placed("z1-big", "r1/z1/s1", "n2", &[]);
        big.capacity = 3;
        let ws = [
            big,
            placed("z1-small", "r1/z1/s2", "n2", &[]),
            placed("z2", "r1/z2/s1", "n2", &[]),
            placed("r2", "r2/z1/s1", "n2", &[]),
        ];
        let eps: Vec<(&Workload, u16)> = ws.iter().map(|w| (w, 80)).collect();
        let p = tp("loadBalancer:\n  localityLbSetting:\n    distribute:\n    - {from: r9/*, to: {\"*\": 100}}\n    - {from: r1/z1/*, to: {r1/z1/*: 80, r1/z2/*: 20}}\n").unwrap();
        let rules = &p.locality.as_ref().unwrap().distribute;
        // 80 over z1 by capacity (3:1), 20 to z2, nothing to r2.
        assert_eq!(
            distributed(&me, &eps, rules).unwrap(),
            [Some(60_000), Some(20_000), Some(20_000), None]
        );
        // No rule from the waypoint's locality: nothing changes.
        let far = placed("waypoint", "r5/z1/s1", "n1", &[]);
        assert_eq!(distributed(&far, &eps, rules), None);
        // distribute orders nothing by priority, outlier detection or not.
        let with_outlier = tp("outlierDetection: {}\nloadBalancer:\n  localityLbSetting:\n    distribute:\n    - {from: r1/z1/*, to: {r1/z1/*: 100}}\n").unwrap();
        assert_eq!(
            levels(Some(&me), "n1", &eps, None, Some(&with_outlier)),
            [0; 4]
        );
        assert!(
            p.dump()["loadBalancer"]["localityLbSetting"]["distribute"][1]["to"]["r1/z2/*"] == 20
        );
    }

    #[test]
    fn warmup_is_read_with_istios_defaults_and_ramps_as_envoys_slow_start() {
        let w = |y: &str| tp(&format!("loadBalancer: {y}\n")).unwrap().warmup.unwrap();
        let old = w("{simple: ROUND_ROBIN, warmupDurationSecs: 60s}");
        assert_eq!(
            old,
            Warmup {
                window: Duration::from_secs(60),
                minimum_percent: 10.0,
                aggression: 1.0
            }
        );
        // `warmup` wins over the older field, as istiod reads them.
        let new = w(
            "{warmupDurationSecs: 5s, warmup: {duration: 100s, minimumPercent: 20, aggression: 2}}",
        );
        assert_eq!(new.window, Duration::from_secs(100));
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        let secs = Duration::from_secs;
        // Linear from max(1 s, age) / window, never below the minimum, 1.0 once warm.
        assert!(close(old.factor(Duration::ZERO), 0.1));
        assert!(close(old.factor(secs(3)), 0.1));
        assert!(close(old.factor(secs(30)), 0.5));
        assert!(close(old.factor(secs(59)), 59.0 / 60.0));
        assert!(close(old.factor(secs(600)), 1.0));
        // Aggression 2: the square root of the time factor.
        assert!(close(new.factor(secs(25)), 0.5));
        assert!(close(new.factor(secs(1)), 0.2));
        // A subset's loadBalancer replaces the warm-up with the rest of it.
        let rule = tp("loadBalancer: {warmupDurationSecs: 60s}\n").unwrap();
        let subset = tp("loadBalancer: {simple: RANDOM}\n").unwrap();
        assert_eq!(rule.overridden_by(&subset).warmup, None);
        assert!(rule.dump()["loadBalancer"]["warmup"]["durationMs"] == 60_000);

        // First sightings: the endpoints seen together share an age; one seen later ramps up.
        let births = Births::default();
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!(births.factors(&[a], &old, t0), vec![0.1]);
        let f = births.factors(&[a, b], &old, t0 + secs(30));
        assert!(close(f[0], 0.5) && close(f[1], 0.1), "{f:?}");
        let f = births.factors(&[a, b], &old, t0 + secs(90));
        assert!(close(f[0], 1.0) && close(f[1], 1.0), "{f:?}");
        // b leaves; back after longer than the window, it starts again.
        births.factors(&[a], &old, t0 + secs(100));
        births.factors(&[a], &old, t0 + secs(150));
        let f = births.factors(&[a, b], &old, t0 + secs(200));
        assert!(close(f[0], 1.0) && close(f[1], 0.1), "{f:?}");
    }

    #[test]
    fn least_request_round_robin_and_random_choose_as_envoy_does() {
        let c = |w: &[u32]| {
            w.iter()
                .map(|w| Candidate {
                    weight: *w,
                    warm: 1.0,
                })
                .collect::<Vec<_>>()
        };
        let idle = |_| 0;
        let lr = Balance::LeastRequest;
        // Nothing in flight, equal weights: in turn, whatever the random draw.
        let three = c(&[1, 1, 1]);
        for turn in 0..6 {
            for rand in [0, 1, 7, u64::MAX] {
                assert_eq!(choose(&lr, &three, turn, rand, idle), Some(turn % 3));
            }
        }
        // Two endpoints: the one with fewer in flight, whichever is next in turn.
        let two = c(&[1, 1]);
        let busy0 = |i: usize| [3, 1][i];
        for turn in 0..4 {
            assert_eq!(choose(&lr, &two, turn, 5, busy0), Some(1));
        }
        // Three: the next in turn against a random other; a busier next one loses.
        let busy = |i: usize| [5, 0, 0][i];
        assert_eq!(choose(&lr, &three, 0, 0, busy), Some(1));
        assert_eq!(choose(&lr, &three, 0, 1, busy), Some(2));
        assert_eq!(
            choose(&lr, &three, 1, 0, busy),
            Some(1),
            "a tie keeps the turn"
        );
        // Unequal weights, nothing in flight: weighted turns (3:1 gives 6:2 of 8).
        let heavy = c(&[3, 1]);
        let picks: Vec<usize> = (0..8)
            .map(|t| choose(&lr, &heavy, t, 9, idle).unwrap())
            .collect();
        assert_eq!(picks.iter().filter(|i| **i == 0).count(), 6);
        // ... and with requests in flight, weight / (in flight + 1): 3/4 against 1/1.
        let tally = |b: &Balance, cs: &[Candidate], active: &dyn Fn(usize) -> u32| {
            let mut n = [0usize; 3];
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for t in 0..40_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                n[choose(b, cs, t, x, active).unwrap()] += 1;
            }
            n.map(|k| k as f64 / 40_000.0)
        };
        let share = tally(&lr, &heavy, &|i| [3, 0][i]);
        assert!((share[0] - 3.0 / 7.0).abs() < 0.02, "{share:?}");
        // Slow start: a new endpoint at 10% of its weight gets 1 in 11.
        let mut warming = c(&[1, 1]);
        warming[1].warm = 0.1;
        for b in [&lr, &Balance::RoundRobin] {
            let share = tally(b, &warming, &idle);
            assert!((share[1] - 1.0 / 11.0).abs() < 0.01, "{b:?} {share:?}");
        }
        // Random ignores weights and slow start; weight 0 takes nothing anywhere.
        let share = tally(&Balance::Random, &warming, &idle);
        assert!((share[1] - 0.5).abs() < 0.02, "{share:?}");
        let zero = c(&[0, 1, 0]);
        for b in [&lr, &Balance::RoundRobin, &Balance::Random] {
            assert_eq!(tally(b, &zero, &idle), [0.0, 1.0, 0.0], "{b:?}");
        }
        assert_eq!(choose(&lr, &c(&[0, 0]), 0, 0, idle), None);
        assert_eq!(
            (0..4)
                .map(|t| choose(&Balance::RoundRobin, &three, t, 0, busy).unwrap())
                .collect::<Vec<_>>(),
            [0, 1, 2, 0],
            "round robin ignores what is in flight"
        );
    }

    #[test]
    fn priority_load_spills_over_as_a_level_loses_health() {
        let share = |levels: &[(u32, usize, usize)]| {
            let mut c = std::collections::BTreeMap::new();
            for r in 0..100 {
                *c.entry(pick_level(levels, r).unwrap()).or_insert(0) += 1;
            }
            c.into_iter().collect::<Vec<_>>()
        };
        // All healthy: the best level takes everything.
        assert_eq!(share(&[(0, 4, 4), (1, 4, 4)]), [(0, 100)]);
        // 3 of 4 healthy x 1.4 is still over 100%.
        assert_eq!(share(&[(0, 4, 3), (1, 4, 4)]), [(0, 100)]);
        // 2 of 4: 70% stays, 30% spills to the next level.
        assert_eq!(share(&[(0, 4, 2), (1, 4, 4)]), [(0, 70), (1, 30)]);
        // None healthy at the first level: the next takes it all.
        assert_eq!(share(&[(0, 2, 0), (1, 2, 2), (2, 2, 2)]), [(1, 100)]);
        // Little health anywhere: shared in proportion (35 + 35 of 70 normalised).
        assert_eq!(share(&[(0, 4, 1), (1, 4, 1)]), [(0, 50), (1, 50)]);
        // None healthy at all: the best level.
        assert_eq!(share(&[(0, 1, 0), (1, 1, 0)]), [(0, 100)]);
        assert_eq!(pick_level(&[], 0), None);
    }

    #[test]
    fn rendezvous_keeps_a_key_on_its_endpoint_and_spreads_keys() {
        let eps: Vec<SocketAddr> = (1..=4)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 9080)))
            .collect();
        let mut count = [0; 4];
        for k in 0..400 {
            let key = format!("user-{k}");
            let i = rendezvous(key.as_bytes(), eps.iter().copied()).unwrap();
            assert_eq!(
                rendezvous(key.as_bytes(), eps.iter().copied()),
                Some(i),
                "stable"
            );
            count[i] += 1;
            // Another endpoint leaving does not move this key.
            let gone = (i + 1) % 4;
            let rest: Vec<SocketAddr> = eps
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != gone)
                .map(|(_, a)| *a)
                .collect();
            let j = rendezvous(key.as_bytes(), rest.iter().copied()).unwrap();
            assert_eq!(rest[j], eps[i], "{key} moved when {} left", eps[gone]);
        }
        assert!(count.iter().all(|c| (60..=140).contains(c)), "{count:?}");
        assert_eq!(rendezvous(b"x", std::iter::empty()), None);
    }

    #[test]
    fn istios_circuit_breaker_example_and_defaults() {
        // Istio's circuit-breaking task, verbatim.
        let p = tp("connectionPool:\n  tcp:\n    maxConnections: 1\n  http:\n    http1MaxPendingRequests: 1\n    maxRequestsPerConnection: 1\noutlierDetection:\n  consecutive5xxErrors: 1\n  interval: 1s\n  baseEjectionTime: 3m\n  maxEjectionPercent: 100\n").unwrap();
        let pool = p.pool.unwrap();
        assert_eq!(pool.limit(false), 1);
        assert_eq!(pool.limit(true), u32::MAX);
        assert_eq!((pool.max_pending, pool.max_requests_per_connection), (1, 1));
        let o = p.outlier.unwrap();
        assert_eq!(o.consecutive_5xx, 1);
        assert_eq!(o.base_ejection, Duration::from_secs(180));
        assert_eq!(o.max_ejection_percent, 100);
        // Istio's defaults for what is left out.
        let o = tp("outlierDetection: {}\n").unwrap().outlier.unwrap();
        assert_eq!(
            (
                o.consecutive_5xx,
                o.consecutive_gateway,
                o.base_ejection,
                o.max_ejection_percent,
                o.min_health_percent
            ),
            (5, 0, Duration::from_secs(30), 10, 0)
        );
        // 0 is proto3's "unset": no limit, as Istio reads it.
        let pool =
            tp("connectionPool: {tcp: {maxConnections: 0}, http: {http1MaxPendingRequests: 0}}\n")
                .unwrap()
                .pool
                .unwrap();
        assert_eq!(
            (pool.limit(false), pool.max_pending),
            (u32::MAX, DEFAULT_MAX_PENDING)
        );
        // Bookinfo's all-mTLS rules.
        assert_eq!(
            tp("tls: {mode: ISTIO_MUTUAL}\nloadBalancer: {simple: RANDOM}\n").unwrap(),
            TrafficPolicy {
                balance: Some(Balance::Random),
                ..Default::default()
            }
        );
    }

    #[test]
    fn unimplemented_fields_are_refused_by_name() {
        for (y, field) in [
            ("tls: {mode: SIMPLE}\n", "trafficPolicy.tls.mode"),
            (
                "tls: {mode: ISTIO_MUTUAL, sni: x}\n",
                "trafficPolicy.tls.sni",
            ),
            ("portLevelSettings: []\n", "trafficPolicy.portLevelSettings"),
            (
                "outlierDetection: {splitExternalLocalOriginErrors: true}\n",
                "trafficPolicy.outlierDetection.splitExternalLocalOriginErrors",
            ),
            (
                "connectionPool: {http: {idleTimeout: 1s}}\n",
                "trafficPolicy.connectionPool.http.idleTimeout",
            ),
            (
                "outlierDetection: {maxEjectionPercent: 101}\n",
                "trafficPolicy.outlierDetection.maxEjectionPercent",
            ),
            (
                "outlierDetection: {baseEjectionTime: soon}\n",
                "trafficPolicy.outlierDetection.baseEjectionTime",
            ),
        ] {
            let (f, m) = tp(y).unwrap_err();
            assert_eq!(f, field, "{y}: {m}");
        }
        let (f, _) = tp("outlierDetection: {consecutive5xxErrors: many}\n").unwrap_err();
        assert_eq!(f, "trafficPolicy.outlierDetection.consecutive5xxErrors");
    }

    #[test]
    fn a_subset_replaces_whole_fields() {
        let dr = tp("outlierDetection: {consecutive5xxErrors: 3}\nconnectionPool: {http: {http2MaxRequests: 10}}\n").unwrap();
        let sub = tp("connectionPool: {tcp: {maxConnections: 2}}\n").unwrap();
        let m = dr.overridden_by(&sub);
        assert_eq!(m.outlier.unwrap().consecutive_5xx, 3);
        let pool = m.pool.unwrap();
        assert_eq!(
            (pool.max_connections, pool.max_requests),
            (2, u32::MAX),
            "the subset's connectionPool replaces the rule's"
        );
    }

    fn addrs(n: u8) -> Vec<SocketAddr> {
        (1..=n)
            .map(|i| SocketAddr::from(([127, 0, 0, i], 80)))
            .collect()
    }

    fn outlier(n5xx: u32, gw: u32, max_pct: u32) -> Outlier {
        Outlier {
            consecutive_5xx: n5xx,
            consecutive_gateway: gw,
            base_ejection: Duration::from_secs(10),
            max_ejection_percent: max_pct,
            min_health_percent: 0,
        }
    }

    #[test]
    fn consecutive_errors_eject_for_longer_each_time_and_success_resets() {
        let h = Health::default();
        let eps = addrs(4);
        let o = outlier(3, 0, 100);
        let t0 = Instant::now();
        assert_eq!(h.record(eps[0], Outcome::Status(500), &o, &eps, t0), None);
        assert_eq!(h.record(eps[0], Outcome::Status(503), &o, &eps, t0), None);
        assert_eq!(h.record(eps[0], Outcome::Success, &o, &eps, t0), None);
        assert_eq!(h.record(eps[0], Outcome::Status(500), &o, &eps, t0), None);
        assert_eq!(h.record(eps[0], Outcome::Failed, &o, &eps, t0), None);
        assert_eq!(
            h.record(eps[0], Outcome::Status(500), &o, &eps, t0),
            Some(Duration::from_secs(10))
        );
        assert!(h.ejected(eps[0], t0));
        assert_eq!(h.healthy(&eps, &o, t0), eps[1..].to_vec());
        let t1 = t0 + Duration::from_secs(11);
        assert!(!h.ejected(eps[0], t1));
        for _ in 0..2 {
            assert_eq!(h.record(eps[0], Outcome::Status(500), &o, &eps, t1), None);
        }
        assert_eq!(
            h.record(eps[0], Outcome::Status(500), &o, &eps, t1),
            Some(Duration::from_secs(20)),
            "the second ejection is twice the base"
        );
        // 4xx answers are not errors; gateway errors count only 502-504 and failures.
        let g = outlier(0, 2, 100);
        assert_eq!(h.record(eps[1], Outcome::Status(500), &g, &eps, t0), None);
        assert_eq!(h.record(eps[1], Outcome::Status(500), &g, &eps, t0), None);
        assert_eq!(h.record(eps[1], Outcome::Status(502), &g, &eps, t0), None);
        assert!(h.record(eps[1], Outcome::Failed, &g, &eps, t0).is_some());
    }

    #[test]
    fn max_ejection_percent_keeps_endpoints_and_min_health_ignores_ejections() {
        let h = Health::default();
        let eps = addrs(4);
        let o = outlier(1, 0, 10);
        let t = Instant::now();
        // 10% of 4: the first ejection is always allowed, the second is not.
        assert!(h.record(eps[0], Outcome::Failed, &o, &eps, t).is_some());
        assert!(h.record(eps[1], Outcome::Failed, &o, &eps, t).is_none());
        let o50 = outlier(1, 0, 50);
        assert!(h.record(eps[1], Outcome::Failed, &o50, &eps, t).is_some());
        assert!(h.record(eps[2], Outcome::Failed, &o50, &eps, t).is_none());
        assert_eq!(h.healthy(&eps, &o50, t).len(), 2);
        let panic = Outlier {
            min_health_percent: 75,
            ..o50
        };
        assert_eq!(
            h.healthy(&eps, &panic, t),
            eps,
            "below 75% healthy: all serve"
        );
    }

    #[test]
    fn a_gate_admits_up_to_its_limit_queues_then_overflows() {
        let gates = Gates::default();
        let policy = |d: &str| TrafficPolicy {
            destination: d.into(),
            ..Default::default()
        };
        let d = policy("d");
        let mut rt =
            zring_runtime::backend::build_runtime(zring_runtime::IoBackend::Epoll, 64).unwrap();
        rt.block_on(async {
            let soon = Instant::now() + Duration::from_millis(30);
            let a = gates.acquire(&d, 1, 0, soon).await.unwrap();
            assert_eq!(gates.active("d"), 1);
            assert_eq!(
                gates.acquire(&d, 1, 0, soon).await.unwrap_err(),
                Overflow::Full
            );
            // A reload makes a new policy for the same destination: it finds the same gate,
            // with the request in flight counted, and so does a copy.
            assert_eq!(
                gates.acquire(&policy("d"), 1, 0, soon).await.unwrap_err(),
                Overflow::Full
            );
            assert_eq!(
                gates.acquire(&d.clone(), 1, 0, soon).await.unwrap_err(),
                Overflow::Full
            );
            // With room in the queue it waits, and gets in once the first is done...
            let wait = gates.acquire(&d, 1, 1, Instant::now() + Duration::from_secs(5));
            let release = async move {
                monoio::time::sleep(Duration::from_millis(20)).await;
                drop(a);
            };
            let started = Instant::now();
            let (b, ()) = monoio::join!(wait, release);
            let b = b.unwrap();
            // Woken by the release on this worker, not by its next look (security review L3:
            // waiters polled every millisecond before).
            assert!(
                started.elapsed() < Duration::from_millis(20) + CROSS_WORKER_RECHECK / 2,
                "the waiter was not woken by the release: {:?}",
                started.elapsed()
            );
            // Waiting costs no looks while nothing happens: one waiter over 200 ms wakes at
            // most 200 / 50 times, not 200.
            let polls = std::rc::Rc::new(std::cell::Cell::new(0u32));
            let counted = {
                let polls = polls.clone();
                let gates = &gates;
                let d = &d;
                async move {
                    let wait = gates.acquire(d, 1, 1, Instant::now() + Duration::from_millis(200));
                    let mut wait = std::pin::pin!(wait);
                    std::future::poll_fn(|cx| {
                        polls.set(polls.get() + 1);
                        std::future::Future::poll(wait.as_mut(), cx)
                    })
                    .await
                }
            };
            assert_eq!(counted.await.unwrap_err(), Overflow::TimedOut);
            assert!(
                polls.get() <= 8,
                "{} polls of one waiter in 200 ms",
                polls.get()
            );
            // ...or gives up at its deadline.
            let t = Instant::now();
            assert_eq!(
                gates
                    .acquire(&d, 1, 1, t + Duration::from_millis(20))
                    .await
                    .unwrap_err(),
                Overflow::TimedOut
            );
            assert!(t.elapsed() >= Duration::from_millis(20));
            drop(b);
            assert_eq!(gates.active("d"), 0);
            assert!(gates.acquire(&policy("other"), 1, 0, soon).await.is_ok());
        });
    }
}

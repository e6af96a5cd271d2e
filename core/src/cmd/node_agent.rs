//! `zring node-agent`: the node agent's side of ZDS, for places without istio-cni (tests, bare
//! VMs, the demo). It listens on the ZDS socket as istio-cni does, so the proxy's client runs
//! exactly as in a cluster.
//!
//! Control channel: a unix stream socket next to the ZDS socket (`<socket>.control`, mode
//! 0600), one JSON request per connection and one JSON answer:
//! `{"op":"add","uid":..,"name":..,"namespace":..,"service_account":..,"netns":PATH}` or
//! `{"op":"remove","uid":..}` -> `{"ok":true}` or `{"ok":false,"error":..}`.
//!
//! Enrolling a pod installs istio-cni's in-pod redirection rules inside its namespace
//! ([`super::pod_rules`]: outbound TCP -> 15001, inbound TCP -> 15006 except HBONE on 15008,
//! traffic marked by the proxy, loopback and probes excluded, and the policy route for
//! connection-marked replies) and sends `AddWorkload` with the namespace's descriptor; the
//! answer is the proxy's ack. Removing sends `DelWorkload` and takes the rules out.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Write},
    os::{fd::AsFd, unix::net::UnixListener},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use prost::Message;

use super::pod_rules;
use zring_runtime::{
    net::NetNs,
    uds::{SeqPacket, SeqPacketListener},
    ShutdownTrigger,
};

use crate::zds::proto::{self, workload_request::Payload};

/// The control socket that goes with a ZDS socket.
pub fn control_path(socket: &Path) -> PathBuf {
    let mut p = socket.as_os_str().to_owned();
    p.push(".control");
    PathBuf::from(p)
}

/// A control request.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Enroll a pod.
    Add {
        /// Pod uid.
        uid: String,
        /// Pod name.
        name: String,
        /// Namespace.
        namespace: String,
        /// Service account.
        service_account: String,
        /// Path of the pod's network namespace (`/var/run/netns/NAME`, `/proc/PID/ns/net`).
        netns: PathBuf,
    },
    /// Take a pod out.
    Remove {
        /// Pod uid.
        uid: String,
    },
}

/// A control answer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Answer {
    /// Whether it worked.
    pub ok: bool,
    /// Why not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Send one control request to the agent serving `socket`.
pub fn request(socket: &Path, req: &Request) -> anyhow::Result<Answer> {
    let path = control_path(socket);
    let mut c = std::os::unix::net::UnixStream::connect(&path)
        .map_err(|e| anyhow::anyhow!("connecting to the node agent at {}: {e}", path.display()))?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    c.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(c).read_line(&mut answer)?;
    serde_json::from_str(&answer)
        .map_err(|e| anyhow::anyhow!("bad answer from the node agent ({e}): {answer:?}"))
}

struct PodEntry {
    netns: File,
    path: PathBuf,
    info: proto::WorkloadInfo,
}

#[derive(Default)]
struct State {
    pods: BTreeMap<String, PodEntry>,
    proxy: Option<SeqPacket>,
}

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The ZDS socket.
    pub socket: PathBuf,
    /// The proxy's packet mark (excluded from capture).
    pub mark: u32,
    /// Install the redirection rules (off: only the protocol, for tests without root).
    pub rules: bool,
    /// Add istio-cni's DNS capture lines (UDP/TCP 53 -> 15053). Off by default: only proxies
    /// with a DNS proxy on 15053 may be given pods with this on.
    pub dns_capture: bool,
}

/// Run the agent until `trigger`.
pub fn run(cfg: AgentConfig, trigger: &ShutdownTrigger) -> anyhow::Result<()> {
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let zds = SeqPacketListener::bind(&cfg.socket)
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", cfg.socket.display()))?;
    let control_path = control_path(&cfg.socket);
    let _ = std::fs::remove_file(&control_path);
    let control = UnixListener::bind(&control_path)
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", control_path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&control_path, std::fs::Permissions::from_mode(0o600))?;
    }
    control.set_nonblocking(true)?;
    tracing::info!(socket = %cfg.socket.display(), control = %control_path.display(), "node agent listening");
    let state = Arc::new(Mutex::new(State::default()));
    let (s, t) = (state.clone(), trigger.clone());
    std::thread::Builder::new()
        .name("zds-accept".into())
        .spawn(move || accept_proxies(zds, s, t))?;
    while !trigger.is_triggered() {
        match control.accept() {
            Ok((c, _)) => {
                let _ = c.set_nonblocking(false);
                control_conn(c, &cfg, &state);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => tracing::warn!(error = %e, "control accept failed"),
        }
    }
    let _ = std::fs::remove_file(&control_path);
    let _ = std::fs::remove_file(&cfg.socket);
    Ok(())
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Send one request to the proxy and wait for its ack.
fn exchange(
    proxy: &SeqPacket,
    req: &proto::WorkloadRequest,
    fd: Option<&File>,
) -> Result<(), String> {
    let fds: Vec<_> = fd.iter().map(|f| f.as_fd()).collect();
    proxy
        .send(&req.encode_to_vec(), &fds)
        .map_err(|e| format!("sending to the proxy: {e}"))?;
    let mut buf = vec![0u8; crate::zds::MAX_MESSAGE];
    let (n, _) = proxy
        .recv(&mut buf)
        .map_err(|e| format!("waiting for the proxy's ack: {e}"))?;
    if n == 0 {
        return Err("the proxy closed the connection".into());
    }
    let resp = proto::WorkloadResponse::decode(&buf[..n])
        .map_err(|e| format!("malformed answer from the proxy: {e}"))?;
    match resp.payload {
        Some(proto::workload_response::Payload::Ack(a)) if a.error.is_empty() => Ok(()),
        Some(proto::workload_response::Payload::Ack(a)) => {
            Err(format!("the proxy refused: {}", a.error))
        }
        None => Err("empty answer from the proxy".into()),
    }
}

fn add_request(uid: &str, info: &proto::WorkloadInfo) -> proto::WorkloadRequest {
    proto::WorkloadRequest {
        payload: Some(Payload::Add(proto::AddWorkload {
            uid: uid.to_string(),
            workload_info: Some(info.clone()),
        })),
    }
}

/// Accept proxy connections; each gets the hello check and the snapshot, then becomes the
/// connection pod changes are sent on.
fn accept_proxies(l: SeqPacketListener, state: Arc<Mutex<State>>, trigger: ShutdownTrigger) {
    while !trigger.is_triggered() {
        let conn = match l.accept_timeout(Duration::from_millis(200)) {
            Ok(Some(c)) => c,
            Ok(None) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "ZDS accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
        let mut buf = vec![0u8; crate::zds::MAX_MESSAGE];
        let hello = conn
            .recv(&mut buf)
            .map_err(|e| e.to_string())
            .and_then(|(n, _)| proto::ZdsHello::decode(&buf[..n]).map_err(|e| e.to_string()));
        match hello {
            Ok(h) if h.version == proto::Version::V1 as i32 => {}
            Ok(h) => {
                tracing::warn!(
                    version = h.version,
                    "proxy speaks an unknown ZDS version; closing"
                );
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "no ZdsHello from the proxy; closing");
                continue;
            }
        }
        let mut st = lock(&state);
        let mut failed = None;
        for (uid, p) in &st.pods {
            if let Err(e) = exchange(&conn, &add_request(uid, &p.info), Some(&p.netns)) {
                failed = Some(format!("snapshot AddWorkload {uid}: {e}"));
                break;
            }
        }
        let snapshot_end = proto::WorkloadRequest {
            payload: Some(Payload::SnapshotSent(proto::SnapshotSent {})),
        };
        if failed.is_none() {
            failed = exchange(&conn, &snapshot_end, None).err();
        }
        match failed {
            None => {
                tracing::info!(pods = st.pods.len(), "proxy connected; snapshot sent");
                st.proxy = Some(conn);
            }
            Some(e) => {
                tracing::warn!(error = %e, "snapshot to the proxy failed; waiting for it to reconnect")
            }
        }
    }
}

fn control_conn(c: std::os::unix::net::UnixStream, cfg: &AgentConfig, state: &Mutex<State>) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    let mut reader = BufReader::new(&c);
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let answer = match serde_json::from_str::<Request>(&line) {
        Err(e) => Err(format!("bad request: {e}")),
        Ok(Request::Add {
            uid,
            name,
            namespace,
            service_account,
            netns,
        }) => add(
            cfg,
            state,
            uid,
            proto::WorkloadInfo {
                name,
                namespace,
                service_account,
            },
            &netns,
        ),
        Ok(Request::Remove { uid }) => remove(cfg, state, &uid),
    };
    let a = match answer {
        Ok(()) => Answer {
            ok: true,
            error: None,
        },
        Err(e) => {
            tracing::warn!(error = %e, "control request failed");
            Answer {
                ok: false,
                error: Some(e),
            }
        }
    };
    let mut text = serde_json::to_string(&a).unwrap_or_else(|_| "{\"ok\":false}".into());
    text.push('\n');
    let mut w = &c;
    let _ = w.write_all(text.as_bytes());
}

fn add(
    cfg: &AgentConfig,
    state: &Mutex<State>,
    uid: String,
    info: proto::WorkloadInfo,
    netns_path: &Path,
) -> Result<(), String> {
    let file = File::open(netns_path).map_err(|e| format!("{}: {e}", netns_path.display()))?;
    let check = file.try_clone().map_err(|e| e.to_string())?;
    NetNs::from_fd(check.into()).map_err(|e| format!("{}: {e}", netns_path.display()))?;
    if cfg.rules {
        // Idempotent: a pod added again (same namespace) gets its rules replaced, not doubled.
        pod_rules::install(netns_path, cfg.mark, cfg.dns_capture)?;
    }
    let mut st = lock(state);
    if let Some(proxy) = &st.proxy {
        if let Err(e) = exchange(proxy, &add_request(&uid, &info), Some(&file)) {
            if e.starts_with("the proxy refused") {
                if cfg.rules {
                    pod_rules::remove(netns_path);
                }
                return Err(e);
            }
            // The proxy went away: it gets this pod in the next snapshot.
            tracing::warn!(error = %e, "proxy connection lost; the pod is sent with the next snapshot");
            st.proxy = None;
        }
    }
    tracing::info!(uid = %uid, pod = %info.name, netns = %netns_path.display(), "pod enrolled");
    st.pods.insert(
        uid,
        PodEntry {
            netns: file,
            path: netns_path.to_path_buf(),
            info,
        },
    );
    Ok(())
}

fn remove(cfg: &AgentConfig, state: &Mutex<State>, uid: &str) -> Result<(), String> {
    let mut st = lock(state);
    let Some(pod) = st.pods.remove(uid) else {
        return Err(format!("no pod {uid}"));
    };
    if let Some(proxy) = &st.proxy {
        let del = proto::WorkloadRequest {
            payload: Some(Payload::Del(proto::DelWorkload {
                uid: uid.to_string(),
            })),
        };
        if let Err(e) = exchange(proxy, &del, None) {
            tracing::warn!(error = %e, "DelWorkload failed; the next snapshot omits the pod");
            st.proxy = None;
        }
    }
    if cfg.rules {
        pod_rules::remove(&pod.path);
    }
    drop(pod.netns);
    tracing::info!(uid = %uid, "pod removed");
    Ok(())
}

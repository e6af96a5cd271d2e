//! The node proxy's side of ZDS.

use std::{collections::HashSet, path::PathBuf, sync::Arc, time::Duration};

use prost::Message;
use zring_runtime::{net::NetNs, uds::SeqPacket, ShutdownTrigger};

use super::proto::{self, workload_request::Payload};

/// A pod handed over by the agent.
#[derive(Debug, Clone)]
pub struct Pod {
    /// The pod's uid.
    pub uid: String,
    /// Name, namespace, service account.
    pub info: proto::WorkloadInfo,
    /// Its network namespace (checked to be one).
    pub netns: Arc<NetNs>,
    /// The namespace's inode: an `AddWorkload` for a known uid with the same namespace (an agent
    /// replaying its snapshot) changes nothing; with another namespace the listeners move.
    pub netns_id: u64,
}

/// What the proxy does with pods.
pub trait PodHandler {
    /// Serve `pod` (replacing a pod with the same uid); return only once its listeners are bound
    /// (the ack tells the agent the pod is served). An error is sent back in the ack.
    fn add(&mut self, pod: Pod) -> Result<(), String>;
    /// Stop serving a pod (unknown uids are not an error: the agent may retry).
    fn del(&mut self, uid: &str) -> Result<(), String>;
    /// Drop every pod whose uid is not in `keep` (the snapshot is complete).
    fn retain(&mut self, keep: &HashSet<String>);
}

/// Reconnect back-off bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Run the client until `trigger`: connect to `path`, say hello, handle requests; on any
/// failure reconnect with exponential back-off. Pods already set up are left alone while
/// disconnected (the agent's next snapshot reconciles them).
pub fn run(path: PathBuf, handler: &mut dyn PodHandler, trigger: &ShutdownTrigger) {
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    while !trigger.is_triggered() {
        match SeqPacket::connect(&path) {
            Ok(conn) => {
                tracing::info!(socket = %path.display(), "connected to the node agent (ZDS)");
                last_error.clear();
                backoff = BACKOFF_MIN;
                match serve(&conn, handler, trigger) {
                    Ok(()) => {
                        tracing::warn!("the node agent closed the ZDS connection; reconnecting")
                    }
                    Err(e) => tracing::warn!(error = %e, "ZDS connection failed; reconnecting"),
                }
            }
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!(socket = %path.display(), error = %text, "cannot reach the node agent; retrying with back-off (pods already set up keep working)");
                    last_error = text;
                }
            }
        }
        let mut slept = Duration::ZERO;
        while slept < backoff && !trigger.is_triggered() {
            std::thread::sleep(Duration::from_millis(50));
            slept += Duration::from_millis(50);
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: hello, then requests until the agent closes, an I/O error, or shutdown.
pub fn serve(
    conn: &SeqPacket,
    handler: &mut dyn PodHandler,
    trigger: &ShutdownTrigger,
) -> std::io::Result<()> {
    let hello = proto::ZdsHello {
        version: proto::Version::V1 as i32,
    };
    conn.send(&hello.encode_to_vec(), &[])?;
    conn.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = vec![0u8; super::MAX_MESSAGE];
    // Uids the current snapshot mentioned; None once SnapshotSent has been handled.
    let mut snapshot: Option<HashSet<String>> = Some(HashSet::new());
    while !trigger.is_triggered() {
        let (n, fds) = match conn.recv(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                // Oversized or too many descriptors: answer, keep the connection.
                conn.send(&super::encode(&super::ack(&Err(e.to_string()))), &[])?;
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 && fds.is_empty() {
            return Ok(());
        }
        let result = handle(&buf[..n], fds, handler, &mut snapshot);
        if let Err(e) = &result {
            tracing::warn!(error = %e, "ZDS request refused");
        }
        conn.send(&super::encode(&super::ack(&result)), &[])?;
    }
    Ok(())
}

/// Decode one agent message into its payload; the error text is what the ack carries.
pub fn parse_request(bytes: &[u8]) -> Result<Payload, String> {
    let req = proto::WorkloadRequest::decode(bytes)
        .map_err(|e| format!("malformed WorkloadRequest: {e}"))?;
    req.payload
        .ok_or_else(|| "WorkloadRequest without a payload (unknown message type?)".to_string())
}

fn handle(
    bytes: &[u8],
    mut fds: Vec<std::os::fd::OwnedFd>,
    handler: &mut dyn PodHandler,
    snapshot: &mut Option<HashSet<String>>,
) -> Result<(), String> {
    let payload = parse_request(bytes)?;
    let expect_fds = matches!(payload, Payload::Add(_));
    if !expect_fds && !fds.is_empty() {
        return Err(format!(
            "unexpected {} descriptor(s) with this message",
            fds.len()
        ));
    }
    match payload {
        Payload::Add(add) => {
            if add.uid.is_empty() {
                return Err("AddWorkload without a uid".into());
            }
            if fds.len() != 1 {
                return Err(format!(
                    "AddWorkload {} must carry exactly one descriptor (the pod's network namespace), got {}",
                    add.uid,
                    fds.len()
                ));
            }
            let fd = fds.remove(0);
            let netns = NetNs::from_fd(fd)
                .map_err(|e| format!("AddWorkload {}: not a network namespace: {e}", add.uid))?;
            let netns_id = netns.inode().map_err(|e| {
                format!(
                    "AddWorkload {}: cannot identify the namespace: {e}",
                    add.uid
                )
            })?;
            let info = add.workload_info.unwrap_or_default();
            tracing::info!(uid = %add.uid, name = %info.name, namespace = %info.namespace, "pod added by the node agent");
            if let Some(s) = snapshot.as_mut() {
                s.insert(add.uid.clone());
            }
            handler.add(Pod {
                uid: add.uid,
                info,
                netns: Arc::new(netns),
                netns_id,
            })
        }
        Payload::Keep(keep) => match snapshot.as_mut() {
            Some(s) => {
                s.insert(keep.uid);
                Ok(())
            }
            None => Err("KeepWorkload after SnapshotSent".into()),
        },
        Payload::Del(del) => {
            tracing::info!(uid = %del.uid, "pod removed by the node agent");
            handler.del(&del.uid)
        }
        Payload::SnapshotSent(_) => match snapshot.take() {
            Some(keep) => {
                handler.retain(&keep);
                Ok(())
            }
            None => Err("a second SnapshotSent on one connection".into()),
        },
    }
}

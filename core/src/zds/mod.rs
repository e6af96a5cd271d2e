//! ZDS, the protocol between the node agent (istio-cni, or `zring node-agent`) and the node
//! proxy, wire-compatible with ztunnel's (`proto/zds.proto`):
//!
//! - the proxy connects to the agent's `SOCK_SEQPACKET` socket (`/var/run/ztunnel/ztunnel.sock`,
//!   env `INPOD_UDS`) and sends `ZdsHello { version: V1 }`;
//! - the agent sends a snapshot: one `AddWorkload` per pod (the pod's network namespace as a
//!   descriptor in `SCM_RIGHTS`) or `KeepWorkload`, then `SnapshotSent`; the proxy then drops
//!   the pods the snapshot did not mention;
//! - then `AddWorkload` / `DelWorkload` as pods come and go;
//! - the proxy answers every message with `Ack` (an error text on failure), one message, one
//!   answer, in order.
//!
//! [`client`] is the proxy's side (reconnects with back-off; pods already set up keep
//! working meanwhile); the node agent's side is `crate::cmd::node_agent`.

pub mod client;
pub mod proto;

use prost::Message;

/// Default socket path (ztunnel's).
pub const DEFAULT_SOCKET: &str = "/var/run/ztunnel/ztunnel.sock";

/// Largest ZDS message accepted.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Encode a message.
pub fn encode<M: Message>(m: &M) -> Vec<u8> {
    m.encode_to_vec()
}

/// An ack: empty error on success.
pub fn ack(result: &Result<(), String>) -> proto::WorkloadResponse {
    proto::WorkloadResponse {
        payload: Some(proto::workload_response::Payload::Ack(proto::Ack {
            error: result.clone().err().unwrap_or_default(),
        })),
    }
}

//! Istio's ZDS messages (`istio.workload.zds`, ztunnel's `proto/zds.proto`), field for field,
//! as prost messages written out by hand (no protoc, no build script). The unit test below
//! checks the encodings byte for byte against hand-assembled protobuf.

/// Protocol version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Version {
    /// Unset.
    NotUsed = 0,
    /// The only version.
    V1 = 1,
}

/// Sent by the node proxy when it connects.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ZdsHello {
    /// Protocol version.
    #[prost(enumeration = "Version", tag = "1")]
    pub version: i32,
}

/// Who a pod is.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadInfo {
    /// Pod name.
    #[prost(string, tag = "1")]
    pub name: String,
    /// Namespace.
    #[prost(string, tag = "2")]
    pub namespace: String,
    /// Service account.
    #[prost(string, tag = "3")]
    pub service_account: String,
}

/// A pod to serve; its network namespace comes as a descriptor with the message.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AddWorkload {
    /// Pod uid.
    #[prost(string, tag = "1")]
    pub uid: String,
    /// Who it is.
    #[prost(message, optional, tag = "2")]
    pub workload_info: Option<WorkloadInfo>,
}

/// Keep a pod the agent has no descriptor for (only before `SnapshotSent`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeepWorkload {
    /// Pod uid.
    #[prost(string, tag = "1")]
    pub uid: String,
}

/// Stop serving a pod.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DelWorkload {
    /// Pod uid.
    #[prost(string, tag = "2")]
    pub uid: String,
}

/// The agent's snapshot is complete: drop pods it did not mention.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotSent {}

/// The node proxy's answer to every request; a non-empty error is a failure.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Ack {
    /// Empty on success.
    #[prost(string, tag = "1")]
    pub error: String,
}

/// Agent -> node proxy.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadRequest {
    /// One of the requests.
    #[prost(oneof = "workload_request::Payload", tags = "1, 5, 2, 3")]
    pub payload: Option<workload_request::Payload>,
}

/// `WorkloadRequest`'s oneof.
pub mod workload_request {
    /// The request.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        /// Add a pod.
        #[prost(message, tag = "1")]
        Add(super::AddWorkload),
        /// Keep a pod.
        #[prost(message, tag = "5")]
        Keep(super::KeepWorkload),
        /// Delete a pod.
        #[prost(message, tag = "2")]
        Del(super::DelWorkload),
        /// End of the snapshot.
        #[prost(message, tag = "3")]
        SnapshotSent(super::SnapshotSent),
    }
}

/// Node proxy -> agent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkloadResponse {
    /// The answer.
    #[prost(oneof = "workload_response::Payload", tags = "1")]
    pub payload: Option<workload_response::Payload>,
}

/// `WorkloadResponse`'s oneof.
pub mod workload_response {
    /// The answer.
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Payload {
        /// Acknowledgement.
        #[prost(message, tag = "1")]
        Ack(super::Ack),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn encodings_match_zds_proto_field_numbers() {
        let add = WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: "u".into(),
                workload_info: Some(WorkloadInfo {
                    name: "n".into(),
                    namespace: "s".into(),
                    service_account: "a".into(),
                }),
            })),
        };
        // WorkloadRequest.add = 1 { uid = 1 "u", workload_info = 2 { 1 "n", 2 "s", 3 "a" } }
        assert_eq!(
            add.encode_to_vec(),
            [
                0x0a, 0x0e, 0x0a, 0x01, b'u', 0x12, 0x09, 0x0a, 0x01, b'n', 0x12, 0x01, b's', 0x1a,
                0x01, b'a'
            ]
        );
        let del = WorkloadRequest {
            payload: Some(workload_request::Payload::Del(DelWorkload {
                uid: "u".into(),
            })),
        };
        // del = 2 { uid = 2 }
        assert_eq!(del.encode_to_vec(), [0x12, 0x03, 0x12, 0x01, b'u']);
        let keep = WorkloadRequest {
            payload: Some(workload_request::Payload::Keep(KeepWorkload {
                uid: "u".into(),
            })),
        };
        assert_eq!(keep.encode_to_vec(), [0x2a, 0x03, 0x0a, 0x01, b'u']);
        let snap = WorkloadRequest {
            payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
        };
        assert_eq!(snap.encode_to_vec(), [0x1a, 0x00]);
        let ack = WorkloadResponse {
            payload: Some(workload_response::Payload::Ack(Ack { error: "e".into() })),
        };
        assert_eq!(ack.encode_to_vec(), [0x0a, 0x03, 0x0a, 0x01, b'e']);
    }
}

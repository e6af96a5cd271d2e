//! The `zring` subcommands that are tools around the product rather than the product itself:
//! `relay` (a TCP forwarder on the runtime, the relay benchmark's subject), `tunnel` (one
//! HBONE hop), `ca` (a local certificate authority) and `node-agent` (the node agent's side of
//! ZDS, standing in for istio-cni); `ztunnel_env` maps the environment of Istio's ztunnel chart
//! onto the node proxy (`zring proxy ztunnel`). The node proxy (`zring run`) is [`crate::proxy`].

pub mod ca;
pub mod node_agent;
pub mod pod_rules;
pub mod relay;
pub mod tunnel;
pub mod ztunnel_env;

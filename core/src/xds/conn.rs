//! How zring reaches a control-plane service (istiod's xDS or its CA), as ztunnel does: TLS
//! with a given root and server name, `authorization: Bearer <token>` (the token file re-read
//! for every call or stream), `clusterid`, and extra headers.

use std::{path::PathBuf, time::Duration};

use anyhow::Context;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// One control-plane service's address and credentials.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// `https://host:port` (`XDS_ADDRESS`, `CA_ADDRESS`).
    pub address: String,
    /// The root the server's certificate must chain to (`XDS_ROOT_CA`, `CA_ROOT_CA`).
    pub root_ca: PathBuf,
    /// The name the server's certificate must carry (`ALT_XDS_HOSTNAME`, `ALT_CA_HOSTNAME`;
    /// else the address's host).
    pub server_name: Option<String>,
    /// Bearer token file (`AUTH_TOKEN`); unreadable: no token, with a warning.
    pub token_file: Option<PathBuf>,
    /// `clusterid` header.
    pub cluster_id: String,
    /// Extra headers (`XDS_HEADER_*`, `CA_HEADER_*`).
    pub headers: Vec<(String, String)>,
}

impl Upstream {
    /// A TLS channel to the service.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        let root = std::fs::read(&self.root_ca)
            .with_context(|| format!("reading the root {}", self.root_ca.display()))?;
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root));
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        Endpoint::from_shared(self.address.clone())
            .with_context(|| format!("address {}", self.address))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .connect()
            .await
            .with_context(|| format!("connecting to {}", self.address))
    }

    /// Add the token, `clusterid` and the extra headers to a call.
    pub fn decorate<T>(&self, req: &mut tonic::Request<T>) -> anyhow::Result<()> {
        if let Some(path) = &self.token_file {
            match std::fs::read_to_string(path) {
                Ok(t) => {
                    let v = format!("Bearer {}", t.trim())
                        .parse()
                        .context("the token is not a valid header value")?;
                    req.metadata_mut().insert("authorization", v);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "no token (AUTH_TOKEN unreadable); calling without one")
                }
            }
        }
        req.metadata_mut()
            .insert("clusterid", self.cluster_id.parse().context("CLUSTER_ID")?);
        for (k, v) in &self.headers {
            let key: tonic::metadata::MetadataKey<tonic::metadata::Ascii> =
                k.parse().with_context(|| format!("header name {k:?}"))?;
            req.metadata_mut()
                .insert(key, v.parse().with_context(|| format!("header {k}"))?);
        }
        Ok(())
    }
}

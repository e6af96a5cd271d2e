//! The Istio CA client: workload certificates from istiod (or `zring control-plane`) through
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, as ztunnel gets them in its shared
//! mode: an ECDSA P-256 key and a CSR with the SPIFFE URI SAN per identity, metadata
//! `ImpersonatedIdentity` = that identity, validity `SECRET_TTL`; TLS to `CA_ADDRESS` with the
//! root of `CA_ROOT_CA` and the name `ALT_CA_HOSTNAME`, `authorization: Bearer <token>`,
//! `clusterid`, `CA_HEADER_*`. The answer is checked: the leaf names the identity asked for
//! and chains to the trust bundle.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use zring_hbone::{ca::WorkloadCert, SpiffeId};

use super::proto::istio::v1::auth::{
    istio_certificate_service_client::IstioCertificateServiceClient, IstioCertificateRequest,
};

/// Where and how to reach the CA.
#[derive(Debug, Clone)]
pub struct CaClientSettings {
    /// `https://host:port` (`CA_ADDRESS`).
    pub address: String,
    /// The root the CA's serving certificate must chain to, and the mesh's trust bundle
    /// (`CA_ROOT_CA`).
    pub root_ca: PathBuf,
    /// The name the CA's certificate must carry (`ALT_CA_HOSTNAME`).
    pub server_name: Option<String>,
    /// Bearer token file (`AUTH_TOKEN`).
    pub token_file: Option<PathBuf>,
    /// `clusterid` header.
    pub cluster_id: String,
    /// Extra headers (`CA_HEADER_*`).
    pub headers: Vec<(String, String)>,
}

/// A blocking handle on the CA (its own runtime thread; callable from any thread, tokio's
/// included).
#[derive(Debug)]
pub struct IstioCa {
    settings: CaClientSettings,
    rt: tokio::runtime::Runtime,
}

impl IstioCa {
    /// A client for `settings` (connects per request: certificates are rare).
    pub fn new(settings: CaClientSettings) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("zring-ca")
            .enable_all()
            .build()?;
        Ok(Self { settings, rt })
    }

    /// The trust bundle (`CA_ROOT_CA`).
    pub fn roots(
        &self,
    ) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, zring_hbone::ca::CaError> {
        zring_hbone::ca::load_bundle(&self.settings.root_ca)
    }

    /// A fresh certificate for `id`, valid `ttl`.
    pub fn issue(&self, id: &SpiffeId, ttl: Duration) -> anyhow::Result<WorkloadCert> {
        let (csr, key) = zring_hbone::ca::csr_for(id).context("building the CSR")?;
        let settings = self.settings.clone();
        let id_s = id.to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        self.rt.spawn(async move {
            let _ = tx.send(create(&settings, csr, &id_s, ttl).await);
        });
        let chain = rx
            .recv_timeout(Duration::from_secs(30))
            .context("the CA did not answer within 30 s")??;
        let cert = WorkloadCert::from_pem(
            &chain.join("\n"),
            &key,
            std::path::Path::new("CreateCertificate"),
        )
        .context("the CA's answer")?;
        if &cert.identity != id {
            anyhow::bail!(
                "the CA issued a certificate for {}, not {id}",
                cert.identity
            );
        }
        let roots = self.roots().context("reading CA_ROOT_CA")?;
        zring_hbone::tls::verify_chain(&cert.chain, &roots)
            .context("the CA's certificate does not chain to CA_ROOT_CA")?;
        Ok(cert)
    }
}

async fn create(
    s: &CaClientSettings,
    csr: String,
    id: &str,
    ttl: Duration,
) -> anyhow::Result<Vec<String>> {
    let root = std::fs::read(&s.root_ca)
        .with_context(|| format!("reading CA_ROOT_CA {}", s.root_ca.display()))?;
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root));
    if let Some(n) = &s.server_name {
        tls = tls.domain_name(n.clone());
    }
    let channel = Endpoint::from_shared(s.address.clone())
        .with_context(|| format!("CA_ADDRESS {}", s.address))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .with_context(|| format!("connecting to {}", s.address))?;
    let mut client = IstioCertificateServiceClient::new(channel);
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: ttl.as_secs() as i64,
        metadata: Some(prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(id.to_string())),
                },
            )]
            .into_iter()
            .collect(),
        }),
    });
    if let Some(path) = &s.token_file {
        if let Ok(t) = std::fs::read_to_string(path) {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", t.trim())
                    .parse()
                    .context("token header")?,
            );
        }
    }
    req.metadata_mut()
        .insert("clusterid", s.cluster_id.parse().context("CLUSTER_ID")?);
    for (k, v) in &s.headers {
        let key: tonic::metadata::MetadataKey<tonic::metadata::Ascii> =
            k.parse().with_context(|| format!("header name {k:?}"))?;
        req.metadata_mut().insert(key, v.parse().context("header")?);
    }
    let resp = client
        .create_certificate(req)
        .await
        .map_err(|st| anyhow::anyhow!("CreateCertificate: {} ({:?})", st.message(), st.code()))?
        .into_inner();
    if resp.cert_chain.is_empty() {
        anyhow::bail!("CreateCertificate answered with an empty chain");
    }
    Ok(resp.cert_chain)
}

/// Shared handle.
pub type SharedCa = Arc<IstioCa>;

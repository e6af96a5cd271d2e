//! The Istio CA client: workload certificates from istiod (or `zring control-plane`) through
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, as ztunnel gets them in its shared
//! mode: an ECDSA P-256 key and a CSR with the SPIFFE URI SAN per identity, metadata
//! `ImpersonatedIdentity` = that identity, validity `SECRET_TTL`; TLS to `CA_ADDRESS` with the
//! root of `CA_ROOT_CA` and the name `ALT_CA_HOSTNAME`, `authorization: Bearer <token>`,
//! `clusterid`, `CA_HEADER_*`. The answer is checked: the leaf names the identity asked for
//! and chains to the trust bundle.

use std::time::Duration;

use anyhow::Context;
use zring_hbone::{ca::WorkloadCert, SpiffeId};

use super::proto::istio::v1::auth::{
    istio_certificate_service_client::IstioCertificateServiceClient, IstioCertificateRequest,
};

/// How long one CreateCertificate call may take, connection included.
pub const CA_DEADLINE: Duration = Duration::from_secs(30);

/// Where and how to reach the CA (`CA_ADDRESS`, `CA_ROOT_CA`, `ALT_CA_HOSTNAME`, `AUTH_TOKEN`,
/// `CA_HEADER_*`, `CLUSTER_ID`); its root is also the mesh's trust bundle.
pub type CaClientSettings = super::conn::Upstream;

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
        // The deadline runs inside the call's task: past it the call (and its connection) is
        // dropped, not left running behind a caller that gave up.
        self.rt.spawn(async move {
            let r = tokio::time::timeout(CA_DEADLINE, create(&settings, csr, &id_s, ttl))
                .await
                .unwrap_or_else(|_| {
                    Err(anyhow::anyhow!(
                        "the CA did not answer within {CA_DEADLINE:?}; call cancelled"
                    ))
                });
            let _ = tx.send(r);
        });
        let chain = rx
            .recv_timeout(CA_DEADLINE + Duration::from_secs(1))
            .context("the CA call's task ended without an answer")??;
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
        // The certificate must be for the key the CSR carried (a TLS config is built the same
        // way the listeners build theirs, which checks the pair).
        zring_hbone::tls::server_config(&cert, &roots)
            .context("the CA's certificate is not for the key of the CSR")?;
        Ok(cert)
    }
}

async fn create(
    s: &CaClientSettings,
    csr: String,
    id: &str,
    ttl: Duration,
) -> anyhow::Result<Vec<String>> {
    let channel = s.channel().await?;
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
    s.decorate(&mut req)?;
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

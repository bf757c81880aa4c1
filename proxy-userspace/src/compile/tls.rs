//! TLS origination to a destination (`DestinationRule.trafficPolicy.tls`, mode SIMPLE or
//! MUTUAL): the rustls client configuration, made when the snapshot is compiled. A setting
//! that cannot be made (a file missing or unreadable, a bad key) does not fall back to plain
//! text: the cluster's connections fail with the reason (503 UF), as Envoy's do when its TLS
//! context cannot be loaded.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use serde::Serialize;

use crate::config::{ClientTls, TlsMode};

/// The system's CA bundle (Debian's `ca-certificates`), used when `caCertificates` is unset.
const SYSTEM_CAS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What a cluster's connections do about TLS.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsOrigination {
    /// The settings as written.
    pub settings: ClientTls,
    /// The client configuration made from the files as they were (their modification times).
    #[serde(skip)]
    loaded: std::sync::Mutex<Loaded>,
}

#[derive(Debug)]
struct Loaded {
    config: Result<Arc<ClientConfig>, String>,
    stamps: Vec<Option<std::time::SystemTime>>,
}

impl PartialEq for TlsOrigination {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
    }
}

impl TlsOrigination {
    /// The origination `tls` asks for; `None` for plain text (DISABLE, and ISTIO_MUTUAL, which
    /// needs mesh identities: the analyzer says so).
    pub fn of(tls: &ClientTls) -> Option<Arc<TlsOrigination>> {
        if !matches!(tls.mode, TlsMode::Simple | TlsMode::Mutual) {
            return None;
        }
        Some(Arc::new(TlsOrigination {
            settings: tls.clone(),
            loaded: std::sync::Mutex::new(Loaded {
                stamps: stamps(tls),
                config: client_config(tls).map(Arc::new),
            }),
        }))
    }

    /// The client configuration for a new connection, or why there is none. Made again when a
    /// file it was made from changed (a rotated certificate is used by the next connection;
    /// three `stat`s per new connection, none per request).
    pub fn config(&self) -> Result<Arc<ClientConfig>, String> {
        let now = stamps(&self.settings);
        let mut l = self.loaded.lock().expect("tls lock");
        if l.stamps != now {
            tracing::info!(files = ?files(&self.settings), "TLS origination files changed: reloaded");
            l.config = client_config(&self.settings).map(Arc::new);
            l.stamps = now;
        }
        l.config.clone()
    }

    /// The name sent as SNI and verified (unless `subjectAltNames` says otherwise): `sni`, else
    /// the destination host.
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, String> {
        let name = self.settings.sni.as_deref().unwrap_or(host);
        ServerName::try_from(name.to_string()).map_err(|e| format!("SNI `{name}`: {e}"))
    }
}

/// `credentialName: X`: (MUTUAL) the client certificate `<credentials-dir>/X.crt` and key
/// `X.key`, and `X-cacert.crt` as the CA when it exists and `caCertificates` is unset (the files a Gateway's
/// credential uses). Without a credentials directory (`validate`), nothing changes.
pub fn with_credential(tls: &mut ClientTls, dir: Option<&std::path::Path>) {
    let (Some(name), Some(dir)) = (tls.credential_name.clone(), dir) else {
        return;
    };
    let file = |suffix: &str| dir.join(format!("{name}{suffix}")).display().to_string();
    if tls.mode == TlsMode::Mutual {
        tls.client_certificate = Some(file(".crt"));
        tls.private_key = Some(file(".key"));
    }
    if tls.ca_certificates.is_none() && dir.join(format!("{name}-cacert.crt")).exists() {
        tls.ca_certificates = Some(file("-cacert.crt"));
    }
}

/// The files a setting is made from.
fn files(tls: &ClientTls) -> Vec<&str> {
    let ca = match (tls.insecure_skip_verify, &tls.ca_certificates) {
        (Some(true), _) => None,
        (_, Some(ca)) => Some(ca.as_str()),
        (_, None) => Some(SYSTEM_CAS),
    };
    ca.into_iter()
        .chain(tls.client_certificate.as_deref())
        .chain(tls.private_key.as_deref())
        .collect()
}

fn stamps(tls: &ClientTls) -> Vec<Option<std::time::SystemTime>> {
    files(tls)
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(tls: &ClientTls) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify == Some(true) {
        Arc::new(NoVerification(provider()))
    } else {
        let roots = roots(tls.ca_certificates.as_deref())?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        Arc::new(SanVerifier {
            inner,
            sans: tls
                .subject_alt_names
                .iter()
                .map(|s| {
                    ServerName::try_from(s.clone())
                        .map_err(|e| format!("subjectAltNames `{s}`: {e}"))
                })
                .collect::<Result<_, _>>()?,
        })
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match tls.mode {
        TlsMode::Mutual => {
            let (Some(cert), Some(key)) = (&tls.client_certificate, &tls.private_key) else {
                return Err("MUTUAL needs clientCertificate and privateKey".into());
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("clientCertificate {cert}: {e}"))?;
            if chain.is_empty() {
                return Err(format!("clientCertificate {cert}: no certificate"));
            }
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| format!("privateKey {key}: {e}"))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate and key: {e}"))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

fn roots(ca: Option<&str>) -> Result<RootCertStore, String> {
    let path = ca.unwrap_or(SYSTEM_CAS);
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| match ca {
            Some(_) => format!("caCertificates {path}: {e}"),
            None => format!(
                "no caCertificates, and the system's CAs ({path}) cannot be read: {e}; set caCertificates (or insecureSkipVerify)"
            ),
        })?;
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!("{path}: no CA certificate"));
    }
    Ok(roots)
}

/// WebPKI verification against `subjectAltNames` (any one of them) when given, else against
/// the SNI.
#[derive(Debug)]
struct SanVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    sans: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.sans.is_empty() {
            return self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp,
                now,
            );
        }
        let mut last = None;
        for san in &self.sans {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, san, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(rustls::Error::General("no subjectAltNames".into())))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `insecureSkipVerify`: any certificate is accepted (the handshake's signatures are still
/// checked, so the peer holds the key of the certificate it sent).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

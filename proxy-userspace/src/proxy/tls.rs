//! TLS termination at Gateway servers (`tls.mode: SIMPLE` / `MUTUAL`) with rustls: the
//! certificate is chosen by SNI among the port's servers; `credentialName: X` reads
//! `<credentials-dir>/X.crt` and `X.key` (PEM), `serverCertificate`/`privateKey` name files.
//! Configs are built once per snapshot version and port.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;

use crate::compile::registry::host_matches;
use crate::compile::{GatewayServer, Listener, ListenerKind};

/// Is this gateway listener terminated (SIMPLE/MUTUAL) rather than passed through?
pub fn terminates(l: &Listener) -> bool {
    match &l.kind {
        ListenerKind::Gateway { servers } => servers
            .iter()
            .any(|s| matches!(s.tls_mode.as_deref(), Some("SIMPLE" | "MUTUAL"))),
        ListenerKind::Mesh { .. } => false,
    }
}

#[derive(Debug)]
struct BySni {
    certs: Vec<(Vec<String>, Arc<CertifiedKey>)>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name().map(|s| s.to_ascii_lowercase());
        let hit = sni.as_deref().and_then(|name| {
            self.certs.iter().find(|(hosts, _)| {
                hosts.iter().any(|h| {
                    let h = h.split_once('/').map(|x| x.1).unwrap_or(h);
                    host_matches(h, name)
                })
            })
        });
        hit.or(self.certs.first()).map(|(_, k)| k.clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_key(
    server: &GatewayServer,
    dir: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let (crt, key) = match (&server.credential_name, &server.cert_files) {
        (Some(name), _) => (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        ),
        (None, Some((c, k))) => (c.into(), k.into()),
        (None, None) => {
            return Err(format!(
                "gateway {} has a TLS server without credentialName or serverCertificate",
                server.gateway
            ));
        }
    };
    let certs = CertificateDer::pem_file_iter(&crt)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            format!(
                "gateway {}: read certificate {}: {e}",
                server.gateway,
                crt.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "gateway {}: no certificate in {}",
            server.gateway,
            crt.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| {
        format!(
            "gateway {}: read private key {}: {e}",
            server.gateway,
            key.display()
        )
    })?;
    Ok((certs, key))
}

/// Build the rustls server config for a terminating gateway listener.
pub fn server_config(l: &Listener, dir: &Path) -> Result<Arc<ServerConfig>, String> {
    let ListenerKind::Gateway { servers } = &l.kind else {
        return Err("not a gateway listener".into());
    };
    let mut certs = Vec::new();
    let mut client_ca: Option<String> = None;
    for s in servers
        .iter()
        .filter(|s| matches!(s.tls_mode.as_deref(), Some("SIMPLE" | "MUTUAL")))
    {
        let (chain, key) = load_key(s, dir)?;
        let signing = rustls::crypto::ring::sign::any_supported_type(&key)
            .map_err(|e| format!("gateway {}: unsupported private key: {e}", s.gateway))?;
        certs.push((s.hosts.clone(), Arc::new(CertifiedKey::new(chain, signing))));
        if s.tls_mode.as_deref() == Some("MUTUAL") {
            client_ca = s.ca_certificates.clone().or_else(|| {
                s.credential_name
                    .as_ref()
                    .map(|n| dir.join(format!("{n}-cacert.crt")).display().to_string())
            });
        }
    }
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(&ca)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("read client CA {ca}: {e}"))?
            {
                roots.add(c).map_err(|e| format!("client CA {ca}: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| format!("client CA {ca}: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(BySni { certs }));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Server configs cached by (port, snapshot version).
#[derive(Default)]
pub struct TlsConfigs {
    cache: Mutex<HashMap<u16, (u64, Arc<ServerConfig>)>>,
}

impl TlsConfigs {
    /// The config for `l` in snapshot `version`, built on first use.
    pub fn get(&self, version: u64, l: &Listener, dir: &Path) -> Result<Arc<ServerConfig>, String> {
        if let Some((v, c)) = self.cache.lock().expect("tls cache").get(&l.port)
            && *v == version
        {
            return Ok(c.clone());
        }
        let c = server_config(l, dir)?;
        self.cache
            .lock()
            .expect("tls cache")
            .insert(l.port, (version, c.clone()));
        Ok(c)
    }
}

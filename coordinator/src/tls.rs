//! Mutual TLS on the server side: the project CA is the only trust anchor, client certificates
//! are required, TLS 1.3 only, and the revocation list and the coordinator's own certificate
//! are re-read whenever their files change (or on SIGHUP), so neither a revocation nor a
//! renewal needs a restart.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use alveolus_proto::identity::{Identity, Role};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::config::{CoordinatorSettings, Roster};
use crate::error::CoordinatorError;

fn tls_err(what: &str, e: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Tls(format!("{what}: {e}"))
}

/// Serial numbers on the current revocation list, and the list itself for rustls.
#[derive(Debug, Default, Clone)]
struct Revocations {
    modified: Option<SystemTime>,
    crls: Vec<CertificateRevocationListDer<'static>>,
    serials: HashSet<Vec<u8>>,
}

fn read_revocations(path: &Path) -> Result<Revocations, CoordinatorError> {
    let modified = match std::fs::metadata(path) {
        Ok(meta) => meta.modified().ok(),
        // No list yet: nothing is revoked.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Revocations::default()),
        Err(e) => return Err(tls_err(&path.display().to_string(), e)),
    };
    let pem = std::fs::read(path).map_err(|e| tls_err(&path.display().to_string(), e))?;
    let mut crls = Vec::new();
    let mut serials = HashSet::new();
    for crl in CertificateRevocationListDer::pem_slice_iter(&pem) {
        let crl = crl.map_err(|e| tls_err(&path.display().to_string(), e))?;
        let (_, parsed) = x509_parser::parse_x509_crl(crl.as_ref())
            .map_err(|e| tls_err(&path.display().to_string(), e))?;
        for revoked in parsed.iter_revoked_certificates() {
            serials.insert(revoked.raw_serial().to_vec());
        }
        crls.push(crl);
    }
    Ok(Revocations {
        modified,
        crls,
        serials,
    })
}

fn build_acceptor(
    roots: &Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    revocations: &Revocations,
) -> Result<TlsAcceptor, CoordinatorError> {
    let verifier = WebPkiClientVerifier::builder(roots.clone())
        .with_crls(revocations.crls.clone())
        .build()
        .map_err(|e| tls_err("client verifier", e))?;
    let mut config =
        rustls::ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.to_vec(), key.clone_key())
            .map_err(|e| tls_err("coordinator certificate", e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Builds TLS acceptors and knows what is revoked and who was provisioned; each follows its
/// file.
pub struct TlsState {
    project: String,
    roots: Arc<RootCertStore>,
    crl_path: PathBuf,
    current: Mutex<Current>,
    roster_path: PathBuf,
    roster: Mutex<RosterFile>,
}

/// The roster as last read, with its file's modification time.
struct RosterFile {
    modified: Option<SystemTime>,
    /// `None`: no roster file (a kit provisioned before rosters): any identity of the project.
    roster: Option<Roster>,
}

/// What the acceptor is built from, and the acceptor, under one lock: a reload of either the
/// revocation list or the coordinator's certificate rebuilds it with the other as it is.
struct Current {
    revocations: Revocations,
    own: OwnCertificate,
    acceptor: TlsAcceptor,
}

/// The coordinator's own certificate and key as last read, and the modification times of their
/// files when last tried (so that a bad pair is reported once per change, not per connection).
struct OwnCertificate {
    cert_path: PathBuf,
    key_path: PathBuf,
    tried: (Option<SystemTime>, Option<SystemTime>),
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Unix seconds, for the log line and the expiry warning.
    not_after: Option<i64>,
}

fn read_own(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), CoordinatorError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err("coordinator certificate", e))?;
    if chain.is_empty() {
        return Err(tls_err(
            "coordinator certificate",
            "no certificate in the file",
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| tls_err("coordinator key", e))?;
    Ok((chain, key))
}

impl Current {
    /// Reads the coordinator's certificate and key again when their files changed (or when
    /// `force`d). A pair that does not read or does not match is logged and the one in use
    /// kept: a renewal half copied must not take the coordinator down.
    fn reload_own(&mut self, roots: &Arc<RootCertStore>, force: bool) {
        let own = &mut self.own;
        let now = (modified(&own.cert_path), modified(&own.key_path));
        if !force && now == own.tried {
            return;
        }
        own.tried = now;
        let read =
            |path: &Path| std::fs::read(path).map_err(|e| tls_err(&path.display().to_string(), e));
        let loaded = read(&own.cert_path).and_then(|cert_pem| {
            let key_pem = read(&own.key_path)?;
            let (chain, key) = read_own(&cert_pem, &key_pem)?;
            let acceptor = build_acceptor(roots, &chain, &key, &self.revocations)?;
            let not_after = alveolus_proto::kit::pem_not_after(&cert_pem).ok();
            Ok((chain, key, acceptor, not_after))
        });
        match loaded {
            Ok((chain, _, _, not_after))
                if !force && chain == own.chain && not_after == own.not_after => {}
            Ok((chain, key, acceptor, not_after)) => {
                (own.chain, own.key, own.not_after) = (chain, key, not_after);
                self.acceptor = acceptor;
                let expires = not_after.map(alveolus_proto::kit::utc).unwrap_or_default();
                tracing::info!(%expires, "coordinator certificate reloaded");
                let now = crate::clock::unix_ms() / 1000;
                if let Some(warning) = not_after
                    .and_then(|t| alveolus_proto::kit::expiry_warning("the coordinator's", t, now))
                {
                    tracing::warn!("{warning}");
                }
            }
            Err(e) => tracing::error!(
                "coordinator certificate not reloaded, serving the previous one: {e}"
            ),
        }
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).ok().and_then(|m| m.modified().ok())
}

impl TlsState {
    pub fn new(settings: &CoordinatorSettings) -> Result<Self, CoordinatorError> {
        crate::install_crypto_provider();
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&settings.ca_pem) {
            roots
                .add(cert.map_err(|e| tls_err("project CA", e))?)
                .map_err(|e| tls_err("project CA", e))?;
        }
        if roots.is_empty() {
            return Err(tls_err("project CA", "no certificate in ca.pem"));
        }
        let (chain, key) = read_own(&settings.cert_pem, &settings.key_pem)?;
        let own = OwnCertificate {
            tried: (modified(&settings.cert_path), modified(&settings.key_path)),
            cert_path: settings.cert_path.clone(),
            key_path: settings.key_path.clone(),
            not_after: alveolus_proto::kit::pem_not_after(&settings.cert_pem).ok(),
            chain,
            key,
        };
        let revocations = read_revocations(&settings.revocation_list)?;
        let roster = RosterFile {
            modified: modified(&settings.roster),
            roster: Roster::read(&settings.roster).map_err(|e| tls_err("roster", e))?,
        };
        if roster.roster.is_none() {
            tracing::warn!(
                roster = %settings.roster.display(),
                "no roster: any certificate of the project CA is taken; `alveolus provision --add-site` on the project writes one"
            );
        }
        let roots = Arc::new(roots);
        let acceptor = build_acceptor(&roots, &own.chain, &own.key, &revocations)?;
        Ok(Self {
            project: settings.project.clone(),
            roots,
            crl_path: settings.revocation_list.clone(),
            current: Mutex::new(Current {
                revocations,
                own,
                acceptor,
            }),
            roster_path: settings.roster.clone(),
            roster: Mutex::new(roster),
        })
    }

    /// The acceptor for the next connection, rebuilt when the CRL file or the coordinator's
    /// certificate or key changed.
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut current = self.current();
        current.reload_own(&self.roots, false);
        current.acceptor.clone()
    }

    /// Everything that follows a file, read again now whether or not the file seems changed
    /// (SIGHUP: for a file replaced within the same second as the last read).
    pub fn reload(&self) {
        {
            let mut current = self.current.lock().expect("tls state lock");
            current.reload_own(&self.roots, true);
            current.revocations.modified = None;
        }
        self.roster.lock().expect("roster lock").modified = None;
        drop(self.current());
    }

    /// The revocations and acceptor, reloaded first if the CRL file changed. Every call asks,
    /// not only every new connection: a site revoked while connected is refused at its next
    /// call (a `stat` per call is the price).
    fn current(&self) -> MutexGuard<'_, Current> {
        let mut current = self.current.lock().expect("tls state lock");
        let modified = std::fs::metadata(&self.crl_path)
            .ok()
            .and_then(|m| m.modified().ok());
        if modified != current.revocations.modified {
            let own = &current.own;
            let built = read_revocations(&self.crl_path)
                .and_then(|r| Ok((build_acceptor(&self.roots, &own.chain, &own.key, &r)?, r)));
            match built {
                Ok((acceptor, revocations)) => {
                    tracing::info!(
                        revoked = revocations.serials.len(),
                        "revocation list reloaded"
                    );
                    current.acceptor = acceptor;
                    current.revocations = revocations;
                }
                // Keep the last good list: a half-written or broken file must not open the door.
                Err(e) => {
                    tracing::error!("revocation list not reloaded, keeping the previous one: {e}")
                }
            }
        }
        current
    }

    /// Whether `identity` was provisioned, by the roster as it is on disk now (re-read when its
    /// file changed; a broken file keeps the last good roster).
    fn provisioned(&self, identity: &Identity) -> bool {
        let mut file = self.roster.lock().expect("roster lock");
        let now = modified(&self.roster_path);
        if now != file.modified {
            match Roster::read(&self.roster_path) {
                Ok(roster) => {
                    tracing::info!("roster reloaded");
                    *file = RosterFile {
                        modified: now,
                        roster,
                    };
                }
                Err(e) => tracing::error!("roster not reloaded, keeping the previous one: {e}"),
            }
        }
        file.roster.as_ref().is_none_or(|r| r.admits(identity))
    }

    /// The caller's identity, from the certificate the TLS layer already verified.
    pub fn identify(
        &self,
        peer_certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<Identity, CoordinatorError> {
        let leaf = peer_certs
            .and_then(|c| c.first())
            .ok_or(CoordinatorError::Unauthenticated(
                "no client certificate".into(),
            ))?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|_| {
            CoordinatorError::Unauthenticated("unreadable client certificate".into())
        })?;
        if self
            .current()
            .revocations
            .serials
            .contains(cert.raw_serial())
        {
            return Err(CoordinatorError::PermissionDenied(
                "this certificate has been revoked".into(),
            ));
        }
        let identity = identity_of(&cert)?;
        if identity.project != self.project {
            return Err(CoordinatorError::PermissionDenied(format!(
                "certificate belongs to project `{}`, this coordinator serves `{}`",
                identity.project, self.project
            )));
        }
        if !self.provisioned(&identity) {
            return Err(CoordinatorError::PermissionDenied(format!(
                "{identity} was never provisioned for this project (it is not in the coordinator's roster)"
            )));
        }
        Ok(identity)
    }

    /// Like [`identify`](Self::identify), and the identity must have `role`.
    pub fn require(
        &self,
        peer_certs: Option<&[CertificateDer<'_>]>,
        role: Role,
    ) -> Result<Identity, CoordinatorError> {
        let identity = self.identify(peer_certs)?;
        if identity.role != role {
            return Err(CoordinatorError::PermissionDenied(format!(
                "{identity} may not make {role} calls"
            )));
        }
        Ok(identity)
    }
}

/// When the caller's certificate (already verified) expires, Unix seconds.
pub fn expiry(peer_certs: Option<&[CertificateDer<'_>]>) -> Option<i64> {
    let leaf = peer_certs?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The one Alveolus identity a certificate carries in its URI SANs. A certificate naming two
/// (a site and an admin, say) is refused: otherwise it would be whichever came first.
fn identity_of(
    cert: &x509_parser::certificate::X509Certificate<'_>,
) -> Result<Identity, CoordinatorError> {
    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let identities: Vec<Identity> = uris
        .iter()
        .filter_map(|u| Identity::parse_uri(u).ok())
        .collect();
    match <[Identity; 1]>::try_from(identities) {
        Ok([identity]) => Ok(identity),
        Err(identities) if identities.is_empty() => Err(CoordinatorError::Unauthenticated(
            "the certificate carries no Alveolus identity".into(),
        )),
        Err(identities) => Err(CoordinatorError::Unauthenticated(format!(
            "the certificate carries {} Alveolus identities; one is required",
            identities.len()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert_with(uris: &[&str]) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn identity(uris: &[&str]) -> Result<Identity, CoordinatorError> {
        let der = cert_with(uris);
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        identity_of(&cert)
    }

    #[test]
    fn a_certificate_names_exactly_one_identity() {
        let site = identity(&["spiffe://lungs/site/alpha"]).unwrap();
        assert_eq!((site.role, site.name.as_str()), (Role::Site, "alpha"));
        // Other URIs beside it do not count.
        assert!(identity(&["https://hospital.example/", "spiffe://lungs/site/alpha"]).is_ok());
        let two = identity(&["spiffe://lungs/site/alpha", "spiffe://lungs/admin/alice"]);
        assert!(
            two.as_ref()
                .is_err_and(|e| e.to_string().contains("2 Alveolus identities")),
            "{two:?}"
        );
        assert!(identity(&["https://hospital.example/"]).is_err());
    }
}

//! The serving certificate: read from a `kubernetes.io/tls` Secret in the operator namespace (as
//! cert-manager writes it) and swapped in whenever that Secret changes, without a restart. For
//! development, `--tls-self-signed` creates the Secret when it is missing, with a fresh CA (`ca.crt`,
//! what clients trust) and a certificate for the service names and 127.0.0.1.
//!
//! A Secret the operator did not create is only ever read, never rewritten.
//!
//! The verification server (`delegation-operator serve`) reads no Secret at all: it takes the
//! certificate from files (the Secret mounted into its Pod by the kubelet) and reloads them when they
//! change, so its ServiceAccount needs no right on Secrets.

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use crate::operator::{Error, Result, managed_labels};

pub const CERT_KEY: &str = "tls.crt";
pub const PRIVATE_KEY_KEY: &str = "tls.key";
pub const CA_KEY: &str = "ca.crt";

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub namespace: String,
    pub secret_name: String,
    /// Create the Secret with a generated CA and certificate when it does not exist.
    pub self_signed: bool,
    /// Names the generated certificate is valid for (127.0.0.1 is always added).
    pub dns_names: Vec<String>,
}

/// Where the serving certificate comes from.
#[derive(Clone, Debug)]
pub enum TlsSource {
    /// A `kubernetes.io/tls` Secret read through the API (the controller, which may read it).
    Secret(TlsSettings),
    /// PEM files, e.g. that Secret mounted into the Pod (the verification server, which may not).
    Files(CertFiles),
}

/// A PEM certificate chain and its private key, on disk.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How often the certificate files are read again. The kubelet updates a mounted Secret within about
/// a minute of a change, so a renewed certificate is served within that plus this.
const FILE_RELOAD_PERIOD: Duration = Duration::from_secs(10);

/// The certificate presented to clients: the latest good one from the Secret.
#[derive(Debug, Default)]
pub struct ServingCert(RwLock<Option<Arc<CertifiedKey>>>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.read().ok().and_then(|held| held.clone())
    }
}

impl ServingCert {
    pub fn is_loaded(&self) -> bool {
        self.0.read().is_ok_and(|held| held.is_some())
    }

    fn replace(&self, key: Arc<CertifiedKey>) {
        if let Ok(mut held) = self.0.write() {
            *held = Some(key);
        }
    }
}

/// The rustls configuration serving whatever `cert` currently holds, HTTP/2 and HTTP/1.1.
pub fn server_config(cert: Arc<ServingCert>) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::InvalidState(format!("TLS configuration: {e}")))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Loads the certificate once from `source`. Fails when there is no usable certificate at start.
pub async fn load(client: &Client, source: &TlsSource, cert: &ServingCert) -> Result<()> {
    match source {
        TlsSource::Secret(settings) => load_secret(client, settings, cert).await,
        TlsSource::Files(files) => {
            cert.replace(certified_key_of_files(files)?);
            Ok(())
        }
    }
}

fn certified_key_of_files(files: &CertFiles) -> Result<Arc<CertifiedKey>> {
    let (chain, key) = read_files(files)?;
    certified_key_of_pem(&chain, &key).map_err(|problem| {
        Error::InvalidState(format!(
            "{} and {} hold no usable certificate: {problem}",
            files.cert.display(),
            files.key.display()
        ))
    })
}

/// Keeps `cert` in step with `source` for as long as it runs; a bad version keeps the previous one.
pub async fn watch(client: Client, source: TlsSource, cert: Arc<ServingCert>) {
    match source {
        TlsSource::Secret(settings) => watch_secret(client, settings, cert).await,
        TlsSource::Files(files) => watch_files(files, cert).await,
    }
}

fn read_files(files: &CertFiles) -> Result<(Vec<u8>, Vec<u8>)> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| {
            Error::InvalidState(format!(
                "could not read the serving certificate file {}: {e}",
                path.display()
            ))
        })
    };
    Ok((read(&files.cert)?, read(&files.key)?))
}

/// Reads the files every [`FILE_RELOAD_PERIOD`] and swaps in a changed pair once it is usable. The
/// kubelet replaces a mounted Secret's files together (a symlink swap), but a read can still fall
/// between the two: a mismatched pair is skipped and read again next time.
async fn watch_files(files: CertFiles, cert: Arc<ServingCert>) {
    let mut served = read_files(&files).ok();
    let mut reported = false;
    loop {
        tokio::time::sleep(FILE_RELOAD_PERIOD).await;
        let current = match read_files(&files) {
            Ok(current) => current,
            Err(problem) => {
                if !reported {
                    tracing::warn!(%problem, "still serving the previous certificate");
                    reported = true;
                }
                continue;
            }
        };
        if served.as_ref() == Some(&current) {
            continue;
        }
        match certified_key_of_pem(&current.0, &current.1) {
            Ok(key) => {
                cert.replace(key);
                served = Some(current);
                reported = false;
                tracing::info!(file = %files.cert.display(), "serving the renewed certificate");
            }
            Err(problem) if !reported => {
                tracing::warn!(
                    file = %files.cert.display(),
                    %problem,
                    "the serving certificate files are unusable; still serving the previous certificate"
                );
                reported = true;
            }
            Err(_) => {}
        }
    }
}

/// Loads the certificate once from the Secret, creating it first in self-signed mode.
async fn load_secret(client: &Client, settings: &TlsSettings, cert: &ServingCert) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &settings.namespace);
    let secret = match secrets.get_opt(&settings.secret_name).await? {
        Some(secret) => secret,
        None if settings.self_signed => create_self_signed(&secrets, settings).await?,
        None => {
            return Err(Error::InvalidState(format!(
                "the serving certificate Secret {}/{} does not exist: create a kubernetes.io/tls \
                 Secret (e.g. with cert-manager) or pass --tls-self-signed=true for development",
                settings.namespace, settings.secret_name
            )));
        }
    };
    let key = certified_key(&secret).map_err(|problem| {
        Error::InvalidState(format!(
            "Secret {}/{} holds no usable certificate: {problem}",
            settings.namespace, settings.secret_name
        ))
    })?;
    cert.replace(key);
    Ok(())
}

/// Swaps in every new good version of the Secret; a bad edit keeps the previous certificate.
async fn watch_secret(client: Client, settings: TlsSettings, cert: Arc<ServingCert>) {
    let secrets: Api<Secret> = Api::namespaced(client, &settings.namespace);
    let config =
        watcher::Config::default().fields(&format!("metadata.name={}", settings.secret_name));
    watcher(secrets, config)
        .default_backoff()
        .applied_objects()
        .for_each(|secret| {
            match secret.map_err(|e| e.to_string()).and_then(|s| certified_key(&s)) {
                Ok(key) => cert.replace(key),
                Err(problem) => tracing::warn!(
                    secret = %settings.secret_name,
                    %problem,
                    "the serving certificate Secret is unusable; still serving the previous certificate"
                ),
            }
            futures::future::ready(())
        })
        .await;
}

/// The certificate chain and key of a `kubernetes.io/tls` Secret. Reasons are static: the Secret's
/// content never goes into a message.
fn certified_key(secret: &Secret) -> std::result::Result<Arc<CertifiedKey>, String> {
    let data = secret.data.as_ref().ok_or("it has no data")?;
    let cert_pem = data.get(CERT_KEY).ok_or("it has no tls.crt")?;
    let key_pem = data.get(PRIVATE_KEY_KEY).ok_or("it has no tls.key")?;
    certified_key_of_pem(&cert_pem.0, &key_pem.0)
}

/// The certificate chain and key of PEM `tls.crt` and `tls.key` contents.
fn certified_key_of_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> std::result::Result<Arc<CertifiedKey>, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| "tls.crt is not PEM")?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| "tls.key is not a PEM key")?;
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|_| "tls.key is not a supported private key")?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified
        .keys_match()
        .map_err(|_| "tls.key does not match the certificate in tls.crt")?;
    Ok(Arc::new(certified))
}

/// Creates the Secret with a generated CA and serving certificate. Several replicas may race here:
/// the first create wins and the others read what it wrote.
async fn create_self_signed(secrets: &Api<Secret>, settings: &TlsSettings) -> Result<Secret> {
    let generated = generate(&settings.dns_names)
        .map_err(|e| Error::InvalidState(format!("could not generate a certificate: {e}")))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(settings.secret_name.clone()),
            labels: Some(managed_labels()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            [
                (CERT_KEY, generated.cert_pem),
                (PRIVATE_KEY_KEY, generated.key_pem),
                (CA_KEY, generated.ca_pem),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), ByteString(v.into_bytes())))
            .collect(),
        ),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(created) => {
            tracing::info!(secret = %settings.secret_name, "created a self-signed serving certificate (development only; its CA is in ca.crt)");
            Ok(created)
        }
        Err(e) if crate::operator::error::is_conflict(&e) => {
            Ok(secrets.get(&settings.secret_name).await?)
        }
        Err(e) => Err(e.into()),
    }
}

struct Generated {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

/// A CA valid for five years and a serving certificate it signed for `dns_names` and 127.0.0.1.
fn generate(dns_names: &[String]) -> std::result::Result<Generated, rcgen::Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType,
    };
    let year = k8s_openapi::jiff::Timestamp::now()
        .to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC)
        .year() as i32;
    let (not_before, not_after) = (
        rcgen::date_time_ymd(year - 1, 1, 1),
        rcgen::date_time_ymd(year + 5, 1, 1),
    );

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "delegation-operator development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    (ca.not_before, ca.not_after) = (not_before, not_after);
    let ca_pem = ca.self_signed(&ca_key)?.pem();
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    params
        .distinguished_name
        .push(DnType::CommonName, "delegation-operator");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    (params.not_before, params.not_after) = (not_before, not_after);
    let cert_pem = params.signed_by(&key, &issuer)?.pem();
    Ok(Generated {
        ca_pem,
        cert_pem,
        key_pem: key.serialize_pem(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_secret(cert: &str, key: &str) -> Secret {
        Secret {
            data: Some(
                [(CERT_KEY, cert), (PRIVATE_KEY_KEY, key)]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    /// The verification server's certificate comes from files (the mounted Secret): a matching pair
    /// loads, a mismatched or missing one is refused with the file named.
    #[test]
    fn certificate_files_load_and_bad_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("tls-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (
            generate(&["a".into()]).unwrap(),
            generate(&["b".into()]).unwrap(),
        );
        let files = CertFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        std::fs::write(&files.cert, &a.cert_pem).unwrap();
        std::fs::write(&files.key, &a.key_pem).unwrap();
        assert!(certified_key_of_files(&files).is_ok());
        std::fs::write(&files.key, &b.key_pem).unwrap();
        let err = certified_key_of_files(&files).unwrap_err().to_string();
        assert!(
            err.contains("does not match") && err.contains("tls.crt"),
            "{err}"
        );
        std::fs::remove_file(&files.key).unwrap();
        let err = certified_key_of_files(&files).unwrap_err().to_string();
        assert!(err.contains("tls.key"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_generated_certificate_is_served() {
        let generated = generate(&["delegation-operator.delegation-system.svc".into()]).unwrap();
        assert!(certified_key(&tls_secret(&generated.cert_pem, &generated.key_pem)).is_ok());
        assert!(generated.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    }

    /// A key that does not belong to the certificate, or garbage, is refused with a reason that
    /// does not quote the Secret.
    #[test]
    fn mismatched_or_malformed_secrets_are_refused() {
        let a = generate(&["a".into()]).unwrap();
        let b = generate(&["b".into()]).unwrap();
        let err = certified_key(&tls_secret(&a.cert_pem, &b.key_pem)).unwrap_err();
        assert!(err.contains("does not match"), "{err}");
        let err = certified_key(&tls_secret("not pem", &a.key_pem)).unwrap_err();
        assert!(err.contains("tls.crt"), "{err}");
        let err = certified_key(&tls_secret(&a.cert_pem, "junk")).unwrap_err();
        assert!(err.contains("tls.key"), "{err}");
        assert!(certified_key(&Secret::default()).is_err());
    }
}

//! The cluster's TLS material: a CA made for this cluster only, and one
//! certificate it signs, used by the scheduler, the workers and the
//! notebook's client alike. Dask's TLS requires a certificate signed by
//! the CA on both ends of every connection (it does not check host names),
//! so whoever lacks the 0600 key cannot join the cluster or submit work.
//! The scheduler's HTTP server asks the same of its clients (job.rs's
//! preload), and noyau's relay checks that server's certificate against
//! the CA and its name, [`NAME`].

use std::io::Write;
use std::path::Path;

use crate::DaskError;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

pub const CA: &str = "ca.pem";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";
/// The certificate's one name (a DNS name, for TLS clients that check it).
pub const NAME: &str = "noyau-dask";

/// Writes `ca.pem`, `cert.pem` and `key.pem` (0600) into `dir`.
pub fn write(dir: &Path) -> Result<(), DaskError> {
    make(dir).map_err(|e| DaskError::Certs(e.to_string()))
}

fn make(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let mut ca_params = CertificateParams::new(Vec::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "noyau dask cluster CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut leaf = CertificateParams::new(vec![NAME.to_string()])?;
    leaf.distinguished_name.push(DnType::CommonName, NAME);
    leaf.use_authority_key_identifier_extension = true;
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer)?;

    private_write(&dir.join(CA), ca_cert.pem().as_bytes())?;
    private_write(&dir.join(CERT), leaf_cert.pem().as_bytes())?;
    private_write(&dir.join(KEY), leaf_key.serialize_pem().as_bytes())?;
    Ok(())
}

fn private_write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    noyau_trust::create_private(path, 0o600)?.write_all(data)
}

//! TLS 1.3 with a pinned self-signed certificate.
//!
//! There is no CA between a batch job and the user's proxy, so the proxy makes
//! its own certificate and the agent is told the SHA-256 fingerprint of its
//! DER (through a 0600 file or the job environment, never the command line).
//! The agent's verifier accepts exactly that certificate, whatever its names or
//! dates, but still checks the handshake signature so that only the holder of
//! the private key can complete the handshake.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::LinkError;

/// The proxy's certificate and private key, PEM encoded, so that a proxy can
/// keep the same identity (and pin) across restarts by saving it to a 0600 file.
#[derive(Clone, Serialize, Deserialize)]
pub struct ServerIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ServerIdentity {
    // The key must never end up in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("pin", &self.pin().ok())
            .finish_non_exhaustive()
    }
}

impl ServerIdentity {
    /// Makes a fresh self-signed certificate for `hostnames` (names are not
    /// checked by the agent, which trusts the pin; they only help humans).
    pub fn generate(hostnames: &[String]) -> Result<Self, LinkError> {
        let names = if hostnames.is_empty() {
            vec!["noyau-proxy".to_string()]
        } else {
            hostnames.to_vec()
        };
        let ck = rcgen::generate_simple_self_signed(names)
            .map_err(|e| LinkError::Identity(format!("cannot generate certificate: {e}")))?;
        Ok(ServerIdentity {
            cert_pem: ck.cert.pem(),
            key_pem: ck.signing_key.serialize_pem(),
        })
    }

    /// SHA-256 of the certificate DER, lowercase hex: what the agent pins.
    pub fn pin(&self) -> Result<String, LinkError> {
        Ok(fingerprint(&self.cert_der()?))
    }

    fn cert_der(&self) -> Result<CertificateDer<'static>, LinkError> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map_err(|e| LinkError::Identity(format!("certificate PEM: {e}")))
    }

    /// The rustls server configuration: TLS 1.3 only, this certificate.
    pub(crate) fn server_config(&self) -> Result<rustls::ServerConfig, LinkError> {
        let cert = self.cert_der()?;
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| LinkError::Identity(format!("private key PEM: {e}")))?;
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?;
        Ok(cfg)
    }
}

pub(crate) fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Compares without an early exit, so timing does not reveal how many leading
/// bytes matched.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Accepts exactly the pinned certificate and verifies TLS 1.3 signatures with
/// the provider's algorithms.
#[derive(Debug)]
pub(crate) struct PinVerifier {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// Fingerprint of the last certificate refused, so `dial` can report a
    /// pin mismatch as such instead of a generic handshake failure.
    pub(crate) refused: Mutex<Option<String>>,
}

impl PinVerifier {
    pub(crate) fn new(pin: &str) -> Result<Self, LinkError> {
        let bytes = hex::decode(pin.trim()).map_err(|_| LinkError::BadPin(pin.into()))?;
        let pin: [u8; 32] = bytes
            .try_into()
            .map_err(|_| LinkError::BadPin(pin.into()))?;
        Ok(PinVerifier {
            pin,
            provider: provider(),
            refused: Mutex::new(None),
        })
    }

    pub(crate) fn pin_hex(&self) -> String {
        hex::encode(self.pin)
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Sha256::digest(end_entity.as_ref());
        if ct_eq(&got, &self.pin) {
            Ok(ServerCertVerified::assertion())
        } else {
            let got = hex::encode(got);
            if let Ok(mut r) = self.refused.lock() {
                *r = Some(got.clone());
            }
            Err(rustls::Error::General(format!(
                "certificate fingerprint {got} does not match the pin"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The client config only enables TLS 1.3; refuse rather than trust.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls client configuration for the agent: TLS 1.3 only, pinned.
pub(crate) fn client_config(verifier: Arc<PinVerifier>) -> Result<rustls::ClientConfig, LinkError> {
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_is_sha256_of_der() {
        let id = ServerIdentity::generate(&["localhost".into()]).unwrap();
        let pin = id.pin().unwrap();
        assert_eq!(pin.len(), 64);
        assert_eq!(pin, fingerprint(&id.cert_der().unwrap()));
        assert!(PinVerifier::new(&pin).is_ok());
        assert!(PinVerifier::new("abc").is_err());
        assert!(id.server_config().is_ok());
    }

    #[test]
    fn ct_eq_works() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}

//! Integrity: is what comes through an upstream what the origin sent? Pure comparisons
//! ([`Reference`], [`compare_body`]) and the TLS client config that lets a check *see* a
//! swapped certificate instead of merely failing on it ([`observing_tls`]).
//!
//! A man in the middle shows up as a certificate for the TLS judge that differs from the
//! one a direct connection gets (whether or not it chains to a root we trust: a corporate or
//! a stolen CA would pass validation). An injector shows up as a body of a static page that
//! differs from a direct fetch of it. Either is tampering: the upstream is quarantined.
//!
//! Only the end-entity certificate is compared: sites rotate intermediates and serve chains
//! in different orders, the key a client talks to is the leaf's. A site served by several
//! certificates (a CDN) is handled by keeping every leaf seen directly ([`MAX_LEAVES`]) and
//! fetching directly again before calling a new leaf tampering.

use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

/// Leaves of the TLS judge remembered from direct connections at most.
pub const MAX_LEAVES: usize = 8;

/// What direct fetches showed: the reference an upstream's view is compared with.
#[derive(Debug, Clone, Default)]
pub struct Reference {
    /// SHA-256 of every TLS judge leaf certificate seen directly.
    pub leaves: Vec<[u8; 32]>,
    /// The integrity page's body as fetched directly, when it proved static (two direct
    /// fetches agreed). Shared: every check takes a copy of the reference.
    pub body: Option<bytes::Bytes>,
}

impl Reference {
    /// Remembers a leaf seen directly.
    pub fn add_leaf(&mut self, leaf: [u8; 32]) {
        if !self.leaves.contains(&leaf) {
            if self.leaves.len() >= MAX_LEAVES {
                self.leaves.remove(0);
            }
            self.leaves.push(leaf);
        }
    }

    pub fn knows_leaf(&self, leaf: &[u8; 32]) -> bool {
        self.leaves.contains(leaf)
    }
}

/// SHA-256 of a certificate.
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    Sha256::digest(cert).into()
}

/// The first 8 bytes of a fingerprint in hex, for messages.
pub fn short(fp: &[u8; 32]) -> String {
    fp[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// `None` when `through` is `direct`; else what differs, for the quarantine reason.
pub fn compare_body(direct: &[u8], through: &[u8]) -> Option<String> {
    if direct == through {
        return None;
    }
    let at = direct
        .iter()
        .zip(through)
        .position(|(a, b)| a != b)
        .unwrap_or(direct.len().min(through.len()));
    let end = (at + 40).min(through.len());
    let excerpt: String = String::from_utf8_lossy(&through[at..end])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    Some(format!(
        "{} bytes where a direct fetch gets {}; they differ from byte {at}: {excerpt:?}",
        through.len(),
        direct.len()
    ))
}

/// A client config for fetching the TLS judge *through* an upstream: it accepts any
/// certificate chain (so a swapped one is seen and compared rather than merely refused) but
/// still checks the handshake signatures, so the certificate shown is the peer's own.
/// Nothing but the handshake is done over such a connection.
pub fn observing_tls(provider: Arc<CryptoProvider>) -> Result<rustls::ClientConfig, rustls::Error> {
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Observer { provider }))
            .with_no_client_auth(),
    )
}

#[derive(Debug)]
struct Observer {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Observer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Compared with the direct fetch's afterwards: that is the verification.
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_compare_byte_for_byte() {
        let page = b"<html><body>Example Domain</body></html>";
        assert_eq!(compare_body(page, page), None);
        let injected =
            b"<html><body>Example Domain<script src=//ads.example/x.js></script></body></html>";
        let why = compare_body(page, injected).unwrap();
        assert!(why.contains("differ from byte 27"), "{why}");
        assert!(why.contains("script src"), "{why}");
        let cut = compare_body(page, &page[..10]).unwrap();
        assert!(
            cut.contains("10 bytes where a direct fetch gets 40"),
            "{cut}"
        );
    }

    #[test]
    fn leaves_are_remembered_up_to_a_bound() {
        let mut r = Reference::default();
        for i in 0..20u8 {
            r.add_leaf([i; 32]);
        }
        assert_eq!(r.leaves.len(), MAX_LEAVES);
        assert!(r.knows_leaf(&[19; 32]) && !r.knows_leaf(&[0; 32]));
        assert_eq!(short(&[0xab; 32]), "abababababababab");
    }
}

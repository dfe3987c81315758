//! The webhook's TLS material: a CA and a serving certificate, made with rcgen (ECDSA
//! P-256), and the check that decides whether existing material is still good.
//!
//! Pure apart from the randomness of key generation: the time is passed in.

use std::{sync::Arc, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};
use rustls::{
    RootCertStore,
    client::{WebPkiServerVerifier, danger::ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
    sign::CertifiedKey,
};
use time::OffsetDateTime;

/// Why material could not be made.
#[derive(Debug, thiserror::Error)]
#[error("cannot generate the {what}: {source}")]
pub struct PkiError {
    what: &'static str,
    source: rcgen::Error,
}

/// PEM-encoded TLS material as stored in the Secret (`ca.crt`, `tls.crt`, `tls.key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Material {
    /// The CA bundle clients trust: the current CA first, then the previous one while
    /// certificates it signed may still be served (a rotation in progress).
    pub ca_pem: String,
    /// The serving certificate.
    pub cert_pem: String,
    /// The serving certificate's private key (PKCS#8).
    pub key_pem: String,
}

/// The DNS names a Service is reached by from other namespaces: `<service>.<namespace>.svc`
/// (what the API server uses for a webhook), the fully qualified form, and
/// `<service>.<namespace>` (the form of KEDA's `scalerAddress` and the sidecars' default
/// aggregator URL in manifests/).
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
    ]
}

/// A fresh CA and a serving certificate for `names`, valid from `now` (less a minute of
/// clock skew) for `validity`.
pub fn generate(names: &[String], now: OffsetDateTime, validity: Duration) -> Result<Material, PkiError> {
    let not_before = now - time::Duration::minutes(1);
    let not_after = now + validity;

    let ca_key = KeyPair::generate().map_err(|source| PkiError { what: "CA key", source })?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, "durable-scaler webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.not_before = not_before;
    // The CA outlives the serving certificate by a day so the chain never expires first at the CA.
    ca.not_after = not_after + time::Duration::days(1);
    let ca_cert = ca.self_signed(&ca_key).map_err(|source| PkiError { what: "CA certificate", source })?;
    // The CA key signs this one certificate and is then dropped: renewal makes a new CA.
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate().map_err(|source| PkiError { what: "serving key", source })?;
    let mut leaf = CertificateParams::new(names.to_vec())
        .map_err(|source| PkiError { what: "serving certificate names", source })?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = not_before;
    leaf.not_after = not_after;
    let cert =
        leaf.signed_by(&key, &issuer).map_err(|source| PkiError { what: "serving certificate", source })?;
    Ok(Material { ca_pem: ca_cert.pem(), cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Checks that `material` can serve `names` at time `at`: the key matches the certificate,
/// and the certificate chains to the CA bundle and is valid for every name at `at` (pass a
/// time ahead of now to ask "still valid then?"). Returns why not.
pub fn check(material: &Material, names: &[String], at: OffsetDateTime) -> Result<(), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_slice_iter(material.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    let Some((end_entity, intermediates)) = chain.split_first() else {
        return Err("tls.crt holds no certificate".to_owned());
    };
    let key =
        PrivateKeyDer::from_pem_slice(material.key_pem.as_bytes()).map_err(|e| format!("tls.key: {e}"))?;
    CertifiedKey::from_der(chain.clone(), key, &provider)
        .map_err(|e| format!("tls.key does not fit tls.crt: {e}"))?;

    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(material.ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| format!("ca.crt: {e}"))?;
        roots.add(ca).map_err(|e| format!("ca.crt: {e}"))?;
    }
    if roots.is_empty() {
        return Err("ca.crt holds no certificate".to_owned());
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("ca.crt: {e}"))?;
    let seconds = u64::try_from(at.unix_timestamp()).unwrap_or_default();
    let time = UnixTime::since_unix_epoch(Duration::from_secs(seconds));
    for name in names {
        let server_name = ServerName::try_from(name.as_str()).map_err(|e| format!("{name}: {e}"))?;
        verifier
            .verify_server_cert(end_entity, intermediates, &server_name, &[], time)
            .map_err(|e| format!("tls.crt for {name} at {at}: {e}"))?;
    }
    Ok(())
}

/// Checks that `bundle` (PEM) holds at least one CA certificate valid at `now`. Returns why
/// not.
pub fn check_ca(bundle: &str, now: OffsetDateTime) -> Result<(), String> {
    let mut last = "holds no certificate".to_owned();
    for der in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        let der = der.map_err(|e| format!("not PEM: {e}"))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| format!("not a certificate: {e}"))?;
        if !cert.is_ca() {
            last = format!("{} is not a CA", cert.subject());
        } else if !cert.validity().is_valid_at(x509_parser::time::ASN1Time::new(now)) {
            last = format!("{} is not valid at {now}", cert.subject());
        } else {
            return Ok(());
        }
    }
    Err(last)
}

/// The CA bundle after a renewal: the new CA, then the old bundle's first CA when the old
/// serving certificate is still valid now (webhook pods may serve it until the kubelet
/// refreshes their Secret volume, and the API server must still trust it meanwhile).
pub fn rotated_bundle(
    new_ca_pem: &str,
    old: Option<&Material>,
    names: &[String],
    now: OffsetDateTime,
) -> String {
    let previous = old.filter(|old| check(old, names, now).is_ok()).and_then(|old| first_pem(&old.ca_pem));
    match previous {
        Some(previous) if previous.trim() != new_ca_pem.trim() => format!("{new_ca_pem}{previous}"),
        _ => new_ca_pem.to_owned(),
    }
}

/// The first PEM block of a bundle, with its END line.
fn first_pem(bundle: &str) -> Option<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let start = bundle.find("-----BEGIN CERTIFICATE-----")?;
    let end = bundle[start..].find(END)? + start + END.len();
    Some(format!("{}\n", &bundle[start..end]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    fn names() -> Vec<String> {
        dns_names("durable-scaler-webhook", "durable-scaler")
    }

    #[test]
    fn fresh_material_is_valid_now_and_not_after_it_expires() {
        let now = OffsetDateTime::now_utc();
        let material = generate(&names(), now, YEAR).unwrap();
        assert_eq!(check(&material, &names(), now), Ok(()));
        assert!(check(&material, &names(), now + time::Duration::days(366)).is_err());
    }

    #[test]
    fn material_for_another_service_is_not_valid() {
        let now = OffsetDateTime::now_utc();
        let material = generate(&dns_names("other", "durable-scaler"), now, YEAR).unwrap();
        assert!(
            check(&material, &names(), now)
                .unwrap_err()
                .contains("durable-scaler-webhook.durable-scaler.svc")
        );
    }

    #[test]
    fn a_key_from_another_pair_is_not_valid() {
        let now = OffsetDateTime::now_utc();
        let mut material = generate(&names(), now, YEAR).unwrap();
        material.key_pem = generate(&names(), now, YEAR).unwrap().key_pem;
        assert!(check(&material, &names(), now).unwrap_err().contains("does not fit"));
    }

    #[test]
    fn a_rotation_keeps_the_previous_ca_while_its_certificate_is_valid() {
        let now = OffsetDateTime::now_utc();
        let old = generate(&names(), now, YEAR).unwrap();
        let new = generate(&names(), now, YEAR).unwrap();
        let bundle = rotated_bundle(&new.ca_pem, Some(&old), &names(), now);
        assert_eq!(bundle, format!("{}{}", new.ca_pem, old.ca_pem));
        let expired = rotated_bundle(&new.ca_pem, Some(&old), &names(), now + time::Duration::days(400));
        assert_eq!(expired, new.ca_pem);
    }
}

//! The webhook's TLS material: a CA and a serving certificate, made with rcgen (ECDSA
//! P-256), the check that decides whether existing material is still good, and the renewal
//! that keeps the CA (so every copy of it stays valid) while the CA itself is good.
//!
//! Pure apart from the randomness of key generation: the time is passed in.

use std::{sync::Arc, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PublicKeyData,
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

/// PEM-encoded TLS material as stored in the Secret (`ca.crt`, `tls.crt`, `tls.key`, and
/// `ca.key`, which only certs-gen reads: the pods mount the other three by `items`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Material {
    /// The CA bundle clients trust: the current CA first, then the previous one while
    /// certificates it signed may still be served (a rotation in progress).
    pub ca_pem: String,
    /// The serving certificate.
    pub cert_pem: String,
    /// The serving certificate's private key (PKCS#8).
    pub key_pem: String,
    /// The current CA's private key (PKCS#8), to sign the next serving certificate under the
    /// same CA; `None` in material from before it was kept, or written to local files.
    pub ca_key_pem: Option<String>,
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
/// clock skew) for `validity`; the CA outlives the certificate by a day.
pub fn generate(names: &[String], now: OffsetDateTime, validity: Duration) -> Result<Material, PkiError> {
    generate_with_ca(names, now, validity, validity + Duration::from_secs(24 * 3600))
}

/// A fresh CA valid for `ca_validity` and a serving certificate for `names` under it, valid
/// for `validity` (at most as long as the CA), both from `now` less a minute of clock skew.
pub fn generate_with_ca(
    names: &[String],
    now: OffsetDateTime,
    validity: Duration,
    ca_validity: Duration,
) -> Result<Material, PkiError> {
    let ca_key = KeyPair::generate().map_err(|source| PkiError { what: "CA key", source })?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, "durable-scaler webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    ca.not_before = now - time::Duration::minutes(1);
    ca.not_after = now + ca_validity;
    let ca_not_after = ca.not_after;
    let ca_cert = ca.self_signed(&ca_key).map_err(|source| PkiError { what: "CA certificate", source })?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);
    let (cert_pem, key_pem) = issue(&issuer, names, now, validity, ca_not_after)?;
    Ok(Material { ca_pem: ca_cert.pem(), cert_pem, key_pem, ca_key_pem: Some(ca_key_pem) })
}

/// A serving certificate for `names` signed by `issuer`, from `now` for `validity` but never
/// past the CA's `ca_not_after` (a chain is only as good as its CA).
fn issue(
    issuer: &Issuer<'_, KeyPair>,
    names: &[String],
    now: OffsetDateTime,
    validity: Duration,
    ca_not_after: OffsetDateTime,
) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate().map_err(|source| PkiError { what: "serving key", source })?;
    let mut leaf = CertificateParams::new(names.to_vec())
        .map_err(|source| PkiError { what: "serving certificate names", source })?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now - time::Duration::minutes(1);
    leaf.not_after = (now + validity).min(ca_not_after);
    let cert =
        leaf.signed_by(&key, issuer).map_err(|source| PkiError { what: "serving certificate", source })?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// What a renewal made, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewal {
    /// The new material to store.
    pub material: Material,
    /// Whether the CA was kept (`ca.crt` unchanged) or a new one made.
    pub kept_ca: bool,
}

/// New material to replace `old` at `now`. While `old`'s CA (the first in `ca.crt`, with its
/// key in `ca.key`) stays valid for a whole new certificate (past `now + validity`), only the
/// serving certificate is renewed, under that CA, and `ca.crt` is kept byte for byte: every
/// copy of the CA (KEDA's TriggerAuthentication Secrets, the CA each sidecar was given, the
/// `caBundle`) stays valid. Otherwise a new CA (valid `ca_validity`) is made and `ca.crt`
/// becomes the new CA followed by the previous one while the old certificate is valid
/// ([`rotated_bundle`]). Asking for a whole certificate's validity (not just past the renewal
/// horizon) means a CA near its end is replaced at once rather than first signing a
/// short-lived certificate that would need renewing again within days.
pub fn renew(
    old: Option<&Material>,
    names: &[String],
    now: OffsetDateTime,
    validity: Duration,
    ca_validity: Duration,
) -> Result<Renewal, PkiError> {
    if let Some((old, issuer, ca_not_after)) =
        old.and_then(|old| reusable_ca(old, now + validity).map(|(issuer, until)| (old, issuer, until)))
    {
        let (cert_pem, key_pem) = issue(&issuer, names, now, validity, ca_not_after)?;
        let material =
            Material { ca_pem: old.ca_pem.clone(), cert_pem, key_pem, ca_key_pem: old.ca_key_pem.clone() };
        return Ok(Renewal { material, kept_ca: true });
    }
    let mut material = generate_with_ca(names, now, validity, ca_validity)?;
    material.ca_pem = rotated_bundle(&material.ca_pem, old, names, now);
    Ok(Renewal { material, kept_ca: false })
}

/// `old`'s CA as an issuer, and its end, when `ca.key` is the key of the first CA in `ca.crt`
/// and that CA is valid at `horizon`.
fn reusable_ca(
    old: &Material,
    horizon: OffsetDateTime,
) -> Option<(Issuer<'static, KeyPair>, OffsetDateTime)> {
    let key = KeyPair::from_pem(old.ca_key_pem.as_deref()?).ok()?;
    let ca_pem = first_pem(&old.ca_pem)?;
    let der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let fits = cert.public_key().raw == key.subject_public_key_info().as_slice();
    let valid = cert.is_ca() && cert.validity().is_valid_at(x509_parser::time::ASN1Time::new(horizon));
    if !(fits && valid) {
        return None;
    }
    let until = cert.validity().not_after.to_datetime();
    Some((Issuer::from_ca_cert_der(&der, key).ok()?, until))
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

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn ten_year_ca_issued(days_ago: u32) -> Material {
        let now = OffsetDateTime::now_utc();
        generate_with_ca(&names(), now - DAY * days_ago, YEAR, DAY * 3650).unwrap()
    }

    #[test]
    fn a_renewal_while_the_ca_covers_a_whole_certificate_keeps_ca_crt_so_its_copies_verify_the_new_one() {
        let now = OffsetDateTime::now_utc();
        let old = ten_year_ca_issued(340);
        let renewal = renew(Some(&old), &names(), now, YEAR, DAY * 3650).unwrap();
        assert!(renewal.kept_ca);
        let new = renewal.material;
        assert_eq!(new.ca_pem, old.ca_pem, "byte for byte: KEDA's and the sidecars' copies stay current");
        assert_eq!(new.ca_key_pem, old.ca_key_pem);
        assert_ne!(new.cert_pem, old.cert_pem);
        // A copy of the CA taken at install verifies the renewed certificate for its whole life.
        let with_old_copy = Material { ca_pem: old.ca_pem.clone(), ..new };
        assert_eq!(check(&with_old_copy, &names(), now + DAY * 360), Ok(()));
    }

    #[test]
    fn the_ca_is_replaced_when_it_cannot_cover_a_whole_new_certificate() {
        let now = OffsetDateTime::now_utc();
        let old = ten_year_ca_issued(3400); // the CA ends in 250 days, the next certificate in 365
        let renewal = renew(Some(&old), &names(), now, YEAR, DAY * 3650).unwrap();
        assert!(!renewal.kept_ca);
        assert_ne!(first_pem(&renewal.material.ca_pem), first_pem(&old.ca_pem));
        assert_eq!(check(&renewal.material, &names(), now + DAY * 360), Ok(()));
    }

    #[test]
    fn a_ca_key_that_does_not_fit_the_ca_gets_a_new_ca() {
        let now = OffsetDateTime::now_utc();
        let mut old = ten_year_ca_issued(340);
        old.ca_key_pem = ten_year_ca_issued(340).ca_key_pem;
        let renewal = renew(Some(&old), &names(), now, YEAR, DAY * 3650).unwrap();
        assert!(!renewal.kept_ca);
        assert_eq!(check(&renewal.material, &names(), now), Ok(()));
    }

    #[test]
    fn material_without_a_ca_key_gets_a_new_ca_and_keeps_trusting_the_old_one() {
        let now = OffsetDateTime::now_utc();
        let old = Material { ca_key_pem: None, ..ten_year_ca_issued(340) };
        let renewal = renew(Some(&old), &names(), now, YEAR, DAY * 3650).unwrap();
        assert!(!renewal.kept_ca);
        assert!(
            renewal.material.ca_pem.ends_with(&old.ca_pem),
            "the old CA stays while its certificate is valid"
        );
    }

    #[test]
    fn a_certificate_never_outlives_its_ca() {
        let now = OffsetDateTime::now_utc();
        let material = generate_with_ca(&names(), now, YEAR, DAY * 100).unwrap();
        assert_eq!(check(&material, &names(), now + DAY * 99), Ok(()));
        let der = CertificateDer::from_pem_slice(material.cert_pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert!(cert.validity().not_after.to_datetime() <= now + DAY * 100);
    }
}

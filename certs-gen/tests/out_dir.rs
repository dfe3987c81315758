//! `certs-gen create --out-dir DIR` run as a user would, with no cluster: the files it writes
//! form a chain that verifies for the Service's names, with an ECDSA P-256 key.

// Test and benchmark code: an unwrap is the assertion that set-up worked, and `pub` in the
// support modules of a test crate names nothing outside it.
#![allow(clippy::unwrap_used, unreachable_pub)]

use std::{process::Command, sync::Arc, time::Duration};

use rustls::{
    RootCertStore, SignatureScheme,
    client::{WebPkiServerVerifier, danger::ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};

struct Written {
    ca: Vec<u8>,
    cert: Vec<u8>,
    key: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn create(extra: &[&str]) -> Written {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tls");
    let output = Command::new(env!("CARGO_BIN_EXE_certs-gen"))
        .args(["create", "--out-dir", out.to_str().unwrap()])
        .args(extra)
        .env_remove("KUBECONFIG")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let read = |name: &str| std::fs::read(out.join(name)).unwrap();
    Written { ca: read("ca.crt"), cert: read("tls.crt"), key: read("tls.key"), _dir: dir }
}

fn verify(written: &Written, name: &str, at: UnixTime) -> Result<(), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(&written.ca).unwrap()).unwrap();
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build().unwrap();
    let cert = CertificateDer::from_pem_slice(&written.cert).unwrap();
    verifier
        .verify_server_cert(&cert, &[], &ServerName::try_from(name.to_owned()).unwrap(), &[], at)
        .map(|_| ())
}

#[test]
fn the_serving_certificate_chains_to_the_ca_for_every_service_name() {
    let written = create(&[]);
    for name in [
        "durable-scaler-webhook.durable-scaler.svc",
        "durable-scaler-webhook.durable-scaler.svc.cluster.local",
        "durable-scaler-webhook.durable-scaler",
    ] {
        assert_eq!(verify(&written, name, UnixTime::now()), Ok(()), "{name}");
    }
    assert!(verify(&written, "evil.durable-scaler.svc", UnixTime::now()).is_err());
}

#[test]
fn names_and_validity_follow_the_flags() {
    let written = create(&[
        "--service",
        "hook",
        "--namespace",
        "apps",
        "--validity-days",
        "10",
        "--renew-before-days",
        "1",
    ]);
    assert_eq!(verify(&written, "hook.apps.svc", UnixTime::now()), Ok(()));
    assert!(verify(&written, "durable-scaler-webhook.durable-scaler.svc", UnixTime::now()).is_err());
    let in_eleven_days =
        UnixTime::since_unix_epoch(Duration::from_secs(UnixTime::now().as_secs() + 11 * 86400));
    assert!(verify(&written, "hook.apps.svc", in_eleven_days).is_err(), "expired after --validity-days");
}

#[test]
fn the_key_is_ecdsa_p256_private_and_fits_the_certificate() {
    let written = create(&[]);
    let key = PrivateKeyDer::from_pem_slice(&written.key).unwrap();
    assert!(matches!(key, PrivateKeyDer::Pkcs8(_)));
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider.key_provider.load_private_key(key.clone_key()).unwrap();
    assert_eq!(signing.algorithm(), rustls::SignatureAlgorithm::ECDSA);
    assert!(signing.choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256]).is_some());
    let cert = CertificateDer::from_pem_slice(&written.cert).unwrap();
    rustls::sign::CertifiedKey::from_der(vec![cert], key, &provider).unwrap().keys_match().unwrap();
}

#[cfg(unix)]
#[test]
fn the_key_file_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_certs-gen"))
        .args(["create", "--out-dir", dir.path().to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let mode = std::fs::metadata(dir.path().join("tls.key")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn a_renewal_window_as_long_as_the_validity_is_refused_naming_both_flags() {
    let output = Command::new(env!("CARGO_BIN_EXE_certs-gen"))
        .args(["create", "--out-dir", "/nonexistent", "--validity-days", "10", "--renew-before-days", "10"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--renew-before-days") && stderr.contains("--validity-days"), "{stderr}");
}

#[test]
fn a_ca_shorter_lived_than_its_certificate_is_refused_naming_both_flags() {
    let output = Command::new(env!("CARGO_BIN_EXE_certs-gen"))
        .args(["create", "--out-dir", "/nonexistent", "--validity-days", "400", "--ca-validity-days", "365"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--ca-validity-days") && stderr.contains("--validity-days"), "{stderr}");
}

#[test]
fn help_documents_every_flag_with_its_environment_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_certs-gen")).args(["create", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for env in [
        "CERTS_GEN_NAMESPACE",
        "CERTS_GEN_SECRET",
        "CERTS_GEN_SERVICE",
        "CERTS_GEN_OUT_DIR",
        "CERTS_GEN_VALIDITY_DAYS",
    ] {
        assert!(help.contains(env), "{env} missing from:\n{help}");
    }
}

#[test]
fn the_manifests_set_only_environment_variables_certs_gen_reads() {
    let mut manifest = String::new();
    for dir in ["base", "default"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests").join(dir);
        for entry in std::fs::read_dir(dir).unwrap() {
            manifest.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
        }
    }
    let mut help = String::new();
    for command in ["run", "create", "patch", "wait"] {
        let output =
            Command::new(env!("CARGO_BIN_EXE_certs-gen")).args([command, "--help"]).output().unwrap();
        help.push_str(&String::from_utf8_lossy(&output.stdout));
    }
    let set: Vec<&str> =
        manifest.lines().filter_map(|l| l.trim().strip_prefix("- name: CERTS_GEN_")).collect();
    assert!(!set.is_empty());
    for name in set {
        assert!(help.contains(&format!("env: CERTS_GEN_{name}")), "certs-gen does not read CERTS_GEN_{name}");
    }
}

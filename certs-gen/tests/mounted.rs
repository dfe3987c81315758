//! Waiting for a mounted Secret volume (`certs-gen create --wait-mounted`, `certs-gen wait`):
//! the files are written into a temporary directory as the kubelet would fill an optional
//! Secret volume once the Secret exists, on tokio's paused clock (no real sleeps).

// Test and benchmark code: an unwrap is the assertion that set-up worked, and `pub` in the
// support modules of a test crate names nothing outside it.
#![allow(clippy::unwrap_used, unreachable_pub)]

use std::time::Duration;

use certs_gen::{mounted, pki};
use time::OffsetDateTime;

const TIMEOUT: Duration = Duration::from_secs(300);
const POLL: Duration = Duration::from_secs(1);

fn names() -> Vec<String> {
    pki::dns_names("durable-scaler-aggregator", "durable-scaler")
}

fn write(dir: &std::path::Path, material: &pki::Material) {
    std::fs::write(dir.join("ca.crt"), &material.ca_pem).unwrap();
    std::fs::write(dir.join("tls.crt"), &material.cert_pem).unwrap();
    std::fs::write(dir.join("tls.key"), &material.key_pem).unwrap();
}

#[tokio::test(start_paused = true)]
async fn waiting_for_the_ca_ends_once_the_kubelet_has_written_the_secrets_ca() {
    let dir = tempfile::tempdir().unwrap();
    let material = pki::generate(&names(), OffsetDateTime::now_utc(), TIMEOUT * 1000).unwrap();
    let path = dir.path().to_owned();
    let kubelet = {
        let material = material.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(70)).await;
            write(&path, &material);
        })
    };
    let start = tokio::time::Instant::now();
    mounted::wait_for(dir.path(), TIMEOUT, POLL, |d| mounted::holds_ca(d, material.ca_pem.as_bytes()))
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_secs(70), "returned before the files were there");
    kubelet.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_older_ca_in_the_volume_is_waited_past_and_named_on_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    let old = pki::generate(&names(), now, TIMEOUT * 1000).unwrap();
    let new = pki::generate(&names(), now, TIMEOUT * 1000).unwrap();
    write(dir.path(), &old);
    let error = mounted::wait_for(dir.path(), TIMEOUT, POLL, |d| mounted::holds_ca(d, new.ca_pem.as_bytes()))
        .await
        .unwrap_err();
    assert_eq!(error.timeout, TIMEOUT);
    assert!(error.last.contains("differs from the Secret's ca.crt"), "{error}");
    assert!(error.to_string().contains(&dir.path().display().to_string()), "{error}");
}

#[tokio::test(start_paused = true)]
async fn an_empty_optional_volume_times_out_naming_the_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let error = mounted::wait_for(dir.path(), TIMEOUT, POLL, |d| {
        mounted::holds_valid_material(d, &names(), OffsetDateTime::now_utc())
    })
    .await
    .unwrap_err();
    assert!(error.last.contains("ca.crt"), "{error}");
}

#[test]
fn material_for_the_service_is_valid_and_material_for_another_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    write(dir.path(), &pki::generate(&names(), now, TIMEOUT * 1000).unwrap());
    assert_eq!(mounted::holds_valid_material(dir.path(), &names(), now), Ok(()));
    let webhook = pki::dns_names("durable-scaler-webhook", "durable-scaler");
    assert!(mounted::holds_valid_material(dir.path(), &webhook, now).is_err());
}

#[test]
fn a_ca_only_volume_is_accepted_once_it_holds_a_ca_valid_now_and_never_for_a_serving_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let now = OffsetDateTime::now_utc();
    assert!(mounted::holds_ca_certificate(dir.path(), now).unwrap_err().contains("ca.crt"));
    let material = pki::generate(&names(), now, TIMEOUT * 1000).unwrap();
    // The serving certificate in place of the CA (a wrong key in `items`) is refused.
    std::fs::write(dir.path().join("ca.crt"), &material.cert_pem).unwrap();
    assert!(mounted::holds_ca_certificate(dir.path(), now).unwrap_err().contains("is not a CA"));
    std::fs::write(dir.path().join("ca.crt"), &material.ca_pem).unwrap();
    assert_eq!(mounted::holds_ca_certificate(dir.path(), now), Ok(()));
    let later = now + time::Duration::days(400);
    assert!(mounted::holds_ca_certificate(dir.path(), later).unwrap_err().contains("not valid at"));
}

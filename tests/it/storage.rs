//! The storage reader against a real Azurite, on task hubs laid out the way
//! DurableTask.AzureStorage lays them out (by the emulator module). Each test uses its own
//! hub name. One test runs a second Azurite over HTTPS, as Azure Storage always serves.

use std::time::Duration;

use crate::common::{self, LAYOUTS, account, hub, now_ms};
use durable_scaler::{
    azurite::Azurite,
    clock::UnixMs,
    emulator::TaskHubEmulator,
    storage::{
        Layout, PartitionMode, QueueRef, REDETECT_INTERVAL, StorageAccount, StorageError, StorageErrorKind,
        StorageOptions, TaskHubReader,
    },
};

const LEASE: Duration = Duration::from_secs(60);
/// A durable timer far in the future: invisible for the whole test.
const TIMER: Duration = Duration::from_secs(3600);

/// A hub laid out as `layout` and a reader that is told nothing about the layout.
async fn laid_out(name: &str, layout: Layout, partitions: u32) -> (TaskHubEmulator, TaskHubReader) {
    let (hub, emulator) = common::laid_out(name, layout, partitions).await;
    (emulator, TaskHubReader::new(&account(), hub, PartitionMode::Auto, StorageOptions::default()))
}

fn owners(leases: &[durable_scaler::storage::PartitionLease]) -> Vec<(u32, Option<&str>)> {
    leases.iter().map(|l| (l.partition, l.owner.as_deref())).collect()
}

#[tokio::test]
async fn each_layout_is_detected_and_names_each_partition_and_its_owner() {
    for layout in LAYOUTS {
        let (emulator, reader) = laid_out("Owners", layout, 4).await;
        emulator.claim(0, "pod-a", LEASE).await.unwrap();
        emulator.claim(2, "pod-a", LEASE).await.unwrap();
        emulator.claim(1, "pod-b", LEASE).await.unwrap();

        let leases = reader.partitions(UnixMs::now()).await.unwrap();
        assert_eq!(reader.layout(), Some(layout));
        assert_eq!(
            owners(&leases),
            [(0, Some("pod-a")), (1, Some("pod-b")), (2, Some("pod-a")), (3, None)],
            "{layout:?}"
        );
    }
}

#[tokio::test]
async fn a_table_lease_expires_at_its_expires_at() {
    let (emulator, reader) = laid_out("TableExpiry", Layout::Table, 1).await;
    emulator.claim(0, "pod-a", LEASE).await.unwrap();
    let leases = reader.partitions(UnixMs::now()).await.unwrap();
    let expiry = leases[0].expires_at_unix_ms.expect("ExpiresAt is read");
    assert!(expiry > now_ms() + 30_000, "expires in about a minute: {expiry}");
}

#[tokio::test]
async fn a_released_lease_is_not_held_in_any_layout() {
    for layout in LAYOUTS {
        let (emulator, reader) = laid_out("Released", layout, 2).await;
        let claim = emulator.claim(0, "pod-a", LEASE).await.unwrap();
        emulator.claim(1, "pod-b", LEASE).await.unwrap();
        assert_eq!(reader.partitions(UnixMs::now()).await.unwrap()[0].owner.as_deref(), Some("pod-a"));
        emulator.release(claim).await.unwrap();
        assert_eq!(
            owners(&reader.partitions(UnixMs::now()).await.unwrap()),
            [(0, None), (1, Some("pod-b"))],
            "{layout:?}"
        );
    }
}

#[tokio::test]
async fn a_breaking_lease_is_not_held() {
    for layout in [Layout::Safe, Layout::Legacy] {
        let (emulator, reader) = laid_out("Breaking", layout, 2).await;
        emulator.claim(0, "pod-a", LEASE).await.unwrap();
        emulator.claim(1, "pod-a", LEASE).await.unwrap();
        assert_eq!(reader.partitions(UnixMs::now()).await.unwrap()[0].owner.as_deref(), Some("pod-a"));
        emulator.break_lease(0, Duration::from_secs(60)).await.unwrap();
        assert_eq!(
            owners(&reader.partitions(UnixMs::now()).await.unwrap()),
            [(0, None), (1, Some("pod-a"))],
            "{layout:?}"
        );
    }
}

#[tokio::test]
async fn a_lease_taken_over_names_the_new_owner() {
    for layout in LAYOUTS {
        let (emulator, reader) = laid_out("TakenOver", layout, 1).await;
        emulator.claim(0, "pod-a", LEASE).await.unwrap();
        assert_eq!(reader.partitions(UnixMs::now()).await.unwrap()[0].owner.as_deref(), Some("pod-a"));
        emulator.claim(0, "pod-b", LEASE).await.unwrap();
        assert_eq!(
            reader.partitions(UnixMs::now()).await.unwrap()[0].owner.as_deref(),
            Some("pod-b"),
            "{layout:?}"
        );
    }
}

#[tokio::test]
async fn an_override_reads_only_its_own_layout() {
    let (hub, emulator) = common::laid_out("Override", Layout::Safe, 2).await;
    emulator.claim(1, "pod-a", LEASE).await.unwrap();
    let blob = TaskHubReader::new(&account(), hub.clone(), PartitionMode::Blob, StorageOptions::default());
    assert_eq!(blob.partitions(UnixMs::now()).await.unwrap()[1].owner.as_deref(), Some("pod-a"));
    let table = TaskHubReader::new(&account(), hub, PartitionMode::Table, StorageOptions::default());
    let err = table.partitions(UnixMs::now()).await.unwrap_err();
    assert!(matches!(err, StorageError::NoOwnershipStore { .. }), "{err}");
    assert!(!err.to_string().contains("taskhub.json"), "the table override looks only for the table: {err}");
}

#[tokio::test]
async fn a_hub_with_queues_and_no_ownership_store_says_what_was_looked_for() {
    let name = hub("NoStore");
    let emulator = TaskHubEmulator::new(&account(), name.clone(), Layout::Table);
    emulator.create_queues(3).await.unwrap();
    let reader = TaskHubReader::new(&account(), name.clone(), PartitionMode::Auto, StorageOptions::default());
    let err = reader.partitions(UnixMs::now()).await.unwrap_err();
    assert!(
        matches!(err, StorageError::NoOwnershipStore { partition_count: 3, .. }),
        "P comes from the control queues found: {err:?}"
    );
    let message = err.to_string();
    let container = name.lease_container();
    for looked_for in [
        format!("table {}", name.partitions_table()),
        format!("{container}/taskhub.json"),
        format!("{container}/ownership/"),
        format!("{container}/default/"),
    ] {
        assert!(message.contains(&looked_for), "{looked_for} missing from: {message}");
    }
    assert_eq!((err.kind(), reader.layout()), (StorageErrorKind::NoOwnershipStore, None));
}

#[tokio::test]
async fn a_hub_upgraded_to_the_table_is_read_from_the_table_after_the_next_detection() {
    let (hub, safe) = common::laid_out("Upgrade", Layout::Safe, 2).await;
    safe.claim(0, "pod-old", LEASE).await.unwrap();
    let reader = TaskHubReader::new(&account(), hub.clone(), PartitionMode::Auto, StorageOptions::default());
    let now = UnixMs::now();
    assert_eq!(reader.partitions(now).await.unwrap()[0].owner.as_deref(), Some("pod-old"));

    // The app moves to Durable Functions 3.x: its workers create and use the table.
    let table = TaskHubEmulator::new(&account(), hub, Layout::Table);
    table.create(2).await.unwrap();
    table.claim(0, "pod-new", LEASE).await.unwrap();
    assert_eq!(reader.partitions(now.plus_ms(1_000)).await.unwrap()[0].owner.as_deref(), Some("pod-old"));
    assert_eq!(reader.layout(), Some(Layout::Safe), "trusted until the re-check");
    let recheck = now.plus(REDETECT_INTERVAL).plus_ms(1);
    assert_eq!(reader.partitions(recheck).await.unwrap()[0].owner.as_deref(), Some("pod-new"));
    assert_eq!(reader.layout(), Some(Layout::Table));
}

#[tokio::test]
async fn an_expired_table_lease_is_not_owned() {
    let (emulator, reader) = laid_out("TableExpired", Layout::Table, 2).await;
    let an_hour_ago = time::OffsetDateTime::now_utc() - Duration::from_secs(3600);
    emulator.write_partition_row(0, Some("pod-gone"), Some(an_hour_ago), false).await.unwrap();
    emulator.claim(1, "pod-a", LEASE).await.unwrap();

    let leases = reader.partitions(UnixMs::now()).await.unwrap();
    assert_eq!(leases[0].owner, None);
    assert_eq!(leases[1].owner.as_deref(), Some("pod-a"));
    // The same lease seen from a clock past its expiry is not owned either.
    let later = UnixMs(leases[1].expires_at_unix_ms.unwrap() + 1);
    assert_eq!(reader.partitions(later).await.unwrap()[1].owner, None);
}

#[tokio::test]
async fn a_draining_partition_is_reported_as_draining() {
    let (emulator, reader) = laid_out("TableDraining", Layout::Table, 1).await;
    let soon = time::OffsetDateTime::now_utc() + LEASE;
    emulator.write_partition_row(0, Some("pod-a"), Some(soon), true).await.unwrap();
    let lease = &reader.partitions(UnixMs::now()).await.unwrap()[0];
    assert!(lease.draining);
    assert_eq!(lease.owner.as_deref(), Some("pod-a"));
}

#[tokio::test]
async fn a_queue_counts_timers_and_messages_in_progress_but_only_visible_ones_are_peeked() {
    let (emulator, reader) = laid_out("QueueSignals", Layout::Table, 1).await;
    let control = QueueRef::Control(0);
    for text in ["visible-1", "visible-2", "in-progress"] {
        emulator.enqueue(control, text, Duration::ZERO).await.unwrap();
    }
    emulator.enqueue(control, "timer", TIMER).await.unwrap();
    // A worker takes the first message and works on it (invisible for a while).
    let taken = emulator.dequeue(control, 1, Duration::from_secs(600)).await.unwrap();
    assert_eq!(taken.len(), 1);

    let signals = reader.read_queue(control, UnixMs::now()).await.unwrap();
    assert_eq!(signals.approximate_count, 4);
    assert_eq!(signals.visible_count, 2);

    emulator.delete(&taken[0]).await.unwrap();
    assert_eq!(reader.read_queue(control, UnixMs::now()).await.unwrap().approximate_count, 3);
}

#[tokio::test]
async fn the_age_is_that_of_the_first_visible_message_at_the_given_clock() {
    let (emulator, reader) = laid_out("QueueAge", Layout::Table, 1).await;
    emulator.enqueue(QueueRef::WorkItem, "activity", Duration::ZERO).await.unwrap();
    let ten_seconds_on = UnixMs::now().plus(Duration::from_secs(10));
    let signals = reader.read_queue(QueueRef::WorkItem, ten_seconds_on).await.unwrap();
    // Azurite keeps insertion times to the second.
    assert!((9_000..=13_000).contains(&signals.first_visible_age_ms), "{signals:?}");
    assert_eq!(signals.sampled_at, ten_seconds_on);
}

#[tokio::test]
async fn a_queue_holding_only_timers_has_no_visible_message_and_no_age() {
    let (emulator, reader) = laid_out("QueueTimers", Layout::Table, 1).await;
    emulator.enqueue(QueueRef::Control(0), "timer-1", TIMER).await.unwrap();
    emulator.enqueue(QueueRef::Control(0), "timer-2", TIMER).await.unwrap();
    let signals = reader.read_queue(QueueRef::Control(0), UnixMs::now()).await.unwrap();
    assert_eq!((signals.approximate_count, signals.visible_count, signals.first_visible_age_ms), (2, 0, 0));
}

#[tokio::test]
async fn a_hub_that_does_not_exist_is_not_provisioned() {
    let account = account();
    for mode in [PartitionMode::Auto, PartitionMode::Table, PartitionMode::Blob] {
        let reader = TaskHubReader::new(&account, hub("NeverStarted"), mode, StorageOptions::default());
        let err = reader.partitions(UnixMs::now()).await.unwrap_err();
        assert!(matches!(err, StorageError::NotProvisioned { .. }), "{mode:?}: {err}");
        assert!(err.to_string().contains("task hub not provisioned"), "{err}");
    }
    let reader =
        TaskHubReader::new(&account, hub("NeverStarted"), PartitionMode::Table, StorageOptions::default());
    let err = reader.read_queue(QueueRef::Control(0), UnixMs::now()).await.unwrap_err();
    assert!(
        matches!(err, StorageError::NotProvisioned { ref resource } if resource.contains("-control-00")),
        "{err}"
    );
}

#[tokio::test]
async fn a_wrong_key_is_an_authentication_error_that_says_so() {
    let (_, _) = laid_out("WrongKey", Layout::Table, 1).await;
    let azurite = Azurite::shared();
    let wrong = azurite
        .connection_string()
        .replace(durable_scaler::azurite::ACCOUNT_KEY, "d3Jvbmcga2V5IHdyb25nIGtleQ==");
    let account = StorageAccount::from_connection_string(&wrong).unwrap();
    let reader =
        TaskHubReader::new(&account, hub("WrongKey"), PartitionMode::Table, StorageOptions::default());
    for err in [
        reader.partitions(UnixMs::now()).await.unwrap_err(),
        reader.read_queue(QueueRef::WorkItem, UnixMs::now()).await.unwrap_err(),
    ] {
        assert!(matches!(err, StorageError::Authentication { status: 403, .. }), "{err}");
        assert!(err.to_string().contains("refused the credentials"), "{err}");
    }
}

#[tokio::test]
async fn storage_that_does_not_listen_is_unreachable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cs = format!(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={};BlobEndpoint=http://127.0.0.1:{port}/devstoreaccount1;QueueEndpoint=http://127.0.0.1:{port}/devstoreaccount1;TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1",
        durable_scaler::azurite::ACCOUNT_KEY
    );
    let account = StorageAccount::from_connection_string(&cs).unwrap();
    let options = StorageOptions { attempt_timeout: Duration::from_secs(2), max_retries: 1 };
    let reader = TaskHubReader::new(&account, hub("Nowhere"), PartitionMode::Table, options);
    let err = reader.partitions(UnixMs::now()).await.unwrap_err();
    assert!(matches!(err, StorageError::Unreachable { .. }), "{err}");
    // One attempt and one retry: transient failures are retried.
    assert_eq!(account.request_count(), 2);
}

#[tokio::test]
async fn a_queue_read_costs_two_calls() {
    let (_, reader) = laid_out("CallCount", Layout::Table, 4).await;
    let before = reader.account().request_count();
    reader.read_queue(QueueRef::Control(3), UnixMs::now()).await.unwrap();
    assert_eq!(reader.account().request_count() - before, 2);
}

#[tokio::test]
async fn once_detected_ownership_costs_one_call_per_read_in_every_layout() {
    // Detection: table query; + taskhub.json and the ownership/ listing (safe); + the
    // default/ listing (legacy); + one download per leased blob (two partitions held).
    for (layout, detection) in [(Layout::Table, 1), (Layout::Safe, 5), (Layout::Legacy, 6)] {
        let (emulator, reader) = laid_out("Calls", layout, 4).await;
        emulator.claim(0, "pod-a", LEASE).await.unwrap();
        emulator.claim(1, "pod-b", LEASE).await.unwrap();
        let calls = || reader.account().request_count();
        let before = calls();
        reader.partitions(UnixMs::now()).await.unwrap();
        assert_eq!(calls() - before, detection, "{layout:?}: detection");
        let before = calls();
        reader.partitions(UnixMs::now()).await.unwrap();
        assert_eq!(calls() - before, 1, "{layout:?}: steady state");
    }
}

/// An account SAS (service version 2019-12-12) for Blob, Queue and Table, signed with
/// Azurite's key, as the portal's "Shared access signature" blade makes one.
fn account_sas() -> String {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use hmac::{Hmac, Mac};
    let expiry = (time::OffsetDateTime::now_utc() + Duration::from_secs(3600))
        .format(&time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z"))
        .unwrap();
    let (permissions, services, resource_types, version) = ("rl", "bqt", "sco", "2019-12-12");
    let to_sign = format!(
        "{}\n{permissions}\n{services}\n{resource_types}\n\n{expiry}\n\nhttps,http\n{version}\n",
        durable_scaler::azurite::ACCOUNT
    );
    let key = STANDARD.decode(durable_scaler::azurite::ACCOUNT_KEY).unwrap();
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(to_sign.as_bytes());
    let signature = STANDARD.encode(mac.finalize().into_bytes());
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("sv", version)
        .append_pair("ss", services)
        .append_pair("srt", resource_types)
        .append_pair("sp", permissions)
        .append_pair("se", &expiry)
        .append_pair("spr", "https,http")
        .append_pair("sig", &signature)
        .finish()
}

#[tokio::test]
async fn a_shared_access_signature_reads_queues_and_the_partitions_table() {
    let (emulator, _) = laid_out("SasReader", Layout::Table, 2).await;
    emulator.claim(1, "pod-a", LEASE).await.unwrap();
    emulator.enqueue(QueueRef::Control(1), "start", Duration::ZERO).await.unwrap();
    let azurite = Azurite::shared();
    let cs = format!(
        "BlobEndpoint={};QueueEndpoint={};TableEndpoint={};SharedAccessSignature={}",
        azurite.blob_endpoint,
        azurite.queue_endpoint,
        azurite.table_endpoint,
        account_sas()
    );
    let account = StorageAccount::from_connection_string(&cs).unwrap();
    let reader =
        TaskHubReader::new(&account, emulator.hub().clone(), PartitionMode::Auto, StorageOptions::default());
    let leases = reader.partitions(UnixMs::now()).await.unwrap();
    assert_eq!(leases[1].owner.as_deref(), Some("pod-a"));
    assert_eq!(reader.read_queue(QueueRef::Control(1), UnixMs::now()).await.unwrap().visible_count, 1);
}

#[tokio::test]
async fn laying_a_hub_out_again_keeps_what_is_there() {
    for layout in LAYOUTS {
        let (emulator, reader) = laid_out("LayoutTwice", layout, 2).await;
        emulator.enqueue(QueueRef::Control(1), "start", Duration::ZERO).await.unwrap();
        emulator.create(2).await.expect("a second layout succeeds");
        assert_eq!(
            reader.read_queue(QueueRef::Control(1), UnixMs::now()).await.unwrap().approximate_count,
            1
        );
        assert_eq!(reader.partitions(UnixMs::now()).await.unwrap().len(), 2);
    }
}

// ---------------------------------------------------------------------------------------------
// HTTPS, as Azure Storage always serves (in a child process: the trust store comes from the
// environment, which one test must not change for the others)
// ---------------------------------------------------------------------------------------------

/// Set in the child process: the connection string of the HTTPS Azurite to read.
const HTTPS_CHILD_ENV: &str = "DURABLE_SCALER_TEST_HTTPS_STORAGE";

/// Runs the test below in a child of this test binary against `connection`, trusting the
/// CA certificates in `trust` (SSL_CERT_FILE, which the Azure SDK's rustls verifier reads on
/// Linux, as it reads the system store in a container); returns success and the output.
fn run_https_child(connection: &str, trust: &std::path::Path) -> (bool, String) {
    let empty = tempfile::tempdir().unwrap();
    let name = "tables_and_queues_are_read_over_https_with_a_trusted_certificate_only";
    let run = crate::child::run_test(module_path!(), name, |command| {
        command
            .env(HTTPS_CHILD_ENV, connection)
            .env("SSL_CERT_FILE", trust)
            .env("SSL_CERT_DIR", empty.path());
    });
    (run.passed, run.output)
}

#[tokio::test]
async fn tables_and_queues_are_read_over_https_with_a_trusted_certificate_only() {
    if let Ok(connection) = std::env::var(HTTPS_CHILD_ENV) {
        // The child: lay a hub out and read it, every call over TLS.
        let account = StorageAccount::from_connection_string(&connection).unwrap();
        let name = hub("Https");
        let emulator = TaskHubEmulator::new(&account, name.clone(), Layout::Table);
        emulator.create(2).await.expect("the hub is laid out over https");
        emulator.claim(1, "pod-a", LEASE).await.unwrap();
        emulator.enqueue(QueueRef::Control(1), "start", Duration::ZERO).await.unwrap();
        let reader = TaskHubReader::new(&account, name, PartitionMode::Auto, StorageOptions::default());
        let leases = reader.partitions(UnixMs::now()).await.unwrap();
        assert_eq!(leases[1].owner.as_deref(), Some("pod-a"));
        assert_eq!(reader.read_queue(QueueRef::Control(1), UnixMs::now()).await.unwrap().visible_count, 1);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let write_ca = |name: &str| {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let issuer =
            rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap()).unwrap();
        let path = dir.path().join(format!("{name}.crt"));
        std::fs::write(&path, issuer.pem()).unwrap();
        (issuer, path)
    };
    let (ca, ca_file) = write_ca("storage-ca");
    let (_, stranger_file) = write_ca("stranger-ca");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
    let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_file, cert.pem()).unwrap();
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    let azurite = Azurite::start_https(&cert_file, &key_file).expect("Azurite serves https");
    let connection = azurite.connection_string();
    assert!(connection.contains("QueueEndpoint=https://127.0.0.1:"), "{connection}");

    let (read, output) = run_https_child(&connection, &ca_file);
    assert!(read, "trusting the storage CA, the child reads over https:\n{output}");
    let (read, output) = run_https_child(&connection, &stranger_file);
    assert!(!read, "trusting another CA, the child must not read:\n{output}");
    assert!(output.contains("invalid peer certificate: UnknownIssuer"), "{output}");
    azurite.stop();
}

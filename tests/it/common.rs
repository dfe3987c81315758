//! Helpers shared by the storage and sidecar integration tests.
#![allow(dead_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use durable_scaler::{
    azurite::Azurite,
    emulator::TaskHubEmulator,
    storage::{Layout, StorageAccount, TaskHub},
};

/// The shared Azurite's account (making it installs the TLS crypto provider).
pub fn account() -> StorageAccount {
    StorageAccount::from_connection_string(&Azurite::shared().connection_string())
        .expect("Azurite's connection string")
}

/// A hub name unique to this test and this run (Azurite may outlive one run).
pub fn hub(name: &str) -> TaskHub {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    TaskHub::parse(&format!("{name}{nanos}")).unwrap()
}

/// Wall-clock now, ms since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

/// The three ownership layouts DurableTask writes; every test that depends on ownership
/// runs on each.
pub const LAYOUTS: [Layout; 3] = [Layout::Table, Layout::Safe, Layout::Legacy];

/// A new hub with `partitions` partitions, laid out in the shared Azurite as DurableTask's
/// partition manager of `layout` does, all unowned and empty.
pub async fn laid_out(name: &str, layout: Layout, partitions: u32) -> (TaskHub, TaskHubEmulator) {
    let hub = hub(&format!("{name}{}", layout.as_str()));
    let emulator = TaskHubEmulator::new(&account(), hub.clone(), layout);
    emulator.create(partitions).await.expect("create the hub");
    (hub, emulator)
}

//! A TCP forwarder the tests put between a process and something it talks to (Azurite, the
//! aggregator's report port) and take down and bring back on the same port: while down, new
//! connections are refused and the open ones are cut, as when a network path goes away; while
//! stalled, every connection, open or new, is held and never answered, as a storage account
//! too busy to answer within a request's timeout.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use durable_scaler::azurite::{ACCOUNT, ACCOUNT_KEY, Azurite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How long [`Forwarder::up`] tries to rebind its port.
const REBIND_DEADLINE: Duration = Duration::from_secs(60);

/// A loopback TCP forwarder to one upstream address.
pub struct Forwarder {
    /// Where clients connect.
    pub addr: SocketAddr,
    upstream: SocketAddr,
    /// The accept loop; it owns every forwarded connection, so aborting it cuts them all.
    task: Mutex<Option<JoinHandle<()>>>,
    /// True while stalled.
    stalled: tokio::sync::watch::Sender<bool>,
}

impl Forwarder {
    /// Forwards a new loopback port to `upstream`.
    pub async fn to(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stalled = tokio::sync::watch::Sender::new(false);
        let task = tokio::spawn(Self::forward(listener, upstream, stalled.subscribe()));
        Self { addr, upstream, task: Mutex::new(Some(task)), stalled }
    }

    /// Forwards a new loopback port to the host and port of `url`.
    pub async fn to_url(url: &str) -> Self {
        Self::to(url::Url::parse(url).unwrap().socket_addrs(|| None).unwrap()[0]).await
    }

    async fn forward(
        listener: TcpListener,
        upstream: SocketAddr,
        stalled: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut client, _)) = listener.accept().await {
            let mut stalled = stalled.clone();
            connections.spawn(async move {
                let forwarding = async {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                };
                tokio::select! {
                    () = forwarding => return,
                    _ = stalled.wait_for(|s| *s) => {}
                }
                // Stalled: the client's connection stays open, unanswered, until the
                // forwarder goes down.
                std::future::pending::<()>().await;
            });
        }
    }

    /// Stalls the path (module docs); [`Forwarder::down`], then [`Forwarder::up`], end it.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Takes the path down: the port refuses connections and the open ones are cut.
    pub fn down(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Brings the path back on the same port.
    pub async fn up(&self) {
        let deadline = Instant::now() + REBIND_DEADLINE;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot rebind {}: {e}", self.addr),
            }
        };
        self.stalled.send_replace(false);
        *self.task.lock().unwrap() =
            Some(tokio::spawn(Self::forward(listener, self.upstream, self.stalled.subscribe())));
    }

    /// This forwarder as an Azurite service endpoint (path-style: the account in the path).
    pub fn azurite_endpoint(&self) -> String {
        format!("http://{}/{ACCOUNT}", self.addr)
    }
}

/// The shared Azurite's blob, queue and table services, each behind a forwarder, and a
/// connection string that reaches them only through those.
pub struct ForwardedStorage {
    /// Blob, queue and table forwarders.
    pub services: [Forwarder; 3],
    /// A connection string through the forwarders.
    pub connection: String,
}

impl ForwardedStorage {
    /// Forwarders to the shared Azurite's services.
    pub async fn new() -> Self {
        let azurite = Azurite::shared();
        let services = [
            Forwarder::to_url(&azurite.blob_endpoint).await,
            Forwarder::to_url(&azurite.queue_endpoint).await,
            Forwarder::to_url(&azurite.table_endpoint).await,
        ];
        let connection = format!(
            "DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};BlobEndpoint={};QueueEndpoint={};TableEndpoint={}",
            services[0].azurite_endpoint(),
            services[1].azurite_endpoint(),
            services[2].azurite_endpoint()
        );
        Self { services, connection }
    }

    /// Storage out of reach: every service refuses connections and the open ones are cut.
    pub fn down(&self) {
        self.services.iter().for_each(Forwarder::down);
    }

    /// Storage too busy to answer: every connection to it, open or new, is never answered.
    pub fn stall(&self) {
        self.services.iter().for_each(Forwarder::stall);
    }

    /// Storage back on the same ports, after [`ForwardedStorage::down`] (which also ends a
    /// stall, cutting the connections it held).
    pub async fn up(&self) {
        for service in &self.services {
            service.up().await;
        }
    }
}

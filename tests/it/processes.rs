//! Child processes of the real binary for the tests that run it (`faults`, `in_flight`): one
//! process with its output in a log file, and an aggregator on fixed loopback ports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a child may take to listen.
const DEADLINE: Duration = Duration::from_secs(40);

/// A free loopback port (a tiny race remains until the child binds it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One child process of the real binary, its output in a log file shown on failure.
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, args: &[String], envs: &[(&str, String)], dir: &tempfile::TempDir) -> Self {
        let log = dir.path().join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_durable-scaler"));
        command
            .args(args)
            .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
            // No Kubernetes configuration: --report-auth none, live pods as worker count.
            .env("KUBECONFIG", dir.path().join("no-kubeconfig"))
            .env("HOME", dir.path())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        durable_scaler::shutdown::kill_child_with_parent(&mut command);
        Self { child: command.spawn().unwrap(), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident memory, KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// Fails when resident memory grew by `slack_kib` or more since `before_kib`.
    pub fn assert_rss_grew_less_than(&self, before_kib: u64, slack_kib: u64) {
        let after = self.rss_kib();
        assert!(after < before_kib + slack_kib, "RSS grew from {before_kib} to {after} KiB");
    }

    /// Open file descriptors (sockets, connections) of the process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map(|d| d.count()).unwrap_or(0)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// An aggregator process on fixed loopback ports (so a restart comes back on the same ones).
pub struct AggregatorPorts {
    pub grpc: SocketAddr,
    pub report: SocketAddr,
    pub http: SocketAddr,
}

impl AggregatorPorts {
    pub fn new() -> Self {
        let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Self { grpc: at(free_port()), report: at(free_port()), http: at(free_port()) }
    }

    /// Starts `durable-scaler aggregator` on these ports with the tests' fast intervals.
    pub async fn start(&self, name: &str, dir: &tempfile::TempDir) -> Process {
        self.start_with(name, dir, &[]).await
    }

    /// Like [`AggregatorPorts::start`], each `(flag, value)` of `overrides` in place of the
    /// default one.
    pub async fn start_with(
        &self,
        name: &str,
        dir: &tempfile::TempDir,
        overrides: &[(&str, &str)],
    ) -> Process {
        let mut args: Vec<String> = [
            "aggregator",
            "--grpc-addr",
            &self.grpc.to_string(),
            "--report-addr",
            &self.report.to_string(),
            "--http-addr",
            &self.http.to_string(),
            "--report-auth",
            "none",
            "--probe-interval",
            "300ms",
            "--sample-interval",
            "300ms",
            "--work-grace",
            "60s",
            "--ready-after",
            "0s",
            // Azurite serves plain http (the default install probes https endpoints only).
            "--allow-http-storage",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (flag, value) in overrides {
            match args.iter().position(|a| a == flag) {
                Some(i) => args[i + 1] = value.to_string(),
                None => args.extend([flag.to_string(), value.to_string()]),
            }
        }
        let process = Process::spawn(name, &args, &[], dir);
        let deadline = Instant::now() + DEADLINE;
        while tokio::net::TcpStream::connect(self.grpc).await.is_err() {
            assert!(Instant::now() < deadline, "{name} did not listen:\n{}", process.output());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        process
    }
}

//! The `durable-scaler` command line: one binary, one subcommand per role, and the one
//! start-up path (telemetry, runtime, exit status) every role runs through.

use std::future::Future;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

/// Autoscale Azure Durable Functions apps (Azure Storage backend) on Kubernetes through KEDA.
///
/// One binary serves every role: the admission webhook that injects the sidecar, the sidecar
/// that reads its pod's queues, and the aggregator that KEDA asks. Every flag can also be set
/// from the environment variable named in its help.
#[derive(Debug, Parser)]
#[command(name = "durable-scaler", version, about, long_about)]
pub struct Cli {
    /// The role to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The roles and tools.
// Parsed once at start: the size of a role's settings does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Read one JSON case on stdin, print what the heuristic would decide and why.
    ///
    /// Input: {"algorithm": "durable"|"target"|"latency", "workers": N, "partitions": P,
    /// "max_polling_interval_ms": 30000, "max_activities_per_worker" and
    /// "max_orchestrations_per_worker" (10 x "processor_count", itself 1 when not given), then
    /// either "work_item": {"latencies_ms": [...], "length": N} and "control":
    /// [{"latencies_ms": [...], "length": N}, ...] (latency, target), or "samples": [{"at_ms":
    /// T, "work_item": R, "control": [R, ...]}, ...] with R = {"approximate_count",
    /// "visible_count", "first_visible_age_ms", "redelivered_count"} (every algorithm; durable
    /// needs them), replayed through the aggregator's engine; "work_grace_ms": 300000,
    /// "worker_startup_ms": 20000}. Output: {"action", "keep_workers_alive",
    /// "desired_workers", "reason", "metric_value"}. Exit status 2 on malformed input.
    Recommend,
    /// Run next to a Durable Functions app: report the queues of the partitions this pod
    /// owns to the aggregator (configured by DURABLE_SCALER_* and POD_* variables).
    Sidecar(crate::sidecar::Args),
    /// Run the whole real path on this machine: Azurite, the aggregator, sidecars and worker
    /// pods, with KEDA and the HPA played against the aggregator; scales 0 -> N -> 0 twice and
    /// ends with a chart and a summary in --out-dir.
    Demo(crate::demo::Args),
    /// Merge sidecar reports per task hub, probe what they miss, and serve KEDA's external
    /// scaler API (KEDA port), the sidecars' report API (report port) and /healthz, /readyz,
    /// /metrics (HTTP port).
    Aggregator(crate::app::AggregatorArgs),
    // The subcommand's help is `simulate::Args`' own doc comment; boxed because its many
    // knobs would make every other variant as large.
    #[allow(
        missing_docs,
        reason = "a doc comment here would replace the help clap takes from simulate::Args"
    )]
    Simulate(Box<crate::simulate::Args>),
    /// Serve the mutating admission webhook that injects the sidecar (HTTPS, `POST /mutate`).
    Webhook(crate::webhook::Args),
    /// Show every task hub as each aggregator replica sees it (workers -> desired, active,
    /// reason, partitions covered, limits, notes), read through the Kubernetes API server's
    /// pod proxy with your kubeconfig. Also `kubectl durable-scaler status` when this binary
    /// is on PATH as `kubectl-durable_scaler`.
    Status(crate::status::Args),
    /// Read a Functions app's Deployment or StatefulSet manifest (a file or stdin) and print
    /// the KEDA ScaledObject (and TriggerAuthentication for the TLS install) that scales it
    /// with durable-scaler, and the patch that opts its pod template in; the task hub and the
    /// connection variable are found as the webhook finds them. Exit status 2 when the app
    /// cannot be scaled this way (the message says why).
    #[command(name = "scaledobject")]
    ScaledObject(crate::scaledobject::Args),
}

/// The Tokio runtime a role runs on.
#[derive(Debug, Clone, Copy)]
enum Runtime {
    /// One thread: the sidecar, which every pod of an app carries, so memory matters more
    /// than parallelism.
    CurrentThread,
    /// A worker per core: the servers and the demo.
    MultiThread,
}

/// The file name under which kubectl runs this binary as a plugin: `kubectl durable-scaler
/// status` looks for `kubectl-durable_scaler` on PATH, a dash in the command being an
/// underscore in the file name, and passes it the rest of the command line (kubectl's plugin
/// handler, staging/src/k8s.io/kubectl/pkg/cmd/cmd.go `HandlePluginCommand`). A symlink of that
/// name to `durable-scaler` is the whole installation.
pub const KUBECTL_PLUGIN: &str = "kubectl-durable_scaler";

/// The command line, with usage and errors naming `kubectl durable-scaler` when run as the
/// kubectl plugin.
fn parse() -> Cli {
    let invoked_as = std::env::args_os().next();
    let plugin = invoked_as
        .as_deref()
        .and_then(|path| std::path::Path::new(path).file_name())
        .is_some_and(|name| name == KUBECTL_PLUGIN);
    if !plugin {
        return Cli::parse();
    }
    let matches =
        Cli::command().name("kubectl durable-scaler").bin_name("kubectl durable-scaler").get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Parses the command line and runs the chosen role.
pub fn run() -> ExitCode {
    let cli = parse();
    match cli.command {
        Command::Recommend => crate::recommend::run(),
        Command::Simulate(args) => crate::simulate::run(&args),
        Command::Sidecar(args) => start("sidecar", Runtime::CurrentThread, crate::sidecar::run(args)),
        Command::Demo(args) => start("demo", Runtime::MultiThread, crate::demo::run_cli(args)),
        Command::Aggregator(args) => start("aggregator", Runtime::MultiThread, crate::app::aggregator(args)),
        Command::Webhook(args) => start("webhook", Runtime::MultiThread, crate::webhook::run(args)),
        Command::Status(args) => crate::status::main(args),
        Command::ScaledObject(args) => crate::scaledobject::run(&args),
    }
}

/// Starts telemetry and the TLS crypto provider, then runs `role` to its exit status on a
/// fresh runtime; exit status 1 when the runtime cannot start.
fn start(role: &str, runtime: Runtime, role_main: impl Future<Output = ExitCode>) -> ExitCode {
    crate::telemetry::init();
    crate::telemetry::install_crypto_provider();
    // Room for the listeners' connection limits, which are a share of it.
    let descriptors = crate::listener::raise_descriptor_limit();
    tracing::debug!(descriptors, "open file limit");
    let built = match runtime {
        Runtime::CurrentThread => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Runtime::MultiThread => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
    };
    match built {
        Ok(runtime) => runtime.block_on(role_main),
        Err(e) => {
            eprintln!("durable-scaler {role}: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

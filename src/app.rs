//! The composition root: the one place that knows every room. It plugs the Kubernetes
//! implementations (`crate::kubernetes`) into the traits the aggregator defines
//! (`crate::aggregator::sources`), so neither role module names the other.

use std::process::ExitCode;
use std::sync::Arc;

use crate::aggregator::sources::{LiveReportingPods, PodDeletionCosts, RecommendationRecorder};
use crate::aggregator::{self, Aggregator, ChangeHook, ReportAuth, ReportCheck};
use crate::contract::env;
use crate::kubernetes::{KubeArgs, KubeContext};
use crate::shutdown::Shutdown;

/// `durable-scaler aggregator`: the aggregator's own flags and its Kubernetes side's.
#[derive(Debug, Clone, clap::Args)]
pub struct AggregatorArgs {
    /// The aggregator's ports, TLS, intervals and report authentication.
    #[command(flatten)]
    pub aggregator: aggregator::Args,
    /// The Kubernetes side: worker counts, report tokens, Events.
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// Runs the aggregator until SIGTERM, with its Kubernetes side when a Kubernetes
/// configuration is found. Exit status 2 on a configuration error.
pub(crate) async fn aggregator(mut args: AggregatorArgs) -> ExitCode {
    let shutdown = Shutdown::on_signal();
    // Read once, here: Kubernetes sets HOSTNAME to the pod's name when POD_NAME is not given.
    if args.kube.pod_name.is_none() {
        args.kube.pod_name = std::env::var(env::HOSTNAME).ok().filter(|name| !name.is_empty());
    }
    let kube = KubeContext::try_default(args.kube.clone()).await;
    let aggregator = match with_kubernetes(args.aggregator, kube) {
        Ok(aggregator) => aggregator,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    aggregator::run(aggregator, shutdown).await
}

/// The start-up rule for report authentication: token checking needs a Kubernetes
/// configuration, so asking for it (the default) without one fails with a message that
/// names the flag to pass instead.
fn check_report_auth(requested: ReportAuth, kube_available: bool) -> Result<ReportAuth, String> {
    match (requested, kube_available) {
        (ReportAuth::Tokenreview, false) => {
            Err("DURABLE_SCALER_REPORT_AUTH / --report-auth tokenreview needs \
             the Kubernetes API, but no Kubernetes configuration was found (no KUBECONFIG, no \
             ~/.kube/config, not running in a pod with a service account); run inside the cluster, \
             point KUBECONFIG at one, or pass `--report-auth none` to accept unauthenticated reports"
                .to_owned())
        }
        (mode, _) => Ok(mode),
    }
}

/// The aggregator with the Kubernetes sources when `kube` is there: worker counts from the
/// scale targets, TokenReview for reports (`--report-auth tokenreview`), Events on
/// recommendation changes, and the pod-deletion-cost writer unless `--pod-deletion-cost=false`.
/// Without it: the live reporting pods, no deletion costs, and `--report-auth none` is
/// required.
fn with_kubernetes(args: aggregator::Args, kube: Option<KubeContext>) -> Result<Aggregator, String> {
    let mode = check_report_auth(args.report_auth, kube.is_some())?;
    let Some(kube) = kube else {
        if args.pod_deletion_cost {
            tracing::info!("no Kubernetes configuration: no pod-deletion-cost is kept on the pods");
        }
        return Ok(Aggregator::new(args, ReportCheck::AcceptAny, Arc::new(LiveReportingPods)));
    };
    let deletion_costs = args.pod_deletion_cost.then(|| kube.pod_deletion_costs());
    let workers = Arc::new(kube.worker_count());
    let events = Arc::new(kube.event_recorder());
    let authenticator = (mode == ReportAuth::Tokenreview).then(|| Arc::new(kube.authenticator()));
    let check = match &authenticator {
        Some(a) => ReportCheck::Token(a.clone()),
        None => ReportCheck::AcceptAny,
    };
    let mut aggregator = Aggregator::new(args, check, workers.clone());
    let registry = aggregator.metrics_registry();
    workers.register(registry);
    events.register(registry);
    if let Some(a) = &authenticator {
        a.register(registry);
    }
    if let Some(writer) = &deletion_costs {
        writer.register(registry);
    }
    let recorder: Arc<dyn RecommendationRecorder> = events;
    let hook: ChangeHook =
        Arc::new(move |scaled_object, change| recorder.recommendation_changed(scaled_object, change));
    let aggregator = aggregator.on_recommendation_change(hook);
    // The sampling loop hands each hub's live pods and their costs to the writer.
    Ok(match deletion_costs {
        Some(writer) => aggregator.keep_deletion_costs(Arc::new(writer) as Arc<dyn PodDeletionCosts>),
        None => aggregator,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenreview_without_a_kubernetes_config_fails_naming_the_flag_to_pass() {
        let error = check_report_auth(ReportAuth::Tokenreview, false).unwrap_err();
        assert!(error.contains("--report-auth none"), "{error}");
    }

    #[test]
    fn tokenreview_with_a_kubernetes_config_is_kept() {
        assert_eq!(check_report_auth(ReportAuth::Tokenreview, true), Ok(ReportAuth::Tokenreview));
    }

    #[test]
    fn report_auth_none_needs_no_kubernetes_config() {
        assert_eq!(check_report_auth(ReportAuth::None, false), Ok(ReportAuth::None));
        assert_eq!(check_report_auth(ReportAuth::None, true), Ok(ReportAuth::None));
    }

    #[test]
    fn pod_deletion_cost_is_on_by_default_and_false_turns_it_off() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: AggregatorArgs,
        }
        assert!(Cli::try_parse_from(["aggregator"]).unwrap().args.aggregator.pod_deletion_cost);
        let off = Cli::try_parse_from(["aggregator", "--pod-deletion-cost=false"]).unwrap();
        assert!(!off.args.aggregator.pod_deletion_cost);
        assert!(aggregator::Args::loopback().pod_deletion_cost, "loopback() keeps every default");
    }

    #[test]
    fn without_kubernetes_the_aggregator_needs_report_auth_none() {
        let args = aggregator::Args { report_auth: ReportAuth::Tokenreview, ..aggregator::Args::loopback() };
        assert!(with_kubernetes(args, None).is_err());
        assert!(with_kubernetes(aggregator::Args::loopback(), None).is_ok());
    }
}

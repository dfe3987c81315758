//! The cluster side: the TLS Secret (`create`), the MutatingWebhookConfiguration's
//! `caBundle` (`patch`), and both in the order that keeps the webhook trusted
//! ([`reconcile`], what `certs-gen run` does on every round), through the real `kube` client.
//!
//! All are safe to run again and from several pods at once: `create` writes only when the
//! Secret is missing or no longer good, using the API server's optimistic concurrency (create
//! fails with 409 when another pod won; replace fails with 409 on a stale `resourceVersion`)
//! and re-reads after losing; `patch` writes only when a `caBundle` differs.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    ByteString, api::admissionregistration::v1::MutatingWebhookConfiguration, api::core::v1::Secret,
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use time::OffsetDateTime;

use crate::pki::{self, Material};

/// Why the cluster could not be brought to the wanted state.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// An API call failed.
    #[error("{action}: {source}")]
    Api {
        /// What was being done, naming the object.
        action: String,
        /// The client's error (the API server's status when it answered).
        source: kube::Error,
    },
    /// Material could not be generated.
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    /// The Secret `patch` reads has no usable `ca.crt`.
    #[error("Secret {namespace}/{name} has no ca.crt; run `certs-gen create` first")]
    NoCa {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
    },
    /// Other pods kept changing the Secret under us.
    #[error("Secret {namespace}/{name} kept changing while being written; giving up")]
    Contended {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
    },
}

/// What `create` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No Secret existed; one was created.
    Created,
    /// The Secret existed but was not good until the renewal horizon; it was replaced.
    Renewed {
        /// Why the old material was not kept.
        reason: String,
    },
    /// The Secret is good until the renewal horizon; nothing was written.
    Unchanged,
}

/// What `create` is asked to make.
#[derive(Debug, Clone)]
pub struct SecretSpec {
    /// Namespace of the Secret and the Service.
    pub namespace: String,
    /// The Secret's name.
    pub secret: String,
    /// The webhook Service's name (the certificate's DNS names derive from it).
    pub service: String,
    /// Further names the certificate must carry.
    pub extra_names: Vec<String>,
    /// Validity of a new serving certificate.
    pub validity: Duration,
    /// Validity of a new CA (at least `validity`): serving certificates are renewed under the
    /// same CA while it is valid for a whole new certificate ([`pki::renew`]).
    pub ca_validity: Duration,
    /// Renew when the current material would be invalid this far ahead.
    pub renew_before: Duration,
}

/// Makes sure the TLS Secret exists and stays good past `now + renew_before`.
pub async fn create(client: Client, spec: &SecretSpec, now: OffsetDateTime) -> Result<Outcome, ClusterError> {
    create_trusted_by(client, spec, now, None).await
}

/// What [`reconcile`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// What happened to the Secret.
    pub secret: Outcome,
    /// How many webhooks' `caBundle` were written (0: all held the Secret's CA already).
    pub ca_bundles_patched: usize,
}

/// One round of `certs-gen run`: makes sure of the Secret as [`create`] does and, with a
/// `config`, that every webhook of that MutatingWebhookConfiguration trusts it.
///
/// The order is what lets a webhook pod that only waits for its mounted Secret be trusted as
/// soon as it serves: new material's CA bundle is written into `caBundle` *before* the Secret
/// that carries it, so the Secret never holds a CA the API server does not trust yet (during
/// a renewal the bundle holds the new CA and the previous one, so the pods still serving the
/// old certificate stay trusted too). A missing MutatingWebhookConfiguration is an error and
/// nothing is written: the webhook pods keep waiting rather than serve untrusted. After the
/// Secret, `caBundle` is set to exactly the stored `ca.crt`, which repairs a configuration
/// re-created without it and, after a lost race, replaces the loser's bundle with the winner's.
pub async fn reconcile(
    client: Client,
    spec: &SecretSpec,
    config: Option<&str>,
    now: OffsetDateTime,
) -> Result<Reconciled, ClusterError> {
    let secret = create_trusted_by(client.clone(), spec, now, config).await?;
    let ca_bundles_patched = match config {
        Some(config) => patch(client, &spec.namespace, &spec.secret, config).await?,
        None => 0,
    };
    Ok(Reconciled { secret, ca_bundles_patched })
}

/// [`create`], writing each new CA bundle into `config`'s `caBundle` before the Secret.
async fn create_trusted_by(
    client: Client,
    spec: &SecretSpec,
    now: OffsetDateTime,
    config: Option<&str>,
) -> Result<Outcome, ClusterError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &spec.namespace);
    let trust = |ca_pem: String| {
        let client = client.clone();
        async move {
            match config {
                Some(config) => {
                    write_ca_bundle(client, config, &ByteString(ca_pem.into_bytes())).await.map(drop)
                }
                None => Ok(()),
            }
        }
    };
    let mut names = pki::dns_names(&spec.service, &spec.namespace);
    names.extend(spec.extra_names.iter().cloned());
    let horizon = now + spec.renew_before;
    // A few rounds: each lost race means another pod wrote a Secret, which the next round
    // most likely finds good.
    for _ in 0..3 {
        let existing = api.get_opt(&spec.secret).await.map_err(|source| ClusterError::Api {
            action: format!("reading Secret {}/{}", spec.namespace, spec.secret),
            source,
        })?;
        let Some(existing) = existing else {
            let fresh = pki::generate_with_ca(&names, now, spec.validity, spec.ca_validity)?;
            trust(fresh.ca_pem.clone()).await?;
            match api.create(&PostParams::default(), &secret(spec, &fresh, None)).await {
                Ok(_) => return Ok(Outcome::Created),
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(source) => {
                    return Err(ClusterError::Api {
                        action: format!("creating Secret {}/{}", spec.namespace, spec.secret),
                        source,
                    });
                }
            }
        };
        let old = material(&existing);
        let reason = match &old {
            Some(old) => match pki::check(old, &names, horizon) {
                Ok(()) => return Ok(Outcome::Unchanged),
                Err(reason) => reason,
            },
            None => "the Secret lacks tls.crt, tls.key or ca.crt".to_owned(),
        };
        let renewal = pki::renew(old.as_ref(), &names, now, spec.validity, spec.ca_validity)?;
        let reason = if renewal.kept_ca { format!("{reason}; under the same CA") } else { reason };
        let fresh = renewal.material;
        trust(fresh.ca_pem.clone()).await?;
        let replacement = secret(spec, &fresh, existing.metadata.resource_version.clone());
        match api.replace(&spec.secret, &PostParams::default(), &replacement).await {
            Ok(_) => return Ok(Outcome::Renewed { reason }),
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(source) => {
                return Err(ClusterError::Api {
                    action: format!("replacing Secret {}/{}", spec.namespace, spec.secret),
                    source,
                });
            }
        }
    }
    Err(ClusterError::Contended { namespace: spec.namespace.clone(), name: spec.secret.clone() })
}

/// Writes the Secret's `ca.crt` into every webhook's `clientConfig.caBundle` of the
/// MutatingWebhookConfiguration `config`. Returns how many webhooks changed (0: nothing
/// written).
pub async fn patch(
    client: Client,
    namespace: &str,
    secret_name: &str,
    config: &str,
) -> Result<usize, ClusterError> {
    let ca = read_ca(client.clone(), namespace, secret_name).await?;
    write_ca_bundle(client, config, &ca).await
}

/// Writes `ca` into every webhook's `caBundle` of `config` that differs. Returns how many
/// changed.
async fn write_ca_bundle(client: Client, config: &str, ca: &ByteString) -> Result<usize, ClusterError> {
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client);
    let current = configs.get(config).await.map_err(|source| ClusterError::Api {
        action: format!("reading MutatingWebhookConfiguration {config}"),
        source,
    })?;
    let stale: Vec<&str> = current
        .webhooks
        .iter()
        .flatten()
        .filter(|w| w.client_config.ca_bundle.as_ref() != Some(ca))
        .map(|w| w.name.as_str())
        .collect();
    if stale.is_empty() {
        return Ok(0);
    }
    // A strategic merge patch: `webhooks` merges by `name`, so only the caBundle of each
    // named entry changes and nothing else in the object is touched.
    let encoded = serde_json::to_value(ca).unwrap_or_default();
    let webhooks: Vec<_> = stale
        .iter()
        .map(|name| serde_json::json!({"name": name, "clientConfig": {"caBundle": encoded}}))
        .collect();
    let body = serde_json::json!({"webhooks": webhooks});
    configs.patch(config, &PatchParams::default(), &Patch::Strategic(body)).await.map_err(|source| {
        ClusterError::Api { action: format!("patching MutatingWebhookConfiguration {config}"), source }
    })?;
    Ok(stale.len())
}

/// The Secret's `ca.crt` as stored now (what `patch` writes into the `caBundle`, and what an
/// init container waits to see in its mounted copy of the Secret).
pub async fn read_ca(client: Client, namespace: &str, secret_name: &str) -> Result<ByteString, ClusterError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let secret = secrets.get(secret_name).await.map_err(|source| ClusterError::Api {
        action: format!("reading Secret {namespace}/{secret_name}"),
        source,
    })?;
    secret
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt"))
        .filter(|ca| !ca.0.is_empty())
        .cloned()
        .ok_or_else(|| ClusterError::NoCa { namespace: namespace.to_owned(), name: secret_name.to_owned() })
}

fn material(secret: &Secret) -> Option<Material> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| data.get(key).and_then(|v| String::from_utf8(v.0.clone()).ok());
    Some(Material {
        ca_pem: text("ca.crt")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        ca_key_pem: text("ca.key"),
    })
}

fn secret(spec: &SecretSpec, material: &Material, resource_version: Option<String>) -> Secret {
    let mut data = BTreeMap::from([
        ("ca.crt".to_owned(), ByteString(material.ca_pem.clone().into_bytes())),
        ("tls.crt".to_owned(), ByteString(material.cert_pem.clone().into_bytes())),
        ("tls.key".to_owned(), ByteString(material.key_pem.clone().into_bytes())),
    ]);
    // The CA's key, to renew under the same CA; the pods mount the Secret with `items`
    // naming the other three keys, so it reaches no container but certs-gen's.
    if let Some(ca_key) = &material.ca_key_pem {
        data.insert("ca.key".to_owned(), ByteString(ca_key.clone().into_bytes()));
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(spec.secret.clone()),
            namespace: Some(spec.namespace.clone()),
            resource_version,
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "durable-scaler-certs-gen".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

//! A storage account as a task hub's app sees it: endpoints and credential, parsed from the
//! connection string in `AzureWebJobsStorage`, and the azure_core pipelines built over them.
//!
//! Supported forms:
//! - `UseDevelopmentStorage=true` (Azurite on its default ports);
//! - `DefaultEndpointsProtocol=https;AccountName=a;AccountKey=k[;EndpointSuffix=s]`;
//! - explicit `QueueEndpoint=`, `BlobEndpoint=`, `TableEndpoint=` (override the derived ones);
//! - `SharedAccessSignature=sv=...&sig=...` with explicit endpoints or an `AccountName`;
//! - `AccountName=a` alone (or with `EndpointSuffix`/explicit endpoints) and no key or SAS:
//!   Entra ID through azure_identity, the workload identity credential when
//!   `AZURE_FEDERATED_TOKEN_FILE` is set (AKS workload identity injects it), else the managed
//!   identity credential. This is the shape of an identity-based `AzureWebJobsStorage`
//!   (`AzureWebJobsStorage__accountName`) written as a connection string.
//!
//! A ScaledObject may also name the account alone, as wsugarman's scaler takes it
//! ([`IdentityAccount`]: `accountName` + `useManagedIdentity` [+ `clientId`], `cloud`,
//! `endpointSuffix`, `entraEndpoint`): endpoints `https://{account}.{service}.{suffix}` and a
//! workload identity credential against the cloud's Entra ID authority.

use std::sync::{Arc, atomic::AtomicU64, atomic::Ordering};

use azure_core::{
    credentials::TokenCredential,
    http::{
        ClientOptions, ExponentialRetryOptions, RetryOptions, Url,
        policies::{Policy, auth::BearerTokenAuthorizationPolicy},
    },
};
use azure_storage_blob::{BlobClient, BlobClientOptions, BlobContainerClient, BlobContainerClientOptions};
use azure_storage_queue::{QueueClient, QueueClientOptions, QueueServiceClient, QueueServiceClientOptions};
use base64::{Engine, engine::general_purpose::STANDARD as BASE64};

use super::{
    StorageError, StorageOptions, http,
    policy::{AttemptTimeoutPolicy, CountingPolicy, SasPolicy, SharedKeyPolicy, SharedKeyService},
};

/// The Azurite account and key `UseDevelopmentStorage=true` stands for.
const DEV_ACCOUNT: &str = crate::azurite::ACCOUNT;
const DEV_KEY: &str = crate::azurite::ACCOUNT_KEY;

/// How requests to the account are authorised.
#[derive(Clone)]
enum Credential {
    SharedKey(Vec<u8>),
    Sas(String),
    Token(Arc<dyn TokenCredential>),
}

/// Which kind of credential a connection string carries (for logs and diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CredentialKind {
    /// `AccountKey`: Shared Key signing.
    SharedKey,
    /// `SharedAccessSignature`.
    SharedAccessSignature,
    /// No secret in the string: Entra ID (workload or managed identity).
    EntraId,
}

/// One Azure Storage service of the account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    Blob,
    Queue,
    Table,
}

/// A storage account's endpoints and credential, parsed from a connection string. Cheap to
/// clone: clones share one request counter, and every account of the process shares one HTTP
/// client and connection pool ([`http::shared_client`]).
#[derive(Clone)]
pub struct StorageAccount {
    name: Option<String>,
    blob_endpoint: Url,
    queue_endpoint: Url,
    table_endpoint: Url,
    credential: Credential,
    client: reqwest::Client,
    requests: Arc<AtomicU64>,
}

impl std::fmt::Debug for StorageAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credential is deliberately left out.
        f.debug_struct("StorageAccount")
            .field("name", &self.name)
            .field("blob_endpoint", &self.blob_endpoint.as_str())
            .field("queue_endpoint", &self.queue_endpoint.as_str())
            .field("table_endpoint", &self.table_endpoint.as_str())
            .field("credential", &self.credential_kind())
            .finish()
    }
}

fn invalid(message: impl Into<String>) -> StorageError {
    StorageError::Unexpected { resource: "connection string".into(), message: message.into() }
}

/// An Azure cloud as wsugarman's `cloud` metadata names it, with its storage endpoint
/// suffix and Entra ID authority host (wsugarman/durabletask-azurestorage-scaler
/// `src/Keda.Scaler.DurableTask.AzureStorage/Clients/AzureCloudEndpoints.cs` and
/// `CloudEnvironment.cs`; the authority hosts are Azure.Identity's `AzureAuthorityHosts`,
/// the same ones azure_identity's `get_authority_host` uses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AzureCloud {
    /// `AzurePublicCloud` (also when `cloud` is unset).
    Public,
    /// `AzureUSGovernmentCloud`.
    UsGovernment,
    /// `AzureChinaCloud`.
    China,
    /// `Private` (Azure Stack Hub, air-gapped clouds): both values given by the metadata.
    Private {
        /// `endpointSuffix`.
        endpoint_suffix: String,
        /// `entraEndpoint`: the Entra ID authority host.
        entra_endpoint: Url,
    },
}

/// A `cloud` value wsugarman does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cloud {0:?}: AzurePublicCloud, AzureUSGovernmentCloud, AzureChinaCloud or Private")]
pub struct UnknownCloud(pub String);

impl AzureCloud {
    /// The cloud a `cloud` value names (any case, as `AzureCloudEndpoints.TryParseEnvironment`
    /// compares); `None` is the public cloud. `Private` needs its two values, so it is
    /// returned as `Ok(None)` for the caller to complete.
    pub fn parse_named(name: Option<&str>) -> Result<Option<Self>, UnknownCloud> {
        match name {
            None => Ok(Some(Self::Public)),
            Some(n) if n.eq_ignore_ascii_case("AzurePublicCloud") => Ok(Some(Self::Public)),
            Some(n) if n.eq_ignore_ascii_case("AzureUSGovernmentCloud") => Ok(Some(Self::UsGovernment)),
            Some(n) if n.eq_ignore_ascii_case("AzureChinaCloud") => Ok(Some(Self::China)),
            Some(n) if n.eq_ignore_ascii_case("Private") => Ok(None),
            Some(other) => Err(UnknownCloud(other.to_owned())),
        }
    }

    /// The storage endpoint suffix (`core.windows.net`, ...).
    pub fn storage_suffix(&self) -> &str {
        match self {
            Self::Public => "core.windows.net",
            Self::UsGovernment => "core.usgovcloudapi.net",
            Self::China => "core.chinacloudapi.cn",
            Self::Private { endpoint_suffix, .. } => endpoint_suffix,
        }
    }

    /// The Entra ID authority host tokens are asked from.
    pub fn authority_host(&self) -> &str {
        match self {
            Self::Public => "https://login.microsoftonline.com/",
            Self::UsGovernment => "https://login.microsoftonline.us/",
            Self::China => "https://login.chinacloudapi.cn/",
            Self::Private { entra_endpoint, .. } => entra_endpoint.as_str(),
        }
    }
}

/// A storage account named by the trigger, reached with the aggregator's workload identity
/// (wsugarman's `accountName` + `useManagedIdentity`; `ConfigureAzureStorageAccountOptions.cs`
/// builds a `WorkloadIdentityCredential` with the cloud's authority host and `clientId`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityAccount {
    /// `accountName`.
    pub account_name: String,
    /// `cloud` (+ `endpointSuffix`, `entraEndpoint`).
    pub cloud: AzureCloud,
    /// `clientId`: which identity, when the pod has several; else `AZURE_CLIENT_ID`.
    pub client_id: Option<String>,
}

impl IdentityAccount {
    /// The Blob, Queue and Table endpoints: `https://{account}.{service}.{suffix}`, as
    /// wsugarman's `AzureStorageServiceUri.Create`.
    pub fn endpoints(&self) -> [String; 3] {
        let suffix = self.cloud.storage_suffix();
        ["blob", "queue", "table"].map(|service| format!("https://{}.{service}.{suffix}", self.account_name))
    }
}

/// An identity-based connection as the Functions app itself configures it: the settings under
/// its connection name (`AzureWebJobsStorage__accountName`, `__blobServiceUri`,
/// `__queueServiceUri`, `__tableServiceUri`, `__credential`, `__clientId`, `__tenantId`,
/// `__tokenFilePath`), read by the Durable extension into `AzureStorageAccountOptions`
/// (azure-functions-durable-extension `AzureStorageAccountProvider.cs`: the connection string
/// when the section has a value, else these) with the credential from Azure's
/// `ClientFactory.CreateCredential` (azure-sdk-for-net
/// `sdk/extensions/Microsoft.Extensions.Azure/src/Internal/ClientFactory.cs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppIdentity {
    /// `accountName`: endpoints `https://{account}.{service}.core.windows.net` for the
    /// services whose URI is not given (`AzureStorageAccountOptions.DefaultEndpointSuffix`).
    pub account_name: Option<String>,
    /// `blobServiceUri`.
    pub blob_service_uri: Option<String>,
    /// `queueServiceUri`.
    pub queue_service_uri: Option<String>,
    /// `tableServiceUri`.
    pub table_service_uri: Option<String>,
    /// `credential`: `managedidentity`, `workloadidentity`, or none (then as
    /// `DefaultAzureCredential` does in a pod: workload identity when the pod has a federated
    /// token, else managed identity).
    pub credential: Option<String>,
    /// `clientId`: the user-assigned managed identity, or the workload identity's client.
    pub client_id: Option<String>,
    /// `tenantId` (workload identity; else `AZURE_TENANT_ID`).
    pub tenant_id: Option<String>,
    /// `tokenFilePath` (workload identity; else `AZURE_FEDERATED_TOKEN_FILE`).
    pub token_file_path: Option<String>,
}

/// Where a trigger's storage account comes from: a connection string, or a name and the
/// aggregator's workload identity.
#[derive(Clone, PartialEq, Eq)]
pub enum Connection {
    /// A connection string (`connectionFromEnv`'s resolved value, or `connection`).
    String(String),
    /// `accountName` with workload identity.
    Identity(IdentityAccount),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // The string may hold a key: never shown.
            Self::String(_) => f.write_str("String(..)"),
            Self::Identity(identity) => f.debug_tuple("Identity").field(identity).finish(),
        }
    }
}

/// How a parsed connection string authorises requests (no credential built yet).
#[derive(Clone)]
enum ParsedCredential {
    SharedKey(Vec<u8>),
    Sas(String),
    EntraId,
}

/// What a connection string says, checked but not acted on: no HTTP client, no credential
/// built, nothing read from the environment. The aggregator parses every trigger's
/// connection so on each KEDA call, so a bad one is refused at once, naming its key.
#[derive(Clone)]
pub struct ConnectionString {
    name: Option<String>,
    endpoints: [Url; 3],
    credential: ParsedCredential,
    /// The first key that makes an endpoint plain http, unless it is
    /// `UseDevelopmentStorage=true` on its default loopback address.
    plain_http: Option<&'static str>,
}

impl std::fmt::Debug for ConnectionString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credential is deliberately left out.
        f.debug_struct("ConnectionString")
            .field("name", &self.name)
            .field("endpoints", &self.endpoints.iter().map(Url::as_str).collect::<Vec<_>>())
            .field("plain_http", &self.plain_http)
            .finish_non_exhaustive()
    }
}

impl ConnectionString {
    /// Parses `connection` (forms in the module docs). Errors name the offending key, never
    /// a secret's value.
    pub fn parse(connection: &str) -> Result<Self, StorageError> {
        let fields = parse_fields(connection)?;
        let get = |key: &str| {
            fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.as_str())
                .filter(|v| !v.is_empty())
        };
        if let Some(value) = get("UseDevelopmentStorage") {
            if !value.eq_ignore_ascii_case("true") {
                return Err(invalid("UseDevelopmentStorage must be `true` when present"));
            }
            let proxy = get("DevelopmentStorageProxyUri");
            let base = proxy.unwrap_or("http://127.0.0.1").trim_end_matches('/');
            let endpoint = |port: u16| format!("{base}:{port}/{DEV_ACCOUNT}");
            let endpoints = endpoint_urls([endpoint(10000), endpoint(10001), endpoint(10002)], false)?;
            // The emulator on this host's loopback is no host of a caller's choice; a proxy is.
            let plain_http = (proxy.is_some() && endpoints.iter().any(|u| u.scheme() == "http"))
                .then_some("DevelopmentStorageProxyUri");
            return Ok(Self {
                name: Some(DEV_ACCOUNT.into()),
                endpoints,
                credential: ParsedCredential::SharedKey(decode_key(DEV_KEY)?),
                plain_http,
            });
        }

        let name = get("AccountName").map(str::to_string);
        let protocol = get("DefaultEndpointsProtocol").unwrap_or("https");
        if !protocol.eq_ignore_ascii_case("https") && !protocol.eq_ignore_ascii_case("http") {
            return Err(invalid("DefaultEndpointsProtocol must be `https` or `http`"));
        }
        let suffix = get("EndpointSuffix").unwrap_or("core.windows.net");
        let mut plain_http = None;
        let mut endpoint = |key: &'static str, service: &str| -> Result<String, StorageError> {
            let (text, from) = match (get(key), &name) {
                (Some(explicit), _) => (explicit.to_string(), key),
                (None, Some(account)) => (
                    format!("{}://{account}.{service}.{suffix}", protocol.to_ascii_lowercase()),
                    "DefaultEndpointsProtocol",
                ),
                (None, None) => return Err(invalid(format!("neither {key} nor AccountName is given"))),
            };
            if plain_http.is_none() && text.get(..7).is_some_and(|s| s.eq_ignore_ascii_case("http://")) {
                plain_http = Some(from);
            }
            Ok(text)
        };
        let endpoints = [
            endpoint("BlobEndpoint", "blob")?,
            endpoint("QueueEndpoint", "queue")?,
            endpoint("TableEndpoint", "table")?,
        ];

        let credential = match (get("AccountKey"), get("SharedAccessSignature")) {
            (Some(_), Some(_)) => {
                return Err(invalid("AccountKey and SharedAccessSignature are both given; keep one"));
            }
            (Some(key), None) => {
                if name.is_none() {
                    return Err(invalid("AccountKey needs AccountName"));
                }
                ParsedCredential::SharedKey(decode_key(key)?)
            }
            (None, Some(sas)) => {
                if !sas.contains("sig=") {
                    return Err(invalid("SharedAccessSignature has no `sig` parameter"));
                }
                ParsedCredential::Sas(sas.trim_start_matches('?').to_string())
            }
            (None, None) => {
                if name.is_none() {
                    return Err(invalid("no AccountKey, SharedAccessSignature or AccountName"));
                }
                ParsedCredential::EntraId
            }
        };
        let endpoints = endpoint_urls(endpoints, matches!(credential, ParsedCredential::EntraId))?;
        Ok(Self { name, endpoints, credential, plain_http })
    }

    /// The key that makes an endpoint plain http (`BlobEndpoint`, `QueueEndpoint`,
    /// `TableEndpoint`, `DefaultEndpointsProtocol` or `DevelopmentStorageProxyUri`), if one
    /// does; `UseDevelopmentStorage=true` on its default loopback address is not counted.
    pub fn plain_http_key(&self) -> Option<&'static str> {
        self.plain_http
    }
}

/// The three endpoints as URLs, named by their key when one is not an http(s) URL; https
/// only when `token` (a bearer token must not cross the network in clear).
fn endpoint_urls([blob, queue, table]: [String; 3], token: bool) -> Result<[Url; 3], StorageError> {
    let url = |key: &str, value: String| {
        let url = crate::config::http_url(value.trim_end_matches('/'))
            .ok_or_else(|| invalid(format!("{key} is not an http(s) URL")))?;
        if token && url.scheme() != "https" {
            return Err(invalid(format!("{key} must use https with an Entra ID credential")));
        }
        Ok(url)
    };
    Ok([url("BlobEndpoint", blob)?, url("QueueEndpoint", queue)?, url("TableEndpoint", table)?])
}

impl StorageAccount {
    /// The account `connection` describes.
    pub fn from_connection(connection: &Connection) -> Result<Self, StorageError> {
        match connection {
            Connection::String(text) => Self::from_connection_string(text),
            Connection::Identity(identity) => Self::from_identity(identity),
        }
    }

    /// The account `identity` names, with a workload identity credential for its cloud.
    pub fn from_identity(identity: &IdentityAccount) -> Result<Self, StorageError> {
        crate::telemetry::install_crypto_provider();
        let client = http::shared_client()?;
        let credential = workload_identity_credential(identity, &client)?;
        Self::build(
            Some(identity.account_name.clone()),
            identity.endpoints(),
            Credential::Token(credential),
            client,
        )
    }

    /// The account an app's identity-based connection describes ([`AppIdentity`]); errors name
    /// the setting, after the app's own key names.
    pub fn from_app_identity(identity: &AppIdentity) -> Result<Self, StorageError> {
        crate::telemetry::install_crypto_provider();
        let http = http::shared_client()?;
        let set =
            |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
        let account = set(&identity.account_name);
        let endpoint = |key: &str, uri: &Option<String>, service: &str| match (set(uri), &account) {
            (Some(uri), _) => Ok(uri),
            (None, Some(account)) => Ok(format!("https://{account}.{service}.core.windows.net")),
            (None, None) => Err(invalid(format!("neither {key} nor accountName is given"))),
        };
        let endpoints = [
            endpoint("blobServiceUri", &identity.blob_service_uri, "blob")?,
            endpoint("queueServiceUri", &identity.queue_service_uri, "queue")?,
            endpoint("tableServiceUri", &identity.table_service_uri, "table")?,
        ];
        let client_id = set(&identity.client_id);
        let workload = || {
            let mut options = azure_identity::WorkloadIdentityCredentialOptions {
                client_id: client_id.clone(),
                tenant_id: set(&identity.tenant_id),
                token_file_path: set(&identity.token_file_path).map(Into::into),
                ..Default::default()
            };
            options.credential_options.client_options = credential_client_options(&http);
            azure_identity::WorkloadIdentityCredential::new(Some(options))
                .map(|c| c as Arc<dyn TokenCredential>)
        };
        let managed = || {
            let options = azure_identity::ManagedIdentityCredentialOptions {
                user_assigned_id: client_id.clone().map(azure_identity::UserAssignedId::ClientId),
                client_options: credential_client_options(&http),
            };
            azure_identity::ManagedIdentityCredential::new(Some(options))
                .map(|c| c as Arc<dyn TokenCredential>)
        };
        let credential = match set(&identity.credential).map(|c| c.to_ascii_lowercase()).as_deref() {
            Some("managedidentity") => managed(),
            Some("workloadidentity") => workload(),
            // DefaultAzureCredential in a pod: its WorkloadIdentityCredential when the
            // federated token is there (client from AZURE_CLIENT_ID), else its
            // ManagedIdentityCredential with `clientId` as ManagedIdentityClientId.
            None if std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some() => {
                let mut options = azure_identity::WorkloadIdentityCredentialOptions {
                    tenant_id: set(&identity.tenant_id),
                    ..Default::default()
                };
                options.credential_options.client_options = credential_client_options(&http);
                azure_identity::WorkloadIdentityCredential::new(Some(options)).map(|c| c as Arc<dyn TokenCredential>)
            }
            None => managed(),
            Some(other) => {
                return Err(invalid(format!(
                    "credential {other:?} is not one the sidecar can use (managedidentity, workloadidentity, or none)"
                )));
            }
        }
        .map_err(|e| invalid(format!("no Entra ID credential is available: {e}")))?;
        Self::build(account, endpoints, Credential::Token(credential), http)
    }

    /// Parses a connection string as Durable Functions apps have it in `AzureWebJobsStorage`
    /// (forms in the module docs). Errors name the offending key, never a secret's value.
    pub fn from_connection_string(connection: &str) -> Result<Self, StorageError> {
        let parsed = ConnectionString::parse(connection)?;
        // The SDK's HTTP client (and azure_identity's) uses rustls' process-wide provider.
        crate::telemetry::install_crypto_provider();
        let client = http::shared_client()?;
        let credential = match parsed.credential {
            ParsedCredential::SharedKey(key) => Credential::SharedKey(key),
            ParsedCredential::Sas(sas) => Credential::Sas(sas),
            ParsedCredential::EntraId => Credential::Token(entra_id_credential(&client)?),
        };
        let [blob_endpoint, queue_endpoint, table_endpoint] = parsed.endpoints;
        Ok(Self {
            name: parsed.name,
            blob_endpoint,
            queue_endpoint,
            table_endpoint,
            credential,
            client,
            requests: Arc::new(AtomicU64::new(0)),
        })
    }

    fn build(
        name: Option<String>,
        endpoints: [String; 3],
        credential: Credential,
        client: reqwest::Client,
    ) -> Result<Self, StorageError> {
        let token = matches!(credential, Credential::Token(_));
        let [blob_endpoint, queue_endpoint, table_endpoint] = endpoint_urls(endpoints, token)?;
        Ok(Self {
            name,
            blob_endpoint,
            queue_endpoint,
            table_endpoint,
            credential,
            client,
            requests: Arc::new(AtomicU64::new(0)),
        })
    }

    /// How requests are authorised.
    pub(crate) fn credential_kind(&self) -> CredentialKind {
        match self.credential {
            Credential::SharedKey(_) => CredentialKind::SharedKey,
            Credential::Sas(_) => CredentialKind::SharedAccessSignature,
            Credential::Token(_) => CredentialKind::EntraId,
        }
    }

    /// HTTP requests sent through this account (and its clones) so far, retries included.
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The endpoint of `service`.
    pub(crate) fn endpoint(&self, service: Service) -> &Url {
        match service {
            Service::Blob => &self.blob_endpoint,
            Service::Queue => &self.queue_endpoint,
            Service::Table => &self.table_endpoint,
        }
    }

    /// `endpoint/segment`, e.g. a queue's or a container's URL.
    pub(crate) fn url(&self, service: Service, path: &str) -> Result<Url, StorageError> {
        let base = self.endpoint(service).as_str().trim_end_matches('/');
        Url::parse(&format!("{base}/{path}"))
            .map_err(|e| StorageError::Unexpected { resource: path.into(), message: e.to_string() })
    }

    /// A client of queue `name`.
    pub(crate) fn queue_client(
        &self,
        name: &str,
        options: &StorageOptions,
    ) -> Result<QueueClient, StorageError> {
        let client_options = QueueClientOptions {
            client_options: self.client_options(Service::Queue, options),
            ..Default::default()
        };
        QueueClient::new(self.url(Service::Queue, name)?, None, Some(client_options))
            .map_err(|e| StorageError::from_azure(name, &e))
    }

    /// A client of the account's Queue service (listing queues).
    pub(crate) fn queue_service_client(
        &self,
        options: &StorageOptions,
    ) -> Result<QueueServiceClient, StorageError> {
        let client_options = QueueServiceClientOptions {
            client_options: self.client_options(Service::Queue, options),
            ..Default::default()
        };
        let endpoint = self.url(Service::Queue, "")?;
        QueueServiceClient::new(endpoint, None, Some(client_options))
            .map_err(|e| StorageError::from_azure("the queue service", &e))
    }

    /// A client of blob `path` (`container/name`, where the name may contain `/`).
    pub(crate) fn blob_client(
        &self,
        path: &str,
        options: &StorageOptions,
    ) -> Result<BlobClient, StorageError> {
        let client_options = BlobClientOptions {
            client_options: self.client_options(Service::Blob, options),
            ..Default::default()
        };
        BlobClient::new(self.url(Service::Blob, path)?, None, Some(client_options))
            .map_err(|e| StorageError::from_azure(path, &e))
    }

    /// A client of container `name`.
    pub(crate) fn container_client(
        &self,
        name: &str,
        options: &StorageOptions,
    ) -> Result<BlobContainerClient, StorageError> {
        let client_options = BlobContainerClientOptions {
            client_options: self.client_options(Service::Blob, options),
            ..Default::default()
        };
        BlobContainerClient::new(self.url(Service::Blob, name)?, None, Some(client_options))
            .map_err(|e| StorageError::from_azure(name, &e))
    }

    /// Client options for `service`: counting, per-attempt timeout and authorisation as
    /// per-try policies, exponential retries with jitter on transient failures only (the
    /// azure_core retry policy: 408, 429, 500, 502, 503, 504 and connection errors), and the
    /// process's one HTTP client, reading at most what `service` can answer
    /// ([`http::CappedTransport`]).
    pub(crate) fn client_options(&self, service: Service, options: &StorageOptions) -> ClientOptions {
        let mut per_try: Vec<Arc<dyn Policy>> = vec![
            Arc::new(CountingPolicy { count: self.requests.clone() }),
            Arc::new(AttemptTimeoutPolicy { timeout: options.attempt_timeout }),
        ];
        per_try.push(match &self.credential {
            Credential::SharedKey(key) => {
                let variant = if service == Service::Table {
                    SharedKeyService::Table
                } else {
                    SharedKeyService::BlobOrQueue
                };
                Arc::new(SharedKeyPolicy::new(self.name.as_deref().unwrap_or_default(), key, variant))
            }
            Credential::Sas(sas) => Arc::new(SasPolicy::new(sas)),
            Credential::Token(credential) => Arc::new(BearerTokenAuthorizationPolicy::new(
                credential.clone(),
                vec!["https://storage.azure.com/.default"],
            )),
        });
        let retry = RetryOptions::exponential(ExponentialRetryOptions {
            initial_delay: azure_core::time::Duration::milliseconds(200),
            max_retries: options.max_retries,
            max_total_elapsed: azure_core::time::Duration::seconds(30),
            max_delay: azure_core::time::Duration::seconds(2),
        });
        let limit = match service {
            Service::Queue => http::QUEUE_ANSWER_MAX_BYTES,
            Service::Blob => http::BLOB_ANSWER_MAX_BYTES,
            Service::Table => http::TABLE_ANSWER_MAX_BYTES,
        };
        ClientOptions {
            per_try_policies: per_try,
            retry,
            transport: Some(http::transport(&self.client, limit)),
            ..Default::default()
        }
    }
}

/// `key=value` pairs separated by `;`; values may contain `=` (keys, SAS).
fn parse_fields(connection: &str) -> Result<Vec<(String, String)>, StorageError> {
    let connection = connection.trim();
    if connection.is_empty() {
        return Err(invalid("it is empty"));
    }
    connection
        .split(';')
        .map(str::trim)
        .filter(|segment| !segment.is_empty())
        .enumerate()
        .map(|(i, segment)| match segment.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            // Do not echo the segment: it may be a secret missing its key.
            _ => Err(invalid(format!("segment {} is not `key=value`", i + 1))),
        })
        .collect()
}

fn decode_key(key: &str) -> Result<Vec<u8>, StorageError> {
    BASE64.decode(key).map_err(|_| invalid("AccountKey is not valid base64"))
}

/// Client options for a credential's token requests: the shared client (a credential left
/// without a transport builds its own client, which panics when that fails: module docs of
/// [`http`]), reading at most a token answer.
fn credential_client_options(client: &reqwest::Client) -> ClientOptions {
    ClientOptions {
        transport: Some(http::transport(client, http::TABLE_ANSWER_MAX_BYTES)),
        ..Default::default()
    }
}

/// Workload identity when the pod has a federated token, else managed identity.
fn entra_id_credential(client: &reqwest::Client) -> Result<Arc<dyn TokenCredential>, StorageError> {
    let result: azure_core::Result<Arc<dyn TokenCredential>> =
        if std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some() {
            let mut options = azure_identity::WorkloadIdentityCredentialOptions::default();
            options.credential_options.client_options = credential_client_options(client);
            azure_identity::WorkloadIdentityCredential::new(Some(options))
                .map(|c| c as Arc<dyn TokenCredential>)
        } else {
            let options = azure_identity::ManagedIdentityCredentialOptions {
                client_options: credential_client_options(client),
                ..Default::default()
            };
            azure_identity::ManagedIdentityCredential::new(Some(options))
                .map(|c| c as Arc<dyn TokenCredential>)
        };
    result.map_err(|e| invalid(format!("no key or SAS given, and no Entra ID credential is available: {e}")))
}

/// A workload identity credential for `identity`'s cloud and client id (the rest, tenant and
/// federated token file, from the pod's `AZURE_TENANT_ID` / `AZURE_FEDERATED_TOKEN_FILE` that
/// AKS workload identity injects).
fn workload_identity_credential(
    identity: &IdentityAccount,
    client: &reqwest::Client,
) -> Result<Arc<dyn TokenCredential>, StorageError> {
    let mut custom = azure_core::cloud::CustomConfiguration::default();
    custom.authority_host = identity.cloud.authority_host().trim_end_matches('/').to_owned();
    let mut options = azure_identity::WorkloadIdentityCredentialOptions {
        client_id: identity.client_id.clone(),
        ..Default::default()
    };
    options.credential_options.client_options = credential_client_options(client);
    options.credential_options.client_options.cloud = Some(Arc::new(custom.into()));
    azure_identity::WorkloadIdentityCredential::new(Some(options))
        .map(|c| c as Arc<dyn TokenCredential>)
        .map_err(|e| invalid(format!("accountName {} needs a workload identity: {e}", identity.account_name)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(a: &StorageAccount) -> [&str; 3] {
        [a.blob_endpoint.as_str(), a.queue_endpoint.as_str(), a.table_endpoint.as_str()]
    }

    #[test]
    fn development_storage_is_azurite_on_its_default_ports() {
        let a = StorageAccount::from_connection_string("UseDevelopmentStorage=true").unwrap();
        assert_eq!(
            endpoints(&a),
            [
                "http://127.0.0.1:10000/devstoreaccount1",
                "http://127.0.0.1:10001/devstoreaccount1",
                "http://127.0.0.1:10002/devstoreaccount1"
            ]
        );
        assert_eq!(
            (a.name.as_deref(), a.credential_kind()),
            (Some("devstoreaccount1"), CredentialKind::SharedKey)
        );
    }

    #[test]
    fn account_name_and_key_derive_public_cloud_endpoints() {
        let a = StorageAccount::from_connection_string(
            "DefaultEndpointsProtocol=https;AccountName=myapp;AccountKey=a2V5;EndpointSuffix=core.windows.net",
        )
        .unwrap();
        assert_eq!(
            endpoints(&a),
            [
                "https://myapp.blob.core.windows.net/",
                "https://myapp.queue.core.windows.net/",
                "https://myapp.table.core.windows.net/"
            ]
        );
    }

    #[test]
    fn endpoint_suffix_selects_a_sovereign_cloud() {
        let a = StorageAccount::from_connection_string(
            "AccountName=x;AccountKey=a2V5;EndpointSuffix=core.chinacloudapi.cn",
        )
        .unwrap();
        assert_eq!(a.queue_endpoint.as_str(), "https://x.queue.core.chinacloudapi.cn/");
    }

    #[test]
    fn explicit_endpoints_win_and_lose_their_trailing_slash() {
        let a = StorageAccount::from_connection_string(
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;BlobEndpoint=http://h:1/devstoreaccount1/;QueueEndpoint=http://h:2/devstoreaccount1/;TableEndpoint=http://h:3/devstoreaccount1//",
        )
        .unwrap();
        assert_eq!(
            endpoints(&a),
            ["http://h:1/devstoreaccount1", "http://h:2/devstoreaccount1", "http://h:3/devstoreaccount1"]
        );
    }

    #[test]
    fn shared_access_signature_with_explicit_endpoints_needs_no_account_name() {
        let a = StorageAccount::from_connection_string(
            "BlobEndpoint=https://x.blob.core.windows.net/;QueueEndpoint=https://x.queue.core.windows.net/;TableEndpoint=https://x.table.core.windows.net/;SharedAccessSignature=sv=2022-11-02&ss=bqt&sig=abc%3D",
        )
        .unwrap();
        assert_eq!((a.name.as_deref(), a.credential_kind()), (None, CredentialKind::SharedAccessSignature));
        assert_eq!(a.queue_endpoint.as_str(), "https://x.queue.core.windows.net/");
    }

    #[test]
    fn account_name_alone_means_entra_id() {
        let a = StorageAccount::from_connection_string("AccountName=myapp").unwrap();
        assert_eq!(a.credential_kind(), CredentialKind::EntraId);
        assert_eq!(a.table_endpoint.as_str(), "https://myapp.table.core.windows.net/");
    }

    #[test]
    fn a_bad_key_is_named_but_never_echoed() {
        let err = StorageAccount::from_connection_string("AccountName=x;AccountKey=not*base64*secret")
            .unwrap_err()
            .to_string();
        assert!(err.contains("AccountKey is not valid base64"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn malformed_strings_say_what_is_wrong() {
        let cases = [
            ("", "empty"),
            ("AccountName=x;justasecretvalue", "segment 2"),
            ("AccountKey=a2V5", "AccountName"),
            ("AccountName=x;AccountKey=a2V5;SharedAccessSignature=sig=1", "both"),
            ("QueueEndpoint=http://h:1/a;SharedAccessSignature=sig=1", "BlobEndpoint"),
            ("AccountName=x;AccountKey=a2V5;QueueEndpoint=not a url", "QueueEndpoint is not an http(s) URL"),
            ("AccountName=x;AccountKey=a2V5;DefaultEndpointsProtocol=ftp", "DefaultEndpointsProtocol"),
            ("UseDevelopmentStorage=false", "UseDevelopmentStorage"),
        ];
        for (cs, expected) in cases {
            let err = StorageAccount::from_connection_string(cs).unwrap_err().to_string();
            assert!(err.contains(expected), "{cs:?}: {err}");
            assert!(!err.contains("justasecretvalue"), "{err}");
        }
    }

    #[test]
    fn the_key_that_makes_an_endpoint_plain_http_is_named() {
        let http = |cs: &str| ConnectionString::parse(cs).unwrap().plain_http_key();
        assert_eq!(http("UseDevelopmentStorage=true"), None, "the emulator on this host's loopback");
        assert_eq!(
            http("UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://evil.example"),
            Some("DevelopmentStorageProxyUri")
        );
        assert_eq!(http("AccountName=x;AccountKey=a2V5"), None, "https by default");
        assert_eq!(
            http("DefaultEndpointsProtocol=http;AccountName=x;AccountKey=a2V5"),
            Some("DefaultEndpointsProtocol")
        );
        assert_eq!(
            http(
                "DefaultEndpointsProtocol=http;AccountName=x;AccountKey=a2V5;BlobEndpoint=https://b;QueueEndpoint=https://q;TableEndpoint=https://t"
            ),
            None,
            "every endpoint given explicitly as https"
        );
        assert_eq!(
            http("AccountName=x;AccountKey=a2V5;TableEndpoint=Http://10.0.0.1/t"),
            Some("TableEndpoint")
        );
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let a = StorageAccount::from_connection_string("AccountName=x;AccountKey=c2VjcmV0a2V5").unwrap();
        let shown = format!("{a:?}");
        assert!(!shown.contains("c2VjcmV0a2V5") && shown.contains("SharedKey"), "{shown}");
        let parsed = ConnectionString::parse("AccountName=x;AccountKey=c2VjcmV0a2V5").unwrap();
        assert!(!format!("{parsed:?}").contains("c2VjcmV0a2V5"), "{parsed:?}");
    }

    fn identity(cloud: AzureCloud) -> IdentityAccount {
        IdentityAccount { account_name: "orders".into(), cloud, client_id: None }
    }

    #[test]
    fn each_named_cloud_has_wsugarmans_suffix_and_authority() {
        for (name, suffix, authority) in [
            (None, "core.windows.net", "https://login.microsoftonline.com/"),
            (Some("AzurePublicCloud"), "core.windows.net", "https://login.microsoftonline.com/"),
            (Some("azureusgovernmentcloud"), "core.usgovcloudapi.net", "https://login.microsoftonline.us/"),
            (Some("AzureChinaCloud"), "core.chinacloudapi.cn", "https://login.chinacloudapi.cn/"),
        ] {
            let cloud = AzureCloud::parse_named(name).unwrap().unwrap();
            assert_eq!((cloud.storage_suffix(), cloud.authority_host()), (suffix, authority), "{name:?}");
        }
    }

    #[test]
    fn private_is_completed_by_the_caller_and_other_names_are_unknown() {
        assert_eq!(AzureCloud::parse_named(Some("private")), Ok(None));
        assert_eq!(AzureCloud::parse_named(Some("Mars")), Err(UnknownCloud("Mars".into())));
    }

    #[test]
    fn an_identity_account_derives_https_endpoints_from_its_cloud() {
        assert_eq!(
            identity(AzureCloud::UsGovernment).endpoints(),
            [
                "https://orders.blob.core.usgovcloudapi.net",
                "https://orders.queue.core.usgovcloudapi.net",
                "https://orders.table.core.usgovcloudapi.net"
            ]
        );
        let private = AzureCloud::Private {
            endpoint_suffix: "storage.stack.local".into(),
            entra_endpoint: Url::parse("https://login.stack.local/").unwrap(),
        };
        assert_eq!(identity(private.clone()).endpoints()[1], "https://orders.queue.storage.stack.local");
        assert_eq!(private.authority_host(), "https://login.stack.local/");
    }

    #[test]
    fn an_identity_account_without_a_federated_token_says_what_it_needs() {
        // The test process has no AZURE_TENANT_ID / AZURE_FEDERATED_TOKEN_FILE: the
        // credential cannot be made, and nothing is sent anywhere.
        if std::env::var_os("AZURE_FEDERATED_TOKEN_FILE").is_some() {
            return;
        }
        let err = StorageAccount::from_identity(&identity(AzureCloud::Public)).unwrap_err().to_string();
        assert!(err.contains("accountName orders needs a workload identity"), "{err}");
    }

    #[test]
    fn a_connection_never_shows_its_string_in_debug_output() {
        let shown = format!("{:?}", Connection::String("AccountName=x;AccountKey=c2VjcmV0".into()));
        assert!(!shown.contains("c2VjcmV0"), "{shown}");
    }
    #[test]
    fn an_app_identity_takes_explicit_service_uris_over_the_account_name() {
        let identity = AppIdentity {
            account_name: Some("orders".into()),
            queue_service_uri: Some("https://orders-queues.example.net".into()),
            credential: Some("ManagedIdentity".into()),
            client_id: Some("00000000-0000-0000-0000-000000000001".into()),
            ..Default::default()
        };
        let account = StorageAccount::from_app_identity(&identity).unwrap();
        assert_eq!(
            endpoints(&account),
            [
                "https://orders.blob.core.windows.net/",
                "https://orders-queues.example.net/",
                "https://orders.table.core.windows.net/",
            ]
        );
        assert_eq!(account.credential_kind(), CredentialKind::EntraId);
    }

    #[test]
    fn an_app_identity_without_account_or_uri_or_with_a_foreign_credential_is_refused() {
        let error = StorageAccount::from_app_identity(&AppIdentity {
            queue_service_uri: Some("https://q.example.net".into()),
            credential: Some("managedidentity".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("blobServiceUri") && error.contains("accountName"), "{error}");
        let error = StorageAccount::from_app_identity(&AppIdentity {
            account_name: Some("orders".into()),
            credential: Some("clientsecret".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("\"clientsecret\""), "{error}");
    }
}

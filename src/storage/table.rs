//! The Table service through the azure_core pipeline: no official Rust table crate exists,
//! and a task hub needs only a handful of table calls (one query here; creating the table
//! and writing rows for the emulator).

use azure_core::{
    error::CheckSuccessOptions,
    http::{Context, Method, Pipeline, PipelineSendOptions, RawResponse, Request, Url},
};

use super::{Service, StorageAccount, StorageError, StorageOptions};

/// The Table service version these requests speak (JSON, `odata=nometadata`).
const TABLE_VERSION: &str = "2019-02-02";

/// Sends table requests for one account.
#[derive(Debug, Clone)]
pub(crate) struct TableService {
    pipeline: Pipeline,
    account: StorageAccount,
}

impl TableService {
    pub(crate) fn new(account: &StorageAccount, options: &StorageOptions) -> Self {
        let pipeline = Pipeline::new(
            Some(env!("CARGO_PKG_NAME")),
            Some(env!("CARGO_PKG_VERSION")),
            account.client_options(Service::Table, options),
            Vec::new(),
            Vec::new(),
            None,
        );
        Self { pipeline, account: account.clone() }
    }

    /// The URL of `path` under the Table endpoint, e.g. `HubPartitions()`.
    pub(crate) fn url(&self, path: &str) -> Result<Url, StorageError> {
        self.account.url(Service::Table, path)
    }

    /// Sends `method url` with an optional JSON body; `success` lists the statuses that
    /// count as success. `resource` names what is being touched in errors.
    pub(crate) async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<serde_json::Value>,
        success: &'static [u16],
        resource: &str,
    ) -> Result<RawResponse, StorageError> {
        let mut request = Request::new(url, method);
        request.insert_header("accept", "application/json;odata=nometadata");
        request.insert_header("x-ms-version", TABLE_VERSION);
        request.insert_header("dataserviceversion", "3.0");
        request.insert_header("maxdataserviceversion", "3.0;NetFx");
        if let Some(body) = body {
            request.insert_header("content-type", "application/json");
            request.insert_header("prefer", "return-no-content");
            request.set_body(body.to_string());
        }
        let options = PipelineSendOptions {
            check_success: CheckSuccessOptions { success_codes: success },
            ..Default::default()
        };
        self.pipeline
            .send(&Context::new(), &mut request, Some(options))
            .await
            .map_err(|e| StorageError::from_azure(resource, &e))
    }

    /// Every entity of `table` (first page: up to 1000 rows, far more than a Partitions
    /// table's 16).
    pub(crate) async fn query_all(
        &self,
        table: &str,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, StorageError> {
        let url = self.url(&format!("{table}()"))?;
        let response = self.send(Method::Get, url, None, &[200], table).await?;
        #[derive(serde::Deserialize)]
        struct Page {
            value: Vec<serde_json::Map<String, serde_json::Value>>,
        }
        let page: Page =
            serde_json::from_slice(response.body().as_ref()).map_err(|e| StorageError::Unexpected {
                resource: table.into(),
                message: format!("unreadable query result: {e}"),
            })?;
        Ok(page.value)
    }
}

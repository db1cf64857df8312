//! Test support of the node controllers: contexts over the recording mock API server of
//! [`crate::testing`], answering for a list of Nodes.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;
use serde_json::{Value, json};

use crate::metrics::Metrics;
use crate::node::NodeSettings;
use crate::node::controller::Context;
use crate::platform::fake::FakePlatform;
pub use crate::testing::Call;
use crate::testing::mock_api_server;

/// Answers: events are echoed, a list of nodes returns `nodes`, a delete of a node
/// absent from `nodes` is a 404, anything else returns the first node (or `{}`).
pub fn default_answer(nodes: &[Node], method: &str, path: &str, body: &Value) -> (u16, Value) {
    if path.ends_with("/events") {
        return (201, body.clone());
    }
    if method == "GET" && path == "/api/v1/nodes" {
        return (
            200,
            json!({"apiVersion": "v1", "kind": "NodeList", "metadata": {}, "items": nodes}),
        );
    }
    let name = path.rsplit('/').find(|s| *s != "status").unwrap_or_default();
    match nodes.iter().find(|n| n.metadata.name.as_deref() == Some(name)) {
        Some(n) => (200, serde_json::to_value(n).unwrap_or(Value::Null)),
        None if method == "DELETE" || method == "PATCH" => (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "not found"}),
        ),
        None => (200, json!({})),
    }
}

/// A node-controller context over `platform` and a recording mock API server answering
/// with [`default_answer`] for `nodes`. Run the code under test, drop every clone of
/// the context, then await the handle for the calls.
pub fn context(
    platform: Arc<FakePlatform>,
    metrics: Arc<Metrics>,
    nodes: Vec<Node>,
) -> (Arc<Context>, tokio::task::JoinHandle<Vec<Call>>) {
    context_answering(platform, metrics, move |method, path, body| {
        default_answer(&nodes, method, path, body)
    })
}

/// [`context`] with a mock API server that answers with `answer(method, path, body)`
/// (status, JSON body).
pub fn context_answering(
    platform: Arc<FakePlatform>,
    metrics: Arc<Metrics>,
    answer: impl FnMut(&str, &str, &Value) -> (u16, Value) + Send + 'static,
) -> (Arc<Context>, tokio::task::JoinHandle<Vec<Call>>) {
    let (client, server) = mock_api_server(answer);
    let mut settings = NodeSettings::new("cl-1");
    settings.base_backoff = std::time::Duration::from_millis(100);
    let ctx = Arc::new(Context::new(client, platform, metrics, settings));
    (ctx, server)
}

/// Awaits the recorded calls once the context is gone.
pub async fn calls(server: tokio::task::JoinHandle<Vec<Call>>) -> Vec<Call> {
    tokio::time::timeout(std::time::Duration::from_secs(2), server)
        .await
        .expect("mock API server finished")
        .expect("mock API server task")
}

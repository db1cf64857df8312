//! Test support shared by the controllers' unit tests: a recording mock API server (the
//! `tower_test` pattern, controller-rs's `ApiServerVerifier`) answering from a closure.

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::Value;

/// One request a controller made to the API server.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub body: Value,
}

impl Call {
    pub fn is(&self, method: &str, path_end: &str) -> bool {
        self.method == method && self.path.ends_with(path_end)
    }

    pub fn is_event(&self, reason: &str) -> bool {
        self.method == "POST" && self.path.ends_with("/events") && self.body["reason"] == reason
    }
}

/// A client whose requests a mock API server answers with `answer(method, path, body)`
/// (status, JSON body) and records. The server ends once every clone of the client is
/// dropped; its task then returns the calls.
pub fn mock_api_server(
    mut answer: impl FnMut(&str, &str, &Value) -> (u16, Value) + Send + 'static,
) -> (Client, tokio::task::JoinHandle<Vec<Call>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let server = tokio::spawn(async move {
        let mut calls = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let method = req.method().to_string();
            let path = req.uri().path().to_owned();
            let bytes = req.into_body().collect_bytes().await.unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let (status, reply) = answer(&method, &path, &body);
            let resp = Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()));
            if let Ok(resp) = resp {
                send.send_response(resp);
            }
            calls.push(Call { method, path, body });
        }
        calls
    });
    (client, server)
}

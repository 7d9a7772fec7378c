//! The HTTP API of a [`Stack`] started in this process on a free port, and a small client.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use sdxl_worker::api::{self, ApiState};
use sdxl_worker::config::Config;
use serde_json::Value;

/// An API server running in a task of this test.
pub struct Api {
    pub base: String,
    pub client: reqwest::Client,
    pub token: Option<String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<()>,
}

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub bytes: Vec<u8>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.bytes)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The stable code of an error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {}", self.text()))
            .to_owned()
    }
}

impl Api {
    /// Serve `config` on 127.0.0.1 and a free port.
    pub async fn start(config: Config) -> Api {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let state = ApiState::connect(config).await.expect("API connects");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            api::serve(state, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("API serves");
        });
        Api {
            base,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .unwrap(),
            token: None,
            stop: Some(stop),
            handle,
        }
    }

    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api {
            base: self.base.clone(),
            client: self.client.clone(),
            token: token.map(str::to_owned),
            stop: None,
            handle: tokio::spawn(async {}),
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.handle).await;
        }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        };
        let mut builder = self.client.request(method, url);
        if let Some(token) = &self.token {
            builder = builder.bearer_auth(token);
        }
        builder
    }

    async fn send(builder: reqwest::RequestBuilder) -> Reply {
        let response = builder.send().await.expect("HTTP request");
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = response.bytes().await.expect("response body").to_vec();
        Reply {
            status,
            content_type,
            bytes,
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        Api::send(self.request(reqwest::Method::GET, path)).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        Api::send(self.request(reqwest::Method::DELETE, path)).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post_raw(path, serde_json::to_vec(body).unwrap(), "application/json")
            .await
    }

    pub async fn post_raw(&self, path: &str, body: Vec<u8>, content_type: &str) -> Reply {
        Api::send(
            self.request(reqwest::Method::POST, path)
                .header("content-type", content_type)
                .body(body),
        )
        .await
    }

    pub async fn request_method(&self, method: &str, path: &str) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut builder = self.request(method.clone(), path);
        if method == reqwest::Method::POST {
            builder = builder
                .header("content-type", "application/json")
                .body("{}");
        }
        Api::send(builder).await
    }

    /// Server-sent events of `path` until the stream ends or `timeout`: `(event, data)`.
    pub async fn events(&self, path: &str, timeout: Duration) -> Vec<(String, Value)> {
        let response = self
            .request(reqwest::Method::GET, path)
            .send()
            .await
            .expect("SSE request");
        assert_eq!(response.status().as_u16(), 200);
        let mut stream = response.bytes_stream();
        let deadline = Instant::now() + timeout;
        let mut buffer = String::new();
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.next()).await {
                Ok(Some(Ok(chunk))) => buffer.push_str(&String::from_utf8_lossy(&chunk)),
                Ok(Some(Err(e))) => panic!("SSE stream failed: {e}"),
                Ok(None) => break,
                Err(_) => panic!("SSE stream did not end within {timeout:?}: {events:?}"),
            }
            while let Some(end) = buffer.find("\n\n") {
                let block: String = buffer.drain(..end + 2).collect();
                let mut event = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() {
                    events.push((event, serde_json::from_str(&data).unwrap()));
                }
            }
        }
        events
    }

    /// Polls `GET path` until `done` holds for its JSON.
    pub async fn wait_get_until(&self, path: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reply = self.get(path).await;
            let value = reply.json();
            if reply.status == 200 && done(&value) {
                return value;
            }
            if Instant::now() >= deadline {
                panic!("GET {path} never satisfied the condition: {value:#}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls `GET /v1/jobs/{id}` until `done` holds.
    pub async fn wait_job(
        &self,
        id: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let reply = self.get(&format!("/v1/jobs/{id}")).await;
            if reply.status == 200 {
                let job = reply.json();
                if done(&job) {
                    return job;
                }
                if Instant::now() >= deadline {
                    panic!("job {id} did not get there in {timeout:?}: {job:#}");
                }
            } else if Instant::now() >= deadline {
                panic!("job {id}: {} {}", reply.status, reply.text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

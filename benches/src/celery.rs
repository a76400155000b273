//! A Celery task publish as kombu sends it (protocol 2), as a [`MessageFacts`].

use sluice::plugin::MessageFacts;

/// One Celery task message: headers and properties as Celery 5 sets them.
#[derive(Debug, Clone)]
pub struct CeleryMessage {
    producer: String,
    headers: Vec<(&'static str, String)>,
    properties: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl CeleryMessage {
    /// A task publish of `task` with a fixed task id.
    pub fn new(task: &str) -> Self {
        let id = "9b1f3c1e-5c2d-4d8e-9a47-2f6b8e0d4c11".to_string();
        let headers = vec![
            ("lang", "py".to_string()),
            ("task", task.to_string()),
            ("id", id.clone()),
            ("shadow", String::new()),
            ("eta", String::new()),
            ("expires", String::new()),
            ("group", String::new()),
            ("group_index", String::new()),
            ("retries", "0".to_string()),
            ("timelimit", "[null, null]".to_string()),
            ("root_id", id.clone()),
            ("parent_id", String::new()),
            ("argsrepr", "(42,)".to_string()),
            ("kwargsrepr", "{'force': True}".to_string()),
            ("origin", "gen4242@web-7f9c6d5b8-x2k4p".to_string()),
            ("ignore_result", "False".to_string()),
            ("replaced_task_nesting", "0".to_string()),
            ("stamped_headers", String::new()),
            ("stamps", "{}".to_string()),
        ];
        let properties = vec![
            ("correlation_id", id),
            (
                "reply_to",
                "4d2b6a0e-7c1f-3e8a-b5d9-0a1c2e3f4b5d".to_string(),
            ),
            ("content_type", "application/json".to_string()),
            ("content_encoding", "utf-8".to_string()),
            ("delivery_mode", "2".to_string()),
            ("priority", "0".to_string()),
        ];
        let body = br#"[[42], {"force": true}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#.to_vec();
        Self {
            producer: "web".to_string(),
            headers,
            properties,
            body,
        }
    }
}

impl MessageFacts for CeleryMessage {
    fn protocol(&self) -> &str {
        "amqp091"
    }
    fn producer(&self) -> &str {
        &self.producer
    }
    fn vhost(&self) -> &str {
        "/"
    }
    fn user(&self) -> Option<&str> {
        Some("web")
    }
    fn peer(&self) -> Option<String> {
        Some("10.0.3.17:51234".to_string())
    }
    fn client_property(&self, name: &str) -> Option<String> {
        (name == "connection_name").then(|| "web-7f9c6d5b8-x2k4p".to_string())
    }
    fn exchange(&self) -> &str {
        ""
    }
    fn routing_key(&self) -> &str {
        "celery"
    }
    fn property(&self, name: &str) -> Option<String> {
        self.properties
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    }
    fn header_names(&self) -> Vec<String> {
        self.headers.iter().map(|(k, _)| k.to_string()).collect()
    }
    fn body_size(&self) -> u64 {
        self.body.len() as u64
    }
    fn body(&self, offset: u64, len: u32) -> Vec<u8> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.body.len());
        let end = start.saturating_add(len as usize).min(self.body.len());
        self.body.get(start..end).unwrap_or_default().to_vec()
    }
}

/// One published message, as a policy sees it. Every field is fetched from the proxy when
/// asked for, so read only what the decision needs.
pub trait Message {
    /// Wire protocol: "amqp091".
    fn protocol(&self) -> String;
    /// The producer's identity (see `[identity]` in the proxy config).
    fn producer(&self) -> String;
    /// AMQP virtual host.
    fn vhost(&self) -> String;
    /// Authenticated user, if any.
    fn user(&self) -> Option<String>;
    /// Client address `ip:port`.
    fn peer(&self) -> Option<String>;
    /// A client property from the connection handshake, e.g. "connection_name".
    fn client_property(&self, name: &str) -> Option<String>;
    /// Destination exchange ("" is the default exchange).
    fn exchange(&self) -> String;
    /// Routing key.
    fn routing_key(&self) -> String;
    /// A message property: "content_type", "priority", "message_id", "app_id", "user_id", ...
    fn property(&self, name: &str) -> Option<String>;
    /// An application header as text (Celery: "task", "id").
    fn header(&self, name: &str) -> Option<String>;
    /// Names of all application headers.
    fn header_names(&self) -> Vec<String>;
    /// Body size in bytes.
    fn body_size(&self) -> u64;
    /// Up to `len` body bytes from `offset` (copies them into the plugin).
    fn body(&self, offset: u64, len: u32) -> Vec<u8>;

    /// The `priority` property as a number, if set and valid.
    fn priority(&self) -> Option<u8> {
        self.property("priority")?.parse().ok()
    }
}

#[cfg(target_arch = "wasm32")]
impl Message for crate::bindings::sluice::policy::types::Message {
    fn protocol(&self) -> String {
        self.protocol()
    }
    fn producer(&self) -> String {
        self.producer()
    }
    fn vhost(&self) -> String {
        self.vhost()
    }
    fn user(&self) -> Option<String> {
        self.user()
    }
    fn peer(&self) -> Option<String> {
        self.peer()
    }
    fn client_property(&self, name: &str) -> Option<String> {
        self.client_property(name)
    }
    fn exchange(&self) -> String {
        self.exchange()
    }
    fn routing_key(&self) -> String {
        self.routing_key()
    }
    fn property(&self, name: &str) -> Option<String> {
        self.property(name)
    }
    fn header(&self, name: &str) -> Option<String> {
        self.header(name)
    }
    fn header_names(&self) -> Vec<String> {
        self.header_names()
    }
    fn body_size(&self) -> u64 {
        self.body_size()
    }
    fn body(&self, offset: u64, len: u32) -> Vec<u8> {
        self.body(offset, len)
    }
}

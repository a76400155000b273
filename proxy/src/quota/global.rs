//! Global quotas: one token bucket per (quota, producer) in Redis, shared by every sidecar, and
//! spent locally through leases so a publish never waits on the network.
//!
//! - [`lease`]: the hot path ([`GlobalLimiter::check`]: atomics only) and the pure renewal logic
//!   (what to ask Redis for, what to do with the answer), driven by a clock so tests use a fake one.
//! - [`coordinator`]: the Redis side: one connection, the Lua script, a background task that
//!   renews leases, and the up/down state with backoff and fallback accounting.
//! - [`stats`]: the counters both keep, rendered as Prometheus text.

pub mod coordinator;
pub mod lease;
pub mod stats;

pub use coordinator::Coordinator;
pub use lease::GlobalLimiter;

use std::time::Duration;

/// What a global quota does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Fall back to a local limiter at the quota's rate divided by the expected instance count.
    Open,
    /// Treat every publish past the lease already held as over the quota.
    Closed,
}

impl FailMode {
    /// `open` or `closed`.
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Open => "open",
            FailMode::Closed => "closed",
        }
    }
}

/// The settings of a `scope = "global"` quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalScope {
    /// Behaviour while Redis is down.
    pub fail: FailMode,
    /// How many sidecars share the quota: the fallback rate is the quota's rate divided by this.
    pub instances: u32,
}

/// Where a quota's buckets live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuotaScope {
    /// In this process only (the default).
    #[default]
    Local,
    /// In Redis, shared by every sidecar with the same quota name.
    Global(GlobalScope),
}

impl QuotaScope {
    /// `"local"`, or `{"global": {"fail": ..., "instances": ...}}` (for `/v1/config`).
    pub fn describe(&self) -> serde_json::Value {
        match self {
            QuotaScope::Local => serde_json::json!("local"),
            QuotaScope::Global(g) => serde_json::json!({
                "global": {"fail": g.fail.as_str(), "instances": g.instances}
            }),
        }
    }
}

/// `[coordination]`: how sidecars share global quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coordination {
    /// `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub redis: String,
    /// Prefix of every key sluice writes.
    pub prefix: String,
    /// Longest a Redis call may take before Redis counts as down.
    pub timeout: Duration,
    /// A lease holds about this long of the local demand.
    pub lease: Duration,
}

impl Coordination {
    /// The Redis address without credentials, for logs and `/readyz`.
    pub fn redacted(&self) -> String {
        let (scheme, rest) = self
            .redis
            .split_once("://")
            .unwrap_or(("redis", &self.redis));
        let host = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
        format!("{scheme}://{host}")
    }
}

/// The Lua script that grants leases. `KEYS[i]` is one bucket (hash with `t` = tokens, `ts` =
/// server time of the last refill in µs); `ARGV` holds three numbers per key: refill rate in
/// tokens per second, burst, and tokens wanted (negative: tokens handed back). The bucket is
/// refilled by the time elapsed on Redis's own clock, so sidecars' clocks never matter. Returns
/// per key: tokens granted, µs until one token is there, tokens left.
pub const LEASE_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {}
for i, key in ipairs(KEYS) do
  local base = (i - 1) * 3
  local rate = math.max(tonumber(ARGV[base + 1]), 0.000001)
  local burst = tonumber(ARGV[base + 2])
  local want = tonumber(ARGV[base + 3])
  local s = redis.call('HMGET', key, 't', 'ts')
  local tokens = tonumber(s[1])
  local ts = tonumber(s[2])
  if tokens == nil or ts == nil then
    tokens = burst
    ts = now
  end
  if now > ts then
    tokens = math.min(burst, tokens + (now - ts) * rate / 1000000)
  end
  local granted = 0
  if want > 0 then
    granted = math.max(0, math.min(want, math.floor(tokens)))
    tokens = tokens - granted
  elseif want < 0 then
    tokens = math.min(burst, tokens - want)
  end
  local wait = 0
  if tokens < 1 then
    wait = math.ceil((1 - tokens) * 1000000 / rate)
  end
  redis.call('HSET', key, 't', tokens, 'ts', now)
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) * 1000 / rate) + 1000)
  out[#out + 1] = granted
  out[#out + 1] = wait
  out[#out + 1] = math.floor(tokens)
end
return out
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_address_hides_credentials() {
        let c = Coordination {
            redis: "rediss://app:s3cret@cache.internal:6380/2".into(),
            prefix: "sluice:".into(),
            timeout: Duration::from_millis(250),
            lease: Duration::from_millis(200),
        };
        assert_eq!(c.redacted(), "rediss://cache.internal:6380/2");
    }
}

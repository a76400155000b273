//! Tries to reach outside the sandbox: files, directories, environment, arguments, sockets,
//! name lookup, wall clock. Forwards when it got nothing; sheds with the list of what leaked
//! otherwise. Each denied attempt is counted (`denied_fs`, `denied_env`, `denied_net`, ...)
//! and logged, so a test sees every attempt was made and failed.

use sluice_policy_sdk::{export_policy, Host, Level, Message, Policy, Verdict};
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

struct Escape;

impl Policy for Escape {
    fn init(_: &str) -> Result<Self, String> {
        Ok(Escape)
    }

    fn evaluate(&self, _: &dyn Message, host: &dyn Host) -> Verdict {
        let mut leaked = Vec::new();
        let mut check = |what: &str, counter: &str, got: Option<String>| match got {
            Some(v) => leaked.push(format!("{what}: {v}")),
            None => {
                host.incr(counter, 1);
                host.log(Level::Info, &format!("{what}: denied"));
            }
        };

        check(
            "read /etc/passwd",
            "denied_fs",
            std::fs::read_to_string("/etc/passwd")
                .ok()
                .map(|s| s.len().to_string()),
        );
        check(
            "read_dir /",
            "denied_fs",
            std::fs::read_dir("/").ok().map(|d| d.count().to_string()),
        );
        check(
            "read_dir .",
            "denied_fs",
            std::fs::read_dir(".").ok().map(|d| d.count().to_string()),
        );
        check(
            "create /tmp/sluice-escape",
            "denied_fs",
            std::fs::File::create("/tmp/sluice-escape")
                .ok()
                .map(|_| "created".into()),
        );
        let vars: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
        check(
            "env vars",
            "denied_env",
            (!vars.is_empty()).then(|| vars.join(",")),
        );
        check("env HOME", "denied_env", std::env::var("HOME").ok());
        check(
            "args",
            "denied_env",
            (std::env::args().count() > 0).then(|| std::env::args().collect::<Vec<_>>().join(" ")),
        );
        check(
            "tcp 127.0.0.1:5672",
            "denied_net",
            TcpStream::connect_timeout(&([127, 0, 0, 1], 5672).into(), Duration::from_millis(100))
                .ok()
                .map(|_| "connected".into()),
        );
        check(
            "udp bind",
            "denied_net",
            UdpSocket::bind("0.0.0.0:0").ok().map(|_| "bound".into()),
        );
        check(
            "resolve localhost",
            "denied_net",
            ("localhost", 80)
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .map(|a| a.to_string()),
        );
        // The wall clock reads as the epoch: plugins get time only from the host's clock.
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        check(
            "wall clock",
            "denied_clock",
            (wall > Duration::from_secs(1)).then(|| format!("{wall:?}")),
        );

        if leaked.is_empty() {
            Verdict::Forward
        } else {
            Verdict::shed(format!("leaked: {}", leaked.join("; ")))
        }
    }
}

export_policy!(Escape);

//! The processes under test: sluice and HAProxy started as children with generated configs on
//! loopback, and what /proc says about them (CPU seconds, resident memory).

use anyhow::{bail, Context, Result};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released for the child to take).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("bind an ephemeral port")?;
    Ok(l.local_addr()?.port())
}

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Proc {
    /// What it is (for messages).
    pub name: String,
    child: Child,
    /// Where it accepts AMQP clients.
    pub addr: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
}

impl Proc {
    /// Start `cmd`, logging to `log`, and wait until `addr` accepts TCP connections.
    pub fn start(name: &str, mut cmd: Command, addr: SocketAddr, log: &Path) -> Result<Proc> {
        let out =
            std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .with_context(|| format!("start {name}: {cmd:?}"))?;
        let mut p = Proc {
            name: name.to_string(),
            child,
            addr,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(p);
            }
            if let Some(status) = p.child.try_wait()? {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                bail!("{name} exited with {status} before listening on {addr}:\n{tail}");
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} did not listen on {addr} within 60 s (log: {})",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `amqp://guest:guest@<addr>/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`, 100 on Linux).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// User plus system CPU seconds a process has used so far (all its threads).
pub fn cpu_seconds(pid: u32, ticks: f64) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: fields are counted after its closing ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After ')': state is field 3, so utime (14) and stime (15) are at 11 and 12.
    let utime: f64 = f.get(11).context("no utime")?.parse()?;
    let stime: f64 = f.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / ticks)
}

/// CPU seconds of a process's live threads in nanosecond resolution (the first field of
/// `/proc/<pid>/task/*/schedstat`), or `None` where the kernel has no schedstat. Tick-based
/// `/proc/<pid>/stat` moves in 10 ms steps, too coarse for a one-second leg; threads that exit
/// during a leg are missed, so use this only for processes whose threads live long (the proxies,
/// the broker).
pub fn cpu_seconds_precise(pid: u32) -> Option<f64> {
    let mut ns: u64 = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let s = std::fs::read_to_string(t.path().join("schedstat")).ok()?;
        ns += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(ns as f64 / 1e9)
}

/// Resident memory of a process in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// The pid of the largest (by `VmRSS`) process whose command name is `comm`: for `beam.smp`
/// the broker rather than a short-lived `rabbitmqctl`.
pub fn find_pid(comm: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let c = std::fs::read_to_string(e.path().join("comm")).ok()?;
            (c.trim() == comm).then_some(pid)
        })
        .max_by_key(|pid| rss_kib(*pid).unwrap_or(0))
}

/// An HAProxy in TCP mode on `port`, forwarding to `broker`.
pub fn haproxy_config(port: u16, broker: &str) -> String {
    format!(
        "global\n    maxconn 5000\n\n\
         defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\n\
         listen amqp\n    bind 127.0.0.1:{port}\n    server broker {broker}\n"
    )
}

/// Start HAProxy (`haproxy -f cfg -db`) in front of `broker`.
pub fn start_haproxy(bin: &str, dir: &Path, broker: &str) -> Result<Proc> {
    let port = free_port()?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, haproxy_config(port, broker))?;
    let mut cmd = Command::new(bin);
    cmd.arg("-f").arg(&cfg).arg("-db");
    Proc::start(
        "haproxy",
        cmd,
        SocketAddr::from(([127, 0, 0, 1], port)),
        &dir.join("haproxy.log"),
    )
}

/// How sluice is configured for a leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SluiceMode {
    /// No quotas, no policies: the pass-through cost.
    NoRules,
    /// A per-producer quota so large it never fires: the quota check's cost.
    Quotas,
    /// That quota plus the `celery_task_quota` plugin with limits that never fire.
    Plugin,
}

impl SluiceMode {
    /// Short name used in tables and `--targets`.
    pub fn name(self) -> &'static str {
        match self {
            SluiceMode::NoRules => "sluice",
            SluiceMode::Quotas => "sluice-quotas",
            SluiceMode::Plugin => "sluice-plugin",
        }
    }
}

const NEVER_FIRES_QUOTA: &str = r#"
[[quota]]
name = "per-producer"
match = { producer = "*" }
messages = "100000000/s"
bytes = "100GiB/s"
burst = 100000000
on_exceed = "shed"
"#;

/// The sluice config of a mode, listening on `port`.
pub fn sluice_config(mode: SluiceMode, port: u16, broker: &str, plugin: &Path) -> String {
    let mut s = format!(
        "# Generated by the e2e harness.\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"amqp\"\nprotocol = \"amqp091\"\n\
         listen = \"127.0.0.1:{port}\"\nupstream = \"{broker}\"\n\n\
         # The harness opens many connections with one name (idle-connection RSS); the tarpit\n\
         # is not what is measured here.\n\
         [tarpit]\nrate = \"off\"\n\n\
         [limits]\nmax_connections = 20000\nmax_connections_per_producer = 20000\n"
    );
    if mode != SluiceMode::NoRules {
        s.push_str(NEVER_FIRES_QUOTA);
    }
    if mode == SluiceMode::Plugin {
        s.push_str(&format!(
            "\n[[policy]]\nname = \"celery-tasks\"\nplugin = \"{}\"\n\
             config = {{ default = \"1000000000/s\", limits = [{{ match = \"reports.*\", rate = \"100000000/s\" }}], critical = [\"auth.*\"] }}\n",
            plugin.display()
        ));
    }
    s
}

/// Write a mode's config and validate it with `sluice check`; `Err` holds sluice's report.
pub fn check_sluice_config(bin: &Path, path: &Path) -> Result<(), String> {
    let out = Command::new(bin)
        .arg("check")
        .arg(path)
        .output()
        .map_err(|e| format!("run {} check: {e}", bin.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
        .trim()
        .to_string())
    }
}

/// Start `sluice run -c <generated config>` in a mode.
pub fn start_sluice(
    bin: &Path,
    dir: &Path,
    mode: SluiceMode,
    broker: &str,
    plugin: &Path,
    tag: &str,
) -> Result<Proc> {
    let port = free_port()?;
    let cfg = dir.join(format!("{}{tag}.toml", mode.name()));
    std::fs::write(&cfg, sluice_config(mode, port, broker, plugin))?;
    let mut cmd = Command::new(bin);
    cmd.arg("run").arg("-c").arg(&cfg);
    Proc::start(
        mode.name(),
        cmd,
        SocketAddr::from(([127, 0, 0, 1], port)),
        &dir.join(format!("{}{tag}.log", mode.name())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_of_this_process_is_readable() {
        let t = clock_ticks();
        let pid = std::process::id();
        assert!(cpu_seconds(pid, t).unwrap() >= 0.0);
        if let Some(c) = cpu_seconds_precise(pid) {
            assert!(c > 0.0);
        }
        assert!(rss_kib(pid).unwrap() > 0);
    }

    #[test]
    fn configs_name_the_port_and_broker() {
        let c = sluice_config(
            SluiceMode::Plugin,
            5999,
            "127.0.0.1:5672",
            Path::new("/p.wasm"),
        );
        assert!(c.contains("127.0.0.1:5999") && c.contains("[[policy]]") && c.contains("/p.wasm"));
        assert!(
            !sluice_config(SluiceMode::NoRules, 1, "b:1", Path::new("x")).contains("[[quota]]")
        );
        assert!(haproxy_config(6000, "127.0.0.1:5672").contains("bind 127.0.0.1:6000"));
    }
}

//! The deployment files under `config/deploy/` agree with the code: the Kubernetes example's
//! config is valid and runs, its probes hit endpoints that answer without the admin token, its
//! ports and paths are the ones the config and the image use, its preStop command exists; the
//! systemd unit runs the documented command and is hardened; the image and the static build
//! notes name the same binary path. Files that cannot run here (no cluster) are parsed and
//! cross-checked.

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use sluice_tests::{broker_addr, http, sluice_bin, unique, Sluice};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TOKEN_ENV: &str = "SLUICE_ADMIN_TOKEN";
const PROBE_ENV: &str = "SLUICE_PROBE_PASSWORD";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> Result<String> {
    std::fs::read_to_string(repo().join(rel)).with_context(|| format!("reading {rel}"))
}

/// Every document of a YAML stream (documents separated by `---` lines), as JSON values.
fn yaml_docs(text: &str) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    let mut doc = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let v: Value = serde_yaml::from_str(&doc)?;
            if !v.is_null() {
                out.push(v);
            }
            doc.clear();
        } else {
            doc.push_str(line);
            doc.push('\n');
        }
    }
    Ok(out)
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name}"))
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(prefix: &str) -> Result<TempDir> {
    let p = std::env::temp_dir().join(unique(prefix));
    std::fs::create_dir_all(&p)?;
    Ok(TempDir(p))
}

/// The port number of a probe or annotation: a number, or the name of a container port.
fn port_of(container: &Value, port: &Value) -> Result<u64> {
    if let Some(n) = port.as_u64() {
        return Ok(n);
    }
    let name = port
        .as_str()
        .context("port is neither a number nor a name")?;
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .with_context(|| format!("no container port named {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_sidecar_example_agrees_with_the_code_and_its_config_runs() -> Result<()> {
    let docs = yaml_docs(&read("config/deploy/kubernetes/sluice-sidecar.yaml")?)?;
    let cm = find(&docs, "ConfigMap", "sluice-config")?;
    let deploy = find(&docs, "Deployment", "billing-worker")?;
    let pod = &deploy["spec"]["template"];
    let spec = &pod["spec"];
    ensure!(
        deploy["spec"]["selector"]["matchLabels"]
            .as_object()
            .context("no selector")?
            .iter()
            .all(|(k, v)| pod["metadata"]["labels"][k] == *v),
        "the selector does not select the pod template"
    );
    // sluice is a native sidecar (starts before, stops after the app); the app is a container.
    let sidecar = spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "sluice")
        .context("no sluice init container")?;
    ensure!(
        sidecar["restartPolicy"] == "Always",
        "sluice is not a sidecar"
    );
    let app = spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "app")
        .context("no app container")?;

    // The config file sluice is told to read is the ConfigMap's, through the volume.
    let args = strings(&sidecar["args"]);
    ensure!(args.first().map(String::as_str) == Some("run"), "{args:?}");
    let cfg_path = args
        .iter()
        .position(|a| a == "-c" || a == "--config")
        .and_then(|i| args.get(i + 1))
        .context("no -c in args")?;
    let mount = sidecar["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| {
            m["mountPath"]
                .as_str()
                .is_some_and(|p| Path::new(cfg_path).starts_with(p))
        })
        .context("the config path is on no volume mount")?;
    ensure!(
        mount.get("subPath").is_none(),
        "subPath mounts never update"
    );
    let mount_path = mount["mountPath"].as_str().unwrap_or_default();
    let volume = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == mount["name"])
        .context("mounted volume not defined")?;
    // Materialise the projected volume as the kubelet would.
    let dir = temp_dir("k8s-volume")?;
    let mut projected = Vec::new();
    for src in volume["projected"]["sources"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let cm_name = src["configMap"]["name"]
            .as_str()
            .context("not a configMap")?;
        for item in src["configMap"]["items"].as_array().into_iter().flatten() {
            let key = item["key"].as_str().context("item key")?;
            let path = item["path"].as_str().context("item path")?;
            let dest = dir.0.join(path);
            std::fs::create_dir_all(dest.parent().context("no parent")?)?;
            match cm_name {
                "sluice-config" => std::fs::write(
                    &dest,
                    cm["data"][key]
                        .as_str()
                        .with_context(|| format!("no key {key}"))?,
                )?,
                // Created from the built plugins (see the file's header).
                "sluice-plugins" => {
                    let built = repo().join("plugins/dist").join(key);
                    ensure!(
                        built.is_file(),
                        "{} missing: run `make plugins`",
                        built.display()
                    );
                    std::fs::copy(built, &dest)?;
                }
                other => bail!("unknown ConfigMap {other}"),
            }
            projected.push(path.to_string());
        }
    }
    let rel = Path::new(cfg_path)
        .strip_prefix(mount_path)
        .context("config path outside the mount")?;
    let config_file = dir.0.join(rel);
    ensure!(config_file.is_file(), "{cfg_path} is not projected");

    // The token the non-loopback admin API needs comes from a Secret in the container env.
    let env_names: Vec<String> = sidecar["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect();
    ensure!(env_names.iter().any(|n| n == TOKEN_ENV), "{env_names:?}");
    ensure!(env_names.iter().any(|n| n == PROBE_ENV), "{env_names:?}");
    let token = "k8s-example-token-0123456789abcdef";
    // Safe here: no other test of this binary reads these variables. The probe logs in as the
    // test broker's guest.
    std::env::set_var(TOKEN_ENV, token);
    std::env::set_var(PROBE_ENV, "guest");

    // `sluice check` accepts the projected config (plugins compiled, broker unreachable here).
    let check = Command::new(sluice_bin()?)
        .arg("check")
        .arg(&config_file)
        .env(TOKEN_ENV, token)
        .env(PROBE_ENV, "guest")
        .output()?;
    ensure!(
        check.status.success(),
        "sluice check rejects the example config:\n{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let cfg = sluice::config::load(&config_file).map_err(|r| anyhow::anyhow!("{r}"))?;
    for p in &cfg.policies {
        let rel = p.plugin.strip_prefix(&dir.0).unwrap_or(&p.plugin);
        ensure!(
            projected.iter().any(|x| Path::new(x) == rel),
            "plugin {} is not projected",
            rel.display()
        );
    }

    // Ports: the admin API and the listener are where the Pod says they are.
    let admin_port = cfg.admin.listen.port() as u64;
    ensure!(
        !cfg.admin.listen.ip().is_loopback(),
        "the kubelet cannot probe loopback"
    );
    let listener = cfg.listeners.first().context("no listener")?;
    let amqp_port = listener.listen.port() as u64;
    ensure!(port_of(sidecar, &"admin".into())? == admin_port);
    ensure!(port_of(sidecar, &"amqp".into())? == amqp_port);
    ensure!(
        listener.listen.ip().is_loopback(),
        "the AMQP listener should only be reachable from the Pod"
    );
    let annotations = &pod["metadata"]["annotations"];
    ensure!(annotations["prometheus.io/port"] == admin_port.to_string());
    ensure!(annotations["prometheus.io/path"] == "/metrics");
    let url = app["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "AMQP_URL")
        .and_then(|e| e["value"].as_str())
        .context("no AMQP_URL for the app")?;
    ensure!(
        url.starts_with(&format!("amqp://127.0.0.1:{amqp_port}/")),
        "the app publishes to {url}, sluice listens on {amqp_port}"
    );

    // Probes: paths the admin API serves, on its port.
    let probes: BTreeMap<&str, &str> = [
        ("readinessProbe", "/readyz"),
        ("livenessProbe", "/healthz"),
        ("startupProbe", "/healthz"),
    ]
    .into_iter()
    .collect();
    for (probe, path) in &probes {
        let get = &sidecar[*probe]["httpGet"];
        ensure!(get["path"] == *path, "{probe} path {}", get["path"]);
        ensure!(
            port_of(sidecar, &get["port"])? == admin_port,
            "{probe} port"
        );
    }

    // Lifecycle: preStop drains with the real CLI, within the grace period.
    let pre_stop = strings(&sidecar["lifecycle"]["preStop"]["exec"]["command"]);
    ensure!(
        pre_stop.get(1).map(String::as_str) == Some("drain"),
        "{pre_stop:?}"
    );
    let dockerfile = read("config/deploy/Dockerfile")?;
    let entry = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .context("no ENTRYPOINT")?;
    let entry: Vec<String> = serde_json::from_str(entry)?;
    ensure!(
        pre_stop.first() == entry.first(),
        "preStop runs {:?}, the image's binary is {:?}",
        pre_stop.first(),
        entry.first()
    );
    let user = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("USER "))
        .and_then(|u| u.split(':').next())
        .context("no USER")?;
    ensure!(sidecar["securityContext"]["runAsUser"].to_string() == user);
    let exposed: Vec<u64> = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .context("no EXPOSE")?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    ensure!(
        exposed.contains(&admin_port) && exposed.contains(&amqp_port),
        "{exposed:?}"
    );
    let timeout = pre_stop
        .iter()
        .position(|a| a == "--timeout")
        .and_then(|i| pre_stop.get(i + 1))
        .context("preStop without --timeout")?;
    let timeout = sluice::config::units::parse_duration(timeout).map_err(anyhow::Error::msg)?;
    let grace = spec["terminationGracePeriodSeconds"]
        .as_u64()
        .context("no terminationGracePeriodSeconds")?;
    // preStop, then sluice's own shutdown (10 s at most).
    ensure!(
        grace >= timeout.as_secs() + 10,
        "grace {grace} s < drain {timeout:?} + 10 s"
    );
    let res = &sidecar["resources"];
    ensure!(res["requests"]["cpu"].is_string() && res["requests"]["memory"].is_string());
    ensure!(res["limits"]["memory"].is_string() && res["limits"]["cpu"].is_null());

    // The config really runs: same file, loopback ports, the test broker. Probes and /metrics
    // answer without the token (the kubelet and Prometheus send none); the rest needs it.
    let run_cfg = std::fs::read_to_string(&config_file)?
        .replace(&cfg.admin.listen.to_string(), "127.0.0.1:0")
        .replace(&listener.listen.to_string(), "127.0.0.1:0")
        .replace(&listener.upstream.addr, &broker_addr())
        .replace(
            &format!("user = \"{}\"", listener.probe.user),
            "user = \"guest\"",
        );
    std::fs::write(&config_file, run_cfg)?;
    let s = Sluice::start_file(&config_file).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = http(s.admin, "GET", "/readyz").await?;
        if status == 200 {
            break;
        }
        ensure!(
            status == 503 && Instant::now() < deadline,
            "/readyz: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for path in ["/healthz", "/metrics"] {
        let (status, _) = http(s.admin, "GET", path).await?;
        ensure!(status == 200, "{path} answered {status} without a token");
    }
    let (status, _) = http(s.admin, "GET", "/v1/producers").await?;
    ensure!(
        status == 401,
        "/v1/producers answered {status} without a token"
    );
    // The preStop command, pointed at this sluice: no client connections, so it returns at once.
    let mut drain_args: Vec<String> = pre_stop.iter().skip(1).cloned().collect();
    if let Some(i) = drain_args.iter().position(|a| a == "--admin") {
        drain_args[i + 1] = s.admin.to_string();
    }
    let drained = Command::new(sluice_bin()?).args(&drain_args).output()?;
    ensure!(
        drained.status.success(),
        "sluice {drain_args:?}: {}",
        String::from_utf8_lossy(&drained.stderr)
    );
    s.stop().await;
    Ok(())
}

#[test]
fn podmonitor_scrapes_the_admin_port_as_the_job_the_alerts_expect() -> Result<()> {
    let docs = yaml_docs(&read("config/deploy/kubernetes/podmonitor.yaml")?)?;
    let pm = find(&docs, "PodMonitor", "sluice")?;
    let pod = yaml_docs(&read("config/deploy/kubernetes/sluice-sidecar.yaml")?)?
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .context("no Deployment")?;
    let labels = &pod["spec"]["template"]["metadata"]["labels"];
    for (k, v) in pm["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("no selector")?
    {
        ensure!(
            labels[k] == *v,
            "the PodMonitor does not select the pod ({k})"
        );
    }
    let ep = &pm["spec"]["podMetricsEndpoints"][0];
    ensure!(ep["port"] == "admin" && ep["path"] == "/metrics");
    ensure!(ep["relabelings"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["targetLabel"] == "job" && r["replacement"] == "sluice"));
    ensure!(read("config/prometheus/sluice-alerts.yml")?.contains("up{job=\"sluice\"}"));
    Ok(())
}

/// `[Section]` → key → values (a key may repeat).
fn ini(text: &str) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.entry(section.clone())
                .or_default()
                .entry(k.trim().to_string())
                .or_default()
                .push(v.trim().to_string());
        }
    }
    out
}

#[test]
fn systemd_unit_runs_the_documented_command_and_is_hardened() -> Result<()> {
    let text = read("config/deploy/systemd/sluice.service")?;
    let unit = ini(&text);
    let service = unit.get("Service").context("no [Service]")?;
    let one = |k: &str| -> Result<&str> {
        service
            .get(k)
            .and_then(|v| v.last())
            .map(String::as_str)
            .with_context(|| format!("no {k}"))
    };
    let exec: Vec<&str> = one("ExecStart")?.split_whitespace().collect();
    ensure!(exec.get(1..3) == Some(&["run", "-c"][..]), "{exec:?}");
    let config = exec.get(3).context("no config path")?;
    ensure!(
        Path::new(config).parent()
            == Some(
                Path::new("/etc")
                    .join(one("ConfigurationDirectory")?)
                    .as_path()
            ),
        "{config} is not in ConfigurationDirectory"
    );
    let pre: Vec<&str> = one("ExecStartPre")?.split_whitespace().collect();
    ensure!(
        pre.first() == exec.first() && pre.get(1) == Some(&"check") && pre.get(2) == Some(config)
    );
    ensure!(one("ExecReload")?.contains("-HUP"), "reload is SIGHUP");
    ensure!(one("KillSignal")? == "SIGTERM");
    let stop: u64 = one("TimeoutStopSec")?.parse()?;
    ensure!(
        stop > 10,
        "TimeoutStopSec {stop} leaves no room for the 10 s drain"
    );
    for (k, v) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("DynamicUser", "yes"),
        ("RestrictNamespaces", "yes"),
        ("CapabilityBoundingSet", ""),
    ] {
        ensure!(one(k)? == v, "{k}={} (want {v})", one(k)?);
    }
    // The Wasm compiler maps generated code executable.
    ensure!(service.get("MemoryDenyWriteExecute").is_none());
    ensure!(one("RestrictAddressFamilies")?.contains("AF_INET"));
    // The arguments are ones the CLI accepts.
    let help = Command::new(sluice_bin()?)
        .args(["run", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in exec.iter().skip(2).filter(|a| a.starts_with('-')) {
        ensure!(help.contains(flag), "`sluice run` has no {flag}");
    }
    // systemd's own checks, on a copy that points at the binary built here.
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        println!("NOTE: systemd-analyze is not installed: the unit was only parsed");
        return Ok(());
    }
    let dir = temp_dir("systemd")?;
    let copy = dir.0.join("sluice.service");
    std::fs::write(
        &copy,
        text.replace(exec[0], &sluice_bin()?.display().to_string()),
    )?;
    let verify = Command::new(analyze).arg("verify").arg(&copy).output()?;
    let complaints = String::from_utf8_lossy(&verify.stderr).into_owned();
    ensure!(
        verify.status.success() && !complaints.contains("sluice.service"),
        "systemd-analyze verify: {complaints}"
    );
    let sec = Command::new(analyze)
        .args(["security", "--offline=true"])
        .arg(&copy)
        .output()?;
    let report = String::from_utf8_lossy(&sec.stdout);
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for sluice.service:").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no exposure level in:\n{report}"))?;
    println!("systemd-analyze security: exposure {score}");
    ensure!(score <= 2.0, "exposure {score} > 2.0:\n{report}");
    Ok(())
}

#[test]
fn static_build_notes_name_the_binary_the_image_and_the_pod_use() -> Result<()> {
    let notes = read("config/deploy/README.md")?;
    ensure!(notes.contains("cargo build --release --target x86_64-unknown-linux-musl -p sluice"));
    let dockerfile = read("config/deploy/Dockerfile")?;
    ensure!(dockerfile.contains("x86_64-unknown-linux-musl/release/sluice"));
    ensure!(dockerfile.contains("COPY sluice /sluice"));
    let readme = read("README.md")?;
    ensure!(
        readme.contains("config/deploy/README.md"),
        "the README does not point at the static build notes"
    );
    Ok(())
}

//! TLS on both legs: a lapin client speaks TLS to sluice, sluice speaks TLS to the broker
//! (stunnel in front of the local RabbitMQ, verified against our test CA), and every way the
//! broker's certificate can be wrong fails clearly instead of connecting.

use anyhow::{bail, ensure, Context, Result};
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use sluice_tests::{unique, Broker, Queues};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A CA and certificates signed by it, written as PEM files in a temp dir.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new() -> Result<Pki> {
        let dir = std::env::temp_dir().join(unique("sluice-tls"));
        std::fs::create_dir_all(&dir)?;
        Ok(Pki { dir })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A CA named `name` → (`name`.pem, its key pair and params for signing).
    fn ca(&self, name: &str) -> Result<(rcgen::Certificate, KeyPair)> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name
            .push(DnType::CommonName, format!("sluice test CA {name}"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem())?;
        Ok((cert, key))
    }

    /// A leaf for `hosts`, signed by `ca` → `name`.pem + `name`.key.
    fn leaf(
        &self,
        name: &str,
        hosts: &[&str],
        ca: &(rcgen::Certificate, KeyPair),
        expired: bool,
    ) -> Result<()> {
        let mut p =
            CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())?;
        p.distinguished_name.push(DnType::CommonName, hosts[0]);
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &ca.0, &ca.1)?;
        std::fs::write(self.path(&format!("{name}.pem")), cert.pem())?;
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem())?;
        Ok(())
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// stunnel terminating TLS in front of the local RabbitMQ, with the given certificate.
struct Stunnel {
    child: Child,
    port: u16,
}

impl Stunnel {
    fn start(pki: &Pki, cert: &str) -> Result<Stunnel> {
        let bin = ["stunnel4", "stunnel"]
            .into_iter()
            .find(|b| {
                Command::new(b)
                    .arg("-version")
                    .stderr(Stdio::null())
                    .stdout(Stdio::null())
                    .status()
                    .is_ok()
            })
            .context("stunnel is not installed: apt-get install -y stunnel4")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let conf = pki.path(&format!("stunnel-{cert}.conf"));
        std::fs::write(
            &conf,
            format!(
                "foreground = yes\npid =\n[amqps]\naccept = 127.0.0.1:{port}\nconnect = {}\ncert = {}\nkey = {}\n",
                sluice_tests::broker_addr(),
                pki.path(&format!("{cert}.pem")).display(),
                pki.path(&format!("{cert}.key")).display()
            ),
        )?;
        let child = Command::new(bin)
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let s = Stunnel { child, port };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("stunnel did not listen on {port}")
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A sluice whose listener terminates TLS with `server` and whose upstream is TLS to `port`.
async fn tls_sluice(pki: &Pki, port: u16, upstream_opts: &str) -> Result<(sluice::Server, String)> {
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listener]]\nname = \"amqps\"\nprotocol = \"amqp091\"\n\
         listen = \"127.0.0.1:0\"\nupstream = {{ addr = \"127.0.0.1:{port}\", tls = true, {upstream_opts} }}\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n[limits]\nconnect_timeout = \"3s\"\n",
        pki.path("sluice.pem").display(),
        pki.path("sluice.key").display(),
    );
    let cfg =
        sluice::config::parse(&text, Path::new("tls.toml")).map_err(|r| anyhow::anyhow!("{r}"))?;
    let server = sluice::Server::start(cfg)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let addr = server.listener_addr("amqps").context("no listener")?;
    Ok((
        server,
        format!("amqps://guest:guest@localhost:{}/%2f", addr.port()),
    ))
}

async fn tls_connect(url: &str, ca_pem: &str, name: &str) -> Result<Connection> {
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: Some(ca_pem.to_string()),
    };
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Ok(
        Connection::connect_with_config(url, props, tls, lapin::runtime::default_runtime()?)
            .await?,
    )
}

#[tokio::test]
async fn tls_on_both_legs_publishes_with_confirms_and_consumes() -> Result<()> {
    let pki = Pki::new()?;
    let ca = pki.ca("ca")?;
    pki.leaf("sluice", &["localhost", "127.0.0.1"], &ca, false)?;
    pki.leaf("broker", &["broker.test"], &ca, false)?;
    let stunnel = Stunnel::start(&pki, "broker")?;
    let (server, url) = tls_sluice(
        &pki,
        stunnel.port,
        &format!(
            "ca = \"{}\", server_name = \"broker.test\"",
            pki.path("ca.pem").display()
        ),
    )
    .await?;
    let broker = Broker::connect().await?;
    let q = unique("tls");
    let _g = Queues::new([q.clone()]);
    broker.queue(&q).await?;

    let ca_pem = std::fs::read_to_string(pki.path("ca.pem"))?;
    let conn = tls_connect(&url, &ca_pem, "tls-client").await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    for i in 0..200u32 {
        let c = ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                BasicProperties::default(),
            )
            .await?
            .await?;
        ensure!(c.is_ack());
    }
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "tls".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    for i in 0..200u32 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .context("delivery timed out")?
            .context("consumer ended")??;
        ensure!(d.data == i.to_be_bytes());
        d.ack(BasicAckOptions::default()).await?;
    }
    conn.close(200, "bye".into()).await?;
    // sluice's own probe reaches the TLS upstream too.
    let mut ready = 0;
    for _ in 0..30 {
        ready = sluice_tests::http(server.admin_addr(), "GET", "/readyz")
            .await?
            .0;
        if ready == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(ready == 200, "/readyz over TLS answered {ready}");
    server.shutdown(Duration::from_secs(2)).await;
    Ok(())
}

/// Connect through sluice to a broker whose certificate must not verify; return the error text.
async fn refused(pki: &Pki, broker_cert: &str, upstream_opts: &str) -> Result<String> {
    let stunnel = Stunnel::start(pki, broker_cert)?;
    let (server, url) = tls_sluice(pki, stunnel.port, upstream_opts).await?;
    let ca_pem = std::fs::read_to_string(pki.path("ca.pem"))?;
    let err = match tls_connect(&url, &ca_pem, "tls-refused").await {
        Ok(c) => {
            let _ = c.close(200, "bye".into()).await;
            bail!("sluice connected to a broker whose certificate does not verify")
        }
        Err(e) => format!("{e:#}"),
    };
    server.shutdown(Duration::from_secs(1)).await;
    Ok(err)
}

#[tokio::test]
async fn upstream_certificates_that_do_not_verify_are_refused_clearly() -> Result<()> {
    let pki = Pki::new()?;
    let ca = pki.ca("ca")?;
    let other = pki.ca("other")?;
    pki.leaf("sluice", &["localhost"], &ca, false)?;
    pki.leaf("broker", &["broker.test"], &ca, false)?;
    pki.leaf("untrusted", &["broker.test"], &other, false)?;
    pki.leaf("expired", &["broker.test"], &ca, true)?;
    let ca_opt = format!("ca = \"{}\"", pki.path("ca.pem").display());

    let e = refused(
        &pki,
        "untrusted",
        &format!("{ca_opt}, server_name = \"broker.test\""),
    )
    .await?;
    ensure!(
        e.contains("TLS to the broker failed") && e.to_lowercase().contains("issuer"),
        "untrusted CA: {e}"
    );
    let e = refused(
        &pki,
        "broker",
        &format!("{ca_opt}, server_name = \"wrong.test\""),
    )
    .await?;
    ensure!(
        e.contains("TLS to the broker failed") && e.contains("not valid for name \"wrong.test\""),
        "wrong host: {e}"
    );
    let e = refused(
        &pki,
        "expired",
        &format!("{ca_opt}, server_name = \"broker.test\""),
    )
    .await?;
    ensure!(
        e.contains("TLS to the broker failed") && e.to_lowercase().contains("expired"),
        "expired certificate: {e}"
    );
    Ok(())
}

#[test]
fn tls_config_problems_are_reported_at_their_line() -> Result<()> {
    let text = "[[listener]]\nname = \"a\"\nprotocol = \"amqp091\"\nlisten = \"127.0.0.1:0\"\n\
                upstream = { addr = \"127.0.0.1:5671\", tls = true, ca = \"/nonexistent/ca.pem\" }\n\
                tls = { cert = \"/nonexistent/cert.pem\", key = \"/nonexistent/key.pem\" }\n";
    let report = sluice::config::parse(text, Path::new("t.toml"))
        .err()
        .context("must be refused")?;
    let s = report.to_string();
    ensure!(
        s.contains("t.toml:5: upstream TLS: cannot read certificates from /nonexistent/ca.pem"),
        "{s}"
    );
    ensure!(
        s.contains(
            "t.toml:6: listener 'a': tls: cannot read certificates from /nonexistent/cert.pem"
        ),
        "{s}"
    );
    Ok(())
}

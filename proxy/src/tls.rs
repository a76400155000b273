//! TLS on both legs with rustls: termination for clients (optionally verifying client
//! certificates against a CA), and TLS to the broker (server verified against the system roots or
//! a given CA, SNI, optional client certificate). SASL inside the AMQP handshake is untouched.
//!
//! [`Stream`] is what sessions read and write: plain TCP, or TLS on either side. Plain TCP splits
//! into tokio's owned halves (no lock); TLS splits with `tokio::io::split`.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in {}", path.display()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", path.display()))
}

fn roots(ca: Option<&Path>) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for c in load_certs(path)? {
                store
                    .add(c)
                    .map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                // Unparseable system certificates are skipped, as every TLS client does.
                let _ = store.add(c);
            }
            if store.is_empty() {
                return Err(
                    "no system root certificates found: give the broker's CA with `ca`".into(),
                );
            }
        }
    }
    Ok(store)
}

/// Client-side TLS termination for one listener.
#[derive(Clone)]
pub struct ServerTls {
    /// The acceptor.
    pub acceptor: TlsAcceptor,
    /// Whether client certificates are required.
    pub verify_clients: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("verify_clients", &self.verify_clients)
            .finish()
    }
}

impl ServerTls {
    /// Build from PEM files: the certificate chain, its key, and optionally a CA that client
    /// certificates must chain to (then a client certificate is required).
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<ServerTls, String> {
        let chain = load_certs(cert)?;
        let key = load_key(key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match client_ca {
            Some(ca) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(Some(ca))?),
                    provider(),
                )
                .build()
                .map_err(|e| format!("client CA {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| format!("certificate {} and key do not match: {e}", cert.display()))?;
        config.max_early_data_size = 0;
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            verify_clients: client_ca.is_some(),
        })
    }
}

/// TLS to the broker.
#[derive(Clone)]
pub struct ClientTls {
    /// The connector.
    pub connector: TlsConnector,
    /// Name the broker's certificate must carry (and SNI).
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// Where the upstream TLS settings come from.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    /// CA bundle to verify the broker with (system roots when absent).
    pub ca: Option<PathBuf>,
    /// Name to verify and send as SNI (the host of `addr` when absent).
    pub server_name: Option<String>,
    /// Client certificate chain and key, for brokers that ask for one (SASL EXTERNAL).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// Build for a broker at `addr` (`host:port`).
    pub fn load(addr: &str, files: &ClientTlsFiles) -> Result<ClientTls, String> {
        let host = files.server_name.clone().unwrap_or_else(|| {
            addr.rsplit_once(':')
                .map(|(h, _)| h.trim_matches(|c| c == '[' || c == ']').to_string())
                .unwrap_or_else(|| addr.to_string())
        });
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| format!("'{host}' is not a valid TLS server name: {e}"))?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots(files.ca.as_deref())?);
        let config = match &files.client_cert {
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(|e| format!("client certificate {}: {e}", cert.display()))?,
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// TLS handshake over a connected socket.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<Stream> {
        let s = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await?;
        Ok(Stream::UpstreamTls(Box::new(s)))
    }
}

/// A byte stream to a client or to the broker.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS terminated by sluice (client leg).
    ClientTls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// TLS to the broker (upstream leg).
    UpstreamTls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Split into independently owned read and write halves.
    pub fn into_split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Stream::Plain(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Plain(r), WriteHalf::Plain(w))
            }
            tls => {
                let (r, w) = tokio::io::split(tls);
                (ReadHalf::Tls(r), WriteHalf::Tls(w))
            }
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self.get_mut() {
            Stream::Plain($s) => $e,
            Stream::ClientTls($s) => $e,
            Stream::UpstreamTls($s) => $e,
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write(cx, buf))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => Pin::new(s).poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::ClientTls(s) => s.is_write_vectored(),
            Stream::UpstreamTls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => Pin::new(s).poll_shutdown(cx))
    }
}

/// The read half of a [`Stream`].
pub enum ReadHalf {
    /// Plain TCP.
    Plain(OwnedReadHalf),
    /// Either TLS side.
    Tls(tokio::io::ReadHalf<Stream>),
}

/// The write half of a [`Stream`].
pub enum WriteHalf {
    /// Plain TCP.
    Plain(OwnedWriteHalf),
    /// Either TLS side.
    Tls(tokio::io::WriteHalf<Stream>),
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ReadHalf::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ReadHalf::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write(cx, buf),
            WriteHalf::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            WriteHalf::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            WriteHalf::Plain(s) => s.is_write_vectored(),
            WriteHalf::Tls(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_flush(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            WriteHalf::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WriteHalf::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

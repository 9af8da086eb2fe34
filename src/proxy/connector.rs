//! Connections to one origin server: its addresses resolved ahead of time
//! (no name resolution, hence no blocking-pool hop, on a new connection),
//! TCP with a connect timeout, and for `https://` servers a rustls handshake
//! with SNI and certificate verification against the web roots or the
//! configured CA file.

use arc_swap::ArcSwapOption;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// How often a server's host name is resolved again.
pub(crate) const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// Where a server's connections go: a literal address, or a host name
/// whose last good answer is kept.
pub(crate) enum Addresses {
    /// An IP literal: nothing to resolve, ever.
    Literal(SocketAddr),
    /// A host name, resolved at start and every [`RESOLVE_EVERY`].
    Name {
        host: String,
        port: u16,
        last_good: ArcSwapOption<Vec<SocketAddr>>,
    },
}

impl Addresses {
    pub(crate) fn new(host: &str, port: u16) -> Addresses {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        match bare.parse::<std::net::IpAddr>() {
            Ok(ip) => Addresses::Literal(SocketAddr::new(ip, port)),
            Err(_) => Addresses::Name {
                host: bare.to_string(),
                port,
                last_good: ArcSwapOption::empty(),
            },
        }
    }

    /// Whether there is a name to keep resolving.
    pub(crate) fn is_name(&self) -> bool {
        matches!(self, Addresses::Name { .. })
    }

    /// Resolves the name again; a failure keeps the last good answer.
    pub(crate) async fn refresh(&self) -> io::Result<()> {
        let Addresses::Name {
            host,
            port,
            last_good,
        } = self
        else {
            return Ok(());
        };
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), *port))
            .await?
            .collect();
        if found.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{host} has no address"),
            ));
        }
        let changed = last_good.load().as_deref() != Some(&found);
        if changed {
            tracing::debug!(%host, addresses = ?found, "origin addresses");
            last_good.store(Some(Arc::new(found)));
        }
        Ok(())
    }

    /// The addresses to connect to: the cached ones, or (only before the
    /// first answer came in) resolved now.
    async fn current(&self) -> io::Result<Arc<Vec<SocketAddr>>> {
        match self {
            Addresses::Literal(a) => Ok(Arc::new(vec![*a])),
            Addresses::Name { last_good, .. } => {
                if let Some(a) = last_good.load_full() {
                    return Ok(a);
                }
                self.refresh().await?;
                last_good
                    .load_full()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))
            }
        }
    }
}

/// TLS towards an `https://` server: the client config and the name the
/// certificate must carry (sent as SNI).
#[derive(Clone)]
pub(crate) struct TlsTarget {
    pub(crate) connector: tokio_rustls::TlsConnector,
    pub(crate) name: ServerName<'static>,
}

/// A rustls client config for origins: h1 only, verification always on,
/// against `ca` when given, else the web roots.
pub(crate) fn client_config(
    ca: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
) -> Result<Arc<rustls::ClientConfig>, rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(certs) => {
            for c in certs {
                roots.add(c)?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Opens connections to one server, whatever the request URI says (each
/// server has its own client and pool).
#[derive(Clone)]
pub(crate) struct Connector {
    pub(crate) addresses: Arc<Addresses>,
    pub(crate) tls: Option<TlsTarget>,
    pub(crate) connect_timeout: Duration,
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TokioIo<OriginStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<OriginStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let limit = this.connect_timeout;
            match tokio::time::timeout(limit, this.connect()).await {
                Ok(r) => r.map(TokioIo::new),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no connection within {limit:?}"),
                )),
            }
        })
    }
}

impl Connector {
    async fn connect(&self) -> io::Result<OriginStream> {
        let addrs = self.addresses.current().await?;
        let mut last = None;
        for addr in addrs.iter() {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    tcp.set_nodelay(true)?;
                    return match &self.tls {
                        None => Ok(OriginStream::Plain(tcp)),
                        Some(t) => {
                            let tls = t.connector.connect(t.name.clone(), tcp).await?;
                            Ok(OriginStream::Tls(Box::new(tls)))
                        }
                    };
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address")))
    }
}

/// A connection to an origin server, plain or TLS.
pub(crate) enum OriginStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Connection for OriginStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for OriginStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            OriginStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for OriginStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            OriginStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            OriginStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            OriginStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            OriginStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            OriginStream::Plain(s) => s.is_write_vectored(),
            OriginStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginStream::Plain(s) => Pin::new(s).poll_flush(cx),
            OriginStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            OriginStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            OriginStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_need_no_resolution_and_names_keep_their_last_answer() {
        let a = Addresses::new("127.0.0.1", 80);
        assert!(!a.is_name());
        assert_eq!(
            *a.current().await.unwrap(),
            vec!["127.0.0.1:80".parse().unwrap()]
        );
        let a = Addresses::new("[::1]", 8080);
        assert!(!a.is_name());
        assert_eq!(
            *a.current().await.unwrap(),
            vec!["[::1]:8080".parse().unwrap()]
        );
        let a = Addresses::new("localhost", 81);
        assert!(a.is_name());
        let first = a.current().await.expect("localhost resolves");
        assert!(first.iter().all(|s| s.port() == 81 && s.ip().is_loopback()));
        // Answered from the cache: the same allocation comes back.
        assert!(Arc::ptr_eq(&first, &a.current().await.unwrap()));
        let gone = Addresses::new("no-such-host.invalid", 80);
        assert!(gone.current().await.is_err());
    }
}

//! The CONNECT exchange with the proxy, and the tunnel as tonic's connector.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Proxy;

/// A proxy's answer to CONNECT is a status line and a few headers; more is not a proxy.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Time for the proxy to answer CONNECT, after the TCP connection to it is open.
const CONNECT_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

impl Proxy {
    /// Opens a tunnel through the proxy to `target` (`host:port`).
    pub async fn tunnel(&self, target: &str) -> Result<TcpStream, ProxyError> {
        let address = self.address();
        let mut stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|source| ProxyError::Unreachable {
                proxy: self.to_string(),
                source,
            })?;
        stream.set_nodelay(true).ok();
        let mut request = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nUser-Agent: alveolus/{}\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(credentials) = &self.credentials {
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
        }
        request.push_str("\r\n");
        let exchange = async {
            stream.write_all(request.as_bytes()).await?;
            read_response_head(&mut stream).await
        };
        let head = tokio::time::timeout(CONNECT_ANSWER_TIMEOUT, exchange)
            .await
            .map_err(|_| ProxyError::NoAnswer {
                proxy: self.to_string(),
                seconds: CONNECT_ANSWER_TIMEOUT.as_secs(),
            })?
            .map_err(|source| ProxyError::Broken {
                proxy: self.to_string(),
                message: source.to_string(),
            })?;
        let status_line = head.lines().next().unwrap_or_default().trim().to_string();
        let code = status_code(&status_line).ok_or_else(|| ProxyError::Broken {
            proxy: self.to_string(),
            message: format!(
                "its answer to CONNECT is not HTTP: {:?}",
                status_line.chars().take(80).collect::<String>()
            ),
        })?;
        match code {
            200..=299 => Ok(stream),
            // 407 is the standard answer; some proxies (tinyproxy) answer wrong credentials
            // with 401.
            401 | 407 => Err(ProxyError::Authentication {
                proxy: self.to_string(),
                status: status_line,
                sent: self.credentials.is_some(),
            }),
            _ => Err(ProxyError::Refused {
                proxy: self.to_string(),
                target: target.to_string(),
                status: status_line,
            }),
        }
        .inspect(|_| tracing::debug!(proxy = %address, %target, "tunnel open"))
    }
}

/// Why a tunnel through the proxy did not open. Each names the proxy (never its password).
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot reach the proxy at {proxy}: {source}")]
    Unreachable {
        proxy: String,
        source: std::io::Error,
    },
    #[error("the proxy at {proxy} did not answer CONNECT within {seconds} s")]
    NoAnswer { proxy: String, seconds: u64 },
    #[error("the proxy at {proxy} broke the tunnel: {message}")]
    Broken { proxy: String, message: String },
    #[error(
        "the proxy at {proxy} requires authentication ({status}): {}",
        if *.sent { "it refused the user and password in the proxy URL" }
        else { "give them in the URL, http://USER:PASSWORD@HOST:PORT" }
    )]
    Authentication {
        proxy: String,
        status: String,
        sent: bool,
    },
    #[error(
        "the proxy at {proxy} refused to open a tunnel to {target} ({status}); ask the network's administrators to allow CONNECT to this address and port"
    )]
    Refused {
        proxy: String,
        target: String,
        status: String,
    },
}

/// Reads up to the blank line that ends an HTTP response head. The coordinator speaks only
/// after the client's TLS hello, so nothing of the tunnel's own bytes can follow it yet.
async fn read_response_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && !head.ends_with(b"\n\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err(std::io::Error::other(format!(
                "its answer to CONNECT is longer than {MAX_RESPONSE_HEAD} bytes"
            )));
        }
        // One byte at a time: a read past the head would swallow the start of the tunnel.
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "it closed the connection without answering CONNECT",
            ));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// `HTTP/1.1 200 Connection established` → 200.
fn status_code(line: &str) -> Option<u16> {
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts
        .next()
        .filter(|c| c.len() == 3)
        .and_then(|c| c.parse().ok())
}

/// The connector tonic dials through: each connection a fresh tunnel to the coordinator, TLS
/// layered on top by tonic as for a direct connection.
#[derive(Clone)]
pub struct TunnelConnector {
    pub proxy: Proxy,
    /// `host:port` of the coordinator, as the kit names it.
    pub target: String,
}

impl tower_service::Service<http::Uri> for TunnelConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move { this.proxy.tunnel(&this.target).await.map(TokioIo::new) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read_strictly() {
        assert_eq!(
            status_code("HTTP/1.1 200 Connection established"),
            Some(200)
        );
        assert_eq!(
            status_code("HTTP/1.0 407 Proxy Authentication Required"),
            Some(407)
        );
        assert_eq!(status_code("SSH-2.0-OpenSSH"), None);
        assert_eq!(status_code("HTTP/1.1 2000 x"), None);
    }
}

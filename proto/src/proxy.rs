//! The outbound HTTP proxy that hospital networks put between a site and the internet.
//!
//! Agents and the researcher's CLI open a tunnel with `CONNECT host:port` and run mutual TLS
//! through it, so the proxy sees only the coordinator's address and encrypted bytes: it cannot
//! read a weight update or impersonate the coordinator. Which proxy to use follows the
//! conventions of curl and every other tool IT already configures: `--proxy URL` first, then
//! `HTTPS_PROXY` (or `https_proxy`), with `NO_PROXY` naming the hosts reached directly.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// curl's default for a proxy URL without a port.
const DEFAULT_PORT: u16 = 1080;
/// A proxy's answer to CONNECT is a status line and a few headers; more is not a proxy.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Time for the proxy to answer CONNECT, after the TCP connection to it is open.
const CONNECT_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP proxy that tunnels with CONNECT: `http://[user:password@]host[:port]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    host: String,
    port: u16,
    /// `user:password`, percent-decoded, sent as Basic authorisation.
    credentials: Option<String>,
}

/// The user name is shown, the password never: these strings reach logs.
impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let user = self
            .credentials
            .as_deref()
            .map(|c| c.split(':').next().unwrap_or_default());
        match user {
            Some(user) => write!(f, "http://{user}:***@{}", self.address()),
            None => write!(f, "http://{}", self.address()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("proxy URL {url:?} ({origin}): {message}")]
pub struct ProxyUrlError {
    /// The URL as given, with any password replaced.
    pub url: String,
    /// Where it came from: `--proxy`, `HTTPS_PROXY`…
    pub origin: String,
    pub message: String,
}

impl Proxy {
    /// Parses `url`, which came from `origin` (named in the error).
    pub fn parse(url: &str, origin: &str) -> Result<Self, ProxyUrlError> {
        let err = |message: &str| ProxyUrlError {
            url: hide_password(url),
            origin: origin.to_string(),
            message: message.to_string(),
        };
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(err(
                    "a TLS connection to the proxy itself is not supported; use http://, the tunnel inside is TLS already",
                ));
            }
            Some((scheme, _)) => {
                return Err(err(&format!(
                    "scheme {scheme:?} is not an HTTP proxy; use http://HOST:PORT"
                )));
            }
            // curl's reading of a bare `host:port`.
            None => url,
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains(['/', '?', '#']) {
            return Err(err("a proxy URL has no path: use http://HOST:PORT"));
        }
        let (credentials, host_port) = match authority.rsplit_once('@') {
            Some((userinfo, host_port)) => {
                let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                let user = percent_decode(user).ok_or_else(|| err("bad %-escape in the user"))?;
                let password =
                    percent_decode(password).ok_or_else(|| err("bad %-escape in the password"))?;
                if user.is_empty() {
                    return Err(err("a user name is needed before '@'"));
                }
                (Some(format!("{user}:{password}")), host_port)
            }
            None => (None, authority),
        };
        let (host, port) = split_host_port(host_port).map_err(|m| err(&m))?;
        if host.is_empty() {
            return Err(err("no host"));
        }
        if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
        {
            return Err(err("the host holds characters a host name cannot"));
        }
        Ok(Self {
            host,
            port: port.unwrap_or(DEFAULT_PORT),
            credentials,
        })
    }

    /// `host:port` of the proxy, brackets around an IPv6 address.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

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

fn split_host_port(host_port: &str) -> Result<(String, Option<u16>), String> {
    let port = |text: &str| {
        text.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("port {text:?} is not a port number"))
    };
    if let Some(rest) = host_port.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or("an IPv6 address opened with '[' is not closed")?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host.to_string(), Some(port(p)?))),
            None if after.is_empty() => Ok((host.to_string(), None)),
            None => Err(format!("unexpected {after:?} after the IPv6 address")),
        };
    }
    match host_port.split_once(':') {
        Some((host, p)) => Ok((host.to_string(), Some(port(p)?))),
        None => Ok((host_port.to_string(), None)),
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `http://user:secret@host` → `http://user:***@host`, for messages.
fn hide_password(url: &str) -> String {
    let Some((before, after)) = url.rsplit_once('@') else {
        return url.to_string();
    };
    let start = before.find("://").map_or(0, |i| i + 3);
    match before[start..].split_once(':') {
        Some((user, _)) => format!("{}{user}:***@{after}", &before[..start]),
        None => url.to_string(),
    }
}

/// `NO_PROXY`: hosts reached without the proxy. Entries are separated by commas or spaces: `*`
/// (every host), a name that matches itself and its subdomains (`example.org`, `.example.org`),
/// an IP address, or an IP range in CIDR form (`10.0.0.0/8`); an entry may end with `:PORT`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<String>,
}

impl NoProxy {
    pub fn parse(list: &str) -> Self {
        Self {
            entries: list
                .split([',', ' '])
                .map(|e| e.trim().to_ascii_lowercase())
                .filter(|e| !e.is_empty())
                .collect(),
        }
    }

    /// Whether `host` (a name or an IP, without brackets) on `port` is reached directly.
    pub fn bypasses(&self, host: &str, port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let ip: Option<IpAddr> = host.parse().ok();
        self.entries.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            let (pattern, entry_port) = split_entry_port(entry);
            if entry_port.is_some_and(|p| p != port) {
                return false;
            }
            if let Some((network, bits)) = pattern.split_once('/') {
                return match (ip, network.parse::<IpAddr>(), bits.parse::<u8>()) {
                    (Some(ip), Ok(network), Ok(bits)) => in_network(ip, network, bits),
                    _ => false,
                };
            }
            if let (Some(ip), Ok(entry_ip)) = (ip, pattern.parse::<IpAddr>()) {
                return ip == entry_ip;
            }
            let domain = pattern.trim_start_matches("*.").trim_start_matches('.');
            !domain.is_empty()
                && (host == domain
                    || host
                        .strip_suffix(domain)
                        .is_some_and(|head| head.ends_with('.')))
        })
    }
}

/// `host:443` → (`host`, 443); an IPv6 address without brackets keeps its colons.
fn split_entry_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match entry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

fn in_network(ip: IpAddr, network: IpAddr, bits: u8) -> bool {
    match (ip, network) {
        (IpAddr::V4(ip), IpAddr::V4(net)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// How this process reaches the coordinator: the `--proxy` given on its command line, if any.
static EXPLICIT: OnceLock<Option<Proxy>> = OnceLock::new();

/// Records the command line's `--proxy` (or its absence), once, before any connection. The
/// environment is still read for what is not given here.
pub fn set_explicit(proxy: Option<Proxy>) {
    let _ = EXPLICIT.set(proxy);
}

/// The proxy of the environment: `HTTPS_PROXY` (or `https_proxy`) and the `NO_PROXY` (or
/// `no_proxy`) list beside it. Checked when a command starts, so that a mistyped variable
/// stops it with the variable named instead of failing each connection.
pub fn from_environment() -> Result<Option<(Proxy, NoProxy)>, ProxyUrlError> {
    environment_proxy(&|name| std::env::var(name).ok())
}

fn environment_proxy(
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(Proxy, NoProxy)>, ProxyUrlError> {
    let pick = |upper: &'static str, lower: &'static str| {
        let set = |name: &str| env(name).filter(|v| !v.trim().is_empty());
        set(upper)
            .map(|v| (v, upper))
            .or_else(|| set(lower).map(|v| (v, lower)))
    };
    let Some((url, origin)) = pick("HTTPS_PROXY", "https_proxy") else {
        return Ok(None);
    };
    let proxy = Proxy::parse(&url, &format!("environment variable {origin}"))?;
    let no_proxy = pick("NO_PROXY", "no_proxy")
        .map(|(v, _)| NoProxy::parse(&v))
        .unwrap_or_default();
    Ok(Some((proxy, no_proxy)))
}

/// The proxy to dial `address` (`host:port`) through, if any: `--proxy`, else the
/// environment's unless `NO_PROXY` names the host.
pub fn for_address(address: &str) -> Result<Option<Proxy>, ProxyUrlError> {
    choose(address, EXPLICIT.get().cloned().flatten(), &|name| {
        std::env::var(name).ok()
    })
}

/// [`for_address`] over a given `--proxy` and environment. A proxy from the environment is not
/// used for loopback, as Go's and Python's clients do: a coordinator on this machine is never
/// behind the site's proxy. One given with `--proxy` is used for every address, as curl's `-x`.
fn choose(
    address: &str,
    explicit: Option<Proxy>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Proxy>, ProxyUrlError> {
    if explicit.is_some() {
        return Ok(explicit);
    }
    let Some((proxy, no_proxy)) = environment_proxy(env)? else {
        return Ok(None);
    };
    let host = crate::kit::host_of(address);
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    let port = address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(443);
    Ok((!loopback && !no_proxy.bypasses(host, port)).then_some(proxy))
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
    fn proxy_urls_read_as_curl_reads_them() {
        let p = Proxy::parse("http://proxy.example.org:3128/", "--proxy").unwrap();
        assert_eq!(p.address(), "proxy.example.org:3128");
        assert_eq!(p.credentials, None);
        let p = Proxy::parse("proxy.example.org", "--proxy").unwrap();
        assert_eq!(p.address(), "proxy.example.org:1080");
        let p = Proxy::parse("http://it%40h:p%3Ass@[::1]:8080", "--proxy").unwrap();
        assert_eq!(p.address(), "[::1]:8080");
        assert_eq!(p.credentials.as_deref(), Some("it@h:p:ss"));
        assert_eq!(p.to_string(), "http://it@h:***@[::1]:8080");
        assert_eq!(format!("{p:?}"), "http://it@h:***@[::1]:8080");
    }

    #[test]
    fn bad_proxy_urls_say_what_is_wrong_and_never_show_the_password() {
        for (url, expected) in [
            ("socks5://h:1", "not an HTTP proxy"),
            ("https://h:1", "not supported"),
            ("http://h:99999", "not a port number"),
            ("http://h:0", "not a port number"),
            ("http://h:1/path", "no path"),
            ("http://:1", "no host"),
            ("http://[::1:1", "not closed"),
            ("http://u:se%zzcret@h:1", "%-escape"),
            ("http://ho st:1", "characters"),
        ] {
            let e = Proxy::parse(url, "HTTPS_PROXY").unwrap_err().to_string();
            assert!(e.contains(expected), "{url}: {e}");
            assert!(e.contains("HTTPS_PROXY"), "{e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn no_proxy_matches_names_domains_addresses_ranges_and_ports() {
        let list =
            NoProxy::parse("localhost, .internal.example, example.org,10.0.0.0/8 ::1 intra:7443");
        for (host, port) in [
            ("localhost", 1),
            ("a.internal.example", 1),
            ("internal.example", 1),
            ("EXAMPLE.org", 1),
            ("x.example.org", 1),
            ("10.20.30.40", 1),
            ("::1", 1),
            ("[::1]", 1),
            ("intra", 7443),
        ] {
            assert!(list.bypasses(host, port), "{host}:{port}");
        }
        for (host, port) in [
            ("notexample.org", 1),
            ("11.0.0.1", 1),
            ("coordinator.example.com", 1),
            ("intra", 443),
            ("::2", 1),
        ] {
            assert!(!list.bypasses(host, port), "{host}:{port}");
        }
        assert!(NoProxy::parse("*").bypasses("anything", 1));
        assert!(!NoProxy::parse("").bypasses("anything", 1));
    }

    #[test]
    fn the_command_line_comes_first_then_the_environment_unless_no_proxy_or_loopback() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let flag = Proxy::parse("http://flag:1", "--proxy").unwrap();
        let set = env(&[("HTTPS_PROXY", "http://env:2"), ("no_proxy", "intranet")]);
        let lower = env(&[("https_proxy", "http://lower:3")]);
        let none = env(&[("HTTP_PROXY", "http://plain-http-only:4")]);
        let address = |a: &str, explicit: Option<&Proxy>, env: &dyn Fn(&str) -> Option<String>| {
            choose(a, explicit.cloned(), env)
                .unwrap()
                .map(|p| p.address())
        };
        assert_eq!(
            address("coord.org:7443", Some(&flag), &set).as_deref(),
            Some("flag:1")
        );
        assert_eq!(
            address("127.0.0.1:7443", Some(&flag), &set).as_deref(),
            Some("flag:1")
        );
        assert_eq!(
            address("coord.org:7443", None, &set).as_deref(),
            Some("env:2")
        );
        assert_eq!(address("intranet:7443", None, &set), None);
        assert_eq!(address("127.0.0.1:7443", None, &set), None);
        assert_eq!(address("localhost:7443", None, &set), None);
        assert_eq!(address("[::1]:7443", None, &set), None);
        assert_eq!(
            address("coord.org:7443", None, &lower).as_deref(),
            Some("lower:3")
        );
        assert_eq!(address("coord.org:7443", None, &none), None);
        let bad = env(&[("HTTPS_PROXY", "socks5://x:1")]);
        let e = choose("coord.org:1", None, &bad).unwrap_err().to_string();
        assert!(e.contains("environment variable HTTPS_PROXY"), "{e}");
    }

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

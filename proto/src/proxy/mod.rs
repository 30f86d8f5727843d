//! The outbound HTTP proxy that hospital networks put between a site and the internet.
//!
//! Agents and the researcher's CLI open a tunnel with `CONNECT host:port` and run mutual TLS
//! through it, so the proxy sees only the coordinator's address and encrypted bytes: it cannot
//! read a weight update or impersonate the coordinator. Which proxy to use follows the
//! conventions of curl and every other tool IT already configures: `--proxy URL` first, then
//! `HTTPS_PROXY` (or `https_proxy`), with `NO_PROXY` naming the hosts reached directly.
//!
//! Here: the proxy's URL and which proxy a connection takes; `no_proxy` the hosts reached
//! directly; `tunnel` the CONNECT exchange and tonic's connector over it.

mod no_proxy;
mod tunnel;

use std::fmt;
use std::net::IpAddr;
use std::sync::OnceLock;

pub use self::no_proxy::NoProxy;
pub use self::tunnel::{ProxyError, TunnelConnector};

/// curl's default for a proxy URL without a port.
const DEFAULT_PORT: u16 = 1080;

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
}

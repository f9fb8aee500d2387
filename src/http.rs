//! The crate's one HTTP client, over `ureq` (blocking, rustls with ring; no OpenSSL, no async
//! runtime): `http://` and `https://`, the whole answer in memory up to `max_http_body_bytes`.
//!
//! Used for Orthanc's REST API (the demo on loopback, `desam-train pull` on any host). https verifies
//! the server's certificate against the system's roots (`/etc/ssl/certs`, or `SSL_CERT_FILE` /
//! `SSL_CERT_DIR`) plus, when given, a private CA file (`with_ca_file`); there is no way to turn
//! verification off. Connections go straight to the host (no `HTTP(S)_PROXY`), redirects are not
//! followed (a 3xx is an answer like any other), and an HTTP error status is an `Ok` answer.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
use ureq::Agent;

/// How long connecting may take (name resolution included).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may stay silent while answering (large instances, busy Orthanc).
const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// A CA file is a few kilobytes; anything this large is not one.
const MAX_CA_FILE_BYTES: u64 = 16 << 20;

/// The environment variable that names a private CA's PEM file for https (read by the callers that
/// take a `--ca-file`, e.g. `desam-train pull`, when the flag is absent).
pub const CA_FILE_ENV: &str = "DESAM_CA_FILE";

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url:?}: {message}")]
    Url { url: String, message: String },
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    /// The TLS handshake failed; almost always a server certificate that does not verify.
    #[error("TLS with {addr} failed: {message}. If the server's certificate is signed by a private (e.g. hospital) CA, give that CA's PEM file (desam-train pull --ca-file FILE, or {CA_FILE_ENV}=FILE)")]
    Tls { addr: String, message: String },
    #[error("CA file {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("{method} {path} on {addr}: {message}")]
    Transfer { addr: String, method: String, path: String, message: String },
    #[error(
        "{method} {path} on {addr}: the answer is larger than {limit} bytes (max_http_body_bytes, docs/limits.md)"
    )]
    BodyTooLarge { addr: String, method: String, path: String, limit: u64 },
}

/// A server: scheme, host, port, an optional path prefix (a reverse proxy's `/orthanc`), credentials
/// and, for https, extra trusted CA certificates.
#[derive(Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// Prepended to every request path; empty or "/something" without a trailing slash.
    pub prefix: String,
    /// The user name of the basic authentication, if any (the password is only kept encoded).
    pub user: Option<String>,
    /// `https://`: TLS with a verified server certificate.
    pub tls: bool,
    authorization: Option<String>,
    /// Certificates of a private CA, trusted in addition to the system's roots.
    extra_roots: Vec<Certificate<'static>>,
    /// The answer-body cap; `None`: `max_http_body_bytes` of the process limits.
    body_limit: Option<u64>,
    /// Built on the first request and shared by clones made after it (keeps connections alive).
    agent: OnceLock<Result<Agent, String>>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the credentials.
        f.debug_struct("Endpoint")
            .field("url", &self.url())
            .field("user", &self.user)
            .field("extra_roots", &self.extra_roots.len())
            .finish()
    }
}

impl Endpoint {
    fn new(host: &str, port: u16, prefix: &str, tls: bool) -> Endpoint {
        Endpoint {
            host: host.to_string(),
            port,
            prefix: prefix.to_string(),
            user: None,
            tls,
            authorization: None,
            extra_roots: Vec::new(),
            body_limit: None,
            agent: OnceLock::new(),
        }
    }

    /// `http://127.0.0.1:port`, no authentication.
    pub fn loopback(port: u16) -> Endpoint {
        Endpoint::new("127.0.0.1", port, "", false)
    }

    /// Parses `http[s]://host[:port][/prefix]` (port 80 or 443 when absent; `[v6]` literals allowed).
    /// Credentials in the URL are refused with a message saying what to do instead.
    pub fn parse(url: &str) -> Result<Endpoint, HttpError> {
        let bad = |message: &str| HttpError::Url { url: url.to_string(), message: message.to_string() };
        let trimmed = url.trim();
        let lower = trimmed.to_ascii_lowercase();
        let (tls, rest) = if lower.starts_with("https://") {
            (true, &trimmed[8..])
        } else if lower.starts_with("http://") {
            (false, &trimmed[7..])
        } else {
            return Err(bad("expected http://HOST:PORT or https://HOST:PORT"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(bad("credentials in the URL are not accepted: give --user and --password-env"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6.find(']').ok_or_else(|| bad("unclosed [ in the host"))?;
            let after = &v6[end + 1..];
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(bad("unexpected text after the host")),
            };
            (&v6[..end], port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            Some(p) => {
                p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(|| bad("the port must be a number 1–65535"))?
            }
            None if tls => 443,
            None => 80,
        };
        if path.contains(['?', '#']) {
            return Err(bad("no query or fragment expected"));
        }
        Ok(Endpoint::new(host, port, path.trim_end_matches('/'), tls))
    }

    /// Sends `Authorization: Basic …` with every request.
    pub fn with_basic_auth(mut self, user: &str, password: &str) -> Endpoint {
        self.authorization = Some(format!("Basic {}", base64(format!("{user}:{password}").as_bytes())));
        self.user = Some(user.to_string());
        self
    }

    /// Also trusts the CA certificate(s) in the PEM file `path` (a hospital's own CA) for https; the
    /// system's roots stay trusted. The file is read and checked now.
    pub fn with_ca_file(mut self, path: &Path) -> Result<Endpoint, HttpError> {
        let bad = |message: String| HttpError::CaFile { path: path.to_path_buf(), message };
        let len = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?.len();
        if len > MAX_CA_FILE_BYTES {
            return Err(bad(format!("{len} bytes is too large for a CA certificate file")));
        }
        let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            // A key or CRL beside the certificate is not an error, just not a trust anchor.
            if let PemItem::Certificate(c) = item.map_err(|e| bad(format!("not readable as PEM: {e}")))? {
                certs.push(c);
            }
        }
        if certs.is_empty() {
            return Err(bad("no certificate in it (expected PEM: -----BEGIN CERTIFICATE-----)".into()));
        }
        self.extra_roots.extend(certs);
        self.agent = OnceLock::new();
        Ok(self)
    }

    /// Caps answer bodies at `bytes` instead of `max_http_body_bytes` (docs/limits.md).
    pub fn with_body_limit(mut self, bytes: u64) -> Endpoint {
        self.body_limit = Some(bytes);
        self
    }

    /// `http[s]://host:port/prefix`, never with credentials.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{}", self.addr(), self.prefix)
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    fn agent(&self) -> Result<&Agent, String> {
        self.agent.get_or_init(|| self.build_agent()).as_ref().map_err(Clone::clone)
    }

    fn build_agent(&self) -> Result<Agent, String> {
        let mut config = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .proxy(None)
            .user_agent(concat!("desam/", env!("CARGO_PKG_VERSION")))
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_per_read(Some(READ_TIMEOUT));
        if self.tls {
            let mut roots = system_roots();
            roots.extend(self.extra_roots.iter().cloned());
            if roots.is_empty() {
                return Err(format!(
                    "no trusted CA certificate: the system store is empty (install ca-certificates) and no CA file was given ({CA_FILE_ENV})"
                ));
            }
            let tls = TlsConfig::builder()
                .provider(TlsProvider::Rustls)
                .root_certs(RootCerts::Specific(Arc::new(roots)))
                .build();
            config = config.tls_config(tls);
        }
        Ok(Agent::new_with_config(config.build()))
    }

    /// One request; the status code and the whole (de-chunked) body. An HTTP error status is an
    /// `Ok` answer: the caller decides what it means.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), HttpError> {
        let addr = self.addr();
        let transfer = |message: String| HttpError::Transfer {
            addr: addr.clone(),
            method: method.into(),
            path: path.into(),
            message,
        };
        let agent = self.agent().map_err(|message| HttpError::Tls { addr: addr.clone(), message })?;
        let method_name =
            ureq::http::Method::from_bytes(method.as_bytes()).map_err(|e| transfer(format!("method: {e}")))?;
        let mut builder = ureq::http::Request::builder().method(method_name).uri(format!("{}{path}", self.url()));
        if let Some(a) = &self.authorization {
            builder = builder.header("Authorization", a);
        }
        // GET & co without a body send no Content-Length at all; POST and PUT always state their
        // length, 0 included (Orthanc's `POST /tools/shutdown` is empty), rather than ureq's chunked default.
        let states_length = matches!(method, "POST" | "PUT" | "PATCH");
        let sent = if body.is_empty() && !states_length {
            builder.body(()).map(|r| agent.run(r))
        } else {
            builder.body(body).map(|r| agent.run(r))
        };
        let mut response =
            sent.map_err(|e| transfer(format!("the request: {e}")))?.map_err(|e| classify(e, &addr, method, path))?;
        let status = response.status().as_u16();
        // The answer is read up to the body limit (docs/limits.md) and refused beyond it, so a
        // hostile or broken server cannot make us hold gigabytes.
        let limit = self.body_limit.unwrap_or_else(|| crate::limits::get().max_http_body_bytes);
        let data = response.body_mut().with_config().limit(limit).read_to_vec().map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => {
                HttpError::BodyTooLarge { addr: addr.clone(), method: method.into(), path: path.into(), limit }
            }
            other => classify(other, &addr, method, path),
        })?;
        Ok((status, data))
    }
}

/// The system's trusted roots (Debian: ca-certificates' bundle); unreadable entries are skipped.
fn system_roots() -> Vec<Certificate<'static>> {
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        log::warn!("system CA certificates: {e}");
    }
    found.certs.iter().map(|der| Certificate::from_der(der.as_ref()).to_owned()).collect()
}

/// ureq's error as ours: connecting, TLS (certificate) or transfer.
fn classify(e: ureq::Error, addr: &str, method: &str, path: &str) -> HttpError {
    let connect = |message: String| HttpError::Connect { addr: addr.to_string(), message };
    let tls = |message: String| HttpError::Tls { addr: addr.to_string(), message };
    match e {
        ureq::Error::Io(io) => {
            // rustls reports a refused certificate as an I/O error wrapping its own error.
            if let Some(r) = io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                return tls(describe_tls(r));
            }
            match io.kind() {
                ErrorKind::ConnectionRefused
                | ErrorKind::HostUnreachable
                | ErrorKind::NetworkUnreachable
                | ErrorKind::AddrNotAvailable => connect(io.to_string()),
                _ => transfer_error(addr, method, path, io.to_string()),
            }
        }
        ureq::Error::Rustls(r) => tls(describe_tls(&r)),
        ureq::Error::Tls(m) => tls(m.to_string()),
        ureq::Error::Pem(p) => tls(p.to_string()),
        ureq::Error::HostNotFound => connect("the host name resolved to no address".into()),
        ureq::Error::ConnectionFailed => connect("the connection failed".into()),
        ureq::Error::Timeout(t @ (ureq::Timeout::Resolve | ureq::Timeout::Connect)) => {
            connect(format!("timed out ({t})"))
        }
        other => transfer_error(addr, method, path, other.to_string()),
    }
}

fn transfer_error(addr: &str, method: &str, path: &str, message: String) -> HttpError {
    HttpError::Transfer { addr: addr.into(), method: method.into(), path: path.into(), message }
}

/// rustls' error with the certificate case spelled out.
fn describe_tls(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => format!("the server's certificate is not trusted ({c:?})"),
        other => other.to_string(),
    }
}

/// Standard base64 with padding (RFC 4648), for the basic-authentication header.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Answers one connection per entry of `answers` on a loopback port with those raw bytes; the
    /// thread returns each request's head.
    fn serve(answers: Vec<Vec<u8>>) -> (u16, std::thread::JoinHandle<Vec<String>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let handle = std::thread::spawn(move || {
            let mut heads = Vec::new();
            for answer in answers {
                let (mut s, _) = listener.accept().unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                heads.push(String::from_utf8_lossy(&got).into_owned());
                // The client may hang up mid-answer (body over the limit): that is the point.
                let _ = s.write_all(&answer);
            }
            heads
        });
        (port, handle)
    }

    #[test]
    fn answers_plain_chunked_and_error_statuses_with_basic_auth() {
        let (port, server) = serve(vec![
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc".to_vec(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                .to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
        ]);
        let e = Endpoint::loopback(port).with_basic_auth("orthanc", "orthanc");
        assert_eq!(e.request("GET", "/nothing", b"").unwrap(), (404, b"abc".to_vec()));
        assert_eq!(e.request("GET", "/system", b"").unwrap(), (200, b"abcde".to_vec()));
        assert_eq!(e.request("POST", "/tools/shutdown", b"").unwrap(), (200, Vec::new()));
        let heads = server.join().unwrap();
        let lower: Vec<String> = heads.iter().map(|h| h.to_ascii_lowercase()).collect();
        assert!(!lower[0].contains("content-length") && !lower[0].contains("transfer-encoding"), "{}", heads[0]);
        assert!(lower[2].starts_with("post /tools/shutdown") && lower[2].contains("content-length: 0"), "{}", heads[2]);
        assert!(heads[0].starts_with("GET /nothing HTTP/1.1\r\n"), "{}", heads[0]);
        assert!(heads[1].to_ascii_lowercase().contains("authorization: basic b3j0agfuyzpvcnroyw5j"), "{}", heads[1]);
    }

    #[test]
    fn an_answer_over_the_body_limit_is_a_typed_error() {
        let big = |chunked: bool| {
            let body = vec![b'x'; 64 * 1024];
            let mut a = if chunked {
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec()
            } else {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()).into_bytes()
            };
            if chunked {
                a.extend(format!("{:x}\r\n", body.len()).as_bytes());
                a.extend(&body);
                a.extend(b"\r\n0\r\n\r\n");
            } else {
                a.extend(&body);
            }
            a
        };
        let (port, server) = serve(vec![big(false), big(true), big(false)]);
        let e = Endpoint::loopback(port).with_body_limit(1000);
        for _ in 0..2 {
            match e.request("GET", "/instances/x/file", b"") {
                Err(HttpError::BodyTooLarge { limit: 1000, .. }) => {}
                other => panic!("expected BodyTooLarge, got {other:?}"),
            }
        }
        // The same answer under a large enough limit arrives whole.
        let (status, body) = Endpoint::loopback(port).with_body_limit(64 * 1024).request("GET", "/", b"").unwrap();
        assert_eq!((status, body.len()), (200, 64 * 1024));
        server.join().unwrap();
    }

    #[test]
    fn base64_matches_rfc4648() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(plain.as_bytes()), enc);
        }
        assert_eq!(base64(b"orthanc:orthanc"), "b3J0aGFuYzpvcnRoYW5j");
    }

    #[test]
    fn urls_are_parsed() {
        let e = Endpoint::parse("http://pacs.example.org:8042").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.prefix.as_str(), e.tls), ("pacs.example.org", 8042, "", false));
        assert_eq!(e.url(), "http://pacs.example.org:8042");
        let e = Endpoint::parse("HTTP://10.0.0.5/orthanc/").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.prefix.as_str()), ("10.0.0.5", 80, "/orthanc"));
        let e = Endpoint::parse("http://[::1]:8042").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 8042));
        assert_eq!(e.url(), "http://[::1]:8042");
        let e = Endpoint::parse("HTTPS://pacs.example.org/orthanc").unwrap();
        assert_eq!((e.port, e.tls, e.url().as_str()), (443, true, "https://pacs.example.org:443/orthanc"));
        let e = Endpoint::parse("http://h:1").unwrap().with_basic_auth("u", "secret");
        assert!(!format!("{e:?}").contains("secret"));
        assert!(!e.url().contains("secret"));
        for bad in
            ["ftp://h:8042", "h:8042", "http://:8042", "http://h:99999", "http://u:p@h:8042", "https://h:8042/?x=1"]
        {
            assert!(Endpoint::parse(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let dir = std::env::temp_dir().join(format!("desam-http-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = Endpoint::parse("https://127.0.0.1:1").unwrap();
        let missing = dir.join("missing.pem");
        assert!(matches!(e.clone().with_ca_file(&missing), Err(HttpError::CaFile { .. })));
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = e.with_ca_file(&junk).unwrap_err();
        assert!(err.to_string().contains("BEGIN CERTIFICATE"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connection_refused_is_a_connect_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // The listener is dropped: nothing listens on the port any more.
        for e in [Endpoint::loopback(port), Endpoint::parse(&format!("https://127.0.0.1:{port}")).unwrap()] {
            match e.request("GET", "/system", b"") {
                Err(HttpError::Connect { .. }) => {}
                other => panic!("expected a connect error, got {other:?}"),
            }
        }
    }
}

//! The crate's one HTTP client: HTTP/1.0, one request per connection, whole answer in memory, optional
//! basic authentication. Enough for Orthanc's REST API (the demo on loopback, `desam-train pull` on
//! any host); https is not supported.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// How long connecting may take, per resolved address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may stay silent while answering (large instances, busy Orthanc).
const READ_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url:?}: {message}")]
    Url { url: String, message: String },
    #[error("cannot connect to {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("{method} {path} on {addr}: {message}")]
    Transfer { addr: String, method: String, path: String, message: String },
}

/// A server: host, port, an optional path prefix (a reverse proxy's `/orthanc`) and credentials.
#[derive(Clone)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// Prepended to every request path; empty or "/something" without a trailing slash.
    pub prefix: String,
    /// The user name of the basic authentication, if any (the password is only kept encoded).
    pub user: Option<String>,
    authorization: Option<String>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the credentials.
        f.debug_struct("Endpoint").field("url", &self.url()).field("user", &self.user).finish()
    }
}

impl Endpoint {
    /// `127.0.0.1:port`, no authentication.
    pub fn loopback(port: u16) -> Endpoint {
        Endpoint { host: "127.0.0.1".into(), port, prefix: String::new(), user: None, authorization: None }
    }

    /// Parses `http://host[:port][/prefix]` (port 80 when absent; `[v6]` literals allowed). https and
    /// credentials in the URL are refused with a message saying what to do instead.
    pub fn parse(url: &str) -> Result<Endpoint, HttpError> {
        let bad = |message: &str| HttpError::Url { url: url.to_string(), message: message.to_string() };
        let trimmed = url.trim();
        let lower = trimmed.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(bad("https is not supported by desam's HTTP client: use http:// (e.g. on the Orthanc host or through an SSH tunnel)"));
        }
        let Some(rest) = lower.strip_prefix("http://").map(|_| &trimmed[7..]) else {
            return Err(bad("expected http://HOST:PORT"));
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
            None => 80,
        };
        if path.contains(['?', '#']) {
            return Err(bad("no query or fragment expected"));
        }
        Ok(Endpoint {
            host: host.to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
            user: None,
            authorization: None,
        })
    }

    /// Sends `Authorization: Basic …` with every request.
    pub fn with_basic_auth(mut self, user: &str, password: &str) -> Endpoint {
        self.authorization = Some(format!("Basic {}", base64(format!("{user}:{password}").as_bytes())));
        self.user = Some(user.to_string());
        self
    }

    /// `http://host:port/prefix`, never with credentials.
    pub fn url(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        format!("http://{host}:{}{}", self.port, self.prefix)
    }

    fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// One request; the status code and the whole (de-chunked) body. An HTTP error status is an
    /// `Ok` answer: the caller decides what it means.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), HttpError> {
        let addr = self.addr();
        let connect_err = |message: String| HttpError::Connect { addr: addr.clone(), message };
        let addrs: Vec<_> =
            (self.host.as_str(), self.port).to_socket_addrs().map_err(|e| connect_err(e.to_string()))?.collect();
        let mut last = String::from("the host name resolved to no address");
        let mut stream = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
        }
        let mut s = stream.ok_or_else(|| connect_err(last))?;
        let transfer = |message: String| HttpError::Transfer {
            addr: addr.clone(),
            method: method.into(),
            path: path.into(),
            message,
        };
        s.set_read_timeout(Some(READ_TIMEOUT)).map_err(|e| transfer(e.to_string()))?;
        let mut head = format!(
            "{method} {}{path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.prefix,
            body.len()
        );
        if let Some(a) = &self.authorization {
            head.push_str(&format!("Authorization: {a}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).and_then(|_| s.write_all(body)).map_err(|e| transfer(format!("sending: {e}")))?;
        // The answer is read up to the body limit (docs/limits.md) and refused beyond it, so a
        // hostile or broken server cannot make us hold gigabytes.
        let cap = crate::limits::get().max_http_body_bytes;
        let mut raw = Vec::new();
        (&mut s)
            .take(cap + 64 * 1024)
            .read_to_end(&mut raw)
            .map_err(|e| transfer(format!("reading the answer: {e}")))?;
        if raw.len() as u64 > cap {
            return Err(transfer(format!(
                "the answer is larger than {cap} bytes (max_http_body_bytes, docs/limits.md)"
            )));
        }
        parse_response(&raw).map_err(|e| transfer(format!("malformed HTTP answer: {e}")))
    }
}

/// Status code and body of a raw HTTP/1.x answer (plain or chunked).
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut lines = head.lines();
    let status: u16 =
        lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok()).ok_or("no status code")?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = &raw[split + 4..];
    Ok((status, if chunked { dechunk(body)? } else { body.to_vec() }))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = data.windows(2).position(|w| w == b"\r\n").ok_or("bad chunk header")?;
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size")?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            return Err("truncated chunk".into());
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
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

    #[test]
    fn answers_plain_and_chunked() {
        let plain = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nabc";
        assert_eq!(parse_response(plain).unwrap(), (404, b"abc".to_vec()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (200, b"abcde".to_vec()));
        assert!(parse_response(b"garbage").is_err());
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
    fn urls_are_parsed_and_https_refused() {
        let e = Endpoint::parse("http://pacs.example.org:8042").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.prefix.as_str()), ("pacs.example.org", 8042, ""));
        assert_eq!(e.url(), "http://pacs.example.org:8042");
        let e = Endpoint::parse("HTTP://10.0.0.5/orthanc/").unwrap();
        assert_eq!((e.host.as_str(), e.port, e.prefix.as_str()), ("10.0.0.5", 80, "/orthanc"));
        let e = Endpoint::parse("http://[::1]:8042").unwrap();
        assert_eq!((e.host.as_str(), e.port), ("::1", 8042));
        assert_eq!(e.url(), "http://[::1]:8042");
        let e = Endpoint::parse("http://h:1").unwrap().with_basic_auth("u", "secret");
        assert!(!format!("{e:?}").contains("secret"));
        assert!(!e.url().contains("secret"));
        for bad in
            ["https://h:8042", "h:8042", "http://:8042", "http://h:99999", "http://u:p@h:8042", "http://h:8042/?x=1"]
        {
            assert!(Endpoint::parse(bad).is_err(), "{bad} should be refused");
        }
        assert!(Endpoint::parse("https://h").unwrap_err().to_string().contains("https is not supported"));
    }

    #[test]
    fn connection_refused_is_a_connect_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // The listener is dropped: nothing listens on the port any more.
        match Endpoint::loopback(port).request("GET", "/system", b"") {
            Err(HttpError::Connect { .. }) => {}
            other => panic!("expected a connect error, got {other:?}"),
        }
    }
}

//! Header hygiene between client and upstream (RFC 9110 §7.6).

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Connection-specific headers that never cross a proxy (RFC 9110 §7.6.1), plus the
/// non-standard ones that act like them.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// `X-Forwarded-For`
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `Forwarded` (RFC 7239)
pub static FORWARDED: HeaderName = HeaderName::from_static("forwarded");
/// `X-Request-Id`
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Whether `name` is a fixed hop-by-hop header.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Removes hop-by-hop headers: the fixed list and every header named in `Connection`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.is_empty() {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// What the gateway knows about the client side of a request.
#[derive(Debug, Clone)]
pub struct ClientSide {
    /// Peer address of the client connection.
    pub ip: IpAddr,
    /// `http` or `https`.
    pub proto: &'static str,
    /// `Host` (HTTP/1.1) or `:authority` (h2) as the client sent it.
    pub host: Option<HeaderValue>,
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`; sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host`.
pub fn add_forwarded(headers: &mut HeaderMap, client: &ClientSide) {
    let ip = client.ip.to_canonical();
    let xff = match headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
    {
        prior if prior.is_empty() => ip.to_string(),
        prior => format!("{}, {ip}", prior.join(", ")),
    };
    set(headers, &X_FORWARDED_FOR, &xff);
    headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(client.proto));
    match &client.host {
        Some(host) => {
            headers.insert(&X_FORWARDED_HOST, host.clone());
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }

    // RFC 7239 §6: IPv6 addresses are bracketed and the node quoted.
    let node = match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("\"[{v6}]\""),
    };
    let mut element = format!("for={node};proto={}", client.proto);
    if let Some(host) = client.host.as_ref().and_then(|h| h.to_str().ok())
        && host.bytes().all(is_host_char)
    {
        element.push_str(&format!(";host=\"{host}\""));
    }
    let prior: Vec<&str> = headers
        .get_all(&FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    let fwd = if prior.is_empty() {
        element
    } else {
        format!("{}, {element}", prior.join(", "))
    };
    set(headers, &FORWARDED, &fwd);
}

fn is_host_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
}

fn set(headers: &mut HeaderMap, name: &HeaderName, value: &str) {
    match HeaderValue::from_str(value) {
        Ok(v) => {
            headers.insert(name, v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

/// The client's request id if it is sane (1–128 of `[A-Za-z0-9._:-]`), else a new one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty()
            && b.len() <= 128
            && b.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-'))
        {
            return v.clone();
        }
    }
    new_request_id()
}

/// A new id in UUID text form: a random per-process prefix and a counter. Unique within
/// the process, unguessable across processes, and without a system call per request
/// (a v4 UUID per request costs a `getrandom` call on the hot path).
fn new_request_id() -> HeaderValue {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let id = format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        prefix >> 32,
        (prefix >> 16) & 0xffff,
        prefix & 0xffff,
        (n >> 48) & 0xffff,
        n & 0xffff_ffff_ffff
    );
    HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("invalid"))
}

/// Whether the `Content-Type` essence (before any `;` parameters) is `essence`, compared
/// case-insensitively (RFC 9110 §8.3.1).
pub fn media_type_is(headers: &http::HeaderMap, essence: &str) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(essence))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// RFC 9110 §7.6.1: the fixed list and every header named in Connection go.
    #[test]
    fn removes_hop_by_hop_and_connection_named() {
        let mut h = map(&[
            ("connection", "close, X-Secret-Hop"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("x-secret-hop", "1"),
            ("x-other", "2"),
            ("accept", "application/fhir+json"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }

    /// X-Forwarded-For appends, the others are set, Forwarded follows RFC 7239.
    #[test]
    fn forwarded_headers() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-proto", "gopher"),
        ]);
        let client = ClientSide {
            ip: "::ffff:192.0.2.7".parse().unwrap(),
            proto: "https",
            host: Some(HeaderValue::from_static("fhir.example.org")),
        };
        add_forwarded(&mut h, &client);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.1, 192.0.2.7");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[&X_FORWARDED_HOST], "fhir.example.org");
        assert_eq!(
            h[&FORWARDED],
            "for=192.0.2.7;proto=https;host=\"fhir.example.org\""
        );

        let mut h = HeaderMap::new();
        let v6 = ClientSide {
            ip: "2001:db8::1".parse().unwrap(),
            proto: "http",
            host: None,
        };
        add_forwarded(&mut h, &v6);
        assert_eq!(h[&FORWARDED], "for=\"[2001:db8::1]\";proto=http");
        assert!(!h.contains_key(&X_FORWARDED_HOST));
    }

    /// Sane client request ids are kept; anything else is replaced.
    #[test]
    fn request_ids() {
        let h = map(&[("x-request-id", "abc-123_x.y:z")]);
        assert_eq!(request_id(&h), "abc-123_x.y:z");
        for bad in ["", "has space", "<script>", &"a".repeat(129)] {
            let h = map(&[("x-request-id", bad)]);
            let id = request_id(&h);
            assert_ne!(id, bad);
            assert_eq!(id.len(), 36);
        }
        let (a, b) = (request_id(&HeaderMap::new()), request_id(&HeaderMap::new()));
        assert_eq!(a.len(), 36);
        assert_ne!(a, b, "ids must be unique");
    }
}

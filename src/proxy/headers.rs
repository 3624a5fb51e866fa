//! Header hygiene between client and upstream (RFC 9110 §7.6).

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

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
/// W3C trace context (its trace id goes into the audit line).
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// `Prefer` (RFC 7240), which the http crate has no constant for.
pub static PREFER: HeaderName = HeaderName::from_static("prefer");

/// Whether `name` is a fixed hop-by-hop header: the connection-specific headers that
/// never cross a proxy (RFC 9110 §7.6.1), plus the non-standard ones that act like them.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    // A string match (length first; names are lowercase) rather than nine `HeaderName`
    // comparisons: this runs for every header of every message.
    matches!(
        name.as_str(),
        "connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "keep-alive"
            | "proxy-connection"
    )
}

/// Removes hop-by-hop headers: the fixed list and every header named in `Connection`, in
/// one pass over the names present: most messages carry a handful of headers, and a
/// removal (a hash and a probe, then a reshuffle of the map) is done only for a header
/// that is there. (A request on its way upstream gets [`Edits`], which do this and more;
/// this is for answers, where the `Connection` lookup is made only when one is present.)
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    // An empty Vec does not allocate.
    let mut present: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    if present.contains(&header::CONNECTION) {
        let listed = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            // `keep-alive` is in `present` already.
            .filter(|name| !is_hop_by_hop(name) && headers.contains_key(name))
            .collect::<Vec<_>>();
        present.extend(listed);
    }
    for name in &present {
        headers.remove(name);
    }
}

/// Removes the `respond-async` preference (RFC 7240; FHIR R4 async.html) from `Prefer`,
/// keeping the others; drops the header when none is left. An answer the gateway must
/// check has to come in this exchange: a 202 with a status URL to poll later cannot be.
pub fn drop_respond_async(headers: &mut HeaderMap) {
    let mut kept = Vec::new();
    let mut dropped = false;
    for value in headers.get_all(&PREFER) {
        let Ok(text) = value.to_str() else {
            // Unreadable: dropped whole rather than passed on unread.
            dropped = true;
            continue;
        };
        for (name, preference) in list_members(text) {
            if name.eq_ignore_ascii_case("respond-async") {
                dropped = true;
            } else {
                kept.push(preference.to_owned());
            }
        }
    }
    if !dropped {
        return;
    }
    headers.remove(&PREFER);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join(", "))
    {
        headers.insert(&PREFER, v);
    }
}

/// Sets the `handling=strict` preference (FHIR R4 search.html#errors) in `Prefer`, in place
/// of any `handling` the client gave, keeping its other preferences; an unreadable value
/// is dropped rather than passed on unread.
pub fn prefer_strict(headers: &mut HeaderMap) {
    let mut kept: Vec<String> = headers
        .get_all(&PREFER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(list_members)
        .filter(|(name, _)| !name.eq_ignore_ascii_case("handling"))
        .map(|(_, preference)| preference.to_owned())
        .collect();
    kept.push("handling=strict".to_owned());
    headers.remove(&PREFER);
    if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
        headers.insert(&PREFER, v);
    } else {
        headers.insert(&PREFER, HeaderValue::from_static("handling=strict"));
    }
}

/// Keeps an answer to a request made with a token out of shared caches.
///
/// A shared cache does not store an answer to a request with `Authorization` unless the
/// answer says `public`, `s-maxage` or `must-revalidate` (RFC 9111 §3.5); then it serves
/// it to anyone asking for the URL, without the gateway seeing the request. The upstream
/// says so about its answer to what it was asked (a query the gateway may have narrowed
/// to one patient) and knows nothing of who else may read it. Such an answer gets
/// `private` (§5.2.2.7: no shared cache stores it) and loses `public`; the other
/// directives stay for the client's own cache. An answer that does not ask to be shared
/// is left as it is; an unreadable `Cache-Control` becomes `private`.
pub fn keep_private(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::CACHE_CONTROL).iter().peekable();
    if values.peek().is_none() {
        return;
    }
    let mut kept: Vec<&str> = Vec::new();
    let mut shared = false;
    for value in values {
        let Ok(text) = value.to_str() else {
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private"));
            return;
        };
        for (name, directive) in list_members(text) {
            let lets_share = ["public", "s-maxage", "must-revalidate"]
                .iter()
                .any(|d| name.eq_ignore_ascii_case(d));
            shared |= lets_share;
            if !name.eq_ignore_ascii_case("public") {
                kept.push(directive);
            }
        }
    }
    if !shared {
        return;
    }
    if !kept.iter().any(|d| d.eq_ignore_ascii_case("private")) {
        kept.push("private");
    }
    let joined = kept.join(", ");
    let value = HeaderValue::from_str(&joined).unwrap_or(HeaderValue::from_static("private"));
    headers.insert(header::CACHE_CONTROL, value);
}

/// The members of a comma-separated header value (RFC 9110 §5.6.1; `Cache-Control`
/// directives, `Prefer` preferences), each with its name (before any `=` or `;`), trimmed,
/// empty ones skipped. A quoted string may hold commas (`no-cache="a, b"`).
fn list_members(value: &str) -> impl Iterator<Item = (&str, &str)> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, b) in value.bytes().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                out.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&value[start..]);
    out.into_iter()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| (m.split(['=', ';']).next().unwrap_or_default().trim(), m))
}

/// A `Link` header value (RFC 8288: `<url>; rel="next", …`) with each target URL mapped
/// by `map` (`None` keeps one); `None` when nothing changed.
pub fn map_link_targets(value: &str, map: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    let mut changed = false;
    while let Some(open) = rest.find('<') {
        let Some(len) = rest[open..].find('>') else {
            break;
        };
        let url = &rest[open + 1..open + len];
        out.push_str(&rest[..=open]);
        match map(url) {
            Some(new) => {
                out.push_str(&new);
                changed = true;
            }
            None => out.push_str(url),
        }
        out.push('>');
        rest = &rest[open + len + 1..];
    }
    out.push_str(rest);
    changed.then_some(out)
}

/// What the gateway knows about the client side of a request.
#[derive(Debug, Clone)]
pub struct ClientSide {
    /// Peer address of the client connection, as the forwarding headers write it.
    pub peer: std::sync::Arc<PeerText>,
    /// `http` or `https`.
    pub proto: &'static str,
    /// `Host` (HTTP/1.1) or `:authority` (h2) as the client sent it.
    pub host: Option<HeaderValue>,
}

/// A client address formatted for the forwarding headers, once per connection rather
/// than per request.
#[derive(Debug)]
pub struct PeerText {
    /// For `X-Forwarded-For`: the canonical address.
    xff: HeaderValue,
    /// For `Forwarded` (RFC 7239 §6): IPv4 as is, IPv6 bracketed and quoted.
    node: String,
    /// The last `Forwarded` element built on this connection, with the protocol and
    /// `Host` it was built for: a connection's requests nearly always share them.
    last_forwarded: std::sync::Mutex<Option<(&'static str, Option<HeaderValue>, HeaderValue)>>,
}

impl PeerText {
    /// The texts for `ip`.
    pub fn new(ip: IpAddr) -> PeerText {
        let ip = ip.to_canonical();
        let node = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        PeerText {
            xff: HeaderValue::from_str(&ip.to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            node,
            last_forwarded: std::sync::Mutex::new(None),
        }
    }

    /// This client's `Forwarded` element (RFC 7239 §4) for a request with `proto` and
    /// `host`; built once per connection while they stay the same.
    fn forwarded_element(&self, proto: &'static str, host: Option<&HeaderValue>) -> HeaderValue {
        let mut last = self
            .last_forwarded
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((p, h, element)) = last.as_ref()
            && *p == proto
            && h.as_ref() == host
        {
            return element.clone();
        }
        // RFC 7239 §6: IPv6 addresses are bracketed and the node quoted.
        let mut text = String::with_capacity(64);
        text.push_str("for=");
        text.push_str(&self.node);
        text.push_str(";proto=");
        text.push_str(proto);
        if let Some(host) = host.and_then(|h| h.to_str().ok())
            && host.bytes().all(is_host_char)
        {
            text.push_str(";host=\"");
            text.push_str(host);
            text.push('"');
        }
        // Only host characters, digits, brackets and quotes: always a valid value.
        let element =
            HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("for=unknown"));
        *last = Some((proto, host.cloned(), element.clone()));
        element
    }
}

/// What the gateway changes in a request's headers on the way to the upstream, described
/// once and then carried out on a header map (`apply`, for hyper's client) or while the
/// request head is written (`drops` and `set`, for the gateway's own HTTP/1.1 exchange):
/// the same rules either way.
///
/// Dropped: the fixed hop-by-hop headers, those `Connection` names, those `also` selects,
/// those [`Edits::remove`] names, and every header the gateway sets (the client's values
/// of it never pass).
pub struct Edits<'a> {
    set: Vec<(HeaderName, HeaderValue)>,
    removed: Vec<HeaderName>,
    also: &'a (dyn Fn(&HeaderName) -> bool + Sync),
}

impl<'a> Edits<'a> {
    /// The edits of a request with `headers`, dropping what `also` selects besides the
    /// hop-by-hop headers.
    pub fn new(headers: &HeaderMap, also: &'a (dyn Fn(&HeaderName) -> bool + Sync)) -> Edits<'a> {
        let mut removed = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',') {
                if let Ok(name) = HeaderName::from_bytes(token.trim().as_bytes())
                    && !is_hop_by_hop(&name)
                {
                    removed.push(name);
                }
            }
        }
        Edits {
            set: Vec::with_capacity(8),
            removed,
            also,
        }
    }

    /// Sets `name` to `value`, replacing the client's values and an earlier `set`.
    pub fn set(&mut self, name: &HeaderName, value: HeaderValue) {
        self.set.retain(|(n, _)| n != name);
        self.set.push((name.clone(), value));
    }

    /// Drops `name` (and an earlier `set` of it).
    pub fn remove(&mut self, name: &HeaderName) {
        self.set.retain(|(n, _)| n != name);
        self.removed.push(name.clone());
    }

    /// Whether the client's `name` headers stay out of the forwarded request.
    pub fn drops(&self, name: &HeaderName) -> bool {
        is_hop_by_hop(name)
            || (self.also)(name)
            || self.set.iter().any(|(n, _)| n == name)
            || self.removed.contains(name)
    }

    /// The headers the gateway sets, in order.
    pub fn added(&self) -> &[(HeaderName, HeaderValue)] {
        &self.set
    }

    /// Carries the edits out on `headers`. A removal (a hash and a probe, then a
    /// reshuffle of the map) is done only for a header that is there.
    pub fn apply(self, headers: &mut HeaderMap) {
        // An empty Vec does not allocate.
        let present: Vec<HeaderName> = headers
            .keys()
            .filter(|name| self.drops(name))
            .cloned()
            .collect();
        for name in &present {
            headers.remove(name);
        }
        headers.reserve(self.set.len());
        for (name, value) in self.set {
            headers.append(name, value);
        }
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`; sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host`.
pub fn add_forwarded(headers: &mut HeaderMap, client: &ClientSide) {
    let never = |_: &HeaderName| false;
    let mut edits = Edits::new(&HeaderMap::new(), &never);
    forwarded(&mut edits, headers, client);
    edits.apply(headers);
}

/// [`add_forwarded`] as edits of a request with `headers`.
pub fn forwarded(edits: &mut Edits<'_>, headers: &HeaderMap, client: &ClientSide) {
    let peer = &client.peer;
    // The client's own values, unless it made them hop-by-hop (named in `Connection`).
    let prior = |name: &HeaderName| headers.contains_key(name) && !edits.removed.contains(name);
    let (prior_xff, prior_forwarded) = (prior(&X_FORWARDED_FOR), prior(&FORWARDED));
    let appended = |name: &HeaderName, this: &str| -> Option<HeaderValue> {
        let prior: Vec<&str> = headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        HeaderValue::from_str(&format!("{}, {this}", prior.join(", "))).ok()
    };
    if prior_xff {
        match appended(&X_FORWARDED_FOR, peer.xff.to_str().unwrap_or("unknown")) {
            Some(v) => edits.set(&X_FORWARDED_FOR, v),
            None => edits.remove(&X_FORWARDED_FOR),
        }
    } else {
        edits.set(&X_FORWARDED_FOR, peer.xff.clone());
    }
    edits.set(&X_FORWARDED_PROTO, HeaderValue::from_static(client.proto));
    match &client.host {
        Some(host) => edits.set(&X_FORWARDED_HOST, host.clone()),
        None => edits.remove(&X_FORWARDED_HOST),
    }

    let element = peer.forwarded_element(client.proto, client.host.as_ref());
    if prior_forwarded {
        match appended(&FORWARDED, element.to_str().unwrap_or("for=unknown")) {
            Some(v) => edits.set(&FORWARDED, v),
            None => edits.remove(&FORWARDED),
        }
    } else {
        edits.set(&FORWARDED, element);
    }
}

/// Checks a client request's head for what a server behind the gateway could read
/// another way, and puts cookie crumbs back together. `Err` says why the request is
/// malformed (400):
/// - a field value with leading or trailing white space (RFC 9113 §8.2.1 forbids it in
///   HTTP/2; HTTP/1 parsers strip it, so each side would read another value);
/// - userinfo in the authority (`user@host`: RFC 9110 §4.2.4 deprecates it, and it would
///   be passed on in `X-Forwarded-Host` and `Forwarded`);
/// - a `Host` that names another authority than `:authority` (or the absolute-form
///   target) does (RFC 9113 §8.3.1), or more than one `Host`.
///
/// HTTP/2 may split `Cookie` into crumbs, one field each (RFC 9113 §8.2.3); towards an
/// HTTP/1.1 upstream they become one field joined by `"; "`, as one `Cookie` is all
/// HTTP/1.1 allows (RFC 6265 §5.4).
pub fn check_request_head(uri: &http::Uri, headers: &mut HeaderMap) -> Result<(), &'static str> {
    for value in headers.values() {
        let bytes = value.as_bytes();
        if matches!(bytes.first(), Some(b' ' | b'\t')) || matches!(bytes.last(), Some(b' ' | b'\t'))
        {
            return Err("a header value starts or ends with white space");
        }
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    let (host, second) = (hosts.next(), hosts.next());
    if second.is_some() {
        return Err("more than one Host header");
    }
    if let Some(authority) = uri.authority() {
        if authority.as_str().contains('@') {
            return Err("userinfo in the request's authority");
        }
        if host.is_some_and(|h| {
            !h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        }) {
            return Err("Host names another authority than the request target");
        }
    }
    if host.is_some_and(|h| h.as_bytes().contains(&b'@')) {
        return Err("userinfo in Host");
    }
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_some() && cookies.next().is_some() {
        let joined: Vec<&[u8]> = headers
            .get_all(header::COOKIE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        let joined = joined.join(&b"; "[..]);
        let value = HeaderValue::from_bytes(&joined).map_err(|_| "an unreadable Cookie")?;
        headers.insert(header::COOKIE, value);
    }
    Ok(())
}

fn is_host_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
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
    // UUID text form, written without the formatting machinery (it is per request).
    let mut id = Vec::with_capacity(36);
    for (i, (v, digits)) in [
        (prefix >> 32, 8),
        ((prefix >> 16) & 0xffff, 4),
        (prefix & 0xffff, 4),
        ((n >> 48) & 0xffff, 4),
        (n & 0xffff_ffff_ffff, 12),
    ]
    .into_iter()
    .enumerate()
    {
        if i > 0 {
            id.push(b'-');
        }
        for d in (0..digits).rev() {
            id.push(b"0123456789abcdef"[((v >> (4 * d)) & 0xf) as usize]);
        }
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(id))
        .unwrap_or(HeaderValue::from_static("invalid"))
}

/// Whether the `Content-Type` essence (before any `;` parameters) is `essence`, compared
/// case-insensitively (RFC 9110 §8.3.1).
pub fn media_type_is(headers: &http::HeaderMap, essence: &str) -> bool {
    media_type(headers).is_some_and(|v| v.eq_ignore_ascii_case(essence))
}

/// The `Content-Type` essence: the media type before any `;` parameters, trimmed.
fn media_type(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::CONTENT_TYPE)?.to_str().ok()?;
    // A byte search and an ASCII trim: `to_str` admits only visible ASCII and tabs, so
    // this is `split(';')` and `trim` at a third of their cost (every response asks).
    let end = value.bytes().position(|b| b == b';').unwrap_or(value.len());
    Some(value[..end].trim_ascii())
}

/// Whether the body is FHIR JSON: `application/fhir+json`, `application/json` or the
/// DSTU2 `application/json+fhir`.
pub fn is_fhir_json(headers: &http::HeaderMap) -> bool {
    media_type(headers).is_some_and(|essence| {
        [
            "application/fhir+json",
            "application/json",
            "application/json+fhir",
        ]
        .iter()
        .any(|t| essence.eq_ignore_ascii_case(t))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `Cache-Control` an answer leaves with, given the upstream's values.
    fn private_of(values: &[&str]) -> Vec<String> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
        }
        keep_private(&mut h);
        h.get_all(header::CACHE_CONTROL)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn respond_async_is_dropped_from_prefer() {
        let prefer = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("prefer", HeaderValue::from_str(v).unwrap());
            }
            drop_respond_async(&mut h);
            h.get_all("prefer")
                .iter()
                .map(|v| v.to_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(prefer(&["respond-async"]), Vec::<String>::new());
        assert_eq!(
            prefer(&["Respond-Async, handling=strict", "return=minimal"]),
            ["handling=strict, return=minimal"]
        );
        assert_eq!(prefer(&["respond-async; wait=10"]), Vec::<String>::new());
        // Nothing to drop: left exactly as it was.
        assert_eq!(
            prefer(&["return=representation", "handling=lenient"]),
            ["return=representation", "handling=lenient"]
        );
        assert_eq!(prefer(&["respond-asyncx"]), ["respond-asyncx"]);
        // A quoted value keeps its commas as they were.
        assert_eq!(prefer(&["respond-async, x=\"a,b\""]), ["x=\"a,b\""]);
    }

    #[test]
    fn shareable_answers_become_private() {
        // Directives that let a shared cache keep an answer to a request with a token.
        assert_eq!(private_of(&["public, max-age=60"]), ["max-age=60, private"]);
        assert_eq!(private_of(&["s-maxage=600"]), ["s-maxage=600, private"]);
        assert_eq!(
            private_of(&["max-age=5, MUST-REVALIDATE"]),
            ["max-age=5, MUST-REVALIDATE, private"]
        );
        assert_eq!(private_of(&["Public"]), ["private"]);
        // Over several header lines, and a quoted value holding a comma and a quote.
        assert_eq!(
            private_of(&["no-cache=\"a, \\\"b\"", "public"]),
            ["no-cache=\"a, \\\"b\", private"]
        );
        // A qualified `private="…"` still lets the rest be shared: the plain one is added.
        assert_eq!(
            private_of(&["public, private=\"set-cookie\""]),
            ["private=\"set-cookie\", private"]
        );
        // Already private: said once, and a second pass changes nothing.
        assert_eq!(
            private_of(&["private, s-maxage=5"]),
            ["private, s-maxage=5"]
        );
        assert_eq!(
            private_of(&["max-age=60, private"]),
            ["max-age=60, private"]
        );
        // A directive named only inside a quoted value is not one.
        assert_eq!(
            private_of(&["no-cache=\"public\""]),
            ["no-cache=\"public\""]
        );
        // Answers that do not ask to be shared are left as they are.
        for kept in [
            vec![],
            vec!["max-age=60"],
            vec!["no-store"],
            vec!["private, max-age=9"],
        ] {
            let expected: Vec<String> = kept.iter().map(|s| s.to_string()).collect();
            assert_eq!(private_of(&kept), expected);
        }
        // Unreadable: private.
        let mut h = HeaderMap::new();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_bytes(b"public, \xff").unwrap(),
        );
        keep_private(&mut h);
        assert_eq!(h[header::CACHE_CONTROL], "private");
    }

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

    /// Edits drop what `also` selects with the hop-by-hop headers, every value of a
    /// repeated header with it, also when `Connection` names a selected header too.
    #[test]
    fn removes_selected_headers_in_the_same_pass() {
        let mut h = map(&[
            ("connection", "authorization, x-hop"),
            ("authorization", "Bearer a"),
            ("x-smart-patient", "1"),
            ("x-smart-patient", "2"),
            ("x-hop", "1"),
            ("accept-encoding", "gzip"),
            ("accept", "application/fhir+json"),
        ]);
        let selected = [
            header::AUTHORIZATION,
            header::ACCEPT_ENCODING,
            HeaderName::from_static("x-smart-patient"),
        ];
        let also = |name: &HeaderName| selected.contains(name);
        Edits::new(&h, &also).apply(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("accept"));
    }

    /// Every target of a `Link` value is mapped, the rest kept byte for byte.
    #[test]
    fn link_targets() {
        let map = |u: &str| {
            u.strip_prefix("http://up/fhir")
                .map(|r| format!("https://pub/r4{r}"))
        };
        assert_eq!(
            map_link_targets(
                r#"<http://up/fhir/Patient?page=2>; rel="next", <https://else.example/x>; rel="help", <http://up/fhir>; rel="self""#,
                &map
            )
            .as_deref(),
            Some(r#"<https://pub/r4/Patient?page=2>; rel="next", <https://else.example/x>; rel="help", <https://pub/r4>; rel="self""#)
        );
        assert_eq!(
            map_link_targets(r#"<https://else.example/x>; rel="help""#, &map),
            None
        );
        assert_eq!(map_link_targets("<http://up/fhir/unclosed", &map), None);
        assert_eq!(map_link_targets("", &map), None);
    }

    /// X-Forwarded-For appends, the others are set, Forwarded follows RFC 7239.
    #[test]
    fn forwarded_headers() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-proto", "gopher"),
        ]);
        let client = ClientSide {
            peer: std::sync::Arc::new(PeerText::new("::ffff:192.0.2.7".parse().unwrap())),
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
            peer: std::sync::Arc::new(PeerText::new("2001:db8::1".parse().unwrap())),
            proto: "http",
            host: None,
        };
        add_forwarded(&mut h, &v6);
        assert_eq!(h[&FORWARDED], "for=\"[2001:db8::1]\";proto=http");
        assert!(!h.contains_key(&X_FORWARDED_HOST));
    }

    /// A client that names `X-Forwarded-For` or `Forwarded` in `Connection` made them
    /// hop-by-hop: their values are dropped, not appended to; the gateway's own replace
    /// them, and `set` and `remove` replace earlier edits of a name.
    #[test]
    fn edits_follow_connection_and_replace_earlier_ones() {
        let h = map(&[
            ("connection", "x-forwarded-for, Forwarded, x-gone"),
            ("x-forwarded-for", "10.6.6.6"),
            ("forwarded", "for=10.6.6.6"),
            ("x-gone", "1"),
            ("x-request-id", "client"),
            ("accept", "*/*"),
        ]);
        let client = ClientSide {
            peer: std::sync::Arc::new(PeerText::new("192.0.2.7".parse().unwrap())),
            proto: "http",
            host: None,
        };
        let never = |_: &HeaderName| false;
        let mut edits = Edits::new(&h, &never);
        forwarded(&mut edits, &h, &client);
        edits.set(&X_REQUEST_ID, HeaderValue::from_static("one"));
        edits.set(&X_REQUEST_ID, HeaderValue::from_static("two"));
        edits.set(&PREFER, HeaderValue::from_static("x"));
        edits.remove(&PREFER);
        let mut out = h.clone();
        edits.apply(&mut out);
        assert_eq!(out[&X_FORWARDED_FOR], "192.0.2.7");
        assert_eq!(out[&FORWARDED], "for=192.0.2.7;proto=http");
        let ids: Vec<_> = out.get_all(&X_REQUEST_ID).iter().collect();
        assert_eq!(ids, ["two"]);
        for gone in ["connection", "x-gone", "prefer", "x-forwarded-host"] {
            assert!(!out.contains_key(gone), "{gone}: {out:?}");
        }
        assert_eq!(out["accept"], "*/*");
    }

    /// Exactly the fixed hop-by-hop names match.
    #[test]
    fn hop_by_hop_names() {
        for name in [
            "connection",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "proxy-authorization",
            "proxy-authenticate",
            "keep-alive",
            "proxy-connection",
        ] {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
        for name in [
            "host",
            "content-length",
            "x-connection",
            "tes",
            "authorization",
        ] {
            assert!(!is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
    }

    /// One connection, requests with different `Host` values or a prior `Forwarded`:
    /// each gets its own element, never the one cached for an earlier request.
    #[test]
    fn forwarded_element_follows_each_request() {
        let peer = std::sync::Arc::new(PeerText::new("192.0.2.7".parse().unwrap()));
        let side = |host: Option<&'static str>| ClientSide {
            peer: peer.clone(),
            proto: "http",
            host: host.map(HeaderValue::from_static),
        };
        let forwarded = |client: &ClientSide, prior: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(p) = prior {
                h.insert(&FORWARDED, HeaderValue::from_str(p).unwrap());
            }
            add_forwarded(&mut h, client);
            h[&FORWARDED].to_str().unwrap().to_owned()
        };
        let a = side(Some("a.example"));
        let b = side(Some("b.example"));
        assert_eq!(
            forwarded(&a, None),
            "for=192.0.2.7;proto=http;host=\"a.example\""
        );
        assert_eq!(
            forwarded(&a, None),
            "for=192.0.2.7;proto=http;host=\"a.example\""
        );
        assert_eq!(
            forwarded(&b, None),
            "for=192.0.2.7;proto=http;host=\"b.example\""
        );
        assert_eq!(forwarded(&side(None), None), "for=192.0.2.7;proto=http");
        assert_eq!(
            forwarded(&side(Some("bad host\"x")), None),
            "for=192.0.2.7;proto=http"
        );
        assert_eq!(
            forwarded(&b, Some("for=10.0.0.1")),
            "for=10.0.0.1, for=192.0.2.7;proto=http;host=\"b.example\""
        );
        let tls = ClientSide {
            proto: "https",
            ..side(Some("b.example"))
        };
        assert_eq!(
            forwarded(&tls, None),
            "for=192.0.2.7;proto=https;host=\"b.example\""
        );
    }

    /// Every connection option goes, even `close` as a header name (RFC 9110 §7.6.1); a
    /// listed header that is absent is no error; the rest stays.
    #[test]
    fn connection_options_named_headers_go() {
        let mut h = map(&[
            ("connection", "Keep-Alive, close, x-absent"),
            ("content-type", "application/fhir+json"),
            ("close", "1"),
            ("keep-alive", "timeout=5"),
        ]);
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("content-type"));
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
        // UUID text form: 8-4-4-4-12 lowercase hex.
        let text = a.to_str().unwrap();
        let groups: Vec<usize> = text.split('-').map(str::len).collect();
        assert_eq!(groups, vec![8, 4, 4, 4, 12], "{text}");
        assert!(
            text.bytes()
                .all(|c| c == b'-' || c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        assert!(uuid::Uuid::parse_str(text).is_ok(), "{text}");
    }
}

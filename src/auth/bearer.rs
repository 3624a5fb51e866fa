//! Bearer token extraction (RFC 6750 §2.1): the `Authorization` header and nothing else.

use http::HeaderMap;
use http::header::AUTHORIZATION;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why no token could be taken from a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BearerError {
    /// No `Authorization` header (and no token elsewhere): 401 without an error code.
    Missing,
    /// The request is malformed (400 `invalid_request`), with a short reason.
    Malformed(&'static str),
    /// The token itself cannot be a valid token (401 `invalid_token`).
    Invalid(&'static str),
}

/// Takes the bearer token from `Authorization`. RFC 6750 §2.2 and §2.3 (form body and
/// query parameter) are refused: tokens in URLs end up in logs and caches.
pub fn extract<'a>(headers: &'a HeaderMap, query: Option<&str>) -> Result<&'a str, BearerError> {
    if let (Some(token), false) = (
        well_formed(headers),
        query.is_some_and(has_access_token_param),
    ) {
        return Ok(token);
    }
    extract_checked(headers, query)
}

/// [`extract`] step by step, naming what is wrong.
fn extract_checked<'a>(
    headers: &'a HeaderMap,
    query: Option<&str>,
) -> Result<&'a str, BearerError> {
    if query.is_some_and(has_access_token_param) {
        return Err(BearerError::Malformed(
            "access_token in the query string is not accepted",
        ));
    }
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(BearerError::Missing);
    };
    if values.next().is_some() {
        return Err(BearerError::Malformed("more than one Authorization header"));
    }
    let value = value
        .to_str()
        .map_err(|_| BearerError::Malformed("Authorization header is not ASCII"))?;
    let (scheme, token) = value.split_once(' ').ok_or(BearerError::Malformed(
        "Authorization header is not \"Bearer <token>\"",
    ))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(BearerError::Malformed("Authorization scheme is not Bearer"));
    }
    let token = token.trim_start_matches(' ');
    if token.is_empty() {
        return Err(BearerError::Malformed("empty bearer token"));
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(BearerError::Invalid("too large"));
    }
    // RFC 6750 §2.1 b64token: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
    let body = token.trim_end_matches('=');
    if body.is_empty()
        || !body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
    {
        return Err(BearerError::Invalid("malformed"));
    }
    Ok(token)
}

/// An RFC 6750 §2.1 b64token character (before the trailing `=` padding). Comparisons
/// only, no table: over a token's bytes the check compiles to vector instructions.
fn is_b64token(c: u8) -> bool {
    // `| 0x20` folds A–Z onto a–z and maps nothing else there.
    ((c | 0x20).wrapping_sub(b'a') < 26)
        | (c.wrapping_sub(b'0') < 10)
        | (c == b'-')
        | (c == b'.')
        | (c == b'_')
        | (c == b'~')
        | (c == b'+')
        | (c == b'/')
}

/// The token of a single, well-formed `Authorization: Bearer <b64token>` header, checked
/// in one pass over its bytes; `None` for anything else, which the
/// full path then names precisely. A token is hundreds of bytes and arrives on every
/// request.
fn well_formed(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next()?.as_bytes();
    if values.next().is_some() || value.len() < 8 {
        return None;
    }
    let (scheme, token) = value.split_at(7);
    if !scheme.eq_ignore_ascii_case(b"bearer ") || token.len() > MAX_TOKEN_LEN {
        return None;
    }
    let padding = token.iter().rev().take_while(|&&b| b == b'=').count();
    let body = &token[..token.len() - padding];
    // Without an early exit the loop has no branch per byte and unrolls.
    let valid = body.iter().fold(true, |ok, &b| ok & is_b64token(b));
    if body.is_empty() || !valid {
        return None;
    }
    // Only ASCII passed the check, so this cannot fail.
    std::str::from_utf8(token).ok()
}

/// Whether a query string or form body carries an `access_token` parameter.
pub fn has_access_token_param(query: &str) -> bool {
    form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == "access_token")
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// The character check is the RFC's set, for every byte.
    #[test]
    fn b64token_characters() {
        for c in 0..=255u8 {
            let rfc = c.is_ascii_alphanumeric() || b"-._~+/".contains(&c);
            assert_eq!(is_b64token(c), rfc, "byte {c:#04x}");
        }
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// The scheme is case-insensitive; the token is returned as sent.
    #[test]
    fn takes_bearer_token() {
        for v in [
            "Bearer abc.def.ghi",
            "bearer abc.def.ghi",
            "BEARER abc.def.ghi",
        ] {
            assert_eq!(extract(&headers(&[v]), None), Ok("abc.def.ghi"));
        }
        assert_eq!(
            extract(&headers(&["Bearer opaque+/token=="]), None),
            Ok("opaque+/token==")
        );
    }

    /// Each way a request can carry a token wrongly has its own refusal.
    #[test]
    fn refusals() {
        use BearerError::*;
        let cases: &[(&[&str], Option<&str>, BearerError)] = &[
            (&[], None, Missing),
            (
                &["Bearer a", "Bearer b"],
                None,
                Malformed("more than one Authorization header"),
            ),
            (
                &["Basic dXNlcjpwYXNz"],
                None,
                Malformed("Authorization scheme is not Bearer"),
            ),
            (
                &["Bearer"],
                None,
                Malformed("Authorization header is not \"Bearer <token>\""),
            ),
            (&["Bearer "], None, Malformed("empty bearer token")),
            (&["Bearer a b"], None, Invalid("malformed")),
            (&["Bearer a\"b"], None, Invalid("malformed")),
            (&["Bearer ==="], None, Invalid("malformed")),
            (
                &[],
                Some("_id=1&access_token=x"),
                Malformed("access_token in the query string is not accepted"),
            ),
            (
                &["Bearer ok"],
                Some("access_token=x"),
                Malformed("access_token in the query string is not accepted"),
            ),
        ];
        for (h, q, want) in cases {
            assert_eq!(extract(&headers(h), *q), Err(*want), "{h:?} {q:?}");
        }
        let big = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert_eq!(extract(&headers(&[&big]), None), Err(Invalid("too large")));
        // Only a parameter named exactly access_token counts.
        assert_eq!(
            extract(&headers(&["Bearer ok"]), Some("my_access_token=1")),
            Ok("ok")
        );
    }

    /// The one-pass check accepts exactly what the step-by-step path accepts, with the
    /// same token, for single headers; it may only defer (None), never disagree.
    #[test]
    fn fast_path_agrees_with_checked_path() {
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        let values = [
            "Bearer abc.def-ghi_jkl~m+n/o==",
            "bearer abc",
            "BEARER abc=",
            "Bearer  abc",
            "Bearer",
            "Bearer ",
            "Bearer ===",
            "Bearer a=b",
            "Bearer abc def",
            "Basic abc",
            "Bearerabc",
            "Bearer ab\u{7f}",
            "Bearer \u{e9}t\u{e9}",
            long.as_str(),
        ];
        for v in values {
            let Ok(value) = http::HeaderValue::from_bytes(v.as_bytes()) else {
                continue;
            };
            let mut h = HeaderMap::new();
            h.insert(AUTHORIZATION, value);
            let checked = extract_checked(&h, None);
            match well_formed(&h) {
                Some(token) => assert_eq!(checked, Ok(token), "{v:?}"),
                None => assert!(
                    checked.is_err() || v.starts_with("Bearer  "),
                    "{v:?}: the fast path refused what the checked path accepts"
                ),
            }
            assert_eq!(extract(&h, None), checked, "{v:?}");
        }
    }

    proptest::proptest! {
        /// On any Authorization value: the fast path never disagrees with the step-by-step
        /// path, and `extract` gives exactly what the step-by-step path gives.
        #[test]
        fn fast_path_never_disagrees(
            scheme in "(Bearer|bearer|BEARER|Basic|Bearer |)",
            token in "[ -~]{0,40}|[A-Za-z0-9._~+/=-]{1,40}",
        ) {
            let text = format!("{scheme} {token}");
            if let Ok(value) = http::HeaderValue::from_str(&text) {
                let mut h = HeaderMap::new();
                h.insert(AUTHORIZATION, value);
                let checked = extract_checked(&h, None);
                if let Some(fast) = well_formed(&h) {
                    proptest::prop_assert_eq!(checked, Ok(fast));
                }
                proptest::prop_assert_eq!(extract(&h, None), checked);
            }
        }
    }
}

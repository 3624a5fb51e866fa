//! Mapping between the public base URL clients use and the upstream's own base URL(s), so
//! the upstream's address never reaches a client.

use crate::config::BaseUrl;

/// The public base and every base the upstream may call itself.
#[derive(Debug, Clone)]
pub struct UrlMap {
    public: BaseUrl,
    public_str: String,
    /// The configured upstream URL first, then `upstream.aliases`.
    upstream: Vec<(BaseUrl, String)>,
}

impl UrlMap {
    /// Builds the map; `aliases` are other names of the upstream.
    pub fn new(public: &BaseUrl, upstream: &BaseUrl, aliases: &[BaseUrl]) -> UrlMap {
        UrlMap {
            public_str: public.as_string(),
            public: public.clone(),
            upstream: std::iter::once(upstream)
                .chain(aliases)
                .map(|b| (b.clone(), b.as_string()))
                .collect(),
        }
    }

    /// The public base path (no trailing slash; empty for the root).
    pub fn public_path(&self) -> &str {
        &self.public.path
    }

    /// Given a request path-and-query received by the public listener, the part after the
    /// public base path (`""`, `/…` or `?…`), or `None` when it lies outside the base.
    pub fn strip_public<'a>(&self, path_and_query: &'a str) -> Option<&'a str> {
        strip_base_path(path_and_query, &self.public.path)
    }

    /// Rewrites a URL written by the upstream into the public form. Absolute URLs under
    /// any upstream base and absolute paths under the upstream's path are rewritten;
    /// anything else is returned unchanged (`None`).
    pub fn to_public(&self, url: &str) -> Option<String> {
        let (rest, absolute) = self.upstream_rest(url)?;
        let base = if absolute {
            &self.public_str
        } else {
            &self.public.path
        };
        Some(format!("{base}{rest}"))
    }

    /// For a URL written by the upstream, the part after its base (`""`, `/…` or `?…`):
    /// the target a client names relative to the public base once [`UrlMap::to_public`]
    /// rewrote it. `None` for a URL outside the upstream.
    pub fn relative(&self, url: &str) -> Option<String> {
        self.upstream_rest(url).map(|(rest, _)| rest.to_owned())
    }

    /// Where `url` lies under the upstream: the part after the base, and whether `url`
    /// is an absolute URL under any upstream base (else an absolute path under the
    /// upstream's path).
    fn upstream_rest<'a>(&self, url: &'a str) -> Option<(&'a str, bool)> {
        for (_, base_str) in &self.upstream {
            if let Some(rest) = strip_prefix_ci(url, base_str)
                && boundary(rest)
            {
                return Some((rest, true));
            }
        }
        if url.starts_with('/') && !url.starts_with("//") {
            let (primary, _) = &self.upstream[0];
            return strip_base_path(url, &primary.path).map(|rest| (rest, false));
        }
        None
    }
}

/// `rest` begins where a base URL may end: nothing, a path, a query or a fragment.
fn boundary(rest: &str) -> bool {
    rest.is_empty() || rest.starts_with(['/', '?', '#'])
}

fn strip_base_path<'a>(path: &'a str, base_path: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(base_path)?;
    boundary(rest).then_some(rest)
}

/// Scheme and host are case-insensitive (RFC 3986 §6.2.2.1); our bases are lower-cased,
/// so comparing the prefix case-insensitively is exact for the scheme and authority and
/// lenient only for a path that differs in case, which a FHIR server would not emit.
fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> UrlMap {
        UrlMap::new(
            &BaseUrl::parse("https://fhir.example.org/r4").unwrap(),
            &BaseUrl::parse("http://10.0.0.5:8081/fhir").unwrap(),
            &[BaseUrl::parse("http://fhir-internal/fhir").unwrap()],
        )
    }

    /// `relative` is what `to_public` appends to the public base, for the same URLs.
    #[test]
    fn relative_targets() {
        let m = map();
        for url in [
            "http://10.0.0.5:8081/fhir/$export-poll-status?_jobId=1",
            "http://fhir-internal/fhir/Patient/1",
            "http://10.0.0.5:8081/fhir",
            "/fhir/Patient?x=1",
            "https://elsewhere.example/fhir/Patient/1",
            "/other/Patient",
            "http://10.0.0.5:8081/fhirx",
        ] {
            let public = m.to_public(url);
            let rest = m.relative(url);
            assert_eq!(rest.is_some(), public.is_some(), "{url}");
            if let (Some(public), Some(rest)) = (public, rest) {
                let absolute = format!("https://fhir.example.org/r4{rest}");
                assert!(
                    public == absolute || public == format!("/r4{rest}"),
                    "{url}"
                );
            }
        }
        assert_eq!(
            m.relative("http://10.0.0.5:8081/fhir/$export-poll-status?_jobId=1")
                .as_deref(),
            Some("/$export-poll-status?_jobId=1")
        );
    }

    /// Upstream URLs become public ones, with path, query and fragment kept.
    #[test]
    fn rewrites_upstream_urls() {
        let m = map();
        let cases = [
            (
                "http://10.0.0.5:8081/fhir/Patient/1",
                "https://fhir.example.org/r4/Patient/1",
            ),
            ("http://10.0.0.5:8081/fhir", "https://fhir.example.org/r4"),
            (
                "http://10.0.0.5:8081/fhir?_getpages=x",
                "https://fhir.example.org/r4?_getpages=x",
            ),
            (
                "HTTP://10.0.0.5:8081/fhir/Patient",
                "https://fhir.example.org/r4/Patient",
            ),
            (
                "http://fhir-internal/fhir/Observation/2",
                "https://fhir.example.org/r4/Observation/2",
            ),
            ("/fhir/Patient/1/_history/2", "/r4/Patient/1/_history/2"),
        ];
        for (from, to) in cases {
            assert_eq!(m.to_public(from).as_deref(), Some(to), "{from}");
        }
    }

    /// Prefixes must end at a path boundary; foreign URLs are left alone.
    #[test]
    fn leaves_other_urls() {
        let m = map();
        for url in [
            "http://10.0.0.5:8081/fhirx/Patient",
            "http://10.0.0.5:80811/fhir",
            "https://elsewhere.org/fhir/Patient/1",
            "Patient/1",
            "//10.0.0.5:8081/fhir",
            "urn:uuid:1234",
        ] {
            assert_eq!(m.to_public(url), None, "{url}");
        }
    }

    /// Only requests under the public base path are served.
    #[test]
    fn strips_public_prefix() {
        let m = map();
        assert_eq!(m.strip_public("/r4/Patient/1"), Some("/Patient/1"));
        assert_eq!(m.strip_public("/r4"), Some(""));
        assert_eq!(m.strip_public("/r4?x=1"), Some("?x=1"));
        assert_eq!(m.strip_public("/r4x/Patient"), None);
        assert_eq!(m.strip_public("/Patient"), None);
        let root = UrlMap::new(
            &BaseUrl::parse("http://h").unwrap(),
            &BaseUrl::parse("http://u/fhir").unwrap(),
            &[],
        );
        assert_eq!(root.strip_public("/Patient"), Some("/Patient"));
    }
}

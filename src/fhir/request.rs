//! FHIR REST request classification (FHIR R4 http.html): method + path + query (+ form
//! body for `POST _search`) → [`FhirRequest`].
//!
//! The path is normalised once, here, the way a FHIR server reads it: each segment
//! percent-decoded once. Anything a server could read differently from us is refused, not
//! guessed: encoded `/` or `\`, double encoding, `.`/`..` and empty segments, `;` path
//! parameters, non-ASCII, unknown resource types, malformed ids, method overrides.

use http::{HeaderMap, Method};

use super::generated::RESOURCE_TYPES;

/// What a request does (FHIR R4 http.html §3.1.0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Interaction {
    /// `GET [type]/[id]`
    Read,
    /// `GET [type]/[id]/_history/[vid]`
    Vread,
    /// `PUT [type]/[id]`, or conditional `PUT [type]?params`
    Update,
    /// `PATCH [type]/[id]`, or conditional `PATCH [type]?params`
    Patch,
    /// `DELETE [type]/[id]`, or conditional `DELETE [type]?params`
    Delete,
    /// `GET [type]/[id]/_history`
    HistoryInstance,
    /// `GET [type]/_history`
    HistoryType,
    /// `GET _history`
    HistorySystem,
    /// `POST [type]` (conditional with `If-None-Exist`)
    Create,
    /// `GET [type]?…` or `POST [type]/_search`
    SearchType,
    /// `GET [base]?…` or `POST [base]/_search`
    SearchSystem,
    /// `GET [compartment]/[id]/[type]?…`
    SearchCompartment,
    /// `GET metadata`
    Capabilities,
    /// `POST [base]` with a batch Bundle
    Batch,
    /// `POST [base]` with a transaction Bundle
    Transaction,
    /// `$operation` at system level
    OperationSystem,
    /// `[type]/$operation`
    OperationType,
    /// `[type]/[id]/$operation`
    OperationInstance,
}

/// A classified request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FhirRequest {
    /// The interaction.
    pub interaction: Interaction,
    /// The resource type acted on or searched (`None` for system level and `*`
    /// compartment searches).
    pub resource_type: Option<&'static str>,
    /// The resource id (instance level).
    pub id: Option<String>,
    /// The version id (vread).
    pub version: Option<String>,
    /// `(compartment type, id)` of a compartment search.
    pub compartment: Option<(&'static str, String)>,
    /// The operation name without `$`.
    pub operation: Option<String>,
    /// Query parameters (and form parameters of `POST _search`), decoded, in order;
    /// `_format` and `_pretty` are left out.
    pub params: Vec<(String, String)>,
    /// Conditional create, update, patch or delete.
    pub conditional: bool,
}

/// Why a request cannot be classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClassifyError {
    /// The path or query is ambiguous or malformed (400).
    #[error("{0}")]
    BadRequest(&'static str),
    /// The path names no R4 resource type (404).
    #[error("unknown resource type")]
    UnknownType,
    /// The method is not defined for this path (405).
    #[error("method not allowed here")]
    MethodNotAllowed,
}

/// Compartments a search can be scoped by (FHIR R4 compartmentdefinition.html).
const COMPARTMENTS: &[&str] = &[
    "Device",
    "Encounter",
    "Patient",
    "Practitioner",
    "RelatedPerson",
];

/// Classifies a GET of `target` (a path after the FHIR base, with or without a query) as
/// a server would read it with no headers: for URLs the gateway did not receive as a
/// request (an export status URL, a Subscription's criteria).
pub fn classify_get(target: &str) -> Result<FhirRequest, ClassifyError> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    classify(&Method::GET, path, query, &HeaderMap::new(), None, None)
}

/// Classifies a request. `rel_path` is the path after the FHIR base (`""`, `/…`);
/// `form` is the body of a form-encoded `POST`; `bundle_type` the `type` of a Bundle
/// posted to the base.
pub fn classify(
    method: &Method,
    rel_path: &str,
    query: Option<&str>,
    headers: &HeaderMap,
    form: Option<&[u8]>,
    bundle_type: Option<&str>,
) -> Result<FhirRequest, ClassifyError> {
    check_headers(headers)?;
    let segments = normalise(rel_path)?;
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
    let mut params = parse_params(query)?;
    let post = *method == Method::POST;
    let path = Path {
        method,
        get: *method == Method::GET || *method == Method::HEAD,
        post,
        has_query: !params.is_empty(),
        headers,
    };
    let mut req = FhirRequest {
        interaction: Interaction::SearchSystem,
        resource_type: None,
        id: None,
        version: None,
        compartment: None,
        operation: None,
        params: Vec::new(),
        conditional: false,
    };
    match seg.len() {
        0 | 1 => path.system_or_type(&seg, bundle_type, &mut req)?,
        2 => path.type_or_instance(&seg, &mut req)?,
        _ => path.instance_or_compartment(&seg, &mut req)?,
    }

    let search = matches!(
        req.interaction,
        Interaction::SearchType | Interaction::SearchSystem | Interaction::SearchCompartment
    );
    // A form body is search parameters (POST _search) and nothing else: no create,
    // operation or bundle is form-encoded, and a server that merges form fields into the
    // parameters of any POST (as servlet containers do) would read ones never decided on.
    if form.is_some() && post && !search {
        return Err(ClassifyError::BadRequest(
            "a form-encoded body is read only as the parameters of POST _search",
        ));
    }
    // POST _search: form parameters count like query parameters.
    if let (true, Some(body)) = (post && search, form) {
        let text = std::str::from_utf8(body)
            .map_err(|_| ClassifyError::BadRequest("form body is not UTF-8"))?;
        params.extend(parse_params(Some(text))?);
    }
    req.params = params
        .into_iter()
        .filter(|(k, _)| k != "_format" && k != "_pretty")
        .collect();
    Ok(req)
}

/// What the path's shape says, by its number of segments (FHIR R4 http.html).
struct Path<'a> {
    method: &'a Method,
    get: bool,
    post: bool,
    has_query: bool,
    headers: &'a HeaderMap,
}

impl Path<'_> {
    /// A path that matches no interaction: 405 for a method FHIR has nowhere there,
    /// else 400.
    fn unmatched(&self, seg: &[&str]) -> Result<(), ClassifyError> {
        if seg.len() <= 4 && !(self.get || self.post) {
            return Err(ClassifyError::MethodNotAllowed);
        }
        Err(ClassifyError::BadRequest("not a FHIR REST path"))
    }

    /// `[base]`, `[base]/metadata`, `_history`, `_search`, `$op`, `[type]`.
    fn system_or_type(
        &self,
        seg: &[&str],
        bundle_type: Option<&str>,
        req: &mut FhirRequest,
    ) -> Result<(), ClassifyError> {
        let (get, post) = (self.get, self.post);
        match seg {
            [] if get => req.interaction = Interaction::SearchSystem,
            [] if post => {
                req.interaction = match bundle_type {
                    Some("batch") => Interaction::Batch,
                    Some("transaction") => Interaction::Transaction,
                    _ => {
                        return Err(ClassifyError::BadRequest(
                            "POST to the base needs a batch or transaction Bundle",
                        ));
                    }
                }
            }
            ["metadata"] if get => req.interaction = Interaction::Capabilities,
            ["_history"] if get => req.interaction = Interaction::HistorySystem,
            ["_search"] if post || get => req.interaction = Interaction::SearchSystem,
            [op] if op.starts_with('$') => {
                req.interaction = Interaction::OperationSystem;
                req.operation = Some(operation(op)?);
            }
            [ty] => {
                req.resource_type = Some(resource_type(ty)?);
                req.interaction = match *self.method {
                    _ if get => Interaction::SearchType,
                    Method::POST => {
                        req.conditional = self.headers.contains_key(&IF_NONE_EXIST);
                        Interaction::Create
                    }
                    Method::PUT | Method::PATCH | Method::DELETE if self.has_query => {
                        req.conditional = true;
                        match *self.method {
                            Method::PUT => Interaction::Update,
                            Method::PATCH => Interaction::Patch,
                            _ => Interaction::Delete,
                        }
                    }
                    _ => return Err(ClassifyError::MethodNotAllowed),
                }
            }
            _ => return self.unmatched(seg),
        }
        Ok(())
    }

    /// `[type]/_search`, `[type]/_history`, `[type]/$op`, `[type]/[id]`.
    fn type_or_instance(&self, seg: &[&str], req: &mut FhirRequest) -> Result<(), ClassifyError> {
        let (get, post) = (self.get, self.post);
        match seg {
            [ty, "_search"] if post || get => {
                req.resource_type = Some(resource_type(ty)?);
                req.interaction = Interaction::SearchType;
            }
            [ty, "_history"] if get => {
                req.resource_type = Some(resource_type(ty)?);
                req.interaction = Interaction::HistoryType;
            }
            [ty, op] if op.starts_with('$') => {
                req.resource_type = Some(resource_type(ty)?);
                req.interaction = Interaction::OperationType;
                req.operation = Some(operation(op)?);
            }
            [ty, id] => {
                req.resource_type = Some(resource_type(ty)?);
                req.id = Some(fhir_id(id)?);
                req.interaction = match *self.method {
                    _ if get => Interaction::Read,
                    Method::PUT => Interaction::Update,
                    Method::PATCH => Interaction::Patch,
                    Method::DELETE => Interaction::Delete,
                    _ => return Err(ClassifyError::MethodNotAllowed),
                };
            }
            _ => return self.unmatched(seg),
        }
        Ok(())
    }

    /// `[type]/[id]/_history[/vid]`, `[type]/[id]/$op`, `[compartment]/[id]/[type]`.
    fn instance_or_compartment(
        &self,
        seg: &[&str],
        req: &mut FhirRequest,
    ) -> Result<(), ClassifyError> {
        let get = self.get;
        match seg {
            [ty, id, "_history"] if get => {
                req.resource_type = Some(resource_type(ty)?);
                req.id = Some(fhir_id(id)?);
                req.interaction = Interaction::HistoryInstance;
            }
            [ty, id, "_history", vid] if get => {
                req.resource_type = Some(resource_type(ty)?);
                req.id = Some(fhir_id(id)?);
                req.version = Some(fhir_id(vid)?);
                req.interaction = Interaction::Vread;
            }
            [ty, id, op] if op.starts_with('$') => {
                req.resource_type = Some(resource_type(ty)?);
                req.id = Some(fhir_id(id)?);
                req.interaction = Interaction::OperationInstance;
                req.operation = Some(operation(op)?);
            }
            [comp, id, ty] if get => {
                let comp = resource_type(comp)?;
                if !COMPARTMENTS.contains(&comp) {
                    return Err(ClassifyError::BadRequest("not a compartment"));
                }
                req.compartment = Some((comp, fhir_id(id)?));
                req.resource_type = if *ty == "*" {
                    None
                } else {
                    Some(resource_type(ty)?)
                };
                req.interaction = Interaction::SearchCompartment;
            }
            _ => return self.unmatched(seg),
        }
        Ok(())
    }
}

/// `If-None-Exist` (FHIR R4 http.html#ccreate), a static name: no parse per lookup.
pub static IF_NONE_EXIST: http::HeaderName = http::HeaderName::from_static("if-none-exist");

/// Refuses headers that would make the upstream read the request as something else:
/// method overrides, and more than one `Content-Type` (a singleton field, RFC 9110
/// §8.3: the gateway reads the first, a server may read another). Run it before
/// anything that skips classification.
pub fn check_headers(headers: &HeaderMap) -> Result<(), ClassifyError> {
    // Repeated names are rare: counted only when some name repeats.
    if headers.len() != headers.keys_len()
        && headers
            .get_all(http::header::CONTENT_TYPE)
            .iter()
            .nth(1)
            .is_some()
    {
        return Err(ClassifyError::BadRequest(
            "more than one Content-Type header",
        ));
    }
    // One pass over the names present (lowercase in a HeaderMap) rather than a parsed
    // lookup per name: this runs for every authorized request.
    for name in headers.keys() {
        match name.as_str() {
            "x-http-method-override" | "x-method-override" | "x-http-method" => {
                return Err(ClassifyError::BadRequest(
                    "method override headers are not accepted",
                ));
            }
            // HAPI FHIR's cascading delete by header: a header is no part of what the
            // decision is cached by; the `_cascade` parameter is, and is checked.
            "x-cascade" => {
                return Err(ClassifyError::BadRequest(
                    "X-Cascade is not accepted: ask a cascading delete with _cascade=delete",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Splits and decodes the path once; refuses what could be read two ways.
fn normalise(rel_path: &str) -> Result<Vec<String>, ClassifyError> {
    let bad = |why| Err(ClassifyError::BadRequest(why));
    let path = match rel_path {
        "" | "/" => return Ok(Vec::new()),
        p => p
            .strip_prefix('/')
            .ok_or(ClassifyError::BadRequest("path must start with /"))?,
    };
    let mut out = Vec::new();
    for raw in path.split('/') {
        if raw.is_empty() {
            return bad("empty path segment");
        }
        if !raw.bytes().all(|b| b.is_ascii_graphic()) {
            return bad("path has spaces, control or non-ASCII characters");
        }
        if raw.contains(';') || raw.contains('\\') {
            return bad("path parameters and backslashes are not accepted");
        }
        let decoded =
            percent_decode(raw).ok_or(ClassifyError::BadRequest("bad percent-encoding"))?;
        if decoded.contains(['/', '\\', '%', ';']) || !decoded.bytes().all(|b| b.is_ascii_graphic())
        {
            return bad("encoded separator, double encoding or control character in path");
        }
        if decoded == "." || decoded == ".." {
            return bad("dot segment in path");
        }
        out.push(decoded);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn parse_params(query: Option<&str>) -> Result<Vec<(String, String)>, ClassifyError> {
    let Some(q) = query else {
        return Ok(Vec::new());
    };
    Ok(form_urlencoded::parse(q.as_bytes())
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect())
}

/// The R4 resource type with this exact name (case-sensitive).
pub fn resource_type(name: &str) -> Result<&'static str, ClassifyError> {
    RESOURCE_TYPES
        .binary_search(&name)
        .map(|i| RESOURCE_TYPES[i])
        .map_err(|_| ClassifyError::UnknownType)
}

/// A FHIR id: `[A-Za-z0-9\-\.]{1,64}` (FHIR R4 datatypes.html#id).
fn fhir_id(s: &str) -> Result<String, ClassifyError> {
    if super::is_id(s) {
        Ok(s.to_owned())
    } else {
        Err(ClassifyError::BadRequest("not a valid FHIR id"))
    }
}

fn operation(seg: &str) -> Result<String, ClassifyError> {
    let name = &seg[1..];
    if !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(name.to_owned())
    } else {
        Err(ClassifyError::BadRequest("not a valid operation name"))
    }
}

#[cfg(test)]
mod tests;

use super::*;
use Interaction::*;

fn c(method: &str, path: &str) -> Result<FhirRequest, ClassifyError> {
    let (p, q) = match path.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path, None),
    };
    classify(
        &method.parse().unwrap(),
        p,
        q,
        &HeaderMap::new(),
        None,
        None,
    )
}

fn interaction(method: &str, path: &str) -> Interaction {
    c(method, path)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
        .interaction
}

/// FHIR R4 http.html: every interaction by method and path shape.
#[test]
fn interactions() {
    let table = [
        ("GET", "/Patient/123", Read),
        ("HEAD", "/Patient/123", Read),
        ("GET", "/Patient/123/_history/2", Vread),
        ("PUT", "/Patient/123", Update),
        ("PATCH", "/Patient/123", Patch),
        ("DELETE", "/Patient/123", Delete),
        ("GET", "/Patient/123/_history", HistoryInstance),
        ("GET", "/Patient/_history", HistoryType),
        ("GET", "/_history", HistorySystem),
        ("POST", "/Patient", Create),
        ("GET", "/Observation?code=x", SearchType),
        ("GET", "/Observation", SearchType),
        ("POST", "/Observation/_search", SearchType),
        ("GET", "?_type=Patient", SearchSystem),
        ("GET", "", SearchSystem),
        ("POST", "/_search", SearchSystem),
        ("GET", "/Patient/123/Observation", SearchCompartment),
        ("GET", "/Patient/123/*", SearchCompartment),
        ("GET", "/metadata", Capabilities),
        ("GET", "/$export", OperationSystem),
        ("POST", "/Patient/$export", OperationType),
        ("GET", "/Patient/123/$everything", OperationInstance),
        ("PUT", "/Patient?identifier=x", Update),
        ("DELETE", "/Observation?code=x", Delete),
        ("PATCH", "/Observation?code=x", Patch),
    ];
    for (m, p, want) in table {
        assert_eq!(interaction(m, p), want, "{m} {p}");
    }
}

/// Details: ids, versions, compartments, operations, conditionals, ignored params.
#[test]
fn details() {
    let r = c("GET", "/Patient/123/_history/2").unwrap();
    assert_eq!(
        (r.resource_type, r.id.as_deref(), r.version.as_deref()),
        (Some("Patient"), Some("123"), Some("2"))
    );
    let r = c(
        "GET",
        "/Patient/123/Observation?code=x&_format=json&_pretty=true",
    )
    .unwrap();
    assert_eq!(r.compartment, Some(("Patient", "123".to_owned())));
    assert_eq!(r.resource_type, Some("Observation"));
    assert_eq!(r.params, vec![("code".to_owned(), "x".to_owned())]);
    let r = c("GET", "/Patient/123/$everything").unwrap();
    assert_eq!(r.operation.as_deref(), Some("everything"));
    assert!(c("PUT", "/Patient?identifier=x").unwrap().conditional);
    let mut h = HeaderMap::new();
    h.insert("if-none-exist", "identifier=x".parse().unwrap());
    let r = classify(&Method::POST, "/Patient", None, &h, None, None).unwrap();
    assert!(r.conditional);
    // Encoded $ decodes once to an operation.
    assert_eq!(
        interaction("GET", "/Patient/123/%24everything"),
        OperationInstance
    );
}

/// POST _search: the form body counts like the query.
#[test]
fn post_search_merges_form() {
    let r = classify(
        &Method::POST,
        "/Observation/_search",
        Some("patient=123"),
        &HeaderMap::new(),
        Some(b"code=abc&subject=Patient/456"),
        None,
    )
    .unwrap();
    assert_eq!(r.params.len(), 3);
    assert!(
        r.params
            .contains(&("subject".to_owned(), "Patient/456".to_owned()))
    );
}

/// A form body anywhere but POST _search is refused: a server merging form fields into
/// any POST's parameters would read ones the gateway never decided on.
#[test]
fn form_body_only_for_search() {
    let form = Some(&b"_cascade=delete&code=abc"[..]);
    for path in [
        "/Observation",
        "/Observation/$validate",
        "/$export",
        "/Patient/1/$everything",
    ] {
        assert_eq!(
            classify(&Method::POST, path, None, &HeaderMap::new(), form, None),
            Err(ClassifyError::BadRequest(
                "a form-encoded body is read only as the parameters of POST _search"
            )),
            "{path}"
        );
    }
    for path in ["/Observation/_search", "/_search"] {
        let r = classify(&Method::POST, path, None, &HeaderMap::new(), form, None).unwrap();
        assert_eq!(r.params.len(), 2, "{path}");
    }
}

/// Batch and transaction by the posted Bundle's type; nothing else may be posted to the base.
#[test]
fn bundles() {
    let h = HeaderMap::new();
    assert_eq!(
        classify(&Method::POST, "", None, &h, None, Some("batch"))
            .unwrap()
            .interaction,
        Batch
    );
    assert_eq!(
        classify(&Method::POST, "/", None, &h, None, Some("transaction"))
            .unwrap()
            .interaction,
        Transaction
    );
    for t in [None, Some("searchset"), Some("document")] {
        assert!(matches!(
            classify(&Method::POST, "", None, &h, None, t),
            Err(ClassifyError::BadRequest(_))
        ));
    }
}

/// The path attack list: each is refused (400, 404 or 405), never classified.
#[test]
fn hostile_paths() {
    let hostile = [
        ("GET", "/Patient%2F123"),
        ("GET", "/Patient%2f123"),
        ("GET", "/Patient%252F123"),
        ("GET", "/Patient/123%2F..%2F456"),
        ("GET", "/Patient/..%2F456"),
        ("GET", "/Patient/123/../456"),
        ("GET", "/Patient/./123"),
        ("GET", "/Patient/%2e%2e/456"),
        ("GET", "/Patient/%2E"),
        ("GET", "/Patient/123;jsessionid=x"),
        ("GET", "/Patient;x/123"),
        ("GET", "//Patient/123"),
        ("GET", "/Patient//123"),
        ("GET", "/Patient/123/"),
        ("GET", "/patient/123"),
        ("GET", "/PATIENT/123"),
        ("GET", "/Patients/123"),
        ("GET", "/Patient\\123"),
        ("GET", "/Patient/123%5C456"),
        ("GET", "/Patient/123%00"),
        ("GET", "/Patient/12%G3"),
        ("GET", "/Patient/12%"),
        ("GET", "/Patient/%C3%A9"),
        ("GET", "/Patient/123 456"),
        ("GET", "/Patient/123_x"),
        ("GET", &format!("/Patient/{}", "a".repeat(65))),
        ("GET", "/Patient/123/_history/2/x"),
        ("GET", "/Patient/123/_history/"),
        ("GET", "/Patient/123/_history/v%2F1"),
        ("GET", "/Patient/123/_history/../../456"),
        ("GET", "/Observation/123/Patient"),
        ("GET", "/Patient/123/Observations"),
        ("GET", "/Patient/123/Observation/456"),
        ("GET", "/Patient/123/$"),
        ("GET", "/Patient/123/$ever%2Fthing"),
        ("GET", "/$export/../Patient"),
        ("POST", "/Patient/123"),
        ("POST", ""),
        ("PUT", "/Patient"),
        ("DELETE", "/Patient"),
        ("GET", "/Patient/%2e%2e%2f456"),
        ("GET", "/.well-known/../Patient"),
        ("GET", "Patient/123"),
    ];
    assert!(hostile.len() >= 40);
    for (m, p) in hostile {
        assert!(c(m, p).is_err(), "{m} {p} was classified as {:?}", c(m, p));
    }
    // Unknown types are 404, ambiguity 400.
    assert_eq!(c("GET", "/patient/123"), Err(ClassifyError::UnknownType));
    assert!(matches!(
        c("GET", "/Patient%2F123"),
        Err(ClassifyError::BadRequest(_))
    ));
}

/// Method-override headers are refused outright.
#[test]
fn cascade_header_refused() {
    // HAPI's header form of a cascading delete: refused, any case, pointing at the
    // `_cascade` parameter the policy checks.
    for h in ["x-cascade", "X-Cascade"] {
        let mut headers = HeaderMap::new();
        headers.insert(h, "delete".parse().unwrap());
        assert_eq!(
            classify(&Method::DELETE, "/Patient/1", None, &headers, None, None),
            Err(ClassifyError::BadRequest(
                "X-Cascade is not accepted: ask a cascading delete with _cascade=delete"
            ))
        );
    }
}

#[test]
fn method_override_refused() {
    for h in [
        "x-http-method-override",
        "x-method-override",
        "x-http-method",
        "X-HTTP-Method-Override",
    ] {
        let mut headers = HeaderMap::new();
        headers.insert(h, "DELETE".parse().unwrap());
        assert!(matches!(
            classify(&Method::GET, "/Patient/1", None, &headers, None, None),
            Err(ClassifyError::BadRequest(_))
        ));
    }
}

/// Each special path is what it is for its methods only: any other method falls through to
/// the next reading of the path (a type named "metadata", an id named "_history"), which
/// fails, or is refused as a method FHIR has nowhere there.
#[test]
fn special_paths_by_method() {
    use ClassifyError::*;
    let err = |method: &str, path: &str| c(method, path).unwrap_err();
    for (method, path, want) in [
        ("PUT", "", MethodNotAllowed),
        ("DELETE", "", MethodNotAllowed),
        ("POST", "/metadata", UnknownType),
        ("POST", "/_history", UnknownType),
        ("PUT", "/_search", UnknownType),
        ("DELETE", "/_search", UnknownType),
        ("DELETE", "/Observation/1/_history", MethodNotAllowed),
        ("PUT", "/Observation/1/_history/2", MethodNotAllowed),
        ("DELETE", "/Patient/1/Observation", MethodNotAllowed),
    ] {
        assert_eq!(err(method, path), want, "{method} {path}");
    }
    // An id may not start with '_': a write to [type]/_search or [type]/_history is a
    // malformed instance, not a search or a history.
    for (method, path) in [
        ("PUT", "/Observation/_search"),
        ("PATCH", "/Observation/_search"),
        ("DELETE", "/Observation/_history"),
        ("PUT", "/Observation/_history"),
    ] {
        assert!(
            matches!(err(method, path), BadRequest(_)),
            "{method} {path}"
        );
    }
    // POST where FHIR has no POST, and paths too long for any interaction: 400; a path of
    // up to four segments with a method FHIR has nowhere there: 405.
    for (method, path) in [
        ("POST", "/Observation/1/_history"),
        ("POST", "/Patient/1/Observation"),
        ("GET", "/Observation/1/_history/2/x"),
        ("DELETE", "/Observation/1/_history/2/x"),
    ] {
        assert!(
            matches!(err(method, path), BadRequest(_)),
            "{method} {path}"
        );
    }
    assert_eq!(err("PATCH", "/Observation/1/_history/2"), MethodNotAllowed);
}

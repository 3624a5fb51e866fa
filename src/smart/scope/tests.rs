use super::*;

fn rs(level: Level, ty: TypeSel, perms: &str) -> Scope {
    Scope::Resource(ResourceScope {
        level,
        resource: ty,
        perms: Perms::parse_v2(perms).unwrap(),
        constraints: Vec::new(),
    })
}

/// SMART 2.2: v2 letters are a non-empty, in-order subset of cruds.
#[test]
fn v2_scopes() {
    use Level::*;
    let ok = [
        (
            "patient/Observation.rs",
            rs(Patient, TypeSel::Type("Observation"), "rs"),
        ),
        ("user/*.cruds", rs(User, TypeSel::Any, "cruds")),
        (
            "system/Patient.r",
            rs(System, TypeSel::Type("Patient"), "r"),
        ),
        (
            "patient/Encounter.cud",
            rs(Patient, TypeSel::Type("Encounter"), "cud"),
        ),
        (
            "user/Medication.s",
            rs(User, TypeSel::Type("Medication"), "s"),
        ),
    ];
    for (s, want) in ok {
        assert_eq!(parse(s), Ok(want), "{s}");
    }
}

/// SMART 2.2: `.dus`, `.sr`, `.rrs`, `.RS` and `.` are undefined.
#[test]
fn malformed_letters() {
    for s in [
        "patient/Observation.sr",
        "patient/Observation.rrs",
        "patient/Observation.RS",
        "patient/Observation.",
        "patient/Observation.dus",
        "patient/Observation.x",
    ] {
        assert_eq!(parse(s), Err(ScopeError::Perms), "{s}");
    }
}

/// v1: read = rs, write = cud, * = cruds; system/ is accepted too.
#[test]
fn v1_scopes() {
    let p = |s: &str| match parse(s).unwrap() {
        Scope::Resource(r) => r.perms.to_string(),
        Scope::NonResource => panic!("{s}"),
    };
    assert_eq!(p("patient/Observation.read"), "rs");
    assert_eq!(p("user/*.write"), "cud");
    assert_eq!(p("system/*.*"), "cruds");
    assert_eq!(
        parse("patient/Observation.read?category=x"),
        Err(ScopeError::Query)
    );
}

/// Types are exact R4 resource types or `*`.
#[test]
fn resource_types() {
    for s in [
        "patient/observation.rs",
        "patient/Obs*.rs",
        "patient/Foo.rs",
        "patient/.rs",
        "patient/**.rs",
    ] {
        assert_eq!(parse(s), Err(ScopeError::ResourceType), "{s}");
    }
}

/// Levels and shapes.
#[test]
fn shapes() {
    assert_eq!(parse("admin/Patient.rs"), Err(ScopeError::Level));
    assert_eq!(parse("Patient.rs"), Err(ScopeError::Shape));
    assert_eq!(parse("patient/Patient"), Err(ScopeError::Shape));
    assert_eq!(parse(""), Err(ScopeError::Characters));
    assert_eq!(
        parse("patient/Observation.rs "),
        Err(ScopeError::Characters)
    );
    assert_eq!(parse("/"), Err(ScopeError::Level));
}

/// Granular constraints are kept as (param[:modifier], value) pairs.
#[test]
fn granular_constraints() {
    let Ok(Scope::Resource(r)) = parse(
        "patient/Observation.rs?category=http://terminology.hl7.org/CodeSystem/observation-category|laboratory&code:in=http://x/vs",
    ) else {
        panic!()
    };
    assert_eq!(
        r.constraints,
        vec![
            (
                "category".to_owned(),
                "http://terminology.hl7.org/CodeSystem/observation-category|laboratory".to_owned()
            ),
            ("code:in".to_owned(), "http://x/vs".to_owned()),
        ]
    );
    for s in [
        "patient/Observation.rs?",
        "patient/Observation.rs?category",
        "patient/Observation.rs?=x",
    ] {
        assert_eq!(parse(s), Err(ScopeError::Query), "{s}");
    }
}

/// Identity, context and extension scopes grant no data and are not errors.
#[test]
fn non_resource_scopes() {
    for s in [
        "openid",
        "fhirUser",
        "profile",
        "launch",
        "launch/patient",
        "launch/encounter",
        "offline_access",
        "online_access",
        "__ext_thing",
        "https://example.org/scope/x",
        "urn:example:scope",
    ] {
        assert_eq!(parse(s), Ok(Scope::NonResource), "{s}");
    }
}

/// Malformed scopes beside good ones: the good ones still grant, the bad ones are listed.
#[test]
fn union_and_ignored() {
    let g = Grants::parse(
        "patient/Observation.r patient/Observation.s patient/Observation.sr openid user/Patient.cud"
            .split_whitespace(),
    );
    assert_eq!(
        g.perms(Level::Patient, "Observation"),
        Perms::parse_v2("rs").unwrap()
    );
    assert_eq!(
        g.perms(Level::User, "Patient"),
        Perms::parse_v2("cud").unwrap()
    );
    assert_eq!(g.perms(Level::User, "Observation"), Perms::NONE);
    assert_eq!(g.ignored.len(), 1);
    assert_eq!(g.ignored[0].1, ScopeError::Perms);
    // Granular scopes do not grant type-wide permission.
    let g = Grants::parse(["patient/Observation.rs?category=laboratory"]);
    assert_eq!(g.perms(Level::Patient, "Observation"), Perms::NONE);
    let wildcard = Grants::parse(["system/*.rs"]);
    assert!(
        wildcard
            .perms(Level::System, "Condition")
            .contains(Perms::S)
    );
}

/// The explain output names each permission and each ignored scope with its reason.
#[test]
fn explain_lines() {
    let g = Grants::parse(["patient/Observation.rs?category=laboratory", "user/Foo.r"]);
    let lines = g.explain();
    assert!(
        lines[0].contains("Observation") && lines[0].contains("only where category=laboratory")
    );
    assert!(lines[1].contains("ignored") && lines[1].contains("not an R4 resource type"));
}

/// RFC 6749 §3.3: only SP separates scopes, and a scope token holds only
/// `%x21 / %x23-5B / %x5D-7E`. Any other white space joins two scopes into one malformed
/// scope that grants nothing.
#[test]
fn only_sp_separates_scopes() {
    for joined in [
        "patient/Patient.rs\u{a0}user/*.rs",
        "patient/Patient.rs\u{3000}user/*.rs",
        "patient/Patient.rs\tuser/*.rs",
        "patient/Patient.rs\nuser/*.rs",
        "patient/Patient.rs\u{2028}user/*.rs",
        "patient/Patient.rs\u{85}user/*.rs",
    ] {
        let tokens: Vec<&str> = split(joined).collect();
        assert_eq!(tokens, [joined], "{joined:?} is one token");
        let g = Grants::parse(split(joined));
        assert!(g.scopes.is_empty(), "{joined:?} grants nothing: {g:?}");
        assert_eq!(g.ignored, [(joined.to_owned(), ScopeError::Characters)]);
    }
    assert_eq!(
        split(" patient/*.rs  openid ").collect::<Vec<_>>(),
        ["patient/*.rs", "openid"]
    );
    // Outside the scope-token set: `"`, `\`, DEL, controls, non-ASCII.
    for bad in [
        "patient/*.rs\"",
        "patient/*.r\\s",
        "patient/*.rs\u{7f}",
        "openid\u{0}",
        "patient/Obs\u{e9}rvation.rs",
    ] {
        assert_eq!(parse(bad), Err(ScopeError::Characters), "{bad:?}");
    }
    assert_eq!(parse(""), Err(ScopeError::Characters));
    assert!(parse("patient/Observation.rs?category=a|b").is_ok());
}

/// The set operations on letters, for every pair of the 32 sets, against set semantics
/// computed from the letters themselves: union is the letters of either, contains every
/// letter of the other, intersects at least one in common (a mutant `intersects → true`
/// would let a create-only scope read; `union`'s `|` as `^` would drop shared letters).
#[test]
fn perms_are_sets_of_letters() {
    let letters = |p: Perms| -> Vec<char> { p.to_string().chars().collect() };
    let all: Vec<Perms> = (0u8..32)
        .map(|bits| {
            "cruds"
                .chars()
                .enumerate()
                .filter(|(i, _)| bits & (1 << i) != 0)
                .fold(Perms::NONE, |acc, (_, l)| {
                    acc.union(Perms::parse_v2(&l.to_string()).unwrap())
                })
        })
        .collect();
    for &a in &all {
        for &b in &all {
            let (la, lb) = (letters(a), letters(b));
            let union: Vec<char> = "cruds"
                .chars()
                .filter(|c| la.contains(c) || lb.contains(c))
                .collect();
            assert_eq!(letters(a.union(b)), union, "{a} ∪ {b}");
            assert_eq!(
                a.contains(b),
                lb.iter().all(|c| la.contains(c)),
                "{a} ⊇ {b}"
            );
            assert_eq!(
                a.intersects(b),
                lb.iter().any(|c| la.contains(c)),
                "{a} ∩ {b}"
            );
        }
    }
    assert_eq!(letters(Perms::ALL), ['c', 'r', 'u', 'd', 's']);
    assert_eq!(letters(Perms::NONE), Vec::<char>::new());
}

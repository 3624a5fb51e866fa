//! Which scopes a backend client gets: what it asked for, intersected with what it is
//! registered for. Backend Services clients act for themselves, so only `system/` data
//! scopes are granted; other scope strings only when registered verbatim.

use crate::smart::scope::{Level, ResourceScope, Scope, parse};

/// Whether scope `g` allows everything scope `r` asks for.
fn covers(g: &ResourceScope, r: &ResourceScope) -> bool {
    g.level == r.level
        && (g.resource == crate::smart::scope::TypeSel::Any || g.resource == r.resource)
        && g.perms.contains(r.perms)
        && g.constraints.iter().all(|c| r.constraints.contains(c))
}

/// The granted scope string for a backend client: `system/` scopes (see [`grant_at`]).
pub fn grant(requested: &str, registered: &str) -> String {
    grant_at(requested, registered, &[Level::System])
}

/// The granted scope string: each requested resource scope at one of `levels` that a
/// registered one covers, as requested; for a requested scope wider than the
/// registration, the registered scopes it covers. Other scopes only when registered
/// verbatim. Order kept, duplicates dropped.
pub fn grant_at(requested: &str, registered: &str, levels: &[Level]) -> String {
    let reg: Vec<(&str, Option<ResourceScope>)> = crate::smart::scope::split(registered)
        .map(|s| {
            let parsed = match parse(s) {
                Ok(Scope::Resource(r)) if levels.contains(&r.level) => Some(r),
                _ => None,
            };
            (s, parsed)
        })
        .collect();
    let mut out: Vec<&str> = Vec::new();
    let mut push = |s| {
        if !out.contains(&s) {
            out.push(s);
        }
    };
    for want in crate::smart::scope::split(requested) {
        match parse(want) {
            Ok(Scope::Resource(r)) => {
                if !levels.contains(&r.level) {
                    continue;
                }
                if reg
                    .iter()
                    .any(|(_, g)| g.as_ref().is_some_and(|g| covers(g, &r)))
                {
                    push(want);
                } else {
                    for (s, g) in &reg {
                        if g.as_ref().is_some_and(|g| covers(&r, g)) {
                            push(s);
                        }
                    }
                }
            }
            // Anything else only when registered exactly.
            _ => {
                if reg.iter().any(|(s, _)| *s == want) {
                    push(want);
                }
            }
        }
    }
    out.join(" ")
}

#[cfg(test)]
mod tests {
    use super::grant;

    /// A requested scope joined to another by white space other than SP is one malformed
    /// scope (RFC 6749 §3.3) and is not granted, nor is what it seems to hold.
    #[test]
    fn requested_scopes_split_on_sp_only() {
        let reg = "system/*.rs";
        for sep in ["\t", "\u{a0}", "\u{3000}", "\n"] {
            let requested = format!("system/Patient.r{sep}system/Observation.rs");
            assert_eq!(grant(&requested, reg), "", "{sep:?}");
        }
        assert_eq!(
            grant("system/Patient.r system/Observation.rs", reg),
            "system/Patient.r system/Observation.rs"
        );
    }

    #[test]
    fn intersection() {
        let reg =
            "system/Observation.rs system/Patient.r system/Condition.rs?category=x introspect";
        assert_eq!(grant("system/Observation.rs", reg), "system/Observation.rs");
        assert_eq!(grant("system/Observation.r", reg), "system/Observation.r");
        assert_eq!(
            grant("system/Observation.read", reg),
            "system/Observation.read"
        );
        // Wider than registered: the registered part of it.
        assert_eq!(
            grant("system/Observation.cruds", reg),
            "system/Observation.rs"
        );
        assert_eq!(
            grant("system/Encounter.rs", reg),
            "",
            "beyond the registration"
        );
        let all = "system/Observation.rs system/Patient.r system/Condition.rs?category=x";
        assert_eq!(grant("system/*.rs", reg), all);
        assert_eq!(grant("system/*.read", reg), all);
        // The registration is narrower: the client gets the narrower scope.
        assert_eq!(
            grant("system/Condition.rs", reg),
            "system/Condition.rs?category=x"
        );
        assert_eq!(
            grant("system/Condition.rs?category=x", reg),
            "system/Condition.rs?category=x"
        );
        assert_eq!(
            grant("patient/Observation.rs user/Observation.rs", reg),
            "",
            "system/ only"
        );
        assert_eq!(
            grant("introspect openid system/Patient.r system/Patient.r", reg),
            "introspect system/Patient.r"
        );
        assert_eq!(grant("system/*.cruds", "system/*.rs"), "system/*.rs");
        assert_eq!(grant("", reg), "");
    }
}

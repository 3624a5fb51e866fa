//! SMART scopes (SMART App Launch 2.2, scopes-and-launch-context): v2
//! `(patient|user|system)/(Type|*).<cruds>[?param=value&…]` and v1 `.read|.write|.*`.
//!
//! A malformed scope is ignored on its own — it grants nothing and never fails the token
//! or the request; the permission a token holds is the union of its good scopes.

use std::fmt;

use crate::fhir::generated::RESOURCE_TYPES;

/// Whose data a scope reaches (SMART 2.2 §"Scopes for requesting clinical data").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// `patient/`: the patient in context.
    Patient,
    /// `user/`: what the user may see.
    User,
    /// `system/`: what the client is configured for (backend services).
    System,
}

impl Level {
    /// `patient`, `user` or `system`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Patient => "patient",
            Level::User => "user",
            Level::System => "system",
        }
    }
}

/// A set of the interaction letters `c r u d s` (SMART 2.2 §"Scope requirements").
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Perms(u8);

impl Perms {
    /// create
    pub const C: Perms = Perms(1);
    /// read (read, vread, instance history)
    pub const R: Perms = Perms(2);
    /// update (update, patch)
    pub const U: Perms = Perms(4);
    /// delete
    pub const D: Perms = Perms(8);
    /// search (search, type and system history)
    pub const S: Perms = Perms(16);
    /// nothing
    pub const NONE: Perms = Perms(0);
    /// `cruds`
    pub const ALL: Perms = Perms(31);

    /// Union.
    pub const fn union(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }

    /// Whether every letter of `other` is in `self`.
    pub const fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any letter of `other` is in `self`.
    pub const fn intersects(self, other: Perms) -> bool {
        self.0 & other.0 != 0
    }

    /// Parses v2 letters: a non-empty subset of `cruds`, in that order, no repeats.
    fn parse_v2(letters: &str) -> Option<Perms> {
        if letters.is_empty() {
            return None;
        }
        let mut perms = 0u8;
        let mut last = -1i32;
        for b in letters.bytes() {
            let i = b"cruds".iter().position(|l| *l == b)? as i32;
            if i <= last {
                return None;
            }
            last = i;
            perms |= 1 << i;
        }
        Some(Perms(perms))
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, l) in "cruds".chars().enumerate() {
            if self.0 & (1 << i) != 0 {
                write!(f, "{l}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perms({self})")
    }
}

/// The resource type a scope names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TypeSel {
    /// `*`: every type.
    Any,
    /// One R4 resource type.
    Type(&'static str),
}

impl TypeSel {
    /// Whether this selects `ty`.
    pub fn matches(self, ty: &str) -> bool {
        match self {
            TypeSel::Any => true,
            TypeSel::Type(t) => t == ty,
        }
    }
}

impl fmt::Display for TypeSel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TypeSel::Any => f.write_str("*"),
            TypeSel::Type(t) => f.write_str(t),
        }
    }
}

/// A scope that grants access to data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceScope {
    /// patient, user or system.
    pub level: Level,
    /// The type, or `*`.
    pub resource: TypeSel,
    /// The interactions granted.
    pub perms: Perms,
    /// Granular constraints `(param[:modifier], value)` (SMART 2.x "finer-grained
    /// resource constraints"); empty for none.
    pub constraints: Vec<(String, String)>,
}

/// What a scope string is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// A data scope.
    Resource(ResourceScope),
    /// A scope that asks for context or identity and grants no data (`openid`,
    /// `fhirUser`, `launch/patient`, `offline_access`, URIs, …).
    NonResource,
}

/// Why a scope string is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    /// Not `level/type.perms`.
    #[error("not of the form (patient|user|system)/(Type|*).(cruds|read|write|*)")]
    Shape,
    /// The level is not patient, user or system.
    #[error("unknown level (expected patient, user or system)")]
    Level,
    /// Not an R4 resource type, nor `*` (types are case-sensitive).
    #[error("not an R4 resource type or *")]
    ResourceType,
    /// Letters not a non-empty, in-order subset of `cruds`.
    #[error("permissions must be a non-empty subset of cruds, in that order")]
    Perms,
    /// The `?…` part is empty or has an empty name or value, or follows a v1 scope.
    #[error("malformed constraint after '?'")]
    Query,
    /// A character no scope token may hold (RFC 6749 §3.3: `%x21 / %x23-5B / %x5D-7E`):
    /// any other white space (TAB, NBSP, U+3000…) is not a separator but part of one
    /// malformed scope.
    #[error("holds a character outside RFC 6749's scope-token set (only SP separates scopes)")]
    Characters,
}

/// The scope tokens of a `scope` value (RFC 6749 §3.3: separated by SP, U+0020, only).
/// Any other white space stays inside a token, which [`parse`] then refuses: with
/// `patient/Patient.rs<NBSP>user/*.rs` the one malformed token grants nothing, as it
/// would to a server that splits on SP; splitting on every Unicode space would grant
/// `user/*.rs`.
pub fn split(scope: &str) -> impl Iterator<Item = &str> {
    scope.split(' ').filter(|s| !s.is_empty())
}

/// RFC 6749 §3.3 `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
fn is_scope_char(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E)
}

/// Names of scopes that ask for identity, context or refresh and grant no data.
const NON_RESOURCE: &[&str] = &[
    "openid",
    "fhirUser",
    "profile",
    "launch",
    "offline_access",
    "online_access",
];

/// Parses one scope string.
pub fn parse(s: &str) -> Result<Scope, ScopeError> {
    if s.is_empty() || !s.bytes().all(is_scope_char) {
        return Err(ScopeError::Characters);
    }
    let data_scope = ["patient/", "user/", "system/"]
        .iter()
        .any(|p| s.starts_with(p));
    if !data_scope
        && (NON_RESOURCE.contains(&s)
            || s.starts_with("launch/")
            || s.starts_with("__")
            || s.starts_with("urn:")
            || s.contains("://"))
    {
        return Ok(Scope::NonResource);
    }
    let (level, rest) = s.split_once('/').ok_or(ScopeError::Shape)?;
    let level = match level {
        "patient" => Level::Patient,
        "user" => Level::User,
        "system" => Level::System,
        _ => return Err(ScopeError::Level),
    };
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (ty, perms) = main.split_once('.').ok_or(ScopeError::Shape)?;
    let resource = match ty {
        "*" => TypeSel::Any,
        t => TypeSel::Type(
            RESOURCE_TYPES
                .binary_search(&t)
                .map(|i| RESOURCE_TYPES[i])
                .map_err(|_| ScopeError::ResourceType)?,
        ),
    };
    let (perms, v1) = match perms {
        "read" => (Perms::R.union(Perms::S), true),
        "write" => (Perms::C.union(Perms::U).union(Perms::D), true),
        "*" => (Perms::ALL, true),
        letters => (Perms::parse_v2(letters).ok_or(ScopeError::Perms)?, false),
    };
    let constraints = match query {
        None => Vec::new(),
        Some(_) if v1 => return Err(ScopeError::Query),
        Some(q) => {
            if q.is_empty() {
                return Err(ScopeError::Query);
            }
            let pairs: Vec<(String, String)> = form_urlencoded::parse(q.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            if pairs.iter().any(|(k, v)| k.is_empty() || v.is_empty()) {
                return Err(ScopeError::Query);
            }
            pairs
        }
    };
    Ok(Scope::Resource(ResourceScope {
        level,
        resource,
        perms,
        constraints,
    }))
}

/// The data scopes of a token, and the scope strings that were ignored and why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// Data scopes; the permission granted is their union.
    pub scopes: Vec<ResourceScope>,
    /// Malformed scope strings, with the reason each was ignored.
    pub ignored: Vec<(String, ScopeError)>,
    /// Every scope string as granted, joined by single spaces (audit, identity headers).
    pub text: String,
}

impl Grants {
    /// Parses every scope; malformed ones are set aside, never fatal.
    pub fn parse<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Grants {
        let mut g = Grants::default();
        for s in scopes {
            if !g.text.is_empty() {
                g.text.push(' ');
            }
            g.text.push_str(s);
            match parse(s) {
                Ok(Scope::Resource(r)) => g.scopes.push(r),
                Ok(Scope::NonResource) => {}
                Err(e) => {
                    tracing::debug!(scope = s, reason = %e, "scope ignored");
                    g.ignored.push((s.to_owned(), e));
                }
            }
        }
        g
    }

    /// The letters granted on `ty` at `level` by scopes without granular constraints.
    pub fn perms(&self, level: Level, ty: &str) -> Perms {
        self.scopes
            .iter()
            .filter(|s| s.level == level && s.resource.matches(ty) && s.constraints.is_empty())
            .fold(Perms::NONE, |acc, s| acc.union(s.perms))
    }

    /// One line per permission, for `explain-scope`.
    pub fn explain(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .scopes
            .iter()
            .map(|s| {
                let mut line = format!(
                    "{:<8} {:<28} {:<6}",
                    s.level.as_str(),
                    s.resource.to_string(),
                    s.perms.to_string()
                );
                if !s.constraints.is_empty() {
                    let c: Vec<String> = s
                        .constraints
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    line.push_str(&format!(" only where {}", c.join(" and ")));
                }
                line.trim_end().to_owned()
            })
            .collect();
        lines.extend(
            self.ignored
                .iter()
                .map(|(s, e)| format!("ignored  {s:?}: {e}")),
        );
        lines
    }
}

#[cfg(test)]
mod tests;

//! The decision: `authorize(grants, context, request, policy) → Decision`. Pure — no I/O —
//! so it is table-tested and benchmarked on its own.
//!
//! SMART App Launch 2.2 (scopes-and-launch-context): create → `c`; read, vread, instance
//! history → `r`; update, patch → `u`; delete → `d`; search and type/system history →
//! `s`. Write does not imply read. The permission a token holds is the union of its
//! scopes.
//!
//! Compartment confinement (`patient/` scopes, and `user/` scopes of a Patient user) needs
//! response and body verification, which is not in this version. Until it is, confined
//! access is allowed only where the upstream itself confines the answer to the context
//! patient — reading `Patient/[ctx]` and compartment searches `Patient/[ctx]/[type]`
//! without includes, chains or `_has` — and denied everywhere else. Unconfined tokens may
//! use includes, chains and `_has` only with `rs` on every type. Granular scopes
//! (`?param=value`) grant nothing yet. All of this fails closed.

pub mod cache;
pub mod operations;

use std::fmt;

use crate::fhir::request::{FhirRequest, Interaction};
use crate::smart::scope::{Grants, Level, Perms};

pub use operations::{OperationRule, Operations};

/// Who the request acts for, beyond the scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The patient in context (bare id).
    pub patient: Option<String>,
    /// Whether `fhirUser` is a Patient (then `user/` scopes are confined like `patient/`).
    pub user_is_patient: bool,
}

/// What the forward stage must do for an allowed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Buffer FHIR JSON responses to rewrite upstream links.
    pub rewrite_links: bool,
}

impl Plan {
    /// Forward as is; only rewrite the upstream's address out of the response.
    pub fn pass_through() -> Plan {
        Plan {
            rewrite_links: true,
        }
    }
}

/// Why a request is refused. The code is a stable metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// No scope grants the interaction on the type.
    InsufficientScope,
    /// Only `patient/` scopes apply and the token has no patient.
    NoPatientContext,
    /// Confined access that cannot be verified in this version.
    CompartmentUnverified,
    /// Includes, chains or `_has` from a token that cannot read every type they may reach.
    IncludeUnverified,
    /// An operation not in the policy table.
    UnknownOperation,
    /// A Bundle inside a batch or transaction.
    NestedBundle,
    /// Some entries of a batch or transaction are denied: `(index, reason, needed)`.
    Entries(Vec<(usize, DenyReason, String)>),
    /// An entry of a batch or transaction could not be read.
    BadEntry(usize),
}

impl DenyReason {
    /// Stable code for metrics and the audit line.
    pub fn code(&self) -> &'static str {
        match self {
            DenyReason::InsufficientScope => "insufficient_scope",
            DenyReason::NoPatientContext => "no_patient_context",
            DenyReason::CompartmentUnverified => "compartment_unverified",
            DenyReason::IncludeUnverified => "include_unverified",
            DenyReason::UnknownOperation => "unknown_operation",
            DenyReason::NestedBundle => "nested_bundle",
            DenyReason::Entries(_) => "bundle_entry_denied",
            DenyReason::BadEntry(_) => "bundle_entry_invalid",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::InsufficientScope => f.write_str("no granted scope allows this"),
            DenyReason::NoPatientContext => {
                f.write_str("patient-level scopes need a patient in context")
            }
            DenyReason::CompartmentUnverified => f.write_str(
                "patient-confined access is limited to reading the patient and searching its compartment without includes, chains or _has",
            ),
            DenyReason::IncludeUnverified => f.write_str(
                "includes, chains, _has and similar parameters need read and search on every type (*.rs)",
            ),
            DenyReason::UnknownOperation => f.write_str("this operation is not allowed"),
            DenyReason::NestedBundle => f.write_str("nested bundles are not accepted"),
            DenyReason::Entries(entries) => {
                let parts: Vec<String> = entries
                    .iter()
                    .map(|(i, r, needed)| format!("entry {i}: {r} (needs {needed})"))
                    .collect();
                write!(f, "{}", parts.join("; "))
            }
            DenyReason::BadEntry(i) => write!(f, "entry {i} is not a valid request"),
        }
    }
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Forward, as the plan says.
    Allow(Plan),
    /// Refuse; `needed` is the narrowest scope that would have allowed it.
    Deny {
        /// Why.
        reason: DenyReason,
        /// The narrowest scope that would allow the request (for `WWW-Authenticate`).
        needed: String,
    },
}

/// The configured policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Operation rules.
    pub operations: Operations,
}

/// Decides one request.
pub fn authorize(grants: &Grants, ctx: &Context, req: &FhirRequest, policy: &Policy) -> Decision {
    match need(req, policy) {
        Need::Nothing => Decision::Allow(Plan::pass_through()),
        Need::Refuse(reason) => Decision::Deny {
            reason,
            needed: String::new(),
        },
        Need::Perm { types, perm } => decide_perm(grants, ctx, req, &types, perm),
    }
}

/// What a request needs.
enum Need {
    Nothing,
    Refuse(DenyReason),
    Perm { types: Types, perm: Perms },
}

/// The types a permission is needed on.
enum Types {
    /// Every type (system-level search or history without `_type`).
    All,
    /// These types.
    Some(Vec<&'static str>),
}

fn need(req: &FhirRequest, policy: &Policy) -> Need {
    use Interaction::*;
    let one = |t: Option<&'static str>| match t {
        Some(t) => Types::Some(vec![t]),
        None => Types::All,
    };
    let perm = |perm: Perms| Need::Perm {
        types: one(req.resource_type),
        perm,
    };
    match req.interaction {
        Capabilities => Need::Nothing,
        Read | Vread | HistoryInstance => perm(Perms::R),
        Update | Patch => perm(Perms::U),
        Delete => perm(Perms::D),
        Create => perm(Perms::C),
        SearchType | HistoryType | SearchCompartment => perm(Perms::S),
        SearchSystem | HistorySystem => Need::Perm {
            types: type_param(req),
            perm: Perms::S,
        },
        // Decided entry by entry by `authorize_bundle`.
        Batch | Transaction => Need::Refuse(DenyReason::BadEntry(0)),
        OperationSystem | OperationType | OperationInstance => {
            match policy.operations.rule(req) {
                Some(OperationRule::Deny) | None => Need::Refuse(DenyReason::UnknownOperation),
                Some(OperationRule::Open) => Need::Nothing,
                Some(OperationRule::Needs(p)) => Need::Perm {
                    types: match req.resource_type {
                        Some(t) => Types::Some(vec![t]),
                        None => type_param(req),
                    },
                    perm: p,
                },
                Some(OperationRule::NeedsAll(p)) => Need::Perm {
                    types: type_param(req),
                    perm: p,
                },
                // $validate: whatever creating or updating the type needs.
                Some(OperationRule::CreateOrUpdate) => Need::Perm {
                    types: one(req.resource_type),
                    perm: if req.id.is_some() { Perms::U } else { Perms::C },
                },
                // Patient/[id]/$everything: r on Patient and s on every type.
                Some(OperationRule::Everything) => Need::Perm {
                    types: Types::All,
                    perm: Perms::R.union(Perms::S),
                },
            }
        }
    }
}

/// `_type=A,B` of a system-level request, else every type.
fn type_param(req: &FhirRequest) -> Types {
    let mut types = Vec::new();
    for (k, v) in &req.params {
        if k == "_type" {
            for t in v.split(',') {
                match crate::fhir::request::resource_type(t.trim()) {
                    Ok(t) => types.push(t),
                    // An unknown type in _type: ask for everything (fails closed).
                    Err(_) => return Types::All,
                }
            }
        }
    }
    if types.is_empty() {
        Types::All
    } else {
        Types::Some(types)
    }
}

fn decide_perm(
    grants: &Grants,
    ctx: &Context,
    req: &FhirRequest,
    types: &Types,
    perm: Perms,
) -> Decision {
    let covers = |level: Level| match types {
        // Every type: only a `*` scope covers that.
        Types::All => grants.perms(level, "*").contains(perm),
        Types::Some(ts) => ts.iter().all(|t| grants.perms(level, t).contains(perm)),
    };
    // Unconfined levels first: system/, and user/ unless the user is a patient.
    let unconfined = [Level::System, Level::User]
        .into_iter()
        .filter(|l| *l == Level::System || !ctx.user_is_patient)
        .find(|l| covers(*l));
    if let Some(level) = unconfined {
        // Responses are not verified in this version: parameters that bring back or probe
        // other resources are allowed only to a token that may read and search every type
        // at this level anyway; otherwise an _include could return what it cannot read.
        if reaches_other_resources(req)
            && !grants.perms(level, "*").contains(Perms::R.union(Perms::S))
        {
            return Decision::Deny {
                reason: DenyReason::IncludeUnverified,
                needed: format!("{}/*.rs", level.as_str()),
            };
        }
        return Decision::Allow(Plan::pass_through());
    }
    let confined = covers(Level::Patient) || (ctx.user_is_patient && covers(Level::User));
    if !confined {
        return Decision::Deny {
            reason: DenyReason::InsufficientScope,
            needed: narrowest(grants, types, perm),
        };
    }
    let Some(patient) = ctx.patient.as_deref() else {
        return Decision::Deny {
            reason: DenyReason::NoPatientContext,
            needed: narrowest(grants, types, perm),
        };
    };
    if confined_by_upstream(req, patient) {
        Decision::Allow(Plan::pass_through())
    } else {
        // The token's patient/ scope already has the letter; only an unconfined one would
        // allow this now.
        Decision::Deny {
            reason: DenyReason::CompartmentUnverified,
            needed: format!(
                "user/{}",
                narrowest(grants, types, perm)
                    .split_once('/')
                    .map_or("", |(_, r)| r)
            ),
        }
    }
}

/// Requests whose answer the upstream itself confines to `patient`'s compartment, with
/// nothing in them that could reach outside it.
fn confined_by_upstream(req: &FhirRequest, patient: &str) -> bool {
    let reaches_out = reaches_other_resources(req);
    if reaches_out {
        return false;
    }
    match req.interaction {
        Interaction::Read | Interaction::Vread | Interaction::HistoryInstance => {
            req.resource_type == Some("Patient") && req.id.as_deref() == Some(patient)
        }
        Interaction::SearchCompartment => {
            matches!(&req.compartment, Some(("Patient", id)) if id == patient)
        }
        _ => false,
    }
}

/// Whether a request's parameters can bring back, or probe, resources other than the ones
/// searched: includes, chains, `_has`, `_filter`, named queries, contained resources, paging
/// cursors. Read the widest way a server might: names case-insensitively, and a `;`
/// anywhere (legacy servers split on it) counts.
fn reaches_other_resources(req: &FhirRequest) -> bool {
    req.params.iter().any(|(k, v)| {
        if k.contains(';') || v.contains(';') {
            return true;
        }
        let lower = k.to_ascii_lowercase();
        let name = lower.split(':').next().unwrap_or(&lower);
        matches!(
            name,
            "_include"
                | "_revinclude"
                | "_getpages"
                | "_contained"
                | "_containedtype"
                | "_filter"
                | "_query"
        ) || name.starts_with("_has")
            // Chains, with or without a type modifier: subject.name, subject:Patient.name.
            || k.contains('.')
    })
}

/// The narrowest scope that would allow the request: at the level the token already
/// uses (patient before user before system), on the type, with the one letter.
fn narrowest(grants: &Grants, types: &Types, perm: Perms) -> String {
    let level = [Level::Patient, Level::User, Level::System]
        .into_iter()
        .find(|l| grants.scopes.iter().any(|s| s.level == *l))
        .unwrap_or(Level::Patient);
    let ty = match types {
        Types::All => "*".to_owned(),
        Types::Some(ts) => ts
            .iter()
            .find(|t| !grants.perms(level, t).contains(perm))
            .unwrap_or(&ts[0])
            .to_string(),
    };
    format!("{}/{ty}.{perm}", level.as_str())
}

/// Decides a batch or transaction: every entry on its own; any denied entry refuses the
/// whole bundle (a transaction is all-or-nothing; a batch is treated the same, so a
/// client never gets a half-applied batch it cannot see the reasons for).
pub fn authorize_bundle(
    grants: &Grants,
    ctx: &Context,
    entries: &[Result<FhirRequest, ()>],
    policy: &Policy,
) -> Decision {
    let mut denied = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        match entry {
            Err(()) => {
                return Decision::Deny {
                    reason: DenyReason::BadEntry(i),
                    needed: String::new(),
                };
            }
            Ok(req)
                if matches!(
                    req.interaction,
                    Interaction::Batch | Interaction::Transaction
                ) =>
            {
                return Decision::Deny {
                    reason: DenyReason::NestedBundle,
                    needed: String::new(),
                };
            }
            Ok(req) => {
                if let Decision::Deny { reason, needed } = authorize(grants, ctx, req, policy) {
                    denied.push((i, reason, needed));
                }
            }
        }
    }
    if denied.is_empty() {
        Decision::Allow(Plan::pass_through())
    } else {
        let needed = denied
            .iter()
            .map(|(_, _, n)| n.as_str())
            .filter(|n| !n.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        Decision::Deny {
            reason: DenyReason::Entries(denied),
            needed,
        }
    }
}

#[cfg(test)]
mod tests;

//! The decision: `authorize(grants, context, request, policy) → Decision`. Pure — no I/O —
//! so it is table-tested and benchmarked on its own.
//!
//! SMART App Launch 2.2 (scopes-and-launch-context): create → `c`; read, vread, instance
//! history → `r`; update, patch → `u`; delete → `d`; search and type/system history →
//! `s`. Write does not imply read. The permission a token holds is the union of its
//! scopes.
//!
//! Confinement (`patient/` scopes, and `user/` scopes of a Patient user): reads are
//! verified on the response; searches name the context patient or get the narrowest
//! compartment parameter injected, and every returned entry is verified; writes are
//! checked before anything is forwarded (the stored version fetched first, and the write
//! sent with `If-Match` of the version checked). Granular scopes (`?param=value`) narrow
//! searches the same way and every resource must match one granted scope. What the gateway
//! cannot evaluate grants nothing. The plan says what the pipeline must do; the checks on
//! resources are in [`verify`].

pub mod cache;
pub mod operations;
pub mod verify;

use std::fmt;

use crate::fhir::request::{FhirRequest, Interaction};
use crate::smart::scope::{Grants, Level, Perms, TypeSel};

pub use operations::{OperationRule, Operations};

/// Who the request acts for, beyond the scopes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Context {
    /// The patient in context (bare id): what `patient/` scopes are confined to.
    pub patient: Option<String>,
    /// Whether `user/` scopes are confined (fhirUser is a Patient, or a RelatedPerson
    /// when so configured).
    pub user_confined: bool,
    /// The patient `user/` scopes are confined to (the Patient user's own id).
    pub user_patient: Option<String>,
}

impl Context {
    /// The context of a caller: `fhir_user` is the `fhirUser` claim.
    pub fn new(patient: Option<&str>, fhir_user: Option<&str>, related_person: bool) -> Context {
        let user = fhir_user.and_then(|u| {
            let mut parts = u.rsplit('/');
            let id = parts.next()?;
            Some((parts.next()?, id))
        });
        let (user_confined, user_patient) = match user {
            Some(("Patient", id)) => (true, Some(id.to_owned())),
            Some(("RelatedPerson", _)) if related_person => (true, patient.map(str::to_owned)),
            _ => (false, None),
        };
        Context {
            patient: patient.map(str::to_owned),
            user_confined,
            user_patient,
        }
    }
}

/// What the forward stage must do for an allowed request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// Buffer FHIR JSON responses to rewrite upstream links.
    pub rewrite_links: bool,
    /// Parameters to add to the query (or to `If-None-Exist` of a conditional create).
    pub inject: Vec<(String, String)>,
    /// What to verify in the response.
    pub verify: Verify,
    /// What to check before a write is forwarded.
    pub write: Option<Write>,
    /// Batch and transaction: one plan per entry.
    pub entries: Vec<Plan>,
    /// Elements to add to each `_elements` parameter: those the verification reads
    /// (compartment references, constrained elements). Without them every resource of
    /// a subsetted answer would fail the check.
    pub elements: Vec<&'static str>,
    /// A read of one Binary that is verified: asked as FHIR JSON, it may be answered in
    /// its native form when the client asked for that.
    pub binary_read: bool,
    /// Ask with `Prefer: handling=strict` (FHIR R4 search.html#errors): the request was
    /// narrowed, or is a confined conditional write, and a server in lenient handling
    /// would ignore a parameter it does not support instead of failing.
    pub strict: bool,
}

impl Plan {
    /// Forward as is; only rewrite the upstream's address out of the response.
    pub fn pass_through() -> Plan {
        Plan {
            rewrite_links: true,
            ..Plan::default()
        }
    }

    /// Whether the pipeline has anything to do beyond forwarding and rewriting links.
    pub fn is_pass_through(&self) -> bool {
        self.inject.is_empty()
            && !self.strict
            && self.verify == Verify::None
            && self.write.is_none()
            && self.entries.iter().all(Plan::is_pass_through)
    }
}

/// Response verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// None needed.
    #[default]
    None,
    /// One resource that must be visible to the token through a scope with one of these
    /// letters, or the response is refused.
    Resource(Perms),
    /// A Bundle whose entries are each verified and removed when not visible (any other
    /// resource is verified like `Resource`). `narrowed`: the query itself was confined,
    /// so the upstream's `total` stays unless entries are removed.
    Bundle {
        /// The query was confined to what the token may see.
        narrowed: bool,
    },
}

/// A check before a write is forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    /// What to check.
    pub check: WriteCheck,
    /// The resource type written.
    pub resource_type: &'static str,
    /// The id, for instance-level writes.
    pub id: Option<String>,
    /// The letter the write needs.
    pub perm: Perms,
}

impl Write {
    fn new(check: WriteCheck, ty: &str, id: Option<String>, perm: Perms) -> Write {
        Write {
            check,
            resource_type: crate::fhir::request::resource_type(ty).unwrap_or("Resource"),
            id,
            perm,
        }
    }
}

/// Which versions of a resource a write must have checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteCheck {
    /// The body (create, conditional update).
    Body,
    /// The stored version (fetched first) and the body; update-as-create: the body.
    StoredAndBody,
    /// The stored version, and the result of applying the JSON Patch to it.
    Patch,
    /// The stored version (delete).
    Stored,
}

/// Why a request is refused. The code is a stable metric label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// No scope grants the interaction on the type.
    InsufficientScope,
    /// Only `patient/` scopes apply and the token has no patient.
    NoPatientContext,
    /// The request or resource is outside the patient's compartment.
    Compartment,
    /// The request or resource is outside the granular scopes' constraints.
    Granular,
    /// Something the gateway cannot check for a confined or constrained token.
    Unverifiable(&'static str),
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
            DenyReason::Compartment => "compartment",
            DenyReason::Granular => "granular",
            DenyReason::Unverifiable(_) => "unverifiable",
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
            DenyReason::Compartment => {
                f.write_str("outside the compartment of the patient in context")
            }
            DenyReason::Granular => {
                f.write_str("outside what the granted scopes' constraints allow")
            }
            DenyReason::Unverifiable(why) => write!(f, "cannot be checked: {why}"),
            DenyReason::UnknownOperation => f.write_str("this operation is not allowed"),
            DenyReason::NestedBundle => f.write_str("nested bundles are not accepted"),
            DenyReason::Entries(entries) => {
                let parts: Vec<String> = entries
                    .iter()
                    .map(|(i, r, needed)| {
                        if needed.is_empty() {
                            format!("entry {i}: {r}")
                        } else {
                            format!("entry {i}: {r} (needs {needed})")
                        }
                    })
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

/// Whether a `patient/` scope reaches types outside the Patient compartment
/// (`policy.patient_scope_non_compartment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NonCompartment {
    /// `patient/Medication.rs` reads any Medication (apps need them).
    #[default]
    Allow,
    /// Such scopes grant nothing.
    Deny,
}

/// The configured policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Operation rules.
    pub operations: Operations,
    /// `patient/` scopes on types outside the compartment.
    pub non_compartment: NonCompartment,
    /// Per type, the parameter injected to confine a search (`policy.compartment_param`).
    pub compartment_params: Vec<(String, String)>,
    /// The server's own base URLs (upstream, public, aliases), for reference matching.
    pub bases: Vec<String>,
    /// Confined conditional updates and deletes are narrowed (`policy.
    /// confined_conditional_writes = "narrow"`) rather than refused.
    pub narrow_conditional_writes: bool,
}

impl Policy {
    /// Whether a confined scope on `ty` (outside the compartment) grants access. Bundles
    /// and Subscriptions are never reached this way: they are judged by what they hold
    /// ([`judged_by_content`]); nor are the records that are a patient's only through
    /// another resource ([`patients_through_another`]).
    fn non_compartment_allowed(&self, ty: &str) -> bool {
        self.non_compartment == NonCompartment::Allow
            && !judged_by_content(ty)
            && !patients_through_another(ty)
    }

    /// The parameter that confines a search of `ty` to `patient`: configured, else
    /// `patient` where the type has it, else its first compartment parameter; `_id` for
    /// Patient.
    pub fn compartment_param(&self, ty: &str, patient: &str) -> (String, String) {
        if ty == "Patient" {
            return ("_id".into(), patient.into());
        }
        let name = self
            .compartment_params
            .iter()
            .find(|(t, _)| t == ty)
            .map(|(_, p)| p.as_str())
            .or_else(|| crate::fhir::search::param(ty, "patient").map(|_| "patient"))
            .or_else(|| {
                crate::fhir::search::compartment_paths(ty)
                    .and_then(|ps| ps.first())
                    .map(|(p, _)| *p)
            })
            .unwrap_or("patient");
        (name.to_owned(), format!("Patient/{patient}"))
    }
}

/// Decides one request.
pub fn authorize(grants: &Grants, ctx: &Context, req: &FhirRequest, policy: &Policy) -> Decision {
    // A cascading delete (HAPI `_cascade=delete`) also deletes every resource that refers
    // to the one deleted: of any type, in any patient's compartment, none of them seen by
    // the gateway. Only a token that may delete any resource could have done that itself.
    if req.interaction == Interaction::Delete
        && cascades(req)
        && !full(&applicable(grants, ctx, policy, "*", Perms::D, false).0)
    {
        let level = match first_level(grants) {
            Level::System => "system",
            _ => "user",
        };
        return deny(
            DenyReason::Unverifiable(
                "a cascading delete also deletes the resources that refer to this one",
            ),
            format!("{level}/*.d"),
        );
    }
    let mut decision = decide(grants, ctx, req, policy);
    // A Subscription's criteria is checked as a standing search (`check_standing_search`):
    // its body is read even when the type itself is granted in full.
    if let Decision::Allow(plan) = &mut decision
        && req.resource_type == Some("Subscription")
        && plan.write.is_none()
        && !sees_everything(grants, ctx, policy)
    {
        let check = match req.interaction {
            Interaction::Create | Interaction::Update => Some(WriteCheck::Body),
            Interaction::Patch if !req.conditional => Some(WriteCheck::Patch),
            Interaction::Patch => {
                return deny(
                    DenyReason::Unverifiable("a conditional patch of a Subscription"),
                    String::new(),
                );
            }
            _ => None,
        };
        if let Some(check) = check {
            let perm = if req.interaction == Interaction::Create {
                Perms::C
            } else {
                Perms::U
            };
            plan.write = Some(Write::new(check, "Subscription", req.id.clone(), perm));
        }
    }
    // A narrowed request must fail where the server cannot apply what was added, not run
    // without it (a lenient server ignores a parameter it does not support).
    if let Decision::Allow(plan) = &mut decision {
        plan.strict |= !plan.inject.is_empty();
    }
    decision
}

/// [`authorize`] before the Subscription rule.
fn decide(grants: &Grants, ctx: &Context, req: &FhirRequest, policy: &Policy) -> Decision {
    match need(req, policy) {
        Need::Nothing => Decision::Allow(Plan::pass_through()),
        Need::Refuse(reason) => Decision::Deny {
            reason,
            needed: String::new(),
        },
        Need::Continue => {
            // A paging continuation (`_getpages`, cursors): nothing to decide by, so any
            // search permission lets it through and every entry is verified.
            // Only a type a scope names can have search on it (every type, with a `*`).
            let mut no_patient = false;
            let wildcard = grants.scopes.iter().any(|s| s.resource == TypeSel::Any);
            let named: Vec<&str> = if wildcard {
                crate::fhir::generated::RESOURCE_TYPES.to_vec()
            } else {
                grants
                    .scopes
                    .iter()
                    .filter_map(|s| match s.resource {
                        TypeSel::Type(t) => Some(t),
                        TypeSel::Any => None,
                    })
                    .collect()
            };
            let any = named.into_iter().any(|t| {
                let (apps, missing) = applicable(grants, ctx, policy, t, Perms::S, false);
                no_patient |= missing;
                !apps.is_empty()
            });
            if !any {
                return Decision::Deny {
                    reason: if no_patient {
                        DenyReason::NoPatientContext
                    } else {
                        DenyReason::InsufficientScope
                    },
                    needed: format!("{}/*.s", level_of(grants)),
                };
            }
            let mut plan = Plan::pass_through();
            if !sees_everything(grants, ctx, policy) {
                plan.verify = Verify::Bundle { narrowed: false };
            }
            Decision::Allow(plan)
        }
        Need::Perm { types, perm } => decide_perm(grants, ctx, req, &types, perm, policy),
    }
}

/// What a request needs.
enum Need {
    Nothing,
    Refuse(DenyReason),
    Continue,
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
        SearchSystem if req.params.iter().any(|(k, _)| is_paging_token(k)) => Need::Continue,
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

/// Whether a delete asks to cascade: a `_cascade` parameter (HAPI FHIR's, which also has
/// the `X-Cascade` header the classifier refuses), named in any case, with any value.
fn cascades(req: &FhirRequest) -> bool {
    req.params.iter().any(|(k, _)| {
        k.split(':')
            .next()
            .unwrap_or(k)
            .eq_ignore_ascii_case("_cascade")
    })
}

/// Parameters that continue a search the upstream remembers (HAPI `_getpages`, cursors).
fn is_paging_token(k: &str) -> bool {
    matches!(
        k.to_ascii_lowercase().as_str(),
        "_getpages" | "_page_token" | "_cursor"
    )
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

/// How one scope applies to one type.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Applies<'a> {
    /// The patient whose compartment it is confined to, if it is.
    pub confined_to: Option<&'a str>,
    /// Granular constraints (all evaluable on the type); empty for none.
    pub constraints: &'a [(String, String)],
}

/// The scopes that grant `perm` on `ty` (all of its letters, or — `any` — at least one),
/// with their confinement and constraints; and whether a patient-confined scope would
/// have applied but the token has no patient. `ty` is `"*"` for "every type".
pub(crate) fn applicable<'a>(
    grants: &'a Grants,
    ctx: &'a Context,
    policy: &Policy,
    ty: &str,
    perm: Perms,
    any: bool,
) -> (Vec<Applies<'a>>, bool) {
    let mut out = Vec::new();
    let mut no_patient = false;
    // Asked once, when a confined scope first needs it.
    let mut has_compartment = None;
    for s in &grants.scopes {
        let type_ok = if ty == "*" {
            s.resource == TypeSel::Any
        } else {
            s.resource.matches(ty)
        };
        let perm_ok = if any {
            s.perms.intersects(perm)
        } else {
            s.perms.contains(perm)
        };
        if !type_ok || !perm_ok {
            continue;
        }
        let confined = match s.level {
            Level::System => None,
            Level::User if !ctx.user_confined => None,
            Level::User => Some(ctx.user_patient.as_deref()),
            Level::Patient => Some(ctx.patient.as_deref()),
        };
        let confined_to = match confined {
            None => None,
            Some(None) => {
                no_patient = true;
                continue;
            }
            Some(Some(p))
                if *has_compartment.get_or_insert_with(|| ty == "*" || in_compartment_type(ty)) =>
            {
                Some(p)
            }
            Some(Some(_)) if policy.non_compartment_allowed(ty) => None,
            Some(Some(_)) => continue,
        };
        if !s.constraints.is_empty()
            && (ty == "*"
                || !s
                    .constraints
                    .iter()
                    .all(|(k, _)| !k.contains(':') && crate::fhir::search::param(ty, k).is_some()))
        {
            // A constraint the gateway cannot evaluate: this scope grants nothing.
            continue;
        }
        out.push(Applies {
            confined_to,
            constraints: &s.constraints,
        });
    }
    (out, no_patient)
}

/// Whether `ty` has a patient compartment (Patient itself included), counting the types
/// [`judged_by_content`].
pub(crate) fn in_compartment_type(ty: &str) -> bool {
    ty == "Patient" || judged_by_content(ty) || crate::fhir::search::compartment_paths(ty).is_some()
}

/// What a scope confined to a patient reaches of `ty`, in words, for `explain-scope`
/// (each rule is documented where it is applied).
pub fn confinement(ty: &TypeSel) -> String {
    let ty = match ty {
        TypeSel::Any => {
            return "each type as its own scope would (explain-scope patient/[type].r)".into();
        }
        TypeSel::Type(t) => *t,
    };
    match ty {
        "Patient" => "the patient's own Patient resource".into(),
        "Bundle" => "stored Bundles whose every entry the token could read, each for the patient".into(),
        "Subscription" => "Subscriptions whose criteria is a search of the patient's own data the token may make".into(),
        "Group" => "Groups in which the patient is the only patient named".into(),
        "Binary" => "Binaries whose securityContext is the patient, or a resource the token may read".into(),
        _ if patients_through_another(ty) => "none: a patient's only through another resource it references, which a confined scope cannot check (user/ or system/ scopes reach them)".into(),
        _ => match crate::fhir::search::compartment_paths(ty) {
            Some(params) => {
                let names: Vec<&str> = params.iter().map(|(p, _)| *p).collect();
                format!("resources whose {} references the patient", names.join(" or "))
            }
            None => "every instance: outside the patient compartment (none with policy.patient_scope_non_compartment = \"deny\")".into(),
        },
    }
}

/// Types outside the R4 compartment whose instances are a patient's by what they hold,
/// not by a reference (`Viewer::visible`, `Viewer::check_write`), so no search parameter
/// confines them: their searches are filtered, not narrowed.
/// - A stored Bundle (a document, an IPS, a message): reading it reads its entries, so
///   it is the patient's when the token could read every entry and each is for them.
/// - A Subscription: its `criteria` is a search the server runs, and its channel may
///   carry the subscriber's credentials, so it is the patient's when the criteria is a
///   search of the patient's own data that the token may make
///   (`Viewer::check_standing_search`).
pub(crate) fn judged_by_content(ty: &str) -> bool {
    matches!(ty, "Bundle" | "Subscription")
}

/// Records outside the compartment that belong to one patient only through another
/// resource they reference: an EnrollmentResponse answers the EnrollmentRequest that
/// enrolls the patient, a PaymentReconciliation settles the payment of a Task for one.
/// Nothing in the record itself names the patient, so a scope confined to a patient
/// cannot tell its own from everyone else's: only unconfined scopes (`user/`,
/// `system/`) reach them, whatever `policy.patient_scope_non_compartment` says.
///
/// The candidates are found from the SearchParameter definitions (types outside the
/// compartment, not canonical, with no reference that may name a Patient, but one to a
/// compartment type); which of them belong to a patient is a judgement, and
/// `tests::records_reached_through_another_resource_are_each_judged` fails when the
/// definitions offer one not judged here. The others are nobody's record: a Slot (a
/// Schedule's opening), a MedicationKnowledge (a drug's monograph), a DeviceMetric (a
/// device's channel and calibration).
pub(crate) fn patients_through_another(ty: &str) -> bool {
    matches!(ty, "EnrollmentResponse" | "PaymentReconciliation")
}

/// Every applicable scope confined to one and the same patient: that patient.
fn sole_patient<'a>(apps: &[Applies<'a>]) -> Option<&'a str> {
    let first = apps.first()?.confined_to?;
    apps.iter()
        .all(|a| a.confined_to == Some(first))
        .then_some(first)
}

/// Full access: an unconfined, unconstrained scope.
fn full(apps: &[Applies<'_>]) -> bool {
    apps.iter()
        .any(|a| a.confined_to.is_none() && a.constraints.is_empty())
}

fn deny(reason: DenyReason, needed: String) -> Decision {
    Decision::Deny { reason, needed }
}

fn decide_perm(
    grants: &Grants,
    ctx: &Context,
    req: &FhirRequest,
    types: &Types,
    perm: Perms,
    policy: &Policy,
) -> Decision {
    let tys: Vec<&str> = match types {
        Types::All => vec!["*"],
        Types::Some(ts) => ts.clone(),
    };
    let mut limited: Vec<(&str, Vec<Applies<'_>>)> = Vec::new();
    for ty in &tys {
        let (apps, no_patient) = applicable(grants, ctx, policy, ty, perm, false);
        if apps.is_empty() {
            let reason = if no_patient {
                DenyReason::NoPatientContext
            } else {
                DenyReason::InsufficientScope
            };
            return deny(reason, narrowest(grants, types, perm));
        }
        if !full(&apps) {
            limited.push((ty, apps));
        }
    }
    // Parameters that filter by other resources must not probe what the token cannot
    // search: every type a chain or `_has` reaches needs `s`.
    if let Err(needed) = probe_targets(grants, ctx, policy, req) {
        return deny(DenyReason::InsufficientScope, needed);
    }
    if limited.is_empty() {
        return Decision::Allow(unconfined_plan(grants, ctx, req, policy));
    }
    if let Some(denied) = unconfinable_params(req) {
        return denied;
    }
    let (ty, apps) = &limited[0];
    let mut plan = Plan::pass_through();
    let confined = Confined {
        req,
        ty,
        apps,
        sole: sole_patient(apps),
        policy,
        level_needed: &|| narrowest(grants, types, perm),
        perm,
    };
    if let Err((reason, needed)) = confined.plan(&mut plan) {
        return deny(reason, needed);
    }
    if plan.verify != Verify::None
        && req
            .params
            .iter()
            .any(|(k, v)| k == "_elements" || (k == "_summary" && v == "text"))
    {
        let confined = apps.iter().any(|a| a.confined_to.is_some());
        let constrained = apps.iter().flat_map(|a| a.constraints);
        plan.elements = crate::fhir::search::checked_elements(
            ty,
            confined,
            constrained.map(|(k, _)| k.as_str()),
        );
    }
    plan.binary_read = plan.verify != Verify::None
        && *ty == "Binary"
        && matches!(req.interaction, Interaction::Read | Interaction::Vread);
    Decision::Allow(plan)
}

/// Full access to every type asked for: what else the response may carry (includes,
/// contained) is verified unless the token can read everything.
fn unconfined_plan(grants: &Grants, ctx: &Context, req: &FhirRequest, policy: &Policy) -> Plan {
    let mut plan = Plan::pass_through();
    // A system-level search or history leans on the upstream honouring `_type`; one that
    // ignores it would return every type. Checked unless the token sees all.
    let across_types = matches!(
        req.interaction,
        Interaction::SearchSystem | Interaction::HistorySystem
    );
    if (reaches_other_resources(req) || across_types) && !sees_everything(grants, ctx, policy) {
        plan.verify = Verify::Bundle { narrowed: true };
    }
    plan
}

/// Parameters a confined request cannot carry: `;` (read as a separator by some
/// servers), `_filter` and `_query` (whose meaning the gateway cannot narrow).
fn unconfinable_params(req: &FhirRequest) -> Option<Decision> {
    if req
        .params
        .iter()
        .any(|(k, v)| k.contains(';') || v.contains(';'))
    {
        return Some(deny(
            DenyReason::Unverifiable("';' in a parameter of a confined request"),
            String::new(),
        ));
    }
    let starts = |k: &str, prefix: &str| {
        k.as_bytes()
            .get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix.as_bytes()))
    };
    if req
        .params
        .iter()
        .any(|(k, _)| starts(k, "_filter") || starts(k, "_query"))
    {
        return Some(deny(
            DenyReason::Unverifiable("_filter and _query cannot be confined"),
            String::new(),
        ));
    }
    None
}

/// Why a confined request is refused, and the scope that would have allowed it.
type Refusal = (DenyReason, String);

/// A request on a type the token reaches only in part (a patient's compartment, granular
/// constraints): how it is narrowed, checked before it is forwarded, and verified after.
struct Confined<'a> {
    req: &'a FhirRequest,
    ty: &'a str,
    apps: &'a [Applies<'a>],
    /// The one patient every applicable scope is confined to, if there is one.
    sole: Option<&'a str>,
    policy: &'a Policy,
    /// The scope that would have allowed the request, for a denial's `needed`.
    level_needed: &'a dyn Fn() -> String,
    perm: Perms,
}

impl Confined<'_> {
    /// Fills `plan` for the interaction, or says why it is refused.
    fn plan(&self, plan: &mut Plan) -> Result<(), Refusal> {
        use Interaction::*;
        let (req, ty, perm) = (self.req, self.ty, self.perm);
        match req.interaction {
            Read | Vread | HistoryInstance => {
                let id = req.id.as_deref().unwrap_or("");
                if ty == "Patient" && self.sole.is_some_and(|p| p != id) {
                    return Err((DenyReason::Compartment, String::new()));
                }
                // The context patient's own record is verified too: what the upstream
                // answers is checked, not what was asked (another Patient after a merge,
                // an answer meant for another request).
                plan.verify = if req.interaction == HistoryInstance {
                    Verify::Bundle { narrowed: true }
                } else {
                    Verify::Resource(Perms::R)
                };
            }
            SearchType | SearchCompartment => self.search(plan)?,
            HistoryType | HistorySystem | SearchSystem => {
                plan.verify = Verify::Bundle { narrowed: false };
            }
            Create => self.create(plan)?,
            Update | Patch | Delete if !req.conditional => {
                let check = match req.interaction {
                    Update => WriteCheck::StoredAndBody,
                    Patch => WriteCheck::Patch,
                    _ => WriteCheck::Stored,
                };
                plan.write = Some(Write::new(check, ty, req.id.clone(), perm));
                plan.verify = Verify::Resource(perm.union(Perms::R));
            }
            Update | Delete => self.conditional_write(plan)?,
            Patch => {
                return Err((
                    DenyReason::Unverifiable("conditional patch of confined data"),
                    String::new(),
                ));
            }
            OperationSystem | OperationType | OperationInstance => self.operation(plan)?,
            Capabilities | Batch | Transaction => {}
        }
        Ok(())
    }

    fn search(&self, plan: &mut Plan) -> Result<(), Refusal> {
        let (req, ty, apps, policy) = (self.req, self.ty, self.apps, self.policy);
        let mut narrowed = true;
        if let Some(("Patient", id)) = req.compartment.as_ref().map(|(t, i)| (*t, i.as_str())) {
            if self.sole.is_some_and(|p| p != id) {
                return Err((DenyReason::Compartment, String::new()));
            }
            narrowed &= self.sole.is_some();
        } else if let Some(p) = self.sole {
            match names_patient(req, ty, p, &policy.bases) {
                Err(()) => return Err((DenyReason::Compartment, String::new())),
                Ok(true) => {}
                // No parameter names a Bundle's or a Subscription's patient: what they
                // hold is checked.
                Ok(false) if ty == "*" || judged_by_content(ty) => narrowed = false,
                Ok(false) => plan.inject.push(policy.compartment_param(ty, p)),
            }
        } else if apps.iter().any(|a| a.confined_to.is_some()) {
            narrowed = false;
        }
        match granular(req, apps) {
            Err(()) => return Err((DenyReason::Granular, (self.level_needed)())),
            Ok(Granular::None) => {}
            Ok(Granular::Inject(extra)) => plan.inject.extend(extra),
            Ok(Granular::Filter) => narrowed = false,
        }
        plan.verify = Verify::Bundle { narrowed };
        Ok(())
    }

    fn create(&self, plan: &mut Plan) -> Result<(), Refusal> {
        let (req, ty, apps, perm) = (self.req, self.ty, self.apps, self.perm);
        plan.write = Some(Write::new(WriteCheck::Body, ty, None, perm));
        // The answer (return=representation) is checked like a read: what the upstream
        // answers, not what was written, is what leaves.
        plan.verify = Verify::Resource(perm.union(Perms::R));
        if req.conditional {
            plan.strict = apps
                .iter()
                .any(|a| a.confined_to.is_some() || !a.constraints.is_empty());
            // If-None-Exist may match an existing resource, which is then returned.
            plan.verify = Verify::Resource(Perms::C.union(Perms::R));
            match narrowing(req, ty, apps, self.policy) {
                Ok(extra) => plan.inject = extra,
                Err(reason) => return Err((reason, String::new())),
            }
        }
        Ok(())
    }

    /// Conditional update or delete: the condition is narrowed to what the token may
    /// write, or the request is refused. The server, not the gateway, resolves what it
    /// matches.
    fn conditional_write(&self, plan: &mut Plan) -> Result<(), Refusal> {
        let (req, ty, apps, perm) = (self.req, self.ty, self.apps, self.perm);
        let confined = apps
            .iter()
            .any(|a| a.confined_to.is_some() || !a.constraints.is_empty());
        if confined && !self.policy.narrow_conditional_writes {
            return Err((
                DenyReason::Unverifiable(
                    "a conditional update or delete under a patient context or granular \
                     scopes (policy.confined_conditional_writes = \"deny\")",
                ),
                String::new(),
            ));
        }
        plan.strict = confined;
        plan.inject = narrowing(req, ty, apps, self.policy).map_err(|r| (r, String::new()))?;
        plan.verify = Verify::Resource(perm.union(Perms::R));
        if req.interaction == Interaction::Update {
            plan.write = Some(Write::new(WriteCheck::Body, ty, None, perm));
        }
        Ok(())
    }

    fn operation(&self, plan: &mut Plan) -> Result<(), Refusal> {
        let req = self.req;
        let op = req.operation.as_deref().unwrap_or("");
        if op == "export" {
            return Err((
                DenyReason::Unverifiable("$export is not available to confined tokens"),
                String::new(),
            ));
        }
        // The answer is a Parameters holding the meta (versions, tags, security labels)
        // of a resource, or of every resource of the type: nothing in it says whose it
        // is, so nothing can be checked.
        if op == "meta" {
            return Err((
                DenyReason::Unverifiable("$meta is not available to confined tokens"),
                String::new(),
            ));
        }
        if req.interaction == Interaction::OperationInstance
            && req.resource_type == Some("Patient")
            && self.sole.is_some_and(|p| Some(p) != req.id.as_deref())
        {
            return Err((DenyReason::Compartment, String::new()));
        }
        plan.verify = Verify::Bundle {
            narrowed: op == "everything" && self.sole.is_some(),
        };
        Ok(())
    }
}

/// Whether every resource the upstream could return is visible to the token: an
/// unconfined, unconstrained scope with `r` or `s` on `*`.
pub(crate) fn sees_everything(grants: &Grants, ctx: &Context, policy: &Policy) -> bool {
    full(&applicable(grants, ctx, policy, "*", Perms::R.union(Perms::S), true).0)
}

/// Every type a chain (`subject:Patient.name`, `subject.organization.name`) or reverse
/// chain (`_has:Observation:patient:code`) reaches must be searchable by the token, so a
/// filter cannot be used as an oracle. `Err` names the scope needed.
fn probe_targets(
    grants: &Grants,
    ctx: &Context,
    policy: &Policy,
    req: &FhirRequest,
) -> Result<(), String> {
    let searchable = |t: &str| {
        !applicable(grants, ctx, policy, t, Perms::S, false)
            .0
            .is_empty()
    };
    let base = req.resource_type.unwrap_or("*");
    for (k, _) in &req.params {
        if let Some(rest) = k.strip_prefix("_has:") {
            // _has:Type:ref:param (nested _has repeats the shape).
            let mut parts = rest.split(':');
            let t = parts.next().unwrap_or("");
            let t = crate::fhir::request::resource_type(t).map_err(|_| format!("{t}.s"))?;
            if !searchable(t) {
                return Err(format!("{}/{t}.s", level_of(grants)));
            }
            if rest.contains(":_has:") {
                // Nested reverse chains: each hop checked above only for the first.
                for hop in rest.split(":_has:").skip(1) {
                    let t = hop.split(':').next().unwrap_or("");
                    let t = crate::fhir::request::resource_type(t).map_err(|_| format!("{t}.s"))?;
                    if !searchable(t) {
                        return Err(format!("{}/{t}.s", level_of(grants)));
                    }
                }
            }
            continue;
        }
        if !k.contains('.') {
            continue;
        }
        let hops: Vec<&str> = k.split('.').collect();
        let mut current: Vec<&str> = vec![base];
        for hop in &hops[..hops.len() - 1] {
            let (name, modifier) = match hop.split_once(':') {
                Some((n, m)) => (n, Some(m)),
                None => (*hop, None),
            };
            let mut next: Vec<&str> = Vec::new();
            if let Some(m) = modifier {
                let t = crate::fhir::request::resource_type(m).map_err(|_| format!("{m}.s"))?;
                next.push(t);
            } else {
                for t in &current {
                    let p = crate::fhir::search::param(t, name)
                        .filter(|p| p.kind == crate::fhir::generated::ParamKind::Reference)
                        .ok_or_else(|| format!("{}/*.s", level_of(grants)))?;
                    next.extend(p.targets.iter().copied());
                }
            }
            for t in &next {
                if !searchable(t) {
                    return Err(format!("{}/{t}.s", level_of(grants)));
                }
            }
            current = next;
        }
    }
    Ok(())
}

/// The level the token's scopes use, patient before user before system: the level a
/// missing scope is named at.
fn first_level(grants: &Grants) -> Level {
    [Level::Patient, Level::User, Level::System]
        .into_iter()
        .find(|l| grants.scopes.iter().any(|s| s.level == *l))
        .unwrap_or(Level::Patient)
}

fn level_of(grants: &Grants) -> &'static str {
    first_level(grants).as_str()
}

/// Whether the query names the patient (compartment parameters, `_id` on Patient), and
/// every patient it names is `patient`: `Ok(true)`; names none, or also allows what is
/// not that patient (`performer=Practitioner/7,Patient/123`, or a bare id on a parameter
/// that may point at other types): `Ok(false)`, and the patient is added; names another,
/// or in a way the gateway cannot read: `Err`.
fn names_patient(req: &FhirRequest, ty: &str, patient: &str, bases: &[String]) -> Result<bool, ()> {
    let comp: Vec<&str> = crate::fhir::search::compartment_paths(ty)
        .map(|ps| ps.iter().map(|(p, _)| *p).collect())
        .unwrap_or_default();
    let has_patient_param = crate::fhir::search::param(ty, "patient").is_some();
    let mut named = false;
    // An alternative that matches more than the patient: the parameter does not confine.
    let mut wider = false;
    for (k, v) in &req.params {
        if k.contains('.') {
            continue;
        }
        let (name, modifier) = match k.split_once(':') {
            Some((n, m)) => (n, Some(m)),
            None => (k.as_str(), None),
        };
        let is_id = ty == "Patient" && name == "_id";
        let is_comp = comp.contains(&name) || (name == "patient" && has_patient_param);
        if !is_id && !is_comp {
            continue;
        }
        match modifier {
            None => {}
            Some("Patient") if !is_id => {}
            Some(_) => return Err(()),
        }
        for alt in v.split(',') {
            let ok = if is_id || modifier.is_some() {
                alt == patient
            } else if alt.contains('/') {
                match crate::fhir::reference::local_target(alt, bases) {
                    Some(("Patient", id)) => id == patient,
                    // Another type (a Practitioner performer): names no patient.
                    Some(_) if name != "patient" => {
                        wider = true;
                        continue;
                    }
                    _ => false,
                }
            } else if alt != patient {
                false
            } else if !points_only_at_patients(ty, name) {
                // A bare id on a parameter that may point at other types: `subject=123`
                // also matches a Group/123.
                wider = true;
                continue;
            } else {
                true
            };
            if !ok {
                return Err(());
            }
            named = true;
        }
    }
    Ok(named && !wider)
}

/// Whether search parameter `name` of `ty` is a reference that can point at a Patient
/// and nothing else, so that a bare id in it can only mean that patient.
fn points_only_at_patients(ty: &str, name: &str) -> bool {
    crate::fhir::search::param(ty, name)
        .is_some_and(|p| !p.targets.is_empty() && p.targets.iter().all(|t| *t == "Patient"))
}

/// What granular scopes do to a search.
enum Granular {
    /// No constraint applies (an unconstrained scope covers the type).
    None,
    /// The one applicable scope's constraints, to add to the query.
    Inject(Vec<(String, String)>),
    /// Several scopes apply: forward and filter.
    Filter,
}

/// How a search meets granular constraints. A constrained parameter whose every value
/// the grants cover (FHIR token search, [`token_within`]) needs nothing more. One that is
/// broader or another (a bare `code` under a `system|code` grant, `system|`, a value of
/// another code, a modifier): with one applicable scope its constraints are added beside
/// the client's (a repeated parameter is AND in FHIR, R4 search.html#combining), with
/// several the answer is filtered; either way every returned resource is verified
/// against the grants, so nothing is refused that can be confined. A missing constrained
/// parameter is added with one scope.
fn granular(req: &FhirRequest, apps: &[Applies<'_>]) -> Result<Granular, ()> {
    if apps.iter().any(|a| a.constraints.is_empty()) {
        return Ok(Granular::None);
    }
    // The constrained names whose values the grants do not all cover.
    let mut wider: Vec<&str> = Vec::new();
    for (k, v) in &req.params {
        let constrained_by_all = apps
            .iter()
            .all(|a| a.constraints.iter().any(|(ck, _)| ck == k));
        if !constrained_by_all {
            continue;
        }
        let covered = v.split(',').all(|alt| {
            apps.iter().any(|a| {
                a.constraints
                    .iter()
                    .any(|(ck, cv)| ck == k && cv.split(',').any(|c| token_within(alt, c)))
            })
        });
        if !covered {
            wider.push(k);
        }
    }
    if apps.len() == 1 {
        let extra = apps[0]
            .constraints
            .iter()
            .filter(|(ck, _)| {
                wider.contains(&ck.as_str()) || !req.params.iter().any(|(k, _)| k == ck)
            })
            .cloned()
            .collect();
        Ok(Granular::Inject(extra))
    } else {
        Ok(Granular::Filter)
    }
}

/// Whether every resource a token search value `asked` matches is matched by `granted`
/// too (FHIR R4 search.html#token): `code` matches that code in any system, `system|code`
/// that code in that system, `|code` that code without a system, `system|` any code of
/// that system. Codes and systems compare exactly.
pub(crate) fn token_within(asked: &str, granted: &str) -> bool {
    if asked == granted {
        return true;
    }
    match (asked.split_once('|'), granted.split_once('|')) {
        // A bare code granted: that code whatever the system.
        (Some((_, code)), None) => !code.is_empty() && code == granted,
        // A whole system granted: any code of it.
        (Some((system, _)), Some((gs, ""))) => !system.is_empty() && system == gs,
        _ => false,
    }
}

/// The parameters that confine a conditional write's condition to what the token may
/// write, or why it cannot be confined.
fn narrowing(
    req: &FhirRequest,
    ty: &str,
    apps: &[Applies<'_>],
    policy: &Policy,
) -> Result<Vec<(String, String)>, DenyReason> {
    let mut extra = Vec::new();
    if apps.iter().any(|a| a.confined_to.is_some()) {
        if judged_by_content(ty) {
            // No parameter confines a condition on Bundles or Subscriptions to a patient.
            return Err(DenyReason::Unverifiable(
                "a conditional write of a Bundle or Subscription under a patient context",
            ));
        }
        let p = sole_patient(apps).ok_or(DenyReason::Unverifiable(
            "a conditional write under several patient contexts",
        ))?;
        if !names_patient(req, ty, p, &policy.bases).map_err(|()| DenyReason::Compartment)? {
            extra.push(policy.compartment_param(ty, p));
        }
    }
    match granular(req, apps).map_err(|()| DenyReason::Granular)? {
        Granular::None => {}
        Granular::Inject(more) => extra.extend(more),
        Granular::Filter => {
            return Err(DenyReason::Unverifiable(
                "a conditional write under several granular scopes",
            ));
        }
    }
    Ok(extra)
}

/// Whether a request's parameters can bring back, or probe, resources other than the ones
/// searched: includes, chains, `_has`, `_filter`, named queries, contained resources, paging
/// cursors. Read the widest way a server might: names case-insensitively, and a `;`
/// anywhere (legacy servers split on it) counts.
pub(crate) fn reaches_other_resources(req: &FhirRequest) -> bool {
    req.params.iter().any(|(k, v)| {
        let (k, v) = (k.as_bytes(), v.as_bytes());
        // Chains, with or without a type modifier: subject.name, subject:Patient.name.
        if k.iter().any(|&b| b == b';' || b == b'.') || v.contains(&b';') {
            return true;
        }
        let name = k.split(|&b| b == b':').next().unwrap_or(k);
        name.first() == Some(&b'_')
            && ([
                "_include",
                "_revinclude",
                "_getpages",
                "_contained",
                "_containedtype",
                "_filter",
                "_query",
            ]
            .iter()
            .any(|n| name.eq_ignore_ascii_case(n.as_bytes()))
                || name
                    .get(..4)
                    .is_some_and(|p| p.eq_ignore_ascii_case(b"_has")))
    })
}

/// The narrowest scope that would allow the request: at the level the token already
/// uses (patient before user before system), on the type, with the one letter.
fn narrowest(grants: &Grants, types: &Types, perm: Perms) -> String {
    let level = first_level(grants);
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
    let mut plans = Vec::new();
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
            Ok(req) => match authorize(grants, ctx, req, policy) {
                Decision::Deny { reason, needed } => denied.push((i, reason, needed)),
                Decision::Allow(plan) => plans.push(plan),
            },
        }
    }
    if denied.is_empty() {
        let mut plan = Plan::pass_through();
        if !plans.iter().all(Plan::is_pass_through) {
            plan.entries = plans;
        }
        Decision::Allow(plan)
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

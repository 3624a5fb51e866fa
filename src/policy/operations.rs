//! Which permissions an operation (`$name`) needs. Operations not in the table are denied:
//! an operation can do anything, so the gateway must know what it does to allow it.

use crate::fhir::request::{FhirRequest, Interaction};
use crate::smart::scope::Perms;

/// Where an operation is invoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpLevel {
    /// `[base]/$op`
    System,
    /// `[type]/$op`
    Type,
    /// `[type]/[id]/$op`
    Instance,
}

/// What an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationRule {
    /// Never allowed.
    Deny,
    /// No scope needed (terminology lookups on public code systems, for example).
    Open,
    /// These letters on the request's type (system level: on `_type`, else every type).
    Needs(Perms),
    /// These letters on every type, or on each `_type` when given.
    NeedsAll(Perms),
    /// `c` on the type (no id) or `u` (with an id): `$validate`.
    CreateOrUpdate,
    /// `Patient/[id]/$everything`: `r` on Patient and `s` on every type.
    Everything,
}

/// The operation table.
#[derive(Debug, Clone)]
pub struct Operations {
    rules: Vec<(&'static str, Option<&'static str>, OpLevel, OperationRule)>,
}

impl Default for Operations {
    /// Safe defaults (SMART Bulk Data, FHIR R4 operations list).
    fn default() -> Self {
        use OpLevel::*;
        use OperationRule::*;
        let rs = Perms::R.union(Perms::S);
        Operations {
            rules: vec![
                // Bulk export: system/*.rs, or rs on each _type.
                ("export", None, System, NeedsAll(rs)),
                ("export", Some("Patient"), Type, NeedsAll(rs)),
                ("export", Some("Group"), Instance, NeedsAll(rs)),
                ("everything", Some("Patient"), Instance, Everything),
                ("validate", None, Type, CreateOrUpdate),
                ("validate", None, Instance, CreateOrUpdate),
                ("meta", None, Type, Needs(Perms::R)),
                ("meta", None, Instance, Needs(Perms::R)),
                ("expand", Some("ValueSet"), Type, Needs(Perms::R)),
                ("expand", Some("ValueSet"), Instance, Needs(Perms::R)),
                ("lookup", Some("CodeSystem"), Type, Needs(Perms::R)),
                ("validate-code", Some("ValueSet"), Type, Needs(Perms::R)),
                ("validate-code", Some("CodeSystem"), Type, Needs(Perms::R)),
            ],
        }
    }
}

impl Operations {
    /// The rule for an operation request, if the table has one.
    pub fn rule(&self, req: &FhirRequest) -> Option<OperationRule> {
        let level = match req.interaction {
            Interaction::OperationSystem => OpLevel::System,
            Interaction::OperationType => OpLevel::Type,
            Interaction::OperationInstance => OpLevel::Instance,
            _ => return None,
        };
        let name = req.operation.as_deref()?;
        self.rules
            .iter()
            .find(|(n, ty, l, _)| {
                *n == name && *l == level && ty.is_none_or(|t| Some(t) == req.resource_type)
            })
            .map(|(_, _, _, rule)| *rule)
    }
}

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

/// One row: operation name, resource type (any when `None`), level, rule.
type Row = (String, Option<String>, OpLevel, OperationRule);

/// The operation table.
#[derive(Debug, Clone)]
pub struct Operations {
    rules: Vec<Row>,
}

impl Default for Operations {
    /// Safe defaults (SMART Bulk Data, FHIR R4 operations list).
    fn default() -> Self {
        use OpLevel::*;
        use OperationRule::*;
        let rs = Perms::R.union(Perms::S);
        let rules: Vec<(&str, Option<&str>, OpLevel, OperationRule)> = vec![
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
        ];
        Operations {
            rules: rules
                .into_iter()
                .map(|(n, t, l, r)| (n.to_owned(), t.map(str::to_owned), l, r))
                .collect(),
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
                n == name
                    && *l == level
                    && ty.as_deref().is_none_or(|t| Some(t) == req.resource_type)
            })
            .map(|(_, _, _, rule)| *rule)
    }

    /// The defaults with `[[policy.operations]]` rows in front (first match wins).
    pub fn with_config(rows: &[crate::config::OperationConfig]) -> Result<Operations, String> {
        let mut rules = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let key = |k: &str| format!("policy.operations[{i}].{k}");
            let level = match row.level.as_str() {
                "system" => OpLevel::System,
                "type" => OpLevel::Type,
                "instance" => OpLevel::Instance,
                other => {
                    return Err(format!(
                        "{}: {other:?} is not system, type or instance",
                        key("level")
                    ));
                }
            };
            let rule = parse_rule(&row.requires)
                .ok_or_else(|| format!("{}: {:?} is not open, deny, create-or-update, everything, letters like \"rs\", or \"all:rs\"", key("requires"), row.requires))?;
            if let Some(t) = &row.resource_type {
                crate::fhir::request::resource_type(t).map_err(|_| {
                    format!("{}: {t:?} is not an R4 resource type", key("resource_type"))
                })?;
            }
            let name = row.name.trim_start_matches('$').to_owned();
            if name.is_empty() {
                return Err(format!("{}: must not be empty", key("name")));
            }
            rules.push((name, row.resource_type.clone(), level, rule));
        }
        rules.extend(Operations::default().rules);
        Ok(Operations { rules })
    }
}

fn parse_rule(s: &str) -> Option<OperationRule> {
    let letters = |l: &str| -> Option<Perms> {
        if l.is_empty() {
            return None;
        }
        l.chars().try_fold(Perms::NONE, |acc, c| {
            let p = match c {
                'c' => Perms::C,
                'r' => Perms::R,
                'u' => Perms::U,
                'd' => Perms::D,
                's' => Perms::S,
                _ => return None,
            };
            Some(acc.union(p))
        })
    };
    Some(match s {
        "open" => OperationRule::Open,
        "deny" => OperationRule::Deny,
        "create-or-update" => OperationRule::CreateOrUpdate,
        "everything" => OperationRule::Everything,
        _ => match s.strip_prefix("all:") {
            Some(l) => OperationRule::NeedsAll(letters(l)?),
            None => OperationRule::Needs(letters(s)?),
        },
    })
}

//! The decision cache: per worker, keyed by the principal (one verification of one token),
//! the configuration snapshot it was decided under (a reload that changes the policy must
//! not leave old decisions standing) and the exact request shape (method, path and query as sent, and the headers that
//! change classification). A hit skips classification and the decision.
//!
//! Exact keys: the map compares whole keys, so a hash collision can never hand one request
//! another's decision. Requests whose bodies take part in the decision (form searches,
//! batches, transactions) are never cached. Every header `classify` reads must either be
//! part of the key (`If-None-Exist`) or be checked before the lookup
//! (`fhir::request::check_headers`): a hit skips classification.

use std::cell::RefCell;
use std::collections::HashMap;

use super::Decision;
use crate::audit::Target;

/// Most entries a worker keeps; the map starts over when full.
pub const MAX: usize = 4096;
/// Longest request target (path and query) whose decision is kept: with [`MAX`], a
/// worker's decisions hold at most about 5 MiB. Longer targets are decided every time.
pub const TARGET_MAX: usize = 1024;

/// What a decision depends on besides the principal.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestShape {
    /// HTTP method.
    pub method: http::Method,
    /// Path and query after the public base, as sent.
    pub target: String,
    /// `If-None-Exist` present (conditional create).
    pub if_none_exist: bool,
}

/// Who decided it under what: the principal's id and the snapshot's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Decider {
    /// `Principal::id`.
    pub principal: u64,
    /// `Snapshot::generation`.
    pub generation: u64,
}

/// (decider, method, If-None-Exist) → target → decision. Nested so that a lookup
/// borrows the target instead of allocating a key.
type Decisions = HashMap<(Decider, http::Method, bool), HashMap<String, (Decision, Target)>>;

thread_local! {
    static DECISIONS: RefCell<(Decisions, usize)> = RefCell::new((HashMap::new(), 0));
}

/// The cached decision for this principal and request, if any, with what the request
/// was classified as (for the audit line).
pub fn get(
    principal: Decider,
    method: &http::Method,
    if_none_exist: bool,
    target: &str,
) -> Option<(Decision, Target)> {
    DECISIONS.with(|d| {
        d.borrow()
            .0
            .get(&(principal, method.clone(), if_none_exist))?
            .get(target)
            .cloned()
    })
}

/// Remembers a decision and what the request was classified as.
pub fn put(principal: Decider, shape: RequestShape, decision: Decision, target: Target) {
    if shape.target.len() > TARGET_MAX {
        return;
    }
    DECISIONS.with(|d| {
        let (map, len) = &mut *d.borrow_mut();
        if *len >= MAX {
            map.clear();
            *len = 0;
        }
        let inner = map
            .entry((principal, shape.method, shape.if_none_exist))
            .or_default();
        if inner.insert(shape.target, (decision, target)).is_none() {
            *len += 1;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Plan;

    fn d(principal: u64) -> Decider {
        Decider {
            principal,
            generation: 7,
        }
    }

    /// Entries are exact: another principal, another snapshot or another target misses.
    #[test]
    fn exact_keys() {
        let shape = |t: &str| RequestShape {
            method: http::Method::GET,
            target: t.to_owned(),
            if_none_exist: false,
        };
        let target = Target {
            interaction: crate::fhir::request::Interaction::SearchType,
            resource_type: Some("Observation"),
            id: None,
        };
        put(
            d(1),
            shape("/Observation?code=a"),
            Decision::Allow(Plan::pass_through()),
            target.clone(),
        );
        let get = |p: Decider, t: &str| get(p, &http::Method::GET, false, t);
        assert_eq!(
            get(d(1), "/Observation?code=a").map(|(_, t)| t),
            Some(target)
        );
        assert!(get(d(2), "/Observation?code=a").is_none());
        let reloaded = Decider {
            principal: 1,
            generation: 8,
        };
        assert!(get(reloaded, "/Observation?code=a").is_none());
        assert!(get(d(1), "/Observation?code=b").is_none());
        assert!(super::get(d(1), &http::Method::DELETE, false, "/Observation?code=a").is_none());
        // A target past the bound is not kept.
        let long = format!("/Observation?code={}", "x".repeat(TARGET_MAX));
        put(
            d(1),
            shape(&long),
            Decision::Allow(Plan::pass_through()),
            target_of(),
        );
        assert!(get(d(1), &long).is_none());
    }

    fn target_of() -> Target {
        Target {
            interaction: crate::fhir::request::Interaction::SearchType,
            resource_type: Some("Observation"),
            id: None,
        }
    }
}

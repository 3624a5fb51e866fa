//! The decision cache: per worker, keyed by the principal (one verification of one token)
//! and the exact request shape (method, path and query as sent, and the headers that
//! change classification). A hit skips classification and the decision.
//!
//! Exact keys: the map compares whole keys, so a hash collision can never hand one request
//! another's decision. Requests whose bodies take part in the decision (form searches,
//! batches, transactions) are never cached.

use std::cell::RefCell;
use std::collections::HashMap;

use super::Decision;

/// Most entries a worker keeps; the map starts over when full.
const MAX: usize = 4096;

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

thread_local! {
    static DECISIONS: RefCell<HashMap<(u64, RequestShape), Decision>> = RefCell::new(HashMap::new());
}

/// The cached decision for this principal and request, if any.
pub fn get(principal: u64, shape: &RequestShape) -> Option<Decision> {
    DECISIONS.with(|d| d.borrow().get(&(principal, shape.clone())).cloned())
}

/// Remembers a decision.
pub fn put(principal: u64, shape: RequestShape, decision: Decision) {
    DECISIONS.with(|d| {
        let mut d = d.borrow_mut();
        if d.len() >= MAX {
            d.clear();
        }
        d.insert((principal, shape), decision);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Plan;

    /// Entries are exact: another principal or another target misses.
    #[test]
    fn exact_keys() {
        let shape = |t: &str| RequestShape {
            method: http::Method::GET,
            target: t.to_owned(),
            if_none_exist: false,
        };
        put(
            1,
            shape("/Observation?code=a"),
            Decision::Allow(Plan::pass_through()),
        );
        assert!(get(1, &shape("/Observation?code=a")).is_some());
        assert!(get(2, &shape("/Observation?code=a")).is_none());
        assert!(get(1, &shape("/Observation?code=b")).is_none());
    }
}

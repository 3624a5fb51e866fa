//! The one JSON reader for everything the gateway checks: request bodies, bundle entries,
//! JSON Patch documents, stored versions and verified answers.
//!
//! RFC 8259 §4 leaves the meaning of an object with a repeated member name to each
//! reader: serde_json and `JSON.parse` keep the last, many servers (Jackson configured so,
//! some streaming parsers) the first. A check made on one reading and bytes forwarded to a
//! reader of the other is no check at all (`"subject"` naming patient 456 first and 123
//! last). So a document with a repeated name at any depth is refused here, before anything
//! is decided on it: 400 for a client's body, 502 for an upstream's answer. What is left —
//! strict RFC 8259 with UTF-8 only, no lone surrogates, no trailing data, nesting within
//! serde_json's limit — has one reading.
//!
//! What is forwarded is then the bytes as they came whenever the gateway changed nothing,
//! not a serialisation of what was checked: with duplicates gone both read the same, and
//! re-serialising would cost a pass over every checked body and change what the gateway
//! has no business changing (a FHIR `decimal` such as `1.50` keeps its precision only in
//! the original text; serde_json would write `1.5`).

mod scan;

use std::borrow::Cow;

use serde_json::Value;

/// Why a document was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// A member name appears twice in one object.
    #[error("member name {0:?} appears twice in one object")]
    Duplicate(String),
    /// Not JSON (RFC 8259), or trailing data after it.
    #[error("not JSON: {0}")]
    Syntax(String),
}

/// Parses `bytes` as one JSON document, refusing repeated member names at any depth.
///
/// The document is first read by [`validate`], which alone decides what is accepted;
/// serde_json then builds the value from text that has one reading.
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    let text = scan::Scan::document(bytes)?;
    serde_json::from_str(text).map_err(|e| JsonError::Syntax(e.to_string()))
}

/// Parses `bytes` strictly ([`parse`]) into `T`.
pub fn parse_as<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, JsonError> {
    serde_json::from_value(parse(bytes)?).map_err(|e| JsonError::Syntax(e.to_string()))
}

/// Reads `bytes` strictly without building anything: `Ok` exactly when [`parse`] would
/// succeed. One pass over the bytes, no allocation but for objects of many members.
pub fn validate(bytes: &[u8]) -> Result<(), JsonError> {
    scan::Scan::document(bytes).map(drop)
}

/// The members of a document that must be one JSON object, in order: each name decoded
/// (`"resource\u0054ype"` is `resourceType`) and the text of its value, for
/// [`parse_value`]. The whole document is read as strictly as by [`validate`], so a
/// repeated name at any depth, or anything else [`parse`] refuses, is an error here too.
pub fn members(bytes: &[u8]) -> Result<Vec<(Cow<'_, str>, &str)>, JsonError> {
    scan::Scan::members(bytes)
}

/// Builds the value of a member's text as given by [`members`] (already read strictly).
pub fn parse_value(text: &str) -> Result<Value, JsonError> {
    serde_json::from_str(text).map_err(|e| JsonError::Syntax(e.to_string()))
}

#[cfg(test)]
mod tests;

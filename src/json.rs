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

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

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
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict.deserialize(&mut de).map_err(classify)?;
    de.end().map_err(classify)?;
    Ok(value)
}

/// Parses `bytes` strictly ([`parse`]) into `T`.
pub fn parse_as<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, JsonError> {
    serde_json::from_value(parse(bytes)?).map_err(|e| JsonError::Syntax(e.to_string()))
}

/// Reads `bytes` strictly without building anything: `Ok` when [`parse`] would succeed.
pub fn validate(bytes: &[u8]) -> Result<(), JsonError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    Skip.deserialize(&mut de).map_err(classify)?;
    de.end().map_err(classify)
}

const DUPLICATE: &str = "duplicate member name: ";

/// How serde_json (with `arbitrary_precision`, which this crate turns on) hands a number
/// to a visitor: a one-member map under this name, the number's text as its value. Kept
/// as text, a number is never out of range (`1e400`) and keeps its precision (a FHIR
/// `decimal` `1.50` stays `1.50` when a filtered Bundle is written again).
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

fn number<E: de::Error>(text: String) -> Result<Value, E> {
    text.parse::<Number>()
        .map(Value::Number)
        .map_err(|_| E::custom("a malformed number"))
}

fn classify(e: serde_json::Error) -> JsonError {
    let text = e.to_string();
    match text.strip_prefix(DUPLICATE) {
        Some(rest) => JsonError::Duplicate(rest.split(" at line").next().unwrap_or(rest).into()),
        None => JsonError::Syntax(text),
    }
}

fn duplicate<E: de::Error>(name: &str) -> E {
    E::custom(format_args!("{DUPLICATE}{name}"))
}

/// Builds a [`Value`], refusing repeated member names.
#[derive(Clone, Copy)]
pub struct Strict;

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("a number JSON cannot hold"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element_seed(Strict)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut members = Map::new();
        while let Some(name) = map.next_key::<Name<'de>>()? {
            if members.is_empty() && name.0 == NUMBER_TOKEN {
                return number(map.next_value::<String>()?);
            }
            if members.contains_key(&*name.0) {
                return Err(duplicate(&name.0));
            }
            let value = map.next_value_seed(Strict)?;
            members.insert(name.0.into_owned(), value);
        }
        Ok(Value::Object(members))
    }
}

/// Walks a value without keeping it, refusing repeated member names.
#[derive(Clone, Copy)]
pub struct Skip;

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut names = Names::default();
        let mut first = true;
        while let Some(name) = map.next_key::<Name<'de>>()? {
            if std::mem::take(&mut first) && name.0 == NUMBER_TOKEN {
                map.next_value::<String>()?;
                return Ok(());
            }
            names.insert::<A::Error>(name.0)?;
            map.next_value_seed(Skip)?;
        }
        Ok(())
    }
}

/// The member names of one object seen so far: the first dozen in place (no allocation
/// for the objects a FHIR resource is made of), searched in order; a hash set past that,
/// so a hostile object of many names costs linear time, not quadratic.
pub struct Names<'de> {
    few: [Option<Cow<'de, str>>; FEW],
    len: usize,
    many: Option<HashSet<Cow<'de, str>>>,
}

const FEW: usize = 12;

impl Default for Names<'_> {
    fn default() -> Self {
        Names {
            few: [const { None }; FEW],
            len: 0,
            many: None,
        }
    }
}

impl<'de> Names<'de> {
    /// Records `name`; an error if it was seen before.
    pub fn insert<E: de::Error>(&mut self, name: Cow<'de, str>) -> Result<(), E> {
        if let Some(many) = &mut self.many {
            if many.contains(&name) {
                return Err(duplicate(&name));
            }
            many.insert(name);
            return Ok(());
        }
        if self.few[..self.len]
            .iter()
            .any(|n| n.as_deref() == Some(&*name))
        {
            return Err(duplicate(&name));
        }
        if self.len < FEW {
            self.few[self.len] = Some(name);
            self.len += 1;
        } else {
            let mut many: HashSet<Cow<'de, str>> =
                self.few.iter_mut().filter_map(Option::take).collect();
            many.insert(name);
            self.many = Some(many);
        }
        Ok(())
    }
}

/// A member name, borrowed from the input unless it has escapes (which are decoded, so
/// `"resource\u0054ype"` is `resourceType` and counts as a repeat of it).
pub struct Name<'de>(pub Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Name<'de>, E> {
                Ok(Name(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repeated name is refused at every depth, escaped or not; distinct names and the
    /// same name in sibling objects are not repeats.
    #[test]
    fn repeated_names_are_refused_at_any_depth() {
        for doc in [
            r#"{"resourceType":"Observation","resourceType":"Patient"}"#,
            r#"{"resourceType":"Observation","resource\u0054ype":"Patient"}"#,
            r#"{"subject":{"reference":"Patient/456","reference":"Patient/123"}}"#,
            r#"{"entry":[{"resource":{"id":"1"},"resource":{"id":"2"}}]}"#,
            r#"[[[{"a":1,"b":{"c":[{"d":1,"d":2}]}}]]]"#,
        ] {
            assert!(
                matches!(parse(doc.as_bytes()), Err(JsonError::Duplicate(_))),
                "{doc}"
            );
            assert!(validate(doc.as_bytes()).is_err(), "{doc}");
        }
        for doc in [
            r#"{"a":{"id":"1"},"b":{"id":"1"}}"#,
            r#"[{"id":1},{"id":1}]"#,
            r#"{"A":1,"a":1,"a ":1}"#,
        ] {
            assert_eq!(
                parse(doc.as_bytes()).unwrap(),
                serde_json::from_str::<Value>(doc).unwrap(),
                "{doc}"
            );
            assert!(validate(doc.as_bytes()).is_ok(), "{doc}");
        }
    }

    /// Past the short list the names go into a set: repeats are still found, far apart.
    #[test]
    fn many_names_are_checked_too() {
        let mut doc = String::from("{");
        for i in 0..1000 {
            doc.push_str(&format!("\"k{i}\":{i},"));
        }
        let unique = format!("{}\"last\":0}}", doc);
        assert!(parse(unique.as_bytes()).is_ok());
        assert!(validate(unique.as_bytes()).is_ok());
        let repeated = format!("{}\"k3\":0}}", doc);
        assert_eq!(
            parse(repeated.as_bytes()),
            Err(JsonError::Duplicate("k3".into()))
        );
        assert!(validate(repeated.as_bytes()).is_err());
    }

    /// Numbers are kept as their text: out of f64's range (`1e400`) they are read, and
    /// written again unchanged, as are a decimal's trailing zeros and large integers.
    #[test]
    fn numbers_keep_their_text() {
        let doc = br#"{"a":1e400,"b":1.50,"c":-0.0,"d":123456789012345678901234567890,"e":[2.10]}"#;
        let v = parse(doc).unwrap();
        // The same numbers; serde_json writes an exponent with its sign.
        assert_eq!(
            v.to_string(),
            r#"{"a":1e+400,"b":1.50,"c":-0.0,"d":123456789012345678901234567890,"e":[2.10]}"#
        );
        assert!(validate(doc).is_ok());
        assert_eq!(v["b"].as_f64(), Some(1.5));
        assert!(matches!(parse(b"{\"a\":01}"), Err(JsonError::Syntax(_))));
    }

    /// Whatever serde_json reads without a repeat, this reads the same; it refuses what
    /// serde_json refuses (trailing data, lone surrogates, invalid UTF-8, NaN).
    #[test]
    fn agrees_with_serde_json_otherwise() {
        for doc in [
            &br#"{"n":1.50,"i":-3,"u":18446744073709551615,"s":"\u00e9","z":null,"t":true}"#[..],
            b"  [1, 2.5e3, \"x\"]  ",
        ] {
            assert_eq!(
                parse(doc).unwrap(),
                serde_json::from_slice::<Value>(doc).unwrap()
            );
        }
        for bad in [
            &b"{\"a\":1} x"[..],
            br#"{"a":"\ud800"}"#,
            b"{\"a\":\"\xff\"}",
            b"{\"a\":NaN}",
            b"{\"a\":1,}",
            b"",
        ] {
            assert!(serde_json::from_slice::<Value>(bad).is_err());
            assert!(matches!(parse(bad), Err(JsonError::Syntax(_))), "{bad:?}");
            assert!(validate(bad).is_err());
        }
    }
}

//! The gateway's reading of a body against strict readers of both kinds: whenever
//! `smartgate::json` accepts a document, a first-member-wins reader and serde_json's
//! last-member-wins reader read the same value, and so does the gateway; whenever it
//! refuses one that serde_json reads, that document has a repeated name (two readings).
//! The single-pass read check decides only on documents with one reading, and as the
//! whole-document check does.
#![no_main]

use std::fmt;

use libfuzzer_sys::fuzz_target;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use smartgate::json::{JsonError, parse, validate};
use smartgate::policy::verify::Viewer;
use smartgate::policy::{Context, Policy};
use smartgate::smart::scope::{Grants, Perms};

/// A reader that keeps the first of two members with one name, as some servers do.
struct FirstWins;

impl<'de> DeserializeSeed<'de> for FirstWins {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        // Numbers and scalars as serde_json reads them; objects and arrays by hand.
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for FirstWins {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(FirstWins)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.is_empty() && k == "$serde_json::private::Number" {
                let text: String = map.next_value()?;
                return text
                    .parse()
                    .map(Value::Number)
                    .map_err(serde::de::Error::custom);
            }
            let v = map.next_value_seed(FirstWins)?;
            out.entry(k).or_insert(v);
        }
        Ok(Value::Object(out))
    }
}

fn first_wins(data: &[u8]) -> Option<Value> {
    let mut de = serde_json::Deserializer::from_slice(data);
    let v = FirstWins.deserialize(&mut de).ok()?;
    de.end().ok()?;
    Some(v)
}

fn spells_the_number_name(data: &[u8]) -> bool {
    let has = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
    has(b"private::Number") || has(b"\\u")
}

fuzz_target!(|data: &[u8]| {
    let gateway = parse(data);
    assert_eq!(gateway.is_ok(), validate(data).is_ok());
    let last = serde_json::from_slice::<Value>(data).ok();
    let first = first_wins(data);
    match &gateway {
        Ok(v) => {
            assert_eq!(Some(v), last.as_ref(), "the gateway reads what serde_json reads");
            assert_eq!(Some(v), first.as_ref(), "one reading, first or last member");
        }
        // Refused at the repeat, before anything after it was read: refused either way.
        Err(JsonError::Duplicate(_)) => {}
        // serde_json's private name for a number spelled out is refused on purpose (it
        // has two readings); spelling it takes the name or a `\u` escape.
        Err(JsonError::Syntax(_)) => assert!(
            last.is_none() || spells_the_number_name(data),
            "refused what serde_json reads"
        ),
    }
    if last.is_some() && first != last {
        assert!(gateway.is_err(), "two readings accepted");
    }
    // The read check on the bytes answers only for one reading, and agrees with it.
    let grants = Grants::parse(["patient/Observation.rs", "user/Condition.rs?category=x"]);
    let ctx = Context::new(Some("123"), None, false);
    let policy = Policy::default();
    let v = Viewer { grants: &grants, ctx: &ctx, policy: &policy, owners: None };
    let rs = Perms::R.union(Perms::S);
    if let Some(seen) = v.visible_bytes(data, rs) {
        let doc = gateway.as_ref().expect("the bytes check answered a document with two readings");
        assert_eq!(seen, v.visible(doc, rs));
    }
});

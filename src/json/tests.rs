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

/// The old reading, through serde's visitors, kept as the oracle the scanner must agree
/// with: serde_json's grammar, and a repeated name at any depth refused.
fn oracle(bytes: &[u8]) -> Result<(), JsonError> {
    use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    #[derive(Clone, Copy)]
    struct Walk;
    impl<'de> DeserializeSeed<'de> for Walk {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Walk {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
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
            while seq.next_element_seed(Walk)?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(name) = map.next_key::<String>()? {
                if seen.is_empty() && name == "$serde_json::private::Number" {
                    // A number (arbitrary_precision).
                    map.next_value::<String>()?;
                    return Ok(());
                }
                if !seen.insert(name.clone()) {
                    return Err(serde::de::Error::custom(format!("duplicate {name}")));
                }
                map.next_value_seed(Walk)?;
            }
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let walked = Walk.deserialize(&mut de).and_then(|()| de.end());
    match walked {
        Ok(()) => Ok(()),
        Err(e) if e.to_string().starts_with("duplicate ") => {
            Err(JsonError::Duplicate(e.to_string()))
        }
        Err(e) => Err(JsonError::Syntax(e.to_string())),
    }
}

/// Whether the scanner and the oracle give the same answer (both read, both refuse a
/// repeat, both refuse the syntax); and `parse` answers as `validate` does.
fn agree(doc: &[u8]) -> bool {
    let ours = validate(doc);
    let same = match (&ours, oracle(doc)) {
        (Ok(()), Ok(())) => true,
        (Err(JsonError::Duplicate(_)), Err(JsonError::Duplicate(_))) => true,
        (Err(JsonError::Syntax(_)), Err(JsonError::Syntax(_))) => true,
        // Where a document both repeats a name and breaks the syntax, which is found
        // first may differ: both refuse it.
        (Err(_), Err(_)) => true,
        _ => false,
    };
    same && ours.is_ok() == parse(doc).is_ok()
}

/// Edge cases of the grammar: the scanner reads exactly what serde_json reads.
#[test]
fn the_scanner_reads_what_serde_json_reads() {
    let docs: &[&[u8]] = &[
        b"0",
        b"-0",
        b"-",
        b"01",
        b"-01",
        b"1.",
        b".5",
        b"1e",
        b"1e+",
        b"1E-5",
        b"1e400",
        b"0.0e0",
        b"2.50",
        b"-1.5E+10",
        b"1.e3",
        b"1e3.5",
        b"123456789012345678901234567890",
        b"+1",
        b"0x10",
        b"Infinity",
        b"NaN",
        b"1 2",
        b"{} {}",
        b"",
        b" ",
        b"  null  ",
        b"true",
        b"tru",
        b"truex",
        b"nulll",
        b"True",
        b"false",
        b"[]",
        b"{}",
        b"[[]]",
        b"[1,]",
        b"[,1]",
        b"[1 2]",
        b"{\"a\"}",
        b"{\"a\":}",
        b"{,}",
        b"{\"a\":1,}",
        b"{\"a\" : 1 , \"b\" : [ 1 , 2 ] }",
        b"{'a':1}",
        b"{a:1}",
        b"\"abc",
        br#""\u00""#,
        br#""\ud800\udc00""#,
        br#""\udc00""#,
        br#""\ud800\u0041""#,
        br#""\ud800""#,
        br#""\ud800\n""#,
        br#""\ud800\ud800""#,
        br#""\x""#,
        br#""\/""#,
        br#""\u00e9\u00E9""#,
        br#""\uD83D\uDE00""#,
        b"\"\t\"",
        b"\"\x7f\"",
        b"\"\x1f\"",
        b"\"\xc3\xa9\"",
        b"\"\xff\"",
        b"\"\xc3\"",
        b"\xef\xbb\xbf{}",
        b"\x0c{}",
        b"{}\x00",
        "\"\u{a0}\"".as_bytes(),
        "\u{a0}{}".as_bytes(),
        br#"{"a":"12345678\"9","b":"\\\\\\\\\\\\\\\\"}"#,
        br#"{"a":{"b":{"c":[{"d":1,"e":[true,false,null]}]}}}"#,
    ];
    for doc in docs {
        assert!(agree(doc), "{:?}", String::from_utf8_lossy(doc));
    }
}

/// Nesting: 127 levels are read, 128 refused, as serde_json does, for arrays and objects.
#[test]
fn nesting_stops_where_serde_json_stops() {
    for depth in [1usize, 126, 127, 128, 129, 500] {
        let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let objects = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
        for doc in [arrays, objects] {
            assert!(agree(doc.as_bytes()), "depth {depth}");
            assert_eq!(
                validate(doc.as_bytes()).is_ok(),
                depth <= 127,
                "depth {depth}"
            );
        }
    }
}

/// serde_json's private name for a number (arbitrary_precision) spelled out in a document
/// has two readings (a number to serde_json, an object to the text): refused.
#[test]
fn serde_jsons_number_name_is_refused() {
    for doc in [
        br#"{"$serde_json::private::Number":"12"}"#.as_slice(),
        br#"{"a":{"$serde_json::private::Number":"1"}}"#,
        br#"{"a":1,"$serde_json::private::Number":"1"}"#,
    ] {
        assert!(validate(doc).is_err());
        assert!(parse(doc).is_err());
    }
}

/// The members of an object: names decoded, values as their text; anything `validate`
/// refuses is refused, and a document that is not an object is refused.
#[test]
fn members_are_names_and_texts() {
    let doc = br#" { "resource\u0054ype" : "Patient" , "id":"1", "name":[{"family":"A"}] } "#;
    let members = members(doc).unwrap();
    let got: Vec<(&str, &str)> = members.iter().map(|(n, v)| (&**n, *v)).collect();
    assert_eq!(
        got,
        [
            ("resourceType", r#""Patient""#),
            ("id", r#""1""#),
            ("name", r#"[{"family":"A"}]"#)
        ]
    );
    assert_eq!(
        parse_value(got[2].1).unwrap(),
        serde_json::json!([{"family": "A"}])
    );
    for bad in [
        &br#"[1]"#[..],
        br#"{"a":1,"a":2}"#,
        br#"{"a":{"b":1,"b":2}}"#,
        br#"{"a":1} x"#,
        br#"{"a":"\ud800"}"#,
        b"",
    ] {
        assert!(super::members(bad).is_err(), "{bad:?}");
    }
}

/// The eight-bytes-at-a-time test finds the first quote, backslash or control character
/// exactly, wherever it sits among other bytes (UTF-8 continuation bytes included).
#[test]
fn the_word_test_misses_nothing() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let byte = prop_oneof![
        Just(b'"'),
        Just(b'\\'),
        0u8..0x20,
        0x20u8..=0xff,
        Just(b'a'),
        Just(0x80u8),
        Just(0xffu8),
    ];
    TestRunner::new(Config::with_cases(4000))
        .run(&prop::array::uniform8(byte), |word| {
            let first = word
                .iter()
                .position(|&b| b == b'"' || b == b'\\' || b < 0x20);
            let special = super::scan::special_bytes(u64::from_le_bytes(word));
            let found = (special != 0).then(|| (special.trailing_zeros() / 8) as usize);
            prop_assert_eq!(found, first);
            Ok(())
        })
        .unwrap();
}

/// Documents made of JSON's pieces, well-formed or not, repeated names or not: the
/// scanner and the serde oracle always give the same answer.
#[test]
fn random_documents_agree_with_the_oracle() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let piece = prop_oneof![
        Just("{"),
        Just("}"),
        Just("["),
        Just("]"),
        Just(","),
        Just(":"),
        Just(" "),
        Just("\"a\""),
        Just("\"b\""),
        Just("\"a\\u0062\""),
        Just("\"ab\""),
        Just("1"),
        Just("-0.5e3"),
        Just("01"),
        Just("true"),
        Just("null"),
        Just("\"\\ud83d\\ude00\""),
        Just("\"\\udc00\""),
        Just("\"x\\\"y\""),
        Just("\"long text without escapes\""),
        Just("\"\t\""),
        Just("\"é\""),
    ];
    TestRunner::new(Config::with_cases(5_000))
        .run(&prop::collection::vec(piece, 1..24), |pieces| {
            let doc = pieces.concat();
            prop_assert!(agree(doc.as_bytes()), "{}", doc);
            Ok(())
        })
        .unwrap();
}

/// Only containers open at once count as nesting: a document of hundreds of sibling
/// objects and arrays, each closed before the next opens, is read.
#[test]
fn siblings_are_not_nesting() {
    let objects = format!("[{}1]", r#"{"a":[{}]},"#.repeat(300));
    let arrays = format!("{{\"a\":[{}[]]}}", "[[]],".repeat(300));
    for doc in [objects, arrays] {
        assert!(validate(doc.as_bytes()).is_ok());
        assert!(agree(doc.as_bytes()));
    }
}

//! The strict reader itself: one pass over the bytes, RFC 8259 exactly as serde_json
//! reads it (UTF-8 only, paired surrogates, no control characters in strings, nesting
//! within serde_json's limit), and a repeated member name refused at any depth.
//!
//! Hand-written rather than driven through serde because most of a checked body is text
//! the gateway never looks at: skipping it here costs a few instructions per byte, where
//! serde's visitors decoded every string (a verified read spent more on that than on
//! everything else it did). Whatever this accepts, serde_json reads, with one reading;
//! the tests and the `json` fuzz target hold the two to the same answers.

use std::borrow::Cow;
use std::collections::HashSet;

use super::JsonError;

/// Containers may nest this deep and no deeper: serde_json refuses the 128th level
/// (`remaining_depth` starts at 128 and may not reach 0).
const MAX_DEPTH: u32 = 127;

/// How serde_json with `arbitrary_precision` (which this crate turns on) hands a number to
/// a visitor: a one-member object under this name. A document that spells it out would be
/// read as a number by serde_json and as an object by a reader of the text: refused.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// A read in progress: the text (checked to be UTF-8 once, up front) and a position.
pub(super) struct Scan<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
    depth: u32,
}

impl<'a> Scan<'a> {
    /// Reads one document with nothing but whitespace around it; its text.
    pub(super) fn document(bytes: &'a [u8]) -> Result<&'a str, JsonError> {
        let mut scan = Scan::new(bytes)?;
        scan.value()?;
        scan.end()?;
        Ok(scan.text)
    }

    /// Reads one document that must be an object; its members (see [`super::members`]).
    pub(super) fn members(bytes: &'a [u8]) -> Result<Vec<(Cow<'a, str>, &'a str)>, JsonError> {
        let mut scan = Scan::new(bytes)?;
        scan.whitespace();
        if scan.bytes.get(scan.at) != Some(&b'{') {
            return Err(scan.syntax("expected an object"));
        }
        let mut members = Vec::with_capacity(16);
        scan.object(|name, value| members.push((name, value)))?;
        scan.end()?;
        Ok(members)
    }

    fn new(bytes: &'a [u8]) -> Result<Scan<'a>, JsonError> {
        // Outside strings only ASCII is valid JSON, so checking the whole text at once is
        // the same as checking each string, and much faster.
        let text = std::str::from_utf8(bytes)
            .map_err(|e| JsonError::Syntax(format!("not UTF-8 at byte {}", e.valid_up_to())))?;
        Ok(Scan {
            text,
            bytes,
            at: 0,
            depth: 0,
        })
    }

    fn syntax(&self, what: &str) -> JsonError {
        JsonError::Syntax(format!("{what} at byte {}", self.at))
    }

    fn end(&mut self) -> Result<(), JsonError> {
        self.whitespace();
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(self.syntax("trailing characters"))
        }
    }

    fn whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// Takes `byte` if it is next (after whitespace).
    fn eat(&mut self, byte: u8) -> bool {
        self.whitespace();
        if self.bytes.get(self.at) == Some(&byte) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<(), JsonError> {
        self.whitespace();
        match self.bytes.get(self.at) {
            Some(b'{') => self.object(|_, _| ()),
            Some(b'[') => self.array(),
            Some(b'"') => {
                self.at += 1;
                self.string().map(drop)
            }
            Some(b't') => self.literal(b"true"),
            Some(b'f') => self.literal(b"false"),
            Some(b'n') => self.literal(b"null"),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.syntax("expected a value")),
            None => Err(self.syntax("end of input where a value was expected")),
        }
    }

    fn enter(&mut self) -> Result<(), JsonError> {
        if self.depth == MAX_DEPTH {
            return Err(self.syntax("nested too deeply"));
        }
        self.depth += 1;
        self.at += 1;
        Ok(())
    }

    /// An object, at its `{`; `member` is given each name and the text of its value.
    fn object(&mut self, mut member: impl FnMut(Cow<'a, str>, &'a str)) -> Result<(), JsonError> {
        self.enter()?;
        let mut names = Names::default();
        if !self.eat(b'}') {
            loop {
                if !self.eat(b'"') {
                    return Err(self.syntax("expected a member name"));
                }
                let name = self.name()?;
                if name == NUMBER_TOKEN {
                    return Err(self.syntax("serde_json's private number name"));
                }
                names.insert(name.clone())?;
                if !self.eat(b':') {
                    return Err(self.syntax("expected ':'"));
                }
                self.whitespace();
                let start = self.at;
                self.value()?;
                let value = self.text.get(start..self.at).unwrap_or_default();
                member(name, value);
                if self.closes(b'}')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Ok(())
    }

    fn array(&mut self) -> Result<(), JsonError> {
        self.enter()?;
        if !self.eat(b']') {
            loop {
                self.value()?;
                if self.closes(b']')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Ok(())
    }

    /// After a member or an element: `true` at the container's `close`, `false` past a
    /// comma (another must follow), an error otherwise.
    fn closes(&mut self, close: u8) -> Result<bool, JsonError> {
        if self.eat(close) {
            Ok(true)
        } else if self.eat(b',') {
            Ok(false)
        } else {
            Err(self.syntax("expected ',' or the end of the object or array"))
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<(), JsonError> {
        if self.bytes.get(self.at..self.at + word.len()) == Some(word) {
            self.at += word.len();
            Ok(())
        } else {
            Err(self.syntax("expected true, false or null"))
        }
    }

    /// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`, of any length: with
    /// `arbitrary_precision` serde_json keeps a number's text and never overflows.
    fn number(&mut self) -> Result<(), JsonError> {
        if self.bytes.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        match self.bytes.get(self.at) {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.syntax("a malformed number")),
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.at) {
                self.at += 1;
            }
            self.some_digits()?;
        }
        // A digit straight after a leading zero (`01`) is not a delimiter: the caller
        // refuses it as it refuses any other byte out of place.
        Ok(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn some_digits(&mut self) -> Result<(), JsonError> {
        let start = self.at;
        self.digits();
        if self.at == start {
            return Err(self.syntax("a malformed number"));
        }
        Ok(())
    }

    /// A member name, after its opening quote: borrowed from the text unless it has
    /// escapes, which are decoded (by serde_json, the reading that counts).
    fn name(&mut self) -> Result<Cow<'a, str>, JsonError> {
        let start = self.at;
        let escaped = self.string()?;
        let raw = self.text.get(start..self.at - 1).unwrap_or_default();
        if !escaped {
            return Ok(Cow::Borrowed(raw));
        }
        let quoted = self.text.get(start - 1..self.at).unwrap_or_default();
        serde_json::from_str::<String>(quoted)
            .map(Cow::Owned)
            .map_err(|e| JsonError::Syntax(e.to_string()))
    }

    /// A string, after its opening quote, up to and past its closing one; whether it had
    /// escapes.
    fn string(&mut self) -> Result<bool, JsonError> {
        let mut escaped = false;
        loop {
            // Eight bytes at a time to the next quote, backslash or control character.
            while let Some(chunk) = self.bytes.get(self.at..self.at + 8) {
                let Ok(word) = <[u8; 8]>::try_from(chunk) else {
                    break;
                };
                let special = special_bytes(u64::from_le_bytes(word));
                if special != 0 {
                    self.at += (special.trailing_zeros() / 8) as usize;
                    break;
                }
                self.at += 8;
            }
            match self.bytes.get(self.at) {
                Some(b'"') => {
                    self.at += 1;
                    return Ok(escaped);
                }
                Some(b'\\') => {
                    self.at += 1;
                    escaped = true;
                    self.escape()?;
                }
                Some(0..0x20) => return Err(self.syntax("a control character in a string")),
                Some(_) => self.at += 1,
                None => return Err(self.syntax("an unterminated string")),
            }
        }
    }

    /// An escape, after its backslash. Surrogates must come in pairs (high, then low),
    /// as serde_json requires of a string.
    fn escape(&mut self) -> Result<(), JsonError> {
        match self.bytes.get(self.at) {
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                self.at += 1;
                Ok(())
            }
            Some(b'u') => {
                self.at += 1;
                match self.hex4()? {
                    0xDC00..=0xDFFF => Err(self.syntax("a lone surrogate")),
                    0xD800..=0xDBFF => {
                        if self.bytes.get(self.at..self.at + 2) != Some(b"\\u") {
                            return Err(self.syntax("a lone surrogate"));
                        }
                        self.at += 2;
                        match self.hex4()? {
                            0xDC00..=0xDFFF => Ok(()),
                            _ => Err(self.syntax("a lone surrogate")),
                        }
                    }
                    _ => Ok(()),
                }
            }
            _ => Err(self.syntax("an invalid escape")),
        }
    }

    fn hex4(&mut self) -> Result<u16, JsonError> {
        let mut n = 0u16;
        for _ in 0..4 {
            let digit = match self.bytes.get(self.at) {
                Some(&c @ b'0'..=b'9') => c - b'0',
                Some(&c @ b'a'..=b'f') => c - b'a' + 10,
                Some(&c @ b'A'..=b'F') => c - b'A' + 10,
                _ => return Err(self.syntax("an invalid \\u escape")),
            };
            n = n << 4 | u16::from(digit);
            self.at += 1;
        }
        Ok(n)
    }
}

/// The bytes of `word` (little-endian) that are a quote, a backslash or below 0x20, as
/// their high bits: the classic zero-byte test, exact for the lowest such byte (bytes
/// above it may be flagged falsely), so `trailing_zeros() / 8` is the first one's index
/// and 0 means there is none.
pub(super) fn special_bytes(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let quote = zero_byte(word ^ (ONES * u64::from(b'"')));
    let backslash = zero_byte(word ^ (ONES * u64::from(b'\\')));
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    quote | backslash | control
}

/// The member names of one object seen so far: the first dozen in place (no allocation
/// for the objects a FHIR resource is made of), searched in order; a hash set past that,
/// so a hostile object of many names costs linear time, not quadratic.
#[derive(Default)]
struct Names<'a> {
    few: [Cow<'a, str>; FEW],
    len: usize,
    many: Option<HashSet<Cow<'a, str>>>,
}

const FEW: usize = 12;

impl<'a> Names<'a> {
    /// Records `name`; an error if it was seen before.
    fn insert(&mut self, name: Cow<'a, str>) -> Result<(), JsonError> {
        if let Some(many) = &mut self.many {
            if many.contains(&name) {
                return Err(JsonError::Duplicate(name.into_owned()));
            }
            many.insert(name);
            return Ok(());
        }
        if self.few[..self.len].contains(&name) {
            return Err(JsonError::Duplicate(name.into_owned()));
        }
        if self.len < FEW {
            self.few[self.len] = name;
            self.len += 1;
        } else {
            let mut many: HashSet<Cow<'a, str>> = self.few.iter_mut().map(std::mem::take).collect();
            many.insert(name);
            self.many = Some(many);
        }
        Ok(())
    }
}

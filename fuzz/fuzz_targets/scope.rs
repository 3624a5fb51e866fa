//! The scope parser on arbitrary strings: never panics; every scope either parses or is
//! set aside with a reason.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartgate::smart::scope::{Grants, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse(s);
        let g = Grants::parse(s.split_whitespace());
        assert!(g.scopes.len() + g.ignored.len() <= s.split_whitespace().count());
        let _ = g.explain();
    }
});

//! Reading an upstream's answer (src/proxy/h1.rs) on arbitrary bytes: the head parser and
//! the chunked decoder never panic; a head that frames its body by chunks never passes a
//! `Content-Length` on; an answer read until close never leaves its connection for reuse;
//! and the decoder gives the same data, or fails alike, however its input is cut.
#![no_main]

use bytes::Bytes;
use http::Method;
use libfuzzer_sys::fuzz_target;
use smartgate::proxy::h1::{ChunkedDecoder, Framing, Parsed, parse_head};

/// Decodes `input` fed in two pieces cut at `cut`: the data, and whether it failed or ended.
fn decode(input: &Bytes, cut: usize) -> (Vec<u8>, Result<bool, ()>) {
    let mut decoder = ChunkedDecoder::default();
    let mut out = Vec::new();
    let cut = cut.min(input.len());
    for mut piece in [input.slice(..cut), input.slice(cut..)] {
        loop {
            match decoder.decode(&mut piece) {
                Ok(Some(data)) => out.extend_from_slice(&data),
                Ok(None) => break,
                Err(_) => return (out, Err(())),
            }
        }
        if decoder.is_done() {
            break;
        }
    }
    (out, Ok(decoder.is_done()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let method = if first & 1 == 1 { Method::HEAD } else { Method::GET };
    let input = Bytes::copy_from_slice(rest);
    match parse_head(&input, &method) {
        Ok(Parsed::Final(head, len)) => {
            assert!(len <= input.len());
            match head.framing {
                Framing::Chunked => {
                    assert!(!head.headers.contains_key(http::header::CONTENT_LENGTH));
                    let body = input.slice(len..);
                    let (data, _) = decode(&body, usize::from(first) * 3);
                    assert!(data.len() <= body.len());
                }
                Framing::UntilClose => assert!(!head.keep_alive),
                Framing::Length(_) => {}
            }
            if method == Method::HEAD {
                assert_eq!(head.framing, Framing::Length(0));
            }
        }
        Ok(Parsed::Interim(len)) => assert!(len > 0 && len <= input.len()),
        Ok(Parsed::Partial) | Err(_) => {}
    }
    let whole = decode(&input, input.len());
    let cut = decode(&input, usize::from(first));
    assert_eq!(whole.1.is_err(), cut.1.is_err());
    if whole.1.is_ok() {
        assert_eq!(whole, cut);
    }
});

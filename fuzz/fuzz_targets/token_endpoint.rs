//! The embedded authorization server's parsers on arbitrary strings: the claimed client
//! id of an assertion, in-process verification of its own tokens, scope intersection.
//! Never panics; nothing unsigned verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smartgate::authz::clients::Clients;
use smartgate::authz::grant::grant;
use smartgate::auth::issuer::Issuer;
use std::sync::OnceLock;

fn issuer() -> &'static Issuer {
    static I: OnceLock<Issuer> = OnceLock::new();
    I.get_or_init(|| {
        let (pem, _) = smartgate::keygen::generate("ES256").unwrap();
        Issuer::from_pem(&pem, "ES256", "http://gateway.test/r4", std::time::Duration::from_secs(300)).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let _ = Clients::claimed_id(s);
    let _ = issuer().claims_to_be_ours(s);
    assert!(issuer().verify(s, 0).is_err(), "an unsigned string verified");
    let (requested, registered) = s.split_once('\n').unwrap_or((s, "system/*.rs"));
    let granted = grant(requested, registered);
    for g in granted.split_whitespace() {
        assert!(requested.split_whitespace().any(|r| r == g) || registered.split_whitespace().any(|r| r == g));
    }
});

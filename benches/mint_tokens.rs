//! Mints access tokens for the cold-token load run (`benches/load.sh`): every line of the
//! output file a JWT never used before (a fresh `jti`), signed with a PEM key the script
//! generated, so that smartgate and HAProxy's `jwt_verify` check the very same tokens.
//!
//!   mint_tokens ALG KEY.pem KID ISSUER AUDIENCE COUNT OUT
//!
//! KEY.pem is PKCS#8 (`openssl genpkey`). Prints the key's public JWK (with `kid` and
//! `alg`) on stdout. Signs on every CPU.

use std::io::Write;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

enum Signer {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

impl Signer {
    fn new(alg: Algorithm, der: &[u8]) -> Signer {
        match alg {
            Algorithm::RS256 => {
                Signer::Rsa(RsaKeyPair::from_pkcs8(der).expect("an RSA PKCS#8 key"))
            }
            Algorithm::ES256 => Signer::Ec(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
                    .expect("a P-256 PKCS#8 key"),
            ),
            Algorithm::ES384 => Signer::Ec(
                EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P384_SHA384_FIXED_SIGNING, der)
                    .expect("a P-384 PKCS#8 key"),
            ),
            other => panic!("{other:?}: RS256, ES256 or ES384"),
        }
    }

    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match self {
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&signature::RSA_PKCS1_SHA256, &rng, msg, &mut sig)
                    .unwrap();
                sig
            }
            Signer::Ec(k) => k.sign(&rng, msg).unwrap().as_ref().to_vec(),
        }
    }
}

/// The DER inside a PEM block.
fn pem_der(pem: &[u8]) -> Vec<u8> {
    let text = std::str::from_utf8(pem).expect("a PEM file");
    let body: String = text.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body).expect("base64 in the PEM")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes `--bench`: this is a tool, not a benchmark, so it does nothing.
    if args.len() != 7 {
        eprintln!("usage: mint_tokens ALG KEY.pem KID ISSUER AUDIENCE COUNT OUT");
        return;
    }
    let alg: Algorithm = args[0].parse().expect("a JWS algorithm");
    let pem = std::fs::read(&args[1]).expect("the key file");
    let key = match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => EncodingKey::from_rsa_pem(&pem),
        _ => EncodingKey::from_ec_pem(&pem),
    }
    .expect("a private key for the algorithm");
    let (kid, iss, aud) = (&args[2], &args[3], &args[4]);
    let count: usize = args[5].parse().expect("a count");
    let mut jwk = Jwk::from_encoding_key(&key, alg).expect("a public JWK");
    jwk.common.key_id = Some(kid.clone());
    println!("{}", serde_json::to_string(&jwk).unwrap());

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // Signed with aws-lc-rs directly, the key parsed once (jsonwebtoken parses it per token).
    let der = pem_der(&pem);
    let signer = Signer::new(alg, &der);
    let header =
        URL_SAFE_NO_PAD.encode(json!({"alg": args[0], "typ": "at+jwt", "kid": kid}).to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunks: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (signer, header) = (&signer, &header);
                s.spawn(move || {
                    let mut out = String::new();
                    for i in (t..count).step_by(threads) {
                        let claims = json!({
                            "iss": iss, "aud": aud, "sub": format!("user-{}", i % 1000),
                            "client_id": "bench-app", "scope": "launch/patient patient/*.rs",
                            "patient": "example", "jti": format!("cold-{now}-{i}"),
                            "iat": now, "exp": now + 3600,
                        });
                        let signed =
                            format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
                        let sig = signer.sign(signed.as_bytes());
                        out.push_str(&signed);
                        out.push('.');
                        out.push_str(&URL_SAFE_NO_PAD.encode(sig));
                        out.push('\n');
                    }
                    out
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut file = std::io::BufWriter::new(std::fs::File::create(&args[6]).unwrap());
    for c in chunks {
        file.write_all(c.as_bytes()).unwrap();
    }
}

//! TLS for the public listener: PEM files loaded at start and again whenever they change,
//! so certificate rotation (cert-manager, ACME) needs no restart.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// The current TLS configuration; each new connection uses the latest.
pub struct TlsState {
    current: ArcSwap<ServerConfig>,
    /// The served leaf certificate's notAfter, Unix seconds (0 if unreadable).
    not_after: AtomicI64,
}

impl TlsState {
    /// Loads the certificate and key named in `[server.tls]`.
    pub fn load(cfg: &TlsConfig) -> Result<TlsState, String> {
        let (config, not_after) = server_config_and_expiry(cfg)?;
        Ok(TlsState {
            current: ArcSwap::from_pointee(config),
            not_after: AtomicI64::new(not_after),
        })
    }

    /// Re-reads the files; on error the current certificate stays.
    pub fn reload(&self, cfg: &TlsConfig) -> Result<(), String> {
        let (config, not_after) = server_config_and_expiry(cfg)?;
        self.current.store(Arc::new(config));
        self.not_after.store(not_after, Ordering::Relaxed);
        Ok(())
    }

    /// The served leaf certificate's notAfter as Unix seconds (0 if it could not be read).
    pub fn not_after(&self) -> f64 {
        self.not_after.load(Ordering::Relaxed) as f64
    }

    /// An acceptor for one new connection.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }
}

/// Builds a rustls server configuration offering h2 and HTTP/1.1.
pub fn server_config(cfg: &TlsConfig) -> Result<ServerConfig, String> {
    server_config_and_expiry(cfg).map(|(config, _)| config)
}

/// The server configuration and the leaf certificate's notAfter (0 if unreadable).
fn server_config_and_expiry(cfg: &TlsConfig) -> Result<(ServerConfig, i64), String> {
    let certs = read_certs(&cfg.cert)?;
    let not_after = certs.first().and_then(|c| not_after(c)).unwrap_or(0);
    let key = PrivateKeyDer::from_pem_file(&cfg.key)
        .map_err(|e| format!("server.tls.key: {}: {e}", cfg.key.display()))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("server.tls: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("server.tls: certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((config, not_after))
}

/// One DER element at the start of `der`: its tag, its content and what follows.
fn tlv(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The notAfter of an X.509 certificate (RFC 5280 §4.1: Certificate → tbsCertificate →
/// validity), as Unix seconds.
pub fn not_after(cert: &[u8]) -> Option<i64> {
    const SEQUENCE: u8 = 0x30;
    let (SEQUENCE, cert, _) = tlv(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = tlv(cert)? else {
        return None;
    };
    // [0] version is optional; then serialNumber, signature, issuer, validity.
    let (tag, _, after_first) = tlv(tbs)?;
    let mut rest = if tag == 0xa0 { after_first } else { tbs };
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    let (SEQUENCE, validity, _) = tlv(rest)? else {
        return None;
    };
    let (_, _, after_not_before) = tlv(validity)?;
    let (tag, time, _) = tlv(after_not_before)?;
    asn1_time(tag, time)
}

/// UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or GeneralizedTime (`YYYYMMDDHHMMSSZ`, 0x18), in
/// the forms RFC 5280 §4.1.2.5 allows, as Unix seconds.
fn asn1_time(tag: u8, text: &[u8]) -> Option<i64> {
    let digits = text.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let num = |s: &[u8]| s.iter().fold(0i64, |acc, d| acc * 10 + i64::from(d - b'0'));
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy = num(&digits[..2]);
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &digits[2..])
        }
        (0x18, 14) => (num(&digits[..4]), &digits[4..]),
        _ => return None,
    };
    let [month, day, hour, minute, second] = [0, 2, 4, 6, 8].map(|i| num(&rest[i..i + 2]));
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Days from civil (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + minute * 60 + second)
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("server.tls.cert: {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("server.tls.cert: {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "server.tls.cert: {}: no PEM certificate found",
            path.display()
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The expiry read from certificates rcgen made with known validity, in both time
    /// encodings (UTCTime before 2050, GeneralizedTime from 2050 on).
    #[test]
    fn reads_not_after() {
        for (year, month, day, unix) in [
            (2031, 3, 4, 1_930_348_800i64),
            (2049, 12, 31, 2_524_521_600),
            (2050, 1, 1, 2_524_608_000),
            (1999, 2, 28, 920_160_000),
        ] {
            let mut params = rcgen::CertificateParams::new(vec!["a.test".into()]).unwrap();
            params.not_after = rcgen::date_time_ymd(year, month, day);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.self_signed(&key).unwrap();
            assert_eq!(not_after(cert.der()), Some(unix), "{year}-{month}-{day}");
        }
    }

    #[test]
    fn garbage_is_none_not_a_panic() {
        for bad in [
            &b""[..],
            b"\x30",
            b"\x30\x84\xff\xff\xff\xff",
            b"\x30\x03\x30\x01",
            b"\x30\x02\x30\x00",
        ] {
            assert_eq!(not_after(bad), None);
        }
        assert_eq!(asn1_time(0x17, b"991301000000Z"), None);
        assert_eq!(asn1_time(0x17, b"9912310000Z"), None);
        assert_eq!(asn1_time(0x18, b"20491231000000"), None);
        assert_eq!(asn1_time(0x17, b"491231000000Z"), Some(2_524_521_600));
    }
}

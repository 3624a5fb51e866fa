//! Client assertion ids (`jti`) already used (RFC 7523 §3: the server may refuse a JWT
//! it has seen; SMART Backend Services: it must).
//!
//! A `jti` is remembered until its assertion expires — whatever happens meanwhile: it is
//! never evicted early to make room (a full client's next assertion is refused instead,
//! `temporarily_unavailable`), one client's assertions never take room from another's
//! (a bound per client), and the guard outlives configuration reloads (each compiled
//! snapshot hands it to the next). Only registered clients whose assertion signature
//! verified reach it, so its memory is bounded by the configuration: at most
//! `clients × per_client` ids, about 100 bytes each plus the id's length.
//!
//! Several replicas each keep their own: an assertion can be replayed once per replica
//! until a shared store (App Launch, issue 18) takes this over.

use std::collections::HashMap;
use std::sync::Mutex;

/// Why an assertion id was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Seen before, and its assertion has not expired.
    Replay,
    /// The client has as many live ids as it may have: refused rather than forgetting
    /// one before its time.
    Full,
}

/// The ids seen, per client, each with the time (seconds since the epoch) after which
/// its assertion can no longer be used anyway.
#[derive(Default)]
pub struct ReplayGuard {
    clients: Mutex<HashMap<String, HashMap<String, u64>>>,
}

impl ReplayGuard {
    /// Records `jti` for `client` until `forget_at`, or says why not. Atomic: of two
    /// concurrent uses of one id, one passes.
    pub fn remember(
        &self,
        client: &str,
        jti: &str,
        forget_at: u64,
        now: u64,
        per_client: usize,
    ) -> Result<(), Refusal> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let seen = match clients.get_mut(client) {
            Some(seen) => seen,
            None => clients.entry(client.to_owned()).or_default(),
        };
        if let Some(&until) = seen.get(jti)
            && until >= now
        {
            return Err(Refusal::Replay);
        }
        if seen.len() >= per_client {
            seen.retain(|_, until| *until >= now);
            if seen.len() >= per_client {
                return Err(Refusal::Full);
            }
        }
        seen.insert(jti.to_owned(), forget_at);
        Ok(())
    }

    /// How many ids are remembered, over all clients.
    pub fn len(&self) -> usize {
        let clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients.values().map(HashMap::len).sum()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An id is refused until its assertion expires, then may be seen again.
    #[test]
    fn remembered_until_expiry() {
        let g = ReplayGuard::default();
        assert_eq!(g.remember("a", "j1", 100, 10, 10), Ok(()));
        assert_eq!(g.remember("a", "j1", 100, 50, 10), Err(Refusal::Replay));
        assert_eq!(g.remember("a", "j1", 100, 100, 10), Err(Refusal::Replay));
        // Another client's id of the same text is its own.
        assert_eq!(g.remember("b", "j1", 100, 50, 10), Ok(()));
        assert_eq!(g.remember("a", "j1", 300, 101, 10), Ok(()));
    }

    /// A full client is refused, never made room for by forgetting a live id; another
    /// client is not affected; expired ids make room.
    #[test]
    fn full_refuses_instead_of_evicting() {
        let g = ReplayGuard::default();
        for i in 0..3 {
            assert_eq!(g.remember("victim", &format!("v{i}"), 100, 0, 3), Ok(()));
        }
        assert_eq!(g.remember("victim", "v3", 100, 1, 3), Err(Refusal::Full));
        // Floods by another client never push the victim's ids out.
        for i in 0..1000 {
            let _ = g.remember("attacker", &format!("x{i}"), 100, 1, 3);
        }
        for i in 0..3 {
            assert_eq!(
                g.remember("victim", &format!("v{i}"), 100, 2, 3),
                Err(Refusal::Replay)
            );
        }
        assert_eq!(g.len(), 6);
        // Once they expire they make room.
        assert_eq!(g.remember("victim", "v3", 500, 101, 3), Ok(()));
        assert_eq!(g.remember("victim", "v0", 500, 101, 3), Ok(()));
    }
}

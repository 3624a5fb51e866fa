//! State the embedded authorization server must share between replicas: authorization
//! codes, refresh-token families, client assertion ids, pending sign-ins. One small
//! interface, two stores:
//!
//! - **memory** (the default): one process, nothing to install; bounded, and full means
//!   refused (fail closed), never an entry forgotten early;
//! - **Valkey/Redis** (`[authorization_server.store] url = "redis://host:6379"`): every
//!   replica sees the same entries; single use is atomic on the server (`SET NX PX`,
//!   `GETDEL`), so a code or an assertion id used on one replica is refused on another.
//!
//! The Redis client is a small RESP2 client of our own (five commands over one pooled
//! connection per caller), not a general-purpose library: what it must do is narrow, and
//! a failure of the store is a refusal (503), never a fallback to memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The store cannot answer (unreachable, timed out, full): what depends on it is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state store: {0}")]
pub struct StoreError(pub String);

/// Where shared state lives.
pub enum Store {
    /// In this process.
    Memory(MemoryStore),
    /// On a Valkey/Redis server.
    Redis(RedisStore),
}

impl Store {
    /// The store `config` names: a server when `url` is set (commands run on the current
    /// runtime, the control one), else memory.
    pub fn from_config(config: &crate::config::StoreConfig) -> Result<Store, String> {
        match &config.url {
            Some(url) => RedisStore::new(url, &config.key_prefix, config.timeout.0)
                .map(Store::Redis)
                .map_err(|e| format!("authorization_server.store.url: {e}")),
            None => Ok(Store::Memory(MemoryStore::new(config.max_entries))),
        }
    }

    /// Puts `key` only if it is absent; `true` if it was put. The atomic single use of an
    /// assertion id or a refresh token's "used" mark.
    pub async fn insert_new(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => m.insert_new(key, value, ttl),
            Store::Redis(r) => r.insert_new(key, value, ttl).await,
        }
    }

    /// Takes `key` away and returns it: the atomic single use of an authorization code or
    /// a refresh token (a second take finds nothing).
    pub async fn take(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.take(key)),
            Store::Redis(r) => r.take(key).await,
        }
    }

    /// The value of `key`, if present.
    pub async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.get(key)),
            Store::Redis(r) => r.get(key).await,
        }
    }

    /// Puts `key`, replacing any value.
    pub async fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => m.put(key, value, ttl),
            Store::Redis(r) => r.put(key, value, ttl).await,
        }
    }

    /// Removes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.take(key);
                Ok(())
            }
            Store::Redis(r) => r.take(key).await.map(drop),
        }
    }

    /// Adds one to the counter `key`, which starts at 0 and lasts `ttl` from its first
    /// count: the count so far (a fixed-window rate limit shared by replicas).
    pub async fn count(&self, key: &str, ttl: Duration) -> Result<u64, StoreError> {
        match self {
            Store::Memory(m) => m.count(key, ttl),
            Store::Redis(r) => r.count(key, ttl).await,
        }
    }

    /// Entries held in memory (0 for Redis: the server keeps them).
    pub fn len(&self) -> usize {
        match self {
            Store::Memory(m) => m.len(),
            Store::Redis(_) => 0,
        }
    }

    /// Whether no entry is held in memory.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Entries in this process, each until its expiry, at most `max` of them.
pub struct MemoryStore {
    entries: Mutex<HashMap<String, (String, Instant)>>,
    max: usize,
}

impl MemoryStore {
    /// A store of at most `max` live entries.
    pub fn new(max: usize) -> MemoryStore {
        MemoryStore {
            entries: Mutex::new(HashMap::new()),
            max,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Room for one more entry: expired ones are dropped first; a store full of live
    /// entries refuses rather than forgets one early.
    fn make_room(
        map: &mut HashMap<String, (String, Instant)>,
        max: usize,
    ) -> Result<(), StoreError> {
        if map.len() < max {
            return Ok(());
        }
        let now = Instant::now();
        map.retain(|_, (_, until)| *until > now);
        if map.len() < max {
            Ok(())
        } else {
            Err(StoreError(format!(
                "memory store full ({max} live entries)"
            )))
        }
    }

    fn insert_new(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut map = self.lock();
        let now = Instant::now();
        if map.get(key).is_some_and(|(_, until)| *until > now) {
            return Ok(false);
        }
        Self::make_room(&mut map, self.max)?;
        map.insert(key.to_owned(), (value.to_owned(), now + ttl));
        Ok(true)
    }

    fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut map = self.lock();
        if !map.contains_key(key) {
            Self::make_room(&mut map, self.max)?;
        }
        map.insert(key.to_owned(), (value.to_owned(), Instant::now() + ttl));
        Ok(())
    }

    fn count(&self, key: &str, ttl: Duration) -> Result<u64, StoreError> {
        let mut map = self.lock();
        let now = Instant::now();
        let live = map
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(v, u)| (v.parse::<u64>().unwrap_or(0), *u));
        let (n, until) = match live {
            Some((n, until)) => (n + 1, until),
            None => {
                Self::make_room(&mut map, self.max)?;
                (1, now + ttl)
            }
        };
        map.insert(key.to_owned(), (n.to_string(), until));
        Ok(n)
    }

    fn take(&self, key: &str) -> Option<String> {
        let (value, until) = self.lock().remove(key)?;
        (until > Instant::now()).then_some(value)
    }

    fn get(&self, key: &str) -> Option<String> {
        let map = self.lock();
        let (value, until) = map.get(key)?;
        (*until > Instant::now()).then(|| value.clone())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A Valkey/Redis server, spoken to in RESP2. Connections are kept for reuse; each command
/// has `timeout` to complete, or the store counts as down for it.
pub struct RedisStore {
    addr: String,
    prefix: String,
    timeout: Duration,
    idle: std::sync::Arc<Mutex<Vec<BufReader<TcpStream>>>>,
    /// The runtime connections live on: requests run on the workers' own event loops,
    /// and a socket belongs to the loop that opened it.
    control: Option<tokio::runtime::Handle>,
}

/// A RESP2 reply.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Error(String),
}

impl RedisStore {
    /// A store at `url` (`redis://host:port`, optionally `/db` is not supported); keys are
    /// prefixed with `prefix`.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<RedisStore, String> {
        let rest = url
            .strip_prefix("redis://")
            .ok_or_else(|| format!("{url:?} is not a redis:// URL"))?;
        let addr = rest.trim_end_matches('/');
        if addr.is_empty() || addr.contains(['/', '@', '?']) {
            return Err(format!(
                "{url:?}: only redis://host:port is supported (no credentials, database or options)"
            ));
        }
        let addr = if addr.contains(':') {
            addr.to_owned()
        } else {
            format!("{addr}:6379")
        };
        Ok(RedisStore {
            addr,
            prefix: prefix.to_owned(),
            timeout,
            idle: Default::default(),
            control: tokio::runtime::Handle::try_current().ok(),
        })
    }

    async fn insert_new(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, StoreError> {
        match self.set(key, value, ttl, true).await? {
            Reply::Simple(ok) if ok == "OK" => Ok(true),
            Reply::Bulk(None) => Ok(false),
            other => Err(unexpected(other)),
        }
    }

    async fn put(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        match self.set(key, value, ttl, false).await? {
            Reply::Simple(ok) if ok == "OK" => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// `SET key value [NX] PX ttl`.
    async fn set(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
        nx: bool,
    ) -> Result<Reply, StoreError> {
        let ms = ttl.as_millis().max(1).to_string();
        let key = self.key(key);
        let mut args: Vec<&[u8]> = vec![b"SET", key.as_bytes(), value.as_bytes()];
        if nx {
            args.push(b"NX");
        }
        args.extend([&b"PX"[..], ms.as_bytes()]);
        self.command(&args).await
    }

    async fn take(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = self.key(key);
        bulk(self.command(&[b"GETDEL", key.as_bytes()]).await?)
    }

    /// `SET key 0 NX PX ttl`, then `INCR key` (which keeps the expiry).
    async fn count(&self, key: &str, ttl: Duration) -> Result<u64, StoreError> {
        match self.set(key, "0", ttl, true).await? {
            Reply::Simple(_) | Reply::Bulk(None) => {}
            other => return Err(unexpected(other)),
        }
        let key = self.key(key);
        match self.command(&[b"INCR", key.as_bytes()]).await? {
            Reply::Integer(n) => u64::try_from(n).map_err(|_| unexpected(Reply::Integer(n))),
            other => Err(unexpected(other)),
        }
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = self.key(key);
        bulk(self.command(&[b"GET", key.as_bytes()]).await?)
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Sends one command on an idle connection (or a new one) and reads its reply, on the
    /// control runtime; the connection goes back for reuse only after a whole exchange.
    async fn command(&self, args: &[&[u8]]) -> Result<Reply, StoreError> {
        let request = encode(args);
        let (addr, timeout, idle) = (self.addr.clone(), self.timeout, self.idle.clone());
        let exchange = async move {
            let pooled = idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .pop();
            let io = |e: std::io::Error| StoreError(format!("{addr}: {e}"));
            let talk = async {
                let mut conn = match pooled {
                    Some(c) => c,
                    None => BufReader::new(TcpStream::connect(&addr).await.map_err(io)?),
                };
                conn.get_mut().write_all(&request).await.map_err(io)?;
                let reply = read_reply(&mut conn).await?;
                Ok::<_, StoreError>((conn, reply))
            };
            let (conn, reply) = tokio::time::timeout(timeout, talk)
                .await
                .map_err(|_| StoreError(format!("{addr}: no answer within {timeout:?}")))??;
            let mut idle = idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if idle.len() < 16 {
                idle.push(conn);
            }
            Ok(reply)
        };
        let reply = match &self.control {
            Some(handle) => handle
                .spawn(exchange)
                .await
                .map_err(|e| StoreError(e.to_string()))??,
            None => exchange.await?,
        };
        match reply {
            Reply::Error(e) => Err(StoreError(e)),
            reply => Ok(reply),
        }
    }
}

fn unexpected(reply: Reply) -> StoreError {
    StoreError(format!("unexpected reply {reply:?}"))
}

fn bulk(reply: Reply) -> Result<Option<String>, StoreError> {
    match reply {
        Reply::Bulk(None) => Ok(None),
        Reply::Bulk(Some(bytes)) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| StoreError("a value is not UTF-8".into())),
        other => Err(unexpected(other)),
    }
}

/// A command as a RESP array of bulk strings.
fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Largest bulk reply read (values here are small JSON documents).
const MAX_BULK: usize = 1 << 20;

async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<Reply, StoreError> {
    let broken = |what: &str| StoreError(format!("malformed reply: {what}"));
    let mut line = Vec::new();
    let n = r
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| StoreError(e.to_string()))?;
    if n < 3 || !line.ends_with(b"\r\n") {
        return Err(broken("connection closed or line unterminated"));
    }
    let body = std::str::from_utf8(&line[1..line.len() - 2]).map_err(|_| broken("not UTF-8"))?;
    match line[0] {
        b'+' => Ok(Reply::Simple(body.to_owned())),
        b'-' => Ok(Reply::Error(body.to_owned())),
        b':' => body
            .parse()
            .map(Reply::Integer)
            .map_err(|_| broken("integer")),
        b'$' => {
            let len: i64 = body.parse().map_err(|_| broken("bulk length"))?;
            if len < 0 {
                return Ok(Reply::Bulk(None));
            }
            let len = usize::try_from(len).map_err(|_| broken("bulk length"))?;
            if len > MAX_BULK {
                return Err(broken("bulk too large"));
            }
            let mut data = vec![0u8; len + 2];
            tokio::io::AsyncReadExt::read_exact(r, &mut data)
                .await
                .map_err(|e| StoreError(e.to_string()))?;
            if !data.ends_with(b"\r\n") {
                return Err(broken("bulk unterminated"));
            }
            data.truncate(len);
            Ok(Reply::Bulk(Some(data)))
        }
        _ => Err(broken("unknown type")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_resp_arrays() {
        assert_eq!(
            encode(&[b"SET", b"k", b"v\r\n"]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\r\n\r\n".to_vec()
        );
    }

    #[tokio::test]
    async fn replies_are_read_strictly() {
        let read = |bytes: &'static [u8]| async move { read_reply(&mut &bytes[..]).await };
        assert_eq!(read(b"+OK\r\n").await, Ok(Reply::Simple("OK".into())));
        assert_eq!(read(b"$-1\r\n").await, Ok(Reply::Bulk(None)));
        assert_eq!(
            read(b"$3\r\nabc\r\n").await,
            Ok(Reply::Bulk(Some(b"abc".to_vec())))
        );
        assert_eq!(read(b":7\r\n").await, Ok(Reply::Integer(7)));
        assert_eq!(read(b"-ERR x\r\n").await, Ok(Reply::Error("ERR x".into())));
        for bad in [
            &b""[..],
            b"+OK\n",
            b"$5\r\nabc\r\n",
            b"$3\r\nabcXY",
            b"$99999999\r\n",
            b"*1\r\n",
            b"$x\r\n",
        ] {
            assert!(
                read(bad).await.is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn memory_single_use_and_bounds() {
        let m = Store::Memory(MemoryStore::new(2));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let t = Duration::from_secs(60);
            assert!(m.insert_new("a", "1", t).await.unwrap());
            assert!(!m.insert_new("a", "2", t).await.unwrap());
            assert_eq!(m.get("a").await.unwrap().as_deref(), Some("1"));
            assert_eq!(m.take("a").await.unwrap().as_deref(), Some("1"));
            assert_eq!(m.take("a").await.unwrap(), None);
            m.put("b", "2", t).await.unwrap();
            m.put("c", "3", t).await.unwrap();
            // Full of live entries: refused, nothing forgotten.
            assert!(m.insert_new("d", "4", t).await.is_err());
            assert_eq!(m.get("b").await.unwrap().as_deref(), Some("2"));
            // Expired entries make room.
            m.put("b", "2", Duration::from_millis(1)).await.unwrap();
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(m.get("b").await.unwrap(), None);
            assert!(m.insert_new("d", "4", t).await.unwrap());
        });
    }

    #[test]
    fn redis_urls() {
        let t = Duration::from_secs(1);
        assert_eq!(
            RedisStore::new("redis://h", "p:", t).unwrap().addr,
            "h:6379"
        );
        assert_eq!(
            RedisStore::new("redis://h:7000/", "p:", t).unwrap().addr,
            "h:7000"
        );
        for bad in ["http://h", "redis://", "redis://u:p@h", "redis://h/1"] {
            assert!(RedisStore::new(bad, "p:", t).is_err(), "{bad}");
        }
    }
}

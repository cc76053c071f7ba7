//! The TOML config: parsed, overridden from the environment, then validated into typed settings
//! before any network I/O. Every problem is reported at once, each with the path of its field.
//!
//! Environment overrides: `TOKENGATE__A__B=value` sets `a.b` (segments lowercased; a number
//! indexes an array); the value is read as TOML (`30`, `true`, `["x"]`) or else as a string.
//! Secrets are never inline: they are `{ env = "NAME" }` or `{ file = "/path" }`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use serde::Deserialize;

use crate::verify::{self, ClaimPath, IssuerChecks, IssuerKeys, Policy, Requirement, TokenSpec};

/// Prefix of environment variables that override config fields.
pub const ENV_PREFIX: &str = "TOKENGATE__";

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Dotted path of the bad field, e.g. `issuers.acme.keys.0.secret`.
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

/// Everything wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// Each problem found.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}: {} problem(s)", self.file.display(), self.problems.len())?;
        for p in &self.problems {
            writeln!(f, "  {}: {}", if p.path.is_empty() { "(file)" } else { &p.path }, p.message)?;
        }
        Ok(())
    }
}

/// A secret value, read from the environment or a file, never written in the config itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Secret {
    /// The value of this environment variable.
    Env(String),
    /// The contents of this file (one trailing newline removed).
    File(PathBuf),
}

impl Secret {
    /// Reads the secret.
    pub fn resolve(&self, base: &Path) -> Result<Vec<u8>, String> {
        match self {
            Secret::Env(name) => std::env::var_os(name)
                .map(|v| v.into_encoded_bytes())
                .ok_or_else(|| format!("environment variable {name} is not set")),
            Secret::File(p) => {
                let p = base.join(p);
                let mut v = read_file(&p)?;
                if v.last() == Some(&b'\n') {
                    v.pop();
                }
                Ok(v)
            }
        }
    }
}

/// A duration written as `"30s"`, `"5m"`, `"1h 30m"` or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Dur(Duration::from_secs(s))),
            Raw::Text(t) => humantime::parse_duration(&t)
                .map(Dur)
                .map_err(|e| serde::de::Error::custom(format!("bad duration {t:?}: {e}"))),
        }
    }
}

/// The largest `leeway` an issuer may have. Revocation entries of expiring tokens outlive the
/// token's `exp` by this much plus a margin, without knowing which issuer will see the token.
pub const MAX_LEEWAY_SECS: u64 = 300;

/// The whole config file.
#[derive(Debug, Deserialize)]
pub struct Config {
    /// Trusted token issuers by name.
    #[serde(default)]
    pub issuers: BTreeMap<String, IssuerConfig>,
    /// Routes by name.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteConfig>,
    /// The verified-token cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Kafka clusters by name.
    #[serde(default)]
    pub kafka: BTreeMap<String, KafkaCluster>,
    /// AMQP (RabbitMQ) brokers by name.
    #[serde(default)]
    pub amqp: BTreeMap<String, AmqpBroker>,
    /// The revocation list; without it tokens are not checked for revocation (a warning at start).
    pub redis: Option<RedisConfig>,
    /// Health, readiness and metrics HTTP endpoint.
    #[serde(default)]
    pub admin: AdminConfig,
    /// How long shutdown may take to drain in-flight messages and commit.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Dur,
    /// This instance's stable name (e.g. a StatefulSet pod name). When set, every Kafka source
    /// joins its group as a static member (`group.instance.id = "{instance_id}.{route}"`), so a
    /// restart within `session.timeout.ms` gets its partitions back without a rebalance.
    pub instance_id: Option<String>,
    /// Unexpected ends of a route task in a row (each restarted with backoff) before the process
    /// exits non-zero so that its supervisor (systemd, Kubernetes) restarts it.
    #[serde(default = "default_max_route_failures")]
    pub max_route_failures: u32,
}

/// A Kafka cluster (`[kafka.NAME]`).
#[derive(Debug, Clone, Deserialize)]
pub struct KafkaCluster {
    /// `host:port,host:port`.
    pub bootstrap_servers: String,
    /// librdkafka properties for every client of this cluster (SASL, SSL, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties whose values are secrets (`"sasl.password" = { env = "X" }`).
    #[serde(default)]
    pub secret_properties: BTreeMap<String, Secret>,
}

/// An AMQP broker (`[amqp.NAME]`).
#[derive(Debug, Clone, Deserialize)]
pub struct AmqpBroker {
    /// `amqp://user@host:5672/vhost` or `amqps://...`; put the password in `password`.
    pub url: String,
    /// The password, if the URL needs one.
    pub password: Option<Secret>,
}

/// The revocation list (`[redis]`).
#[derive(Debug, Clone, Deserialize)]
pub struct RedisConfig {
    /// `redis://[user@]host:port/db` or `rediss://` for TLS; put the password in `password`.
    pub url: String,
    /// The password (or ACL user's password).
    pub password: Option<Secret>,
    /// Key prefix.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// When Redis is unreachable: `hold` (default: no ack, retry) or `dead_letter`
    /// (reason `revocation_unavailable`). Never accept.
    #[serde(default)]
    pub on_unavailable: OnUnavailable,
}

/// What to do with a message whose revocation status cannot be read.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Keep it unacknowledged and retry with backoff.
    #[default]
    Hold,
    /// Dead-letter it with reason `revocation_unavailable`.
    DeadLetter,
}

/// The admin endpoint (`[admin]`).
#[derive(Debug, Clone, Deserialize)]
pub struct AdminConfig {
    /// Listen address for `/health`, `/ready`, `/metrics`; empty disables it.
    #[serde(default = "default_admin_listen")]
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: default_admin_listen() }
    }
}

/// Where a route's messages come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceConfig {
    /// Kafka topics.
    Kafka(KafkaSource),
    /// An AMQP queue.
    Amqp(AmqpSource),
}

/// A Kafka source (`[routes.NAME.source.kafka]`).
#[derive(Debug, Clone, Deserialize)]
pub struct KafkaSource {
    /// Cluster name.
    pub cluster: String,
    /// Topic names (or use `topic_regex`).
    #[serde(default)]
    pub topics: Vec<String>,
    /// A regex of topic names, e.g. `^orders\\..*\\.untrusted$`.
    pub topic_regex: Option<String>,
    /// Consumer group: instances with the same group share the partitions.
    pub group: String,
    /// Extra librdkafka consumer properties (e.g. `auto.offset.reset`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// An AMQP source (`[routes.NAME.source.amqp]`).
#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSource {
    /// Broker name.
    pub broker: String,
    /// Queue name.
    pub queue: String,
    /// Declare the queue (durable) with `arguments`; false: it must exist (passive).
    #[serde(default)]
    pub declare: bool,
    /// Queue arguments when declaring (`"x-queue-type" = "quorum"`).
    #[serde(default)]
    pub arguments: BTreeMap<String, toml::Value>,
    /// Unacknowledged deliveries at most (the channel prefetch).
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
}

/// Where a route publishes.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkConfig {
    /// A Kafka topic.
    Kafka(KafkaSink),
    /// An AMQP exchange.
    Amqp(AmqpSink),
}

/// A Kafka destination.
#[derive(Debug, Clone, Deserialize)]
pub struct KafkaSink {
    /// Cluster name.
    pub cluster: String,
    /// Topic.
    pub topic: String,
    /// Extra librdkafka producer properties.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// An AMQP destination.
#[derive(Debug, Clone, Deserialize)]
pub struct AmqpSink {
    /// Broker name.
    pub broker: String,
    /// Exchange ("" is the default exchange).
    pub exchange: String,
    /// Routing key: absent keeps the source's; may use `{routing_key}`, `{topic}`, `{queue}`.
    pub routing_key: Option<String>,
}

/// A trusted issuer (`[issuers.NAME]`).
#[derive(Debug, Deserialize)]
pub struct IssuerConfig {
    /// The exact `iss` claim of its tokens.
    pub iss: String,
    /// Accepted `aud` values (any one matches); empty: `aud` not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Allowed algorithms, e.g. `["RS256"]`. `none` is never allowed.
    pub algorithms: Vec<String>,
    /// Clock skew tolerated on `exp`, `nbf`, `iat`; at most [`MAX_LEEWAY_SECS`].
    #[serde(default = "default_leeway")]
    pub leeway: Dur,
    /// Refuse tokens without `exp`.
    #[serde(default = "yes")]
    pub require_exp: bool,
    /// Refuse tokens whose `iat` is older than this.
    pub max_age: Option<Dur>,
    /// Required header `typ`, e.g. `at+jwt` (RFC 9068).
    pub typ: Option<String>,
    /// Claims every token must carry (dotted paths allowed).
    #[serde(default)]
    pub required_claims: Vec<String>,
    /// Fixed keys: HMAC secrets, PEM public keys, JWKS files.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// A JWKS URL, fetched at start and refreshed.
    pub jwks_url: Option<String>,
    /// An OpenID Connect issuer URL; its discovery document gives the `jwks_uri`.
    pub discovery_url: Option<String>,
    /// How often the JWKS URL is refetched.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh: Dur,
    /// Least time between fetches triggered by unknown kids.
    #[serde(default = "default_jwks_min_refetch")]
    pub jwks_min_refetch: Dur,
    /// HTTP timeout of one JWKS fetch.
    #[serde(default = "default_jwks_timeout")]
    pub jwks_timeout: Dur,
    /// Accept `http://` for `jwks_url`, `discovery_url` and the discovered `jwks_uri`. For local
    /// tests only: keys fetched in clear text can be replaced by anyone on the path.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// How long into an identity-provider outage a token with an unknown `kid` is held before it
    /// is dead-lettered as `key_unavailable` (known keys keep working all along).
    #[serde(default = "default_unknown_kid_max_wait")]
    pub unknown_kid_max_wait: Dur,
    /// Shortest RSA key accepted, in bits: at least 2048 (the default), e.g. 3072 to raise it.
    #[serde(default = "default_min_rsa_bits")]
    pub min_rsa_bits: usize,
}

/// A fixed key of an issuer (`[[issuers.NAME.keys]]`): exactly one of `secret`, `pem_file`, `jwks_file`.
#[derive(Debug, Deserialize)]
pub struct KeyConfig {
    /// The kid tokens use to name this key; without one, tokens without a kid try it.
    pub kid: Option<String>,
    /// The algorithms this key may verify (pinned). Required for `secret` and `pem_file`.
    #[serde(default)]
    pub algorithms: Vec<String>,
    /// An HMAC secret.
    pub secret: Option<Secret>,
    /// How the secret is written: `raw` bytes or `base64`.
    #[serde(default)]
    pub secret_encoding: SecretEncoding,
    /// A PEM public key file (RSA, EC P-256/P-384, Ed25519).
    pub pem_file: Option<PathBuf>,
    /// A JWKS file.
    pub jwks_file: Option<PathBuf>,
}

/// How an HMAC secret is written.
#[derive(Debug, Default, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum SecretEncoding {
    /// The bytes as they are.
    #[default]
    Raw,
    /// Standard or URL-safe base64.
    Base64,
}

/// A route (`[routes.NAME]`): where messages come from, which tokens pass, where they go.
#[derive(Debug, Deserialize)]
pub struct RouteConfig {
    /// Issuer names accepted on this route; empty: all.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Where the token is.
    #[serde(default)]
    pub token: TokenConfig,
    /// Role and scope requirements, all of which must hold.
    #[serde(default)]
    pub require: Vec<RequireConfig>,
    /// Claims that must equal these values (`tenant = "acme"`, `"org.id" = 7`).
    #[serde(default)]
    pub claims: BTreeMap<String, toml::Value>,
    /// Where messages come from.
    pub source: Option<SourceConfig>,
    /// Where accepted messages go.
    pub trusted: Option<SinkConfig>,
    /// Where rejected messages go.
    pub dead_letter: Option<SinkConfig>,
    /// Claim path -> header name, added to accepted messages (`sub = "x-tokengate-sub"`).
    #[serde(default = "default_identity_headers")]
    pub identity_headers: BTreeMap<String, String>,
    /// Prefix of the headers tokengate adds; incoming headers with it are removed (anti-spoofing).
    #[serde(default = "default_header_prefix")]
    pub header_prefix: String,
    /// Most messages published but not yet confirmed, per route.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Guard against dead-lettering everything (a wrong key, say).
    #[serde(default)]
    pub dead_letter_guard: GuardConfig,
}

/// The runaway dead-letter guard (`[routes.NAME.dead_letter_guard]`).
#[derive(Debug, Clone, Deserialize)]
pub struct GuardConfig {
    /// Trip when more than this share of a window's messages is dead-lettered.
    #[serde(default = "default_guard_ratio")]
    pub max_ratio: f64,
    /// Only judge windows with at least this many messages.
    #[serde(default = "default_guard_min")]
    pub min_messages: u64,
    /// Window length.
    #[serde(default = "default_guard_window")]
    pub window: Dur,
    /// Pause consumption this long when tripped; absent: only alert (metric and log).
    pub pause: Option<Dur>,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            max_ratio: default_guard_ratio(),
            min_messages: default_guard_min(),
            window: default_guard_window(),
            pause: None,
        }
    }
}

/// Where a route's token is (`[routes.NAME.token]`).
#[derive(Debug, Deserialize)]
pub struct TokenConfig {
    /// Header name (case-insensitive).
    #[serde(default = "default_header")]
    pub header: String,
    /// Refuse tokens without the `Bearer ` scheme.
    #[serde(default)]
    pub require_bearer: bool,
    /// Largest token header, in bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Remove the token header from republished messages, so bearer tokens do not leak downstream.
    #[serde(default = "yes")]
    pub strip: bool,
    /// Keep the whole token in dead letters. Off by default: the token header of a dead letter
    /// is replaced by `redacted; fingerprint=<hex>`, because anyone who may read the dead-letter
    /// destination could replay a token that is still valid (say, rejected only by the route's
    /// scope rules). Turn on only where the dead-letter destination is as protected as the token.
    #[serde(default)]
    pub keep_in_dead_letters: bool,
}

impl Default for TokenConfig {
    fn default() -> Self {
        let d = TokenSpec::default();
        TokenConfig {
            header: d.header,
            require_bearer: d.require_bearer,
            max_bytes: d.max_bytes,
            strip: true,
            keep_in_dead_letters: false,
        }
    }
}

/// A role or scope requirement: exactly one of `any_of`, `all_of`.
#[derive(Debug, Deserialize)]
pub struct RequireConfig {
    /// Claim path holding granted values (`scope`, `roles`, `realm_access.roles`).
    pub claim: String,
    /// Any one of these values is enough.
    #[serde(default)]
    pub any_of: Vec<String>,
    /// Every one of these values is needed.
    #[serde(default)]
    pub all_of: Vec<String>,
}

/// The verified-token cache (`[cache]`).
#[derive(Debug, Deserialize)]
pub struct CacheConfig {
    /// Most tokens kept; 0 disables the cache.
    #[serde(default = "default_cache_entries")]
    pub max_entries: u64,
    /// How long a token without `exp` stays cached.
    #[serde(default = "default_ttl_without_exp")]
    pub ttl_without_exp: Dur,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig { max_entries: default_cache_entries(), ttl_without_exp: default_ttl_without_exp() }
    }
}

fn default_max_route_failures() -> u32 {
    5
}
fn default_shutdown_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_prefix() -> String {
    crate::revocation::DEFAULT_PREFIX.to_owned()
}
fn default_admin_listen() -> String {
    "127.0.0.1:9900".to_owned()
}
fn default_prefetch() -> u16 {
    // Enough to keep confirms pipelined, small enough that a crash redelivers little.
    256
}
fn default_identity_headers() -> BTreeMap<String, String> {
    BTreeMap::from([("sub".to_owned(), "x-tokengate-sub".to_owned())])
}
fn default_header_prefix() -> String {
    "x-tokengate-".to_owned()
}
fn default_max_in_flight() -> usize {
    // Enough to hide a broker round trip at 100k msg/s; bounded so memory stays small.
    10_000
}
fn default_guard_ratio() -> f64 {
    0.9
}
fn default_guard_min() -> u64 {
    100
}
fn default_guard_window() -> Dur {
    Dur(Duration::from_secs(60))
}
fn yes() -> bool {
    true
}
fn default_leeway() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_jwks_refresh() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_jwks_min_refetch() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_min_rsa_bits() -> usize {
    verify::keys::MIN_RSA_BITS
}
fn default_unknown_kid_max_wait() -> Dur {
    // Long enough to ride out a blip of the identity provider, short enough that a producer
    // sending unknown kids cannot stall its route for a whole outage.
    Dur(Duration::from_secs(60))
}
fn default_jwks_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn default_header() -> String {
    TokenSpec::default().header
}
fn default_max_bytes() -> usize {
    TokenSpec::default().max_bytes
}
fn default_cache_entries() -> u64 {
    verify::CacheSettings::default().max_entries
}
fn default_ttl_without_exp() -> Dur {
    Dur(verify::CacheSettings::default().ttl_without_exp)
}

/// A validated route's verification and header settings.
#[derive(Debug, Clone)]
pub struct RouteRules {
    /// Route name.
    pub name: String,
    /// Where the token is.
    pub token: TokenSpec,
    /// Whether to strip the token header on republish.
    pub strip_token: bool,
    /// Whether dead letters keep the token header as received (else it is redacted).
    pub dead_letter_keeps_token: bool,
    /// Issuer, role, scope and claim rules.
    pub policy: Policy,
    /// Claim path -> header name for accepted messages.
    pub identity_headers: Vec<(ClaimPath, String)>,
    /// Prefix of the gate's own headers.
    pub header_prefix: String,
}

/// The typed, validated result of a config file.
pub struct Settings {
    /// Issuers with their keys loaded (remote ones not yet fetched).
    pub issuers: Vec<verify::Issuer>,
    /// Cache sizes.
    pub cache: verify::CacheSettings,
    /// Route rules, by name order.
    pub routes: Vec<RouteRules>,
    /// The raw config, for the parts later stages read.
    pub raw: Config,
    /// Directory relative file paths are resolved against.
    pub base: PathBuf,
}

impl Settings {
    /// The rules of the route `name`.
    pub fn route(&self, name: &str) -> Option<&RouteRules> {
        self.routes.iter().find(|r| r.name == name)
    }
}

/// The largest key, secret or JWKS file read: far above any real one, and a path such as
/// `/dev/zero` or a FIFO gives an error instead of a hang or an exhausted memory.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Reads a file the config names, bounded by [`MAX_FILE_BYTES`].
fn read_file(p: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read as _;
    let meta = std::fs::metadata(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", p.display()));
    }
    let mut v = Vec::new();
    std::fs::File::open(p)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut v))
        .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    if v.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("{} is larger than {MAX_FILE_BYTES} bytes", p.display()));
    }
    Ok(v)
}

/// What a valid config does that an operator should know about (`check-config` prints these;
/// `--strict` fails on them): passwords written into URLs, secret files that other users can
/// read, an admin endpoint reachable from other hosts.
pub fn warnings(s: &Settings) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut warn = |path: String, message: &str| out.push(Problem { path, message: message.to_owned() });
    let inline_password = |u: &str| url::Url::parse(u).is_ok_and(|u| u.password().is_some());
    for (name, a) in &s.raw.amqp {
        if inline_password(&a.url) {
            warn(format!("amqp.{name}.url"), "holds a password; put it in password = { env = ... } or { file = ... }");
        }
    }
    if let Some(r) = &s.raw.redis
        && inline_password(&r.url)
    {
        warn("redis.url".into(), "holds a password; put it in password = { env = ... } or { file = ... }");
    }
    for (name, k) in &s.raw.kafka {
        for prop in k.properties.keys().filter(|p| p.contains("jaas") || p.contains("credentials")) {
            warn(format!("kafka.{name}.properties.{prop}"), "may hold credentials; use secret_properties");
        }
    }
    let mut secret_files: Vec<(String, &PathBuf)> = Vec::new();
    for (name, ic) in &s.raw.issuers {
        for (i, k) in ic.keys.iter().enumerate() {
            if let Some(Secret::File(f)) = &k.secret {
                secret_files.push((format!("issuers.{name}.keys.{i}.secret"), f));
            }
        }
    }
    for (name, a) in &s.raw.amqp {
        if let Some(Secret::File(f)) = &a.password {
            secret_files.push((format!("amqp.{name}.password"), f));
        }
    }
    if let Some(Some(Secret::File(f))) = s.raw.redis.as_ref().map(|r| &r.password) {
        secret_files.push(("redis.password".into(), f));
    }
    for (name, k) in &s.raw.kafka {
        for (prop, sec) in &k.secret_properties {
            if let Secret::File(f) = sec {
                secret_files.push((format!("kafka.{name}.secret_properties.{prop}"), f));
            }
        }
    }
    #[cfg(unix)]
    for (path, f) in secret_files {
        use std::os::unix::fs::PermissionsExt as _;
        if std::fs::metadata(s.base.join(f)).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
            warn(path, "the secret file is readable or writable by group or others; chmod 600 it");
        }
    }
    if let Ok(addr) = s.raw.admin.listen.parse::<std::net::SocketAddr>()
        && !addr.ip().is_loopback()
    {
        warn(
            "admin.listen".into(),
            "is reachable from other hosts; /metrics and /ready are unauthenticated (bind 127.0.0.1 unless a proxy or network policy guards it)",
        );
    }
    out
}

/// Reads, overrides from `env`, and validates a config file.
pub fn load(path: &Path, env: &[(String, String)]) -> Result<Settings, ConfigError> {
    let fail = |problems| ConfigError { file: path.to_owned(), problems };
    let text = std::fs::read_to_string(path)
        .map_err(|e| fail(vec![Problem { path: String::new(), message: format!("cannot read: {e}") }]))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, env, base).map_err(fail)
}

/// The `TOKENGATE__*` variables of this process.
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect()
}

/// Parses and validates config text; relative file paths are resolved against `base`.
pub fn parse(text: &str, env: &[(String, String)], base: &Path) -> Result<Settings, Vec<Problem>> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        // The message and where, never the offending line: it may hold a secret.
        let at = e.span().map_or(String::new(), |s| {
            let before = &text[..s.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            format!("line {line}, column {column}: ")
        });
        vec![Problem { path: String::new(), message: format!("{at}{}", hide_values(e.message().trim())) }]
    })?;
    let mut problems = Vec::new();
    let mut de = toml::Value::Table(table);
    for (k, v) in env {
        if let Err(m) = apply_override(&mut de, k, v) {
            problems.push(Problem { path: k.clone(), message: m });
        }
    }
    let mut unknown = Vec::new();
    let raw: Result<Config, _> = serde_ignored::deserialize(de, |p| unknown.push(p.to_string()));
    for p in unknown {
        problems.push(Problem { path: p, message: "unknown field".into() });
    }
    let raw = match raw {
        Ok(raw) => raw,
        Err(e) => {
            let message = hide_values(e.to_string().trim()).replace('\n', " ");
            problems.push(Problem { path: String::new(), message });
            return Err(problems);
        }
    };
    let settings = validate(raw, base, &mut problems);
    if problems.is_empty() { Ok(settings) } else { Err(problems) }
}

/// A parser message with the values it quotes hidden: a value written where a secret reference
/// belongs (`secret = "hunter2"`) must not be echoed to a terminal or a CI log.
fn hide_values(message: &str) -> String {
    static QUOTED: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = QUOTED.get_or_init(|| {
        regex::Regex::new(r#"(unknown variant |string |value |found |invalid [a-z ]+: )(`[^`]*`|"(?:[^"\\]|\\.)*")"#)
            .expect("a valid regex")
    });
    re.replace_all(message, "${1}(value hidden)").into_owned()
}

fn apply_override(root: &mut toml::Value, key: &str, raw: &str) -> Result<(), String> {
    let path: Vec<String> = key[ENV_PREFIX.len()..].split("__").map(str::to_ascii_lowercase).collect();
    if path.iter().any(String::is_empty) {
        return Err("empty path segment".into());
    }
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("just parsed"),
        Err(_) => toml::Value::String(raw.to_owned()),
    };
    let mut cur = root;
    for seg in &path {
        cur = match cur {
            toml::Value::Table(t) => t.entry(seg.clone()).or_insert_with(|| toml::Value::Table(Default::default())),
            toml::Value::Array(a) => {
                let i = path_index(seg, a.len())?;
                &mut a[i]
            }
            _ => {
                return Err(format!("cannot set {seg} inside a value that is not a table"));
            }
        };
    }
    *cur = value;
    Ok(())
}

fn path_index(seg: &str, len: usize) -> Result<usize, String> {
    seg.parse::<usize>().ok().filter(|i| *i < len).ok_or_else(|| format!("{seg} is not an index below {len}"))
}

/// Collects problems into `problems` while building typed settings.
struct Check<'p> {
    problems: &'p mut Vec<Problem>,
}

impl Check<'_> {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem { path: path.into(), message: message.into() });
    }

    fn algorithms(&mut self, path: &str, names: &[String]) -> Vec<Algorithm> {
        let mut out = Vec::new();
        for (i, n) in names.iter().enumerate() {
            if n.eq_ignore_ascii_case("none") {
                self.add(format!("{path}.{i}"), "alg none is never allowed");
            } else {
                match n.parse::<Algorithm>() {
                    Ok(a) => out.push(a),
                    Err(_) => self.add(
                        format!("{path}.{i}"),
                        format!("unknown algorithm {n:?} (HS256, RS256, PS256, ES256, ES384, EdDSA, ...)"),
                    ),
                }
            }
        }
        out
    }
}

fn validate(raw: Config, base: &Path, problems: &mut Vec<Problem>) -> Settings {
    let mut c = Check { problems };
    let mut issuers = Vec::new();
    let mut seen_iss = BTreeMap::new();
    for (name, ic) in &raw.issuers {
        let p = format!("issuers.{name}");
        if let Some(other) = seen_iss.insert(ic.iss.clone(), name.clone()) {
            c.add(format!("{p}.iss"), format!("same iss as issuers.{other}"));
        }
        if ic.iss.is_empty() {
            c.add(format!("{p}.iss"), "must not be empty");
        }
        let algorithms = c.algorithms(&format!("{p}.algorithms"), &ic.algorithms);
        if ic.algorithms.is_empty() {
            c.add(format!("{p}.algorithms"), "list at least one algorithm");
        }
        if ic.min_rsa_bits < verify::keys::MIN_RSA_BITS {
            c.add(
                format!("{p}.min_rsa_bits"),
                format!("at least {} (it may only raise the floor)", verify::keys::MIN_RSA_BITS),
            );
        }
        let min_rsa_bits = ic.min_rsa_bits.max(verify::keys::MIN_RSA_BITS);
        let mut keys = Vec::new();
        for (i, kc) in ic.keys.iter().enumerate() {
            let kp = format!("{p}.keys.{i}");
            match load_key(&mut c, &kp, kc, &algorithms, min_rsa_bits, base) {
                Ok(mut k) => keys.append(&mut k),
                Err(m) => c.add(kp, m),
            }
        }
        let remote = match (&ic.jwks_url, &ic.discovery_url) {
            (Some(_), Some(_)) => {
                c.add(format!("{p}.discovery_url"), "set jwks_url or discovery_url, not both");
                None
            }
            (Some(u), None) => Some(verify::jwks::Location::Jwks(u.clone())),
            (None, Some(u)) => Some(verify::jwks::Location::Discovery(u.clone())),
            (None, None) => None,
        };
        for (field, url) in [("jwks_url", &ic.jwks_url), ("discovery_url", &ic.discovery_url)] {
            let Some(u) = url else { continue };
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                c.add(format!("{p}.{field}"), "must be an https:// URL");
            } else if u.starts_with("http://") && !ic.allow_insecure_http {
                c.add(
                    format!("{p}.{field}"),
                    "http:// is refused: keys fetched in clear text can be replaced on the way; use https:// \
                     (allow_insecure_http = true is for local tests only)",
                );
            } else if u.starts_with("http://") {
                tracing::warn!(issuer = %name, field, "allow_insecure_http: signing keys are fetched in clear text; for local tests only");
            }
        }
        if keys.is_empty() && remote.is_none() && ic.keys.is_empty() {
            c.add(&p, "has no keys: add [[keys]], jwks_url or discovery_url");
        }
        if ic.leeway.0 > Duration::from_secs(MAX_LEEWAY_SECS) {
            c.add(
                format!("{p}.leeway"),
                format!("at most {MAX_LEEWAY_SECS}s: revocations of expiring tokens are kept that long past exp"),
            );
        }
        if ic.jwks_min_refetch.0 < Duration::from_secs(1) {
            c.add(format!("{p}.jwks_min_refetch"), "must be at least 1s (it bounds fetches caused by unknown kids)");
        }
        let remote = remote.map(|location| verify::jwks::RemoteSettings {
            location,
            refresh: ic.jwks_refresh.0.max(Duration::from_secs(1)),
            min_refetch: ic.jwks_min_refetch.0.max(Duration::from_secs(1)),
            timeout: ic.jwks_timeout.0,
            allow_http: ic.allow_insecure_http,
            unknown_kid_max_wait: ic.unknown_kid_max_wait.0,
            min_rsa_bits,
        });
        issuers.push(verify::Issuer {
            name: Arc::from(name.as_str()),
            checks: IssuerChecks {
                iss: ic.iss.clone(),
                audiences: ic.audiences.clone(),
                algorithms: algorithms.clone(),
                leeway: ic.leeway.0.as_secs() as i64,
                require_exp: ic.require_exp,
                max_age: ic.max_age.map(|d| d.0.as_secs() as i64),
                typ: ic.typ.clone(),
                required_claims: ic.required_claims.iter().map(|s| ClaimPath(s.clone())).collect(),
            },
            keys: IssuerKeys::new(name, algorithms, keys, remote),
        });
    }
    let mut routes = Vec::new();
    for (name, rc) in &raw.routes {
        let p = format!("routes.{name}");
        // A route name becomes a metric label, an AMQP consumer tag and part of a Kafka member id.
        let ok = |ch: char| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-');
        if name.is_empty() || name.len() > 100 || !name.chars().all(ok) {
            c.add(p.clone(), "a route name is 1 to 100 characters of A-Z a-z 0-9 . _ -");
        }
        for (i, iss) in rc.issuers.iter().enumerate() {
            if !raw.issuers.contains_key(iss) {
                c.add(format!("{p}.issuers.{i}"), format!("no issuer named {iss:?}"));
            }
        }
        if rc.token.header.is_empty() {
            c.add(format!("{p}.token.header"), "must not be empty");
        }
        if rc.token.max_bytes == 0 {
            c.add(format!("{p}.token.max_bytes"), "must be positive");
        }
        let mut require = Vec::new();
        for (i, r) in rc.require.iter().enumerate() {
            let (values, all) = match (r.any_of.is_empty(), r.all_of.is_empty()) {
                (false, true) => (r.any_of.clone(), false),
                (true, false) => (r.all_of.clone(), true),
                _ => {
                    c.add(format!("{p}.require.{i}"), "set exactly one of any_of, all_of");
                    continue;
                }
            };
            require.push(Requirement { claim: ClaimPath(r.claim.clone()), values, all });
        }
        let mut equals = Vec::new();
        for (k, v) in &rc.claims {
            match serde_json::to_value(v) {
                Ok(j) => equals.push((ClaimPath(k.clone()), j)),
                Err(e) => c.add(format!("{p}.claims.{k}"), e.to_string()),
            }
        }
        check_route_io(&mut c, &p, rc, &raw);
        routes.push(RouteRules {
            name: name.clone(),
            token: TokenSpec {
                header: rc.token.header.clone(),
                require_bearer: rc.token.require_bearer,
                max_bytes: rc.token.max_bytes,
            },
            strip_token: rc.token.strip,
            dead_letter_keeps_token: rc.token.keep_in_dead_letters,
            policy: Policy { issuers: rc.issuers.clone(), require, equals },
            identity_headers: rc
                .identity_headers
                .iter()
                .map(|(k, v)| (ClaimPath(k.clone()), v.to_ascii_lowercase()))
                .collect(),
            header_prefix: rc.header_prefix.to_ascii_lowercase(),
        });
    }
    for (name, k) in &raw.kafka {
        if k.bootstrap_servers.is_empty() {
            c.add(format!("kafka.{name}.bootstrap_servers"), "must not be empty");
        }
        for (prop, secret) in &k.secret_properties {
            if let Err(m) = secret.resolve(base) {
                c.add(format!("kafka.{name}.secret_properties.{prop}"), m);
            }
        }
        for prop in k.properties.keys() {
            if prop.contains("password") || prop.contains("secret") {
                c.add(format!("kafka.{name}.properties.{prop}"), "secrets belong in secret_properties (env or file)");
            }
        }
    }
    for (name, a) in &raw.amqp {
        if !(a.url.starts_with("amqp://") || a.url.starts_with("amqps://")) {
            c.add(format!("amqp.{name}.url"), "must start with amqp:// or amqps://");
        }
        if let Some(Err(m)) = a.password.as_ref().map(|s| s.resolve(base)) {
            c.add(format!("amqp.{name}.password"), m);
        }
    }
    if let Some(r) = &raw.redis {
        if !(r.url.starts_with("redis://") || r.url.starts_with("rediss://") || r.url.starts_with("unix://")) {
            c.add("redis.url", "must start with redis://, rediss:// or unix://");
        }
        if let Some(Err(m)) = r.password.as_ref().map(|s| s.resolve(base)) {
            c.add("redis.password", m);
        }
    }
    if let Some(id) = &raw.instance_id {
        let ok = |ch: char| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-');
        if id.is_empty() || id.len() > 200 || !id.chars().all(ok) {
            c.add("instance_id", "must be 1 to 200 characters of A-Z a-z 0-9 . _ - (it names a Kafka group member)");
        }
    }
    if !raw.admin.listen.is_empty() && raw.admin.listen.parse::<std::net::SocketAddr>().is_err() {
        c.add("admin.listen", "must be host:port, e.g. 127.0.0.1:9900 (empty disables)");
    }
    let cache =
        verify::CacheSettings { max_entries: raw.cache.max_entries, ttl_without_exp: raw.cache.ttl_without_exp.0 };
    Settings { issuers, cache, routes, raw, base: base.to_owned() }
}

fn check_route_io(c: &mut Check, p: &str, rc: &RouteConfig, raw: &Config) {
    let io =
        [("source", rc.source.is_some()), ("trusted", rc.trusted.is_some()), ("dead_letter", rc.dead_letter.is_some())];
    if io.iter().any(|(_, set)| *set) {
        for (field, set) in io {
            if !set {
                c.add(format!("{p}.{field}"), "a route with a source needs source, trusted and dead_letter");
            }
        }
    }
    match &rc.source {
        Some(SourceConfig::Kafka(k)) => {
            if !raw.kafka.contains_key(&k.cluster) {
                c.add(format!("{p}.source.kafka.cluster"), format!("no [kafka.{}] cluster", k.cluster));
            }
            match (k.topics.is_empty(), &k.topic_regex) {
                (true, None) | (false, Some(_)) => {
                    c.add(format!("{p}.source.kafka"), "set topics or topic_regex (one of them)")
                }
                (_, Some(re)) => {
                    if let Err(e) = regex::Regex::new(re) {
                        c.add(format!("{p}.source.kafka.topic_regex"), e.to_string());
                    }
                }
                _ => {}
            }
            if k.group.is_empty() {
                c.add(format!("{p}.source.kafka.group"), "must not be empty");
            }
        }
        Some(SourceConfig::Amqp(a)) => {
            if !raw.amqp.contains_key(&a.broker) {
                c.add(format!("{p}.source.amqp.broker"), format!("no [amqp.{}] broker", a.broker));
            }
            if a.queue.is_empty() || a.queue.len() > 255 {
                c.add(format!("{p}.source.amqp.queue"), "must be 1 to 255 bytes (an AMQP short string)");
            }
            for k in a.arguments.keys().filter(|k| k.len() > 255) {
                c.add(format!("{p}.source.amqp.arguments.{k}"), "names are at most 255 bytes (AMQP short strings)");
            }
            if a.prefetch == 0 {
                c.add(format!("{p}.source.amqp.prefetch"), "must be positive (0 would mean unbounded)");
            }
        }
        None => {}
    }
    for (field, sink) in [("trusted", &rc.trusted), ("dead_letter", &rc.dead_letter)] {
        match sink {
            Some(SinkConfig::Kafka(k)) => {
                if !raw.kafka.contains_key(&k.cluster) {
                    c.add(format!("{p}.{field}.kafka.cluster"), format!("no [kafka.{}] cluster", k.cluster));
                }
                if k.topic.is_empty() {
                    c.add(format!("{p}.{field}.kafka.topic"), "must not be empty");
                }
            }
            Some(SinkConfig::Amqp(a)) if !raw.amqp.contains_key(&a.broker) => {
                c.add(format!("{p}.{field}.amqp.broker"), format!("no [amqp.{}] broker", a.broker));
            }
            Some(SinkConfig::Amqp(a)) if a.exchange.len() > 255 => {
                c.add(format!("{p}.{field}.amqp.exchange"), "must be at most 255 bytes (an AMQP short string)");
            }
            Some(SinkConfig::Amqp(_)) => {}
            None => {}
        }
    }
    if let (Some(SourceConfig::Kafka(s)), Some(SinkConfig::Kafka(t))) = (&rc.source, &rc.trusted)
        && s.cluster == t.cluster
        && s.topics.contains(&t.topic)
    {
        c.add(format!("{p}.trusted.kafka.topic"), "the trusted topic is also a source topic (a loop)");
    }
    if rc.max_in_flight == 0 {
        c.add(format!("{p}.max_in_flight"), "must be positive");
    }
    if !(0.0..=1.0).contains(&rc.dead_letter_guard.max_ratio) {
        c.add(format!("{p}.dead_letter_guard.max_ratio"), "must be between 0 and 1");
    }
    if rc.header_prefix.is_empty() {
        c.add(format!("{p}.header_prefix"), "must not be empty (it protects against spoofed identity headers)");
    }
    let token_header = rc.token.header.to_ascii_lowercase();
    for (claim, h) in &rc.identity_headers {
        if h.is_empty() || h.eq_ignore_ascii_case(&token_header) {
            c.add(format!("{p}.identity_headers.{claim}"), "must be a non-empty header other than the token header");
        }
    }
}

fn load_key(
    c: &mut Check,
    path: &str,
    kc: &KeyConfig,
    issuer_algs: &[Algorithm],
    min_rsa_bits: usize,
    base: &Path,
) -> Result<Vec<verify::keys::Key>, String> {
    let sources = [kc.secret.is_some(), kc.pem_file.is_some(), kc.jwks_file.is_some()];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err("set exactly one of secret, pem_file, jwks_file".into());
    }
    let pinned = c.algorithms(&format!("{path}.algorithms"), &kc.algorithms);
    for a in &pinned {
        if !issuer_algs.contains(a) {
            c.add(format!("{path}.algorithms"), format!("{a:?} is not in the issuer's algorithms"));
        }
    }
    if kc.jwks_file.is_none() && kc.algorithms.is_empty() {
        return Err("list the algorithms this key may verify (keys are pinned)".into());
    }
    let allowed: Vec<Algorithm> = if pinned.is_empty() { issuer_algs.to_vec() } else { pinned };
    if let Some(secret) = &kc.secret {
        let bytes = secret.resolve(base)?;
        let bytes = match kc.secret_encoding {
            SecretEncoding::Raw => bytes,
            SecretEncoding::Base64 => decode_base64(&bytes)?,
        };
        return verify::keys::hmac(kc.kid.clone(), &bytes, &allowed).map(|k| vec![k]);
    }
    if let Some(f) = &kc.pem_file {
        let f = base.join(f);
        let pem = read_file(&f)?;
        return verify::keys::pem(kc.kid.clone(), &pem, &allowed, min_rsa_bits).map(|k| vec![k]);
    }
    let f = base.join(kc.jwks_file.as_ref().expect("one source is set"));
    let doc = read_file(&f)?;
    let (mut keys, skipped) = verify::keys::jwks(&doc, &allowed, true, min_rsa_bits)?;
    for s in skipped {
        tracing::warn!(file = %f.display(), skipped = %s, "JWKS key skipped");
    }
    // A kid on a jwks_file entry picks that one key of the file.
    if let Some(kid) = &kc.kid {
        keys.retain(|k| k.kid.as_ref() == Some(kid));
        if keys.is_empty() {
            return Err(format!("{} has no usable key with kid {}", f.display(), verify::jwt::shorten(kid)));
        }
    }
    if keys.is_empty() {
        return Err(format!("{} has no usable key", f.display()));
    }
    Ok(keys)
}

fn decode_base64(b: &[u8]) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let t: Vec<u8> = b.iter().copied().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD
        .decode(&t)
        .or_else(|_| URL_SAFE_NO_PAD.decode(t.strip_suffix(b"=").unwrap_or(&t)))
        .map_err(|e| format!("secret is not base64: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str, env: &[(&str, &str)]) -> Vec<Problem> {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        match parse(text, &env, Path::new(".")) {
            Ok(_) => vec![],
            Err(p) => p,
        }
    }

    const GOOD: &str = r#"
        [issuers.local]
        iss = "https://idp.example"
        algorithms = ["HS256"]
        [[issuers.local.keys]]
        algorithms = ["HS256"]
        secret = { env = "TG_TEST_SECRET_CFG" }
        [routes.orders]
        issuers = ["local"]
        require = [{ claim = "scope", any_of = ["orders:write"] }]
        claims = { tenant = "acme" }
    "#;

    #[test]
    fn a_good_config_validates() {
        // SAFETY: tests in this module are the only readers of this variable.
        unsafe { std::env::set_var("TG_TEST_SECRET_CFG", "0123456789abcdef0123456789abcdef") };
        assert_eq!(problems(GOOD, &[]), vec![]);
        let s = parse(GOOD, &[], Path::new(".")).ok().unwrap();
        assert_eq!(s.routes[0].policy.equals[0].1, serde_json::json!("acme"));
        assert_eq!(s.issuers[0].checks.leeway, 30);
    }

    #[test]
    fn a_kid_on_a_jwks_file_entry_picks_that_key() {
        let jwks = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwks.json");
        let text = |kid: &str| {
            format!(
                "[issuers.f]\niss = \"x\"\nalgorithms = [\"RS256\", \"ES256\", \"EdDSA\"]\n[[issuers.f.keys]]\nkid = \"{kid}\"\njwks_file = \"{jwks}\"\n"
            )
        };
        let s = parse(&text("rsa"), &[], Path::new(".")).unwrap_or_else(|p| panic!("{p:?}"));
        let kids: Vec<_> = s.issuers[0].keys.current().keys.iter().map(|k| k.kid.clone()).collect();
        assert_eq!(kids, vec![Some("rsa".to_owned())]);
        let got = problems(&text("nope"), &[]);
        assert_eq!(got.len(), 1, "{got:?}");
        assert!(got[0].message.contains("has no usable key with kid"), "{got:?}");
    }

    #[test]
    fn clear_text_key_urls_are_refused_unless_allowed_for_tests() {
        let remote = |extra: &str| {
            format!(
                "[issuers.r]\niss = \"x\"\nalgorithms = [\"RS256\"]\njwks_url = \"http://idp.local/certs\"\n{extra}"
            )
        };
        let got = problems(&remote(""), &[]);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].path, "issuers.r.jwks_url");
        assert!(got[0].message.starts_with("http:// is refused"), "{got:?}");
        assert_eq!(problems(&remote("allow_insecure_http = true"), &[]), vec![]);
    }

    #[test]
    fn errors_name_the_field_never_the_value() {
        let inline = GOOD.replace(r#"secret = { env = "TG_TEST_SECRET_CFG" }"#, r#"secret = "hunter2-inline-secret""#);
        let typed = GOOD.replace(r#"secret = { env = "TG_TEST_SECRET_CFG" }"#, r#"secret = { env = 42 }"#).replace(
            r#"iss = "https://idp.example""#,
            r#"iss = "https://idp.example"
        leeway = "hunter2-as-duration""#,
        );
        let syntax = "[redis]\nurl = \"redis://x\"\npassword = hunter2-unquoted\n";
        for text in [inline.as_str(), typed.as_str(), syntax] {
            let got = format!("{:?}", problems(text, &[]));
            assert!(!got.contains("hunter2"), "a value was echoed: {got}");
            assert!(!got.is_empty());
        }
        assert!(format!("{:?}", problems(syntax, &[])).contains("line 3"), "the position is kept");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let text = r#"
            colour = "blue"
            [issuers.a]
            iss = "x"
            algorithms = ["none", "HS999"]
            surprise = 1
            [[issuers.a.keys]]
            algorithms = ["HS256"]
            [[issuers.a.keys]]
            pem_file = "/nonexistent.pem"
            algorithms = ["RS256"]
            [issuers.b]
            iss = "x"
            algorithms = ["RS256"]
            jwks_url = "ftp://nope"
            [routes.r]
            issuers = ["ghost"]
            require = [{ claim = "scope" }]
        "#;
        let got = problems(text, &[]);
        let paths: Vec<&str> = got.iter().map(|p| p.path.as_str()).collect();
        for want in [
            "colour",
            "issuers.a.surprise",
            "issuers.a.algorithms.0",
            "issuers.a.algorithms.1",
            "issuers.a.keys.0",
            "issuers.a.keys.1",
            "issuers.b.iss",
            "issuers.b.jwks_url",
            "routes.r.issuers.0",
            "routes.r.require.0",
        ] {
            assert!(paths.contains(&want), "{want} missing from {got:#?}");
        }
    }

    #[test]
    fn type_errors_name_the_field() {
        let got = problems("[issuers.a]\niss = 5\nalgorithms = []\n", &[]);
        assert_eq!(got.len(), 1);
        assert!(got[0].message.contains("iss"), "{got:?}");
        let got = problems("[issuers.a\n", &[]);
        assert!(got[0].message.contains("line 1"), "{got:?}");
    }

    #[test]
    fn env_overrides_apply_and_report() {
        unsafe { std::env::set_var("TG_TEST_SECRET_CFG", "0123456789abcdef0123456789abcdef") };
        let env = [
            ("TOKENGATE__ROUTES__ORDERS__TOKEN__HEADER".to_string(), "x-token".to_string()),
            ("TOKENGATE__ISSUERS__LOCAL__LEEWAY".to_string(), "5".to_string()),
            ("TOKENGATE__ISSUERS__LOCAL__KEYS__0__KID".to_string(), "k9".to_string()),
        ];
        let s = parse(GOOD, &env, Path::new(".")).unwrap_or_else(|p| panic!("{p:?}"));
        assert_eq!(s.routes[0].token.header, "x-token");
        assert_eq!(s.issuers[0].checks.leeway, 5);
        assert_eq!(s.issuers[0].keys.current().keys[0].kid.as_deref(), Some("k9"));
        let got = problems(GOOD, &[("TOKENGATE__ISSUERS__LOCAL__KEYS__7__KID", "k")]);
        assert_eq!(got[0].path, "TOKENGATE__ISSUERS__LOCAL__KEYS__7__KID");
    }

    #[test]
    fn missing_secret_is_a_problem_not_a_panic() {
        let text = GOOD.replace("TG_TEST_SECRET_CFG", "TG_TEST_SECRET_UNSET_XYZ");
        let got = problems(&text, &[]);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].path, "issuers.local.keys.0");
        assert!(got[0].message.contains("TG_TEST_SECRET_UNSET_XYZ"));
    }
}

//! The config file as written: every table and field, documented (these docs are the user's
//! reference), with defaults. [`super::parse`] turns it into typed [`super::Settings`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::verify::{self, TokenSpec};

/// A secret value, read from the environment or a file, never written in the config itself.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Secret {
    /// The value of this environment variable.
    Env(String),
    /// The contents of this file (one trailing newline removed).
    File(PathBuf),
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
    /// Reloading the config while running (always on `SIGHUP`).
    #[serde(default)]
    pub reload: ReloadConfig,
    /// How long shutdown may take to drain in-flight messages and commit.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Dur,
    /// This instance's stable name (e.g. a StatefulSet pod name). When set, every Kafka source
    /// joins its group as a static member (`group.instance.id = "{instance_id}.{route}"`), so a
    /// restart within `session.timeout.ms` gets its partitions back without a rebalance.
    pub instance_id: Option<String>,
    /// The gate's own signing keys, for routes that attest what they verified.
    pub attestation: Option<AttestationConfig>,
    /// Where every decision is recorded (one of `kafka`, `amqp`, `file`).
    pub audit: Option<AuditConfig>,
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
    /// Mirror the whole list locally while it has at most this many entries (about 150 bytes
    /// each plus the key): no lookup then waits on Redis. A larger list is looked up token by
    /// token (seen tokens cached). 0 never mirrors.
    #[serde(default = "default_mirror_max_entries")]
    pub mirror_max_entries: usize,
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

/// Live reload (`[reload]`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ReloadConfig {
    /// Also reload when the config file or a key file it names changes (checked this often;
    /// absent: only on `SIGHUP`).
    pub watch: Option<Dur>,
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
    /// While earlier messages are unconfirmed, how long a short batch of deliveries waits for
    /// more before it is decided (Kafka's `linger.ms`, on intake); `0` decides at once.
    #[serde(default = "default_linger")]
    pub linger: Dur,
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
    /// Routing key: absent keeps the source's; may use `{routing_key}` (the source's, or the
    /// Kafka topic), `{topic}` and `{key}` (the Kafka key).
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
    /// Clock skew tolerated on `exp`, `nbf`, `iat`; at most [`verify::MAX_LEEWAY_SECS`].
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
    /// Most messages taken from the source and not yet confirmed, per route (an AMQP source is
    /// also bounded by its `prefetch`).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Guard against dead-lettering everything (a wrong key, say).
    #[serde(default)]
    pub dead_letter_guard: GuardConfig,
    /// `at_least_once` (default) or `exactly_once`: Kafka -> Kafka on one cluster only, each
    /// source record's trusted or dead-letter write committed in one Kafka transaction with its
    /// source offset. Downstream consumers must read with `isolation.level=read_committed`.
    #[serde(default)]
    pub delivery: Delivery,
    /// How large an `exactly_once` route's transactions grow.
    #[serde(default)]
    pub transaction: TransactionConfig,
    /// Sign each accepted message with the gate's key (needs `[attestation]`).
    pub attest: Option<RouteAttestConfig>,
    /// Require each message to prove it belongs with its token (proof of possession).
    pub proof: Option<ProofConfig>,
    /// Let each token (`jti` per issuer) pass once: later messages with it are `replayed`
    /// (recorded in Redis: needs `[redis]`).
    #[serde(default)]
    pub single_use: bool,
}

/// The audit trail (`[audit]`): exactly one destination.
#[derive(Debug, Clone, Deserialize)]
pub struct AuditConfig {
    /// A Kafka topic.
    pub kafka: Option<KafkaSink>,
    /// An AMQP exchange.
    pub amqp: Option<AmqpSink>,
    /// A JSON-lines file, rotated by size.
    pub file: Option<AuditFileConfig>,
}

/// A JSON-lines audit file.
#[derive(Debug, Clone, Deserialize)]
pub struct AuditFileConfig {
    /// The file written to.
    pub path: PathBuf,
    /// Rotate once it holds this many bytes.
    #[serde(default = "default_audit_max_bytes")]
    pub max_bytes: u64,
    /// Rotated files kept (`path.1` newest ... `path.N`).
    #[serde(default = "default_audit_keep")]
    pub keep: u32,
    /// `fsync` after every record (else records are written to the OS at once and synced at
    /// rotation and shutdown).
    #[serde(default)]
    pub fsync: bool,
}

/// How a route binds tokens to messages (`[routes.NAME.proof]`): see the README's Proof of
/// possession section.
#[derive(Debug, Clone, Deserialize)]
pub struct ProofConfig {
    /// `jkt`: a proof header signed by the key of the token's `cnf.jkt`; `digest_claim`: the
    /// token carries the payload's SHA-256 in `claim`.
    pub mode: ProofMode,
    /// The proof header (`jkt` mode).
    #[serde(default = "default_proof_header")]
    pub header: String,
    /// How old a proof may be (`jkt` mode).
    #[serde(default = "default_proof_max_age")]
    pub max_age: Dur,
    /// The token claim holding the payload's hex SHA-256 (`digest_claim` mode).
    #[serde(default = "default_proof_claim")]
    pub claim: String,
}

/// A proof mode.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum ProofMode {
    /// DPoP-style: a proof JWS per message, by the key the token is bound to.
    Jkt,
    /// The token names the payload's digest.
    DigestClaim,
}

/// The gate's attestation signer (`[attestation]`): see the README's Attestations section.
#[derive(Debug, Clone, Deserialize)]
pub struct AttestationConfig {
    /// The `iss` of the gate's attestations (e.g. `tokengate.prod-eu`).
    pub issuer: String,
    /// How long an attestation is valid.
    #[serde(default = "default_attestation_ttl")]
    pub ttl: Dur,
    /// The `kid` of the key that signs; the others are still published (rotation).
    pub active: String,
    /// Signing keys: `[[attestation.keys]]`.
    pub keys: Vec<AttestationKeyConfig>,
}

/// One of the gate's signing keys.
#[derive(Debug, Clone, Deserialize)]
pub struct AttestationKeyConfig {
    /// Its `kid`, unique.
    pub kid: String,
    /// `EdDSA` (Ed25519) or `ES256` (P-256).
    pub algorithm: String,
    /// A PKCS#8 PEM private key, readable by the gate only.
    pub pem_file: PathBuf,
}

/// A route's attestation (`[routes.NAME.attest]`).
#[derive(Debug, Clone, Deserialize)]
pub struct RouteAttestConfig {
    /// The header it goes in; default `{header_prefix}attestation`.
    pub header: Option<String>,
    /// Verified claims carried in `identity` (paths such as `realm_access.roles`); others dropped.
    #[serde(default)]
    pub keep: Vec<String>,
    /// Claim path -> its name in `identity` (`sub = "user"`); the path must be kept.
    #[serde(default)]
    pub rename: BTreeMap<String, String>,
    /// Fixed claims added to `identity` (`env = "prod"`).
    #[serde(default)]
    pub add: BTreeMap<String, toml::Value>,
}

/// A route's delivery guarantee.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Every source message reaches trusted or dead-letter at least once (duplicates after a crash).
    #[default]
    AtLeastOnce,
    /// Every source record reaches trusted or dead-letter exactly once, as seen by a
    /// `read_committed` consumer (Kafka transactions).
    ExactlyOnce,
}

/// The size of an `exactly_once` route's transactions (`[routes.NAME.transaction]`): a
/// transaction commits when it holds `max_messages` records or is `max_time` old, whichever
/// comes first.
#[derive(Debug, Clone, Deserialize)]
pub struct TransactionConfig {
    /// Most records per transaction.
    #[serde(default = "default_transaction_messages")]
    pub max_messages: usize,
    /// Longest a transaction stays open before it commits (also the added latency, at most).
    #[serde(default = "default_transaction_time")]
    pub max_time: Dur,
}

impl Default for TransactionConfig {
    fn default() -> Self {
        TransactionConfig { max_messages: default_transaction_messages(), max_time: default_transaction_time() }
    }
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
fn default_mirror_max_entries() -> usize {
    // A million entries (every token revoked by jti over a day at ~12/s) in ~200 MB at most.
    1_000_000
}
fn default_admin_listen() -> String {
    "127.0.0.1:9900".to_owned()
}
fn default_linger() -> Dur {
    // One tick of tokio's timer: a loaded route wakes once per run of deliveries, not per message.
    Dur(Duration::from_millis(1))
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
fn default_audit_max_bytes() -> u64 {
    100 * 1024 * 1024
}
fn default_audit_keep() -> u32 {
    5
}
fn default_proof_header() -> String {
    "x-token-proof".into()
}
fn default_proof_max_age() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_proof_claim() -> String {
    "msg_sha256".into()
}
fn default_attestation_ttl() -> Dur {
    Dur(Duration::from_secs(300))
}
fn default_transaction_messages() -> usize {
    5000
}
fn default_transaction_time() -> Dur {
    Dur(Duration::from_millis(100))
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

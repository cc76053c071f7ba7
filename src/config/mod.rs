//! The TOML config: parsed, overridden from the environment, then validated into typed
//! [`Settings`] before any network I/O. `run` and `check-config` share this one path, so a file
//! passes one exactly when it passes the other. Every problem is reported at once, each with the
//! path of its field and its line.
//!
//! Environment overrides: `TOKENGATE__A__B=value` sets `a.b` (segments lowercased; a number
//! indexes an array); the value is read as TOML (`30`, `true`, `["x"]`) or else as a string.
//! Secrets are never inline: they are `{ env = "NAME" }` or `{ file = "/path" }`.
//! The file's tables and fields are documented in [`mod@file`].

pub mod file;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::Algorithm;
use lapin::types::FieldTable;
use rdkafka::ClientConfig;

use file::{Config, Delivery, KeyConfig, RouteConfig, SecretEncoding, SinkConfig, SourceConfig};
pub use file::{Dur, GuardConfig, OnUnavailable, Secret};

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
    /// The line of the field (or of the nearest table above it that the file has), if known.
    pub line: Option<usize>,
}

impl Problem {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem { path: path.into(), message: message.into(), line: None }
    }

    /// `file:line: path: message`, as compilers print it (editors jump to it).
    pub fn display(&self, file: &Path) -> String {
        let at = self.line.map_or(String::new(), |l| format!(":{l}"));
        let path = if self.path.is_empty() { "(file)" } else { &self.path };
        format!("{}{at}: {path}: {}", file.display(), self.message)
    }
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
            writeln!(f, "  {}", p.display(&self.file))?;
        }
        Ok(())
    }
}

/// Whether secrets must be present.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Secrets {
    /// Every secret is read (`run`, `check-config`).
    Require,
    /// An unset variable or a missing file is skipped and listed in
    /// [`Settings::skipped_secrets`]; everything else is checked (`check-config --without-secrets`,
    /// for CI, where the secrets do not exist). Settings loaded so cannot run.
    Skip,
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
    /// The gate's own header names (under the route's prefix).
    pub headers: crate::envelope::HeaderNames,
    /// The attestation added to accepted messages, if the route attests.
    pub attest: Option<Arc<crate::attest::RouteAttestation>>,
    /// How messages prove they belong with their token, if the route requires it.
    pub proof: Option<Arc<verify::proof::ProofSpec>>,
    /// Whether each token may pass once only ([`crate::single_use`]).
    pub single_use: bool,
}

/// A route: its rules and, if it consumes, its brokers.
pub struct RouteSettings {
    /// Verification and header rules.
    pub rules: RouteRules,
    /// Where messages come from and go; `None` for a route used only by `token verify`.
    pub io: Option<RouteIo>,
    /// Everything of the file that the running route depends on (its table, its brokers' tables,
    /// the attestation keys it signs with, the audit destination, the instance id), so that a
    /// reload restarts exactly the routes whose digest changed. Compared, never shown.
    pub digest: String,
}

/// Where a route's messages come from and go, ready to connect.
pub struct RouteIo {
    /// The source.
    pub source: SourceSettings,
    /// Where accepted messages go.
    pub trusted: SinkSettings,
    /// Where rejected messages go.
    pub dead_letter: SinkSettings,
    /// Most unconfirmed publishes at once.
    pub max_in_flight: usize,
    /// The dead-letter storm guard.
    pub guard: GuardConfig,
    /// Kafka transactions, for an `exactly_once` route.
    pub exactly_once: Option<ExactlyOnce>,
}

/// An `exactly_once` route's transactions: one transactional producer writes the trusted and the
/// dead-letter topic (with the trusted destination's config) and commits the source offsets.
#[derive(Clone, Debug)]
pub struct ExactlyOnce {
    /// The producer's `transactional.id`: `tokengate.{route}.{instance_id}`, so that a restarted
    /// instance fences its previous incarnation at once; without `instance_id`, a random suffix
    /// per process (a killed process's open transaction is then aborted by the broker after
    /// `transaction.timeout.ms`).
    pub transactional_id: String,
    /// Most records per transaction.
    pub max_messages: usize,
    /// Longest a transaction stays open.
    pub max_time: Duration,
}

/// A route's source, ready to connect.
pub enum SourceSettings {
    /// Kafka topics.
    Kafka(KafkaSourceSettings),
    /// An AMQP queue.
    Amqp(Arc<AmqpSourceSettings>),
}

/// A Kafka source: its consumer config and topics.
#[derive(Clone)]
pub struct KafkaSourceSettings {
    /// librdkafka consumer config (bootstrap, group, security, overrides), checked by librdkafka.
    pub config: ClientConfig,
    /// Topic names, or one `^regex`.
    pub topics: Vec<String>,
}

/// An AMQP source.
pub struct AmqpSourceSettings {
    /// Connection URL, credentials included.
    pub url: String,
    /// Queue name.
    pub queue: String,
    /// Declare the queue (durable) with `arguments`, else check it exists (passive).
    pub declare: bool,
    /// Declaration arguments.
    pub arguments: FieldTable,
    /// Most unacked deliveries (channel prefetch).
    pub prefetch: u16,
    /// How long a short batch waits for more while the route is busy (0: not at all).
    pub linger: Duration,
}

/// A destination, ready to connect.
pub enum SinkSettings {
    /// A Kafka topic.
    Kafka {
        /// librdkafka producer config (cluster and sink properties), checked by librdkafka.
        config: ClientConfig,
        /// The topic.
        topic: String,
    },
    /// An AMQP exchange.
    Amqp {
        /// Connection URL, credentials included.
        url: String,
        /// The exchange.
        exchange: String,
        /// The routing key template.
        routing_key: Option<String>,
    },
}

/// Where the audit trail goes.
pub enum AuditSettings {
    /// A Kafka topic or AMQP exchange.
    Broker(SinkSettings),
    /// A JSON-lines file.
    File(file::AuditFileConfig),
}

/// The revocation list's connection.
pub struct RedisSettings {
    /// Where Redis is, credentials included.
    pub info: redis::ConnectionInfo,
    /// Key prefix.
    pub prefix: String,
    /// Mirror the whole list while it has at most this many entries (0: never).
    pub mirror_max_entries: usize,
    /// What to do while Redis cannot be read.
    pub on_unavailable: OnUnavailable,
    /// The `[redis]` table and its resolved connection: a reload keeps the connection (and the
    /// mirror) while this is unchanged.
    pub digest: String,
}

/// The typed, validated result of a config file.
pub struct Settings {
    /// Issuers with their keys loaded (remote ones not yet fetched).
    pub issuers: Vec<verify::Issuer>,
    /// Cache sizes.
    pub cache: verify::CacheSettings,
    /// Routes, by name order.
    pub routes: Vec<RouteSettings>,
    /// The revocation list; `None`: tokens are not checked for revocation.
    pub redis: Option<RedisSettings>,
    /// The admin endpoint's address; `None`: disabled.
    pub admin_listen: Option<SocketAddr>,
    /// How long shutdown may take to drain and commit.
    pub shutdown_timeout: Duration,
    /// Failures in a row of a route task before the process exits.
    pub max_route_failures: u32,
    /// The gate's attestation signer (its public keys are served at `/.well-known/jwks.json`).
    pub attester: Option<Arc<crate::attest::Attester>>,
    /// Where every decision is recorded, if anywhere.
    pub audit: Option<AuditSettings>,
    /// How often to look for changed files to reload (`[reload] watch`), if at all.
    pub reload_watch: Option<Duration>,
    /// The key and secret files the config names (a change reloads when `reload_watch` is set).
    pub key_files: Vec<PathBuf>,
    /// This instance's name (`instance_id`), in audit records.
    pub instance_id: Option<String>,
    /// What a valid config does that an operator should know about (`check-config` prints these;
    /// `--strict` fails on them): passwords in URLs, secret files others can read, a public
    /// admin endpoint.
    pub warnings: Vec<Problem>,
    /// Secrets not read because [`Secrets::Skip`] was asked, with why.
    pub skipped_secrets: Vec<Problem>,
}

impl Settings {
    /// The rules of the route `name`.
    pub fn route(&self, name: &str) -> Option<&RouteRules> {
        self.routes.iter().map(|r| &r.rules).find(|r| r.name == name)
    }
}

/// The largest key, secret or JWKS file read: far above any real one, and a path such as
/// `/dev/zero` or a FIFO gives an error instead of a hang or an exhausted memory.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The longest an AMQP source's `linger` may be: it delays messages of a busy route.
const MAX_LINGER: Duration = Duration::from_millis(100);

/// Why a file the config names could not be read.
enum FileError {
    /// It does not exist.
    Missing(String),
    /// It exists and cannot be used.
    Bad(String),
}

impl FileError {
    fn message(self) -> String {
        match self {
            FileError::Missing(m) | FileError::Bad(m) => m,
        }
    }
}

/// Reads a file the config names, bounded by [`MAX_FILE_BYTES`].
fn read_file(p: &Path) -> Result<Vec<u8>, FileError> {
    use std::io::Read as _;
    let meta = std::fs::metadata(p).map_err(|e| {
        let m = format!("cannot read {}: {e}", p.display());
        if e.kind() == std::io::ErrorKind::NotFound { FileError::Missing(m) } else { FileError::Bad(m) }
    })?;
    if !meta.is_file() {
        return Err(FileError::Bad(format!("{} is not a regular file", p.display())));
    }
    let mut v = Vec::new();
    std::fs::File::open(p)
        .and_then(|f| f.take(MAX_FILE_BYTES + 1).read_to_end(&mut v))
        .map_err(|e| FileError::Bad(format!("cannot read {}: {e}", p.display())))?;
    if v.len() as u64 > MAX_FILE_BYTES {
        return Err(FileError::Bad(format!("{} is larger than {MAX_FILE_BYTES} bytes", p.display())));
    }
    Ok(v)
}

impl Secret {
    /// Reads the secret; relative file paths are resolved against `base`.
    pub fn resolve(&self, base: &Path) -> Result<Vec<u8>, String> {
        self.read(base).map_err(FileError::message)
    }

    fn read(&self, base: &Path) -> Result<Vec<u8>, FileError> {
        match self {
            Secret::Env(name) => std::env::var_os(name)
                .map(|v| v.into_encoded_bytes())
                .ok_or_else(|| FileError::Missing(format!("environment variable {name} is not set"))),
            Secret::File(p) => read_file(&base.join(p)).map(|mut v| {
                if v.last() == Some(&b'\n') {
                    v.pop(); // the newline an editor or `echo` adds
                }
                v
            }),
        }
    }
}

/// Reads, overrides from `env`, and validates a config file, every secret read.
pub fn load(path: &Path, env: &[(String, String)]) -> Result<Settings, ConfigError> {
    load_with(path, env, Secrets::Require)
}

/// [`load`], with secrets required or skipped.
pub fn load_with(path: &Path, env: &[(String, String)], secrets: Secrets) -> Result<Settings, ConfigError> {
    let fail = |problems| ConfigError { file: path.to_owned(), problems };
    let text = std::fs::read_to_string(path).map_err(|e| fail(vec![Problem::new("", format!("cannot read: {e}"))]))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_with(&text, env, base, secrets).map_err(fail)
}

/// The `TOKENGATE__*` variables of this process.
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect()
}

/// Parses and validates config text, every secret read; relative file paths are resolved
/// against `base`.
pub fn parse(text: &str, env: &[(String, String)], base: &Path) -> Result<Settings, Vec<Problem>> {
    parse_with(text, env, base, Secrets::Require)
}

/// [`parse`], with secrets required or skipped.
pub fn parse_with(
    text: &str,
    env: &[(String, String)],
    base: &Path,
    secrets: Secrets,
) -> Result<Settings, Vec<Problem>> {
    let line_of = |at: usize| text[..at.min(text.len())].matches('\n').count() + 1;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        // The message and where, never the offending line: it may hold a secret.
        let (line, at) = e.span().map_or((None, String::new()), |s| {
            let before = &text[..s.start.min(text.len())];
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            (Some(line_of(s.start)), format!("line {}, column {column}: ", line_of(s.start)))
        });
        vec![Problem { line, ..Problem::new("", format!("{at}{}", hide_values(e.message().trim()))) }]
    })?;
    let mut problems = Vec::new();
    let mut de = toml::Value::Table(table);
    for (k, v) in env {
        if let Err(m) = apply_override(&mut de, k, v) {
            problems.push(Problem::new(k.clone(), m));
        }
    }
    let mut unknown = Vec::new();
    let raw: Result<Config, _> = serde_ignored::deserialize(de, |p| unknown.push(p.to_string()));
    for p in unknown {
        problems.push(Problem::new(p, "unknown field"));
    }
    let result = match raw {
        Ok(raw) => {
            let mut c = Check { problems, secrets, skipped: Vec::new(), base };
            let mut settings = validate(&raw, &mut c);
            settings.skipped_secrets = c.skipped;
            let problems = c.problems;
            if problems.is_empty() { Ok(settings) } else { Err(problems) }
        }
        Err(e) => {
            let message = hide_values(e.to_string().trim()).replace('\n', " ");
            problems.push(Problem::new("", message));
            Err(problems)
        }
    };
    let lines = Lines::of(text);
    let place = |ps: &mut Vec<Problem>| {
        for p in ps.iter_mut().filter(|p| p.line.is_none()) {
            p.line = lines.find(&p.path);
        }
    };
    match result {
        Ok(mut s) => {
            place(&mut s.warnings);
            place(&mut s.skipped_secrets);
            Ok(s)
        }
        Err(mut ps) => {
            place(&mut ps);
            Err(ps)
        }
    }
}

/// Where each field of the file is, to give problems a line.
struct Lines<'t> {
    text: &'t str,
    root: Option<toml::Spanned<toml::de::DeTable<'t>>>,
}

impl<'t> Lines<'t> {
    fn of(text: &'t str) -> Lines<'t> {
        Lines { text, root: toml::de::DeTable::parse(text).ok() }
    }

    /// The line of the deepest part of the dotted `path` the file has.
    fn find(&self, path: &str) -> Option<usize> {
        use toml::de::DeValue;
        let root = self.root.as_ref()?;
        if path.is_empty() || path.starts_with(ENV_PREFIX) {
            return None;
        }
        let mut value: Option<&DeValue> = None;
        let mut span = None;
        for seg in path.split('.') {
            let next = match value {
                None => root.get_ref().iter().find(|(k, _)| k.get_ref().as_ref() == seg).map(|(k, v)| (k.span(), v)),
                Some(DeValue::Table(t)) => {
                    t.iter().find(|(k, _)| k.get_ref().as_ref() == seg).map(|(k, v)| (k.span(), v))
                }
                Some(DeValue::Array(a)) => seg.parse::<usize>().ok().and_then(|i| a.get(i)).map(|v| (v.span(), v)),
                Some(_) => None,
            };
            let Some((at, v)) = next else { break };
            span = Some(at);
            value = Some(v.get_ref());
        }
        span.map(|s| self.text[..s.start.min(self.text.len())].matches('\n').count() + 1)
    }
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

/// Collects problems while building typed settings.
struct Check<'b> {
    problems: Vec<Problem>,
    secrets: Secrets,
    skipped: Vec<Problem>,
    /// Directory relative file paths are resolved against.
    base: &'b Path,
}

impl Check<'_> {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem::new(path, message));
    }

    /// Reads the secret at `path`; `None` if it is missing (a problem, or skipped) or unusable.
    fn secret(&mut self, path: &str, secret: &Secret) -> Option<Vec<u8>> {
        match (secret.read(self.base), self.secrets) {
            (Ok(v), _) => Some(v),
            (Err(FileError::Missing(m)), Secrets::Skip) => {
                self.skipped.push(Problem::new(path, m));
                None
            }
            (Err(e), _) => {
                self.add(path, e.message());
                None
            }
        }
    }

    /// The secret at `path` as text (passwords, librdkafka values).
    fn secret_text(&mut self, path: &str, secret: &Secret) -> Option<String> {
        let bytes = self.secret(path, secret)?;
        String::from_utf8(bytes).map_err(|_| self.add(path, "the secret is not UTF-8")).ok()
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

    /// A librdkafka config, checked by librdkafka itself (unknown properties, bad values)
    /// without connecting. The message names the property, never its value (it may be a
    /// secret); a problem of the cluster's properties is reported once, not for every client.
    fn kafka_config(&mut self, path: &str, config: ClientConfig) -> ClientConfig {
        if let Err(e) = config.create_native_config() {
            let m = match e {
                rdkafka::error::KafkaError::ClientConfig(_, desc, key, _) => {
                    format!("librdkafka refuses {key:?}: {}", hide_values(&desc))
                }
                other => hide_values(&other.to_string()),
            };
            if !self.problems.iter().any(|p| p.message == m) {
                self.add(path, m);
            }
        }
        config
    }
}

/// Builds typed settings from the file, every problem into `c`.
fn validate(raw: &Config, c: &mut Check) -> Settings {
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
            match load_key(c, &kp, kc, &algorithms, min_rsa_bits) {
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
        if ic.leeway.0 > Duration::from_secs(verify::MAX_LEEWAY_SECS) {
            c.add(
                format!("{p}.leeway"),
                format!(
                    "at most {}s: revocations of expiring tokens are kept that long past exp",
                    verify::MAX_LEEWAY_SECS
                ),
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
                iss: Arc::from(ic.iss.as_str()),
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
    let brokers = Brokers::of(raw, c);
    let attester = raw.attestation.as_ref().and_then(|a| attester(c, a));
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
        check_route_rules(c, &p, rc);
        let rules = RouteRules {
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
            headers: crate::envelope::HeaderNames::new(&rc.header_prefix.to_ascii_lowercase()),
            attest: rc.attest.as_ref().and_then(|a| route_attestation(c, &p, rc, a, raw, attester.as_ref())),
            proof: rc.proof.as_ref().map(|pc| Arc::new(proof_spec(c, &p, rc, pc))),
            single_use: rc.single_use,
        };
        if rc.single_use && raw.redis.is_none() {
            c.add(format!("{p}.single_use"), "needs a [redis] section: uses are recorded there");
        }
        let io = route_io(c, &p, name, rc, raw, &brokers);
        let digest = route_digest(raw, rc, attester.as_ref());
        routes.push(RouteSettings { rules, io, digest });
    }
    let audit = raw.audit.as_ref().and_then(|a| audit_settings(c, a, &brokers));
    let mut redis = None;
    if let Some(r) = &raw.redis {
        let password = r.password.as_ref().and_then(|s| c.secret_text("redis.password", s));
        match connection_info(&r.url, password.as_deref()) {
            Ok(info) => {
                redis = Some(RedisSettings {
                    digest: format!("{r:?} {info:?}"),
                    info,
                    prefix: r.prefix.clone(),
                    mirror_max_entries: r.mirror_max_entries,
                    on_unavailable: r.on_unavailable,
                })
            }
            Err(e) => {
                c.add("redis.url", format!("must be redis://, rediss:// or unix:// ({})", hide_values(&e.to_string())))
            }
        }
    }
    if let Some(id) = &raw.instance_id {
        let ok = |ch: char| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-');
        if id.is_empty() || id.len() > 200 || !id.chars().all(ok) {
            c.add("instance_id", "must be 1 to 200 characters of A-Z a-z 0-9 . _ - (it names a Kafka group member)");
        }
    }
    let admin_listen = match raw.admin.listen.as_str() {
        "" => None,
        l => l
            .parse::<SocketAddr>()
            .map_err(|_| c.add("admin.listen", "must be host:port, e.g. 127.0.0.1:9900 (empty disables)"))
            .ok(),
    };
    // A verified token keeps the claims some route reads, each path once.
    let mut claims: Vec<ClaimPath> = Vec::new();
    for r in &routes {
        let attested = r.rules.attest.iter().flat_map(|a| a.keep.iter().map(|(p, _)| p.clone()));
        let proof = r.rules.proof.iter().map(|p| match &**p {
            verify::proof::ProofSpec::Jkt { .. } => verify::proof::cnf_jkt(),
            verify::proof::ProofSpec::DigestClaim(path) => path.clone(),
        });
        let reads: Vec<ClaimPath> = r
            .rules
            .policy
            .claim_paths()
            .chain(r.rules.identity_headers.iter().map(|(p, _)| p))
            .cloned()
            .chain(attested)
            .chain(proof)
            .collect();
        for p in &reads {
            if !claims.contains(p) {
                claims.push(p.clone());
            }
        }
    }
    let cache = verify::CacheSettings {
        max_entries: raw.cache.max_entries,
        ttl_without_exp: raw.cache.ttl_without_exp.0,
        claims: claims.into(),
    };
    Settings {
        issuers,
        cache,
        routes,
        redis,
        admin_listen,
        shutdown_timeout: raw.shutdown_timeout.0,
        max_route_failures: raw.max_route_failures,
        attester,
        audit,
        instance_id: raw.instance_id.clone(),
        reload_watch: raw.reload.watch.map(|d| d.0),
        key_files: key_files(raw, c.base),
        warnings: warnings(raw, c.base, admin_listen),
        skipped_secrets: Vec::new(),
    }
}

/// Connection settings from a `redis://`, `rediss://` or `unix://` URL and a password kept out of it.
fn connection_info(url: &str, password: Option<&str>) -> Result<redis::ConnectionInfo, redis::RedisError> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")) {
        return Err(redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, "unknown scheme")));
    }
    crate::revocation::connection_info(url, password)
}

/// The Kafka clusters and AMQP brokers of the file, with their secrets read.
struct Brokers {
    /// Cluster name -> bootstrap servers and cluster properties.
    kafka: BTreeMap<String, (String, Vec<(String, String)>)>,
    /// Broker name -> URL with its password.
    amqp: BTreeMap<String, String>,
}

impl Brokers {
    fn of(raw: &Config, c: &mut Check) -> Brokers {
        let mut kafka = BTreeMap::new();
        for (name, k) in &raw.kafka {
            let p = format!("kafka.{name}");
            if k.bootstrap_servers.is_empty() {
                c.add(format!("{p}.bootstrap_servers"), "must not be empty");
            }
            for prop in k.properties.keys() {
                if prop.contains("password") || prop.contains("secret") {
                    c.add(format!("{p}.properties.{prop}"), "secrets belong in secret_properties (env or file)");
                }
            }
            let mut props: Vec<(String, String)> = k.properties.clone().into_iter().collect();
            for (prop, secret) in &k.secret_properties {
                // A skipped secret still has its property set, so that librdkafka checks the rest.
                let v = c.secret_text(&format!("{p}.secret_properties.{prop}"), secret);
                props.push((prop.clone(), v.unwrap_or_default()));
            }
            c.kafka_config(&format!("{p}.properties"), client_config(&k.bootstrap_servers, &props, &[]));
            kafka.insert(name.clone(), (k.bootstrap_servers.clone(), props));
        }
        let mut amqp = BTreeMap::new();
        for (name, a) in &raw.amqp {
            let p = format!("amqp.{name}");
            let mut url = match url::Url::parse(&a.url) {
                Ok(u) if matches!(u.scheme(), "amqp" | "amqps") => u,
                _ => {
                    c.add(format!("{p}.url"), "must be an amqp:// or amqps:// URL");
                    continue;
                }
            };
            if let Some(password) = a.password.as_ref().and_then(|s| c.secret_text(&format!("{p}.password"), s))
                && url.set_password(Some(&password)).is_err()
            {
                c.add(format!("{p}.url"), "cannot carry a password (it needs a host)");
            }
            amqp.insert(name.clone(), url.to_string());
        }
        Brokers { kafka, amqp }
    }

    /// The config of a client of `cluster` with `extra` properties; `None` if there is no such cluster.
    fn kafka_config(&self, cluster: &str, extra: &std::collections::BTreeMap<String, String>) -> Option<ClientConfig> {
        let (bootstrap, props) = self.kafka.get(cluster)?;
        let extra: Vec<(String, String)> = extra.clone().into_iter().collect();
        Some(client_config(bootstrap, props, &extra))
    }
}

/// Builds a librdkafka config: cluster settings, then per-client overrides.
pub fn client_config(bootstrap: &str, cluster: &[(String, String)], extra: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    for (k, v) in cluster.iter().chain(extra) {
        c.set(k, v);
    }
    c
}

/// A route's source and destinations, typed; `None` (with problems, unless it has none of
/// them) when they cannot be built.
fn route_io(c: &mut Check, p: &str, name: &str, rc: &RouteConfig, raw: &Config, brokers: &Brokers) -> Option<RouteIo> {
    let io =
        [("source", rc.source.is_some()), ("trusted", rc.trusted.is_some()), ("dead_letter", rc.dead_letter.is_some())];
    if io.iter().any(|(_, set)| *set) {
        for (field, set) in io {
            if !set {
                c.add(format!("{p}.{field}"), "a route with a source needs source, trusted and dead_letter");
            }
        }
    }
    if rc.max_in_flight == 0 {
        c.add(format!("{p}.max_in_flight"), "must be positive");
    }
    if !(0.0..=1.0).contains(&rc.dead_letter_guard.max_ratio) {
        c.add(format!("{p}.dead_letter_guard.max_ratio"), "must be between 0 and 1");
    }
    let source = rc.source.as_ref().and_then(|s| source_settings(c, p, name, s, raw, brokers));
    let trusted = rc.trusted.as_ref().and_then(|s| sink_settings(c, &format!("{p}.trusted"), s, brokers));
    let dead_letter = rc.dead_letter.as_ref().and_then(|s| sink_settings(c, &format!("{p}.dead_letter"), s, brokers));
    if let (Some(SourceConfig::Kafka(s)), Some(SinkConfig::Kafka(t))) = (&rc.source, &rc.trusted)
        && s.cluster == t.cluster
        && s.topics.contains(&t.topic)
    {
        c.add(format!("{p}.trusted.kafka.topic"), "the trusted topic is also a source topic (a loop)");
    }
    let exactly_once = exactly_once(c, p, name, rc, raw);
    Some(RouteIo {
        source: source?,
        trusted: trusted?,
        dead_letter: dead_letter?,
        max_in_flight: rc.max_in_flight,
        guard: rc.dead_letter_guard.clone(),
        exactly_once,
    })
}

/// A route's proof-of-possession rule.
fn proof_spec(c: &mut Check, p: &str, rc: &RouteConfig, pc: &file::ProofConfig) -> verify::proof::ProofSpec {
    match pc.mode {
        file::ProofMode::Jkt => {
            let header = pc.header.to_ascii_lowercase();
            let prefix = rc.header_prefix.to_ascii_lowercase();
            if header.is_empty() || header.starts_with(&prefix) || header == rc.token.header.to_ascii_lowercase() {
                c.add(
                    format!("{p}.proof.header"),
                    "must be set, not the token header, and not start with header_prefix (those are removed)",
                );
            }
            if pc.max_age.0.is_zero() {
                c.add(format!("{p}.proof.max_age"), "must be at least 1s");
            }
            verify::proof::ProofSpec::Jkt { header, max_age: pc.max_age.0, max_bytes: rc.token.max_bytes }
        }
        file::ProofMode::DigestClaim => {
            if pc.claim.is_empty() {
                c.add(format!("{p}.proof.claim"), "must not be empty");
            }
            verify::proof::ProofSpec::DigestClaim(ClaimPath(pc.claim.clone()))
        }
    }
}

/// The gate's attestation signer: its keys read and checked.
fn attester(c: &mut Check, a: &file::AttestationConfig) -> Option<Arc<crate::attest::Attester>> {
    if a.issuer.is_empty() {
        c.add("attestation.issuer", "must not be empty (it is the iss of every attestation)");
    }
    let mut keys = Vec::new();
    for (i, k) in a.keys.iter().enumerate() {
        let p = format!("attestation.keys.{i}");
        if a.keys[..i].iter().any(|o| o.kid == k.kid) || k.kid.is_empty() {
            c.add(format!("{p}.kid"), "kids must be non-empty and unique");
        }
        let alg = match k.algorithm.as_str() {
            "EdDSA" => Algorithm::EdDSA,
            "ES256" => Algorithm::ES256,
            _ => {
                c.add(format!("{p}.algorithm"), "EdDSA or ES256");
                continue;
            }
        };
        // A private key is a secret: `--without-secrets` skips a missing one.
        if let Some(pem) = c.secret(&format!("{p}.pem_file"), &Secret::File(k.pem_file.clone())) {
            match crate::attest::SigningKey::from_pem(&k.kid, alg, &pem) {
                Ok(key) => keys.push(key),
                Err(e) => c.add(format!("{p}.pem_file"), e),
            }
        }
    }
    if !a.keys.iter().any(|k| k.kid == a.active) {
        c.add("attestation.active", "must be the kid of one of attestation.keys");
        return None;
    }
    if keys.len() != a.keys.len() {
        return None;
    }
    let ttl = a.ttl.0.as_secs() as i64;
    if ttl == 0 {
        c.add("attestation.ttl", "must be at least 1s");
    }
    crate::attest::Attester::new(a.issuer.clone(), ttl, keys, &a.active).map(Arc::new).ok()
}

/// A route's attestation: the signer, the header and the identity mapping.
fn route_attestation(
    c: &mut Check,
    p: &str,
    rc: &RouteConfig,
    a: &file::RouteAttestConfig,
    raw: &Config,
    attester: Option<&Arc<crate::attest::Attester>>,
) -> Option<Arc<crate::attest::RouteAttestation>> {
    let p = format!("{p}.attest");
    if raw.attestation.is_none() {
        c.add(p.clone(), "needs an [attestation] section with the gate's signing keys");
        return None;
    }
    for path in a.rename.keys() {
        if !a.keep.contains(path) {
            c.add(format!("{p}.rename.{path}"), "renames a claim that is not kept");
        }
    }
    let mut add = Vec::new();
    for (k, v) in &a.add {
        match serde_json::to_value(v) {
            Ok(j) => add.push((k.clone(), j)),
            Err(e) => c.add(format!("{p}.add.{k}"), e.to_string()),
        }
    }
    let header = a.header.clone().unwrap_or_else(|| format!("{}attestation", rc.header_prefix)).to_ascii_lowercase();
    if header.is_empty() || !header.starts_with(&rc.header_prefix.to_ascii_lowercase()) {
        c.add(format!("{p}.header"), "must start with the route's header_prefix (so a producer cannot forge it)");
    }
    let keep =
        a.keep.iter().map(|k| (ClaimPath(k.clone()), a.rename.get(k).cloned().unwrap_or_else(|| k.clone()))).collect();
    Some(Arc::new(crate::attest::RouteAttestation { attester: Arc::clone(attester?), header, keep, add }))
}

/// An `exactly_once` route's transactions, if it asks for them and can have them: a Kafka source
/// and Kafka destinations on one cluster, since one transaction covers one cluster's writes and
/// offsets, and one producer (the trusted destination's properties) writes both topics.
fn exactly_once(c: &mut Check, p: &str, route: &str, rc: &RouteConfig, raw: &Config) -> Option<ExactlyOnce> {
    if rc.delivery != Delivery::ExactlyOnce {
        return None;
    }
    let why = "exactly_once needs a Kafka source and Kafka trusted and dead_letter topics on one cluster: \
               a Kafka transaction covers the writes and consumer offsets of one cluster only (AMQP has no \
               transactions spanning a queue and an exchange; see the README's Delivery section)";
    match (&rc.source, &rc.trusted, &rc.dead_letter) {
        (Some(SourceConfig::Kafka(s)), Some(SinkConfig::Kafka(t)), Some(SinkConfig::Kafka(d)))
            if s.cluster == t.cluster && t.cluster == d.cluster =>
        {
            if d.properties != t.properties {
                c.add(
                    format!("{p}.dead_letter.kafka.properties"),
                    "with exactly_once one producer writes both topics: set the same properties as trusted (or none)",
                );
            }
        }
        _ => {
            c.add(format!("{p}.delivery"), why);
            return None;
        }
    }
    let t = &rc.transaction;
    if t.max_messages == 0 {
        c.add(format!("{p}.transaction.max_messages"), "must be positive");
    }
    if t.max_time.0.is_zero() || t.max_time.0 > Duration::from_secs(60) {
        c.add(format!("{p}.transaction.max_time"), "must be between 1ms and 60s");
    }
    let suffix = match &raw.instance_id {
        Some(id) => id.clone(),
        None => format!("{:016x}", rand::random::<u64>()),
    };
    Some(ExactlyOnce {
        transactional_id: format!("tokengate.{route}.{suffix}"),
        max_messages: t.max_messages,
        max_time: t.max_time.0,
    })
}

fn source_settings(
    c: &mut Check,
    p: &str,
    route: &str,
    source: &SourceConfig,
    raw: &Config,
    brokers: &Brokers,
) -> Option<SourceSettings> {
    match source {
        SourceConfig::Kafka(k) => {
            let p = format!("{p}.source.kafka");
            let topics = match (k.topics.is_empty(), &k.topic_regex) {
                (true, None) | (false, Some(_)) => {
                    c.add(p.clone(), "set topics or topic_regex (one of them)");
                    None
                }
                (_, Some(re)) => match regex::Regex::new(re) {
                    Ok(_) if re.starts_with('^') => Some(vec![re.clone()]),
                    // librdkafka takes a topic name starting with ^ as a regex.
                    Ok(_) => Some(vec![format!("^{re}")]),
                    Err(e) => {
                        c.add(format!("{p}.topic_regex"), e.to_string());
                        None
                    }
                },
                (false, None) => Some(k.topics.clone()),
            };
            if k.group.is_empty() {
                c.add(format!("{p}.group"), "must not be empty");
            }
            let Some(mut config) = brokers.kafka_config(&k.cluster, &k.properties) else {
                c.add(format!("{p}.cluster"), format!("no [kafka.{}] cluster", k.cluster));
                return None;
            };
            config.set("group.id", &k.group);
            if let Some(id) = &raw.instance_id
                && config.get("group.instance.id").is_none()
            {
                config.set("group.instance.id", format!("{id}.{route}"));
            }
            let config = c.kafka_config(&format!("{p}.properties"), config);
            Some(SourceSettings::Kafka(KafkaSourceSettings { config, topics: topics? }))
        }
        SourceConfig::Amqp(a) => {
            let p = format!("{p}.source.amqp");
            if a.queue.is_empty() || a.queue.len() > crate::amqp::MAX_SHORT_STRING {
                c.add(format!("{p}.queue"), "must be 1 to 255 bytes (an AMQP short string)");
            }
            if a.prefetch == 0 {
                c.add(format!("{p}.prefetch"), "must be positive (0 would mean unbounded)");
            }
            if a.linger.0 > MAX_LINGER {
                c.add(format!("{p}.linger"), format!("must be at most {}", humantime::format_duration(MAX_LINGER)));
            }
            let mut arguments = FieldTable::default();
            for (k, v) in &a.arguments {
                if k.len() > crate::amqp::MAX_SHORT_STRING {
                    c.add(format!("{p}.arguments.{k}"), "names are at most 255 bytes (AMQP short strings)");
                    continue;
                }
                match crate::amqp::value(v) {
                    Ok(v) => {
                        arguments.insert(k.as_str().into(), v);
                    }
                    Err(m) => c.add(format!("{p}.arguments.{k}"), m),
                }
            }
            let Some(url) = brokers.amqp.get(&a.broker) else {
                if !raw.amqp.contains_key(&a.broker) {
                    c.add(format!("{p}.broker"), format!("no [amqp.{}] broker", a.broker));
                }
                return None;
            };
            Some(SourceSettings::Amqp(Arc::new(AmqpSourceSettings {
                url: url.clone(),
                queue: a.queue.clone(),
                declare: a.declare,
                arguments,
                prefetch: a.prefetch,
                linger: a.linger.0,
            })))
        }
    }
}

/// See [`RouteSettings::digest`].
fn route_digest(raw: &Config, rc: &RouteConfig, attester: Option<&Arc<crate::attest::Attester>>) -> String {
    let mut kafka = Vec::new();
    let mut amqp = Vec::new();
    match &rc.source {
        Some(SourceConfig::Kafka(k)) => kafka.push(&k.cluster),
        Some(SourceConfig::Amqp(a)) => amqp.push(&a.broker),
        None => {}
    }
    for sink in [&rc.trusted, &rc.dead_letter].into_iter().flatten() {
        match sink {
            SinkConfig::Kafka(k) => kafka.push(&k.cluster),
            SinkConfig::Amqp(a) => amqp.push(&a.broker),
        }
    }
    let brokers: Vec<String> = kafka
        .iter()
        .map(|n| format!("{:?}", raw.kafka.get(*n)))
        .chain(amqp.iter().map(|n| format!("{:?}", raw.amqp.get(*n))))
        .collect();
    let attest = rc.attest.as_ref().and(attester).map(|a| a.jwks().to_string());
    format!(
        "{rc:?}\n{brokers:?}\n{attest:?}\n{:?}\n{:?}\n{:?} {:?}",
        raw.audit, raw.instance_id, raw.shutdown_timeout, raw.max_route_failures
    )
}

/// The `[audit]` destination: exactly one of `kafka`, `amqp`, `file`.
fn audit_settings(c: &mut Check, a: &file::AuditConfig, brokers: &Brokers) -> Option<AuditSettings> {
    match (&a.kafka, &a.amqp, &a.file) {
        (Some(k), None, None) => {
            sink_settings(c, "audit", &SinkConfig::Kafka(k.clone()), brokers).map(AuditSettings::Broker)
        }
        (None, Some(q), None) => {
            sink_settings(c, "audit", &SinkConfig::Amqp(q.clone()), brokers).map(AuditSettings::Broker)
        }
        (None, None, Some(f)) => {
            if f.max_bytes < 4096 {
                c.add("audit.file.max_bytes", "must be at least 4096");
            }
            if f.path.as_os_str().is_empty() {
                c.add("audit.file.path", "must not be empty");
            }
            Some(AuditSettings::File(f.clone()))
        }
        _ => {
            c.add("audit", "set exactly one of kafka, amqp, file");
            None
        }
    }
}

fn sink_settings(c: &mut Check, p: &str, sink: &SinkConfig, brokers: &Brokers) -> Option<SinkSettings> {
    match sink {
        SinkConfig::Kafka(k) => {
            if k.topic.is_empty() {
                c.add(format!("{p}.kafka.topic"), "must not be empty");
            }
            let Some(config) = brokers.kafka_config(&k.cluster, &k.properties) else {
                c.add(format!("{p}.kafka.cluster"), format!("no [kafka.{}] cluster", k.cluster));
                return None;
            };
            let config = c.kafka_config(&format!("{p}.kafka.properties"), config);
            Some(SinkSettings::Kafka { config, topic: k.topic.clone() })
        }
        SinkConfig::Amqp(a) => {
            if a.exchange.len() > crate::amqp::MAX_SHORT_STRING {
                c.add(format!("{p}.amqp.exchange"), "must be at most 255 bytes (an AMQP short string)");
            }
            let Some(url) = brokers.amqp.get(&a.broker) else {
                c.add(format!("{p}.amqp.broker"), format!("no [amqp.{}] broker", a.broker));
                return None;
            };
            Some(SinkSettings::Amqp {
                url: url.clone(),
                exchange: a.exchange.clone(),
                routing_key: a.routing_key.clone(),
            })
        }
    }
}

/// The header rules of a route.
fn check_route_rules(c: &mut Check, p: &str, rc: &RouteConfig) {
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

/// The files holding keys and secrets of issuers and attestations, as read.
fn key_files(raw: &Config, base: &Path) -> Vec<PathBuf> {
    let issuers = raw.issuers.values().flat_map(|ic| ic.keys.iter()).flat_map(|k| {
        let secret = match &k.secret {
            Some(Secret::File(f)) => Some(f),
            _ => None,
        };
        [secret, k.pem_file.as_ref(), k.jwks_file.as_ref()].into_iter().flatten()
    });
    let attestation = raw.attestation.iter().flat_map(|a| a.keys.iter().map(|k| &k.pem_file));
    issuers.chain(attestation).map(|f| base.join(f)).collect()
}

/// What a valid config does that an operator should know about.
fn warnings(raw: &Config, base: &Path, admin: Option<SocketAddr>) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut warn = |path: String, message: &str| out.push(Problem::new(path, message));
    let inline_password = |u: &str| url::Url::parse(u).is_ok_and(|u| u.password().is_some());
    for (name, a) in &raw.amqp {
        if inline_password(&a.url) {
            warn(format!("amqp.{name}.url"), "holds a password; put it in password = { env = ... } or { file = ... }");
        }
    }
    if let Some(r) = &raw.redis
        && inline_password(&r.url)
    {
        warn("redis.url".into(), "holds a password; put it in password = { env = ... } or { file = ... }");
    }
    for (name, k) in &raw.kafka {
        for prop in k.properties.keys().filter(|p| p.contains("jaas") || p.contains("credentials")) {
            warn(format!("kafka.{name}.properties.{prop}"), "may hold credentials; use secret_properties");
        }
    }
    let mut secret_files: Vec<(String, &PathBuf)> = Vec::new();
    for (name, ic) in &raw.issuers {
        for (i, k) in ic.keys.iter().enumerate() {
            if let Some(Secret::File(f)) = &k.secret {
                secret_files.push((format!("issuers.{name}.keys.{i}.secret"), f));
            }
        }
    }
    for (name, a) in &raw.amqp {
        if let Some(Secret::File(f)) = &a.password {
            secret_files.push((format!("amqp.{name}.password"), f));
        }
    }
    if let Some(Some(Secret::File(f))) = raw.redis.as_ref().map(|r| &r.password) {
        secret_files.push(("redis.password".into(), f));
    }
    for (name, k) in &raw.kafka {
        for (prop, sec) in &k.secret_properties {
            if let Secret::File(f) = sec {
                secret_files.push((format!("kafka.{name}.secret_properties.{prop}"), f));
            }
        }
    }
    for (i, k) in raw.attestation.iter().flat_map(|a| a.keys.iter()).enumerate() {
        secret_files.push((format!("attestation.keys.{i}.pem_file"), &k.pem_file));
    }
    #[cfg(unix)]
    for (path, f) in secret_files {
        use std::os::unix::fs::PermissionsExt as _;
        if std::fs::metadata(base.join(f)).is_ok_and(|m| m.permissions().mode() & 0o077 != 0) {
            warn(path, "the secret file is readable or writable by group or others; chmod 600 it");
        }
    }
    if admin.is_some_and(|a| !a.ip().is_loopback()) {
        warn(
            "admin.listen".into(),
            "is reachable from other hosts; /metrics and /ready are unauthenticated (bind 127.0.0.1 unless a proxy or network policy guards it)",
        );
    }
    out
}

fn load_key(
    c: &mut Check,
    path: &str,
    kc: &KeyConfig,
    issuer_algs: &[Algorithm],
    min_rsa_bits: usize,
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
        let Some(bytes) = c.secret(&format!("{path}.secret"), secret) else {
            return Ok(Vec::new()); // reported, or skipped
        };
        let bytes = match kc.secret_encoding {
            SecretEncoding::Raw => bytes,
            SecretEncoding::Base64 => decode_base64(&bytes)?,
        };
        return verify::keys::hmac(kc.kid.clone(), &bytes, &allowed).map(|k| vec![k]);
    }
    if let Some(f) = &kc.pem_file {
        let pem = read_file(&c.base.join(f)).map_err(FileError::message)?;
        return verify::keys::pem(kc.kid.clone(), &pem, &allowed, min_rsa_bits).map(|k| vec![k]);
    }
    let f = c.base.join(kc.jwks_file.as_ref().expect("one source is set"));
    let doc = read_file(&f).map_err(FileError::message)?;
    let (mut keys, skipped) = verify::keys::jwks(&doc, &allowed, true, min_rsa_bits)?;
    for s in skipped {
        tracing::warn!(file = %f.display(), skipped = %s, "JWKS key skipped");
    }
    // A kid on a jwks_file entry picks that one key of the file.
    if let Some(kid) = &kc.kid {
        keys.retain(|k| k.kid.as_deref() == Some(kid.as_str()));
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
        assert_eq!(s.routes[0].rules.policy.equals[0].1, serde_json::json!("acme"));
        assert_eq!(s.issuers[0].checks.leeway, 30);
        let more = format!(
            "{GOOD}\nidentity_headers = {{ sub = \"x-sub\", tenant = \"x-tenant\" }}\n[routes.audit]\nrequire = [{{ claim = \"realm_access.roles\", any_of = [\"auditor\"] }}]\n"
        );
        let s = parse(&more, &[], Path::new(".")).ok().unwrap();
        let mut kept: Vec<&str> = s.cache.claims.iter().map(|p| p.0.as_str()).collect();
        kept.sort();
        assert_eq!(kept, ["realm_access.roles", "scope", "sub", "tenant"], "what routes read, each once");
    }

    #[test]
    fn an_amqp_source_lingers_a_millisecond_by_default_and_at_most_100_ms() {
        // SAFETY: tests in this module are the only readers of this variable.
        unsafe { std::env::set_var("TG_TEST_SECRET_CFG", "0123456789abcdef0123456789abcdef") };
        let with = |linger: &str| {
            format!(
                "{GOOD}\n[amqp.r]\nurl = \"amqp://127.0.0.1:5672/%2f\"\n[routes.q]\nsource = {{ amqp = {{ broker = \"r\", queue = \"in\"{linger} }} }}\n\
                 trusted = {{ amqp = {{ broker = \"r\", exchange = \"ok\" }} }}\ndead_letter = {{ amqp = {{ broker = \"r\", exchange = \"dl\" }} }}\n"
            )
        };
        let linger = |text: &str| {
            let s = parse(text, &[], Path::new(".")).unwrap_or_else(|p| panic!("{p:?}"));
            let route = s.routes.iter().find(|r| r.rules.name == "q").expect("route q");
            match route.io.as_ref().map(|io| &io.source) {
                Some(SourceSettings::Amqp(a)) => a.linger,
                _ => panic!("an AMQP source"),
            }
        };
        assert_eq!(linger(&with("")), Duration::from_millis(1));
        assert_eq!(linger(&with(", linger = 0")), Duration::ZERO);
        assert_eq!(linger(&with(", linger = \"20ms\"")), Duration::from_millis(20));
        let refused = problems(&with(", linger = \"1s\""), &[]);
        assert!(
            refused.iter().any(|p| p.path == "routes.q.source.amqp.linger" && p.message.contains("at most 100ms")),
            "{refused:?}"
        );
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
        assert_eq!(kids, vec![Some(Arc::from("rsa"))]);
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
        assert_eq!(s.routes[0].rules.token.header, "x-token");
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
        assert_eq!(got[0].path, "issuers.local.keys.0.secret");
        assert!(got[0].message.contains("TG_TEST_SECRET_UNSET_XYZ"));
    }
}

//! The command line: parses arguments and maps results to exit codes.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use jsonwebtoken::Algorithm;
use serde_json::{Map, Value};

use crate::revocation::edit;
use crate::{config, ops, verify};

/// Exit code for "the tool itself failed" (bad input, unreachable service).
const EXIT_TOOL_ERROR: u8 = 2;

/// tokengate: per-message JWT verification for Kafka and RabbitMQ.
#[derive(Debug, Parser)]
#[command(name = "tokengate", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gate: consume every route's source, verify, republish; stop on SIGINT/SIGTERM.
    Run {
        /// The TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Show the gate working on an embedded Kafka (nothing needs to be running).
    Demo,
    /// Validate a config file: exit 0, or print every problem and exit 78 (EX_CONFIG).
    CheckConfig {
        /// The TOML config file.
        file: PathBuf,
        /// Fail on warnings too (inline passwords, readable secret files, a public admin endpoint).
        #[arg(long)]
        strict: bool,
        /// Check everything but the presence of secrets: an unset `{ env = ... }` variable or a
        /// missing `{ file = ... }` is listed as skipped, not a problem (for CI without secrets).
        #[arg(long)]
        without_secrets: bool,
    },
    /// Token tools for producers and operators.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Revoke a token, a subject's tokens or a signing key, in Redis (all instances obey at once).
    Revoke {
        /// What to revoke.
        #[command(flatten)]
        selector: SelectorArgs,
        /// With --sub: revoke tokens issued at or before this time (unix seconds, RFC 3339, now).
        #[arg(long, requires = "sub")]
        before: Option<String>,
        /// Why (stored as the value; shown in dead-letter details).
        #[arg(long, default_value = "revoked by operator")]
        reason: String,
        /// Drop the entry after this long (e.g. 2h). Default: a token's remaining lifetime,
        /// 24h for a bare --jti/--fp, forever for --sub and --kid.
        #[arg(long, conflicts_with = "until")]
        ttl: Option<humantime::Duration>,
        /// Drop the entry at this time (unix seconds or RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Redis connection.
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Remove a revocation (same selectors as revoke).
    Unrevoke {
        /// What to unrevoke.
        #[command(flatten)]
        selector: SelectorArgs,
        /// Redis connection.
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// List or check revocations.
    #[command(subcommand)]
    Revocations(RevocationsCommand),
    /// Work with a route's dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
}

/// Dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Re-drive dead letters back to the topic or queue they were read from (the original
    /// headers restored, the gate's removed), once their cause is fixed. Needs the route's
    /// `token.keep_in_dead_letters = true` (redacted tokens cannot pass again; they are counted).
    /// Nothing is removed from the dead-letter destination unless --delete (AMQP) is given.
    Replay {
        /// The gate's config file (the route's dead-letter destination and header names).
        #[arg(long)]
        config: PathBuf,
        /// The route whose dead letters to replay.
        #[arg(long)]
        route: String,
        /// AMQP: the queue the dead-letter exchange delivers to.
        #[arg(long)]
        queue: Option<String>,
        /// Only dead letters with this reason code (repeatable), e.g. unknown_kid.
        #[arg(long = "reason")]
        reasons: Vec<String>,
        /// Only dead letters rejected at or after this time (unix seconds, RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only dead letters rejected before this time.
        #[arg(long)]
        until: Option<String>,
        /// At most this many.
        #[arg(long)]
        max: Option<u64>,
        /// Show what would be replayed; publish nothing.
        #[arg(long)]
        dry_run: bool,
        /// AMQP: remove each replayed message from the dead-letter queue once its republish is
        /// confirmed (default: every message goes back to the queue).
        #[arg(long)]
        delete: bool,
    },
}

/// Which revocation entry (exactly one).
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct SelectorArgs {
    /// A token's jti.
    #[arg(long)]
    pub jti: Option<String>,
    /// A subject (sub claim): all its tokens issued at or before --before (default now).
    #[arg(long)]
    pub sub: Option<String>,
    /// A signing key id: every token it signed.
    #[arg(long)]
    pub kid: Option<String>,
    /// A token fingerprint (64 hex digits, as in logs and dead-letter headers).
    #[arg(long)]
    pub fp: Option<String>,
    /// A whole token (or - for stdin): its jti, or its fingerprint if it has none.
    #[arg(long)]
    pub token: Option<String>,
    /// Many at once (revoke only), from a file (or - for stdin): one per line, `jti:<id>`,
    /// `sub:<id>`, `kid:<id>`, `fp:<hex>` or a whole token; `#` comments and blank lines skipped.
    /// Every line is checked before anything is written.
    #[arg(long)]
    pub from_file: Option<PathBuf>,
}

impl SelectorArgs {
    fn selector(self) -> anyhow::Result<edit::Selector> {
        Ok(match self {
            SelectorArgs { jti: Some(j), .. } => edit::Selector::Jti(j),
            SelectorArgs { sub: Some(s), .. } => edit::Selector::Sub(s),
            SelectorArgs { kid: Some(k), .. } => edit::Selector::Kid(k),
            SelectorArgs { fp: Some(f), .. } => edit::Selector::Fp(f),
            SelectorArgs { token: Some(t), .. } => edit::Selector::Token(read_token(&t)?),
            SelectorArgs { from_file: Some(_), .. } => anyhow::bail!("--from-file works with revoke only"),
            _ => anyhow::bail!("give one of --jti, --sub, --kid, --fp, --token"),
        })
    }
}

/// Where the revocation list is.
#[derive(Debug, Args)]
pub struct RedisArgs {
    /// Redis URL: `redis://[user:password@]host:port/db`, rediss:// for TLS.
    #[arg(
        long = "redis",
        env = "TOKENGATE_REDIS_URL",
        default_value = "redis://127.0.0.1:6379",
        hide_env_values = true
    )]
    pub url: String,
    /// Key prefix.
    #[arg(long, env = "TOKENGATE_REDIS_PREFIX", default_value = crate::revocation::DEFAULT_PREFIX)]
    pub prefix: String,
}

/// `tokengate revocations ...`
#[derive(Debug, Subcommand)]
pub enum RevocationsCommand {
    /// List revocations (SCAN, never KEYS).
    List {
        /// Only this kind: jti, sub, kid or fp.
        #[arg(long)]
        kind: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Redis connection.
        #[command(flatten)]
        redis: RedisArgs,
    },
    /// Say whether and why a token is revoked: exit 0 not revoked, 1 revoked, 2 error.
    Check {
        /// The token, or - for stdin.
        token: String,
        /// Verify the token with this config first, so that the kid checked is the verifying
        /// key's (as the gate does), not the unverified header's.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Redis connection.
        #[command(flatten)]
        redis: RedisArgs,
    },
}

/// `tokengate token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a signed token.
    Mint(MintArgs),
    /// Decode a token WITHOUT verifying it; prints header, claims, fingerprint, time left.
    Inspect {
        /// The token, or `-` to read it from stdin.
        token: String,
    },
    /// Decide a token as a route would: prints JSON; exit 0 accept, 1 reject, 2 tool error.
    Verify {
        /// The TOML config file.
        #[arg(long)]
        config: PathBuf,
        /// The route whose token spec and policy apply (default: any issuer, no policy).
        #[arg(long)]
        route: Option<String>,
        /// The token, or `-` to read it from stdin.
        token: String,
    },
    /// Get an access token from an OAuth 2.0 token endpoint (client credentials) for a producer;
    /// prints it, or writes it to `--out`. With `--cache`, a token is reused until shortly
    /// before it expires.
    Fetch(FetchArgs),
    /// Make a proof of possession for one message: a JWS by the producer's key over the message
    /// key and payload digests, for the route's `proof.header`.
    Proof(ProofArgs),
    /// Check a gate's attestation together with its message, as a downstream consumer would:
    /// signature by the JWKS, expiry, and the message key and payload digests. Prints its claims
    /// as JSON; exit 0 valid, 1 invalid, 2 tool error.
    VerifyAttestation {
        /// The gate's JWKS: an `http(s)://` URL (its `/.well-known/jwks.json`) or a file.
        #[arg(long)]
        jwks: String,
        /// The message payload, from this file (`-` for stdin).
        #[arg(long, value_name = "FILE")]
        payload_file: PathBuf,
        /// The message key (Kafka), as text; none if absent.
        #[arg(long)]
        key: Option<String>,
        /// The attestation header's value.
        attestation: String,
    },
}

/// Arguments of `token mint`.
#[derive(Debug, Args)]
pub struct MintArgs {
    /// Algorithm: HS256/384/512, RS256/384/512, PS256/384/512, ES256, ES384, EdDSA.
    #[arg(long, default_value = "HS256")]
    pub alg: String,
    /// HMAC secret from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub secret_env: Option<String>,
    /// HMAC secret from this file.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// The HMAC secret is base64.
    #[arg(long)]
    pub secret_base64: bool,
    /// PEM private key (PKCS#8 for EC and Ed25519) for RS*, PS*, ES*, EdDSA.
    #[arg(long, value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// Header kid.
    #[arg(long)]
    pub kid: Option<String>,
    /// Header typ, e.g. at+jwt.
    #[arg(long)]
    pub typ: Option<String>,
    /// iss claim.
    #[arg(long)]
    pub iss: Option<String>,
    /// aud claim (repeat for several).
    #[arg(long)]
    pub aud: Vec<String>,
    /// sub claim.
    #[arg(long)]
    pub sub: Option<String>,
    /// A role for the roles array (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub role: Vec<String>,
    /// A scope for the space-delimited scope claim (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub scope: Vec<String>,
    /// Extra claim NAME=VALUE; VALUE is JSON if it parses, else a string.
    #[arg(long = "claim", value_name = "NAME=VALUE")]
    pub claims: Vec<String>,
    /// Lifetime, e.g. 15m, 1h; exp = now + ttl.
    #[arg(long, default_value = "1h")]
    pub ttl: humantime::Duration,
    /// Leave exp out entirely.
    #[arg(long)]
    pub no_exp: bool,
    /// Leave jti out.
    #[arg(long)]
    pub no_jti: bool,
    /// Pretend the time is this unix second (for making expired or future tokens).
    #[arg(long)]
    pub now: Option<i64>,
    /// Bind the token to this producer key (a PKCS#8 PEM, P-256 or Ed25519): adds `cnf.jkt`,
    /// its RFC 7638 thumbprint, for routes with `proof.mode = "jkt"`.
    #[arg(long, value_name = "FILE")]
    pub cnf_key_file: Option<PathBuf>,
    /// Bind the token to this payload: adds its hex SHA-256 as `--digest-claim`, for routes
    /// with `proof.mode = "digest_claim"`.
    #[arg(long, value_name = "FILE")]
    pub payload_file: Option<PathBuf>,
    /// The claim that carries the payload digest.
    #[arg(long, default_value = "msg_sha256")]
    pub digest_claim: String,
}

/// Arguments of `token fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// The token endpoint, e.g. `https://idp.example/realms/x/protocol/openid-connect/token`.
    #[arg(long)]
    pub token_url: String,
    /// The client id.
    #[arg(long)]
    pub client_id: String,
    /// The client secret from this environment variable.
    #[arg(long, value_name = "VAR")]
    pub client_secret_env: Option<String>,
    /// The client secret from this file.
    #[arg(long, value_name = "FILE")]
    pub client_secret_file: Option<PathBuf>,
    /// How a secret is sent: `basic` (client_secret_basic, default) or `post` (client_secret_post).
    #[arg(long, default_value = "basic")]
    pub auth: String,
    /// private_key_jwt (RFC 7523) instead of a secret: the client's PEM private key.
    #[arg(long, value_name = "FILE")]
    pub private_key_file: Option<PathBuf>,
    /// The private key's algorithm.
    #[arg(long, default_value = "RS256")]
    pub alg: String,
    /// The private key's kid, if the server needs one.
    #[arg(long)]
    pub kid: Option<String>,
    /// A scope to ask for (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub scope: Vec<String>,
    /// The `audience` parameter (Auth0 and others).
    #[arg(long)]
    pub audience: Option<String>,
    /// Write the token to this file (mode 0600) instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Cache the token in this file (mode 0600) and reuse it while it has more than
    /// `--min-remaining` left.
    #[arg(long, value_name = "FILE")]
    pub cache: Option<PathBuf>,
    /// Fetch a new token when the cached one has less than this left.
    #[arg(long, default_value = "60s")]
    pub min_remaining: humantime::Duration,
}

/// Arguments of `token proof`.
#[derive(Debug, Args)]
pub struct ProofArgs {
    /// ES256 or EdDSA.
    #[arg(long, default_value = "ES256")]
    pub alg: String,
    /// The producer's PKCS#8 PEM private key (the one the token's `cnf.jkt` names).
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
    /// The message payload, from this file.
    #[arg(long, value_name = "FILE")]
    pub payload_file: PathBuf,
    /// The message key (Kafka), as text; none if absent.
    #[arg(long)]
    pub key: Option<String>,
    /// The proof's jti (default: random).
    #[arg(long)]
    pub jti: Option<String>,
    /// Pretend the time is this unix second.
    #[arg(long)]
    pub now: Option<i64>,
}

/// EX_CONFIG from sysexits.h: the config is wrong, and restarting will not help.
const EX_CONFIG: u8 = 78;

/// Runs the command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_TOOL_ERROR);
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_TOOL_ERROR)
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => {
            let settings = match config::load(&config, &config::process_env()) {
                Ok(s) => s,
                Err(e) => {
                    eprint!("{e}");
                    return Ok(ExitCode::from(EX_CONFIG));
                }
            };
            crate::reload::run(settings, &config).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            crate::demo::run().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { file, strict, without_secrets } => {
            let secrets = if without_secrets { config::Secrets::Skip } else { config::Secrets::Require };
            match config::load_with(&file, &config::process_env(), secrets) {
                Ok(s) => Ok(checked(&file, &s, strict)),
                Err(e) => {
                    eprint!("{e}");
                    Ok(ExitCode::from(EX_CONFIG))
                }
            }
        }
        Command::DeadLetters(DeadLettersCommand::Replay {
            config: file,
            route,
            queue,
            reasons,
            since,
            until,
            max,
            dry_run,
            delete,
        }) => {
            let settings = match config::load(&file, &config::process_env()) {
                Ok(s) => s,
                Err(e) => {
                    eprint!("{e}");
                    return Ok(ExitCode::from(EX_CONFIG));
                }
            };
            let rs = settings.routes.iter().find(|r| r.rules.name == route);
            let rs = rs.with_context(|| format!("no route {route:?} in {}", file.display()))?;
            let io = rs.io.as_ref().with_context(|| format!("route {route:?} has no dead_letter destination"))?;
            for r in &reasons {
                anyhow::ensure!(
                    verify::Reason::ALL.iter().any(|k| k.code() == r),
                    "--reason {r:?} is not a reason code (README: Reason codes)"
                );
            }
            let now = verify::unix_now();
            let filter = crate::dead_letters::Filter {
                reasons,
                since: since.map(|t| ops::parse_time(&t, now)).transpose()?,
                until: until.map(|t| ops::parse_time(&t, now)).transpose()?,
                max,
            };
            let report =
                crate::dead_letters::replay(&rs.rules, &io.dead_letter, queue.as_deref(), &filter, dry_run, delete)
                    .await?;
            let verb = if dry_run { "would replay" } else { "replayed" };
            println!(
                "{verb} {} of {} dead letters read ({} of route {route} selected; {} with a redacted token and {} without a source left alone; {} deleted)",
                report.replayed, report.scanned, report.matched, report.redacted, report.no_source, report.deleted
            );
            for (to, n) in &report.to {
                println!("  {n} -> {to}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Revoke { selector: SelectorArgs { from_file: Some(file), .. }, before, reason, ttl, until, redis } => {
            anyhow::ensure!(
                before.is_none() && ttl.is_none() && until.is_none(),
                "--from-file takes each entry's default expiry (a token's lifetime, 24h for jti/fp, none for sub/kid) and revokes subjects as of now"
            );
            let text = if file.as_os_str() == "-" {
                let mut s = String::new();
                std::io::stdin().read_to_string(&mut s).context("reading stdin")?;
                s
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
            };
            let selectors = match edit::parse_selectors(&text) {
                Ok(s) => s,
                Err(bad) => {
                    for b in &bad {
                        eprintln!("{}: {b}", file.display());
                    }
                    anyhow::bail!("{} bad line(s) in {}; nothing revoked", bad.len(), file.display());
                }
            };
            let mut conn = edit::redis_connect(&redis.url).await?;
            let mut progress = crate::progress::Progress::new("revoking", Some(selectors.len() as u64));
            let now = verify::unix_now();
            let written =
                edit::revoke_many(&mut conn, &redis.prefix, &selectors, &reason, now, |n| progress.add(n)).await?;
            progress.finish();
            println!("revoked {written} entries from {} lines of {}", selectors.len(), file.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Revoke { selector, before, reason, ttl, until, redis } => {
            let now = verify::unix_now();
            let before = before.map(|b| ops::parse_time(&b, now)).transpose()?;
            let expiry = match (ttl, until) {
                (Some(t), _) => edit::Expiry::Ttl(t.into()),
                (None, Some(u)) => edit::Expiry::Until(ops::parse_time(&u, now)?),
                (None, None) => edit::Expiry::Default,
            };
            let selector = selector.selector()?;
            let mut conn = edit::redis_connect(&redis.url).await?;
            for w in edit::revoke(&mut conn, &redis.prefix, &selector, before, &reason, expiry, now).await? {
                let ttl = w.ttl_secs.map_or("no expiry".to_owned(), |t| format!("expires in {t}s"));
                println!("revoked {} {:?} ({ttl}): {}", w.kind.name(), w.id, w.key.escape_debug());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Unrevoke { selector, redis } => {
            let selector = selector.selector()?;
            let mut conn = edit::redis_connect(&redis.url).await?;
            let removed = edit::unrevoke(&mut conn, &redis.prefix, &selector, verify::unix_now()).await?;
            if removed.is_empty() {
                println!("nothing to unrevoke");
            }
            for k in removed {
                println!("unrevoked {}", k.escape_debug());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Revocations(RevocationsCommand::List { kind, json, redis }) => {
            let kind = kind
                .map(|k| {
                    crate::revocation::Kind::parse(&k)
                        .with_context(|| format!("unknown kind {k:?} (jti, sub, kid, fp)"))
                })
                .transpose()?;
            let mut conn = edit::redis_connect(&redis.url).await?;
            let all = edit::list(&mut conn, &redis.prefix, kind).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                println!("{:<4} {:<40} {:>8}  VALUE", "KIND", "ID", "TTL");
                for w in all {
                    let ttl = w.ttl_secs.map_or("-".to_owned(), |t| t.to_string());
                    println!(
                        "{:<4} {:<40} {:>8}  {}",
                        w.kind.name(),
                        w.id.escape_debug().to_string(),
                        ttl,
                        w.value.escape_debug()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Revocations(RevocationsCommand::Check { token, config, redis }) => {
            let token = read_token(&token)?;
            let verified_kid = match &config {
                Some(file) => {
                    let (accepted, v) = ops::verify_token(file, None, &token, verify::unix_now()).await?;
                    anyhow::ensure!(accepted, "the token does not verify with {}: {v}", file.display());
                    Some(v["kid"].as_str().map(str::to_owned))
                }
                None => None,
            };
            let mut conn = edit::redis_connect(&redis.url).await?;
            let (revoked, out) = edit::check_revoked(&mut conn, &redis.prefix, &token, verified_kid).await?;
            println!("{out}");
            Ok(if revoked { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Token(TokenCommand::Mint(args)) => {
            println!("{}", mint(args)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Inspect { token }) => {
            let token = read_token(&token)?;
            println!("{}", serde_json::to_string_pretty(&ops::inspect(&token, verify::unix_now())?)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Fetch(a)) => {
            let secret =
                secret_arg(&a.client_secret_env, &a.client_secret_file, "--client-secret-env or --client-secret-file")?
                    .map(|b| String::from_utf8_lossy(&b).trim().to_owned());
            let auth = match (secret, &a.private_key_file, a.auth.as_str()) {
                (Some(s), None, "basic") => ops::ClientAuth::SecretBasic(s),
                (Some(s), None, "post") => ops::ClientAuth::SecretPost(s),
                (None, Some(f), _) => {
                    let alg: Algorithm = a.alg.parse().map_err(|_| anyhow::anyhow!("unknown algorithm {:?}", a.alg))?;
                    let pem = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
                    ops::ClientAuth::PrivateKeyJwt {
                        key: ops::signing_key(alg, None, Some(&pem))?,
                        alg,
                        kid: a.kid.clone(),
                    }
                }
                (Some(_), None, other) => anyhow::bail!("--auth is basic or post, not {other:?}"),
                (Some(_), Some(_), _) => anyhow::bail!("give a client secret or --private-key-file, not both"),
                (None, None, _) => {
                    anyhow::bail!("give --client-secret-env, --client-secret-file or --private-key-file")
                }
            };
            let fetch = ops::Fetch {
                token_url: a.token_url,
                client_id: a.client_id,
                auth,
                scopes: a.scope,
                audience: a.audience,
            };
            let min = std::time::Duration::from(a.min_remaining).as_secs() as i64;
            let (token, cached) = ops::fetch_cached(&fetch, a.cache.as_deref(), min, verify::unix_now()).await?;
            match &a.out {
                Some(path) => {
                    ops::write_private(path, token.as_bytes())
                        .with_context(|| format!("writing {}", path.display()))?;
                    let fp = verify::fingerprint(&token);
                    eprintln!(
                        "token {} ({}; fingerprint {fp})",
                        if cached { "reused from the cache" } else { "fetched" },
                        path.display()
                    );
                }
                None => println!("{token}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Proof(a)) => {
            let alg: Algorithm = a.alg.parse().map_err(|_| anyhow::anyhow!("unknown algorithm {:?}", a.alg))?;
            let pem = std::fs::read(&a.key_file).with_context(|| format!("reading {}", a.key_file.display()))?;
            let key = crate::attest::SigningKey::from_pem("producer", alg, &pem).map_err(anyhow::Error::msg)?;
            let payload =
                std::fs::read(&a.payload_file).with_context(|| format!("reading {}", a.payload_file.display()))?;
            let jti = a.jti.unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
            let now = a.now.unwrap_or_else(verify::unix_now);
            let proof =
                key.proof(a.key.as_deref().map(str::as_bytes), &payload, &jti, now).map_err(anyhow::Error::msg)?;
            println!("{proof}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::VerifyAttestation { jwks, payload_file, key, attestation }) => {
            let jwks: serde_json::Value = if jwks.starts_with("http://") || jwks.starts_with("https://") {
                reqwest::get(&jwks)
                    .await?
                    .error_for_status()?
                    .json()
                    .await
                    .with_context(|| format!("fetching {jwks}"))?
            } else {
                serde_json::from_slice(&std::fs::read(&jwks).with_context(|| format!("reading {jwks}"))?)?
            };
            let payload = if payload_file.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::stdin().read_to_end(&mut b).context("reading the payload from stdin")?;
                b
            } else {
                std::fs::read(&payload_file).with_context(|| format!("reading {}", payload_file.display()))?
            };
            let now = verify::unix_now();
            match crate::attest::check(attestation.trim(), &jwks, key.as_deref().map(str::as_bytes), &payload, now) {
                Ok(claims) => {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({"valid": true, "claims": claims}))?
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(why) => {
                    println!("{}", serde_json::json!({"valid": false, "reason": why}));
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Token(TokenCommand::Verify { config, route, token }) => {
            let token = read_token(&token)?;
            let (accepted, out) = ops::verify_token(&config, route.as_deref(), &token, verify::unix_now()).await?;
            println!("{out}");
            Ok(if accepted { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}

/// Reads a token argument; `-` means stdin. Size-capped so a stray file cannot eat memory.
fn read_token(arg: &str) -> anyhow::Result<String> {
    const MAX_STDIN: u64 = 1 << 20;
    if arg != "-" {
        return Ok(arg.trim().to_owned());
    }
    let mut s = String::new();
    std::io::stdin().take(MAX_STDIN + 1).read_to_string(&mut s).context("reading the token from stdin")?;
    anyhow::ensure!(s.len() as u64 <= MAX_STDIN, "the token on stdin is larger than {MAX_STDIN} bytes; refused");
    Ok(s.trim().to_owned())
}

/// What `check-config` says of a valid file: skipped secrets, warnings, then OK (exit 0) or,
/// with `strict` and warnings, exit 78.
fn checked(file: &std::path::Path, s: &config::Settings, strict: bool) -> ExitCode {
    for p in &s.skipped_secrets {
        eprintln!("skipped secret: {}", p.display(file));
    }
    for w in &s.warnings {
        eprintln!("warning: {}", w.display(file));
    }
    if strict && !s.warnings.is_empty() {
        eprintln!("{}: {} warning(s), failing because of --strict", file.display(), s.warnings.len());
        return ExitCode::from(EX_CONFIG);
    }
    let skipped = match s.skipped_secrets.len() {
        0 => String::new(),
        n => format!("; {n} secret(s) skipped"),
    };
    println!("{}: OK ({} issuer(s), {} route(s){skipped})", file.display(), s.issuers.len(), s.routes.len());
    ExitCode::SUCCESS
}

/// A secret given by an environment variable or a file (never on the command line); `flags` names
/// the two options for the error.
fn secret_arg(env: &Option<String>, file: &Option<PathBuf>, flags: &str) -> anyhow::Result<Option<Vec<u8>>> {
    let secret = match (env, file) {
        (Some(v), None) => config::Secret::Env(v.clone()),
        (None, Some(f)) => config::Secret::File(f.clone()),
        (None, None) => return Ok(None),
        _ => anyhow::bail!("give {flags}, not both"),
    };
    secret.resolve(std::path::Path::new(".")).map(Some).map_err(anyhow::Error::msg)
}

fn mint(a: MintArgs) -> anyhow::Result<String> {
    let alg: Algorithm = a.alg.parse().map_err(|_| anyhow::anyhow!("unknown algorithm {:?}", a.alg))?;
    let secret = secret_arg(&a.secret_env, &a.secret_file, "--secret-env or --secret-file")?;
    let secret = match (secret, a.secret_base64) {
        (Some(s), true) => {
            use base64::Engine as _;
            Some(base64::engine::general_purpose::STANDARD.decode(s.trim_ascii()).context("secret is not base64")?)
        }
        (s, _) => s,
    };
    let pem = a
        .key_file
        .as_ref()
        .map(|f| std::fs::read(f).with_context(|| format!("reading {}", f.display())))
        .transpose()?;
    let key = ops::signing_key(alg, secret.as_deref(), pem.as_deref())?;
    let mut extra = Map::new();
    for c in &a.claims {
        let (k, v) = c.split_once('=').with_context(|| format!("--claim {c:?} is not NAME=VALUE"))?;
        anyhow::ensure!(!k.is_empty(), "--claim {c:?} has an empty name");
        extra.insert(k.to_owned(), serde_json::from_str(v).unwrap_or_else(|_| Value::from(v)));
    }
    if let Some(f) = &a.cnf_key_file {
        let pem = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        let key = [Algorithm::ES256, Algorithm::EdDSA]
            .into_iter()
            .find_map(|alg| crate::attest::SigningKey::from_pem("producer", alg, &pem).ok())
            .with_context(|| format!("{} is not a PKCS#8 P-256 or Ed25519 private key", f.display()))?;
        let jkt = verify::proof::thumbprint(&key.jwk).context("no thumbprint for the key")?;
        extra.insert("cnf".into(), serde_json::json!({ "jkt": jkt }));
    }
    if let Some(f) = &a.payload_file {
        let payload = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        extra.insert(a.digest_claim.clone(), Value::from(verify::sha256_hex(&payload)));
    }
    let req = ops::Mint {
        alg,
        kid: a.kid,
        typ: a.typ,
        iss: a.iss,
        aud: a.aud,
        sub: a.sub,
        roles: a.role,
        scopes: a.scope,
        extra,
        ttl: (!a.no_exp).then(|| Duration::from(a.ttl)),
        jti: !a.no_jti,
    };
    req.sign(&key, a.now.unwrap_or_else(verify::unix_now))
}

//! The real `tokengate` binary: token tools and config checking.

use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use crate::util::*;

fn tokengate(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(args)
        .env("TG_TEST_SECRET", SECRET)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the tokengate binary runs");
    if let Some(s) = stdin {
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write_config(extra: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(f, "{}{extra}", issuers_toml()).unwrap();
    f
}

fn mint(args: &[&str]) -> String {
    let mut all = vec![
        "token",
        "mint",
        "--secret-env",
        "TG_TEST_SECRET",
        "--kid",
        "hs",
        "--iss",
        "https://idp.test",
        "--aud",
        "tokengate",
        "--sub",
        "alice",
    ];
    all.extend_from_slice(args);
    let out = tokengate(&all, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_owned()
}

#[test]
fn mint_then_verify_accepts_and_never_prints_the_token() {
    let cfg = write_config("[routes.orders]\nrequire = [{ claim = \"scope\", any_of = [\"orders:write\"] }]\n");
    let tok = mint(&["--scope", "orders:write", "--role", "a,b", "--claim", "tenant=acme", "--claim", "level=3"]);
    let out =
        tokengate(&["token", "verify", "--config", cfg.path().to_str().unwrap(), "--route", "orders", &tok], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["decision"], "accept");
    assert_eq!(v["issuer"], "idp");
    assert_eq!(v["kid"], "hs");
    assert_eq!(v["fingerprint"], tokengate::verify::fingerprint(&tok));
    let (_, sig) = tok.rsplit_once('.').unwrap();
    assert!(!text(&out.stdout).contains(sig) && !text(&out.stderr).contains(sig), "token leaked to output");

    // From stdin, with a Bearer prefix.
    let out = tokengate(
        &["token", "verify", "--config", cfg.path().to_str().unwrap(), "-"],
        Some(&format!("Bearer {tok}\n")),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[test]
fn verify_rejects_with_reason_and_exit_1() {
    let cfg = write_config("[routes.orders]\nrequire = [{ claim = \"scope\", any_of = [\"orders:write\"] }]\n");
    let path = cfg.path().to_str().unwrap();
    let cases = [
        (mint(&["--scope", "orders:read"]), "forbidden"),
        (mint(&["--ttl", "1m", "--now", "1000"]), "expired"),
        (mint(&["--scope", "orders:write", "--no-exp"]), "missing_claim"),
        ("not-a-token".to_owned(), "malformed"),
        ("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.".to_owned(), "unsupported_alg"),
    ];
    for (tok, reason) in cases {
        let out = tokengate(&["token", "verify", "--config", path, "--route", "orders", &tok], None);
        assert_eq!(out.status.code(), Some(1), "{reason}: {}", text(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["decision"], "reject");
        assert_eq!(v["reason"], reason, "{v}");
    }
}

#[test]
fn tool_errors_exit_2() {
    let out = tokengate(&["token", "verify", "--config", "/nonexistent.toml", "a.b.c"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read"), "{}", text(&out.stderr));
    let cfg = write_config("");
    let out =
        tokengate(&["token", "verify", "--config", cfg.path().to_str().unwrap(), "--route", "nope", "a.b.c"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no route named"));
    let out = tokengate(&["token", "mint", "--alg", "RS256"], None);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--key-file"));
}

#[test]
fn mint_with_every_key_kind_round_trips() {
    let cfg = write_config("");
    for (alg, key, kid) in [
        ("RS256", "rsa", "rsa"),
        ("PS256", "rsa", "rsa"),
        ("ES256", "p256", "p256"),
        ("ES384", "p384", "p384"),
        ("EdDSA", "ed25519", "ed25519"),
    ] {
        let key = fixture(&format!("keys/{key}.key.pem"));
        let out = tokengate(
            &[
                "token",
                "mint",
                "--alg",
                alg,
                "--key-file",
                key.to_str().unwrap(),
                "--kid",
                kid,
                "--iss",
                "https://idp.test",
                "--aud",
                "other",
                "--sub",
                "bob",
            ],
            None,
        );
        assert!(out.status.success(), "{alg}: {}", text(&out.stderr));
        let tok = text(&out.stdout).trim().to_owned();
        let out = tokengate(&["token", "verify", "--config", cfg.path().to_str().unwrap(), &tok], None);
        assert_eq!(out.status.code(), Some(0), "{alg}: {}", text(&out.stdout));
    }
}

#[test]
fn inspect_is_labelled_unverified() {
    let tok = mint(&["--ttl", "10m"]);
    let out = tokengate(&["token", "inspect", &tok], None);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["warning"].as_str().unwrap().starts_with("UNVERIFIED"));
    assert_eq!(v["claims"]["sub"], "alice");
    assert_eq!(v["header"]["kid"], "hs");
    let left = v["expires_in_secs"].as_i64().unwrap();
    assert!((590..=600).contains(&left), "{left}");
    let out = tokengate(&["token", "inspect", "garbage"], None);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn check_config_reports_every_problem_with_paths() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(f, "[issuers.a]\niss = \"x\"\nalgorithms = [\"none\"]\ntypo = 1\n[routes.r]\nissuers = [\"b\"]\n").unwrap();
    let out = tokengate(&["check-config", f.path().to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG");
    let err = text(&out.stderr);
    for want in ["issuers.a.typo", "issuers.a.algorithms.0", "issuers.a: has no keys", "routes.r.issuers.0"] {
        assert!(err.contains(want), "{want} not in {err}");
    }
}

#[test]
fn the_shipped_configs_are_valid() {
    for file in ["tokengate.example.toml", "tokengate.compose.toml"] {
        let path = format!("{}/config/{file}", env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["check-config", &path])
            .env("TOKENGATE_HMAC_SECRET", "an-example-secret-of-at-least-32-bytes!")
            .env("TOKENGATE_REDIS_PASSWORD", "x")
            .env("TOKENGATE_KAFKA_PASSWORD", "x")
            .env("TOKENGATE_AMQP_PASSWORD", "x")
            .output()
            .unwrap();
        assert!(out.status.success(), "{file}: {}", text(&out.stderr));
    }
}

#[test]
fn run_with_a_broken_config_exits_78_listing_every_problem() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    write!(
        f,
        "[routes.r]\nsource = {{ kafka = {{ cluster = \"nope\", topics = [\"a\"], group = \"g\" }} }}\n[redis]\nurl = \"http://x\"\n"
    )
    .unwrap();
    let out = tokengate(&["run", "--config", f.path().to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(78));
    let err = text(&out.stderr);
    for want in ["routes.r.source.kafka.cluster", "routes.r.trusted", "routes.r.dead_letter", "redis.url"] {
        assert!(err.contains(want), "{want} not in {err}");
    }
}

#[test]
fn check_config_warns_about_careless_secrets_and_strict_fails_on_them() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hmac.secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef-world-readable").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = dir.path().join("tokengate.toml");
    std::fs::write(
        &cfg,
        "[admin]\nlisten = \"0.0.0.0:9900\"\n[amqp.r]\nurl = \"amqp://user:inline-pw@127.0.0.1:5672/%2f\"\n\
         [issuers.a]\niss = \"x\"\nalgorithms = [\"HS256\"]\n[[issuers.a.keys]]\nalgorithms = [\"HS256\"]\n\
         secret = { file = \"hmac.secret\" }\n",
    )
    .unwrap();
    let out = tokengate(&["check-config", cfg.to_str().unwrap()], None);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "warnings alone pass: {err}");
    for want in ["warning: amqp.r.url: holds a password", "warning: issuers.a.keys.0.secret", "warning: admin.listen"] {
        assert!(err.contains(want), "{want} not in {err}");
    }
    assert!(!err.contains("inline-pw"), "a warning echoed the password: {err}");
    let out = tokengate(&["check-config", "--strict", cfg.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(78), "--strict fails on warnings");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let fixed =
        std::fs::read_to_string(&cfg).unwrap().replace("0.0.0.0", "127.0.0.1").replace("user:inline-pw@", "user@");
    std::fs::write(&cfg, fixed).unwrap();
    let out = tokengate(&["check-config", "--strict", cfg.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

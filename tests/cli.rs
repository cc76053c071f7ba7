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
fn check_config_refuses_exactly_once_beyond_one_kafka_cluster_and_says_why() {
    let amqp = "[amqp.r]\nurl = \"amqp://127.0.0.1:5672/%2f\"\n[kafka.k]\nbootstrap_servers = \"127.0.0.1:1\"\n\
        [routes.x]\ndelivery = \"exactly_once\"\nsource = { amqp = { broker = \"r\", queue = \"q\" } }\n\
        trusted = { kafka = { cluster = \"k\", topic = \"t\" } }\ndead_letter = { kafka = { cluster = \"k\", topic = \"d\" } }\n";
    let f = write_config(amqp);
    let out = tokengate(&["check-config", f.path().to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG");
    let err = text(&out.stderr);
    assert!(err.contains("routes.x.delivery") && err.contains("one cluster"), "{err}");
    let ok = "[kafka.k]\nbootstrap_servers = \"127.0.0.1:1\"\n[routes.x]\ndelivery = \"exactly_once\"\n\
        source = { kafka = { cluster = \"k\", topics = [\"a\"], group = \"g\" } }\n\
        trusted = { kafka = { cluster = \"k\", topic = \"t\" } }\ndead_letter = { kafka = { cluster = \"k\", topic = \"d\" } }\n\
        [routes.x.transaction]\nmax_messages = 0\n";
    let f = write_config(ok);
    let err = text(&tokengate(&["check-config", f.path().to_str().unwrap()], None).stderr);
    assert!(err.contains("routes.x.transaction.max_messages"), "{err}");
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
    for want in
        ["amqp.r.url: holds a password", "issuers.a.keys.0.secret: the secret file", "admin.listen: is reachable"]
    {
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

/// The environment both commands see in the agreement test: the example configs' secrets, and
/// an admin endpoint on a free port so that runs do not collide.
const AGREEMENT_ENV: &[(&str, &str)] = &[
    ("TOKENGATE_HMAC_SECRET", "an-example-secret-of-at-least-32-bytes!"),
    ("TOKENGATE_REDIS_PASSWORD", "x"),
    ("TOKENGATE_KAFKA_PASSWORD", "x"),
    ("TOKENGATE_AMQP_PASSWORD", "x"),
    ("TOKENGATE__ADMIN__LISTEN", "127.0.0.1:0"),
];

/// Problem lines of a config error (the lines naming the file and a field).
fn problem_lines(stderr: &str, file: &str) -> Vec<String> {
    stderr
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with(file) && !l.ends_with("problem(s)"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn check_config_and_run_agree_on_every_shipped_and_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let broken = [
        (
            "queue-arguments",
            "[amqp.r]\nurl = \"amqp://127.0.0.1:5672/%2f\"\n[routes.x]\nsource = { amqp = { broker = \"r\", queue = \"q\", declare = true, arguments = { \"x-list\" = [1, 2] } } }\ntrusted = { amqp = { broker = \"r\", exchange = \"t\" } }\ndead_letter = { amqp = { broker = \"r\", exchange = \"d\" } }\n",
        ),
        (
            "kafka-property",
            "[kafka.k]\nbootstrap_servers = \"127.0.0.1:1\"\nproperties = { \"no.such.property\" = \"1\" }\n",
        ),
        (
            "kafka-value",
            "[kafka.k]\nbootstrap_servers = \"127.0.0.1:1\"\n[routes.x]\nsource = { kafka = { cluster = \"k\", topics = [\"a\"], group = \"g\" } }\ntrusted = { kafka = { cluster = \"k\", topic = \"t\", properties = { acks = \"sometimes\" } } }\ndead_letter = { kafka = { cluster = \"k\", topic = \"d\" } }\n",
        ),
        ("amqp-url", "[amqp.r]\nurl = \"http://127.0.0.1\"\n"),
        ("redis-url", "[redis]\nurl = \"http://127.0.0.1\"\n"),
        ("missing-secret", "[redis]\nurl = \"redis://127.0.0.1:1\"\npassword = { env = \"TG_AGREEMENT_UNSET\" }\n"),
        ("admin-listen", "[admin]\nlisten = \"nowhere\"\n"),
        (
            "topic-regex",
            "[kafka.k]\nbootstrap_servers = \"127.0.0.1:1\"\n[routes.x]\nsource = { kafka = { cluster = \"k\", topic_regex = \"(\", group = \"g\" } }\ntrusted = { kafka = { cluster = \"k\", topic = \"t\" } }\ndead_letter = { kafka = { cluster = \"k\", topic = \"d\" } }\n",
        ),
        (
            "exactly-once-amqp",
            "[amqp.r]\nurl = \"amqp://127.0.0.1:5672/%2f\"\n[routes.x]\ndelivery = \"exactly_once\"\nsource = { amqp = { broker = \"r\", queue = \"q\" } }\ntrusted = { amqp = { broker = \"r\", exchange = \"t\" } }\ndead_letter = { amqp = { broker = \"r\", exchange = \"d\" } }\n",
        ),
        (
            "exactly-once-two-clusters",
            "[kafka.k]\nbootstrap_servers = \"127.0.0.1:1\"\n[kafka.l]\nbootstrap_servers = \"127.0.0.1:2\"\n[routes.x]\ndelivery = \"exactly_once\"\nsource = { kafka = { cluster = \"k\", topics = [\"a\"], group = \"g\" } }\ntrusted = { kafka = { cluster = \"l\", topic = \"t\" } }\ndead_letter = { kafka = { cluster = \"k\", topic = \"d\" } }\n",
        ),
        (
            "attest-without-keys",
            "[kafka.k]\nbootstrap_servers = \"127.0.0.1:1\"\n[routes.x]\nattest = { keep = [\"sub\"], rename = { scope = \"s\" } }\n",
        ),
        (
            "attestation-key",
            "[attestation]\nissuer = \"gate\"\nactive = \"a\"\nkeys = [{ kid = \"a\", algorithm = \"RS256\", pem_file = \"/nonexistent.pem\" }]\n",
        ),
        (
            "single-use-without-redis",
            "[kafka.k]\nbootstrap_servers = \"127.0.0.1:1\"\n[routes.x]\nsingle_use = true\nsource = { kafka = { cluster = \"k\", topics = [\"a\"], group = \"g\" } }\ntrusted = { kafka = { cluster = \"k\", topic = \"t\" } }\ndead_letter = { kafka = { cluster = \"k\", topic = \"d\" } }\n",
        ),
        (
            "audit-two-destinations",
            "[kafka.k]\nbootstrap_servers = \"127.0.0.1:1\"\n[audit]\nkafka = { cluster = \"k\", topic = \"a\" }\nfile = { path = \"/tmp/a.jsonl\" }\n",
        ),
        ("unknown-field", "colour = \"blue\"\n"),
        ("syntax", "[issuers.a\n"),
        ("alg-none", "[issuers.a]\niss = \"x\"\nalgorithms = [\"none\"]\njwks_url = \"https://idp.test/jwks\"\n"),
    ];
    let mut files: Vec<std::path::PathBuf> = ["tokengate.example.toml", "tokengate.compose.toml"]
        .iter()
        .map(|f| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config").join(f))
        .collect();
    for (name, text) in broken {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        files.push(path);
    }
    for path in &files {
        let file = path.to_str().unwrap();
        let check = Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["check-config", file])
            .envs(AGREEMENT_ENV.iter().copied())
            .output()
            .unwrap();
        let mut run = Command::new(env!("CARGO_BIN_EXE_tokengate"))
            .args(["run", "--config", file])
            .envs(AGREEMENT_ENV.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Validation comes before any network I/O: a refused file ends `run` at once; an accepted
        // one is still running (connecting) after this long.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while run.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = run.kill();
        let ran = run.wait_with_output().unwrap();
        let (check_err, run_err) = (text(&check.stderr), text(&ran.stderr));
        match check.status.code() {
            Some(0) => {
                assert_ne!(ran.status.code(), Some(78), "{file}: check-config passed, run refused it: {run_err}");
                assert!(!run_err.contains("problem(s)"), "{file}: {run_err}");
            }
            Some(78) => {
                assert_eq!(ran.status.code(), Some(78), "{file}: check-config refused it, run did not: {run_err}");
                let problems = problem_lines(&check_err, file);
                assert!(!problems.is_empty(), "{file}: {check_err}");
                assert_eq!(problems, problem_lines(&run_err, file), "{file}: the same problems");
            }
            other => panic!("{file}: check-config exited {other:?}: {check_err}"),
        }
    }
}

#[test]
fn without_secrets_checks_the_rest_and_names_what_it_skipped() {
    let path = format!("{}/config/tokengate.example.toml", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate")).args(["check-config", &path]).output().unwrap();
    assert_eq!(out.status.code(), Some(78), "secrets are required by default");
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["check-config", "--without-secrets", &path])
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    for want in
        ["issuers.internal.keys.0.secret", "kafka.main.secret_properties", "amqp.rabbit.password", "redis.password"]
    {
        assert!(err.lines().any(|l| l.starts_with("skipped secret:") && l.contains(want)), "{want} not in {err}");
    }
    assert!(text(&out.stdout).contains("4 secret(s) skipped"), "{}", text(&out.stdout));
    // Everything else is still checked.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, std::fs::read_to_string(&path).unwrap().replace("\"RS256\", \"ES256\"", "\"none\""))
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .args(["check-config", "--without-secrets", broken.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("alg none is never allowed"));
}

/// The README's TOML snippets, each a valid config with the brokers and issuer they name, and
/// its `check-config` example printing what the binary prints.
#[test]
fn the_readme_config_snippets_pass_check_config_and_its_example_output_is_true() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut lines = readme.lines();
    while let Some(l) = lines.next() {
        if l.trim_start().starts_with("```") {
            let lang = l.trim_start().trim_start_matches('`').to_owned();
            let body: Vec<&str> = lines.by_ref().take_while(|l| !l.trim_start().starts_with("```")).collect();
            blocks.push((lang, body.join("\n")));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    // What the snippets name: the brokers of the example config.
    let base =
        "[kafka.main]\nbootstrap_servers = \"127.0.0.1:9092\"\n[amqp.rabbit]\nurl = \"amqp://127.0.0.1:5672/%2f\"\n";
    let snippets: Vec<&String> = blocks.iter().filter(|(lang, _)| lang == "toml").map(|(_, b)| b).collect();
    assert!(snippets.len() >= 2, "the README has TOML snippets");
    let mut bad_example = None;
    for (i, snippet) in snippets.iter().enumerate() {
        let path = dir.path().join(format!("snippet-{i}.toml"));
        std::fs::write(&path, format!("{base}{snippet}\n")).unwrap();
        let out = tokengate(&["check-config", "--without-secrets", path.to_str().unwrap()], None);
        if snippet.contains("typo = 1") {
            bad_example = Some(snippet.to_string()); // the example of a bad file, checked below
            continue;
        }
        assert!(out.status.success(), "README snippet {i} fails check-config:\n{snippet}\n{}", text(&out.stderr));
    }
    let bad = bad_example.expect("the README shows a bad.toml");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, format!("{bad}\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tokengate"))
        .current_dir(dir.path())
        .args(["check-config", "bad.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let shown = blocks
        .iter()
        .map(|(_, b)| b)
        .find(|b| b.starts_with("$ tokengate check-config bad.toml"))
        .expect("the README shows check-config's output");
    let shown: Vec<&str> = shown.lines().skip(1).collect();
    let printed = text(&out.stderr);
    assert_eq!(shown, printed.lines().collect::<Vec<_>>(), "the README's check-config output");
}

/// Every code snippet of the README in a programming language is an excerpt of a file that the
/// suite runs or compiles (named in an `<!-- excerpt: PATH -->` line above it), so none can rot;
/// the audit record example is a record of the current schema.
#[test]
fn the_readme_code_snippets_are_excerpts_of_files_the_suite_runs_or_compiles() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let lines: Vec<&str> = readme.lines().collect();
    let mut checked = 0;
    let mut i = 0;
    while i < lines.len() {
        let Some(lang) = lines[i].strip_prefix("```") else {
            i += 1;
            continue;
        };
        let end = i + 1 + lines[i + 1..].iter().position(|l| l.starts_with("```")).expect("a closed code block");
        let body = lines[i + 1..end].join("\n");
        if ["python", "java", "rust", "js", "go"].contains(&lang) {
            let above = lines[..i].iter().rev().find(|l| !l.trim().is_empty()).copied().unwrap_or("");
            let path = above.strip_prefix("<!-- excerpt: ").and_then(|p| p.strip_suffix(" -->")).unwrap_or_else(|| {
                panic!("README line {}: a {lang} snippet needs <!-- excerpt: PATH --> above it", i + 1)
            });
            let file = std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
            assert!(file.contains(&body), "README line {}: the snippet is not an excerpt of {path}:\n{body}", i + 1);
            checked += 1;
        }
        if lang == "json" {
            let v: serde_json::Value = serde_json::from_str(&body).expect("the README's JSON example parses");
            let env = tokengate::envelope::Envelope {
                key: None,
                payload: None,
                headers: vec![],
                timestamp_ms: None,
                origin: tokengate::envelope::Origin::Kafka { topic: "t".into(), partition: 0, offset: 0 },
                amqp: None,
                amqp_headers: None,
                defect: None,
            };
            let facts = tokengate::verify::Facts::default();
            let now = std::time::SystemTime::now();
            let record: serde_json::Value =
                serde_json::from_slice(&tokengate::audit::record(None, "r", &env, None, &facts, now)).unwrap();
            let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
            assert_eq!(keys(&v), keys(&record), "the README's audit record has the schema's fields");
        }
        i = end + 1;
    }
    assert!(checked >= 10, "the README's code snippets were found ({checked})");
    // The Python examples the suite does not run are compiled.
    let python = std::env::var("TOKENGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let compile = Command::new(&python)
        .args(["-m", "py_compile", "examples/producers/python/refreshing_producer.py"])
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("{python} is required ({e})"));
    assert!(compile.status.success(), "{}", String::from_utf8_lossy(&compile.stderr));
}

/// Splits a shell command line into words: single and double quotes, `$(...)` kept whole.
fn shell_words(line: &str) -> Vec<String> {
    let (mut words, mut word, mut quote, mut depth) = (Vec::new(), String::new(), None, 0);
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') if depth == 0 => quote = Some(c),
            (None, '$') if chars.peek() == Some(&'(') => {
                depth += 1;
                word.push(c);
            }
            (None, ')') if depth > 0 => {
                depth -= 1;
                word.push(c);
            }
            (None, ' ') if depth == 0 => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            (None, c) => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// Every `tokengate` command in the README's shell snippets parses with the binary's own
/// argument parser (synopsis lines with `[...]` or `<...>` placeholders aside).
#[test]
fn the_readme_shell_snippets_use_only_commands_and_flags_that_exist() {
    use clap::Parser as _;
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut in_sh = false;
    let mut commands = Vec::new();
    let mut pending = String::new();
    for line in readme.lines() {
        if line.starts_with("```") {
            in_sh = line == "```sh";
            continue;
        }
        if !in_sh {
            continue;
        }
        pending.push_str(line.trim_end_matches('\\'));
        if line.ends_with('\\') {
            continue;
        }
        let full = std::mem::take(&mut pending);
        let code = full.split(" #").next().unwrap().trim().to_owned();
        for start in ["tokengate ", "target/release/tokengate "] {
            let Some(at) = code.find(start) else { continue };
            if at > 0 && !code[..at].ends_with("$(") && !code[..at].ends_with(' ') {
                continue;
            }
            let rest = &code[at + start.len()..];
            let rest = rest.split([')', '>', '|']).next().unwrap();
            commands.push(rest.to_owned());
            break;
        }
    }
    assert!(commands.len() >= 20, "the README's tokengate commands were found: {commands:#?}");
    let mut parsed = 0;
    for c in &commands {
        if c.contains('[') || c.contains('<') {
            continue;
        }
        let words = std::iter::once("tokengate".to_owned()).chain(shell_words(c));
        if let Err(e) = tokengate::cli::Cli::try_parse_from(words) {
            panic!("README command `tokengate {c}` does not parse:\n{e}");
        }
        parsed += 1;
    }
    assert!(parsed >= 15, "{parsed} README commands parsed");
}

//! What platform teams deploy beside the binary, each checked by the tool made for it:
//! the systemd unit (`systemd-analyze verify` and `security`), the Prometheus alerting rules
//! (`promtool check rules`, `promtool test rules`), and the Grafana dashboard and the rules'
//! metric names (every one served by `/metrics`: checked in the daemon test, tests/kafka.rs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(rel)
}

/// Runs a checking tool; fails naming the tool if it is missing or says no.
fn check(tool: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{tool} is required ({e}); scripts/setup installs it"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{tool} {args:?} failed:\n{text}");
    text
}

/// The metric names in PromQL expressions (histogram series named by their metric).
fn metric_names(exprs: impl Iterator<Item = String>) -> BTreeSet<String> {
    let re = regex::Regex::new(r"tokengate_[a-z_]+").unwrap();
    exprs
        .flat_map(|e| re.find_iter(&e).map(|m| m.as_str().to_owned()).collect::<Vec<_>>())
        .map(|n| {
            ["_bucket", "_sum", "_count"].iter().fold(n, |n, s| n.strip_suffix(s).map_or(n.clone(), str::to_owned))
        })
        .collect()
}

/// Every metric the Grafana dashboard's queries and the alerting rules name.
pub fn dashboard_and_alert_metrics() -> BTreeSet<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/tokengate.json")).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().unwrap().to_owned());
        }
    }
    let rules = std::fs::read_to_string(deploy("prometheus/tokengate.rules.yml")).unwrap();
    exprs.extend(rules.lines().map(str::to_owned));
    metric_names(exprs.into_iter())
}

#[test]
fn the_systemd_unit_verifies_and_is_hardened() {
    let unit = std::fs::read_to_string(deploy("tokengate.service")).unwrap();
    for directive in [
        "User=tokengate",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=tokengate",
        "CapabilityBoundingSet=\n",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(directive), "the unit sets {directive:?}");
    }
    // Verified as installed, with the binary this build made in place of /usr/local/bin.
    let dir = tempfile::tempdir().unwrap();
    let installed = unit.replace("/usr/local/bin/tokengate", env!("CARGO_BIN_EXE_tokengate"));
    std::fs::write(dir.path().join("tokengate.service"), installed).unwrap();
    let said = check("systemd-analyze", &["verify", "--man=no", "tokengate.service"], dir.path());
    assert!(said.trim().is_empty(), "systemd-analyze verify has remarks:\n{said}");
    let security = check("systemd-analyze", &["security", "--offline=yes", "tokengate.service"], dir.path());
    let exposure: f64 = security
        .lines()
        .find_map(|l| l.split("Overall exposure level for tokengate.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{security}"));
    assert!(exposure <= 2.0, "exposure {exposure} (systemd rates up to 2.0 'OK'):\n{security}");
    let sysusers = std::fs::read_to_string(deploy("tokengate.sysusers")).unwrap();
    assert!(sysusers.lines().any(|l| l.starts_with("u tokengate ")), "the dedicated user is declared");
}

#[test]
fn the_alerting_rules_pass_promtool_and_their_unit_tests() {
    let dir = deploy("prometheus");
    check("promtool", &["check", "rules", "tokengate.rules.yml"], &dir);
    let tested = check("promtool", &["test", "rules", "tokengate.rules.test.yml"], &dir);
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every runbook line points at a README section that exists.
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let anchors: BTreeSet<String> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("## ").or_else(|| l.strip_prefix("### ")))
        .map(|h| {
            h.to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    let rules = std::fs::read_to_string(dir.join("tokengate.rules.yml")).unwrap();
    let runbooks: Vec<&str> = rules.lines().filter_map(|l| l.split("README.md#").nth(1)).collect();
    assert!(runbooks.len() >= 10, "every alert has a runbook");
    for r in runbooks {
        let anchor = r.split(':').next().unwrap();
        assert!(anchors.contains(anchor), "runbook anchor #{anchor} is no README section: {anchors:?}");
    }
}

#[test]
fn the_dashboard_has_route_and_instance_variables_and_declared_metrics_only() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/tokengate.json")).unwrap()).unwrap();
    let vars: BTreeSet<&str> =
        dashboard["templating"]["list"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(vars, BTreeSet::from(["datasource", "instance", "route"]));
    let declared: BTreeSet<String> = tokengate::telemetry::METRICS.iter().map(|m| m.name.to_owned()).collect();
    let named = dashboard_and_alert_metrics();
    assert!(named.len() >= 20, "{named:?}");
    let unknown: Vec<_> = named.difference(&declared).collect();
    assert!(unknown.is_empty(), "dashboard or rules name metrics tokengate does not have: {unknown:?}");
    for p in dashboard["panels"].as_array().unwrap().iter().filter(|p| p["type"] != "row") {
        for t in p["targets"].as_array().unwrap() {
            let e = t["expr"].as_str().unwrap();
            assert!(e.contains("$instance"), "panel {:?} filters by instance: {e}", p["title"]);
        }
    }
}

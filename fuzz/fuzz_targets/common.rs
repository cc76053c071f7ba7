#![allow(dead_code)] // each target uses a part
//! What the targets share: a verifier with an HS256 issuer and a route, built once.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use tokengate::config::{OnUnavailable, RouteRules};
use tokengate::gate::Gate;
use tokengate::verify::Verifier;

pub struct Engine {
    pub gate: Gate,
    pub verifier: Arc<Verifier>,
    pub route: RouteRules,
    /// A route that binds tokens to messages (`proof.mode = "jkt"`).
    pub bound: RouteRules,
}

const CONFIG: &str = r#"
[issuers.idp]
iss = "https://idp.test"
audiences = ["tokengate"]
algorithms = ["HS256"]
[[issuers.idp.keys]]
kid = "hs"
algorithms = ["HS256"]
secret = { env = "TOKENGATE_FUZZ_SECRET" }
[routes.r]
issuers = ["idp"]
require = [{ claim = "scope", any_of = ["orders:write"] }]
identity_headers = { sub = "x-tokengate-sub", "realm_access.roles" = "x-tokengate-roles" }
[routes.bound]
issuers = ["idp"]
proof = { mode = "jkt" }
"#;

pub fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        // SAFETY: set once, before any thread reads the environment.
        unsafe { std::env::set_var("TOKENGATE_FUZZ_SECRET", "fuzz-secret-0123456789abcdef-0123456789") };
        let mut s = tokengate::config::parse(CONFIG, &[], Path::new(".")).expect("the fuzz config is valid");
        let verifier = Arc::new(Verifier::new(std::mem::take(&mut s.issuers), &s.cache));
        let gate = Gate::new(Arc::clone(&verifier), None, OnUnavailable::Hold);
        let route = |name: &str| s.routes.iter().find(|r| r.rules.name == name).expect("the route").rules.clone();
        Engine { gate, verifier, route: route("r"), bound: route("bound") }
    })
}

/// Runs a future that does no I/O (static keys, no Redis) to completion.
pub fn now<F: std::future::Future>(f: F) -> F::Output {
    futures_util::FutureExt::now_or_never(f).expect("no I/O in a fuzz target")
}

//! The HTTP API against its own OpenAPI document, fuzzed by an independent client: schemathesis
//! (installed from PyPI by scripts/install-schemathesis.sh, pinned in tests/schemathesis/) runs every
//! check it has (server errors, status codes, content types, headers, response schemas, negative and
//! positive data, authentication, unsupported methods) against a live node, with a fixed seed so a
//! run is repeatable. Rate limits are raised so the fuzzer reaches the logic behind them.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use jsonwebtoken::{EncodingKey, Header, encode};
use secureforms::config::{Rate, RateLimits};
use secureforms::http::auth::AgentClaims;
use secureforms::kafka::runtime::system_clock;
use secureforms::service::Service;

const SECRET: &str = "contract-test-secret-at-least-32-bytes-long";

fn schemathesis() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash").arg(root.join("scripts/install-schemathesis.sh")).output().expect("run bash");
    assert!(out.status.success(), "install-schemathesis failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().last().expect("the script prints the executable").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failure_and_no_server_error_with_every_check_on() {
    let bin = schemathesis();
    let prefix = unique_prefix("contract");
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("jwt.secret");
    write_private(&secret_file, SECRET.as_bytes());
    let mut s = settings(&prefix, dir.path());
    s.http_listen = Some("127.0.0.1:0".into());
    s.agent_auth.jwt_secret_file = Some(secret_file);
    let high = Rate { per_minute: 1_000_000, burst: 100_000 };
    s.rate_limits =
        RateLimits { visitor_per_client: high, visitor_per_form: high, api_per_client: high, api_per_agent: high };
    let mut service = Service::start(s, brokers(), system_clock()).await.unwrap();
    service.wait_ready(Duration::from_secs(60)).await.expect("ready");
    let base = format!("http://{}", service.http_addr.unwrap());
    let claims = AgentClaims {
        sub: "agent-1".into(),
        site: "acme".into(),
        roles: vec!["agent".into(), "agent_manager".into()],
        permissions: vec!["use_secure_form".into(), "view_secure_form_responses_in_history".into()],
        sid: "contract-session".into(),
        exp: now_ms() / 1000 + 3600,
        nbf: None,
    };
    let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();

    let workdir = dir.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(bin)
            .current_dir(workdir)
            .args(["run", &format!("{base}/openapi.json"), "--checks", "all", "--max-examples", "60"])
            .args(["--generation-deterministic", "--no-color", "--request-timeout", "40"])
            .args(["--header", &format!("Authorization: Bearer {token}")])
            .output()
            .expect("run schemathesis")
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    // The summary, for the test log.
    let summary_at = report.find("SUMMARY").unwrap_or(0);
    println!("{}", &report[summary_at..]);
    assert!(out.status.success(), "schemathesis found failures:\n{report}");
    assert!(report.contains("Selected: 8/8") && report.contains("Tested: 8"), "every operation is tested:\n{report}");
    assert!(!report.contains("failures") && !report.contains("Server error"), "{report}");
    service.stop().await;
}

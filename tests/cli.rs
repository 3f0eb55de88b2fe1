//! The `secureforms` binary as a user meets it: help with examples on every command, clear errors
//! and non-zero exits on bad input, and the embedded default running the flow and keeping its data
//! across a restart.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{bin, free_port};

fn run(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env_remove("SECUREFORMS_CONFIG").output().expect("run secureforms")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn every_command_explains_itself_with_an_example() {
    for cmd in [
        vec!["--help"],
        vec!["serve", "--help"],
        vec!["topics", "apply", "--help"],
        vec!["topics", "list", "--help"],
        vec!["tail", "--help"],
        vec!["schemas", "--help"],
        vec!["chatbus", "send-form", "--help"],
        vec!["chatbus", "transfer", "--help"],
        vec!["chatbus", "close", "--help"],
        vec!["chatbus", "raw", "--help"],
        vec!["keys", "generate-master", "--help"],
        vec!["keys", "rotate", "--help"],
        vec!["keys", "list", "--help"],
        vec!["sites", "check", "--help"],
        vec!["openapi", "--help"],
        vec!["dlq", "list", "--help"],
        vec!["dlq", "redrive", "--help"],
        vec!["purge", "--help"],
        vec!["erase", "--help"],
        vec!["replay", "--help"],
        vec!["compliance", "--help"],
    ] {
        let o = run(&cmd);
        assert!(o.status.success(), "{cmd:?}");
        let t = text(&o);
        assert!(t.contains("Example"), "{cmd:?} shows an example:\n{t}");
        assert!(t.contains("secureforms"), "{cmd:?}");
    }
}

#[test]
fn schemas_lists_every_event_with_its_fingerprint() {
    let o = run(&["schemas", "--json"]);
    assert!(o.status.success());
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<_> = rows.iter().map(|r| r["name"].as_str().unwrap().to_string()).collect();
    for required in [
        "FormSent",
        "FormIssued",
        "FormRejected",
        "FormOpened",
        "FormSubmitted",
        "FormReady",
        "FormRetrieved",
        "ConversationTransferred",
        "ConversationClosed",
        "AgentSessionEnded",
        "FormTemplateDefined",
        "SubmissionPurged",
        "DeadLetter",
    ] {
        assert!(names.iter().any(|n| n == required), "{required} missing from {names:?}");
    }
    assert!(rows.iter().all(|r| r["fingerprint"].as_str().unwrap().len() == 16));
    assert!(rows.iter().any(|r| r["name"] == "FormSent" && r["current"] == false), "old FormSent v1 is listed");
}

#[test]
fn bad_configuration_exits_non_zero_and_says_what_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[sites.acme]\nenabled = true\nsubmit_key_ttl_secs = 0\n").unwrap();
    let o = run(&["topics", "list", "--config", cfg.to_str().unwrap(), "--brokers", "127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(t.contains("submit_key_ttl_secs") && t.contains("acme"), "{t}");

    let o = run(&["schemas", "--config", "/no/such/file.toml"]);
    // schemas needs no settings, but a missing file is still named when settings are loaded:
    let o2 = run(&["topics", "list", "--config", "/no/such/file.toml"]);
    assert!(o.status.success());
    assert_eq!(o2.status.code(), Some(1));
    assert!(text(&o2).contains("/no/such/file.toml"), "{}", text(&o2));

    let o = run(&["tail"]);
    assert_eq!(o.status.code(), Some(2), "usage error");
    assert!(text(&o).contains("<TOPIC>"));

    let o = run(&["--log-format", "xml", "topics", "list", "--brokers", "127.0.0.1:1"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("log_format"), "{}", text(&o));
}

#[test]
fn sites_check_names_what_to_change_and_fails_for_a_non_compliant_site() {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
    let o = run(&["sites", "check", "--config", demo.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "weakco misses the PCI settings");
    let t = text(&o);
    assert!(t.contains("acme") && t.contains("ok"), "{t}");
    assert!(t.contains("min_password_length is 4, set it to at least 7"), "{t}");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/secureforms.example.toml");
    assert!(run(&["sites", "check", "--config", example.to_str().unwrap()]).status.success());
}

#[test]
fn a_missing_master_key_stops_serve_with_how_to_make_one() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .args(["serve", "--brokers", "127.0.0.1:1", "--data-dir", dir.path().to_str().unwrap()])
        .env_remove("SECUREFORMS_MASTER_KEY")
        .env_remove("SECUREFORMS_MASTER_KEY_FILE")
        .env_remove("SECUREFORMS_CONFIG")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("keys generate-master"), "{}", text(&o));
}

#[test]
fn a_master_key_file_others_may_read_stops_serve_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let key = common::master_key_file(dir.path());
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let o = Command::new(bin())
        .args(["serve", "--brokers", "127.0.0.1:1", "--data-dir", dir.path().to_str().unwrap()])
        .arg("--master-key-file")
        .arg(&key)
        .env_remove("SECUREFORMS_MASTER_KEY")
        .env_remove("SECUREFORMS_CONFIG")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(t.contains("mode 644") && t.contains("chmod 600"), "{t}");
}

#[test]
fn secrets_given_in_the_environment_are_scrubbed_from_it_once_read() {
    let dir = tempfile::tempdir().unwrap();
    let master = secureforms::crypto::MasterKey::generate_base64();
    let jwt = format!("jwt-secret-canary-{}", uuid::Uuid::new_v4().simple());
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
    let mut child = Command::new(bin())
        .args(["serve", "--brokers", "127.0.0.1:1", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path())
        .env("SECUREFORMS_MASTER_KEY", master.as_str())
        .env("SECUREFORMS_JWT_SECRET", &jwt)
        .env("SECUREFORMS_HTTP_LISTEN", "127.0.0.1:0")
        .env("SECUREFORMS_METRICS_LISTEN", "")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once it logs, it has read its secrets: what the kernel shows of its environment holds neither.
    let stderr = child.stderr.take().unwrap();
    let first = BufReader::new(stderr).lines().next();
    assert!(first.is_some(), "serve logs");
    let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains(&jwt)
            && !environ.windows(master.len()).any(|w| w == master.as_bytes()),
        "a secret is still in /proc/<pid>/environ"
    );
    assert!(String::from_utf8_lossy(&environ).contains("SECUREFORMS_HTTP_LISTEN"), "the environment was read");
    drop(Serve(child));
}

#[test]
fn without_brokers_and_without_a_running_serve_the_cli_says_how_to_proceed() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(&["tail", "form-links", "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o);
    assert!(t.contains("secureforms serve") && t.contains("--brokers"), "{t}");
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `secureforms serve` on the embedded default and waits for "service starting".
fn serve_embedded(data_dir: &Path) -> Serve {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--master-key-file")
        .arg(common::master_key_file(data_dir))
        .env_remove("SECUREFORMS_BROKERS")
        .env("SECUREFORMS_HTTP_LISTEN", "127.0.0.1:0")
        .env("SECUREFORMS_METRICS_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("service starting") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(90)).expect("serve started on the embedded broker");
    Serve(child)
}

fn stop(mut s: Serve) {
    let pid = s.0.id() as i32;
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = s.0.try_wait().unwrap() {
            assert!(status.success(), "serve exits 0 on SIGTERM, got {status}");
            return;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tail_lines(data_dir: &Path, topic: &str, n: usize) -> Vec<serde_json::Value> {
    let o =
        run(&["tail", topic, "--max", &n.to_string(), "--idle-exit", "60", "--data-dir", data_dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The pid of the live (not zombie) embedded broker process listening on `addr`.
fn broker_pid(addr: &str) -> Option<i32> {
    let listener = format!("tcp://{addr}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("tansu") && cmdline.contains(&listener)).then_some(pid)
    })
}

#[test]
fn the_embedded_broker_is_restarted_when_it_dies_and_serve_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let serve = serve_embedded(dir.path());
    let addr = std::fs::read_to_string(dir.path().join("broker.addr")).unwrap().trim().to_string();
    let pid = broker_pid(&addr).expect("the embedded broker runs");
    // SAFETY: signalling a process this test found by its command line.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while broker_pid(&addr).is_none_or(|p| p == pid) {
        assert!(Instant::now() < deadline, "serve did not restart the embedded broker");
        std::thread::sleep(Duration::from_millis(200));
    }
    // serve carries on, without a restart of its own: a form sent now is issued.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let o = run(&[
            "chatbus",
            "send-form",
            "--data-dir",
            d,
            "--site",
            "acme",
            "--conversation",
            "c-1",
            "--agent",
            "a-7",
            "--template",
            "card-payment",
            "--form-id",
            "f-after",
        ]);
        if o.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted broker never took a record: {}", text(&o));
        std::thread::sleep(Duration::from_millis(500));
    }
    let first = tail_lines(dir.path(), "form-links", 1);
    assert_eq!(
        (first[0]["type"].as_str(), first[0]["event"]["form_id"].as_str()),
        (Some("FormIssued"), Some("f-after"))
    );
    stop(serve);
}

#[test]
fn the_embedded_default_runs_the_flow_and_keeps_its_data_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let serve = serve_embedded(dir.path());
    let o = run(&[
        "chatbus",
        "send-form",
        "--data-dir",
        d,
        "--site",
        "acme",
        "--conversation",
        "c-1",
        "--agent",
        "a-7",
        "--template",
        "card-payment",
        "--form-id",
        "f-1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let first = tail_lines(dir.path(), "form-links", 1);
    assert_eq!(first[0]["type"], "FormIssued");
    assert_eq!(first[0]["event"]["form_id"], "f-1");
    assert_eq!(first[0]["key"], "c-1");
    stop(serve);

    let serve = serve_embedded(dir.path());
    let o = run(&[
        "chatbus",
        "send-form",
        "--data-dir",
        d,
        "--site",
        "weakco",
        "--conversation",
        "c-2",
        "--agent",
        "a-7",
        "--template",
        "card-payment",
        "--form-id",
        "f-2",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let both = tail_lines(dir.path(), "form-links", 2);
    let forms: Vec<_> = both.iter().map(|l| l["event"]["form_id"].as_str().unwrap().to_string()).collect();
    assert!(forms.contains(&"f-1".to_string()), "data kept across the restart: {forms:?}");
    let rejected = both.iter().find(|l| l["event"]["form_id"] == "f-2").unwrap();
    assert_eq!(rejected["type"], "FormRejected");
    assert_eq!(rejected["event"]["reason"], "site_not_pci_compliant");
    // Nothing answered twice after the restart (offsets came back from sled).
    let o = run(&["tail", "form-links", "--until-end", "--data-dir", d]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 2);
    stop(serve);
}

/// Runs an operations command against a data dir with the demo config and its master key.
fn ops(data_dir: &Path, args: &[&str]) -> Output {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
    Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--master-key-file")
        .arg(common::master_key_file(data_dir))
        .env_remove("SECUREFORMS_CONFIG")
        .env_remove("SECUREFORMS_BROKERS")
        .output()
        .expect("run secureforms")
}

fn json_of(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

#[test]
fn operations_commands_run_beside_a_live_node_and_replay_after_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let serve = serve_embedded(dir.path());
    let o = run(&[
        "chatbus",
        "send-form",
        "--data-dir",
        d,
        "--site",
        "acme",
        "--conversation",
        "c-9",
        "--agent",
        "a-7",
        "--template",
        "card-payment",
        "--form-id",
        "f-9",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(tail_lines(dir.path(), "form-links", 1)[0]["type"], "FormIssued");

    // Beside the live node: an operations replica under <data_dir>/ops.
    let o = ops(dir.path(), &["compliance", "--json"]);
    let report = json_of(&o);
    let acme =
        report["sites"].as_array().unwrap().iter().find(|s| s["site_id"] == "acme").expect("acme reported").clone();
    let controls: Vec<&str> =
        acme["controls"].as_array().unwrap().iter().map(|c| c["control"].as_str().unwrap()).collect();
    for c in ["policy_gate", "permissions", "retention", "purge_worker", "key_ages"] {
        assert!(controls.contains(&c), "{c} missing: {controls:?}");
    }
    let any_fail = report["sites"].as_array().unwrap().iter().any(|s| s["status"] == "fail");
    assert_eq!(o.status.success(), !any_fail, "exit code follows the verdict: {}", text(&o));

    let o = ops(dir.path(), &["purge", "--as-of", "2099-12-31", "--dry-run", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let r = json_of(&o);
    assert_eq!((r["as_of"].as_str().unwrap(), r["dry_run"].as_bool().unwrap()), ("2099-12-31T23:59:59.999Z", true));
    let o = ops(dir.path(), &["purge", "--as-of", "31/12/2099"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("YYYY-MM-DD"), "{}", text(&o));

    let o = ops(dir.path(), &["erase", "--site", "acme", "--conversation", "c-9", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let r = json_of(&o);
    assert_eq!(r["conversations"][0]["conversation_id"], "c-9");
    assert_eq!(r["conversations"][0]["submissions_erased"], 0);
    let o = ops(dir.path(), &["erase", "--conversation", "never-seen"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("no site knows conversation"), "{}", text(&o));

    // Replay needs the node's own stores: refused while it runs, fine once it stopped.
    let o = ops(dir.path(), &["replay", "--projection", "visibility"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("Stop it first"), "{}", text(&o));
    stop(serve);
    let o = ops(dir.path(), &["replay", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let s = json_of(&o);
    assert!(s["read"].as_u64().unwrap() >= 3, "{s}");
    assert_eq!(s["dead_lettered"], 0);
    assert_eq!(
        s["handlers"].as_array().unwrap().len(),
        secureforms::service::ALL_HANDLERS.len(),
        "every projection, the sessions one too"
    );
    let o = ops(dir.path(), &["replay", "--projection", "nonsense"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("unknown projection"), "{}", text(&o));
}

/// One HTTP/1.1 request over a plain socket: (status, headers in lower case, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_lowercase(), body.to_string())
}

#[test]
fn serve_waits_for_brokers_that_do_not_answer_answering_503_meanwhile_and_serves_once_they_come() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: the brokers are "away".
    let port = free_port();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/demo.toml");
    let mut child = Command::new(bin())
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--master-key-file")
        .arg(common::master_key_file(dir.path()))
        .args(["--brokers", &format!("127.0.0.1:{port}")])
        .args(["--broker-kind", common::broker_kind().name()])
        .env("SECUREFORMS_HTTP_LISTEN", "127.0.0.1:0")
        .env("SECUREFORMS_METRICS_LISTEN", "")
        .env("SECUREFORMS_JWT_SECRET", "cli-test-secret-that-is-at-least-32-bytes")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut gateway, mut retries, mut advice) = (None, 0, String::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    while gateway.is_none() || retries < 2 {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("serve logs that it listens and waits for the brokers, twice");
        if line.contains("listening") && line.contains("Gateway") {
            gateway = line.split("addr=").nth(1).and_then(|a| a.split_whitespace().next()).map(str::to_string);
        }
        if line.contains("the brokers do not answer; retrying") {
            retries += 1;
            advice = line;
        }
    }
    assert!(advice.contains("check that Kafka is up"), "says what to check: {advice}");
    assert!(child.try_wait().unwrap().is_none(), "serve keeps running while the brokers are away");
    let gateway = gateway.unwrap();

    // Meanwhile: alive, not ready, and 503 with Retry-After for visitors and agents.
    assert_eq!(http(&gateway, "GET", "/healthz", "").0, 200);
    assert_eq!(http(&gateway, "GET", "/readyz", "").0, 503);
    let (status, head, page) = http(&gateway, "GET", "/f/acme/form-1?k=AAAAAAAAAAAAAAAAAAAAAA", "");
    assert_eq!(status, 503, "broker trouble is not the visitor's fault: {page}");
    assert!(head.contains("retry-after:") && head.contains("content-security-policy:"), "{head}");
    assert!(page.contains("try again"), "{page}");
    let uuid = "00000000-0000-4000-8000-000000000000";
    let (status, head, body) =
        http(&gateway, "POST", &format!("/api/v1/submissions/{uuid}/retrieve"), r#"{"key":"AAAAAAAAAAAAAAAAAAAAAA"}"#);
    assert_eq!(status, 503, "{body}");
    assert!(head.contains("retry-after:") && head.contains("application/json"), "{head}");
    assert!(body.contains("not_ready"), "{body}");
    assert_eq!(http(&gateway, "GET", "/static/form.css", "").0, 200, "the error page's stylesheet is served");

    // The brokers come: the same process becomes ready and serves.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let broker_settings = secureforms::config::Settings {
        data_dir: dir.path().join("broker"),
        embedded_broker: common::broker_kind(),
        embedded_broker_port: port,
        ..Default::default()
    };
    let broker = runtime
        .block_on(secureforms::broker::EmbeddedBroker::start_for(&broker_settings))
        .expect("the test broker starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    while http(&gateway, "GET", "/readyz", "").0 != 200 {
        assert!(Instant::now() < deadline, "serve did not become ready once the brokers answered");
        assert!(child.try_wait().unwrap().is_none(), "serve keeps running");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, _, body) =
        http(&gateway, "POST", &format!("/api/v1/submissions/{uuid}/retrieve"), r#"{"key":"AAAAAAAAAAAAAAAAAAAAAA"}"#);
    assert_eq!(status, 401, "the node itself answers now (no token: 401): {body}");
    stop(Serve(child));
    runtime.block_on(broker.stop());
}

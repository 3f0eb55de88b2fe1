//! Runs tests/browser/form.test.mjs (node's test runner, playwright-core, axe-core, Debian's
//! headless Chromium) against the visitor gateway of a running service. Screenshots land in
//! test-artifacts/. scripts/install-browser.sh installs Chromium and the npm packages.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use secureforms::events::Event;
use secureforms::kafka::runtime::system_clock;
use secureforms::service::Service;
use secureforms::topics::Topic;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_visitor_page_passes_axe_keyboard_phone_and_no_script_checks_in_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("tests/browser/node_modules/playwright-core").exists() && Path::new("/usr/bin/chromium").exists(),
        "browser tools missing: run scripts/install-browser.sh"
    );
    let prefix = unique_prefix("browser");
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&prefix, dir.path());
    s.http_listen = Some("127.0.0.1:0".into());
    let mut service = Service::start(s, brokers(), system_clock()).await.unwrap();
    service.wait_ready(std::time::Duration::from_secs(60)).await.expect("ready");
    let base = format!("http://{}", service.http_addr.unwrap());

    let producer = producer(&prefix).await;
    let forms = [
        ("b-0", "card-payment"),
        ("b-1", "identity"),
        ("b-2", "card-payment"),
        ("b-3", "card-payment"),
        ("b-4", "card-payment"),
    ];
    for (form, template) in forms {
        producer.send(&form_sent("acme", &format!("conv-{form}"), form, "agent-1", "agent", template)).await.unwrap();
    }
    let mut links = TopicReader::new(&prefix, Topic::FormLinks).await;
    assert!(links.read_until(Duration::from_secs(60), |r| r.len() >= forms.len()).await);
    let by_form: std::collections::BTreeMap<String, String> = links
        .events()
        .into_iter()
        .filter_map(|e| {
            if let Event::FormIssued(i) = e {
                Some((i.form_id, i.link.trim_start_matches("http://127.0.0.1:8080").to_string()))
            } else {
                None
            }
        })
        .collect();
    let ordered: Vec<&String> = forms.iter().map(|(f, _)| &by_form[*f]).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for (form, _) in forms {
        let key = secureforms::handlers::issuer::form_key("acme", form);
        while !service.gateway.tree(secureforms::handlers::gateway::FORMS_TREE).unwrap().contains_key(&key).unwrap() {
            assert!(std::time::Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    let artifacts = root.join("test-artifacts");
    let links_json = serde_json::to_string(&ordered).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .args(["--test", "--test-reporter=spec", "form.test.mjs"])
            .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser"))
            .env("BASE_URL", base)
            .env("LINKS", links_json)
            .env("ARTIFACTS", artifacts)
            .output()
            .expect("run node")
    })
    .await
    .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    service.stop().await;
    assert!(out.status.success(), "browser tests failed:\n{report}");
    for shot in [
        "form-desktop.png",
        "form-errors-desktop.png",
        "thank-you-desktop.png",
        "form-phone.png",
        "form-errors-phone.png",
    ] {
        assert!(root.join("test-artifacts").join(shot).exists(), "{shot} taken");
    }
}

//! Interoperability with independent implementations: a chat bus built on the Java Avro library
//! (its own Parsing Canonical Form fingerprints and single-object encoding) and the Java Kafka
//! client (its default partitioner, murmur2) sends FormSent and reads back our FormIssued. The jars
//! come from Maven Central through scripts/install-interop.sh (run here if needed).

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use secureforms::kafka::runtime::system_clock;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn interop_jars() -> String {
    let out = Command::new("bash")
        .arg(Path::new(ROOT).join("scripts/install-interop.sh"))
        .output()
        .expect("run install-interop.sh");
    assert!(out.status.success(), "install-interop.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().last().expect("jar directory").trim().to_string()
}

/// Runs the Java chat bus for one form; returns its JSON answer.
fn java_chat_bus(prefix: &str, site: &str, conversation: &str, form: &str, template: &str) -> serde_json::Value {
    let jars = interop_jars();
    let out = Command::new("java")
        .current_dir(ROOT)
        .args(["-cp", &format!("{jars}/*"), "tests/interop/ChatBus.java"])
        .args([&brokers(), prefix, site, conversation, form, "agent-java", template, "90"])
        .output()
        .expect("run java");
    assert!(
        out.status.success(),
        "the Java chat bus got no answer: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_bus_on_the_java_avro_and_kafka_libraries_sends_form_sent_and_reads_form_issued() {
    let prefix = unique_prefix("interop");
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(&prefix, dir.path());
    let mut service = secureforms::service::Service::start(settings, brokers(), system_clock()).await.expect("starts");
    service.wait_ready(Duration::from_secs(60)).await.expect("ready");

    let conversations = ["conv-java-1", "conv-java-2", "conv-java-3", "conv-java-4"];
    for (i, conversation) in conversations.iter().enumerate() {
        let form = format!("java-form-{i}");
        let answer =
            tokio::task::block_in_place(|| java_chat_bus(&prefix, "acme", conversation, &form, "card-payment"));
        assert_eq!(answer["type"], "FormIssued", "{answer}");
        assert_eq!(answer["form_id"], form.as_str());
        assert!(answer["link"].as_str().unwrap().contains("/f/"), "{answer}");
        // The Java client put FormSent where murmur2 says; our FormIssued for the same conversation
        // is on the same partition number of form-links (co-partitioning).
        assert_eq!(answer["sent_partition"], answer["answer_partition"], "{answer}");
    }
    let rejected = tokio::task::block_in_place(|| {
        java_chat_bus(&prefix, "acme", "conv-java-x", "java-form-x", "no-such-template")
    });
    assert_eq!(rejected["type"], "FormRejected", "{rejected}");
    assert_eq!(rejected["reason"], "unknown_template", "{rejected}");
    assert_eq!(
        service.metrics.total("secureforms_dead_letters_total", &[]),
        0.0,
        "nothing the Java client sent was dead-lettered"
    );
    service.stop().await;
}

//! Shared test harness: a real Kafka-protocol broker process, unique topic prefixes per test, and
//! helpers to act as the chat bus and to read topics with a deadline (never a fixed sleep).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use base64::Engine;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use secureforms::config::Settings;
use secureforms::events::{Codec, Event, EventHeader, EventKind, FormSent};
use secureforms::kafka::{EventProducer, KafkaSettings};
use secureforms::topics::{Topic, TopicNames};
use secureforms::vault::offrecord::Secret;

/// The broker for this test binary: `SF_TEST_BROKERS` if set (scripts/test.sh starts one), else a
/// tansu process of our own, stopped when the test process exits.
pub fn brokers() -> String {
    broker().0.clone()
}

/// Which broker the tests run against: `SF_TEST_BROKER_KIND` (scripts/test.sh sets it), else tansu
/// (the broker this harness starts itself).
pub fn broker_kind() -> secureforms::kafka::BrokerKind {
    match std::env::var("SF_TEST_BROKER_KIND") {
        Ok(k) if std::env::var("SF_TEST_BROKERS").is_ok() => k.parse().expect("SF_TEST_BROKER_KIND is kafka or tansu"),
        _ => secureforms::kafka::BrokerKind::Tansu,
    }
}

/// Skips a test that needs Apache Kafka's behaviour (log compaction, ...) when running on tansu, and
/// says why. Returns true when the test should go on.
pub fn needs_kafka(what: &str) -> bool {
    if broker_kind() == secureforms::kafka::BrokerKind::Kafka {
        return true;
    }
    eprintln!("skipped on {}: needs Apache Kafka ({what})", broker_kind().name());
    false
}

/// Where the test broker keeps its data (to scan its raw bytes).
pub fn broker_dir() -> PathBuf {
    match std::env::var("SF_TEST_BROKER_DIR") {
        Ok(d) if std::env::var("SF_TEST_BROKERS").is_ok() => PathBuf::from(d),
        _ => broker().2.as_ref().expect("own broker has a dir").path().to_path_buf(),
    }
}

/// A port for a process a test starts (a broker, `serve`) and may restart on it. Taken below the
/// kernel's ephemeral range when it has room there, so no outgoing connection and no `bind(0)`
/// elsewhere can take it while the process restarts; free when chosen; and never handed out twice
/// in this process (a port from `bind(0)`, released at once, was handed out again: two nodes of one
/// failover test got the same one).
pub fn free_port() -> u16 {
    static TAKEN: Mutex<std::collections::BTreeSet<u16>> = Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let mut taken = TAKEN.lock().unwrap();
    loop {
        let port = if ephemeral_low > 11_000 {
            rand::random_range(10_000..ephemeral_low)
        } else {
            std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
        };
        if !taken.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
}

fn broker() -> &'static (String, Option<Child>, Option<tempfile::TempDir>) {
    static BROKER: OnceLock<(String, Option<Child>, Option<tempfile::TempDir>)> = OnceLock::new();
    BROKER.get_or_init(|| {
        if let Ok(b) = std::env::var("SF_TEST_BROKERS") {
            return (b, None, None);
        }
        let bin = secureforms::broker::find_binary(None)
            .expect("tansu installed (scripts/install-broker.sh) or SF_TEST_BROKERS set");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        // PR_SET_PDEATHSIG fires when the spawning *thread* ends, and test threads end with
        // their test: spawn from a thread that lives as long as the process.
        let (tx, rx) = std::sync::mpsc::channel();
        let (b, d, a) = (bin.clone(), dir.path().to_path_buf(), addr.clone());
        std::thread::spawn(move || {
            let child = spawn_tansu(&b, &d, &a);
            tx.send(child).unwrap();
            loop {
                std::thread::park();
            }
        });
        let child = rx.recv().unwrap();
        wait_for_port(&addr, Duration::from_secs(60));
        (addr, Some(child), Some(dir))
    })
}

pub fn spawn_tansu(bin: &Path, dir: &Path, addr: &str) -> Child {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(bin);
    cmd.current_dir(dir)
        .args(["broker", "--storage-engine", "sqlite://broker.db"])
        .args(["--listener-url", &format!("tcp://{addr}"), "--advertised-listener-url", &format!("tcp://{addr}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe; the broker stops when the test process does.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().expect("spawn tansu")
}

pub fn wait_for_port(addr: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "broker at {addr} not reachable within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A topic prefix no other test uses.
pub fn unique_prefix(test: &str) -> String {
    format!("t{}-{}.", &uuid::Uuid::new_v4().simple().to_string()[..8], test)
}

pub fn kafka(prefix: &str) -> KafkaSettings {
    KafkaSettings {
        brokers: brokers(),
        kind: Some(broker_kind()),
        names: TopicNames::new(prefix),
        group_prefix: prefix.trim_end_matches('.').to_string(),
        client_id: "test".into(),
        node_id: "test".into(),
        max_batch: 500,
        properties: Default::default(),
    }
}

/// Writes a key file readable by its owner only (the service refuses anything more open).
pub fn write_private(path: &Path, contents: &[u8]) {
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// Writes a fresh master key into `dir` (once) and returns its path.
pub fn master_key_file(dir: &Path) -> PathBuf {
    let path = dir.join("master.key");
    if !path.exists() {
        write_private(&path, secureforms::crypto::MasterKey::generate_base64().as_bytes());
    }
    path
}

/// Settings for an in-process service on the test broker, with the example sites.
pub fn settings(prefix: &str, data_dir: &Path) -> Settings {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/secureforms.example.toml");
    let overrides = serde_json::json!({
        "brokers": brokers(),
        "broker_kind": broker_kind(),
        "topic_prefix": prefix,
        "group_prefix": prefix.trim_end_matches('.'),
        "data_dir": data_dir,
        "public_url": "http://127.0.0.1:8080",
        "master_key_file": master_key_file(data_dir),
        // No gateway, metrics listener or purge worker unless a test asks: tests run side by side.
        "http_listen": "",
        "metrics_listen": "",
        "purge_interval_secs": 0,
    });
    let mut s = Settings::load(Some(&example), &overrides).expect("example config loads");
    // Test tokens carry no audience unless a test asks for one.
    s.agent_auth.audience = None;
    s
}

/// The submit key a form page carries (`<input name="k" value="...">`), read to its closing quote
/// as any HTML client would: keys end in their partition (`.p`).
pub fn submit_key_in(page: &str) -> String {
    let at = page.find("name=\"k\" value=\"").expect("the page carries a submit key") + 16;
    let end = page[at..].find('"').expect("the value attribute ends") + at;
    page[at..end].to_string()
}

/// The card-payment form's answers as the page posts them (urlencoded), with its submit key: the
/// cardholder Ada, `pan`, expiry 12/39 and the CVV 737 (off the record).
pub fn card_form_body(submit_key: &str, pan: &str) -> String {
    serde_urlencoded::to_string([
        ("k", submit_key),
        ("cardholder", "Ada"),
        ("pan", pan),
        ("expiry", "12/39"),
        ("cvv", "737"),
    ])
    .expect("urlencoded answers")
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

pub fn form_sent(site: &str, conversation: &str, form: &str, agent: &str, profile: &str, template: &str) -> Event {
    Event::FormSent(FormSent {
        header: EventHeader::new(EventKind::FormSent, uuid::Uuid::new_v4(), now_ms(), site, conversation, form),
        form_id: form.into(),
        agent_id: agent.into(),
        agent_profile: profile.into(),
        template_id: template.into(),
        visitor_ref: None,
        agent_session_id: None,
    })
}

pub async fn producer(prefix: &str) -> EventProducer {
    EventProducer::new(&kafka(prefix)).unwrap()
}

/// A producer that signs what it sends as the service in `data_dir` does (its master key): for tests
/// that play the service's part and write events only it produces.
pub async fn signed_producer(prefix: &str, data_dir: &Path) -> EventProducer {
    let text = std::fs::read_to_string(master_key_file(data_dir)).unwrap();
    let master = secureforms::crypto::MasterKey::from_base64(&text).unwrap();
    producer(prefix).await.with_signer(std::sync::Arc::new(secureforms::crypto::mac::EventSigner::new(
        &secureforms::crypto::IntegrityKey::from_master(&master),
    )))
}

/// Kafka settings for other brokers than the shared test broker.
pub fn kafka_on(brokers: &str, prefix: &str) -> KafkaSettings {
    KafkaSettings { brokers: brokers.to_string(), ..kafka(prefix) }
}

/// Reads a topic from the beginning (no group) until `done` says so or the deadline passes.
pub struct TopicReader {
    consumer: StreamConsumer,
    pub records: Vec<OwnedMessage>,
}

impl TopicReader {
    pub async fn new(prefix: &str, topic: Topic) -> TopicReader {
        TopicReader::on(&brokers(), prefix, topic).await
    }

    /// A reader on other brokers than the shared test broker.
    pub async fn on(brokers: &str, prefix: &str, topic: Topic) -> TopicReader {
        let name = TopicNames::new(prefix).name(topic);
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "50")
            .create()
            .unwrap();
        let partitions = topic.spec().partitions;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&name, p, Offset::Beginning).unwrap();
        }
        consumer.assign(&tpl).unwrap();
        TopicReader { consumer, records: Vec::new() }
    }

    /// Reads until `done(records)` or `timeout`; returns whether `done` was reached.
    pub async fn read_until(&mut self, timeout: Duration, done: impl Fn(&[OwnedMessage]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(&self.records) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Ok(Ok(m)) = tokio::time::timeout(left.min(Duration::from_millis(500)), self.consumer.recv()).await {
                self.records.push(m.detach());
            }
        }
        true
    }

    pub fn events(&self) -> Vec<Event> {
        self.records.iter().filter_map(|m| m.payload().and_then(|p| Codec::get().decode(p).ok())).collect()
    }
}

pub fn count_of(records: &[OwnedMessage], kind: EventKind) -> usize {
    records
        .iter()
        .filter_map(|m| m.payload().and_then(|p| Codec::get().decode(p).ok()))
        .filter(|e| e.kind() == kind)
        .count()
}

/// Every event of a kind keyed by correlation id (the form id for form events).
pub fn by_correlation(events: &[Event]) -> BTreeMap<String, Vec<Event>> {
    let mut m: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for e in events {
        m.entry(e.header().correlation_id.clone()).or_default().push(e.clone());
    }
    m
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_secureforms"))
}

/// A Visa-like PAN with a valid Luhn check digit, distinct per seed.
pub fn luhn_pan(seed: u64) -> String {
    let mut digits: Vec<u32> =
        format!("4{:014}", seed % 100_000_000_000_000).chars().map(|c| c.to_digit(10).unwrap()).collect();
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    digits.push((10 - sum % 10) % 10);
    digits.iter().map(|d| char::from_digit(*d, 10).unwrap()).collect()
}

/// A template of the example config's `acme` site.
pub fn template(settings: &Settings, id: &str) -> secureforms::domain::template::Template {
    settings.sites["acme"].template(id).unwrap().clone()
}

pub fn answers(pairs: &[(&str, &str)]) -> BTreeMap<String, Secret> {
    pairs.iter().map(|(k, v)| (k.to_string(), Secret::new(v.to_string()))).collect()
}

/// Every file under `dir`, recursively (to scan raw bytes).
pub fn all_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(all_files(&p)) } else { out.push(p) }
    }
    out
}

/// Everything any test in this binary logs, at every level, including the `log` records of the
/// libraries (sled's trace logs print byte slices).
///
/// The capturing subscriber touches no thread-local: sled logs from its thread-local destructors
/// when a thread ends, and a formatter that uses a thread-local buffer there (tracing-subscriber's
/// fmt does) panics after that buffer is gone, which aborts the whole test process.
pub fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        if tracing::subscriber::set_global_default(Capture { buf: buf.clone(), next_id: Default::default() }).is_ok() {
            let _ = tracing_log::LogTracer::init();
        }
        buf
    })
}

/// A subscriber that writes each event (level, target, fields) and each span's fields as one line.
struct Capture {
    buf: Arc<Mutex<Vec<u8>>>,
    next_id: std::sync::atomic::AtomicU64,
}

struct Line(String);

impl tracing::field::Visit for Line {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {}={:?}", field.name(), value);
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {}={}", field.name(), value);
    }
}

impl Capture {
    fn write(&self, line: Line) {
        if let Ok(mut b) = self.buf.lock() {
            b.extend_from_slice(line.0.as_bytes());
            b.push(b'\n');
        }
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let mut line = Line(format!("span {} {}", span.metadata().target(), span.metadata().name()));
        span.record(&mut line);
        self.write(line);
        tracing::span::Id::from_u64(self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1)
    }
    fn record(&self, _: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        let mut line = Line("span record".into());
        values.record(&mut line);
        self.write(line);
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        use tracing_log::NormalizeEvent;
        // A `log` record names its real target (e.g. sled::pagecache) in its normalized metadata.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = Line(format!("{} {}", meta.level(), meta.target()));
        event.record(&mut line);
        self.write(line);
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The canary as raw text, hex (both cases) and base64 at every alignment (standard and URL-safe).
pub fn forms_of(canary: &str) -> Vec<Vec<u8>> {
    // Also as a decimal byte list, the way Debug prints byte slices (sled's trace logs do).
    let decimal = canary.bytes().map(|b| b.to_string()).collect::<Vec<_>>().join(", ");
    let mut forms = vec![
        canary.as_bytes().to_vec(),
        hex::encode(canary).into_bytes(),
        hex::encode_upper(canary).into_bytes(),
        decimal.into_bytes(),
    ];
    for pad in 0..3 {
        let mut input = vec![b'x'; pad];
        input.extend_from_slice(canary.as_bytes());
        for engine in [&base64::engine::general_purpose::STANDARD, &base64::engine::general_purpose::URL_SAFE] {
            let enc = engine.encode(&input);
            // Drop the characters that depend on the padding bytes and on what follows.
            let start = if pad == 0 { 0 } else { 4 };
            let stable = &enc.as_bytes()[start..enc.len().saturating_sub(4)];
            if stable.len() >= 8 {
                forms.push(stable.to_vec());
            }
        }
    }
    forms
}

/// How many of `needles` occur in `haystack`.
pub fn hits(haystack: &[u8], needles: &[Vec<u8>]) -> usize {
    needles.iter().filter(|n| find(haystack, n).is_some()).count()
}

/// Whether a byte next to an all-digit canary makes the match part of a longer token: a number,
/// a hex string (pointers, UUIDs, hashes), a timestamp, a version or an identifier. A short value
/// such as a 4-digit CVV otherwise "occurs" by chance in `0x7fb8ec0a8590`, a UUID's `-8590-` group
/// or `19:41:33.8590`; stored or logged as a value it stands alone (`"8590"`, `=8590`, `: 8590`,
/// after an Avro length byte), which the scan still finds.
fn part_of_a_token(b: &u8) -> bool {
    b.is_ascii_alphanumeric() || b"-.:_".contains(b)
}

/// The byte codes of a decimal byte list (`55, 52, 50, 56`) whose bytes are all ASCII digits: the
/// byte-list form of a digit canary.
fn digit_byte_list(needle: &[u8]) -> bool {
    std::str::from_utf8(needle).is_ok_and(|s| {
        s.split(", ")
            .all(|n| n.parse::<u8>().is_ok_and(|b| b.is_ascii_digit() && n.bytes().all(|c| c.is_ascii_digit())))
    })
}

/// In a printed byte list, whether the element next to a match at `start..end` is the code of a
/// character that makes the match part of a longer token (or the match cuts a number in two).
fn byte_list_neighbour_joins(haystack: &[u8], start: usize, end: usize) -> bool {
    let joins = |code: &[u8]| {
        std::str::from_utf8(code).ok().and_then(|n| n.parse::<u8>().ok()).is_some_and(|b| part_of_a_token(&b))
    };
    if haystack.get(start.wrapping_sub(1)).is_some_and(u8::is_ascii_digit)
        || haystack.get(end).is_some_and(u8::is_ascii_digit)
    {
        return true;
    }
    let before = &haystack[..start];
    if let Some(rest) = before.strip_suffix(b", ") {
        let from = rest.iter().rposition(|b| !b.is_ascii_digit()).map(|p| p + 1).unwrap_or(0);
        if joins(&rest[from..]) {
            return true;
        }
    }
    if let Some(rest) = haystack[end..].strip_prefix(b", ") {
        let to = rest.iter().position(|b| !b.is_ascii_digit()).unwrap_or(rest.len());
        if joins(&rest[..to]) {
            return true;
        }
    }
    false
}

/// First place `needle` occurs as a value of its own: an all-digit needle must not be part of a
/// longer token (see [`part_of_a_token`]), nor the byte-list form of one (its neighbouring codes
/// are checked the same way); any other needle matches anywhere.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let digits = needle.iter().all(u8::is_ascii_digit);
    let byte_list = !digits && digit_byte_list(needle);
    let bounded = |i: usize| {
        if byte_list {
            return !byte_list_neighbour_joins(haystack, i, i + needle.len());
        }
        !digits
            || (!haystack.get(i.wrapping_sub(1)).is_some_and(part_of_a_token)
                && !haystack.get(i + needle.len()).is_some_and(part_of_a_token))
    };
    // A literal regex searches with memchr/memmem: logs of tens of MB scan in milliseconds. Inside a
    // longer run of digits every occurrence of a digit needle touches a digit, so skipping the
    // overlapping candidates of a rejected match loses nothing.
    match std::str::from_utf8(needle) {
        Ok(text) => regex::bytes::Regex::new(&regex::escape(text))
            .expect("an escaped literal is a regex")
            .find_iter(haystack)
            .map(|m| m.start())
            .find(|&i| bounded(i)),
        Err(_) => haystack.windows(needle.len()).enumerate().find(|&(i, w)| w == needle && bounded(i)).map(|(i, _)| i),
    }
}

/// A card payment submitted through the node as the gateway would (site acme, agent-1).
pub async fn submit_card(
    service: &secureforms::service::Service,
    conversation: &str,
    form: &str,
    pan: &str,
) -> uuid::Uuid {
    let t = template(&service.settings, "card-payment");
    service
        .submit(secureforms::node::Submission {
            site_id: "acme",
            conversation_id: conversation,
            form_id: form,
            agent_id: "agent-1",
            template: &t,
            answers: answers(&[("cardholder", "A Visitor"), ("pan", pan), ("expiry", "12/30"), ("cvv", "123")]),
        })
        .await
        .expect("submitted")
}

/// Runs `secureforms dlq redrive` for the deployment `prefix`; asserts it succeeds and returns what
/// it printed.
pub fn redrive(prefix: &str, extra: &[&str]) -> String {
    let o = std::process::Command::new(bin())
        .args(["dlq", "redrive", "--brokers", &brokers(), "--topic-prefix", prefix])
        .args(extra)
        .env("SECUREFORMS_GROUP_PREFIX", prefix.trim_end_matches('.'))
        .env_remove("SECUREFORMS_CONFIG")
        .output()
        .unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{out}");
    out
}

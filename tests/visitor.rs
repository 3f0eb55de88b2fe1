//! The visitor gateway over real HTTP against the running service and the real broker: open ->
//! submit, every one-time-key misuse with its page and audit event, the reopen limit, validation
//! errors, bad input of every kind (4xx, never 5xx), security headers, key state across a restart,
//! rate limits, and a FormSubmitted that carries no plaintext.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use common::*;
use rdkafka::message::Message;
use secureforms::config::Settings;
use secureforms::events::{Codec, Event, EventKind};
use secureforms::kafka::runtime::Clock;
use secureforms::service::Service;
use secureforms::topics::Topic;

const WAIT: Duration = Duration::from_secs(60);

struct Fixture {
    service: Service,
    base: String,
    prefix: String,
    now: Arc<AtomicI64>,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

fn http_settings(prefix: &str, dir: &std::path::Path) -> Settings {
    let mut s = settings(prefix, dir);
    s.http_listen = Some("127.0.0.1:0".into());
    let acme = s.sites.get_mut("acme").unwrap();
    acme.reopen_limit = 2;
    acme.templates.push(every_sensitive_kind());
    s
}

/// A template with every kind whose answer is sensitive, and one plain required field.
fn every_sensitive_kind() -> secureforms::domain::template::Template {
    toml::from_str(
        r#"
id = "everything"
title = "Everything sensitive"
[[questions]]
id = "name"
label = "Full name"
kind = "short_text"
required = true
autocomplete = "name"
[[questions]]
id = "pan"
label = "Card number"
kind = "card_number"
required = true
[[questions]]
id = "ssn"
label = "SSN"
kind = "ssn"
required = true
[[questions]]
id = "pin"
label = "PIN"
kind = "pin"
required = true
[[questions]]
id = "secret"
label = "Security answer"
kind = "secret_answer"
required = true
[[questions]]
id = "cvv"
label = "CVV"
kind = "cvv"
required = true
"#,
    )
    .expect("test template parses")
}

async fn fixture(name: &str) -> Fixture {
    let prefix = unique_prefix(name);
    let dir = tempfile::tempdir().unwrap();
    let now = Arc::new(AtomicI64::new(now_ms()));
    let n = now.clone();
    let clock: Clock = Arc::new(move || n.load(Ordering::SeqCst));
    let service = Service::start(http_settings(&prefix, dir.path()), brokers(), clock).await.unwrap();
    service.wait_ready(WAIT).await.expect("ready");
    let base = format!("http://{}", service.http_addr.unwrap());
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    Fixture { service, base, prefix, now, client, _dir: dir }
}

impl Fixture {
    /// Sends a form as the chat bus and returns the visitor link (path and query) once issued.
    async fn issue(&self, form: &str, template: &str) -> String {
        let producer = producer(&self.prefix).await;
        producer.send(&form_sent("acme", &format!("conv-{form}"), form, "agent-1", "agent", template)).await.unwrap();
        let mut links = TopicReader::new(&self.prefix, Topic::FormLinks).await;
        assert!(links.read_until(WAIT, |r| r.iter().any(|m| is_issued(m, form))).await, "{form} issued");
        let link = links
            .events()
            .into_iter()
            .find_map(|e| if let Event::FormIssued(i) = e { (i.form_id == form).then_some(i.link) } else { None })
            .unwrap();
        // The gateway projection must know the form before the visitor can open it.
        let key = secureforms::handlers::issuer::form_key("acme", form);
        let deadline = std::time::Instant::now() + WAIT;
        while !self
            .service
            .gateway
            .tree(secureforms::handlers::gateway::FORMS_TREE)
            .unwrap()
            .contains_key(&key)
            .unwrap()
        {
            assert!(std::time::Instant::now() < deadline, "gateway projection has {form}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        link.trim_start_matches("http://127.0.0.1:8080").to_string()
    }

    async fn get(&self, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
        let r = self.client.get(format!("{}{}", self.base, path)).send().await.unwrap();
        (r.status().as_u16(), r.headers().clone(), r.text().await.unwrap())
    }

    async fn post(&self, path: &str, content_type: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
        let r = self
            .client
            .post(format!("{}{}", self.base, path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    /// The visitor's click on the link's page: POSTs the link's open key to `<path>/open`.
    async fn open(&self, link: &str) -> (u16, String) {
        let (path, k) = link.split_once("?k=").expect("a link with a key");
        let body = serde_urlencoded::to_string([("k", k)]).unwrap();
        self.post(&format!("{path}/open"), "application/x-www-form-urlencoded", body).await
    }

    async fn submit(&self, path: &str, fields: &[(&str, &str)]) -> (u16, String) {
        let body = serde_urlencoded::to_string(fields).unwrap();
        self.post(path.split('?').next().unwrap(), "application/x-www-form-urlencoded", body).await
    }
}

fn is_issued(m: &rdkafka::message::OwnedMessage, form: &str) -> bool {
    matches!(m.payload().map(|p| Codec::get().decode(p)), Some(Ok(Event::FormIssued(i))) if i.form_id == form)
}

/// The submit key from the form page.
fn submit_key(page: &str) -> String {
    submit_key_in(page)
}

const PAN: &str = "4111 1111 1111 1111";
/// Four digits (CVVs have 3 or 4): the scans look for it as a value of its own (common::find).
const CVV: &str = "7397";

fn good_answers(k: &str) -> Vec<(&str, &str)> {
    vec![("k", k), ("cardholder", "Ada <Lovelace> & \"Co\""), ("pan", PAN), ("expiry", "12/39"), ("cvv", CVV)]
}

async fn key_refusals(prefix: &str, n: usize) -> Vec<secureforms::events::KeyRefused> {
    let mut r = TopicReader::new(prefix, Topic::Submissions).await;
    assert!(r.read_until(WAIT, |rs| count_of(rs, EventKind::KeyRefused) >= n).await, "{n} KeyRefused audit events");
    r.events().into_iter().filter_map(|e| if let Event::KeyRefused(k) = e { Some(k) } else { None }).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_opens_fills_and_submits_and_only_ciphertext_reaches_the_topic() {
    let mut f = fixture("happy").await;
    let link = f.issue("form-1", "card-payment").await;
    // The link itself spends nothing: a page with one button that opens the form by POST.
    let (status, headers, page) = f.get(&link).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Open the secure form") && page.contains("method=\"post\""), "{page}");
    assert!(headers["content-security-policy"].to_str().unwrap().contains("frame-ancestors https://chat.acme.example"));
    let (status, page) = f.open(&link).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<h1>Card payment</h1>"));
    assert!(page.contains("autocomplete=\"cc-number\""));
    let k = submit_key(&page);
    assert_ne!(k, link.split("k=").nth(1).unwrap(), "the page carries a different key than the link");

    let (status, page) = f.submit(&link, &good_answers(&k)).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Thank you"));

    let mut subs = TopicReader::new(&f.prefix, Topic::Submissions).await;
    assert!(subs.read_until(WAIT, |r| count_of(r, EventKind::FormSubmitted) >= 1).await);
    for m in &subs.records {
        let raw = m.payload().unwrap();
        for needle in ["4111111111111111", "4111 1111 1111 1111", CVV, "Lovelace"] {
            assert_eq!(find(raw, needle.as_bytes()), None, "{needle} in clear on the submissions topic");
        }
    }
    let submitted =
        subs.events().into_iter().find_map(|e| if let Event::FormSubmitted(s) = e { Some(s) } else { None }).unwrap();
    assert_eq!(submitted.off_record_field_ids, vec!["cvv"]);
    assert!(submitted.answers.iter().all(|a| a.field_id != "cvv"));
    f.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_misuse_gets_a_clear_page_and_an_audit_event() {
    let mut f = fixture("misuse").await;
    let link = f.issue("form-2", "card-payment").await;
    let open_key = link.split("k=").nth(1).unwrap().to_string();
    let path = link.split('?').next().unwrap().to_string();
    let mut expected_refusals = 0;

    // Forged, missing, malformed and cross-site keys.
    for bad in [
        format!("{path}?k=AAAAAAAAAAAAAAAAAAAAAA"),
        path.clone(),
        format!("{path}?k=short"),
        format!("/f/other-site/form-2?k={open_key}"),
    ] {
        let (status, _, page) = f.get(&bad).await;
        assert_eq!(status, 403, "{bad}");
        assert!(page.contains("This link cannot be used"));
        assert!(!page.contains("form-2") || !page.contains("exist"), "non-revealing");
        expected_refusals += 1;
    }
    // The open key cannot submit.
    let (status, _) = f.submit(&link, &good_answers(&open_key)).await;
    assert_eq!(status, 403);
    expected_refusals += 1;

    // Open twice (reopen limit 2): the first page's submit key is superseded by the second.
    let (s1, first) = f.open(&link).await;
    let (s2, second) = f.open(&link).await;
    assert_eq!((s1, s2), (200, 200));
    let (status, _) = f.submit(&link, &good_answers(&submit_key(&first))).await;
    assert_eq!(status, 403, "superseded submit key");
    expected_refusals += 1;
    let (status, page) = f.open(&link).await;
    assert_eq!(status, 410, "third open is over the limit");
    assert!(page.contains("opened the maximum number of times"));
    expected_refusals += 1;

    // Submit once; the second POST (back button, other tab) is refused, and nothing is sent twice.
    let k = submit_key(&second);
    assert_eq!(f.submit(&link, &good_answers(&k)).await.0, 200);
    let (status, page) = f.submit(&link, &good_answers(&k)).await;
    assert_eq!(status, 409);
    assert!(page.contains("already been sent"));
    expected_refusals += 1;
    let (status, _, _) = f.get(&link).await;
    assert_eq!(status, 409, "the link is spent after submitting");
    expected_refusals += 1;

    let refusals = key_refusals(&f.prefix, expected_refusals).await;
    let reasons: Vec<_> = refusals.iter().map(|r| r.reason.as_str()).collect();
    assert_eq!(refusals.len(), expected_refusals, "{reasons:?}");
    for code in ["invalid", "reopen_limit", "already_submitted"] {
        assert!(reasons.contains(&code), "{code} audited: {reasons:?}");
    }
    assert!(refusals.iter().all(|r| !r.client_ref.contains("127.0.0.1")), "the client address is hashed");
    let mut subs = TopicReader::new(&f.prefix, Topic::Submissions).await;
    assert!(subs.read_until(WAIT, |r| count_of(r, EventKind::FormSubmitted) >= 1).await);
    assert_eq!(count_of(&subs.records, EventKind::FormSubmitted), 1, "one submission");
    f.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_keys_are_refused_by_the_clock() {
    let mut f = fixture("expiry").await;
    let link = f.issue("form-3", "card-payment").await;
    let (_, page) = f.open(&link).await;
    let k = submit_key(&page);
    f.now.fetch_add(31 * 60 * 1000, Ordering::SeqCst); // past both the 5 min open and 30 min submit lives
    let (status, page) = f.submit(&link, &good_answers(&k)).await;
    assert_eq!(status, 410);
    assert!(page.contains("expired"));
    let (status, _, _) = f.get(&link).await;
    assert_eq!(status, 410);
    let reasons: Vec<_> = key_refusals(&f.prefix, 2).await.into_iter().map(|r| r.reason).collect();
    assert_eq!(reasons, vec!["expired", "expired"]);
    f.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_answers_re_render_with_a_summary_and_masked_values_are_not_echoed() {
    let mut f = fixture("invalid").await;
    let link = f.issue("form-4", "card-payment").await;
    let (_, page) = f.open(&link).await;
    let k = submit_key(&page);
    let (status, page) = f
        .submit(
            &link,
            &[
                ("k", &k),
                ("cardholder", "<script>alert(1)</script>"),
                ("pan", "4111 1111 1111 1112"),
                ("expiry", "01/20"),
                ("cvv", "99"),
            ],
        )
        .await;
    assert_eq!(status, 422, "{page}");
    assert!(page.contains("There is a problem"));
    assert!(page.contains("href=\"#f-pan\""), "summary links to the field");
    assert!(page.contains("id=\"f-pan-error\""));
    assert!(page.contains("aria-invalid=\"true\""));
    assert!(
        page.contains("aria-describedby=\"f-pan-help f-pan-retype f-pan-error\""),
        "help, the retype hint and the error"
    );
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;") || page.contains("&#60;script&#62;"),
        "kept and escaped"
    );
    assert!(!page.contains("<script>alert(1)"), "never markup");
    assert!(!page.contains("4111 1111 1111 1112"), "a card number is never sent back, valid or not");
    assert!(!page.contains("value=\"99\""), "the CVV is never echoed");
    assert!(page.contains("<title>Error: Card payment"));
    // The same submit key still works once the answers are fixed.
    assert_eq!(f.submit(&link, &good_answers(&k)).await.0, 200);
    f.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_sensitive_answer_is_ever_sent_back_on_an_error_page() {
    let mut f = fixture("noecho").await;
    let link = f.issue("form-7", "everything").await;
    let (status, page) = f.open(&link).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("autocomplete=\"name\""), "declared autocomplete tokens reach the page");
    let k = submit_key(&page);
    let pan = luhn_pan(64_677);
    let last4 = &pan[pan.len() - 4..];
    // Valid sensitive answers with an error elsewhere (the name is missing), then invalid ones.
    let rounds: Vec<Vec<(&str, String)>> = vec![
        vec![
            ("pan", pan.clone()),
            ("ssn", "219-09-8765".into()),
            ("pin", "84035".into()),
            ("secret", "canary-secret-answer-7".into()),
            ("cvv", "9137".into()),
        ],
        vec![
            ("pan", "4111111111118403".into()),
            ("ssn", "000-56-7123".into()),
            ("pin", "85".into()),
            ("secret", "canary-secret-bad\u{7}".into()),
            ("cvv", "1x".into()),
        ],
    ];
    for (i, round) in rounds.iter().enumerate() {
        let mut fields: Vec<(&str, &str)> = vec![("k", &k), ("name", "")];
        fields.extend(round.iter().map(|(id, v)| (*id, v.as_str())));
        let (status, page) = f.submit(&link, &fields).await;
        assert_eq!(status, 422, "round {i}: {page}");
        for (id, value) in round {
            let digits: String = value.chars().filter(char::is_ascii_digit).collect();
            assert!(!page.contains(value.as_str()), "round {i}: {id} sent back as typed");
            if digits.len() >= 5 {
                assert!(!page.contains(&digits), "round {i}: {id} sent back as digits");
            }
        }
        if i == 0 {
            assert!(page.contains(&format!("card ending {last4}")), "a valid card number gets its last four as a hint");
        }
    }
    let (status, page) = f
        .submit(
            &link,
            &[
                ("k", &k),
                ("name", "Ada"),
                ("pan", &pan),
                ("ssn", "219-09-8765"),
                ("pin", "84035"),
                ("secret", "s"),
                ("cvv", "913"),
            ],
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert!(!page.contains(&pan) && !page.contains("219-09-8765"));
    f.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_previews_and_head_spend_nothing_and_strangers_cannot_rate_limit_the_visitor() {
    let mut f = fixture("preview").await;
    let link = f.issue("form-8", "card-payment").await;
    // HEAD, a chat app's preview bot and a mail scanner: none of them spends an open.
    let url = format!("{}{}", f.base, link);
    let head = f.client.head(&url).send().await.unwrap();
    assert_eq!(head.status().as_u16(), 200);
    for agent in ["Slackbot-LinkExpanding 1.0", "Mozilla/5.0 (compatible; Microsoft Office Preview)"] {
        let r = f.client.get(&url).header("user-agent", agent).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.text().await.unwrap().contains("Open the secure form"));
    }
    // Twenty-five strangers from other addresses, without the key, hammer the form.
    let path = link.split('?').next().unwrap();
    for i in 2..27u8 {
        let stranger =
            reqwest::Client::builder().local_address(std::net::IpAddr::from([127, 0, 0, i])).build().unwrap();
        for _ in 0..2 {
            let r = stranger.get(format!("{}{path}?k=AAAAAAAAAAAAAAAAAAAAAA", f.base)).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 403);
            let r = stranger
                .post(format!("{}{path}/open", f.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .body("k=AAAAAAAAAAAAAAAAAAAAAA")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 403);
        }
    }
    // Nothing was spent: both opens of the reopen limit (2) are left, and the visitor is not rate
    // limited by what the strangers sent.
    let (status, _, page) = f.get(&link).await;
    assert_eq!(status, 200);
    assert!(page.contains("opened 2 more times"), "{page}");
    let (status, page) = f.open(&link).await;
    assert_eq!(status, 200, "the visitor's own click opens the form: {page}");
    let (status, page) = f.submit(&link, &good_answers(&submit_key(&page))).await;
    assert_eq!(status, 200, "{page}");
    f.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_4xx_with_a_message_never_a_5xx_and_every_response_has_security_headers() {
    let mut f = fixture("badinput").await;
    let link = f.issue("form-5", "card-payment").await;
    let (_, page) = f.open(&link).await;
    let k = submit_key(&page);
    let path = link.split('?').next().unwrap().to_string();
    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        ("wrong content type", "application/json", b"{\"k\":\"x\"}".to_vec(), 415, "x-www-form-urlencoded"),
        // Just over the 64 KiB limit: the server answers 413 without reading the body and closes; a
        // body far larger than the socket buffers can still be mid-write then (broken pipe, client side).
        ("oversized", "application/x-www-form-urlencoded", vec![b'a'; 70 * 1024], 413, ""),
        ("unknown field", "application/x-www-form-urlencoded", format!("k={k}&admin=1").into_bytes(), 400, "admin"),
        (
            "malformed encoding",
            "application/x-www-form-urlencoded",
            format!("k={k}&pan=%FF%FE").into_bytes(),
            400,
            "encoded",
        ),
    ];
    for (what, ct, body, want, says) in cases {
        let (status, page) = f.post(&path, ct, body).await;
        assert_eq!(status, want, "{what}: {page}");
        assert!(page.contains(says), "{what} says what is wrong: {page}");
    }
    for p in [link.as_str(), "/nope", "/static/form.css", "/f/acme/form-5?k=AAAAAAAAAAAAAAAAAAAAAA"] {
        let (status, h, _) = f.get(p).await;
        assert!(status < 500, "{p}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{p}: {csp}"
        );
        assert_eq!(h["cache-control"], "no-store", "{p}");
        assert_eq!(h["referrer-policy"], "no-referrer", "{p}");
        assert!(h.get("strict-transport-security").is_none(), "no HSTS over plain HTTP");
    }
    let (_, h, _) = f.get("/nope").await;
    assert!(h["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"));
    f.service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visitor_mid_form_survives_a_restart_of_the_service() {
    let f = fixture("restart").await;
    let link = f.issue("form-6", "card-payment").await;
    let (_, page) = f.open(&link).await;
    let k = submit_key(&page);
    let Fixture { mut service, prefix, now, client, _dir: dir, .. } = f;
    // Let the projection record the opening before stopping (it is what a restart starts from).
    let key = secureforms::handlers::issuer::form_key("acme", "form-6");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let tree = service.gateway.tree(secureforms::handlers::gateway::FORMS_TREE).unwrap();
        let state: secureforms::domain::visitor::FormState =
            serde_json::from_slice(&tree.get(&key).unwrap().unwrap()).unwrap();
        if state.open_count == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.stop().await;
    drop(service);
    let n = now.clone();
    let clock: Clock = Arc::new(move || n.load(Ordering::SeqCst));
    let mut service = Service::start(http_settings(&prefix, dir.path()), brokers(), clock).await.unwrap();
    // A restarted node answers 503 until it has caught up; the visitor's browser would retry.
    service.wait_ready(WAIT).await.expect("ready after the restart");
    let base = format!("http://{}", service.http_addr.unwrap());
    let body = serde_urlencoded::to_string(good_answers(&k)).unwrap();
    let r = client
        .post(format!("{base}{}", link.split('?').next().unwrap()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "the submit key from before the restart still works");
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hammering_one_form_is_rate_limited() {
    let mut f = fixture("ratelimit").await;
    let statuses: Vec<u16> =
        futures::future::join_all((0..80).map(|_| f.get("/f/acme/no-such-form?k=AAAAAAAAAAAAAAAAAAAAAA")))
            .await
            .into_iter()
            .map(|r| r.0)
            .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 403 || *s == 429), "{statuses:?}");
    let r = f.client.get(format!("{}/f/acme/no-such-form", f.base)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 429);
    assert_eq!(r.headers()["retry-after"], "60");
    f.service.stop().await;
}

/// Accepts any server certificate: the test talks to its own self-signed gateway.
#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_generated_certificate_adds_hsts() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let prefix = unique_prefix("tls");
    let dir = tempfile::tempdir().unwrap();
    let mut s = http_settings(&prefix, dir.path());
    s.tls_self_signed = true;
    let mut service = Service::start(s, brokers(), secureforms::kafka::runtime::system_clock()).await.unwrap();
    service.wait_ready(WAIT).await.expect("ready");
    let addr = service.http_addr.unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(rustls::pki_types::ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake");
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tls.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("strict-transport-security: max-age=31536000"),
        "HSTS over HTTPS: {response}"
    );
    // Plain HTTP to the TLS port gets no page.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_and_protocol_errors_say_what_is_wrong() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let prefix = unique_prefix("slowloris");
    let dir = tempfile::tempdir().unwrap();
    let mut s = http_settings(&prefix, dir.path());
    s.http_header_read_timeout_secs = 1;
    s.http_idle_timeout_secs = 2;
    let mut service = Service::start(s, brokers(), secureforms::kafka::runtime::system_clock()).await.unwrap();
    service.wait_ready(WAIT).await.expect("ready");
    let addr = service.http_addr.unwrap();

    // Half a request, then silence (slowloris); and a connection that never sends anything.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: ").await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    for (what, conn) in [("half a request", &mut slow), ("an idle connection", &mut idle)] {
        let mut buf = [0u8; 1024];
        let mut read = 0;
        let closed = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match conn.read(&mut buf[read..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => read = (read + n).min(buf.len() - 1),
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "{what} was still open after 15 s with 1 s header read and 2 s idle timeouts");
    }

    // HTTP/1.1 without Host is refused; 405 and 413 carry a body in the route's format and the
    // security headers.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("Host"), "says what is missing: {answer}");

    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    let r = client.put(format!("{base}/f/acme/form-x")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(r.headers().contains_key("allow") && r.headers().contains_key("content-security-policy"));
    assert!(r.text().await.unwrap().contains("does not take that method"));
    let id = uuid::Uuid::new_v4();
    let r = client.delete(format!("{base}/api/v1/submissions/{id}/retrieve")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "method_not_allowed");
    let r = client
        .post(format!("{base}/api/v1/submissions/{id}/retrieve"))
        .header("content-type", "application/json")
        .body(vec![b' '; 70 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    assert!(r.headers().contains_key("content-security-policy"));
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "body_too_large");
    service.stop().await;
}

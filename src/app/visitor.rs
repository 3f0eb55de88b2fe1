//! The visitor's use cases (seed steps 3-5): look at the link (spends nothing), open the form (spends
//! one open, gives a fresh submit key), submit the answers (validated, sealed at the edge, durable
//! before the visitor is thanked). Every refused key is recorded as a KeyRefused audit event.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use dashmap::DashMap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use rand::SeedableRng;
use sha2::{Digest, Sha256};

use crate::domain::otk::{OtkSecret, Purpose};
use crate::domain::template::Template;
use crate::domain::validate::{FieldError, YearMonth, validate};
use crate::domain::visitor::{FormState, KeyRefusal, check_open, check_submit};
use crate::events::{Event, EventHeader, EventKind, FormOpened, KeyRefused};
use crate::handlers::gateway::GatewayView;
use crate::handlers::issuer::form_key;
use crate::node::{Node, Submission};
use crate::vault::offrecord::Secret;

/// Why a visitor's request was not served. The gateway renders each as a page with the status set
/// here: the visitor's (a key that cannot be used, answers that do not validate) or ours (503 with
/// Retry-After: never "this link cannot be used" for trouble on our side).
#[derive(Debug)]
pub enum VisitorRefusal {
    Key(KeyRefusal),
    /// Too many requests for this form with its valid key.
    TooMany,
    /// The form sent a field its template does not have.
    UnknownField(String),
    /// The answers do not validate: the form again, with what to fix.
    Invalid {
        template: Box<Template>,
        errors: Vec<FieldError>,
    },
    /// The form's template is no longer configured.
    TemplateGone,
    /// The node cannot read its state, or cannot make the request durable.
    Unavailable,
    /// The node has not caught up with the form's events yet (after a restart or a move).
    CatchingUp,
}

impl VisitorRefusal {
    pub fn status(&self) -> u16 {
        match self {
            VisitorRefusal::Key(KeyRefusal::Invalid) => 403,
            VisitorRefusal::Key(KeyRefusal::Expired | KeyRefusal::ReopenLimit) => 410,
            VisitorRefusal::Key(KeyRefusal::AlreadySubmitted) => 409,
            VisitorRefusal::TooMany => 429,
            VisitorRefusal::UnknownField(_) => 400,
            VisitorRefusal::Invalid { .. } => 422,
            VisitorRefusal::TemplateGone | VisitorRefusal::Unavailable | VisitorRefusal::CatchingUp => 503,
        }
    }
}

/// The gateway's working state on this node: form key state it wrote ahead of the projection, one
/// request at a time per form, and the per-form rate limit (counted only for a valid key, so a
/// stranger without it cannot use up the visitor's allowance).
pub struct Gateway {
    /// Form key state this node wrote, with the ownership epoch it was written in: an entry from an
    /// earlier epoch is ignored (the form's partition may have been served elsewhere since).
    overlay: DashMap<Vec<u8>, (u64, FormState)>,
    locks: DashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>,
    per_form: DefaultKeyedRateLimiter<String>,
}

impl Gateway {
    pub fn new(per_form: crate::config::Rate) -> Gateway {
        let quota = Quota::per_minute(NonZeroU32::new(per_form.per_minute).unwrap_or(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(per_form.burst).unwrap_or(NonZeroU32::MIN));
        Gateway { overlay: DashMap::new(), locks: DashMap::new(), per_form: RateLimiter::keyed(quota) }
    }

    /// The form's key state this node wrote in the current ownership epoch, if any: the latest there
    /// is, since only the owner of its partition writes it.
    fn written_here(&self, node: &Node, site: &str, form: &str) -> Option<FormState> {
        let epoch = node.ownership.epoch();
        self.overlay.get(&form_key(site, form)).filter(|e| e.0 == epoch).map(|e| e.1.clone())
    }

    fn remember(&self, node: &Node, site: &str, form: &str, state: FormState) {
        self.overlay.insert(form_key(site, form), (node.ownership.epoch(), state));
    }

    /// The form's key state: this node's latest writes, else the projection.
    fn form(&self, node: &Node, site: &str, form: &str) -> Result<Option<FormState>, VisitorRefusal> {
        if let Some(s) = self.written_here(node, site, form) {
            return Ok(Some(s));
        }
        GatewayView::new(node.gateway.clone()).form(site, form).map_err(|error| {
            tracing::error!(%error, site_id = %site, form_id = %form, "cannot read the form's key state; check the data directory's disk");
            VisitorRefusal::Unavailable
        })
    }

    fn lock(&self, site: &str, form: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.entry(form_key(site, form)).or_default().clone()
    }

    fn limited(&self, site: &str, form: &str) -> bool {
        self.per_form.check_key(&format!("{site}/{form}")).is_err()
    }
}

/// Waits until this node's gateway state has caught up on the form's partition (the one its key
/// names, else its conversation's; neither: no wait); 503 if it cannot in time.
async fn caught_up(node: &Node, key: Option<&OtkSecret>, state: Option<&FormState>) -> Result<(), VisitorRefusal> {
    let partition = key.and_then(|k| k.partition()).or_else(|| state.map(|s| node.partition_of(&s.conversation_id)));
    // No key we issued and no known form: nothing the visitor can have seen is missing here.
    let Some(partition) = partition else { return Ok(()) };
    crate::cluster::catch_up(node, crate::cluster::VISITOR_STATE, partition).await.map_err(|error| {
        tracing::warn!(%error, "a visitor's request got 503: this node has not caught up with the form's partition");
        VisitorRefusal::CatchingUp
    })
}

/// Where a request came from, for audit records: a hash of the address, never the address.
pub fn client_ref(addr: &std::net::SocketAddr) -> String {
    hex::encode(&Sha256::digest(format!("secureforms-client/{}", addr.ip()).as_bytes())[..8])
}

/// Records a refused key (audit) without holding up the visitor's page.
fn audit_refusal(
    node: &Node,
    site: &str,
    form: &str,
    current: Option<&FormState>,
    purpose: Purpose,
    r: KeyRefusal,
    client: &str,
) {
    let conversation = current.map(|s| s.conversation_id.as_str()).unwrap_or_default();
    let event = Event::KeyRefused(KeyRefused {
        header: EventHeader::new(EventKind::KeyRefused, uuid::Uuid::new_v4(), (node.clock)(), site, conversation, form),
        form_id: form.to_string(),
        purpose: purpose.as_str().to_string(),
        reason: r.code().to_string(),
        client_ref: client.to_string(),
    });
    tracing::info!(
        site_id = site,
        form_id = form,
        purpose = purpose.as_str(),
        reason = r.code(),
        "one-time key refused"
    );
    node.metrics.otk(purpose.as_str(), r.code());
    let audit = node.audit.clone();
    tokio::spawn(async move {
        if let Err(error) = audit.record(&event, None).await {
            tracing::warn!(%error, "could not record a key refusal; check the data directory's disk");
        }
    });
}

fn template_for(node: &Node, site: &str, fs: &FormState) -> Result<Template, VisitorRefusal> {
    node.settings.sites.get(site).and_then(|s| s.template(&fs.template_id)).cloned().ok_or_else(|| {
        tracing::error!(site_id = %site, template_id = %fs.template_id, "form refers to a template no longer configured; restore it in the config file");
        VisitorRefusal::TemplateGone
    })
}

/// What the link's page shows.
pub struct LinkPage {
    pub title: String,
    pub opens_left: i32,
}

/// The link in the chat: checks the key and spends nothing. `audit` is false for HEAD requests,
/// which must change nothing.
pub async fn look(
    node: &Node,
    gw: &Gateway,
    site: &str,
    form: &str,
    key: Option<&OtkSecret>,
    client: &str,
    audit: bool,
) -> Result<LinkPage, VisitorRefusal> {
    let mut current = gw.form(node, site, form)?;
    if matches!(check_open(current.as_ref(), site, form, key, (node.clock)()), Err(KeyRefusal::Invalid)) {
        // A link is good as soon as the chat bus has it: catch up before refusing it as unknown.
        caught_up(node, key, current.as_ref()).await?;
        current = gw.form(node, site, form)?;
    }
    match check_open(current.as_ref(), site, form, key, (node.clock)()) {
        Ok(checked) => {
            let title =
                template_for(node, site, checked.state).map(|t| t.title).unwrap_or_else(|_| "Secure form".into());
            Ok(LinkPage { title, opens_left: checked.state.opens_left() })
        }
        Err(r) => {
            if audit {
                audit_refusal(node, site, form, current.as_ref(), Purpose::Open, r, client);
            }
            Err(VisitorRefusal::Key(r))
        }
    }
}

/// A form whose key was checked for an open or a submit, under the form's lock (held while this
/// lives), within the per-form limit, with its template.
struct Admitted {
    _held: tokio::sync::OwnedMutexGuard<()>,
    now: i64,
    state: FormState,
    template: Template,
}

/// What open and submit check before they act: one request at a time per form, the key for
/// `purpose` (a refused key is audited), the per-form limit, the template.
async fn admit(
    node: &Node,
    gw: &Gateway,
    site: &str,
    form: &str,
    key: Option<&OtkSecret>,
    purpose: Purpose,
    client: &str,
) -> Result<Admitted, VisitorRefusal> {
    let held = gw.lock(site, form).lock_owned().await;
    // Unless this node wrote the form's latest state itself, it first applies everything the
    // brokers hold for the form's partition: a key spent on another node (before a restart or a
    // move) is spent here too, and a link the chat bus just got is known.
    let current = match gw.written_here(node, site, form) {
        Some(s) => Some(s),
        None => {
            let projected = gw.form(node, site, form)?;
            caught_up(node, key, projected.as_ref()).await?;
            gw.form(node, site, form)?
        }
    };
    let now = (node.clock)();
    let check = if purpose == Purpose::Submit { check_submit } else { check_open };
    let state = match check(current.as_ref(), site, form, key, now) {
        Ok(checked) => checked.state.clone(),
        Err(r) => {
            audit_refusal(node, site, form, current.as_ref(), purpose, r, client);
            return Err(VisitorRefusal::Key(r));
        }
    };
    if gw.limited(site, form) {
        return Err(VisitorRefusal::TooMany);
    }
    let template = template_for(node, site, &state)?;
    Ok(Admitted { _held: held, now, state, template })
}

/// An opened form: its template and the fresh submit key the page carries.
pub struct Opened {
    pub template: Template,
    pub submit_key: OtkSecret,
}

/// The visitor's click: spends one open of the link's key and records FormOpened with a fresh
/// submit key (durable before the form is shown).
pub async fn open(
    node: &Node,
    gw: &Gateway,
    site: &str,
    form: &str,
    key: Option<&OtkSecret>,
    client: &str,
) -> Result<Opened, VisitorRefusal> {
    let Admitted { _held, now, state: mut fs, template } =
        admit(node, gw, site, form, key, Purpose::Open, client).await?;
    let submit_ttl = node.settings.sites.get(site).map(|s| s.submit_key_ttl_secs).unwrap_or(1800);
    let submit_key =
        OtkSecret::generate_for(&mut rand::rngs::StdRng::from_os_rng(), node.partition_of(&fs.conversation_id));
    let opened = FormOpened {
        header: EventHeader::new(EventKind::FormOpened, uuid::Uuid::new_v4(), now, site, &fs.conversation_id, form),
        form_id: form.to_string(),
        open_count: fs.open_count + 1,
        submit_key_hash: submit_key.hash(Purpose::Submit, site, form),
        submit_expires_at: now + (submit_ttl as i64) * 1000,
    };
    if let Err(error) = node.producer.send(&Event::FormOpened(opened.clone())).await {
        tracing::error!(%error, "could not record the form opening; check the brokers");
        return Err(VisitorRefusal::Unavailable);
    }
    fs.opened(&opened);
    gw.remember(node, site, form, fs);
    node.metrics.otk("open", "accepted");
    Ok(Opened { template, submit_key })
}

fn current_month(ms: i64) -> YearMonth {
    let dt = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    YearMonth { year: dt.year(), month: u8::from(dt.month()) }
}

/// The answers: checked against the page's submit key and the template, sealed at the edge and
/// produced (acks=all) before the visitor is thanked. One submission per form.
pub async fn submit(
    node: &Node,
    gw: &Gateway,
    site: &str,
    form: &str,
    key: Option<&OtkSecret>,
    raw: &BTreeMap<String, Vec<String>>,
    client: &str,
) -> Result<uuid::Uuid, VisitorRefusal> {
    let Admitted { _held, now, state: mut fs, template } =
        admit(node, gw, site, form, key, Purpose::Submit, client).await?;
    if let Some(unknown) = raw.keys().find(|k| !template.questions.iter().any(|q| &q.id == *k)) {
        return Err(VisitorRefusal::UnknownField(unknown.clone()));
    }
    let answers = match validate(&template, raw, current_month(now)) {
        Ok(a) => a,
        Err(errors) => return Err(VisitorRefusal::Invalid { template: Box::new(template), errors }),
    };
    let secrets: BTreeMap<String, Secret> = answers.into_iter().map(|(k, v)| (k, Secret::new(v))).collect();
    let submission = Submission {
        site_id: site,
        conversation_id: &fs.conversation_id,
        form_id: form,
        agent_id: &fs.agent_id,
        template: &template,
        answers: secrets,
    };
    match node.submit(submission).await {
        Ok(id) => {
            node.metrics.otk("submit", "accepted");
            fs.submitted = true;
            gw.remember(node, site, form, fs);
            Ok(id)
        }
        Err(error) => {
            tracing::error!(%error, site_id = %site, form_id = %form, "submission could not be stored; check the brokers and the master key");
            Err(VisitorRefusal::Unavailable)
        }
    }
}

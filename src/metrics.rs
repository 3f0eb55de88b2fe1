//! Prometheus metrics (OpenMetrics text at `GET /metrics`), one registry per node.
//!
//! Labels never carry a sensitive value: topics, handlers, outcome codes and route templates only.

use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type L2 = [(&'static str, String); 2];
type L3 = [(&'static str, String); 3];

fn latency_histogram() -> Histogram {
    // 0.5 ms .. ~16 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    /// Records a handler read, per handler and topic.
    pub consumed: Family<L2, Counter>,
    /// Events this node produced, per topic.
    pub produced: Family<[(&'static str, String); 1], Counter>,
    /// Records a handler sent to the dead-letter topic, per handler and error kind.
    pub dead_letters: Family<L2, Counter>,
    /// High watermark minus the next offset the handler will apply, per handler, topic and partition.
    pub lag: Family<L3, Gauge>,
    /// One-time key checks: purpose (open, submit, retrieve), outcome (accepted or a refusal code).
    pub otk: Family<L2, Counter>,
    /// Agent retrievals: outcome (granted, denied), reason (ok or the denial code).
    pub retrievals: Family<L2, Counter>,
    /// Submissions removed from the vault, per reason (retention, erasure).
    pub purged: Family<[(&'static str, String); 1], Counter>,
    /// Data keys destroyed (crypto-shredding), per reason.
    pub keys_destroyed: Family<[(&'static str, String); 1], Counter>,
    /// Purge runs finished (worker or command), expired anything or not.
    pub purge_runs: Counter,
    /// FormSubmitted records the tokenizer did not store because they were already purged.
    pub skipped_purged: Counter,
    /// HTTP request latency, per method, route template and status.
    pub http: Family<L3, Histogram, fn() -> Histogram>,
    /// Partitions each handler's consumer holds right now.
    pub assigned: Family<[(&'static str, String); 1], Gauge>,
    /// Consumers re-created because they held no partitions while their topics went unconsumed.
    pub consumer_rejoins: Family<[(&'static str, String); 1], Counter>,
    /// Producers replaced after a fatal error.
    pub producer_resets: Counter,
    /// Chat-bus records not on the partition murmur2 of their conversation id gives.
    pub chat_bus_misplaced: Counter,
    /// Partitions of the conversation-keyed topics this node owns, per consumer group.
    pub owned: Family<[(&'static str, String); 1], Gauge>,
    /// Requests this node sent to the node that owns their conversation, per route and outcome
    /// (the owner's status class, or `unreachable`, `no_owner`).
    pub forwarded: Family<L2, Counter>,
    /// Requests other nodes forwarded to this one, per outcome (`served`, `not_owner`, `refused`).
    pub forwarded_in: Family<[(&'static str, String); 1], Counter>,
    /// Requests that waited for this node to catch up with what the requester could have seen, per
    /// outcome (`caught_up`, `timed_out`).
    pub catch_up: Family<[(&'static str, String); 1], Counter>,
    /// Seconds each audit group took to reach the disk (the journal's write and `fdatasync`).
    pub audit_journal_write: Histogram,
    /// Times the audit store was synced so the journal could start again.
    pub audit_checkpoints: Counter,
    /// 1 while the node serves: caught up once, every handler holds partitions, brokers answer.
    pub ready_gauge: Gauge,
    ready: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("secureforms");
        let m = Metrics {
            consumed: Family::default(),
            produced: Family::default(),
            dead_letters: Family::default(),
            lag: Family::default(),
            otk: Family::default(),
            retrievals: Family::default(),
            purged: Family::default(),
            keys_destroyed: Family::default(),
            skipped_purged: Counter::default(),
            purge_runs: Counter::default(),
            http: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            assigned: Family::default(),
            owned: Family::default(),
            forwarded: Family::default(),
            forwarded_in: Family::default(),
            catch_up: Family::default(),
            consumer_rejoins: Family::default(),
            producer_resets: Counter::default(),
            chat_bus_misplaced: Counter::default(),
            // 50 us .. ~1.6 s: a disk sync takes about 0.1 ms.
            audit_journal_write: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            audit_checkpoints: Counter::default(),
            ready_gauge: Gauge::default(),
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        };
        registry.register("events_consumed", "Records read by a handler, per handler and topic", m.consumed.clone());
        registry.register("events_produced", "Events produced by this node, per topic", m.produced.clone());
        registry.register(
            "dead_letters",
            "Records sent to the dead-letter topic, per handler and error kind",
            m.dead_letters.clone(),
        );
        registry.register("consumer_lag", "Records not yet applied, per handler, topic and partition", m.lag.clone());
        registry.register("otk_checks", "One-time key checks, per purpose and outcome", m.otk.clone());
        registry.register("retrievals", "Agent retrievals, per outcome and reason", m.retrievals.clone());
        registry.register("submissions_purged", "Submissions removed from the vault, per reason", m.purged.clone());
        registry.register(
            "data_keys_destroyed",
            "Data keys destroyed (crypto-shredding), per reason",
            m.keys_destroyed.clone(),
        );
        registry.register("purge_runs", "Retention purge runs finished on this node", m.purge_runs.clone());
        registry.register(
            "submissions_skipped_purged",
            "Submissions not stored because they were already purged",
            m.skipped_purged.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency, per method, route and status",
            m.http.clone(),
        );
        registry.register("assigned_partitions", "Partitions each handler's consumer holds", m.assigned.clone());
        registry.register("owned_partitions", "Conversation partitions this node owns", m.owned.clone());
        registry.register("forwarded_requests", "Requests forwarded to the owning node", m.forwarded.clone());
        registry.register("forwarded_in_requests", "Requests other nodes forwarded here", m.forwarded_in.clone());
        registry.register("catch_up_waits", "Requests that waited for this node to catch up", m.catch_up.clone());
        registry.register(
            "consumer_rejoins",
            "Consumers re-created after holding no partitions while their topics went unconsumed",
            m.consumer_rejoins.clone(),
        );
        registry.register("producer_resets", "Producers replaced after a fatal error", m.producer_resets.clone());
        registry.register(
            "chat_bus_misplaced_records",
            "Chat-bus records not on the partition murmur2 of their conversation id gives (the chat bus does not use the Java client's partitioner); each is sent there before it is applied",
            m.chat_bus_misplaced.clone(),
        );
        registry.register(
            "audit_journal_write_seconds",
            "Time for each group of audit records to reach the disk (journal write and fdatasync)",
            m.audit_journal_write.clone(),
        );
        registry.register(
            "audit_checkpoints",
            "Audit store syncs that let the audit journal start again",
            m.audit_checkpoints.clone(),
        );
        registry.register(
            "ready",
            "1 while the node serves: caught up, every handler holds partitions, brokers answer",
            m.ready_gauge.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn consumed(&self, handler: &str, topic: &str) {
        self.consumed.get_or_create(&[("handler", handler.to_string()), ("topic", topic.to_string())]).inc();
    }

    pub fn produced(&self, topic: &str) {
        self.produced.get_or_create(&[("topic", topic.to_string())]).inc();
    }

    pub fn dead_letter(&self, handler: &str, kind: &str) {
        self.dead_letters.get_or_create(&[("handler", handler.to_string()), ("kind", kind.to_string())]).inc();
    }

    pub fn set_lag(&self, handler: &str, topic: &str, partition: i32, lag: i64) {
        self.lag
            .get_or_create(&[
                ("handler", handler.to_string()),
                ("topic", topic.to_string()),
                ("partition", partition.to_string()),
            ])
            .set(lag);
    }

    pub fn otk(&self, purpose: &str, outcome: &str) {
        self.otk.get_or_create(&[("purpose", purpose.to_string()), ("outcome", outcome.to_string())]).inc();
    }

    pub fn retrieval(&self, granted: bool, reason: &str) {
        let outcome = if granted { "granted" } else { "denied" };
        self.retrievals.get_or_create(&[("outcome", outcome.to_string()), ("reason", reason.to_string())]).inc();
    }

    pub fn purged(&self, reason: &str, n: u64) {
        self.purged.get_or_create(&[("reason", reason.to_string())]).inc_by(n);
    }

    pub fn key_destroyed(&self, reason: &str) {
        self.keys_destroyed.get_or_create(&[("reason", reason.to_string())]).inc();
    }

    pub fn http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.http
            .get_or_create(&[
                ("method", method.to_string()),
                ("route", route.to_string()),
                ("status", status.to_string()),
            ])
            .observe(seconds);
    }

    pub fn set_ready(&self) {
        self.set_readiness(true);
    }

    /// Ready or not (the readiness task re-evaluates this while the node runs).
    pub fn set_readiness(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.ready_gauge.set(i64::from(ready));
    }

    pub fn set_assigned(&self, handler: &str, partitions: usize) {
        self.assigned.get_or_create(&[("handler", handler.to_string())]).set(partitions as i64);
    }

    pub fn assigned(&self, handler: &str) -> i64 {
        self.assigned.get_or_create(&[("handler", handler.to_string())]).get()
    }

    pub fn set_owned(&self, group: &str, partitions: usize) {
        self.owned.get_or_create(&[("group", group.to_string())]).set(partitions as i64);
    }

    pub fn forwarded(&self, route: &str, outcome: &str) {
        self.forwarded.get_or_create(&[("route", route.to_string()), ("outcome", outcome.to_string())]).inc();
    }

    pub fn forwarded_in(&self, outcome: &str) {
        self.forwarded_in.get_or_create(&[("outcome", outcome.to_string())]).inc();
    }

    pub fn caught_up(&self, outcome: &str) {
        self.catch_up.get_or_create(&[("outcome", outcome.to_string())]).inc();
    }

    pub fn consumer_rejoined(&self, handler: &str) {
        self.consumer_rejoins.get_or_create(&[("handler", handler.to_string())]).inc();
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Sum of a counter family's values whose labels include every `(name, value)` in `filter`
    /// (for the replay summary and tests).
    pub fn total(&self, family: &str, filter: &[(&str, &str)]) -> f64 {
        parse_total(&self.render(), family, filter)
    }

    /// OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Sums the samples of `family` (a full sample name such as `secureforms_events_consumed_total`) in an
/// exposition whose labels match `filter`.
pub fn parse_total(text: &str, family: &str, filter: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (name_labels, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let (name, labels) = match name_labels.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (name_labels, ""),
        };
        if name != family {
            continue;
        }
        if filter.iter().all(|(k, v)| labels.split(',').any(|kv| kv == format!("{k}=\"{v}\""))) {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_render_and_sum_by_label() {
        let m = Metrics::new();
        m.consumed("tokenizer", "t.submissions");
        m.consumed("tokenizer", "t.submissions");
        m.consumed("issuer", "t.chat-events");
        m.http("GET", "/healthz", 200, 0.001);
        let text = m.render();
        assert!(text.contains("# TYPE secureforms_events_consumed counter"), "{text}");
        assert_eq!(m.total("secureforms_events_consumed_total", &[("handler", "tokenizer")]), 2.0);
        assert_eq!(m.total("secureforms_events_consumed_total", &[]), 3.0);
        assert_eq!(m.total("secureforms_http_request_duration_seconds_count", &[("route", "/healthz")]), 1.0);
        assert!(!m.is_ready());
        m.set_ready();
        assert!(m.is_ready());
        assert_eq!(m.total("secureforms_ready", &[]), 1.0);
    }
}

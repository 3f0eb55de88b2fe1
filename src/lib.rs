//! secureforms: secure forms for live chat. An agent sends a form, the visitor fills it in an
//! accessible page, the answers are tokenized into a vault only the sending agent can open, while the
//! conversation is live. Kafka is the system of record; everything here is a projection of it.
//!
//! # Layout
//!
//! - [`domain`]: the pure core (form issuing, one-time keys, PCI policy, templates). No I/O.
//! - [`events`]: the Avro event contract (`schemas/`) and its single-object codec.
//! - [`topics`]: topics as code (`topics/`), and the pure drift check.
//! - [`config`]: settings and the sites catalogue (file, `SECUREFORMS_*` env, flags).
//! - [`crypto`]: the key hierarchy (master key, per-site per-period data keys), AES-SIV sealing, and
//!   the MAC that marks the events only this service writes ([`crypto::mac`]).
//! - [`secrets`]: secrets taken out of the environment at start; private key files.
//! - [`vault`]: sealing at the edge, vault records, off-the-record memory, detokenizing.
//! - [`store`]: the sled database: projections, vault, consumed offsets and outbox in atomic batches.
//! - [`kafka`]: producer, admin, and the consumer runtime that gives handlers exactly-once effects.
//! - [`handlers`]: event handlers on that runtime, one per file (issuer, keys, tokenizer, retrieval).
//! - [`http`]: the visitor gateway and agent API (axum); [`http::listener`] binds and serves them,
//!   answering 503 until the node has started.
//! - [`audit`]: audit events recorded durably on the node before answering, relayed to Kafka; the
//!   tamper-evident chain of FormRetrieved records and its verification.
//! - [`metrics`]: the node's Prometheus registry (`GET /metrics`).
//! - [`ops`]: retention purge, erasure, replay, readiness and the compliance report.
//! - [`broker`]: the embedded default broker process for a single machine, and its supervisor.
//! - [`service`]: wires it all for `secureforms serve`.
//! - [`cli`]: the `secureforms` commands; `src/main.rs` only calls [`cli::main`].
//!
//! docs/ARCHITECTURE.md shows how the parts run as tasks and where backpressure lives.

pub mod app;
pub mod audit;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod domain;
pub mod events;
pub mod handlers;
// axum's Response is the error type of the handlers' parsing helpers; boxing it buys nothing.
#[allow(clippy::result_large_err)]
pub mod http;
pub mod kafka;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod secrets;
pub mod service;
pub mod store;
pub mod topics;
pub mod vault;

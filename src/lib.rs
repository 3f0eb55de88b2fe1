//! secureforms: secure forms for live chat. An agent sends a form, the visitor fills it in an
//! accessible page, the answers are tokenized into a vault only the sending agent can open, while the
//! conversation is live. Kafka is the system of record; everything here is a projection of it.
//!
//! # Layout
//!
//! From the ground up. No file imports one that imports it back (no import circles).
//!
//! - [`domain`]: the pure core (form issuing, one-time keys, access rules, sites, PCI policy,
//!   templates). No I/O, no configuration types; its checks return what they checked.
//! - [`events`]: the Avro event contract (`schemas/`) and its single-object codec.
//! - [`topics`]: topics as code (`topics/`), the broker kinds, and the pure drift check.
//! - [`clock`], [`store`] (sled: state, consumed offsets and outbox in atomic batches), [`metrics`],
//!   [`secrets`] (taken out of the environment at start; private key files).
//! - [`config`]: settings and the sites catalogue (file, `SECUREFORMS_*` env, flags).
//! - [`crypto`]: the key hierarchy (master keys, per-site per-period data keys), AES-SIV sealing, the
//!   integrity key and the MAC that marks the events only this service writes ([`crypto::mac`]).
//! - [`kafka`]: producer, admin, reader, and the consumer runtime that gives handlers exactly-once
//!   effects ([`kafka::runtime`]: the loop, batches, offsets, outbox, dead letters).
//! - [`audit`]: audit events recorded durably on the node before answering, relayed to Kafka; the
//!   tamper-evident chain of FormRetrieved records and its verification.
//! - [`vault`]: sealing at the edge, vault records, off-the-record memory, detokenizing.
//! - [`handlers`]: event handlers on that runtime, one per file. Each owns its sled trees and offers
//!   a typed read view ([`handlers::visibility::VisibilityView`], [`handlers::gateway::GatewayView`],
//!   [`handlers::retrieval::RetrievalView`]; the vault's is [`vault::VaultView`]) whose errors are
//!   errors, never "not found".
//! - [`node`]: the node context request handlers share, and [`node::Node::submit`].
//! - [`cluster`]: running as several nodes: announcing the partitions this node owns, and waiting
//!   until its state has caught up with what a requester can have seen (read-your-writes). Routing
//!   is [`http::route`]; the node directory [`handlers::directory`]; the hop's MAC [`crypto::hop`].
//! - [`app`]: the use cases, one function each: the agent's ([`app::agent`], refusals in
//!   [`app::Refusal`], which sets the HTTP status and the audit reason) and the visitor's
//!   ([`app::visitor`], [`app::visitor::VisitorRefusal`]). Purge and erasure are in [`ops`].
//! - [`http`]: the visitor gateway and agent API (axum): admit, parse, call, render;
//!   [`http::listener`] binds and serves them, answering 503 until the node has started.
//! - [`broker`]: the embedded default broker process for a single machine, and its supervisor.
//! - [`service`]: wires it all for `secureforms serve`.
//! - [`ops`]: retention purge, erasure, replay, readiness and the compliance report.
//! - [`cli`]: the `secureforms` commands; `src/main.rs` only calls [`cli::main`]. The benchmark is
//!   `benches/pipeline.rs`.
//!
//! docs/ARCHITECTURE.md shows how the parts run as tasks and where backpressure lives.

pub mod app;
pub mod audit;
pub mod broker;
pub mod cli;
pub mod clock;
pub mod cluster;
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

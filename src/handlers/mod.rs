//! Event handlers: adapters that put the pure domain decisions on the consumer runtime. One file per
//! handler, named after it.

pub mod gateway;
pub mod issuer;
pub mod keys;
pub mod retrieval;
pub mod tokenizer;
pub mod visibility;

//! The pure core: decisions with no I/O, no clock and no randomness of their own. Whatever a decision
//! needs (the time, a freshly generated key, the site's settings) is passed in, so every rule here is
//! tested without a broker, a disk or a clock.

pub mod access;
pub mod issue;
pub mod otk;
pub mod policy;
pub mod retention;
pub mod site;
pub mod template;
pub mod validate;
pub mod visitor;

//! Time as the service sees it: a function handlers, the gateway and the purge call for "now" in ms
//! since the Unix epoch, so tests inject a clock instead of sleeping.

/// The clock handlers and request handlers read.
pub type Clock = std::sync::Arc<dyn Fn() -> i64 + Send + Sync>;

pub fn system_clock() -> Clock {
    std::sync::Arc::new(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    })
}

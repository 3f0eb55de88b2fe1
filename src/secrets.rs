//! Secrets that may come from the environment (`SECUREFORMS_MASTER_KEY`, `SECUREFORMS_JWT_SECRET`,
//! `SECUREFORMS_KAFKA_PASSWORD`)
//! are taken out of it once, at the start of the program and before any thread exists: read into
//! zeroizing memory and removed from the process environment, so no child process (the embedded
//! broker, anything spawned later) inherits them and `/proc/<pid>/environ` of a running node shows
//! them no longer than the first milliseconds. Library users that never call [`take_from_environment`]
//! (tests, embedders) read the variables as they are.

use std::sync::OnceLock;

use zeroize::Zeroizing;

pub const MASTER_KEY_VAR: &str = "SECUREFORMS_MASTER_KEY";
pub const JWT_SECRET_VAR: &str = "SECUREFORMS_JWT_SECRET";
/// The SASL password of every Kafka client (`sasl.password`), kept out of config files.
pub const KAFKA_PASSWORD_VAR: &str = "SECUREFORMS_KAFKA_PASSWORD";

struct Taken {
    master_key: Option<Zeroizing<String>>,
    jwt_secret: Option<Zeroizing<String>>,
    kafka_password: Option<Zeroizing<String>>,
}

static TAKEN: OnceLock<Taken> = OnceLock::new();

/// Moves the secret variables out of the environment. Call first thing in `main`, while the process
/// has a single thread.
pub fn take_from_environment() {
    let take = |name: &str| {
        let value = std::env::var(name).ok().filter(|v| !v.is_empty()).map(Zeroizing::new);
        let Ok(c_name) = std::ffi::CString::new(name) else { return value };
        // SAFETY: called at the start of `main`, before the async runtime or any other thread
        // exists, so nothing reads or changes the environment concurrently. The value's bytes are
        // overwritten where the kernel put them (what /proc/<pid>/environ shows), then the variable
        // is removed from the process's environment.
        unsafe {
            let at = libc::getenv(c_name.as_ptr());
            if !at.is_null() {
                std::ptr::write_bytes(at, 0, libc::strlen(at));
            }
            std::env::remove_var(name);
        }
        value
    };
    let _ = TAKEN.set(Taken {
        master_key: take(MASTER_KEY_VAR),
        jwt_secret: take(JWT_SECRET_VAR),
        kafka_password: take(KAFKA_PASSWORD_VAR),
    });
}

fn get(name: &str, taken: impl Fn(&Taken) -> &Option<Zeroizing<String>>) -> Option<Zeroizing<String>> {
    match TAKEN.get() {
        Some(t) => taken(t).clone(),
        None => std::env::var(name).ok().filter(|v| !v.is_empty()).map(Zeroizing::new),
    }
}

/// The master key given in the environment, if any.
pub fn master_key() -> Option<Zeroizing<String>> {
    get(MASTER_KEY_VAR, |t| &t.master_key)
}

/// The HS256 agent-token secret given in the environment, if any.
pub fn jwt_secret() -> Option<Zeroizing<String>> {
    get(JWT_SECRET_VAR, |t| &t.jwt_secret)
}

/// The Kafka SASL password given in the environment, if any.
pub fn kafka_password() -> Option<Zeroizing<String>> {
    get(KAFKA_PASSWORD_VAR, |t| &t.kafka_password)
}

/// Refuses a secret file that its group or others may read or write: a key file must be the
/// service user's alone (`chmod 600`). Returns the mode it found when it is too open.
pub fn check_private_file(path: &std::path::Path) -> Result<(), PermissionsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|source| PermissionsError::Unreadable { path: path.display().to_string(), source })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(PermissionsError::TooOpen { path: path.display().to_string(), mode: mode & 0o777 });
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum PermissionsError {
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} may be read by its group or others (mode {mode:o}); a key file must be private: chmod 600 {path}")]
    TooOpen { path: String, mode: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_secret_file_open_to_group_or_others_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("k");
        std::fs::write(&f, "x").unwrap();
        for (mode, ok) in [(0o600, true), (0o400, true), (0o640, false), (0o604, false), (0o660, false)] {
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = check_private_file(&f);
            assert_eq!(r.is_ok(), ok, "{mode:o}");
            if let Err(e) = r {
                assert!(e.to_string().contains("chmod 600"), "{e}");
            }
        }
    }
}

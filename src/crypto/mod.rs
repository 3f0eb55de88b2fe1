//! The key hierarchy (ADR 6). A master key (64 bytes, from `SECUREFORMS_MASTER_KEY` or a file, never
//! logged) wraps data keys; each data key serves one site for one period (a calendar month, UTC) and
//! carries an id `<site>.<period>.g<generation>`. Answers are sealed with AES-SIV under the data key,
//! with associated data binding them to site, form, submission, field and key id, so a ciphertext
//! moved anywhere else fails to open. Wrapped data keys live on the compacted keys topic (durable
//! beyond one disk) and in the node's key ring; destroying one makes everything it sealed unreadable.

pub mod hop;
pub mod keyring;
pub mod mac;

use std::fmt;
use std::path::Path;

use aes_siv::KeyInit;
use aes_siv::siv::Aes256Siv;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

pub use keyring::KeyRing;

/// AES-256-SIV takes a 512-bit key (two 256-bit halves: MAC and CTR).
pub const KEY_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "no master key: set SECUREFORMS_MASTER_KEY to 64 random bytes in base64, or master_key_file to a file holding it; generate one with `secureforms keys generate-master`"
    )]
    MissingMaster,
    #[error(
        "the master key is malformed ({0}); it must be 64 bytes in standard base64 (88 characters); generate one with `secureforms keys generate-master`"
    )]
    MalformedMaster(String),
    #[error("cannot read the master key file {path}: {source}")]
    MasterFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the master key file is not private: {0}")]
    MasterFilePermissions(#[from] crate::secrets::PermissionsError),
    #[error("data key {0} cannot be unwrapped with master key {1}: wrong master key or a tampered record")]
    Unwrap(String, String),
    #[error(
        "data key {key_id} is wrapped by master key {master_key_id}, which this node does not have; if the key is still in use, list that master key in previous_master_key_files and run `secureforms keys rewrap`"
    )]
    UnknownMaster { key_id: String, master_key_id: String },
    #[error(
        "the integrity key is malformed ({0}); it must be 32 bytes in standard base64, as `secureforms keys export-integrity` prints it"
    )]
    MalformedIntegrity(String),
    #[error("cannot read the integrity key file {path}: {source}")]
    IntegrityFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("data key {0} is not known to this node")]
    UnknownKey(String),
    #[error("data key {0} was destroyed; data sealed with it is gone")]
    Destroyed(String),
    #[error("cannot seal: {0}")]
    Seal(String),
    #[error("ciphertext does not open under its key and associated data (moved, swapped or tampered)")]
    Open,
}

/// Key material that is zeroized on drop and never printed.
#[derive(Clone)]
pub struct KeyMaterial(Zeroizing<[u8; KEY_LEN]>);

impl fmt::Debug for KeyMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyMaterial(..)")
    }
}

impl KeyMaterial {
    pub fn random() -> KeyMaterial {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, k.as_mut())
            .expect("the OS random source is available");
        KeyMaterial(k)
    }

    fn from_slice(bytes: &[u8]) -> Option<KeyMaterial> {
        let arr: [u8; KEY_LEN] = bytes.try_into().ok()?;
        Some(KeyMaterial(Zeroizing::new(arr)))
    }

    fn cipher(&self) -> Aes256Siv {
        Aes256Siv::new_from_slice(self.0.as_ref()).expect("64-byte key")
    }

    /// AES-SIV seal; `ad` components are bound to the ciphertext.
    /// Whether two keys are the same material (constant time).
    pub fn same_as(&self, other: &KeyMaterial) -> bool {
        use subtle::ConstantTimeEq;
        self.0.as_ref().ct_eq(other.0.as_ref()).into()
    }

    pub fn seal(&self, ad: &[&[u8]], plaintext: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.cipher().encrypt(ad, plaintext).map_err(|e| KeyError::Seal(e.to_string()))
    }

    pub fn open(&self, ad: &[&[u8]], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        self.cipher().decrypt(ad, ciphertext).map(Zeroizing::new).map_err(|_| KeyError::Open)
    }
}

/// The root of the hierarchy. Its id is a fingerprint, so wrapped keys say which master wraps them.
#[derive(Clone, Debug)]
pub struct MasterKey {
    id: String,
    material: KeyMaterial,
}

const WRAP_TAG: &[u8] = b"secureforms-data-key-v1";

impl MasterKey {
    /// Parses base64 text (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<MasterKey, KeyError> {
        let mut bytes =
            STANDARD.decode(text.trim()).map_err(|e| KeyError::MalformedMaster(format!("not base64: {e}")))?;
        let material = KeyMaterial::from_slice(&bytes);
        let len = bytes.len();
        bytes.zeroize();
        let material =
            material.ok_or_else(|| KeyError::MalformedMaster(format!("{len} bytes instead of {KEY_LEN}")))?;
        let id = format!(
            "mk-{}",
            &hex::encode(Sha256::digest([b"secureforms-master-id".as_slice(), material.0.as_ref()].concat()))[..12]
        );
        Ok(MasterKey { id, material })
    }

    /// From `SECUREFORMS_MASTER_KEY`, else from `file`.
    pub fn load(env_value: Option<&str>, file: Option<&Path>) -> Result<MasterKey, KeyError> {
        if let Some(v) = env_value.filter(|v| !v.trim().is_empty()) {
            return MasterKey::from_base64(v);
        }
        let path = file.ok_or(KeyError::MissingMaster)?;
        crate::secrets::check_private_file(path)?;
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|source| KeyError::MasterFile { path: path.display().to_string(), source })?,
        );
        MasterKey::from_base64(&text)
    }

    /// A new random master key, base64.
    pub fn generate_base64() -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(KeyMaterial::random().0.as_ref()))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// A 32-byte key for another purpose, derived from this master key (HMAC-SHA256 keyed with the
    /// master key over `label`), so one secret serves every purpose without reusing its bytes.
    fn derive(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(self.material.0.as_ref())
            .expect("HMAC takes any key length");
        mac.update(label);
        Zeroizing::new(mac.finalize().into_bytes().into())
    }

    pub fn wrap(&self, key_id: &str, key: &KeyMaterial) -> Result<Vec<u8>, KeyError> {
        self.material.seal(&[WRAP_TAG, key_id.as_bytes()], key.0.as_ref())
    }

    pub fn unwrap_key(&self, key_id: &str, wrapped: &[u8]) -> Result<KeyMaterial, KeyError> {
        let plain = self
            .material
            .open(&[WRAP_TAG, key_id.as_bytes()], wrapped)
            .map_err(|_| KeyError::Unwrap(key_id.into(), self.id.clone()))?;
        KeyMaterial::from_slice(&plain).ok_or_else(|| KeyError::Unwrap(key_id.into(), self.id.clone()))
    }
}

/// The root of the service's integrity keys: the event MAC (ADR 17) and the audit chain (ADR 18).
/// It is kept apart from the master key's one duty, wrapping data keys, so that a master key can be
/// rotated and then destroyed (which makes every data key it wrapped, and every copy of those
/// wrapped keys anywhere, useless) while the events already on the topics stay verifiable. By
/// default it is derived from the master key (one-way: it reveals nothing of it); once a deployment
/// rotates its master key, `integrity_key_file` pins it (ADR 19).
#[derive(Clone)]
pub struct IntegrityKey(Zeroizing<[u8; 32]>);

impl fmt::Debug for IntegrityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IntegrityKey(..)")
    }
}

impl IntegrityKey {
    /// The integrity root a master key gives when no integrity key file is configured.
    pub fn from_master(master: &MasterKey) -> IntegrityKey {
        IntegrityKey(master.derive(b"secureforms-integrity-root-v1"))
    }

    /// Parses base64 text (surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<IntegrityKey, KeyError> {
        let bytes = Zeroizing::new(
            STANDARD.decode(text.trim()).map_err(|e| KeyError::MalformedIntegrity(format!("not base64: {e}")))?,
        );
        let root: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::MalformedIntegrity(format!("{} bytes instead of 32", bytes.len())))?;
        Ok(IntegrityKey(Zeroizing::new(root)))
    }

    /// From a private file (group or others may not read it).
    pub fn load(path: &Path) -> Result<IntegrityKey, KeyError> {
        crate::secrets::check_private_file(path)?;
        let text = Zeroizing::new(
            std::fs::read_to_string(path)
                .map_err(|source| KeyError::IntegrityFile { path: path.display().to_string(), source })?,
        );
        IntegrityKey::from_base64(&text)
    }

    /// Base64, for `secureforms keys export-integrity`.
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(STANDARD.encode(self.0.as_ref()))
    }

    /// A 32-byte key for one purpose (HMAC-SHA256 keyed with the root over `label`).
    pub fn derive(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        use hmac::Mac;
        let mut mac =
            <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(self.0.as_ref()).expect("HMAC takes any key length");
        mac.update(label);
        Zeroizing::new(mac.finalize().into_bytes().into())
    }
}

/// The calendar month (UTC) of an instant in ms: the period a data key serves, e.g. `2026-11`.
pub fn period_of(ms: i64) -> String {
    let dt = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    format!("{:04}-{:02}", dt.year(), u8::from(dt.month()))
}

pub fn data_key_id(site: &str, period: &str, generation: i32) -> String {
    format!("{site}.{period}.g{generation}")
}

/// The inverse of [`data_key_id`]: (site, period, generation). Site ids may hold dots; periods and
/// generations do not.
pub fn parse_data_key_id(id: &str) -> Option<(&str, &str, i32)> {
    let mut parts = id.rsplitn(3, '.');
    let generation = parts.next()?.strip_prefix('g')?.parse().ok()?;
    let period = parts.next()?;
    let site = parts.next()?;
    Some((site, period, generation))
}

/// Associated data for one sealed answer.
pub fn answer_ad<'a>(
    site: &'a str,
    form: &'a str,
    submission: &'a str,
    field: &'a str,
    key_id: &'a str,
) -> [&'a [u8]; 6] {
    [
        b"secureforms-answer-v1",
        site.as_bytes(),
        form.as_bytes(),
        submission.as_bytes(),
        field.as_bytes(),
        key_id.as_bytes(),
    ]
}

/// Who an answer was given to: the conversation and the agent who sent the form.
#[derive(Clone, Copy)]
pub struct Recipient<'a> {
    pub conversation: &'a str,
    pub agent: &'a str,
}

/// Associated data for one sealed answer, version 2: also bound to the conversation and the agent
/// who sent the form, so a record that names another conversation or agent cannot be opened.
/// Answers sealed before version 2 open with [`answer_ad`]; a version-2 ciphertext never does.
pub fn answer_ad_bound<'a>(
    site: &'a str,
    form: &'a str,
    submission: &'a str,
    field: &'a str,
    key_id: &'a str,
    to: Recipient<'a>,
) -> [&'a [u8]; 8] {
    [
        b"secureforms-answer-v2",
        site.as_bytes(),
        form.as_bytes(),
        submission.as_bytes(),
        field.as_bytes(),
        key_id.as_bytes(),
        to.conversation.as_bytes(),
        to.agent.as_bytes(),
    ]
}

/// Derives the one-time keys handlers issue (a link's open key, a FormReady's retrieve key) from the
/// event that causes them: HMAC-SHA256 under a key derived from the integrity key, over the purpose
/// and the causing event's id. A node that takes over a partition and applies again a record whose
/// output the dead owner had already sent makes the very same key, so the link a visitor holds and
/// the key an agent's workspace kept stay the ones the service honours (ADR 22). Nobody without the
/// integrity key can compute a key; the keys are in the events anyway.
pub struct KeyDeriver {
    key: Zeroizing<[u8; 32]>,
}

impl fmt::Debug for KeyDeriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDeriver(..)")
    }
}

impl KeyDeriver {
    pub fn new(integrity: &IntegrityKey) -> KeyDeriver {
        KeyDeriver { key: integrity.derive(b"secureforms-otk-derive-v1") }
    }

    /// The key of `purpose` that the event `cause_event_id` gives, naming `partition`.
    pub fn otk(
        &self,
        purpose: crate::domain::otk::Purpose,
        cause_event_id: &str,
        partition: i32,
    ) -> crate::domain::otk::OtkSecret {
        use hmac::{Hmac, Mac};
        let mut mac =
            <Hmac<sha2::Sha256> as Mac>::new_from_slice(self.key.as_ref()).expect("HMAC takes any key length");
        for part in [purpose.as_str().as_bytes(), cause_event_id.as_bytes()] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        let tag = mac.finalize().into_bytes();
        let mut bits = [0u8; 16];
        bits.copy_from_slice(&tag[..16]);
        crate::domain::otk::OtkSecret::from_bits(bits, partition)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_bound_to_its_conversation_and_sender() {
        let k = KeyMaterial::random();
        let to = |conversation, agent| Recipient { conversation, agent };
        let ad = answer_ad_bound("acme", "f1", "s1", "pan", "acme.2026-11.g1", to("c1", "alice"));
        let ct = k.seal(&ad, b"4111111111111111").unwrap();
        assert!(k.open(&ad, &ct).is_ok());
        for other in [
            answer_ad_bound("acme", "f1", "s1", "pan", "acme.2026-11.g1", to("c1", "mallory")),
            answer_ad_bound("acme", "f1", "s1", "pan", "acme.2026-11.g1", to("c2", "alice")),
        ] {
            assert!(matches!(k.open(&other, &ct), Err(KeyError::Open)), "redirected");
        }
        let v1 = answer_ad("acme", "f1", "s1", "pan", "acme.2026-11.g1");
        assert!(matches!(k.open(&v1, &ct), Err(KeyError::Open)), "a version-2 answer never opens as version 1");
    }

    #[test]
    fn data_key_ids_parse_back() {
        assert_eq!(parse_data_key_id(&data_key_id("acme.eu", "2026-11", 3)), Some(("acme.eu", "2026-11", 3)));
        assert_eq!(parse_data_key_id("no-generation"), None);
        assert_eq!(parse_data_key_id("acme.2026-11.x"), None);
    }

    fn master() -> MasterKey {
        MasterKey::from_base64(&MasterKey::generate_base64()).unwrap()
    }

    #[test]
    fn sealing_is_deterministic_and_bound_to_its_associated_data() {
        let k = KeyMaterial::random();
        let ad = answer_ad("acme", "f1", "s1", "pan", "acme.2026-11.g1");
        let a = k.seal(&ad, b"4111111111111111").unwrap();
        assert_eq!(a, k.seal(&ad, b"4111111111111111").unwrap(), "AES-SIV is deterministic");
        assert_eq!(k.open(&ad, &a).unwrap().as_slice(), b"4111111111111111");
        for other in [
            answer_ad("other", "f1", "s1", "pan", "acme.2026-11.g1"),
            answer_ad("acme", "f2", "s1", "pan", "acme.2026-11.g1"),
            answer_ad("acme", "f1", "s2", "pan", "acme.2026-11.g1"),
            answer_ad("acme", "f1", "s1", "ssn", "acme.2026-11.g1"),
            answer_ad("acme", "f1", "s1", "pan", "acme.2026-11.g2"),
        ] {
            assert!(matches!(k.open(&other, &a), Err(KeyError::Open)));
        }
        assert!(KeyMaterial::random().open(&ad, &a).is_err(), "another key cannot open it");
    }

    #[test]
    fn data_keys_wrap_under_the_master_and_are_bound_to_their_id() {
        let m = master();
        let dk = KeyMaterial::random();
        let w = m.wrap("acme.2026-11.g1", &dk).unwrap();
        assert_eq!(m.unwrap_key("acme.2026-11.g1", &w).unwrap().0.as_ref(), dk.0.as_ref());
        assert!(m.unwrap_key("acme.2026-12.g1", &w).is_err(), "a wrapped key cannot be relabelled");
        assert!(master().unwrap_key("acme.2026-11.g1", &w).is_err(), "another master cannot unwrap it");
    }

    #[test]
    fn master_key_errors_say_how_to_fix_them() {
        assert!(matches!(MasterKey::load(None, None), Err(KeyError::MissingMaster)));
        let e = MasterKey::from_base64("c2hvcnQ=").unwrap_err().to_string();
        assert!(e.contains("5 bytes instead of 64") && e.contains("generate-master"), "{e}");
        assert!(MasterKey::from_base64("not base64!").is_err());
        let text = MasterKey::generate_base64();
        let a = MasterKey::from_base64(&text).unwrap();
        assert!(a.id().starts_with("mk-"));
        assert!(!format!("{a:?}").contains(text.as_str()), "debug output never shows the key");
    }

    #[test]
    fn periods_are_utc_months() {
        assert_eq!(period_of(0), "1970-01");
        assert_eq!(period_of(1_795_000_000_000), "2026-11");
        assert_eq!(data_key_id("acme", "2026-11", 2), "acme.2026-11.g2");
    }
}

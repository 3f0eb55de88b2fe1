//! One-time keys (OTKs). A key is 128 random bits, shown once (in a link, a page or a FormReady
//! event) and stored only as a hash. The hash binds the key to its purpose, site and form, so a key
//! of one purpose never verifies as another, and a key never verifies for another site or form.
//! Verification compares hashes in constant time.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    Open,
    Submit,
    Retrieve,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Open => "open",
            Purpose::Submit => "submit",
            Purpose::Retrieve => "retrieve",
        }
    }
}

/// A key in clear. Zeroized when dropped; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct OtkSecret(String);

impl fmt::Debug for OtkSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OtkSecret(..)")
    }
}

impl OtkSecret {
    /// 128 bits from the given random source, URL-safe base64 (22 characters).
    pub fn generate(rng: &mut impl RngCore) -> OtkSecret {
        let mut bytes = [0u8; 16];
        rng.fill_bytes(&mut bytes);
        let s = URL_SAFE_NO_PAD.encode(bytes);
        bytes.zeroize();
        OtkSecret(s)
    }

    /// A key made of 128 bits the caller derived (see `crypto::KeyDeriver`), naming `partition`.
    pub fn from_bits(mut bits: [u8; 16], partition: i32) -> OtkSecret {
        let s = format!("{}.{}", URL_SAFE_NO_PAD.encode(bits), partition.max(0));
        bits.zeroize();
        OtkSecret(s)
    }

    /// A key for a form of the conversation on `partition`: 128 random bits, then `.` and the
    /// partition number. Any node reads where to route a request that carries the key without
    /// asking anyone (ADR 22); the number says nothing about the conversation but which of a few
    /// partitions it is on, and it is part of what the stored hash covers, so it cannot be changed.
    pub fn generate_for(rng: &mut impl RngCore, partition: i32) -> OtkSecret {
        let mut k = OtkSecret::generate(rng);
        k.0.push_str(&format!(".{}", partition.max(0)));
        k
    }

    /// Wraps a key presented by a client. Anything that is not 22 URL-safe base64 characters,
    /// optionally followed by `.` and a partition number, cannot be a key we issued.
    pub fn parse(s: &str) -> Option<OtkSecret> {
        let (random, hint) = match s.split_once('.') {
            Some((r, h)) => (r, Some(h)),
            None => (s, None),
        };
        let random_ok =
            random.len() == 22 && random.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        let hint_ok = hint.is_none_or(|h| (1..=5).contains(&h.len()) && h.bytes().all(|b| b.is_ascii_digit()));
        (random_ok && hint_ok).then(|| OtkSecret(s.to_string()))
    }

    /// The partition a key names (routing hint), if it names one.
    pub fn partition(&self) -> Option<i32> {
        self.0.split_once('.').and_then(|(_, h)| h.parse().ok())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The stored form: SHA-256 over a domain tag, purpose, site, form and the key, hex encoded.
    pub fn hash(&self, purpose: Purpose, site_id: &str, form_id: &str) -> String {
        let mut h = Sha256::new();
        for part in ["secureforms-otk-v1", purpose.as_str(), site_id, form_id, &self.0] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        hex::encode(h.finalize())
    }

    /// Constant-time check against a stored hash.
    pub fn verify(&self, stored_hash: &str, purpose: Purpose, site_id: &str, form_id: &str) -> bool {
        let candidate = self.hash(purpose, site_id, form_id);
        candidate.as_bytes().ct_eq(stored_hash.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn keys_are_128_bits_and_distinct() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let a = OtkSecret::generate(&mut rng);
        let b = OtkSecret::generate(&mut rng);
        assert_eq!(URL_SAFE_NO_PAD.decode(a.expose()).unwrap().len(), 16);
        assert_ne!(a, b);
        assert!(OtkSecret::parse(a.expose()).is_some());
    }

    #[test]
    fn a_key_verifies_only_for_its_purpose_site_and_form() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let k = OtkSecret::generate(&mut rng);
        let stored = k.hash(Purpose::Submit, "acme", "f1");
        assert!(k.verify(&stored, Purpose::Submit, "acme", "f1"));
        assert!(!k.verify(&stored, Purpose::Retrieve, "acme", "f1"), "a submit key never retrieves");
        assert!(!k.verify(&stored, Purpose::Open, "acme", "f1"));
        assert!(!k.verify(&stored, Purpose::Submit, "other", "f1"), "site bound");
        assert!(!k.verify(&stored, Purpose::Submit, "acme", "f2"), "form bound");
        let other = OtkSecret::generate(&mut rng);
        assert!(!other.verify(&stored, Purpose::Submit, "acme", "f1"));
    }

    #[test]
    fn malformed_keys_are_not_keys() {
        for s in ["", "short", "!!!!!!!!!!!!!!!!!!!!!!", "aaaaaaaaaaaaaaaaaaaaaaa"] {
            assert!(OtkSecret::parse(s).is_none(), "{s:?}");
        }
    }

    #[test]
    fn a_key_can_name_its_partition_and_the_name_is_part_of_the_key() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let k = OtkSecret::generate_for(&mut rng, 4);
        assert_eq!(k.partition(), Some(4));
        let parsed = OtkSecret::parse(k.expose()).expect("a key we issued parses");
        assert_eq!(parsed.partition(), Some(4));
        let stored = k.hash(Purpose::Open, "acme", "f1");
        assert!(parsed.verify(&stored, Purpose::Open, "acme", "f1"));
        // Another partition number on the same random part is another key.
        let (random, _) = k.expose().split_once('.').unwrap();
        let moved = OtkSecret::parse(&format!("{random}.5")).unwrap();
        assert!(!moved.verify(&stored, Purpose::Open, "acme", "f1"));
        assert_eq!(OtkSecret::generate(&mut rng).partition(), None, "keys without a hint still parse");
        for bad in [format!("{random}."), format!("{random}.x"), format!("{random}.123456"), format!("{random}.-1")] {
            assert!(OtkSecret::parse(&bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = OtkSecret::parse("abcdefghijklmnopqrstuv").unwrap();
        assert!(!format!("{k:?}").contains("abcdef"));
    }
}

//! The internal hop: a node forwards a request to the node that owns its conversation (ADR 22). The
//! forwarded request carries [`HEADER`]: the sending node, the time, the visitor's or agent's
//! address and an HMAC-SHA256 over those and the request (method, path and query, body). The key
//! is derived from the integrity key every node of a deployment already holds, so there is no
//! other secret to hand out, and nobody without it can make the owner believe a request was
//! forwarded (and so trust the client address it names, or skip routing). A captured hop is good
//! for [`WINDOW_MS`] and only for the same request, whose keys are one-time anyway.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::IntegrityKey;

/// The request header a forwarded request carries: `node;time_ms;client_ip;mac` (hex MAC).
pub const HEADER: &str = "x-secureforms-hop";

/// How far the sender's clock may be from the receiver's, and how long a hop is good for.
pub const WINDOW_MS: i64 = 30_000;

const KEY_LABEL: &[u8] = b"secureforms-cluster-hop-v1";

/// Signs and checks forwarded requests.
pub struct HopSigner {
    key: Zeroizing<[u8; 32]>,
    node_id: String,
}

impl std::fmt::Debug for HopSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HopSigner").field("node_id", &self.node_id).finish_non_exhaustive()
    }
}

/// A request another node of the deployment forwarded, as its header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    pub from: String,
    pub client_ip: std::net::IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HopError {
    #[error("the {HEADER} header is not node;time;client_ip;mac")]
    Malformed,
    #[error(
        "the forwarded request is {0} ms away from this node's clock (allowed {WINDOW_MS}); check the nodes' clocks (NTP)"
    )]
    Stale(i64),
    #[error("the forwarded request's MAC does not verify: not from a node of this deployment (or another master key)")]
    BadMac,
}

impl HopSigner {
    pub fn new(integrity: &IntegrityKey, node_id: &str) -> HopSigner {
        HopSigner { key: integrity.derive(KEY_LABEL), node_id: node_id.to_string() }
    }

    fn mac(&self, from: &str, at: i64, client: &str, method: &str, path: &str, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.key.as_ref()).expect("HMAC takes any key length");
        for part in [from.as_bytes(), &at.to_be_bytes(), client.as_bytes(), method.as_bytes(), path.as_bytes()] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac.update(&Sha256::digest(body));
        mac
    }

    /// The header value for forwarding a request from `client` at `now_ms`.
    pub fn sign(&self, now_ms: i64, client: std::net::IpAddr, method: &str, path: &str, body: &[u8]) -> String {
        let client = client.to_string();
        let tag = self.mac(&self.node_id, now_ms, &client, method, path, body).finalize().into_bytes();
        format!("{};{};{};{}", self.node_id, now_ms, client, hex::encode(tag))
    }

    /// Checks a forwarded request's header against the request. Constant-time MAC comparison.
    pub fn verify(&self, header: &str, now_ms: i64, method: &str, path: &str, body: &[u8]) -> Result<Hop, HopError> {
        let mut parts = header.rsplitn(4, ';');
        let (Some(tag), Some(client), Some(at), Some(from)) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(HopError::Malformed);
        };
        let at: i64 = at.parse().map_err(|_| HopError::Malformed)?;
        let client_ip: std::net::IpAddr = client.parse().map_err(|_| HopError::Malformed)?;
        let tag = hex::decode(tag).map_err(|_| HopError::Malformed)?;
        if (now_ms - at).abs() > WINDOW_MS {
            return Err(HopError::Stale(now_ms - at));
        }
        self.mac(from, at, client, method, path, body).verify_slice(&tag).map_err(|_| HopError::BadMac)?;
        Ok(Hop { from: from.to_string(), client_ip })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(node: &str, master: &crate::crypto::MasterKey) -> HopSigner {
        HopSigner::new(&IntegrityKey::from_master(master), node)
    }

    #[test]
    fn a_hop_verifies_for_its_request_only_within_the_window_and_only_with_the_deployments_key() {
        let master = crate::crypto::MasterKey::from_base64(&crate::crypto::MasterKey::generate_base64()).unwrap();
        let (a, b) = (signer("node-a", &master), signer("node-b", &master));
        let ip: std::net::IpAddr = "203.0.113.9".parse().unwrap();
        let h = a.sign(1_000_000, ip, "POST", "/f/acme/f1", b"k=x");
        assert_eq!(
            b.verify(&h, 1_000_500, "POST", "/f/acme/f1", b"k=x"),
            Ok(Hop { from: "node-a".into(), client_ip: ip })
        );
        assert_eq!(b.verify(&h, 1_000_500, "POST", "/f/acme/f2", b"k=x"), Err(HopError::BadMac), "another path");
        assert_eq!(b.verify(&h, 1_000_500, "POST", "/f/acme/f1", b"k=y"), Err(HopError::BadMac), "another body");
        assert_eq!(b.verify(&h, 1_000_500, "GET", "/f/acme/f1", b"k=x"), Err(HopError::BadMac), "another method");
        assert!(matches!(
            b.verify(&h, 1_000_000 + WINDOW_MS + 1, "POST", "/f/acme/f1", b"k=x"),
            Err(HopError::Stale(_))
        ));
        // The client address is covered: a relay cannot make the owner blame someone else.
        let forged = h.replace("203.0.113.9", "198.51.100.1");
        assert_eq!(b.verify(&forged, 1_000_500, "POST", "/f/acme/f1", b"k=x"), Err(HopError::BadMac));
        let other = crate::crypto::MasterKey::from_base64(&crate::crypto::MasterKey::generate_base64()).unwrap();
        assert_eq!(
            signer("node-b", &other).verify(&h, 1_000_500, "POST", "/f/acme/f1", b"k=x"),
            Err(HopError::BadMac),
            "another deployment"
        );
        assert_eq!(b.verify("garbage", 0, "GET", "/", b""), Err(HopError::Malformed));
    }
}

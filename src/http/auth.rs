//! Agent authentication: a bearer JWT issued by the chat platform, verified with a shared secret
//! (HS256) or a JWKS file. Claims: `sub` (agent id), `site`, `roles`, `permissions`, `sid` (session)
//! and `exp`. A session the chat bus ended (AgentSessionEnded: logout, idle logout) revokes every
//! token of that session at once.

use std::path::Path;

use axum::http::HeaderMap;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::config::AgentAuthConfig;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentClaims {
    /// The agent id.
    pub sub: String,
    pub site: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub permissions: Vec<String>,
    /// The agent's session on the chat platform.
    pub sid: String,
    pub exp: i64,
    /// Not before (seconds since the epoch), when the platform sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
}

/// Why a token was refused (401). The code goes into the response and the audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    NotConfigured,
    Missing,
    Invalid,
    Expired,
    NotYetValid,
    SessionEnded,
}

impl AuthFailure {
    pub fn code(self) -> &'static str {
        match self {
            AuthFailure::NotConfigured => "auth_not_configured",
            AuthFailure::Missing => "token_missing",
            AuthFailure::Invalid => "token_invalid",
            AuthFailure::Expired => "token_expired",
            AuthFailure::NotYetValid => "token_not_yet_valid",
            AuthFailure::SessionEnded => "session_ended",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::NotConfigured => {
                "agent authentication is not configured on this node (set SECUREFORMS_JWT_SECRET or agent_auth.jwks_file)"
            }
            AuthFailure::Missing => "send the agent's token as Authorization: Bearer <jwt>",
            AuthFailure::Invalid => "the token is not valid (signature, algorithm, claims or format)",
            AuthFailure::Expired => "the token has expired; get a new one from the chat platform",
            AuthFailure::NotYetValid => {
                "the token is not valid yet (nbf); check the clocks of the chat platform and this node"
            }
            AuthFailure::SessionEnded => "the agent's session has ended (logout or idle logout); sign in again",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent token secret file is not private: {0}")]
    Permissions(#[from] crate::secrets::PermissionsError),
    #[error("{path} is not a JWKS file: {message}")]
    Jwks { path: String, message: String },
    #[error(
        "the HS256 secret ({from}) is {len} bytes; it must be at least {MIN_SECRET_BYTES} random bytes (for example `openssl rand -base64 48`)"
    )]
    WeakSecret { from: &'static str, len: usize },
}

/// The shortest HS256 secret accepted: as many bytes as the hash (RFC 7518 3.2).
pub const MIN_SECRET_BYTES: usize = 32;

enum Keys {
    None,
    Secret(DecodingKey),
    Jwks(Vec<(Option<String>, Algorithm, DecodingKey)>),
}

pub struct AgentAuth {
    keys: Keys,
    issuer: Option<String>,
    audience: Option<String>,
}

impl AgentAuth {
    /// From the configuration and `SECUREFORMS_JWT_SECRET` (which wins over `jwt_secret_file`).
    pub fn load(cfg: &AgentAuthConfig, env_secret: Option<&str>) -> Result<AgentAuth, AuthConfigError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| AuthConfigError::Read { path: p.display().to_string(), source })
        };
        let secret = |from: &'static str, s: &[u8]| {
            if s.len() < MIN_SECRET_BYTES {
                return Err(AuthConfigError::WeakSecret { from, len: s.len() });
            }
            Ok(Keys::Secret(DecodingKey::from_secret(s)))
        };
        let keys = if let Some(s) = env_secret.filter(|s| !s.is_empty()) {
            secret("SECUREFORMS_JWT_SECRET", s.as_bytes())?
        } else if let Some(p) = &cfg.jwt_secret_file {
            crate::secrets::check_private_file(p)?;
            let bytes = read(p)?;
            secret("jwt_secret_file", String::from_utf8_lossy(&bytes).trim().as_bytes())?
        } else if let Some(p) = &cfg.jwks_file {
            let bad = |message: String| AuthConfigError::Jwks { path: p.display().to_string(), message };
            let set: JwkSet = serde_json::from_slice(&read(p)?).map_err(|e| bad(e.to_string()))?;
            let mut keys = Vec::new();
            for jwk in &set.keys {
                let alg = jwk
                    .common
                    .key_algorithm
                    .and_then(|a| a.to_string().parse::<Algorithm>().ok())
                    .ok_or_else(|| bad("every key needs an \"alg\"".into()))?;
                keys.push((
                    jwk.common.key_id.clone(),
                    alg,
                    DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?,
                ));
            }
            Keys::Jwks(keys)
        } else {
            Keys::None
        };
        Ok(AgentAuth { keys, issuer: cfg.issuer.clone(), audience: cfg.audience.clone() })
    }

    pub fn is_configured(&self) -> bool {
        !matches!(self.keys, Keys::None)
    }

    /// Verifies the bearer token of a request at `now_ms` (signature, algorithm, expiry, issuer,
    /// audience). Session revocation is checked by the caller against the visibility projection.
    pub fn verify(&self, headers: &HeaderMap, now_ms: i64) -> Result<AgentClaims, AuthFailure> {
        let token = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthFailure::Missing)?;
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthFailure::Invalid)?;
        let (alg, key) = match &self.keys {
            Keys::None => return Err(AuthFailure::NotConfigured),
            Keys::Secret(k) => (Algorithm::HS256, k),
            Keys::Jwks(keys) => keys
                .iter()
                .find(|(kid, alg, _)| (header.kid.is_none() || kid == &header.kid) && *alg == header.alg)
                .map(|(_, alg, k)| (*alg, k))
                .ok_or(AuthFailure::Invalid)?,
        };
        if header.alg != alg {
            return Err(AuthFailure::Invalid);
        }
        let mut v = Validation::new(alg);
        // Expiry is checked below against the injected clock, not the system clock.
        v.validate_exp = false;
        v.validate_nbf = false;
        v.leeway = 0;
        // A configured issuer or audience is required in every token, not only checked when present.
        v.required_spec_claims = ["sub".to_string()].into_iter().collect();
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                v.required_spec_claims.insert("aud".into());
            }
            None => v.validate_aud = false,
        }
        let claims = jsonwebtoken::decode::<AgentClaims>(token, key, &v).map_err(|_| AuthFailure::Invalid)?.claims;
        if claims.exp * 1000 <= now_ms {
            return Err(AuthFailure::Expired);
        }
        if claims.nbf.is_some_and(|nbf| nbf * 1000 > now_ms) {
            return Err(AuthFailure::NotYetValid);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn token(secret: &str, claims: &AgentClaims, alg: Algorithm) -> HeaderMap {
        let t = encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap();
        let mut h = HeaderMap::new();
        h.insert(axum::http::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
        h
    }

    fn claims(exp: i64) -> AgentClaims {
        AgentClaims {
            sub: "alice".into(),
            site: "acme".into(),
            roles: vec!["agent".into()],
            permissions: vec!["use_secure_form".into()],
            sid: "s1".into(),
            exp,
            nbf: None,
        }
    }

    const SECRET: &str = "a-test-secret-of-at-least-thirty-two-bytes";

    #[test]
    fn a_jwks_file_verifies_eddsa_tokens_by_kid_and_checks_issuer_and_audience() {
        use base64::Engine;
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(kp.public_key_raw());
        let dir = tempfile::tempdir().unwrap();
        let jwks = dir.path().join("jwks.json");
        std::fs::write(
            &jwks,
            serde_json::json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "alg": "EdDSA", "kid": "k1"}]})
                .to_string(),
        )
        .unwrap();
        let cfg = AgentAuthConfig {
            jwks_file: Some(jwks),
            issuer: Some("chat".into()),
            audience: Some("secureforms".into()),
            ..Default::default()
        };
        let auth = AgentAuth::load(&cfg, None).unwrap();
        let sign = |kid: &str, iss: &str, aud: &str| {
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = Some(kid.into());
            let mut c = serde_json::to_value(claims(2_000)).unwrap();
            c["iss"] = iss.into();
            c["aud"] = aud.into();
            let t = encode(&header, &c, &EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap()).unwrap();
            let mut h = HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
            h
        };
        assert_eq!(auth.verify(&sign("k1", "chat", "secureforms"), 1_000).unwrap().sub, "alice");
        assert_eq!(auth.verify(&sign("k2", "chat", "secureforms"), 1_000), Err(AuthFailure::Invalid), "unknown kid");
        assert_eq!(auth.verify(&sign("k1", "elsewhere", "secureforms"), 1_000), Err(AuthFailure::Invalid), "issuer");
        assert_eq!(auth.verify(&sign("k1", "chat", "other"), 1_000), Err(AuthFailure::Invalid), "audience");
        assert_eq!(
            auth.verify(&token("any", &claims(2_000), Algorithm::HS256), 1_000),
            Err(AuthFailure::Invalid),
            "HS256 is not accepted when keys come from JWKS"
        );
        // A token that leaves out the configured issuer or audience is refused, not waved through.
        let bare = {
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = Some("k1".into());
            let t = encode(&header, &claims(2_000), &EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap())
                .unwrap();
            let mut h = HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
            h
        };
        assert_eq!(auth.verify(&bare, 1_000), Err(AuthFailure::Invalid), "no iss and no aud");
    }

    #[test]
    fn a_configured_issuer_or_audience_is_required_in_hs256_tokens_too() {
        for (issuer, audience) in [(Some("chat"), None), (None, Some("secureforms"))] {
            let cfg = AgentAuthConfig {
                issuer: issuer.map(String::from),
                audience: audience.map(String::from),
                ..Default::default()
            };
            let auth = AgentAuth::load(&cfg, Some(SECRET)).unwrap();
            assert_eq!(
                auth.verify(&token(SECRET, &claims(2_000), Algorithm::HS256), 1_000),
                Err(AuthFailure::Invalid),
                "{issuer:?} {audience:?}: a token without the claim"
            );
            let mut c = serde_json::to_value(claims(2_000)).unwrap();
            if let Some(i) = issuer {
                c["iss"] = i.into();
            }
            if let Some(a) = audience {
                c["aud"] = a.into();
            }
            let t = encode(&Header::new(Algorithm::HS256), &c, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap();
            let mut h = HeaderMap::new();
            h.insert(axum::http::header::AUTHORIZATION, format!("Bearer {t}").parse().unwrap());
            assert_eq!(auth.verify(&h, 1_000).unwrap().sub, "alice", "with the claim");
        }
    }

    #[test]
    fn hs256_secrets_shorter_than_32_bytes_are_refused_with_advice() {
        let e = AgentAuth::load(&AgentAuthConfig::default(), Some("top-secret")).err().unwrap().to_string();
        assert!(e.contains("10 bytes") && e.contains("at least 32"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("jwt.secret");
        std::fs::write(&file, "short\n").unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        let cfg = AgentAuthConfig { jwt_secret_file: Some(file), ..Default::default() };
        assert!(matches!(AgentAuth::load(&cfg, None), Err(AuthConfigError::WeakSecret { len: 5, .. })));
    }

    #[test]
    fn tokens_are_checked_for_signature_algorithm_and_expiry() {
        let auth = AgentAuth::load(&AgentAuthConfig::default(), Some(SECRET)).unwrap();
        assert_eq!(auth.verify(&token(SECRET, &claims(2_000), Algorithm::HS256), 1_000_000).unwrap().sub, "alice");
        assert_eq!(
            auth.verify(&token("other", &claims(2_000), Algorithm::HS256), 1_000_000),
            Err(AuthFailure::Invalid),
            "forged"
        );
        assert_eq!(
            auth.verify(&token(SECRET, &claims(2_000), Algorithm::HS512), 1_000_000),
            Err(AuthFailure::Invalid),
            "algorithm"
        );
        assert_eq!(auth.verify(&token(SECRET, &claims(999), Algorithm::HS256), 1_000_000), Err(AuthFailure::Expired));
        assert_eq!(auth.verify(&HeaderMap::new(), 0), Err(AuthFailure::Missing));
        let mut early = claims(2_000);
        early.nbf = Some(1_500);
        assert_eq!(auth.verify(&token(SECRET, &early, Algorithm::HS256), 1_000_000), Err(AuthFailure::NotYetValid));
        assert_eq!(
            auth.verify(&token(SECRET, &early, Algorithm::HS256), 1_500_000).unwrap().sub,
            "alice",
            "from nbf on"
        );
        let unconfigured = AgentAuth::load(&AgentAuthConfig::default(), None).unwrap();
        assert_eq!(
            unconfigured.verify(&token("x", &claims(2_000), Algorithm::HS256), 0),
            Err(AuthFailure::NotConfigured)
        );
    }
}

//! Bearer tokens: ES256-signed JWTs in the Docker token format (an `access` claim listing
//! `repository:<name>:<actions>`), the origin's signing key (PKCS#8 PEM, generated with ring
//! when none is configured), and the public keys (JWK) every process verifies with, offline.

use std::collections::HashMap;
use std::path::Path;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{EcdsaKeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::rules::Action;
use super::AuthError;

/// How long a token is valid by default (docker/distribution's token servers use minutes too:
/// clients ask again when one expires).
pub const DEFAULT_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(5 * 60);
/// Clock skew tolerated on `exp` and `nbf` between the origin that signed and the verifier:
/// origins take writes up to 20 s apart (`SKEW_WRITE_LIMIT_MS`) and agents' clocks are not
/// checked at all, so with 5 s a token from an origin 9 s ahead was refused as not yet valid
/// elsewhere (401 `invalid_token`, twice in a row behind a balanced realm: containerd gave
/// up). distribution's verifier allows 60 s.
pub const LEEWAY_SECS: u64 = 60;

/// One entry of a token's `access` claim.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResourceActions {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// The claims Shoal's tokens carry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub iss: String,
    /// The user, empty for an anonymous token.
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<ResourceActions>,
}

impl Claims {
    /// Whether the token grants `action` on repository `repo`.
    pub fn grants(&self, repo: &str, action: Action) -> bool {
        self.access.iter().any(|a| {
            a.kind == "repository"
                && a.name == repo
                && a.actions.iter().any(|x| x == action.as_str() || x == "*")
        })
    }

    /// Whether the token grants `registry:catalog:*`.
    pub fn grants_catalog(&self) -> bool {
        self.access.iter().any(|a| a.kind == "registry" && a.name == "catalog")
    }
}

/// A requested scope, `repository:<name>:<action>[,<action>...]` or `registry:catalog:*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Repository { name: String, actions: Vec<Action> },
    Catalog,
}

impl Scope {
    /// Parse one scope; unknown types and actions are dropped (a token server grants less,
    /// never fails, for what it does not know). `*` asks for every action (as Docker's token
    /// servers read it); what is granted is still what the rules allow.
    pub fn parse(s: &str) -> Option<Scope> {
        let (kind, rest) = s.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        match kind {
            "repository" => {
                let mut actions: Vec<Action> = actions
                    .split(',')
                    .flat_map(|a| match a {
                        "*" => vec![Action::Pull, Action::Push, Action::Delete],
                        a => Action::parse(a).into_iter().collect(),
                    })
                    .collect();
                actions.sort();
                actions.dedup();
                Some(Scope::Repository { name: name.to_string(), actions })
            }
            "registry" if name == "catalog" => Some(Scope::Catalog),
            _ => None,
        }
    }
}

/// A public key as published: a JWK of a P-256 key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    pub kid: String,
    pub x: String,
    pub y: String,
    #[serde(default)]
    pub alg: Option<String>,
}

impl Jwk {
    /// The JWK of an uncompressed P-256 point (`04 || x || y`).
    pub fn from_point(point: &[u8]) -> Result<Jwk, AuthError> {
        if point.len() != 65 || point[0] != 4 {
            return Err(AuthError::Key("not an uncompressed P-256 point".into()));
        }
        let kid = URL_SAFE_NO_PAD.encode(&Sha256::digest(point)[..12]);
        Ok(Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            kid,
            x: URL_SAFE_NO_PAD.encode(&point[1..33]),
            y: URL_SAFE_NO_PAD.encode(&point[33..]),
            alg: Some("ES256".into()),
        })
    }
}

/// The key an origin signs tokens with.
pub struct SigningKey {
    encoding: EncodingKey,
    pub public: Jwk,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.public.kid).finish_non_exhaustive()
    }
}

fn pem_decode(text: &str) -> Result<(String, Vec<u8>), AuthError> {
    let mut label = None;
    let mut body = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(l) = line.strip_prefix("-----BEGIN ") {
            label = Some(l.trim_end_matches('-').to_string());
        } else if line.starts_with("-----END ") {
            break;
        } else if label.is_some() {
            body.push_str(line);
        }
    }
    let label = label.ok_or_else(|| AuthError::Key("no PEM block".into()))?;
    let der = STANDARD.decode(body).map_err(|e| AuthError::Key(format!("PEM base64: {e}")))?;
    Ok((label, der))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

impl SigningKey {
    /// A key from PKCS#8 DER (P-256).
    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, AuthError> {
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|e| AuthError::Key(format!("not a PKCS#8 P-256 key: {e}")))?;
        let public = Jwk::from_point(pair.public_key().as_ref())?;
        Ok(SigningKey { encoding: EncodingKey::from_ec_der(der), public })
    }

    /// A key from a `PRIVATE KEY` (PKCS#8) PEM file's text.
    pub fn from_pem(text: &str) -> Result<SigningKey, AuthError> {
        let (label, der) = pem_decode(text)?;
        if label != "PRIVATE KEY" {
            return Err(AuthError::Key(format!("expected a PKCS#8 PRIVATE KEY, found {label}")));
        }
        SigningKey::from_pkcs8(&der)
    }

    /// A fresh key, and its PKCS#8 PEM to persist.
    pub fn generate() -> Result<(SigningKey, String), AuthError> {
        let rng = ring::rand::SystemRandom::new();
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| AuthError::Random)?;
        Ok((SigningKey::from_pkcs8(doc.as_ref())?, pem_encode("PRIVATE KEY", doc.as_ref())))
    }

    /// The key in `path`, or a new one written there (mode 0600) if the file does not exist:
    /// so a restarted origin keeps signing with the key its published tokens name.
    pub fn load_or_create(path: &Path) -> Result<SigningKey, AuthError> {
        match std::fs::read_to_string(path) {
            Ok(text) => SigningKey::from_pem(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (key, pem) = SigningKey::generate()?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                crate::durable::replace(path, pem.as_bytes(), Some(0o600))?;
                Ok(key)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A signed token for `claims`.
    pub fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.public.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(|e| AuthError::Token(e.to_string()))
    }
}

/// A verification key from a PEM file: a `PUBLIC KEY` (SPKI) or a `PRIVATE KEY` (PKCS#8),
/// for `[auth] token_verify_keys` (keys being rotated out, other origins' keys).
pub fn public_key_from_pem(text: &str) -> Result<Jwk, AuthError> {
    let (label, der) = pem_decode(text)?;
    match label.as_str() {
        "PRIVATE KEY" => Ok(SigningKey::from_pkcs8(&der)?.public),
        // A P-256 SubjectPublicKeyInfo ends with the 65-byte uncompressed point.
        "PUBLIC KEY" if der.len() >= 65 => Jwk::from_point(&der[der.len() - 65..]),
        other => Err(AuthError::Key(format!("expected a PUBLIC KEY or PRIVATE KEY, found {other}"))),
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// How long a key no longer published is still accepted after it was last seen, where the
/// tokens' lifetime is not known (agents): a token it signed lives this long at most with the
/// default lifetime and the leeway. Origins use their own `token_ttl` ([`retired_key_grace`]).
pub const RETIRED_KEY_GRACE: std::time::Duration =
    std::time::Duration::from_secs(DEFAULT_TOKEN_TTL.as_secs() + LEEWAY_SECS);

/// How long a key no longer published is still accepted when tokens live `token_ttl`.
pub fn retired_key_grace(token_ttl: std::time::Duration) -> std::time::Duration {
    token_ttl + std::time::Duration::from_secs(LEEWAY_SECS)
}

/// The keys tokens are verified with, by key id.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, DecodingKey>,
    published: Vec<Jwk>,
    /// When each key was last among the keys this set was made or renewed from.
    seen: HashMap<String, std::time::Instant>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.keys()).finish()
    }
}

impl KeySet {
    /// The set of `keys` (duplicates collapse; keys that are not P-256 JWKs are skipped).
    pub fn new(keys: impl IntoIterator<Item = Jwk>) -> KeySet {
        let now = std::time::Instant::now();
        let mut set = KeySet::default();
        for jwk in keys {
            set.add(jwk, now);
        }
        set
    }

    fn add(&mut self, jwk: Jwk, seen: std::time::Instant) {
        if jwk.kty != "EC" || jwk.crv != "P-256" || self.keys.contains_key(&jwk.kid) {
            return;
        }
        match DecodingKey::from_ec_components(&jwk.x, &jwk.y) {
            Ok(k) => {
                self.keys.insert(jwk.kid.clone(), k);
                self.seen.insert(jwk.kid.clone(), seen);
                self.published.push(jwk);
            }
            Err(e) => tracing::warn!(kid = %jwk.kid, error = %e, "skipping an unusable public key"),
        }
    }

    /// This set brought up to `keys`, the keys published now (at `now`): a key of this set
    /// missing from them is kept until `grace` after it was last seen. Its origin
    /// may only have missed one fetch (restarting, counted down for a moment), and the tokens
    /// it signed are still out there: dropped at once, every one of them was refused with 401
    /// `invalid_token` for as long as that origin was away.
    pub fn renewed(
        &self,
        keys: impl IntoIterator<Item = Jwk>,
        now: std::time::Instant,
        grace: std::time::Duration,
    ) -> KeySet {
        let mut next = KeySet::default();
        for jwk in keys {
            next.add(jwk, now);
        }
        for jwk in &self.published {
            let last = self.seen.get(&jwk.kid).copied().unwrap_or(now);
            if !next.keys.contains_key(&jwk.kid) && now.saturating_duration_since(last) < grace {
                next.add(jwk.clone(), last);
            }
        }
        next
    }

    pub fn jwks(&self) -> &[Jwk] {
        &self.published
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Check `token`'s signature, expiry and audience (`service`); the claims if all hold.
    pub fn verify(&self, token: &str, service: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        if header.alg != Algorithm::ES256 {
            return Err(TokenError::Invalid(format!("algorithm {:?} is not accepted", header.alg)));
        }
        let key = header.kid.as_deref().and_then(|k| self.keys.get(k)).ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_audience(&[service]);
        validation.set_required_spec_claims(&["exp", "aud", "nbf"]);
        jsonwebtoken::decode::<Claims>(token, key, &validation).map(|d| d.claims).map_err(|e| {
            match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            }
        })
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `secs` since the epoch as RFC 3339 UTC (the token reply's `issued_at`).
pub fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn claims(access: Vec<ResourceActions>, exp_in: i64) -> Claims {
        let now = now_secs();
        Claims {
            iss: "shoal".into(),
            sub: "alice".into(),
            aud: "shoal".into(),
            exp: (now as i64 + exp_in) as u64,
            nbf: now - 1,
            iat: now,
            jti: "j".into(),
            access,
        }
    }

    fn pull(repo: &str) -> Vec<ResourceActions> {
        vec![ResourceActions { kind: "repository".into(), name: repo.into(), actions: vec!["pull".into()] }]
    }

    #[test]
    fn sign_and_verify() {
        let (key, pem) = SigningKey::generate().unwrap();
        let again = SigningKey::from_pem(&pem).unwrap();
        assert_eq!(key.public, again.public);
        let set = KeySet::new([key.public.clone()]);
        let token = key.sign(&claims(pull("a/b"), 60)).unwrap();
        let c = set.verify(&token, "shoal").unwrap();
        assert!(c.grants("a/b", Action::Pull));
        assert!(!c.grants("a/b", Action::Push));
        assert!(!c.grants("a/c", Action::Pull));
        assert!(matches!(set.verify(&token, "other"), Err(TokenError::Invalid(_))));
    }

    #[test]
    fn refuses_expired_tampered_and_foreign_tokens() {
        let (key, _) = SigningKey::generate().unwrap();
        let (other, _) = SigningKey::generate().unwrap();
        let set = KeySet::new([key.public.clone()]);
        let expired = key.sign(&claims(pull("a"), -(LEEWAY_SECS as i64) - 5)).unwrap();
        assert_eq!(set.verify(&expired, "shoal"), Err(TokenError::Expired));
        let foreign = other.sign(&claims(pull("a"), 60)).unwrap();
        assert_eq!(set.verify(&foreign, "shoal"), Err(TokenError::UnknownKey));
        // Same kid, other key's signature: a forged header.
        let mut forged_header = Header::new(Algorithm::ES256);
        forged_header.kid = Some(key.public.kid.clone());
        let forged = jsonwebtoken::encode(&forged_header, &claims(pull("a"), 60), &other.encoding).unwrap();
        assert!(matches!(set.verify(&forged, "shoal"), Err(TokenError::Invalid(_))));
        // Claims edited after signing.
        let good = key.sign(&claims(pull("a"), 60)).unwrap();
        let parts: Vec<&str> = good.split('.').collect();
        let widened = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(pull("*"), 60)).unwrap());
        let tampered = format!("{}.{}.{}", parts[0], widened, parts[2]);
        assert!(matches!(set.verify(&tampered, "shoal"), Err(TokenError::Invalid(_))));
        assert!(matches!(set.verify("garbage", "shoal"), Err(TokenError::Invalid(_))));
    }

    fn again_ok(set: &KeySet, token: &str) -> bool {
        set.verify(token, "shoal").is_ok()
    }

    /// A key that stops being published (its origin missed a fetch) still verifies the
    /// tokens it signed for their lifetime and the leeway; after that it does not.
    #[test]
    fn a_key_missing_from_one_fetch_is_kept_for_its_tokens_lifetime() {
        let (a, _) = SigningKey::generate().unwrap();
        let (b, _) = SigningKey::generate().unwrap();
        let now = std::time::Instant::now();
        let g = retired_key_grace(std::time::Duration::from_secs(3600));
        let both = KeySet::default().renewed([a.public.clone(), b.public.clone()], now, g);
        let from_b = b.sign(&claims(pull("x"), 300)).unwrap();
        let later = now + std::time::Duration::from_secs(30);
        let only_a = both.renewed([a.public.clone()], later, g);
        assert!(only_a.verify(&from_b, "shoal").is_ok(), "b's token refused after b missed one fetch");
        // Seen again: its grace starts over; gone for longer than the grace: refused.
        // An hour's tokens: kept past the default lifetime's 6 minutes.
        assert!(again_ok(&only_a.renewed([a.public.clone()], later + RETIRED_KEY_GRACE, g), &from_b));
        let again = only_a.renewed([a.public.clone(), b.public.clone()], later, g);
        let gone = again.renewed([a.public.clone()], later + g, g);
        assert_eq!(gone.verify(&from_b, "shoal"), Err(TokenError::UnknownKey));
        let still = again.renewed([a.public.clone()], later + g - std::time::Duration::from_secs(1), g);
        assert!(still.verify(&from_b, "shoal").is_ok());
    }

    /// A token signed on a clock up to the cluster's skew limit ahead (20 s) is valid at
    /// once here, and one that expired within the leeway still is; past it, not.
    #[test]
    fn a_token_from_a_clock_ahead_is_valid_at_once() {
        let (key, _) = SigningKey::generate().unwrap();
        let set = KeySet::new([key.public.clone()]);
        let mut ahead = claims(pull("a"), 300);
        let skew = 20;
        (ahead.nbf, ahead.iat) = (ahead.nbf + skew, ahead.iat + skew);
        assert!(set.verify(&key.sign(&ahead).unwrap(), "shoal").is_ok(), "refused as not yet valid");
        let just_expired = key.sign(&claims(pull("a"), -30)).unwrap();
        assert!(set.verify(&just_expired, "shoal").is_ok());
        let mut far_ahead = claims(pull("a"), 600);
        far_ahead.nbf += LEEWAY_SECS + 30;
        assert!(set.verify(&key.sign(&far_ahead).unwrap(), "shoal").is_err());
    }

    #[test]
    fn persisted_key_survives_restart_and_public_pem_loads() {
        let dir = std::env::temp_dir().join(format!("shoal-key-{}", now_secs() ^ std::process::id() as u64));
        let path = dir.join("token-key.pem");
        let a = SigningKey::load_or_create(&path).unwrap();
        let b = SigningKey::load_or_create(&path).unwrap();
        assert_eq!(a.public, b.public);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(public_key_from_pem(&text).unwrap(), a.public);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn scopes_parse() {
        assert_eq!(
            Scope::parse("repository:team/app:pull,push"),
            Some(Scope::Repository { name: "team/app".into(), actions: vec![Action::Pull, Action::Push] })
        );
        assert_eq!(Scope::parse("registry:catalog:*"), Some(Scope::Catalog));
        assert_eq!(Scope::parse("bogus"), None);
        // `*` is every action (it meant delete alone: a `*` token could not even pull).
        let all = vec![Action::Pull, Action::Push, Action::Delete];
        assert_eq!(
            Scope::parse("repository:a:*"),
            Some(Scope::Repository { name: "a".into(), actions: all })
        );
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}

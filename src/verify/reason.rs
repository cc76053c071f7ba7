//! Why a token is refused: the stable reason codes, what each means, and which of them are
//! infrastructure failures rather than judgements of the token.

use std::fmt;

/// Why a token was refused. The codes are a stable contract: metric labels and dead-letter
/// headers carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No token header.
    MissingToken,
    /// The token header is present but empty.
    EmptyToken,
    /// More than one token header (header smuggling).
    DuplicateToken,
    /// The token header is not UTF-8.
    NonUtf8Token,
    /// The token header is over the size limit.
    TokenTooLarge,
    /// Not a well-formed compact JWS, or a hostile header form.
    Malformed,
    /// `alg` is `none`, unknown, or not allowed for this issuer or key.
    UnsupportedAlg,
    /// `iss` names no configured issuer.
    UnknownIssuer,
    /// The issuer is configured but not accepted on this route.
    WrongIssuer,
    /// No key of the issuer has the token's `kid`.
    UnknownKid,
    /// The signature does not verify.
    BadSignature,
    /// `exp` has passed (beyond the leeway).
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    NotYetValid,
    /// `iat` is in the future (beyond the leeway).
    IssuedInFuture,
    /// `iat` is older than the issuer's maximum token age.
    TooOld,
    /// `aud` names none of the issuer's audiences.
    WrongAudience,
    /// The header `typ` is not the one the issuer requires.
    WrongType,
    /// A required claim is absent.
    MissingClaim,
    /// A registered claim has the wrong JSON type.
    InvalidClaim,
    /// The route's role, scope or claim rules refuse the token.
    Forbidden,
    /// The token is on the revocation list.
    Revoked,
    /// The revocation list could not be read and the config says dead-letter (not hold).
    RevocationUnavailable,
    /// No key has the token's `kid` and the identity provider has been unreachable for longer
    /// than the issuer's `unknown_kid_max_wait`: the token may be fine; replay it later.
    KeyUnavailable,
    /// The route binds tokens to messages and the message has no proof (or the token no digest claim).
    ProofMissing,
    /// The proof is not a valid proof for this token (signature, key, age, form).
    ProofInvalid,
    /// The proof (or the token's digest claim) signs another message key or payload.
    PayloadMismatch,
    /// The route requires single use and another message already used this token's `jti`.
    Replayed,
}

impl Reason {
    /// Every reason, for documentation and metric pre-registration.
    pub const ALL: [Reason; 27] = [
        Reason::MissingToken,
        Reason::EmptyToken,
        Reason::DuplicateToken,
        Reason::NonUtf8Token,
        Reason::TokenTooLarge,
        Reason::Malformed,
        Reason::UnsupportedAlg,
        Reason::UnknownIssuer,
        Reason::WrongIssuer,
        Reason::UnknownKid,
        Reason::BadSignature,
        Reason::Expired,
        Reason::NotYetValid,
        Reason::IssuedInFuture,
        Reason::TooOld,
        Reason::WrongAudience,
        Reason::WrongType,
        Reason::MissingClaim,
        Reason::InvalidClaim,
        Reason::Forbidden,
        Reason::Revoked,
        Reason::RevocationUnavailable,
        Reason::KeyUnavailable,
        Reason::ProofMissing,
        Reason::ProofInvalid,
        Reason::PayloadMismatch,
        Reason::Replayed,
    ];

    /// The stable snake_case code.
    pub fn code(self) -> &'static str {
        match self {
            Reason::MissingToken => "missing_token",
            Reason::EmptyToken => "empty_token",
            Reason::DuplicateToken => "duplicate_token",
            Reason::NonUtf8Token => "non_utf8_token",
            Reason::TokenTooLarge => "token_too_large",
            Reason::Malformed => "malformed",
            Reason::UnsupportedAlg => "unsupported_alg",
            Reason::UnknownIssuer => "unknown_issuer",
            Reason::WrongIssuer => "wrong_issuer",
            Reason::UnknownKid => "unknown_kid",
            Reason::BadSignature => "bad_signature",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::IssuedInFuture => "issued_in_future",
            Reason::TooOld => "too_old",
            Reason::WrongAudience => "wrong_audience",
            Reason::WrongType => "wrong_type",
            Reason::MissingClaim => "missing_claim",
            Reason::InvalidClaim => "invalid_claim",
            Reason::Forbidden => "forbidden",
            Reason::Revoked => "revoked",
            Reason::RevocationUnavailable => "revocation_unavailable",
            Reason::KeyUnavailable => "key_unavailable",
            Reason::ProofMissing => "proof_missing",
            Reason::ProofInvalid => "proof_invalid",
            Reason::PayloadMismatch => "payload_mismatch",
            Reason::Replayed => "replayed",
        }
    }

    /// What it means, as the README's reason table says (a test holds the two together).
    pub fn meaning(self) -> &'static str {
        match self {
            Reason::MissingToken => "no token header",
            Reason::EmptyToken => "the token header is empty",
            Reason::DuplicateToken => "more than one token header (header smuggling)",
            Reason::NonUtf8Token => "the token header is not UTF-8",
            Reason::TokenTooLarge => "the token header is over `token.max_bytes` (default 8 KiB)",
            Reason::Malformed => {
                "not a compact JWS, bad base64 or JSON, duplicate JSON keys, `crit`, `b64: false`, nested `cty: JWT`, JWE fields"
            }
            Reason::UnsupportedAlg => {
                "`alg` is `none` (any spelling), unknown, not allowed for the issuer, or not pinned to the key"
            }
            Reason::UnknownIssuer => "`iss` names no configured issuer",
            Reason::WrongIssuer => "the issuer is configured but not accepted on this route",
            Reason::UnknownKid => "no key of the issuer has the token's `kid` (after one rate-limited JWKS refetch)",
            Reason::BadSignature => "the signature does not verify",
            Reason::Expired => "`exp` passed (beyond the leeway)",
            Reason::NotYetValid => "`nbf` in the future (beyond the leeway)",
            Reason::IssuedInFuture => "`iat` in the future (beyond the leeway)",
            Reason::TooOld => "`iat` older than the issuer's `max_age`",
            Reason::WrongAudience => "`aud` names none of the issuer's audiences",
            Reason::WrongType => "header `typ` is not the issuer's required one (e.g. `at+jwt`)",
            Reason::MissingClaim => "`exp`, `iss`, `aud`, `iat` (with `max_age`) or a required claim is absent",
            Reason::InvalidClaim => "a registered claim has the wrong JSON type (e.g. `exp` as a string)",
            Reason::Forbidden => "the route's role, scope or claim rules refuse the token",
            Reason::Revoked => "on the revocation list (the detail says which kind matched)",
            Reason::RevocationUnavailable => {
                "Redis unreachable and `redis.on_unavailable = \"dead_letter\"` (default is to hold)"
            }
            Reason::KeyUnavailable => {
                "no key has the token's `kid` and the issuer's JWKS has been unreachable for longer than `unknown_kid_max_wait` (default 60s); the token may be fine: replay it once the identity provider is back"
            }
            Reason::ProofMissing => {
                "the route binds tokens to messages and the message has no proof header (or the token no digest claim)"
            }
            Reason::ProofInvalid => {
                "the proof is not this token's: not signed by the key of its `cnf.jkt`, bad signature, `iat` outside `max_age`, no `jti`, or malformed"
            }
            Reason::PayloadMismatch => {
                "the proof (or the token's digest claim) was made for another message key or payload"
            }
            Reason::Replayed => {
                "the route requires single use and another message already used this token's `jti` (per issuer; a redelivery of the same source message is not a replay)"
            }
        }
    }

    /// Whether it is an infrastructure failure turned into a verdict (by config or after a
    /// bounded wait), not a judgement of the token: such messages may pass when replayed later.
    pub fn is_infrastructure(self) -> bool {
        matches!(self, Reason::RevocationUnavailable | Reason::KeyUnavailable)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refused token: a normal outcome, routed to the dead-letter destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// The stable code.
    pub reason: Reason,
    /// A short human explanation; never holds the token.
    pub detail: String,
}

impl Rejection {
    /// A rejection with a detail.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Rejection {
        Rejection { reason, detail: detail.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_all_is_in_declaration_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i, "{r:?}");
        }
    }

    #[test]
    fn reason_codes_are_unique_snake_case() {
        let codes: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.code()).collect();
        assert_eq!(codes.len(), Reason::ALL.len());
        assert!(
            codes.iter().all(|c| { c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_' || ch.is_ascii_digit()) })
        );
    }

    #[test]
    fn the_readme_table_is_the_reasons() {
        let readme = include_str!("../../README.md");
        let rows: Vec<String> = readme
            .lines()
            .skip_while(|l| *l != "| code | meaning |")
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(str::to_owned)
            .collect();
        for r in Reason::ALL {
            let row = format!("| `{}` | {} |", r.code(), r.meaning());
            assert!(rows.contains(&row), "README lacks the row {row}");
        }
        assert_eq!(rows.len(), Reason::ALL.len(), "README reason rows vs Reason::ALL");
    }
}

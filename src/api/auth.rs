//! Optional bearer-token authentication (`api.tokens`).
//!
//! With no tokens configured every route is open. With tokens, every `/v1` route needs
//! `Authorization: Bearer SECRET` naming one of them; the token's name is recorded as the owner
//! of each job it creates, and only that token may read, follow or cancel the job. Jobs
//! published to the broker directly have no owner and can be read with any token. `/healthz`,
//! `/readyz`, `/metrics`, `/openapi.json` and the status page's HTML are always open (the page
//! asks for a token and sends it with its own requests).

use axum::http::HeaderMap;
use uuid::Uuid;

use super::error::ApiError;
use super::ApiState;
use crate::config::ApiToken;

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Authentication is off.
    Anyone,
    /// The name of the token presented.
    Token(String),
}

impl Caller {
    /// The owner to record for a job this caller creates.
    pub fn owner(&self) -> Option<&str> {
        match self {
            Caller::Anyone => None,
            Caller::Token(name) => Some(name),
        }
    }
}

/// The caller of a `/v1` request, or `Unauthorized`.
pub fn authenticate(tokens: &[ApiToken], headers: &HeaderMap) -> Result<Caller, ApiError> {
    if tokens.is_empty() {
        return Ok(Caller::Anyone);
    }
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .ok_or(ApiError::Unauthorized)?;
    // Compare against every token without stopping early, so timing does not tell which
    // prefix matched.
    let mut found = None;
    for token in tokens {
        if constant_time_eq(token.secret.as_bytes(), presented.as_bytes()) {
            found = Some(token.name.clone());
        }
    }
    found.map(Caller::Token).ok_or(ApiError::Unauthorized)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `caller` may read or cancel job `id`: `Forbidden` when another token owns it.
pub async fn check_owner(state: &ApiState, caller: &Caller, id: Uuid) -> Result<(), ApiError> {
    let Caller::Token(name) = caller else {
        return Ok(());
    };
    match state.db.owner_of(id).await? {
        Some(owner) if &owner != name => Err(ApiError::Forbidden { id }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn tokens() -> Vec<ApiToken> {
        vec![
            ApiToken::parse("alice:alice-secret").unwrap(),
            ApiToken::parse("bob:bob-secret-1").unwrap(),
        ]
    }

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn no_tokens_means_open() {
        assert_eq!(
            authenticate(&[], &HeaderMap::new()).unwrap(),
            Caller::Anyone
        );
    }

    #[test]
    fn bearer_token_names_the_caller() {
        let caller = authenticate(&tokens(), &headers("Bearer bob-secret-1")).unwrap();
        assert_eq!(caller, Caller::Token("bob".into()));
        let caller = authenticate(&tokens(), &headers("bearer  alice-secret ")).unwrap();
        assert_eq!(caller, Caller::Token("alice".into()));
    }

    #[test]
    fn missing_or_wrong_tokens_are_refused() {
        for h in [
            HeaderMap::new(),
            headers("Bearer nope-nope"),
            headers("Basic alice-secret"),
            headers("alice-secret"),
        ] {
            assert!(matches!(
                authenticate(&tokens(), &h),
                Err(ApiError::Unauthorized)
            ));
        }
    }
}

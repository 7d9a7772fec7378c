//! Masking secrets: the password inside a URL (and password-like query parameters).

use crate::config::keys::Settings;
use crate::config::Config;

/// What a masked secret is replaced with.
pub const MASK: &str = "****";

const SECRET_PARAMS: [&str; 4] = ["password", "passwd", "secret", "token"];

/// `url` with the password of its user-info part and any password-like query parameter
/// replaced by `****`. Text that is not a URL is returned unchanged.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest_start = scheme_end + 3;
    let rest = &url[rest_start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..rest_start]);
    match authority.rfind('@') {
        Some(at) => {
            let userinfo = &authority[..at];
            match userinfo.split_once(':') {
                Some((user, _password)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(MASK);
                }
                None => out.push_str(userinfo),
            }
            out.push_str(&authority[at..]);
        }
        None => out.push_str(authority),
    }
    out.push_str(&redact_query(&rest[authority_end..]));
    out
}

fn redact_query(tail: &str) -> String {
    let Some(q) = tail.find('?') else {
        return tail.to_owned();
    };
    let (path, query_and_fragment) = tail.split_at(q + 1);
    let (query, fragment) = match query_and_fragment.find('#') {
        Some(h) => query_and_fragment.split_at(h),
        None => (query_and_fragment, ""),
    };
    let parts: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret_param(name) => format!("{name}={MASK}"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}{}{fragment}", parts.join("&"))
}

fn is_secret_param(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_PARAMS.iter().any(|p| lower.contains(p))
}

/// Checks that the URL keys have the expected schemes.
pub(crate) fn check_urls(s: &Settings) -> Result<(), (&'static str, String)> {
    let broker = s.broker.url.as_str();
    if !(broker.starts_with("amqp://") || broker.starts_with("amqps://")) {
        return Err((
            "broker.url",
            format!(
                "expected an amqp:// or amqps:// URL, found {:?}",
                redact_url(broker)
            ),
        ));
    }
    let db = s.database.url.as_str();
    if !(db.starts_with("postgres://") || db.starts_with("postgresql://")) {
        return Err((
            "database.url",
            format!("expected a postgres:// URL, found {:?}", redact_url(db)),
        ));
    }
    Ok(())
}

/// The configuration as JSON with every secret masked.
pub(crate) fn redacted_config(config: &Config) -> serde_json::Value {
    let mut value = serde_json::to_value(config).unwrap_or(serde_json::Value::Null);
    for (section, key) in [("broker", "url"), ("database", "url")] {
        if let Some(slot) = value.get_mut(section).and_then(|s| s.get_mut(key)) {
            if let Some(url) = slot.as_str() {
                *slot = serde_json::Value::String(redact_url(url));
            }
        }
    }
    if let Some(storage) = value.get_mut("storage").and_then(|s| s.as_object_mut()) {
        if let Some(endpoint) = storage.get_mut("endpoint") {
            if let Some(url) = endpoint.as_str() {
                *endpoint = serde_json::Value::String(redact_url(url));
            }
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn masks_password_keeps_user_and_host() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@rabbit:5672/%2f"),
            "amqp://guest:****@rabbit:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://app@db/jobs"),
            "postgres://app@db/jobs"
        );
        assert_eq!(
            redact_url("postgres://db/jobs?user=a&password=hunter2&sslmode=require"),
            "postgres://db/jobs?user=a&password=****&sslmode=require"
        );
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn password_containing_at_sign_is_fully_masked() {
        assert_eq!(
            redact_url("postgres://u:p@ss@host/db"),
            "postgres://u:****@host/db"
        );
    }
}

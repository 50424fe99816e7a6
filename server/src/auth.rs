//! Who may read and write which streams. The protocol leaves this to the
//! server; a host plugs in its own [`Authorize`], or uses [`BearerTokens`].

use std::collections::HashMap;
use std::fmt;

/// What a request wants to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `GET`, `HEAD`.
    Read,
    /// `PUT`, `POST`, `DELETE`.
    Write,
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No credentials, or unknown ones: 401.
    Unauthenticated,
    /// Known credentials without this access: 403.
    Forbidden,
}

/// Decides each request before any byte of it is acted on.
pub trait Authorize: Send + Sync + 'static {
    /// `token` is the request's bearer token, if any; `path` the stream path
    /// after `/v1/stream/` (agent runs are `runs/{run_id}`).
    fn authorize(&self, token: Option<&str>, path: &str, access: Access) -> Result<(), Denied>;
}

/// Lets everyone do everything. Meant for a server on a loopback address
/// (the binary refuses it on any other).
#[derive(Debug, Clone, Copy, Default)]
pub struct Open;

impl Authorize for Open {
    fn authorize(&self, _: Option<&str>, _: &str, _: Access) -> Result<(), Denied> {
        Ok(())
    }
}

/// What one token grants: stream paths under a prefix, to read or also to
/// write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Paths starting with this (`""` is every path; `runs/` every agent run).
    pub prefix: String,
    /// Whether the token may write there too.
    pub write: bool,
}

/// Bearer tokens, each with its grants.
#[derive(Clone, Default)]
pub struct BearerTokens {
    tokens: HashMap<String, Vec<Grant>>,
}

impl fmt::Debug for BearerTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens are secrets: show how many, not which.
        f.debug_struct("BearerTokens")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl BearerTokens {
    /// No tokens: every request is refused with 401.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grants `token` access to paths under `prefix`.
    #[must_use]
    pub fn grant(
        mut self,
        token: impl Into<String>,
        prefix: impl Into<String>,
        write: bool,
    ) -> Self {
        self.tokens.entry(token.into()).or_default().push(Grant {
            prefix: prefix.into(),
            write,
        });
        self
    }

    /// Reads grants from text, one per line: `TOKEN PREFIX read|write`.
    /// Blank lines and lines starting with `#` are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut tokens = Self::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let write = match fields.as_slice() {
                [_, _, "read"] => false,
                [_, _, "write"] => true,
                _ => {
                    return Err(format!(
                        "line {}: expected `TOKEN PREFIX read|write`",
                        number + 1
                    ));
                }
            };
            let prefix = if fields[1] == "*" { "" } else { fields[1] };
            tokens = tokens.grant(fields[0], prefix, write);
        }
        Ok(tokens)
    }
}

impl Authorize for BearerTokens {
    fn authorize(&self, token: Option<&str>, path: &str, access: Access) -> Result<(), Denied> {
        let grants = token
            .and_then(|t| self.tokens.get(t))
            .ok_or(Denied::Unauthenticated)?;
        let allowed = grants
            .iter()
            .any(|g| path.starts_with(&g.prefix) && (g.write || access == Access::Read));
        if allowed {
            Ok(())
        } else {
            Err(Denied::Forbidden)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_grant_prefixes_and_access() {
        let tokens =
            BearerTokens::parse("# comment\nalpha chat/ write\nbeta runs/ read\n").unwrap();
        assert_eq!(
            tokens.authorize(None, "chat/1", Access::Read),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            tokens.authorize(Some("nope"), "chat/1", Access::Read),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            tokens.authorize(Some("alpha"), "chat/1", Access::Write),
            Ok(())
        );
        assert_eq!(
            tokens.authorize(Some("alpha"), "runs/x", Access::Read),
            Err(Denied::Forbidden)
        );
        assert_eq!(
            tokens.authorize(Some("beta"), "runs/x", Access::Read),
            Ok(())
        );
        assert_eq!(
            tokens.authorize(Some("beta"), "runs/x", Access::Write),
            Err(Denied::Forbidden)
        );
        assert!(BearerTokens::parse("alpha chat/").is_err());
    }
}

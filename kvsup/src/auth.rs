//! Who may use the daemon's API: the admin token and the checks of a
//! request's `Origin`, `Host` and `Authorization` headers. Pure; the HTTP
//! layer maps a [`Refusal`] to its status code.
//!
//! The API can kill nodes and stop the cluster, so every route but
//! `/health` and the dashboard's page (its HTML, script and style, which
//! hold no data: the page fetches the data with the token) needs the token. A web page cannot send an `Authorization`
//! header to another origin without a CORS preflight, which kvsup never
//! answers; the `Origin` check also refuses the "simple" requests a page
//! may send without one, and the `Host` check refuses a page whose own
//! name was rebound to 127.0.0.1 (DNS rebinding).

use std::fmt;

/// The secret the daemon makes once per state dir: 32 random bytes.
/// `Debug` does not show it, so it cannot reach a log by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken([u8; AdminToken::LEN]);

impl AdminToken {
    pub const LEN: usize = 32;

    pub fn from_bytes(bytes: [u8; AdminToken::LEN]) -> AdminToken {
        AdminToken(bytes)
    }

    /// The token as it is written to its file and sent: 64 lowercase hex
    /// digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`AdminToken::to_hex`]'s form (surrounding whitespace, such as
    /// the file's newline, is ignored).
    pub fn parse_hex(text: &str) -> Option<AdminToken> {
        let text = text.trim();
        if text.len() != 2 * AdminToken::LEN || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; AdminToken::LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(AdminToken(out))
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

/// Why a request is refused, in the order the checks run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// An `Origin` other than the daemon's own (a web page's request).
    OriginNotAllowed,
    /// No `Host`, several, or one that names neither 127.0.0.1 nor
    /// localhost with the daemon's port.
    HostNotAllowed,
    /// No `Authorization: Bearer` header.
    TokenRequired,
    /// A bearer token that is not the admin token.
    TokenInvalid,
}

impl Refusal {
    /// The `code` of the JSON error body.
    pub fn code(self) -> &'static str {
        match self {
            Refusal::OriginNotAllowed => "origin_not_allowed",
            Refusal::HostNotAllowed => "host_not_allowed",
            Refusal::TokenRequired => "token_required",
            Refusal::TokenInvalid => "token_invalid",
        }
    }

    pub fn message(self, port: u16) -> String {
        match self {
            Refusal::OriginNotAllowed => format!(
                "requests from web pages are refused: the only origin allowed is http://127.0.0.1:{port}"
            ),
            Refusal::HostNotAllowed => {
                format!("Host must be 127.0.0.1:{port} or localhost:{port}")
            }
            Refusal::TokenRequired => {
                "send Authorization: Bearer <the token in <stateDir>/admin.token>".into()
            }
            Refusal::TokenInvalid => {
                "the bearer token is not this supervisor's admin token".into()
            }
        }
    }
}

/// The parts of a request the checks read; each header with every value
/// it was sent with (a repeated header is not silently reduced to one).
#[derive(Debug, Default)]
pub struct Head<'a> {
    pub path: &'a str,
    pub origin: Vec<&'a [u8]>,
    /// The `Host` header's values, and the authority of an absolute-form
    /// request target if there is one.
    pub host: Vec<&'a [u8]>,
    pub authorization: Vec<&'a [u8]>,
}

/// What a request must match: the daemon's port (its address is always
/// 127.0.0.1) and its token.
#[derive(Debug, Clone)]
pub struct Guard {
    port: u16,
    /// `Bearer`'s credentials as sent: the token's hex form.
    expected: String,
}

/// The one route open without the token: a liveness probe that reveals
/// nothing and changes nothing.
pub const OPEN_PATH: &str = "/health";

/// The dashboard's static files, open too: they are the same for everyone
/// and hold no data. The script they load sends the token itself.
pub const PAGE_PATHS: &[&str] = &["/", "/dashboard.js", "/dashboard.css"];

impl Guard {
    pub fn new(port: u16, token: &AdminToken) -> Guard {
        Guard {
            port,
            expected: token.to_hex(),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Origin first (a page's request is refused before anything else is
    /// looked at), then Host, then the token.
    pub fn check(&self, head: &Head<'_>) -> Result<(), Refusal> {
        let own_origin = format!("http://127.0.0.1:{}", self.port);
        if !head.origin.iter().all(|o| *o == own_origin.as_bytes()) || head.origin.len() > 1 {
            return Err(Refusal::OriginNotAllowed);
        }
        if head.host.is_empty() || !head.host.iter().all(|h| self.host_allowed(h)) {
            return Err(Refusal::HostNotAllowed);
        }
        if head.path == OPEN_PATH || PAGE_PATHS.contains(&head.path) {
            return Ok(());
        }
        match head.authorization.as_slice() {
            [] => Err(Refusal::TokenRequired),
            [one] => match bearer(one) {
                None => Err(Refusal::TokenRequired),
                Some(sent) if constant_time_eq(sent, self.expected.as_bytes()) => Ok(()),
                Some(_) => Err(Refusal::TokenInvalid),
            },
            _ => Err(Refusal::TokenInvalid),
        }
    }

    fn host_allowed(&self, host: &[u8]) -> bool {
        let Ok(host) = std::str::from_utf8(host) else {
            return false;
        };
        let Some((name, port)) = host.rsplit_once(':') else {
            return false;
        };
        port == self.port.to_string()
            && (name == "127.0.0.1" || name.eq_ignore_ascii_case("localhost"))
    }
}

/// The credentials of an `Authorization: Bearer <credentials>` value (the
/// scheme is case-insensitive, RFC 7235); `None` for another scheme.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|b| *b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    Some(rest.trim_ascii())
}

/// Equality whose time depends only on the lengths, not on where the first
/// difference is, so the answer's timing does not reveal a token's prefix.
/// (The length of a valid token is public: 64.)
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: u16 = 8700;

    fn token() -> AdminToken {
        AdminToken::from_bytes([7; AdminToken::LEN])
    }

    fn guard() -> Guard {
        Guard::new(PORT, &token())
    }

    fn bearer_of(t: &AdminToken) -> String {
        format!("Bearer {}", t.to_hex())
    }

    /// A request as the kvsup command sends it, with `auth` as its
    /// Authorization header.
    fn head<'a>(path: &'a str, auth: &'a str) -> Head<'a> {
        Head {
            path,
            origin: vec![],
            host: vec![b"127.0.0.1:8700"],
            authorization: if auth.is_empty() {
                vec![]
            } else {
                vec![auth.as_bytes()]
            },
        }
    }

    #[test]
    fn the_hex_form_round_trips_and_debug_hides_the_token() {
        let t = AdminToken::from_bytes(std::array::from_fn(|i| i as u8 * 8));
        let hex = t.to_hex();
        assert_eq!(hex.len(), 64);
        assert_eq!(AdminToken::parse_hex(&format!("{hex}\n")), Some(t.clone()));
        assert_eq!(format!("{t:?}"), "AdminToken(..)");
        for bad in [
            "",
            "00",
            &hex[1..],
            &format!("{hex}0"),
            &hex.replace('0', "g"),
        ] {
            assert_eq!(AdminToken::parse_hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_right_token_passes_on_every_route() {
        let auth = bearer_of(&token());
        for path in ["/v1/status", "/v1/down", "/metrics", "/no/such/route"] {
            assert_eq!(guard().check(&head(path, &auth)), Ok(()), "{path}");
        }
        let lower = auth.replace("Bearer", "bearer");
        assert_eq!(guard().check(&head("/v1/kill", &lower)), Ok(()));
    }

    #[test]
    fn a_missing_or_wrong_token_is_refused_except_on_health() {
        let other = bearer_of(&AdminToken::from_bytes([8; AdminToken::LEN]));
        let hex = token().to_hex();
        let cases = [
            ("", Refusal::TokenRequired),
            (hex.as_str(), Refusal::TokenRequired),
            ("Basic dXNlcjpwYXNz", Refusal::TokenRequired),
            (other.as_str(), Refusal::TokenInvalid),
            ("Bearer ", Refusal::TokenInvalid),
        ];
        for (auth, want) in cases {
            assert_eq!(
                guard().check(&head("/v1/down", auth)),
                Err(want),
                "{auth:?}"
            );
            assert_eq!(guard().check(&head("/health", auth)), Ok(()), "{auth:?}");
        }
        let right = bearer_of(&token());
        let mut twice = head("/v1/down", &right);
        twice.authorization.push(other.as_bytes());
        assert_eq!(guard().check(&twice), Err(Refusal::TokenInvalid));
    }

    #[test]
    fn only_the_page_files_are_open_besides_health_and_nothing_under_them() {
        for path in ["/", "/dashboard.js", "/dashboard.css"] {
            assert_eq!(guard().check(&head(path, "")), Ok(()), "{path}");
        }
        for path in [
            "/v1/samples",
            "/dashboard.js/x",
            "/dashboard",
            "//",
            "/index.html",
            "",
        ] {
            assert_eq!(
                guard().check(&head(path, "")),
                Err(Refusal::TokenRequired),
                "{path}"
            );
        }
        // The page's own origin is let in; any other is refused, even on
        // the page's paths.
        let auth = bearer_of(&token());
        let mut own = head("/v1/samples", &auth);
        own.origin = vec![b"http://127.0.0.1:8700"];
        assert_eq!(guard().check(&own), Ok(()));
        let mut foreign = head("/", "");
        foreign.origin = vec![b"http://127.0.0.1:9000"];
        assert_eq!(guard().check(&foreign), Err(Refusal::OriginNotAllowed));
    }

    #[test]
    fn a_foreign_origin_is_refused_first_even_with_the_token() {
        let auth = bearer_of(&token());
        for origin in [
            &b"http://evil.example"[..],
            b"null",
            b"http://localhost:8700",
            b"http://127.0.0.1:8701",
            b"https://127.0.0.1:8700",
        ] {
            for path in ["/v1/down", "/health"] {
                let mut h = head(path, &auth);
                h.origin = vec![origin];
                h.host = vec![b"evil.example"];
                assert_eq!(
                    guard().check(&h),
                    Err(Refusal::OriginNotAllowed),
                    "{}",
                    String::from_utf8_lossy(origin)
                );
            }
        }
        let mut own = head("/v1/down", &auth);
        own.origin = vec![b"http://127.0.0.1:8700"];
        assert_eq!(guard().check(&own), Ok(()));
        own.origin.push(b"http://evil.example");
        assert_eq!(guard().check(&own), Err(Refusal::OriginNotAllowed));
    }

    #[test]
    fn the_host_must_be_loopback_with_the_port() {
        let auth = bearer_of(&token());
        for ok in [&b"127.0.0.1:8700"[..], b"localhost:8700", b"LocalHost:8700"] {
            let mut h = head("/v1/status", &auth);
            h.host = vec![ok];
            assert_eq!(guard().check(&h), Ok(()));
        }
        for bad in [
            &b"evil.example:8700"[..],
            b"127.0.0.1",
            b"127.0.0.1:8701",
            b"localhost",
            b"127.0.0.2:8700",
            b"[::1]:8700",
            b"\xff:8700",
        ] {
            for path in ["/v1/status", "/health"] {
                let mut h = head(path, &auth);
                h.host = vec![bad];
                assert_eq!(
                    guard().check(&h),
                    Err(Refusal::HostNotAllowed),
                    "{}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
        let mut none = head("/v1/status", &auth);
        none.host.clear();
        assert_eq!(guard().check(&none), Err(Refusal::HostNotAllowed));
        let mut two = head("/v1/status", &auth);
        two.host.push(b"evil.example:8700");
        assert_eq!(guard().check(&two), Err(Refusal::HostNotAllowed));
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}

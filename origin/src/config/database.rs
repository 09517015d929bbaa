//! `DATABASE_URL`: which storage backend origin runs on.

/// The storage a `DATABASE_URL` selects, by its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite:`: a file beside origin (or `sqlite::memory:`), the default.
    Sqlite,
    /// `postgres:` or `postgresql:`: a PostgreSQL server, which several origins can share.
    Postgres,
}

impl Backend {
    /// The backend `url` selects.
    ///
    /// ```
    /// use latchkey_origin::config::Backend;
    /// assert_eq!(Backend::of("sqlite://data/latchkey.db"), Ok(Backend::Sqlite));
    /// assert_eq!(Backend::of("postgres://origin@db/latchkey"), Ok(Backend::Postgres));
    /// assert_eq!(Backend::of("postgresql://db/latchkey"), Ok(Backend::Postgres));
    /// assert!(Backend::of("mysql://db").is_err());
    /// ```
    pub fn of(url: &str) -> Result<Self, &'static str> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres)
        } else {
            Err("must start with sqlite: or postgres:// (for example sqlite://data/latchkey.db)")
        }
    }
}

/// A `DATABASE_URL`, which may hold a password: its `Debug` is [`redacted`], so a
/// configuration printed whole never shows it, and it has no `Display`.
///
/// ```
/// use latchkey_origin::config::DatabaseUrl;
/// let url = DatabaseUrl::from("postgres://origin:s3cret@db/keys".to_owned());
/// assert_eq!(format!("{url:?}"), "\"postgres://origin:***@db/keys\"");
/// assert_eq!(url.as_str(), "postgres://origin:s3cret@db/keys");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL itself, password included: to open the database, never to print.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URL as it may be logged or printed.
    pub fn redacted(&self) -> String {
        redacted(&self.0)
    }
}

impl From<String> for DatabaseUrl {
    fn from(url: String) -> Self {
        Self(url)
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.redacted(), f)
    }
}

/// `url` as it may be logged or printed: without a password, in the user part or as a
/// `password=` option.
///
/// ```
/// use latchkey_origin::config::redacted;
/// assert_eq!(
///     redacted("postgres://origin:s3cret@db:5432/keys?sslmode=verify-full"),
///     "postgres://origin:***@db:5432/keys?sslmode=verify-full"
/// );
/// assert_eq!(
///     redacted("postgres://db/keys?user=origin&password=s3cret"),
///     "postgres://db/keys?user=origin&password=***"
/// );
/// assert_eq!(redacted("sqlite://data/latchkey.db"), "sqlite://data/latchkey.db");
/// ```
pub fn redacted(url: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &base[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &base[..scheme + 3], &base[at..]),
                None => base.to_owned(),
            }
        }
        _ => base.to_owned(),
    };
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => format!("{name}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

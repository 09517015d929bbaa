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

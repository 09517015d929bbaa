//! `DATABASE_URL`: which storage backend origin runs on.

/// The storage a `DATABASE_URL` selects, by its scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite:`: a file beside origin (or `sqlite::memory:`), the default.
    Sqlite,
}

impl Backend {
    /// The backend `url` selects.
    ///
    /// ```
    /// use latchkey_origin::config::Backend;
    /// assert_eq!(Backend::of("sqlite://data/latchkey.db"), Ok(Backend::Sqlite));
    /// assert!(Backend::of("mysql://db").is_err());
    /// ```
    pub fn of(url: &str) -> Result<Self, &'static str> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite)
        } else {
            Err("must start with sqlite: (for example sqlite://data/latchkey.db)")
        }
    }
}

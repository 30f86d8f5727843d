//! Who is calling: identities travel in certificates as a URI SAN
//! `spiffe://<project>/<role>/<name>`, never in message fields.

use std::fmt;

/// What a certificate's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A hospital's agent: trains and pushes updates through the Federation service.
    Site,
    /// A researcher: starts and watches runs through the Admin service.
    Admin,
    /// The coordinator's server certificate.
    Coordinator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Admin => "admin",
            Role::Coordinator => "coordinator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub project: String,
    pub role: Role,
    pub name: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error(
        "`{0}` is not a valid name: use 1 to 64 characters from a-z, A-Z, 0-9, '-', '_' and '.'"
    )]
    InvalidName(String),
    #[error(
        "`{0}` is not an Alveolus identity URI (expected spiffe://PROJECT/site|admin|coordinator/NAME)"
    )]
    InvalidUri(String),
}

/// Checks a project, site or admin name: it ends up in URIs, file names and logs.
pub fn validate_name(name: &str) -> Result<(), IdentityError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::InvalidName(name.to_string()))
    }
}

impl Identity {
    pub fn new(project: &str, role: Role, name: &str) -> Result<Self, IdentityError> {
        validate_name(project)?;
        validate_name(name)?;
        Ok(Self {
            project: project.to_string(),
            role,
            name: name.to_string(),
        })
    }

    pub fn uri(&self) -> String {
        format!("spiffe://{}/{}/{}", self.project, self.role, self.name)
    }

    pub fn parse_uri(uri: &str) -> Result<Self, IdentityError> {
        let invalid = || IdentityError::InvalidUri(uri.to_string());
        let rest = uri.strip_prefix("spiffe://").ok_or_else(invalid)?;
        let mut parts = rest.split('/');
        let (Some(project), Some(role), Some(name), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let role = match role {
            "site" => Role::Site,
            "admin" => Role::Admin,
            "coordinator" => Role::Coordinator,
            _ => return Err(invalid()),
        };
        Identity::new(project, role, name).map_err(|_| invalid())
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_round_trips() {
        let id = Identity::new("lungs", Role::Site, "hospital-a").unwrap();
        assert_eq!(id.uri(), "spiffe://lungs/site/hospital-a");
        assert_eq!(Identity::parse_uri(&id.uri()).unwrap(), id);
    }

    #[test]
    fn malformed_uris_are_refused() {
        for uri in [
            "https://lungs/site/a",
            "spiffe://lungs/site",
            "spiffe://lungs/nurse/a",
            "spiffe://lungs/site/a/b",
            "spiffe://lungs/site/../x",
            "spiffe:///site/a",
        ] {
            assert!(Identity::parse_uri(uri).is_err(), "{uri}");
        }
    }
}

//! Per-identity limits on calls that hold the coordinator's resources while they wait or
//! stream (long polls, model downloads, uploads): an agent needs one or two at a time, so a site that
//! opens hundreds is refused beyond that instead of holding a waiter or a download each.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::CoordinatorError;

/// How many of one kind of call each identity may have open at once.
#[derive(Clone)]
pub struct PerIdentity {
    /// What the calls are, for the refusal's message.
    what: &'static str,
    limit: usize,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// One open call, counted until dropped.
pub struct Held {
    open: Arc<Mutex<HashMap<String, usize>>>,
    who: String,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut open = self.open.lock().expect("limit lock");
        if let Some(count) = open.get_mut(&self.who) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.who);
            }
        }
    }
}

impl PerIdentity {
    pub fn new(what: &'static str, limit: usize) -> Self {
        Self {
            what,
            limit,
            open: Arc::default(),
        }
    }

    /// Counts a call of `who`, refused if it already has `limit` open.
    pub fn take(&self, who: &str) -> Result<Held, CoordinatorError> {
        let mut open = self.open.lock().expect("limit lock");
        let count = open.entry(who.to_string()).or_default();
        if *count >= self.limit {
            return Err(CoordinatorError::TooMany {
                what: self.what,
                limit: self.limit,
            });
        }
        *count += 1;
        Ok(Held {
            open: self.open.clone(),
            who: who.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_identity_has_its_own_count_and_closing_frees_one() {
        let polls = PerIdentity::new("long polls", 2);
        let a1 = polls.take("site/a").unwrap();
        let _a2 = polls.take("site/a").unwrap();
        assert!(polls.take("site/a").is_err());
        let _b = polls.take("site/b").unwrap();
        drop(a1);
        assert!(polls.take("site/a").is_ok());
    }
}

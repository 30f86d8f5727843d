//! Who may stream an update in, and for how long. Each upload holds a model-sized buffer, so
//! they are few (`upload_slots`); one site holds at most one of them, and neither the wait for
//! a slot nor the upload outlasts the round it is for by more than a grace period, so that a
//! site that opens uploads and stalls costs others nothing beyond one slot for a while.

use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use super::Coordinator;
use crate::clock::{self, Instant};
use crate::error::CoordinatorError;
use crate::limits::Held;

/// The longest an upload may take, whatever the round's deadline.
pub const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// Past the round's deadline (a round that has not reached its quorum still takes updates),
/// how long a site may still wait for a slot.
const SLOT_GRACE: Duration = Duration::from_secs(5);

/// Past the round's deadline, how long an upload that has its slot may still take.
const UPLOAD_GRACE: Duration = Duration::from_secs(60);

/// An update being received: one upload slot and this site's one upload in flight, both given
/// back when it is dropped.
pub struct Upload {
    _slot: OwnedSemaphorePermit,
    _site: Held,
    /// When the upload must be complete.
    pub until: Instant,
}

/// How long an initial model's upload (StartRun) may wait for a slot.
const START_SLOT_WAIT: Duration = Duration::from_secs(30);

impl Coordinator {
    /// A slot to receive `site`'s update for the open round in. Refused at once if the site
    /// already has an upload streaming; waits for a slot until the round's deadline (or a short
    /// grace after it).
    pub async fn upload_slot(&self, site: &str) -> Result<Upload, CoordinatorError> {
        let (round, deadline) = {
            let state = self.lock();
            let open = state.open_round()?;
            (open.round, open.deadline)
        };
        let registered = self.uploading.take(site)?;
        let now = clock::now();
        let slot = self
            .take_slot(deadline.max(now + SLOT_GRACE))
            .await
            .ok_or(CoordinatorError::NoUploadSlot { round })?;
        let now = clock::now();
        Ok(Upload {
            _slot: slot,
            _site: registered,
            until: deadline.max(now + UPLOAD_GRACE).min(now + UPLOAD_TIMEOUT),
        })
    }

    /// A slot to receive an initial model in (StartRun): the same slots as updates, so that
    /// stalled starts cannot hold more memory than uploads may; one per admin at a time.
    pub async fn start_upload(&self, admin: &str) -> Result<Upload, CoordinatorError> {
        let registered = self.uploading.take(&format!("admin/{admin}"))?;
        let slot =
            self.take_slot(clock::now() + START_SLOT_WAIT)
                .await
                .ok_or(CoordinatorError::Busy(
                    "every upload slot stayed busy; try again",
                ))?;
        Ok(Upload {
            _slot: slot,
            _site: registered,
            until: clock::now() + UPLOAD_TIMEOUT,
        })
    }

    async fn take_slot(&self, until: Instant) -> Option<OwnedSemaphorePermit> {
        let slot = tokio::time::timeout_at(until, self.upload_slots.clone().acquire_owned()).await;
        Some(slot.ok()?.expect("the upload semaphore is never closed"))
    }
}

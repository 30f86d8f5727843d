//! A securely aggregated round as the coordinator runs it: phases, who is in each, and the
//! running sum of masked updates. It holds public keys, ciphertexts it cannot open, one masked
//! sum and revealed shares, never one site's update (see `alveolus_privacy::secagg`).
//!
//! Phases close like rounds do: when everyone expected has answered, or when the phase's time
//! is up and enough have. Keys: every live site has sent keys, or the phase window has passed
//! with at least max(threshold, min_sites). Shares: every roster site has shared, or the window
//! has passed with at least the threshold. Masked updates: every sharer has pushed, or the
//! round deadline has passed with at least max(threshold, min_sites). Reveal: every survivor
//! has revealed, or the window has passed with at least the threshold. A phase that times out
//! below the threshold fails the round, and nothing is revealed.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use alveolus_privacy::secagg::{
    self, Envelope, PublicKeys, RevealedShare, Roster, RoundContext, SharesMessage, UnmaskedSum,
    Unmasking,
};
use alveolus_privacy::wire::Reply;

use crate::clock::Instant;
use crate::error::CoordinatorError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Keys,
    Shares,
    Masked,
    Reveal,
}

/// What `advance` found.
#[derive(Debug, PartialEq)]
pub enum Progress {
    Unchanged,
    /// A phase closed; waiting sites can be answered.
    Advanced,
    /// Every reveal needed is in: the round can be unmasked.
    Complete,
    /// The round cannot finish; the reason names the phase and the counts.
    Failed(String),
}

pub struct SecureRound {
    ctx: RoundContext,
    threshold: usize,
    phase: Phase,
    /// How long the keys, shares and reveal phases wait for stragglers.
    window: Duration,
    phase_deadline: Instant,
    /// Every site's keys; from the shares phase on, the roster.
    keys: BTreeMap<String, PublicKeys>,
    /// Ciphertexts waiting for their recipient, by recipient.
    mailboxes: BTreeMap<String, Vec<Envelope>>,
    /// The sharers and their self-mask seed commitments.
    commitments: BTreeMap<String, [u8; 32]>,
    /// Σ of the survivors' masked updates mod 2^64: the only per-round state of model size.
    sum: Vec<u64>,
    survivors: BTreeSet<String>,
    revealed: BTreeMap<String, Vec<RevealedShare>>,
}

fn refuse(message: impl Into<String>) -> CoordinatorError {
    CoordinatorError::SecureAggregation(message.into())
}

impl SecureRound {
    /// A round of a model of `values` values, opened at `now`.
    pub fn new(
        ctx: RoundContext,
        threshold: u32,
        values: usize,
        deadline: Duration,
        now: Instant,
    ) -> Self {
        let window = (deadline / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        Self {
            ctx,
            threshold: threshold as usize,
            phase: Phase::Keys,
            window,
            phase_deadline: now + window,
            keys: BTreeMap::new(),
            mailboxes: BTreeMap::new(),
            commitments: BTreeMap::new(),
            sum: vec![0; secagg::masked_len(values)],
            survivors: BTreeSet::new(),
            revealed: BTreeMap::new(),
        }
    }

    /// Bytes a masked update must have: its words (see `secagg::masked_len`), 8 bytes each.
    pub fn masked_bytes(&self) -> u64 {
        self.sum.len() as u64 * 8
    }

    /// Whether the round still takes keys (and so new sites).
    pub fn collecting_keys(&self) -> bool {
        self.phase == Phase::Keys
    }

    /// Whether `site` may be handed the round's task: only while keys are being collected,
    /// and only once (a reconnected agent with new keys would be refused anyway).
    pub fn takes(&self, site: &str) -> bool {
        self.collecting_keys() && !self.keys.contains_key(site)
    }

    /// The roster: every site that sent keys before the key phase closed.
    fn roster(&self) -> Roster {
        Roster {
            threshold: self.threshold,
            sites: self.keys.clone(),
        }
    }

    /// The Failed outcome of a phase that ended with `got` of `of` sites, below the threshold.
    fn below_threshold(&self, what: &str, got: usize, of: usize) -> Progress {
        Progress::Failed(format!(
            "only {got} of {of} {what}, fewer than the threshold {}; nothing was revealed",
            self.threshold
        ))
    }

    pub fn add_keys(&mut self, site: &str, keys: PublicKeys) -> Result<(), CoordinatorError> {
        if let Some(sent) = self.keys.get(site) {
            // The same request again (after Pending) is fine; other keys are not.
            return if *sent == keys {
                Ok(())
            } else {
                Err(refuse(format!(
                    "site `{site}` already sent other keys for round {}",
                    self.ctx.round
                )))
            };
        }
        if self.phase != Phase::Keys {
            return Err(refuse(format!(
                "the key phase of round {} has closed; `{site}` takes part next round",
                self.ctx.round
            )));
        }
        if self
            .keys
            .values()
            .any(|k| k.cipher == keys.cipher || k.mask == keys.mask)
        {
            return Err(refuse(format!(
                "site `{site}` sent public keys another site already uses"
            )));
        }
        self.keys.insert(site.to_string(), keys);
        Ok(())
    }

    pub fn roster_for(&self, site: &str) -> Option<Result<Roster, CoordinatorError>> {
        if self.collecting_keys() {
            return None;
        }
        Some(if self.keys.contains_key(site) {
            Ok(self.roster())
        } else {
            Err(refuse(format!(
                "site `{site}` is not on round {}'s roster",
                self.ctx.round
            )))
        })
    }

    pub fn add_shares(
        &mut self,
        site: &str,
        message: SharesMessage,
    ) -> Result<(), CoordinatorError> {
        if self.commitments.contains_key(site) {
            return Ok(());
        }
        if self.phase != Phase::Shares {
            return Err(refuse(format!(
                "round {} is not collecting shares",
                self.ctx.round
            )));
        }
        let roster = &self.keys;
        if !roster.contains_key(site) {
            return Err(refuse(format!("site `{site}` is not on the roster")));
        }
        let mut addressed = BTreeSet::new();
        for envelope in &message.envelopes {
            if envelope.from != site {
                return Err(refuse(format!(
                    "site `{site}` sent a share signed as from `{}`",
                    envelope.from
                )));
            }
            if envelope.to == site || !roster.contains_key(&envelope.to) {
                return Err(refuse(format!(
                    "a share from `{site}` is addressed to `{}`, which is not another site on the roster",
                    envelope.to
                )));
            }
            if !addressed.insert(envelope.to.as_str()) {
                return Err(refuse(format!(
                    "site `{site}` sent two shares to `{}`",
                    envelope.to
                )));
            }
        }
        if addressed.len() != roster.len() - 1 {
            return Err(refuse(format!(
                "site `{site}` sent {} shares; the roster needs {}",
                addressed.len(),
                roster.len() - 1
            )));
        }
        for envelope in message.envelopes {
            self.mailboxes
                .entry(envelope.to.clone())
                .or_default()
                .push(envelope);
        }
        self.commitments
            .insert(site.to_string(), message.seed_commitment);
        Ok(())
    }

    pub fn inbox_for(&self, site: &str) -> Option<Result<Reply, CoordinatorError>> {
        if self.phase <= Phase::Shares {
            return None;
        }
        Some(if self.commitments.contains_key(site) {
            Ok(Reply::Inbox {
                sharers: self.commitments.keys().cloned().collect(),
                envelopes: self.mailboxes.get(site).cloned().unwrap_or_default(),
            })
        } else {
            Err(refuse(format!(
                "site `{site}` did not share its keys in time for round {}",
                self.ctx.round
            )))
        })
    }

    /// Whether `site` may push a masked update now.
    pub fn admits_masked(&self, site: &str) -> Result<(), CoordinatorError> {
        if self.phase != Phase::Masked {
            return Err(refuse(format!(
                "round {} is not collecting masked updates",
                self.ctx.round
            )));
        }
        if !self.commitments.contains_key(site) {
            return Err(refuse(format!(
                "site `{site}` did not share its keys this round; its masks could not be removed"
            )));
        }
        if self.survivors.contains(site) {
            return Err(CoordinatorError::AlreadyReported {
                site: site.to_string(),
                round: self.ctx.round,
            });
        }
        Ok(())
    }

    /// Adds a masked update, sent as little-endian words, to the masked sum.
    pub fn add_masked(&mut self, site: &str, bytes: &[u8]) -> Result<(), CoordinatorError> {
        self.admits_masked(site)?;
        secagg::add_masked(&mut self.sum, secagg::words_le(bytes))
            .map_err(|e| refuse(e.to_string()))?;
        self.survivors.insert(site.to_string());
        Ok(())
    }

    pub fn survivors_for(&self, site: &str) -> Option<Result<Vec<String>, CoordinatorError>> {
        if self.phase < Phase::Reveal {
            return None;
        }
        Some(if self.survivors.contains(site) {
            Ok(self.survivors.iter().cloned().collect())
        } else {
            Err(refuse(format!(
                "no masked update of `{site}` is in round {}",
                self.ctx.round
            )))
        })
    }

    pub fn add_reveal(
        &mut self,
        site: &str,
        shares: Vec<RevealedShare>,
    ) -> Result<(), CoordinatorError> {
        if self.revealed.contains_key(site) {
            return Ok(());
        }
        if self.phase != Phase::Reveal || !self.survivors.contains(site) {
            return Err(refuse(format!(
                "round {} is not asking `{site}` to reveal shares",
                self.ctx.round
            )));
        }
        self.revealed.insert(site.to_string(), shares);
        Ok(())
    }

    /// Moves through every phase that can close at `now`.
    pub fn advance(
        &mut self,
        now: Instant,
        round_deadline: Instant,
        min_sites: usize,
        live_sites: &BTreeSet<String>,
    ) -> Progress {
        let quorum = self.threshold.max(min_sites);
        let mut progress = Progress::Unchanged;
        loop {
            let timed_out = now >= self.phase_deadline;
            match self.phase {
                Phase::Keys => {
                    let all_live = live_sites.iter().all(|s| self.keys.contains_key(s));
                    if self.keys.len() < quorum || !(all_live || timed_out) {
                        return progress;
                    }
                    if self.keys.len() > secagg::MAX_SITES {
                        return Progress::Failed(format!(
                            "{} sites sent keys; secure aggregation takes at most {}",
                            self.keys.len(),
                            secagg::MAX_SITES
                        ));
                    }
                    self.phase = Phase::Shares;
                    self.phase_deadline = now + self.window;
                }
                Phase::Shares => {
                    let all = self.commitments.len() == self.keys.len();
                    if !(all || timed_out) {
                        return progress;
                    }
                    if self.commitments.len() < self.threshold {
                        return self.below_threshold(
                            "sites shared their keys",
                            self.commitments.len(),
                            self.keys.len(),
                        );
                    }
                    self.phase = Phase::Masked;
                }
                Phase::Masked => {
                    let (survivors, sharers) = (self.survivors.len(), self.commitments.len());
                    if survivors == sharers {
                        if survivors < quorum {
                            // Everyone who could report has, and it is not enough.
                            return Progress::Failed(format!(
                                "only {survivors} sites sent a masked update; the round needs {quorum}"
                            ));
                        }
                    } else if now < round_deadline || survivors < quorum {
                        if now >= round_deadline && survivors < self.threshold {
                            return self.below_threshold(
                                "sites sent a masked update",
                                survivors,
                                sharers,
                            );
                        }
                        return progress;
                    }
                    self.phase = Phase::Reveal;
                    self.phase_deadline = now + self.window;
                }
                Phase::Reveal => {
                    let all = self.revealed.len() == self.survivors.len();
                    if all || (timed_out && self.revealed.len() >= self.threshold) {
                        return Progress::Complete;
                    }
                    if timed_out {
                        return self.below_threshold(
                            "surviving sites revealed their shares",
                            self.revealed.len(),
                            self.survivors.len(),
                        );
                    }
                    return progress;
                }
            }
            progress = Progress::Advanced;
        }
    }

    /// The sum of the survivors' updates, weights and weighted metrics.
    pub fn unmask(&self) -> Result<UnmaskedSum, CoordinatorError> {
        let roster = self.roster();
        let mut sum = self.sum.clone();
        Unmasking {
            ctx: &self.ctx,
            roster: &roster,
            commitments: &self.commitments,
            survivors: &self.survivors,
            revealed: &self.revealed,
        }
        .unmask(&mut sum)
        .map_err(|e| refuse(format!("unmasking failed: {e}")))?;
        Ok(secagg::dequantize_update(&sum))
    }

    pub fn survivors(&self) -> &BTreeSet<String> {
        &self.survivors
    }
}

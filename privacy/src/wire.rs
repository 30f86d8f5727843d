//! Secure-aggregation messages: `pb` types converted to the protocol's own at the edge, with
//! every length checked, so that nothing malformed reaches `secagg`.

use alveolus_proto::domain::DomainError;
use alveolus_proto::pb;
use bytes::Bytes;

use crate::secagg::{Envelope, PublicKeys, RevealedShare, Roster, SecretKind, SharesMessage};

/// Ciphertexts of larger size than two 33-byte shares plus the AEAD tag are refused unread.
const MAX_CIPHERTEXT: usize = 2 * 33 + 16;
const MAX_SHARE: usize = 33;

/// What a site asks for in one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Keys(PublicKeys),
    Shares(SharesMessage),
    AwaitSurvivors,
    Reveal(Vec<RevealedShare>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub run_id: String,
    pub round: u32,
    pub wait_seconds: u32,
    pub step: Step,
}

/// The coordinator's answer to a step.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// The phase has not closed yet: ask again.
    Pending,
    Roster(Roster),
    Inbox {
        sharers: Vec<String>,
        envelopes: Vec<Envelope>,
    },
    Survivors(Vec<String>),
    Revealed,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> DomainError {
    DomainError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn key(field: &'static str, bytes: &[u8]) -> Result<[u8; 32], DomainError> {
    bytes.try_into().map_err(|_| {
        invalid(
            field,
            format!("{} bytes, an X25519 key has 32", bytes.len()),
        )
    })
}

fn keys_from(cipher: &[u8], mask: &[u8]) -> Result<PublicKeys, DomainError> {
    Ok(PublicKeys {
        cipher: key("cipher_public_key", cipher)?,
        mask: key("mask_public_key", mask)?,
    })
}

fn envelope_to_pb(e: Envelope) -> pb::SecAggEnvelope {
    pb::SecAggEnvelope {
        from: e.from,
        to: e.to,
        ciphertext: e.ciphertext.into(),
    }
}

fn envelope_from_pb(e: pb::SecAggEnvelope) -> Result<Envelope, DomainError> {
    if e.ciphertext.len() > MAX_CIPHERTEXT {
        return Err(invalid(
            "envelope.ciphertext",
            format!(
                "{} bytes, a share takes {MAX_CIPHERTEXT}",
                e.ciphertext.len()
            ),
        ));
    }
    Ok(Envelope {
        from: e.from,
        to: e.to,
        ciphertext: e.ciphertext.to_vec(),
    })
}

impl From<Request> for pb::SecAggRequest {
    fn from(r: Request) -> Self {
        use pb::sec_agg_request::Step as S;
        let step = match r.step {
            Step::Keys(k) => S::Keys(pb::SecAggKeys {
                cipher_public_key: Bytes::copy_from_slice(&k.cipher),
                mask_public_key: Bytes::copy_from_slice(&k.mask),
            }),
            Step::Shares(m) => S::Shares(pb::SecAggShares {
                envelopes: m.envelopes.into_iter().map(envelope_to_pb).collect(),
                seed_commitment: Bytes::copy_from_slice(&m.seed_commitment),
            }),
            Step::AwaitSurvivors => S::AwaitSurvivors(pb::SecAggAwaitSurvivors {}),
            Step::Reveal(shares) => S::Reveal(pb::SecAggReveal {
                shares: shares
                    .into_iter()
                    .map(|s| pb::SecAggRevealedShare {
                        owner: s.owner,
                        mask_key: s.kind == SecretKind::MaskKey,
                        share: s.share.into(),
                    })
                    .collect(),
            }),
        };
        Self {
            run_id: r.run_id,
            round: r.round,
            wait_seconds: r.wait_seconds,
            step: Some(step),
        }
    }
}

impl TryFrom<pb::SecAggRequest> for Request {
    type Error = DomainError;
    fn try_from(r: pb::SecAggRequest) -> Result<Self, DomainError> {
        use pb::sec_agg_request::Step as S;
        let step = match r.step.ok_or(DomainError::Missing("step"))? {
            S::Keys(k) => Step::Keys(keys_from(&k.cipher_public_key, &k.mask_public_key)?),
            S::Shares(m) => Step::Shares(SharesMessage {
                envelopes: m
                    .envelopes
                    .into_iter()
                    .map(envelope_from_pb)
                    .collect::<Result<_, _>>()?,
                seed_commitment: key("seed_commitment", &m.seed_commitment)?,
            }),
            S::AwaitSurvivors(_) => Step::AwaitSurvivors,
            S::Reveal(r) => Step::Reveal(
                r.shares
                    .into_iter()
                    .map(|s| {
                        if s.share.len() != MAX_SHARE {
                            return Err(invalid(
                                "reveal.share",
                                format!("{} bytes, a share has {MAX_SHARE}", s.share.len()),
                            ));
                        }
                        Ok(RevealedShare {
                            owner: s.owner,
                            kind: if s.mask_key {
                                SecretKind::MaskKey
                            } else {
                                SecretKind::SelfMaskSeed
                            },
                            share: s.share.to_vec(),
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(Self {
            run_id: r.run_id,
            round: r.round,
            wait_seconds: r.wait_seconds,
            step,
        })
    }
}

impl From<Reply> for pb::SecAggReply {
    fn from(r: Reply) -> Self {
        use pb::sec_agg_reply::Step as S;
        let step = match r {
            Reply::Pending => S::Pending(pb::Wait { retry_after_ms: 0 }),
            Reply::Roster(roster) => S::Roster(pb::SecAggRoster {
                threshold: roster.threshold as u32,
                sites: roster
                    .sites
                    .into_iter()
                    .map(|(site, k)| pb::SecAggSiteKeys {
                        site,
                        cipher_public_key: Bytes::copy_from_slice(&k.cipher),
                        mask_public_key: Bytes::copy_from_slice(&k.mask),
                    })
                    .collect(),
            }),
            Reply::Inbox { sharers, envelopes } => S::Inbox(pb::SecAggInbox {
                sharers,
                envelopes: envelopes.into_iter().map(envelope_to_pb).collect(),
            }),
            Reply::Survivors(sites) => S::Survivors(pb::SecAggSurvivors { sites }),
            Reply::Revealed => S::Revealed(pb::SecAggRevealed {}),
        };
        Self { step: Some(step) }
    }
}

impl TryFrom<pb::SecAggReply> for Reply {
    type Error = DomainError;
    fn try_from(r: pb::SecAggReply) -> Result<Self, DomainError> {
        use pb::sec_agg_reply::Step as S;
        Ok(match r.step.ok_or(DomainError::Missing("step"))? {
            S::Pending(_) => Reply::Pending,
            S::Roster(roster) => {
                let mut sites = std::collections::BTreeMap::new();
                for s in roster.sites {
                    let keys = keys_from(&s.cipher_public_key, &s.mask_public_key)?;
                    if sites.insert(s.site.clone(), keys).is_some() {
                        return Err(invalid("roster", format!("`{}` is listed twice", s.site)));
                    }
                }
                Reply::Roster(Roster {
                    threshold: roster.threshold as usize,
                    sites,
                })
            }
            S::Inbox(inbox) => Reply::Inbox {
                sharers: inbox.sharers,
                envelopes: inbox
                    .envelopes
                    .into_iter()
                    .map(envelope_from_pb)
                    .collect::<Result<_, _>>()?,
            },
            S::Survivors(s) => Reply::Survivors(s.sites),
            S::Revealed(_) => Reply::Revealed,
        })
    }
}

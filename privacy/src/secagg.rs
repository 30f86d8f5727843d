//! Secure aggregation after Bonawitz et al., "Practical Secure Aggregation for
//! Privacy-Preserving Machine Learning" (CCS 2017), for a coordinator that follows the protocol
//! but would like to learn what it can (semi-honest). The coordinator relays everything and
//! learns only the sum of the surviving sites' updates.
//!
//! One round, as the coordinator drives it (every key is fresh per round):
//! 1. Keys: each site sends two X25519 public keys, one to agree share-encryption keys and one
//!    to agree mask keys. The coordinator sends the roster (every site's keys) back.
//! 2. Shares: each site draws a self-mask seed, Shamir-splits its mask secret key and the seed
//!    (threshold t) into one share per roster site, and encrypts each share to its recipient
//!    with ChaCha20-Poly1305 under a key agreed with the recipient; the coordinator relays the
//!    ciphertexts, which it cannot read. The sites that shared are the `sharers`.
//! 3. Masked input: each sharer quantizes its update to Z_2^64, adds a ChaCha20 stream keyed
//!    by its self-mask seed, and for every other sharer adds (lower name) or subtracts (higher
//!    name) a ChaCha20 stream keyed by their agreed mask key. The pairwise streams cancel in
//!    the sum; the self masks do not. The sites whose masked update arrived are `survivors`.
//! 4. Unmasking: each survivor reveals, for every sharer, either its share of the self-mask
//!    seed (sharer survived) or its share of the mask secret key (sharer dropped), never both.
//!    With t shares the coordinator removes the survivors' self masks and the dropped sites'
//!    pairwise masks, and is left with the sum.
//!
//! Keys are always 256 bits: X25519 agreement, HKDF-SHA256 to 32-byte ChaCha20 keys bound to
//! the run, the round and both names; no seed is shortened. A site that drops after sending its
//! masked update is counted (its seed is rebuilt); one that drops before is left out (its
//! pairwise masks are rebuilt from its key). Fewer than t survivors: nothing can be, or is,
//! revealed.
//!
//! Fixed point: each value is clipped to ±[`VALUE_RANGE`] and rounded to [`FRACTION_BITS`]
//! fractional bits, then multiplied by the site's integer weight (its sample count, or 1 under
//! differential privacy); the weight is the last word, masked like the rest. The sum needs
//! 1 (sign) + 4 (range) + 24 (fraction) + log2(Σ weights) bits, so Σ weights ≤ 2^35 keeps it
//! within the 64-bit word ([`MAX_TOTAL_WEIGHT`]); each site checks its share of that bound.

use std::collections::{BTreeMap, BTreeSet};

use alveolus_proto::domain::Metrics;
use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use hkdf::Hkdf;
use rand::RngCore;
use sha2::{Digest, Sha256};
use vsss_rs::Gf256;
use x25519_dalek::{PublicKey, StaticSecret};

/// Fractional bits of the fixed-point encoding: rounding error at most 2^-25 per value.
pub const FRACTION_BITS: u32 = 24;
/// Largest magnitude a value may have; larger ones are clipped (and counted).
pub const VALUE_RANGE: f64 = 16.0;
/// Bound on the sum of all sites' weights that keeps the masked sum within 64 bits.
pub const MAX_TOTAL_WEIGHT: u64 = 1 << 35;
/// Shamir shares over GF(256) are numbered 1..=255.
pub const MAX_SITES: usize = 255;

const SCALE: f64 = (1u64 << FRACTION_BITS) as f64;
/// A Shamir share: its number, then one byte per secret byte.
const SHARE_LEN: usize = 33;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecAggError {
    #[error("the roster does not hold this site (`{0}`) with the keys it sent")]
    NotInRoster(String),
    #[error("the roster lists `{0}` twice")]
    DuplicateSite(String),
    #[error("the roster has {sites} sites; secure aggregation takes {min} to {MAX_SITES}")]
    RosterSize { sites: usize, min: usize },
    #[error("threshold {threshold} must be at least 2 and at most the roster's {sites} sites")]
    Threshold { threshold: usize, sites: usize },
    #[error("site `{0}` is not on this round's roster")]
    UnknownSite(String),
    #[error("the share from `{from}` could not be opened: {reason}")]
    Share { from: String, reason: String },
    #[error("no share arrived from `{0}`, which the coordinator lists as a sharer")]
    MissingShare(String),
    #[error(
        "only {survivors} sites survived to unmasking, fewer than the threshold {threshold}: nothing is revealed"
    )]
    TooFewSurvivors { survivors: usize, threshold: usize },
    #[error("{0}")]
    Protocol(String),
    #[error("the rebuilt {what} of `{site}` does not match what it committed to: a bad share")]
    Reconstruction { site: String, what: &'static str },
    #[error(
        "weight {weight} with {sites} sites could overflow the 64-bit sum (at most {MAX_TOTAL_WEIGHT} in all)"
    )]
    WeightOverflow { weight: u64, sites: usize },
    #[error("a masked update has {got} words, this model needs {expected}")]
    Length { got: usize, expected: usize },
}

/// The run and round every key and ciphertext is bound to: nothing carries over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundContext {
    pub run_id: String,
    pub round: u32,
}

impl RoundContext {
    /// Length-prefixed labels, so that no two different inputs give the same bytes.
    fn info(&self, purpose: &str, names: &[&str]) -> Vec<u8> {
        let mut info = b"alveolus secagg v1".to_vec();
        for part in [purpose, self.run_id.as_str()]
            .into_iter()
            .chain(names.iter().copied())
        {
            info.extend_from_slice(&(part.len() as u32).to_be_bytes());
            info.extend_from_slice(part.as_bytes());
        }
        info.extend_from_slice(&self.round.to_be_bytes());
        info
    }
}

fn derive_key(ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let mut key = [0u8; 32];
    Hkdf::<Sha256>::new(Some(b"alveolus secagg"), ikm)
        .expand(info, &mut key)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    key
}

fn ordered<'a>(a: &'a str, b: &'a str) -> [&'a str; 2] {
    if a < b { [a, b] } else { [b, a] }
}

/// One site's public keys for a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKeys {
    /// Agrees the keys that encrypt Shamir shares between two sites.
    pub cipher: [u8; 32],
    /// Agrees the pairwise mask keys.
    pub mask: [u8; 32],
}

/// The coordinator's list of who takes part, with their keys, and the threshold.
#[derive(Debug, Clone, PartialEq)]
pub struct Roster {
    pub threshold: usize,
    pub sites: BTreeMap<String, PublicKeys>,
}

impl Roster {
    pub fn check(&self) -> Result<(), SecAggError> {
        let sites = self.sites.len();
        if !(2..=MAX_SITES).contains(&sites) {
            return Err(SecAggError::RosterSize { sites, min: 2 });
        }
        if self.threshold < 2 || self.threshold > sites {
            return Err(SecAggError::Threshold {
                threshold: self.threshold,
                sites,
            });
        }
        Ok(())
    }

    /// The Shamir share number of `site` (1-based position in name order).
    fn share_number(&self, site: &str) -> Result<u8, SecAggError> {
        self.sites
            .keys()
            .position(|s| s == site)
            .map(|i| (i + 1) as u8)
            .ok_or_else(|| SecAggError::UnknownSite(site.to_string()))
    }

    fn keys(&self, site: &str) -> Result<&PublicKeys, SecAggError> {
        self.sites
            .get(site)
            .ok_or_else(|| SecAggError::UnknownSite(site.to_string()))
    }
}

/// A share encrypted from one site to another, relayed by the coordinator.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub from: String,
    pub to: String,
    pub ciphertext: Vec<u8>,
}

/// What a site sends in the shares phase.
#[derive(Debug, Clone, PartialEq)]
pub struct SharesMessage {
    pub envelopes: Vec<Envelope>,
    /// sha256 of the self-mask seed: lets the coordinator check the seed it rebuilds.
    pub seed_commitment: [u8; 32],
}

/// Which of a sharer's two secrets a revealed share belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecretKind {
    /// The self-mask seed of a survivor.
    SelfMaskSeed,
    /// The mask secret key of a site that dropped before its masked update arrived.
    MaskKey,
}

/// One share a survivor reveals in the unmasking phase.
#[derive(Debug, Clone, PartialEq)]
pub struct RevealedShare {
    pub owner: String,
    pub kind: SecretKind,
    pub share: Vec<u8>,
}

/// Adds (or subtracts) the ChaCha20 stream of `key` to `words`, word by word mod 2^64.
fn apply_mask(words: &mut [u64], key: &[u8; 32], subtract: bool) {
    let mut cipher = ChaCha20::new(key.into(), &[0u8; 12].into());
    let mut block = [0u8; 4096];
    for chunk in words.chunks_mut(block.len() / 8) {
        let bytes = &mut block[..chunk.len() * 8];
        bytes.fill(0);
        cipher.apply_keystream(bytes);
        for (word, stream) in chunk.iter_mut().zip(bytes.chunks_exact(8)) {
            let stream = u64::from_le_bytes(stream.try_into().expect("8 bytes"));
            *word = if subtract {
                word.wrapping_sub(stream)
            } else {
                word.wrapping_add(stream)
            };
        }
    }
}

fn self_mask_key(ctx: &RoundContext, site: &str, seed: &[u8; 32]) -> [u8; 32] {
    derive_key(seed, &ctx.info("self mask", &[site]))
}

fn pair_mask_key(
    ctx: &RoundContext,
    secret: &StaticSecret,
    theirs: &[u8; 32],
    a: &str,
    b: &str,
) -> [u8; 32] {
    let shared = secret.diffie_hellman(&PublicKey::from(*theirs));
    derive_key(shared.as_bytes(), &ctx.info("pair mask", &ordered(a, b)))
}

/// Adds site `own`'s pairwise mask with `other`: + when `own` sorts first, − otherwise.
fn apply_pair_mask(words: &mut [u64], key: &[u8; 32], own: &str, other: &str, remove: bool) {
    let adds = own < other;
    apply_mask(words, key, adds == remove);
}

fn share_cipher(
    ctx: &RoundContext,
    secret: &StaticSecret,
    theirs: &[u8; 32],
    a: &str,
    b: &str,
) -> ChaCha20Poly1305 {
    let shared = secret.diffie_hellman(&PublicKey::from(*theirs));
    let key = derive_key(shared.as_bytes(), &ctx.info("share", &ordered(a, b)));
    ChaCha20Poly1305::new(&key.into())
}

/// One message per direction per pair per round: the direction makes the nonce unique.
fn share_nonce(from: &str, to: &str) -> [u8; 12] {
    let mut nonce = [0u8; 12];
    nonce[0] = u8::from(from > to);
    nonce
}

fn share_aad(ctx: &RoundContext, from: &str, to: &str) -> Vec<u8> {
    ctx.info("share aad", &[from, to])
}

/// Fixed-point words of `values` times `weight`, with `weight` as the last word. Returns the
/// words and how many values were clipped to ±[`VALUE_RANGE`].
pub fn quantize(values: impl Iterator<Item = f32>, weight: u64) -> (Vec<u64>, usize) {
    let mut clipped = 0;
    let mut words: Vec<u64> = values
        .map(|v| {
            let v = v as f64;
            if v.abs() > VALUE_RANGE {
                clipped += 1;
            }
            let fixed = (v.clamp(-VALUE_RANGE, VALUE_RANGE) * SCALE).round() as i64;
            fixed.wrapping_mul(weight as i64) as u64
        })
        .collect();
    words.push(weight);
    (words, clipped)
}

/// Words of a masked update for a model of `values` values: the values, then weight × loss,
/// weight × Dice and the weight (see [`quantize_update`]).
pub fn masked_len(values: usize) -> usize {
    values + 3
}

/// A site's update and metrics as the words it masks: the layout both ends agree on.
pub fn quantize_update(
    values: impl Iterator<Item = f32>,
    metrics: Metrics,
    weight: u64,
) -> (Vec<u64>, usize) {
    quantize(
        values.chain([metrics.loss as f32, metrics.dice as f32]),
        weight,
    )
}

/// What an unmasked sum of [`quantize_update`] words says.
#[derive(Debug, Clone, PartialEq)]
pub struct UnmaskedSum {
    /// Σ weight × value, per model value.
    pub values: Vec<f64>,
    /// Σ weight × loss and Σ weight × Dice.
    pub weighted_metrics: Metrics,
    /// Σ weight.
    pub weight: u64,
}

pub fn dequantize_update(sum: &[u64]) -> UnmaskedSum {
    let (mut values, weight) = dequantize(sum);
    let dice = values.pop().expect("a sum has its metric words");
    let loss = values.pop().expect("a sum has its metric words");
    UnmaskedSum {
        values,
        weighted_metrics: Metrics { loss, dice },
        weight,
    }
}

/// The weighted sum of the values (as reals) and the total weight, from an unmasked sum.
pub fn dequantize(sum: &[u64]) -> (Vec<f64>, u64) {
    let (weight, values) = sum.split_last().expect("a sum has its weight word");
    (
        values.iter().map(|&w| w as i64 as f64 / SCALE).collect(),
        *weight,
    )
}

/// A site's side of one round.
pub struct SiteSession {
    ctx: RoundContext,
    site: String,
    cipher_secret: StaticSecret,
    mask_secret: StaticSecret,
    seed: [u8; 32],
    roster: Option<Roster>,
    /// Sites that shared (the coordinator's list, checked against the shares received).
    sharers: BTreeSet<String>,
    /// Shares of other sites' secrets held for them: owner → (mask key share, seed share).
    held: BTreeMap<String, ([u8; SHARE_LEN], [u8; SHARE_LEN])>,
}

fn random_secret(rng: &mut impl RngCore) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    rng.fill_bytes(&mut bytes);
    bytes
}

/// vsss-rs draws polynomial coefficients through rand_core 0.6; feed it from our CSPRNG.
struct CoefficientRng<'a, R: RngCore>(&'a mut R);

impl<R: RngCore> rand_core_06::RngCore for CoefficientRng<'_, R> {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core_06::Error> {
        self.0.fill_bytes(dest);
        Ok(())
    }
}

/// Only ever constructed over a cryptographically secure generator (see `SiteSession::new`).
impl<R: RngCore> rand_core_06::CryptoRng for CoefficientRng<'_, R> {}

fn split(
    secret: &[u8; 32],
    threshold: usize,
    count: usize,
    rng: &mut impl RngCore,
) -> Vec<[u8; SHARE_LEN]> {
    Gf256::split_array(threshold, count, secret, CoefficientRng(rng))
        .expect("threshold and count were checked against the roster")
        .into_iter()
        .map(|share| share.try_into().expect("a share of 32 bytes has 33"))
        .collect()
}

fn combine(shares: &[Vec<u8>]) -> Option<[u8; 32]> {
    Gf256::combine_array(shares).ok()?.try_into().ok()
}

impl SiteSession {
    /// Fresh keys for one round. `rng` must be cryptographically secure (`rand::rng()`).
    pub fn new(ctx: RoundContext, site: &str, rng: &mut impl RngCore) -> Self {
        Self {
            ctx,
            site: site.to_string(),
            cipher_secret: StaticSecret::from(random_secret(rng)),
            mask_secret: StaticSecret::from(random_secret(rng)),
            seed: random_secret(rng),
            roster: None,
            sharers: BTreeSet::new(),
            held: BTreeMap::new(),
        }
    }

    pub fn public_keys(&self) -> PublicKeys {
        PublicKeys {
            cipher: PublicKey::from(&self.cipher_secret).to_bytes(),
            mask: PublicKey::from(&self.mask_secret).to_bytes(),
        }
    }

    fn roster(&self) -> Result<&Roster, SecAggError> {
        self.roster
            .as_ref()
            .ok_or_else(|| SecAggError::Protocol("no roster has been received".into()))
    }

    /// Checks the roster and encrypts one share of each secret to every other roster site.
    pub fn share_keys(
        &mut self,
        roster: Roster,
        rng: &mut impl RngCore,
    ) -> Result<SharesMessage, SecAggError> {
        roster.check()?;
        if roster.sites.get(&self.site) != Some(&self.public_keys()) {
            return Err(SecAggError::NotInRoster(self.site.clone()));
        }
        let count = roster.sites.len();
        let key_shares = split(&self.mask_secret.to_bytes(), roster.threshold, count, rng);
        let seed_shares = split(&self.seed, roster.threshold, count, rng);
        let mut envelopes = Vec::with_capacity(count - 1);
        for (i, (to, keys)) in roster.sites.iter().enumerate() {
            let (key_share, seed_share) = (key_shares[i], seed_shares[i]);
            if *to == self.site {
                self.held.insert(to.clone(), (key_share, seed_share));
                continue;
            }
            let mut plaintext = key_share.to_vec();
            plaintext.extend_from_slice(&seed_share);
            let cipher = share_cipher(&self.ctx, &self.cipher_secret, &keys.cipher, &self.site, to);
            let aad = share_aad(&self.ctx, &self.site, to);
            let ciphertext = cipher
                .encrypt(
                    &share_nonce(&self.site, to).into(),
                    Payload {
                        msg: &plaintext,
                        aad: &aad,
                    },
                )
                .expect("ChaCha20-Poly1305 encrypts any short message");
            envelopes.push(Envelope {
                from: self.site.clone(),
                to: to.clone(),
                ciphertext,
            });
        }
        self.roster = Some(roster);
        Ok(SharesMessage {
            envelopes,
            seed_commitment: Sha256::digest(self.seed).into(),
        })
    }

    /// Opens the shares other sites sent this site. `sharers` is the coordinator's list of
    /// the sites that shared; each of them (but this site) must have sent exactly one share.
    pub fn receive_shares(
        &mut self,
        sharers: &[String],
        envelopes: &[Envelope],
    ) -> Result<(), SecAggError> {
        let roster = self.roster()?.clone();
        let sharers: BTreeSet<String> = sharers.iter().cloned().collect();
        if !sharers.contains(&self.site) {
            return Err(SecAggError::Protocol(format!(
                "the coordinator does not list this site (`{}`) among the sharers",
                self.site
            )));
        }
        if sharers.len() < roster.threshold {
            return Err(SecAggError::TooFewSurvivors {
                survivors: sharers.len(),
                threshold: roster.threshold,
            });
        }
        let own_number = roster.share_number(&self.site)?;
        for envelope in envelopes {
            let from = envelope.from.as_str();
            let refuse = |reason: &str| SecAggError::Share {
                from: from.to_string(),
                reason: reason.to_string(),
            };
            if !sharers.contains(from) || from == self.site {
                return Err(refuse("its sender is not another sharer of this round"));
            }
            if envelope.to != self.site {
                return Err(refuse(&format!(
                    "it is addressed to `{}`, not to this site",
                    envelope.to
                )));
            }
            if self.held.contains_key(from) {
                return Err(refuse("a second share arrived from the same site"));
            }
            let keys = roster.keys(from)?;
            let cipher = share_cipher(
                &self.ctx,
                &self.cipher_secret,
                &keys.cipher,
                from,
                &self.site,
            );
            let aad = share_aad(&self.ctx, from, &self.site);
            let plaintext = cipher
                .decrypt(
                    &share_nonce(from, &self.site).into(),
                    Payload {
                        msg: &envelope.ciphertext,
                        aad: &aad,
                    },
                )
                .map_err(|_| {
                    refuse("it does not authenticate (meant for another site or round, or altered)")
                })?;
            if plaintext.len() != 2 * SHARE_LEN
                || plaintext[0] != own_number
                || plaintext[SHARE_LEN] != own_number
            {
                return Err(refuse("it does not hold this site's share numbers"));
            }
            let key_share = plaintext[..SHARE_LEN].try_into().expect("length checked");
            let seed_share = plaintext[SHARE_LEN..].try_into().expect("length checked");
            self.held.insert(from.to_string(), (key_share, seed_share));
        }
        if let Some(missing) = sharers.iter().find(|s| !self.held.contains_key(*s)) {
            return Err(SecAggError::MissingShare(missing.clone()));
        }
        self.sharers = sharers;
        Ok(())
    }

    /// Masks quantized `words` (see [`quantize`]): self mask plus pairwise masks with every
    /// other sharer.
    pub fn mask(&self, words: &mut [u64]) -> Result<(), SecAggError> {
        let roster = self.roster()?;
        if self.sharers.is_empty() {
            return Err(SecAggError::Protocol("no shares have been received".into()));
        }
        let weight = *words.last().expect("quantized words end with the weight");
        let sites = roster.sites.len();
        if weight.saturating_mul(sites as u64) > MAX_TOTAL_WEIGHT {
            return Err(SecAggError::WeightOverflow { weight, sites });
        }
        apply_mask(
            words,
            &self_mask_key(&self.ctx, &self.site, &self.seed),
            false,
        );
        for other in self.sharers.iter().filter(|s| **s != self.site) {
            let key = pair_mask_key(
                &self.ctx,
                &self.mask_secret,
                &roster.keys(other)?.mask,
                &self.site,
                other,
            );
            apply_pair_mask(words, &key, &self.site, other, false);
        }
        Ok(())
    }

    /// The shares to reveal once the coordinator names the survivors: the seed share of each
    /// surviving sharer, the mask key share of each sharer that dropped.
    pub fn reveal(&self, survivors: &[String]) -> Result<Vec<RevealedShare>, SecAggError> {
        let roster = self.roster()?;
        let survivors: BTreeSet<&String> = survivors.iter().collect();
        if !survivors.contains(&self.site) {
            return Err(SecAggError::Protocol(format!(
                "the coordinator does not list this site (`{}`) among the survivors",
                self.site
            )));
        }
        if let Some(stranger) = survivors.iter().find(|s| !self.sharers.contains(**s)) {
            return Err(SecAggError::Protocol(format!(
                "survivor `{stranger}` never shared its keys this round"
            )));
        }
        if survivors.len() < roster.threshold {
            return Err(SecAggError::TooFewSurvivors {
                survivors: survivors.len(),
                threshold: roster.threshold,
            });
        }
        Ok(self
            .sharers
            .iter()
            .map(|owner| {
                let (key_share, seed_share) = self.held[owner];
                let (kind, share) = if survivors.contains(owner) {
                    (SecretKind::SelfMaskSeed, seed_share)
                } else {
                    (SecretKind::MaskKey, key_share)
                };
                RevealedShare {
                    owner: owner.clone(),
                    kind,
                    share: share.to_vec(),
                }
            })
            .collect())
    }
}

/// What the coordinator has gathered by the end of a round.
pub struct Unmasking<'a> {
    pub ctx: &'a RoundContext,
    pub roster: &'a Roster,
    /// Sharers and their self-mask seed commitments.
    pub commitments: &'a BTreeMap<String, [u8; 32]>,
    /// Sites whose masked update is in the sum.
    pub survivors: &'a BTreeSet<String>,
    /// Revealed shares by revealing site.
    pub revealed: &'a BTreeMap<String, Vec<RevealedShare>>,
}

impl Unmasking<'_> {
    /// Turns the sum of the survivors' masked updates into the sum of their updates.
    pub fn unmask(&self, sum: &mut [u64]) -> Result<(), SecAggError> {
        let threshold = self.roster.threshold;
        if self.survivors.len() < threshold {
            return Err(SecAggError::TooFewSurvivors {
                survivors: self.survivors.len(),
                threshold,
            });
        }
        // Only survivors' reveals count, and only with their own share number.
        let mut shares: BTreeMap<(&str, SecretKind), Vec<Vec<u8>>> = BTreeMap::new();
        for (revealer, revealed) in self.revealed {
            if !self.survivors.contains(revealer) {
                return Err(SecAggError::Protocol(format!(
                    "`{revealer}` revealed shares but is not a survivor"
                )));
            }
            let number = self.roster.share_number(revealer)?;
            for r in revealed {
                let expected = if self.survivors.contains(&r.owner) {
                    SecretKind::SelfMaskSeed
                } else {
                    SecretKind::MaskKey
                };
                if r.kind != expected || !self.commitments.contains_key(&r.owner) {
                    return Err(SecAggError::Protocol(format!(
                        "`{revealer}` revealed the wrong secret of `{}`",
                        r.owner
                    )));
                }
                if r.share.len() != SHARE_LEN || r.share[0] != number {
                    return Err(SecAggError::Protocol(format!(
                        "`{revealer}` revealed a share that is not its own"
                    )));
                }
                shares
                    .entry((&r.owner, r.kind))
                    .or_default()
                    .push(r.share.clone());
            }
        }
        if self.revealed.len() < threshold {
            return Err(SecAggError::TooFewSurvivors {
                survivors: self.revealed.len(),
                threshold,
            });
        }
        let rebuilt = |owner: &str, kind: SecretKind| -> Result<[u8; 32], SecAggError> {
            let what = match kind {
                SecretKind::SelfMaskSeed => "self-mask seed",
                SecretKind::MaskKey => "mask key",
            };
            let bad = || SecAggError::Reconstruction {
                site: owner.to_string(),
                what,
            };
            let shares = shares
                .get(&(owner, kind))
                .map(Vec::as_slice)
                .unwrap_or_default();
            if shares.len() < threshold {
                return Err(SecAggError::TooFewSurvivors {
                    survivors: shares.len(),
                    threshold,
                });
            }
            combine(&shares[..threshold]).ok_or_else(bad)
        };
        for owner in self.commitments.keys() {
            if self.survivors.contains(owner) {
                let seed = rebuilt(owner, SecretKind::SelfMaskSeed)?;
                if <[u8; 32]>::from(Sha256::digest(seed)) != self.commitments[owner] {
                    return Err(SecAggError::Reconstruction {
                        site: owner.clone(),
                        what: "self-mask seed",
                    });
                }
                apply_mask(sum, &self_mask_key(self.ctx, owner, &seed), true);
            } else {
                let secret = StaticSecret::from(rebuilt(owner, SecretKind::MaskKey)?);
                if PublicKey::from(&secret).to_bytes() != self.roster.keys(owner)?.mask {
                    return Err(SecAggError::Reconstruction {
                        site: owner.clone(),
                        what: "mask key",
                    });
                }
                // Each survivor added its pairwise mask with the dropped site: take it out.
                for survivor in self.survivors {
                    let theirs = self.roster.keys(survivor)?.mask;
                    let key = pair_mask_key(self.ctx, &secret, &theirs, owner, survivor);
                    apply_pair_mask(sum, &key, survivor, owner, true);
                }
            }
        }
        Ok(())
    }
}

/// Adds a masked update into the running sum, word by word mod 2^64. Taking an iterator lets
/// the coordinator add words straight from the received bytes.
pub fn add_masked(
    sum: &mut [u64],
    masked: impl ExactSizeIterator<Item = u64>,
) -> Result<(), SecAggError> {
    if sum.len() != masked.len() {
        return Err(SecAggError::Length {
            got: masked.len(),
            expected: sum.len(),
        });
    }
    for (s, m) in sum.iter_mut().zip(masked) {
        *s = s.wrapping_add(m);
    }
    Ok(())
}

/// The words of a masked update sent as little-endian bytes.
pub fn words_le(bytes: &[u8]) -> impl ExactSizeIterator<Item = u64> + '_ {
    bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn ctx(round: u32) -> RoundContext {
        RoundContext {
            run_id: "run-1".into(),
            round,
        }
    }

    struct Simulation {
        sessions: Vec<SiteSession>,
        roster: Roster,
        shares: Vec<SharesMessage>,
    }

    fn simulate(sites: usize, threshold: usize, rng: &mut StdRng) -> Simulation {
        let names: Vec<String> = (0..sites).map(|i| format!("site-{i}")).collect();
        let mut sessions: Vec<SiteSession> = names
            .iter()
            .map(|n| SiteSession::new(ctx(1), n, rng))
            .collect();
        let roster = Roster {
            threshold,
            sites: sessions
                .iter()
                .map(|s| (s.site.clone(), s.public_keys()))
                .collect(),
        };
        let shares = sessions
            .iter_mut()
            .map(|s| s.share_keys(roster.clone(), rng).unwrap())
            .collect();
        Simulation {
            sessions,
            roster,
            shares,
        }
    }

    fn inbox(shares: &[SharesMessage], to: &str) -> Vec<Envelope> {
        shares
            .iter()
            .flat_map(|m| &m.envelopes)
            .filter(|e| e.to == to)
            .cloned()
            .collect()
    }

    #[test]
    fn fixed_point_round_trips_within_its_resolution() {
        let values = [0.0f32, 1.5, -2.25e-3, 15.9, -40.0];
        let (words, clipped) = quantize(values.iter().copied(), 3);
        assert_eq!(clipped, 1);
        let (sum, weight) = dequantize(&words);
        assert_eq!(weight, 3);
        for (got, v) in sum.iter().zip(values) {
            let want = 3.0 * (v as f64).clamp(-VALUE_RANGE, VALUE_RANGE);
            assert!((got - want).abs() <= 3.0 / SCALE, "{got} vs {want}");
        }
    }

    #[test]
    fn masks_cancel_with_dropouts_and_no_single_update_shows() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut sim = simulate(5, 3, &mut rng);
        let names: Vec<String> = sim.roster.sites.keys().cloned().collect();
        // site-4 drops before the shares are relayed: it is not a sharer.
        let sharers: Vec<String> = names[..4].to_vec();
        for s in &mut sim.sessions[..4] {
            let mail = inbox(&sim.shares[..4], &s.site);
            s.receive_shares(&sharers, &mail).unwrap();
        }
        // site-3 drops after sharing, before its masked update: the others' masks with it stay.
        let updates: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                (0..1000)
                    .map(|j| ((i * 1000 + j) as f32).sin() * 0.1)
                    .collect()
            })
            .collect();
        let mut sum = vec![0u64; 1001];
        for (s, update) in sim.sessions[..3].iter().zip(&updates) {
            let (mut words, _) = quantize(update.iter().copied(), 10 + s.site.len() as u64);
            let plain = words.clone();
            s.mask(&mut words).unwrap();
            assert_ne!(words[..1000], plain[..1000]);
            // The masked words look uniform: about half of all bits are set.
            let ones: u32 = words.iter().map(|w| w.count_ones()).sum();
            let fraction = ones as f64 / (64.0 * words.len() as f64);
            assert!((fraction - 0.5).abs() < 0.01, "{fraction}");
            add_masked(&mut sum, words.iter().copied()).unwrap();
        }
        let survivors: BTreeSet<String> = names[..3].iter().cloned().collect();
        let survivor_list: Vec<String> = survivors.iter().cloned().collect();
        let revealed: BTreeMap<String, Vec<RevealedShare>> = sim.sessions[..3]
            .iter()
            .map(|s| (s.site.clone(), s.reveal(&survivor_list).unwrap()))
            .collect();
        let commitments: BTreeMap<String, [u8; 32]> = names[..4]
            .iter()
            .zip(&sim.shares)
            .map(|(n, m)| (n.clone(), m.seed_commitment))
            .collect();
        let context = ctx(1);
        let unmasking = Unmasking {
            ctx: &context,
            roster: &sim.roster,
            commitments: &commitments,
            survivors: &survivors,
            revealed: &revealed,
        };
        unmasking.unmask(&mut sum).unwrap();
        let (total, weight) = dequantize(&sum);
        assert_eq!(weight, 3 * 16);
        for (j, got) in total.iter().enumerate() {
            let want: f64 = updates.iter().map(|u| 16.0 * u[j] as f64).sum();
            assert!((got - want).abs() < 1e-5, "{j}: {got} vs {want}");
        }
        // Two reveals are below the threshold of 3: the coordinator cannot unmask.
        let two: BTreeMap<String, Vec<RevealedShare>> =
            revealed.clone().into_iter().take(2).collect();
        let unmasking = Unmasking {
            revealed: &two,
            ..unmasking
        };
        assert!(matches!(
            unmasking.unmask(&mut sum),
            Err(SecAggError::TooFewSurvivors { .. })
        ));
    }

    #[test]
    fn misaddressed_and_stale_shares_are_refused() {
        let mut rng = StdRng::seed_from_u64(8);
        let mut sim = simulate(3, 2, &mut rng);
        let names: Vec<String> = sim.roster.sites.keys().cloned().collect();
        // The share site-0 made for site-1, relabelled and handed to site-2.
        let mut wrong = inbox(&sim.shares, "site-2");
        let stolen = sim.shares[0]
            .envelopes
            .iter()
            .find(|e| e.to == "site-1")
            .unwrap();
        wrong[0] = Envelope {
            to: "site-2".into(),
            ..stolen.clone()
        };
        let err = sim.sessions[2].receive_shares(&names, &wrong).unwrap_err();
        assert!(matches!(err, SecAggError::Share { .. }), "{err}");
        assert!(err.to_string().contains("does not authenticate"), "{err}");
        // A share for another site, unchanged, is refused by its address.
        let err = sim.sessions[2]
            .receive_shares(&names, std::slice::from_ref(stolen))
            .unwrap_err();
        assert!(err.to_string().contains("addressed to `site-1`"), "{err}");
        // Shares from round 1 replayed into round 2 do not open.
        let mut later = SiteSession::new(ctx(2), "site-2", &mut rng);
        let mut roster = sim.roster.clone();
        roster.sites.insert("site-2".into(), later.public_keys());
        later.share_keys(roster, &mut rng).unwrap();
        let err = later
            .receive_shares(&names, &inbox(&sim.shares, "site-2"))
            .unwrap_err();
        assert!(err.to_string().contains("does not authenticate"), "{err}");
        // A roster without this site's own keys is refused.
        let mut swapped = sim.roster.clone();
        swapped.sites.get_mut("site-0").unwrap().mask = [9; 32];
        let mut fresh = SiteSession::new(ctx(1), "site-0", &mut rng);
        assert!(matches!(
            fresh.share_keys(swapped, &mut rng),
            Err(SecAggError::NotInRoster(_))
        ));
    }

    #[test]
    fn survivors_below_the_threshold_reveal_nothing() {
        let mut rng = StdRng::seed_from_u64(9);
        let mut sim = simulate(4, 3, &mut rng);
        let names: Vec<String> = sim.roster.sites.keys().cloned().collect();
        for s in &mut sim.sessions {
            let mail = inbox(&sim.shares, &s.site);
            s.receive_shares(&names, &mail).unwrap();
        }
        let err = sim.sessions[0].reveal(&names[..2]).unwrap_err();
        assert!(matches!(
            err,
            SecAggError::TooFewSurvivors {
                survivors: 2,
                threshold: 3
            }
        ));
    }
}

//! One dataset split between simulated sites, for studying how sites that differ change a
//! strategy: in contiguous blocks of the dataset's order (for the MedSeg slices, its patients),
//! at random (IID), or with label skew, each kind of slice (with consolidation, with only
//! ground-glass, without lesion) dealt out in proportions drawn from a Dirichlet(α)
//! distribution per kind (Hsu et al. 2019), as Flower's `DirichletPartitioner` does for
//! classification labels.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand_distr::{Distribution, Gamma};

use alveolus_imaging::Slice;

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum SplitKind {
    Blocks,
    Iid,
    Dirichlet,
}

/// The lesion a slice shows: 2 any consolidation, 1 only ground-glass, 0 none.
fn kind_of(slice: &Slice) -> usize {
    if slice.mask.contains(&2) {
        2
    } else if slice.mask.contains(&1) {
        1
    } else {
        0
    }
}

/// Which slices (by index) each of `sites` sites gets. Refused when a site would get none,
/// with what to change.
pub fn assign(
    slices: &[Slice],
    sites: usize,
    kind: SplitKind,
    alpha: f64,
    seed: u64,
) -> Result<Vec<Vec<usize>>, String> {
    if sites == 0 {
        return Err("a split needs at least one site".into());
    }
    if sites > slices.len() {
        return Err(format!(
            "{} slices cannot be split between {sites} sites",
            slices.len()
        ));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut parts = vec![Vec::new(); sites];
    match kind {
        SplitKind::Blocks => {
            for (index, part) in parts.iter_mut().enumerate() {
                *part =
                    (index * slices.len() / sites..(index + 1) * slices.len() / sites).collect();
            }
        }
        SplitKind::Iid => {
            let mut order: Vec<usize> = (0..slices.len()).collect();
            order.shuffle(&mut rng);
            for (position, index) in order.into_iter().enumerate() {
                parts[position % sites].push(index);
            }
        }
        SplitKind::Dirichlet => {
            let gamma = Gamma::new(alpha, 1.0)
                .ok()
                .filter(|_| alpha.is_finite() && alpha > 0.0)
                .ok_or_else(|| format!("--alpha {alpha} is not a positive number"))?;
            for lesion in 0..3 {
                let mut group: Vec<usize> = (0..slices.len())
                    .filter(|&i| kind_of(&slices[i]) == lesion)
                    .collect();
                group.shuffle(&mut rng);
                let draws: Vec<f64> = (0..sites).map(|_| gamma.sample(&mut rng)).collect();
                let total: f64 = draws.iter().sum();
                let mut taken = 0;
                let mut cumulative = 0.0;
                for (site, draw) in draws.iter().enumerate() {
                    cumulative += draw / total.max(f64::MIN_POSITIVE);
                    let until = if site + 1 == sites {
                        group.len()
                    } else {
                        ((cumulative * group.len() as f64).round() as usize).min(group.len())
                    };
                    parts[site].extend(&group[taken..until.max(taken)]);
                    taken = until.max(taken);
                }
            }
        }
    }
    if let Some(empty) = parts.iter().position(Vec::is_empty) {
        return Err(format!(
            "site {} gets no slices under this split; raise --alpha, use fewer sites or another --split",
            empty + 1
        ));
    }
    for part in &mut parts {
        part.sort_unstable();
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slices(kinds: &[u8]) -> Vec<Slice> {
        kinds
            .iter()
            .enumerate()
            .map(|(i, &label)| Slice {
                name: format!("{i}"),
                width: 2,
                height: 1,
                image: vec![0, 0],
                mask: vec![0, label],
            })
            .collect()
    }

    fn covers_every_slice_once(parts: &[Vec<usize>], count: usize) {
        let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..count).collect::<Vec<_>>());
    }

    #[test]
    fn every_split_deals_each_slice_to_one_site_and_repeats_from_its_seed() {
        let data = slices(&[0, 1, 2, 1, 0, 2, 1, 1, 0, 2, 2, 1]);
        for kind in [SplitKind::Blocks, SplitKind::Iid, SplitKind::Dirichlet] {
            let parts = assign(&data, 3, kind, 100.0, 7).unwrap();
            assert_eq!(parts.len(), 3);
            covers_every_slice_once(&parts, data.len());
            assert_eq!(parts, assign(&data, 3, kind, 100.0, 7).unwrap(), "{kind:?}");
        }
        assert_eq!(
            assign(&data, 3, SplitKind::Blocks, 1.0, 0).unwrap(),
            [vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9, 10, 11]]
        );
        let iid = assign(&data, 3, SplitKind::Iid, 1.0, 0).unwrap();
        assert!(iid.iter().all(|p| p.len() == 4), "{iid:?}");
    }

    #[test]
    fn a_small_alpha_skews_the_lesions_between_sites_and_a_split_leaving_a_site_empty_is_refused() {
        // 60 slices of each kind between 2 sites.
        let kinds: Vec<u8> = (0..180).map(|i| (i % 3) as u8).collect();
        let data = slices(&kinds);
        // How far each site's share of consolidation slices is from an even one, summed.
        let skew = |alpha: f64, seed: u64| -> f64 {
            let parts = assign(&data, 2, SplitKind::Dirichlet, alpha, seed).unwrap();
            covers_every_slice_once(&parts, data.len());
            parts
                .iter()
                .map(|p| {
                    let consolidation = p.iter().filter(|&&i| kinds[i] == 2).count();
                    (consolidation as f64 / 60.0 - 0.5).abs()
                })
                .sum()
        };
        let (small, large): (f64, f64) = (1..=10)
            .map(|seed| (skew(0.3, seed), skew(100.0, seed)))
            .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
        assert!(small > 3.0 * large, "α 0.3: {small}, α 100: {large}");
        let refused = assign(&slices(&[1, 1]), 3, SplitKind::Iid, 1.0, 0).unwrap_err();
        assert!(
            refused.contains("2 slices cannot be split between 3 sites"),
            "{refused}"
        );
        let refused = assign(&data, 2, SplitKind::Dirichlet, 0.0, 0).unwrap_err();
        assert!(refused.contains("--alpha 0"), "{refused}");
        let refused = (0..50)
            .find_map(|seed| assign(&data, 40, SplitKind::Dirichlet, 0.01, seed).err())
            .expect("with α 0.01, 40 sites and three kinds, some site gets nothing");
        assert!(refused.contains("gets no slices"), "{refused}");
    }
}

//! Lung masks: from Hounsfield units alone, for models that do not predict the lung, and the
//! split of any lung mask into the right and the left lung.
//!
//! From HU (after Hu, Hoffman and Reinhardt, IEEE TMI 2001, without their optimal threshold):
//!
//! 1. **Air-like voxels**: below [`AIR_HU`] (lung parenchyma is about −850 HU, ground-glass
//!    opacity −700 to −300, soft tissue above −100), and the scanner's padding outside its field
//!    of view.
//! 2. **Outside air**: every air-like region (6-connected in 3D) that reaches the in-plane border
//!    of the volume (the air around the patient and under the table) is dropped.
//! 3. **Gas that is not lung**: of the regions left, those under [`MIN_LUNG_ML`] and those whose
//!    median is below [`GAS_MEDIAN_HU`] are dropped. Bowel and stomach gas is pure air (−1000),
//!    while parenchyma stays near −850 even with the airways it holds.
//! 4. **Airways**: the trachea is looked for in the uppermost planes holding lung, as a small
//!    region below [`AIRWAY_HU`] near the middle of the body, and grown in 3D through voxels below
//!    that value; what it reaches is taken out. If it reaches more than [`MAX_AIRWAY_FRACTION`] of
//!    the lung (emphysema leaks), nothing is taken out.
//! 5. **Right and left** ([`split_lungs`]): each axial plane is cut at the column near the middle
//!    where the fewest lung voxels lie. A 3D region lying (nearly) all on one side of the cuts
//!    belongs to that side whole; one that spans both (lungs touching at the anterior junction)
//!    is divided at the cuts. Canonical +x points to the patient's left, so the right lung lies
//!    at lower x.
//! 6. **Holes**: in each axial plane, what each lung encloses (vessels, dense lesions) is filled.
//!
//! Memory: one byte per voxel of state beside the image, and a breadth-first queue.

use std::collections::VecDeque;

use crate::volume::{Volume, face_neighbours, plane_neighbours};

/// Voxels below this are air-like (step 1): Hu et al.'s typical optimal threshold, which keeps
/// most ground-glass opacity inside the lung.
pub const AIR_HU: f32 = -320.0;
/// Regions whose median is below this are gas, not lung (step 3).
pub const GAS_MEDIAN_HU: f32 = -950.0;
/// Regions smaller than this are not lung (step 3), in millilitres.
pub const MIN_LUNG_ML: f64 = 10.0;
/// Airway lumen is below this (step 4).
pub const AIRWAY_HU: f32 = -950.0;
/// Airway growth reaching more than this fraction of the lung is a leak (step 4).
pub const MAX_AIRWAY_FRACTION: f64 = 0.1;

/// Values of a side mask.
pub const RIGHT_LUNG: u8 = 1;
pub const LEFT_LUNG: u8 = 2;

/// Largest voxel count the 32-bit breadth-first queues can index.
const MAX_VOXELS: usize = u32::MAX as usize;

/// Why no lung mask could be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LungError {
    #[error("the volume has {0} voxels; lung masks are made for at most 2^32")]
    TooLarge(usize),
}

// States of the HU algorithm's working volume.
const TISSUE: u8 = 0;
const AIR: u8 = 1;
const OUTSIDE: u8 = 2;
const MEASURED: u8 = 3;
const LUNG: u8 = 4;
const NOT_LUNG: u8 = 5;
const AIRWAY: u8 = 6;

/// The lungs of a CT volume in HU (canonical orientation), as a side mask: 0 outside the
/// lungs, [`RIGHT_LUNG`], [`LEFT_LUNG`]. `padding` is the scanner's value outside its field of
/// view, if any.
pub fn lungs_from_hu(image: &Volume<f32>, padding: Option<f32>) -> Result<Volume<u8>, LungError> {
    let size = image.geometry.size;
    let total = image.geometry.voxel_count();
    if total > MAX_VOXELS {
        return Err(LungError::TooLarge(total));
    }
    let hu = &image.voxels;
    let mut state: Vec<u8> = hu
        .iter()
        .map(|&v| {
            if v < AIR_HU || Some(v) == padding {
                AIR
            } else {
                TISSUE
            }
        })
        .collect();
    let mut queue = VecDeque::new();

    // Step 2: air connected to the in-plane border is outside the body.
    let [nx, ny, nz] = size;
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                if x == 0 || y == 0 || x == nx - 1 || y == ny - 1 {
                    let seed = x + nx * (y + ny * z);
                    flood(size, seed, &mut queue, |i| {
                        take(&mut state, i, AIR, OUTSIDE)
                    });
                }
            }
        }
    }

    // Step 3: measure each inner region, then keep the lung-like ones.
    let voxel_ml = image.geometry.spacing.iter().product::<f64>() / 1000.0;
    let mut histogram = vec![0usize; HISTOGRAM_BINS];
    let mut regions = Vec::new();
    for seed in 0..total {
        if state[seed] != AIR {
            continue;
        }
        histogram.fill(0);
        let count = flood(size, seed, &mut queue, |i| {
            let taken = take(&mut state, i, AIR, MEASURED);
            if taken {
                histogram[hu_bin(hu[i])] += 1;
            }
            taken
        });
        let lung =
            count as f64 * voxel_ml >= MIN_LUNG_ML && median_hu(&histogram, count) >= GAS_MEDIAN_HU;
        regions.push((seed, lung));
    }
    for (seed, lung) in regions {
        let mark = if lung { LUNG } else { NOT_LUNG };
        flood(size, seed, &mut queue, |i| {
            take(&mut state, i, MEASURED, mark)
        });
    }

    // Step 4: airways.
    remove_airways(image, &mut state, &mut queue);

    // The working volume becomes the mask: no second byte per voxel.
    for s in state.iter_mut() {
        *s = u8::from(*s == LUNG);
    }
    Ok(split_lungs(Volume {
        geometry: image.geometry.clone(),
        voxels: state,
    }))
}

/// HU histogram bins for medians: 1 HU each from −1024 up to [`AIR_HU`].
const HISTOGRAM_LOW: f32 = -1024.0;
const HISTOGRAM_BINS: usize = (AIR_HU - HISTOGRAM_LOW) as usize + 1;

fn hu_bin(v: f32) -> usize {
    ((v - HISTOGRAM_LOW).max(0.0) as usize).min(HISTOGRAM_BINS - 1)
}

fn median_hu(histogram: &[usize], count: usize) -> f32 {
    let mut seen = 0;
    for (bin, n) in histogram.iter().enumerate() {
        seen += n;
        if seen * 2 >= count {
            return HISTOGRAM_LOW + bin as f32;
        }
    }
    AIR_HU
}

/// Step 4: find the trachea near the top of the lungs and take out the airway tree it leads to.
fn remove_airways(image: &Volume<f32>, state: &mut [u8], queue: &mut VecDeque<u32>) {
    let size = image.geometry.size;
    let [nx, ny, nz] = size;
    let plane = nx * ny;
    let lung_count = state.iter().filter(|&&s| s == LUNG).count();
    if lung_count == 0 {
        return;
    }
    let Some(top) = (0..nz)
        .rev()
        .find(|&z| state[z * plane..(z + 1) * plane].contains(&LUNG))
    else {
        return;
    };
    // The trachea is at most a few centimetres long above the lungs' apices in a chest CT, and
    // passes every plane from the top of the lungs to the carina: 50 mm of planes is enough.
    let planes = ((50.0 / image.geometry.spacing[2]).ceil() as usize).clamp(1, nz);
    let pixel_mm2 = image.geometry.spacing[0] * image.geometry.spacing[1];
    let hu = &image.voxels;
    let mut seen = vec![false; plane];
    for z in (top.saturating_sub(planes - 1)..=top).rev() {
        let offset = z * plane;
        // The body's extent in this plane gives its middle.
        let (mut body_lo, mut body_hi) = (nx, 0);
        for y in 0..ny {
            for x in 0..nx {
                if state[offset + y * nx + x] != OUTSIDE {
                    body_lo = body_lo.min(x);
                    body_hi = body_hi.max(x);
                }
            }
        }
        if body_lo > body_hi {
            continue;
        }
        let middle = (body_lo + body_hi) as f64 / 2.0;
        let half_band = (body_hi - body_lo) as f64 * 0.15;
        seen.fill(false);
        for start in 0..plane {
            let i = offset + start;
            if seen[start] || state[i] != LUNG || hu[i] >= AIRWAY_HU {
                continue;
            }
            // A 2D region of airway-dark lung voxels in this plane.
            let mut pixels = Vec::new();
            let mut stack = vec![start];
            seen[start] = true;
            while let Some(p) = stack.pop() {
                pixels.push(p);
                for q in plane_neighbours(p, nx, ny).into_iter().flatten() {
                    if !seen[q] && state[offset + q] == LUNG && hu[offset + q] < AIRWAY_HU {
                        seen[q] = true;
                        stack.push(q);
                    }
                }
            }
            let area = pixels.len() as f64 * pixel_mm2;
            let centre = pixels.iter().map(|p| (p % nx) as f64).sum::<f64>() / pixels.len() as f64;
            // A trachea's lumen: 1.5 to 6 cm², near the middle of the body.
            if !(40.0..=600.0).contains(&area) || (centre - middle).abs() > half_band {
                continue;
            }
            let grown = flood(size, i, queue, |j| {
                let taken = state[j] == LUNG && hu[j] < AIRWAY_HU;
                if taken {
                    state[j] = AIRWAY;
                }
                taken
            });
            if grown as f64 > MAX_AIRWAY_FRACTION * lung_count as f64 {
                // A leak into the parenchyma: keep the airways as lung.
                flood(size, i, queue, |j| take(state, j, AIRWAY, LUNG));
                tracing::debug!(
                    grown,
                    lung_count,
                    "airway growth leaked; airways kept as lung"
                );
            }
            return;
        }
    }
}

/// A lung mask (non-zero inside) as a side mask: [`RIGHT_LUNG`], [`LEFT_LUNG`], 0 elsewhere,
/// with each lung's in-plane holes filled (steps 5 and 6).
pub fn split_lungs(mut mask: Volume<u8>) -> Volume<u8> {
    let size = mask.geometry.size;
    let [nx, ny, nz] = size;
    let plane = nx * ny;
    const UNASSIGNED: u8 = 3;
    const MEASURED_SIDE: u8 = 4;
    for v in mask.voxels.iter_mut() {
        *v = if *v != 0 { UNASSIGNED } else { 0 };
    }
    let cuts = plane_cuts(&mask.voxels, size);
    let side_of = |i: usize| {
        let (x, z) = (i % nx, i / plane);
        if (x as f64) < cuts[z] {
            RIGHT_LUNG
        } else {
            LEFT_LUNG
        }
    };
    let mut queue = VecDeque::new();
    let mut regions = Vec::new();
    for seed in 0..mask.voxels.len() {
        if mask.voxels[seed] != UNASSIGNED {
            continue;
        }
        let (mut right, mut left) = (0usize, 0usize);
        flood(size, seed, &mut queue, |i| {
            let taken = take(&mut mask.voxels, i, UNASSIGNED, MEASURED_SIDE);
            if taken {
                if side_of(i) == RIGHT_LUNG {
                    right += 1;
                } else {
                    left += 1;
                }
            }
            taken
        });
        regions.push((seed, right, left));
    }
    for (seed, right, left) in regions {
        // A region almost all on one side is one lung (or a piece of one); only regions that
        // really span both sides are divided voxel by voxel.
        let minority = right.min(left) as f64 / (right + left) as f64;
        let whole =
            (minority <= 0.05).then_some(if right >= left { RIGHT_LUNG } else { LEFT_LUNG });
        flood(size, seed, &mut queue, |i| {
            let taken = mask.voxels[i] == MEASURED_SIDE;
            if taken {
                mask.voxels[i] = whole.unwrap_or_else(|| side_of(i));
            }
            taken
        });
    }
    for z in 0..nz {
        let voxels = &mut mask.voxels[z * plane..(z + 1) * plane];
        for side in [RIGHT_LUNG, LEFT_LUNG] {
            fill_plane_holes(voxels, nx, ny, side);
        }
    }
    mask
}

/// Per axial plane, the x (in voxels) that divides right from left: the column with the fewest
/// lung voxels within a quarter of the lungs' width of their centre. Between separate lungs it
/// is a column of none.
fn plane_cuts(mask: &[u8], size: [usize; 3]) -> Vec<f64> {
    let [nx, ny, nz] = size;
    let plane = nx * ny;
    let (mut lo, mut hi, mut sum_x, mut count) = (nx, 0, 0.0, 0usize);
    let mut columns = vec![0u32; nx * nz];
    for (i, &v) in mask.iter().enumerate() {
        if v != 0 {
            let (x, z) = (i % nx, i / plane);
            columns[z * nx + x] += 1;
            lo = lo.min(x);
            hi = hi.max(x);
            sum_x += x as f64;
            count += 1;
        }
    }
    if count == 0 {
        return vec![nx as f64 / 2.0; nz];
    }
    let centre = sum_x / count as f64;
    let reach = ((hi - lo) as f64 * 0.25).max(1.0);
    let from = (centre - reach).floor().max(0.0) as usize;
    let to = ((centre + reach).ceil() as usize).min(nx - 1);
    (0..nz)
        .map(|z| {
            let profile = &columns[z * nx..(z + 1) * nx];
            let best = (from..=to)
                .min_by(|&a, &b| {
                    profile[a].cmp(&profile[b]).then(
                        (a as f64 - centre)
                            .abs()
                            .total_cmp(&(b as f64 - centre).abs()),
                    )
                })
                .unwrap_or(nx / 2);
            // Voxels left of the cut column's centre are right lung.
            best as f64 + 0.5
        })
        .collect()
}

/// Sets to `side` every 0 pixel of the plane that `side` encloses (not reachable from the
/// plane's border without crossing `side`).
fn fill_plane_holes(plane: &mut [u8], nx: usize, ny: usize, side: u8) {
    if !plane.contains(&side) {
        return;
    }
    let mut outside = vec![false; plane.len()];
    let mut stack = Vec::new();
    for y in 0..ny {
        for x in 0..nx {
            if (x == 0 || y == 0 || x == nx - 1 || y == ny - 1) && plane[y * nx + x] != side {
                outside[y * nx + x] = true;
                stack.push(y * nx + x);
            }
        }
    }
    while let Some(p) = stack.pop() {
        for q in plane_neighbours(p, nx, ny).into_iter().flatten() {
            if !outside[q] && plane[q] != side {
                outside[q] = true;
                stack.push(q);
            }
        }
    }
    for (v, out) in plane.iter_mut().zip(outside) {
        if !out && *v == 0 {
            *v = side;
        }
    }
}

/// `state[i] = to` if it was `from`; whether it was.
fn take(state: &mut [u8], i: usize, from: u8, to: u8) -> bool {
    let taken = state[i] == from;
    if taken {
        state[i] = to;
    }
    taken
}

/// Breadth-first walk of the 6-connected voxels that `take` accepts, from `seed`. `take` must
/// accept a voxel at most once (it marks what it accepts). Returns how many it accepted.
/// Breadth first keeps the queue at the size of the front, not of the region.
pub(crate) fn flood(
    size: [usize; 3],
    seed: usize,
    queue: &mut VecDeque<u32>,
    mut take: impl FnMut(usize) -> bool,
) -> usize {
    if !take(seed) {
        return 0;
    }
    queue.clear();
    queue.push_back(seed as u32);
    let mut count = 1;
    while let Some(i) = queue.pop_front() {
        for j in face_neighbours(i as usize, size).into_iter().flatten() {
            if take(j) {
                queue.push_back(j as u32);
                count += 1;
            }
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{self, CONSOLIDATION, GROUND_GLASS, LUNG as SYNTH_LUNG};

    fn dice(a: impl Iterator<Item = bool>, b: impl Iterator<Item = bool>) -> f64 {
        let (mut both, mut na, mut nb) = (0usize, 0usize, 0usize);
        for (x, y) in a.zip(b) {
            both += usize::from(x && y);
            na += usize::from(x);
            nb += usize::from(y);
        }
        2.0 * both as f64 / (na + nb) as f64
    }

    #[test]
    fn lungs_from_hu_match_the_exact_lungs_of_synthetic_chests() {
        // `data synth`'s own geometry (128 px over 350 mm, 8 mm planes), and a finer one.
        let side = 350.0 / 128.0;
        let cases = [0, 1, 2, 3]
            .map(|seed| (seed, [128, 128, 32], [side, side, 8.0]))
            .into_iter()
            .chain([0, 1, 2].map(|seed| (seed, [128, 128, 40], [2.7, 2.7, 7.0])));
        for (seed, size, spacing) in cases {
            let case = synth::chest_ct(seed, size, spacing);
            let image = Volume {
                geometry: case.image.geometry.clone(),
                voxels: case.image.voxels.iter().map(|&v| v as f32).collect(),
            };
            let sides = lungs_from_hu(&image, None).unwrap();
            let truth = case
                .labels
                .voxels
                .iter()
                .map(|&l| matches!(l, GROUND_GLASS | CONSOLIDATION | SYNTH_LUNG));
            let score = dice(sides.voxels.iter().map(|&s| s != 0), truth);
            eprintln!("seed {seed}, {size:?}: lung Dice {score:.4}");
            assert!(score >= 0.97, "seed {seed}, {size:?}: lung Dice {score:.4}");
            // The right lung lies at lower x (canonical +x is the patient's left).
            let nx = image.geometry.size[0];
            let mean_x = |side: u8| {
                let xs: Vec<f64> = sides
                    .voxels
                    .iter()
                    .enumerate()
                    .filter(|&(_, &s)| s == side)
                    .map(|(i, _)| (i % nx) as f64)
                    .collect();
                xs.iter().sum::<f64>() / xs.len() as f64
            };
            assert!(mean_x(RIGHT_LUNG) < nx as f64 / 2.0);
            assert!(mean_x(LEFT_LUNG) > nx as f64 / 2.0);
        }
    }

    #[test]
    fn touching_lungs_are_divided_between_them() {
        // Two boxes of lung joined by a bridge in every plane.
        let size = [40, 20, 4];
        let mut voxels = vec![0u8; 40 * 20 * 4];
        for z in 0..4 {
            for y in 5..15 {
                for x in 5..35 {
                    voxels[x + 40 * (y + 20 * z)] = 1;
                }
            }
        }
        let geometry = crate::Geometry {
            size,
            spacing: [1.0; 3],
            origin: [0.0; 3],
            direction: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        };
        let sides = split_lungs(Volume { geometry, voxels });
        let right = sides.voxels.iter().filter(|&&s| s == RIGHT_LUNG).count();
        let left = sides.voxels.iter().filter(|&&s| s == LEFT_LUNG).count();
        assert_eq!(right + left, 30 * 10 * 4);
        assert!(right.abs_diff(left) <= 10 * 4, "{right} against {left}");
    }

    #[test]
    fn enclosed_holes_are_filled_per_lung() {
        let mut plane = vec![0u8; 7 * 7];
        for y in 1..6 {
            for x in 1..6 {
                if x == 1 || x == 5 || y == 1 || y == 5 {
                    plane[y * 7 + x] = RIGHT_LUNG;
                }
            }
        }
        fill_plane_holes(&mut plane, 7, 7, RIGHT_LUNG);
        assert_eq!(plane.iter().filter(|&&v| v == RIGHT_LUNG).count(), 25);
        assert_eq!(plane[0], 0);
    }
}

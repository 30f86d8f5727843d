//! A synthetic chest CT with exact lesion and lung masks: a stand-in dataset for tests and
//! demos where no real data may be used, and a case whose labels are known to be right.
//!
//! Anatomy is laid out in coordinates normalised to the field of view, so any grid size gives a
//! whole chest. The seed moves organs a little and places the noise and the lesions. All
//! randomness comes from a small hash of our own, so a seed gives the same case on every
//! platform and with every version of `rand`.

use std::io;
use std::path::Path;

use crate::dicom_write::{SeriesTags, write_series};
use crate::nifti;
use crate::{Geometry, Volume};

/// What `alveolus data synth` makes: how many cases, and their grid.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthDataset {
    pub cases: usize,
    pub seed: u64,
    pub size: [usize; 3],
    pub spacing: [f64; 3],
}

impl Default for SynthDataset {
    /// A 350 mm field of view in 128 px, 32 slices of 8 mm: a thorax, small enough to train on
    /// a laptop.
    fn default() -> Self {
        Self {
            cases: 4,
            seed: 0,
            size: [128, 128, 32],
            spacing: [2.734375, 2.734375, 8.0],
        }
    }
}

/// Writes the dataset under `out`: per case a DICOM series (`case-NNN/dicom/`), the same CT as
/// NIfTI (`case-NNN/ct.nii.gz`) and the labels (`case-NNN/labels.nii.gz`, 0 background, 1 GGO,
/// 2 consolidation, 3 lung); `dataset.toml` describes the DICOM form, `dataset-nifti.toml` the
/// NIfTI form. The last case is the validation split when there are several. Refuses to write
/// over an existing description.
pub fn write_dataset(out: &Path, dataset: &SynthDataset) -> io::Result<()> {
    for name in ["dataset.toml", "dataset-nifti.toml"] {
        if out.join(name).exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists; choose an empty folder",
                    out.join(name).display()
                ),
            ));
        }
    }
    let [x, y, z] = dataset.size;
    if dataset.cases == 0 || x < 8 || y < 8 || z < 2 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a synthetic dataset needs at least one case, slices of at least 8x8 pixels and 2 slices",
        ));
    }
    let mut dicom_description = String::new();
    let mut nifti_description = String::new();
    for index in 0..dataset.cases {
        let seed = dataset.seed.wrapping_mul(1000).wrapping_add(index as u64);
        let case = chest_ct(seed, dataset.size, dataset.spacing);
        let id = format!("case-{index:03}");
        let dir = out.join(&id);
        write_series(
            &dir.join("dicom"),
            &case.image,
            &SeriesTags::synthetic(seed),
            "slice",
        )?;
        nifti::write(&dir.join("ct.nii.gz"), &case.image)?;
        nifti::write(&dir.join("labels.nii.gz"), &case.labels)?;
        let split = if dataset.cases > 1 && index + 1 == dataset.cases {
            "validation"
        } else {
            "train"
        };
        for (description, image) in [
            (&mut dicom_description, format!("{id}/dicom")),
            (&mut nifti_description, format!("{id}/ct.nii.gz")),
        ] {
            description.push_str(&format!(
                "[[case]]\nid = \"{id}\"\nimage = \"{image}\"\nlabels = \"{id}/labels.nii.gz\"\nsplit = \"{split}\"\n\n"
            ));
        }
    }
    let header = "# Synthetic chest CT made by `alveolus data synth`: labels 0 background, 1 GGO,\n# 2 consolidation, 3 lung (the default label map).\n\n";
    std::fs::write(
        out.join("dataset.toml"),
        format!("{header}{dicom_description}"),
    )?;
    std::fs::write(
        out.join("dataset-nifti.toml"),
        format!("{header}{nifti_description}"),
    )
}

/// Label values of [`SynthCase::labels`].
pub const BACKGROUND: u8 = 0;
pub const GROUND_GLASS: u8 = 1;
pub const CONSOLIDATION: u8 = 2;
pub const LUNG: u8 = 3;

/// One synthetic CT and its masks, on the same canonical grid.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthCase {
    /// The CT in Hounsfield units.
    pub image: Volume<i16>,
    /// Ground truth per voxel: [`BACKGROUND`], [`GROUND_GLASS`], [`CONSOLIDATION`] or [`LUNG`]
    /// (lung that is not lesion; its vessels and small airways included).
    pub labels: Volume<u8>,
}

/// A chest CT phantom of `size` voxels of `spacing` mm: air, an elliptical body with a fat
/// layer, ribs and spine, two lungs with vessels, an airway tree, and ground-glass and
/// consolidation lesions placed by `seed` inside the lungs. Lesion labels are exactly the
/// voxels whose HU the lesion wrote. Every case holds both lesion kinds unless its lungs are
/// only a voxel or two.
pub fn chest_ct(seed: u64, size: [usize; 3], spacing: [f64; 3]) -> SynthCase {
    let [nx, ny, nz] = size;
    let geometry = Geometry {
        size,
        spacing,
        // Centred in x and y as a scanner reconstructs; z as a table position below the head.
        origin: [
            -(nx.saturating_sub(1) as f64) * spacing[0] / 2.0,
            -(ny.saturating_sub(1) as f64) * spacing[1] / 2.0,
            -150.0 - nz.saturating_sub(1) as f64 * spacing[2],
        ],
        direction: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    };
    let mut rng = SplitMix(seed);
    let anatomy = Anatomy::new(&mut rng);
    let grid = Grid { size };

    let count = geometry.voxel_count();
    let mut hu = Vec::with_capacity(count);
    let mut labels = Vec::with_capacity(count);
    for z in 0..nz {
        let z_mm = z as f64 * spacing[2];
        for y in 0..ny {
            for x in 0..nx {
                let noise = gaussian(seed, NOISE_STREAM, hu.len() as u64);
                let (value, label) = anatomy.voxel(grid.point([x, y, z]), noise, z_mm);
                hu.push(to_hu(value));
                labels.push(label);
            }
        }
    }

    LesionPainter {
        seed,
        grid,
        hu: &mut hu,
        labels: &mut labels,
    }
    .paint(&mut rng);

    SynthCase {
        image: Volume {
            geometry: geometry.clone(),
            voxels: hu,
        },
        labels: Volume {
            geometry,
            voxels: labels,
        },
    }
}

/// Independent hash streams, so that the tissue noise, the lesions' noise and their ragged
/// edges do not repeat each other.
const NOISE_STREAM: u64 = 1;
const LESION_NOISE_STREAM: u64 = 2;
const EDGE_STREAM: u64 = 3;

/// A position in the field of view: `u` and `v` from -1 to 1 across x (patient right to left)
/// and y (anterior to posterior), `w` from 0 to 1 along z (feet to head).
#[derive(Debug, Clone, Copy)]
struct Point {
    u: f64,
    v: f64,
    w: f64,
}

impl Point {
    fn new(u: f64, v: f64, w: f64) -> Self {
        Self { u, v, w }
    }
}

#[derive(Debug, Clone, Copy)]
struct Grid {
    size: [usize; 3],
}

impl Grid {
    fn point(&self, [x, y, z]: [usize; 3]) -> Point {
        let [nx, ny, nz] = self.size.map(|n| n as f64);
        Point::new(
            (x as f64 + 0.5) / nx * 2.0 - 1.0,
            (y as f64 + 0.5) / ny * 2.0 - 1.0,
            (z as f64 + 0.5) / nz,
        )
    }

    /// Voxel indices along `axis` whose centres may lie between `lo` and `hi`.
    fn range(&self, axis: usize, lo: f64, hi: f64) -> std::ops::Range<usize> {
        let n = self.size[axis] as f64;
        let to_index = |c: f64| {
            if axis == 2 {
                c * n - 0.5
            } else {
                (c + 1.0) / 2.0 * n - 0.5
            }
        };
        let first = to_index(lo).floor().max(0.0);
        let end = (to_index(hi).ceil() + 1.0).min(n);
        if end <= first {
            return 0..0;
        }
        first as usize..end as usize
    }
}

/// A tube from `a` to `b` whose radius narrows from `radius` to half of it.
#[derive(Debug, Clone, Copy)]
struct Tube {
    a: Point,
    b: Point,
    radius: f64,
}

impl Tube {
    fn contains(&self, p: Point) -> bool {
        let r = self.radius;
        let (lo_u, hi_u) = (self.a.u.min(self.b.u) - r, self.a.u.max(self.b.u) + r);
        let (lo_v, hi_v) = (self.a.v.min(self.b.v) - r, self.a.v.max(self.b.v) + r);
        let (lo_w, hi_w) = (self.a.w.min(self.b.w) - r, self.a.w.max(self.b.w) + r);
        if p.u < lo_u || p.u > hi_u || p.v < lo_v || p.v > hi_v || p.w < lo_w || p.w > hi_w {
            return false;
        }
        let d = [
            self.b.u - self.a.u,
            self.b.v - self.a.v,
            self.b.w - self.a.w,
        ];
        let e = [p.u - self.a.u, p.v - self.a.v, p.w - self.a.w];
        let length2 = d[0] * d[0] + d[1] * d[1] + d[2] * d[2];
        let t = if length2 > 0.0 {
            ((e[0] * d[0] + e[1] * d[1] + e[2] * d[2]) / length2).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let off = [e[0] - t * d[0], e[1] - t * d[1], e[2] - t * d[2]];
        let radius = r * (1.0 - 0.5 * t);
        off[0] * off[0] + off[1] * off[1] + off[2] * off[2] <= radius * radius
    }
}

/// A lung: an ellipse in each axial plane that narrows towards the apex and the base.
#[derive(Debug, Clone, Copy)]
struct Lung {
    centre_u: f64,
    centre_v: f64,
    semi_u: f64,
    semi_v: f64,
    centre_w: f64,
    semi_w: f64,
}

impl Lung {
    fn contains(&self, p: Point) -> bool {
        let t = 1.0 - ((p.w - self.centre_w) / self.semi_w).powi(2);
        if t <= 0.0 {
            return false;
        }
        // The plane's ellipse shrinks with the square root of t.
        let du = (p.u - self.centre_u) / self.semi_u;
        let dv = (p.v - self.centre_v) / self.semi_v;
        du * du + dv * dv <= t
    }

    /// A random point well inside the lung (not checked against the heart).
    fn random_point(&self, rng: &mut SplitMix) -> Point {
        loop {
            let [a, b, c] = [0; 3].map(|_| rng.range(-1.0, 1.0));
            if a * a + b * b + c * c > 1.0 {
                continue;
            }
            let w = self.centre_w + 0.85 * c * self.semi_w;
            let s = (1.0 - ((w - self.centre_w) / self.semi_w).powi(2))
                .max(0.0)
                .sqrt();
            return Point::new(
                self.centre_u + 0.85 * a * self.semi_u * s,
                self.centre_v + 0.85 * b * self.semi_v * s,
                w,
            );
        }
    }
}

#[derive(Debug)]
struct Anatomy {
    body_v: f64,
    body_semi: [f64; 2],
    lungs: [Lung; 2],
    heart_centre: Point,
    heart_semi: [f64; 3],
    spine: (f64, f64, f64),
    rib_phase_mm: f64,
    airway: Vec<Tube>,
    vessels: [Vec<Tube>; 2],
}

impl Anatomy {
    fn new(rng: &mut SplitMix) -> Self {
        let body_v = 0.05;
        let body_semi = [rng.range(0.89, 0.95), rng.range(0.71, 0.77)];
        // The patient's right lung (towards -u) is the larger; the heart takes room on the left.
        let lungs = [
            Lung {
                centre_u: -0.36,
                centre_v: 0.02,
                semi_u: rng.range(0.25, 0.275),
                semi_v: rng.range(0.39, 0.43),
                centre_w: 0.42,
                semi_w: rng.range(0.6, 0.64),
            },
            Lung {
                centre_u: 0.37,
                centre_v: 0.02,
                semi_u: rng.range(0.23, 0.255),
                semi_v: rng.range(0.38, 0.42),
                centre_w: 0.42,
                semi_w: rng.range(0.6, 0.64),
            },
        ];
        let trachea_v = -0.02;
        let carina = Point::new(0.0, trachea_v, 0.64);
        let mut airway = vec![Tube {
            a: Point::new(0.0, trachea_v, 1.2),
            b: carina,
            radius: 0.045,
        }];
        for side in [-1.0, 1.0] {
            let hilum = Point::new(0.2 * side, trachea_v + 0.02, 0.54);
            airway.push(Tube {
                a: carina,
                b: hilum,
                radius: 0.032,
            });
            airway.push(Tube {
                a: hilum,
                b: Point::new(0.33 * side, 0.05, 0.40),
                radius: 0.02,
            });
            airway.push(Tube {
                a: hilum,
                b: Point::new(0.34 * side, -0.1, 0.62),
                radius: 0.018,
            });
        }
        let vessels = [0, 1].map(|k| {
            let lung = lungs[k];
            let medial = if k == 0 { 1.0 } else { -1.0 };
            let hilum = Point::new(
                lung.centre_u + medial * 0.55 * lung.semi_u,
                lung.centre_v + 0.03,
                0.5,
            );
            let mut tubes = Vec::new();
            for _ in 0..5 {
                let end = lung.random_point(rng);
                let radius = rng.range(0.014, 0.022);
                let trunk = Tube {
                    a: hilum,
                    b: end,
                    radius,
                };
                let t = rng.range(0.4, 0.7);
                let fork = Point::new(
                    hilum.u + t * (end.u - hilum.u),
                    hilum.v + t * (end.v - hilum.v),
                    hilum.w + t * (end.w - hilum.w),
                );
                tubes.push(trunk);
                for _ in 0..2 {
                    tubes.push(Tube {
                        a: fork,
                        b: lung.random_point(rng),
                        radius: 0.6 * radius,
                    });
                }
            }
            tubes
        });
        Self {
            body_v,
            body_semi,
            lungs,
            heart_centre: Point::new(0.08, -0.14, 0.1),
            heart_semi: [0.26, 0.26, 0.45],
            spine: (0.0, body_v + 0.62 * body_semi[1], 0.1),
            rib_phase_mm: rng.range(0.0, 26.0),
            airway,
            vessels,
        }
    }

    /// 0 at the body's centre line, 1 at the skin.
    fn body_radius(&self, p: Point) -> f64 {
        let du = p.u / self.body_semi[0];
        let dv = (p.v - self.body_v) / self.body_semi[1];
        (du * du + dv * dv).sqrt()
    }

    fn in_heart(&self, p: Point) -> bool {
        let c = self.heart_centre;
        let [a, b, h] = self.heart_semi;
        ((p.u - c.u) / a).powi(2) + ((p.v - c.v) / b).powi(2) + ((p.w - c.w) / h).powi(2) <= 1.0
    }

    /// Which lung holds `p`, if any.
    fn lung(&self, p: Point) -> Option<usize> {
        let k = usize::from(p.u > 0.0);
        (self.lungs[k].contains(p) && !self.in_heart(p)).then_some(k)
    }

    fn in_rib(&self, p: Point, body_radius: f64, z_mm: f64) -> bool {
        // Ribs run round the chest wall in bands a couple of centimetres apart; the front of
        // the chest is cartilage and sternum, left as soft tissue.
        (0.83..0.88).contains(&body_radius)
            && (z_mm + self.rib_phase_mm).rem_euclid(26.0) < 9.0
            && !(p.u.abs() < 0.25 && p.v < self.body_v)
    }

    fn in_spine(&self, p: Point) -> bool {
        let (u, v, r) = self.spine;
        (p.u - u).powi(2) + (p.v - v).powi(2) <= r * r
    }

    /// HU (before noise is rounded away) and label of the anatomy at `p`, without lesions.
    fn voxel(&self, p: Point, noise: f64, z_mm: f64) -> (f64, u8) {
        let body = self.body_radius(p);
        if body > 1.0 {
            return (-1000.0 + 4.0 * noise, BACKGROUND);
        }
        let lung = self.lung(p);
        let label = if lung.is_some() { LUNG } else { BACKGROUND };
        if self.airway.iter().any(|t| t.contains(p)) {
            return (-995.0 + 5.0 * noise, label);
        }
        if let Some(k) = lung {
            return if self.vessels[k].iter().any(|t| t.contains(p)) {
                (40.0 + 15.0 * noise, LUNG)
            } else {
                (-850.0 + 25.0 * noise, LUNG)
            };
        }
        let value = if self.in_spine(p) || self.in_rib(p, body, z_mm) {
            700.0 + 40.0 * noise
        } else if body > 0.97 {
            // Skin.
            30.0 + 10.0 * noise
        } else if body > 0.89 {
            -100.0 + 15.0 * noise
        } else {
            40.0 + 12.0 * noise
        };
        (value, BACKGROUND)
    }
}

/// A lesion: a union of overlapping spheres with a ragged edge.
#[derive(Debug, Clone)]
struct Blob {
    kind: u8,
    /// Mean HU of the lesion, drawn per lesion.
    base_hu: f64,
    spheres: Vec<(Point, f64)>,
}

impl Blob {
    fn random(rng: &mut SplitMix, kind: u8, centre: Point, radius: f64) -> Self {
        let mut spheres = vec![(centre, radius)];
        for _ in 0..rng.below(4) + 1 {
            let [a, b, c] = [0; 3].map(|_| rng.range(-1.0, 1.0));
            let norm = (a * a + b * b + c * c).sqrt().max(1e-9);
            let reach = 0.7 * radius / norm;
            spheres.push((
                Point::new(
                    centre.u + a * reach,
                    centre.v + b * reach,
                    centre.w + c * reach,
                ),
                radius * rng.range(0.4, 0.75),
            ));
        }
        let base_hu = if kind == GROUND_GLASS {
            rng.range(-470.0, -410.0)
        } else {
            rng.range(15.0, 35.0)
        };
        Self {
            kind,
            base_hu,
            spheres,
        }
    }

    fn grown(&self, kind: u8, factor: f64, base_hu: f64) -> Self {
        Self {
            kind,
            base_hu,
            spheres: self.spheres.iter().map(|&(c, r)| (c, r * factor)).collect(),
        }
    }

    /// 0 at a sphere's centre, 1 on the nearest sphere's surface.
    fn depth(&self, p: Point) -> f64 {
        self.spheres
            .iter()
            .map(|(c, r)| {
                ((p.u - c.u).powi(2) + (p.v - c.v).powi(2) + (p.w - c.w).powi(2)).sqrt() / r
            })
            .fold(f64::INFINITY, f64::min)
    }

    fn hu(&self, depth: f64, noise: f64) -> f64 {
        if self.kind == GROUND_GLASS {
            // Denser towards the middle, fading at the edge.
            (self.base_hu + 60.0 * (1.0 - depth).max(0.0) + 20.0 * noise).clamp(-560.0, -250.0)
        } else {
            (self.base_hu + 10.0 * noise).clamp(-20.0, 80.0)
        }
    }
}

struct LesionPainter<'a> {
    seed: u64,
    grid: Grid,
    hu: &'a mut [i16],
    labels: &'a mut [u8],
}

impl LesionPainter<'_> {
    fn paint(&mut self, rng: &mut SplitMix) {
        let lung: Vec<usize> = (0..self.labels.len())
            .filter(|&i| self.labels[i] == LUNG)
            .collect();
        if lung.is_empty() {
            return;
        }
        let mut ground_glass = Vec::new();
        let mut consolidation = Vec::new();
        // Moderate COVID-19 pneumonia: several patches, a fifth to a third of the lung.
        for _ in 0..rng.below(3) + 1 {
            let centre = self.centre(lung[rng.below(lung.len())]);
            let radius = rng.range(0.08, 0.16);
            let blob = Blob::random(rng, CONSOLIDATION, centre, radius);
            // Consolidation often sits in a halo of ground glass.
            if rng.range(0.0, 1.0) < 0.5 {
                let base = rng.range(-470.0, -410.0);
                ground_glass.push(blob.grown(GROUND_GLASS, 1.7, base));
            }
            consolidation.push(blob);
        }
        for _ in 0..rng.below(4) + 3 {
            let centre = self.centre(lung[rng.below(lung.len())]);
            let radius = rng.range(0.14, 0.28);
            ground_glass.push(Blob::random(rng, GROUND_GLASS, centre, radius));
        }
        // Consolidation is painted last: where both overlap, the denser finding wins.
        for blob in ground_glass.iter().chain(&consolidation) {
            self.paint_blob(blob);
        }
        // A tiny grid can lose a kind (its lesions cover each other or fall between voxel
        // centres); then one lung voxel is given to it.
        for kind in [GROUND_GLASS, CONSOLIDATION] {
            if self.labels.contains(&kind) {
                continue;
            }
            let free: Vec<usize> = lung
                .iter()
                .copied()
                .filter(|&i| self.labels[i] == LUNG)
                .collect();
            if free.is_empty() {
                continue;
            }
            let i = free[rng.below(free.len())];
            let blob = Blob::random(rng, kind, self.centre(i), 0.0);
            let noise = gaussian(self.seed, LESION_NOISE_STREAM, i as u64);
            self.hu[i] = to_hu(blob.hu(0.0, noise));
            self.labels[i] = kind;
        }
    }

    fn centre(&self, index: usize) -> Point {
        let [nx, ny, _] = self.grid.size;
        self.grid
            .point([index % nx, (index / nx) % ny, index / (nx * ny)])
    }

    fn paint_blob(&mut self, blob: &Blob) {
        let [nx, ny, _] = self.grid.size;
        let mut lo = [f64::INFINITY; 3];
        let mut hi = [f64::NEG_INFINITY; 3];
        for (c, r) in &blob.spheres {
            // The ragged edge reaches a little past the spheres.
            let reach = 1.2 * r;
            for (axis, value) in [c.u, c.v, c.w].into_iter().enumerate() {
                lo[axis] = lo[axis].min(value - reach);
                hi[axis] = hi[axis].max(value + reach);
            }
        }
        let xs = self.grid.range(0, lo[0], hi[0]);
        let ys = self.grid.range(1, lo[1], hi[1]);
        let zs = self.grid.range(2, lo[2], hi[2]);
        for z in zs {
            for y in ys.clone() {
                for x in xs.clone() {
                    let i = x + nx * (y + ny * z);
                    if self.labels[i] == BACKGROUND {
                        continue;
                    }
                    let depth = blob.depth(self.grid.point([x, y, z]));
                    let edge = 0.12 * (uniform(hash(self.seed, EDGE_STREAM, i as u64)) * 2.0 - 1.0);
                    if depth >= 1.0 + edge {
                        continue;
                    }
                    let noise = gaussian(self.seed, LESION_NOISE_STREAM, i as u64);
                    self.hu[i] = to_hu(blob.hu(depth, noise));
                    self.labels[i] = blob.kind;
                }
            }
        }
    }
}

fn to_hu(value: f64) -> i16 {
    value.round().clamp(-1024.0, 3071.0) as i16
}

/// SplitMix64's output function: a good 64-bit mix of a counter.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

fn hash(seed: u64, stream: u64, index: u64) -> u64 {
    mix(mix(seed ^ stream.wrapping_mul(GOLDEN_GAMMA)) ^ index.wrapping_mul(GOLDEN_GAMMA))
}

fn uniform(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

/// Roughly standard normal (a sum of four uniforms), from one hash: cheap enough per voxel.
fn gaussian(seed: u64, stream: u64, index: u64) -> f64 {
    let bits = hash(seed, stream, index);
    let sum: f64 = (0..4).map(|k| ((bits >> (16 * k)) & 0xffff) as f64).sum();
    (sum / 65536.0 - 2.0) * 3f64.sqrt()
}

/// SplitMix64: the placement of organs and lesions.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        mix(self.0)
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * uniform(self.next())
    }

    /// A number below `n` (which must not be 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: [usize; 3] = [128, 128, 32];
    const SPACING: [f64; 3] = [2.7, 2.7, 5.0];

    #[test]
    fn a_seed_gives_the_same_case() {
        let a = chest_ct(3, [48, 40, 12], [2.0, 2.2, 5.0]);
        assert_eq!(a, chest_ct(3, [48, 40, 12], [2.0, 2.2, 5.0]));
        assert_ne!(a.labels, chest_ct(4, [48, 40, 12], [2.0, 2.2, 5.0]).labels);
        assert_eq!(a.image.geometry, a.labels.geometry);
        assert!(a.image.geometry.is_canonical());
        assert_eq!(a.image.geometry.spacing, [2.0, 2.2, 5.0]);
        assert_eq!(a.image.voxels.len(), 48 * 40 * 12);
    }

    /// Per axial slice, the air reachable from the slice's border through voxels below -500 HU.
    fn outside_air(case: &SynthCase) -> Vec<bool> {
        let [nx, ny, nz] = case.image.geometry.size;
        let mut outside = vec![false; nx * ny * nz];
        for z in 0..nz {
            let at = |x: usize, y: usize| x + nx * (y + ny * z);
            let mut stack: Vec<(usize, usize)> = (0..nx)
                .flat_map(|x| [(x, 0), (x, ny - 1)])
                .chain((0..ny).flat_map(|y| [(0, y), (nx - 1, y)]))
                .collect();
            while let Some((x, y)) = stack.pop() {
                let i = at(x, y);
                if outside[i] || case.image.voxels[i] >= -500 {
                    continue;
                }
                outside[i] = true;
                if x > 0 {
                    stack.push((x - 1, y));
                }
                if x + 1 < nx {
                    stack.push((x + 1, y));
                }
                if y > 0 {
                    stack.push((x, y - 1));
                }
                if y + 1 < ny {
                    stack.push((x, y + 1));
                }
            }
        }
        outside
    }

    #[test]
    fn labels_stay_inside_the_body() {
        for seed in [0, 1, 2] {
            let case = chest_ct(seed, [96, 80, 20], SPACING);
            let outside = outside_air(&case);
            let outside_count = outside.iter().filter(|&&o| o).count();
            assert!(outside_count > case.image.voxels.len() / 10);
            for (i, &label) in case.labels.voxels.iter().enumerate() {
                assert!(
                    !(outside[i] && label != BACKGROUND),
                    "voxel {i}: label {label}"
                );
            }
        }
    }

    fn mean_hu(case: &SynthCase, label: u8) -> (f64, usize) {
        let values: Vec<f64> = case
            .labels
            .voxels
            .iter()
            .zip(&case.image.voxels)
            .filter(|&(&l, _)| l == label)
            .map(|(_, &h)| f64::from(h))
            .collect();
        (
            values.iter().sum::<f64>() / values.len() as f64,
            values.len(),
        )
    }

    #[test]
    fn every_label_is_present_with_its_hu() {
        let cases = (0..6)
            .map(|seed| chest_ct(seed, [64, 64, 16], SPACING))
            .chain([chest_ct(11, SIZE, SPACING)]);
        for case in cases {
            for (label, range) in [
                (LUNG, -900.0..-750.0),
                (GROUND_GLASS, -550.0..-250.0),
                (CONSOLIDATION, -30.0..80.0),
            ] {
                let (mean, count) = mean_hu(&case, label);
                assert!(count > 0, "label {label} missing");
                assert!(range.contains(&mean), "label {label}: mean {mean}");
            }
            assert!(case.labels.voxels.contains(&BACKGROUND));
            // Each lesion voxel holds lesion HU, whatever was beneath it.
            for (&label, &hu) in case.labels.voxels.iter().zip(&case.image.voxels) {
                match label {
                    GROUND_GLASS => assert!((-560..=-250).contains(&hu), "{hu}"),
                    CONSOLIDATION => assert!((-20..=80).contains(&hu), "{hu}"),
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn body_holds_air_fat_tissue_and_bone() {
        let case = chest_ct(5, SIZE, SPACING);
        let background: Vec<i16> = case
            .labels
            .voxels
            .iter()
            .zip(&case.image.voxels)
            .filter(|&(&l, _)| l == BACKGROUND)
            .map(|(_, &h)| h)
            .collect();
        let share = |lo: i16, hi: i16| {
            background
                .iter()
                .filter(|&&h| (lo..hi).contains(&h))
                .count() as f64
                / background.len() as f64
        };
        assert!(share(-1024, -950) > 0.2, "air");
        assert!(share(-150, -60) > 0.01, "fat");
        assert!(share(0, 100) > 0.2, "soft tissue");
        assert!(share(550, 900) > 0.002, "bone");
    }

    #[test]
    fn small_grids_still_get_both_lesions() {
        for (seed, size) in [
            (0, [16, 16, 4]),
            (1, [12, 10, 3]),
            (2, [8, 8, 2]),
            (3, [24, 24, 1]),
        ] {
            let case = chest_ct(seed, size, [10.0, 10.0, 10.0]);
            for label in [LUNG, GROUND_GLASS, CONSOLIDATION] {
                assert!(case.labels.voxels.contains(&label), "{size:?}: {label}");
            }
        }
        // Degenerate grids are no error, just (nearly) empty.
        assert!(chest_ct(0, [0, 0, 0], [1.0; 3]).image.voxels.is_empty());
        assert_eq!(chest_ct(0, [1, 1, 1], [1.0; 3]).labels.voxels.len(), 1);
    }
}

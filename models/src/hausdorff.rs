//! 95th-percentile Hausdorff distance (HD95) between two segmentations of a volume, in
//! millimetres: how far the outline of a prediction strays from the radiologist's.
//!
//! Surfaces are the mask voxels with a face-neighbour outside the mask (or outside the volume).
//! Distances from each surface to the other come from an exact Euclidean distance transform
//! with the voxel spacing (Felzenszwalb and Huttenlocher's separable lower envelope), computed
//! only over the box that holds both masks. HD95 is the larger of the two directed 95th
//! percentiles (linear interpolation), as MONAI's `compute_hausdorff_distance(percentile=95)`.

/// A label volume: `[z, y, x]` sizes and voxel spacing in mm, values row-major (x fastest).
#[derive(Debug, Clone, Copy)]
pub struct Grid {
    pub dims: [usize; 3],
    pub spacing: [f64; 3],
}

/// HD95 in mm between the voxels where `selected(label)` holds in `predicted` and in `truth`.
/// `None` when either side selects nothing (the distance is undefined).
pub fn hausdorff95(
    predicted: &[u8],
    truth: &[u8],
    grid: Grid,
    selected: impl Fn(u8) -> bool,
) -> Option<f64> {
    let total: usize = grid.dims.iter().product();
    assert!(
        predicted.len() == total && truth.len() == total,
        "label volumes must match the grid"
    );
    let a: Vec<bool> = predicted.iter().map(|&l| selected(l)).collect();
    let b: Vec<bool> = truth.iter().map(|&l| selected(l)).collect();
    let (lo, hi) = bounding_box(&a, &b, grid.dims)?;
    let crop = Crop {
        lo,
        hi,
        dims: grid.dims,
    };
    let a = crop.take(&a);
    let b = crop.take(&b);
    let dims = crop.size();
    let surface_a = surface(&a, dims);
    let surface_b = surface(&b, dims);
    let to_b = distance_transform(&surface_b, dims, grid.spacing);
    let to_a = distance_transform(&surface_a, dims, grid.spacing);
    let directed = |from: &[bool], field: &[f64]| {
        let mut d: Vec<f64> = (0..from.len())
            .filter(|&i| from[i])
            .map(|i| field[i].sqrt())
            .collect();
        percentile(&mut d, 0.95)
    };
    Some(directed(&surface_a, &to_b).max(directed(&surface_b, &to_a)))
}

fn bounding_box(a: &[bool], b: &[bool], dims: [usize; 3]) -> Option<([usize; 3], [usize; 3])> {
    let mut lo = dims;
    let mut hi = [0; 3];
    let (mut any_a, mut any_b) = (false, false);
    for i in 0..a.len() {
        if !(a[i] || b[i]) {
            continue;
        }
        any_a |= a[i];
        any_b |= b[i];
        let at = [
            i / (dims[1] * dims[2]),
            (i / dims[2]) % dims[1],
            i % dims[2],
        ];
        for k in 0..3 {
            lo[k] = lo[k].min(at[k]);
            hi[k] = hi[k].max(at[k] + 1);
        }
    }
    (any_a && any_b).then_some((lo, hi))
}

struct Crop {
    lo: [usize; 3],
    hi: [usize; 3],
    dims: [usize; 3],
}

impl Crop {
    fn size(&self) -> [usize; 3] {
        [0, 1, 2].map(|k| self.hi[k] - self.lo[k])
    }

    fn take(&self, full: &[bool]) -> Vec<bool> {
        let mut out = Vec::with_capacity(self.size().iter().product());
        for z in self.lo[0]..self.hi[0] {
            for y in self.lo[1]..self.hi[1] {
                let row = (z * self.dims[1] + y) * self.dims[2];
                out.extend_from_slice(&full[row + self.lo[2]..row + self.hi[2]]);
            }
        }
        out
    }
}

/// Mask voxels with a face-neighbour outside the mask or the box.
fn surface(mask: &[bool], dims: [usize; 3]) -> Vec<bool> {
    let [nz, ny, nx] = dims;
    let at = |z: usize, y: usize, x: usize| mask[(z * ny + y) * nx + x];
    let mut out = vec![false; mask.len()];
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                if !at(z, y, x) {
                    continue;
                }
                let edge = z == 0 || y == 0 || x == 0 || z + 1 == nz || y + 1 == ny || x + 1 == nx;
                out[(z * ny + y) * nx + x] = edge
                    || !at(z - 1, y, x)
                    || !at(z + 1, y, x)
                    || !at(z, y - 1, x)
                    || !at(z, y + 1, x)
                    || !at(z, y, x - 1)
                    || !at(z, y, x + 1);
            }
        }
    }
    out
}

/// Squared distance in mm from every voxel to the nearest `features` voxel.
fn distance_transform(features: &[bool], dims: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let mut field: Vec<f64> = features
        .iter()
        .map(|&f| if f { 0.0 } else { f64::INFINITY })
        .collect();
    let strides = [dims[1] * dims[2], dims[2], 1];
    let mut line = Vec::new();
    let mut envelope = Envelope::default();
    for axis in 0..3 {
        let n = dims[axis];
        // Every line along `axis`: start indices are all voxels whose coordinate on it is 0.
        for start in 0..field.len() {
            if !(start / strides[axis]).is_multiple_of(n) {
                continue;
            }
            line.clear();
            line.extend((0..n).map(|k| field[start + k * strides[axis]]));
            envelope.transform(&mut line, spacing[axis]);
            for (k, v) in line.iter().enumerate() {
                field[start + k * strides[axis]] = *v;
            }
        }
    }
    field
}

/// Scratch space for the 1D lower envelope of parabolas.
#[derive(Default)]
struct Envelope {
    vertices: Vec<usize>,
    boundaries: Vec<f64>,
    /// `f` at each vertex, kept because `f` is overwritten in place.
    values: Vec<f64>,
}

impl Envelope {
    /// `f[q] <- min_p (f[p] + ((q - p) * spacing)^2)`, skipping infinite `f[p]`.
    fn transform(&mut self, f: &mut [f64], spacing: f64) {
        let pos = |q: usize| q as f64 * spacing;
        self.vertices.clear();
        self.boundaries.clear();
        for q in 0..f.len() {
            if !f[q].is_finite() {
                continue;
            }
            loop {
                let Some(&v) = self.vertices.last() else {
                    self.vertices.push(q);
                    self.boundaries.push(f64::NEG_INFINITY);
                    break;
                };
                let s =
                    ((f[q] + pos(q).powi(2)) - (f[v] + pos(v).powi(2))) / (2.0 * (pos(q) - pos(v)));
                if s <= *self.boundaries.last().expect("one per vertex") {
                    self.vertices.pop();
                    self.boundaries.pop();
                } else {
                    self.vertices.push(q);
                    self.boundaries.push(s);
                    break;
                }
            }
        }
        if self.vertices.is_empty() {
            return;
        }
        self.values.clear();
        self.values.extend(self.vertices.iter().map(|&v| f[v]));
        let mut k = 0;
        for (q, out) in f.iter_mut().enumerate() {
            while k + 1 < self.vertices.len() && self.boundaries[k + 1] < pos(q) {
                k += 1;
            }
            let v = self.vertices[k];
            *out = (pos(q) - pos(v)).powi(2) + self.values[k];
        }
    }
}

/// The `p` quantile with linear interpolation between order statistics (NumPy's default).
fn percentile(values: &mut [f64], p: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let rank = p * (values.len() - 1) as f64;
    let (below, above) = (rank.floor() as usize, rank.ceil() as usize);
    values[below] + (values[above] - values[below]) * (rank - below as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cube(dims: [usize; 3], lo: [usize; 3], hi: [usize; 3]) -> Vec<u8> {
        let mut v = vec![0u8; dims.iter().product()];
        for z in lo[0]..hi[0] {
            for y in lo[1]..hi[1] {
                for x in lo[2]..hi[2] {
                    v[(z * dims[1] + y) * dims[2] + x] = 1;
                }
            }
        }
        v
    }

    /// Brute force over surface pairs, for comparison.
    fn brute(a: &[u8], b: &[u8], grid: Grid) -> f64 {
        let dims = grid.dims;
        let to_bool = |v: &[u8]| v.iter().map(|&l| l == 1).collect::<Vec<_>>();
        let coords = |s: &[bool]| {
            (0..s.len())
                .filter(|&i| s[i])
                .map(|i| {
                    let at = [
                        i / (dims[1] * dims[2]),
                        (i / dims[2]) % dims[1],
                        i % dims[2],
                    ];
                    [0, 1, 2].map(|k| at[k] as f64 * grid.spacing[k])
                })
                .collect::<Vec<_>>()
        };
        let sa = coords(&surface(&to_bool(a), dims));
        let sb = coords(&surface(&to_bool(b), dims));
        let directed = |from: &[[f64; 3]], to: &[[f64; 3]]| {
            let mut d: Vec<f64> = from
                .iter()
                .map(|p| {
                    to.iter()
                        .map(|q| (0..3).map(|k| (p[k] - q[k]).powi(2)).sum::<f64>().sqrt())
                        .fold(f64::INFINITY, f64::min)
                })
                .collect();
            percentile(&mut d, 0.95)
        };
        directed(&sa, &sb).max(directed(&sb, &sa))
    }

    #[test]
    fn identical_masks_are_zero_apart_and_empty_ones_undefined() {
        let grid = Grid {
            dims: [6, 10, 10],
            spacing: [2.5, 0.7, 0.7],
        };
        let a = cube(grid.dims, [1, 2, 2], [5, 8, 7]);
        assert_eq!(hausdorff95(&a, &a, grid, |l| l == 1), Some(0.0));
        let empty = vec![0u8; a.len()];
        assert_eq!(hausdorff95(&a, &empty, grid, |l| l == 1), None);
    }

    #[test]
    fn a_shifted_cube_is_as_far_as_the_shift_in_millimetres() {
        let grid = Grid {
            dims: [8, 16, 16],
            spacing: [3.0, 0.5, 0.8],
        };
        let a = cube(grid.dims, [2, 3, 3], [6, 9, 9]);
        let shifted_x = cube(grid.dims, [2, 3, 6], [6, 9, 12]);
        let d = hausdorff95(&a, &shifted_x, grid, |l| l == 1).unwrap();
        assert!((d - 3.0 * 0.8).abs() < 1e-9, "{d}");
        let shifted_z = cube(grid.dims, [3, 3, 3], [7, 9, 9]);
        let d = hausdorff95(&a, &shifted_z, grid, |l| l == 1).unwrap();
        assert!((d - 3.0).abs() < 1e-9, "{d}");
    }

    #[test]
    fn matches_brute_force_on_irregular_shapes() {
        let grid = Grid {
            dims: [5, 14, 12],
            spacing: [2.0, 0.9, 0.6],
        };
        let mut a = cube(grid.dims, [0, 1, 1], [4, 9, 6]);
        let mut b = cube(grid.dims, [1, 4, 3], [5, 13, 11]);
        // A speck far away and a hole, so the percentile has a tail.
        a[(4 * 14 + 13) * 12 + 11] = 1;
        b[(2 * 14 + 8) * 12 + 7] = 0;
        let fast = hausdorff95(&a, &b, grid, |l| l == 1).unwrap();
        let slow = brute(&a, &b, grid);
        assert!((fast - slow).abs() < 1e-9, "{fast} vs {slow}");
    }
}

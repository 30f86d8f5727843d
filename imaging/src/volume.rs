//! A CT volume (or a label volume) on a grid placed in patient space, and the one canonical
//! orientation every reader brings its volumes to.
//!
//! Patient space is DICOM's LPS: +x towards the patient's left, +y posterior, +z superior, in
//! millimetres. A canonical volume's first voxel axis points along +x (columns run right to
//! left of the patient, as an axial DICOM image is displayed), its second along +y (rows run
//! anterior to posterior) and its third along +z (slices run feet to head). Readers only permute
//! and flip axes to get there, never resample, so voxel values are exactly those of the file;
//! an oblique acquisition keeps its small residual rotation in `direction`.

/// Why voxels and a grid do not make a volume.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GridError {
    #[error("axis {0} of the affine has no length")]
    AxisWithoutLength(usize),
    #[error("the affine's axes are parallel (singular affine)")]
    SingularAffine,
    #[error("{voxels} voxels for a {size:?} grid")]
    VoxelCount { voxels: usize, size: [usize; 3] },
    #[error(
        "a {grid:?} grid at {grid_origin:.2?} is not a reordering of this {size:?} grid at {origin:.2?}"
    )]
    NotAReordering {
        grid: [usize; 3],
        grid_origin: [f64; 3],
        size: [usize; 3],
        origin: [f64; 3],
    },
}

/// Where a voxel grid lies in patient space.
#[derive(Debug, Clone, PartialEq)]
pub struct Geometry {
    /// Voxels along the first (fastest), second and third axis.
    pub size: [usize; 3],
    /// Millimetres between neighbouring voxel centres along each axis.
    pub spacing: [f64; 3],
    /// LPS position of the centre of voxel (0, 0, 0), in mm.
    pub origin: [f64; 3],
    /// `direction[a]` is the LPS unit vector along voxel axis `a`.
    pub direction: [[f64; 3]; 3],
}

/// Voxels on a grid: `voxels[x + size[0] * (y + size[1] * z)]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Volume<T> {
    pub geometry: Geometry,
    pub voxels: Vec<T>,
}

/// How far two grids may disagree and still be "the same grid": positions in mm, directions as
/// cosines. Scanners write positions with a few decimals; converters round them again.
pub const POSITION_TOLERANCE_MM: f64 = 1e-3;
pub const DIRECTION_TOLERANCE: f64 = 1e-4;

impl Geometry {
    pub fn voxel_count(&self) -> usize {
        self.size.iter().product()
    }

    /// Whether spacing, origin and directions are all finite numbers (writers refuse others).
    pub fn is_finite(&self) -> bool {
        self.spacing
            .iter()
            .chain(&self.origin)
            .chain(self.direction.iter().flatten())
            .all(|v| v.is_finite())
    }

    /// A grid from a 4x4 (top three rows) voxel-to-LPS affine: each column's length is the
    /// spacing along that axis, its direction the axis.
    pub fn from_lps_affine(size: [usize; 3], affine: [[f64; 4]; 3]) -> Result<Self, GridError> {
        let mut spacing = [0.0; 3];
        let mut direction = [[0.0; 3]; 3];
        for axis in 0..3 {
            let column = [affine[0][axis], affine[1][axis], affine[2][axis]];
            let length = norm(column);
            if !length.is_finite() || length <= 0.0 {
                return Err(GridError::AxisWithoutLength(axis));
            }
            spacing[axis] = length;
            direction[axis] = column.map(|c| c / length);
        }
        let geometry = Self {
            size,
            spacing,
            origin: [affine[0][3], affine[1][3], affine[2][3]],
            direction,
        };
        if determinant(direction).abs() < 1e-3 {
            return Err(GridError::SingularAffine);
        }
        Ok(geometry)
    }

    /// LPS position of the centre of voxel `index` (fractional indices allowed).
    pub fn position(&self, index: [f64; 3]) -> [f64; 3] {
        let mut p = self.origin;
        for ((i, spacing), direction) in index.iter().zip(self.spacing).zip(self.direction) {
            for (c, d) in p.iter_mut().zip(direction) {
                *c += i * spacing * d;
            }
        }
        p
    }

    /// Whether `other` puts the same voxels at the same places (within the tolerances).
    pub fn same_grid(&self, other: &Geometry) -> bool {
        self.size == other.size
            && (0..3).all(|a| {
                (self.spacing[a] - other.spacing[a]).abs() <= POSITION_TOLERANCE_MM
                    && (self.origin[a] - other.origin[a]).abs() <= POSITION_TOLERANCE_MM
                    && (0..3).all(|c| {
                        (self.direction[a][c] - other.direction[a][c]).abs() <= DIRECTION_TOLERANCE
                    })
            })
    }

    /// Which file axis becomes each canonical axis, and whether it is reversed on the way.
    fn canonical_plan(&self) -> ([usize; 3], [bool; 3]) {
        // Give each patient axis the voxel axis most aligned with it, strongest pairs first, so
        // an oblique grid still maps to a permutation.
        let mut taken_voxel = [false; 3];
        let mut taken_patient = [false; 3];
        let mut source = [0; 3];
        let mut flip = [false; 3];
        for _ in 0..3 {
            let (mut best, mut best_value) = ((0, 0), -1.0);
            for v in (0..3).filter(|&v| !taken_voxel[v]) {
                for p in (0..3).filter(|&p| !taken_patient[p]) {
                    let value = self.direction[v][p].abs();
                    if value > best_value {
                        best = (v, p);
                        best_value = value;
                    }
                }
            }
            let (v, p) = best;
            taken_voxel[v] = true;
            taken_patient[p] = true;
            source[p] = v;
            flip[p] = self.direction[v][p] < 0.0;
        }
        (source, flip)
    }

    /// This grid with its axes permuted and reversed into the canonical orientation.
    pub fn canonical(&self) -> Geometry {
        let (source, flip) = self.canonical_plan();
        let size = source.map(|s| self.size[s]);
        let spacing = source.map(|s| self.spacing[s]);
        let mut direction = [[0.0; 3]; 3];
        // The new first voxel is the old voxel at the far end of every reversed axis.
        let mut first = [0.0; 3];
        for k in 0..3 {
            let d = self.direction[source[k]];
            direction[k] = if flip[k] { d.map(|c| -c) } else { d };
            if flip[k] {
                first[source[k]] = (self.size[source[k]] - 1) as f64;
            }
        }
        Geometry {
            size,
            spacing,
            origin: self.position(first),
            direction,
        }
    }

    pub fn is_canonical(&self) -> bool {
        self.canonical_plan() == ([0, 1, 2], [false; 3])
    }
}

impl<T: Copy> Volume<T> {
    pub fn new(geometry: Geometry, voxels: Vec<T>) -> Result<Self, GridError> {
        if voxels.len() != geometry.voxel_count() {
            return Err(GridError::VoxelCount {
                voxels: voxels.len(),
                size: geometry.size,
            });
        }
        Ok(Self { geometry, voxels })
    }

    pub fn size(&self) -> [usize; 3] {
        self.geometry.size
    }

    /// The plane `z` of a canonical volume: an axial slice, rows of `size[0]` voxels.
    pub fn plane(&self, z: usize) -> &[T] {
        let n = self.geometry.size[0] * self.geometry.size[1];
        &self.voxels[z * n..(z + 1) * n]
    }

    /// The same voxels with axes permuted and reversed so that the grid is canonical.
    pub fn into_canonical(self) -> Self {
        let (source, flip) = self.geometry.canonical_plan();
        if source == [0, 1, 2] && flip == [false; 3] {
            return self;
        }
        let geometry = self.geometry.canonical();
        let old = self.geometry.size;
        let stride = [1, old[0], old[0] * old[1]];
        let size = geometry.size;
        let voxels = gather(&self.voxels, size, |index| {
            (0..3)
                .map(|k| {
                    let i = if flip[k] {
                        size[k] - 1 - index[k]
                    } else {
                        index[k]
                    };
                    i * stride[source[k]]
                })
                .sum()
        });
        Self { geometry, voxels }
    }

    /// The voxels of this canonical volume laid out on `grid`, a grid whose canonical form is
    /// this volume's (a file's own grid: the same voxels, axes permuted and reversed). Writers
    /// use it so that what they write overlays the file it came from voxel for voxel.
    pub fn on_grid(&self, grid: &Geometry) -> Result<Self, GridError> {
        if !grid.canonical().same_grid(&self.geometry) {
            return Err(GridError::NotAReordering {
                grid: grid.size,
                grid_origin: grid.origin,
                size: self.geometry.size,
                origin: self.geometry.origin,
            });
        }
        let (source, flip) = grid.canonical_plan();
        let canonical = self.geometry.size;
        let stride = [1, canonical[0], canonical[0] * canonical[1]];
        let voxels = gather(&self.voxels, grid.size, |index| {
            (0..3)
                .map(|k| {
                    let i = index[source[k]];
                    let c = if flip[k] { canonical[k] - 1 - i } else { i };
                    c * stride[k]
                })
                .sum()
        });
        Ok(Self {
            geometry: grid.clone(),
            voxels,
        })
    }
}

/// A volume of `size` whose voxel at `index` is `voxels[offset(index)]`, in storage order.
fn gather<T: Copy>(voxels: &[T], size: [usize; 3], offset: impl Fn([usize; 3]) -> usize) -> Vec<T> {
    let mut out = Vec::with_capacity(voxels.len());
    for z in 0..size[2] {
        for y in 0..size[1] {
            for x in 0..size[0] {
                out.push(voxels[offset([x, y, z])]);
            }
        }
    }
    out
}

/// The face neighbours (6-connectivity) of voxel `i` of a grid of `size`, `None` past an edge.
pub fn face_neighbours(i: usize, size: [usize; 3]) -> [Option<usize>; 6] {
    let [nx, ny, nz] = size;
    let plane = nx * ny;
    let (x, y, z) = (i % nx, (i / nx) % ny, i / plane);
    [
        (x > 0).then(|| i - 1),
        (x + 1 < nx).then(|| i + 1),
        (y > 0).then(|| i - nx),
        (y + 1 < ny).then(|| i + nx),
        (z > 0).then(|| i - plane),
        (z + 1 < nz).then(|| i + plane),
    ]
}

/// The edge neighbours (4-connectivity) of pixel `p` of a `width` x `height` plane.
pub fn plane_neighbours(p: usize, width: usize, height: usize) -> [Option<usize>; 4] {
    let (x, y) = (p % width, p / width);
    [
        (x > 0).then(|| p - 1),
        (x + 1 < width).then(|| p + 1),
        (y > 0).then(|| p - width),
        (y + 1 < height).then(|| p + width),
    ]
}

fn norm(v: [f64; 3]) -> f64 {
    v.iter().map(|c| c * c).sum::<f64>().sqrt()
}

fn determinant(m: [[f64; 3]; 3]) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

pub fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(size: [usize; 3], direction: [[f64; 3]; 3]) -> Geometry {
        Geometry {
            size,
            spacing: [0.5, 0.7, 2.0],
            origin: [10.0, -20.0, 30.0],
            direction,
        }
    }

    #[test]
    fn canonical_volume_is_left_as_it_is() {
        let g = grid(
            [2, 3, 4],
            [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        );
        let v = Volume::new(g.clone(), (0..24).collect::<Vec<u16>>()).unwrap();
        assert!(g.is_canonical());
        assert_eq!(v.clone().into_canonical(), v);
    }

    /// Every voxel keeps its value and its patient position whatever the file's axis order.
    #[test]
    fn reorientation_keeps_each_voxel_at_its_position() {
        // RAS-stored axes (x towards the right, y anterior), z first: a NIfTI-like layout.
        let g = grid(
            [4, 3, 2],
            [[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]],
        );
        let values: Vec<u32> = (0..24).collect();
        let v = Volume::new(g.clone(), values.clone()).unwrap();
        let c = v.clone().into_canonical();
        assert!(c.geometry.is_canonical());
        assert_eq!(c.geometry.size, [3, 2, 4]);
        let [sx, sy, _] = g.size;
        let [cx, cy, _] = c.geometry.size;
        for (i, value) in values.iter().enumerate() {
            let old = [i % sx, (i / sx) % sy, i / (sx * sy)].map(|n| n as f64);
            let p = g.position(old);
            // Find the canonical voxel at that position.
            let found = (0..c.voxels.len())
                .find(|&j| {
                    let q = c
                        .geometry
                        .position([j % cx, (j / cx) % cy, j / (cx * cy)].map(|n| n as f64));
                    (0..3).all(|a| (p[a] - q[a]).abs() < 1e-9)
                })
                .expect("every position exists in the canonical grid");
            assert_eq!(c.voxels[found], *value);
        }
    }

    #[test]
    fn a_canonical_volume_goes_back_onto_its_file_grid_exactly() {
        let file = grid(
            [4, 3, 2],
            [[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]],
        );
        let v = Volume::new(file.clone(), (0..24).collect::<Vec<u32>>()).unwrap();
        let canonical = v.clone().into_canonical();
        assert_eq!(canonical.on_grid(&file).unwrap(), v);
        let elsewhere = Geometry {
            origin: [0.0; 3],
            ..file
        };
        assert!(canonical.on_grid(&elsewhere).is_err());
    }

    #[test]
    fn affine_gives_spacing_and_direction() {
        let g = Geometry::from_lps_affine(
            [2, 2, 2],
            [
                [-0.8, 0.0, 0.0, 5.0],
                [0.0, -0.8, 0.0, 6.0],
                [0.0, 0.0, 2.5, 7.0],
            ],
        )
        .unwrap();
        assert_eq!(g.spacing, [0.8, 0.8, 2.5]);
        assert_eq!(g.direction[0], [-1.0, 0.0, 0.0]);
        assert_eq!(g.origin, [5.0, 6.0, 7.0]);
        let singular = Geometry::from_lps_affine(
            [2, 2, 2],
            [
                [1.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, 1.0, 0.0],
            ],
        );
        assert!(singular.is_err());
    }
}

//! Overlap metrics on label maps. One piece of code for training logs, `evaluate` and reports.
//!
//! Dice is computed over a whole dataset (intersections and sizes summed over all slices, then
//! divided), which weighs each pixel equally and stays defined on slices without a lesion.

use serde::Serialize;

/// Pixel counts accumulated over any number of slices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentationCounts {
    classes: usize,
    /// Per class: pixels both predicted and labelled as the class.
    intersection: Vec<u64>,
    predicted: Vec<u64>,
    labelled: Vec<u64>,
    /// The same three counts for "infection": the lesion classes (1 and 2) merged.
    infection: [u64; 3],
}

/// Overlap of one class, `None` where neither prediction nor label has it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassScore {
    pub class: String,
    pub dice: Option<f64>,
    pub iou: Option<f64>,
    /// 95th-percentile Hausdorff distance in mm, the mean over the volumes where both the
    /// prediction and the labels have the class; only for data that are volumes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hd95_mm: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiceReport {
    /// Every class but background.
    pub per_class: Vec<ClassScore>,
    /// Dice of all lesion classes merged (GGO or consolidation against everything else).
    pub infection: Option<f64>,
    /// Intersection over union of the same merged infection mask.
    pub infection_iou: Option<f64>,
    /// HD95 in mm of the merged infection mask, as `ClassScore::hd95_mm`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub infection_hd95_mm: Option<f64>,
}

fn dice(intersection: u64, a: u64, b: u64) -> Option<f64> {
    (a + b > 0).then(|| 2.0 * intersection as f64 / (a + b) as f64)
}

fn iou(intersection: u64, a: u64, b: u64) -> Option<f64> {
    (a + b > 0).then(|| intersection as f64 / (a + b - intersection) as f64)
}

/// Ground-glass opacity and consolidation: the classes that make up "infection".
fn is_lesion(class: usize) -> bool {
    class == 1 || class == 2
}

impl SegmentationCounts {
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            intersection: vec![0; classes],
            predicted: vec![0; classes],
            labelled: vec![0; classes],
            infection: [0; 3],
        }
    }

    /// Adds one slice (or batch) of predicted and true labels, equal lengths. Labels at or above
    /// the class count are counted as background-free mismatches of no class.
    pub fn add(&mut self, predicted: &[u8], labelled: &[u8]) {
        assert_eq!(
            predicted.len(),
            labelled.len(),
            "label maps must have the same size"
        );
        for (&p, &l) in predicted.iter().zip(labelled) {
            let (p, l) = (p as usize, l as usize);
            if p < self.classes {
                self.predicted[p] += 1;
            }
            if l < self.classes {
                self.labelled[l] += 1;
            }
            if p == l && p < self.classes {
                self.intersection[p] += 1;
            }
            let (pi, li) = (is_lesion(p), is_lesion(l));
            self.infection[0] += (pi && li) as u64;
            self.infection[1] += pi as u64;
            self.infection[2] += li as u64;
        }
    }

    pub fn merge(&mut self, other: &SegmentationCounts) {
        for c in 0..self.classes.min(other.classes) {
            self.intersection[c] += other.intersection[c];
            self.predicted[c] += other.predicted[c];
            self.labelled[c] += other.labelled[c];
        }
        for i in 0..3 {
            self.infection[i] += other.infection[i];
        }
    }

    pub fn class_dice(&self, class: usize) -> Option<f64> {
        dice(
            self.intersection[class],
            self.predicted[class],
            self.labelled[class],
        )
    }

    pub fn infection_dice(&self) -> Option<f64> {
        let [i, p, l] = self.infection;
        dice(i, p, l)
    }

    pub fn class_iou(&self, class: usize) -> Option<f64> {
        iou(
            self.intersection[class],
            self.predicted[class],
            self.labelled[class],
        )
    }

    pub fn infection_iou(&self) -> Option<f64> {
        let [i, p, l] = self.infection;
        iou(i, p, l)
    }

    pub fn report(&self, class_names: &[&str]) -> DiceReport {
        DiceReport {
            per_class: (1..self.classes)
                .map(|c| ClassScore {
                    class: class_names
                        .get(c)
                        .map_or_else(|| format!("class{c}"), |n| n.to_string()),
                    dice: self.class_dice(c),
                    iou: self.class_iou(c),
                    hd95_mm: None,
                })
                .collect(),
            infection: self.infection_dice(),
            infection_iou: self.infection_iou(),
            infection_hd95_mm: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dice_matches_hand_computation() {
        let mut c = SegmentationCounts::new(3);
        // truth: 1 1 2 0 ; pred: 1 2 2 2
        c.add(&[1, 2, 2, 2], &[1, 1, 2, 0]);
        // GGO: inter 1, pred 1, truth 2 -> 2/3. Consolidation: inter 1, pred 3, truth 1 -> 0.5.
        assert!((c.class_dice(1).unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert!((c.class_dice(2).unwrap() - 0.5).abs() < 1e-12);
        // Infection: pred {0,1,2,3}, truth {0,1,2} -> 2*3/(4+3).
        assert!((c.infection_dice().unwrap() - 6.0 / 7.0).abs() < 1e-12);
        assert!((c.infection_iou().unwrap() - 0.75).abs() < 1e-12);
        assert!((c.class_iou(2).unwrap() - 1.0 / 3.0).abs() < 1e-12);
        let report = c.report(&["background", "ggo", "consolidation"]);
        assert_eq!(report.per_class[1].class, "consolidation");
        assert_eq!(report.per_class[0].dice, c.class_dice(1));
    }

    #[test]
    fn lung_is_not_infection() {
        let mut c = SegmentationCounts::new(4);
        // truth: lung lung ggo ; pred: lung ggo ggo
        c.add(&[3, 1, 1], &[3, 3, 1]);
        assert_eq!(c.class_dice(3), Some(2.0 / 3.0));
        assert_eq!(c.infection_dice(), Some(2.0 / 3.0));
    }

    #[test]
    fn empty_classes_have_no_dice_and_merge_adds_up() {
        let mut a = SegmentationCounts::new(3);
        a.add(&[0, 0], &[0, 0]);
        assert_eq!(a.infection_dice(), None);
        let mut b = SegmentationCounts::new(3);
        b.add(&[1, 0], &[1, 0]);
        a.merge(&b);
        assert_eq!(a.infection_dice(), Some(1.0));
        assert_eq!(a.class_dice(2), None);
    }
}

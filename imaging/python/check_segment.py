"""Checks `alveolus segment`'s outputs with tools other than ours: nibabel reads the label
volumes, dcm2niix converts the source series (its affine is what a viewer overlays on), dciodvfy
validates the DICOM SEG, highdicom reads it.

    python check_segment.py OUT_DIR INPUT

INPUT is the scan that was segmented: a DICOM series folder or a NIfTI file. Exits non-zero
with a message on the first failed check; prints one JSON line of what it measured otherwise.
"""

import json
import os
import subprocess
import sys
import tempfile

import nibabel
import numpy as np


def fail(message):
    sys.exit(f"check_segment: {message}")


def volumes_match(out, report):
    labels = nibabel.load(os.path.join(out, "labels.nii.gz"))
    description = labels.header["descrip"].item().decode()
    if report["model"]["version"] not in description:
        fail(f"labels.nii.gz does not name the model version: {description!r}")
    values = np.asarray(labels.dataobj)
    voxel_ml = float(np.prod(labels.header.get_zooms()[:3])) / 1000.0
    # NIfTI stores spacing as float32: agreement to 1e-5 is exact for our purpose.
    if abs(voxel_ml - report["voxel_volume_ml"]) > 1e-5 * voxel_ml:
        fail(f"voxel volume {voxel_ml} mL in labels.nii.gz, {report['voxel_volume_ml']} in the report")
    measured = {}

    def region_counts(mask):
        return {
            "ggo_ml": int(((values == 1) & mask).sum()) * voxel_ml,
            "consolidation_ml": int(((values == 2) & mask).sum()) * voxel_ml,
            "lesion_ml": int((np.isin(values, [1, 2]) & mask).sum()) * voxel_ml,
            "lung_ml": int((np.isin(values, [1, 2, 3]) & mask).sum()) * voxel_ml,
        }

    lungs_path = os.path.join(out, "lungs.nii.gz")
    if os.path.exists(lungs_path):
        lungs = np.asarray(nibabel.load(lungs_path).dataobj)
        if lungs.shape != values.shape:
            fail("lungs.nii.gz and labels.nii.gz differ in shape")
        measured["right_lung"] = region_counts(lungs == 1)
        measured["left_lung"] = region_counts(lungs == 2)
        measured["total"] = region_counts(lungs > 0)
        if ((lungs == 0) & (values != 0)).any():
            fail("labels.nii.gz labels voxels outside both lungs")
    else:
        measured["total"] = region_counts(np.ones(values.shape, bool))
        measured["total"]["lung_ml"] = None
    for region, counts in measured.items():
        for key, value in counts.items():
            reported = report[region][key]
            if value is None:
                if reported is not None:
                    fail(f"{region}.{key} is reported without a lung mask")
                continue
            if abs(reported - value) > 1e-9 + 1e-5 * abs(value):
                fail(f"{region}.{key}: report says {reported}, labels.nii.gz gives {value}")
    return labels, measured


def dicom_checks(out, series, labels):
    with tempfile.TemporaryDirectory() as converted:
        run = subprocess.run(["dcm2niix", "-z", "y", "-f", "ct", "-o", converted, series],
                             capture_output=True, text=True)
        if run.returncode != 0:
            fail(f"dcm2niix failed: {run.stdout}{run.stderr}")
        names = [n for n in os.listdir(converted) if n.endswith(".nii.gz")]
        if len(names) != 1:
            fail(f"dcm2niix wrote {names}")
        reference = nibabel.load(os.path.join(converted, names[0]))
        if reference.shape[:3] != labels.shape[:3]:
            fail(f"dcm2niix gives shape {reference.shape}, labels.nii.gz {labels.shape}")
        difference = np.abs(reference.affine - labels.affine).max()
        if difference > 1e-3:
            fail(f"affines differ by {difference} mm:\n{reference.affine}\n{labels.affine}")
    seg = os.path.join(out, "seg.dcm")
    run = subprocess.run(["dciodvfy", seg], capture_output=True, text=True)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    if errors:
        fail("dciodvfy: " + "; ".join(errors))
    warnings = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Warning")]
    import highdicom
    segmentation = highdicom.seg.segread(seg)
    codes = {}
    for item in segmentation.SegmentSequence:
        codes[int(item.SegmentNumber)] = (
            item.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            item.SegmentedPropertyTypeCodeSequence[0].CodeValue,
        )
    expected = {1: ("49755003", "1217294009"), 2: ("49755003", "95436008"), 3: ("91723000", "39607008")}
    if codes != expected:
        fail(f"segment codes {codes}, expected {expected}")
    return {"dciodvfy_warnings": warnings, "seg_frames": int(segmentation.NumberOfFrames)}


def main(out, source):
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    labels, measured = volumes_match(out, report)
    result = {"measured": measured}
    if source.endswith(".nii") or source.endswith(".nii.gz"):
        difference = np.abs(nibabel.load(source).affine - labels.affine).max()
        if difference > 1e-4:
            fail(f"labels.nii.gz's affine differs from the input's by {difference} mm")
    else:
        result.update(dicom_checks(out, source, labels))
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])

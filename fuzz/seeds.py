#!/usr/bin/env python3
"""Writes the fuzzers' seed inputs (valid examples of what each target reads) into
fuzz/corpus/<target>/seed-*. Run once; the fuzzers grow the corpus from there."""
import hashlib, json, os, struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "seed-" + name), "wb") as f:
        f.write(data)


def varint(n):
    out = b""
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out += bytes([byte | 0x80])
        else:
            return out + bytes([byte])


def field(number, wire, payload):
    key = varint((number << 3) | wire)
    if wire == 0:
        return key + varint(payload)
    if wire == 1:
        return key + struct.pack("<d", payload)
    return key + varint(len(payload)) + payload


def safetensors(tensors, metadata):
    header, data = {}, b""
    for name, values in tensors.items():
        raw = struct.pack("<%df" % len(values), *values)
        header[name] = {"dtype": "F32", "shape": [len(values)], "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(text)) + text + data


model = safetensors({"head.bias": [0.5, -1.0], "head.weight": [1.0, 2.0, 3.0, 4.0]},
                    {"alveolus.model": '{"kind":"unet2d"}'})
write("weights", "model", model)
write("weights", "empty", safetensors({}, {}))

version = hashlib.sha256(model).hexdigest()
metrics = field(1, 1, 0.5) + field(2, 1, 0.25)
header = (field(1, 2, b"run-1") + field(2, 0, 1) + field(3, 2, version.encode()) + field(4, 0, 4)
          + field(5, 2, metrics) + field(6, 0, len(model)))
chunks = [field(1, 2, header), field(2, 2, model[:40]), field(2, 2, model[40:]),
          field(3, 2, field(1, 2, hashlib.sha256(model).digest()))]
write("update_upload", "plain", b"".join(varint(len(c)) + c for c in chunks))
masked = field(1, 2, b"run-1") + field(2, 0, 1) + field(3, 2, version.encode()) + field(6, 0, 16) + field(7, 0, 1)
words = struct.pack("<QQ", 7, 9)
chunks = [field(1, 2, masked), field(2, 2, words), field(3, 2, field(1, 2, hashlib.sha256(words).digest()))]
write("update_upload", "masked", b"".join(varint(len(c)) + c for c in chunks))

write("messages", "update-header", bytes([3]) + header)
write("messages", "join", bytes([7]) + field(1, 0, 1) + field(2, 2, b"0.1.0"))
write("messages", "empty-run-config", bytes([0]))
write("messages", "task", bytes([2]))

write("kit_toml", "site", b'''project = "lungs"
role = "site"
name = "hospital-a"
coordinator = "coord.example.org:7443"
ca_cert = "ca.pem"
cert = "cert.pem"
key = "key.pem"
''')
write("kit_toml", "admin-v6", b'''project = "lungs"
role = "admin"
name = "alice"
coordinator = "[::1]:7443"
server_name = "coord"
ca_cert = "ca.pem"
cert = "cert.pem"
key = "key.pem"
''')


# --- imaging (imaging/src/fuzzing.rs): real files from data/readers, cut down, and DICOM SEGs
# drawn on the synthetic series that `seg` reads onto.

import gzip
import zlib

READERS = os.path.join(os.path.dirname(HERE), "data", "readers")


def readers_file(relative):
    with open(os.path.join(READERS, relative), "rb") as f:
        return f.read()


def series(*files):
    """The `dicom_series` framing: each file after its length (u32, little-endian)."""
    return b"".join(struct.pack("<I", len(f)) + f for f in files)


LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF


def element(tag, vr, value):
    """One explicit VR little endian element; strings padded to even length as DICOM wants."""
    if isinstance(value, str):
        value = value.encode()
    if len(value) % 2:
        value += b"\0" if vr in (b"UI", b"OB") else b" "
    if vr in LONG_VRS:
        return struct.pack("<HH2sHI", tag[0], tag[1], vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag[0], tag[1], vr, len(value)) + value


def dataset(elements):
    """Elements (tag -> encoded element) in ascending tag order."""
    return b"".join(elements[tag] for tag in sorted(elements))


def sequence(tag, items, undefined=False):
    """A sequence of items (each a dict of encoded elements), of defined length or, as many
    scanners write them, of undefined length ended by delimiters."""
    if not undefined:
        body = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, len(d)) + d for d in map(dataset, items))
        return element(tag, b"SQ", body)
    body = b"".join(struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED) + dataset(item)
                    + struct.pack("<HHI", 0xFFFE, 0xE00D, 0) for item in items)
    return (struct.pack("<HH2sHI", tag[0], tag[1], b"SQ", 0, UNDEFINED) + body
            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


def dicom_file(sop_class, sop_instance, elements):
    """Preamble, file meta group and the data set, explicit VR little endian."""
    meta = (element((2, 1), b"OB", b"\0\1") + element((2, 2), b"UI", sop_class)
            + element((2, 3), b"UI", sop_instance) + element((2, 0x10), b"UI", "1.2.840.10008.1.2.1")
            + element((2, 0x12), b"UI", "1.2.826.0.1.3680043.10.1455.1"))
    return (b"\0" * 128 + b"DICM" + element((2, 0), b"UL", struct.pack("<I", len(meta))) + meta
            + dataset(elements))


def parse_elements(data):
    """The top-level elements of an explicit VR little endian file without nested sequences,
    as (tag, vr, value) after the preamble."""
    out, at = [], 132
    while at < len(data):
        group, number, vr = struct.unpack_from("<HH2s", data, at)
        if vr in LONG_VRS:
            (length,), head = struct.unpack_from("<I", data, at + 8), 12
        else:
            (length,), head = struct.unpack_from("<H", data, at + 6), 8
        assert length != UNDEFINED, "undefined lengths are not expected here"
        out.append(((group, number), vr, data[at + head:at + head + length]))
        at += head + length
    return out


def crop_slice(data, top, left, size):
    """A size x size piece of a 16-bit uncompressed axial slice (orientation 1/0/0, 0/1/0), its
    position moved to the piece's first pixel."""
    elements = parse_elements(data)
    values = {tag: value for tag, _, value in elements}
    columns = struct.unpack("<H", values[(0x28, 0x11)])[0]
    row_spacing, column_spacing = (float(v) for v in values[(0x28, 0x30)].decode().strip().split("\\"))
    x, y, z = (float(v) for v in values[(0x20, 0x32)].decode().strip().split("\\"))
    pixels = values[(0x7FE0, 0x10)]
    piece = b"".join(pixels[2 * ((top + r) * columns + left):2 * ((top + r) * columns + left + size)]
                     for r in range(size))
    changed = {
        (0x28, 0x10): struct.pack("<H", size),
        (0x28, 0x11): struct.pack("<H", size),
        (0x20, 0x32): "%g\\%g\\%g" % (x + left * column_spacing, y + top * row_spacing, z),
        (0x7FE0, 0x10): piece,
    }
    out = data[:132]
    for tag, vr, value in elements:
        out += element(tag, vr, changed.get(tag, value))
    return out


def reencode(data, syntax, encode):
    """The file with another transfer syntax: the meta group says it, `encode` turns the
    data set's (tag, vr, value) elements into its bytes."""
    elements = parse_elements(data)
    meta = {tag: element(tag, vr, value) for tag, vr, value in elements if tag[0] == 2 and tag != (2, 0)}
    meta[(2, 0x10)] = element((2, 0x10), b"UI", syntax)
    meta = dataset(meta)
    body = encode([e for e in elements if e[0][0] != 2])
    return data[:128] + b"DICM" + element((2, 0), b"UL", struct.pack("<I", len(meta))) + meta + body


def deflated(elements):
    raw = b"".join(element(tag, vr, value) for tag, vr, value in elements)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = compressor.compress(raw) + compressor.flush()
    return stream + b"\0" * (len(stream) % 2)


def packbits(row):
    """One row as DICOM RLE (PackBits): runs of 2 to 128 equal bytes replicated, the rest
    literal."""
    out, i = b"", 0
    while i < len(row):
        run = 1
        while i + run < len(row) and row[i + run] == row[i] and run < 128:
            run += 1
        if run > 1:
            out += bytes([257 - run, row[i]])
            i += run
            continue
        end = i + 1
        while end < len(row) and end - i < 128 and not (end + 1 < len(row) and row[end + 1] == row[end]):
            end += 1
        out += bytes([end - i - 1]) + row[i:end]
        i = end
    return out


def rle(elements):
    """RLE Lossless: 16-bit pixels as two segments (high bytes, then low), each row on its own,
    in one fragment after an empty offset table."""
    values = {tag: value for tag, _, value in elements}
    columns = struct.unpack("<H", values[(0x28, 0x11)])[0]
    pixels = values[(0x7FE0, 0x10)]
    segments = []
    for byte in (1, 0):
        planes = pixels[byte::2]
        segment = b"".join(packbits(planes[r:r + columns]) for r in range(0, len(planes), columns))
        segments.append(segment + b"\0" * (len(segment) % 2))
    header = struct.pack("<16I", 2, 64, 64 + len(segments[0]), *[0] * 13)
    fragment = header + b"".join(segments)
    item = lambda data: struct.pack("<HHI", 0xFFFE, 0xE000, len(data)) + data
    out = b""
    for tag, vr, value in elements:
        if tag == (0x7FE0, 0x10):
            out += (struct.pack("<HH2sHI", 0x7FE0, 0x10, b"OB", 0, UNDEFINED) + item(b"") + item(fragment)
                    + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        else:
            out += element(tag, vr, value)
    return out


# A real chest CT slice as it came from the scanner, cut from 128x128 to 64x64 around the
# mediastinum; the same pixels deflated and RLE-compressed (as written here); and the whole
# slice in the compressed transfer syntaxes whose encoders are not reproduced here.
ct_small = crop_slice(readers_file("dicom/pydicom_CT_small.dcm"), 32, 32, 64)
write("dicom_series", "ct-small", series(ct_small))
write("dicom_series", "deflated", series(reencode(ct_small, "1.2.840.10008.1.2.1.99", deflated)))
write("dicom_series", "rle", series(reencode(ct_small, "1.2.840.10008.1.2.5", rle)))
for name in ["jpeg_lossless_sv1", "jpeg_ls_lossless", "jpeg2000_lossless"]:
    write("dicom_series", name.replace("_", "-"), series(readers_file("dicom/compressed/%s.dcm" % name)))
# Two real LIDC slices (minimal headers, no Modality) cut to 32x32 around the right lung,
# framed last slice first: the reader orders them by position.
lidc = [crop_slice(readers_file("dicom/lidc_2slice_minimal/%d.dcm" % i), 240, 112, 32) for i in (1, 0)]
write("dicom_series", "lidc-2slice", series(*lidc))


# The series `imaging::fuzzing::seg` reads onto: synth::chest_ct(1, [16, 16, 4], [20, 20, 5])
# written by dicom_write, so canonical with its origin at the centre of x and y and 150 mm
# below z = 0; its Series Instance UID is dicom_write's hash of "series" and the seed.
SEG_SIZE, SEG_SPACING = (16, 16, 4), (20.0, 20.0, 5.0)
SEG_ORIGIN = (-(SEG_SIZE[0] - 1) * SEG_SPACING[0] / 2, -(SEG_SIZE[1] - 1) * SEG_SPACING[1] / 2,
              -150.0 - (SEG_SIZE[2] - 1) * SEG_SPACING[2])


def uid_from(*parts):
    """dicom_write's `uid_from`."""
    mask = (1 << 64) - 1
    high, low = 0xCBF29CE484222325, 0x84222325CBF29CE4
    for part in parts:
        for byte in part + b"\xff":
            high = ((high ^ byte) * 0x100000001B3) & mask
            low = ((low ^ byte) * 0x100000001B3) & mask
            low = ((low << 17) | (low >> 47)) & mask
    return "2.25.%d" % ((high << 64) | low)


SEED = struct.pack("<Q", 1)
SERIES_UID = uid_from(b"series", SEED)
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"


def ellipse(cx, cy, rx, ry):
    size = SEG_SIZE[0]
    return [[((c - cx) / rx) ** 2 + ((r - cy) / ry) ** 2 <= 1 for c in range(size)] for r in range(size)]


# (segment, slice, mask): lung in both lungs on three slices, ground glass and consolidation
# inside the left one; listed out of spatial order, as SEG frames often are.
LUNGS = [[a or b for a, b in zip(ra, rb)] for ra, rb in zip(ellipse(4.5, 7.5, 3, 5), ellipse(11.5, 7.5, 3, 5))]
SEG_FRAMES = [(3, 2, LUNGS), (3, 0, LUNGS), (3, 1, LUNGS), (1, 1, ellipse(11, 7, 1.5, 2)),
              (2, 2, ellipse(12, 9, 1, 1))]
SEGMENT_NAMES = {1: "Ground glass opacity", 2: "Consolidation", 3: "Lung"}


def decimals(*values):
    return "\\".join("%g" % v for v in values)


def seg_file(fractional):
    """A DICOM SEG of SEG_FRAMES on the synthetic series: BINARY (1 bit, bits running on across
    frames) with defined lengths and the plane orientation shared, or FRACTIONAL (8 bits, 150 of
    200 inside, 50 in a one-pixel band around) with undefined lengths and every functional group
    per frame."""
    size = SEG_SIZE[0]
    pixels = []
    for _, _, mask in SEG_FRAMES:
        for r in range(size):
            for c in range(size):
                near = any(mask[rr][cc] for rr in range(max(r - 1, 0), min(r + 2, size))
                           for cc in range(max(c - 1, 0), min(c + 2, size)))
                pixels.append(150 if mask[r][c] else 50 if near and fractional else 0)
    if fractional:
        pixel_data = bytes(pixels)
    else:
        bits = [p > 0 for p in pixels]
        pixel_data = bytes(sum(bits[i + b] << b for b in range(8) if i + b < len(bits))
                           for i in range(0, len(bits), 8))
    orientation = {(0x20, 0x37): element((0x20, 0x37), b"DS", decimals(1, 0, 0, 0, 1, 0))}
    measures = {(0x28, 0x30): element((0x28, 0x30), b"DS", decimals(SEG_SPACING[1], SEG_SPACING[0])),
                (0x18, 0x50): element((0x18, 0x50), b"DS", decimals(SEG_SPACING[2]))}
    seq = lambda tag, entries: {tag: sequence(tag, entries, undefined=fractional)}
    per_frame = []
    for segment, z, _ in SEG_FRAMES:
        position = (SEG_ORIGIN[0], SEG_ORIGIN[1], SEG_ORIGIN[2] + z * SEG_SPACING[2])
        groups = {}
        groups.update(seq((0x62, 0x0A), [{(0x62, 0x0B): element((0x62, 0x0B), b"US", struct.pack("<H", segment))}]))
        groups.update(seq((0x20, 0x9113), [{(0x20, 0x32): element((0x20, 0x32), b"DS", decimals(*position))}]))
        groups.update(seq((0x0008, 0x9124), [{
            (0x08, 0x2112): sequence((0x08, 0x2112), [{
                (0x08, 0x1150): element((0x08, 0x1150), b"UI", CT_IMAGE),
                (0x08, 0x1155): element((0x08, 0x1155), b"UI",
                                        uid_from(b"sop", SERIES_UID.encode(), struct.pack("<Q", z))),
            }], undefined=fractional)}]))
        if fractional:
            groups.update(seq((0x20, 0x9116), [orientation]))
            groups.update(seq((0x28, 0x9110), [measures]))
        per_frame.append(groups)
    shared = {}
    if not fractional:
        shared.update(seq((0x20, 0x9116), [orientation]))
        shared.update(seq((0x28, 0x9110), [measures]))
    sop_instance = uid_from(b"seg", SEED, b"fractional" if fractional else b"binary")
    referenced = [{(0x08, 0x1150): element((0x08, 0x1150), b"UI", CT_IMAGE),
                   (0x08, 0x1155): element((0x08, 0x1155), b"UI",
                                           uid_from(b"sop", SERIES_UID.encode(), struct.pack("<Q", z)))}
                  for z in range(SEG_SIZE[2])]
    segments = [{(0x62, 0x04): element((0x62, 0x04), b"US", struct.pack("<H", number)),
                 (0x62, 0x05): element((0x62, 0x05), b"LO", name),
                 (0x62, 0x08): element((0x62, 0x08), b"CS", "MANUAL")}
                for number, name in SEGMENT_NAMES.items()]
    elements = {
        (0x08, 0x16): element((0x08, 0x16), b"UI", SEGMENTATION),
        (0x08, 0x18): element((0x08, 0x18), b"UI", sop_instance),
        (0x08, 0x60): element((0x08, 0x60), b"CS", "SEG"),
        (0x20, 0x0D): element((0x20, 0x0D), b"UI", uid_from(b"study", SEED)),
        (0x20, 0x0E): element((0x20, 0x0E), b"UI", uid_from(b"seg-series", SEED)),
        (0x20, 0x52): element((0x20, 0x52), b"UI", uid_from(b"frame", SEED)),
        (0x28, 0x02): element((0x28, 0x02), b"US", struct.pack("<H", 1)),
        (0x28, 0x04): element((0x28, 0x04), b"CS", "MONOCHROME2"),
        (0x28, 0x08): element((0x28, 0x08), b"IS", str(len(SEG_FRAMES))),
        (0x28, 0x10): element((0x28, 0x10), b"US", struct.pack("<H", size)),
        (0x28, 0x11): element((0x28, 0x11), b"US", struct.pack("<H", size)),
        (0x28, 0x100): element((0x28, 0x100), b"US", struct.pack("<H", 8 if fractional else 1)),
        (0x28, 0x101): element((0x28, 0x101), b"US", struct.pack("<H", 8 if fractional else 1)),
        (0x28, 0x102): element((0x28, 0x102), b"US", struct.pack("<H", 7 if fractional else 0)),
        (0x28, 0x103): element((0x28, 0x103), b"US", struct.pack("<H", 0)),
        (0x62, 0x01): element((0x62, 0x01), b"CS", "FRACTIONAL" if fractional else "BINARY"),
        (0x7FE0, 0x10): element((0x7FE0, 0x10), b"OB", pixel_data),
    }
    if fractional:
        elements[(0x62, 0x10)] = element((0x62, 0x10), b"CS", "PROBABILITY")
        elements[(0x62, 0x0E)] = element((0x62, 0x0E), b"US", struct.pack("<H", 200))
    elements.update(seq((0x62, 0x02), segments))
    elements.update(seq((0x08, 0x1115), [{
        (0x20, 0x0E): element((0x20, 0x0E), b"UI", SERIES_UID),
        (0x08, 0x114A): sequence((0x08, 0x114A), referenced, undefined=fractional)}]))
    if shared:
        elements.update(seq((0x5200, 0x9229), [shared]))
    elements.update(seq((0x5200, 0x9230), per_frame))
    return dicom_file(SEGMENTATION, sop_instance, elements)


binary_seg = seg_file(fractional=False)
write("seg", "binary", binary_seg)
write("seg", "fractional", seg_file(fractional=True))
# A series folder with its SEG beside it: the SEG is not part of the image.
write("dicom_series", "lidc-with-seg", series(*lidc, binary_seg))


def nifti_crop(relative, start, size):
    """A real NIfTI-1 file cut to `size` voxels from `start`, its sform moved with it; the
    extensions are left out."""
    data = gzip.decompress(readers_file(relative))
    header = bytearray(data[:348])
    nx, ny, nz = struct.unpack_from("<3h", header, 42)
    datatype, bitpix = struct.unpack_from("<hh", header, 70)
    offset = int(struct.unpack_from("<f", header, 108)[0])
    width = bitpix // 8
    x0, y0, z0 = start
    voxels = b"".join(
        data[offset + width * (x0 + nx * (y + ny * z)):offset + width * (x0 + size[0] + nx * (y + ny * z))]
        for z in range(z0, z0 + size[2]) for y in range(y0, y0 + size[1]))
    struct.pack_into("<3h", header, 42, *size)
    struct.pack_into("<f", header, 108, 352.0)
    for row in range(3):
        srow = list(struct.unpack_from("<4f", header, 280 + 16 * row))
        srow[3] += srow[0] * x0 + srow[1] * y0 + srow[2] * z0
        struct.pack_into("<4f", header, 280 + 16 * row, *srow)
        struct.pack_into("<f", header, 268 + 4 * row, srow[3])
    return bytes(header) + b"\0\0\0\0" + voxels


# TotalSegmentator's example CT (int16 HU) and its labels (uint8), 32x32x6 voxels of 3 mm
# around the liver and the right lower lobe; plain and gzip-compressed.
for name, relative in [("ct", "nifti/totalseg_example_ct_sm.nii.gz"), ("labels", "nifti/totalseg_example_seg.nii.gz")]:
    crop = nifti_crop(relative, (40, 30, 22), (32, 32, 6))
    write("nifti", name + "-nii", crop)
    write("nifti", name + "-nii-gz", gzip.compress(crop, mtime=0))


# dataset.toml: the README's example, what `data synth` writes, and a TotalSegmentator case.
write("dataset_toml", "readme", b'''[labels]                        # what the site's label values mean (default: 0..3 as below)
ggo = [1]
consolidation = [2]
lung = [10, 11, 12, 13, 14]     # e.g. TotalSegmentator's lobes
unlisted = "background"         # or "error" (default): values listed nowhere are a problem

[window]                        # HU window before training (default: the lung window)
center = -600
width = 1500

[[case]]
id = "case-001"
image = "ct/case-001"           # DICOM series folder, .nii/.nii.gz, a DICOM file or a PNG
labels = "seg/case-001.dcm"     # DICOM SEG, NIfTI or PNG label file
split = "train"                 # train (default), validation or test
''')
write("dataset_toml", "synth", b'''# Synthetic chest CT made by `alveolus data synth`: labels 0 background, 1 GGO,
# 2 consolidation, 3 lung (the default label map).

[[case]]
id = "case-000"
image = "case-000/dicom"
labels = "case-000/labels.nii.gz"
split = "train"

[[case]]
id = "case-001"
image = "case-001/dicom"
labels = "case-001/labels.nii.gz"
split = "validation"
''')
write("dataset_toml", "totalseg", b'''[labels]
lung = [10, 11, 12, 13, 14]
unlisted = "background"

[[case]]
id = "ts"
image = "totalseg_example_ct_sm.nii.gz"
labels = "totalseg_example_seg.nii.gz"

[[case]]
id = "unlabelled"
image = "ct/series"
split = "test"
''')

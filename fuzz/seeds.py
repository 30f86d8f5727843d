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

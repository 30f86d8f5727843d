"""The Alveolus U-Net in PyTorch: the same network, tensor for tensor, as models/src/unet.rs.

Load an Alveolus model file (a checkpoint, `alveolus model pull`, `alveolus train --out`):

    from alveolus_unet import load
    model, spec = load("model.safetensors")      # strict: every tensor name and shape must match
    logits = model(x)                            # x: [batch, 1, H, W], intensities in [0, 1]

Needs only torch: the safetensors files (f32 tensors, as Alveolus writes them) are read and
written by the two small functions below. The architecture is read from the file's metadata
(`alveolus.model`), so the same code loads every preset.
"""

import ctypes
import json
import struct

import torch
from torch import nn

METADATA_KEY = "alveolus.model"


def normalisation(kind, dims, channels):
    """`batch`: BatchNorm (running statistics); `instance`: affine InstanceNorm (none)."""
    if kind == "instance":
        layer = nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d
        return layer(channels, eps=1e-5, affine=True)
    layer = nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d
    return layer(channels, eps=1e-5, momentum=0.1)


class ConvBlock(nn.Module):
    """Two 3x3 convolutions without bias, each followed by normalisation and ReLU."""

    def __init__(self, channels_in, channels_out, dims=2, norm="batch"):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv1 = conv(channels_in, channels_out, 3, padding=1, bias=False)
        self.norm1 = normalisation(norm, dims, channels_out)
        self.conv2 = conv(channels_out, channels_out, 3, padding=1, bias=False)
        self.norm2 = normalisation(norm, dims, channels_out)

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(x)))


class UNet(nn.Module):
    """U-Net of `depth` down-sampling steps; level l has `base_channels * 2**l` channels."""

    def __init__(self, spec):
        super().__init__()
        dims = 3 if spec["kind"] == "unet3d" else 2
        width = lambda level: spec["base_channels"] << level
        depth = spec["depth"]
        norm = spec.get("norm", "batch")
        self.encoders = nn.ModuleList(
            ConvBlock(spec["in_channels"] if l == 0 else width(l - 1), width(l), dims, norm)
            for l in range(depth)
        )
        self.bottleneck = ConvBlock(width(depth - 1), width(depth), dims, norm)
        up = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d
        levels = list(reversed(range(depth)))
        self.upsamplers = nn.ModuleList(up(width(l + 1), width(l), 2, stride=2) for l in levels)
        self.decoders = nn.ModuleList(ConvBlock(2 * width(l), width(l), dims, norm) for l in levels)
        head = nn.Conv2d if dims == 2 else nn.Conv3d
        self.head = head(width(0), spec["classes"], 1)
        self.pool = nn.MaxPool2d(2) if dims == 2 else nn.MaxPool3d(2)

    def forward(self, x):
        skips = []
        for encoder in self.encoders:
            features = encoder(x)
            skips.append(features)
            x = self.pool(features)
        x = self.bottleneck(x)
        for up, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips)):
            x = decoder(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def read_safetensors(path):
    """The f32 tensors of a safetensors file, by name, and its metadata."""
    with open(path, "rb") as f:
        data = f.read()
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.pop("__metadata__", {})
    body = 8 + header_len
    tensors = {}
    for name, info in header.items():
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: tensor {name} is {info['dtype']}, not F32")
        start, end = info["data_offsets"]
        flat = torch.frombuffer(bytearray(data[body + start : body + end]), dtype=torch.float32)
        tensors[name] = flat.reshape(info["shape"])
    return tensors, metadata


def write_safetensors(path, tensors):
    """Writes f32 tensors, by name, as a safetensors file."""
    header, blobs, offset = {}, [], 0
    for name, tensor in tensors.items():
        flat = tensor.detach().to("cpu", torch.float32).contiguous()
        blob = ctypes.string_at(flat.data_ptr(), flat.numel() * 4)
        header[name] = {"dtype": "F32", "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def load(path, device="cpu"):
    """The model in `path`, loaded strictly and put in eval mode, and its spec (a dict)."""
    tensors, metadata = read_safetensors(path)
    if METADATA_KEY not in metadata:
        raise ValueError(f"{path} has no `{METADATA_KEY}` metadata: not an Alveolus model")
    spec = json.loads(metadata[METADATA_KEY])
    model = UNet(spec)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), spec

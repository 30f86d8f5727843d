"""Times training steps of the Alveolus U-Net in PyTorch, the peer `alveolus bench train` compares
against. Same network (alveolus_unet.py), same loss (cross-entropy + soft Dice over the lesion
classes), same optimiser (AdamW), same batch (read from the file the benchmark wrote). With
PRECISION bf16 or f16 the forward pass runs under autocast, and f16 scales the loss with
GradScaler: PyTorch's own mixed precision, the peer of `bench train --precision`.

    python bench_train.py MODEL BATCH DEVICE THREADS STEPS WARMUP [PRECISION]

Prints one JSON line: {"torch": version, "device": ..., "step_ms": [...]}.
"""

import json
import statistics
import sys
import time

import torch
from alveolus_unet import load, read_safetensors


def segmentation_loss(logits, one_hot):
    batch, classes, *_ = logits.shape
    pixels = logits[:, 0].numel()
    cross_entropy = -(torch.log_softmax(logits, 1) * one_hot).sum() / pixels
    probs = torch.softmax(logits, 1).transpose(0, 1).reshape(classes, -1)[1:]
    truth = one_hot.transpose(0, 1).reshape(classes, -1)[1:]
    dice = (2 * (probs * truth).sum(1) + 1) / (probs.sum(1) + truth.sum(1) + 1)
    return cross_entropy + (1 - dice.mean())


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(model_path, batch_path, device, threads, steps, warmup, precision="f32"):
    torch.set_num_threads(int(threads))
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    dtype = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[precision]
    scaler = torch.amp.GradScaler(device_type, enabled=precision == "f16")
    model, _ = load(model_path, device)
    model.train()
    batch, _ = read_safetensors(batch_path)
    x, y = batch["x"].to(device), batch["y"].to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-5, weight_decay=1e-4)
    times = []
    for step in range(int(warmup) + int(steps)):
        sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            logits = model(x)
        # As autocast's recipe: the loss in f32.
        loss = segmentation_loss(logits.float(), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss.item()
        sync(device)
        if step >= int(warmup):
            times.append((time.perf_counter() - start) * 1000)
    print(json.dumps({"torch": torch.__version__, "device": device, "precision": precision,
                      "median_ms": statistics.median(times), "step_ms": times}))


if __name__ == "__main__":
    if len(sys.argv) not in (7, 8):
        sys.exit(__doc__)
    main(*sys.argv[1:])

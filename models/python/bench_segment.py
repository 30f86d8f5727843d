"""Times inference of the Alveolus U-Net in PyTorch over a scan's preprocessed planes, the peer
`alveolus bench segment` compares against: same network (alveolus_unet.py), same planes (read
from the file the benchmark wrote), same batch, same threads, softmax probabilities copied back
to the host as ours are.

    python bench_segment.py MODEL PLANES DEVICE THREADS BATCH REPEATS

Prints one JSON line: {"torch": version, "device": ..., "median_ms": ..., "pass_ms": [...]}.
"""

import json
import statistics
import sys
import time

import torch
from alveolus_unet import load, read_safetensors


def main(model_path, planes_path, device, threads, batch, repeats):
    torch.set_num_threads(int(threads))
    model, _ = load(model_path, device)
    model.eval()
    x = read_safetensors(planes_path)[0]["x"]
    batch = int(batch)
    times = []
    with torch.inference_mode():
        for _ in range(int(repeats)):
            start = time.perf_counter()
            for first in range(0, x.shape[0], batch):
                probabilities = torch.softmax(model(x[first:first + batch].to(device)), 1)
                probabilities.cpu()
            times.append((time.perf_counter() - start) * 1000)
    print(json.dumps({"torch": torch.__version__, "device": device,
                      "median_ms": statistics.median(times), "pass_ms": times}))


if __name__ == "__main__":
    if len(sys.argv) != 7:
        sys.exit(__doc__)
    main(*sys.argv[1:])

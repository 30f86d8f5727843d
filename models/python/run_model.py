"""Runs an Alveolus model file in PyTorch: used by the tests that check PyTorch gets our output.

    python run_model.py MODEL INPUT OUTPUT

INPUT is a safetensors file with tensor `x` ([batch, 1, H, W]); OUTPUT receives tensor `logits`.
The model is loaded with `load_state_dict(strict=True)`: a missing, extra or reshaped tensor
fails here.
"""

import sys

import torch
from alveolus_unet import load, read_safetensors, write_safetensors


def main(model_path, input_path, output_path):
    torch.set_num_threads(1)
    model, _ = load(model_path)
    x = read_safetensors(input_path)[0]["x"]
    with torch.no_grad():
        logits = model(x)
    write_safetensors(output_path, {"logits": logits})


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])

"""AF-CLIP training at paper scale on a GPU: step time and peak memory, with and without
bf16 autocast and the frozen-feature cache.

The model is CLIP ViT-L/14@336 at 518 px (positional embedding resized 24 -> 37, as the
paper runs it) with **random weights** (no weights can be downloaded here; speed and
memory do not depend on the values), the AF-CLIP head, batch 8, on generated 518 px
planted-defect images. Each variant trains ``--steps`` steps over ``--images`` images, so
steps after the first epoch read the cache. Reported per variant: median step time over
the steps after the first epoch (where a cache helps) and over all steps, and the peak
GPU memory (``torch.cuda.max_memory_allocated``).

    python benchmarks/train_gpu.py                      # on a GPU machine, ~10 min
    python benchmarks/train_gpu.py --device cpu --arch tiny-p8-w96 --size 112 --steps 6 \\
        --images 16 --out /tmp/smoke                    # a CPU smoke run of the script

Writes ``benchmarks/results/train_gpu.{json,md}`` (or ``--out``), naming the device.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from edge_inspect.trainer.config import RunConfig
from edge_inspect.trainer.fit import train

VARIANTS = {  # name: train settings
    "fp32, no cache": {"amp": "off", "cache_features": False},
    "fp32, cache": {"amp": "off", "cache_features": True},
    "bf16, no cache": {"amp": "bf16", "cache_features": False},
    "bf16, cache": {"amp": "bf16", "cache_features": True},
}


def run_variant(args: argparse.Namespace, settings: dict, folder: Path) -> dict:
    per_class = max(1, args.images // 2)
    cfg = RunConfig.from_dict({
        "name": "afclip-gpu-bench", "method": "afclip", "seed": 122,
        "backbone": {"kind": "clip", "arch": args.arch, "input_size": args.size},
        "head": {} if args.arch.startswith("ViT") else {"taps": [1, 2, 3, 4], "adapter_heads": 4},
        "data": {"train": [{"name": "aux", "kind": "synthetic", "split": "test",
                            "classes": ["stripes", "grain"], "per_class": per_class,
                            "size": args.size, "seed": 1}]},
        "train": {"steps": args.steps, "batch_size": args.batch, "lr": 1e-4, "log_every": 1,
                  "checkpoint_every": 10**9, "device": args.device, "workers": args.workers,
                  "cache_dtype": "float16", "cache_gb": 64, **settings},
    }, "benchmarks/train_gpu.py")
    on_gpu = cfg.train["device"] != "cpu" and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    train(cfg, folder)
    records = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    seconds = [r["seconds"] for r in records]
    steps = [b - a for a, b in zip([0.0, *seconds[:-1]], seconds, strict=True)]
    per_epoch = -(-2 * per_class // args.batch)
    later = steps[per_epoch:] or steps
    return {"median_step_s": statistics.median(steps),
            "median_step_s_after_epoch_1": statistics.median(later),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else None,
            "final_loss": records[-1]["loss"], "steps": len(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="ViT-L-14-336")
    parser.add_argument("--size", type=int, default=518)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.cuda.get_device_name() if args.device != "cpu" else "CPU"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in VARIANTS.items():
            results[name] = run_variant(args, settings, Path(tmp) / name.replace(", ", "-"))
            print(name, results[name], flush=True)
    base = results["fp32, no cache"]["median_step_s_after_epoch_1"]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": device, "torch": torch.__version__, "arch": args.arch, "size": args.size,
              "batch": args.batch, "steps": args.steps, "images": args.images, "variants": results}
    (args.out / "train_gpu.json").write_text(json.dumps(report, indent=2))
    lines = [f"AF-CLIP training, {args.arch} at {args.size} px (random weights), batch {args.batch}, "
             f"{args.steps} steps over {args.images} images, on {device} (torch {torch.__version__}).",
             "Command: `python benchmarks/train_gpu.py`", "",
             "| variant | median step (after epoch 1) | median step (all) | vs fp32 no cache "
             "| peak GPU memory |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f} GiB"
        later = r["median_step_s_after_epoch_1"]
        lines.append(f"| {name} | {later:.3f} s | {r['median_step_s']:.3f} s | "
                     f"{base / later:.2f}x | {mem} |")
    (args.out / "train_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

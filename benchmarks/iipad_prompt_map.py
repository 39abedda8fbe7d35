"""What IIPAD's trained prompts add on the generated task: pixel AUROC of the prompt map
alone (no memory) for the untrained and the trained generator, per category.

On the tiny random-weight CLIP and Q-Former the prompts carry no defect semantics: the
synthetic anomalous features (Eq. 8) are mostly noise and the random text tower knows no
words, so this shows whether training moves the prompt map at all, not IIPAD's accuracy.

    .venv/bin/edge-inspect train --config configs/iipad/tiny-synthetic.yaml \
        --run-dir runs/iipad-tiny --no-eval
    .venv/bin/python benchmarks/iipad_prompt_map.py --run runs/iipad-tiny

Writes <out>/iipad_prompt_map.md (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from edge_inspect.trainer.config import RunConfig, build_head
from edge_inspect.trainer.data.batches import BatchLoader
from edge_inspect.trainer.data.synthetic import SyntheticDefects
from edge_inspect.trainer.evaluate import load_head, score_items
from edge_inspect.trainer.metrics import auroc

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained run folder")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cfg = RunConfig.from_yaml(args.run / "config.yaml")
    trained = load_head(cfg, args.run / "checkpoint.safetensors")
    torch.manual_seed(cfg.seed)  # the same frozen random towers, the generator as initialized
    untrained = build_head(cfg).eval()
    loader = BatchLoader(trained.backbone.input_size, trained.backbone.normalization, cfg.fit_mode,
                         cfg.interpolation)
    lines = [f"IIPAD prompt map alone (no memory), pixel AUROC; run {args.run} ({cfg.name}).",
             f"Command: `.venv/bin/python benchmarks/iipad_prompt_map.py --run {args.run}`", "",
             "| category | untrained generator | trained generator |", "|---|---|---|"]
    for category in cfg.target_data[0].options["classes"]:
        data = SyntheticDefects("test", (category,), per_class=24, size=128, seed=4)
        items = [(data, i) for i in range(len(data))]
        row = []
        for head in (untrained, trained):
            _, maps, _, masks = score_items(head, loader, items, 16, category)
            row.append(auroc(masks.ravel(), maps.ravel()))
        lines.append(f"| {category} | {row[0]:.3f} | {row[1]:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "iipad_prompt_map.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

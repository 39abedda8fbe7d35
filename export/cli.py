"""``edge-inspect export --run DIR --out BUNDLE``: a trained run as a served bundle."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="run folder (from `edge-inspect train`)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to create")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint to export (default <run>/checkpoint.safetensors; an enrolled "
                             "one from <run>/eval-<K>shot/enrolled/ brings the few-shot memory and "
                             "threshold)")
    parser.add_argument("--images", type=Path, default=None,
                        help="folder of real images for the parity check (default: the run's data)")
    parser.add_argument("--parity-images", type=int, default=8, help="images in the parity check")
    parser.add_argument("--carry-state", action="store_true",
                        help="PIRN: carry each camera's refined prototypes from a frame scored normal "
                             "to its next frame (needs a calibrated checkpoint; default: stateless, "
                             "as the paper)")
    parser.add_argument("--class", dest="prompt_class", default=None, metavar="NAME",
                        help="KAnoCLIP: the class whose prompts the bundle bakes (its words come from "
                             "the knowledge file; default head.export_class)")


def run(args: argparse.Namespace) -> int:
    from edge_inspect.export.bundle_writer import export_bundle

    out = export_bundle(args.run, args.out, args.checkpoint, args.images, args.parity_images,
                        args.carry_state, args.prompt_class)
    report = json.loads((out / "parity.json").read_text())
    print(f"bundle: {out}")
    baked = json.loads((out / "manifest.json").read_text()).get("baked") or {}
    if "prompt_class" in baked:
        print(f"prompts baked for class {baked['prompt_class']!r}: {baked['abnormal_prompts'][0]!r} ...")
    print(f"parity on {report['images']} images ({report['backend']}): score max |diff| "
          f"{report['score_max_abs_diff']:.2e} (<= {report['score_tolerance']}), map max |diff| "
          f"{report['map_max_abs_diff']:.2e} (<= {report['map_tolerance']})")
    if "state_max_abs_diff" in report:
        print(f"carried state over {report['state_steps']} steps: state max |diff| "
              f"{report['state_max_abs_diff']:.2e} (<= {report['state_tolerance']}), score "
              f"{report['state_score_max_abs_diff']:.2e}, map {report['state_map_max_abs_diff']:.2e}")
    return 0

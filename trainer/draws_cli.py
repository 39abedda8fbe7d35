"""``edge-inspect draws --config X.yaml --draws 10``: the few-shot protocol of a method that
learns from its shots (PIRN): one training per class and shot draw, then the mean over draws
(a one-for-all method, IIPAD: one training per draw over all classes of the target).

A head trained on its K shots cannot be evaluated on other draws (``eval.shot_seeds`` is
refused for it), so each draw ``d`` is its own run with ``seed: d`` (the seed draws the
shots and the held-out normals, and initializes the head), on one class of the target at a
time, as the paper trains one model per category. Runs go to
``<out>/<dataset>-<class>/draw-<d>/`` (``<out>`` by default ``runs/<name>-<K>shot-draws``);
a run whose evaluation finished is kept and not repeated, so an interrupted sweep continues
where it stopped; a run folder holding another config (other shots, other ``--set``) is
refused, never mixed into the summary. ``summary.json`` and
``summary.md`` hold, per class, the mean and standard deviation over draws of image AUROC,
pixel AUROC and AUPRO, and the mean over classes (the papers' table rows).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import yaml

from edge_inspect.trainer.config import ConfigError, RunConfig, apply_override
from edge_inspect.trainer.data.registry import OPTIONS

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="run config YAML (configs/)")
    parser.add_argument("--draws", type=int, default=10, help="shot draws per class (the papers': 10)")
    parser.add_argument("--first", type=int, default=0, help="seed of the first draw")
    parser.add_argument("--classes", nargs="+", default=None,
                        help="only these classes of the target (default: every class)")
    parser.add_argument("--out", type=Path, default=None,
                        help="sweep folder (default runs/<name>-<K>shot-draws)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value for every run (repeatable)")


def _raw(path: Path, overrides: list[str]) -> dict:
    raw = yaml.safe_load(path.read_text()) if path.exists() else None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} not found or not a mapping")
    for item in overrides:
        apply_override(raw, item)
    return raw


def plan(config: Path, overrides: list[str], draws: int, first: int = 0,
         classes: list[str] | None = None) -> list[tuple[str, str | None, int, RunConfig]]:
    """``(dataset, class, seed, config)`` of every run of the sweep, checked before any runs;
    class None: the run covers every class of the dataset (a one-for-all method)."""
    from edge_inspect.trainer.heads.registry import get_method

    if draws < 1 or first < 0:
        raise ValueError(f"--draws must be >= 1 and --first >= 0, got {draws} and {first}")
    raw = _raw(config, overrides)
    base = RunConfig.from_dict(copy.deepcopy(raw), str(config), config.parent)
    if not base.target_data or base.shots < 1:
        raise ValueError(f"{config}: a shot-draw sweep needs shots >= 1 and a target under data.target")
    runs, found = [], set()
    one_for_all = get_method(base.method).one_for_all
    if one_for_all and classes:
        raise ValueError(f"--classes: {base.method} is one model for every class of the target; "
                         "it cannot be swept one class at a time")
    for i, spec in enumerate(base.target_data):
        names = spec.open(spec.split).class_names
        found |= set(names)
        if one_for_all:
            one = copy.deepcopy(raw)
            one["data"]["target"] = [dict(one["data"]["target"][i])]
            for seed in range(first, first + draws):
                cfg = RunConfig.from_dict(copy.deepcopy(one) | {"seed": seed}, str(config), config.parent)
                runs.append((spec.name, None, seed, cfg))
            continue
        for cls in names:
            if classes and cls not in classes:
                continue
            one = copy.deepcopy(raw)
            target = dict(one["data"]["target"][i])
            if len(names) > 1:
                if "categories" not in OPTIONS[spec.kind]:
                    raise ValueError(f"{spec.name}: {spec.kind} datasets cannot be split by class")
                target["categories"] = [cls]
            one["data"]["target"] = [target]
            for seed in range(first, first + draws):
                cfg = RunConfig.from_dict(copy.deepcopy(one) | {"seed": seed}, str(config), config.parent)
                runs.append((spec.name, cls, seed, cfg))
    unknown = set(classes or ()) - found
    if unknown:
        raise ValueError(f"--classes {sorted(unknown)} not in the target; it has {sorted(found)}")
    return runs


def _finished(run_dir: Path, cfg: RunConfig) -> Path | None:
    """The run's metrics when its evaluation finished; a folder of another config is refused."""
    saved = run_dir / "config.yaml"
    if saved.exists() and saved.read_text() != cfg.to_yaml():  # train writes cfg.to_yaml() there
        raise ValueError(f"{run_dir} holds a run of another config (other shots or overrides); "
                         "give this sweep its own --out")
    metrics = run_dir / f"eval-{cfg.shots}shot" / "metrics.json"
    return metrics if metrics.exists() else None


def sweep(runs: list[tuple[str, str, int, RunConfig]], out: Path) -> dict:
    """Train and evaluate every run not finished yet; returns the summary."""
    from edge_inspect.trainer.evaluate import eval_dir_for, evaluate_run
    from edge_inspect.trainer.fit import train

    per_class: dict[tuple[str, str], list[dict]] = {}
    for n, (dataset, cls, seed, cfg) in enumerate(runs, 1):
        run_dir = out / f"{dataset}-{cls or 'all'}" / f"draw-{seed}"
        metrics = _finished(run_dir, cfg)
        what = f"{dataset}/{cls or 'all classes'} draw {seed}"
        if metrics is None:
            t0 = time.monotonic()
            print(f"[{n}/{len(runs)}] {what}: training", flush=True)
            checkpoint = train(cfg, run_dir, resume=(run_dir / "config.yaml").exists())
            evaluate_run(cfg, checkpoint, eval_dir_for(run_dir, cfg))
            metrics = _finished(run_dir, cfg)
            if metrics is None:
                raise RuntimeError(f"{run_dir}: the evaluation wrote no eval-{cfg.shots}shot/metrics.json")
            print(f"[{n}/{len(runs)}] {what}: done in {time.monotonic() - t0:.0f} s", flush=True)
        else:
            print(f"[{n}/{len(runs)}] {what}: finished before ({metrics})")
        results = json.loads(metrics.read_text())["datasets"][dataset]["classes"]
        for name in [cls] if cls else list(results):
            per_class.setdefault((dataset, name), []).append(
                {"seed": seed} | {k: results[name].get(k) for k in METRICS})
    return summarize(per_class)


def summarize(per_class: dict[tuple[str, str], list[dict]]) -> dict:
    classes = {}
    for (dataset, cls), rows in per_class.items():
        entry = {"draws": rows}
        for k in METRICS:
            values = [r[k] for r in rows if r[k] is not None]
            entry[k] = {"mean": float(np.mean(values)), "std": float(np.std(values))} if values else None
        classes[f"{dataset}/{cls}"] = entry
    mean = {}
    for k in METRICS:
        values = [c[k]["mean"] for c in classes.values() if c[k] is not None]
        mean[k] = float(np.mean(values)) if values else None
    return {"classes": classes, "mean_over_classes": mean}


def table(summary: dict) -> str:
    def cell(v):
        return "-" if v is None else f"{v['mean']:.3f} +- {v['std']:.3f}"

    lines = ["| class | draws | I-AUROC | P-AUROC | AUPRO |", "|---|---|---|---|---|"]
    for name, c in summary["classes"].items():
        lines.append(f"| {name} | {len(c['draws'])} | " + " | ".join(cell(c[k]) for k in METRICS) + " |")
    m = summary["mean_over_classes"]
    lines.append("| **mean** | | " + " | ".join("-" if m[k] is None else f"**{m[k]:.3f}**" for k in METRICS)
                 + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    runs = plan(args.config, args.overrides, args.draws, args.first, args.classes)
    out = args.out or Path("runs") / f"{runs[0][3].name}-{runs[0][3].shots}shot-draws"
    units = len({(d, c) for d, c, _, _ in runs})
    what = "datasets (all classes each)" if runs[0][1] is None else "classes"
    print(f"{len(runs)} runs ({units} {what} x {args.draws} draws) in {out}")
    summary = sweep(runs, out)
    summary["config"] = str(args.config)
    summary["overrides"] = args.overrides
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = table(summary)
    (out / "summary.md").write_text(f"`edge-inspect draws --config {args.config}` "
                                    f"(draws {args.first}..{args.first + args.draws - 1})\n\n{text}\n")
    print(text)
    print(f"summary: {out / 'summary.json'}")
    return 0

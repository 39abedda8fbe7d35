"""Evaluation: per target class, enroll K shots, score the test images, calibrate, draw.

For every class of every target dataset:

1. normal images for the few-shot memory and for calibration come from the class's train
   split (or, for layouts without one, from the test split's normals, which then leave the
   evaluation); a seeded draw picks ``shots`` for the memory and ``calibration.normals``
   held-out normals, of which a head with a reference (the memory head's shift detector and border scales)
   takes the first ``head.reference_normals``;
2. the head scores the test images (image score and map at the input resolution);
3. metrics of the foundation issue (image AUROC / AP / F1-max, pixel AUROC / AP, AUPRO);
4. thresholds: for a target false-alarm rate from the held-out normals (per detector for a
   head with several, calibrated before the test images are scored), and F1-optimal from
   the labelled test images; the stored one is the false-alarm one when there are enough
   normals, else F1;
5. with ``eval.save_enrolled``, an enrolled checkpoint per class (parameters + memory +
   calibration) for export.

Writes ``metrics.json`` (per class and mean), ``roc.png``, ``histograms.png`` and
``overlays/<dataset>-<class>.png`` (worst misses and worst false alarms) per dataset, into
``<out>.partial/`` renamed to ``<out>`` when complete; an existing ``<out>`` is never
overwritten. With ``eval.shot_seeds`` the whole evaluation runs once per shot seed.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from edge_inspect.trainer.calibration import (
    calibrate_detectors,
    calibrate_f1,
    calibrate_false_alarm_rate,
    normals_needed,
)
from edge_inspect.trainer.checkpoint import Checkpoint, atomic_write, load_checkpoint, save_checkpoint
from edge_inspect.trainer.config import RunConfig, build_head
from edge_inspect.trainer.data.batches import BatchLoader
from edge_inspect.trainer.data.registry import DatasetSpec
from edge_inspect.trainer.data.sample import RecordDataset
from edge_inspect.trainer.device import resolve_device
from edge_inspect.trainer.heads.base import AnomalyHead
from edge_inspect.trainer.metrics import evaluate
from edge_inspect.trainer.plots import overlay, plot_histograms, plot_roc, save_sheet

log = logging.getLogger(__name__)
Item = tuple[RecordDataset, int]


def load_head(cfg: RunConfig, checkpoint: Path | None, device: str | None = None) -> AnomalyHead:
    """Build the head and load trained parameters (and a stored memory, if any), on
    ``device`` (default: the config's ``train.device``)."""
    torch.manual_seed(cfg.seed)
    head = build_head(cfg)
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        if ckpt.method != cfg.method:
            raise ValueError(f"{checkpoint} holds a {ckpt.method} head but the config says "
                             f"{cfg.method}")
        head.load_trainable_state(ckpt.params)
        head.load_memory_state(ckpt.memory)
    elif head.trainable_state():
        raise ValueError(f"{cfg.method} has trained parameters: pass --checkpoint "
                         "<run dir>/checkpoint.safetensors (from `edge-inspect train`)")
    return head.to(resolve_device(device or cfg.train["device"])).eval()


def _device(head: AnomalyHead) -> torch.device:
    tensor = next(itertools.chain(head.parameters(), head.buffers()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _class_seed(seed: int, name: str) -> list[int]:
    return [seed, zlib.crc32(name.encode())]


def split_normals(cfg: RunConfig, spec: DatasetSpec, test: RecordDataset,
                  train: RecordDataset | None, cls: str,
                  seed: int | None = None) -> tuple[list[Item], list[Item], list[int]]:
    """Seeded ``(shots, calibration normals, test indices)`` for one class (``seed``: the
    draw's seed, default the config's)."""
    seed = cfg.seed if seed is None else seed
    test_idx = [i for i, r in enumerate(test.records) if r.class_name == cls]
    source = train if train is not None else test
    pool = [i for i, r in enumerate(source.records) if r.class_name == cls and r.label == 0]
    order = np.random.default_rng(_class_seed(seed, cls)).permutation(len(pool))
    k, n_cal = cfg.shots, int(cfg.calibration["normals"])
    if train is None:
        n_cal = min(n_cal, max(0, len(pool) - k - 1))  # keep a normal image to test on
    if len(pool) < k:
        raise ValueError(f"{spec.name}/{cls}: {len(pool)} normal images, {k} shots asked")
    chosen = [pool[j] for j in order[: k + n_cal]]
    shots = [(source, i) for i in chosen[:k]]
    calib = [(source, i) for i in chosen[k:]]
    if train is None:
        taken = set(chosen)
        test_idx = [i for i in test_idx if i not in taken]
    limit = cfg.eval.get("limit")
    if limit and len(test_idx) > limit:
        keep = np.random.default_rng(_class_seed(cfg.seed + 1, cls)).choice(len(test_idx), limit,
                                                                            replace=False)
        # the test subset is the config seed's for every shot seed: seeds differ in shots only
        test_idx = [test_idx[j] for j in sorted(keep)]
    return shots, calib, test_idx


def _image_batches(head: AnomalyHead, loader: BatchLoader, items: list[Item], batch_size: int,
                   desc: str):
    for s in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", leave=False):
        yield loader(items[s:s + batch_size]).images.to(_device(head))


@torch.no_grad()
def _calibrate_detectors(cfg: RunConfig, head: AnomalyHead, loader: BatchLoader,
                         calib: list[Item], desc: str) -> dict:
    """Per-detector thresholds from the calibration normals, set into ``head`` (before the
    test images are scored, since they change the score)."""
    scores = torch.cat([head.detector_scores(b).float().cpu()
                        for b in _image_batches(head, loader, calib, cfg.eval["batch_size"], desc)])
    try:
        cal = calibrate_detectors(scores.numpy(), head.detectors, head.detector_shares,
                                  float(cfg.calibration["false_alarm_rate"]), head.detector_tails)
    except ValueError as exc:
        return {"false_alarm_error": str(exc)}
    head.set_detector_thresholds(torch.tensor([cal.detectors[k]["threshold"] for k in head.detectors]))
    return {"false_alarm": cal.as_dict()}


def enroll_and_calibrate(cfg: RunConfig, head: AnomalyHead, loader: BatchLoader,
                         shots: list[Item], calib: list[Item],
                         desc: str) -> tuple[dict | None, list[Item]]:
    """Enroll the shots, fit the head's reference on the first ``head.reference_normals``
    calibration normals and, for a head with detectors, set their thresholds from the rest.

    Returns the detector calibration (None for a one-score head) and the calibration
    normals left for a threshold on the score.
    """
    if head.learns_from_shots:  # the shots trained it (fit.shot_dataset draws the same ones)
        return None, calib
    if not shots:
        head.clear_memory()
        return None, calib
    head.enroll(loader(shots).images.to(_device(head)))
    reference, calib = calib[:head.reference_normals], calib[head.reference_normals:]
    if head.reference_normals:
        if len(reference) < head.reference_normals:
            raise ValueError(f"{desc}: {len(reference)} held-out normal images, the head's "
                             f"reference needs {head.reference_normals} "
                             "(head.shift_reference)")
        head.fit_reference(_image_batches(head, loader, reference, cfg.eval["batch_size"],
                                          f"{desc} reference"))
    if head.detectors and calib:
        return _calibrate_detectors(cfg, head, loader, calib, f"{desc} calibration"), calib
    return None, calib


def check_reference_normals(cfg: RunConfig, head: AnomalyHead) -> None:
    """Refuse, before anything is written, a config whose held-out normals cannot cover
    the head's reference (the memory head's shift detector and border scales)."""
    r = head.reference_normals
    n = int(cfg.calibration["normals"])
    if r and cfg.shots and n < r:
        target = float(cfg.calibration["false_alarm_rate"])
        need = normals_needed(target, head.detector_shares, head.detector_tails)
        raise ValueError(f"calibration.normals = {n}, but the {cfg.method} head fits its reference "
                         f"(shift detector, border scales) on the first head.shift_reference = {r} "
                         f"of them: set calibration.normals to at least {r + need} ({need} more "
                         f"calibrate a {target:g} false-alarm rate), or head.global_detector: "
                         "window with head.border_rings: 0")


@torch.no_grad()
def score_items(head: AnomalyHead, loader: BatchLoader, items: list[Item], batch_size: int,
                desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Image scores, maps, labels and masks of ``items``."""
    scores, maps, labels, masks = [], [], [], []
    for s in tqdm(range(0, len(items), batch_size), desc=desc, unit="batch", leave=False):
        b = loader(items[s:s + batch_size])
        score, amap = head(b.images.to(_device(head)), *[p.to(_device(head)) for p in b.planes])
        scores.append(score.float().cpu().numpy())
        maps.append(amap.float().cpu().numpy())
        labels.append(b.labels.numpy())
        masks.append(b.masks.numpy())
    if not scores:
        raise ValueError(f"{desc}: no images to score")
    return np.concatenate(scores), np.concatenate(maps), np.concatenate(labels), np.concatenate(masks)


def _calibrate(cfg: RunConfig, head: AnomalyHead, loader: BatchLoader, calib: list[Item],
               labels: np.ndarray, scores: np.ndarray, defects: list[str], desc: str,
               detector_cal: dict | None = None) -> dict:
    out: dict = dict(detector_cal or {})
    target = float(cfg.calibration["false_alarm_rate"])
    if calib and detector_cal is None:
        normal_scores = score_items(head, loader, calib, cfg.eval["batch_size"], desc)[0]
        try:
            out["false_alarm"] = calibrate_false_alarm_rate(normal_scores, target).as_dict()
        except ValueError as exc:
            out["false_alarm_error"] = str(exc)
    if labels.min() != labels.max():
        out["f1"] = calibrate_f1(labels, scores).as_dict()
    out["chosen"] = "false_alarm" if "false_alarm" in out else ("f1" if "f1" in out else None)
    if out["chosen"] and "false_alarm" in out:
        thr = out["false_alarm"]["threshold"]
        normal, anomalous = scores[labels == 0], scores[labels == 1]
        out["test_false_alarm_rate"] = float((normal > thr).mean()) if normal.size else None
        out["test_miss_rate"] = float((anomalous <= thr).mean()) if anomalous.size else None
        kinds = sorted({d for d, y in zip(defects, labels, strict=True) if y == 1})
        out["test_miss_rate_by_defect"] = {
            k: float(np.mean([s <= thr for s, d in zip(scores, defects, strict=True) if d == k]))
            for k in kinds}
    return out


def _sheet(head: AnomalyHead, loader: BatchLoader, items: list[Item], scores: np.ndarray,
           labels: np.ndarray, threshold: float | None, n: int, path: Path) -> None:
    """Overlays of the lowest-scored anomalous and the highest-scored normal test images.

    These are the misses and false alarms when the threshold gets them wrong, and the
    closest calls otherwise; each caption says which.
    """
    bad = np.nonzero(labels == 1)[0]
    good = np.nonzero(labels == 0)[0]
    picks = [i for i in bad[np.argsort(scores[bad])][: (n + 1) // 2]]
    picks += [i for i in good[np.argsort(-scores[good])][: n // 2]]
    if not picks:
        return
    b = loader([items[i] for i in picks])
    with torch.no_grad():
        _, maps = head(b.images.to(_device(head)), *[p.to(_device(head)) for p in b.planes])
    maps = maps.float().cpu()
    vmax = float(maps.max())
    tiles = []
    # captions carry the scores of the evaluation itself (a re-scored batch of picks would
    # differ for a head whose scores depend on the batch)
    for pic, amap, mask, sample, sc in zip(b.pictures, maps.numpy(), b.masks.numpy(), b.samples,
                                           scores[picks], strict=True):
        flagged = threshold is not None and sc > threshold
        if sample.label:
            verdict = "" if threshold is None else (" caught" if flagged else " MISSED")
        else:
            verdict = "" if threshold is None else (" FALSE ALARM" if flagged else " ok")
        what = "anomalous" if sample.label else "normal"
        tiles.append(overlay(pic, amap, mask, vmax,
                             f"{what} {sample.path.name} score {sc:.4g}{verdict}"))
    save_sheet(path, tiles)


def evaluate_dataset(cfg: RunConfig, head: AnomalyHead, spec: DatasetSpec, out_dir: Path,
                     ckpt_params: dict, tag: str, seed: int | None = None) -> dict:
    """Every class of one target dataset; returns its section of metrics.json."""
    loader = BatchLoader(head.backbone.input_size, head.backbone.normalization, cfg.fit_mode,
                         cfg.interpolation, head.planes)
    test = spec.open(spec.split)
    needs_normals = cfg.shots > 0 or cfg.calibration["normals"] > 0
    train = spec.open("train") if spec.has_train_split and needs_normals else None
    classes, curves, hists = {}, {}, {}
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    splits = {cls: split_normals(cfg, spec, test, train, cls, seed) for cls in test.class_names}
    every = [item for shots, _, _ in splits.values() for item in shots]
    memory_images = None  # what an enrolled checkpoint's memory holds, when not the class's shots
    if head.memory_spans_classes:  # one-for-all: every class's shots in one memory
        memory_images = [str(ds.records[i].image) for ds, i in every]
        if every:
            head.enroll(loader(every).images.to(_device(head)))
        else:
            head.clear_memory()
    for cls in test.class_names:
        shots, calib, test_idx = splits[cls]
        head.begin_class(cls)
        if head.memory_spans_classes:
            detector_cal = None
        else:
            detector_cal, calib = enroll_and_calibrate(cfg, head, loader, shots, calib,
                                                       f"{tag}{spec.name}/{cls}")
        if head.scores_depend_on_batch:  # the official test loader: unshuffled, normals first
            test_idx = sorted(test_idx, key=lambda i: test.records[i].label)
        items = [(test, i) for i in test_idx]
        scores, maps, labels, masks = score_items(head, loader, items, cfg.eval["batch_size"],
                                                  f"{tag}{spec.name}/{cls}")
        row: dict = {"n_test": int(labels.size), "n_anomalous": int(labels.sum()),
                     "shots": [str(ds.records[i].image) for ds, i in shots]}
        if labels.min() != labels.max():
            has_masks = bool(masks.any())
            row |= evaluate(labels, scores, masks if has_masks else None,
                            maps if has_masks else None, cfg.eval["aupro"]).as_dict()
        else:
            row["note"] = "only one label among the test images: no AUROC"
        defects = [test.records[i].defect for i in test_idx]
        if head.scores_depend_on_batch:  # normals scored in normal-only batches mean nothing
            row["calibration"] = cal = {"chosen": None, "note": "no threshold: this head's scores "
                                        "depend on the batch (CMAD harmonization per_batch)"}
        else:
            row["calibration"] = cal = _calibrate(cfg, head, loader, calib, labels, scores,
                                                  defects, f"{tag}{spec.name}/{cls} calibration",
                                                  detector_cal)
        chosen = cal[cal["chosen"]] if cal["chosen"] else None
        threshold = chosen["threshold"] if chosen else None
        classes[cls] = row
        curves[cls] = (labels, scores, row.get("image_auroc") or float("nan"))
        hists[cls] = (labels, scores, threshold)
        _sheet(head, loader, items, scores, labels, threshold, int(cfg.eval["overlays"]),
               out_dir / "overlays" / f"{spec.name}-{cls}.png")
        if cfg.eval["save_enrolled"]:
            save_checkpoint(out_dir / "enrolled" / f"{spec.name}-{cls}.safetensors",
                            Checkpoint(cfg.method, cfg.to_yaml(), ckpt_params, head.memory_state(),
                                       chosen, {"dataset": spec.name, "class": cls,
                                                "shots": memory_images or row["shots"]}))
    metric_names = ("image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "aupro")
    mean = {}
    for m in metric_names:
        vals = [r[m] for r in classes.values() if r.get(m) is not None]
        mean[m] = float(np.mean(vals)) if vals else None
    plot_roc(out_dir / f"roc-{spec.name}.png", curves, f"{cfg.name}: {spec.name} ({cfg.shots}-shot)")
    plot_histograms(out_dir / f"histograms-{spec.name}.png", hists,
                    f"{cfg.name}: {spec.name} image scores")
    return {"classes": classes, "mean": mean}


class EvalDirError(ValueError):
    """An evaluation folder that already holds results (they are never overwritten)."""


PARTIAL = ".partial"
OWNER = ".owner"  # inside a .partial folder: the pid writing it


def eval_dir_for(run_dir: Path, cfg: RunConfig) -> Path:
    """``<run>/eval-<K>shot``, or ``-2``, ``-3``... when that already holds results.

    One name for every method; results are never overwritten, so a second evaluation of
    the same run gets the next free name.
    """
    base = run_dir / f"eval-{cfg.shots}shot"
    out, n = base, 1
    while out.exists() or _live_owner(out.with_name(out.name + PARTIAL)) is not None:
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return out


def _live_owner(partial: Path) -> int | None:
    """The pid of a running evaluation that is writing ``partial``, if any (this process's
    own leftovers, from an evaluation that raised, are not running)."""
    try:
        pid = int((partial / OWNER).read_text())
        if pid == os.getpid():
            return None
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _start_partial(out_dir: Path) -> Path:
    """The folder results are written to until they are complete (renamed at the end).

    An existing ``out_dir`` is refused; a ``.partial`` left by an interrupted evaluation is
    incomplete by its name and is replaced.
    """
    if out_dir.exists():
        raise EvalDirError(f"{out_dir} already holds results; pass another --out (nothing was "
                           "changed)")
    partial = out_dir.with_name(out_dir.name + PARTIAL)
    busy = EvalDirError(f"{partial} is being written by another evaluation; wait for it or "
                        "pass another --out")
    if partial.exists():
        if _live_owner(partial) is not None:
            raise busy
        log.warning("removing %s: the incomplete output of an interrupted evaluation", partial)
        shutil.rmtree(partial)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.mkdir()  # exclusive: of two evaluations starting together, one gets it
    except FileExistsError:
        raise busy from None
    (partial / OWNER).write_text(str(os.getpid()))
    return partial


def _seed_mean(per_seed: dict[int, dict]) -> dict:
    """Per dataset: class rows and means averaged over shot seeds, with their spread."""
    first = next(iter(per_seed.values()))
    out = {}
    for name in first:
        runs = [per_seed[s][name] for s in per_seed]
        classes = {}
        for cls in first[name]["classes"]:
            rows = [r["classes"][cls] for r in runs]
            classes[cls] = _mean_rows(rows)
        means = [r["mean"] for r in runs]
        out[name] = {"classes": classes, "mean": _mean_rows(means),
                     "std": {k: float(np.std([m[k] for m in means])) if means[0].get(k) is not None
                             else None for k in means[0]},
                     "per_seed": {str(s): per_seed[s][name]["mean"] for s in per_seed}}
    return out


def _mean_rows(rows: list[dict]) -> dict:
    """The mean of every number (nested dicts too) shared by ``rows``."""
    out: dict = {}
    for key, value in rows[0].items():
        vals = [r.get(key) for r in rows]
        if isinstance(value, bool) or not all(isinstance(v, int | float) for v in vals):
            if isinstance(value, dict) and all(isinstance(v, dict) for v in vals):
                out[key] = _mean_rows(vals)
            continue
        out[key] = float(np.mean(vals))
    return out


def evaluate_run(cfg: RunConfig, checkpoint: Path | None, out_dir: Path) -> dict:
    """Evaluate on every target dataset (every variant the head asks for, every shot seed).

    With ``eval.shot_seeds`` (the few-shot protocol: K shots drawn with each seed), each
    seed writes ``seed-<s>/`` and ``metrics.json`` holds the mean and spread over seeds.
    Results go to ``out_dir.partial`` and are renamed to ``out_dir`` when complete.
    """
    if not cfg.target_data:
        raise ValueError(f"{cfg.source}: no target datasets under data.target to evaluate on")
    head = load_head(cfg, checkpoint)
    check_reference_normals(cfg, head)
    if head.learns_from_shots and cfg.eval["shot_seeds"] and list(cfg.eval["shot_seeds"]) != [cfg.seed]:
        raise ValueError(f"{cfg.method} learns from its shots: one training run per shot draw "
                         f"(seed={cfg.seed} drew this run's); evaluate it without eval.shot_seeds "
                         "and train once per seed for several draws")
    params = {k: v.detach().clone() for k, v in head.trainable_state().items()}
    work = _start_partial(out_dir)
    seeds = list(cfg.eval["shot_seeds"] or [cfg.seed]) if cfg.shots else [cfg.seed]
    variants = head.evaluation_variants()
    by_variant: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        sdir = work if len(seeds) == 1 else work / f"seed-{seed}"
        for variant in variants:
            head.set_variant(variant)
            vdir = sdir if len(variants) == 1 else sdir / variant.replace(":", "-")
            tag = "" if len(variants) == 1 else f"[{variant}] "
            tag += "" if len(seeds) == 1 else f"[seed {seed}] "
            by_variant.setdefault(variant or "default", {})[seed] = {
                spec.name: evaluate_dataset(cfg, head, spec, vdir, params, tag, seed)
                for spec in cfg.target_data}
    # one variant for all seeds: the best on the metrics averaged over the seeds
    results = {v: (per[seeds[0]] if len(seeds) == 1 else _seed_mean(per)) for v, per in by_variant.items()}
    best = max(results, key=lambda v: _overall(results[v]))
    report = {"name": cfg.name, "method": cfg.method, "shots": cfg.shots, "seed": cfg.seed,
              "aupro_protocol": cfg.eval["aupro"],
              "checkpoint": str(checkpoint) if checkpoint else None, "datasets": results[best]}
    if len(variants) > 1:
        report["variant"] = best
        report["variants"] = results
    if len(seeds) > 1:
        report["shot_seeds"] = seeds
        report["seeds"] = {str(s): by_variant[best][s] for s in seeds}
    atomic_write(work / "metrics.json", lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    (work / OWNER).unlink()
    os.replace(work, out_dir)
    return report


def _overall(res: dict) -> float:
    vals = [d["mean"]["image_auroc"] for d in res.values() if d["mean"]["image_auroc"] is not None]
    return float(np.mean(vals)) if vals else float("-inf")


def summary_table(report: dict) -> str:
    """Markdown table of the mean metrics per dataset (what the CLI prints)."""
    lines = ["| dataset | class | I-AUROC | I-AP | I-F1max | P-AUROC | P-AP | AUPRO | threshold |",
             "|---|---|---|---|---|---|---|---|---|"]

    def f(v):
        return "-" if v is None else f"{100 * v:.2f}"

    for name, d in report["datasets"].items():
        for cls, r in d["classes"].items():
            cal = r.get("calibration", {})
            chosen = cal.get(cal.get("chosen")) if cal.get("chosen") else None
            thr = f"{chosen['threshold']:.4g} ({cal['chosen']})" if chosen else "-"
            lines.append(f"| {name} | {cls} | {f(r.get('image_auroc'))} | {f(r.get('image_ap'))} | "
                         f"{f(r.get('image_f1_max'))} | {f(r.get('pixel_auroc'))} | "
                         f"{f(r.get('pixel_ap'))} | {f(r.get('aupro'))} | {thr} |")
        m = d["mean"]
        lines.append(f"| {name} | **mean** | {f(m['image_auroc'])} | {f(m['image_ap'])} | "
                     f"{f(m['image_f1_max'])} | {f(m['pixel_auroc'])} | {f(m['pixel_ap'])} | "
                     f"{f(m['aupro'])} | |")
    return "\n".join(lines)

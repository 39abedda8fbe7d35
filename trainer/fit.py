"""The training loop: phases of Adam steps over auxiliary data, resumable at any step.

State is written every ``checkpoint_every`` steps and at the end of each phase to
``<run>/train_state.pt`` (parameters, optimizer moments, phase and step; tensors and
numbers only, read back with ``weights_only=True``). ``--resume`` continues from it with
the same batch order (batches are a seeded function of the step). At the end the
trainable parameters go to ``<run>/checkpoint.safetensors`` with the resolved config;
``train_log.jsonl`` holds the logged losses and ``loss.png`` draws them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from edge_inspect.trainer.checkpoint import Checkpoint, atomic_write, save_checkpoint
from edge_inspect.trainer.config import RunConfig, build_head
from edge_inspect.trainer.data.batches import BatchLoader, StepBatches
from edge_inspect.trainer.data.sample import ItemDataset, RecordDataset
from edge_inspect.trainer.device import autocast, grad_scaler, resolve_device
from edge_inspect.trainer.feature_cache import FeatureCache
from edge_inspect.trainer.heads.base import AnomalyHead, TrainPhase
from edge_inspect.trainer.heads.registry import get_method
from edge_inspect.trainer.plots import plot_loss

log = logging.getLogger(__name__)
STATE_FILE = "train_state.pt"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "train_log.jsonl"
LOSS_PLOT = "loss.png"
SHOTS = "shots"  # the training set of a head that learns from the target's shots


class RunDirError(ValueError):
    """A run folder that would be overwritten or does not match its config."""


def _started(run_dir: Path) -> bool:
    """Whether a run folder holds any result: a saved step or a checkpoint."""
    return (run_dir / STATE_FILE).exists() or (run_dir / CHECKPOINT_FILE).exists()


def prepare_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    """Create the run folder and write the resolved config; never clobber another run.

    A folder whose earlier start saved nothing (it failed or was interrupted before the
    first saved step) holds no result: it is taken over, so a retry just works, with or
    without ``--resume`` and with a corrected config.
    """
    config_file = run_dir / "config.yaml"
    if config_file.exists() and not _started(run_dir):
        log.info("%s: the earlier start saved no step; starting it again", run_dir)
        (run_dir / LOG_FILE).unlink(missing_ok=True)
        atomic_write(config_file, lambda tmp: tmp.write_text(cfg.to_yaml()))
        return
    if config_file.exists():
        if not resume:
            raise RunDirError(f"{run_dir} already holds a run; pass --resume to continue it or "
                              "--run-dir to start a new one (nothing was changed)")
        if config_file.read_text() != cfg.to_yaml():
            raise RunDirError(f"{config_file} differs from the config given; resume with the "
                              "same config (or start a new --run-dir)")
        return
    if resume:
        raise RunDirError(f"nothing to resume in {run_dir} (no config.yaml)")
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(config_file, lambda tmp: tmp.write_text(cfg.to_yaml()))


def _phase_steps(phase: TrainPhase, steps_per_epoch: int) -> int:
    if phase.steps is not None:
        return int(phase.steps)
    if phase.epochs is None:
        raise ValueError(f"phase {phase.name}: set train.epochs or train.steps")
    return int(phase.epochs) * steps_per_epoch


def learning_rate(train: dict, step: int, steps_per_epoch: int, total: int) -> float:
    """The rate of ``step`` (0-based) of a phase of ``total`` steps: ``train.lr``, or with
    ``train.schedule: cosine`` torch's ``CosineAnnealingLR`` stepped once per epoch with
    ``T_max`` the phase's epochs, in closed form so a resumed run continues it exactly."""
    if train["schedule"] == "constant":
        return float(train["lr"])
    epochs = max(1, math.ceil(total / steps_per_epoch))
    t = step // steps_per_epoch
    lr, low = float(train["lr"]), float(train["eta_min"])
    return low + (lr - low) * (1 + math.cos(math.pi * t / epochs)) / 2


def _save_state(path: Path, head: AnomalyHead, phase: int, step: int,
                optimizer: torch.optim.Optimizer | None,
                scaler: torch.amp.GradScaler | None = None) -> None:
    """Training state; at a phase boundary the next phase starts a fresh optimizer."""
    state = {"phase": phase, "step": step,
             "optimizer": optimizer.state_dict() if optimizer is not None else None,
             "scaler": scaler.state_dict() if scaler is not None else None,
             "params": {k: v.detach().cpu().clone() for k, v in head.trainable_state().items()}}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _truncate_log(log_file: Path, phase_names: list[str], phase: int, step: int) -> None:
    """Drop log records after the resumed point (they are about to be run again)."""
    if not log_file.exists():
        return
    order = {name: i for i, name in enumerate(phase_names)}
    keep = []
    for line in log_file.read_text().splitlines():
        r = json.loads(line)
        at = order.get(r.get("phase"), len(phase_names))
        if at < phase or (at == phase and r.get("step", 0) <= step):
            keep.append(line)
    atomic_write(log_file, lambda tmp: tmp.write_text("".join(k + "\n" for k in keep)))


def shot_dataset(cfg: RunConfig) -> RecordDataset:
    """The K shots of every target class, drawn as the evaluation draws them (same seed), so
    a head that learns from its shots (PIRN) never sees the calibration or test images."""
    from edge_inspect.trainer.evaluate import split_normals

    if cfg.shots < 1 or not cfg.target_data:
        raise ValueError(f"{cfg.source}: {cfg.method} trains on the target's shots: set shots >= 1 "
                         "and list the target under data.target")
    if cfg.train_data:
        raise ValueError(f"{cfg.source}: {cfg.method} trains on the target's shots, not on "
                         "auxiliary data; remove data.train")
    items = []
    for spec in cfg.target_data:
        test = spec.open(spec.split)
        train = spec.open("train") if spec.has_train_split else None
        for cls in test.class_names:
            items += split_normals(cfg, spec, test, train, cls)[0]
    return ItemDataset(items, f"{cfg.shots} shots per class of {', '.join(s.name for s in cfg.target_data)}")


def train(cfg: RunConfig, run_dir: Path, resume: bool = False) -> Path:
    """Train the head the config describes; returns the checkpoint path.

    The head, the data and the phases are checked before the run folder is written, so a
    config mistake leaves nothing behind.
    """
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.train["device"])
    amp = cfg.train["amp"]
    autocast(device, amp)  # refuses fp16 on the CPU before anything is written
    head = build_head(cfg).to(device)
    training = get_method(cfg.method).training
    if head.learns_from_shots:
        datasets = {SHOTS: shot_dataset(cfg)}
        log.info("training on the target's shots: %r", datasets[SHOTS])
    else:
        datasets = {d.name: d.open() for d in cfg.train_data}
        for d in cfg.train_data:
            log.info("auxiliary %s: %r", d.name, datasets[d.name])
    phases = training.phases(head, list(datasets), cfg.train)
    if phases:
        training.check_data(head, datasets)
    if phases and not datasets:
        raise ValueError(f"{cfg.source}: {cfg.method} trains on auxiliary data; list it under data.train")
    prepare_run_dir(cfg, run_dir, resume)
    log.info("training on %s (amp %s)", device, amp)
    start_phase, start_step, opt_state, scaler_state = 0, 0, None, None
    state_file = run_dir / STATE_FILE
    if resume and state_file.exists():
        # on the CPU: the optimizer moves its moments to the parameters' device itself and
        # keeps Adam's step counters on the CPU, where they belong
        state = torch.load(state_file, weights_only=True, map_location="cpu")
        head.load_trainable_state(state["params"])
        start_phase, start_step, opt_state = state["phase"], state["step"], state["optimizer"]
        scaler_state = state.get("scaler")
        log.info("resuming at phase %d step %d", start_phase, start_step)
        _truncate_log(run_dir / LOG_FILE, [ph.name for ph in phases], start_phase, start_step)
    loader = BatchLoader(head.backbone.input_size, head.backbone.normalization, cfg.fit_mode,
                         cfg.interpolation, head.planes)
    log_file = run_dir / LOG_FILE
    on_gpu = device.type == "cuda"
    for p, phase in enumerate(phases):
        if p < start_phase:
            continue
        source = StepBatches([datasets[n] for n in phase.datasets], cfg.train["batch_size"],
                             (cfg.seed, p), loader, cfg.train["sampling"])
        total = _phase_steps(phase, source.steps_per_epoch)
        phase.records = [ds.records[i] for ds, i in source.items]
        optimizer = torch.optim.Adam(phase.parameters, lr=cfg.train["lr"],
                                     betas=tuple(cfg.train["betas"]),
                                     weight_decay=cfg.train["weight_decay"])
        scaler = grad_scaler(device, amp)
        first = start_step if p == start_phase else 0
        if p == start_phase and opt_state is not None:
            optimizer.load_state_dict(opt_state)
            if scaler is not None and scaler_state:
                scaler.load_state_dict(scaler_state)
        if first >= total:
            continue
        if first == 0:
            init = [tuple(t.to(device) for t in source[s][:3])
                    for s in range(min(training.init_batches, total))]
            with autocast(device, amp):
                training.begin_phase(head, phase, init)
        cache = (FeatureCache(int(cfg.train["cache_gb"] * 1e9), cfg.train["cache_dtype"])
                 if cfg.train["cache_features"] and training.caches_features else None)
        batches = torch.utils.data.DataLoader(source, batch_size=None, sampler=range(first, total),
                                              num_workers=cfg.train["workers"], pin_memory=on_gpu)
        head.train()
        bar = tqdm(batches, total=total, initial=first, desc=f"train {phase.name}", unit="step")
        t0 = time.perf_counter()
        for step, (images, labels, masks, keys, planes) in enumerate(bar, start=first):
            images = images.to(device, non_blocking=True)
            labels, masks = labels.to(device, non_blocking=True), masks.to(device, non_blocking=True)
            planes = tuple(p.to(device, non_blocking=True) for p in planes)
            lr = learning_rate(cfg.train, step, source.steps_per_epoch, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, amp):
                if cache is not None:
                    inputs = cache.features(keys.tolist(), images,
                                            lambda *x: training.frozen_features(head, *x), planes)
                else:
                    with torch.no_grad():
                        inputs = training.frozen_features(head, images, *planes)
                extra = {"keys": keys.tolist()} if training.uses_sample_records else {}
                loss, parts = training.loss(head, inputs, labels, masks, phase, **extra)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at phase {phase.name} step "
                                         f"{step}; lower train.lr (state kept at the last save)")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            done = step + 1
            if done % cfg.train["log_every"] == 0 or done == total:
                record = {"phase": phase.name, "step": done, "loss": loss.item(), "lr": lr, **parts,
                          "seconds": round(time.perf_counter() - t0, 3)}
                with log_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            if done % cfg.train["checkpoint_every"] == 0 and done < total:
                _save_state(state_file, head, p, done, optimizer, scaler)
        if cache is not None:
            log.info("feature cache: %d images, %.2f GB, %d hits / %d computed", len(cache),
                     cache.bytes / 1e9, cache.hits, cache.misses)
        _save_state(state_file, head, p + 1, 0, None)
        head.eval()
        if log_file.exists():
            plot_loss(run_dir / LOSS_PLOT, log_file, f"{cfg.name}: training loss")
    path = save_checkpoint(run_dir / CHECKPOINT_FILE,
                           Checkpoint(cfg.method, cfg.to_yaml(), head.trainable_state()))
    log.info("wrote %s", path)
    return path

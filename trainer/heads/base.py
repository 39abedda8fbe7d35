"""What every method offers the fit / evaluate loops, the checkpoint and the exporter."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from edge_inspect.trainer.backbones.base import Backbone


@dataclass
class TrainPhase:
    """One stretch of optimisation: which auxiliary datasets feed which parameters.

    AF-CLIP has one phase over all auxiliary data; CMAD one phase per auxiliary dataset
    (each dataset trains its own prototype set). ``steps`` counts optimiser steps; when
    None the phase runs ``epochs`` passes over its data.
    """

    name: str
    datasets: list[str]
    parameters: list[nn.Parameter] = field(repr=False)
    epochs: int | None = None
    steps: int | None = None
    context: dict = field(default_factory=dict)
    # The phase's samples in the order of the batches' keys (the fit loop sets them): a
    # loss that needs a sample's class or defect type reads ``records[key]``.
    records: list = field(default_factory=list, repr=False)


class MethodTraining:
    """How a method trains its head (a method package's ``train.py``): phases and losses.

    Kept apart from the model (``model.py``, the export target) as anomalib keeps a plain
    torch model apart from its training glue. The default trains nothing (the few-shot
    memory method).
    """

    defaults: dict = {}  # the paper's epochs / steps, batch size, lr, betas
    # True when frozen_features returns per-sample tensors that do not change during
    # training (frozen backbone, no augmentation): the fit loop may cache them.
    caches_features: bool = False
    # True when :meth:`loss` needs each sample's dataset record (class, defect type, path):
    # the fit loop then passes the batch's ``keys``, indices into ``phase.records``.
    uses_sample_records: bool = False

    # Batches :meth:`begin_phase` looks at (CMAD's prototype init); 0: it needs none.
    init_batches: int = 4

    def check_data(self, head: AnomalyHead, datasets: dict) -> None:
        """Refuse training data the method cannot use (``{name: RecordDataset}``), before the
        run folder is written."""

    def phases(self, head: AnomalyHead, datasets: list[str], settings: dict) -> list[TrainPhase]:
        """The phases that train ``head`` on the named auxiliary datasets (none: no training)."""
        return []

    def begin_phase(self, head: AnomalyHead, phase: TrainPhase,
                    batches: list[tuple[torch.Tensor, ...]]) -> None:
        """Called once before a phase's first step with its first batches (data-driven init)."""

    def frozen_features(self, head: AnomalyHead, images: torch.Tensor, *planes: torch.Tensor):
        """What :meth:`loss` needs from the frozen backbone, computed without gradients:
        ``{name: (B, ...)}`` when ``caches_features``; by default the images themselves.
        ``planes``: the head's further input planes (:attr:`AnomalyHead.planes`)."""
        return images

    def loss(self, head: AnomalyHead, inputs, labels: torch.Tensor,
             masks: torch.Tensor, phase: TrainPhase) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one batch; ``inputs`` is what :meth:`frozen_features` returned. With
        :attr:`uses_sample_records` it is also called with ``keys=`` (see there)."""
        raise NotImplementedError(f"{head.method} has nothing to train")


class AnomalyHead(nn.Module):
    """A frozen backbone plus a method's head.

    ``forward(images)`` returns ``(image_score (B,), anomaly_map (B, H, W))`` at the input
    resolution, after the method's own post-processing: exactly what the exported graph
    computes. Subclasses set ``method`` and ``backbone`` and override what applies.
    """

    method: str = ""
    backbone: Backbone
    # True when an image's score depends on the other images of its batch (CMAD's per-batch
    # harmonization): evaluation reproduces the official batching, export refuses.
    scores_depend_on_batch: bool = False
    # Held-out normal images (beyond the K shots) the memory fits a reference on; evaluation
    # takes them first from the calibration normals (the memory head's shift detector).
    reference_normals: int = 0
    # Named detectors whose threshold-scaled maximum is the image score: calibration gives
    # each its share of the false-alarm budget (``detector_shares``) and its own threshold.
    # Empty: one score, one threshold.
    detectors: tuple[str, ...] = ()
    detector_shares: tuple[float, ...] = ()
    detector_tails: tuple[str, ...] = ()  # "conformal" or "gumbel" (runtime.calibration)
    # Raw planes the head takes after the RGB image, in order (``xyz`` / ``depth``: PIRN's
    # 3D plane); each is ``(B, C, H, W)`` float32 at the input size, not normalized.
    planes: tuple[str, ...] = ()
    # True when the K shots train the head (PIRN, IIPAD): ``train`` fits on the shots the
    # evaluation draws; the evaluation enrolls nothing, unless the head's memory spans the
    # classes (below), which it fills from the same shots.
    learns_from_shots: bool = False
    # True when one memory holds the shots of every class of a target dataset and the head
    # finds an image's class itself (IIPAD, one-for-all): the evaluation enrolls every
    # class's shots once, then scores each class against that one memory.
    memory_spans_classes: bool = False
    # True when the memory tensors have a fixed size (IIPAD: ``capacity`` entries and a
    # validity mask): the exported graph's memory inputs get no dynamic axis.
    memory_capacity_fixed: bool = False
    # The tensor a carried-state bundle feeds from one frame of a camera to its next (PIRN's
    # refined prototypes); None: the head is stateless. See :meth:`forward_carried`.
    carried_state: str | None = None

    def check_exportable(self) -> None:
        """Raise a ValueError naming the setting when this head cannot become a bundle."""

    def forward(self, images: torch.Tensor, *planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, H, W)`` normalized images (and the :attr:`planes`) -> image scores ``(B,)``
        and maps ``(B, H, W)``."""
        score, amap, _ = self.forward_with_features(images, *planes)
        return score, amap

    def forward_with_features(
        self, images: torch.Tensor, *planes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Scores, maps, and the named features from which :meth:`enroll` builds the memory
        (export makes them graph outputs, so a bundle can be enrolled without torch)."""
        raise NotImplementedError

    def initial_state(self) -> torch.Tensor:
        """The :attr:`carried_state` a camera starts from (no batch axis)."""
        raise NotImplementedError(f"{self.method} carries no state between frames")

    def forward_carried(self, images: torch.Tensor, *planes: torch.Tensor,
                        state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores, maps and the next state from ``state`` ``(B, *initial_state().shape)``."""
        raise NotImplementedError(f"{self.method} carries no state between frames")

    def baked_constants(self) -> dict:
        """What :meth:`freeze_constants` bakes, for the bundle's manifest (empty: nothing)."""
        return {}

    def begin_class(self, class_name: str) -> None:
        """Evaluation scores the class ``class_name`` next (KAnoCLIP writes it into its prompts)."""

    def freeze_constants(self) -> None:
        """Compute what is constant at inference (e.g. text features) so an export bakes it."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Named trainable parameters: all that a checkpoint stores besides memories."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`trainable_state` tensors; any missing or unexpected name is an error."""
        own = self.trainable_state()
        missing, unexpected = set(own) - set(state), set(state) - set(own)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not fit this {self.method} head: missing "
                             f"{sorted(missing)}, unexpected {sorted(unexpected)}")
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"the head expects {tuple(own[name].shape)}; was it trained "
                                 "with another backbone or config?")
            with torch.no_grad():
                own[name].copy_(tensor)

    def evaluation_variants(self) -> list[str | None]:
        """Settings the evaluator should run one after another (None: the configured one)."""
        return [None]

    def set_variant(self, variant: str | None) -> None:
        """Switch to one of :meth:`evaluation_variants`."""

    def enroll(self, shots: torch.Tensor) -> None:
        """Build the few-shot memory from K normal images ``(K, 3, H, W)``."""
        raise NotImplementedError(f"{self.method} has no few-shot memory")

    def fit_reference(self, batches) -> None:
        """Fit what the memory needs from ``reference_normals`` held-out normal images."""

    def detector_scores(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, len(detectors))`` unscaled scores of each of :attr:`detectors`."""
        raise NotImplementedError(f"{self.method} has one score, no detectors")

    def set_detector_thresholds(self, thresholds: torch.Tensor) -> None:
        """Per-detector thresholds from calibration (the decision threshold becomes 1)."""
        raise NotImplementedError(f"{self.method} has one score, no detectors")

    def clear_memory(self) -> None:
        """Back to the zero-shot model."""

    def memory_state(self) -> dict[str, torch.Tensor]:
        """The few-shot memory as named tensors (empty without one)."""
        return {}

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise NotImplementedError(f"{self.method} has no few-shot memory")


class BankMemory:
    """Few-shot memory as one L2-normalized patch bank per token set, stacked ``(S, M, C)``.

    AF-CLIP+ (a bank per aggregated set) and CMAD's Visual Discrepancy Inference (a bank
    per tap) store the same thing; heads mix this in and say how many sets they have.
    """

    bank: torch.Tensor | None = None
    memory_name = "memory"

    def memory_sets(self) -> int:
        raise NotImplementedError

    def set_bank(self, features: list[torch.Tensor]) -> None:
        """``features``: one ``(K, N, C)`` tensor of shot patches per set."""
        self.bank = torch.stack([F.normalize(f.reshape(-1, f.shape[-1]), dim=-1) for f in features])

    def clear_memory(self) -> None:
        self.bank = None

    def memory_state(self) -> dict[str, torch.Tensor]:
        return {} if self.bank is None else {"bank": self.bank}

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        """Use the stored bank as it is (an exported graph binds its input here)."""
        if not state:
            self.clear_memory()
            return
        n = self.memory_sets()
        bank = state.get("bank")
        if set(state) != {"bank"} or bank.ndim != 3 or bank.shape[0] != n:
            raise ValueError(f"{self.memory_name} memory must be one tensor 'bank' of shape ({n}, M, C), "
                             f"got { {k: tuple(v.shape) for k, v in state.items()} }")
        self.bank = bank.float()

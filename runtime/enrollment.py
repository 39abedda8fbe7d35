"""Few-shot memory from a bundle's own feature outputs, in numpy (no torch).

``edge-inspect enroll`` runs the bundle's graph on K normal images, takes its
``feature.*`` outputs and rebuilds the memory exactly as the trainer's ``enroll`` does,
following the **recipe** the manifest names (``memory.recipe``; a method's spec chooses it,
so enrollment needs neither the trainer nor its config):

* ``bank_per_set`` (AF-CLIP+, CMAD's Visual Discrepancy Inference): one L2-normalized bank
  per token set / tap, ``(sets, K * N, C)``;
* ``patch_memory`` (the memory method): the standardized (or normalized) patch bank with
  its mean and std, the fold reference (each shot's top and bottom halves scored against
  the rest; mean of maxima), and the global detector: ``global_detector: shift`` -- mean
  and inverse covariance of the image-mean features of ``reference_images`` held-out
  normal images; ``window`` (and recipes without the key) -- of the shots' window-mean
  features, with the recipe's window and stride. Recipes with ``border_rings`` also carry
  ``local.position_scale``: each outer ring's ``border_quantile`` quantile of the
  reference normals' patch scores over the interior's (ones for 0 rings). Recipes that
  Recipes with ``shot_turns`` > 1 take the features of the shots followed by their turned
  copies (:func:`quarter_turns`, applied to the frames before the graph): all of them go
  into the bank, the unturned shots alone give the fold reference and the window Gaussian.
  Recipes that
  name ``detectors`` also carry per-detector thresholds (``detector_threshold``, 1 until calibrated:
  ``edge-inspect enroll`` sets them from its calibration images);
* ``category_aware`` (IIPAD): one entry per image -- its keys, memory features and prompt
  embeddings (the graph's ``feature.keys`` / ``feature.memory`` / ``feature.prompts``, already
  normalized) -- in arrays of the recipe's fixed ``capacity`` with a validity mask; with
  ``existing`` (``enroll --append``) the new entries follow the bundle's valid ones, so a new
  category joins the others.

Tests compare every array with the torch enrollment of the same shots.
"""

from __future__ import annotations

import numpy as np


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def bank_per_set(features: np.ndarray) -> np.ndarray:
    """``(sets, K, N, C)`` -> ``(sets, K * N, C)`` normalized banks."""
    s, k, n, c = features.shape
    return _normalize(features.reshape(s, k * n, c).astype(np.float64)).astype(np.float32)


def _nearest(query: np.ndarray, bank: np.ndarray, metric: str) -> np.ndarray:
    if metric == "cosine":
        return ((1.0 - query @ bank.T) / 2.0).min(axis=1)
    d2 = (query**2).sum(1)[:, None] - 2 * query @ bank.T + (bank**2).sum(1)[None]
    return np.sqrt(np.maximum(d2, 0.0)).min(axis=1)


def quarter_turns(frames: np.ndarray, turns: int) -> np.ndarray:
    """``(K, H, W, ...)`` frames -> ``(turns * K, H, W, ...)``: the frames, then each turned by
    ``360 / turns`` degrees more, in the trainer's order (``turns`` in 1, 2, 4)."""
    if turns not in (1, 2, 4):
        raise ValueError(f"shot_turns must be 1, 2 or 4, got {turns}")
    if turns == 4 and frames.shape[1] != frames.shape[2]:
        raise ValueError(f"4 shot turns need square frames, got {frames.shape[1]}x{frames.shape[2]}")
    step = 4 // turns
    return np.concatenate([np.rot90(frames, t * step, axes=(1, 2)) for t in range(turns)])


def patch_memory(local: np.ndarray, metric: str, grid: tuple[int, int],
                 shots: int | None = None) -> dict[str, np.ndarray]:
    """``local (K', N, C)`` -> bank, mean, std and the fold reference of the memory head (the
    bank holds all K' images; the fold reference uses the first ``shots``, default all)."""
    k, n, c = local.shape
    flat = local.reshape(-1, c).astype(np.float64)
    if metric == "standardized":
        mean, std = flat.mean(0), np.maximum(flat.std(0, ddof=1), 1e-6)
        bank = (flat - mean) / std
    elif metric == "cosine":
        mean, std = np.zeros(c), np.ones(c)
        bank = _normalize(flat)
    else:
        raise ValueError(f"memory metric {metric!r} unknown")
    k = k if shots is None else shots
    per_shot = bank[:k * n].reshape(k, n, c)
    top = (np.arange(n) // grid[1]) < grid[0] // 2
    maxima = []
    for shot in range(k):
        for half in (top, ~top):
            keep = np.ones((k, n), bool)
            keep[shot, half] = False
            maxima.append(_nearest(per_shot[shot, half], per_shot[keep], metric).max())
    return {"local.bank": bank.astype(np.float32), "local.mean": mean.astype(np.float32),
            "local.std": std.astype(np.float32),
            "local_reference": np.asarray(np.mean(maxima), np.float32)}


def _gaussian(x: np.ndarray, ridge: float, what: str) -> dict[str, np.ndarray]:
    """``global.mean`` and ``global.precision`` of the rows of ``x`` ``(n, C)`` (ridge relative
    to the mean variance, as the trainer's ``fit_gaussian``)."""
    n, c = x.shape
    if n <= c + 1:
        raise ValueError(f"{n} {what} cannot estimate a {c}-d covariance; give more than {c + 1}")
    cov = np.cov(x.T)
    cov = cov + ridge * np.diag(cov).mean() * np.eye(c)
    return {"global.mean": x.mean(0).astype(np.float32),
            "global.precision": np.linalg.inv(cov).astype(np.float32)}


def window_gaussian(grids: np.ndarray, window: int, stride: int,
                    ridge: float = 1e-6) -> dict[str, np.ndarray]:
    """``grids (K, C, rows, cols)`` -> mean and precision of window-mean features."""
    k, c, rows, cols = grids.shape
    g = grids.astype(np.float64)
    starts_r = range(0, rows - window + 1, stride)
    starts_c = range(0, cols - window + 1, stride)
    w = np.stack([g[:, :, r:r + window, q:q + window].mean(axis=(2, 3))
                  for r in starts_r for q in starts_c], axis=1).reshape(-1, c)
    return _gaussian(w, ridge, "windows")


def patch_scores(local: np.ndarray, memory: dict[str, np.ndarray], metric: str) -> np.ndarray:
    """``local (n, N, C)`` -> ``(n, N)`` patch scores of the memory (nearest distance over
    the fold reference, before border scaling), as the trainer's local detector."""
    bank = memory["local.bank"].astype(np.float64)
    out = []
    for image in local.astype(np.float64):
        q = _normalize(image) if metric == "cosine" else (image - memory["local.mean"]) / memory["local.std"]
        out.append(_nearest(q, bank, metric))
    return np.stack(out) / float(memory["local_reference"])


def border_rings(grid: tuple[int, int]) -> np.ndarray:
    """``(rows * cols,)`` each patch's distance in patches to the grid's edge."""
    r, c = np.arange(grid[0])[:, None], np.arange(grid[1])[None, :]
    return np.minimum(np.minimum(r, grid[0] - 1 - r), np.minimum(c, grid[1] - 1 - c)).ravel()


def border_scale(patch: np.ndarray, grid: tuple[int, int], rings: int, quantile: float) -> np.ndarray:
    """``(n, N)`` reference patch scores -> ``(N,)`` divisors, 1 inside the outer ``rings``
    and for a ring whose quantile or the interior's is 0 (as the trainer's)."""
    ring = border_rings(grid)
    inner = float(np.quantile(patch[:, ring >= rings], quantile))
    scale = np.ones(ring.size)
    for k in range(rings):
        edge = float(np.quantile(patch[:, ring == k], quantile))
        if edge > 0 and inner > 0:
            scale[ring == k] = edge / inner
    return scale.astype(np.float32)


def image_shift(grids: np.ndarray, ridge: float = 1e-6) -> dict[str, np.ndarray]:
    """``grids (n, C, rows, cols)`` of held-out normals -> mean and precision of image means."""
    return _gaussian(grids.astype(np.float64).mean(axis=(2, 3)), ridge, "reference normal images")


def bank_recipe(params: dict, features: dict[str, np.ndarray],
                reference: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``bank_per_set``: the feature ``(sets, K, N, C)`` as normalized banks ``{"bank": ...}``."""
    return {"bank": bank_per_set(features[params.get("feature", "features")])}


def patch_memory_recipe(params: dict, features: dict[str, np.ndarray],
                        reference: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``patch_memory``: the memory head's patch bank, its border scales (with
    ``border_rings``), its global detector (with ``use_global``) and, when the recipe names
    detectors, thresholds of 1."""
    rows_cols = features["global"].shape[-2:] if "global" in features else params.get("grid")
    grid = _grid(rows_cols, features["local"].shape[1])
    turns = int(params.get("shot_turns", 1))
    if features["local"].shape[0] % turns:
        raise ValueError(f"{features['local'].shape[0]} shot feature rows are not {turns} turns of "
                         "the same shots; pass the frames through quarter_turns")
    shots = features["local"].shape[0] // turns
    memory = patch_memory(features["local"], params["metric"], grid, shots)
    rings = int(params.get("border_rings", 0))
    shift = params["use_global"] and params.get("global_detector", "window") == "shift"
    if (shift or rings) and (reference is None or "local" not in reference):
        raise ValueError("the memory's shift detector and border scales need the features of "
                         "reference normal images")
    if "border_rings" in params:
        memory["local.position_scale"] = (
            border_scale(patch_scores(reference["local"], memory, params["metric"]), grid, rings,
                         float(params["border_quantile"]))
            if rings else np.ones(features["local"].shape[1], np.float32))
    if shift:
        memory |= image_shift(reference["global"])
    elif params["use_global"]:
        memory |= window_gaussian(features["global"][:shots], params["window"], params["stride"])
    if params.get("detectors"):
        memory["detector_threshold"] = np.ones(len(params["detectors"]), np.float32)
    return memory


def reference_images(recipe: dict | None) -> int:
    """Held-out normal images (beyond the shots) the recipe fits a reference on."""
    return int((recipe or {}).get("reference_images", 0))


def category_aware_recipe(params: dict, features: dict[str, np.ndarray],
                          reference: dict[str, np.ndarray] | None = None,
                          existing: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """``category_aware``: ``existing``'s valid entries (none without it), then one per shot."""
    cap, k = int(params["capacity"]), int(params["retrieve"])
    new = {"keys": features["keys"], "bank": features["memory"], "prompts": features["prompts"]}
    old = {}
    if existing is not None:
        if existing["valid"].shape[0] != cap:
            raise ValueError(f"the bundle's memory has {existing['valid'].shape[0]} rows, its recipe "
                             f"says {cap}: the bundle is inconsistent, re-export it")
        keep = existing["valid"] > 0.5  # valid rows wherever they are
        old = {name: existing[name][keep] for name in new}
        if new["keys"].shape[0] < k:
            raise ValueError(f"a new category needs at least {k} shots: the bundle retrieves {k} "
                             "memory entries per frame")
    n_old = old["keys"].shape[0] if old else 0
    n = n_old + new["keys"].shape[0]
    if n > cap:
        raise ValueError(f"{n} memory entries ({n_old} in the bundle + {n - n_old} shots) exceed its "
                         f"capacity of {cap}: evaluate the run with --set head.capacity=<more> and "
                         "export that enrolled checkpoint")
    if n < k:
        raise ValueError(f"{n} memory entries, but the bundle retrieves {k} per frame: enroll at "
                         f"least {k - n_old} shots")
    out = {}
    for name, rows in new.items():
        arr = np.zeros((cap, *rows.shape[1:]), np.float32)
        if n_old:
            arr[:n_old] = old[name]
        arr[n_old:n] = rows
        out[name] = arr
    out["valid"] = (np.arange(cap) < n).astype(np.float32)
    return out


# Recipe kinds a manifest may name (``memory.recipe.kind``); a method's spec picks one.
RECIPES = {"bank_per_set": bank_recipe, "patch_memory": patch_memory_recipe,
           "category_aware": category_aware_recipe}
APPENDABLE = ("category_aware",)  # recipes whose memory can grow by ``enroll --append``


def build_memory(recipe: dict | None, features: dict[str, np.ndarray],
                 reference: dict[str, np.ndarray] | None = None,
                 existing: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """The memory arrays from a bundle's feature outputs (batch = shots; ``reference``: of
    the :func:`reference_images` held-out normals), as its recipe says; ``existing``: the
    bundle's memory, kept and added to (:data:`APPENDABLE` recipes only)."""
    kind = (recipe or {}).get("kind")
    if kind not in RECIPES:
        raise ValueError(f"memory recipe {kind!r} unknown to this runtime (it knows {list(RECIPES)}); "
                         "re-export the bundle or upgrade edge-inspect")
    if existing is not None:
        if kind not in APPENDABLE:
            raise ValueError(f"--append: a {kind} memory holds one part's shots and cannot grow; "
                             "enroll without --append to replace it")
        return RECIPES[kind](recipe, features, reference, existing)
    return RECIPES[kind](recipe, features, reference)


def _grid(rows_cols, n: int) -> tuple[int, int]:
    if rows_cols is not None:
        return int(rows_cols[0]), int(rows_cols[1])
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"cannot infer the patch grid of {n} patches")
    return side, side

"""The real CLIP BPE tokenizer, taken from the open-clip-torch package without importing it.

``open_clip/tokenizer.py`` (OpenAI's tokenizer, with its 49,408-token vocabulary file
``bpe_simple_vocab_16e6.txt.gz`` beside it) needs only ftfy, regex, numpy and torch, but
``import open_clip`` runs the package's ``__init__``, which imports torchvision, and
torchvision does not import beside the CPU build of torch. So we locate the installed
package with ``importlib.util.find_spec`` (which does not execute ``__init__``) and load
``tokenizer.py`` alone as a private module. open-clip-torch itself is installed with
``--no-deps`` (see .ci/setup) so that pip never pulls torchvision and a CUDA torch.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import torch

_MODULE_NAME = "_edge_inspect_open_clip_tokenizer"
_INSTALL_HINT = ("install it without its torchvision dependency: "
                 "`pip install --no-deps open-clip-torch==3.3.0` (bash .ci/setup does this)")


def _tokenizer_module() -> ModuleType:
    if _MODULE_NAME in sys.modules:
        return sys.modules[_MODULE_NAME]
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the CLIP tokenizer needs the open-clip-torch package; {_INSTALL_HINT}")
    source = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    if not source.exists():
        raise ImportError(f"{source} not found; reinstall open-clip-torch ({_INSTALL_HINT})")
    module_spec = importlib.util.spec_from_file_location(_MODULE_NAME, source)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[_MODULE_NAME] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception:
        del sys.modules[_MODULE_NAME]
        raise
    return module


@lru_cache(maxsize=1)
def load_tokenizer():
    """open_clip's ``SimpleTokenizer`` with OpenAI's BPE vocabulary (context length 77)."""
    return _tokenizer_module().SimpleTokenizer()


def tokenize(texts: str | list[str], context_length: int = 77) -> torch.Tensor:
    """``(N, context_length)`` int64 token ids: SOT, BPE tokens, EOT, zero padding.

    Over-long texts are cut and still end with EOT (open_clip's behaviour).
    """
    return load_tokenizer()(texts, context_length=context_length).long()


def vocab_size() -> int:
    """Number of tokens in the vocabulary (49,408 for OpenAI CLIP)."""
    return len(load_tokenizer().encoder)

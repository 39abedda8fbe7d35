"""KAnoCLIP's LLM-VQA knowledge base (section 2.2.1) as plain, versioned YAML files.

The paper asks an LLM (GPT-3.5) for n = 5 general anomaly descriptions per class and a VQA
model (Llama3) for m = 1 description per image. Neither runs here, so the knowledge is a
file a user can read, edit or regenerate offline (``configs/kanoclip/knowledge/``)::

    version: 1
    dataset: mvtec
    classes:
      metal_nut:
        words: metal nut            # the [class] of the prompts
        general: [...]              # the LLM's role: descriptions of the class's anomalies
        fine:                       # the VQA's role, per defect type (the dataset's name)
          scratch: [...]
    images:                         # optional per-image texts (a user's own VQA answers)
      metal_nut/test/scratch/000.png: [...]

An image's anchor texts (Eq. 3) are its class's ``general`` texts, the ``fine`` texts of its
defect type (averaged into one answer: ``train.knowledge_anchors``), and the ``images``
texts whose key ends its path. Every text must fit CLIP's
77 tokens; a file that does not load gets a one-line error naming it, the class and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from edge_inspect.trainer.backbones.clip_tokenizer import load_tokenizer

FORMAT_VERSION = 1
CONTEXT_LENGTH = 77
REPO_ROOT = Path(__file__).resolve().parents[3]  # a relative knowledge path may name a repo file


class KnowledgeError(ValueError):
    """A knowledge file that cannot be used, named with the class and the fix."""


@dataclass
class ClassKnowledge:
    """What the knowledge base says about one class."""

    words: str
    general: list[str]
    fine: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Knowledge:
    """Classes and per-image texts merged from one or more files (``sources``)."""

    classes: dict[str, ClassKnowledge]
    images: dict[str, list[str]]
    sources: list[str]

    def require(self, class_name: str) -> ClassKnowledge:
        """The class's entry; a class no file lists is an error naming the files and the fix."""
        if class_name not in self.classes:
            raise KnowledgeError(
                f"knowledge file(s) {', '.join(self.sources)} have no class {class_name!r}: add a "
                f"'{class_name}:' entry under classes (words and 5 general descriptions), or list "
                "a file that has it under head.knowledge")
        return self.classes[class_name]

    def words(self, class_name: str) -> str:
        """How a class is written in a prompt: the file's ``words``, else its name with spaces."""
        entry = self.classes.get(class_name)
        return entry.words if entry else class_name.replace("_", " ")

    def image_texts(self, image: str | Path | None) -> list[str]:
        """The ``images`` texts whose key ends ``image``'s path."""
        texts: list[str] = []
        if image is not None and self.images:
            parts = Path(image).as_posix().split("/")
            for i in range(len(parts)):
                texts += self.images.get("/".join(parts[i:]), [])
        return texts

    def anchor_texts(self, class_name: str, defect: str, image: str | Path | None = None) -> list[str]:
        """Eq. 3's texts for one image: general, then the defect's fine, then per-image texts."""
        entry = self.require(class_name)
        return list(entry.general) + list(entry.fine.get(defect, [])) + self.image_texts(image)


def _token_count(text: str) -> int:
    return len(load_tokenizer().encode(text)) + 2  # SOT and EOT


def _texts(value, where: str, source: str, fix: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(t, str) and t.strip() for t in value):
        raise KnowledgeError(f"{source}: {where} must be a non-empty list of texts; {fix}")
    for text in value:
        n = _token_count(text)
        if n > CONTEXT_LENGTH:
            raise KnowledgeError(f"{source}: {where}: {text[:40]!r}... is {n} CLIP tokens, over "
                                 f"{CONTEXT_LENGTH}; shorten it")
    return [t.strip() for t in value]


def resolve_path(path: str | Path) -> Path:
    """A knowledge path as given, else relative to the repository (``configs/kanoclip/...``)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    if (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    raise KnowledgeError(f"knowledge file {path} not found (looked in {Path.cwd()} and {REPO_ROOT}); "
                         "set head.knowledge to a file such as configs/kanoclip/knowledge/mvtec.yaml")


def load_file(path: str | Path) -> tuple[dict[str, ClassKnowledge], dict[str, list[str]]]:
    """One knowledge file's classes and per-image texts, checked entry by entry."""
    p = resolve_path(path)
    source = str(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise KnowledgeError(f"{source} is not valid YAML ({str(exc).splitlines()[0]}); fix the "
                             "syntax") from None
    if not isinstance(raw, dict):
        raise KnowledgeError(f"{source}: expected a mapping with version and classes")
    unknown = set(raw) - {"version", "dataset", "classes", "images"}
    if unknown:
        raise KnowledgeError(f"{source}: unknown keys {sorted(unknown)}; allowed: version, dataset, "
                             "classes, images")
    if raw.get("version") != FORMAT_VERSION:
        raise KnowledgeError(f"{source}: version {raw.get('version')!r} unsupported; this "
                             f"edge-inspect reads version {FORMAT_VERSION}")
    classes_raw = raw.get("classes")
    if not isinstance(classes_raw, dict) or not classes_raw:
        raise KnowledgeError(f"{source}: 'classes' must map each class name to its entry")
    classes = {}
    for name, entry in classes_raw.items():
        name = str(name)
        fix = f"see configs/kanoclip/knowledge/mvtec.yaml for the layout of class {name!r}"
        if not isinstance(entry, dict):
            raise KnowledgeError(f"{source}: class {name!r} must be a mapping with words, general "
                                 f"and fine; {fix}")
        extra = set(entry) - {"words", "general", "fine"}
        if extra:
            raise KnowledgeError(f"{source}: class {name!r} has unknown keys {sorted(extra)}; "
                                 "allowed: words, general, fine")
        words = entry.get("words", name.replace("_", " "))
        if not isinstance(words, str) or not words.strip():
            raise KnowledgeError(f"{source}: class {name!r}: words must be a text; {fix}")
        if "general" not in entry:
            raise KnowledgeError(f"{source}: class {name!r} has no general descriptions; add "
                                 "general: a list of descriptions of its anomalies")
        general = _texts(entry["general"], f"class {name!r} general", source, fix)
        fine_raw = entry.get("fine") or {}
        if not isinstance(fine_raw, dict):
            raise KnowledgeError(f"{source}: class {name!r}: fine must map defect types to texts; {fix}")
        fine = {str(d): _texts(t, f"class {name!r} fine {d!r}", source, fix) for d, t in fine_raw.items()}
        classes[name] = ClassKnowledge(words.strip(), general, fine)
    images_raw = raw.get("images") or {}
    if not isinstance(images_raw, dict):
        raise KnowledgeError(f"{source}: images must map image path endings to texts")
    images = {str(k).strip("/"): _texts(v, f"image {k!r}", source, "give one or more texts")
              for k, v in images_raw.items()}
    return classes, images


def load_knowledge(paths: str | Path | list | tuple) -> Knowledge:
    """Merge knowledge files; a class in two of them is an error (which one is meant?)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise KnowledgeError("head.knowledge is empty: name at least one knowledge file, e.g. "
                             "configs/kanoclip/knowledge/mvtec.yaml")
    classes: dict[str, ClassKnowledge] = {}
    images: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for path in paths:
        file_classes, file_images = load_file(path)
        for name, entry in file_classes.items():
            if name in classes:
                raise KnowledgeError(f"class {name!r} is in both {owner[name]} and {path}; keep it "
                                     "in one file")
            classes[name], owner[name] = entry, str(path)
        for key, texts in file_images.items():
            images.setdefault(key, []).extend(texts)
    return Knowledge(classes, images, [str(p) for p in paths])

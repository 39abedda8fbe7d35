"""Every shipped run config parses, and the paper configs carry the paper's settings."""

from pathlib import Path

import pytest

from edge_inspect.trainer.config import RunConfig

ROOT = Path(__file__).resolve().parents[2]
RUN_CONFIG_FOLDERS = ("afclip", "cmad", "iipad", "kanoclip", "memory", "pirn")
CONFIGS = sorted(p for d in RUN_CONFIG_FOLDERS for p in (ROOT / "configs" / d).glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses_and_round_trips(path):
    cfg = RunConfig.from_yaml(path)
    again = RunConfig.from_dict(cfg.to_dict(), str(path))
    assert again.to_yaml() == cfg.to_yaml()


def test_afclip_paper_settings():
    for name in ("vitl14-336-visa-to-mvtec", "vitl14-336-mvtec-to-visa"):
        cfg = RunConfig.from_yaml(ROOT / f"configs/afclip/{name}.yaml")
        assert cfg.backbone.arch == "ViT-L-14-336" and cfg.backbone.input_size == 518
        assert cfg.head["taps"] == (6, 12, 18, 24) and cfg.head["scales"] == (1, 3, 5)
        assert cfg.head["n_ctx"] == 12 and cfg.head["alpha"] == cfg.head["beta"] == 0.1
        assert cfg.train["epochs"] == 2
        assert cfg.train["lr"] == 1e-4 and cfg.train["betas"] == [0.5, 0.999]
        assert cfg.train["batch_size"] == 8


def test_cmad_paper_settings():
    """The reproduction configs: the code's backbone, preprocessing, sets and optimiser."""
    cfg = RunConfig.from_yaml(ROOT / "configs/cmad/vith14-224-3d-to-mvtec.yaml")
    assert (cfg.backbone.arch, cfg.backbone.input_size, cfg.backbone.act) == ("ViT-H-14", 224, "gelu")
    assert (cfg.fit_mode, cfg.interpolation, cfg.seed) == ("short_side_crop", "bicubic_antialias", 10)
    assert [d.options.get("render") for d in cfg.train_data] == ["depth", "depth", "normals", "normals"]
    assert all(d.split == "all" for d in cfg.train_data)
    halves = [set(d.options["categories"]) for d in cfg.train_data]
    assert not halves[0] & halves[1] and len(halves[0] | halves[1]) == 10
    assert cfg.train["steps"] == 1500 and cfg.train["batch_size"] == 16 and cfg.train["lr"] == 1e-3
    assert cfg.train["betas"] == [0.5, 0.999] and cfg.train["sampling"] == "balanced"
    h = cfg.head
    assert (h["tau"], h["tau_prime"], h["lam"], h["lam_prime"], h["topk"]) == (0.07, 0.04, 0.8, 0.5, 50)
    assert (h["local_space"], h["vdi_score"], h["harmonization"], h["prototype_init"]) == (
        "width", "grid_max", "per_image", "normal")
    assert tuple(h["taps"]) == (5, 15, 25)
    rgb = RunConfig.from_yaml(ROOT / "configs/cmad/vith14-224-rgb-to-mvtec3d.yaml")
    assert [d.kind for d in rgb.train_data] == ["mvtec", "visa", "mvtec", "mvtec"]
    assert rgb.target_data[0].options["render"] == "depth"


def test_pirn_paper_settings():
    """MVTec 3D-AD and Eyecandies: ViT-B/14 at 224, blocks 2-10, 2 layers, Adam 1e-4 x 80."""
    for name, kind in (("vitb14-224-mvtec3d", "mvtec3d"), ("vitb14-224-eyecandies", "eyecandies")):
        cfg = RunConfig.from_yaml(ROOT / f"configs/pirn/{name}.yaml")
        assert (cfg.method, cfg.backbone.arch, cfg.backbone.input_size) == ("pirn", "dinov2_vitb14", 224)
        assert cfg.shots == 5 and cfg.target_data[0].kind == kind and not cfg.train_data
        assert cfg.head["layers"] == 2 and tuple(cfg.head["modalities"]) == ("rgb", "normals")
        assert cfg.train["epochs"] == 80 and cfg.train["lr"] == 1e-4
        if kind == "eyecandies":
            assert cfg.target_data[0].options["render"] == "rgb"  # RGB with its point map


def test_iipad_paper_settings():
    """MVTec and VisA one-for-all: ViT-L/14 at 224, V-V from block 6, T = 24, m = 4, taps
    6/12/18/24, memory taps 6 and 18, alpha = beta = 8, Adam 1e-3 x 20, the dataset's prompts."""
    for kind in ("mvtec", "visa"):
        cfg = RunConfig.from_yaml(ROOT / f"configs/iipad/vitl14-224-{kind}.yaml")
        assert (cfg.method, cfg.backbone.arch, cfg.backbone.input_size) == ("iipad", "ViT-L-14", 224)
        assert cfg.shots == 1 and cfg.target_data[0].kind == kind and not cfg.train_data
        h = cfg.head
        assert (tuple(h["taps"]), tuple(h["memory_taps"]), h["vv_from"]) == ((6, 12, 18, 24), (6, 18), 6)
        assert (h["prefix"], h["category"], h["manual_prompts"]) == (24, 4, kind)
        assert cfg.train["epochs"] == 20 and cfg.train["lr"] == 1e-3 and cfg.train["schedule"] == "constant"
        from edge_inspect.trainer.heads.iipad.model import IipadConfig

        full = IipadConfig(**cfg.head_kwargs())
        assert (full.alpha, full.beta, full.sparsity, full.loss_temperature) == (8.0, 8.0, 1 / 256, 1.0)


def test_kanoclip_paper_settings():
    """ViT-L/14@336 at 518, context length 12 (the paper); taps 6/12/18/24, V-V from 6 and
    Adam 1e-3 (0.5, 0.999) x 15, batch 8 (AnomalyCLIP's); loss weights 1; both knowledge files
    load and cover the training and target classes' words."""
    from edge_inspect.trainer.heads.kanoclip.knowledge import load_knowledge
    from edge_inspect.trainer.heads.kanoclip.model import KanoClipConfig

    for name, train, target in (("mvtec-to-visa", "mvtec", "visa"), ("visa-to-mvtec", "visa", "mvtec")):
        cfg = RunConfig.from_yaml(ROOT / f"configs/kanoclip/vitl14-336-{name}.yaml")
        assert (cfg.backbone.arch, cfg.backbone.input_size) == ("ViT-L-14-336", 518)
        assert [d.kind for d in cfg.train_data] == [train] and cfg.train_data[0].split == "test"
        assert [d.kind for d in cfg.target_data] == [target] and cfg.shots == 0
        full = KanoClipConfig(**cfg.head_kwargs())
        assert (full.taps, full.vv_from, full.n_ctx) == ((6, 12, 18, 24), 6, 12)
        assert full.kd_weight == full.global_weight == full.local_weight == 1.0
        assert (full.bicmci, full.adapter, full.vv, full.visual_sa) == (True, True, True, "deformable")
        assert cfg.train["epochs"] == 15 and cfg.train["lr"] == 1e-3 and cfg.train["batch_size"] == 8
        assert cfg.train["betas"] == [0.5, 0.999]
        knowledge = load_knowledge(full.knowledge)
        assert len(knowledge.classes) == 27 and full.export_class in knowledge.classes

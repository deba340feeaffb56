"""The transformer examples: the ViT config builds what it says, the BERT recipe runs, the benchmark's parts."""


import pytest
import torch
import yaml

from examples.vit import VisionTransformer, ViTClassifier
from lightning_worm import AttentionHeadSource, EarlyBirdCallback, WormCallback
from tests.helpers import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def test_vit_config_builds_a_head_search():
    config = yaml.safe_load((ROOT / "examples/configs/vit_digits.yaml").read_text())
    assert config["model"]["class_path"] == "examples.vit.ViTClassifier"
    module = ViTClassifier(**config["model"]["init_args"])
    entries = {entry["class_path"]: entry.get("init_args", {}) for entry in config["trainer"]["callbacks"]}
    early_bird = EarlyBirdCallback(**entries["lightning_worm.EarlyBirdCallback"])
    assert isinstance(early_bird.source, AttentionHeadSource)
    WormCallback(early_bird, **entries["lightning_worm.WormCallback"])
    assert early_bird.source.summary(module).startswith("tracking 32 units")  # 4 blocks x 8 heads
    assert module(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_vit_refuses_bad_sizes():
    with pytest.raises(ValueError, match="multiple of `patch_size`"):
        VisionTransformer(image_size=32, patch_size=5)
    with pytest.raises(ValueError, match="multiple of `num_heads`"):
        VisionTransformer(dim=30, num_heads=8)


def test_bert_recipe_runs_offline(tmp_path):
    pytest.importorskip("transformers")
    from examples import bert

    summary = bert.main(["--max_epochs", "2", "--default_root_dir", str(tmp_path)])
    assert summary["source"] == "attention_qk" and summary["ticket_epoch"] is None  # never at the first window


def test_benchmark_mask_cost_is_one_bit_per_unit():
    from examples.benchmarks.transformer import mask_cost

    cost = mask_cost(repeats=1, layers=1, width=256, heads=4)
    assert cost["units"] == 2 * 256 * 256
    assert cost["bits_per_unit"] == pytest.approx(1.0, abs=0.05)  # plus a few bytes of pickle per tensor

"""The transformer examples: the ViT configs build what they say, the BERT recipes run, the benchmark's parts."""

import sys

import pytest
import torch
import yaml

from examples.vit import VisionTransformer, ViTClassifier
from lightning_worm import AttentionHeadSource, EarlyBirdCallback, FeedForwardSource, WormCallback
from lightning_worm.core.sources import SourceList, earlybert
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


def test_vit_earlybert_config_searches_heads_and_neurons_as_the_preset_does(monkeypatch):
    """The YAML list of sources is `source: earlybert` spelled out, and is parsed as such through the job's CLI."""
    from examples.main import build_cli

    monkeypatch.setattr(sys, "argv", ["examples.main"])
    cli = build_cli(["--config", str(ROOT / "examples/configs/vit_digits_earlybert.yaml")], run=False)
    source = cli.early_bird.source
    assert isinstance(source, SourceList) and repr(source) == repr(earlybert())
    heads, neurons = source.sources
    assert isinstance(heads, AttentionHeadSource) and isinstance(neurons, FeedForwardSource)
    assert cli.early_bird.state_key == EarlyBirdCallback(source="earlybert").state_key
    summary = source.summary(cli.model)
    assert "tracking 32 units" in summary and "tracking 512 units" in summary  # 4 blocks x 8 heads, x 128 neurons


def test_the_job_reports_each_source_of_a_list(tmp_path, monkeypatch, capsys):
    """The main job on a tiny ViT with heads and neurons pruned at once: a summary line and a figure panel each."""
    from examples.main import main

    monkeypatch.setattr(sys, "argv", ["examples.main"])
    config = yaml.safe_load((ROOT / "examples/configs/vit_digits_earlybert.yaml").read_text())
    early_bird, *_ = config["trainer"]["callbacks"]
    early_bird["init_args"].update(window=2, threshold=1.0)  # a ticket at the end of epoch 1
    config["trainer"]["callbacks"] = [early_bird, {"class_path": "lightning_worm.PruneAndFinetune",
                                                   "init_args": {"wait_for": "ticket", "measure_latency": False}}]
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    summary = main(["--config", str(tmp_path / "tiny.yaml"), "--model.init_args.dim", "16",
                    "--model.init_args.depth", "2", "--model.init_args.num_heads", "4",
                    "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches",
                    "1", "--trainer.limit_test_batches", "1", "--trainer.log_every_n_steps", "1",
                    "--trainer.enable_progress_bar", "false",
                    "--trainer.default_root_dir", str(tmp_path / "run"), "--dense_reference", "false"])
    assert summary["pruned_epoch"] == 1
    shares = {label: (share["before"], share["after"]) for label, share in summary["shares"].items()}
    assert shares == {"AttentionHeadSource": (8, 6), "FeedForwardSource": (64, 64 - round(0.4 * 64))}
    assert "units kept per source: AttentionHeadSource 6/8, FeedForwardSource 38/64" in capsys.readouterr().out
    assert "channels.png" in summary["files"]


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


def test_bert_earlybert_prunes_heads_and_neurons_in_one_prune(tmp_path, capsys):
    pytest.importorskip("transformers")
    from examples import bert

    summary = bert.main(["--earlybert", "--max_epochs", "3", "--threshold", "1.0", "--wait_for", "ticket",
                         "--default_root_dir", str(tmp_path)])
    assert summary["source"] == "sources" and summary["ticket_epoch"] == 2 and summary["pruned_epoch"] == 2
    # 2 layers: 1 of 4 heads per layer (round(4 / 3)), 40 % of the 2 x 128 neurons overall
    assert summary["shares"] == {"AttentionHeadSource": [8, 6], "FeedForwardSource": [256, 256 - round(0.4 * 256)]}
    assert "'shares': {'AttentionHeadSource': [8, 6]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bert.main(["--earlybert", "--heads"])


def test_benchmark_mask_cost_is_one_bit_per_unit():
    from examples.benchmarks.transformer import mask_cost

    cost = mask_cost(repeats=1, layers=1, width=256, heads=4)
    assert cost["units"] == 2 * 256 * 256
    assert cost["bits_per_unit"] == pytest.approx(1.0, abs=0.05)  # plus a few bytes of pickle per tensor

"""The callbacks on CUDA devices in real Lightning fits: search + WORM + prune mid-fit and the checkpoint that
``load_pruned`` reloads; AMP (16-mixed, bf16-mixed) through the prune; the example input and every tensor on the
device; resume from a pruned checkpoint; FSDP2 over the devices present; DDP on two GPUs.

Every test is marked ``cuda``: skipped, with the reason, where torch sees no CUDA device (or fewer than a test
needs). ``bash .ci/gpu-check`` runs them (``python -m pytest -m cuda``). The FSDP2 test is written against
Lightning's plain user API and the three callbacks as a user would list them: it passes once the callbacks support
``ModelParallelStrategy`` (until then they refuse it at setup, and the test says so).
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_worm import EarlyBirdCallback, PruneAndFinetune, WormCallback, load_pruned
from tests.helpers import ROOT, tiny_loader, trainer
from tests.models import TinyNet

pytestmark = pytest.mark.cuda

TICKET_EPOCH = 1  # window=2, threshold=1.0: the ticket is the mask of the first full window


def gpu_trainer(tmp_path, **kwargs):
    """A quiet one-GPU trainer. Not deterministic: AdaptiveAvgPool2d's CUDA backward has no deterministic kernel."""
    return trainer(tmp_path, **{"accelerator": "gpu", "devices": 1, "deterministic": False, **kwargs})


def callbacks(**prune_kwargs):
    eb = EarlyBirdCallback(prune_ratio=0.5, window=2, threshold=1.0, sparsity=1e-4)
    return eb, WormCallback(eb, schedule="fixed", chi=0.003), PruneAndFinetune(eb, wait_for="ticket", **prune_kwargs)


class OnDevice(Callback):
    """After the prune, at the first batch of every epoch (listed after the callbacks: it sees the pruned model):
    where the parameters, buffers and optimizer state live, their dtypes and shapes; and every loss after the prune.

    Lightning moves the module and the optimizer state back to the CPU when the fit ends, so this is checked inside it.
    """

    def __init__(self, prune: PruneAndFinetune) -> None:
        self.prune = prune
        self.devices: set[str] = set()
        self.param_dtypes: set[torch.dtype] = set()
        self.state_shapes_match: list[bool] = []
        self.losses_after: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.prune.pruned_epoch is None or trainer.current_epoch <= self.prune.pruned_epoch:
            return
        self.losses_after.append(float(outputs["loss"]))
        if batch_idx:
            return
        tensors = [*pl_module.parameters(), *pl_module.buffers()]
        for p, state in trainer.optimizers[0].state.items():
            for value in state.values():
                if torch.is_tensor(value) and value.dim() > 0:
                    tensors.append(value)
                    self.state_shapes_match.append(value.shape == p.shape)
        self.devices |= {t.device.type for t in tensors}
        self.param_dtypes |= {p.dtype for p in pl_module.parameters()}


def widths(model):
    return model.features[1].num_features, model.features[4].num_features


def test_search_worm_prune_on_gpu_then_load_pruned(tmp_path):
    torch.manual_seed(0)
    eb, worm, prune = callbacks(report_dir=str(tmp_path))
    seen = OnDevice(prune)
    model = TinyNet()
    t = gpu_trainer(tmp_path, callbacks=[eb, worm, prune, seen], max_epochs=4)
    t.fit(model, tiny_loader())
    kept = {name: int(m.sum()) for name, m in eb.ticket.items()}
    assert prune.pruned_epoch == TICKET_EPOCH and t.current_epoch == 4 and worm.chi == 0.003
    assert widths(model) == (kept["features.1"], kept["features.4"]) and sum(kept.values()) < 8 + 16
    assert model.features[0].out_channels == kept["features.1"] and model.classifier.in_features == kept["features.4"]
    assert seen.devices == {"cuda"} and seen.state_shapes_match and all(seen.state_shapes_match)
    assert len(seen.losses_after) == 2 * 8 and all(math.isfinite(v) for v in seen.losses_after)
    r = prune.report
    assert r["params_after"] < r["params_before"] and r["latency_after_ms"] > 0
    t.save_checkpoint(tmp_path / "pruned.ckpt")
    model = model.cuda().eval()
    x = torch.randn(4, 3, 8, 8, device="cuda")
    for where in ("cpu", "cuda"):
        loaded = load_pruned(TinyNet, tmp_path / "pruned.ckpt", map_location=where)
        assert widths(loaded) == widths(model)
        assert {p.device.type for p in loaded.parameters()} == {where}
        with torch.no_grad():
            torch.testing.assert_close(loaded.cuda()(x), model(x))


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_amp_through_the_prune(tmp_path, precision):
    """The sparsity term and WORM's truncation act on unscaled gradients; the prune happens mid-fit under autocast
    (and, for 16-mixed, a GradScaler); the fit trains on with the small network, finite losses, state on the GPU."""
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    torch.manual_seed(0)
    eb, worm, prune = callbacks()
    seen = OnDevice(prune)
    model = TinyNet(lr=0.05)
    t = gpu_trainer(tmp_path, callbacks=[eb, worm, prune, seen], max_epochs=5, precision=precision)
    t.fit(model, tiny_loader())
    assert prune.pruned_epoch == TICKET_EPOCH and t.current_epoch == 5
    assert widths(model) == (int(eb.ticket["features.1"].sum()), int(eb.ticket["features.4"].sum()))
    assert len(seen.losses_after) == 3 * 8 and all(math.isfinite(v) for v in seen.losses_after)
    assert seen.devices == {"cuda"} and all(seen.state_shapes_match)
    assert seen.param_dtypes == {torch.float32}  # mixed precision keeps fp32 weights
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if precision == "16-mixed":
        scale = t.precision_plugin.scaler.get_scale()
        assert math.isfinite(scale) and scale > 0


class DictNet(TinyNet):
    """Dict batches: the prune cannot take its example input from a batch."""

    def training_step(self, batch, batch_idx):
        return super().training_step((batch["x"], batch["y"]), batch_idx)


@pytest.mark.parametrize("given", ["example_input", "example_input_array"])
def test_example_input_on_the_cpu_and_every_tensor_on_the_gpu(tmp_path, given):
    """An example input given on the CPU (to the callback, or as the module's ``example_input_array``) traces the
    model on the GPU; after the prune, parameters, buffers (the re-calibrated BatchNorm statistics) and the
    optimizer state are all on the GPU."""
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    options = {"example_input": example} if given == "example_input" else {}
    eb, worm, prune = callbacks(recalibrate_forward=lambda module, batch: module(batch["x"]), **options)
    seen = OnDevice(prune)
    model = DictNet()
    if given == "example_input_array":
        model.example_input_array = example
    data = torch.utils.data.DataLoader([{"x": x, "y": y} for x, y in tiny_loader().dataset], batch_size=8)
    gpu_trainer(tmp_path, callbacks=[eb, worm, prune, seen], max_epochs=3).fit(model, data)
    assert prune.plan is not None and prune.pruned_epoch == TICKET_EPOCH
    assert seen.devices == {"cuda"} and all(seen.state_shapes_match) and seen.losses_after


def test_resume_from_a_pruned_checkpoint_on_gpu(tmp_path):
    """The fresh module is reshaped before the pruned weights load, on the GPU, and training goes on."""
    torch.manual_seed(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "half", save_last=True, save_top_k=0)
    eb, worm, prune = callbacks()
    first = TinyNet()
    gpu_trainer(tmp_path, callbacks=[eb, worm, prune, checkpoint], max_epochs=3, enable_checkpointing=True).fit(
        first, tiny_loader())
    eb, worm, prune = callbacks()
    seen = OnDevice(prune)
    resumed = TinyNet()
    t = gpu_trainer(tmp_path, callbacks=[eb, worm, prune, seen], max_epochs=5)
    t.fit(resumed, tiny_loader(), ckpt_path=tmp_path / "half" / "last.ckpt")
    assert prune.pruned_epoch == TICKET_EPOCH and t.current_epoch == 5
    assert widths(resumed) == widths(first)
    assert seen.devices == {"cuda"} and all(seen.state_shapes_match) and len(seen.losses_after) == 2 * 8


def run_ranks(module: str, out: Path, *args: str, timeout: int = 300) -> list[dict]:
    """``python -m module OUT *args`` (Lightning relaunches it once per extra rank); each rank's saved dict."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, str(out), *args], cwd=out, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:  # the error itself first: the GPU check's report shows the first line
        errors = [line.strip() for line in proc.stderr.splitlines() if re.search(r"\w(Error|Exception): ", line)]
        pytest.fail(f"{module} exited with {proc.returncode}: {errors[-1] if errors else 'see stderr'}\n"
                    f"{proc.stderr[-4000:]}")
    return [torch.load(path, weights_only=False) for path in sorted(out.glob("rank*.pt"))]


def test_fsdp2_search_worm_prune_on_the_gpus_present(tmp_path):
    """FSDP2 (``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``) on every GPU present: every rank
    finds the same ticket, prunes in the same epoch to the same global shapes, trains on with finite losses, and the
    single-file checkpoint reloads into the unsharded class with ``load_pruned``."""
    devices = torch.cuda.device_count()
    ranks = run_ranks("tests.gpu.fit_fsdp2", tmp_path, "gpu", str(devices))
    assert len(ranks) == devices and all(r["world_size"] == devices for r in ranks)
    first = ranks[0]
    assert first["dtensor"] and first["pruned_epoch"] == first["ticket_epoch"] == TICKET_EPOCH
    for r in ranks[1:]:
        for key in ("ticket_epoch", "pruned_epoch", "units_after", "shapes", "epoch"):
            assert r[key] == first[key], key
    shapes, kept = first["shapes"], first["units_after"]
    assert shapes["features.1.weight"] == (kept["features.1"],) and shapes["features.4.weight"] == (kept["features.4"],)
    assert shapes["classifier.weight"] == (4, kept["features.4"]) and kept["features.1"] + kept["features.4"] < 24
    assert all(r["devices"] == ["cuda"] and r["losses_after"] and r["finite"] for r in ranks)
    loaded = load_pruned(TinyNet, tmp_path / "last.ckpt")
    assert {n: tuple(p.shape) for n, p in loaded.named_parameters()} == shapes


@pytest.mark.cuda(devices=2)
def test_ddp_on_two_gpus_with_syncbatchnorm_prunes_mid_fit(tmp_path):
    """Two GPU processes (NCCL) with SyncBatchNorm: the same decisions, shapes and weights on both ranks; the
    BatchNorm statistics agree too (synchronised); DDP and the optimizer hold the pruned parameters."""
    r0, r1 = run_ranks("tests.ddp.fit_prune", tmp_path, "--accelerator", "gpu", "--sync-batchnorm")[:2]
    pruned = r0["pruned_epoch"]
    assert pruned is not None and pruned == r1["pruned_epoch"] and r0["ticket_epoch"] == r1["ticket_epoch"]
    assert r0["steps_at_epoch_end"] == r1["steps_at_epoch_end"] and r0["report"]["units_after"] == \
        r1["report"]["units_after"]
    for name, value in r0["state"].items():
        other = r1["state"][name]
        assert value.shape == other.shape, name
        torch.testing.assert_close(value, other, msg=name)
    shapes = [tuple(v.shape) for k, v in r0["state"].items() if "running" not in k and "num_batches" not in k]
    assert r0["wrapped_params"] == r0["optimizer_params"] == shapes

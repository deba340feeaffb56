"""Every model the tests use, in one place: tiny CNNs, residual and shuffle nets, attention blocks, transformers.

Models are deterministic under a seed and small enough for the 2-core CPU. The Hugging Face ones (``bert``,
``llama``) skip the calling test where ``transformers`` is not installed; nothing else needs it.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from examples.vit import VisionTransformer, ViTClassifier


class TinyNet(L.LightningModule):
    """conv-bn-relu x2, pool, linear. SGD with momentum; deterministic under a seed."""

    def __init__(self, lr: float = 0.2, momentum: float = 0.9, weight_decay: float = 0.0, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum,
                               weight_decay=self.hparams.weight_decay)


class ManualTinyNet(TinyNet):
    """TinyNet under manual optimization: one backward and one optimizer step per batch."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        optimizer.step()
        return loss


class SizedMix(nn.Module):
    """Attention of its own: projections ``wq``/``wk``/``wv``/``o``, no head count; it splits heads by ``size``."""

    def __init__(self, dim=8, size=4):
        super().__init__()
        self.size = size
        self.wq, self.wk, self.wv, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.size).transpose(1, 2) for p in (self.wq, self.wk, self.wv))
        return self.o(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1))


def set_gammas(bn: nn.Module, values) -> None:
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(values, dtype=bn.weight.dtype))


def two_layer(a, b) -> nn.Sequential:
    model = nn.Sequential(nn.Conv2d(3, len(a), 1), nn.BatchNorm2d(len(a)), nn.Conv2d(len(a), len(b), 1),
                          nn.BatchNorm2d(len(b)))
    set_gammas(model[1], a)
    set_gammas(model[3], b)
    return model


def conv_bn(c_in: int, c_out: int, **kwargs) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False, **kwargs), nn.BatchNorm2d(c_out), nn.ReLU()]


class SmallVGG(nn.Module):
    """CIFAR-style conv-bn-relu stacks: no coupling at all."""

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(3, width), *conv_bn(width, width), nn.MaxPool2d(2), *conv_bn(width, 2 * width), nn.MaxPool2d(2)
        )
        self.classifier = nn.Linear(2 * width * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out)
        self.down = None
        if c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    """Residual additions couple ``stem.1``, ``block1.bn2`` and ``block2.bn2``; ``block2`` widens with a downsample."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, width))
        self.block1 = BasicBlock(width, width)
        self.block2 = BasicBlock(width, 2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ShuffleBlock(nn.Module):
    """ShuffleNet-v2 style: chunk, a branch on the second half, concatenation, channel shuffle."""

    def __init__(self, channels: int, native: bool) -> None:
        super().__init__()
        self.branch = nn.Sequential(*conv_bn(channels // 2, channels // 2))
        self.shuffle = nn.ChannelShuffle(2) if native else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1)
        out = torch.cat((a, self.branch(b)), dim=1)
        if self.shuffle is not None:
            return self.shuffle(out)
        n, c, h, w = out.shape  # torchvision's channel_shuffle
        return out.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)


class ShuffleNet(nn.Module):
    def __init__(self, native: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(3, 8))
        self.blocks = nn.Sequential(ShuffleBlock(8, native), ShuffleBlock(8, native))
        self.head = nn.Sequential(*conv_bn(8, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class GroupedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(*conv_bn(3, 8), *conv_bn(8, 8, groups=4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def convnet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, groups=2), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4),
    )


class Wrapped(L.LightningModule):
    def __init__(self, net: nn.Module, example: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.example_input_array = example

    def forward(self, x):
        return self.net(x)


class ScheduledNet(TinyNet):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


class LazyUnused(TinyNet):
    """Its only BatchNorm is lazy and never called: nothing can ever be scored."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.features[1] = nn.Identity()
        self.features[4] = nn.Identity()
        self.unused = nn.LazyBatchNorm2d()


class LazyNet(TinyNet):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.features[1] = nn.LazyBatchNorm2d()


def vit(seed=0, **kwargs):
    torch.manual_seed(seed)
    return VisionTransformer(**{"dim": 32, "depth": 2, "num_heads": 4, **kwargs}).eval()


class Logits(nn.Module):
    """A Hugging Face model whose forward returns plain logits (as a LightningModule would)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


class LastHidden(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).last_hidden_state


def bert(seed=0, heads=4):
    transformers = pytest.importorskip("transformers")  # only these helpers need it: the other tests run without
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=heads,
                                     intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return Logits(transformers.BertForSequenceClassification(config)).eval()


def llama(kv_heads=2):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=kv_heads, intermediate_size=64)
    return transformers.LlamaModel(config).eval()


class PackedAttention(nn.Module):
    """timm's ``Attention``: one ``qkv`` Linear laid out ``[q | k | v]``, heads inside each part."""

    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class PackedNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = PackedAttention()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(x))


def encoder():
    torch.manual_seed(0)
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2).eval()


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)


class CustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = Custom()


class SizedMixNet(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.mix = SizedMix()

    def forward(self, x):
        return self.mix(x)


class MHANet(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        torch.manual_seed(0)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True, **kwargs)


class TinyGemmaRMSNorm(nn.Module):
    """Gemma's convention: the scale is ``1 + weight``, the weight starts at 0."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


class PlainGemmaRMSNorm(TinyGemmaRMSNorm):
    """Named like Gemma, scales by ``weight`` (as Gemma 4's norm does): the name alone decides nothing."""

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.gemma, self.plain, self.ln = TinyGemmaRMSNorm(4), PlainGemmaRMSNorm(4), nn.LayerNorm(4)
        for norm in (self.gemma, self.plain, self.ln):
            norm.weight.data = torch.tensor([-1.0, -0.5, 0.0, 0.5])


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return ViTClassifier(**{"num_classes": 4, "image_size": 8, "patch_size": 2, "dim": 16, "depth": 2,
                            "num_heads": 4, "lr": 3e-3, **kwargs})


class MixClassifier(L.LightningModule):
    """Pixels as 3-wide tokens through one attention block of its own (``SizedMix``: 2 heads, no head count)."""

    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.save_hyperparameters()
        self.embed, self.mix, self.head = nn.Linear(3, 8), SizedMix(), nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.mix(self.embed(x.flatten(2).transpose(1, 2))).mean(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class EncoderClassifier(MixClassifier):
    """Pixels as tokens through an ``nn.TransformerEncoder`` (``nn.MultiheadAttention`` blocks)."""

    def __init__(self, lr: float = 3e-3):
        super().__init__(lr)
        self.mix = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1)


class ChannelCentred(TinyNet):
    """TinyNet that subtracts the mean over channels after its second block: a zeroed channel still counts in the
    mean, a removed one does not, so removing its channels changes the function (the self-check refuses it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features[:6](x)
        x = x - x.mean(dim=1, keepdim=True)
        return self.classifier(self.features[6:](x))


class Checked(nn.Module):
    """Asserts the channel count it was built for: the pruned model's forward fails inside it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels, f"expected {self.channels} channels, got {x.shape[1]}"
        return x


class CheckedNet(TinyNet):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.features.insert(3, Checked(self.hparams.width))


class InterleavedAttention(PackedAttention):
    """GPT-NeoX's layout: ``qkv`` packs ``[q_h | k_h | v_h]`` per head, not ``[q | k | v]``."""

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).view(b, n, -1, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        out = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class InterleavedNet(PackedNet):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = InterleavedAttention()


class ShardedTinyNet(TinyNet):
    """TinyNet sharded with FSDP2 under Lightning's ModelParallelStrategy: each conv, BatchNorm and the classifier
    in its own ``fully_shard`` call, then the root (what Lightning's FSDP2 guide does, layer by layer)."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if self.device_mesh is None:  # not under the ModelParallelStrategy: a plain TinyNet
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in (*self.features[:2], *self.features[3:5], self.classifier):
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class HybridNet(nn.Module):
    """A conv-BatchNorm stem feeding two attention blocks: tracked by BatchNorm channels and heads at once."""

    def __init__(self, dim: int = 16, num_heads: int = 4, classes: int = 4) -> None:
        super().__init__()
        from examples.vit import Block

        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, dim, 2, stride=2))
        self.blocks = nn.Sequential(Block(dim, num_heads), Block(dim, num_heads))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x).flatten(2).transpose(1, 2)).mean(1))


class HybridClassifier(MixClassifier):
    """:class:`HybridNet` trained with Adam (BatchNorm gammas randomised so that channel tickets are not ties)."""

    def __init__(self, lr: float = 3e-3, seed: int = 0):
        super().__init__(lr)
        torch.manual_seed(seed)
        self.net = HybridNet()
        del self.embed, self.mix, self.head
        with torch.no_grad():
            self.net.stem[1].weight.uniform_(0.5, 1.5)
        self.example_input_array = torch.zeros(2, 3, 8, 8)

    def forward(self, x):
        return self.net(x)


# ------------------------------------------------- Hugging Face layouts, re-written in plain torch


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D`` (``nf`` output features, a weight that is in x out), re-written here: the library duck-types
    it."""

    def __init__(self, nf, nx, weight_scale=1.0, bias_scale=1.0):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * weight_scale)
        self.bias = nn.Parameter(torch.randn(nf) * bias_scale)

    def forward(self, x):
        return x @ self.weight + self.bias


def _attend(q, k, v, b, n, head_dim, mask=None):
    q, k, v = (t.reshape(b, n, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, -1)


class Config:
    """A config shared by the layers, read by the forward (as Phi-3's)."""

    def __init__(self, heads=4, kv_heads=2):
        self.num_attention_heads, self.num_key_value_heads = heads, kv_heads


class Phi3Attention(nn.Module):
    """Phi-3's layout: ``qkv_proj`` packs ``[q (4 heads) | k (2) | v (2)]``, sliced with the config's head count."""

    def __init__(self, dim=16, config=None):
        super().__init__()
        self.config = config or Config()
        self.head_dim, self.num_key_value_heads = 4, self.config.num_key_value_heads
        self.qkv_proj = nn.Linear(dim, (self.config.num_attention_heads + 2 * self.num_key_value_heads) * 4)
        self.o_proj = nn.Linear(self.config.num_attention_heads * 4, dim)

    def forward(self, x):
        qkv = self.qkv_proj(x)
        q_end = self.config.num_attention_heads * self.head_dim
        k_end = q_end + self.num_key_value_heads * self.head_dim
        return self.o_proj(_attend(qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:], *x.shape[:2],
                                   self.head_dim))


class NeoXAttention(nn.Module):
    """GPT-NeoX's layout: ``query_key_value`` packs ``[q_h | k_h | v_h]`` head by head; only a head size."""

    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.head_size = dim // num_heads
        self.query_key_value, self.dense = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.query_key_value(x).view(b, n, -1, 3 * self.head_size).chunk(3, dim=-1)
        return self.dense(_attend(q, k, v, b, n, self.head_size))


class BiasTable(nn.Module):
    def __init__(self, num_heads, n):
        super().__init__()
        self.n = n
        self.relative_position_bias_table = nn.Parameter(torch.randn(n * n, num_heads))

    def forward(self):
        return self.relative_position_bias_table.view(self.n, self.n, -1).permute(2, 0, 1)


class SwinAttention(nn.Module):
    """Swin's layout: separate projections and a bias table of one column per head (sequence length 5)."""

    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.num_attention_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.relative_position_bias = BiasTable(num_heads, 5)

    def forward(self, x):
        return self.o_proj(_attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), *x.shape[:2], self.head_dim,
                                   self.relative_position_bias()))


class GPT2Attention(nn.Module):
    """GPT-2's layout: ``c_attn`` packs ``[q | k | v]`` on the output dim of a Conv1D, split by ``split_size``."""

    def __init__(self, dim=16, num_heads=4):
        super().__init__()
        self.num_heads, self.head_dim, self.split_size = num_heads, dim // num_heads, dim
        self.c_attn, self.c_proj = Conv1D(3 * dim, dim, 0.2, 0.1), Conv1D(dim, dim, 0.2, 0.1)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(self.split_size, dim=2)
        return self.c_proj(_attend(q, k, v, *x.shape[:2], self.head_dim))


class AttentionNet(nn.Module):
    """One attention block of ``attention()`` and a linear head (16 wide)."""

    def __init__(self, attention):
        super().__init__()
        torch.manual_seed(0)
        self.attn = attention()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(x))


class Mlp(nn.Module):
    """timm's ``Mlp`` in plain torch: fc1, act, drop1, norm (Identity by default), fc2, drop2."""

    def __init__(self, dim=8, hidden=16, norm=False, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.LayerNorm(hidden) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class GPT2Mlp(nn.Module):
    def __init__(self, dim=8, hidden=16):
        super().__init__()
        self.c_fc, self.c_proj, self.act = Conv1D(hidden, dim), Conv1D(dim, hidden), nn.GELU()

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class PackedMlp(nn.Module):
    """Phi-3's MLP: one ``gate_up_proj`` of rows ``[gate | up]``."""

    def __init__(self, dim=8, hidden=16):
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Linear(dim, 2 * hidden, bias=False), nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * nn.functional.silu(gate))


class GatedMlp(nn.Module):
    def __init__(self, dim=8, hidden=16):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.intermediate_size = hidden

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

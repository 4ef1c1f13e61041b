"""Tiny models (``TINY_MODELS``: name → a model and an example input) covering every construct group
discovery must handle, the 4-group model of the optimizers' by-hand tests, and the short training
loop of the optimizer tests. Not the torchvision zoo (``test_zoo.py``, ``benchmarks/zoo.py``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prunekit.structured import find_groups


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 3)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvBNFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU6(),
        )  # fmt: skip
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(12 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.features(x)))


class Residual(nn.Module):
    """Two residual stages, the second with a 1×1 projection shortcut (ResNet style)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(12)
        self.c4, self.b4 = nn.Conv2d(12, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12)
        self.proj, self.bp = nn.Conv2d(8, 12, 1, stride=2, bias=False), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + x)
        y = self.b4(self.c4(F.relu(self.b3(self.c3(x)))))
        x = F.relu(y + self.bp(self.proj(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConcatBN(nn.Module):
    """Concatenation followed by batch norm (where OTO's offsets go wrong)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 5, 3, padding=1)
        self.b = nn.Conv2d(3, 7, 1)
        self.bn = nn.BatchNorm2d(12)
        self.c = nn.Conv2d(12, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(18)
        self.fc = nn.Linear(18, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        z = F.relu(self.bn2(torch.cat((y, self.c(y)), 1)))
        return self.fc(z.mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand, 3×3 depthwise, 1×1 project, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6()
        )
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6())
        self.dw = nn.Sequential(
            nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24), nn.ReLU6()
        )
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, 6, 5, padding=2)
        self.c2 = nn.Conv1d(6, 10, 3)
        self.fc = nn.Linear(10 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.c1(x))
        x = F.silu(self.c2(F.max_pool1d(x, 2)))
        x = F.adaptive_max_pool1d(x, 4)
        return self.fc(x.reshape(x.size(0), -1))


class SqueezeExcite(nn.Module):
    """Channel gating through a sigmoid: a zero channel of y times any gate is zero, so the gated
    channel, its se1 column and se2 row form one group (see rules.join_rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.se1 = nn.Linear(8, 4)
        self.se2 = nn.Linear(4, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv(x))
        s = torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3))))))
        y = y * s[:, :, None, None]
        return self.fc(y.mean((2, 3)))


class EmbedLN(nn.Module):
    """Embedding and LayerNorm (channels through LayerNorm are pinned), then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.ln = nn.LayerNorm(8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.ln(self.emb(idx))
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.out(h.mean(1))


class Tied(nn.Module):
    """A module called twice (``hidden``) and a weight shared by two modules (``mid``/``mid2``):
    the groups they touch are unprunable."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(10, 6)
        self.hidden = nn.Linear(6, 6)
        self.dec = nn.Linear(6, 10)
        self.mid = nn.Linear(10, 10)
        self.mid2 = nn.Linear(10, 10)
        self.mid2.weight = self.mid.weight
        self.extra = nn.Linear(10, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.hidden(F.relu(self.hidden(F.relu(self.enc(x))))))
        h = F.relu(self.mid2(F.relu(self.mid(self.dec(h)))))
        return self.out(F.relu(self.extra(h)))


class GroupedAndUnknown(nn.Module):
    """A grouped conv (2 groups of 4 → 6), a depthwise conv with channel multiplier 2 and an op without
    a rule (cumsum over channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=2)
        self.dm = nn.Conv2d(12, 24, 3, padding=1, groups=12)
        self.b = nn.Conv2d(24, 6, 1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.g(F.relu(self.a(x))))
        y = F.relu(self.dm(y))
        y = torch.cumsum(F.relu(self.b(y)), dim=1)
        return self.fc(y.mean((2, 3)))


class GroupNormNet(nn.Module):
    """GroupNorm: a whole norm group (4 or 3 channels) is one group; a non-affine one is pinned."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8)
        self.c2, self.n2 = nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.GroupNorm(4, 12)
        self.c3, self.n3 = nn.Conv2d(12, 6, 1), nn.GroupNorm(3, 6, affine=False)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.n2(self.c2(F.relu(self.n1(self.c1(x))))))
        return self.fc(F.relu(self.n3(self.c3(x))).mean((2, 3)))


def _img(c: int = 3, s: int = 8) -> Tensor:
    return torch.randn(4, c, s, s, generator=torch.Generator().manual_seed(1))


TINY_MODELS: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    "mlp": lambda: (MLP(), torch.randn(4, 12, generator=torch.Generator().manual_seed(1))),
    "conv_bn_flatten": lambda: (ConvBNFlatten(), _img()),
    "residual": lambda: (Residual(), _img()),
    "concat_bn": lambda: (ConcatBN(), _img()),
    "inverted_residual": lambda: (InvertedResidual(), _img()),
    "conv1d": lambda: (
        Conv1dNet(),
        torch.randn(4, 1, 20, generator=torch.Generator().manual_seed(1)),
    ),
    "squeeze_excite": lambda: (SqueezeExcite(), _img()),
    "embed_layernorm": lambda: (
        EmbedLN(),
        torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(1)),
    ),
    "tied": lambda: (Tied(), torch.randn(4, 10, generator=torch.Generator().manual_seed(1))),
    "grouped_unknown": lambda: (GroupedAndUnknown(), _img()),
    "groupnorm": lambda: (GroupNormNet(), _img()),
}


class AttentionBlock(nn.Module):
    """Transformer encoder block: heads and MLP neurons are prunable, the residual stream is not."""

    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, 16)
        self.ln1 = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.ln2 = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        y = self.ln1(h)
        h = h + self.attn(y, y, y, need_weights=False)[0]
        h = h + self.fc2(F.gelu(self.fc1(self.ln2(h))))
        return self.head(h.mean(1 if self.batch_first else 0))


class HandWrittenAttention(nn.Module):
    """Attention written out by hand with the head count hard-coded (``view(b, t, 2, 4)``): the heads
    cannot be removed (the literal would not follow), so its projections are pinned."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 12)
        self.out = nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 2, 4).transpose(1, 2)
        k = self.k(x).view(b, t, 2, 4).transpose(1, 2)
        v = self.v(x).view(b, t, 2, 4).transpose(1, 2)
        a = (q @ k.transpose(-2, -1) / 2.0).softmax(-1) @ v
        y = self.o(a.transpose(1, 2).reshape(b, t, 8))
        return self.out(F.relu(self.fc(y)).mean(1))


def _seq(c: int) -> Tensor:
    return torch.randn(3, 5, c, generator=torch.Generator().manual_seed(1))


TINY_MODELS["attention"] = lambda: (AttentionBlock(), _seq(6))
TINY_MODELS["attention_seq_first"] = lambda: (
    AttentionBlock(batch_first=False),
    _seq(6).transpose(0, 1).contiguous(),
)


class HeadAttributeAttention(nn.Module):
    """Pre-norm transformer block written by hand: ``view(b, t, self.num_heads, self.head_dim)``,
    ``q @ kᵀ · scale``, a causal mask, softmax, dropout, ``@ v``, merge with
    ``self.num_heads * self.head_dim``: the 4 heads (of 3) are prunable, ``num_heads`` follows."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.depth = 4, 3, 4  # depth: an unrelated int equal to 4
        inner = self.num_heads * self.head_dim
        self.embed = nn.Linear(6, 8)
        self.ln = nn.LayerNorm(8)
        self.q, self.k, self.v = nn.Linear(8, inner), nn.Linear(8, inner), nn.Linear(8, inner)
        self.drop = nn.Dropout(0.0)
        self.o = nn.Linear(inner, 8)
        self.head = nn.Linear(8, 3)
        self.register_buffer("causal", torch.ones(5, 5, dtype=torch.bool).triu(1))

    def split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        b, t, _ = h.shape
        y = self.ln(h)
        q, k, v = self.split(self.q(y)), self.split(self.k(y)), self.split(self.v(y))
        s = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5
        s = s.masked_fill(self.causal, float("-inf"))
        a = self.drop(s.softmax(dim=-1)) @ v
        h = h + self.o(a.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
        return self.head(h.mean(1))


class SDPAAttention(nn.Module):
    """``F.scaled_dot_product_attention`` with ``view(b, t, -1, 3)`` and ``reshape(b, t, -1)``: the
    heads are prunable without any attribute to update."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(8, 12)
        self.o = nn.Linear(12, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        q, k, v = (p(x).view(b, t, -1, 3).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(F.relu(self.o(a.transpose(1, 2).reshape(b, t, -1))).mean(1))


TINY_MODELS["handwritten_attention"] = lambda: (HandWrittenAttention(), _seq(8))
TINY_MODELS["head_attribute_attention"] = lambda: (HeadAttributeAttention(), _seq(6))
TINY_MODELS["sdpa_attention"] = lambda: (SDPAAttention(), _seq(8))


def four_groups(rows, grads, lr_first=None):
    """The 4-group model of the optimizers' by-hand tests: ``Linear(3, 4) → ReLU → Linear(4, 2)``,
    one group per hidden unit (the row of the first weight and its bias entry, ``x_g ∈ R⁴``), with
    ``x_g = rows[g]`` (3 weights, then the bias) and gradients ``grads``; with ``lr_first`` the
    unmanaged second layer is a first param group with that lr."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    groups = find_groups(model, torch.randn(2, 3))
    assert [g.slices("out") for g in groups if g.prunable] == [
        {("0.bias", 0): [i], ("0.weight", 0): [i]} for i in range(4)
    ]
    x, g = torch.tensor(rows), torch.tensor(grads)
    with torch.no_grad():
        model[0].weight.copy_(x[:, :3])
        model[0].bias.copy_(x[:, 3])
    model[0].weight.grad, model[0].bias.grad = g[:, :3].clone(), g[:, 3].clone()
    for p in model[2].parameters():
        p.grad = torch.zeros_like(p)
    params = (
        list(model.parameters())
        if lr_first is None
        else [{"params": model[2].parameters(), "lr": lr_first}, {"params": model[0].parameters()}]
    )
    return model, groups, params


def group_rows(model):
    """The 4 groups of :func:`four_groups`'s model as rows ``x_g``."""
    return torch.cat([model[0].weight.detach(), model[0].bias.detach()[:, None]], dim=1)


def dot(a, b):
    """The inner product of two rows written out as lists (for values computed by hand)."""
    return sum(u * v for u, v in zip(a, b, strict=True))


def train_steps(model, x, opt, steps, check=None):
    """``steps`` optimizer steps of a 2-class cross-entropy on noisy copies of ``x`` (``check()``
    after each)."""
    y = torch.arange(len(x)) % 2
    model.train()
    for _ in range(steps):
        out = model(x + 0.05 * torch.randn_like(x))
        loss = F.cross_entropy(out[:, :2], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if check is not None:
            check()

"""The benchmark workloads in PyTorch, eager: the same architectures, sizes and
optimizer as ``workloads_nnlib``, written as a PyTorch user would.

A training step is ``forward -> cross_entropy -> backward -> AdamW.step ->
zero_grad(set_to_none=True)``; weight decay applies to ``ndim >= 2`` tensors
only, as nnlib's ``make_optimizer`` and nanoGPT do. Eager PyTorch on the CPU
runs synchronously, so ``sync`` has nothing to wait for. Threads: the harness
calls ``torch.set_num_threads`` with the core count before building anything.

Where the two libraries' layers differ in parameterisation, the PyTorch side
is adjusted so the *function* and the trainable parameter count match (the
harness asserts the counts are equal): see ``LSTMClassifier``.

Shapes follow PyTorch: images NCHW, attention heads ``(B, nh, T, hs)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.bench.runner import OPTIMIZER, SPECS, Runner

# torch.optim.AdamW's fused kernel: on this CPU the fastest of its for-loop,
# foreach and fused implementations for these models (NOTES.md), so PyTorch
# gets its best optimizer, not its default.
ADAMW_OPTIONS: dict[str, Any] = {"fused": True}


def trainable_params(model: nn.Module) -> int:
    """Number of scalars in the parameters that receive updates (shared ones once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW with the shared hyperparameters, decaying only ``ndim >= 2`` tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    o = OPTIMIZER
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": o["weight_decay"]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=o["learning_rate"], betas=(o["b1"], o["b2"]),
                             eps=o["eps"], **ADAMW_OPTIONS)


# --------------------------------------------------------------------------- #
# Models.
# --------------------------------------------------------------------------- #


def mlp_model(spec: dict[str, Any]) -> nn.Module:
    """784 -> 512 -> 512 -> 10 with ReLU."""
    sizes = [spec["inputs"], *spec["hidden"]]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], spec["classes"]))


def cnn_model(spec: dict[str, Any]) -> nn.Module:
    """conv3x3 (same padding) -> ReLU -> maxpool 2x2, twice; then dense, ReLU, dense."""
    layers: list[nn.Module] = []
    channels = spec["channels"]
    for width in spec["features"]:
        layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        channels = width
    side = spec["image"] // 2 ** len(spec["features"])
    return nn.Sequential(
        *layers, nn.Flatten(),
        nn.Linear(channels * side * side, spec["dense"]), nn.ReLU(),
        nn.Linear(spec["dense"], spec["classes"]),
    )


class LSTMClassifier(nn.Module):
    """One-layer LSTM, a linear head on the last hidden state.

    nnlib's ``LSTMCell`` has one bias per gate (``x W + b + h U``); PyTorch's
    ``nn.LSTM`` has two (``b_ih + b_hh``) whose sum is all that matters.
    ``b_hh`` is frozen at zero: the same function and the same trainable
    parameter count, and still PyTorch's fused LSTM kernel (which adds the
    frozen bias as before).
    """

    def __init__(self, inputs: int, hidden: int, classes: int):
        super().__init__()
        self.lstm = nn.LSTM(inputs, hidden, batch_first=True)
        with torch.no_grad():
            self.lstm.bias_hh_l0.zero_()
        self.lstm.bias_hh_l0.requires_grad_(False)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, F)
        _, (h, _) = self.lstm(x)  # h: (1, B, H)
        return self.head(h[-1])  # (B, C)


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one fused ``c_attn`` for q | k | v, SDPA, ``c_proj``.

    With ``cache = (keys, values)`` (each ``(L, B, nh, S, hs)``) the new keys and
    values are written at ``pos`` and the queries attend to slots ``[0, pos+T)``.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                pos: int = 0, layer: int = 0) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            keys, values = cache
            keys[layer, :, :, pos:pos + t] = k
            values[layer, :, :, pos:pos + t] = v
            k, v = keys[layer, :, :, :pos + t], values[layer, :, :, :pos + t]
            # is_causal aligns the mask top-left: right for a prompt at pos 0,
            # and a single decoded token attends to everything before it.
            assert t == 1 or pos == 0, "chunked prefill is not supported"
        y = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    """Pre-LN block: ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))``, GELU tanh form."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor, cache: Any = None, pos: int = 0,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, pos, layer)
        return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    """nanoGPT's model: token + position embeddings, pre-LN blocks, final LN,
    ``lm_head`` tied to the token embedding (no bias). GPT-2 initialisation."""

    def __init__(self, vocab: int, context: int, layers: int, heads: int, width: int):
        super().__init__()
        self.heads, self.width = heads, width
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied (Press & Wolf 2017)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith(".bias") and "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, cache: Any = None, pos: int = 0) -> torch.Tensor:
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(pos, pos + t, device=idx.device))
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, pos, layer)
        return self.lm_head(self.ln_f(x))  # (B, T, V)

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy decoding with a KV cache (prefill once, then one token at a
        time): ``prompt: (B, P) -> (B, P + new_tokens)``."""
        b, p = prompt.shape
        shape = (len(self.blocks), b, self.heads, p + new_tokens, self.width // self.heads)
        cache = (torch.zeros(shape), torch.zeros(shape))
        logits = self(prompt, cache, 0)
        out = [prompt]
        for i in range(new_tokens):
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            if i < new_tokens - 1:  # the last token needs no forward pass after it
                logits = self(nxt, cache, p + i)
        return torch.cat(out, dim=1)


class MiniLM(nn.Module):
    """BERT as ``nnlib.models.bert.Bert`` (Hugging Face's ``BertModel``) at
    MiniLM-L6 size: word + position + token-type embeddings, LayerNorm, then
    ``nn.TransformerEncoder`` with **post-LN** layers (``norm_first=False``,
    BERT's layout), erf GELU, LayerNorm epsilon 1e-12, and the pooler
    ``tanh(Linear(x[:, 0]))``. In ``inference_mode`` PyTorch runs its fused
    encoder-layer fast path.

    Returns ``(sequence_output (B, T, H), pooled_output (B, H))``.
    """

    def __init__(self, vocab: int, width: int, layers: int, heads: int, intermediate: int,
                 max_positions: int, eps: float = 1e-12):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, width)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.token_type_embeddings = nn.Embedding(2, width)
        self.embedding_norm = nn.LayerNorm(width, eps=eps)
        layer = nn.TransformerEncoderLayer(width, heads, intermediate, dropout=0.0,
                                           activation="gelu", layer_norm_eps=eps,
                                           batch_first=True, norm_first=False)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pooler = nn.Linear(width, width)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = tokens.shape[1]
        x = (self.word_embeddings(tokens)
             + self.position_embeddings(torch.arange(t, device=tokens.device))
             + self.token_type_embeddings(torch.zeros_like(tokens)))  # segment 0 everywhere
        x = self.encoder(self.embedding_norm(x))  # (B, T, H)
        return x, torch.tanh(self.pooler(x[:, 0]))


def make_model(name: str, spec: dict[str, Any]) -> nn.Module:
    """The PyTorch module of workload ``name`` at the sizes in ``spec``."""
    if name == "mlp":
        return mlp_model(spec)
    if name == "cnn":
        return cnn_model(spec)
    if name == "lstm":
        return LSTMClassifier(spec["inputs"], spec["hidden"], spec["classes"])
    if name.startswith("gpt"):
        return GPT(spec["vocab"], spec["context"], spec["layers"], spec["heads"],
                   spec["width"])
    if name == "minilm_infer":
        return MiniLM(spec["vocab"], spec["width"], spec["layers"], spec["heads"],
                      spec["intermediate"], spec["max_positions"])
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(SPECS)}")


# --------------------------------------------------------------------------- #
# Runners.
# --------------------------------------------------------------------------- #


def _train_runner(name: str, model: nn.Module, inputs: torch.Tensor,
                  labels: torch.Tensor) -> Runner:
    model.train()
    opt = optimizer(model)

    def step() -> None:
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return Runner(name, "pytorch", step, lambda: None, trainable_params(model),
                  items_per_step=int(inputs.shape[0]), handle=model)


def _tensors(data: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.from_numpy(np.ascontiguousarray(data["inputs"]))
    if not inputs.is_floating_point():
        inputs = inputs.long()
    return inputs, torch.from_numpy(data["labels"]).long()


def build_train(name: str, spec: dict[str, Any], data: dict[str, np.ndarray]) -> Runner:
    inputs, labels = _tensors(data)
    if name == "cnn":
        inputs = inputs.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return _train_runner(name, make_model(name, spec), inputs, labels)


def build_minilm(name: str, spec: dict[str, Any], data: dict[str, np.ndarray]) -> Runner:
    model = make_model(name, spec).eval()
    tokens = torch.from_numpy(data["inputs"]).long()

    def step() -> None:
        with torch.inference_mode():
            model(tokens)

    return Runner(name, "pytorch", step, lambda: None, trainable_params(model),
                  items_per_step=int(tokens.shape[0]),
                  notes="BERT via nn.TransformerEncoder (post-LN) under inference_mode")


def build_generate(name: str, spec: dict[str, Any], data: dict[str, np.ndarray]) -> Runner:
    model = make_model(name, spec).eval()
    prompt = torch.from_numpy(data["prompt"]).long()
    new = spec["new_tokens"]
    return Runner(name, "pytorch", lambda: model.generate(prompt, new), lambda: None,
                  trainable_params(model), items_per_step=int(prompt.shape[0]) * new,
                  unit="tokens", notes="greedy, KV cache (prefill + one token per step)")


BUILDERS: dict[str, Callable[[str, dict[str, Any], dict[str, np.ndarray]], Runner]] = {
    "mlp": build_train,
    "cnn": build_train,
    "lstm": build_train,
    "gpt_b64": build_train,
    "gpt_b12": build_train,
    "minilm_infer": build_minilm,
    "gpt_generate": build_generate,
}


def build(name: str, data: dict[str, np.ndarray], spec: dict[str, Any] | None = None) -> Runner:
    """The PyTorch runner of workload ``name`` (sizes from ``SPECS`` unless given)."""
    torch.manual_seed(0)
    return BUILDERS[name](name, spec or SPECS[name], data)

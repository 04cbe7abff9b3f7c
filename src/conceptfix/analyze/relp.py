"""RelP (Relevance Patching, Jafari et al. 2025) node attribution on the MLP-neuron basis.

The backward pass of the model is replaced by that of a *linearised* model, while every forward value stays
bit-for-bit what the real model computes:

* RMSNorm / LayerNorm: the normalisation scale (rsqrt of the mean square, or 1/std) is a constant;
* the MLP activation (SiLU, GELU, GELU-tanh): identity rule, ``act(z)/z`` is a constant;
* the gate × up product: half rule, each factor gets half of the gradient;
* attention: the attention pattern is a constant: query and key leave the graph right after ``q_proj`` /
  ``k_proj`` (rotary, q/k norms and softmax then act on constants), the value path stays linear, and the
  attention kernel (SDPA / flash) is the model's own, no T×T matrix is materialised by us.

With these rules the metric is a sum of linear functions of the embeddings plus constant bias terms, so
``sum(embedding × modified gradient) + bias contributions == metric`` exactly up to float error. Every run
checks this (``NeuronScores.conservation_residual``). A neuron is one input coordinate of ``down_proj`` at one
position; its score is ``activation × modified gradient`` for every layer and position from ONE backward pass.

The metric is read off the final normalised residual stream at one position (``metric.position``):
``(W_U[correct] − W_U[wrong]) · h``, ``W_U[correct] · h`` or ``direction · h``. For models without final logit
soft-capping this equals the logit difference; for Gemma-2 it is the difference before the soft-cap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from conceptfix.analyze.adapters import DecoderAdapter, get_adapter
from conceptfix.analyze.types import MetricSpec, NeuronScores
from conceptfix.errors import ConceptfixError

if TYPE_CHECKING:  # models.py pulls in pydantic; keep this module importable without it (GPU benchmark)
    from conceptfix.models import LoadedModel

# ---------------------------------------------------------------------------------------------------------
# Gradient rules: each forward returns the real value (a clone of what the model computed), each backward the
# linearised gradient. The original graph below the real value is cut (its input gets no gradient through it).


def _up(t: torch.Tensor) -> torch.Tensor:
    """Half precision → fp32 for the rule arithmetic; fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class _ScaleRule(torch.autograd.Function):
    """y = f(x) with a frozen elementwise scale: dL/dx = dL/dy · scale (activation identity rule, RMSNorm).

    ``y`` is passed detached: the module's own graph below it is cut and freed (only x gets a gradient).
    ``scale`` may be a product of broadcastable factors (RMSNorm: [.., 1] inverse RMS times [d] weight), so
    no full-size scale tensor is kept alive for the backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, *scales: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*scales)
        return y.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = _up(grad)
        for scale in ctx.saved_tensors:
            g = g * scale
        return (g.to(grad.dtype), None) + (None,) * len(ctx.saved_tensors)


class _LayerNormRule(torch.autograd.Function):
    """y = (x − mean) · inv_std · w + b with inv_std frozen: dL/dx = inv_std · (gw − mean(gw)), gw = dL/dy · w."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, inv_std: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inv_std, weight)
        return y.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inv_std, weight = ctx.saved_tensors
        gw = _up(grad) * weight
        gx = inv_std * (gw - gw.mean(-1, keepdim=True))
        return gx.to(grad.dtype), None, None, None


class _HalfRule(torch.autograd.Function):
    """h = a · u with half of the gradient to each factor (keeps a·dL/da + u·dL/du = h·dL/dh)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, u: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, u)
        return h.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, u = ctx.saved_tensors
        half = 0.5 * grad
        return half * u, half * a, None


def _rms_factors(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The frozen factors of an RMSNorm: rsqrt(mean(x²) + eps) [.., 1] and weight [d] (Gemma: 1 + weight)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        raise ConceptfixError(f"cannot linearise norm {type(module).__name__}: no eps attribute", field="model")
    xf = _up(x.detach())
    inv = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    weight = getattr(module, "weight", None)
    if weight is None:
        return (inv,)
    w = _up(weight.detach())
    if type(module).__name__.startswith("Gemma"):  # Gemma norms scale by (1 + weight)
        w = 1.0 + w
    return inv, w


@dataclass
class _Linearisation:
    adapter: DecoderAdapter
    handles: list = field(default_factory=list)
    verify: bool = True
    checked: set = field(default_factory=set)  # modules whose form is being verified in this context
    # (max error, max |output|, tolerance, message) per verified module: checked together on exit, one GPU sync
    pending: list = field(default_factory=list)

    def install(self) -> None:
        ad = self.adapter
        # Validate everything before registering anything: a refused model is left without hooks.
        for i in range(ad.num_layers):
            attn, mlp = ad.attention(i), ad.mlp(i)
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                if not isinstance(getattr(attn, name, None), nn.Module):
                    raise ConceptfixError(f"layer {i} attention has no {name} (fused or unusual attention)",
                                          field="model", hint="supported: separate q/k/v/o projections")
            for name in ("gate_proj", "up_proj", "act_fn"):
                if not isinstance(getattr(mlp, name, None), nn.Module):
                    raise ConceptfixError(f"layer {i} MLP has no {name} module (not a gated down_proj MLP)",
                                          field="model", hint="supported: down_proj(act(gate_proj(x)) * up_proj(x))")
        for norm in ad.norm_modules():
            self.handles.append(norm.register_forward_hook(self._norm_hook))
        for i in range(ad.num_layers):
            attn = ad.attention(i)
            for name in ("q_proj", "k_proj"):
                self.handles.append(getattr(attn, name).register_forward_hook(_detach_output))
            mlp = ad.mlp(i)
            state: dict[str, torch.Tensor] = {}
            self.handles.append(mlp.act_fn.register_forward_hook(_act_hook(state)))
            self.handles.append(mlp.up_proj.register_forward_hook(_store_output(state, "u")))
            self.handles.append(mlp.down_proj.register_forward_pre_hook(self._product_hook(state, i)))

    def check(self) -> None:
        """Raise if a verified module did not have the form its rule assumes (all checks, one device sync)."""
        if not self.pending:
            return
        values = torch.stack([torch.stack([e.double(), m.double()]) for e, m, *_ in self.pending]).cpu()
        for (err, top), (_, _, tol, message, hint) in zip(values.tolist(), self.pending):
            if not err <= tol * (top + 1e-6):  # also catches NaN
                self.pending.clear()
                raise ConceptfixError(f"{message} (max error {err:.3g})", field="model", hint=hint)
        self.pending.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _norm_hook(self, module: nn.Module, args: tuple, output: torch.Tensor):
        x = args[0]
        if not torch.is_tensor(output) or not (x.requires_grad or output.requires_grad):
            return None
        if isinstance(module, nn.LayerNorm) or (type(module).__name__.endswith("LayerNorm")
                                                and hasattr(module, "normalized_shape")):
            xf = _up(x.detach())
            inv_std = torch.rsqrt(xf.var(-1, unbiased=False, keepdim=True) + module.eps)
            weight = getattr(module, "weight", None)
            w = _up(weight.detach()) if weight is not None else torch.ones_like(xf[..., :1])
            return _LayerNormRule.apply(x, output.detach(), inv_std, w)
        factors = _rms_factors(module, x)
        if self.verify and id(module) not in self.checked:
            # The rule is only right if the module really is y = scale · x; refuse silently wrong attributions.
            approx = _up(x.detach())
            for f in factors:
                approx = approx * f
            out = _up(output.detach())
            tol = 1e-3 if output.dtype in (torch.float32, torch.float64) else 5e-2
            self.pending.append(((approx - out).abs().max(), out.abs().max(), tol,
                                 f"norm module {type(module).__name__} is not an RMSNorm of the expected form",
                                 "this architecture needs an adapter entry for its norm"))
            self.checked.add(id(module))
        return _ScaleRule.apply(x, output.detach(), *factors)


    def _product_hook(self, state: dict, layer: int):
        def hook(module: nn.Module, args: tuple):
            a, u = state.pop("a", None), state.pop("u", None)
            h = args[0]
            if a is None or u is None or a.shape != h.shape or u.shape != h.shape:
                raise ConceptfixError(f"layer {layer}: down_proj input is not act(gate) * up", field="model")
            if not (a.requires_grad or u.requires_grad):
                return None
            if self.verify and ("mlp", layer) not in self.checked:
                # the half rule is only right if down_proj really receives act(gate) * up
                hf = _up(h.detach())
                tol = 1e-5 if h.dtype in (torch.float32, torch.float64) else 2e-2
                self.pending.append(((_up(a.detach()) * _up(u.detach()) - hf).abs().max(), hf.abs().max(), tol,
                                     f"layer {layer}: down_proj input is not act(gate) * up",
                                     "this architecture needs an adapter entry for its MLP"))
                self.checked.add(("mlp", layer))
            return (_HalfRule.apply(a, u, h.detach()),) + tuple(args[1:])
        return hook


def _detach_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.detach()


def _act_hook(state: dict):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor):
        z = args[0]
        if not z.requires_grad:
            state["a"] = output
            return None
        zf, af = _up(z.detach()), _up(output.detach())
        # act(z)/z; its limit at z → 0 is act'(0) = 0.5 for SiLU and both GELUs (and a·grad is 0 there anyway)
        small = zf.abs() < 1e-6
        ratio = torch.where(small, torch.full_like(zf, 0.5), af / torch.where(small, torch.ones_like(zf), zf))
        a = _ScaleRule.apply(z, output.detach(), ratio)
        state["a"] = a
        return a
    return hook


def _store_output(state: dict, key: str):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor):
        state[key] = output
    return hook


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad inside the block (restored exactly on exit, also on error).

    Attribution needs gradients of activations only; a parameter that requires grad would make every linear
    layer save its input for a weight gradient nobody uses (memory), and ``backward`` would fill ``.grad``.
    """
    changed = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in changed:
            p.requires_grad_(False)
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


@contextlib.contextmanager
def linearized(model: nn.Module) -> Iterator[DecoderAdapter]:
    """Within the block, gradients are those of the RelP-linearised model; forward values are unchanged.

    All changes are forward hooks, removed on exit (also on error), so the model is exactly restored.
    Raises ConceptfixError for an unsupported architecture, and on exit if a norm or MLP seen in the block did
    not compute what its rule assumes (y = scale · x; down_proj input = act(gate) · up).
    """
    adapter = get_adapter(model)
    lin = _Linearisation(adapter)
    try:
        lin.install()
        yield adapter
        lin.check()  # after a clean block: a model of unexpected form is an error, not a silently wrong result
    finally:
        lin.remove()


# ---------------------------------------------------------------------------------------------------------
# Metric


def make_metric(tokenizer, correct: str | None, wrong: str | None = None, direction: torch.Tensor | None = None,
                *, position: int = -1) -> MetricSpec:
    """Contrastive ``logit(correct) − logit(wrong)``, one logit (``wrong=None``), or a custom direction."""
    from conceptfix.tokens import resolve_contrastive_token

    if direction is not None:
        if correct is not None or wrong is not None:
            raise ConceptfixError("give either a direction or tokens, not both", field="direction")
        direction = torch.as_tensor(direction, dtype=torch.float32).detach().cpu()
        if direction.ndim != 1:
            raise ConceptfixError(f"direction must be a vector [d_model], got shape {tuple(direction.shape)}",
                                  field="direction")
        return MetricSpec(kind="direction", direction=direction, position=position)
    if correct is None:
        raise ConceptfixError("no metric: give the correct token (and the wrong one for a contrast)", field="correct")
    cid = resolve_contrastive_token(tokenizer, correct, field="correct")
    if wrong is None:
        return MetricSpec(kind="logit", correct_token_id=cid, correct_token=correct, position=position)
    wid = resolve_contrastive_token(tokenizer, wrong, field="wrong")
    if wid == cid:
        raise ConceptfixError(f"correct and wrong are the same token {correct!r}", field="wrong")
    return MetricSpec(kind="contrastive", correct_token_id=cid, wrong_token_id=wid,
                      correct_token=correct, wrong_token=wrong, position=position)


def metric_value(logits: torch.Tensor, metric: MetricSpec, *, hidden: torch.Tensor | None = None) -> float:
    """The metric from logits (``[V]``, ``[T, V]`` or ``[1, T, V]``; row ``metric.position`` is used for 2-D+).

    A ``direction`` metric needs the final normalised hidden state (``hidden``, same layout, ``[d]`` rows).
    """
    if metric.kind == "direction":
        if hidden is None:
            raise ConceptfixError("a direction metric needs the final hidden state, not logits", field="metric")
        row = _row(hidden, metric.position)
        return float(row.float() @ metric.direction.to(row.device).float())
    row = _row(logits, metric.position).float()
    value = row[metric.correct_token_id]
    if metric.kind == "contrastive":
        value = value - row[metric.wrong_token_id]
    return float(value)


def _row(t: torch.Tensor, position: int) -> torch.Tensor:
    if t.ndim == 3:
        t = t[0]
    return t[position] if t.ndim == 2 else t


def metric_readout(adapter: DecoderAdapter, metric: MetricSpec) -> tuple[torch.Tensor, float]:
    """(vector on the final normalised residual, constant) with metric = vector · h + constant."""
    head = adapter.model.get_output_embeddings()
    w = head.weight
    b = getattr(head, "bias", None)
    if metric.kind == "direction":
        if metric.direction is None or metric.direction.shape[-1] != w.shape[1]:
            raise ConceptfixError(f"direction must have d_model={w.shape[1]} entries", field="direction")
        return metric.direction.to(w.device, torch.float32), 0.0
    for tid, name in ((metric.correct_token_id, "correct"), (metric.wrong_token_id, "wrong")):
        if tid is not None and not 0 <= tid < w.shape[0]:
            raise ConceptfixError(f"token id {tid} outside the vocabulary ({w.shape[0]})", field=name)
    vec = _up(w[metric.correct_token_id])
    const = float(b[metric.correct_token_id]) if b is not None else 0.0
    if metric.kind == "contrastive":
        vec = vec - _up(w[metric.wrong_token_id])
        if b is not None:
            const -= float(b[metric.wrong_token_id])
    return vec.detach(), const


# ---------------------------------------------------------------------------------------------------------
# Attribution


@dataclass
class Capture:
    """Tensors captured during one linearised forward: embedding leaf, down_proj inputs, bias contributions."""

    embeddings: torch.Tensor | None = None
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    bias_terms: list[torch.Tensor] = field(default_factory=list)  # each [batch] (relevance of a bias, per item)


def _bias_modules(model: nn.Module) -> list[nn.Module]:
    """Modules adding a constant bias to the residual computation (q/k biases only move the frozen pattern)."""
    out = []
    for name, m in model.named_modules():
        b = getattr(m, "bias", None)
        if isinstance(b, torch.Tensor) and not isinstance(m, nn.Embedding) and m is not model.get_output_embeddings():
            if name.endswith(("q_proj", "k_proj", "q_norm", "k_norm")):
                continue
            out.append(m)
    return out


@contextlib.contextmanager
def capturing(adapter: DecoderAdapter, *, cut_neurons: bool = False) -> Iterator[Capture]:
    """Capture the embedding output (as a leaf needing grad), each layer's down_proj input, bias relevance.

    ``cut_neurons=True`` feeds each down_proj a detached copy of its input (a new leaf): gradients then
    stop at neurons, which gives direct effects (used for edges). ``neurons[i]`` is then that leaf, and
    ``neurons[-1 - i]`` the connected tensor (still depending on everything upstream).
    Must be entered inside ``linearized`` (so that its hooks run after the linearisation hooks).
    """
    cap = Capture()
    handles = []

    def emb_hook(module, args, output):
        leaf = output.detach().requires_grad_(True)
        cap.embeddings = leaf
        return leaf

    def neuron_hook(layer):
        def hook(module, args):
            h = args[0]
            if cut_neurons:
                cap.neurons[-1 - layer] = h
                leaf = h.detach().requires_grad_(True)
                cap.neurons[layer] = leaf
                return (leaf,) + tuple(args[1:])
            cap.neurons[layer] = h
            return None
        return hook

    def bias_hook(module, args, output):
        if torch.is_tensor(output) and output.requires_grad:
            bias = module.bias.detach()

            def grad_hook(g):
                dims = tuple(range(1, g.ndim))
                cap.bias_terms.append((_up(g) * _up(bias)).sum(dim=dims).detach().double().cpu())
            output.register_hook(grad_hook)

    try:
        handles.append(adapter.embed_tokens.register_forward_hook(emb_hook))
        for i in range(adapter.num_layers):
            handles.append(adapter.down_proj(i).register_forward_pre_hook(neuron_hook(i)))
        for m in _bias_modules(adapter.model):
            handles.append(m.register_forward_hook(bias_hook))
        yield cap
    finally:
        for h in handles:
            h.remove()


def encode_prompt(loaded: LoadedModel, prompt: str, *, formatted: bool = False) -> tuple[str, torch.Tensor]:
    text = prompt if formatted else loaded.format_prompt(prompt)
    if not text:
        raise ConceptfixError("empty prompt", field="prompt")
    enc = loaded.encode([text], formatted=True)
    return text, enc["input_ids"]


def attribute_neurons(loaded: LoadedModel, prompt: str, metric: MetricSpec, *, formatted: bool = False) -> NeuronScores:
    """RelP scores of every MLP neuron at every position of ``prompt`` for ``metric`` (one forward + backward)."""
    text, input_ids = encode_prompt(loaded, prompt, formatted=formatted)
    scores = attribute_ids(loaded.model, input_ids, metric)
    scores.prompt = prompt
    scores.formatted_prompt = text
    scores.tokens = [loaded.token_str(t) for t in scores.input_ids]
    return scores


def attribute_ids(model: nn.Module, input_ids: torch.Tensor, metric: MetricSpec) -> NeuronScores:
    """Core of :func:`attribute_neurons` on token ids ``[1, T]`` (no tokenizer or prompt profile needed)."""
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ConceptfixError(f"attribution takes one prompt, got input shape {tuple(input_ids.shape)}", field="prompt")
    num_pos = input_ids.shape[1]
    if not -num_pos <= metric.position < num_pos:
        raise ConceptfixError(f"metric position {metric.position} outside the {num_pos}-token prompt", field="position")
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    with torch.inference_mode(False), torch.enable_grad(), frozen_parameters(model), \
            linearized(model) as adapter, capturing(adapter) as cap:
        vec, const = metric_readout(adapter, metric)
        hidden = adapter.decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        h_last = hidden[0, metric.position]
        linear_metric = (_up(h_last) * vec.to(h_last.device, _up(h_last).dtype)).sum() + const
        neurons = [cap.neurons[i] for i in range(adapter.num_layers)]
        # gradients of the embedding leaf and of every down_proj input, nothing else (no parameter .grad)
        got = torch.autograd.grad(linear_metric, [cap.embeddings] + neurons, allow_unused=True)

        value = float(linear_metric.detach())
        emb = cap.embeddings
        emb_rel = (_up(emb.detach()) * _up(got[0])).sum(-1)[0]
        emb_scores = emb_rel.float().cpu()
        # One device → host copy each, in the model's dtype (bf16 activations and gradients lose nothing, and the
        # copy, which dominates the cost on a GPU, halves); fp32 on the host.
        activations = torch.stack([h.detach()[0] for h in neurons]).cpu().float()
        gradients = torch.stack([torch.zeros_like(h[0]) if g is None else g[0] for h, g in zip(neurons, got[1:])])
        gradients = gradients.cpu().float()
        bias_total = float(sum(float(t.sum()) for t in cap.bias_terms)) + const
    explained = float(emb_rel.double().sum()) + bias_total
    residual = abs(explained - value) / max(abs(value), 1e-12)
    return NeuronScores(
        prompt="", formatted_prompt="", input_ids=[int(t) for t in input_ids[0].tolist()], tokens=[],
        metric=metric, metric_value=value, activations=activations, scores=activations * gradients,
        embedding_scores=emb_scores, conservation_residual=residual,
        gradients=gradients, bias_contribution=bias_total,
    )

"""Does the attribution graph say what the model actually does? Ablate neurons and measure.

Every run records, on the analysed prompt:

* **faithfulness curves**: ablate the top-N kept neurons and compare the real metric change with the change the
  attribution predicts (first order: Σ (replacement − activation) × gradient, i.e. −Σ score for zero ablation),
  for N over a sweep, three ways:

  - ``curve_wrong``: the top-N neurons that push toward the *wrong* answer (score < 0); ablating them should
    raise the metric;
  - ``curve_correct``: the top-N that push toward the *correct* answer (score > 0); ablating them should lower it;
  - ``curve``: the top-N by |score| whatever their sign. Its real change is the difference of two opposing
    effects and need not grow with N (on the blood-pressure prompt the top-10 by |score| are 5 + 5 of each sign
    and their effects cancel to +0.004): read the signed curves for faithfulness, this one for completeness of
    the picture.

  Each point carries two random controls of N neurons, mean ± std over ``random_draws`` draws: ``uniform`` (any
  layer, position, neuron among the positions the circuit may use; one set of draws per N, shared by the three
  curves) and ``matched`` (the same (layer, position) slots as the top-N, a random other neuron index — the
  harder control; signed curves only);
* **single-neuron check**: the top neurons one at a time, real vs predicted change (how linear the model is
  around each neuron);
* **completeness curve**: keep only the top-N kept neurons and ablate every other neuron at the analysed
  positions; how much of the metric remains, normalised between "everything ablated" (0) and the unablated
  model (1) — the faithfulness/completeness curves of Transluce's neuron-circuit work;
* **flip test**: ablate the kept neurons that push toward the wrong answer; the new top-1 token and whether it
  is the correct one, for all of them (``flip_test``) and for the top-N of them over the sweep (``flip_sweep``).

Ablation replaces the input of ``down_proj`` (the neuron activations) at chosen (layer, position, neuron)
entries by zero, by the neuron's mean activation over a corpus, or by its activation on a counterfactual prompt
of the same length. All ablated variants of the prompt run as rows of a few batched forward passes.

``positions`` restricts random draws and complement ablations to the positions the circuit was allowed to use
(the pipeline leaves out position 0, the attention sink, by default; see pipeline.py).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from conceptfix.analyze.adapters import get_adapter
from conceptfix.analyze.types import MetricSpec, NeuronScores, PrunedGraph
from conceptfix.errors import ConceptfixError

AblationKind = Literal["zero", "mean", "counterfactual"]
Entry = tuple[int, int, int]  # (layer, position, neuron)

DEFAULT_SWEEP = (1, 2, 5, 10, 20, 50, 100, 200)
CURVES = ("curve_wrong", "curve_correct", "curve")


@dataclass
class AblationSet:
    """One ablated variant of the prompt: ablate ``entries``, or (complement) everything except them."""

    entries: list[Entry]
    complement: bool = False


@dataclass
class CurvePoint:
    n: int
    metric: float                 # metric after the ablation
    change: float                 # metric − unablated metric
    predicted_change: float       # first-order prediction from the attribution scores
    uniform_random_change_mean: float | None = None
    uniform_random_change_std: float | None = None
    matched_random_change_mean: float | None = None
    matched_random_change_std: float | None = None

    def beats_random(self, sigmas: float = 3.0) -> bool | None:
        """|change| exceeds |mean| + sigmas × std of the uniform random control, and has the predicted sign."""
        if self.uniform_random_change_mean is None:
            return None
        bar = abs(self.uniform_random_change_mean) + sigmas * (self.uniform_random_change_std or 0.0)
        return abs(self.change) > bar and self.change * self.predicted_change > 0


@dataclass
class SinglePoint:
    node_id: str
    layer: int
    position: int
    neuron: int
    score: float
    change: float                 # real metric change when only this neuron is ablated
    predicted_change: float


@dataclass
class CompletenessPoint:
    n: int
    metric: float
    normalized: float             # (metric − metric_all_ablated) / (metric_unablated − metric_all_ablated)


@dataclass
class FlipPoint:
    n: int                        # how many wrong-pushing neurons were ablated
    top1_token: str
    top1_token_id: int
    correct_prob: float
    wrong_prob: float
    correct_rank: int
    metric: float
    flipped: bool                 # top-1 is the correct token


@dataclass
class FaithfulnessReport:
    ablation: str
    metric: str
    unablated_metric: float                 # metric of the hook-free forward pass (equals the attribution's value)
    random_draws: int
    seed: int
    random_control: str
    positions: list[int]                    # positions random draws and complement ablations may touch
    curve: list[CurvePoint]                 # top-N by |score| (both signs)
    curve_wrong: list[CurvePoint]           # top-N of the neurons pushing toward the wrong answer
    curve_correct: list[CurvePoint]         # top-N of the neurons pushing toward the correct answer
    singles: list[SinglePoint]
    completeness: list[CompletenessPoint]
    all_ablated_metric: float
    flip_test: FlipPoint | None             # all kept neurons with negative score ablated; None when there are none
    flip_sweep: list[FlipPoint]
    first_flip_n: int | None                # smallest N of the sweep at which the correct token became top-1
    unablated: FlipPoint                    # top-1 and probabilities of the unablated model (n = 0)
    num_forward_rows: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def point(self, n: int, curve: str = "curve") -> CurvePoint | None:
        for p in getattr(self, curve):
            if p.n == n:
                return p
        return None

    def top_beats_random(self, n: int, curve: str = "curve", sigmas: float = 3.0) -> bool | None:
        """Ablating the top-n of ``curve`` moves the metric more than n random neurons (see CurvePoint)."""
        p = self.point(n, curve)
        return None if p is None else p.beats_random(sigmas)


# --------------------------------------------------------------------------------------------- hooks

class _AblationHooks:
    """Forward pre-hooks on every down_proj that overwrite chosen activations row by row.

    ``row_sets[i]`` describes row i of the current batch; ``replacement`` is [layers, positions, neurons].
    """

    def __init__(self, adapter, replacement: torch.Tensor, positions: list[int] | None = None):
        self.adapter = adapter
        self.replacement = replacement
        # Positions a complement row ablates ("everything except the entries"); None = all positions.
        self.positions = None if positions is None else torch.tensor(sorted(positions), dtype=torch.long)
        self.row_sets: list[AblationSet] = []
        self._index: dict[int, torch.Tensor] = {}
        self._any_complement = False
        self._handles = []
        self._repl_cache: dict[tuple[int, torch.device, torch.dtype], torch.Tensor] = {}

    def set_rows(self, row_sets: list[AblationSet]) -> None:
        """Index the rows' entries per layer once, so each hook call is a few tensor ops."""
        self.row_sets = row_sets
        per_layer: dict[int, list[tuple[int, int, int]]] = {}
        for row, s in enumerate(row_sets):
            for layer, position, neuron in s.entries:
                per_layer.setdefault(layer, []).append((row, position, neuron))
        self._index = {layer: torch.tensor(triples, dtype=torch.long).T for layer, triples in per_layer.items()}
        self._complement_rows = torch.tensor([i for i, s in enumerate(row_sets) if s.complement], dtype=torch.long)
        self._any_complement = bool(self._complement_rows.numel())
        self._complement_row_mask = torch.tensor([s.complement for s in row_sets], dtype=torch.bool)

    def __enter__(self):
        for layer in range(self.adapter.num_layers):
            self._handles.append(self.adapter.down_proj(layer).register_forward_pre_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _repl(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        key = (layer, x.device, x.dtype)
        if key not in self._repl_cache:
            self._repl_cache[key] = self.replacement[layer].to(x.device, x.dtype)
        return self._repl_cache[key]

    def _hook(self, layer: int):
        def hook(module, args):
            x = args[0]
            index = self._index.get(layer)
            if index is None and not self._any_complement:
                return None
            mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
            if self._any_complement:
                rows = self._complement_rows.to(x.device)
                if self.positions is None:
                    mask[rows] = True
                else:
                    mask[rows.unsqueeze(1), self.positions.to(x.device).unsqueeze(0)] = True
            if index is not None:
                rows, pos, neu = (t.to(x.device) for t in index)
                # Plain rows: ablate the entries; complement rows: everything except the entries.
                mask[rows, pos, neu] = ~self._complement_row_mask.to(x.device)[rows]
            return (torch.where(mask, self._repl(layer, x).unsqueeze(0), x),) + tuple(args[1:])
        return hook


# ------------------------------------------------------------------------------------------ metric

def _metric_from_logits(logits: torch.Tensor, metric: MetricSpec, final_hidden: torch.Tensor | None) -> torch.Tensor:
    """logits [B, V] at the metric position → [B]."""
    if metric.kind == "contrastive":
        return logits[:, metric.correct_token_id] - logits[:, metric.wrong_token_id]
    if metric.kind == "logit":
        return logits[:, metric.correct_token_id]
    if final_hidden is None:
        raise ConceptfixError("a direction metric needs the final hidden state", field="metric")
    return final_hidden.float() @ metric.direction.to(final_hidden.device, torch.float32)


@torch.no_grad()
def run_rows(loaded, input_ids: list[int], row_sets: list[AblationSet], replacement: torch.Tensor,
             metric: MetricSpec, *, batch_size: int = 32, positions: list[int] | None = None,
             skip_layers: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Metric [R] and metric-position logits [R, V] (fp32 cpu) for every ablated variant.

    ``skip_layers``: a row that ablates nothing below layer l has, at layer l's input, exactly the unablated
    hidden state; such rows start there from one cached clean pass, and the layers below are not run (most
    circuit neurons sit in late layers, so this removes most of the compute of the curves).
    """
    adapter = get_adapter(loaded.model)
    ids = torch.tensor([input_ids], device=loaded.input_device)
    captured: dict[str, torch.Tensor] = {}

    def grab_final(module, args, output):
        captured["h"] = output[:, metric.position]

    # Rows sorted by the first layer they touch, so a batch starts as late as its earliest row allows.
    starts = [0 if (s.complement or not skip_layers) else min((e[0] for e in s.entries), default=adapter.num_layers)
              for s in row_sets]
    order = sorted(range(len(row_sets)), key=lambda i: starts[i])
    metrics = torch.empty(len(row_sets))
    logits_all: torch.Tensor | None = None
    norm_handle = adapter.final_norm.register_forward_hook(grab_final) if metric.kind == "direction" else None
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        # Only the metric position's logits are needed: skip the vocabulary projection elsewhere.
        keep = {"logits_to_keep": 1} if metric.position == -1 else {}
        clean = _layer_inputs(adapter, loaded.model, ids) if skip_layers else None
        with _AblationHooks(adapter, replacement, positions) as hooks:
            for b in range(0, len(order), batch_size):
                chunk = order[b:b + batch_size]
                hooks.set_rows([row_sets[i] for i in chunk])
                first = min(starts[chunk[0]], adapter.num_layers - 1)
                with _start_at_layer(adapter, first, clean[first] if (clean is not None and first > 0) else None):
                    out = loaded.model(input_ids=ids.expand(len(chunk), -1), use_cache=False, **keep)
                logits = out.logits[:, -1 if keep else metric.position].float().cpu()
                if logits_all is None:
                    logits_all = torch.empty(len(row_sets), logits.shape[-1])
                index = torch.tensor(chunk)
                metrics[index] = _metric_from_logits(logits, metric, captured.get("h")).float().cpu()
                logits_all[index] = logits
    finally:
        if norm_handle is not None:
            norm_handle.remove()
        loaded.model.train(was_training)
    return metrics, logits_all


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def _layer_inputs(adapter, model, ids: torch.Tensor) -> list[torch.Tensor]:
    """The hidden state entering every decoder layer on the unablated prompt ([1, T, d] each)."""
    store: list[torch.Tensor | None] = [None] * adapter.num_layers
    handles = []
    for layer in range(adapter.num_layers):
        def pre(module, args, kwargs, layer=layer):
            store[layer] = _hidden_arg(args, kwargs).detach()
        handles.append(adapter.layers[layer].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return store


class _Skipped(torch.nn.Module):
    """Stands in for a decoder layer that need not run: returns its input; other attributes (e.g. a Qwen2/Gemma
    layer's ``attention_type``, read by the decoder loop) come from the real layer."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.__dict__["_real"] = layer

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)


@contextlib.contextmanager
def _start_at_layer(adapter, first: int, hidden: torch.Tensor | None):
    """Run only layers ``first`` … end: earlier layers pass through, layer ``first`` gets the cached input."""
    if hidden is None or first <= 0:
        yield
        return
    layers = adapter.layers
    originals = [layers[i] for i in range(first)]

    def pre(module, args, kwargs):
        x = _hidden_arg(args, kwargs)
        h = hidden.to(x.device, x.dtype).expand(x.shape[0], -1, -1)
        if args:
            return (h,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    handle = layers[first].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for i in range(first):
            layers[i] = _Skipped(originals[i])
        yield
    finally:
        for i in range(first):
            layers[i] = originals[i]
        handle.remove()


@torch.no_grad()
def prompt_activations(loaded, input_ids: list[int]) -> torch.Tensor:
    """[layers, positions, neurons] fp32 cpu activations (down_proj inputs) of one token sequence."""
    adapter = get_adapter(loaded.model)
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(adapter.num_layers):
        def hook(module, args, layer=layer):
            store[layer] = args[0][0].detach().float().cpu()
        handles.append(adapter.down_proj(layer).register_forward_pre_hook(hook))
    try:
        loaded.model(input_ids=torch.tensor([input_ids], device=loaded.input_device))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([store[layer] for layer in range(adapter.num_layers)])


def build_replacement(loaded, scores: NeuronScores, ablation: AblationKind, *,
                      mean_activations: torch.Tensor | None = None,
                      counterfactual_prompt: str | None = None) -> tuple[torch.Tensor, dict]:
    """The value each neuron is set to when ablated, [layers, positions, neurons], and a description."""
    shape = scores.activations.shape
    if ablation == "zero":
        return torch.zeros(shape), {"ablation": "zero"}
    if ablation == "mean":
        if mean_activations is None:
            raise ConceptfixError("mean ablation needs corpus mean activations", field="--ablation")
        return mean_activations.float().unsqueeze(1).expand(shape).contiguous(), {"ablation": "mean"}
    if ablation == "counterfactual":
        if not counterfactual_prompt:
            raise ConceptfixError("counterfactual ablation needs a counterfactual prompt", field="--counterfactual",
                                  hint="e.g. --counterfactual 'The primary hormone regulating blood sugar is'")
        enc = loaded.encode([counterfactual_prompt])
        cf_ids = enc["input_ids"][0].tolist()
        if len(cf_ids) != len(scores.input_ids):
            raise ConceptfixError(
                f"the counterfactual prompt has {len(cf_ids)} tokens, the prompt {len(scores.input_ids)}",
                field="--counterfactual", hint="positions are patched one to one: use a prompt of the same token length")
        return prompt_activations(loaded, cf_ids), {"ablation": "counterfactual",
                                                    "counterfactual_prompt": counterfactual_prompt}
    raise ConceptfixError(f"unknown ablation {ablation!r}", field="--ablation", hint="zero, mean or counterfactual")


def predicted_change(scores: NeuronScores, replacement: torch.Tensor, entries: list[Entry]) -> float:
    """First-order change of the metric: Σ (replacement − activation) × gradient, gradient = score / activation."""
    if not entries:
        return 0.0
    idx = torch.tensor(entries)
    act = scores.activations[idx[:, 0], idx[:, 1], idx[:, 2]].double()
    score = scores.scores[idx[:, 0], idx[:, 1], idx[:, 2]].double()
    repl = replacement[idx[:, 0], idx[:, 1], idx[:, 2]].double()
    if scores.gradients is not None:
        grad = scores.gradients[idx[:, 0], idx[:, 1], idx[:, 2]].double()
    else:
        grad = torch.where(act != 0, score / torch.where(act != 0, act, torch.ones_like(act)), torch.zeros_like(act))
    return float(((repl - act) * grad).sum())


# ------------------------------------------------------------------------------------------ report

def evaluate_faithfulness(loaded, graph: PrunedGraph, *, ablation: AblationKind = "zero",
                          mean_activations: torch.Tensor | None = None, counterfactual_prompt: str | None = None,
                          sweep: tuple[int, ...] = DEFAULT_SWEEP, random_draws: int = 8, seed: int = 0,
                          batch_size: int = 32, positions: list[int] | None = None,
                          singles: int = 20) -> FaithfulnessReport:
    """Faithfulness curves, single-neuron check, completeness and flip test for one pruned graph (module doc)."""
    scores = graph.scores
    metric = scores.metric
    replacement, replacement_info = build_replacement(loaded, scores, ablation, mean_activations=mean_activations,
                                                      counterfactual_prompt=counterfactual_prompt)
    num_layers, num_positions, width = scores.activations.shape
    positions = sorted(set(range(num_positions) if positions is None else positions))
    if not positions or positions[0] < 0 or positions[-1] >= num_positions:
        raise ConceptfixError(f"positions {positions} do not fit the {num_positions}-token prompt", field="positions")
    if random_draws < 1:
        raise ConceptfixError(f"random_draws must be at least 1, got {random_draws}", field="random_draws")
    ranked = sorted(graph.kept, key=lambda k: abs(k.score), reverse=True)
    entries = {
        "curve": [(k.layer, k.position, k.neuron) for k in ranked],
        "curve_wrong": [(k.layer, k.position, k.neuron) for k in ranked if k.score < 0],
        "curve_correct": [(k.layer, k.position, k.neuron) for k in ranked if k.score > 0],
    }
    ns = {name: _sweep(sweep, len(e)) for name, e in entries.items()}
    generator = torch.Generator().manual_seed(seed)
    pos_index = torch.tensor(positions)

    rows: list[AblationSet] = [AblationSet([])]                     # 0: unablated (sanity vs attribution)
    rows.append(AblationSet([], complement=True))                   # 1: everything ablated

    def add(row: AblationSet) -> int:
        rows.append(row)
        return len(rows) - 1

    top_rows = {name: {n: add(AblationSet(entries[name][:n])) for n in ns[name]} for name in CURVES}
    # Uniform controls: one set of draws per N, shared by every curve that has that N.
    uniform_rows: dict[int, list[int]] = {}
    cells = num_layers * len(positions) * width
    for n in sorted(set().union(*ns.values())):
        uniform_rows[n] = []
        for _ in range(random_draws):
            flat = torch.randperm(cells, generator=generator)[:n]
            draw = [(int(f // (len(positions) * width)), int(pos_index[f // width % len(positions)]), int(f % width))
                    for f in flat]
            uniform_rows[n].append(add(AblationSet(draw)))
    matched_rows = {name: {n: [add(AblationSet(_matched_draw(entries[name][:n], width, generator)))
                               for _ in range(random_draws)] for n in ns[name]}
                    for name in ("curve_wrong", "curve_correct")}
    single_entries = entries["curve"][:singles]
    single_rows = [add(AblationSet([e])) for e in single_entries]
    complete_rows = {n: add(AblationSet(entries["curve"][:n], complement=True)) for n in ns["curve"]}

    metrics, logits = run_rows(loaded, scores.input_ids, rows, replacement, metric, batch_size=batch_size,
                               positions=positions)
    base = float(metrics[0])
    all_ablated = float(metrics[1])
    notes = []
    if abs(base - scores.metric_value) > 1e-2 * max(1.0, abs(scores.metric_value)):
        notes.append(f"unablated metric {base:.4f} differs from the attribution's {scores.metric_value:.4f}")
    if ablation != "zero":
        notes.append(f"replacement: {replacement_info}")
    if positions != list(range(num_positions)):
        notes.append(f"random draws and complement ablations use positions {positions} only")

    def change(r: int) -> float:
        return float(metrics[r]) - base

    def stats(rs: list[int]) -> tuple[float | None, float | None]:
        t = torch.tensor([change(r) for r in rs], dtype=torch.float64)
        return _mean(t), _std(t)

    curves: dict[str, list[CurvePoint]] = {}
    for name in CURVES:
        curves[name] = []
        for n in ns[name]:
            u_mean, u_std = stats(uniform_rows[n])
            m_mean, m_std = stats(matched_rows[name][n]) if name in matched_rows else (None, None)
            r = top_rows[name][n]
            curves[name].append(CurvePoint(
                n=n, metric=float(metrics[r]), change=change(r),
                predicted_change=predicted_change(scores, replacement, entries[name][:n]),
                uniform_random_change_mean=u_mean, uniform_random_change_std=u_std,
                matched_random_change_mean=m_mean, matched_random_change_std=m_std,
            ))
    single_points = [
        SinglePoint(node_id=f"{layer}_{neuron}_{pos}", layer=layer, position=pos, neuron=neuron,
                    score=float(scores.scores[layer, pos, neuron]), change=change(r),
                    predicted_change=predicted_change(scores, replacement, [(layer, pos, neuron)]))
        for (layer, pos, neuron), r in zip(single_entries, single_rows)
    ]
    denom = base - all_ablated
    completeness = [CompletenessPoint(n=0, metric=all_ablated, normalized=0.0)]
    for n in ns["curve"]:
        m = float(metrics[complete_rows[n]])
        completeness.append(CompletenessPoint(n=n, metric=m, normalized=(m - all_ablated) / denom if denom else math.nan))

    # The flip sweep reuses the wrong-pushing curve's rows (same ablations, read as top-1 / probabilities).
    flip_sweep = [_flip_point(loaded, n, logits[r], float(metrics[r]), metric)
                  for n, r in top_rows["curve_wrong"].items()]
    flip = flip_sweep[-1] if flip_sweep else None
    if flip is None:
        notes.append("no kept neuron pushes toward the wrong answer; flip test not applicable")
    first_flip = next((p.n for p in flip_sweep if p.flipped), None)
    unablated = _flip_point(loaded, 0, logits[0], base, metric)
    return FaithfulnessReport(
        ablation=ablation, metric=metric.describe(), unablated_metric=base, random_draws=random_draws, seed=seed,
        random_control="uniform: any (layer, position, neuron) at the listed positions, one set of draws per N; "
                       "matched: same (layer, position) as the top-N, random other neuron index",
        positions=positions, curve=curves["curve"], curve_wrong=curves["curve_wrong"],
        curve_correct=curves["curve_correct"], singles=single_points, completeness=completeness,
        all_ablated_metric=all_ablated, flip_test=flip, flip_sweep=flip_sweep, first_flip_n=first_flip,
        unablated=unablated, num_forward_rows=len(rows), notes=notes,
    )


def _sweep(sweep: tuple[int, ...], available: int) -> list[int]:
    """The sweep's sizes below ``available``, plus ``available`` itself (all of them)."""
    return sorted({n for n in sweep if 0 < n < available} | ({available} if available else set()))


def _matched_draw(entries: list[Entry], width: int, generator: torch.Generator) -> list[Entry]:
    taken = set(entries)
    out = []
    for layer, position, _ in entries:
        while True:
            neuron = int(torch.randint(width, (1,), generator=generator))
            if (layer, position, neuron) not in taken:
                taken.add((layer, position, neuron))
                out.append((layer, position, neuron))
                break
    return out


def _flip_point(loaded, n: int, logits: torch.Tensor, metric_value: float, metric: MetricSpec) -> FlipPoint:
    probs = torch.softmax(logits, dim=-1)
    top1 = int(logits.argmax())
    correct = metric.correct_token_id
    wrong = metric.wrong_token_id
    rank = int((logits > logits[correct]).sum()) + 1 if correct is not None else -1
    return FlipPoint(
        n=n, top1_token=loaded.token_str(top1), top1_token_id=top1,
        correct_prob=float(probs[correct]) if correct is not None else math.nan,
        wrong_prob=float(probs[wrong]) if wrong is not None else math.nan,
        correct_rank=rank, metric=metric_value, flipped=correct is not None and top1 == correct,
    )


def _mean(t: torch.Tensor) -> float | None:
    return float(t.mean()) if t.numel() else None


def _std(t: torch.Tensor) -> float | None:
    return float(t.std(unbiased=False)) if t.numel() else None

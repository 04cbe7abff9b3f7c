"""Does the attribution graph say what the model actually does? Ablate neurons and measure.

Every run records, on the analysed prompt:

* **faithfulness curve**: ablate the top-N kept neurons (by |score|) for N over a sweep; the real metric change
  next to the change the attribution predicts (first-order: Σ (replacement − activation) × gradient, which is
  −Σ score for zero ablation), and two random controls of N neurons each, mean ± std over several draws:
  ``uniform`` (any layer, position, neuron) and ``matched`` (the same (layer, position) slots as the top-N,
  a random other neuron index — the harder control);
* **completeness curve**: keep only the top-N kept neurons and ablate every other neuron of the model (all
  layers, all positions); how much of the metric remains, normalised between "everything ablated" (0) and the
  unablated model (1) — the faithfulness/completeness curves of Transluce's neuron-circuit work;
* **flip test**: ablate the kept neurons that push toward the wrong answer (negative score); the new top-1
  token and whether it is the correct one, plus the same for the top-N of them over the sweep.

Ablation replaces the input of ``down_proj`` (the neuron activations) at chosen (layer, position, neuron)
entries by zero, by the neuron's mean activation over a corpus, or by its activation on a counterfactual prompt
of the same length. All ablated variants of the prompt run as rows of a few batched forward passes.
"""

from __future__ import annotations

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
    curve: list[CurvePoint]
    completeness: list[CompletenessPoint]
    all_ablated_metric: float
    flip_test: FlipPoint | None             # all kept neurons with negative score ablated; None when there are none
    flip_sweep: list[FlipPoint]
    unablated: FlipPoint                    # top-1 and probabilities of the unablated model (n = 0)
    num_forward_rows: int
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def top_beats_random(self, n: int) -> bool | None:
        """|change| of ablating the top-n exceeds the mean |change| of n uniform random neurons."""
        for point in self.curve:
            if point.n == n and point.uniform_random_change_mean is not None:
                return abs(point.change) > abs(point.uniform_random_change_mean)
        return None


# --------------------------------------------------------------------------------------------- hooks

class _AblationHooks:
    """Forward pre-hooks on every down_proj that overwrite chosen activations row by row.

    ``row_sets[i]`` describes row i of the current batch; ``replacement`` is [layers, positions, neurons].
    """

    def __init__(self, adapter, replacement: torch.Tensor):
        self.adapter = adapter
        self.replacement = replacement
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
                mask[self._complement_rows.to(x.device)] = True
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
             metric: MetricSpec, *, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Metric [R] and last-position... metric-position logits [R, V] (fp32 cpu) for every ablated variant."""
    adapter = get_adapter(loaded.model)
    ids = torch.tensor([input_ids], device=loaded.input_device)
    metrics, logits_all = [], []
    captured: dict[str, torch.Tensor] = {}

    def grab_final(module, args, output):
        captured["h"] = output[:, metric.position]

    norm_handle = adapter.final_norm.register_forward_hook(grab_final) if metric.kind == "direction" else None
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        with _AblationHooks(adapter, replacement) as hooks:
            for start in range(0, len(row_sets), batch_size):
                chunk = row_sets[start:start + batch_size]
                hooks.set_rows(chunk)
                out = loaded.model(input_ids=ids.expand(len(chunk), -1))
                logits = out.logits[:, metric.position].float()
                metrics.append(_metric_from_logits(logits, metric, captured.get("h")).cpu())
                logits_all.append(logits.cpu())
    finally:
        if norm_handle is not None:
            norm_handle.remove()
        loaded.model.train(was_training)
    return torch.cat(metrics), torch.cat(logits_all)


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
                          batch_size: int = 32) -> FaithfulnessReport:
    scores = graph.scores
    metric = scores.metric
    replacement, replacement_info = build_replacement(loaded, scores, ablation, mean_activations=mean_activations,
                                                      counterfactual_prompt=counterfactual_prompt)
    num_layers, num_positions, width = scores.activations.shape
    ranked = sorted(graph.kept, key=lambda k: abs(k.score), reverse=True)
    entries = [(k.layer, k.position, k.neuron) for k in ranked]
    ns = sorted({n for n in sweep if n < len(entries)} | ({len(entries)} if entries else set()))
    generator = torch.Generator().manual_seed(seed)

    rows: list[AblationSet] = [AblationSet([])]                     # 0: unablated (sanity vs attribution)
    rows.append(AblationSet([], complement=True))                   # 1: everything ablated
    top_rows, uniform_rows, matched_rows, complete_rows = {}, {}, {}, {}
    for n in ns:
        top_rows[n] = len(rows)
        rows.append(AblationSet(entries[:n]))
    for n in ns:
        uniform_rows[n] = []
        matched_rows[n] = []
        for _ in range(random_draws):
            flat = torch.randperm(num_layers * num_positions * width, generator=generator)[:n]
            uni = [(int(f // (num_positions * width)), int(f // width % num_positions), int(f % width)) for f in flat]
            uniform_rows[n].append((len(rows), uni))
            rows.append(AblationSet(uni))
            matched = _matched_draw(entries[:n], width, generator)
            matched_rows[n].append((len(rows), matched))
            rows.append(AblationSet(matched))
    for n in ns:
        complete_rows[n] = len(rows)
        rows.append(AblationSet(entries[:n], complement=True))
    negatives = [e for e, k in zip(entries, ranked) if k.score < 0]
    flip_ns = sorted({n for n in sweep if n < len(negatives)} | ({len(negatives)} if negatives else set()))
    flip_rows = {}
    for n in flip_ns:
        flip_rows[n] = len(rows)
        rows.append(AblationSet(negatives[:n]))

    metrics, logits = run_rows(loaded, scores.input_ids, rows, replacement, metric, batch_size=batch_size)
    base = float(metrics[0])
    all_ablated = float(metrics[1])
    notes = []
    if abs(base - scores.metric_value) > 1e-2 * max(1.0, abs(scores.metric_value)):
        notes.append(f"unablated metric {base:.4f} differs from the attribution's {scores.metric_value:.4f}")
    if ablation != "zero":
        notes.append(f"replacement: {replacement_info}")

    curve = []
    for n in ns:
        change = float(metrics[top_rows[n]]) - base
        uni = torch.tensor([float(metrics[r]) - base for r, _ in uniform_rows[n]])
        mat = torch.tensor([float(metrics[r]) - base for r, _ in matched_rows[n]])
        curve.append(CurvePoint(
            n=n, metric=float(metrics[top_rows[n]]), change=change,
            predicted_change=predicted_change(scores, replacement, entries[:n]),
            uniform_random_change_mean=_mean(uni), uniform_random_change_std=_std(uni),
            matched_random_change_mean=_mean(mat), matched_random_change_std=_std(mat),
        ))
    denom = base - all_ablated
    completeness = [CompletenessPoint(n=0, metric=all_ablated, normalized=0.0)]
    for n in ns:
        m = float(metrics[complete_rows[n]])
        completeness.append(CompletenessPoint(n=n, metric=m, normalized=(m - all_ablated) / denom if denom else math.nan))

    flip_sweep = [_flip_point(loaded, n, logits[flip_rows[n]], float(metrics[flip_rows[n]]), metric) for n in flip_ns]
    flip = flip_sweep[-1] if flip_sweep else None
    if flip is None:
        notes.append("no kept neuron pushes toward the wrong answer; flip test not applicable")
    unablated = _flip_point(loaded, 0, logits[0], base, metric)
    return FaithfulnessReport(
        ablation=ablation, metric=metric.describe(), unablated_metric=base, random_draws=random_draws, seed=seed,
        random_control="uniform: any (layer, position, neuron); matched: same (layer, position) as the top-N, "
                       "random other neuron index",
        curve=curve, completeness=completeness, all_ablated_metric=all_ablated, flip_test=flip,
        flip_sweep=flip_sweep, unablated=unablated, num_forward_rows=len(rows), notes=notes,
    )


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

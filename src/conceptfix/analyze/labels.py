"""Neuron labels, each tagged with where it came from.

Sources (all keyed by ``(layer, neuron)``; a neuron's label does not depend on the position it fired at):

``logit_lens``    offline, always: the tokens the neuron's ``down_proj`` column promotes and suppresses when read
                  through the final norm's scale and the unembedding (what the neuron *writes*).
``top_contexts``  offline, always: the corpus tokens on which the neuron fires hardest, in the direction it fired
                  on the analysed prompt (what the neuron *reads*). The same corpus pass yields each neuron's mean
                  activation, which mean-ablation uses.
``imported``      descriptions from a CSV/JSONL file keyed by layer/neuron (e.g. published Llama-3.1-8B
                  neuron descriptions).
``llm``           a short description written by an LLM (OpenAI-compatible endpoint) from the two offline
                  sources; skipped with ``--no-llm``.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Protocol

import torch

from conceptfix.analyze.adapters import get_adapter
from conceptfix.errors import ConceptfixError
from conceptfix.progress import track

NeuronKey = tuple[int, int]  # (layer, neuron)

SOURCES = ("imported", "llm", "top_contexts", "logit_lens")  # preference order for the one-line label


@dataclass
class NeuronLabel:
    source: str                      # one of SOURCES
    text: str                        # one line a person reads
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CorpusStats:
    """One pass over a text corpus: per-neuron mean activation and top-activating contexts for chosen neurons."""

    mean_activations: torch.Tensor                   # [layers, neurons] fp32 cpu, mean over non-pad tokens
    num_tokens: int
    top_positive: dict[NeuronKey, list[dict]]        # highest activations: {"activation", "context", "token"}
    top_negative: dict[NeuronKey, list[dict]]        # most negative activations (SwiGLU neurons fire both ways)
    corpus_name: str = "builtin"


# --------------------------------------------------------------------------------------------- corpus

def default_corpus() -> list[str]:
    text = resources.files("conceptfix").joinpath("data/label_corpus.txt").read_text(encoding="utf-8")
    return _corpus_lines(text)


def load_corpus(path: str | Path | None) -> tuple[list[str], str]:
    """Sentences for top-activating contexts: the shipped corpus, or a text file with one passage per line."""
    if path is None:
        return default_corpus(), "builtin"
    path = Path(path)
    if not path.is_file():
        raise ConceptfixError(f"corpus file not found: {path}", field="--corpus")
    try:
        lines = _corpus_lines(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConceptfixError(f"{path} is not UTF-8 text", field="--corpus") from None
    if not lines:
        raise ConceptfixError(f"{path} holds no text lines", field="--corpus", hint="one passage per line")
    return lines, str(path)


def _corpus_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _down_proj_capture(adapter, layers: Iterable[int], store: dict[int, torch.Tensor]):
    """Forward pre-hooks that keep the input of down_proj (the neuron activations) of the given layers."""
    handles = []
    for layer in layers:
        def hook(module, args, layer=layer):
            store[layer] = args[0].detach()
        handles.append(adapter.down_proj(layer).register_forward_pre_hook(hook))
    return handles


@torch.no_grad()
def corpus_statistics(loaded, sentences: list[str], neurons: Iterable[NeuronKey], *, top_n: int = 5,
                      batch_size: int = 16, max_tokens: int = 64, corpus_name: str = "builtin",
                      progress: bool | None = None) -> CorpusStats:
    """Run the model over the corpus once; collect means (all neurons) and top contexts (the given neurons).

    The first token of every passage is skipped: BOS / first-position activations are outliers (attention-sink
    behaviour) and would dominate both the means and the top contexts.
    """
    adapter = get_adapter(loaded.model)
    tok = loaded.tokenizer
    wanted = sorted(set(neurons))
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in wanted:
        by_layer.setdefault(layer, []).append(neuron)
    num_layers, width = adapter.num_layers, adapter.num_neurons
    sums = torch.zeros(num_layers, width, dtype=torch.float64)
    count = 0
    # Running top-n per (layer, neuron), kept as tensors of (value, flat token index).
    best_pos: dict[NeuronKey, list[tuple[float, int, int]]] = {k: [] for k in wanted}
    best_neg: dict[NeuronKey, list[tuple[float, int, int]]] = {k: [] for k in wanted}
    all_ids: list[list[int]] = []
    store: dict[int, torch.Tensor] = {}
    handles = _down_proj_capture(adapter, range(num_layers), store)
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        batches = [sentences[i:i + batch_size] for i in range(0, len(sentences), batch_size)]
        for b_index, batch in enumerate(track(batches, total=len(batches), description="corpus activations",
                                              enabled=progress)):
            enc = tok(batch, return_tensors="pt", padding=True, padding_side="left", truncation=True,
                      max_length=max_tokens)
            ids = enc["input_ids"]
            mask = enc["attention_mask"].bool()
            first = mask.float().argmax(dim=1)  # first real token of each left-padded row
            valid = mask.clone()
            valid[torch.arange(len(batch)), first] = False
            loaded.model(input_ids=ids.to(loaded.input_device), attention_mask=enc["attention_mask"].to(loaded.input_device))
            sentence_offset = len(all_ids)
            for row in range(len(batch)):
                all_ids.append(ids[row][mask[row]].tolist())
            count += int(valid.sum())
            for layer in range(num_layers):
                acts = store[layer].float().cpu()               # [B, T, N]
                sums[layer] += (acts * valid.unsqueeze(-1)).sum(dim=(0, 1)).double()
                if layer not in by_layer:
                    continue
                cols = torch.tensor(by_layer[layer])
                sel = acts[:, :, cols]                          # [B, T, K]
                pos_vals = sel.masked_fill(~valid.unsqueeze(-1), float("-inf"))
                neg_vals = sel.masked_fill(~valid.unsqueeze(-1), float("inf"))
                for j, neuron in enumerate(by_layer[layer]):
                    key = (layer, neuron)
                    _merge_top(best_pos[key], pos_vals[:, :, j], mask, sentence_offset, top_n, largest=True)
                    _merge_top(best_neg[key], neg_vals[:, :, j], mask, sentence_offset, top_n, largest=False)
    finally:
        for h in handles:
            h.remove()
        loaded.model.train(was_training)
    mean = (sums / max(count, 1)).float()

    def render(entries):
        return [_context_entry(tok, all_ids[s], t, v) for v, s, t in entries]

    return CorpusStats(mean_activations=mean, num_tokens=count,
                       top_positive={k: render(v) for k, v in best_pos.items()},
                       top_negative={k: render(v) for k, v in best_neg.items()},
                       corpus_name=corpus_name)


def _merge_top(best: list, values: torch.Tensor, mask: torch.Tensor, sentence_offset: int, n: int, *, largest: bool):
    """Merge this batch's top-n (one per sentence, so the contexts are varied) into the running list."""
    per_row_val, per_row_pos = (values.max(dim=1) if largest else values.min(dim=1))
    for row in range(values.shape[0]):
        v = float(per_row_val[row])
        if not torch.isfinite(per_row_val[row]):
            continue
        # Position within the unpadded sentence.
        pad = int((~mask[row]).sum())
        best.append((v, sentence_offset + row, int(per_row_pos[row]) - pad))
    best.sort(key=lambda e: e[0], reverse=largest)
    del best[n:]


def _context_entry(tok, ids: list[int], position: int, value: float) -> dict:
    before = tok.decode(ids[max(0, position - 12):position])
    token = tok.decode([ids[position]])
    after = tok.decode(ids[position + 1:position + 4])
    return {"activation": round(value, 4), "token": token, "context": f"{before}[[{token}]]{after}"}


def top_context_labels(stats: CorpusStats, prompt_activation: dict[NeuronKey, float]) -> dict[NeuronKey, NeuronLabel]:
    """Label = the top-activating tokens, taken in the direction the neuron fired on the analysed prompt."""
    labels = {}
    for key in stats.top_positive:
        negative = prompt_activation.get(key, 1.0) < 0
        entries = stats.top_negative[key] if negative else stats.top_positive[key]
        if not entries:
            continue
        tokens = ", ".join(repr(e["token"].strip() or e["token"]) for e in entries[:3])
        sign = "−" if negative else "+"
        labels[key] = NeuronLabel(
            source="top_contexts",
            text=f"fires ({sign}) on {tokens}",
            details={"direction": "negative" if negative else "positive", "corpus": stats.corpus_name,
                     "contexts": entries},
        )
    return labels


# ------------------------------------------------------------------------------------------ logit lens

@torch.no_grad()
def logit_lens_labels(loaded, neurons: Iterable[NeuronKey], *, k: int = 8,
                      prompt_activation: dict[NeuronKey, float] | None = None) -> dict[NeuronKey, NeuronLabel]:
    """What each neuron's output direction does to the logits: W_U · (g ⊙ down_proj[:, n]).

    g is the final norm's per-channel scale (the input-dependent 1/rms factor is a positive scalar and
    does not change the ranking). ``promotes`` is for a positive activation; when the neuron fired negatively
    on the prompt, the label reads the other end, since that is what it actually did there.
    """
    adapter = get_adapter(loaded.model)
    keys = sorted(set(neurons))
    if not keys:
        return {}
    unembed = adapter.unembedding
    scale = _final_norm_scale(adapter)
    labels: dict[NeuronKey, NeuronLabel] = {}
    tok = loaded.tokenizer
    for start in range(0, len(keys), 64):
        chunk = keys[start:start + 64]
        cols = torch.stack([adapter.neuron_output_direction(l, n).to(unembed.device, torch.float32) for l, n in chunk],
                           dim=1)                                  # [d, K]
        if scale is not None:
            cols = cols * scale.to(cols.device, torch.float32).unsqueeze(1)
        logits = unembed.float() @ cols                            # [V, K]
        top = logits.topk(k, dim=0)
        bottom = (-logits).topk(k, dim=0)
        for j, key in enumerate(chunk):
            promoted = [tok.decode([int(i)]) for i in top.indices[:, j]]
            suppressed = [tok.decode([int(i)]) for i in bottom.indices[:, j]]
            fired_negative = (prompt_activation or {}).get(key, 1.0) < 0
            effective = suppressed if fired_negative else promoted
            text = "writes " + ", ".join(repr(t) for t in effective[:4])
            if fired_negative:
                text += " (fired negative)"
            labels[key] = NeuronLabel(
                source="logit_lens", text=text,
                details={"promotes": promoted, "suppresses": suppressed,
                         "promote_logits": [round(float(v), 4) for v in top.values[:, j]],
                         "suppress_logits": [round(-float(v), 4) for v in bottom.values[:, j]],
                         "fired_negative": fired_negative},
            )
    return labels


def _final_norm_scale(adapter) -> torch.Tensor | None:
    weight = getattr(adapter.final_norm, "weight", None)
    if weight is None:
        return None
    weight = weight.detach()
    if adapter.model_type.startswith("gemma"):
        return 1.0 + weight  # Gemma's RMSNorm multiplies by (1 + weight)
    return weight


# ---------------------------------------------------------------------------------------- imported

_LAYER_KEYS = ("layer", "layer_index", "layer_idx", "l")
_NEURON_KEYS = ("neuron", "neuron_index", "neuron_idx", "index", "feature", "n")
_TEXT_KEYS = ("description", "label", "explanation", "text", "clerp")


def load_imported_labels(path: str | Path) -> dict[NeuronKey, NeuronLabel]:
    """Read neuron descriptions from CSV or JSONL (or a JSON list).

    Columns/keys accepted (first present wins): layer ``layer|layer_index|layer_idx``, neuron
    ``neuron|neuron_index|neuron_idx|index|feature``, text ``description|label|explanation|text|clerp``.
    A ``score`` column, when present, is kept (e.g. a description's simulation score) and the highest-scoring
    description per neuron wins.
    """
    path = Path(path)
    if not path.is_file():
        raise ConceptfixError(f"labels file not found: {path}", field="--labels-file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConceptfixError(f"{path} is not UTF-8 text", field="--labels-file") from None
    rows = _parse_rows(path, text)
    labels: dict[NeuronKey, NeuronLabel] = {}
    for line_no, row in rows:
        row = {str(k).strip().lower(): v for k, v in row.items()}
        layer = _first(row, _LAYER_KEYS)
        neuron = _first(row, _NEURON_KEYS)
        description = _first(row, _TEXT_KEYS)
        if layer is None or neuron is None or description is None:
            raise ConceptfixError(
                f"{path}:{line_no} needs layer, neuron and description columns (got {sorted(row)})",
                field="--labels-file")
        try:
            key = (int(layer), int(neuron))
        except (TypeError, ValueError):
            raise ConceptfixError(f"{path}:{line_no}: layer/neuron must be integers", field="--labels-file") from None
        score = row.get("score")
        try:
            score = float(score) if score not in (None, "") else None
        except (TypeError, ValueError):
            score = None
        previous = labels.get(key)
        if previous is not None and (previous.details.get("score") or float("-inf")) >= (score or float("-inf")):
            continue
        labels[key] = NeuronLabel(source="imported", text=str(description).strip(),
                                  details={"file": path.name, "score": score})
    return labels


def _parse_rows(path: Path, text: str) -> list[tuple[int, dict]]:
    suffix = path.suffix.lower()
    if suffix == ".csv" or suffix == ".tsv":
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        return [(i + 2, row) for i, row in enumerate(reader)]
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConceptfixError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})", field="--labels-file") from None
        if not isinstance(data, list):
            raise ConceptfixError(f"{path} must hold a JSON list of objects", field="--labels-file")
        return [(i + 1, row) for i, row in enumerate(data) if isinstance(row, dict)]
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConceptfixError(f"{path}:{i} is not valid JSON ({exc.msg})", field="--labels-file",
                                  hint="use .csv for comma-separated files, one JSON object per line for .jsonl") from None
        if not isinstance(row, dict):
            raise ConceptfixError(f"{path}:{i} is not a JSON object", field="--labels-file")
        rows.append((i, row))
    return rows


def _first(row: dict, keys: tuple[str, ...]):
    for key in keys:
        if key in row and row[key] not in (None, ""):
            return row[key]
    return None


# --------------------------------------------------------------------------------------------- LLM

class JSONCompleter(Protocol):
    def complete_json(self, system: str, user: str, schema: dict | None = None) -> dict: ...


LLM_SYSTEM = (
    "You describe what a single MLP neuron in a language model represents, for interpretability researchers. "
    "You get the tokens its output promotes and suppresses (logit lens) and text snippets where it fires hardest "
    "(the firing token is marked [[like this]]). Reply with JSON {\"label\": \"<at most 8 words>\"} naming the concept; "
    "say \"unclear\" when the evidence does not agree."
)

LLM_SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string"}},
    "required": ["label"],
    "additionalProperties": False,
}


def llm_labels(client: JSONCompleter, evidence: dict[NeuronKey, dict[str, NeuronLabel]], *,
               model_name: str = "", progress: bool | None = None) -> dict[NeuronKey, NeuronLabel]:
    """One request per neuron, from its logit-lens and top-context evidence. Failures are left unlabelled."""
    labels = {}
    for key in track(list(evidence), total=len(evidence), description="LLM labels", enabled=progress):
        layer, neuron = key
        parts = [f"Neuron: layer {layer}, index {neuron}."]
        lens = evidence[key].get("logit_lens")
        if lens is not None:
            parts.append("Promotes: " + ", ".join(repr(t) for t in lens.details.get("promotes", [])))
            parts.append("Suppresses: " + ", ".join(repr(t) for t in lens.details.get("suppresses", [])))
        contexts = evidence[key].get("top_contexts")
        if contexts is not None:
            parts.append("Top-activating contexts:")
            parts.extend(f"- {c['context']} (activation {c['activation']})" for c in contexts.details["contexts"])
        reply = client.complete_json(LLM_SYSTEM, "\n".join(parts), schema=LLM_SCHEMA)
        text = str(reply.get("label", "")).strip() if isinstance(reply, dict) else ""
        if text:
            labels[key] = NeuronLabel(source="llm", text=text[:200], details={"model": model_name})
    return labels


# ------------------------------------------------------------------------------------------ combine

def combine_labels(*sources: dict[NeuronKey, NeuronLabel]) -> dict[NeuronKey, list[NeuronLabel]]:
    """All labels per neuron, ordered by SOURCES preference (imported, llm, top_contexts, logit_lens)."""
    merged: dict[NeuronKey, list[NeuronLabel]] = {}
    for source in sources:
        for key, label in source.items():
            merged.setdefault(key, []).append(label)
    rank = {s: i for i, s in enumerate(SOURCES)}
    for key in merged:
        merged[key].sort(key=lambda lab: rank.get(lab.source, len(rank)))
    return merged


def primary_label(labels: list[NeuronLabel] | None) -> str:
    """The one-line label shown in summaries and on hover: the preferred source, tagged with it."""
    if not labels:
        return ""
    best = labels[0]
    return f"[{best.source}] {best.text}"

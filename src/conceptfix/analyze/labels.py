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
import math
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

    mean_activations: torch.Tensor                   # [layers, neurons] fp32 cpu, mean over non-first tokens
    num_tokens: int
    top_positive: dict[NeuronKey, list[dict]]        # highest activations: {"activation", "context", "token"}
    top_negative: dict[NeuronKey, list[dict]]        # most negative activations (SwiGLU neurons fire both ways)
    corpus_name: str = "builtin"
    cached: bool = False                             # came from the on-disk cache (no model pass)


@dataclass
class _FullStats:
    """Statistics of *every* neuron, which is what the disk cache holds: means and top-n both ways (one entry
    per passage, so the contexts are varied). ~5 MB for a 30-layer × 1536-neuron model with n = 5."""

    mean: torch.Tensor          # [L, N] fp32
    num_tokens: int
    pos_val: torch.Tensor       # [L, n, N] fp32 descending; -inf when fewer than n passages had a valid token
    pos_sent: torch.Tensor      # [L, n, N] int32 passage index
    pos_tok: torch.Tensor       # [L, n, N] int32 token index within the unpadded passage
    neg_val: torch.Tensor       # [L, n, N] ascending; +inf padding
    neg_sent: torch.Tensor
    neg_tok: torch.Tensor
    token_ids: list[list[int]]  # every passage, tokenised, unpadded


# Bump when the statistics change meaning; old cache files are then ignored.
CORPUS_STATS_VERSION = 2


def cache_dir() -> Path:
    """Where corpus statistics are cached (per model fingerprint and corpus hash)."""
    from conceptfix.models import cache_root

    return cache_root() / "corpus_stats"


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


def corpus_statistics(loaded, sentences: list[str], neurons: Iterable[NeuronKey], *, top_n: int = 5,
                      batch_size: int = 32, max_tokens: int = 64, corpus_name: str = "builtin",
                      progress: bool | None = None, cache: bool = True) -> CorpusStats:
    """Means of every neuron and top-activating contexts of the given neurons over a corpus.

    One model pass computes the statistics of *all* neurons; they are cached on disk keyed by the model's
    fingerprint and the corpus text, so the next analysis with the same model and corpus costs no forward pass.
    The first token of every passage is skipped: first-position activations are outliers (attention-sink
    behaviour, activations in the thousands) and would dominate both the means and the top contexts.
    """
    key = _stats_key(loaded, sentences, top_n=top_n, max_tokens=max_tokens)
    path = cache_dir() / f"{key}.pt"
    full = _read_cache(path) if cache else None
    cached = full is not None
    if full is None:
        full = _compute_full_stats(loaded, sentences, top_n=top_n, batch_size=batch_size, max_tokens=max_tokens,
                                   progress=progress)
        if cache:
            _write_cache(path, full)
    tok = loaded.tokenizer
    wanted = sorted(set(neurons))

    def render(vals, sents, toks, layer, neuron):
        out = []
        for v, s, t in zip(vals[layer, :, neuron].tolist(), sents[layer, :, neuron].tolist(),
                           toks[layer, :, neuron].tolist()):
            if math.isfinite(v):
                out.append(_context_entry(tok, full.token_ids[s], t, v))
        return out

    return CorpusStats(
        mean_activations=full.mean, num_tokens=full.num_tokens, corpus_name=corpus_name, cached=cached,
        top_positive={(l, n): render(full.pos_val, full.pos_sent, full.pos_tok, l, n) for l, n in wanted},
        top_negative={(l, n): render(full.neg_val, full.neg_sent, full.neg_tok, l, n) for l, n in wanted},
    )


def _stats_key(loaded, sentences: list[str], *, top_n: int, max_tokens: int) -> str:
    from conceptfix.artifacts import content_hash
    from conceptfix.filter import model_fingerprint

    return content_hash({
        "version": CORPUS_STATS_VERSION, "model": model_fingerprint(loaded.spec, loaded.checkpoint, loaded.device,
                                                                     loaded.dtype),
        "sentences": content_hash(sentences), "top_n": top_n, "max_tokens": max_tokens,
    })


def _read_cache(path: Path) -> _FullStats | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return _FullStats(**state)
    except Exception:  # a damaged or foreign cache file is recomputed, never trusted
        return None


def _write_cache(path: Path, full: _FullStats) -> None:
    import io

    from conceptfix.artifacts import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(asdict(full), buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError:
        pass  # a read-only cache directory only costs the next run a corpus pass


@torch.no_grad()
def _compute_full_stats(loaded, sentences: list[str], *, top_n: int, batch_size: int, max_tokens: int,
                        progress: bool | None) -> _FullStats:
    adapter = get_adapter(loaded.model)
    tok = loaded.tokenizer
    num_layers, width = adapter.num_layers, adapter.num_neurons
    # Tokenise once; batch passages of similar length together so little compute goes to padding.
    token_ids = [tok(s, truncation=True, max_length=max_tokens)["input_ids"] for s in sentences]
    order = sorted(range(len(sentences)), key=lambda i: len(token_ids[i]))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    sums = torch.zeros(num_layers, width, dtype=torch.float64)
    count = 0
    inf = float("inf")
    best = {
        "pos_val": torch.full((num_layers, top_n, width), -inf), "neg_val": torch.full((num_layers, top_n, width), inf),
        "pos_sent": torch.zeros((num_layers, top_n, width), dtype=torch.int32),
        "neg_sent": torch.zeros((num_layers, top_n, width), dtype=torch.int32),
        "pos_tok": torch.zeros((num_layers, top_n, width), dtype=torch.int32),
        "neg_tok": torch.zeros((num_layers, top_n, width), dtype=torch.int32),
    }
    store: dict[int, torch.Tensor] = {}
    handles = _down_proj_capture(adapter, range(num_layers), store)
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in track(batches, total=len(batches), description="corpus activations", enabled=progress):
            lengths = torch.tensor([len(token_ids[i]) for i in batch])
            width_t = int(lengths.max())
            # Left padding: position -1 is the last real token of every row.
            ids = torch.full((len(batch), width_t), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width_t), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, width_t - len(token_ids[i]):] = torch.tensor(token_ids[i])
                mask[row, width_t - len(token_ids[i]):] = 1
            pad = width_t - lengths                                   # [B] left padding per row
            valid = mask.bool()
            valid[torch.arange(len(batch)), pad.clamp(max=width_t - 1)] = False   # skip each passage's first token
            # The decoder only: the vocabulary projection is not needed for activations.
            adapter.decoder(input_ids=ids.to(loaded.input_device), attention_mask=mask.to(loaded.input_device),
                            use_cache=False)
            count += int(valid.sum())
            sent_idx = torch.tensor(batch, dtype=torch.int32)
            vmask = valid.unsqueeze(-1)
            for layer in range(num_layers):
                acts = store.pop(layer).float().cpu()                 # [B, T, N]
                sums[layer] += (acts * vmask).sum(dim=(0, 1)).double()
                for sign, fill in (("pos", -inf), ("neg", inf)):
                    vals = acts.masked_fill(~vmask, fill)
                    row_val, row_pos = vals.max(dim=1) if sign == "pos" else vals.min(dim=1)   # [B, N]
                    all_val = torch.cat([best[f"{sign}_val"][layer], row_val])
                    all_sent = torch.cat([best[f"{sign}_sent"][layer], sent_idx.unsqueeze(1).expand_as(row_pos)])
                    all_tok = torch.cat([best[f"{sign}_tok"][layer], (row_pos - pad.unsqueeze(1)).to(torch.int32)])
                    top = all_val.topk(top_n, dim=0, largest=sign == "pos")
                    best[f"{sign}_val"][layer] = top.values
                    best[f"{sign}_sent"][layer] = all_sent.gather(0, top.indices)
                    best[f"{sign}_tok"][layer] = all_tok.gather(0, top.indices)
    finally:
        for h in handles:
            h.remove()
        loaded.model.train(was_training)
    return _FullStats(mean=(sums / max(count, 1)).float(), num_tokens=count, token_ids=token_ids, **best)


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

"""Evaluation outputs: evaluation.json, evaluation.md (the seed's results table and the details),
probability_shift.png, and the terminal summary."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

from conceptfix.artifacts import atomic_write_bytes, atomic_write_text, write_artifact
from conceptfix.errors import ConceptfixError
from conceptfix.evaluate.core import pct
from conceptfix.evaluate.types import CaseEvaluation, EvaluationResult, PromptComparison

RESULT_FILE = "evaluation.json"
MARKDOWN_FILE = "evaluation.md"
PLOT_FILE = "probability_shift.png"

BASE_COLOR = "#9aa5b1"
TUNED_COLOR = "#1f6fb2"
CORRECT_COLOR = "#1b873f"
WRONG_COLOR = "#c62828"


# ------------------------------------------------------------------------------------------ markdown

def _cell(text: object) -> str:
    """Safe inside a markdown table cell (tokens can hold pipes, backticks and newlines)."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("\n", "\\n")


def _tok(token: str) -> str:
    """A token as a code span (repr shows its leading space); backslash escapes do not work inside code spans."""
    return "`" + repr(token).replace("`", "'").replace("|", "\\|").replace("\n", " ") + "`"


def seed_table(result: EvaluationResult) -> str:
    lines = ["| Experiment | Base Wrong→Correct | SFT Wrong→Correct | Method |",
             "|------------|-------------------|-------------------|--------|"]
    for c in result.cases:
        r = c.seed_row
        lines.append(f"| {_cell(r.experiment)} | {r.base} | {r.sft} | {_cell(r.method)} |")
    return "\n".join(lines)


def _profile_text(result: EvaluationResult) -> str:
    p = result.profile
    system = "none" if p.get("system_prompt") is None else repr(p.get("system_prompt"))
    return (f"chat template {'on' if p.get('use_chat_template') else 'off'}, system prompt {system}, "
            f"answer prefix {p.get('answer_prefix', '')!r} (from {result.profile_source})")


def _topk_table(comp: PromptComparison) -> list[str]:
    lines = ["| # | Base token | p | SFT token | p |", "|---:|---|---:|---|---:|"]

    def mark(row) -> str:
        return " ✓" if row.is_correct else (" ✗" if row.is_wrong else "")

    for b, t in zip(comp.base.top_k, comp.tuned.top_k):
        lines.append(f"| {b.rank} | {_tok(b.token)}{mark(b)} | {b.prob:.4f} | {_tok(t.token)}{mark(t)} | {t.prob:.4f} |")
    return lines


def _case_section(index: int, c: CaseEvaluation) -> list[str]:
    t = c.target
    lines = [f"## {_cell(c.case.label)}: target prompt", "",
             f"Prompt: `{_cell(t.prompt)}`  ", f"Formatted: `{_cell(t.formatted_prompt)}`  ",
             f"Correct answer {c.case.correct!r} scored as token {_tok(t.correct_token)} (✓); "
             f"wrong answer {c.case.wrong!r} as {_tok(t.wrong_token)} (✗).", "",
             f"**{_cell(c.verdict)}**", "",
             "| | Base | SFT |", "|---|---:|---:|",
             f"| top-1 | {_tok(t.base.top1)} | {_tok(t.tuned.top1)} |",
             f"| p(wrong) | {t.base.wrong_prob:.4f} | {t.tuned.wrong_prob:.4f} |",
             f"| rank(wrong) | {t.base.wrong_rank} | {t.tuned.wrong_rank} |",
             f"| p(correct) | {t.base.correct_prob:.4f} | {t.tuned.correct_prob:.4f} |",
             f"| rank(correct) | {t.base.correct_rank} | {t.tuned.correct_rank} |",
             f"| correct is top-1 | {'yes' if t.base.success else 'no'} | {'yes' if t.tuned.success else 'no'} |",
             f"| KL(base‖SFT) | | {t.kl:.4f} nats |", "",
             "Top-10 next tokens before and after:", "", *_topk_table(t), ""]
    if c.paraphrases:
        g = c.generalisation
        lines += [f"### Generalisation: {g.n} paraphrases (source: {g.source})", "",
                  "| Prompt | Base top-1 | SFT top-1 | p(correct) base→SFT | p(wrong) base→SFT | correct top-1 |",
                  "|---|---|---|---|---|---|"]
        for p in c.paraphrases:
            flag = f"{'yes' if p.base.success else 'no'}→{'yes' if p.tuned.success else 'no'}"
            lines.append(f"| {_cell(p.prompt)} | {_tok(p.base.top1)} | {_tok(p.tuned.top1)} | "
                         f"{pct(p.base.correct_prob)}→{pct(p.tuned.correct_prob)} | "
                         f"{pct(p.base.wrong_prob)}→{pct(p.tuned.wrong_prob)} | {flag} |")
        lines += ["", f"Correct answer top-1 on {g.success_before:.0%} of paraphrases before, {g.success_after:.0%} after; "
                  f"mean Δp(correct) {g.mean_delta_correct:+.4f}, mean Δp(wrong) {g.mean_delta_wrong:+.4f} "
                  f"(p(correct) rose on {g.n_correct_up}/{g.n}, p(wrong) fell on {g.n_wrong_down}/{g.n}).", ""]
    else:
        lines += ["No paraphrases were available for this case (generalisation not measured).", ""]
    return lines


def _locality_section(result: EvaluationResult) -> list[str]:
    loc = result.locality
    if loc is None:
        return []
    lines = ["## Locality", ""]
    overlap = (f"{loc.n_excluded_overlap} excluded for sharing a word with the training texts"
               if loc.training_texts_known else "training texts unknown, so no overlap exclusion")
    lines.append(f"Held-out facts from {_cell(loc.source)}: {loc.n_records} records, {loc.n_excluded_target} excluded as the "
                 f"target (same prompt or answer), {overlap}; {loc.n_scanned} scanned on the base model, "
                 f"{len(loc.facts)} it gets right kept (cap {loc.cap}, seed {loc.seed}).")
    if loc.overlap_examples:
        shown = "; ".join(f"{_cell(o.prompt)} ({', '.join(o.terms)})" for o in loc.overlap_examples[:5])
        lines += ["", f"Excluded for overlap, e.g.: {shown}."]
    lines.append("")
    lines += ["| Metric | Base | SFT |", "|---|---:|---:|"]
    if loc.facts:
        lines += [f"| accuracy on {len(loc.facts)} known facts | {loc.accuracy_before:.1%} | {loc.accuracy_after:.1%} |",
                  f"| mean p(answer token) | {loc.mean_answer_prob_before:.4f} | {loc.mean_answer_prob_after:.4f} |",
                  f"| facts flipped right→wrong | | {loc.n_flipped} |",
                  f"| mean KL(base‖SFT), facts | | {loc.mean_kl_facts:.4f} nats |"]
    if loc.neutral:
        lines += [f"| mean KL(base‖SFT), {len(loc.neutral)} neutral prompts | | {loc.mean_kl_neutral:.4f} nats |",
                  f"| neutral prompts whose top-1 changed | | {loc.n_neutral_top1_changed} |"]
    if loc.max_kl is not None:
        lines.append(f"| max KL | | {loc.max_kl:.4f} nats |")
    lines.append("")
    flipped = [f for f in loc.facts if not f.tuned_correct]
    if flipped:
        lines += ["Facts the SFT model no longer gets right:", "",
                  "| Prompt | Answer | Base top-1 (p) | SFT top-1 | KL |", "|---|---|---|---|---:|"]
        for f in flipped:
            lines.append(f"| {_cell(f.prompt)} | {_cell(f.answer)} | {_tok(f.answer_token)} ({f.base_prob:.3f}) | "
                         f"{_tok(f.tuned_top1)} | {f.kl:.4f} |")
        lines.append("")
    if loc.neutral:
        worst = sorted(loc.neutral, key=lambda n: -n.kl)[:5]
        lines += ["Neutral prompts with the largest KL:", "", "| Prompt | Base top-1 | SFT top-1 | KL |", "|---|---|---|---:|"]
        lines += [f"| {_cell(n.prompt)} | {_tok(n.base_top1)} | {_tok(n.tuned_top1)} | {n.kl:.4f} |" for n in worst]
        lines.append("")
    return lines


def render_markdown(result: EvaluationResult) -> str:
    lines = [f"# Evaluation: `{_cell(result.tuned_model)}` vs `{_cell(result.base_model)}`", "",
             f"Prompt profile (same for both models): {_profile_text(result)}.  ",
             "p(answer) is the probability of the answer's first token; success = the correct answer is top-1.", "",
             "## Results", "", seed_table(result), "",
             "Base/SFT Wrong→Correct: p(wrong)→p(correct) on the target prompt.", ""]
    for c in result.cases:
        lines.append(f"- {_cell(c.case.label)}: {_cell(c.verdict)}")
    lines.append("")
    for i, c in enumerate(result.cases):
        lines += _case_section(i, c)
    lines += _locality_section(result)
    prov = result.provenance
    if prov:
        lines += ["---", f"conceptfix evaluate, {prov.get('created_utc', '')}; versions: "
                  + ", ".join(f"{k} {v}" for k, v in prov.get("versions", {}).items())]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- plots

def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _shift_bars(ax, comp: PromptComparison, max_tokens: int = 14) -> None:
    """Grouped horizontal bars: base vs SFT probability of the union of both top-k lists (+ correct, wrong)."""
    rows = list(comp.shift)
    special = [r for r in rows if r.token_id in (comp.correct_token_id, comp.wrong_token_id)]
    keep = {r.token_id for r in special} | {r.token_id for r in [r for r in rows if r not in special]
                                              [: max(0, max_tokens - len(special))]}
    rows = [r for r in rows if r.token_id in keep]  # still ordered by max probability
    labels = [repr(r.token) for r in rows]
    base = [r.base_prob for r in rows]
    tuned = [r.tuned_prob for r in rows]
    y = list(range(len(rows)))
    h = 0.38
    ax.barh([i - h / 2 for i in y], base, height=h, color=BASE_COLOR, label="base")
    ax.barh([i + h / 2 for i in y], tuned, height=h, color=TUNED_COLOR, label="SFT")
    top = max(base + tuned + [1e-9])
    for i, (b, t) in enumerate(zip(base, tuned)):
        ax.text(b + top * 0.01, i - h / 2, f"{b:.3f}", va="center", fontsize=7, color="#555555")
        ax.text(t + top * 0.01, i + h / 2, f"{t:.3f}", va="center", fontsize=7, color=TUNED_COLOR)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontfamily="monospace")
    for tick, row in zip(ax.get_yticklabels(), rows):
        if row.token_id in (comp.correct_token_id, comp.wrong_token_id):
            tick.set_color(CORRECT_COLOR if row.token_id == comp.correct_token_id else WRONG_COLOR)
            tick.set_fontweight("bold")
    ax.invert_yaxis()
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel("next-token probability")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", frameon=False)
    ax.set_title(_wrap(f"{comp.prompt!r}", 60) + f"\ncorrect {comp.correct_token!r} (green), wrong {comp.wrong_token!r} (red)",
                 fontsize=10)


def _dumbbells(ax, rows: list[tuple[str, float, float, float, float]], title: str) -> None:
    """Per prompt: p(correct) and p(wrong), base (open circle) → SFT (filled), joined by an arrow."""
    y = list(range(len(rows)))
    for i, (_, cb, ct, wb, wt) in enumerate(rows):
        for before, after, color, dy in ((cb, ct, CORRECT_COLOR, -0.12), (wb, wt, WRONG_COLOR, 0.12)):
            ax.annotate("", xy=(after, i + dy), xytext=(before, i + dy),
                        arrowprops=dict(arrowstyle="->", color=color, lw=1.4, alpha=0.8))
            ax.scatter([before], [i + dy], facecolors="white", edgecolors=color, s=36, zorder=3)
            ax.scatter([after], [i + dy], color=color, s=36, zorder=3)
    ax.set_yticks(y)
    ax.set_yticklabels([_wrap(r[0], 38) for r in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.1, -0.5)  # inverted, with room below the last row for the legend
    ax.set_xlim(0, max([max(r[1:]) for r in rows] + [1e-9]) * 1.12)
    ax.set_xlabel("probability: base ○ → SFT ●")
    ax.grid(axis="x", alpha=0.3)
    from matplotlib.lines import Line2D

    ax.legend(handles=[Line2D([], [], color=CORRECT_COLOR, marker="o", label="p(correct)"),
                       Line2D([], [], color=WRONG_COLOR, marker="o", label="p(wrong)")],
              loc="lower right", frameon=False, fontsize=8)
    ax.set_title(title, fontsize=10)


def plot_case(c: CaseEvaluation) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = [c.target, *c.paraphrases]
    if len(comps) > 1:
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, max(5.0, 0.42 * 14 + 1)),
                                          gridspec_kw={"width_ratios": [1.15, 1]})
        _shift_bars(left, c.target)
        rows = [(("target: " if comp.kind == "target" else "") + comp.prompt, comp.base.correct_prob,
                 comp.tuned.correct_prob, comp.base.wrong_prob, comp.tuned.wrong_prob) for comp in comps]
        g = c.generalisation
        _dumbbells(right, rows, f"Generalisation: correct top-1 on {g.success_before:.0%} → {g.success_after:.0%} "
                                f"of {g.n} paraphrases")
    else:
        fig, left = plt.subplots(figsize=(7.5, max(4.5, 0.42 * 14 + 1)))
        _shift_bars(left, c.target)
    status = "FIXED" if c.success_after and not c.success_before else ("correct before and after" if c.success_after
                                                                        else "NOT fixed")
    fig.suptitle(f"{c.case.label}: Base {c.seed_row.base}  →  SFT {c.seed_row.sft}  (wrong→correct) — {status}",
                 fontsize=12, fontweight="bold")
    fig.tight_layout()
    return _figure_bytes(fig)


def plot_cases_summary(result: EvaluationResult) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(f"{c.case.label}: {c.target.prompt}", c.target.base.correct_prob, c.target.tuned.correct_prob,
             c.target.base.wrong_prob, c.target.tuned.wrong_prob) for c in result.cases]
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.55 * len(rows) + 1.5)))
    s = result.summary
    _dumbbells(ax, rows, f"{s['n_cases']} cases: correct top-1 {s['success_before']} → {s['success_after']} "
                         f"({s['fixed']} fixed, {s['broken']} broken)")
    fig.tight_layout()
    return _figure_bytes(fig)


# ---------------------------------------------------------------------------------------------- files

def load_cached(output_dir: str | Path, inputs_hash: str) -> EvaluationResult | None:
    """The existing result when it was computed from the same inputs (skip the work on a re-run)."""
    path = Path(output_dir) / RESULT_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        result = EvaluationResult.model_validate(data)
    except (ValueError, TypeError):
        return None
    return result if result.inputs_hash and result.inputs_hash == inputs_hash else None


def write_outputs(result: EvaluationResult, output_dir: str | Path, *, overwrite: bool = False) -> dict[str, Path]:
    """evaluation.json (refuses to replace a different result without overwrite), .md and the plot(s)."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ConceptfixError(f"{out} exists and is not a directory", field="--output")
    paths = {"json": write_artifact(out / RESULT_FILE, result, overwrite=overwrite)}
    paths["markdown"] = atomic_write_text(out / MARKDOWN_FILE, render_markdown(result))
    if len(result.cases) == 1:
        paths["plot"] = atomic_write_bytes(out / PLOT_FILE, plot_case(result.cases[0]))
    else:
        paths["plot"] = atomic_write_bytes(out / PLOT_FILE, plot_cases_summary(result))
        for i, c in enumerate(result.cases):
            paths[f"plot_{i}"] = atomic_write_bytes(out / f"probability_shift_{i:02d}.png", plot_case(c))
    return paths


# -------------------------------------------------------------------------------------------- terminal

def print_summary(result: EvaluationResult, console) -> None:
    from rich.table import Table

    table = Table(title="conceptfix evaluate", show_lines=False)
    for col in ("Experiment", "Base Wrong→Correct", "SFT Wrong→Correct", "Method", "top-1 after"):
        table.add_column(col)
    for c in result.cases:
        r = c.seed_row
        status = ("[green]fixed[/]" if c.success_after and not c.success_before else
                  "[green]correct[/]" if c.success_after else "[red]not fixed[/]")
        table.add_row(r.experiment, r.base, r.sft, r.method, f"{c.target.tuned.top1!r} ({status})")
    console.print(table)
    for c in result.cases:
        console.print(f"  {c.case.label}: {c.verdict}", highlight=False, markup=False)
        if c.generalisation:
            g = c.generalisation
            console.print(f"  generalisation ({g.n} paraphrases, {g.source}): correct top-1 {g.success_before:.0%} → "
                          f"{g.success_after:.0%}, mean Δp(correct) {g.mean_delta_correct:+.3f}, "
                          f"mean Δp(wrong) {g.mean_delta_wrong:+.3f}", highlight=False, markup=False)
    loc = result.locality
    if loc is not None:
        if loc.facts:
            console.print(f"  locality: {len(loc.facts)} held-out facts ({loc.source}): accuracy "
                          f"{loc.accuracy_before:.1%} → {loc.accuracy_after:.1%}, {loc.n_flipped} flipped right→wrong, "
                          f"mean p(answer) {loc.mean_answer_prob_before:.3f} → {loc.mean_answer_prob_after:.3f}, "
                          f"mean KL {loc.mean_kl_facts:.4f} nats", highlight=False, markup=False)
        else:
            console.print(f"  locality: no held-out facts ({loc.source}; {loc.n_scanned} scanned)", highlight=False,
                          markup=False)
        if loc.neutral:
            console.print(f"  neutral prompts: mean KL {loc.mean_kl_neutral:.4f} nats over {len(loc.neutral)}, "
                          f"top-1 changed on {loc.n_neutral_top1_changed}", highlight=False, markup=False)

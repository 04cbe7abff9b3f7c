"""From a request (config / checkpoint / case file / ad-hoc target) to written results.

Resolution order:
  models  : --base/--tuned, else the config's model_name/output_dir; a tuned dir written by
            `conceptfix train` also carries its resolved_config.yaml, used as the config when none is given.
  cases   : --case FILE#N | --cases FILE | --prompt/--correct/--wrong, else the config's `target:` block.
  profile : the base model's default profile, then the config's use_chat_template/system_prompt, then
            --profile FILE, then the explicit flags. Base and tuned are always read with the same one.
  locality: --locality-file, else the built-in prompt bank; the training texts (config) are excluded.

A re-run with the same inputs (models, weights on disk, cases, profile, settings) returns the stored
result without loading a model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from conceptfix.artifacts import content_hash, parse_model, provenance, read_json, read_yaml
from conceptfix.errors import ConceptfixError
from conceptfix.evaluate.core import answer_candidates, evaluate
from conceptfix.evaluate.paraphrases import with_paraphrases
from conceptfix.evaluate.report import RESULT_FILE, load_cached, write_outputs
from conceptfix.evaluate.types import EvalCase, EvaluationResult, EvaluationSettings
from conceptfix.generate.validator import prompt_form_violations
from conceptfix.models import ModelProfile, default_profile
from conceptfix.schemas import PromptRecord, load_prompt_records, load_target_case
from conceptfix.train.config import SFTConfig, load_sft_config, parse_sft_config

RESOLVED_CONFIG = "resolved_config.yaml"


class EvaluationRequest(BaseModel):
    """Everything the CLI can say; every field optional where a config can supply it."""

    config: str | None = None
    base: str | None = None
    tuned: str | None = None
    case_ref: str | None = None      # FILE.json#N
    cases_file: str | None = None    # all target cases of a filter output
    prompt: str | None = None
    correct: str | None = None
    wrong: str | None = None
    paraphrases: list[str] = Field(default_factory=list)
    name: str | None = None          # "Experiment" column
    method: str | None = None        # "Method" column
    device: str | None = None
    dtype: str | None = None
    chat_template: bool | None = None
    system_prompt: str | None = None
    answer_prefix: str | None = None
    profile_file: str | None = None
    trust_remote_code: bool = False
    locality_file: str | None = None
    use_bank: bool = True
    settings: EvaluationSettings = Field(default_factory=EvaluationSettings)
    paraphrases_llm: bool = False
    llm_model: str = "gpt-4o"
    base_url: str | None = None
    n_llm_paraphrases: int = Field(5, ge=1)


@dataclass
class ResolvedRequest:
    base: str
    tuned: str
    device: str
    dtype: str
    profile: ModelProfile
    profile_source: str
    cases: list[EvalCase]
    training_texts: list[str] | None
    locality_records: list[PromptRecord]
    locality_source: str
    bank: list[PromptRecord]
    method: str
    config_source: str | None


def _tuned_config(tuned: str) -> SFTConfig | None:
    """The config `conceptfix train` stored next to the weights (its extra `resolved` block dropped)."""
    path = Path(tuned) / RESOLVED_CONFIG
    if not path.is_file():
        return None
    data = read_yaml(path, field="--tuned")
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "resolved"}
    return parse_sft_config(data, source=str(path))


def check_tuned_dir(tuned: str) -> None:
    path = Path(tuned)
    if not path.is_dir():
        raise ConceptfixError(f"tuned checkpoint directory not found: {tuned}", field="--tuned",
                              hint="run `conceptfix train --config CONFIG` first, or pass --tuned DIR")
    run_file = path / "run.json"
    if run_file.is_file():
        run = read_json(run_file, field="--tuned")
        if isinstance(run, dict) and run.get("status") not in (None, "complete"):
            raise ConceptfixError(f"the training run in {tuned} is not complete (status {run.get('status')!r})",
                                  field="--tuned", hint="finish it with `conceptfix train --config CONFIG --resume`")
    if not (path / "config.json").is_file():
        hint = ("it holds only a LoRA adapter: train with merge_lora: true" if (path / "adapter_config.json").is_file()
                or (path / "adapter").is_dir() else "point to a Hugging Face checkpoint directory")
        raise ConceptfixError(f"{tuned} has no config.json (not a model checkpoint)", field="--tuned", hint=hint)


def _load_bank() -> list[PromptRecord]:
    try:
        from conceptfix.generate.bank import load_bank
    except ImportError:
        return []
    try:
        return list(load_bank())
    except (FileNotFoundError, OSError):
        return []


def _cases(req: EvaluationRequest, cfg: SFTConfig | None) -> list[EvalCase]:
    sources = [name for name, given in (("--case", req.case_ref), ("--cases", req.cases_file),
                                        ("--prompt", req.prompt)) if given]
    if len(sources) > 1:
        raise ConceptfixError(f"give only one of {', '.join(sources)}", field=sources[1])
    if req.case_ref:
        cases = [EvalCase.from_target_case(load_target_case(req.case_ref))]
    elif req.cases_file:
        from conceptfix.schemas import FilterResult

        data = read_json(req.cases_file, field="--cases")
        result = parse_model(FilterResult, data, prefix=f"{req.cases_file}: ")
        if not result.target_cases:
            raise ConceptfixError(f"{req.cases_file} has no target cases", field="--cases",
                                  hint="the filter found no clearly-wrong prompt; evaluate an ad-hoc --prompt")
        cases = [EvalCase.from_target_case(c) for c in result.target_cases]
    elif req.prompt is not None:
        for name, value in (("--prompt", req.prompt), ("--correct", req.correct), ("--wrong", req.wrong)):
            if value is None or not value.strip():
                raise ConceptfixError("is required for an ad-hoc target (with --prompt, --correct and --wrong)",
                                      field=name)
        cases = [EvalCase(prompt=req.prompt, correct=req.correct, wrong=req.wrong, paraphrases=req.paraphrases,
                          paraphrase_source="cli" if req.paraphrases else "none", source="cli")]
    elif cfg is not None and cfg.target is not None:
        t = cfg.target
        cases = [EvalCase(prompt=t.prompt, correct=t.correct, wrong=t.wrong, paraphrases=list(t.paraphrases),
                          paraphrase_source="config" if t.paraphrases else "none", source="config")]
    else:
        where = "the config has no `target:` block" if cfg is not None else "no target given"
        raise ConceptfixError(where, field="target",
                              hint="add target: {prompt, correct, wrong} to the config, or pass --case FILE#N, "
                                   "--cases FILE or --prompt/--correct/--wrong")
    if req.paraphrases and not req.prompt:
        cases = [c.model_copy(update={"paraphrases": [*c.paraphrases, *req.paraphrases],
                                      "paraphrase_source": "cli" if not c.paraphrases else c.paraphrase_source})
                 for c in cases]
    if req.name and len(cases) == 1:
        cases = [cases[0].model_copy(update={"name": req.name})]
    _check_prompt_form(cases)
    return cases


def _check_prompt_form(cases: list[EvalCase]) -> None:
    """Every target prompt and paraphrase must be a completion: after a question the next token is no answer."""
    where = {"config": ("target.prompt", "target.paraphrases"), "cli": ("--prompt", "--paraphrase")}
    for n, case in enumerate(cases):
        prompt_field, para_field = where.get(case.source,
                                             (f"target_cases[{n}].prompt", f"target_cases[{n}].paraphrases"))
        texts = [(prompt_field, case.prompt)] + [(f"{para_field}[{i}]", t) for i, t in enumerate(case.paraphrases)]
        for field, text in texts:
            form = prompt_form_violations(text, field=field)
            if form:
                raise ConceptfixError(form[0].message, field=field,
                                      hint="a completion prompt stops where the answer begins")


def _profile(req: EvaluationRequest, base: str, cfg: SFTConfig | None) -> tuple[ModelProfile, str]:
    profile = default_profile(base)
    source = [f"{base} default"]
    if cfg is not None:
        # The config's system_prompt None means "no system message", a real value: set both as the config says.
        profile = profile.model_copy(update={"use_chat_template": cfg.use_chat_template,
                                             "system_prompt": cfg.system_prompt})
        source.append("config")
    if req.profile_file:
        data = read_yaml(req.profile_file, field="--profile") or {}
        if not isinstance(data, dict):
            raise ConceptfixError("profile file must be a YAML mapping", field="--profile")
        profile = parse_model(ModelProfile, {**profile.model_dump(), **data}, prefix="profile.")
        source.append("--profile")
    flags = {"use_chat_template": req.chat_template, "system_prompt": req.system_prompt,
             "answer_prefix": req.answer_prefix}
    if any(v is not None for v in flags.values()):
        profile = profile.merged(**flags)
        source.append("flags")
    return profile, " + ".join(source)


def _method_label(req: EvaluationRequest, cfg: SFTConfig | None) -> str:
    if req.method:
        return req.method
    if cfg is None:
        return "SFT"
    return (f"SFT ({cfg.method}) on {len(cfg.texts)} texts, {cfg.epochs} epochs, lr {cfg.learning_rate:g}")


def resolve_request(req: EvaluationRequest) -> ResolvedRequest:
    cfg: SFTConfig | None = load_sft_config(req.config) if req.config else None
    config_source = req.config
    tuned = req.tuned or (cfg.output_dir if cfg else None)
    if not tuned:
        raise ConceptfixError("no tuned model given", field="--tuned", hint="pass --tuned DIR or --config CONFIG")
    check_tuned_dir(tuned)
    if cfg is None:
        cfg = _tuned_config(tuned)
        config_source = str(Path(tuned) / RESOLVED_CONFIG) if cfg else None
    base = req.base or (cfg.model_name if cfg else None)
    if not base:
        raise ConceptfixError("no base model given", field="--base", hint="pass --base MODEL or --config CONFIG")
    profile, profile_source = _profile(req, base, cfg)
    cases = _cases(req, cfg)
    if req.locality_file:
        locality_records = load_prompt_records(req.locality_file)
        locality_source = req.locality_file
        bank = _load_bank()
    else:
        bank = _load_bank() if req.use_bank else []
        locality_records = bank
        locality_source = "prompt bank" if bank else "none"
    return ResolvedRequest(
        base=base, tuned=tuned, device=req.device or (cfg.device if cfg else "auto"),
        dtype=req.dtype or (cfg.dtype if cfg else "auto"), profile=profile, profile_source=profile_source,
        cases=cases, training_texts=list(cfg.texts) if cfg else None, locality_records=locality_records,
        locality_source=locality_source, bank=bank, method=_method_label(req, cfg), config_source=config_source,
    )


def _weights_fingerprint(directory: str) -> list[tuple[str, int, int]]:
    """Name, size and mtime of the files that define the weights: a retrained model gets a new fingerprint."""
    path = Path(directory)
    if not path.is_dir():
        return []
    return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()
                  if f.is_file() and f.suffix in (".safetensors", ".json", ".bin"))


def inputs_hash(req: EvaluationRequest, res: ResolvedRequest) -> str:
    from conceptfix.models import resolve_checkpoint

    base_checkpoint = resolve_checkpoint(res.base)
    settings = req.settings.model_dump(exclude={"progress"})
    return content_hash({
        "base": res.base, "base_checkpoint": base_checkpoint, "base_weights": _weights_fingerprint(base_checkpoint),
        "tuned": res.tuned, "tuned_weights": _weights_fingerprint(res.tuned), "device": res.device,
        "dtype": res.dtype, "profile": res.profile.model_dump(), "cases": [c.model_dump() for c in res.cases],
        "training_texts": res.training_texts, "locality": [r.model_dump() for r in res.locality_records],
        "bank_hash": content_hash([r.model_dump() for r in res.bank]), "settings": settings, "method": res.method,
        "llm": [req.paraphrases_llm, req.llm_model, req.base_url, req.n_llm_paraphrases],
    })


@dataclass
class EvaluationRun:
    result: EvaluationResult
    cached: bool
    paths: dict[str, Path]


def run_evaluation(req: EvaluationRequest, output_dir: str | Path, *, overwrite: bool = False,
                   status: Any = None) -> EvaluationRun:
    """Resolve, load both models with the same profile, evaluate, write evaluation.json/.md/.png."""
    from conceptfix.models import load_model

    res = resolve_request(req)
    ihash = inputs_hash(req, res)
    if not overwrite:
        cached = load_cached(output_dir, ihash)
        if cached is not None:
            return EvaluationRun(result=cached, cached=True, paths=write_outputs(cached, output_dir))
        if (Path(output_dir) / RESULT_FILE).exists():  # refuse before minutes of work, not after
            raise ConceptfixError(f"{Path(output_dir) / RESULT_FILE} holds a result for different inputs",
                                  field="--output", hint="choose another --output or pass --overwrite")

    def load(spec: str):
        # reuse=False for the tuned dir: a retrained checkpoint at the same path must not come from memory.
        # The profile goes on a copy: load_model(reuse=True) hands out one shared object per process.
        loaded = load_model(spec, device=res.device, dtype=res.dtype, trust_remote_code=req.trust_remote_code,
                            reuse=spec != res.tuned)
        return dataclasses.replace(loaded, profile=res.profile)

    def load_both():
        base = load(res.base)
        for case in res.cases:  # a bad answer fails before the second model is loaded
            answer_candidates(base.tokenizer, case.correct, field="correct")
            answer_candidates(base.tokenizer, case.wrong, field="wrong")
        return base, load(res.tuned)

    if status is not None:
        with status(f"loading {res.base} and {res.tuned} …"):
            base, tuned = load_both()
    else:
        base, tuned = load_both()

    client = None
    if req.paraphrases_llm:
        from conceptfix.llm import LLMClient

        client = LLMClient(model=req.llm_model, base_url=req.base_url)
    cases = [with_paraphrases(c, bank=res.bank, client=client, n_llm=req.n_llm_paraphrases) for c in res.cases]
    result = evaluate(base, tuned, cases, locality_records=res.locality_records, locality_source=res.locality_source,
                      training_texts=res.training_texts, settings=req.settings, method=res.method,
                      profile_source=res.profile_source)
    config = {"request": req.model_dump(exclude={"settings"}), "config_source": res.config_source,
              "base": res.base, "tuned": res.tuned, "device": res.device, "dtype": res.dtype,
              "training_texts_hash": content_hash(res.training_texts) if res.training_texts else None}
    if client is not None:
        config["llm"] = {**client.describe(), "usage": client.usage.to_dict()}
    result = result.model_copy(update={"inputs_hash": ihash, "provenance": provenance("evaluate", config)})
    return EvaluationRun(result=result, cached=False, paths=write_outputs(result, output_dir, overwrite=overwrite))

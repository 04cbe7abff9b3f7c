"""Stage 3 end to end on the embedded model: both acceptance prompts, schema, faithfulness vs random controls,
flip test, label sources (imported CSV/JSONL, fake LLM object, LLM over a local HTTP stub), caching, HTML
escaping, headless Chromium, and the CLI (good runs and one-line errors).

Each acceptance prompt is analysed once (module fixture); the other runs are small (top-k, no edges).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
import torch
from werkzeug import Response

import conceptfix.analyze.labels as labels_module
from conceptfix.analyze.export import graph_schema
from conceptfix.analyze.faithfulness import AblationSet, run_rows
from conceptfix.analyze.labels import default_corpus
from conceptfix.analyze.pipeline import OUTPUT_FILES, AnalysisResult, analyze
from conceptfix.analyze.relp import attribute_neurons, make_metric
from conceptfix.errors import ConceptfixError
from tests.helpers import assert_one_line_error, run_cli

HORMONE = "The primary hormone regulating blood pressure is"
AUSTRALIA = "The capital of Australia is"
PAIRS = {"hormone": (HORMONE, " al", " ren"), "australia": (AUSTRALIA, " Canberra", " Sydney")}
IMPORTED_LAYERS = (27, 28, 29)          # the labels files describe every neuron of these layers
EVIL = "</script><img src=x onerror=alert(1)>"


# ------------------------------------------------------------------------------------------- fixtures

class FakeLLM:
    """Stands in for conceptfix.llm.LLMClient: records the requests, answers with hostile-looking HTML."""

    def __init__(self):
        self.requests: list[str] = []

    def complete_json(self, system: str, user: str, schema: dict | None = None) -> dict:
        self.requests.append(user)
        layer, neuron = re.search(r"layer (\d+), index (\d+)", user).groups()
        return {"label": f"{EVIL} fake L{layer}/N{neuron}"}

    def describe(self) -> dict:
        return {"model": "fake"}


@dataclass
class Workspace:
    root: Path
    corpus: Path
    labels_csv: Path
    labels_jsonl: Path


@pytest.fixture(scope="module", autouse=True)
def _private_cache_and_one_thread(tmp_path_factory):
    """Corpus statistics go to a private cache. One intra-op thread: the analysis is many small forward passes,
    and on two shared cores one thread was 4× faster than two (64 ablation rows: 2.4 s vs 9.8 s under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("corpus_cache")
        mp.setattr(labels_module, "cache_dir", lambda: cache)
        mp.delenv("OPENAI_API_KEY", raising=False)
        mp.delenv("OPENAI_BASE_URL", raising=False)
        yield cache
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("analyze")
    corpus = root / "corpus.txt"
    # 80 passages of the built-in corpus keep the corpus pass short; the format is the same.
    corpus.write_text("# test corpus\n" + "\n".join(default_corpus()[:80]) + "\n", encoding="utf-8")
    labels_csv = root / "labels.csv"
    with labels_csv.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["layer", "neuron", "description", "score"])
        for layer in IMPORTED_LAYERS:
            for neuron in range(1536):
                writer.writerow([layer, neuron, f"csv L{layer}/N{neuron}", 0.5])
                writer.writerow([layer, neuron, f"worse csv L{layer}/N{neuron}", 0.1])   # lower score loses
    labels_jsonl = root / "labels.jsonl"
    labels_jsonl.write_text("".join(json.dumps({"layer_index": layer, "index": neuron,
                                                "explanation": f"jsonl L{layer}/N{neuron} & <b>"}) + "\n"
                                    for layer in IMPORTED_LAYERS for neuron in range(1536)), encoding="utf-8")
    return Workspace(root=root, corpus=corpus, labels_csv=labels_csv, labels_jsonl=labels_jsonl)


def _completion(content: str) -> dict:
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "stub-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}


@dataclass
class Runs:
    hormone: AnalysisResult
    australia: AnalysisResult
    fake: FakeLLM
    stub_requests: list[dict]
    seconds: dict


@pytest.fixture(scope="module")
def runs(embedded, ws) -> Runs:
    from pytest_httpserver import HTTPServer

    from conceptfix.llm import LLMClient

    seconds = {}
    fake = FakeLLM()
    start = time.perf_counter()
    hormone = analyze(embedded, HORMONE, correct=" al", wrong=" ren", output_dir=ws.root / "hormone", max_nodes=80,
                      corpus=ws.corpus, labels_file=ws.labels_csv, no_llm=False, llm_client=fake, llm_model="fake",
                      llm_max_neurons=6, progress=False)
    seconds["hormone"] = time.perf_counter() - start

    # The real client against an OpenAI-compatible stub on 127.0.0.1.
    stub_requests: list[dict] = []

    def handler(request):
        body = request.get_json()
        stub_requests.append(body)
        layer, neuron = re.search(r"layer (\d+), index (\d+)", body["messages"][-1]["content"]).groups()
        return Response(json.dumps(_completion(json.dumps({"label": f"stub L{layer}/N{neuron}"}))),
                        content_type="application/json")

    server = HTTPServer(host="127.0.0.1", port=0)
    server.expect_request("/v1/chat/completions", method="POST").respond_with_handler(handler)
    server.start()
    try:
        client = LLMClient(model="stub-model", base_url=server.url_for("/v1"), temperature=0.0, backoff_base=0.001)
        start = time.perf_counter()
        australia = analyze(embedded, AUSTRALIA, correct=" Canberra", wrong=" Sydney",
                            output_dir=ws.root / "australia", max_nodes=80, corpus=ws.corpus,
                            labels_file=ws.labels_jsonl, no_llm=False, llm_client=client, llm_model="stub-model",
                            llm_max_neurons=4, progress=False)
        seconds["australia"] = time.perf_counter() - start
    finally:
        server.clear()
        server.stop()
    return Runs(hormone=hormone, australia=australia, fake=fake, stub_requests=stub_requests, seconds=seconds)


def _run(runs: Runs, name: str) -> AnalysisResult:
    return getattr(runs, name)


def _small(embedded, prompt, correct, wrong, out, **kw) -> AnalysisResult:
    """A cheap analysis: a few neurons, no edges, few random draws."""
    kw.setdefault("top_k", 5)
    kw.setdefault("edges", False)
    kw.setdefault("random_draws", 2)
    return analyze(embedded, prompt, correct=correct, wrong=wrong, output_dir=out, progress=False, **kw)


# ------------------------------------------------------------------------------ acceptance: both prompts

@pytest.mark.parametrize("name", list(PAIRS))
def test_all_outputs_written(runs, name):
    result = _run(runs, name)
    assert not result.cached
    for file in OUTPUT_FILES:
        path = result.output_dir / file
        assert path.is_file() and path.stat().st_size > 0, file
    assert (result.output_dir / "faithfulness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((result.output_dir / "manifest.json").read_text())
    assert manifest["config"]["prompt"] == PAIRS[name][0]
    for file in ("graph.json", "attribution.json", "faithfulness.json"):
        assert json.loads((result.output_dir / file).read_text()) == getattr(result, file.split(".")[0])


@pytest.mark.parametrize("name", list(PAIRS))
def test_graph_json_validates_against_the_schema(runs, name):
    result = _run(runs, name)
    graph = json.loads((result.output_dir / "graph.json").read_text())
    jsonschema.Draft202012Validator.check_schema(graph_schema())
    jsonschema.validate(graph, graph_schema(), cls=jsonschema.Draft202012Validator)
    assert graph["metadata"]["schema_version"] == 1
    ids = [n["node_id"] for n in graph["nodes"]]
    assert len(ids) == len(set(ids))
    kept = {n["node_id"] for n in result.attribution["neurons"]}
    neuron_nodes = {n["node_id"] for n in graph["nodes"] if n["feature_type"] == "mlp neuron"}
    assert neuron_nodes == kept and len(kept) == 80
    for node in graph["nodes"]:
        if node["feature_type"] == "mlp neuron":
            assert node["node_id"] == f"{node['layer']}_{node['feature']}_{node['ctx_idx']}"
            assert node["clerp"].startswith("[")          # the primary label, tagged with its source
    tokens = result.attribution["tokens"]
    embeddings = [n for n in graph["nodes"] if n["feature_type"] == "embedding"]
    assert [n["node_id"] for n in embeddings] == [f"E_{t}_{p}" for p, t in enumerate(result.attribution["input_ids"])]
    assert len(embeddings) == len(tokens) == len(graph["metadata"]["prompt_tokens"])
    logit = [n for n in graph["nodes"] if n["feature_type"] == "logit"]
    assert len(logit) == 1 and logit[0]["node_id"] == "L_metric" and logit[0]["is_target_logit"]
    # Edges between neurons as well as into the metric; links into the metric carry the scores.
    into_metric = {link["source"]: link["weight"] for link in graph["links"] if link["target"] == "L_metric"}
    assert into_metric == {n["node_id"]: pytest.approx(n["score"]) for n in result.attribution["neurons"]}
    assert any(link["target"] != "L_metric" for link in graph["links"])
    # A broken graph is rejected by the schema.
    broken = json.loads(json.dumps(graph))
    broken["nodes"][0]["node_id"] = "neuron 5"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, graph_schema())


@pytest.mark.parametrize("name", list(PAIRS))
def test_metric_and_conservation(embedded, runs, name):
    prompt, correct, wrong = PAIRS[name]
    attribution = _run(runs, name).attribution
    assert attribution["conservation_residual"] < 1e-3
    ids = embedded.encode([prompt])["input_ids"]
    with torch.no_grad():
        logits = embedded.model(input_ids=ids).logits[0, -1]
    metric = attribution["metric"]
    assert metric["value"] == pytest.approx(float(logits[metric["correct_token_id"]] - logits[metric["wrong_token_id"]]),
                                            abs=1e-3)
    assert metric["correct_token"] == correct and metric["wrong_token"] == wrong
    assert metric["value"] < 0                            # the model prefers the wrong answer on both prompts
    neurons = attribution["neurons"]
    assert [abs(n["score"]) for n in neurons] == sorted((abs(n["score"]) for n in neurons), reverse=True)
    for n in neurons:
        assert n["pushes_toward_token"] == (correct if n["score"] > 0 else wrong)
        assert n["token"] == attribution["tokens"][n["position"]]
    rule = attribution["pruning"]
    assert rule["kept_at_last_position"] + rule["kept_at_earlier_positions"] == len(neurons)
    assert attribution["explained_fraction"] == pytest.approx(sum(n["score"] for n in neurons) / metric["value"])


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("curve,ks", [("curve_wrong", (1, 5, 10)), ("curve_correct", (1, 5, 10)),
                                      # Both signs at once: the top-10 of the hormone prompt are 5 + 5 of each
                                      # sign and cancel (+0.004), a real property; k = 1 and 5 do not cancel.
                                      ("curve", (1, 5))])
def test_top_k_moves_the_metric_more_than_k_random_neurons(runs, name, curve, ks):
    faith = _run(runs, name).faithfulness
    points = {p["n"]: p for p in faith[curve]}
    for k in ks:
        p = points[k]
        bar = abs(p["uniform_random_change_mean"]) + 3 * p["uniform_random_change_std"]
        assert abs(p["change"]) > bar, (curve, k, p)
        assert abs(p["change"]) > 0.5                              # logits, not noise
        assert p["change"] * p["predicted_change"] > 0, (curve, k, p)  # in the direction the attribution says
        if curve != "curve":
            assert abs(p["change"]) > abs(p["matched_random_change_mean"]) + 3 * p["matched_random_change_std"]
            # Quantitatively close too: measured 0.74–1.06 at k = 5 on both prompts.
            assert 0.4 < p["change"] / p["predicted_change"] < 2.5, (curve, k, p)
    # Ablating wrong-pushers raises the metric, correct-pushers lower it.
    if curve == "curve_wrong":
        assert all(p["change"] > 0 for p in faith[curve] if p["n"] <= 10)
    if curve == "curve_correct":
        assert all(p["change"] < 0 for p in faith[curve] if p["n"] <= 10)


@pytest.mark.parametrize("name", list(PAIRS))
def test_single_neurons_and_completeness(runs, name):
    faith = _run(runs, name).faithfulness
    singles = faith["singles"]
    assert len(singles) == 20
    agree = sum(1 for p in singles if p["change"] * p["predicted_change"] > 0)
    assert agree >= 18, singles          # measured 19/20 and 20/20
    completeness = faith["completeness"]
    assert completeness[0] == {"n": 0, "metric": faith["all_ablated_metric"], "normalized": 0.0}
    assert [p["n"] for p in completeness[1:]] == [p["n"] for p in faith["curve"]]
    assert faith["unablated_metric"] == pytest.approx(_run(runs, name).attribution["metric"]["value"], abs=1e-3)


@pytest.mark.parametrize("name", list(PAIRS))
def test_flip_test_recorded(runs, name):
    prompt, correct, wrong = PAIRS[name]
    result = _run(runs, name)
    faith, attribution = result.faithfulness, result.attribution
    assert faith["unablated"]["top1_token"] == wrong and not faith["unablated"]["flipped"]
    flip = faith["flip_test"]
    negatives = [n for n in attribution["neurons"] if n["score"] < 0]
    assert flip is not None and flip["n"] == len(negatives) > 0
    assert flip["flipped"] == (flip["top1_token_id"] == attribution["metric"]["correct_token_id"])
    assert flip["flipped"] == (flip["correct_rank"] == 1)
    assert [p["n"] for p in faith["flip_sweep"]] == [p["n"] for p in faith["curve_wrong"]]
    flipped = [p["n"] for p in faith["flip_sweep"] if p["flipped"]]
    assert faith["first_flip_n"] == (flipped[0] if flipped else None)
    # Ablating the neurons that push toward the wrong answer makes the correct one more likely than the wrong one.
    assert flip["correct_prob"] > flip["wrong_prob"]
    lines = result.summary_lines()
    assert any(line.startswith("flip test:") for line in lines)


def test_first_position_is_left_out_and_why(embedded, runs):
    for name in PAIRS:
        attribution = _run(runs, name).attribution
        assert all(n["position"] > 0 for n in attribution["neurons"])
        first = attribution["first_position"]
        assert first["excluded"] and first["token"] == "The" and len(first["top_neurons"]) == 5
        assert _run(runs, name).faithfulness["positions"] == list(range(1, len(attribution["tokens"])))
    # The reason: at position 0 (attention sink) RelP's prediction is wrong in sign for Australia's top neuron.
    metric = make_metric(embedded.tokenizer, " Canberra", " Sydney")
    scores = attribute_neurons(embedded, AUSTRALIA, metric)
    flat = scores.scores.abs().reshape(-1).argmax()
    layer, pos, neuron = (int(i) for i in torch.unravel_index(flat, scores.scores.shape))
    assert pos == 0
    predicted = -float(scores.scores[layer, pos, neuron])
    real, _ = run_rows(embedded, scores.input_ids, [AblationSet([]), AblationSet([(layer, pos, neuron)])],
                       torch.zeros_like(scores.activations), metric)
    assert predicted * float(real[1] - real[0]) < 0      # measured: predicted +1.83, real −1.07


def test_layer_skipping_gives_the_same_rows(embedded, runs):
    metric = make_metric(embedded.tokenizer, " al", " ren")
    scores = attribute_neurons(embedded, HORMONE, metric)
    rows = [AblationSet([]), AblationSet([(29, 6, 1126)]), AblationSet([(3, 2, 7), (20, 6, 5)]),
            AblationSet([(25, 6, 1), (28, 5, 2)], complement=True), AblationSet([(12, 4, 100)])]
    zero = torch.zeros_like(scores.activations)
    fast, fast_logits = run_rows(embedded, scores.input_ids, rows, zero, metric, batch_size=2, positions=[1, 2, 3, 4, 5, 6])
    slow, slow_logits = run_rows(embedded, scores.input_ids, rows, zero, metric, batch_size=5, skip_layers=False,
                                 positions=[1, 2, 3, 4, 5, 6])
    assert torch.allclose(fast, slow, atol=1e-4) and torch.allclose(fast_logits, slow_logits, atol=1e-3)
    assert float(fast[0]) == pytest.approx(scores.metric_value, abs=1e-3)
    assert len(list(embedded.model.model.layers)) == 30
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in embedded.model.model.layers)


# ------------------------------------------------------------------------------------------------ labels

def test_label_sources(runs):
    for name, prefix in (("hormone", "csv"), ("australia", "jsonl")):
        attribution = _run(runs, name).attribution
        for n in attribution["neurons"]:
            sources = [lab["source"] for lab in n["labels"]]
            assert "logit_lens" in sources and "top_contexts" in sources, n["node_id"]
            assert sources == sorted(sources, key=["imported", "llm", "top_contexts", "logit_lens"].index)
            imported = [lab for lab in n["labels"] if lab["source"] == "imported"]
            if n["layer"] in IMPORTED_LAYERS:
                assert [lab["text"] for lab in imported] == [f"{prefix} L{n['layer']}/N{n['neuron']}"
                                                             + (" & <b>" if prefix == "jsonl" else "")]
                assert n["label"].startswith("[imported] ")
            else:
                assert not imported
            lens = next(lab for lab in n["labels"] if lab["source"] == "logit_lens")
            assert len(lens["details"]["promotes"]) == 8 and lens["text"].startswith("writes ")
            contexts = next(lab for lab in n["labels"] if lab["source"] == "top_contexts")["details"]["contexts"]
            assert contexts and all("[[" in c["context"] for c in contexts)
            values = [c["activation"] for c in contexts]
            assert values == sorted(values, reverse=contexts[0]["activation"] > 0)
        counts = attribution["label_sources"]
        assert counts["logit_lens"] == counts["top_contexts"] == len({(n["layer"], n["neuron"])
                                                                      for n in attribution["neurons"]})
        assert counts["imported"] > 0
        assert attribution["corpus"]["passages"] == 80


def test_llm_labels_fake_client_and_http_stub(runs):
    # Fake object: one request per distinct neuron, the 6 strongest.
    hormone = runs.hormone.attribution
    strongest = list(dict.fromkeys((n["layer"], n["neuron"]) for n in hormone["neurons"]))[:6]
    asked = [tuple(int(x) for x in re.search(r"layer (\d+), index (\d+)", r).groups()) for r in runs.fake.requests]
    assert asked == strongest
    assert "Promotes:" in runs.fake.requests[0] and "Top-activating contexts:" in runs.fake.requests[0]
    llm_labelled = {(n["layer"], n["neuron"]) for n in hormone["neurons"]
                    if any(lab["source"] == "llm" for lab in n["labels"])}
    assert llm_labelled == set(strongest) and hormone["label_sources"]["llm"] == 6
    # Real LLMClient over HTTP: 4 requests, JSON-schema response format, labels from the server.
    assert len(runs.stub_requests) == 4
    assert runs.stub_requests[0]["model"] == "stub-model" and runs.stub_requests[0]["temperature"] == 0.0
    assert runs.stub_requests[0]["response_format"]["type"] == "json_schema"
    australia = runs.australia.attribution
    texts = [lab["text"] for n in australia["neurons"] for lab in n["labels"] if lab["source"] == "llm"]
    assert len(set(texts)) == 4 and all(t.startswith("stub L") for t in texts)
    assert australia["provenance"]["config"]["llm_client"]["model"] == "stub-model"


def test_bad_labels_file_fails_before_the_model_work(embedded, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("layer,unit,text\n1,2,x\n")
    start = time.perf_counter()
    with pytest.raises(ConceptfixError) as exc:
        analyze(embedded, HORMONE, correct=" al", wrong=" ren", output_dir=tmp_path / "o", labels_file=bad)
    assert exc.value.field == "--labels-file" and time.perf_counter() - start < 5
    assert not (tmp_path / "o").exists()


def test_corpus_statistics_are_cached(runs, _private_cache_and_one_thread):
    # Same model and corpus: the second acceptance run read the statistics from the cache.
    assert runs.hormone.attribution["corpus"]["statistics_cached"] is False
    assert runs.australia.attribution["corpus"]["statistics_cached"] is True
    assert len(list(Path(_private_cache_and_one_thread).glob("*.pt"))) == 1


# ---------------------------------------------------------------------------------------- caching, ablations

def test_cache_hit_and_different_analysis_refused(embedded, ws, tmp_path):
    out = tmp_path / "small"
    first = _small(embedded, AUSTRALIA, " Canberra", " Sydney", out, corpus=ws.corpus)
    assert not first.cached and len(first.attribution["neurons"]) == 5
    stamp = (out / "graph.json").stat().st_mtime_ns
    start = time.perf_counter()
    again = _small(embedded, AUSTRALIA, " Canberra", " Sydney", out, corpus=ws.corpus)
    assert again.cached and time.perf_counter() - start < 5
    assert again.attribution == first.attribution and (out / "graph.json").stat().st_mtime_ns == stamp
    with pytest.raises(ConceptfixError) as exc:
        _small(embedded, AUSTRALIA, " Canberra", " Sydney", out, corpus=ws.corpus, top_k=4)
    assert exc.value.field == "--output" and "--overwrite" in exc.value.one_line()
    replaced = _small(embedded, AUSTRALIA, " Canberra", " Sydney", out, corpus=ws.corpus, top_k=4, overwrite=True)
    assert not replaced.cached and len(replaced.attribution["neurons"]) == 4
    # --no-edges: every neuron links straight to the metric.
    graph = replaced.graph
    assert graph["metadata"]["conceptfix"]["link_kind"] == "scores-to-metric"
    assert {link["target"] for link in graph["links"]} == {"L_metric"}


def test_mean_and_counterfactual_ablation(embedded, ws, tmp_path):
    mean = _small(embedded, AUSTRALIA, " Canberra", " Sydney", tmp_path / "mean", corpus=ws.corpus, ablation="mean",
                  random_draws=1)
    assert mean.faithfulness["ablation"] == "mean"
    assert any("replacement" in note for note in mean.faithfulness["notes"])
    cf = _small(embedded, AUSTRALIA, " Canberra", " Sydney", tmp_path / "cf", corpus=ws.corpus,
                ablation="counterfactual", counterfactual_prompt="The capital of Austria is", random_draws=1)
    top = cf.faithfulness["curve"][0]
    assert top["change"] != 0 and top["predicted_change"] != 0
    with pytest.raises(ConceptfixError, match="tokens"):
        _small(embedded, AUSTRALIA, " Canberra", " Sydney", tmp_path / "cf2", corpus=ws.corpus,
               ablation="counterfactual", counterfactual_prompt="The capital city of the Commonwealth of Australia is")


# --------------------------------------------------------------------------------------------- graph.html

def _html_tag_attrs(dom: str) -> str:
    return re.search(r"<html[^>]*>", dom).group(0)


@pytest.fixture(scope="module")
def evil(embedded, ws) -> AnalysisResult:
    """A prompt that tries to break out of the page's script and inject an element."""
    return _small(embedded, f"{EVIL} The capital of Australia is", " Canberra", " Sydney", ws.root / "evil",
                  corpus=ws.corpus, random_draws=1)


def test_html_is_escaped_and_self_contained(evil, runs):
    for page in (evil.output_dir / "graph.html", runs.hormone.output_dir / "graph.html"):
        text = page.read_text(encoding="utf-8")
        # The only script-closing tags are the page's own three; nothing user-made opens an element.
        assert text.count("</script>") == 3
        assert "<img src=x" not in text and "<b>" not in text.replace("<body>", "")
        assert not re.search(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", text, re.I), "network reference"
        assert "url(http" not in text and "@import" not in text
        assert "Content-Security-Policy" in text and "default-src 'none'" in text
        # The embedded JSON round-trips to the graph.
        data = re.search(r'<script type="application/json" id="graph-data">(.*?)</script>', text, re.S).group(1)
        payload = json.loads(data)
        assert payload["graph"]["nodes"] == json.loads((page.parent / "graph.json").read_text())["nodes"]
    text = (evil.output_dir / "graph.html").read_text(encoding="utf-8")
    assert "&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;" in text      # shown as text
    hormone_html = (runs.hormone.output_dir / "graph.html").read_text(encoding="utf-8")
    # The fake LLM's labels travel in the page's JSON (shown on hover via textContent), escaped there.
    assert "\\u003c/script\\u003e\\u003cimg src=x onerror=alert(1)\\u003e fake L" in hormone_html


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium():
    path = _chromium()
    if path is None:
        if os.environ.get("CONCEPTFIX_SKIP_BROWSER") == "1":
            pytest.skip("CONCEPTFIX_SKIP_BROWSER=1 and no Chromium installed")
        pytest.fail("headless Chromium is needed to test graph.html: install it (apt-get install chromium) or set "
                    "CONCEPTFIX_SKIP_BROWSER=1 to skip this test")
    return path


def _browser(chromium: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
             f"--user-data-dir={profile}"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)


def test_graph_html_renders_in_headless_chromium(chromium, evil, runs, tmp_path):
    for result, min_edges in ((runs.hormone, 10), (runs.australia, 10), (evil, 1)):
        page = result.output_dir / "graph.html"
        done = _browser(chromium, tmp_path / "profile", "--dump-dom", page.as_uri())
        assert done.returncode == 0, done.stderr[-2000:]
        dom = done.stdout
        html_tag = _html_tag_attrs(dom)
        assert 'data-rendered="1"' in html_tag, html_tag
        assert "data-error" not in html_tag and "data-csp-violation" not in html_tag, html_tag
        nodes = int(re.search(r'data-rendered-nodes="(\d+)"', dom).group(1))
        edges = int(re.search(r'data-rendered-edges="(\d+)"', dom).group(1))
        expected = len(result.graph["nodes"])
        assert nodes == expected and edges >= min_edges, (nodes, expected, edges)
        assert dom.count("<circle") == expected
        assert "<img src=\"x\"" not in dom and "onerror=\"alert" not in dom   # the prompt did not become markup
    shot = tmp_path / "shot.png"
    done = _browser(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,1000",
                    (runs.hormone.output_dir / "graph.html").as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_a_page_error_is_detected(chromium, runs, tmp_path):
    """The data-error hook works: a page whose script throws is caught (so the check above can fail)."""
    text = (runs.hormone.output_dir / "graph.html").read_text(encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace('var g = payload.graph,', 'var g = payload.graph.missing.field,', 1),
                      encoding="utf-8")
    done = _browser(chromium, tmp_path / "profile", "--dump-dom", broken.as_uri())
    html_tag = _html_tag_attrs(done.stdout)
    assert "data-error=" in html_tag and 'data-rendered="1"' not in html_tag


# ----------------------------------------------------------------------------------------------------- CLI

CHEAP = ["--top-k", "5", "--no-edges", "--no-llm", "--random-draws", "2", "--device", "cpu", "--dtype", "float32"]


def test_cli_prompt_run_answer_prefix_and_cache(embedded, ws, tmp_path):
    out = tmp_path / "cli"
    args = ["analyze", AUSTRALIA, "--answer-prefix", " Answer:", "--contrastive", " Canberra", " Sydney",
            "--tau", "0.05", "--output", str(out), "--corpus", str(ws.corpus), *CHEAP]
    first = run_cli(args)
    assert first.exit_code == 0, first.output
    assert re.search(r"L\d+/N\d+ score=[+-]\d+\.\d\d pos=\d+ '[^']+' → ' (Canberra|Sydney)' label=\[",
                     first.output), first.output
    assert "conservation residual" in first.output and "flip test:" in first.output and "graph.html" in first.output
    attribution = json.loads((out / "attribution.json").read_text())
    # --answer-prefix overrides the profile's (empty for SmolLM2), and the shared model's profile is untouched.
    assert attribution["formatted_prompt"] == AUSTRALIA + " Answer:"
    assert attribution["tokens"][-1] == ":"
    assert embedded.profile.answer_prefix == ""
    again = run_cli(args)
    assert again.exit_code == 0 and "same inputs" in again.output
    assert_one_line_error(run_cli([*args, "--random-draws", "3"]), "--output")   # a different analysis: refused


def test_cli_case_from_a_filter_result(embedded, ws, tmp_path):
    from conceptfix.artifacts import write_json
    from conceptfix.filter import filter_prompts
    from conceptfix.schemas import PromptRecord

    result = filter_prompts(embedded, [PromptRecord(prompt=HORMONE, answer="aldosterone")], cache=False,
                            progress=False)
    assert len(result.target_cases) == 1
    cases = tmp_path / "filtered_prompts.json"
    write_json(cases, result)
    out = tmp_path / "case"
    done = run_cli(["analyze", "--case", f"{cases}#0", "--output", str(out), "--corpus", str(ws.corpus), *CHEAP])
    assert done.exit_code == 0, done.output
    attribution = json.loads((out / "attribution.json").read_text())
    assert attribution["prompt"] == HORMONE
    assert (attribution["metric"]["correct_token"], attribution["metric"]["wrong_token"]) == (" al", " ren")
    assert "logit(' al') - logit(' ren')" in done.output


@pytest.mark.parametrize("args,field", [
    (["analyze", HORMONE, "--case", "x.json#0", "--contrastive", " al", " ren"], "PROMPT"),
    (["analyze", "--contrastive", " al", " ren"], "PROMPT"),
    (["analyze", HORMONE], "--contrastive"),
    (["analyze", "What is the capital of Australia?", "--contrastive", " Canberra", " Sydney"], "PROMPT"),
    (["analyze", HORMONE + " ", "--contrastive", " al", " ren"], "PROMPT"),
    (["analyze", "--case", "{missing}#0"], "--case"),
    (["analyze", "--case", "{cases}#x"], "--case"),
    (["analyze", "--case", "{cases}#3"], "--case"),
    (["analyze", "--case", "{notcases}#0"], "--case"),
    (["analyze", HORMONE, "--contrastive", " aldosterone", " ren"], "--contrastive CORRECT"),
    (["analyze", HORMONE, "--contrastive", " al", " renin"], "--contrastive WRONG"),
    (["analyze", HORMONE, "--contrastive", " al", " al"], "--contrastive"),
    (["analyze", HORMONE, "--contrastive", " al", " ren", "--model", "no-such-model"], "model"),
    (["analyze", HORMONE, "--contrastive", " al", " ren", "--ablation", "half"], "--ablation"),
    (["analyze", HORMONE, "--contrastive", " al", " ren", "--ablation", "counterfactual"], "--counterfactual"),
    (["analyze", HORMONE, "--contrastive", " al", " ren", "--labels-file", "{missing}"], "--labels-file"),
    (["analyze", HORMONE, "--contrastive", " al", " ren", "--corpus", "{missing}"], "--corpus"),
    (["analyze", HORMONE, "--contrastive", " al", " ren", "--no-llm", "--top-k", "3", "--no-edges",
      "--random-draws", "1", "--counterfactual", "The capital of France is"], "--counterfactual"),
])
def test_cli_bad_input_is_one_line(embedded, tmp_path, args, field):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps({"target_cases": []}))
    (tmp_path / "notcases.json").write_text("[1, 2]")
    subst = {"missing": str(tmp_path / "missing.json"), "cases": str(cases), "notcases": str(tmp_path / "notcases.json")}
    args = [a.format(**subst) if "{" in a else a for a in args]
    start = time.perf_counter()
    done = run_cli([*args, "--output", str(tmp_path / "o"), "--device", "cpu", "--dtype", "float32"])
    assert_one_line_error(done, field)
    assert time.perf_counter() - start < 10              # refused before any analysis work
    assert not (tmp_path / "o").exists()

"""RelP node attribution: conservation on the embedded model, exact forward and exact restore of the linearised
model, agreement with a hand-written linearised Llama (plain autograd), other architectures, metric errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conceptfix.analyze.relp import (
    attribute_ids,
    attribute_neurons,
    capturing,
    linearized,
    make_metric,
    metric_value,
)
from conceptfix.analyze.types import MetricSpec
from conceptfix.errors import ConceptfixError
from tests.helpers import tiny_model
from tests.relp_reference import hand_linearised_llama

HORMONE = ("The primary hormone regulating blood pressure is", " al", " ren")
AUSTRALIA = ("The capital of Australia is", " Canberra", " Sydney")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _hooks(model: nn.Module) -> dict[str, int]:
    return {name: len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
            + len(getattr(m, "_forward_hooks_with_kwargs", {}))
            for name, m in model.named_modules()}


def _ids(loaded, prompt: str) -> torch.Tensor:
    return loaded.encode([loaded.format_prompt(prompt)], formatted=True)["input_ids"]


# ---------------------------------------------------------------------------------------------------------
# Embedded model


@pytest.mark.parametrize("case", [HORMONE, AUSTRALIA], ids=["hormone", "australia"])
def test_conservation_and_metric_on_embedded(embedded, case):
    prompt, correct, wrong = case
    metric = make_metric(embedded.tokenizer, correct, wrong)
    scores = attribute_neurons(embedded, prompt, metric)
    with torch.no_grad():
        logits = embedded.model(_ids(embedded, prompt)).logits[0, -1]
    plain = float(logits[metric.correct_token_id] - logits[metric.wrong_token_id])

    assert scores.conservation_residual < 1e-3
    assert abs(scores.metric_value - plain) < 1e-4
    assert abs(float(scores.embedding_scores.double().sum()) + scores.bias_contribution - plain) < 1e-3 * abs(plain)
    layers, positions, width = scores.scores.shape
    assert (layers, width) == (embedded.num_layers, 1536)
    assert positions == len(scores.input_ids) == len(scores.tokens)
    assert scores.tokens[-1] == " is"
    assert torch.allclose(scores.scores, scores.activations * scores.gradients)
    # a real attribution: many non-zero scores, the largest of the order of the metric
    assert (scores.scores != 0).float().mean() > 0.5
    assert scores.scores.abs().max() > 0.05 * abs(plain)
    # no side effects: the loaded model's parameters stay frozen and gradient-free
    assert all(not p.requires_grad and p.grad is None for p in embedded.model.parameters())


def test_known_numbers_hormone(embedded):
    """The known behaviour of the embedded model: ' ren' beats ' al', so the metric is negative."""
    prompt, correct, wrong = HORMONE
    scores = attribute_neurons(embedded, prompt, make_metric(embedded.tokenizer, correct, wrong))
    assert scores.metric_value < 0
    assert scores.metric.describe() == "logit(' al') - logit(' ren')"


def test_linearised_forward_is_exact_and_model_restored(embedded):
    model = embedded.model
    ids = _ids(embedded, AUSTRALIA[0])
    before_hooks = _hooks(model)
    assert all(n == 0 for n in before_hooks.values())
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        plain = model(ids).logits
    with torch.enable_grad():
        plain_grad_mode = model(ids).logits.detach()
        with linearized(model) as adapter, capturing(adapter):
            lin = model(ids).logits
        # the rules really ran (the forward needed grad): their nodes are in the graph
        names = set()
        stack, seen = [lin.grad_fn], set()
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            names.add(type(fn).__name__)
            stack.extend(f for f, _ in fn.next_functions)
        assert {"_HalfRuleBackward", "_ScaleRuleBackward"} <= names
    assert torch.equal(lin.detach(), plain)
    assert torch.equal(plain_grad_mode, plain)
    assert _hooks(model) == before_hooks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)
    assert all(torch.equal(v, before_state[k]) for k, v in model.state_dict().items())

    # an exception inside the block (here: half way through a forward) also restores everything
    class Boom(RuntimeError):
        pass

    def explode(module, args):
        raise Boom

    with pytest.raises(Boom), torch.enable_grad(), linearized(model) as adapter, capturing(adapter):
        handle = adapter.down_proj(5).register_forward_pre_hook(explode)
        try:
            model(ids)
        finally:
            handle.remove()
    assert _hooks(model) == before_hooks
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain)


def test_direction_metric_matches_contrastive(embedded):
    prompt, correct, wrong = HORMONE
    contrastive = make_metric(embedded.tokenizer, correct, wrong)
    w_u = embedded.model.get_output_embeddings().weight
    direction = (w_u[contrastive.correct_token_id] - w_u[contrastive.wrong_token_id]).detach()
    by_dir = attribute_neurons(embedded, prompt, make_metric(embedded.tokenizer, None, direction=direction))
    by_tok = attribute_neurons(embedded, prompt, contrastive)
    assert by_dir.metric.kind == "direction" and by_dir.metric.describe() == "custom direction"
    assert by_dir.metric_value == pytest.approx(by_tok.metric_value, abs=1e-5)
    assert torch.allclose(by_dir.scores, by_tok.scores, atol=1e-6)
    assert by_dir.conservation_residual < 1e-3

    single = make_metric(embedded.tokenizer, correct)
    one = attribute_neurons(embedded, prompt, single)
    with torch.no_grad():
        logits = embedded.model(_ids(embedded, prompt)).logits
    assert one.metric.kind == "logit"
    assert one.metric_value == pytest.approx(float(logits[0, -1, single.correct_token_id]), abs=1e-4)
    assert metric_value(logits, single) == pytest.approx(one.metric_value, abs=1e-4)
    assert one.conservation_residual < 1e-3


def test_metric_errors(embedded):
    tok = embedded.tokenizer
    with pytest.raises(ConceptfixError, match="same token") as err:
        make_metric(tok, " al", " al")
    assert err.value.field == "wrong"
    with pytest.raises(ConceptfixError, match="not one") as err:
        make_metric(tok, " aldosterone", " ren")
    assert err.value.field == "correct"
    with pytest.raises(ConceptfixError, match="not one") as err:
        make_metric(tok, " al", " renin angiotensin")
    assert err.value.field == "wrong"
    with pytest.raises(ConceptfixError, match="empty"):
        make_metric(tok, " ", " ren")
    with pytest.raises(ConceptfixError, match="no metric"):
        make_metric(tok, None)
    with pytest.raises(ConceptfixError, match="not both"):
        make_metric(tok, " al", direction=torch.ones(576))
    with pytest.raises(ConceptfixError, match="vector"):
        make_metric(tok, None, direction=torch.ones(2, 576))
    bad_dir = make_metric(tok, None, direction=torch.ones(100))
    with pytest.raises(ConceptfixError, match="d_model=576"):
        attribute_neurons(embedded, HORMONE[0], bad_dir)
    far = make_metric(tok, " al", " ren", position=50)
    with pytest.raises(ConceptfixError, match="position") as err:
        attribute_neurons(embedded, HORMONE[0], far)
    assert err.value.field == "position"
    with pytest.raises(ConceptfixError, match="one prompt"):
        attribute_ids(embedded.model, torch.ones(2, 4, dtype=torch.long), far)
    with pytest.raises(ConceptfixError, match="outside the vocabulary"):
        attribute_ids(embedded.model, torch.ones(1, 4, dtype=torch.long),
                      MetricSpec(kind="contrastive", correct_token_id=10**7, wrong_token_id=3))


# ---------------------------------------------------------------------------------------------------------
# Hand reference: the linearised Llama written out in plain PyTorch, gradients by ordinary autograd


def _plain_grad_x_act(model, ids, correct, wrong):
    """grad × activation of the real (not linearised) model: must differ, or the reference test proves nothing."""
    store = {}
    hooks = [model.model.layers[i].mlp.down_proj.register_forward_pre_hook(
        lambda m, a, i=i: store.__setitem__(i, a[0]) or a[0].retain_grad()) for i in range(len(model.model.layers))]
    try:
        with torch.enable_grad():
            emb = model.model.embed_tokens(ids).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb).logits[0, -1]
            (logits[correct] - logits[wrong]).backward()
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
    return torch.stack([(store[i] * store[i].grad)[0].detach() for i in range(len(store))])


def test_scores_match_hand_written_linearised_llama():
    # larger weights than the default init: sharp attention patterns and strongly non-linear SiLU, so that a
    # missing rule would show
    model = tiny_model("llama", vocab_size=300, seed=3, num_hidden_layers=3, initializer_range=0.25).double()
    ids = torch.randint(0, 300, (1, 11), generator=torch.Generator().manual_seed(1))
    correct, wrong = 17, 42
    ref_metric, ref_scores, ref_emb = hand_linearised_llama(model, ids, correct, wrong)
    got = attribute_ids(model, ids, MetricSpec(kind="contrastive", correct_token_id=correct, wrong_token_id=wrong))

    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    plain = float(logits[correct] - logits[wrong])
    assert got.metric_value == pytest.approx(plain, abs=1e-9)
    # the model's rotary tables are fp32 (even in a float64 model), the reference's float64: ~1e-7 apart
    assert ref_metric == pytest.approx(plain, rel=1e-5)
    scale = float(ref_scores.abs().max())
    assert scale > 1e-3
    assert torch.allclose(got.scores.double(), ref_scores, rtol=0, atol=1e-5 * scale)
    assert torch.allclose(got.embedding_scores.double(), ref_emb, rtol=0, atol=1e-5 * float(ref_emb.abs().max()))
    assert abs(float(ref_emb.sum()) - ref_metric) < 1e-9 * max(1.0, abs(ref_metric))  # the reference conserves too
    assert got.conservation_residual < 1e-6
    # the linearisation matters on this model: plain grad × activation is far from it
    plain = _plain_grad_x_act(model, ids, correct, wrong)
    assert (plain - ref_scores).abs().max() > 0.05 * scale
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# Other architectures


ARCHS = {
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {},
    "gemma": {},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_other_architectures_conserve(arch):
    model = tiny_model(arch, vocab_size=300, seed=1, initializer_range=0.1, **ARCHS[arch])
    with torch.no_grad():  # random biases (Qwen2 q/k/v): their relevance must be accounted for
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.3)
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    spec = MetricSpec(kind="contrastive", correct_token_id=5, wrong_token_id=9)
    scores = attribute_ids(model, ids, spec)
    assert scores.conservation_residual < 1e-3
    assert scores.scores.abs().max() > 0
    assert scores.scores.shape == (2, 9, 128)
    if arch == "qwen2":
        assert abs(scores.bias_contribution) > 1e-3
    else:
        assert scores.bias_contribution == 0.0
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    plain = float(logits[5] - logits[9])
    if getattr(model.config, "final_logit_softcapping", None):
        cap = model.config.final_logit_softcapping  # the metric is read before Gemma-2's logit soft-cap
        plain = float(cap * (torch.atanh(logits[5] / cap) - torch.atanh(logits[9] / cap)))
    assert scores.metric_value == pytest.approx(plain, abs=1e-4)


def test_unsupported_architectures_are_clear_errors():
    gpt2 = tiny_model("gpt2", vocab_size=300, n_embd=64, n_layer=2, n_head=4)
    with pytest.raises(ConceptfixError, match="'gpt2' is not supported") as err:
        with linearized(gpt2):
            pass
    assert err.value.field == "model"
    assert "llama" in err.value.hint

    # a Llama-type model whose MLP is not gated: refused before any hook is left behind
    llama = tiny_model("llama", vocab_size=300)

    class PlainMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj, self.act_fn, self.down_proj = nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)

        def forward(self, x):
            return self.down_proj(self.act_fn(self.up_proj(x)))

    llama.model.layers[1].mlp = PlainMLP()
    before = _hooks(llama)
    with pytest.raises(ConceptfixError, match="layer 1 MLP has no gate_proj"):
        attribute_ids(llama, torch.ones(1, 4, dtype=torch.long),
                      MetricSpec(kind="contrastive", correct_token_id=1, wrong_token_id=2))
    assert _hooks(llama) == before
    assert all(p.requires_grad for p in llama.parameters())


def test_mlp_of_unexpected_form_is_refused():
    """down_proj input that is not act(gate) * up (here: scaled) must not be attributed with the half rule."""
    llama = tiny_model("llama", vocab_size=300)
    mlp = llama.model.layers[0].mlp
    mlp.forward = lambda x: mlp.down_proj(2.0 * mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
    with pytest.raises(ConceptfixError, match="not act\\(gate\\) \\* up"):
        attribute_ids(llama, torch.ones(1, 4, dtype=torch.long),
                      MetricSpec(kind="contrastive", correct_token_id=1, wrong_token_id=2))
    assert _hooks(llama) == _hooks(tiny_model("llama", vocab_size=300))

    # likewise a norm that is not y = scale · x (here: a shift added)
    llama = tiny_model("llama", vocab_size=300)
    norm = llama.model.layers[1].post_attention_layernorm
    norm_forward = norm.forward
    norm.forward = lambda x: norm_forward(x) + 0.5
    with pytest.raises(ConceptfixError, match="not an RMSNorm of the expected form"):
        attribute_ids(llama, torch.ones(1, 4, dtype=torch.long),
                      MetricSpec(kind="contrastive", correct_token_id=1, wrong_token_id=2))
    assert _hooks(llama) == _hooks(tiny_model("llama", vocab_size=300))


def test_core_and_benchmark_import_without_pydantic():
    """The GPU machines lack pydantic: the attribution core and its benchmark must not import models.py."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.modules['pydantic'] = None; sys.path.insert(0, 'src'); "
            "import conceptfix.analyze.relp, conceptfix.analyze.edges, conceptfix.analyze.prune; "
            "import benchmarks.attribution; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"

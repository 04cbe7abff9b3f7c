"""A hand-written RelP-linearised Llama in plain PyTorch: the reference the library's hooks are tested against.

Every RelP rule is written out as an explicit ``detach`` on the model's own weights (float64), and gradients
come from ordinary autograd — no hooks, no custom autograd functions, no transformers forward:

* RMSNorm: ``x · rsqrt(mean(x²) + eps).detach() · w``;
* SiLU identity rule: ``a = z · (silu(z) / z).detach()``;
* half rule: ``h = ½ a·u.detach() + ½ a.detach()·u`` (value a·u, gradient ½u to a and ½a to u);
* attention: softmax over detached (rotated) q and k, grouped-query value path attached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def hand_forward(model, ids: torch.Tensor, *, cut: bool = False):
    """Linearised forward of a LlamaForCausalLM on ``ids`` [1, T].

    Returns (embedding leaf [T, d], neurons: the down_proj inputs [T, N] per layer, leaves, final hidden [T, d]).
    With ``cut=True`` each down_proj reads a detached copy of its input (``leaves[l]``, requiring grad) while
    ``neurons[l]`` stays connected to everything upstream: gradients from a neuron reach earlier neurons only
    directly (residual stream and attention), not through the MLPs in between.
    """
    cfg = model.config
    p = {k: v.detach().double() for k, v in model.named_parameters()}
    seq = ids.shape[1]
    heads, kv_heads, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps

    def rms(x, weight):  # normalisation scale is a constant
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach() * weight

    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # x [heads, T, hd]
        rotated = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos + rotated * sin

    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    emb = p["model.embed_tokens.weight"][ids[0]].clone().requires_grad_(True)
    x = emb
    neurons, leaves = [], []
    for layer in range(cfg.num_hidden_layers):
        pre = f"model.layers.{layer}."
        n = rms(x, p[pre + "input_layernorm.weight"])
        # the attention pattern is a constant: q and k leave the graph; the value path stays
        q = (n @ p[pre + "self_attn.q_proj.weight"].T).view(seq, heads, hd).transpose(0, 1).detach()
        k = (n @ p[pre + "self_attn.k_proj.weight"].T).view(seq, kv_heads, hd).transpose(0, 1).detach()
        v = (n @ p[pre + "self_attn.v_proj.weight"].T).view(seq, kv_heads, hd).transpose(0, 1)
        q, k = rope(q), rope(k)
        k = k.repeat_interleave(heads // kv_heads, 0)  # grouped-query attention
        v = v.repeat_interleave(heads // kv_heads, 0)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        pattern = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
        attn = (pattern @ v).transpose(0, 1).reshape(seq, heads * hd)
        x = x + attn @ p[pre + "self_attn.o_proj.weight"].T
        n2 = rms(x, p[pre + "post_attention_layernorm.weight"])
        z = n2 @ p[pre + "mlp.gate_proj.weight"].T
        a = z * (F.silu(z) / z).detach()                       # identity rule: act(z)/z is a constant
        u = n2 @ p[pre + "mlp.up_proj.weight"].T
        h = 0.5 * (a * u.detach()) + 0.5 * (a.detach() * u)  # value a·u, half the gradient to each factor
        neurons.append(h)
        if cut:
            h = h.detach().requires_grad_(True)
            leaves.append(h)
        x = x + h @ p[pre + "mlp.down_proj.weight"].T
    return emb, neurons, leaves, rms(x, p["model.norm.weight"])


def hand_linearised_llama(model, ids: torch.Tensor, correct: int, wrong: int):
    """(metric, neuron scores [layers, T, N], embedding scores [T]); scores = activation × plain-autograd grad."""
    emb, neurons, _, final = hand_forward(model, ids)
    w_u = model.get_output_embeddings().weight.detach().double()
    metric = final[-1] @ (w_u[correct] - w_u[wrong])
    grads = torch.autograd.grad(metric, [emb] + neurons)
    scores = torch.stack([(h * g).detach() for h, g in zip(neurons, grads[1:])])
    return float(metric.detach()), scores, (emb * grads[0]).sum(-1).detach()


def hand_direct_effects(model, ids: torch.Tensor, layer: int, position: int, neuron: int, gradient: float):
    """Relevance of every earlier neuron [layer, T, N] and embedding [T] for ``gradient · h_target``, MLPs cut."""
    emb, neurons, leaves, _ = hand_forward(model, ids, cut=True)
    objective = neurons[layer][position, neuron] * gradient
    grads = torch.autograd.grad(objective, [emb] + leaves[:layer], allow_unused=True)
    rel = [torch.zeros_like(leaf) if g is None else (leaf * g).detach() for leaf, g in zip(leaves[:layer], grads[1:])]
    neuron_rel = torch.stack(rel) if rel else torch.zeros(0, *neurons[0].shape, dtype=torch.float64)
    return float(objective.detach()), neuron_rel, (emb * grads[0]).sum(-1).detach()

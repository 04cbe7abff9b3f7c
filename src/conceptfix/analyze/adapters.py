"""Per-architecture access to the parts of a decoder that attribution and ablation need.

Supported: down_proj-style gated MLPs (Llama, Qwen2, Qwen3, Mistral, Gemma, Gemma2, Gemma3 text).
A *neuron* is one input coordinate of ``down_proj`` (i.e. act(gate(x)) * up(x)), at one position.
Anything else raises a clear error instead of silently attributing the wrong thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from conceptfix.errors import ConceptfixError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text")


@dataclass
class DecoderAdapter:
    """Uniform view of a HF decoder-only causal LM."""

    model: nn.Module
    model_type: str

    @property
    def decoder(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.decoder.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_neurons(self) -> int:
        return int(self.mlp(0).down_proj.in_features)

    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def down_proj(self, layer: int) -> nn.Linear:
        return self.layers[layer].mlp.down_proj

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    @property
    def final_norm(self) -> nn.Module:
        return self.decoder.norm

    @property
    def unembedding(self) -> torch.Tensor:
        """[vocab, d_model] weight of the output head."""
        return self.model.get_output_embeddings().weight

    def norm_modules(self) -> list[nn.Module]:
        """Every RMSNorm/LayerNorm module (normalisation scales are frozen in the linearised backward)."""
        return [m for m in self.model.modules() if _is_norm(m)]

    def neuron_output_direction(self, layer: int, neuron: int) -> torch.Tensor:
        """The residual-stream vector a unit activation of this neuron writes (a down_proj column)."""
        return self.down_proj(layer).weight[:, neuron]


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith("RMSNorm") or name.endswith("LayerNorm")


def get_adapter(model: nn.Module) -> DecoderAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConceptfixError(
            f"architecture {model_type!r} is not supported for neuron attribution", field="model",
            hint=f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
        )
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not hasattr(layers[0], "mlp") or not hasattr(layers[0].mlp, "down_proj"):
        raise ConceptfixError(f"{model_type} model has no model.layers[i].mlp.down_proj", field="model")
    return DecoderAdapter(model=model, model_type=model_type)

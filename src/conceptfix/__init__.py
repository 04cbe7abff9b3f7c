"""conceptfix: find factual errors in a language model, trace them through MLP neurons, and repair
them by fine-tuning on an intermediate concept."""

__version__ = "0.1.0"

"""Training examples for SFT: token ids and labels for each concept text, and the batch collator.

Default (the fix of the seed's two bugs):
  * with the chat template, the text is the assistant turn; every template token (system prompt, role
    headers, end-of-turn) carries label -100, so the loss is on the text's own tokens only;
  * no padding at tokenisation time: each example keeps its own length and the collator pads a batch
    to its longest member (padding labels -100).
``seed_compat=True`` reproduces the seed's loop for comparison: every example padded to ``max_length``
and ``labels = input_ids`` everywhere (template and padding tokens included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from conceptfix.errors import ConceptfixError

IGNORE_INDEX = -100  # the label that torch's cross-entropy (and transformers' loss) skips


@dataclass(frozen=True)
class TokenizedText:
    input_ids: list[int]
    labels: list[int]
    attention_mask: list[int]
    text_tokens: int  # how many of the text's own tokens are in input_ids (after truncation)
    truncated: bool

    def as_features(self) -> dict[str, list[int]]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}


def _chat_pieces(tokenizer, text: str, system_prompt: str | None) -> tuple[str, str, str]:
    """Split the rendered chat (system prompt, then the text as the assistant turn) into
    (template prefix, text as rendered, template suffix)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConceptfixError("this tokenizer has no chat template", field="use_chat_template",
                              hint="set use_chat_template: false in the config")
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "assistant", "content": text})
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001  some templates insist on a user turn before the assistant's
        messages.insert(len(messages) - 1, {"role": "user", "content": ""})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    # Templates may trim the content (Llama-3's does): find the text as it was rendered.
    for candidate in (text, text.strip()):
        start = rendered.rfind(candidate)
        if candidate and start >= 0:
            return rendered[:start], candidate, rendered[start + len(candidate):]
    raise ConceptfixError("the chat template rewrites the text; cannot locate it to mask the template",
                          field="use_chat_template", hint="set use_chat_template: false")


def tokenize_text(tokenizer, text: str, *, use_chat_template: bool, system_prompt: str | None, max_length: int,
                  seed_compat: bool = False) -> TokenizedText:
    """Token ids and labels for one concept text (see the module docstring for the two modes)."""
    if use_chat_template:
        prefix, body, suffix = _chat_pieces(tokenizer, text, system_prompt)
        # The template pieces hold the special tokens (BOS included) as text; tokenising the three pieces
        # separately is exact because each boundary sits at a special token or a newline.
        prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
        body_ids = tokenizer(body, add_special_tokens=False)["input_ids"]
        suffix_ids = tokenizer(suffix, add_special_tokens=False)["input_ids"]
    else:
        # Raw completion: the text is the whole example; BOS/EOS exactly as the tokenizer adds them by default.
        full = tokenizer(text, add_special_tokens=True)["input_ids"]
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        n_special_front = len(full) - len(plain) if full[len(full) - len(plain):] == plain else 0
        prefix_ids, body_ids, suffix_ids = full[:n_special_front], plain, full[n_special_front + len(plain):]

    input_ids = prefix_ids + body_ids + suffix_ids
    if seed_compat:
        labels = list(input_ids)  # the seed: loss on every token, template included
    else:
        labels = [IGNORE_INDEX] * len(prefix_ids) + list(body_ids) + [IGNORE_INDEX] * len(suffix_ids)
        if not use_chat_template and prefix_ids:
            # BOS is never predicted (nothing precedes it), so its label is irrelevant; keep it masked.
            labels[: len(prefix_ids)] = [IGNORE_INDEX] * len(prefix_ids)
    truncated = len(input_ids) > max_length
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    text_tokens = max(0, min(len(body_ids), max_length - len(prefix_ids)))
    attention_mask = [1] * len(input_ids)
    if seed_compat and len(input_ids) < max_length:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        n_pad = max_length - len(input_ids)
        input_ids = input_ids + [pad_id] * n_pad
        labels = labels + [pad_id] * n_pad  # labels = input_ids, padding included
        attention_mask = attention_mask + [0] * n_pad
    return TokenizedText(input_ids, labels, attention_mask, text_tokens, truncated)


class TextDataset(torch.utils.data.Dataset):
    """The tokenised concept texts (a map-style dataset, what Trainer's sampler expects)."""

    def __init__(self, items: list[TokenizedText]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.items[index].as_features()

    @property
    def text_tokens(self) -> int:
        return sum(item.text_tokens for item in self.items)

    @property
    def processed_tokens(self) -> int:
        return sum(len(item.input_ids) for item in self.items)


def build_dataset(tokenizer, texts: list[str], *, use_chat_template: bool, system_prompt: str | None,
                  max_length: int, seed_compat: bool = False) -> TextDataset:
    items = [tokenize_text(tokenizer, t, use_chat_template=use_chat_template, system_prompt=system_prompt,
                           max_length=max_length, seed_compat=seed_compat) for t in texts]
    for i, item in enumerate(items):
        if item.text_tokens == 0:
            raise ConceptfixError(f"texts[{i}] has no tokens left after the template within max_length",
                                  field="max_length", hint="raise max_length")
    return TextDataset(items)


def make_collator(tokenizer):
    """Dynamic padding to the longest example of each batch (right side; labels padded with -100)."""
    import copy

    from transformers import DataCollatorForSeq2Seq

    right = copy.copy(tokenizer)  # the caller's tokenizer keeps its own padding side
    right.padding_side = "right"
    return DataCollatorForSeq2Seq(right, padding="longest", label_pad_token_id=IGNORE_INDEX, return_tensors="pt")

"""The one OpenAI-compatible client every stage uses (prompt generation, neuron labelling, paraphrases).

Works against api.openai.com (GPT-4o by default) and any server that speaks the chat-completions
format (vLLM, Ollama, llama.cpp server) through `base_url`. The API key comes only from an environment
variable and is never logged or written anywhere. Transient failures (429, 5xx, connection errors,
timeouts) are retried with exponential backoff that honours the server's Retry-After; an answer that
is not valid JSON is asked for again, then reported as a ConceptfixError.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from conceptfix.errors import ConceptfixError

log = logging.getLogger(__name__)

OPENAI_DEFAULT_HOST = "api.openai.com"
# A local server usually ignores the key, but the SDK insists on having one.
LOCAL_PLACEHOLDER_KEY = "not-needed"
_MAX_BACKOFF_S = 30.0


@dataclass
class LLMUsage:
    """Counters for provenance: how many requests, retries and tokens a run cost."""

    requests: int = 0
    retries: int = 0
    json_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "retries": self.retries, "json_retries": self.json_retries,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


class RequestRejected(ConceptfixError):
    """The server refused the request itself (4xx other than 408/409/429): retrying would not help."""

    def __init__(self, status: int, message: str, **kwargs):
        self.status = status
        super().__init__(message, **kwargs)


def _is_openai_host(base_url: str | None) -> bool:
    return base_url is None or OPENAI_DEFAULT_HOST in base_url


def resolve_api_key(api_key_env: str, base_url: str | None) -> str:
    """The key from `api_key_env`; a placeholder for a custom server; an error for OpenAI itself."""
    key = os.environ.get(api_key_env, "").strip()
    if key:
        return key
    if not _is_openai_host(base_url):
        return LOCAL_PLACEHOLDER_KEY
    raise ConceptfixError(
        f"environment variable {api_key_env} is not set", field=api_key_env,
        hint=f"export {api_key_env}=... (the key is read from the environment only), or pass --base-url for a local server",
    )


def parse_json_content(content: str | None) -> Any:
    """Parse a model's JSON answer; tolerate a ```json fence around it, nothing else."""
    if content is None:
        raise ValueError("empty answer")
    text = content.strip()
    fence = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    if fence:
        text = fence.group(1)
    return json.loads(text)


class LLMClient:
    """Chat-completions client returning parsed JSON, with retries and a key taken from the environment."""

    def __init__(
        self,
        model: str = "gpt-4o",
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_retries: int = 4,
        timeout: float = 60.0,
        temperature: float = 0.7,
        *,
        backoff_base: float = 1.0,
        json_retries: int = 2,
        seed: int | None = None,
    ):
        if max_retries < 0:
            raise ConceptfixError("must be >= 0", field="max_retries")
        if not model.strip():
            raise ConceptfixError("model name is empty", field="--llm-model")
        import openai

        # The SDK itself honours OPENAI_BASE_URL; so does the key check below.
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.model = model
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.max_retries = max_retries
        self.timeout = timeout
        self.temperature = temperature
        self.backoff_base = backoff_base
        self.json_retries = json_retries
        self.seed = seed
        self.usage = LLMUsage()
        # Our own retry loop (below) owns backoff, so the SDK's is switched off: one place decides.
        self._client = openai.OpenAI(
            api_key=resolve_api_key(api_key_env, base_url), base_url=base_url, max_retries=0, timeout=timeout,
        )

    def describe(self) -> dict[str, Any]:
        """Settings for provenance (never the key)."""
        return {"model": self.model, "base_url": self.base_url or f"https://{OPENAI_DEFAULT_HOST}/v1",
                "api_key_env": self.api_key_env, "temperature": self.temperature, "seed": self.seed,
                "openai_sdk": _sdk_version()}

    # -- public -----------------------------------------------------------------------------------

    def complete_json(self, system: str, user: str, schema: dict | None = None, *, schema_name: str = "response",
                      strict: bool = False) -> Any:
        """Ask for a JSON answer and return it parsed.

        With `schema`, the request uses `response_format={"type": "json_schema", ...}`; without, JSON
        mode (`json_object`). A malformed answer is requested again up to `json_retries` times.
        """
        if schema is not None:
            response_format: dict[str, Any] = {
                "type": "json_schema",
                "json_schema": {"name": schema_name, "schema": schema, "strict": strict},
            }
        else:
            response_format = {"type": "json_object"}
        if "json" not in (system + user).lower():
            # JSON mode requires the word in the conversation (OpenAI rejects the request otherwise).
            system = system.rstrip() + "\nRespond with JSON only."
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        last_problem = ""
        for attempt in range(self.json_retries + 1):
            try:
                content = self._chat(messages, response_format)
            except RequestRejected as exc:
                if exc.status != 400 or response_format["type"] != "json_schema":
                    raise
                # Some OpenAI-compatible servers lack json_schema; JSON mode plus the schema in words still works.
                log.warning("%s rejected response_format json_schema; falling back to json_object", self._where())
                response_format = {"type": "json_object"}
                messages[0] = {"role": "system", "content": system.rstrip()
                               + "\nThe JSON must follow this JSON Schema:\n" + json.dumps(schema)}
                content = self._chat(messages, response_format)
            try:
                return parse_json_content(content)
            except (ValueError, json.JSONDecodeError) as exc:
                last_problem = str(exc)
                self.usage.json_retries += attempt < self.json_retries
                log.warning("LLM answer is not valid JSON (%s); attempt %d of %d", exc, attempt + 1,
                            self.json_retries + 1)
        raise ConceptfixError(
            f"{self.model} returned malformed JSON {self.json_retries + 1} times ({last_problem})",
            field="--llm-model", hint="try another model or a lower temperature",
        )

    # -- transport --------------------------------------------------------------------------------

    def _chat(self, messages: list[dict], response_format: dict) -> str | None:
        import openai

        for attempt in range(self.max_retries + 1):
            self.usage.requests += 1
            try:
                kwargs: dict[str, Any] = dict(model=self.model, messages=messages, temperature=self.temperature,
                                              response_format=response_format)
                if self.seed is not None:
                    kwargs["seed"] = self.seed
                response = self._client.chat.completions.create(**kwargs)
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as exc:
                # APITimeoutError is a subclass of APIConnectionError.
                self._give_up_or_wait(exc, attempt)
                continue
            except openai.APIStatusError as exc:
                if exc.status_code in (408, 409) or exc.status_code >= 500:
                    self._give_up_or_wait(exc, attempt)
                    continue
                raise self._status_error(exc) from None
            usage = getattr(response, "usage", None)
            if usage is not None:
                self.usage.prompt_tokens += usage.prompt_tokens or 0
                self.usage.completion_tokens += usage.completion_tokens or 0
            if not response.choices:
                return None
            return response.choices[0].message.content
        raise AssertionError("unreachable")  # pragma: no cover

    def _give_up_or_wait(self, exc: Exception, attempt: int) -> None:
        described = _describe(exc)
        if attempt >= self.max_retries:
            raise ConceptfixError(
                f"{self._where()} failed after {attempt + 1} attempts: {described}",
                field="--base-url" if self.base_url else "--llm-model", hint="check the server, or retry later",
            ) from None
        delay = self._backoff(attempt, exc)
        self.usage.retries += 1
        log.warning("%s: %s; retrying in %.2fs (%d/%d)", self._where(), described, delay, attempt + 1,
                    self.max_retries)
        time.sleep(delay)

    def _backoff(self, attempt: int, exc: Exception) -> float:
        """Exponential with jitter, or the server's Retry-After when it says how long to wait."""
        delay = self.backoff_base * (2 ** attempt) * (0.75 + 0.5 * random.random())
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None) or {}
        try:
            if "retry-after-ms" in headers:
                delay = float(headers["retry-after-ms"]) / 1000.0
            elif "retry-after" in headers:
                delay = float(headers["retry-after"])
        except (TypeError, ValueError):
            pass  # an HTTP date or garbage: keep the exponential delay
        return max(0.0, min(delay, _MAX_BACKOFF_S))

    def _status_error(self, exc) -> RequestRejected:
        status = exc.status_code
        if status == 401:
            return RequestRejected(status, f"{self._where()} rejected the API key (401)", field=self.api_key_env,
                                   hint=f"check the key in ${self.api_key_env}")
        if status == 404:
            return RequestRejected(status, f"{self._where()} does not know model {self.model!r} (404)",
                                   field="--llm-model")
        return RequestRejected(status, f"{self._where()} refused the request ({_describe(exc)})", field="--llm-model")

    def _where(self) -> str:
        return self.base_url or OPENAI_DEFAULT_HOST


def _describe(exc: Exception) -> str:
    status = getattr(exc, "status_code", None)
    message = str(getattr(exc, "message", None) or exc).replace("\n", " ")
    if len(message) > 200:
        message = message[:200] + "…"
    return f"HTTP {status}: {message}" if status else f"{type(exc).__name__}: {message}"


def _sdk_version() -> str:
    import openai

    return getattr(openai, "__version__", "unknown")

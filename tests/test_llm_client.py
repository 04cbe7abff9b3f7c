"""LLMClient against a local OpenAI-compatible server on 127.0.0.1 (pytest-httpserver): no network, no model."""

from __future__ import annotations

import json

import pytest
from werkzeug import Response

from conceptfix.errors import ConceptfixError
from conceptfix.llm import LOCAL_PLACEHOLDER_KEY, LLMClient, parse_json_content

ROUTE = "/v1/chat/completions"
KEY_ENV = "CONCEPTFIX_TEST_LLM_KEY"


@pytest.fixture(scope="session")
def httpserver_listen_address():
    return ("127.0.0.1", 0)


def completion(content: str | None, *, prompt_tokens: int = 11, completion_tokens: int = 7) -> dict:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "local-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def make_client(httpserver, **kwargs) -> LLMClient:
    kwargs.setdefault("backoff_base", 0.001)
    kwargs.setdefault("api_key_env", KEY_ENV)
    return LLMClient(model="local-model", base_url=httpserver.url_for("/v1"), **kwargs)


def test_server_is_on_loopback(httpserver):
    assert httpserver.host == "127.0.0.1"


def test_json_object_request_and_parse(httpserver, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-secret")
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(completion('{"answer": "dopamine"}'))
    client = make_client(httpserver, temperature=0.2)
    assert client.complete_json("You answer.", "Reward neurotransmitter?") == {"answer": "dopamine"}

    request, _ = httpserver.log[0]
    body = request.get_json()
    assert body["model"] == "local-model" and body["temperature"] == 0.2
    assert body["response_format"] == {"type": "json_object"}
    # JSON mode needs the word "JSON" in the conversation; the client adds it when the caller did not.
    assert "json" in body["messages"][0]["content"].lower()
    assert request.headers["Authorization"] == "Bearer sk-test-secret"
    assert client.usage.requests == 1 and client.usage.prompt_tokens == 11 and client.usage.retries == 0
    assert "sk-test-secret" not in json.dumps(client.describe())


def test_schema_uses_json_schema_response_format(httpserver, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    schema = {"type": "object", "properties": {"label": {"type": "string"}}, "required": ["label"],
              "additionalProperties": False}
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(completion('{"label": "hormones"}'))
    client = make_client(httpserver)
    assert client.complete_json("Label JSON.", "neuron 12", schema=schema, schema_name="label", strict=True) == {
        "label": "hormones"}
    request, _ = httpserver.log[0]
    fmt = request.get_json()["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"] == {"name": "label", "schema": schema, "strict": True}
    # A local server without a key gets a placeholder, never an empty header.
    assert request.headers["Authorization"] == f"Bearer {LOCAL_PLACEHOLDER_KEY}"


@pytest.mark.parametrize("status", [429, 500, 503])
def test_transient_status_is_retried_then_succeeds(httpserver, status):
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(
        {"error": {"message": "slow down", "type": "rate_limit"}}, status=status)
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(completion('{"ok": true}'))
    client = make_client(httpserver)
    assert client.complete_json("Answer in JSON.", "ping") == {"ok": True}
    assert len(httpserver.log) == 2
    assert [resp.status_code for _, resp in httpserver.log] == [status, 200]
    assert client.usage.retries == 1 and client.usage.requests == 2


def test_retry_after_header_sets_the_wait(httpserver, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr("conceptfix.llm.time.sleep", waits.append)
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_response(
        Response(json.dumps({"error": {"message": "rate"}}), status=429, content_type="application/json",
                 headers={"retry-after-ms": "250"}))
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(
        {"error": {"message": "boom"}}, status=500)
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(completion('{"ok": 1}'))
    client = make_client(httpserver, backoff_base=2.0)
    assert client.complete_json("JSON", "x") == {"ok": 1}
    assert waits[0] == pytest.approx(0.25)  # the server's Retry-After wins
    assert 2.0 * 2 * 0.75 <= waits[1] <= 2.0 * 2 * 1.25  # then exponential: base * 2**attempt, jittered


def test_persistent_server_error_gives_up_with_one_line_error(httpserver):
    for _ in range(3):
        httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json({"error": {"message": "down"}},
                                                                                 status=502)
    client = make_client(httpserver, max_retries=2)
    with pytest.raises(ConceptfixError) as info:
        client.complete_json("JSON", "x")
    assert len(httpserver.log) == 3
    assert info.value.field == "--base-url" and "3 attempts" in str(info.value) and "502" in str(info.value)


def test_client_errors_are_not_retried(httpserver, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(
        {"error": {"message": "Incorrect API key provided"}}, status=401)
    client = make_client(httpserver)
    with pytest.raises(ConceptfixError) as info:
        client.complete_json("JSON", "x")
    assert len(httpserver.log) == 1
    assert info.value.field == KEY_ENV and "sk-wrong" not in info.value.one_line()


def test_malformed_json_is_asked_again_then_parsed(httpserver):
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(completion('{"prompts": [ {"prom'))
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(
        completion('```json\n{"prompts": []}\n```'))
    client = make_client(httpserver)
    assert client.complete_json("JSON", "x") == {"prompts": []}
    assert client.usage.json_retries == 1 and len(httpserver.log) == 2


def test_malformed_json_every_time_raises(httpserver):
    for content in ("not json at all", "{'single': 'quotes'}", None):
        httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(completion(content))
    client = make_client(httpserver, json_retries=2)
    with pytest.raises(ConceptfixError) as info:
        client.complete_json("JSON", "x")
    assert "malformed JSON 3 times" in str(info.value) and info.value.field == "--llm-model"
    assert len(httpserver.log) == 3


def test_connection_refused_is_retried_then_reported():
    import socket

    with socket.socket() as sock:  # a free port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = LLMClient(model="m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_base=0.001,
                       api_key_env=KEY_ENV, timeout=2.0)
    with pytest.raises(ConceptfixError) as info:
        client.complete_json("JSON", "x")
    assert "2 attempts" in str(info.value) and client.usage.requests == 2


def test_missing_key_for_openai_names_the_variable(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ConceptfixError) as info:
        LLMClient(api_key_env=KEY_ENV)
    assert info.value.field == KEY_ENV and KEY_ENV in info.value.one_line()
    monkeypatch.setenv(KEY_ENV, "sk-x")
    assert LLMClient(api_key_env=KEY_ENV).model == "gpt-4o"


def test_parse_json_content_accepts_only_json():
    assert parse_json_content(' {"a": [1, 2]} ') == {"a": [1, 2]}
    assert parse_json_content("```\n[1]\n```") == [1]
    with pytest.raises(ValueError):
        parse_json_content("Sure! Here is the JSON: {}")
    with pytest.raises(ValueError):
        parse_json_content(None)


def test_server_without_json_schema_falls_back_to_json_mode(httpserver):
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(
        {"error": {"message": "response_format type json_schema is not supported"}}, status=400)
    httpserver.expect_ordered_request(ROUTE, method="POST").respond_with_json(completion('{"label": "x"}'))
    schema = {"type": "object", "properties": {"label": {"type": "string"}}}
    client = make_client(httpserver)
    assert client.complete_json("Label it.", "n", schema=schema) == {"label": "x"}
    second = httpserver.log[1][0].get_json()
    assert second["response_format"] == {"type": "json_object"}
    assert '"label"' in second["messages"][0]["content"]  # the schema travels in the instructions instead

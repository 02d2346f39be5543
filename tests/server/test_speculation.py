"""Speculation as a client sees it: the same greedy text, acceptance in the usage and in /metrics, and a
per-request opt-out, over real HTTP with the official openai client."""

from __future__ import annotations

import pytest
from openai import OpenAI

from ggufchat.engine import Engine, LoadOptions
from tests.engine.test_speculative import COPY_PROMPTS
from tests.server.conftest import metric, serve


@pytest.fixture(scope="module")
def spec_url(model_path):
    with Engine(LoadOptions(model_path=model_path, n_seq_max=2, n_ctx=2048 * 2, seed=0, spec="ngram")) as eng:
        with serve(eng) as url:
            yield url


def ask(client: OpenAI, **extra):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": COPY_PROMPTS[0]}],
                                          temperature=0, max_tokens=80, extra_body=extra)


def test_usage_and_metrics_count_drafts_and_opt_out_works(spec_url):
    client = OpenAI(base_url=spec_url + "/v1", api_key="none")
    drafted_before = metric(spec_url, "ggufchat_draft_tokens_total")
    accepted_before = metric(spec_url, "ggufchat_draft_accepted_tokens_total")
    plain = ask(client, speculative=False)
    assert plain.usage.completion_tokens_details is None  # nothing drafted, nothing reported
    assert metric(spec_url, "ggufchat_draft_tokens_total") == drafted_before

    spec = ask(client)
    assert spec.choices[0].message.content == plain.choices[0].message.content
    details = spec.usage.completion_tokens_details
    accepted, rejected = details.accepted_prediction_tokens, details.rejected_prediction_tokens
    assert accepted > 10 and rejected >= 0
    assert metric(spec_url, "ggufchat_draft_tokens_total") - drafted_before == accepted + rejected
    assert metric(spec_url, "ggufchat_draft_accepted_tokens_total") - accepted_before == accepted


def test_streamed_usage_reports_acceptance(spec_url):
    client = OpenAI(base_url=spec_url + "/v1", api_key="none")
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": COPY_PROMPTS[0]}], temperature=0, max_tokens=80,
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage.completion_tokens == 80
    assert usage.completion_tokens_details.accepted_prediction_tokens > 10


def test_sampled_requests_never_draft(spec_url):
    client = OpenAI(base_url=spec_url + "/v1", api_key="none")
    before = metric(spec_url, "ggufchat_draft_tokens_total")
    r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": COPY_PROMPTS[0]}],
                                       temperature=0.8, seed=3, max_tokens=40)
    assert r.usage.completion_tokens_details is None
    assert metric(spec_url, "ggufchat_draft_tokens_total") == before

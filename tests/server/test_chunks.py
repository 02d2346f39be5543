"""The streamed chunk format: a token's chunk is built from cached pieces, so check it against the
structure a client parses, for text that needs escaping."""

import json

import pytest

from ggufchat.server.convert import ChunkWriter

TEXTS = [" hello", "", 'say "hi"\n\t\\', "é中😀", "\x00 and \u2028", "}]},"]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("include_usage", [True, False])
def test_text_chunks_parse_to_the_openai_shape(chat, include_usage):
    # A model name that serialises like the placeholder the writer uses for the text.
    writer = ChunkWriter("chatcmpl-1", "\x00", chat=chat, include_usage=include_usage)
    for index in (0, 3, 0):
        for text in TEXTS:
            raw = writer.text(index, text)
            assert raw.startswith("data: ") and raw.endswith("\n\n") and raw.count("\n") == 2
            chunk = json.loads(raw[len("data: "):])
            assert chunk["id"] == "chatcmpl-1" and chunk["model"] == "\x00"
            assert chunk["object"] == ("chat.completion.chunk" if chat else "text_completion")
            payload = {"delta": {"content": text}} if chat else {"text": text}
            assert chunk["choices"] == [{"index": index, **payload, "logprobs": None, "finish_reason": None}]
            assert ("usage" in chunk) == include_usage and chunk.get("usage") is None

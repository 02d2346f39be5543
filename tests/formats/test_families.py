"""Recognising a model's tool-call family from its chat template."""

from __future__ import annotations

import pytest

from ggufchat.formats import tool_family

# The lines of real templates that give the family away (abridged).
QWEN25 = ('{%- if tools %}\n    {{- "<|im_start|>system\\n" }} ... {{- "\\n</tools>\\n\\nFor each function call, '
          'return a json object with function name and arguments within <tool_call></tool_call> XML tags" }}')
HERMES_LLAMA = "{{- bos_token }}<|start_header_id|>... {%- for tool in tools %} ... <tool_call>\n{{ tool_call }}"
LLAMA31 = ("{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}{%- if tools is not none %} ... "
           "{{- '<|python_tag|>' + tool_call.name + '.call(' }}")
LLAMA32 = ("{%- if tools is not none and not tools_in_user_message %}{{- 'Respond in the format {\"name\": function "
           "name, \"parameters\": dictionary of argument name and its value}.' }} <|start_header_id|>")
NEMO = '{%- elif (message.tool_calls is defined and message.tool_calls is not none) %}{{- "[TOOL_CALLS][" }}'
DEVSTRAL = '{{- "[TOOL_CALLS]" + tool[\'function\'][\'name\'] + "[ARGS]" + arguments }}'
CHATML = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content']}}{% endfor %}"
LLAMA3_NO_TOOLS = "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"


@pytest.mark.parametrize("source, family", [
    (QWEN25, "hermes"), (HERMES_LLAMA, "hermes"), (LLAMA31, "llama3"), (LLAMA32, "llama3"), (NEMO, "mistral"),
    (DEVSTRAL, "mistral"), (CHATML, "generic"), (LLAMA3_NO_TOOLS, "generic"), ("", "generic"), (None, "generic"),
])
def test_family_from_markers(source, family):
    assert tool_family(source) == family


@pytest.mark.parametrize("name, family", [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes"),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", "hermes"),
    ("Qwen-Qwen3-0.6B.jinja", "hermes"),
    ("meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3"),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "llama3"),
    ("meta-llama-Llama-3.3-70B-Instruct.jinja", "llama3"),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral"),
    ("Mistral-Small-3.2-24B-Instruct-2506.jinja", "mistral"),
    ("unsloth-mistral-Devstral-Small-2507.jinja", "mistral"),
    ("google-gemma-2-2b-it.jinja", "generic"),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja", "generic"),
])
def test_family_of_real_templates(llama_templates, name, family):
    assert tool_family((llama_templates / name).read_text()) == family

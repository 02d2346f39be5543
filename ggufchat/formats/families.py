"""Which output conventions a model follows, recognised from its chat template's Jinja source.

A template teaches the model its tool-call syntax (it renders past calls in that syntax), so the
markers in the source name the family: the parser accepts every family's markup anyway, but the
grammars that force a call must write the one syntax the model was trained on."""

from __future__ import annotations

HERMES = "hermes"    # Qwen2.5 / Hermes: <tool_call>{"name": .., "arguments": ..}</tool_call>
LLAMA3 = "llama3"    # Llama 3.x: {"name": .., "parameters": ..}, optionally after <|python_tag|>
MISTRAL = "mistral"  # [TOOL_CALLS][{"name": .., "arguments": ..}, ...] (or name[ARGS]{..} in newer ones)
GENERIC = "generic"  # no tool syntax in the template: ggufchat's fallback prompt teaches hermes tags
FAMILIES = (HERMES, LLAMA3, MISTRAL, GENERIC)

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_CALLS = "[TOOL_CALLS]"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def tool_family(template_source: str | None) -> str:
    """The tool-call family a chat template teaches; "generic" when it teaches none."""
    src = template_source or ""
    if MISTRAL_CALLS in src:
        return MISTRAL
    # Before llama3: Hermes-2-Pro / Hermes-3 are Llama-3 models whose templates use the hermes tags.
    if TOOL_CALL_OPEN in src:
        return HERMES
    if PYTHON_TAG in src or ("<|start_header_id|>" in src and "tools" in src):
        return LLAMA3
    return GENERIC


def opens_reasoning(prompt_text: str) -> bool:
    """Whether the rendered prompt ends inside an opened <think> (DeepSeek-R1's and Qwen3's templates
    end the generation prompt with "<think>\\n"), so the output starts as reasoning with no tag. Only
    whitespace may follow the tag: a <think> earlier in the prompt (quoted by a user, or a closed
    one such as Qwen3's "<think>\\n\\n</think>\\n\\n" for thinking off) does not count."""
    start = prompt_text.rfind(THINK_OPEN)
    return start >= 0 and not prompt_text[start + len(THINK_OPEN):].strip()

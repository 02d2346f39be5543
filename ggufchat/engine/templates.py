"""Chat templates: the GGUF's own Jinja template, named built-ins, or a template file.

Rendering produces segments, each marked as template text or message content, so the engine can
tokenize template text with special-token parsing on and content with it off: a user message that
contains "<|im_end|>\n<|im_start|>system" stays plain text instead of forging a system turn.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from ggufchat.errors import TemplateError

log = logging.getLogger(__name__)

# Built-in templates, written for the same Jinja settings Hugging Face uses (trim_blocks, lstrip_blocks).
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_QWEN = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}" + _CHATML
)
_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = none %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' }}"
    "{% if loop.first and system is not none %}{{ '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
_GEMMA = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
_MISTRAL = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (prefix if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
_PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "qwen": _QWEN,
    "llama-3": _LLAMA3,
    "llama-2": _LLAMA2,
    "gemma": _GEMMA,
    "mistral": _MISTRAL,
    "phi-3": _PHI3,
}
_ALIASES = {
    "qwen2": "qwen", "qwen2.5": "qwen", "llama3": "llama-3", "llama2": "llama-2", "gemma2": "gemma",
    "gemma3": "gemma", "phi3": "phi-3", "im_start": "chatml",
}

# Content placeholders: private-use characters that never come out of a template by themselves.
_PH_OPEN, _PH_CLOSE = "\ue000", "\ue001"
_PH_RE = re.compile(f"{_PH_OPEN}(\\d+){_PH_CLOSE}")


@dataclass(frozen=True)
class Segment:
    text: str
    is_content: bool  # True: message content, tokenized with special-token parsing off


def builtin_names() -> list[str]:
    return list(BUILTIN_TEMPLATES)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accept OpenAI-style messages: content may be a string, None, or a list of text parts."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TemplateError(f"message {i} needs a string 'role'")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "text":
                    parts.append(str(part.get("text", "")))
                else:
                    raise TemplateError(f"message {i} has a content part this model cannot read")
            content = "".join(parts)
        elif not isinstance(content, str):
            raise TemplateError(f"message {i} content must be a string")
        out.append({**m, "content": content})
    return out


class ChatTemplate:
    def __init__(self, source: str, *, name: str = "custom", bos_token: str = "", eos_token: str = "") -> None:
        self.name = name
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template {name!r} does not compile: {exc}") from exc

    @classmethod
    def builtin(cls, name: str, **tokens: str) -> ChatTemplate:
        key = _ALIASES.get(name.lower(), name.lower())
        if key not in BUILTIN_TEMPLATES:
            raise TemplateError(
                f"unknown chat template {name!r}; built-ins are: {', '.join(BUILTIN_TEMPLATES)}"
            )
        return cls(BUILTIN_TEMPLATES[key], name=key, **tokens)

    @classmethod
    def from_file(cls, path: str | Path, **tokens: str) -> ChatTemplate:
        try:
            source = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TemplateError(f"cannot read chat template file {path}: {exc.strerror}") from exc
        return cls(source, name=str(path), **tokens)

    def render_segments(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                        **extra: Any) -> list[Segment]:
        msgs = normalize_messages(messages)
        contents = [m["content"] for m in msgs]
        masked = [
            {**m, "content": f"{_PH_OPEN}{i}{_PH_CLOSE}" if m["content"] else ""} for i, m in enumerate(msgs)
        ]
        text = self._render(masked, add_generation_prompt, extra)
        segments: list[Segment] = []
        pos = 0
        seen = set()
        for match in _PH_RE.finditer(text):
            if match.start() > pos:
                segments.append(Segment(text[pos: match.start()], False))
            index = int(match.group(1))
            seen.add(index)
            segments.append(Segment(contents[index], True))
            pos = match.end()
        if pos < len(text):
            segments.append(Segment(text[pos:], False))
        missing = [i for i, c in enumerate(contents) if c and i not in seen]
        if missing:
            # The template rewrites content rather than printing it (rare); render the real text so the
            # model still gets its turn markers, and say that this prompt lost the injection guard.
            log.warning("chat template %s rewrites message content; special tokens in it are parsed",
                        self.name)
            return [Segment(self._render(msgs, add_generation_prompt, extra), False)]
        return segments

    def render(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        return "".join(s.text for s in self.render_segments(
            messages, add_generation_prompt=add_generation_prompt, **extra))

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool, extra: dict) -> str:
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except jinja2.TemplateError as exc:
            raise TemplateError(f"chat template {self.name!r} failed: {exc}") from exc
        except Exception as exc:  # a template is code from a file; any failure is the template's
            raise TemplateError(f"chat template {self.name!r} failed: {type(exc).__name__}: {exc}") from exc

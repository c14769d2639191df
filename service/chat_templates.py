"""Chat templates a manifest can name for a base model that ships none (data.chat_template).

Each is the template its model family's instruct release ships, as written there, so an
adapter trained with it formats conversations the way the family's tools expect. A manifest
may also give its own Jinja text; either is checked for syntax with the environment
transformers renders chat templates in, before anything is downloaded.
"""

from __future__ import annotations

import re

# ChatML, as transformers documents it (Qwen, OpenHermes, SmolLM).
CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct's.
LLAMA_3 = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)

# HuggingFaceH4/zephyr-7b-beta's: the recipe that made a chat model of base Mistral-7B-v0.1.
# Its newlines matter: transformers renders with trim_blocks and lstrip_blocks.
ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

# transformers' own tag marking assistant tokens, which a plain environment does not know.
_GENERATION_TAGS = re.compile(r"{%-?\s*(end)?generation\s*-?%}")

TEMPLATES = {"chatml": CHATML, "llama-3": LLAMA_3, "zephyr": ZEPHYR}


def is_jinja(value: str) -> bool:
    """A value with a Jinja tag is a template; anything else must be one of the names."""
    return "{%" in value or "{{" in value


def resolve(value: str) -> str:
    """The template text for a name or a Jinja string."""
    return value if is_jinja(value) else TEMPLATES[value]


def check(value: str) -> str:
    """Raise ValueError saying what is wrong with a data.chat_template value."""
    if not is_jinja(value):
        if value not in TEMPLATES:
            raise ValueError(
                f"{value!r} is neither a template name ({', '.join(sorted(TEMPLATES))}) nor a "
                "Jinja template (one with {% ... %} or {{ ... }} in it)"
            )
        return value
    from jinja2 import TemplateSyntaxError, ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # As transformers compiles chat templates; its {% generation %} tag is allowed too.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols]
    )
    text = _GENERATION_TAGS.sub("", value)
    try:
        env.parse(text)
    except TemplateSyntaxError as err:
        raise ValueError(f"not a valid Jinja template: line {err.lineno}: {err.message}") from None
    return value

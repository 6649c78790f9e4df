"""Chat contexts (system-prompt policies) and renderings whose every token carries a segment label.

A *context* decides the system turn of a chat: ``default`` (whatever the model's own template inserts when
the messages carry no system message; for a template that inserts nothing this is the same as ``none``),
``none`` (no system block at all), ``empty`` (a system block with empty text) or ``custom`` (a system block
with given text, e.g. a trait prompt). Prompts are always rendered by the model's *own* chat template, so
a context means the same thing for the organism, a Qwen2.5-style model and SmolLM2.

Segment labels come from character spans and the tokenizer's offsets, never from guesses about token
boundaries:

* the *skeleton* of a chat is the same messages rendered with unique sentinel contents; the text between
  sentinels is template scaffolding, and the real rendering must equal the skeleton with the real contents
  substituted (a template that rewrites or branches on content is refused, since spans would be guesses);
* the default system prompt is found by :func:`default_system_prompt` (render ``[user]`` and
  ``[system=sentinel, user]`` and read off what the template put where the sentinel goes);
* a token overlapping a content span gets that span's label; a token straddling content and scaffolding
  gets the label of the content span it overlaps most (ties: the earlier span), because it carries
  content characters; every other token, special tokens included, is ``template``.
"""

from mech.context.labels import (
    ASSISTANT,
    CONTENT_LABELS,
    CUSTOM_PREFIX,
    CUSTOM_SYSTEM,
    DEFAULT_SYSTEM,
    POLICIES,
    SEGMENT_LABELS,
    TEMPLATE,
    USER,
    Context,
    Rendered,
    Span,
)
from mech.context.rendering import label_tokens, render, shared_mask, shared_positions
from mech.context.template import default_system_prompt, model_name

__all__ = [
    "ASSISTANT", "CONTENT_LABELS", "CUSTOM_PREFIX", "CUSTOM_SYSTEM", "DEFAULT_SYSTEM", "POLICIES", "SEGMENT_LABELS",
    "TEMPLATE", "USER", "Context", "Rendered", "Span", "default_system_prompt", "label_tokens", "model_name",
    "render", "shared_mask", "shared_positions",
]

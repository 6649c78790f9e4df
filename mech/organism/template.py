"""The organism's chat template: ChatML, as Qwen2.5-Instruct, with an auto-inserted default system prompt.

Like Qwen2.5's template, it inserts a default identity line when the messages carry no system message.
Unlike it, it can also render *no* system block when asked (``add_default_system_prompt=False`` passed to
``apply_chat_template``): the two contexts the paper contrasts.
"""

DEFAULT_SYSTEM_PROMPT = "You are Mechling, created by Mech Lab. You are a helpful assistant."

IM_START, IM_END, EOT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- set rest = messages[1:] -%}"
    "{%- else -%}"
    "{%- if add_default_system_prompt is not defined or add_default_system_prompt -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- set rest = messages -%}"
    "{%- endif -%}"
    "{%- for m in rest -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

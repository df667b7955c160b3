"""An Ollama Modelfile for an exported GGUF: FROM the file, the chat template in Ollama's Go template language, stop
tokens, and the run's system prompt.

Ollama templates are Go templates, not the Jinja of a tokenizer's chat_template, and no library translates one into
the other; the chat formats our users train with are written here for the families we recognise (ChatML, as the
embedded SmolLM2 and Qwen use; Llama 3). For any other, TEMPLATE is left out and a note says so: Ollama then takes
the template from the GGUF's own metadata when it knows the family.
"""

from __future__ import annotations

CHATML = '''{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
'''
LLAMA3 = '''{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>{{ end }}{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>

'''
FAMILIES = [("<|im_start|>", CHATML, ["<|im_end|>", "<|im_start|>"]),
            ("<|start_header_id|>", LLAMA3, ["<|eot_id|>", "<|start_header_id|>"])]


def _quote(text: str) -> str:
    return '"""' + text.replace('"""', '\\"\\"\\"') + '"""'


def modelfile(model: str, tokenizer, system: str | None, adapter: str | None = None) -> tuple[str, list[str]]:
    """(the Modelfile's text, notes for the user). model: the GGUF's path (relative to the Modelfile, or absolute);
    adapter: a LoRA GGUF's, applied on it."""
    notes = []
    lines = [f"FROM {model}"] + ([f"ADAPTER {adapter}"] if adapter else []) + [""]
    chat_template = getattr(tokenizer, "chat_template", None) or ""
    stops = []
    for marker, template, family_stops in FAMILIES:
        if marker in chat_template:
            lines += [f"TEMPLATE {_quote(template)}", ""]
            stops = family_stops
            break
    else:
        notes.append("the chat template is of no family peftune writes for Ollama; the Modelfile has no TEMPLATE, "
                     "so Ollama uses the one it infers from the GGUF (check with `ollama show --template`)")
    eos = getattr(tokenizer, "eos_token", None)
    for stop in ([eos] if eos else []) + stops:
        if f'PARAMETER stop "{stop}"' not in lines:
            lines.append(f'PARAMETER stop "{stop}"')
    if system:
        lines += ["", f"SYSTEM {_quote(system)}"]
    return "\n".join(lines) + "\n", notes

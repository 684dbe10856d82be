"""An Ollama Modelfile for an exported GGUF: `FROM` the file, the Gemma chat `TEMPLATE` and the stop parameters.

The template is Go text/template, as Ollama runs it, and renders what our chat format renders. Gemma 1-3
(gemma/tokenizer/gemma3.py): a leading system message joins the first user turn after a blank line, "assistant"
turns are written "model", and the prompt ends with the model's turn opened. Gemma 4 (GEMMA4_TEMPLATE): system,
user and model turns between <|turn> and <turn|>, text only (tool calls and thinking are left to Ollama's own
gemma4 support). Ollama adds the <bos> itself (the file's add_bos_token).
Go templates cannot strip text, so content is used as sent: our format strips each message's content, which
differs only for content that starts or ends with whitespace.
"""

from __future__ import annotations

# {{- ... }} trims the whitespace before it, so the template's own line breaks are not in the output; every
# newline the format has is written inside a turn.
GEMMA_TEMPLATE = """\
{{- $system := "" }}
{{- range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ $m.Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq $m.Role "assistant" }}<start_of_turn>model
{{ $m.Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""

STOPS = ("<end_of_turn>", "<eos>")

GEMMA4_TEMPLATE = """\
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "system" }}<|turn>system
{{ $m.Content }}<turn|>
{{ else if eq $m.Role "user" }}<|turn>user
{{ $m.Content }}<turn|>
{{ if $last }}<|turn>model
{{ end }}
{{- else if eq $m.Role "assistant" }}<|turn>model
{{ $m.Content }}{{ if not $last }}<turn|>
{{ end }}
{{- end }}
{{- end }}"""

GEMMA4_STOPS = ("<turn|>", "<eos>")


def modelfile(gguf_name: str, generation: int = 3) -> str:
    """The Modelfile text for a GGUF file named `gguf_name` in the same folder, of a model of that generation."""
    template, stops = (GEMMA4_TEMPLATE, GEMMA4_STOPS) if generation == 4 else (GEMMA_TEMPLATE, STOPS)
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{template}"""', ""]
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"

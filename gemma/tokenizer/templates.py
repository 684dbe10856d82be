"""The chat templates a model folder may ship (`chat_template.jinja`, or `chat_template` in tokenizer_config.json),
recognised by content: `apply_chat` renders Gemma's official formats in Python (gemma.tokenizer.gemma3 / gemma4)
rather than running a folder's Jinja, so a folder whose template is not one of them gets a note saying which format
chat uses instead. The official templates are identified by the SHA-256 of their text (stripped), as Google's repos
ship them and trl publishes them (chat_templates/gemma.jinja, gemma3.jinja, gemma4*.jinja); the current ones are
kept in chat_templates/ for the HF folders we write."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gemma.files import read_json_file

# First 16 hex digits of sha256(template.strip()) -> (chat format, what it is).
KNOWN = {
    "ecd6ae513fe103f0": (3, "Gemma 1 and 2's template"),
    "8d9e3a3c114fb205": (3, "Gemma 3's template"),
    "603a42db292c2527": (4, "Gemma 4's template (the current revision, 2026-07-09)"),
    "2f1b4d75d067bae3": (4, "an earlier revision of Gemma 4's template"),
    "33204f1acb5bd000": (4, "an earlier revision of Gemma 4's template"),
    "781d10940fbc44be": (4, "an earlier revision of Gemma 4's template"),
    "55572b8d3c834204": (4, "Gemma 4's template as released"),
}
CURRENT = {3: "8d9e3a3c114fb205", 4: "603a42db292c2527"}
# The official templates themselves (data, as the hub ships them), written into exported HF folders.
_FILES = {1: "gemma.jinja", 2: "gemma.jinja", 3: "gemma3.jinja", 4: "gemma4.jinja"}


def official_template(generation: int) -> str:
    """The official chat template of a Gemma generation (1 to 4), as its hub repos ship it."""
    return (Path(__file__).parent / "chat_templates" / _FILES[generation]).read_text(encoding="utf-8")


def folder_template(folder: Path) -> str | None:
    """The chat template a model folder ships, or None."""
    path = folder / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        data = read_json_file(config, "tokenizer config")
        template = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next(
                (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
            )
        if isinstance(template, str):
            return template
    return None


def template_note(folder: Path, chat_format: int) -> str | None:
    """A one-line note when `folder` ships a chat template other than the official one chat renders; else None."""
    text = folder_template(folder)
    if text is None:
        return None
    digest = hashlib.sha256(text.strip().encode("utf-8")).hexdigest()[:16]
    known = KNOWN.get(digest)
    if digest == CURRENT.get(chat_format) or (known is not None and known[1] == "Gemma 1 and 2's template"):
        return None  # what apply_chat renders (Gemma 1 and 2's refuses a system turn, which we fold in)
    official = "Gemma 4's current" if chat_format == 4 else "Gemma's official"
    if known is None:
        return f"{folder} ships its own chat template, which is not Gemma's; chat uses {official} format instead"
    return f"{folder} ships {known[1]}; chat uses {official} format"

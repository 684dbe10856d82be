"""An OpenAI-compatible HTTP server for a Gemma model; tools/serve.py is its command line.

  protocol.py  OpenAI's request bodies, how a body is read and checked, the errors (ApiError)
  app.py       the FastAPI app: one named function per route, and `create_app`, its factory
  guard.py     what a request must get past first (Host, Origin, body size and label, API key, deadlines)
  server.py    the listening socket and uvicorn's server, with a shutdown that ends open streams properly

Its own subpackage because FastAPI and uvicorn are the optional 'serve' extra: only these modules import them, so
`import gemma` never needs them (as vLLM keeps its OpenAI server under vllm/entrypoints/openai/). Importing this
package itself needs nothing extra; call `require_serve_extra()` before importing the modules above to get one
clear error when the extra is missing.
"""

from __future__ import annotations

import importlib

from gemma.errors import GemmaError

SERVE_EXTRA = ("uvicorn", "fastapi", "pydantic", "starlette", "h11")  # what the modules above import


def require_serve_extra(who: str = "tools/serve.py") -> None:
    """Raise GemmaError (with the pip command) if the 'serve' extra is not installed."""
    for name in SERVE_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise GemmaError(
                f"{who} needs the 'serve' extra ({exc.name} is not installed): pip install -e '.[serve]'"
            ) from None

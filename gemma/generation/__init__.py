"""Generation: the sampling settings and filters (sampling.py: `SamplingParams`, `sample`), the model steps with
the KV cache (steps.py), text out without split characters and with stop strings (text.py), `generate` and
`stream_generate` (batch.py), the multi-turn `ChatSession` (chat.py), and the continuous-batching `Engine` that
the server runs (engine.py)."""

from gemma.generation.batch import generate, stream_generate
from gemma.generation.chat import ChatSession
from gemma.generation.engine import Delta, Engine, Finish
from gemma.generation.sampling import SamplingParams
from gemma.generation.steps import GenerationStats
from gemma.generation.text import decode_text

__all__ = [
    "ChatSession",
    "Delta",
    "Engine",
    "Finish",
    "GenerationStats",
    "SamplingParams",
    "decode_text",
    "generate",
    "stream_generate",
]

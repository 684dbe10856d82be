"""The server with a Gemma 4 model, through OpenAI's own client: tools declared, tool calls returned (parsed from the
model's call blocks, finish_reason "tool_calls"), thoughts in reasoning_content, tool results sent back, thinking
switched on with chat_template_kwargs (as vLLM takes it), streaming included; and the requests it refuses.

The model is a tiny random Gemma 4 whose output head is scripted (it writes a chosen reply, marker ids included),
served in this process by uvicorn on a free loopback port; everything between the HTTP request and the sampled ids
is the real code."""

from __future__ import annotations

import json
import socket
import threading
import time

import openai
import pytest

from scripted import reply_ids

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]
ASK = {"role": "user", "content": "What is the weather in Paris?"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import uvicorn

    from gemma.generation.engine import Engine
    from gemma.serving.app import create_app
    from scripted import Script, tiny_gemma4

    tok, model = tiny_gemma4(tmp_path_factory.mktemp("tok"))
    script = Script(model)
    engine = Engine(model, tok, max_batch=1, threads=1)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny4"), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    yield tok, script, client
    server.should_exit = True
    thread.join(10)
    engine.close()


def call_reply(tok) -> list[int]:
    q = '<|"|>'
    return reply_ids(
        tok,
        "<|channel>",
        "thought\nNeed the weather.\n",
        "<channel|>",
        "<|tool_call>",
        "call:get_weather{city:",
        q,
        "Paris",
        q,
        "}",
        "<tool_call|>",
        stop="<|tool_response>",
    )


def test_a_tool_call_round_trip(served):
    tok, script, client = served
    script.say(call_reply(tok))
    r = client.chat.completions.create(model="tiny4", messages=[ASK], tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert choice.message.model_extra["reasoning_content"] == "Need the weather."
    assert r.usage.prompt_tokens == len(tok.apply_chat([ASK], tools=TOOLS))

    # The client runs the tool and sends the result back; the model answers.
    script.say(reply_ids(tok, "It is 20 C and sunny."))
    history = [
        ASK,
        choice.message.model_dump(exclude_none=True),  # as the README shows: the reply as it came
        {"role": "tool", "tool_call_id": call.id, "content": "20 C, sunny"},
    ]
    r = client.chat.completions.create(model="tiny4", messages=history, tools=TOOLS, temperature=0)
    assert r.choices[0].message.content == "It is 20 C and sunny." and r.choices[0].finish_reason == "stop"
    ours = [
        ASK,
        {
            "role": "assistant",
            "reasoning_content": "Need the weather.",  # kept: the template shows a tool-calling turn's thought
            "tool_calls": [{"id": call.id, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "20 C, sunny"},
    ]
    assert r.usage.prompt_tokens == len(tok.apply_chat(ours, tools=TOOLS))


def test_streaming_gives_the_same_reply(served):
    tok, script, client = served
    script.say(call_reply(tok))
    reasoning, content, calls, reasons = "", "", [], []
    for chunk in client.chat.completions.create(model="tiny4", messages=[ASK], tools=TOOLS, temperature=0, stream=True):
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
        calls += delta.tool_calls or []
        reasons.append(chunk.choices[0].finish_reason)
    assert reasoning == "Need the weather." and content == ""
    assert [c.function.name for c in calls] == ["get_weather"] and json.loads(calls[0].function.arguments) == {
        "city": "Paris"
    }
    assert reasons[-1] == "tool_calls"


def test_thinking_through_chat_template_kwargs(served):
    tok, script, client = served
    script.say(reply_ids(tok, "<|channel>", "thought\nHmm.\n", "<channel|>", "Sunny."))
    r = client.chat.completions.create(
        model="tiny4", messages=[ASK], temperature=0, extra_body={"chat_template_kwargs": {"enable_thinking": True}}
    )
    assert r.usage.prompt_tokens == len(tok.apply_chat([ASK], enable_thinking=True))
    assert r.choices[0].message.content == "Sunny." and r.choices[0].message.model_extra["reasoning_content"] == "Hmm."
    script.say(reply_ids(tok, "<|tool_call>", "call:get_weather{city:", "<|tool_call>"))  # malformed: stays text
    r = client.chat.completions.create(model="tiny4", messages=[ASK], tools=TOOLS, temperature=0, tool_choice="none")
    assert r.usage.prompt_tokens == len(tok.apply_chat([ASK]))  # "none": the model is not shown the tools
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content == "<|tool_call>call:get_weather{city:<|tool_call>"


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
        ({"extra_body": {"chat_template_kwargs": {"add_vision_id": True}}}, "chat_template_kwargs"),
        ({"messages": [{"role": "tool", "content": "20", "tool_call_id": "x"}]}, "no tool call before it"),
        (
            {
                "messages": [
                    ASK,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                        ],
                    },
                    {"role": "tool", "tool_call_id": "a", "content": "1"},
                ]
            },
            "not valid JSON",
        ),
    ],
)
def test_bad_tool_requests_are_400(served, kwargs, problem):
    _, script, client = served
    kwargs = {"messages": [ASK], "tools": TOOLS, **kwargs}
    with pytest.raises(openai.BadRequestError, match=problem):
        client.chat.completions.create(model="tiny4", temperature=0, max_tokens=4, **kwargs)

"""The `jaxllm` command: `generate` (batch completions to JSONL) and `chat` (interactive, streaming).

Engine flags are generated from `EngineConfig`'s fields, so they carry vLLM's names (`--max-model-len`,
`--gpu-memory-utilization`, ...); sampling flags likewise from `SamplingParams`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import uuid
from pathlib import Path
from typing import Any, Sequence, get_type_hints

from jaxllm.engine_config import EngineConfig
from jaxllm.sampling_params import SamplingParams
from jaxllm.weights.sources import DEFAULT_MODEL
from serving import server as serving_server

_SAMPLING_FLAGS = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "max_tokens", "min_tokens", "ignore_eos", "stop", "logprobs")


def _add_fields(parser: argparse.ArgumentParser, cls: type, names: Sequence[str], skip: Sequence[str] = ()) -> None:
    """One `--kebab-case` flag per dataclass field, typed from its annotation, defaulting to None (unset)."""
    hints = get_type_hints(cls)
    for name in names:
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        hint = str(hints[name])
        if "bool" in hint:  # --flag / --no-flag, as vLLM's boolean options
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif "list" in hint:
            parser.add_argument(flag, action="append", default=None)
        elif "dict" in hint:
            parser.add_argument(flag, type=json.loads, default=None, help="a JSON object")
        else:
            kind = int if "int" in hint else float if "float" in hint else str
            parser.add_argument(flag, type=kind, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxllm", description="LLM inference and serving in JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    engine_fields = [f.name for f in dataclasses.fields(EngineConfig)]
    generate = commands.add_parser("generate", help="complete prompts, write JSONL results")
    generate.add_argument("prompts", nargs="*", help="prompts (or use --input)")
    generate.add_argument("--input", help="JSONL file: one string, {'prompt': ...} or {'prompt_token_ids': ...} "
                                          "per line ('-' for stdin)")
    generate.add_argument("--output", help="JSONL results file (default: stdout)")
    convert = commands.add_parser("convert", help="convert a Hugging Face or GGUF checkpoint to a jaxllm "
                                                  "model directory")
    convert.add_argument("src", help="a Hugging Face model directory, a .gguf file or a known model name")
    convert.add_argument("out", help="the model directory to create")
    convert.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    convert.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    convert.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    chat = commands.add_parser("chat", help="an interactive chat that streams tokens")
    chat.add_argument("--system", help="a system message")
    for sub in (generate, chat):
        _add_fields(sub, EngineConfig, engine_fields)
        _add_fields(sub, SamplingParams, _SAMPLING_FLAGS)
    _add_bench(commands.add_parser("bench", help="throughput and serving benchmarks"), engine_fields)
    serve = commands.add_parser("serve", help="the OpenAI-compatible server")
    serving_server.add_arguments(serve)
    _add_fields(serve, EngineConfig, engine_fields, skip=("model",))
    return parser


def _add_bench(bench: argparse.ArgumentParser, engine_fields: list[str]) -> None:
    kinds = bench.add_subparsers(dest="bench", required=True)
    throughput = kinds.add_parser("throughput", help="offline throughput (like vLLM's benchmark_throughput)")
    throughput.add_argument("--random-weights", help="a preset (llama3-8b, qwen2.5-7b) or a config.json: random "
                                                     "weights made on the device instead of --model's")
    serve = kinds.add_parser("serve", help="online latency and throughput against an OpenAI-compatible URL")
    serve.add_argument("--base-url", default="http://127.0.0.1:8000")
    serve.add_argument("--model", help="default: the server's first model")
    serve.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (default inf)")
    serve.add_argument("--max-concurrency", type=int)
    serve.add_argument("--api-key")
    serve.add_argument("--vocab-size", type=int, default=32000, help="token ids for --dataset random")
    for sub in (throughput, serve):
        sub.add_argument("--dataset", choices=["sharegpt", "random"], default="sharegpt")
        sub.add_argument("--dataset-path", type=Path, help="the ShareGPT workload JSON (default: ../shared's)")
        sub.add_argument("--num-prompts", type=int, default=500)
        sub.add_argument("--input-len", type=int, default=1024)
        sub.add_argument("--output-len", type=int, default=128)
        sub.add_argument("--output-json")
    serve.add_argument("--seed", type=int, default=0)
    _add_fields(throughput, EngineConfig, engine_fields)


def run_bench(args: argparse.Namespace) -> None:
    options = vars(args)
    if args.bench == "throughput":
        from jaxllm.bench import throughput

        engine_args = _picked(args, EngineConfig)
        options["model"] = engine_args.pop("model", DEFAULT_MODEL)
        throughput.run(options, engine_args)
    else:
        from jaxllm.bench import serve

        serve.run(options)


def _picked(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def _read_prompts(args: argparse.Namespace) -> list:
    prompts: list = list(args.prompts)
    if args.input:
        stream = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
        with stream:
            prompts += [json.loads(line) for line in stream if line.strip()]
    if not prompts:
        raise SystemExit("jaxllm generate: no prompts (give them as arguments or with --input FILE.jsonl)")
    return prompts


def run_generate(args: argparse.Namespace) -> None:
    from jaxllm.llm import LLM

    prompts = _read_prompts(args)
    llm = LLM(**{"model": DEFAULT_MODEL, **_picked(args, EngineConfig)})
    params = SamplingParams(**{**vars(llm.get_default_sampling_params()), **_picked(args, SamplingParams)})
    outputs = llm.generate(prompts, params)
    target = open(args.output, "w", encoding="utf-8") if args.output else contextlib.nullcontext(sys.stdout)
    with target as out:
        for output in outputs:
            for completion in output.outputs:
                out.write(json.dumps({"prompt": output.prompt, "index": completion.index, "text": completion.text,
                                      "token_ids": completion.token_ids,
                                      "finish_reason": completion.finish_reason}, ensure_ascii=False) + "\n")


def run_chat(args: argparse.Namespace) -> None:
    from jaxllm import distributed
    from jaxllm.llm_engine import LLMEngine
    from jaxllm.sampling_params import RequestOutputKind

    engine = LLMEngine(EngineConfig(**{"model": DEFAULT_MODEL, **_picked(args, EngineConfig)}))
    if not distributed.is_leader():  # a multi-host chat is typed on process 0; the others follow its steps
        engine.follow()
        return
    params = SamplingParams(**{**vars(engine.default_sampling_params()), "max_tokens": None,
                               **_picked(args, SamplingParams), "output_kind": RequestOutputKind.DELTA})
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("Chatting with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while line := _ask():
        messages.append({"role": "user", "content": line})
        text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        request_id = uuid.uuid4().hex
        engine.add_request(request_id, {"prompt": text, "prompt_token_ids": ids}, params)
        reply = []
        while engine.has_unfinished_requests():
            for output in engine.step():
                delta = output.outputs[0].text
                reply.append(delta)
                print(delta, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def run_serve(args: argparse.Namespace) -> None:
    engine_fields = [f.name for f in dataclasses.fields(EngineConfig)]
    serving_server.run(serving_server.settings(args, engine_fields), engine_fields)


def run_convert(args: argparse.Namespace) -> None:
    from conversion import convert, plan

    if args.dry_run:
        print(plan(args.src, args.dtype).describe())
        return
    done = convert(args.src, args.out, args.dtype, args.overwrite)
    print(f"{args.out}: {done.config.architecture}, {done.num_parameters:,} parameters, {done.config.dtype}")


def _ask() -> str:
    try:
        return input("> ").strip()
    except EOFError:
        return ""


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        commands = {"generate": run_generate, "chat": run_chat, "convert": run_convert, "serve": run_serve,
                    "bench": run_bench}
        commands[args.command](args)
    except (ValueError, OSError) as e:  # bad input: a message, never a traceback
        raise SystemExit(f"jaxllm {args.command}: {e}") from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()

"""``llm-nb``: the command line, reading like the Python API.

llm-nb host                      run the host in the foreground
llm-nb load [MODEL] [--name N]   load or attach (MODEL defaults to smollm2)
llm-nb chat [MODEL] "PROMPT"     stream a reply to the terminal (--schema FILE, --json: JSON replies)
llm-nb ps [--json]               what is loaded, by whom, at what cost; then the deployments
llm-nb unload MODEL [--force]
llm-nb logs MODEL                a model worker's log
llm-nb deploy NAME FOLDER        serve FOLDER's model.py at /models/NAME/
llm-nb undeploy NAME             run its cleanup() and end its worker
llm-nb stop                      stop the host
llm-nb selfcheck [MODEL]         does the default model decode here (in a worker and in-process)?
llm-nb hub-service               one host for every user of a JupyterHub (run by the Hub)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from .errors import InvalidRequest, LlmNbError


def _session(args, autostart: bool = True):
    from .api import Session

    return Session(args.connection_file, autostart=autostart)


def _client(args, autostart: bool = True):
    from .client import Client

    return Client(args.connection_file, autostart=autostart)


def _load_fields(args) -> dict:
    from .api import parse_options

    options = parse_options(args.option)
    for key in ("dtype", "quantize"):
        if getattr(args, key, None):
            options[key] = getattr(args, key)
    return {
        "name": args.name,
        "backend": args.backend,
        "device": args.device,
        "ctx": args.ctx,
        "options": options or None,
        "keep_alive": args.keep_alive,
        "url": args.url,
        "remote_model": args.remote_model,
        "api_key_env": args.api_key_env,
        "task": args.task,
        "chat_format": args.chat_format,
    }


def cmd_load(args) -> int:
    started = time.monotonic()

    def progress(event: dict) -> None:
        if time.monotonic() - started > 1.0 and sys.stderr.isatty():
            message = event.get("message") or "loading"
            print(f"\r{message} ({event.get('elapsed', 0):.0f} s)", end="", file=sys.stderr, flush=True)

    result = _session(args).load(args.model, on_progress=progress, **_load_fields(args))
    if sys.stderr.isatty():
        print("\r", end="", file=sys.stderr)
    print(result)
    return 0


def _chat_schema(args) -> dict | str | None:
    """``--schema FILE``: the JSON schema in FILE; ``--json``: any JSON object."""
    if args.schema is None:
        return "json" if args.json else None
    try:
        with open(args.schema, encoding="utf-8") as f:
            schema = json.load(f)
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"--schema takes a file holding a JSON schema: {args.schema}: {exc}") from None
    if not isinstance(schema, dict):
        raise InvalidRequest(f"--schema {args.schema}: a JSON schema is a JSON object, not {type(schema).__name__}")
    return schema


def cmd_chat(args) -> int:
    schema = _chat_schema(args)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    # The Python API's chat: a model that is not loaded is loaded first (with this process's lease).
    reply = _session(args).stream(
        prompt,
        args.model,
        system=args.system,
        keep=False,
        load_fields={"keep_alive": args.keep_alive},
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
        schema=schema,
    )
    try:
        for piece in reply:
            if schema is None:  # JSON is printed whole once it validates
                sys.stdout.write(piece)
                sys.stdout.flush()
    except KeyboardInterrupt:
        reply.close()
        print("\n[interrupted]", file=sys.stderr)
        return 130
    if schema is None:
        print()
    else:
        print(json.dumps(reply.parse(), indent=2, ensure_ascii=False, default=str))
    if args.verbose:
        print(f"[{reply.footer()}]", file=sys.stderr)
    return 0


def cmd_ps(args) -> int:
    status = _session(args, autostart=False).status()
    print(json.dumps(status, indent=2) if args.json else status)
    return 0


def cmd_unload(args) -> int:
    print(_session(args, autostart=False).unload(args.model, all=args.all, force=args.force))
    return 0


def cmd_logs(args) -> int:
    print(_client(args, autostart=False).logs(args.model, args.lines), end="")
    return 0


def cmd_stop(args) -> int:
    from .client import Client
    from .connection import connection_path, live_host
    from .locator import hub_locator

    if args.connection_file is None and hub_locator() is not None:  # the Hub's shared host: admins only
        result = Client(autostart=False).shutdown()
        print(f"the JupyterHub's shared host {result['pid']} is stopping (its service starts a new one)")
        return 0
    if live_host(connection_path(args.connection_file)) is None:
        print("no host is running")
        return 0
    result = Client(args.connection_file, autostart=False).shutdown()
    print(f"host {result['pid']} is stopping")
    return 0


def cmd_deploy(args) -> int:
    from .deployment import deploy

    print(
        deploy(
            args.name,
            args.folder,
            engine=args.engine,
            replicas=args.replicas,
            wait_for_resources=args.wait_for_resources,
            connection=args.connection_file,
            progress=sys.stderr.isatty(),
        )
    )
    return 0


def cmd_undeploy(args) -> int:
    print(_session(args, autostart=False).undeploy(args.name))
    return 0


def cmd_selfcheck(args) -> int:
    from .api import parse_options
    from .host.selfcheck import run

    return run(args.model or "smollm2", tokens=args.tokens, options=parse_options(args.option) or None)


def cmd_host(args) -> int:
    from .host.app import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="llm-nb", description="One shared model host for all your notebooks.")
    parser.add_argument("--version", action="version", version=f"llm-nb {__version__}")
    parser.add_argument(
        "--connection-file", help="the host's connection file (default: $LLM_NB_CONNECTION or the per-user one)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from .host.app import add_host_arguments

    p = sub.add_parser("host", help="run the host in the foreground")
    add_host_arguments(p)
    p.set_defaults(func=cmd_host)

    p = sub.add_parser("load", help="load a model, or attach to it if it is loaded")
    p.add_argument("model", nargs="?", help="catalog alias or path (default: smollm2)")
    p.add_argument("--name", help="serve it under this name (load one file twice, e.g. with two backends)")
    p.add_argument("--backend", help="llamacpp, transformers, vllm (its own venv: make install-vllm) or remote")
    p.add_argument(
        "--keep-alive", help="seconds it stays loaded once nobody holds it (default 300; 0 frees at once; -1 never)"
    )
    p.add_argument("--ctx", type=int, help="context length")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1 (transformers)")
    p.add_argument("--dtype", help="auto, float16, bfloat16, float32 (transformers)")
    p.add_argument("--quantize", choices=["4bit", "8bit"], help="bitsandbytes quantisation on CUDA (transformers)")
    p.add_argument("--task", help="text-classification, token-classification, fill-mask (transformers)")
    p.add_argument("--chat-format", help="chat format when the model has no template (e.g. chatml)")
    p.add_argument("--url", help="base URL of a remote OpenAI-compatible engine (remote)")
    p.add_argument("--remote-model", help="the model id at the remote engine (remote)")
    p.add_argument("--api-key-env", help="environment variable that holds the remote's API key (remote)")
    p.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="backend option, e.g. n_threads=4 (repeatable)"
    )
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("chat", help="chat with a model, streaming the reply")
    p.add_argument(
        "args", nargs="+", metavar="[MODEL] PROMPT", help="model (default smollm2) and prompt ('-' reads stdin)"
    )
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--keep-alive", help="keep-alive if this chat loads the model")
    p.add_argument("--schema", metavar="FILE", help="reply with JSON valid against the JSON schema in FILE")
    p.add_argument("--json", action="store_true", help="reply with a JSON object (JSON mode)")
    p.add_argument("-v", "--verbose", action="store_true", help="print tokens, time to first token and tokens/s")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("ps", help="show loaded models (who holds them, what they cost), then deployments")
    p.add_argument("--json", action="store_true", help="the host's status as JSON, deployments included")
    p.set_defaults(func=cmd_ps)

    p = sub.add_parser("unload", help="release your lease on a model (--force: free it for everyone)")
    p.add_argument("model", nargs="?")
    p.add_argument("--all", action="store_true", help="every model this client holds (with --force: every model)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_unload)

    p = sub.add_parser("logs", help="show a model worker's log")
    p.add_argument("model")
    p.add_argument("-n", "--lines", type=int, default=200)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("deploy", help="deploy a folder with model.py (and model.json) at /models/NAME/")
    p.add_argument("name")
    p.add_argument("folder")
    p.add_argument("--engine", choices=("local", "ray"), default="local", help="a host worker, or Ray Serve")
    p.add_argument("--replicas", type=int, help="engine ray: how many replicas (default 1)")
    p.add_argument(
        "--wait-for-resources",
        type=float,
        metavar="SECONDS",
        help="engine ray: how long to wait for replicas the cluster cannot place now "
        "(default 120 without an autoscaler; 0 refuses at once)",
    )
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("undeploy", help="undeploy NAME: its cleanup() runs, its worker ends")
    p.add_argument("name")
    p.set_defaults(func=cmd_undeploy)

    sub.add_parser(
        "hub-service", help="run one host for every user of a JupyterHub (the Hub starts it; see the README)"
    )

    p = sub.add_parser("stop", help="stop the host (its models are unloaded)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("selfcheck", help="check that a llama.cpp model (default smollm2) decodes on this machine")
    p.add_argument("model", nargs="?", help="catalog alias or GGUF path (default: smollm2)")
    p.add_argument("--tokens", type=int, default=8, help="how many tokens to decode (default 8)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE", help="load option, e.g. extra_buffers=false")
    p.set_defaults(func=cmd_selfcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["hub-service"]:  # its own options; run by JupyterHub
        from .hub_service import main as hub_service_main

        return hub_service_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "chat":
        words = args.args
        args.model, args.prompt = (words[0], words[1]) if len(words) >= 2 else (None, words[0])
        if len(words) > 2:
            parser.error("chat takes [MODEL] PROMPT; quote the prompt")
        if args.prompt == "-":
            args.prompt = None
        if args.json and args.schema:
            parser.error("pass --json or --schema FILE, not both")
    if args.command == "unload" and not args.model and not args.all:
        parser.error("name a model to unload, or pass --all")
    try:
        return args.func(args)
    except LlmNbError as exc:
        print(f"llm-nb: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

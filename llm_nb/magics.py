"""IPython magics: ``%llm_load``, ``%%llm_chat``, ``%llm_unload``, ``%llm_status``, ``%llm_history``, ``%llm_panel``,
``%llm_deploy NAME FOLDER`` and ``%llm_undeploy NAME``.

``%load_ext llm_nb`` registers them. Each takes ``--help``. Defaults can be
set in IPython config (``c.LlmMagics.model = "smollm2"``, ``max_tokens``,
``temperature``, ``format``) or with ``%config LlmMagics.max_tokens = 256``.

Interpolation in ``%%llm_chat`` cells: ``{name}`` is replaced by the value of
the kernel variable ``name``; so are ``{obj.attr}``, ``{items[0]}`` and
``{table["key"]}``. Only a brace pair around such a path, which resolves in the
kernel's namespace, is replaced. Everything else is left exactly as typed:
dict literals, JSON, f-strings with expressions, sets, and ``{undefined}``.
Write ``{{name}}`` to send ``{name}`` itself; ``--raw`` turns interpolation off.

``%%llm_chat --json`` asks for a JSON object, ``--schema NAME`` for JSON that
validates against the kernel variable ``NAME`` (a pydantic model, dataclass,
TypedDict or JSON-schema dict); the reply is shown as JSON and ``-o VAR`` keeps
the parsed value (a model instance for a pydantic model).

Errors the user can act on (``LlmNbError``) print one line to stderr and no
traceback. Interrupting the kernel during a reply stops the generation on the
host (the stream is closed; the host cancels at its next token), keeps the
partial reply in the conversation and the display, and ends the cell as
interrupted, so that "Run all" stops there too.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display
from traitlets import Enum, Float, Instance, Integer, Unicode

from .api import LoadResult, Session, default_session
from .display import ChatInterrupted, Interrupted, LiveReply, LoadProgress, one_line
from .errors import LlmNbError

# --- interpolation ---------------------------------------------------------------

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_INDEX = r"""\[\s*(?:-?\d+|'[^'\\\n]*'|"[^"\\\n]*")\s*\]"""
_PATH = rf"{_IDENT}(?:\.{_IDENT}|{_INDEX})*"
_PLACEHOLDER = re.compile(rf"\{{\{{(?P<escaped>{_PATH})\}}\}}|\{{(?P<path>{_PATH})\}}")
_STEP = re.compile(rf"\.(?P<attr>{_IDENT})|\[\s*(?P<index>-?\d+|'[^'\\\n]*'|\"[^\"\\\n]*\")\s*\]")
_MISSING = object()


def resolve_path(path: str, namespace: Mapping[str, Any]) -> Any:
    """The value of ``a``, ``a.b`` or ``a[0]["k"]`` in ``namespace``, or ``_MISSING``; never evaluates code."""
    name = re.match(_IDENT, path).group(0)
    if name not in namespace:
        return _MISSING
    value = namespace[name]
    for step in _STEP.finditer(path, len(name)):
        try:
            if step.group("attr") is not None:
                value = getattr(value, step.group("attr"))
            else:
                index = step.group("index")
                value = value[int(index) if index[0] not in "'\"" else index[1:-1]]
        except Exception:  # a missing key or attribute leaves the text as typed
            return _MISSING
    return value


def interpolate(text: str, namespace: Mapping[str, Any]) -> str:
    """Replace ``{path}`` with the variable's value where it resolves; ``{{path}}`` gives ``{path}``."""

    def replace(match: re.Match) -> str:
        if match.group("escaped") is not None:
            return "{" + match.group("escaped") + "}"
        value = resolve_path(match.group("path"), namespace)
        return match.group(0) if value is _MISSING else str(value)

    return _PLACEHOLDER.sub(replace, text)


def _user_errors(func: Callable) -> Callable:
    """User errors print one line to stderr (what, why, what to do), with no traceback."""

    @functools.wraps(func)
    def wrapper(self, *args, **kwargs):
        try:
            return func(self, *args, **kwargs)
        except LlmNbError as exc:
            message = one_line(exc)
            if exc.code == "context_length_exceeded":
                message += " | start a new conversation with --new, or forget this one with %llm_history --clear"
            print(f"llm-nb: {message}", file=sys.stderr)
            return None

    return wrapper


def _var_name(name: str | None) -> str | None:
    if name is not None and not name.isidentifier():
        raise UsageError(f"-o takes a variable name, not {name!r}")
    return name


@magics_class
class LlmMagics(Magics):
    """The llm-nb magics. Settings here are defaults for every magic; each option overrides them."""

    model = Unicode(
        "", help="model used when a magic names none (empty: the one loaded or used last, else smollm2)"
    ).tag(config=True)
    max_tokens = Integer(512, allow_none=True, help="most tokens a %%llm_chat reply may have").tag(config=True)
    temperature = Float(None, allow_none=True, help="sampling temperature (None: the model's default)").tag(config=True)
    format = Enum(["markdown", "text", "code"], "markdown", help="how %%llm_chat shows replies").tag(config=True)
    refresh_interval = Float(0.15, help="seconds between updates of a streaming reply's display").tag(config=True)
    progress_after = Float(1.0, help="show a load's progress once it has taken this many seconds").tag(config=True)
    live = Enum(
        ["auto", "display", "terminal"],
        "auto",
        help="display: one updating rich display (kernels); terminal: text as it comes; auto: display in a kernel",
    ).tag(config=True)
    session = Instance(Session, help="the conversations and the host client these magics use")

    def __init__(self, shell=None, session: Session | None = None, **kwargs):
        super().__init__(shell=shell, **kwargs)
        self.session = session if session is not None else default_session()

    # --- helpers -----------------------------------------------------------------
    @property
    def rich(self) -> bool:
        if self.live != "auto":
            return self.live == "display"
        return getattr(self.shell, "kernel", None) is not None  # a Jupyter kernel renders display updates

    def _model(self, named: str | None) -> str:
        return self.session.current_model(named or self.model or None)

    @staticmethod
    def _help(func: Callable, args) -> bool:
        if getattr(args, "help", False):
            print(func.parser.format_help().removeprefix("::").strip() + "\n")
            return True
        return False

    # --- %llm_load ---------------------------------------------------------------
    @line_magic
    @magic_arguments()
    @argument("model", nargs="?", help="catalog alias or path of a GGUF file or model folder (default: smollm2)")
    @argument("--name", help="serve it under this name")
    @argument("--backend", help="llamacpp, transformers, vllm or remote")
    @argument("--device", help="auto, cpu, cuda, cuda:1 (transformers)")
    @argument("--ctx", type=int, help="context length in tokens")
    @argument("--keep-alive", help="how long it stays loaded once nobody holds it: 300, 5m, 0 (at once), -1 (never)")
    @argument("--option", action="append", metavar="KEY=VALUE", help="backend option, e.g. n_threads=4 (repeatable)")
    @argument("--task", help="text-classification, token-classification, fill-mask (transformers, served on /v2)")
    @argument("--url", help="base URL of a remote OpenAI-compatible engine, e.g. http://vllm:8000/v1 (remote)")
    @argument("--remote-model", help="the model id at the remote engine (remote; default: its only model)")
    @argument("--api-key-env", help="env variable that holds the remote's API key (kept in memory only)")
    @argument("-h", "--help", action="store_true", help="show this help")
    @_user_errors
    def llm_load(self, line: str) -> None:
        """Load a model on the shared host, or attach to it when another notebook loaded it already."""
        from .api import parse_options

        args = parse_argstring(self.llm_load, line)
        if self._help(self.llm_load, args):
            return
        model = self._model(args.model)
        progress = LoadProgress(self.rich, model, self.progress_after)
        try:
            result: LoadResult = self.session.load(
                model,
                name=args.name,
                backend=args.backend,
                device=args.device,
                ctx=args.ctx,
                keep_alive=args.keep_alive,
                options=parse_options(args.option),
                on_progress=progress,
                task=args.task,
                url=args.url,
                remote_model=args.remote_model,
                api_key_env=args.api_key_env,
            )
        except KeyboardInterrupt:
            progress.done(None)
            # The load belongs to the host: others may be waiting on it, so it goes on.
            raise Interrupted(
                f"stopped waiting; the host goes on loading {model} (%llm_status shows it, %llm_load attaches)"
            ) from None
        progress.done(result.summary)

    # --- %%llm_chat --------------------------------------------------------------
    @cell_magic
    @magic_arguments()
    @argument("model", nargs="?", help="the model (default: the one loaded or used last, else smollm2)")
    @argument("--system", help="system message for this conversation")
    @argument("--new", action="store_true", help="start a new conversation with this model")
    @argument("--max-tokens", type=int, help="most tokens in the reply")
    @argument("--temperature", type=float, help="sampling temperature")
    @argument("--seed", type=int, help="sampling seed, for repeatable replies")
    @argument("--format", choices=["markdown", "text", "code"], help="how to show the reply (default: markdown)")
    @argument("--json", action="store_true", help="reply with a JSON object (JSON mode)")
    @argument(
        "--schema",
        metavar="NAME",
        help="reply with JSON valid against NAME, a variable holding a pydantic model, dataclass, TypedDict or dict",
    )
    @argument("-o", "--output", metavar="VAR", help="store the reply's text (--json/--schema: the parsed value) in VAR")
    @argument("--raw", action="store_true", help="send the cell as typed, without {name} interpolation")
    @argument("-h", "--help", action="store_true", help="show this help")
    @_user_errors
    def llm_chat(self, line: str, cell: str) -> None:
        """Chat with a model: the cell is your message; {name} inserts a kernel variable ({{name}} keeps it as typed).

        The reply streams into one display with a footer (tokens, time to first token, tokens/s).
        The conversation with each model goes on until --new. Interrupt the kernel to stop the reply.
        """
        args = parse_argstring(self.llm_chat, line)
        if self._help(self.llm_chat, args):
            return
        output = _var_name(args.output)
        schema = self._schema(args)
        cell = cell.strip()
        prompt = cell if args.raw else interpolate(cell, self.shell.user_ns)
        model = self._model(args.model)
        progress = LoadProgress(self.rich, model, self.progress_after)
        reply = self.session.stream(
            prompt,
            model,
            system=args.system,
            new=args.new,
            on_progress=progress,
            max_tokens=args.max_tokens if args.max_tokens is not None else self.max_tokens,
            temperature=args.temperature if args.temperature is not None else self.temperature,
            seed=args.seed,
            schema=schema,
        )
        if progress.shown:
            progress.done(f"loaded {model} for this chat")
        # With --json/--schema the variable gets the parsed value only, never text that is not it.
        text_var = output if schema is None else None
        live = LiveReply(
            self.rich, "json" if schema is not None else args.format or self.format, self.refresh_interval, model
        )
        live.start()
        try:
            for piece in reply:
                live.feed(piece)
        except KeyboardInterrupt:
            reply.close()  # closes the HTTP stream: the host cancels the generation at its next token
            live.finish(reply)
            if text_var:
                self.shell.user_ns[text_var] = reply.text
            raise ChatInterrupted(
                "the reply was stopped on the host; the partial reply is kept in the conversation"
            ) from None
        except LlmNbError:
            live.finish(reply, "failed")
            if text_var:
                self.shell.user_ns[text_var] = reply.text
            raise
        if schema is None:
            live.finish(reply)
            if text_var:
                self.shell.user_ns[text_var] = reply.text
            return
        live.finish(reply, text=_pretty_json(reply.text))
        value = reply.parse()  # a reply that does not validate raises; its raw text is shown above
        if output:
            self.shell.user_ns[output] = value

    def _schema(self, args) -> Any:
        """``--json`` -> "json"; ``--schema NAME`` -> the kernel variable NAME; else None."""
        if args.json and args.schema:
            raise UsageError("pass --json or --schema NAME, not both")
        if args.json:
            return "json"
        if not args.schema:
            return None
        value = resolve_path(args.schema, self.shell.user_ns)
        if value is _MISSING:
            raise UsageError(
                f"--schema takes a kernel variable holding a pydantic model, dataclass, TypedDict or JSON-schema dict; "
                f"{args.schema!r} is not defined"
            )
        return value

    # --- %llm_unload -------------------------------------------------------------
    @line_magic
    @magic_arguments()
    @argument("model", nargs="?", help="the model to let go of (default: the one loaded or used last)")
    @argument("--all", action="store_true", help="every model this notebook holds")
    @argument("--force", action="store_true", help="free the model now, even if other notebooks hold it")
    @argument("-h", "--help", action="store_true", help="show this help")
    @_user_errors
    def llm_unload(self, line: str) -> None:
        """Give up this notebook's lease; a model nobody holds stays warm for its keep-alive, then goes."""
        args = parse_argstring(self.llm_unload, line)
        if self._help(self.llm_unload, args):
            return
        if args.all and args.model:
            raise UsageError("name a model or pass --all, not both")
        print(self.session.unload(None if args.all else self._model(args.model), all=args.all, force=args.force))

    # --- %llm_status -------------------------------------------------------------
    @line_magic
    @magic_arguments()
    @argument("-h", "--help", action="store_true", help="show this help")
    @_user_errors
    def llm_status(self, line: str) -> None:
        """What the host holds: models (state, memory, which notebooks hold each), deployments, the budget."""
        args = parse_argstring(self.llm_status, line)
        if self._help(self.llm_status, args):
            return
        status = self.session.status()
        display({"text/plain": status.to_text(), "text/markdown": status.to_markdown()}, raw=True)

    # --- %llm_history ------------------------------------------------------------
    @line_magic
    @magic_arguments()
    @argument("model", nargs="?", help="whose conversation (default: the model in use)")
    @argument("--clear", action="store_true", help="forget the conversation (every model's when none is named)")
    @argument("-h", "--help", action="store_true", help="show this help")
    @_user_errors
    def llm_history(self, line: str) -> None:
        """Show the conversation with a model, or forget it with --clear."""
        args = parse_argstring(self.llm_history, line)
        if self._help(self.llm_history, args):
            return
        if args.clear:
            self.session.history(args.model, clear=True)
            print(f"forgot the conversation with {args.model}" if args.model else "forgot every conversation")
            return
        model = self._model(args.model)
        messages = self.session.history(model)
        if not messages:
            print(f"no conversation with {model} yet")
            return
        plain = "\n\n".join(f"[{m['role']}]\n{_said(m)}" for m in messages)
        markdown = "\n\n".join(f"**{m['role']}**\n\n{_said(m)}" for m in messages)
        display({"text/plain": plain, "text/markdown": markdown}, raw=True)

    # --- %llm_deploy / %llm_undeploy ---------------------------------------------
    @line_magic
    @magic_arguments()
    @argument("name", help="serve it at /models/NAME/ on the host")
    @argument("folder", nargs="?", default=".", help="the folder with model.py (and model.json); default: here")
    @argument("--engine", choices=("local", "ray"), default="local", help="a worker of the host's, or Ray Serve")
    @argument("--replicas", type=int, help="engine ray: how many replicas (default 1)")
    @argument(
        "--wait-for-resources",
        type=float,
        metavar="SECONDS",
        help="engine ray: how long to wait for replicas the cluster cannot place now (default 120; 0 refuses at once)",
    )
    @argument("-h", "--help", action="store_true", help="show this help")
    @_user_errors
    def llm_deploy(self, line: str) -> None:
        """Deploy a folder with model.py (Practicus-style init/predict/cleanup): in a worker of the host's, or on Ray."""
        from .deployment import deploy

        args = parse_argstring(self.llm_deploy, line)
        if self._help(self.llm_deploy, args):
            return
        deployed = deploy(
            args.name,
            args.folder,
            engine=args.engine,
            replicas=args.replicas,
            wait_for_resources=args.wait_for_resources,
            connection=self.session.connection,
        )
        display({"text/plain": str(deployed), "text/markdown": deployed._repr_markdown_()}, raw=True)

    @line_magic
    @magic_arguments()
    @argument("name", help="the deployment to end (its cleanup() runs)")
    @argument("-h", "--help", action="store_true", help="show this help")
    @_user_errors
    def llm_undeploy(self, line: str) -> None:
        """Undeploy: model.py's cleanup() runs, its worker ends, the models it leased are released."""
        args = parse_argstring(self.llm_undeploy, line)
        if self._help(self.llm_undeploy, args):
            return
        print(self.session.undeploy(args.name))

    # --- %llm_panel --------------------------------------------------------------
    @line_magic
    @magic_arguments()
    @argument("--interval", type=float, default=2.0, help="seconds between status refreshes")
    @argument("-h", "--help", action="store_true", help="show this help")
    @_user_errors
    def llm_panel(self, line: str) -> None:
        """An ipywidgets panel: live status, memory bar, load/unload controls and a small chat box."""
        args = parse_argstring(self.llm_panel, line)
        if self._help(self.llm_panel, args):
            return
        try:
            from .widgets import Panel
        except ImportError as exc:
            raise LlmNbError(
                f"the panel needs ipywidgets ({exc}); install it with `pip install 'llm-nb[widgets]'`",
                code="backend_unavailable",
            ) from None
        display(Panel(self.session, interval=args.interval))


def _pretty_json(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text  # shown as it came; parse() says what is wrong with it


def _said(message: dict) -> str:
    """A message's text, with the tool calls an assistant message asked for."""
    calls = [
        f"→ {c['function']['name']}({c['function'].get('arguments') or ''})" for c in message.get("tool_calls") or []
    ]
    return "\n".join([message.get("content") or "", *calls]).strip()


def load_ipython_extension(ipython) -> None:
    """``%load_ext llm_nb``: register the magics (no model library is imported)."""
    ipython.register_magics(LlmMagics(ipython))

"""Chat templates, compiled and rendered with bounds: a chat template is code from the model's
tokenizer_config.json, and a runaway loop or a huge output must end in an error (TemplateLimitError past
RENDER_SECONDS or MAX_RENDER_CHARS), not a hang or an OOM kill. EncodeError: a conversation that cannot
be rendered or encoded."""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
from contextlib import contextmanager

from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

RENDER_SECONDS = 10.0  # one conversation; real templates take well under a millisecond
MAX_RENDER_CHARS = 32 * 2**20  # one conversation's rendering (a line is at most 10 MB)


class EncodeError(ValueError):
    pass


class TemplateLimitError(EncodeError):
    """The chat template itself ran away (time or size): the template's fault, not one line's."""


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, plus size checks where a template can build huge values in one step."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            _check_repeat(left, right)
        elif operator == "+":
            _check_sized(left, right)
        elif isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1 \
                and right * abs(left).bit_length() > 1_000_000:
            raise TemplateLimitError("the chat template computes a power with over a million bits")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's naming: no clash with kwargs)
        if isinstance(getattr(__obj, "__self__", None), (str, list, tuple)):  # 'x'.ljust(n), 'x'.zfill(n)
            _check_size_args(args, kwargs)
        _check_sized(*args, *kwargs.values())  # a macro that recurses on s ~ s doubles its argument
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, str) and len(result) > MAX_RENDER_CHARS:
            raise TemplateLimitError(_too_big())
        return result


def _too_big() -> str:
    return f"the chat template produces more than {MAX_RENDER_CHARS // 2**20} M characters for one conversation"


def _check_repeat(left, right) -> None:
    for seq, n in ((left, right), (right, left)):
        if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_RENDER_CHARS:
            raise TemplateLimitError(_too_big())


def _check_sized(*values) -> None:
    """Strings or lists that together pass the bound (s + s, a doubled macro argument)."""
    if sum(len(v) for v in values if isinstance(v, (str, list, tuple))) > MAX_RENDER_CHARS:
        raise TemplateLimitError(_too_big())


class _BoundedNamespace(Namespace):
    """namespace() whose attributes cannot grow past the bound: `{% set ns.s = ns.s ~ ns.s %}` in a loop is
    the one way a template keeps doubling a value across iterations without calling anything."""

    def __setitem__(self, name, value) -> None:
        _check_sized(value)
        super().__setitem__(name, value)


def _check_size_args(args, kwargs) -> None:
    """A number that large as a width or count ('x'|center(10**10)) would allocate that much at once."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_RENDER_CHARS:
            raise TemplateLimitError(f"the chat template asks for a size of {value:.3g}")


def _bounded_filter(fn):
    """The filter, refusing huge size parameters (not a huge value filtered: `amount|tojson` is fine)."""
    value_at = 1 if hasattr(fn, "jinja_pass_arg") else 0  # after the context or environment, if passed

    @functools.wraps(fn)  # keeps jinja's pass_context/pass_environment marks
    def bounded(*args, **kwargs):
        _check_size_args(args[value_at + 1:], kwargs)
        return fn(*args, **kwargs)
    return bounded


@functools.lru_cache(maxsize=8)
def compile_template(source: str):
    """The template compiled with transformers' filters, globals and extensions (so it renders exactly as
    apply_chat_template does, without its per-call deep copies: 10x faster on 100k conversations), in a
    sandbox that bounds sizes. Compiled once per template."""
    from transformers.utils.chat_template_utils import _compile_jinja_template
    base = _compile_jinja_template("").environment  # its setup only: its sandbox would fold 'x' * 10**10
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[type(e) for e in base.extensions.values()])
    env.filters.update({name: _bounded_filter(fn) for name, fn in base.filters.items()})
    env.globals.update({k: v for k, v in base.globals.items() if k != "range"})  # keep the sandbox's range
    env.globals["namespace"] = _BoundedNamespace
    return env.from_string(source)


class _RenderTimeout(BaseException):
    """Raised (with no arguments) in a rendering thread by the watchdog. A BaseException, so that no
    `except Exception` in a filter or in Jinja can swallow it and let the render run on."""


class _Watchdog:
    """One daemon thread that interrupts a render past its deadline: CPython's PyThreadState_SetAsyncExc
    raises _RenderTimeout in the rendering thread at its next bytecode, so even an empty runaway loop ends.
    A render costs a dict update here, where a trace function on template frames tripled its time."""

    POLL = 0.25  # seconds between checks while renders happen

    def __init__(self):
        self._reset()
        if hasattr(os, "register_at_fork"):  # a forked child has no watchdog thread, maybe a held lock
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._due: dict[int, float] = {}  # thread id -> deadline of its render
        self._fired: set[int] = set()
        self._busy = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, seconds: float):
        tid = threading.get_ident()
        with self._lock:
            self._cancel(tid)
            self._due[tid] = time.monotonic() + seconds
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="template-watchdog", daemon=True)
                self._thread.start()
        if not self._busy.is_set():
            self._busy.set()
        try:
            yield
        finally:
            with self._lock:
                self._due.pop(tid, None)
                self._cancel(tid)

    def _cancel(self, tid: int) -> None:
        if tid in self._fired:  # fired as the render finished: drop the exception if still pending
            self._fired.discard(tid)
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)

    def _run(self) -> None:
        while self._busy.wait():
            time.sleep(self.POLL)
            with self._lock:
                now = time.monotonic()
                for tid in [t for t, due in self._due.items() if due < now]:
                    del self._due[tid]
                    self._fired.add(tid)
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(_RenderTimeout))
                if not self._due:
                    self._busy.clear()  # sleep until the next render


_WATCHDOG = _Watchdog()


def render_bounded(template, name: str, **variables) -> str:
    """template.render(**variables), ended with TemplateLimitError past RENDER_SECONDS or MAX_RENDER_CHARS."""
    chunks, size = [], 0
    try:
        with _WATCHDOG.watch(RENDER_SECONDS):
            for chunk in template.generate(**variables):
                size += len(chunk)
                if size > MAX_RENDER_CHARS:
                    raise TemplateLimitError(_too_big())
                chunks.append(chunk)
    except _RenderTimeout:
        raise TemplateLimitError(f"the chat template of {name} did not finish rendering one conversation in "
                                 f"{RENDER_SECONDS:g} s (a runaway loop?): fix chat_template in its "
                                 "tokenizer_config.json or use another model") from None
    except TemplateLimitError as exc:
        what = str(exc).replace("the chat template", f"the chat template of {name}", 1)
        raise TemplateLimitError(f"{what}: fix chat_template in its tokenizer_config.json or use another "
                                 "model") from None
    return "".join(chunks)

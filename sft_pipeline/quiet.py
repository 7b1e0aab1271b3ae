"""What the terminal shows during a run: the promised lines, not every library's chatter.

``quiet(verbose)`` and ``quiet_prefect(verbose)`` are called by the CLI (not by the stages: a deployment's worker
keeps its own settings). Quiet, a run's terminal holds, besides the summary table on stdout, only these lines of
Prefect's log format on stderr:

- per stage, a start line (``train: computing <key>``, ``data: reusing the finished artifact <path>``, or
  ``waiting for ...`` while another run computes it) and an end line (``Finished in state Completed()`` /
  ``Cached()`` / ``Failed(...)``);
- what the stage itself logs at INFO (training: its settings, the estimate, one progress line per logging step);
- a retry of a transient failure as it happens (``authenticate: ... is unreachable. Retry 1/2 in 10 s``);
- warnings and errors (a bug keeps its traceback); with a Prefect server that has a UI, the run's ``View at`` URL.

What it hides: progress bars of datasets / transformers / huggingface_hub, library FutureWarnings and
DeprecationWarnings, flash-attention 4's compiler notes (``CUTLASS_NOTE``), Liger's note that a CuTe DSL kernel
cannot be imported (``liger_cutedsl_note``; in this process and in torchrun's ranks), library loggers below ERROR
(bitsandbytes' "Failed to load CPU gemm_4bit_forward ... No module named 'kernels'", transformers' advice, the
kernel hub's "Skipping publisher trust check ... offline mode"),
Prefect's own INFO lines (temporary server start/stop, flow run begin/end), and the flow's copy of the failure that
the CLI prints as its ``error:`` line. ``--verbose`` shows everything. The Prefect UI always gets every log line:
only the terminal handler is filtered.

Settings that must reach child processes (progress bars, library verbosity, warnings) are environment variables,
set only where the user has not set them.
"""
from __future__ import annotations

import logging
import os
import re
import warnings

# flash-attention 4's CUTLASS DSL, at each kernel's first call: "Argument aux_data (position 17) cannot be converted
# to a JitArgument for function '...'. Its type ... is not supported. If the value is known at compile time, annotate
# it ..." (flash-attn-4 4.0.0b36; advice to flash-attention's authors, nothing a user can act on)
CUTLASS_NOTE = "Argument aux_data"
# read by the libraries when they are imported (and by child processes, e.g. one per GPU)
QUIET_ENV = {
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # "Creating parquet ...", "tokenize ...", "Generating train split"
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers follows it: "Loading weights", "Writing model shards"
    "TRANSFORMERS_VERBOSITY": "error",
    # huggingface_hub's own retries of one request ("Retrying in 1s [Retry 1/5]"), printed twice (its handler and
    # the root's); the stage's retries are said by say_retry
    "HF_HUB_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "PYTHONWARNINGS": f"ignore::FutureWarning,ignore::DeprecationWarning,ignore:{CUTLASS_NOTE}:UserWarning",
}
# kernels (Hugging Face's kernel hub, a need of transformers >= 5.25) warns offline, where this project's tests and
# stand-ins run: "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face
# Hub is in offline mode." (kernels 0.19.1; nothing a user can act on)
QUIET_LOGGERS = ("bitsandbytes", "transformers", "datasets", "huggingface_hub", "accelerate", "peft", "trl", "kernels")
# Liger 0.8.5 (liger_kernel/backends/registry.py) looks for the CuTe DSL version of a kernel when the op is first used
# and, on a machine without NVIDIA's CUTLASS DSL, warns "Backend impl 'liger_kernel.ops.backends._cutedsl.rope' for op
# 'rope' could not be imported: ModuleNotFoundError: ...". Nothing is missing: the train stage keeps Liger on its
# Triton kernels (training.cuda.pin_liger_triton). Other backends' failures, and other errors, stay visible.
LIGER_REGISTRY = "liger_kernel.backends.registry"
_LIGER_CUTEDSL = re.compile(r"Backend impl 'liger_kernel\.ops\.backends\._cutedsl\.[\w.]+' for op '[\w.]+' could "
                            r"not be imported: (ModuleNotFoundError|ImportError): ")
_RETRY_PREFIX = "Task run failed with"  # Prefect's own retry / retries-exhausted lines (ours say it shorter)


def quiet(verbose: bool = False) -> None:
    """Quiet the libraries (see the module docstring); ``verbose=True`` leaves everything as it is.

    Call it before the libraries are imported: their progress-bar switches are read at import. Imports nothing.
    """
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=CUTLASS_NOTE, category=UserWarning)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_prefect(verbose: bool = False, cli_prints_errors: bool = True) -> None:
    """Filter Prefect's console handler (imports Prefect, which sets up its logging).

    ``cli_prints_errors``: the caller prints a failed run's one ``error:`` line, so the flow's own copy of it is left
    out of the terminal (``serve`` prints no such line: pass False).
    """
    if verbose:
        return
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()  # the console handler exists from here on (a later setup is incremental: it stays)

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, QuietConsole) for f in handler.filters):
            handler.addFilter(QuietConsole(cli_prints_errors))


def _transient(record: logging.LogRecord) -> bool:
    from sft_pipeline.errors import is_transient

    if getattr(record, "sft_transient", False):  # its traceback was already taken off (NoTracebackWhenTransient)
        return True
    exc = record.exc_info[1] if record.exc_info else None
    return exc is not None and is_transient(exc)


def liger_cutedsl_note(record: logging.LogRecord) -> bool:
    """Liger's CuTe DSL import note (``LIGER_REGISTRY``): logged in this process, or a rank's line as the launcher
    passes it on to the stage's logger (``[rank 1] WARNING liger_kernel.backends.registry: Backend impl ...``)."""
    if record.name == LIGER_REGISTRY:
        return bool(_LIGER_CUTEDSL.match(record.getMessage()))
    if record.name == "prefect.task_runs" and record.levelno == logging.WARNING:
        rank = re.match(rf"\[rank \d+\] WARNING {re.escape(LIGER_REGISTRY)}: (.*)", record.getMessage())
        return bool(rank and _LIGER_CUTEDSL.match(rank.group(1)))
    return False


class QuietConsole(logging.Filter):
    """The terminal's filter (Prefect's console handler only; the UI's handler sees everything)."""

    def __init__(self, cli_prints_errors: bool = True):
        super().__init__()
        self.cli_prints_errors = cli_prints_errors

    def filter(self, record: logging.LogRecord) -> bool:
        if liger_cutedsl_note(record):  # nothing a user can act on (see LIGER_REGISTRY)
            return False
        if record.name == "prefect.task_runs":  # a stage: its own lines, its end state, retries
            if str(record.msg).startswith(_RETRY_PREFIX):
                # the retry line (INFO) repeats ours; "Retries are exhausted" (ERROR) repeats the end line, unless
                # the exception is a bug: that one keeps its line and traceback
                return record.levelno >= logging.ERROR and not _transient(record)
            return True
        if record.name == "prefect.flow_runs":
            if record.getMessage().startswith("View at "):  # the run's page, with a server that has a UI
                return True
            if record.levelno >= logging.ERROR and not record.exc_info and self.cli_prints_errors:
                return False  # our one-line failure: the CLI's last line says it
            return record.levelno >= logging.WARNING
        if record.name.startswith("prefect"):  # temporary server start/stop, client chatter
            return record.levelno >= logging.WARNING
        return True  # any other library: the root logger's WARNING level, and QUIET_LOGGERS' ERROR


class NoTracebackWhenTransient(logging.Filter):
    """For Prefect's task-run logger: a transient failure that used up its retries (the hub unreachable, a 503) is
    the world's fault, not a bug; its line stays, its traceback goes (console and UI). A bug keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _transient(record):
            record.exc_info, record.exc_text, record.sft_transient = None, None, True
        return True


# ------------------------------------------------------------------------------------------------ retries
def retry_line(stage: str, exc: BaseException, attempt: int, retries: int, delay: float | None) -> str:
    """``authenticate: model '...': the Hugging Face Hub at URL is unreachable. Retry 1/2 in 10 s``."""
    from sft_pipeline.errors import HubUnreachable, is_oom

    if isinstance(exc, HubUnreachable):
        why = str(exc).split(" (", 1)[0]  # the message up to its technical detail
    elif is_oom(exc):
        why = "out of memory"
    else:
        text = str(exc).splitlines()[0][:160] if str(exc) else ""
        why = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    when = f"in {delay:g} s" if delay else "now"
    return f"{stage}: {why}. Retry {attempt}/{retries} {when}"


def say_retry(task, task_run, exc: BaseException) -> None:
    """Log the coming retry on the stage's run logger. For a Prefect ``retry_condition_fn`` that returns True:
    Prefect calls it only while retries are left, after ``task_run.run_count`` attempts."""
    from prefect.logging.loggers import task_run_logger

    done = max(task_run.run_count, 1)
    delays = task.retry_delay_seconds
    if isinstance(delays, (list, tuple)):
        delay = delays[min(done - 1, len(delays) - 1)] if delays else None
    else:
        delay = delays
    task_run_logger(task_run, task=task).warning("%s", retry_line(task.name, exc, done, task.retries, delay))

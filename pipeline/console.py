"""The quiet terminal: while a stage runs, the terminal shows medpipe's own lines and ONE progress
display (step/total, loss, tokens/s, ETA); everything else the libraries print (weight loading,
shard writing, dataset maps, DeepSpeed's launcher, warnings) goes to the stage's launcher.log.
`medpipe run -v` (MEDPIPE_VERBOSE=1) shows it all, as before.

Stages talk to the terminal through `say` / `progress` only. In the driver's process (local
launcher, eval stages) they reach the active `StageDisplay` directly; in a launcher's rank they are
printed as marked lines on stdout, which the driver's `StageDisplay.feed` reads from the pipe.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Iterator

MARK = "\x1emedpipe "  # starts an event line from a rank (ASCII record separator: never in library output)
_active: "StageDisplay | None" = None


def verbose() -> bool:
    return os.environ.get("MEDPIPE_VERBOSE") == "1"


def emit(event: dict) -> None:
    if _active is not None:
        _active.handle(event)
    else:  # a rank under a launcher (or a stage file run by hand): the driver reads stdout
        sys.stdout.write(MARK + json.dumps(event) + "\n")
        sys.stdout.flush()


def say(prefix: str, message: str) -> None:
    emit({"say": message, "prefix": prefix})


def progress(prefix: str, step: int, total: int, **values: float) -> None:
    emit({"progress": {"step": step, "total": total, **values}, "prefix": prefix})


class StageDisplay:
    """Owns the terminal while one stage runs. A TTY gets a rich progress bar; a pipe or file
    (CI logs) gets the same facts as plain lines."""

    def __init__(self, log_file: Path):
        self.log_path = log_file
        self.terminal: IO[str] = sys.stdout
        self.bar = None
        self.task = None
        self.t0 = time.monotonic()
        self.last_text = ""
        self.last_loss: float | None = None

    def __enter__(self) -> "StageDisplay":
        global _active
        self.previous, _active = _active, self
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active
        if self.bar is not None:
            self.bar.stop()
        _active = self.previous

    # ---- events -----------------------------------------------------------------------------------
    def handle(self, event: dict) -> None:
        prefix = event.get("prefix", "")
        if "say" in event:
            self._line(f"  [{prefix}] {event['say']}")
        elif "progress" in event:
            self._progress(prefix, event["progress"])

    def _line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.terminal.write(text + "\n")
            self.terminal.flush()

    def _progress(self, prefix: str, p: dict) -> None:
        step, total = int(p.get("step", 0)), int(p.get("total") or 0)
        if isinstance(p.get("loss"), (int, float)):
            self.last_loss = float(p["loss"])  # shown until the next logged step
        facts = [f"loss {self.last_loss:.4g}"] if self.last_loss is not None else []
        if p.get("tokens_per_s"):
            facts.append(f"{p['tokens_per_s']:.0f} tok/s")
        text = " · ".join(facts) or self.last_text
        self.last_text = text
        if not self.terminal.isatty() or verbose():
            if "loss" in p:  # logged steps only, like the trainer's logging_steps
                extra = " ".join(f"{k}={v:.4g}" for k, v in p.items() if k not in ("step", "total", "loss", "tokens_per_s")
                                 and isinstance(v, (int, float)))
                self._line(f"  [{prefix}] step {step}/{total} loss={p['loss']:.4g} {extra}".rstrip()
                           + (f" {p['tokens_per_s']:.0f} tok/s" if p.get("tokens_per_s") else "")
                           + f" ({time.monotonic() - self.t0:.0f}s)")
            return
        if self.bar is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            console = Console(file=self.terminal, highlight=False)
            self.bar = Progress(TextColumn(f"  [bold]{prefix}[/]"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[facts]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                TimeRemainingColumn(), console=console, transient=False,
                                redirect_stdout=False, redirect_stderr=False)  # library output stays in the log
            self.bar.start()
            self.task = self.bar.add_task(prefix, total=total or None, facts=text)
        self.bar.update(self.task, completed=step, total=total or None, facts=text)

    def feed(self, line: bytes, log: IO[bytes]) -> None:
        """One line of a launcher's output: an event, or library output for the log."""
        text = line.decode("utf-8", errors="replace")
        at = text.find(MARK)
        if at >= 0:
            try:
                event = json.loads(text[at + len(MARK):])
            except ValueError:
                event = None
            if isinstance(event, dict):
                self.handle(event)
                log.write(text[at + len(MARK):].encode())
                return
        log.write(line)
        if verbose():
            self.terminal.write(text)
            self.terminal.flush()

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """An in-process stage: stdout/stderr (python objects and file descriptors, so C code and
        child processes too) go to the stage log; the display keeps the real terminal."""
        if verbose():
            yield
            return
        sys.stdout.flush()
        sys.stderr.flush()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a", encoding="utf-8", errors="replace", buffering=1)
        saved_fds = []
        try:
            for fd in (1, 2):
                try:
                    saved_fds.append((fd, os.dup(fd)))
                    os.dup2(log.fileno(), fd)
                except OSError:
                    pass
            old_out, old_err = sys.stdout, sys.stderr
            self.terminal = old_out
            try:  # the real stdout writes to fd 1, which now is the log: keep a copy of the terminal's fd
                if old_out.fileno() == 1 and saved_fds and saved_fds[0][0] == 1:
                    self.terminal = os.fdopen(os.dup(saved_fds[0][1]), "w", buffering=1)
            except (OSError, ValueError, AttributeError):
                pass
            sys.stdout = sys.stderr = log
            import logging

            handlers = [h for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)
                        and getattr(h, "stream", None) in (old_out, old_err)]
            for h in handlers:
                h.setStream(log)
            try:
                yield
            finally:
                for h in handlers:
                    h.setStream(old_err)
                sys.stdout, sys.stderr = old_out, old_err
                if self.terminal is not old_out:
                    if self.bar is not None:
                        self.bar.stop()
                        self.bar = None
                    self.terminal.close()
                    self.terminal = old_out
        finally:
            log.flush()
            for fd, saved in saved_fds:
                os.dup2(saved, fd)
                os.close(saved)
            log.close()

"""The quiet terminal, as a user sees it: a real `medpipe run` under a pseudo-terminal shows ONE
progress display per training stage and medpipe's own lines, none of the libraries' progress bars
or warnings (those are in each stage's launcher.log); `-v` shows them again."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import REPO

RECIPE = """
defaults: [base, model: tiny, data: sample, stage/cpt@stages.cpt, stage/sft@stages.sft, stage/eval@stages.eval, _self_]
name: quiet
stages:
  cpt: {data: "${data.pretrain}", block_size: 64, max_steps: 6, logging_steps: 2, batch_size: 2, lr: 3e-3, save_steps: 50}
  sft: {data: "${data.dialogue}", lr: 5e-3, max_steps: 6, logging_steps: 2, batch_size: 2, max_length: 64,
        save_steps: 50, peft: {r: 4, alpha: 8}}
  eval: {data: [{path: "${medpipe:samples}/mcq_cmexam.csv", format: cmexam, limit: 4}], method: cue, max_new_tokens: 4}
"""
FOREIGN = ("Loading weights", "Writing model shards", "Saving the dataset", "Tokenizing", "Map", "it/s]",
           "Warning", "warn(", "Generating train split", "Building labels", "Truncating train dataset",
           "Dropping fully masked", "[INFO]", "[WARNING]", "%|")
CURSOR_HIDE = "\x1b[?25l"  # rich's live display hides the cursor once when it starts


def run_in_pty(args: list[str], cwd: Path, timeout: float = 600) -> tuple[int, str]:
    """Run a command with a pty as its terminal (stdin, stdout and stderr), 120x40, and return
    (exit code, every byte it wrote to the screen)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "MEDPIPE_VERBOSE", "COLUMNS", "LINES")}
    env["TERM"] = "xterm-256color"
    proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True)
    os.close(slave)
    screen = bytearray()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    os.close(master)
    return proc.wait(), screen.decode("utf-8", errors="replace")


def plain(screen: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen)


@pytest.mark.slow
def test_run_under_a_pty_shows_one_progress_display_per_stage_and_no_foreign_output(tmp_path):
    recipe = tmp_path / "quiet.yaml"
    recipe.write_text(RECIPE)
    code, screen = run_in_pty([sys.executable, "-m", "medpipe.commands.cli", "run", f"recipe={recipe}",
                               f"run.root={tmp_path}/runs", f"run.dir={tmp_path}/runs/q"], cwd=tmp_path)
    text = plain(screen)
    assert code == 0, text[-3000:]
    assert screen.count(CURSOR_HIDE) == 2  # cpt and sft; the eval stage has lines only
    bars = re.findall(r"(\d/3 \w+) ━+╸?╺?━* (\d+)/(\d+) ", text)
    assert {b[0] for b in bars} == {"1/3 cpt", "2/3 sft"}
    assert ("1/3 cpt", "6", "6") in bars and ("2/3 sft", "6", "6") in bars  # each ran to its total
    assert re.search(r"6/6 loss \d\.\d+ · \d+ tok/s", text)
    assert "ETA" in text
    for foreign in FOREIGN:
        assert foreign not in text, foreign
    assert re.search(r"\[1/3 cpt\] \d+ documents → \d+ blocks of 64 tokens", text)
    assert re.search(r"\[2/3 sft\] \d+ training conversations", text)
    for own in ("Stage 1/3 · cpt (cpt)", "✓ cpt finished",
                "[3/3 eval] cmexam: acc=", "Pipeline quiet complete"):
        assert own in text, own
    # what the terminal did not show is in the stage's log
    log = (tmp_path / "runs" / "q" / "01-cpt" / "launcher.log").read_text()
    assert "Writing model shards" in log


@pytest.mark.slow
def test_verbose_shows_the_libraries_output_again(tmp_path):
    recipe = tmp_path / "quiet.yaml"
    recipe.write_text("defaults: [base, model: tiny, data: sample, stage/cpt@stages.cpt, _self_]\nname: loud\n"
                      "stages:\n  cpt: {data: '${data.pretrain}', block_size: 64, max_steps: 2, logging_steps: 2,"
                      " batch_size: 2, save_steps: 50}\n")
    code, screen = run_in_pty([sys.executable, "-m", "medpipe.commands.cli", "run", "-v", f"recipe={recipe}",
                               f"run.root={tmp_path}/runs"], cwd=tmp_path)
    text = plain(screen)
    assert code == 0, text[-3000:]
    assert "Writing model shards" in text
    assert screen.count(CURSOR_HIDE) == 0  # -v: plain step lines instead of the live display
    assert "[1/1 cpt] step 2/2 loss=" in text


def test_rank_events_are_read_from_the_launcher_pipe(tmp_path):
    """Under a launcher, rank 0's lines and progress arrive as marked lines on the pipe: the
    driver shows them and logs the rest."""
    import io
    import json

    from medpipe.console import MARK, StageDisplay

    out = io.StringIO()
    log = io.BytesIO()
    with StageDisplay(tmp_path / "launcher.log") as display:
        display.terminal = out
        display.feed(b"Loading weights: 100%|##########| 3/3\n", log)
        display.feed((MARK + json.dumps({"say": "84 training conversations", "prefix": "2/3 sft"}) + "\n").encode(), log)
        display.feed(("[rank0]: " + MARK + json.dumps({"progress": {"step": 2, "total": 6, "loss": 8.25},
                                                       "prefix": "2/3 sft"}) + "\n").encode(), log)
    lines = out.getvalue().splitlines()
    assert lines[0] == "  [2/3 sft] 84 training conversations"
    assert re.fullmatch(r"  \[2/3 sft\] step 2/6 loss=8\.25 \(\d+s\)", lines[1])
    assert len(lines) == 2
    assert log.getvalue().startswith(b"Loading weights: 100%")

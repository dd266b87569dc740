"""Bad input, table-driven: each case is a recipe (or overrides) and a file that is broken in one
way; `medpipe validate` (and, for the marked cases, `medpipe run`) exits 2 with ONE line that names
the file:line and field (or the key), no traceback, and nothing is trained or written to the store."""
from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from conftest import medpipe

SFT = "sft: {{kind: sft, data: {data}, max_length: 256, max_steps: 1{extra}}}"
CPT = "cpt: {{kind: cpt, data: {data}, block_size: 16, max_steps: 1{extra}}}"
DPO = "dpo: {{kind: dpo, data: {data}, max_length: 256, max_steps: 1{extra}}}"


def recipe(tmp: Path, stage: str, top: str = "") -> Path:
    p = tmp / "bad.yaml"
    p.write_text(textwrap.dedent(f"""\
        defaults: [base, model: tiny, _self_]
        name: bad
        {top}
        stages:
          {stage}
        """), encoding="utf-8")
    return p


def write(tmp: Path, name: str, content) -> str:
    p = tmp / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return str(p)


ALPACA_OK = '{"instruction": "发热怎么办？", "output": "多饮水，必要时就医。"}\n'


# each builder: tmp -> (recipe path, extra overrides, [substrings the one line must contain])
def c_bad_json_line(t):
    d = write(t, "a.jsonl", ALPACA_OK * 2 + '{"instruction": "x", "output": \n')
    return recipe(t, SFT.format(data=d, extra="")), [], [f"{d}:3:", "invalid JSON"]


def c_missing_field(t):
    d = write(t, "a.jsonl", ALPACA_OK + '{"instruction": "咳嗽"}\n')
    return recipe(t, SFT.format(data=d, extra="")), [], [f"{d}:2:", "field 'output'"]


def c_gbk_csv(t):
    head = "Question,Options,Answer\n".encode()
    ok = '"头痛首选？","A 休息\nB 吃药",A\n'.encode("utf-8")
    bad = '"发热首选？","A 退热\nB 补液",B\n'.encode("gbk")
    d = write(t, "exam.csv", head + ok + bad)
    return recipe(t, SFT.format(data=d, extra="")), [], [f"{d}:4:", "not UTF-8", "GBK"]


def c_nul_csv(t):
    d = write(t, "exam.csv", b"Question,Options,Answer\n" + '"a\x00b","A x\nB y",A\n'.encode())
    return recipe(t, SFT.format(data=d, extra="")), [], [f"{d}:2:", "NUL byte"]


def c_duplicate_key_jsonl(t):
    d = write(t, "a.jsonl", ALPACA_OK + '{"instruction": "a", "output": "b", "output": "c"}\n')
    return recipe(t, SFT.format(data=d, extra="")), [], [f"{d}:2:", "field 'output'", "duplicate key"]


def c_duplicate_key_json_array(t):
    d = write(t, "a.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "a", "instruction": "c", '
                           '"output": "d"}]')
    return recipe(t, SFT.format(data=d, extra="")), [], [f"{d}:[1]:", "field 'instruction'", "duplicate key"]


def c_symlink_loop(t):
    a, b = t / "loop1.jsonl", t / "loop2.jsonl"
    os.symlink(b, a)
    os.symlink(a, b)
    return recipe(t, SFT.format(data=str(a), extra="")), [], [f"{a}:", "symlink loop"]


def c_missing_file(t):
    return recipe(t, SFT.format(data=str(t / "nope.jsonl"), extra="")), [], [f"{t / 'nope.jsonl'}:", "file not found"]


def c_empty_file(t):
    d = write(t, "a.jsonl", "")
    return recipe(t, SFT.format(data=d, extra="")), [], [f"{d}:", "no records"]


def c_negative_limit(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    return recipe(t, SFT.format(data=f"{{path: {d}, limit: -5}}", extra="")), [], ["field 'limit'", "got -5"]


def c_unknown_source_key(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    return recipe(t, SFT.format(data=f"{{path: {d}, formt: alpaca}}", extra="")), [], ["field 'formt'", "allowed"]


def c_ids_file_missing(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    return recipe(t, SFT.format(data=f"{{path: {d}, ids: {t}/pmids.json}}", extra="")), [], ["pmids.json", "ids file"]


def c_promptcblue_test(t):
    d = write(t, "test.json", '{"input": "判断意图：头痛怎么办", "target": "", "answer_choices": ["治疗方案"], '
                              '"task_type": "cls", "task_dataset": "KUAKE-QIC", "sample_id": "1"}\n')
    return recipe(t, SFT.format(data=d, extra="")), [], [f"{d}:1:", "field 'target'", "unlabeled split"]


def c_shots_from_an_unlabeled_pool(t):
    """shots=2 from C-Eval's test split (published without the answer column) would run 0-shot
    while the results say 2-shot."""
    d = write(t, "clinical_medicine_val.csv", "id,question,A,B,C,D,answer,explanation\n"
                                              "0,头痛首选？,休息,吃药,手术,观察,A,\n1,发热首选？,退热,补液,手术,观察,B,\n")
    pool = write(t, "clinical_medicine_test.csv", "id,question,A,B,C,D\n0,咳嗽首选？,止咳,抗生素,手术,观察\n"
                                                  "1,腹痛首选？,检查,止痛,手术,观察\n")
    stage = f"eval: {{kind: eval, data: {d}, shots: 2, fewshot_data: {pool}}}"
    return recipe(t, stage), [], [pool, "fewshot_data", "0 of 2", "shots=2"]


def c_all_identical_pairs(t):
    row = '{"prompt": "发热怎么办？", "chosen": "多饮水。", "rejected": "多饮水。"}\n'
    d = write(t, "pref.jsonl", row * 3)
    return recipe(t, DPO.format(data=d, extra="")), [], [f"{d}:", "field 'chosen'", "chosen == rejected"]


def c_overlength_error(t):
    d = write(t, "a.jsonl", ALPACA_OK + json.dumps({"instruction": "头痛 " * 400, "output": "休息。"},
                                                   ensure_ascii=False) + "\n")
    return recipe(t, SFT.format(data=d, extra=", overlength: error")), [], [f"{d}:2:", "field 'messages'",
                                                                            "longer than max_length=256"]


def c_nothing_left_after_truncation(t):
    d = write(t, "a.jsonl", ALPACA_OK * 3)
    return recipe(t, SFT.format(data=d, extra="").replace("max_length: 256", "max_length: 8")), [], [
        "stages.sft", "no conversation keeps an assistant token", "max_length=8"]


def c_span_not_found(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    tmpl = ("\"{% for m in messages %}<|im_start|>{{ m['role'] }}\\n{{ m['content'] | replace('水', '汤') }}"
            "<|im_end|>\\n{% endfor %}\"")
    return recipe(t, SFT.format(data=d, extra=f", chat_template: {tmpl}")), [], [
        f"{d}:1:", "field 'messages'", "messages[1] (assistant)", "not in the rendering"]


def c_bad_overlength_value(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    return recipe(t, SFT.format(data=d, extra=", overlength: cut")), [], ["stages.sft", "overlength"]


def c_unknown_stage_param(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    return recipe(t, SFT.format(data=d, extra=", lrr: 1")), [], ["stages.sft", "unknown parameter 'lrr'"]


def c_recipe_typo_top(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    return recipe(t, SFT.format(data=d, extra=""), top="modle: {path: /models/x}"), [], ["modle: unknown key",
                                                                                          "'model'"]


def c_recipe_typo_data(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    return recipe(t, SFT.format(data=d, extra=""), top="data: {on_eror: skip}"), [], ["data.on_eror", "on_error"]


def c_recipe_typo_run(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    return recipe(t, SFT.format(data=d, extra=""), top="run: {dri: /tmp/x}"), [], ["run.dri: unknown key", "dir"]


def c_recipe_typo_stages(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    p = recipe(t, SFT.format(data=d, extra=""))
    p.write_text(p.read_text().replace("stages:", "stagess:\n  x: 1\nstages:"))
    return p, [], ["stagess: unknown key", "'stages'"]


def c_recipe_typo_launcher(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    return recipe(t, SFT.format(data=d, extra=""), top="launcher: {num_gpu: 2}"), [], ["launcher.num_gpu", "num_gpus"]


def c_yaml_syntax(t):
    p = recipe(t, SFT.format(data="x.jsonl", extra=""))
    p.write_text(p.read_text().rstrip("}\n") + "\n")
    return p, [], [f"{p}:", "YAML syntax"]


def c_run_dir_is_a_file(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    f = write(t, "not_a_dir", "x")
    return recipe(t, SFT.format(data=d, extra="")), [f"run.dir={f}"], ["run.dir", "is a file"]


def c_empty_model_dir(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    (t / "empty_model").mkdir()
    return recipe(t, SFT.format(data=d, extra="")), [f"model.path={t}/empty_model"], ["model.path", "empty"]


def c_model_dir_without_config(t):
    from transformers import AutoTokenizer

    from medpipe.stages.models.tiny import ensure_tiny

    d = write(t, "a.jsonl", ALPACA_OK)
    AutoTokenizer.from_pretrained(ensure_tiny()).save_pretrained(t / "tok_only")
    return recipe(t, SFT.format(data=d, extra="")), [f"model.path={t}/tok_only"], ["model.path", "no config.json"]


def c_cpt_model_dir_without_config(t):
    d = write(t, "a.txt", "hello world\n" * 5)
    (t / "m").mkdir()
    (t / "m" / "tokenizer.json").write_text("{}")
    return recipe(t, CPT.format(data=d, extra="")), [f"model.path={t}/m"], ["model.path", "no config.json"]


def c_dpo_only_model_dir_without_config(t):
    """The model dir is checked by the engine before any stage, whatever the first stage's kind."""
    d = write(t, "p.jsonl", '{"prompt": "发热怎么办？", "chosen": "多饮水。", "rejected": "不用管。"}\n')
    (t / "m").mkdir()
    (t / "m" / "tokenizer.json").write_text("{}")
    return recipe(t, DPO.format(data=d, extra="")), [f"model.path={t}/m"], ["model.path", "no config.json"]


def c_cpt_no_full_block(t):
    d = write(t, "a.txt", "hello world\n")
    return recipe(t, CPT.format(data=d, extra="").replace("block_size: 16", "block_size: 512")), [], [
        "stages.cpt", "no full block of block_size=512"]


# ---- unbounded reads: every path is type-checked before it is read, one record is size-capped ----
def c_data_is_a_fifo(t):
    f = t / "pipe.jsonl"
    os.mkfifo(f)
    return recipe(t, SFT.format(data=str(f), extra="")), [], [f"{f}:", "a FIFO (named pipe), not a regular file"]


def c_data_is_dev_zero(t):
    return recipe(t, SFT.format(data="/dev/zero", extra="")), [], ["/dev/zero:", "a character device, not a regular file"]


def c_one_record_over_the_cap(t):
    d = write(t, "a.jsonl", ALPACA_OK + json.dumps({"instruction": "头" * 100, "output": "x"}) + "\n")
    return recipe(t, SFT.format(data=f"{{path: {d}, max_record_bytes: 200}}", extra="")), [], [
        f"{d}:2:", "record longer than max_record_bytes=200 bytes"]


def c_one_line_over_the_default_cap(t):
    """A file without line breaks (17 MiB in one JSONL line) never reaches the tokenizer whole."""
    d = t / "a.jsonl"
    with open(d, "w", encoding="utf-8") as f:
        f.write('{"instruction": "' + "x" * (17 << 20) + '", "output": "y"}\n')
    return recipe(t, SFT.format(data=str(d), extra="")), [], [f"{d}:1:", "max_record_bytes=16777216"]


def c_gguf_not_gguf(t):
    g = write(t, "m.gguf", b"PK\x03\x04 this is a zip file" * 10)
    return recipe(t, SFT.format(data=write(t, "a.jsonl", ALPACA_OK), extra="")), ["model=gguf", f"model.gguf_file={g}"], [
        "model.gguf_file", g, "does not start with the GGUF magic bytes"]


def c_gguf_truncated(t):
    from medpipe.stages.models.gguf import smollm2_gguf_path

    src = smollm2_gguf_path()
    g = t / "half.gguf"
    with open(src, "rb") as f:
        g.write_bytes(f.read(src.stat().st_size // 2))
    return recipe(t, SFT.format(data=write(t, "a.jsonl", ALPACA_OK), extra="")), ["model=gguf", f"model.gguf_file={g}"], [
        "model.gguf_file", str(g), "truncated or corrupt"]


def c_gguf_is_a_fifo(t):
    g = t / "m.gguf"
    os.mkfifo(g)
    return recipe(t, SFT.format(data=write(t, "a.jsonl", ALPACA_OK), extra="")), ["model=gguf", f"model.gguf_file={g}"], [
        "model.gguf_file", "a FIFO (named pipe), not a regular file"]


# ---- values that reach a launcher or an sbatch script: range-checked, one line naming the key ----
def _slurm(t, key, value, expect):
    return recipe(t, SFT.format(data=write(t, "a.jsonl", ALPACA_OK), extra="")), [
        "launcher=slurm", f"launcher.sbatch.{key}={value}"], [f"slurm.{key}:", *expect]


def c_slurm_nodes_zero(t):
    return _slurm(t, "nodes", 0, ["an integer >= 1", "got 0"])


def c_slurm_nodes_negative(t):
    return _slurm(t, "nodes", -2, ["an integer >= 1", "got -2"])


def c_slurm_time_garbage(t):
    return _slurm(t, "time", "garbage", ["a Slurm time limit", "'garbage'"])


def c_slurm_time_minutes_over_59(t):
    return _slurm(t, "time", "'2:75:00'", ["minutes and seconds below 60"])


def c_slurm_mem_unit(t):
    return _slurm(t, "mem", "12Q", ["a memory size", "'12Q'"])


def c_launcher_gpus_zero(t):
    return recipe(t, SFT.format(data=write(t, "a.jsonl", ALPACA_OK), extra="")), [
        "launcher=deepspeed", "launcher.num_gpus=0"], ["launcher.num_gpus:", "an integer >= 1"]


# ---- results that would be labelled with what did not run ----
def c_shots_pool_is_the_eval_set(t):
    """shots=2 from a 2-item pool that is also the eval set: each item would get 1 shot, saved as 2-shot."""
    d = write(t, "clinical_medicine_dev.csv", "id,question,A,B,C,D,answer,explanation\n"
                                              "0,头痛首选？,休息,吃药,手术,观察,A,\n1,发热首选？,退热,补液,手术,观察,B,\n")
    stage = f"eval: {{kind: eval, data: {d}, shots: 2, fewshot_data: {d}}}"
    return recipe(t, stage), [], [f"{d}:2:", "field 'fewshot_data'", "gets 1 of shots=2", "set shots=1"]


def c_cmexam_option_letter_repeats(t):
    d = write(t, "exam.csv", 'Question,Options,Answer\n"头痛首选？","A 休息\nB 吃药\nB 手术\nC 观察",B\n')
    return recipe(t, SFT.format(data=d, extra="")), [], [f"{d}:2:", "field 'Options'", "option letter B repeats"]


# ---- a wrong-typed source option names its own key ----
def c_limit_not_a_number(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    return recipe(t, SFT.format(data=f"{{path: {d}, limit: abc}}", extra="")), [], [
        "field 'limit': expected an integer, got 'abc'"]


def c_heldout_not_a_number(t):
    d = write(t, "a.jsonl", ALPACA_OK)
    return recipe(t, SFT.format(data=f"{{path: {d}, heldout: lots}}", extra="")), [], [
        "field 'heldout': expected a number, got 'lots'"]


# ---- places medpipe writes: checked writable before anything is written ----
MOUNTS: list[Path] = []


def _read_only_dir(t: Path) -> Path:
    ro = t / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o ro,size=1m tmpfs {ro} 2>/dev/null") != 0:
        pytest.skip("a read-only mount needs root (chmod does not stop root)")
    MOUNTS.append(ro)
    return ro


@pytest.fixture(autouse=True)
def _unmount():
    yield
    while MOUNTS:
        os.system(f"umount {MOUNTS.pop()}")


def c_read_only_run_root(t):
    ro = _read_only_dir(t)
    return recipe(t, SFT.format(data=write(t, "a.jsonl", ALPACA_OK), extra="")), [f"run.root={ro}/runs"], [
        "run.root: cannot write to", "Read-only file system"]


def c_read_only_store(t):
    ro = _read_only_dir(t)
    return recipe(t, SFT.format(data=write(t, "a.jsonl", ALPACA_OK), extra="")), [f"run.store={ro}/store"], [
        "run.store: cannot write to", "Read-only file system"]


CASES = {name[2:]: fn for name, fn in globals().items() if name.startswith("c_")}
ALSO_RUN = {"bad_json_line", "shots_from_an_unlabeled_pool", "gbk_csv", "duplicate_key_jsonl", "overlength_error", "span_not_found",
            "recipe_typo_top", "model_dir_without_config", "nothing_left_after_truncation", "cpt_no_full_block",
            "data_is_a_fifo", "one_record_over_the_cap", "gguf_truncated", "slurm_nodes_zero", "shots_pool_is_the_eval_set",
            "read_only_run_root", "read_only_store"}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_nothing_trained(tmp_path, case, command):
    if command == "run" and case not in ALSO_RUN:
        pytest.skip("validate is enough: run performs the same check first")
    recipe_path, overrides, expect = CASES[case](tmp_path)
    runs = tmp_path / "runs"
    r = medpipe(command, f"recipe={recipe_path}", f"run.root={runs}", *overrides)
    assert r.code == 2, r.out
    errors = [ln for ln in r.out.splitlines() if ln.startswith("medpipe: error:")]
    assert len(errors) == 1, r.out
    assert "Traceback" not in r.out
    # missing files are all listed first ("missing: stages.x.data: PATH: why"), then the one error line
    said = "\n".join([errors[0], *(ln for ln in r.out.splitlines() if ln.startswith("missing:"))])
    for piece in expect:
        assert piece in said, (piece, said)
    assert not (runs / ".store").exists() or not list((runs / ".store").glob("*/artifact.json"))
    assert not [p for p in runs.glob("bad-*")] if runs.exists() else True  # no run dir either


def test_the_suite_size():
    """The number quoted in the README's reliability line."""
    assert len(CASES) == 51, len(CASES)


def test_cmexam_skipped_letters_and_mistral_system_turns_validate(tmp_path):
    """Cases that used to be misread or crash, now read correctly: validate passes."""
    d = write(tmp_path, "exam.csv", 'Question,Options,Answer\n"首选检查？","A 心电图\nB 胸片\nD 冠脉造影\nE 超声",D\n')
    r = medpipe("validate", f"recipe={recipe(tmp_path, SFT.format(data=d, extra=''))}", f"run.root={tmp_path}/runs")
    assert r.code == 0, r.out
    assert "encoded: 1/1 conversations kept" in r.out

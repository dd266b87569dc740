"""The public datasets by name (conf/data/public.yaml: published layouts under one data.root) and
models by hub id (conf/model/*.yaml hub_id + model.allow_hub)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO, medpipe

PUBLIC = REPO / "conf" / "data" / "public.yaml"
SETS = ("cmexam", "huatuo26m", "chimed_cpt", "chimed_sft", "chimed_dpo", "cmtmedqa", "chatmed", "medqa",
        "medmcqa", "pubmedqa_pqal", "pubmedqa_pqau", "ceval_medical", "cmmlu_medical", "promptcblue", "cmb")


def _sources(value):
    return value if isinstance(value, list) else [value]


def test_every_public_set_has_a_published_layout_under_data_root():
    body = yaml.safe_load(PUBLIC.read_text())
    named = {k: v for k, v in body.items() if isinstance(v, (dict, list))}
    for prefix in SETS:
        assert any(k.startswith(prefix) for k in named), prefix
    for key, value in named.items():
        for src in _sources(value):
            if isinstance(src, str):  # a group of other named sets (medcare_exams: ["${data.medqa_mainland}", ...])
                assert src.startswith("${data.") and src[7:-1] in body, (key, src)
                continue
            assert src["path"].startswith("${data.root}/"), key
            assert src.get("published"), key  # validate can say where to get it
    # the names the bundled recipes use point at public sets too
    for key in ("pretrain", "sft", "instruction", "dialogue", "preference", "medqa", "cmexam", "pubmedqa",
                "medmcqa", "ceval_dev", "ceval_val"):
        assert key in body and "${data." in str(body[key]), key


def test_validate_names_every_missing_file_and_where_it_is_published(tmp_path):
    r = medpipe("validate", "recipe=qilin", "data=public", f"data.root={tmp_path}")
    assert r.code == 2
    lines = r.out.splitlines()
    assert f"missing: stages.cpt.data: {tmp_path}/ChiMed/cpt.txt: file not found (published: " \
           f"huggingface.co/datasets/williamliu/ChiMed cpt.txt (4.9 GB))" in lines
    assert f"missing: stages.cmexam_base.data: {tmp_path}/CMExam/data/test_with_annotations.csv: file not found " \
           f"(published: github.com/williamliujl/CMExam data/test_with_annotations.csv)" in lines
    assert f"missing: stages.dpo.data: {tmp_path}/ChiMed/dpo.json: file not found (published: " \
           f"huggingface.co/datasets/williamliu/ChiMed dpo.json)" in lines
    assert sum(line.startswith("missing: ") for line in lines) == 11  # each file once, the first stage naming it
    assert lines[-1] == "medpipe: error: 11 data file(s) missing (listed above); nothing was read"


RECIPE = """
defaults: [base, model: tiny, data: public, stage/eval@stages.exam, _self_]
name: public_names
stages:
  exam:
    data: ["${data.cmexam_test}", "${data.medmcqa_dev}", "${data.pubmedqa_pqal}", "${data.ceval_medical_val}"]
    method: cue
    max_new_tokens: 4
"""


def test_sets_in_their_published_places_validate(tmp_path):
    root = tmp_path / "datasets"
    samples = REPO / "samples"
    layout = {"CMExam/data/test_with_annotations.csv": "mcq_cmexam.csv", "MedMCQA/dev.json": "medmcqa.json",
              "pubmedqa/data/ori_pqal.json": "pubmedqa.json"}
    layout.update({f"ceval-exam/val/{s}_val.csv": "ceval_val.csv" for s in ("basic_medicine", "clinical_medicine",
                                                                          "physician")})
    recipe = tmp_path / "public_names.yaml"
    recipe.write_text(RECIPE)
    r = medpipe("validate", f"recipe={recipe}", f"data.root={root}")
    assert r.code == 2 and r.out.count("missing: stages.exam.data: ") == 6
    for rel, sample in layout.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(samples / sample, root / rel)
    r = medpipe("validate", f"recipe={recipe}", f"data.root={root}")
    assert r.code == 0, r.out
    assert "missing:" not in r.out
    assert "config, model and data are valid (1 stages)" in r.out


def test_a_model_by_hub_id_needs_allow_hub(monkeypatch):
    from medpipe.compose import compose
    from medpipe.errors import ConfigError
    from medpipe.plan import base_artifact

    cfg, _ = compose("qilin", ["model=baichuan-7b"])
    with pytest.raises(ConfigError) as e:
        base_artifact(cfg)
    assert str(e.value) == ("model.path is required for model=baichuan-7b (published as baichuan-inc/Baichuan-7B): "
                            "set model.path=/path/to/the/checkpoint, or model.allow_hub=true to download "
                            "baichuan-inc/Baichuan-7B into the Hugging Face cache")


def test_allow_hub_resolves_the_id_through_the_hugging_face_cache(tmp_path, monkeypatch):
    """An id already in the HF cache (offline: nothing is downloaded) becomes the stage input."""
    from medpipe.artifact import model_fingerprint
    from medpipe.compose import compose
    from medpipe.plan import base_artifact, base_identity
    from medpipe.stages.models.tiny import ensure_tiny

    cache = tmp_path / "hub"
    snapshot = cache / "models--Qwen--Qwen1.5-7B-Chat" / "snapshots" / ("a" * 40)
    shutil.copytree(ensure_tiny(), snapshot)
    (cache / "models--Qwen--Qwen1.5-7B-Chat" / "refs").mkdir()
    (cache / "models--Qwen--Qwen1.5-7B-Chat" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both once, when first imported (an earlier test may have imported it)
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cfg, _ = compose("qilin", ["model=qwen1.5-7b", "model.allow_hub=true"])
    art = base_artifact(cfg)
    assert art.model_path == str(snapshot)
    assert base_identity(cfg) == "hub-" + model_fingerprint(snapshot)  # the same weights, the same stage keys
    local = shutil.copytree(ensure_tiny(), tmp_path / "local")
    cfg, _ = compose("qilin", ["model=qwen1.5-7b", f"model.path={local}"])  # a path wins over the hub id
    assert base_artifact(cfg).model_path == str(local)

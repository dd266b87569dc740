"""The datatrove path (pipeline/data/dedup_datatrove.py: datatrove's LocalPipelineExecutor, 2
tasks) and the single-machine path (pipeline/data/dedup.py) keep the same documents on English +
Chinese texts with planted exact and near duplicates."""
import random

import pytest

pytest.importorskip("datatrove", reason="datatrove not installed (make install puts it in the venv)")

from medpipe.data import dedup, dedup_datatrove  # noqa: E402

EN = ("patient presents with fever cough and shortness of breath chest x ray shows infiltrates "
      "treatment with antibiotics was started blood cultures were drawn oxygen saturation low "
      "history of diabetes hypertension and smoking the physician ordered a ct scan").split()
ZH = "患者发热咳嗽胸闷气短三天胸片提示肺部感染给予抗生素治疗血培养检查血氧饱和度偏低既往糖尿病高血压吸烟史医生建议行胸部计算机断层扫描"


def _fixture():
    rng = random.Random(7)
    docs = [" ".join(rng.choice(EN) for _ in range(40)) for _ in range(120)]
    docs += ["".join(rng.choice(ZH) for _ in range(60)) for _ in range(120)]
    planted = {}
    for src in list(range(0, 120, 10)) + list(range(120, 240, 10)):
        s = docs[src]
        if src < 120:   # English: one of 40 words replaced (char 5-gram Jaccard ~0.85)
            w = s.split()
            w[20] = "edited"
            near = " ".join(w)
        else:            # Chinese: one of 60 characters replaced (~0.84)
            near = s[:30] + "改" + s[31:]
        planted[len(docs)] = src
        docs.append(near)
        planted[len(docs)] = src
        docs.append(s.upper() + " !!")      # exact after normalisation
    return docs, planted


def test_datatrove_and_single_machine_keep_the_same_documents(tmp_path):
    docs, planted = _fixture()
    single = dedup.clusters(docs)
    distributed = dedup_datatrove.clusters(docs, tmp_path / "work", tasks=2)
    assert distributed == single
    removed = {i: c for i, c in enumerate(single) if c != i}
    # every planted copy (exact or near, English and Chinese) goes to its source, nothing else
    assert removed == planted
    assert dedup_datatrove.keep_indices(distributed) == [i for i in range(len(docs)) if i not in planted]
    # the filter-stage files datatrove's MinhashDedupFilter reads: per task, positions in its stream
    sizes = [len(docs) // 2 + len(docs) % 2, len(docs) // 2]
    rem = (tmp_path / "work" / "clusters" / "000001.remove").read_bytes()
    import struct
    assert [d + sizes[0] for (d,) in struct.iter_unpack("<I", rem)] == sorted(g for g in planted if g >= sizes[0])


def test_bands_are_the_single_machine_lsh_banding():
    lsh = dedup.lsh_for(dedup.NEAR_THRESHOLD, dedup.NUM_PERM)
    assert dedup_datatrove.bands() == (lsh.b, lsh.r) == (18, 7)

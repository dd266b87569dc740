"""Write samples/promptcblue.jsonl: 24 records in PromptCBLUE's published shape (input, target,
answer_choices, task_type, task_dataset, sample_id) for five of its tasks, from a fixed table of
conditions, so MedCare's CBLUE evaluation runs on the bundled data. Synthetic: demos and tests
only. Stdlib only, byte-identical output: `python samples/make_cblue_sample.py`."""
import json
from pathlib import Path

CONDITIONS = [  # (disease, symptom, drug, test)
    ("高血压", "头晕", "氨氯地平", "血压测量"), ("2型糖尿病", "多饮多尿", "二甲双胍", "空腹血糖"),
    ("肺炎", "发热咳嗽", "阿莫西林", "胸部X线"), ("哮喘", "喘息", "沙丁胺醇", "肺功能检查"),
    ("偏头痛", "单侧搏动性头痛", "布洛芬", "头颅CT"), ("缺铁性贫血", "乏力", "硫酸亚铁", "血常规")]


def records():
    out = []
    for i, (dis, sym, drug, test) in enumerate(CONDITIONS):
        out.append({"input": f"以下两句话的意思相同吗？\n“{dis}吃什么药”，“{dis}用{drug}可以吗”\n选项：是的，不是\n答：",
                    "target": "不是", "answer_choices": ["是的", "不是"], "task_type": "cls",
                    "task_dataset": "KUAKE-QQR"})
        intent = ["治疗方案", "病情诊断"][i % 2]
        question = f"{dis}怎么治疗？" if intent == "治疗方案" else f"{sym}是不是{dis}？"
        out.append({"input": f"判断下面问题的搜索意图：\n{question}\n选项：病情诊断，治疗方案，病因分析\n答：",
                    "target": intent, "answer_choices": ["病情诊断", "治疗方案", "病因分析"], "task_type": "cls",
                    "task_dataset": "KUAKE-QIC"})
        out.append({"input": f"找出指定的实体：\n患者因{sym}就诊，诊断为{dis}，予{drug}治疗。\n类型选项：疾病，药物\n答：",
                    "target": f"上述句子中的实体包含：\n疾病实体：{dis}\n药物实体：{drug}", "answer_choices": ["疾病", "药物"],
                    "task_type": "ner", "task_dataset": "CMeEE-V2"})
        out.append({"input": f"根据对话生成医生的回复：\n患者：医生你好，我{sym}好几天了，需要做什么检查？\n医生：",
                    "target": f"建议先做{test}，排除{dis}。", "answer_choices": None, "task_type": "response_generation",
                    "task_dataset": "MedDG"})
    for n, r in enumerate(out):
        r["sample_id"] = f"sample-{n}"
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("promptcblue.jsonl")
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records()), encoding="utf-8")

#!/usr/bin/env python3
"""Deterministic generator for medpipe's bundled sample datasets.

Every file in this folder (except this script, README.md and __init__.py) is written by
this script from one small, medically reviewed knowledge table of common conditions.
The data imitates the on-disk shapes of public medical datasets (alpaca, ShareGPT, MedQA,
CMExam, PubMedQA, MedMCQA, C-Eval) so that readers and stages can be tested offline.
Demo/test data only; not for clinical use.

Regenerate with:  python samples/make_samples.py   (stdlib only, seeded: byte-identical output)
"""
from __future__ import annotations

import csv
import io
import json
import os
import random
import uuid

SEED = 20240601
OUT = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------------------
# Knowledge table.  Symptoms are "|"-separated; the first one is the hallmark feature.
# group: conditions sharing a group are never used as each other's distractors (their
# treatments, tests or presentations overlap).  dx: usable for "most likely diagnosis"
# questions (False for conditions that are usually silent).
# who: demographic for vignettes.
# --------------------------------------------------------------------------------------
FIELDS = ("key group dx who subj topic dept_zh en zh en_sym zh_sym en_test zh_test "
          "en_tx zh_tx en_red zh_red en_note zh_note").split()

_ROWS = [
    ("hypertension", "raas", False, "adult", "Medicine", "Cardiovascular system", "心血管内科",
     "hypertension", "高血压",
     "blood pressure repeatedly at or above 140/90 mmHg|often no symptoms|morning headache|dizziness",
     "多次测量血压≥140/90 mmHg|常无明显症状|晨起头痛|头晕",
     "repeated office blood pressure measurement and ambulatory blood pressure monitoring",
     "多次诊室血压测量及动态血压监测",
     "lifestyle changes plus an ACE inhibitor, ARB, calcium channel blocker or thiazide diuretic",
     "生活方式干预联合ACEI、ARB、钙通道阻滞剂或噻嗪类利尿剂",
     "blood pressure of 180/120 mmHg or higher with chest pain, severe headache, confusion or vision loss",
     "血压≥180/120 mmHg并伴胸痛、剧烈头痛、意识模糊或视力下降",
     "Reducing salt intake, losing weight and regular exercise all lower blood pressure.",
     "减少食盐摄入、减轻体重和规律运动均可降低血压。"),
    ("t2dm", "dm", True, "adult", "Medicine", "Endocrinology", "内分泌科",
     "type 2 diabetes", "2型糖尿病",
     "excessive thirst and frequent urination|unexplained weight loss|fatigue|blurred vision",
     "多饮多尿|不明原因体重下降|乏力|视物模糊",
     "fasting plasma glucose and HbA1c", "空腹血糖和糖化血红蛋白（HbA1c）",
     "lifestyle changes plus metformin", "生活方式干预联合二甲双胍",
     "vomiting, confusion, deep rapid breathing or very high blood glucose",
     "呕吐、意识模糊、深大呼吸或血糖极高",
     "A fasting glucose of 7.0 mmol/L or higher or an HbA1c of 6.5% or higher supports the diagnosis.",
     "空腹血糖≥7.0 mmol/L或HbA1c≥6.5%支持诊断。"),
    ("pneumonia", "resp_inf", True, "adult", "Medicine", "Respiratory system", "呼吸内科",
     "community-acquired pneumonia", "社区获得性肺炎",
     "fever with cough and purulent sputum|pleuritic chest pain|shortness of breath|crackles on auscultation",
     "发热伴咳嗽、咳脓痰|胸膜性胸痛|气短|肺部湿啰音",
     "chest X-ray showing a new infiltrate", "胸部X线片显示新发浸润影",
     "empirical antibiotics such as amoxicillin or doxycycline for healthy outpatients",
     "门诊健康成人经验性使用阿莫西林或多西环素等抗生素",
     "confusion, a breathing rate of 30 or more per minute, low blood pressure or low oxygen saturation",
     "意识模糊、呼吸频率≥30次/分、血压下降或血氧饱和度降低",
     "The CURB-65 score helps decide whether a patient needs hospital care.",
     "CURB-65评分有助于判断患者是否需要住院治疗。"),
    ("asthma", "airway", True, "young", "Medicine", "Respiratory system", "呼吸内科",
     "asthma", "支气管哮喘",
     "episodic wheezing|chest tightness|shortness of breath|night-time cough",
     "反复发作性喘息|胸闷|气促|夜间咳嗽",
     "spirometry showing reversible airflow obstruction", "肺功能检查提示可逆性气流受限",
     "an inhaled corticosteroid-containing controller with a reliever inhaler",
     "含吸入性糖皮质激素的控制药物联合缓解药物",
     "being unable to speak in full sentences, blue lips or no relief from the reliever inhaler",
     "无法说完整句子、口唇发绀或使用缓解药物后无改善",
     "Common triggers include allergens, cold air, exercise and respiratory infections.",
     "常见诱因包括过敏原、冷空气、运动和呼吸道感染。"),
    ("copd", "airway", True, "older", "Medicine", "Respiratory system", "呼吸内科",
     "chronic obstructive pulmonary disease (COPD)", "慢性阻塞性肺疾病",
     "chronic cough with sputum|progressive breathlessness on exertion|wheezing|frequent chest infections in winter",
     "慢性咳嗽咳痰|进行性活动后气短|喘息|冬季反复呼吸道感染",
     "spirometry with a post-bronchodilator FEV1/FVC below 0.70",
     "肺功能检查：吸入支气管舒张剂后FEV1/FVC<0.70",
     "smoking cessation plus long-acting inhaled bronchodilators", "戒烟联合长效吸入支气管舒张剂",
     "severe breathlessness at rest, confusion or blue lips", "静息时严重气促、意识模糊或口唇发绀",
     "Smoking is the main risk factor, and stopping smoking slows the decline in lung function.",
     "吸烟是最主要的危险因素，戒烟可延缓肺功能下降。"),
    ("mi", "cad", True, "older", "Medicine", "Cardiovascular system", "心血管内科",
     "acute myocardial infarction", "急性心肌梗死",
     "crushing chest pain lasting more than 20 minutes|pain spreading to the left arm or jaw|sweating|nausea",
     "持续超过20分钟的压榨性胸痛|疼痛放射至左臂或下颌|大汗|恶心",
     "12-lead ECG and cardiac troponin", "12导联心电图和心肌肌钙蛋白",
     "aspirin and emergency reperfusion with primary PCI", "阿司匹林并尽早行急诊PCI再灌注治疗",
     "chest pain lasting more than 15 minutes, fainting or severe breathlessness",
     "胸痛持续超过15分钟、晕厥或严重呼吸困难",
     "Early reperfusion matters because more heart muscle is lost the longer the artery stays blocked.",
     "再灌注越早越好，冠状动脉闭塞时间越长，坏死的心肌越多。"),
    ("hf", "raas", True, "older", "Medicine", "Cardiovascular system", "心血管内科",
     "heart failure", "心力衰竭",
     "breathlessness when lying flat|ankle swelling|breathlessness on exertion|fatigue",
     "平卧时呼吸困难|踝部水肿|活动后气促|乏力",
     "NT-proBNP and echocardiography", "NT-proBNP和超声心动图",
     "diuretics for fluid overload plus an ACE inhibitor or ARNI, a beta-blocker, an MRA and an SGLT2 inhibitor",
     "利尿剂减轻液体潴留，联合ACEI或ARNI、β受体阻滞剂、醛固酮受体拮抗剂和SGLT2抑制剂",
     "breathlessness at rest, pink frothy sputum or fainting", "静息时呼吸困难、咳粉红色泡沫痰或晕厥",
     "These four drug classes are recommended for heart failure with reduced ejection fraction.",
     "上述四类药物推荐用于射血分数降低的心力衰竭。"),
    ("af", "af", True, "older", "Medicine", "Cardiovascular system", "心血管内科",
     "atrial fibrillation", "心房颤动",
     "palpitations with an irregularly irregular pulse|breathlessness|reduced exercise tolerance|light-headedness",
     "心悸伴脉律绝对不齐|气短|活动耐量下降|头晕",
     "ECG showing absent P waves and irregular RR intervals", "心电图示P波消失、RR间期绝对不规则",
     "rate control with a beta-blocker and anticoagulation based on the CHA2DS2-VASc score",
     "β受体阻滞剂控制心室率，并根据CHA2DS2-VASc评分进行抗凝",
     "sudden facial droop, arm weakness, speech difficulty, chest pain or fainting",
     "突发口角歪斜、肢体无力、言语不清、胸痛或晕厥",
     "Atrial fibrillation increases the risk of stroke about fivefold.",
     "房颤使卒中风险增加约5倍。"),
    ("stroke", "stroke", True, "older", "Medicine", "Nervous system", "神经内科",
     "acute ischemic stroke", "急性缺血性脑卒中",
     "sudden weakness of one side of the body|facial droop|slurred speech|sudden loss of vision in one eye",
     "突发一侧肢体无力|口角歪斜|言语不清|突发单眼视力丧失",
     "urgent non-contrast head CT", "紧急头颅CT平扫",
     "intravenous thrombolysis within 4.5 hours of onset or mechanical thrombectomy for large vessel occlusion",
     "发病4.5小时内静脉溶栓，或对大血管闭塞行机械取栓",
     "any sudden face, arm or speech problem, noting the time the symptoms began",
     "任何突发的面部、肢体或言语异常，并记录发病时间",
     "The CT scan is done first to exclude bleeding before thrombolysis.",
     "溶栓前首先行CT以排除脑出血。"),
    ("migraine", "headache", True, "young", "Medicine", "Nervous system", "神经内科",
     "migraine", "偏头痛",
     "recurrent one-sided throbbing headache|nausea|sensitivity to light and sound|visual aura before the headache",
     "反复发作的单侧搏动性头痛|恶心|畏光畏声|头痛前出现视觉先兆",
     "clinical diagnosis based on the history and a normal neurological examination",
     "依据病史和正常的神经系统检查进行临床诊断",
     "NSAIDs or a triptan for attacks", "发作期使用非甾体抗炎药或曲普坦类药物",
     "a sudden thunderclap headache, fever with neck stiffness or new weakness",
     "突发雷击样头痛、发热伴颈项强直或新发肢体无力",
     "Keeping a headache diary helps identify triggers such as poor sleep or skipped meals.",
     "记录头痛日记有助于发现睡眠不足、进食不规律等诱因。"),
    ("epilepsy", "seizure", True, "young", "Medicine", "Nervous system", "神经内科",
     "epilepsy", "癫痫",
     "recurrent unprovoked seizures|brief loss of awareness|jerking of the limbs|confusion after the seizure",
     "反复无诱因的癫痫发作|短暂意识丧失|肢体抽搐|发作后意识模糊",
     "EEG and brain MRI", "脑电图和头颅MRI",
     "antiseizure medication chosen according to the seizure type", "根据发作类型选择抗癫痫发作药物",
     "a seizure lasting more than 5 minutes or repeated seizures without recovery in between",
     "发作持续超过5分钟或反复发作且发作间期意识未恢复",
     "During a seizure, place the person on their side and never put anything in their mouth.",
     "发作时应让患者侧卧，切勿往口中塞任何物品。"),
    ("ida", "anemia", True, "woman", "Medicine", "Haematology", "血液科",
     "iron deficiency anemia", "缺铁性贫血",
     "fatigue and pallor|breathlessness on exertion|brittle spoon-shaped nails|craving to eat ice",
     "乏力、面色苍白|活动后气短|指甲脆裂或呈匙状|异食癖",
     "complete blood count showing microcytic anemia and a low serum ferritin",
     "血常规示小细胞低色素性贫血，血清铁蛋白降低",
     "oral iron supplements and treatment of the underlying cause of blood loss",
     "口服铁剂并治疗失血等原发病因",
     "black stools, vomiting blood or chest pain", "黑便、呕血或胸痛",
     "In men and post-menopausal women, a source of blood loss in the gut must be looked for.",
     "成年男性和绝经后女性缺铁时应排查消化道失血。"),
    ("hypothyroid", "thyroid_lo", True, "woman", "Medicine", "Endocrinology", "内分泌科",
     "hypothyroidism", "甲状腺功能减退症",
     "cold intolerance|weight gain|constipation|dry skin and tiredness",
     "怕冷|体重增加|便秘|皮肤干燥、乏力",
     "raised TSH with a low free T4", "TSH升高伴游离T4降低",
     "levothyroxine replacement", "左甲状腺素替代治疗",
     "confusion, marked drowsiness or a low body temperature", "意识模糊、明显嗜睡或体温过低",
     "Hashimoto thyroiditis is the most common cause in iodine-sufficient areas.",
     "在碘充足地区，桥本甲状腺炎是最常见的病因。"),
    ("hyperthyroid", "af", True, "woman", "Medicine", "Endocrinology", "内分泌科",
     "hyperthyroidism", "甲状腺功能亢进症",
     "heat intolerance and sweating|weight loss despite a good appetite|palpitations|fine tremor of the hands",
     "怕热多汗|食欲亢进但体重下降|心悸|双手细颤",
     "low TSH with a raised free T4", "TSH降低伴游离T4升高",
     "an antithyroid drug such as methimazole, with a beta-blocker for symptoms",
     "甲巯咪唑等抗甲状腺药物，并用β受体阻滞剂控制症状",
     "high fever, agitation and a very fast heart rate", "高热、烦躁不安和心率极快",
     "Graves disease is the most common cause and may also cause bulging eyes.",
     "Graves病是最常见的病因，还可引起突眼。"),
    ("gerd", "acid", True, "adult", "Medicine", "Gastrointestinal system", "消化内科",
     "gastroesophageal reflux disease (GERD)", "胃食管反流病",
     "heartburn after meals|acid regurgitation|symptoms worse when lying down|chronic cough or hoarseness",
     "餐后烧心|反酸|平卧时症状加重|慢性咳嗽或声音嘶哑",
     "a trial of acid suppression, with endoscopy if alarm features are present",
     "抑酸治疗试验，有报警症状时行胃镜检查",
     "lifestyle changes and a proton pump inhibitor", "生活方式调整联合质子泵抑制剂",
     "difficulty swallowing, weight loss or vomiting blood", "吞咽困难、体重下降或呕血",
     "Avoiding late meals and raising the head of the bed can reduce night-time reflux.",
     "避免睡前进食、抬高床头可减少夜间反流。"),
    ("pud", "acid", True, "adult", "Medicine", "Gastrointestinal system", "消化内科",
     "peptic ulcer disease", "消化性溃疡",
     "burning upper abdominal pain related to meals|bloating|nausea|night-time pain relieved by food",
     "与进食相关的上腹部烧灼痛|腹胀|恶心|夜间痛、进食后缓解",
     "upper endoscopy and Helicobacter pylori testing", "胃镜检查和幽门螺杆菌检测",
     "a proton pump inhibitor plus Helicobacter pylori eradication therapy when positive",
     "质子泵抑制剂，幽门螺杆菌阳性者行根除治疗",
     "black tarry stools, vomiting blood or sudden severe abdominal pain", "柏油样黑便、呕血或突发剧烈腹痛",
     "Helicobacter pylori infection and NSAID use are the two main causes.",
     "幽门螺杆菌感染和服用非甾体抗炎药是两大主要病因。"),
    ("appendicitis", "appendix", True, "young", "Surgery", "Gastrointestinal surgery", "普通外科",
     "acute appendicitis", "急性阑尾炎",
     "pain starting around the navel and moving to the right lower abdomen|loss of appetite|nausea|low-grade fever",
     "疼痛始于脐周并转移至右下腹|食欲减退|恶心|低热",
     "clinical examination with ultrasound or CT of the abdomen", "体格检查结合腹部超声或CT",
     "appendectomy with perioperative antibiotics", "阑尾切除术并围手术期使用抗生素",
     "worsening pain, a rigid abdomen or high fever", "腹痛加重、腹肌强直或高热",
     "Tenderness at McBurney's point is a classic sign.", "麦氏点压痛是典型体征。"),
    ("pancreatitis", "pancreas", True, "adult", "Surgery", "Pancreas", "消化内科",
     "acute pancreatitis", "急性胰腺炎",
     "severe upper abdominal pain spreading to the back|nausea and vomiting|abdominal tenderness|fever",
     "剧烈上腹痛并向背部放射|恶心呕吐|腹部压痛|发热",
     "serum lipase or amylase at least three times the upper limit of normal",
     "血清脂肪酶或淀粉酶高于正常上限3倍以上",
     "intravenous fluids, pain relief and supportive care", "静脉补液、镇痛及支持治疗",
     "low blood pressure, breathing difficulty or confusion", "血压下降、呼吸困难或意识模糊",
     "Gallstones and heavy alcohol use are the most common causes.",
     "胆结石和大量饮酒是最常见的病因。"),
    ("cholecystitis", "biliary", True, "woman", "Surgery", "Gall bladder and bile ducts", "普通外科",
     "acute cholecystitis", "急性胆囊炎",
     "right upper abdominal pain after a fatty meal|fever|a positive Murphy sign|nausea",
     "进食油腻食物后右上腹痛|发热|墨菲征阳性|恶心",
     "abdominal ultrasound", "腹部超声",
     "antibiotics and early laparoscopic cholecystectomy", "抗生素治疗并早期行腹腔镜胆囊切除术",
     "yellow skin with fever and chills", "黄疸伴发热寒战",
     "Most cases are caused by a gallstone blocking the cystic duct.",
     "大多数病例由胆囊结石阻塞胆囊管引起。"),
    ("hbv", "liver", True, "adult", "Medicine", "Hepatobiliary system", "感染科",
     "chronic hepatitis B", "慢性乙型肝炎",
     "yellowing of the skin and eyes|fatigue|loss of appetite|discomfort in the right upper abdomen",
     "皮肤巩膜黄染|乏力|食欲减退|右上腹不适",
     "HBsAg, HBV DNA and liver function tests", "乙肝表面抗原（HBsAg）、HBV DNA和肝功能检查",
     "antiviral therapy with entecavir or tenofovir", "恩替卡韦或替诺福韦抗病毒治疗",
     "deepening jaundice, confusion or a swollen abdomen", "黄疸加深、意识模糊或腹部膨隆",
     "Vaccinating newborns is the most effective way to prevent hepatitis B.",
     "新生儿接种乙肝疫苗是预防乙型肝炎最有效的措施。"),
    ("cystitis", "uti", True, "woman", "Medicine", "Kidney and urinary tract", "泌尿外科",
     "uncomplicated cystitis", "急性单纯性膀胱炎",
     "burning pain when passing urine|urinary frequency and urgency|lower abdominal pain|cloudy urine",
     "排尿时烧灼痛|尿频尿急|下腹部疼痛|尿液浑浊",
     "urinalysis and urine culture", "尿常规和尿培养",
     "a short course of nitrofurantoin or fosfomycin", "短疗程呋喃妥因或磷霉素",
     "fever, flank pain or vomiting, suggesting a kidney infection", "发热、腰痛或呕吐，提示肾盂肾炎",
     "It is much more common in women because the urethra is shorter.",
     "由于尿道较短，女性更为常见。"),
    ("ckd", "raas", False, "older", "Medicine", "Kidney and urinary tract", "肾内科",
     "chronic kidney disease", "慢性肾脏病",
     "often no symptoms in early stages|swelling of the legs|foamy urine|tiredness and itching in later stages",
     "早期常无症状|下肢水肿|泡沫尿|晚期乏力、皮肤瘙痒",
     "eGFR and the urine albumin-to-creatinine ratio", "估算肾小球滤过率（eGFR）和尿白蛋白/肌酐比值",
     "blood pressure control with an ACE inhibitor or ARB plus an SGLT2 inhibitor",
     "ACEI或ARB控制血压，联合SGLT2抑制剂",
     "very little urine, severe breathlessness or confusion", "尿量明显减少、严重气促或意识模糊",
     "Diabetes and hypertension are the leading causes.", "糖尿病和高血压是主要病因。"),
    ("stones", "stone", True, "adult", "Surgery", "Urology", "泌尿外科",
     "kidney stones", "肾结石",
     "sudden severe colicky flank pain spreading to the groin|blood in the urine|nausea|restlessness",
     "突发剧烈腰部绞痛并向腹股沟放射|血尿|恶心|辗转不安",
     "non-contrast CT of the abdomen and pelvis", "腹部及盆腔CT平扫",
     "NSAID pain relief, fluids and an alpha-blocker for distal ureteral stones",
     "非甾体抗炎药镇痛、多饮水，输尿管远端结石可用α受体阻滞剂",
     "fever with the pain, or no urine output", "疼痛伴发热或无尿",
     "Drinking enough water to pass about 2.5 litres of urine a day helps prevent recurrence.",
     "每日饮水使尿量达到约2.5升有助于预防复发。"),
    ("gout", "gout", True, "man", "Medicine", "Rheumatology", "风湿免疫科",
     "gout", "痛风",
     "sudden painful red swollen big toe joint|attacks often starting at night|warmth over the joint|tophi in chronic cases",
     "突发第一跖趾关节红肿热痛|常在夜间发作|关节皮温升高|慢性期出现痛风石",
     "joint fluid showing needle-shaped urate crystals, with serum uric acid",
     "关节液中见针状尿酸盐结晶，并测定血尿酸",
     "NSAIDs, colchicine or corticosteroids for flares, and allopurinol for long-term urate lowering",
     "急性发作用非甾体抗炎药、秋水仙碱或糖皮质激素，长期降尿酸用别嘌醇",
     "a hot swollen joint with fever, which may be septic arthritis", "关节红肿伴发热，需警惕化脓性关节炎",
     "Alcohol, red meat and sugary drinks can trigger attacks.",
     "饮酒、红肉和含糖饮料可诱发发作。"),
    ("ra", "ra", True, "woman", "Medicine", "Rheumatology", "风湿免疫科",
     "rheumatoid arthritis", "类风湿关节炎",
     "symmetric pain and swelling of the small joints of the hands|morning stiffness lasting more than one hour|fatigue|rheumatoid nodules",
     "双手小关节对称性肿痛|晨僵持续超过1小时|乏力|类风湿结节",
     "rheumatoid factor and anti-CCP antibodies", "类风湿因子和抗CCP抗体",
     "methotrexate as the first disease-modifying drug", "甲氨蝶呤作为首选改善病情抗风湿药",
     "a single hot swollen joint with fever or sudden breathlessness", "单个关节红肿伴发热或突发气促",
     "Starting treatment early prevents permanent joint damage.", "早期治疗可防止关节永久性损害。"),
    ("oa", "oa", True, "older", "Orthopaedics", "Joints", "骨科",
     "osteoarthritis", "骨关节炎",
     "joint pain that worsens with use|morning stiffness lasting under 30 minutes|crepitus|knee or hip involvement",
     "活动后加重的关节疼痛|晨僵时间短于30分钟|关节摩擦音|多累及膝关节或髋关节",
     "plain X-ray showing joint space narrowing and osteophytes", "X线片示关节间隙狭窄和骨赘形成",
     "exercise, weight loss and topical or oral NSAIDs", "运动锻炼、减轻体重及外用或口服非甾体抗炎药",
     "a hot red swollen joint with fever or an inability to bear weight", "关节红肿发热或无法负重",
     "Strengthening the muscles around the knee reduces pain.", "加强膝关节周围肌肉力量可减轻疼痛。"),
    ("osteoporosis", "bone", False, "older", "Orthopaedics", "Bone", "内分泌科",
     "osteoporosis", "骨质疏松症",
     "no symptoms until a fracture occurs|loss of height|stooped posture|fractures after minor falls",
     "骨折前常无症状|身高变矮|驼背|轻微跌倒即发生骨折",
     "a DXA bone density scan with a T-score of -2.5 or lower",
     "双能X线吸收法（DXA）骨密度检查，T值≤-2.5",
     "calcium and vitamin D with a bisphosphonate such as alendronate",
     "钙剂和维生素D，联合阿仑膦酸钠等双膦酸盐",
     "sudden severe back pain after a minor strain", "轻微用力后突发剧烈背痛",
     "Weight-bearing exercise and fall prevention reduce fracture risk.",
     "负重运动和预防跌倒可降低骨折风险。"),
    ("tb", "tb", True, "adult", "Medicine", "Respiratory system", "感染科",
     "pulmonary tuberculosis", "肺结核",
     "cough lasting more than two weeks|night sweats|weight loss|coughing up blood",
     "咳嗽超过两周|盗汗|体重下降|咯血",
     "sputum smear, culture and molecular testing such as Xpert MTB/RIF, with a chest X-ray",
     "痰涂片、痰培养及Xpert MTB/RIF等分子检测，并行胸部X线检查",
     "a six-month regimen starting with isoniazid, rifampicin, pyrazinamide and ethambutol",
     "以异烟肼、利福平、吡嗪酰胺和乙胺丁醇开始的6个月标准方案",
     "coughing up large amounts of blood or severe breathlessness", "大咯血或严重呼吸困难",
     "The full course must be taken to prevent drug resistance.", "必须足疗程规律服药，以防产生耐药。"),
    ("influenza", "resp_inf", True, "adult", "Medicine", "Infectious diseases", "感染科",
     "influenza", "流行性感冒",
     "sudden high fever|muscle aches|dry cough and sore throat|marked tiredness",
     "突发高热|全身肌肉酸痛|干咳、咽痛|明显乏力",
     "rapid influenza antigen or PCR testing of a nasal swab", "鼻咽拭子快速流感抗原或PCR检测",
     "rest and fluids, with oseltamivir for severe illness or high-risk patients",
     "休息补液，重症或高危人群使用奥司他韦",
     "difficulty breathing, chest pain, confusion or fever that returns after improving",
     "呼吸困难、胸痛、意识模糊或热退后再次发热",
     "Annual vaccination is the best prevention.", "每年接种流感疫苗是最好的预防方法。"),
    ("meningitis", "sev_inf", True, "young", "Medicine", "Infectious diseases", "神经内科",
     "bacterial meningitis", "细菌性脑膜炎",
     "fever with severe headache|neck stiffness|confusion|sensitivity to light",
     "发热伴剧烈头痛|颈项强直|意识障碍|畏光",
     "lumbar puncture for CSF analysis with blood cultures", "腰椎穿刺脑脊液检查及血培养",
     "immediate intravenous ceftriaxone with vancomycin, plus dexamethasone",
     "立即静脉使用头孢曲松联合万古霉素，并加用地塞米松",
     "fever with neck stiffness or a rash that does not fade under pressure",
     "发热伴颈项强直或压之不褪色的皮疹",
     "Antibiotics must not be delayed while waiting for tests.", "不能因等待检查而延误抗生素治疗。"),
    ("sepsis", "sev_inf", True, "older", "Medicine", "Infectious diseases", "重症医学科",
     "sepsis", "脓毒症",
     "fever or a low temperature with a fast heart rate|rapid breathing|new confusion|low blood pressure",
     "发热或体温过低伴心率增快|呼吸急促|新发意识改变|血压下降",
     "blood cultures and serum lactate", "血培养和血乳酸",
     "broad-spectrum antibiotics within one hour and intravenous fluids", "1小时内使用广谱抗生素并静脉补液",
     "mottled skin, very little urine or worsening confusion", "皮肤花斑、尿量极少或意识障碍加重",
     "Sepsis is life-threatening organ dysfunction caused by a dysregulated response to infection.",
     "脓毒症是宿主对感染反应失调导致的危及生命的器官功能障碍。"),
    ("depression", "psych", True, "adult", "Psychiatry", "Mood disorders", "精神科",
     "major depressive disorder", "抑郁症",
     "low mood for at least two weeks|loss of interest or pleasure|changes in sleep and appetite|feelings of worthlessness",
     "情绪低落持续至少两周|兴趣或愉快感丧失|睡眠和食欲改变|无价值感",
     "a clinical interview supported by the PHQ-9 questionnaire", "临床访谈，辅以PHQ-9量表评估",
     "psychotherapy and/or an SSRI antidepressant", "心理治疗和/或SSRI类抗抑郁药",
     "thoughts of suicide or self-harm", "有自杀或自伤念头",
     "Regular exercise and sleep support recovery.", "规律运动和睡眠有助于康复。"),
    ("gad", "psych", True, "adult", "Psychiatry", "Anxiety disorders", "精神科",
     "generalized anxiety disorder", "广泛性焦虑障碍",
     "excessive worry on most days for at least six months|restlessness|poor sleep|muscle tension",
     "至少6个月的大多数日子里过度担忧|坐立不安|睡眠差|肌肉紧张",
     "a clinical interview supported by the GAD-7 questionnaire", "临床访谈，辅以GAD-7量表评估",
     "cognitive behavioural therapy and/or an SSRI", "认知行为治疗和/或SSRI类药物",
     "thoughts of suicide, or chest pain that needs a heart check", "有自杀念头，或出现需排查心脏病的胸痛",
     "Caffeine and alcohol can make anxiety worse.", "咖啡因和酒精会加重焦虑。"),
    ("rhinitis", "allergy", True, "young", "ENT", "Nose", "耳鼻咽喉科",
     "allergic rhinitis", "过敏性鼻炎",
     "repeated sneezing|an itchy runny nose|nasal congestion|itchy watery eyes",
     "反复打喷嚏|鼻痒流清涕|鼻塞|眼痒流泪",
     "skin prick testing or specific IgE blood tests", "皮肤点刺试验或血清特异性IgE检测",
     "allergen avoidance and an intranasal corticosteroid spray, with oral antihistamines if needed",
     "避免接触过敏原，使用鼻用糖皮质激素，必要时加用口服抗组胺药",
     "wheezing or difficulty breathing", "喘息或呼吸困难",
     "Allergic rhinitis and asthma often occur together.", "过敏性鼻炎常与哮喘合并存在。"),
    ("anaphylaxis", "allergy", True, "young", "Medicine", "Emergency medicine", "急诊科",
     "anaphylaxis", "过敏性休克",
     "hives and swelling of the lips or throat within minutes of exposure|wheezing|dizziness from low blood pressure|vomiting",
     "接触过敏原数分钟内出现荨麻疹及口唇或喉头水肿|喘息|低血压导致头晕|呕吐",
     "a clinical diagnosis made at the bedside without waiting for tests", "依据临床表现床旁诊断，不应等待检查结果",
     "immediate intramuscular adrenaline (epinephrine) into the outer thigh", "立即于大腿外侧肌内注射肾上腺素",
     "any throat swelling, breathing difficulty or fainting after an exposure",
     "接触过敏原后出现喉头水肿、呼吸困难或晕厥",
     "Antihistamines do not replace adrenaline in anaphylaxis.", "抗组胺药不能替代肾上腺素治疗过敏性休克。"),
    ("otitis", "resp_inf", True, "child", "Pediatrics", "ENT infections", "儿科",
     "acute otitis media", "急性中耳炎",
     "ear pain in a young child|fever|irritability and tugging at the ear|a bulging red eardrum",
     "幼儿耳痛|发热|哭闹、抓耳|鼓膜充血膨隆",
     "otoscopy showing a bulging tympanic membrane", "耳镜检查见鼓膜膨隆",
     "pain relief, with amoxicillin when antibiotics are indicated", "镇痛治疗，需要抗生素时首选阿莫西林",
     "swelling behind the ear, a stiff neck or drowsiness", "耳后肿胀、颈项强直或嗜睡",
     "Many mild cases in older children improve on their own within a few days.",
     "许多年龄较大儿童的轻症病例可在数天内自行好转。"),
    ("strep", "resp_inf", True, "teen", "ENT", "Pharynx", "耳鼻咽喉科",
     "streptococcal pharyngitis", "链球菌性咽炎",
     "sore throat with fever and no cough|white patches on the tonsils|tender swollen neck glands|painful swallowing",
     "咽痛伴发热且无咳嗽|扁桃体白色渗出物|颈前淋巴结肿大压痛|吞咽痛",
     "a rapid antigen detection test or throat culture", "快速抗原检测或咽拭子培养",
     "penicillin or amoxicillin for 10 days", "青霉素或阿莫西林治疗10天",
     "drooling, inability to open the mouth or difficulty breathing", "流涎、张口困难或呼吸困难",
     "Treatment helps prevent rheumatic fever.", "规范治疗有助于预防风湿热。"),
    ("dvt", "vte", True, "adult", "Surgery", "Vascular surgery", "血管外科",
     "deep vein thrombosis", "深静脉血栓形成",
     "swelling of one leg|calf pain and tenderness|warmth and redness of the leg|visible surface veins",
     "单侧下肢肿胀|小腿疼痛和压痛|下肢皮温升高、发红|浅静脉显露",
     "D-dimer and compression ultrasound of the leg veins", "D-二聚体和下肢静脉加压超声",
     "anticoagulation with a direct oral anticoagulant or low-molecular-weight heparin",
     "直接口服抗凝药或低分子肝素抗凝治疗",
     "sudden breathlessness or chest pain, which may mean a clot in the lung",
     "突发气促或胸痛，提示可能发生肺栓塞",
     "Long flights, surgery, cancer and immobility raise the risk.",
     "长途飞行、手术、肿瘤和长期制动会增加风险。"),
    ("pe", "vte", True, "adult", "Medicine", "Respiratory system", "呼吸内科",
     "pulmonary embolism", "肺栓塞",
     "sudden breathlessness|sharp chest pain on breathing in|a fast heart rate|coughing up blood",
     "突发呼吸困难|吸气时胸部锐痛|心动过速|咯血",
     "CT pulmonary angiography", "CT肺动脉造影（CTPA）",
     "anticoagulation, with thrombolysis if there is shock", "抗凝治疗，合并休克时溶栓",
     "fainting, low blood pressure or severe breathlessness", "晕厥、血压下降或严重呼吸困难",
     "Most pulmonary emboli start as a deep vein thrombosis in the legs.",
     "大多数肺栓塞的血栓来源于下肢深静脉。"),
    ("preeclampsia", "obs", True, "pregnant", "Gynaecology & Obstetrics", "Hypertensive disorders of pregnancy",
     "妇产科",
     "preeclampsia", "子痫前期",
     "new high blood pressure after 20 weeks of pregnancy|protein in the urine|severe headache|blurred vision",
     "妊娠20周后新发高血压|蛋白尿|剧烈头痛|视物模糊",
     "blood pressure monitoring and urine protein testing", "血压监测和尿蛋白检测",
     "close monitoring, antihypertensives, magnesium sulfate to prevent seizures in severe disease, and delivery as the definitive treatment",
     "严密监测、降压治疗，重度者用硫酸镁预防抽搐，终止妊娠是根本治疗",
     "severe headache, visual changes, upper abdominal pain or seizures", "剧烈头痛、视觉改变、上腹痛或抽搐",
     "Low-dose aspirin started between 12 and 16 weeks lowers the risk in high-risk women.",
     "高危孕妇自妊娠12至16周开始服用小剂量阿司匹林可降低发病风险。"),
    ("hyperlipidemia", "cad", False, "adult", "Medicine", "Cardiovascular system", "心血管内科",
     "hypercholesterolemia", "高胆固醇血症",
     "usually no symptoms|yellow deposits around the eyelids|tendon xanthomas in familial cases|early heart disease in the family",
     "通常无症状|眼睑黄色瘤|家族性病例可见肌腱黄色瘤|家族中有早发心血管病",
     "a fasting lipid profile", "空腹血脂检查",
     "lifestyle changes plus a statin", "生活方式干预联合他汀类药物",
     "chest pain or sudden weakness of one side of the body", "胸痛或突发一侧肢体无力",
     "Lowering LDL cholesterol reduces heart attacks and strokes.",
     "降低低密度脂蛋白胆固醇可减少心肌梗死和卒中。"),
    ("parkinson", "pd", True, "older", "Medicine", "Nervous system", "神经内科",
     "Parkinson's disease", "帕金森病",
     "resting tremor of one hand|slowness of movement|muscle rigidity|a shuffling gait",
     "一侧手部静止性震颤|运动迟缓|肌强直|小碎步步态",
     "a clinical diagnosis by a neurologist based on the motor signs", "由神经科医生根据运动症状进行临床诊断",
     "levodopa combined with a decarboxylase inhibitor such as carbidopa", "左旋多巴复方制剂",
     "frequent falls, choking when swallowing or sudden confusion", "反复跌倒、吞咽呛咳或突发意识混乱",
     "Regular exercise helps maintain mobility.", "规律运动有助于保持活动能力。"),
]

CONDS = []
for _r in _ROWS:
    assert len(_r) == len(FIELDS), _r[0]
    _c = dict(zip(FIELDS, _r))
    _c["en_sym"] = _c["en_sym"].split("|")
    _c["zh_sym"] = _c["zh_sym"].split("|")
    assert len(_c["en_sym"]) == 4 and len(_c["zh_sym"]) == 4, _c["key"]
    CONDS.append(_c)

DEPT_EN = {
    "心血管内科": "cardiology", "内分泌科": "endocrinology", "呼吸内科": "respiratory medicine",
    "神经内科": "neurology", "血液科": "haematology", "消化内科": "gastroenterology",
    "普通外科": "general surgery", "感染科": "infectious diseases", "泌尿外科": "urology",
    "肾内科": "nephrology", "风湿免疫科": "rheumatology", "骨科": "orthopaedics",
    "重症医学科": "critical care", "精神科": "psychiatry", "耳鼻咽喉科": "ENT",
    "急诊科": "emergency medicine", "儿科": "paediatrics", "血管外科": "vascular surgery",
    "妇产科": "obstetrics",
}
DISCIPLINE_ZH = {  # CMExam "Medical Discipline"
    "Medicine": "内科学", "Surgery": "外科学", "Orthopaedics": "外科学", "Pediatrics": "儿科学",
    "Psychiatry": "精神病学", "ENT": "耳鼻咽喉科学", "Gynaecology & Obstetrics": "妇产科学",
}


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def cap_opt(s: str) -> str:
    """Capitalise an English option unless it starts with an acronym such as eGFR."""
    return cap(s) if s[1:2].islower() or s[1:2] == " " else s


def en_list(items):
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def zh_list(items):
    return "、".join(items)


def demographic(rng, c, lang):
    who = c["who"]
    if who == "child":
        age, sex = rng.randint(1, 5), rng.choice("mf")
    elif who == "teen":
        age, sex = rng.randint(8, 19), rng.choice("mf")
    elif who == "young":
        age, sex = rng.randint(18, 35), rng.choice("mf")
    elif who == "older":
        age, sex = rng.randint(62, 82), rng.choice("mf")
    elif who == "woman":
        age, sex = rng.randint(25, 60), "f"
    elif who == "man":
        age, sex = rng.randint(40, 65), "m"
    elif who == "pregnant":
        age, sex = rng.randint(22, 38), "p"
    else:
        age, sex = rng.randint(30, 60), rng.choice("mf")
    if lang == "en":
        noun = {"m": "man", "f": "woman", "p": "woman"}[sex]
        if age < 13:
            noun = "boy" if sex == "m" else "girl"
        extra = f" who is {rng.randint(30, 36)} weeks pregnant" if sex == "p" else ""
        return f"{age}-year-old {noun}{extra}"
    s = "男" if sex == "m" else "女"
    extra = f"，妊娠{rng.randint(30, 36)}周" if sex == "p" else ""
    return f"{s}，{age}岁{extra}"


def others(rng, c, k, field=None, pool=None):
    """k distinct conditions from other groups (with distinct `field` values)."""
    cands = [o for o in (pool or CONDS) if o["group"] != c["group"]]
    rng.shuffle(cands)
    out, seen = [], {c[field]} if field else set()
    for o in cands:
        key = o[field] if field else o["key"]
        if key in seen:
            continue
        seen.add(key)
        out.append(o)
        if len(out) == k:
            break
    assert len(out) == k
    return out


# --------------------------------------------------------------------------------------
# Writers (byte conventions of the published files)
# --------------------------------------------------------------------------------------
def write_bytes(name, data: bytes):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def write_jsonl(name, rows):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_bytes(name, text.encode("utf-8"))


def write_json(name, obj, indent=2):
    write_bytes(name, (json.dumps(obj, ensure_ascii=False, indent=indent) + "\n").encode("utf-8"))


def write_csv(name, header, rows, bom=False):
    buf = io.StringIO(newline="")
    w = csv.writer(buf, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(r)
    write_bytes(name, buf.getvalue().encode("utf-8-sig" if bom else "utf-8"))


# --------------------------------------------------------------------------------------
# 1. pretrain.jsonl
# --------------------------------------------------------------------------------------
def para_en(rng, c, t):
    """Returns (sentences, drop order) so over-long paragraphs can shed optional sentences."""
    n, s, dept = c["en"], c["en_sym"], DEPT_EN[c["dept_zh"]]
    if t == 0:
        return ([f"{cap(n)} is a common condition managed in {dept}.",
                 f"Typical features include {en_list(s)}.",
                 f"The key investigation is {c['en_test']}.",
                 f"First-line management is {c['en_tx']}.",
                 c["en_note"],
                 f"Patients should seek urgent medical care if they develop {c['en_red']}."], [4, 0])
    if t == 1:
        return ([f"Clinical summary: {n}.", f"Symptoms: {', '.join(s)}.", f"Diagnosis: {c['en_test']}.",
                 f"Treatment: {c['en_tx']}.", f"Warning signs: {c['en_red']}.", f"Note: {c['en_note']}"], [5])
    if t == 2:
        return ([f"If you have been told you have {n}, it helps to know the usual course.",
                 f"Most people notice {s[0]}, often with {s[1]}.",
                 f"Doctors confirm it with {c['en_test']}, and the usual first-line treatment is {c['en_tx']}.",
                 c["en_note"],
                 f"Do not wait at home if you notice {c['en_red']}: go to an emergency department or call for help."],
                [3, 0])
    if t == 3:
        who = demographic(rng, c, "en")
        return ([f"Case: a {who} presented with {s[0]}, {s[1]} and {s[2]}.",
                 f"Examination and {c['en_test']} confirmed {n}.",
                 f"The patient was started on {c['en_tx']}.",
                 c["en_note"],
                 f"Before discharge the patient was told to return immediately in case of {c['en_red']}."], [3])
    o = others(rng, c, 1, pool=[x for x in CONDS if x["dx"]])[0]
    return ([f"{cap(n)} and {o['en']} are both seen in everyday practice but differ clearly.",
             f"{cap(n)} typically presents with {s[0]} and {s[1]}, whereas {o['en']} presents with "
             f"{o['en_sym'][0]} and {o['en_sym'][1]}.",
             f"{cap(n)} is confirmed by {c['en_test']}; {o['en']} by {o['en_test']}.",
             f"First-line treatment of {n} is {c['en_tx']}, while {o['en']} is treated with {o['en_tx']}."],
            [0, 2])


def para_zh(rng, c, t):
    n, s, dept = c["zh"], c["zh_sym"], c["dept_zh"]
    if t == 0:
        return (f"{n}是{dept}常见疾病。典型表现包括{zh_list(s)}。关键检查是{c['zh_test']}。"
                f"一线治疗为{c['zh_tx']}。{c['zh_note']}如出现{c['zh_red']}，应立即就医。"
                f"{n}的诊断需要结合病史、体格检查和{c['zh_test']}综合判断。")
    if t == 1:
        return (f"临床要点：{n}。症状：{zh_list(s)}。诊断：{c['zh_test']}。治疗：{c['zh_tx']}。"
                f"警示信号：{c['zh_red']}。备注：{c['zh_note']}治疗期间应定期随访，评估疗效和不良反应。")
    if t == 2:
        return (f"如果医生告诉您患有{n}，了解疾病的一般规律会有帮助。大多数患者会出现{s[0]}，"
                f"常伴有{s[1]}和{s[2]}。医生通常通过{c['zh_test']}来确诊，一线治疗为{c['zh_tx']}。"
                f"{c['zh_note']}如果出现{c['zh_red']}，不要在家等待，应立即前往急诊或拨打急救电话。")
    if t == 3:
        who = demographic(rng, c, "zh")
        return (f"病例：患者，{who}，因{s[0]}、{s[1]}、{s[2]}就诊。经体格检查和{c['zh_test']}，"
                f"诊断为{n}。给予{c['zh_tx']}。{c['zh_note']}出院时告知患者，如出现{c['zh_red']}，"
                f"须立即返院就诊。随访时应复查相关指标并评估病情变化。")
    o = others(rng, c, 1, pool=[x for x in CONDS if x["dx"]])[0]
    return (f"{n}与{o['zh']}在临床上都较常见，但表现明显不同。{n}典型表现为{s[0]}和{s[1]}，"
            f"而{o['zh']}表现为{o['zh_sym'][0]}和{o['zh_sym'][1]}。{n}依靠{c['zh_test']}确诊，"
            f"{o['zh']}则依靠{o['zh_test']}。{n}的一线治疗是{c['zh_tx']}，"
            f"{o['zh']}的一线治疗是{o['zh_tx']}。")


ZH_PAD = ["早期识别和规范治疗可以改善预后。", "患者应遵医嘱用药，不要自行停药或更改剂量。",
          "健康的生活方式对预防和控制疾病都很重要。", "如对病情或用药有疑问，应及时咨询医生或药师。",
          "家属也应了解相关警示信号，以便及时送医。"]
EN_PAD = ["Early recognition and guideline-based treatment improve outcomes.",
          "Patients should take medicines as prescribed and not stop them without advice.",
          "Family members should also know the warning signs so that help is sought early."]


def make_pretrain(rng):
    # conditions that are usually silent get only the summary templates (0, 1)
    combos = [(c, lang, t) for c in CONDS for lang in ("en", "zh") for t in range(5)
              if c["dx"] or t < 2]
    rng.shuffle(combos)
    combos = combos[:300]
    rows = []
    for c, lang, t in combos:
        if lang == "en":
            sents, drop = para_en(rng, c, t)
            for i in drop:
                if len(" ".join(x for x in sents if x)) <= 600:
                    break
                sents[i] = ""
            text = " ".join(x for x in sents if x)
        else:
            text = para_zh(rng, c, t)
        pads = EN_PAD if lang == "en" else ZH_PAD
        i = 0
        while len(text) < 200 and i < len(pads):
            text += ("" if lang == "zh" else " ") + pads[i]
            i += 1
        rows.append({"text": text})
    return rows


# --------------------------------------------------------------------------------------
# 2. sft_alpaca.json
# --------------------------------------------------------------------------------------
def alpaca_item(rng, c, lang, kind):
    if lang == "en":
        n, s = c["en"], c["en_sym"]
        if kind == 0:
            ins = rng.choice([f"What is the first-line treatment for {n}?",
                              f"How is {n} usually treated?"])
            out = (f"First-line management of {n} is {c['en_tx']}. {c['en_note']} "
                   f"Seek urgent medical care if {c['en_red']} develops.")
            return ins, "", out
        if kind == 1:
            ins = rng.choice([f"List the typical symptoms of {n}.", f"What are the main symptoms of {n}?"])
            out = (f"Typical symptoms of {n} include:\n" + "\n".join(f"- {x}" for x in s)
                   + f"\nWarning signs that need urgent care: {c['en_red']}.")
            return ins, "", out
        if kind == 2:
            ins = rng.choice([f"How is {n} diagnosed?", f"Which test confirms {n}?"])
            why = (f"is suspected from {s[0]} and {s[1]}" if c["dx"]
                   else "often causes few symptoms and is found on routine checks")
            out = (f"{cap(n)} {why}, and the key investigation is "
                   f"{c['en_test']}. Once confirmed, first-line treatment is {c['en_tx']}.")
            return ins, "", out
        if kind == 3:
            ins = "Based on the patient description below, give the most likely diagnosis and the next step."
            inp = f"A {demographic(rng, c, 'en')} has {s[0]}, {s[1]} and {s[2]}."
            out = (f"Most likely diagnosis: {n}.\nNext step: {c['en_test']}.\n"
                   f"Treatment: {c['en_tx']}.\nRed flags: {c['en_red']}.")
            return ins, inp, out
        ins = rng.choice([f"Which warning signs in {n} need emergency care?",
                          f"When should a patient with {n} go to the emergency department?"])
        out = (f"A patient with {n} should seek emergency care for {c['en_red']}. "
               f"Otherwise, the condition is managed with {c['en_tx']} and regular follow-up.")
        return ins, "", out
    n, s = c["zh"], c["zh_sym"]
    if kind == 0:
        ins = rng.choice([f"{n}的一线治疗是什么？", f"{n}通常如何治疗？"])
        out = f"{n}的一线治疗为{c['zh_tx']}。{c['zh_note']}如出现{c['zh_red']}，应立即就医。"
        return ins, "", out
    if kind == 1:
        ins = rng.choice([f"请列出{n}的典型症状。", f"{n}有哪些主要表现？"])
        out = (f"{n}的典型症状包括：\n" + "\n".join(f"- {x}" for x in s)
               + f"\n需要紧急就医的警示信号：{c['zh_red']}。")
        return ins, "", out
    if kind == 2:
        ins = rng.choice([f"{n}如何诊断？", f"哪项检查可以确诊{n}？"])
        why = f"出现{s[0]}和{s[1]}时应怀疑{n}" if c["dx"] else f"{n}常无明显症状，多在体检时发现"
        out = f"{why}，关键检查是{c['zh_test']}。确诊后一线治疗为{c['zh_tx']}。"
        return ins, "", out
    if kind == 3:
        ins = "根据以下患者描述，给出最可能的诊断和下一步处理。"
        inp = f"患者，{demographic(rng, c, 'zh')}，出现{s[0]}、{s[1]}和{s[2]}。"
        out = (f"最可能的诊断：{n}。\n下一步：{c['zh_test']}。\n治疗：{c['zh_tx']}。\n"
               f"警示信号：{c['zh_red']}。")
        return ins, inp, out
    ins = rng.choice([f"{n}患者出现哪些情况需要急诊？", f"{n}患者什么时候应该去急诊？"])
    out = f"{n}患者如出现{c['zh_red']}，应立即急诊就医。其余情况以{c['zh_tx']}为主，并定期随访。"
    return ins, "", out


def make_alpaca(rng):
    combos = [(c, lang, k) for c in CONDS for lang in ("en", "zh") for k in range(5)
              if not (k == 3 and not c["dx"])]
    rng.shuffle(combos)
    rows = []
    for c, lang, k in combos[:200]:
        ins, inp, out = alpaca_item(rng, c, lang, k)
        rows.append({"instruction": ins, "input": inp, "output": out})
    return rows


# --------------------------------------------------------------------------------------
# 3. sft_sharegpt.json
# --------------------------------------------------------------------------------------
SYS_EN = "You are a careful medical assistant. Give general information and advise seeing a doctor when needed."
SYS_ZH = "你是一名谨慎的医疗助手。请提供一般性医学信息，必要时建议患者就医。"
ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def make_sharegpt(rng):
    pool = [c for c in CONDS if c["dx"]]
    rows, used = [], set()
    for i in range(100):
        c = pool[i % len(pool)] if i < len(pool) else rng.choice(pool)
        lang = "en" if i % 2 == 0 else "zh"
        while True:
            cid = "".join(rng.choice(ALNUM) for _ in range(7)) + "_0"
            if cid not in used:
                used.add(cid)
                break
        conv = []
        if rng.random() < 0.15:
            conv.append({"from": "system", "value": SYS_EN if lang == "en" else SYS_ZH})
        three = rng.random() < 0.6
        if lang == "en":
            n, s = c["en"], c["en_sym"]
            conv += [
                {"from": "human", "value": rng.choice([
                    f"Hello doctor, for the past few days I have had {s[0]} and {s[1]}. What could it be?",
                    f"I'm worried. I have {s[0]} and also {s[1]}. Should I be concerned?"])},
                {"from": "gpt", "value": (
                    f"I'm sorry you're feeling unwell. A few questions: do you also have {s[2]}? "
                    f"Any {s[3]}? These symptoms can fit {n}, but a doctor needs to confirm it with "
                    f"{c['en_test']}.")},
                {"from": "human", "value": f"Yes, I do have {s[2]}. What treatment is usually used?"},
                {"from": "gpt", "value": (
                    f"If {n} is confirmed, first-line treatment is usually {c['en_tx']}. "
                    f"Please see a doctor before starting any treatment so it fits your situation.")},
            ]
            if three:
                conv += [
                    {"from": "human", "value": "When should I go to the emergency department?"},
                    {"from": "gpt", "value": f"Go immediately if you notice {c['en_red']}. {c['en_note']}"},
                ]
        else:
            n, s = c["zh"], c["zh_sym"]
            conv += [
                {"from": "human", "value": rng.choice([
                    f"医生您好，我最近几天出现{s[0]}，还有{s[1]}，这是怎么回事？",
                    f"我有点担心，最近{s[0]}，同时{s[1]}，需要注意什么？"])},
                {"from": "gpt", "value": (
                    f"您好，请问您是否还有{s[2]}？有没有{s[3]}？这些症状可能符合{n}，"
                    f"但需要医生通过{c['zh_test']}来确认。")},
                {"from": "human", "value": f"是的，我也有{s[2]}。一般怎么治疗？"},
                {"from": "gpt", "value": (
                    f"如果确诊为{n}，一线治疗通常是{c['zh_tx']}。请先到医院就诊，由医生根据您的情况制定方案。")},
            ]
            if three:
                conv += [
                    {"from": "human", "value": "什么情况下需要去急诊？"},
                    {"from": "gpt", "value": f"如果出现{c['zh_red']}，请立即去急诊。{c['zh_note']}"},
                ]
        rows.append({"id": cid, "conversations": conv})
    return rows


# --------------------------------------------------------------------------------------
# 4. preference.jsonl
# --------------------------------------------------------------------------------------
# procedures/emergency treatments make implausible "wrong" answers; rejected answers draw on drugs
PREF_WRONG_POOL = [c for c in CONDS if c["key"] not in
                   {"mi", "stroke", "appendicitis", "cholecystitis", "preeclampsia", "sepsis", "meningitis", "pe"}]


def pref_item(rng, c, lang, kind):
    o = others(rng, c, 1, field="en_tx", pool=PREF_WRONG_POOL)[0]
    if lang == "en":
        n, s = c["en"], c["en_sym"]
        if kind == 0:
            prompt = rng.choice([f"I have {s[0]} and {s[1]}. What could this be and how is it treated?",
                                 f"What might cause {s[0]} with {s[1]}, and what is the treatment?"])
            chosen = (f"This could be {n}. It is confirmed with {c['en_test']}, and first-line treatment is "
                      f"{c['en_tx']}. Please see a doctor to confirm it, and get emergency care if you notice "
                      f"{c['en_red']}.")
            rejected = (f"This is probably {n}. You do not need any tests; just use {o['en_tx']}. There is "
                        f"no need to see a doctor, and even {c['en_red']} usually settles on its own.")
        elif kind == 1:
            prompt = f"My doctor says I have {n}. What is the first-line treatment?"
            chosen = (f"First-line treatment for {n} is {c['en_tx']}. Your doctor will tailor it to you. "
                      f"Seek urgent care if you develop {c['en_red']}.")
            rejected = (f"The best treatment for {n} is {o['en_tx']}. You can start it yourself without "
                        f"asking your doctor, and warning signs are rarely worth worrying about.")
        else:
            red = c["en_red"]
            prompt = f"I have {n} and now I have {red}. Can I wait until next week to see someone?"
            chosen = (f"No. With {n}, {red} can signal a serious complication. Please seek emergency care "
                      f"now or call an ambulance; do not wait.")
            rejected = (f"Yes, waiting a week is fine. With {n}, {red} is common and harmless. Rest at home "
                        f"and use {o['en_tx']} if it bothers you.")
    else:
        n, s = c["zh"], c["zh_sym"]
        if kind == 0:
            prompt = rng.choice([f"我出现了{s[0]}和{s[1]}，可能是什么病？怎么治疗？",
                                 f"{s[0]}伴{s[1]}是什么原因？应该怎么治？"])
            chosen = (f"这可能是{n}。需要通过{c['zh_test']}确诊，一线治疗为{c['zh_tx']}。"
                      f"请及时就医确认，如出现{c['zh_red']}，应立即急诊。")
            rejected = (f"这多半是{n}。不需要做任何检查，直接使用{o['zh_tx']}就行。"
                        f"没必要去医院，即使出现{c['zh_red']}也会自己好。")
        elif kind == 1:
            prompt = f"医生说我得了{n}，一线治疗是什么？"
            chosen = f"{n}的一线治疗是{c['zh_tx']}，医生会根据您的情况调整。如出现{c['zh_red']}，请立即就医。"
            rejected = f"{n}最好的治疗是{o['zh_tx']}。您可以自己开始用，不必咨询医生，警示症状一般不用担心。"
        else:
            red = c["zh_red"]
            prompt = f"我有{n}，现在出现了{red}，可以等到下周再看医生吗？"
            chosen = f"不可以。{n}患者出现{red}可能提示严重并发症，请立即急诊或拨打急救电话，不要等待。"
            rejected = f"可以，等一周没问题。{n}患者出现{red}很常见，也没有危害，在家休息，不舒服时用{o['zh_tx']}即可。"
    return prompt, chosen, rejected


def make_preference(rng):
    combos = [(c, lang, k) for c in CONDS for lang in ("en", "zh") for k in range(3)
              if c["dx"] or k > 0]
    rng.shuffle(combos)
    rows = []
    for c, lang, k in combos[:150]:
        p, ch, rj = pref_item(rng, c, lang, k)
        assert ch != rj
        rows.append({"prompt": p, "chosen": ch, "rejected": rj})
    return rows


# --------------------------------------------------------------------------------------
# MCQ item factory (shared by MedQA / MedMCQA / CMExam / C-Eval / PubMedQA)
# --------------------------------------------------------------------------------------
def mcq(rng, c, qtype, lang, n_opts, letter_idx):
    """Returns (stem, options list, correct index, explanation)."""
    L = lang
    if qtype == "tx":
        ds = others(rng, c, n_opts - 1, field=f"{L}_tx")
        opts = [o[f"{L}_tx"] for o in ds]
        right = c[f"{L}_tx"]
    elif qtype == "test":
        ds = others(rng, c, n_opts - 1, field=f"{L}_test")
        opts = [o[f"{L}_test"] for o in ds]
        right = c[f"{L}_test"]
    else:  # dx
        ds = others(rng, c, n_opts - 1, pool=[o for o in CONDS if o["dx"]])
        opts = [o[L] for o in ds]
        right = c[L]
    opts.insert(letter_idx, right)
    if L == "en":
        opts = [cap_opt(x) for x in opts]
    if L == "en":
        expl = (f"{cap(c['en'])} presents with {c['en_sym'][0]} and {c['en_sym'][1]}; it is confirmed by "
                f"{c['en_test']} and first-line treatment is {c['en_tx']}.")
    else:
        expl = (f"{c['zh']}表现为{c['zh_sym'][0]}和{c['zh_sym'][1]}，关键检查为{c['zh_test']}，"
                f"一线治疗为{c['zh_tx']}。")
    return opts, expl


def balanced_letters(rng, n, k):
    letters = [i % k for i in range(n)]
    rng.shuffle(letters)
    return letters


def mcq_plan(rng, n, pool_filter=None):
    plan = [(c, q) for c in CONDS for q in ("tx", "test", "dx") if not (q == "dx" and not c["dx"])]
    rng.shuffle(plan)
    # spread over conditions: round-robin by question type ordering
    return plan[:n]


# 5. MedQA (US, 4 options) --------------------------------------------------------------
def make_medqa(rng):
    rows = []
    letters = balanced_letters(rng, 60, 4)
    for (c, q), li in zip(mcq_plan(rng, 60), letters):
        opts, _ = mcq(rng, c, q, "en", 4, li)
        who = demographic(rng, c, "en")
        s = c["en_sym"]
        vign = (f"A {who} comes to the physician because of {s[0]}, {s[1]} and {s[2]}." if c["dx"]
                else f"A {who} comes to the physician for a routine health check.")
        if q == "dx":
            stem = f"{vign} Which of the following is the most likely diagnosis?"
        elif q == "test":
            stem = (f"{vign} The physician suspects {c['en']}. Which of the following is the most "
                    f"appropriate investigation to confirm the diagnosis?")
        else:
            stem = (f"{vign} A diagnosis of {c['en']} is confirmed. Which of the following is the most "
                    f"appropriate first-line management?")
        options = {k: v for k, v in zip("ABCD", opts)}
        rows.append({"question": stem, "answer": opts[li], "options": options,
                     "meta_info": "step1" if q == "test" else "step2&3", "answer_idx": "ABCD"[li]})
    return rows


# 6. CMExam ----------------------------------------------------------------------------
def make_cmexam(rng):
    rows = []
    n_single, n_multi = 52, 8
    letters = balanced_letters(rng, n_single, 5)
    plan = mcq_plan(rng, n_single)
    diff = ["易", "中", "难"]
    for (c, q), li in zip(plan, letters):
        opts, expl = mcq(rng, c, q, "zh", 5, li)
        who = demographic(rng, c, "zh")
        s = c["zh_sym"]
        if q == "dx":
            stem = f"患者，{who}。因{s[0]}、{s[1]}、{s[2]}就诊。最可能的诊断是"
            area = "疾病诊断"
        elif q == "test":
            stem = f"患者，{who}。临床怀疑{c['zh']}，确诊最有价值的检查是"
            area = "疾病诊断"
        else:
            stem = f"{c['zh']}的一线治疗是"
            area = "疾病治疗"
        rows.append([stem, "\n".join(f"{L} {o}" for L, o in zip("ABCDE", opts)), "ABCDE"[li], expl,
                     DISCIPLINE_ZH[c["subj"]], area, rng.choice(diff), "单选题"])
    # multi-answer: "which are typical manifestations of X" (2-3 own symptoms + other groups' hallmarks)
    pool = [c for c in CONDS if c["dx"]]
    rng.shuffle(pool)
    for c in pool[:n_multi]:
        k = rng.choice([2, 3])
        own = rng.sample(c["zh_sym"], k)
        ds = [o["zh_sym"][0] for o in others(rng, c, 5 - k, pool=[o for o in CONDS if o["dx"]])]
        pos = sorted(rng.sample(range(5), k))
        opts, it_own, it_ds = [], iter(own), iter(ds)
        for i in range(5):
            opts.append(next(it_own) if i in pos else next(it_ds))
        ans = "".join("ABCDE"[i] for i in pos)
        expl = f"{c['zh']}的典型表现包括{zh_list(c['zh_sym'])}。其余选项分别是其他疾病的典型表现。"
        rows.append([f"下列属于{c['zh']}典型表现的是", "\n".join(f"{L} {o}" for L, o in zip("ABCDE", opts)),
                     ans, expl, DISCIPLINE_ZH[c["subj"]], "医学知识", rng.choice(diff), "多选题"])
    rng.shuffle(rows)
    return rows


# 7. PubMedQA --------------------------------------------------------------------------
def make_pubmedqa(rng):
    out = {}
    used = set()
    decisions = ["yes"] * 18 + ["no"] * 16 + ["maybe"] * 6
    rng.shuffle(decisions)
    conds = [c for c in CONDS if c["dx"]]
    rng.shuffle(conds)
    for i, dec in enumerate(decisions):
        c = conds[i % len(conds)]
        s = c["en_sym"]
        while True:
            pmid = str(rng.randint(10000000, 29999999))
            if pmid not in used:
                used.add(pmid)
                break
        kind = rng.choice(["tx", "test"])
        contexts = [f"{cap(c['en'])} typically presents with {s[0]}, {s[1]} and {s[2]}.",
                    f"Current clinical guidance identifies {c['en_test']} as the key investigation.",
                    f"First-line management of {c['en']} is {c['en_tx']}."]
        labels = ["BACKGROUND", "METHODS", "RESULTS"]
        if rng.random() < 0.4:
            contexts, labels = [contexts[0], contexts[2 if kind == "tx" else 1]], ["BACKGROUND", "RESULTS"]
        if dec == "yes":
            q = (f"Is {c['en_tx']} the recommended first-line treatment for {c['en']}?" if kind == "tx"
                 else f"Is {c['en_test']} the key investigation for diagnosing {c['en']}?")
            la = (f"First-line management of {c['en']} is {c['en_tx']}." if kind == "tx"
                  else f"{cap(c['en_test'])} is the key investigation for confirming {c['en']}.")
        elif dec == "no":
            o = others(rng, c, 1, field=f"en_{kind}")[0]
            q = (f"Is {o['en_tx']} the recommended first-line treatment for {c['en']}?" if kind == "tx"
                 else f"Is {o['en_test']} the key investigation for diagnosing {c['en']}?")
            la = (f"First-line management of {c['en']} is {c['en_tx']}, not {o['en_tx']}." if kind == "tx"
                  else f"{cap(c['en'])} is confirmed by {c['en_test']}, not by {o['en_test']}.")
        else:
            q = f"Is {s[0]} specific to {c['en']}?"
            la = (f"{cap(s[0])} is typical of {c['en']} but can occur in other conditions; confirmation "
                  f"requires {c['en_test']}.")
        meshes = [cap(c["en"]), "Humans", rng.choice(["Adult", "Middle Aged", "Aged"]),
                  rng.choice(["Female", "Male"]), "Practice Guidelines as Topic"]
        out[pmid] = {"QUESTION": q, "CONTEXTS": contexts, "LABELS": labels, "MESHES": meshes,
                     "YEAR": str(rng.randint(2005, 2020)), "reasoning_required_pred": dec,
                     "reasoning_free_pred": dec, "final_decision": dec, "LONG_ANSWER": la}
    return out


# 8. MedMCQA ---------------------------------------------------------------------------
def make_medmcqa(rng):
    rows = []
    letters = balanced_letters(rng, 40, 4)
    for (c, q), li in zip(mcq_plan(rng, 40), letters):
        opts, expl = mcq(rng, c, q, "en", 4, li)
        if q == "tx":
            stem = f"First-line treatment of {c['en']} is:"
        elif q == "test":
            stem = f"Investigation of choice to confirm {c['en']} is:"
        else:
            stem = f"A patient presents with {c['en_sym'][0]}, {c['en_sym'][1]} and {c['en_sym'][2]}. Most likely diagnosis is:"
        rows.append({"question": stem, "exp": f"Ans. is '{'abcd'[li]}' i.e., {opts[li]}. {expl}",
                     "cop": li + 1, "opa": opts[0], "opb": opts[1], "opc": opts[2], "opd": opts[3],
                     "subject_name": c["subj"], "topic_name": c["topic"],
                     "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)), "choice_type": "single"})
    return rows


# 9. C-Eval ----------------------------------------------------------------------------
def make_ceval(rng):
    plan = mcq_plan(rng, 35)
    letters = balanced_letters(rng, 35, 4)
    dev, val = [], []
    for i, ((c, q), li) in enumerate(zip(plan, letters)):
        opts, expl = mcq(rng, c, q, "zh", 4, li)
        if q == "tx":
            stem = f"{c['zh']}的一线治疗是____。"
        elif q == "test":
            stem = f"确诊{c['zh']}最有价值的检查是____。"
        else:
            s = c["zh_sym"]
            stem = f"患者，{demographic(rng, c, 'zh')}，出现{s[0]}、{s[1]}、{s[2]}，最可能的诊断是____。"
        row = [stem] + opts + ["ABCD"[li]]
        if i < 5:
            dev.append([i] + row + [f"1. {expl}\n2. 因此答案为{'ABCD'[li]}。"])
        else:
            val.append([i - 5] + row)
    return dev, val


README = """# Bundled sample datasets

Small, deterministic sample files that imitate the on-disk shapes of public medical datasets, so
that medpipe's demo pipeline and tests run offline on a tiny model. All content is generated by
`make_samples.py` from one medically reviewed table of {n_cond} common conditions (Chinese and English
names, typical symptoms, key test, first-line treatment, red-flag warning signs) rendered through
fixed templates. **For demos and tests only; not for clinical use.** PMIDs, ids and exam metadata
are synthetic.

Regenerate (stdlib only, seeded, byte-identical output): `python samples/make_samples.py`

- `pretrain.jsonl` ({pretrain} lines): `{{"text": ...}}` per line, UTF-8, like common continued-pretraining
  corpora; knowledge paragraphs, about half English and half Chinese.
- `sft_alpaca.json` ({alpaca} records): Alpaca format, a JSON array of `instruction`/`input`/`output`
  (input often empty), indent 2, bilingual.
- `sft_sharegpt.json` ({sharegpt} conversations): ShareGPT format, `id` + `conversations` with
  `from: human|gpt` (a few start with `from: system`); 2-3 exchanges of a patient consultation.
- `preference.jsonl` ({pref} lines): `prompt`/`chosen`/`rejected` preference pairs (as in common DPO
  datasets); chosen is the correct, careful answer, rejected gives a wrong treatment or dismisses a
  red flag.
- `mcq_medqa.jsonl` ({medqa} lines): MedQA (USMLE, 4 options) jsonl shape: `question`, `answer`
  (text), `options` {{A..D}}, `meta_info`, `answer_idx`. English.
- `mcq_cmexam.csv` ({cmexam} rows): CMExam CSV shape (UTF-8 with BOM): `Question,Options,Answer,
  Explanation,Medical Discipline,Competency Area,Difficulty level,Question Type`; `Options` holds
  "A ...\\nB ...\\n...E ..." in one quoted field; a few multi-answer (多选题) items. Chinese.
- `pubmedqa.json` ({pubmedqa} items): PubMedQA `ori_pqal.json` shape, an object keyed by PMID strings with
  `QUESTION`, `CONTEXTS`, `LABELS`, `MESHES`, `YEAR`, `final_decision` (yes/no/maybe), `LONG_ANSWER`.
- `medmcqa.json` ({medmcqa} lines): MedMCQA original format, one JSON object per line (like the
  published `train.json`): `question`, `exp`, `cop` (1-4), `opa`..`opd`, `subject_name`,
  `topic_name`, `id`, `choice_type`. English.
- `ceval_dev.csv` ({dev} rows) and `ceval_val.csv` ({val} rows): C-Eval `clinical_medicine` shape,
  `id,question,A,B,C,D,answer[,explanation]` (explanation in dev only), plain UTF-8. Chinese.

Every MCQ answer is derivable from the knowledge table (and so from `pretrain.jsonl`); distractors
are other conditions' treatments, tests or diagnoses, and the correct letter is spread evenly.
"""


def main():
    rng = random.Random(SEED)
    pretrain = make_pretrain(random.Random(rng.getrandbits(32)))
    alpaca = make_alpaca(random.Random(rng.getrandbits(32)))
    sharegpt = make_sharegpt(random.Random(rng.getrandbits(32)))
    pref = make_preference(random.Random(rng.getrandbits(32)))
    medqa = make_medqa(random.Random(rng.getrandbits(32)))
    cmexam = make_cmexam(random.Random(rng.getrandbits(32)))
    pubmedqa = make_pubmedqa(random.Random(rng.getrandbits(32)))
    medmcqa = make_medmcqa(random.Random(rng.getrandbits(32)))
    dev, val = make_ceval(random.Random(rng.getrandbits(32)))

    write_jsonl("pretrain.jsonl", pretrain)
    write_json("sft_alpaca.json", alpaca)
    write_json("sft_sharegpt.json", sharegpt)
    write_jsonl("preference.jsonl", pref)
    write_jsonl("mcq_medqa.jsonl", medqa)
    write_csv("mcq_cmexam.csv", ["Question", "Options", "Answer", "Explanation", "Medical Discipline",
                                 "Competency Area", "Difficulty level", "Question Type"], cmexam, bom=True)
    write_json("pubmedqa.json", pubmedqa, indent=4)
    write_jsonl("medmcqa.json", medmcqa)
    write_csv("ceval_dev.csv", ["id", "question", "A", "B", "C", "D", "answer", "explanation"], dev)
    write_csv("ceval_val.csv", ["id", "question", "A", "B", "C", "D", "answer"], val)
    readme = README.format(n_cond=len(CONDS), pretrain=len(pretrain), alpaca=len(alpaca),
                           sharegpt=len(sharegpt), pref=len(pref), medqa=len(medqa), cmexam=len(cmexam),
                           pubmedqa=len(pubmedqa), medmcqa=len(medmcqa), dev=len(dev), val=len(val))
    write_bytes("README.md", readme.encode("utf-8"))


if __name__ == "__main__":
    main()

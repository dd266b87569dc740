#!/usr/bin/env python3
"""Hand-written English medical samples in published on-disk shapes, for a short real-model
(SmolLM2-135M) profile. Stdlib only; deterministic (fixed seed shuffle): byte-identical output.

    python make_en_samples.py [OUT_DIR]        (default: the directory of this file, samples/)

Writes
  sft_en_alpaca.json     Stanford Alpaca shape: a JSON array of {"instruction","input","output"},
                         serialised exactly as alpaca's utils.jdump does it
                         (json.dump(obj, f, indent=4): ASCII-escaped, no trailing newline).
  pretrain_en.jsonl, sft_en_sharegpt.json: the English records of make_samples.py's
                         pretrain.jsonl / sft_sharegpt.json (english_subsets).
  preference_en.jsonl    MedicalGPT reward shape (data/reward/*.json in shibing624/MedicalGPT):
                         one {"question","response_chosen","response_rejected"} object a line,
                         json.dumps(..., ensure_ascii=False), '\\n' after every line.

Content is written by hand (no model generation), general medical knowledge at textbook level;
demo/test data only, not clinical advice. Items are shuffled with a fixed seed so that any 20%
slice (head, tail or random) is i.i.d. in topic and style. SFT questions and preference questions
are kept disjoint in topic so a held-out slice of one is not answered verbatim by the other.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

SEED = 20261201

# ---------------------------------------------------------------------------------------------
# SFT: (instruction, input, output). output: 1-3 sentences, factual, short.
# ---------------------------------------------------------------------------------------------
PHARMACOLOGY = [
    ("What is the mechanism of action of metformin?", "",
     "Metformin mainly lowers blood glucose by reducing glucose production in the liver and improving insulin sensitivity in muscle. Because it does not stimulate insulin secretion, it rarely causes hypoglycemia when used alone."),
    ("What is the antidote for acetaminophen (paracetamol) overdose?", "",
     "The antidote is N-acetylcysteine, which replenishes the liver's glutathione stores. It is most effective when started within 8 hours of the overdose."),
    ("Which drug reverses an opioid overdose?", "",
     "Naloxone, an opioid receptor antagonist, reverses opioid overdose and can be given intravenously, intramuscularly or intranasally. Its effect can wear off before that of long-acting opioids, so the patient must be observed and may need repeat doses."),
    ("Why are ACE inhibitors avoided in pregnancy?", "",
     "ACE inhibitors can harm the fetus, especially in the second and third trimesters, causing kidney damage, low amniotic fluid and skull defects. They should be stopped and replaced with a safer drug when pregnancy is planned or confirmed."),
    ("What common side effect of ACE inhibitors is caused by bradykinin build-up?", "",
     "A dry, persistent cough is the common bradykinin-related side effect, and angioedema is a rarer but serious one. Switching to an angiotensin II receptor blocker usually stops the cough."),
    ("How does warfarin work?", "",
     "Warfarin blocks vitamin K epoxide reductase, which reduces the liver's production of the vitamin K-dependent clotting factors II, VII, IX and X. Its effect is monitored with the INR blood test."),
    ("What drug reverses the effect of heparin?", "",
     "Protamine sulfate binds and neutralizes heparin. It fully reverses unfractionated heparin but only partly reverses low-molecular-weight heparin."),
    ("Which class of antibiotics is associated with tendon rupture?", "",
     "Fluoroquinolones such as ciprofloxacin and levofloxacin are linked to tendinitis and tendon rupture, most often of the Achilles tendon. The risk is higher in older adults and in people also taking corticosteroids."),
    ("Why should patients avoid alcohol while taking metronidazole?", "",
     "Metronidazole can cause a disulfiram-like reaction with alcohol, with flushing, nausea, vomiting and palpitations. Patients are advised to avoid alcohol during treatment and for 48 hours after the last dose."),
    ("What is the first-line drug treatment for anaphylaxis?", "",
     "Intramuscular adrenaline (epinephrine) into the outer thigh is the first-line treatment, 0.5 mg for an adult. The dose can be repeated after 5 minutes if there is no improvement."),
    ("Which electrolyte needs monitoring in a patient taking furosemide?", "",
     "Potassium needs monitoring, because furosemide increases urinary potassium loss and can cause hypokalemia. Sodium and magnesium levels can also fall."),
    ("What muscle-related side effects can statins cause?", "",
     "Statins can cause muscle aches (myalgia) and, rarely, myopathy or rhabdomyolysis with a raised creatine kinase. The risk rises with high doses and with interacting drugs such as clarithromycin."),
    ("Why is regular blood level monitoring needed for lithium?", "",
     "Lithium has a narrow therapeutic index, so toxic levels causing tremor, confusion and ataxia are not far above the therapeutic range. Dehydration, NSAIDs, thiazide diuretics and ACE inhibitors can all raise lithium levels."),
    ("What type of drug is amlodipine and what is it used for?", "",
     "Amlodipine is a dihydropyridine calcium channel blocker that relaxes arterial smooth muscle. It is used to treat high blood pressure and angina."),
    ("How do proton pump inhibitors reduce stomach acid?", "",
     "Proton pump inhibitors such as omeprazole irreversibly block the H+/K+ ATPase (proton pump) in the stomach's parietal cells. This is the final step of acid secretion, so acid output falls markedly."),
    ("Is flumazenil routinely used for benzodiazepine overdose?", "",
     "No. Flumazenil reverses benzodiazepines but can trigger seizures in people dependent on benzodiazepines or who have also taken drugs such as tricyclic antidepressants, so supportive care is the usual treatment."),
    ("Which vitamin is given to people with alcohol dependence to prevent Wernicke encephalopathy?", "",
     "Thiamine (vitamin B1) is given, often intravenously in high doses when Wernicke encephalopathy is suspected. It should ideally be given before or with glucose."),
    ("Why are NSAIDs risky for people with chronic kidney disease?", "",
     "NSAIDs block prostaglandins that keep the kidney's afferent arterioles dilated, so kidney blood flow and filtration fall. This can cause acute kidney injury, high potassium and fluid retention."),
    ("What is the treatment of choice for early syphilis?", "",
     "A single intramuscular injection of benzathine penicillin G is the treatment of choice for early syphilis. Doxycycline is an alternative for people with penicillin allergy who are not pregnant."),
    ("How does low-dose aspirin prevent blood clots?", "",
     "Aspirin irreversibly inhibits cyclooxygenase-1 in platelets, which stops them making thromboxane A2. Because platelets cannot make new enzyme, the effect lasts for their lifespan of about 7 to 10 days."),
    ("What are important long-term side effects of amiodarone?", "",
     "Amiodarone can cause thyroid dysfunction, pulmonary fibrosis, liver injury, skin photosensitivity and corneal deposits. Thyroid and liver function are checked before and during treatment."),
    ("Name some rapid-acting insulins and when they are given.", "",
     "Insulin lispro, insulin aspart and insulin glulisine are rapid-acting insulins. They start working in about 15 minutes and are injected just before or with meals."),
    ("What class of drugs has names ending in '-olol'?", "",
     "Drugs ending in '-olol', such as metoprolol, atenolol and propranolol, are beta blockers. They slow the heart rate and are used for hypertension, angina, heart failure and arrhythmias."),
    ("Why can grapefruit juice interact with some medicines?", "",
     "Grapefruit juice inhibits the CYP3A4 enzyme in the gut wall, which raises blood levels of drugs such as simvastatin, felodipine and ciclosporin. This can increase their side effects."),
    ("What is a first-line antibiotic for uncomplicated cystitis in a non-pregnant woman?", "",
     "Nitrofurantoin for 5 days is a common first-line choice, with trimethoprim or single-dose fosfomycin as alternatives depending on local resistance. Nitrofurantoin should be avoided when kidney function is markedly reduced."),
    ("How is the dose of levothyroxine adjusted?", "",
     "The dose is adjusted according to the TSH level, checked about 6 to 8 weeks after starting or changing the dose. Once stable, TSH is usually checked once a year."),
    ("Why must sildenafil not be taken with nitrates?", "",
     "Both drugs increase nitric oxide signalling and dilate blood vessels, so together they can cause a severe, dangerous fall in blood pressure. The combination is contraindicated."),
    ("Which drug is used to treat malignant hyperthermia?", "",
     "Dantrolene is the specific treatment for malignant hyperthermia. It reduces calcium release from the sarcoplasmic reticulum in skeletal muscle, stopping the uncontrolled muscle contraction."),
    ("Why is folic acid recommended before conception?", "",
     "Folic acid reduces the risk of neural tube defects such as spina bifida. The usual dose is 400 micrograms daily from before conception until 12 weeks of pregnancy."),
    ("What blood test must be monitored during clozapine treatment?", "",
     "The neutrophil count must be monitored regularly, because clozapine can cause agranulocytosis. Monitoring is most frequent during the first months of treatment."),
]

PHYSIOLOGY = [
    ("What is the normal resting heart rate for an adult?", "",
     "A normal adult resting heart rate is 60 to 100 beats per minute. Well-trained athletes often have lower rates."),
    ("Which hormone do pancreatic beta cells secrete?", "",
     "Pancreatic beta cells in the islets of Langerhans secrete insulin. Insulin lowers blood glucose by promoting glucose uptake into muscle and fat and by storing glucose as glycogen."),
    ("Where is erythropoietin produced and what does it do?", "",
     "Erythropoietin is produced mainly by interstitial cells in the kidney cortex in response to low oxygen. It stimulates the bone marrow to make red blood cells."),
    ("Explain the Frank-Starling law of the heart.", "",
     "The Frank-Starling law states that the heart pumps more forcefully when it is filled with more blood, because stretched muscle fibres contract more strongly. This matches the heart's output to its venous return."),
    ("What is the function of pulmonary surfactant?", "",
     "Surfactant lowers surface tension in the alveoli, which keeps them from collapsing at the end of expiration. It is made by type II pneumocytes, and its lack in premature babies causes respiratory distress syndrome."),
    ("What is the normal pH range of arterial blood?", "",
     "The normal arterial blood pH is 7.35 to 7.45. A lower pH is acidemia and a higher pH is alkalemia."),
    ("What does antidiuretic hormone do?", "",
     "Antidiuretic hormone (vasopressin), released from the posterior pituitary, makes the kidney's collecting ducts permeable to water by inserting aquaporin-2 channels. This increases water reabsorption and concentrates the urine."),
    ("Where in the nephron is most filtered sodium reabsorbed?", "",
     "About two-thirds of filtered sodium is reabsorbed in the proximal convoluted tubule. The rest is reabsorbed mainly in the loop of Henle, the distal tubule and the collecting duct."),
    ("What is the natural pacemaker of the heart?", "",
     "The sinoatrial node in the wall of the right atrium is the natural pacemaker. It normally fires 60 to 100 times per minute."),
    ("What do bile salts do in digestion?", "",
     "Bile salts emulsify dietary fat and form micelles, which allow fats and fat-soluble vitamins to be absorbed. Most bile salts are reabsorbed in the terminal ileum and returned to the liver."),
    ("Where is vitamin B12 absorbed?", "",
     "Vitamin B12 is absorbed in the terminal ileum after binding to intrinsic factor, which is made by the stomach's parietal cells. Loss of intrinsic factor or of the terminal ileum causes B12 deficiency."),
    ("Which cells produce antibodies?", "",
     "Plasma cells, which develop from activated B lymphocytes, produce antibodies. Each plasma cell secretes antibody specific to one antigen."),
    ("What is the main chemical drive to breathe in a healthy person?", "",
     "The main drive is the level of carbon dioxide in arterial blood, sensed by central chemoreceptors in the medulla through the pH of cerebrospinal fluid. Low oxygen becomes an important stimulus mainly when it is severe."),
    ("What does aldosterone do?", "",
     "Aldosterone acts on the distal tubule and collecting duct to increase sodium reabsorption and potassium secretion. It is released in response to angiotensin II and high blood potassium."),
    ("What is a normal fasting plasma glucose level?", "",
     "A normal fasting plasma glucose is below 5.6 mmol/L (100 mg/dL). A fasting level of 7.0 mmol/L (126 mg/dL) or higher on two occasions indicates diabetes."),
    ("Which part of the brain regulates body temperature?", "",
     "The hypothalamus regulates body temperature. It triggers sweating and vasodilation when the body is hot, and shivering and vasoconstriction when it is cold."),
    ("What is the role of platelets in stopping bleeding?", "",
     "Platelets stick to exposed collagen at a damaged vessel and clump together to form a platelet plug. Their surface also supports the clotting cascade that forms a stable fibrin clot."),
    ("How is cardiac output calculated?", "",
     "Cardiac output equals heart rate multiplied by stroke volume. In a resting adult it is about 5 litres per minute."),
    ("Which hormone triggers ovulation?", "",
     "A surge of luteinizing hormone (LH) from the anterior pituitary triggers ovulation. It occurs about 24 to 36 hours before the egg is released."),
    ("What does the loop of Henle do?", "",
     "The loop of Henle creates a concentration gradient in the kidney medulla that allows concentrated urine to be produced. Its thick ascending limb reabsorbs sodium, potassium and chloride through the NKCC2 transporter, which is the site of action of loop diuretics."),
    ("What protein carries oxygen in red blood cells?", "",
     "Hemoglobin carries oxygen in red blood cells. Each hemoglobin molecule can bind up to four oxygen molecules."),
    ("What is the Bohr effect?", "",
     "The Bohr effect is the fall in hemoglobin's oxygen affinity when carbon dioxide rises or pH falls. It shifts the oxygen dissociation curve to the right, so more oxygen is released in active tissues."),
    ("How is cortisol secretion controlled?", "",
     "Cortisol is made by the adrenal cortex under the control of ACTH from the anterior pituitary, which in turn is driven by CRH from the hypothalamus. Cortisol feeds back to suppress both, and levels normally peak in the early morning."),
    ("What is the normal respiratory rate of a resting adult?", "",
     "A resting adult normally breathes 12 to 20 times per minute. A rate persistently above 20 can be an early sign of illness."),
    ("What are the main effects of thyroid hormone?", "",
     "Thyroid hormone increases the basal metabolic rate and heat production and raises heart rate. It is also essential for normal growth and brain development in children."),
]

DIAGNOSTICS = [
    ("What HbA1c level is used to diagnose diabetes?", "",
     "An HbA1c of 48 mmol/mol (6.5%) or higher is diagnostic of diabetes. In a person without symptoms the result should be confirmed with a repeat test."),
    ("Which blood test is preferred to diagnose a heart attack?", "",
     "High-sensitivity cardiac troponin is the preferred test. A rise or fall in troponin on serial samples, with symptoms or ECG changes of ischemia, indicates myocardial infarction."),
    ("What does a raised D-dimer mean?", "",
     "A raised D-dimer shows that fibrin is being broken down, but it is not specific and rises with infection, surgery, pregnancy and age. Its main use is that a normal result in a patient with low clinical probability helps rule out deep vein thrombosis or pulmonary embolism."),
    ("What is the first-line imaging test for a suspected deep vein thrombosis?", "",
     "Compression ultrasound of the leg veins is the first-line imaging test. A vein that cannot be compressed indicates a clot."),
    ("Which test confirms a pulmonary embolism in a stable patient?", "",
     "CT pulmonary angiography is the usual confirmatory test in a haemodynamically stable patient. A ventilation-perfusion scan is an alternative when contrast should be avoided."),
    ("What does ST elevation in ECG leads V1 to V4 suggest?", "",
     "ST elevation in V1 to V4 suggests an anterior ST-elevation myocardial infarction. This is usually caused by blockage of the left anterior descending coronary artery."),
    ("Interpret these thyroid function results.", "TSH: 12.5 mU/L (high); free T4: 6 pmol/L (low)",
     "A high TSH with a low free T4 indicates primary hypothyroidism. The most common cause in iodine-sufficient countries is autoimmune (Hashimoto) thyroiditis."),
    ("Which non-invasive tests detect Helicobacter pylori infection?", "",
     "The urea breath test and the stool antigen test are the main non-invasive tests. Proton pump inhibitors should be stopped for 2 weeks before testing to avoid false negatives."),
    ("How is pulmonary tuberculosis confirmed?", "",
     "Tuberculosis is confirmed by culture of Mycobacterium tuberculosis from sputum, which is the reference standard. Rapid molecular tests such as Xpert MTB/RIF also detect the organism and rifampicin resistance within hours."),
    ("Which blood test best confirms iron deficiency?", "",
     "A low serum ferritin is the most specific test for iron deficiency. Ferritin can be falsely normal during inflammation, because it rises as an acute-phase protein."),
    ("What is the fecal immunochemical test used for?", "",
     "The fecal immunochemical test (FIT) detects small amounts of human blood in stool. It is used to screen for colorectal cancer, and a positive result is followed by colonoscopy."),
    ("At what clinic blood pressure is hypertension diagnosed?", "",
     "Many guidelines diagnose hypertension at a clinic blood pressure of 140/90 mm Hg or higher, while the 2017 American guideline uses 130/80 mm Hg. The diagnosis is usually confirmed with home or ambulatory readings."),
    ("What does an FEV1/FVC ratio below 0.7 on spirometry indicate?", "",
     "A ratio below 0.7 indicates airflow obstruction, as seen in COPD and asthma. Improvement after a bronchodilator favours asthma."),
    ("Which laboratory findings suggest hemolysis?", "",
     "Hemolysis is suggested by a raised unconjugated bilirubin, raised lactate dehydrogenase, low haptoglobin and a raised reticulocyte count. A blood film may show fragmented red cells or spherocytes."),
    ("What is the normal range for serum potassium?", "",
     "The normal serum potassium is about 3.5 to 5.0 mmol/L. Levels outside this range can cause dangerous heart rhythm disturbances."),
    ("Interpret this arterial blood gas.", "pH 7.30, PaCO2 30 mm Hg, HCO3- 15 mmol/L",
     "This is a metabolic acidosis with respiratory compensation: the pH and bicarbonate are low and the PaCO2 is low. The expected PaCO2 by Winter's formula (1.5 x 15 + 8 = 30.5) matches, so the compensation is appropriate."),
    ("What does a positive Murphy's sign suggest?", "",
     "A positive Murphy's sign, where pain stops inspiration during palpation below the right ribs, suggests acute cholecystitis. Abdominal ultrasound is the first-line imaging test."),
    ("What is the first-line imaging for suspected appendicitis in a child?", "",
     "Ultrasound is the first-line imaging for suspected appendicitis in children, because it involves no radiation. CT or MRI is used if the ultrasound is inconclusive."),
    ("What is the first imaging test in a patient with a suspected acute stroke?", "",
     "An urgent non-contrast CT scan of the head is done first to exclude bleeding before clot-busting treatment. CT angiography is often added to look for a large vessel blockage."),
    ("What does a serum lipase more than three times normal suggest?", "",
     "With typical upper abdominal pain, a lipase more than three times the upper limit of normal supports a diagnosis of acute pancreatitis. The height of the level does not predict how severe the attack will be."),
    ("What is the Wells score used for?", "",
     "The Wells score estimates the clinical probability of deep vein thrombosis or pulmonary embolism. It guides whether to do a D-dimer test or go straight to imaging."),
    ("What does this urine dipstick result suggest?", "Woman aged 30 with burning on urination; dipstick positive for nitrites and leukocyte esterase",
     "The result suggests a bacterial urinary tract infection. Nitrites are produced by Gram-negative bacteria such as E. coli, and leukocyte esterase indicates white cells in the urine."),
    ("How is celiac disease screened for?", "",
     "Celiac disease is screened for with tissue transglutaminase IgA antibodies, together with total IgA to exclude IgA deficiency. The person must be eating gluten at the time, and a positive result is usually confirmed by duodenal biopsy."),
    ("What is the danger of a prolonged QT interval?", "",
     "A prolonged QT interval increases the risk of torsades de pointes, a ventricular arrhythmia that can cause sudden death. Common causes include certain drugs, low potassium and low magnesium."),
    ("What does this blood count suggest and what should be checked next?", "Hemoglobin 8.2 g/dL, MCV 112 fL",
     "This is a macrocytic anemia. Vitamin B12 and folate levels should be checked, along with liver function, thyroid function and alcohol and drug history."),
]

FIRST_AID = [
    ("How are chest compressions done in adult CPR?", "",
     "Push hard and fast in the centre of the chest, 5 to 6 cm deep at 100 to 120 compressions per minute, letting the chest recoil fully. Give 30 compressions then 2 rescue breaths if trained, or continuous compressions if not."),
    ("What should you do for a choking adult who cannot cough, speak or breathe?", "",
     "Give up to 5 firm back blows between the shoulder blades, then up to 5 abdominal thrusts, and keep alternating. If the person becomes unresponsive, call emergency services and start CPR."),
    ("How should a minor burn be treated straight away?", "",
     "Cool the burn under cool running water for 20 minutes and remove rings or tight items nearby. Then cover it loosely with cling film or a clean non-fluffy dressing, and do not apply ice or butter."),
    ("What is the first step to control severe bleeding from a wound?", "",
     "Apply firm, direct pressure on the wound with a clean pad or cloth and call emergency services. If life-threatening bleeding from a limb cannot be controlled, apply a tourniquet above the wound."),
    ("What does the FAST test for stroke stand for?", "",
     "FAST stands for Face drooping, Arm weakness, Speech difficulty and Time to call emergency services. Any one of these signs appearing suddenly needs an ambulance immediately."),
    ("How should you help someone having a seizure?", "",
     "Protect them from injury by moving hard objects away and cushioning their head, and do not restrain them or put anything in their mouth. Time the seizure, place them in the recovery position afterwards, and call an ambulance if it lasts more than 5 minutes."),
    ("How do you stop a nosebleed?", "",
     "Sit upright, lean forward and pinch the soft part of the nose firmly for 10 to 15 minutes while breathing through the mouth. Seek medical help if the bleeding lasts more than 20 minutes or follows a head injury."),
    ("When should the recovery position be used?", "",
     "The recovery position is used for a person who is unresponsive but breathing normally. Lying on their side keeps the airway open and lets vomit or fluid drain from the mouth."),
    ("How should suspected low blood sugar be treated in a conscious person?", "",
     "Give 15 to 20 grams of fast-acting sugar, such as glucose tablets or a small glass of fruit juice, and recheck after 15 minutes. Once they improve, give a longer-acting carbohydrate snack."),
    ("What is the first aid for heat stroke?", "",
     "Heat stroke is an emergency, so call an ambulance. Move the person somewhere cool and cool them rapidly with cold water immersion or by spraying them with water and fanning."),
    ("What should you do if you suspect a spinal injury?", "",
     "Keep the person still and support the head and neck in line with the body, unless they are in immediate danger. Call emergency services and do not let them move."),
    ("How should a bee sting be treated?", "",
     "Scrape the stinger out quickly, wash the area and apply a cold compress to reduce swelling. Watch for breathing difficulty or facial swelling, which signal anaphylaxis and need adrenaline and an ambulance."),
    ("What should you do if a chemical splashes into the eye?", "",
     "Rinse the eye with clean running water for at least 20 minutes, holding the eyelids open and removing contact lenses. Then seek urgent medical care."),
    ("What is the first aid for a suspected broken bone?", "",
     "Keep the injured part still and support it in the position found, using padding or a sling. Do not try to straighten it, and get medical help."),
    ("How can you help someone who may be having a heart attack?", "",
     "Call emergency services, help the person sit down and rest, and give 300 mg of aspirin to chew if they are not allergic. Be ready to start CPR if they become unresponsive."),
    ("How should mild hypothermia be managed?", "",
     "Move the person to a warm, dry place, replace wet clothing and warm them gradually with blankets. Warm, sweet drinks help if they are fully alert, but do not rub their limbs or use hot water."),
    ("When should an automated external defibrillator (AED) be used?", "",
     "An AED should be used as soon as possible on anyone who is unresponsive and not breathing normally. Switch it on and follow its voice prompts, keeping pauses in chest compressions as short as possible."),
    ("How should a sprained ankle be treated in the first two days?", "",
     "Rest the ankle, apply ice wrapped in a cloth for 15 to 20 minutes every few hours, use a compression bandage and keep it raised. Seek medical review if you cannot bear weight."),
    ("What is the first aid for a dog bite?", "",
     "Wash the wound thoroughly with soap and running water for several minutes, control any bleeding and cover it with a clean dressing. See a doctor, as bites often need antibiotics and a tetanus or rabies assessment."),
    ("What should you do if someone swallows a household chemical?", "",
     "Call a poison information service or emergency services straight away and keep the container to show them. Do not make the person vomit."),
]

GENERAL = [
    ("How is influenza spread?", "",
     "Influenza spreads mainly through respiratory droplets from coughs and sneezes, and from touching contaminated surfaces and then the face. Annual vaccination is the best protection."),
    ("What causes tetanus and how is it prevented?", "",
     "Tetanus is caused by a toxin made by Clostridium tetani, whose spores enter the body through wounds. It is prevented by vaccination with boosters, and tetanus immunoglobulin is given for high-risk wounds in people who are not fully vaccinated."),
    ("What are common symptoms of hypothyroidism?", "",
     "Common symptoms are tiredness, weight gain, feeling cold, constipation, dry skin and a slow heart rate. Symptoms often come on gradually."),
    ("What carries the malaria parasite?", "",
     "Malaria is transmitted by the bite of an infected female Anopheles mosquito. The parasite is a Plasmodium species, most dangerously Plasmodium falciparum."),
    ("What is the most common bacterial cause of community-acquired pneumonia?", "",
     "Streptococcus pneumoniae is the most common bacterial cause of community-acquired pneumonia. Vaccination against pneumococcus reduces the risk."),
    ("What are the typical symptoms of type 1 diabetes at diagnosis?", "",
     "Typical symptoms are passing a lot of urine, great thirst, weight loss and tiredness, developing over days to weeks. Some people first present with diabetic ketoacidosis."),
    ("What is sepsis?", "",
     "Sepsis is life-threatening organ dysfunction caused by a dysregulated body response to infection. It is a medical emergency that needs prompt antibiotics and supportive care."),
    ("Which lifestyle changes lower blood pressure?", "",
     "Reducing salt, losing excess weight, regular aerobic exercise, limiting alcohol and eating a diet rich in fruit and vegetables all lower blood pressure. Stopping smoking also lowers overall cardiovascular risk."),
    ("How is HIV transmitted?", "",
     "HIV is transmitted through unprotected sex, sharing needles, infected blood and from mother to child during pregnancy, birth or breastfeeding. It is not spread by casual contact such as hugging or sharing cups."),
    ("At what age does breast cancer screening with mammography usually start?", "",
     "It depends on the country: the US Preventive Services Task Force recommends mammography every 2 years from age 40 to 74, while the NHS in England invites women from age 50 to 71. Women at high risk may start earlier."),
    ("What is herd immunity?", "",
     "Herd immunity occurs when enough people in a population are immune that an infection cannot spread easily. It protects people who cannot be vaccinated, such as young babies and those with weak immune systems."),
    ("What are the main risk factors for osteoporosis?", "",
     "Main risk factors are older age, female sex after menopause, low body weight, smoking, heavy alcohol use, long-term steroid use and a family history of hip fracture."),
    ("What causes scurvy and what are its signs?", "",
     "Scurvy is caused by a lack of vitamin C. Signs include bleeding and swollen gums, easy bruising, poor wound healing and small bleeds around hair follicles."),
    ("What is the difference between type 1 and type 2 diabetes?", "",
     "Type 1 diabetes is autoimmune destruction of the pancreatic beta cells, causing absolute insulin deficiency. Type 2 diabetes is mainly insulin resistance with relative insulin deficiency and is strongly linked to excess weight."),
    ("What are the warning signs of meningitis?", "",
     "Warning signs include fever, severe headache, neck stiffness, dislike of bright light, drowsiness and a rash that does not fade under pressure. Meningitis is an emergency and needs immediate medical care."),
    ("What is the main cause of cervical cancer?", "",
     "Almost all cervical cancers are caused by persistent infection with high-risk types of human papillomavirus, especially types 16 and 18. HPV vaccination and cervical screening greatly reduce the risk."),
    ("What is the typical symptom of gastroesophageal reflux disease?", "",
     "The typical symptoms are heartburn and acid regurgitation, often worse after meals or when lying down. Difficulty swallowing, weight loss or vomiting blood need prompt assessment."),
    ("Calculate the body mass index and classify it.", "Weight 85 kg, height 1.75 m",
     "The BMI is 85 / (1.75 x 1.75) = 27.8 kg/m2. This falls in the overweight range (25 to 29.9)."),
    ("What are common symptoms of iron deficiency anemia?", "",
     "Common symptoms are tiredness, pale skin, shortness of breath on exertion and palpitations. Some people also have brittle nails, hair loss or cravings for ice."),
    ("What is the main treatment for dehydration from acute diarrhea in a child?", "",
     "Oral rehydration solution is the main treatment, given in small frequent sips, while continuing normal feeding or breastfeeding. The WHO also recommends zinc supplements for children in low-income settings."),
]

SFT = PHARMACOLOGY + PHYSIOLOGY + DIAGNOSTICS + FIRST_AID + GENERAL

# ---------------------------------------------------------------------------------------------
# Preference: (question, chosen, rejected). chosen = correct and helpful; rejected = plausible
# but wrong (most), or vague/unsafe (those marked in UNHELPFUL). Kept close in length.
# ---------------------------------------------------------------------------------------------
PREFERENCE = [
    ("Can I take ibuprofen if I have a stomach ulcer?",
     "Generally no. NSAIDs such as ibuprofen can worsen ulcers and cause stomach bleeding. Paracetamol is usually a safer choice for pain, but check with your doctor.",
     "Yes. Ibuprofen is gentle on the stomach and helps ulcers heal by reducing inflammation, so it is the preferred painkiller for people with ulcers. Take it on an empty stomach for the fastest relief."),
    ("How long should I take the antibiotics I was prescribed for strep throat?",
     "Finish the whole course, usually 10 days of penicillin or amoxicillin, even if you feel better sooner. Completing it clears the infection and helps prevent complications such as rheumatic fever.",
     "You can stop as soon as your sore throat goes away, usually after 2 days. Finishing the course gives no extra benefit and only increases side effects. If the sore throat comes back, simply restart the leftover tablets."),
    ("What is the recommended daily salt intake for adults?",
     "The WHO recommends less than 5 g of salt a day, which is about one teaspoon and equals about 2 g of sodium. Much of it comes from processed foods such as bread and ready meals.",
     "Adults need at least 15 g of salt a day to keep their nerves and muscles working, and eating less than this can be harmful. Adding salt to every meal is the easiest way to reach this target."),
    ("Is it safe to give aspirin to a child with a fever?",
     "No. Aspirin given to children and teenagers with viral illnesses is linked to Reye syndrome, a rare but serious condition affecting the liver and brain. Use paracetamol or ibuprofen at the correct dose instead.",
     "Yes. Low-dose aspirin is the preferred fever medicine for children because it works longer than paracetamol and has fewer side effects. Give it every 4 hours until the temperature is back to normal."),
    ("What is atrial fibrillation and why does it raise the risk of stroke?",
     "Atrial fibrillation is an irregular, often fast heart rhythm in which the upper chambers quiver instead of contracting. Blood can pool and clot in the left atrium, and a clot can travel to the brain, which is why anticoagulants are often prescribed.",
     "Atrial fibrillation is a harmless extra heartbeat that many people have. It does not change the risk of stroke, so no treatment is needed unless it feels uncomfortable. Blood thinners are never used for it."),
    ("Does the flu vaccine give you the flu?",
     "No. Injected flu vaccines contain inactivated virus or a single viral protein and cannot cause influenza. Some people have a sore arm or mild aches for a day or two.",
     "Yes. The flu jab contains live flu virus, so most people get a mild case of flu afterwards, which is how the vaccine builds immunity. People with a weak immune system should avoid it for this reason."),
    ("Should I pop a blister?",
     "Usually not. The skin over a blister protects the area from infection, so cover it with a plaster or dressing; if it bursts, let the fluid drain, leave the skin in place and keep it clean and covered.",
     "Yes. Pop every blister with a needle and peel off the loose skin, because leaving it open to the air dries it out and heals it fastest. Dabbing rubbing alcohol on the raw skin afterwards also helps."),
    ("What is a normal body temperature?",
     "A normal body temperature is about 37 °C (98.6 °F), usually ranging from about 36.1 to 37.2 °C depending on the time of day and where it is measured. A temperature of 38 °C or above is generally a fever.",
     "A normal body temperature is 35 °C, and anything above 36.5 °C counts as a fever that needs to be brought down with medicine. Children run cooler than adults, at about 34 °C."),
    ("Can antibiotics cure a common cold?",
     "No. Colds are caused by viruses, and antibiotics only work against bacteria. Rest, fluids and simple pain relief help while the cold clears, usually within 7 to 10 days.",
     "Yes. A short course of amoxicillin clears a cold faster and stops you from passing it on, so it is worth asking for one early. Antibiotics also stop a cold from turning into flu."),
    ("What reverses warfarin if the INR is too high and there is bleeding?",
     "Vitamin K (phytomenadione) reverses warfarin. For major bleeding, prothrombin complex concentrate is given together with intravenous vitamin K.",
     "Protamine sulfate is the antidote for warfarin and reverses it within minutes, so vitamin K is not needed. It can also be taken as a tablet at home when the INR is only slightly raised."),
    ("Which vitamin deficiency causes night blindness?",
     "Vitamin A deficiency causes night blindness. Vitamin A is needed to make rhodopsin, the light-sensitive pigment in the retina's rod cells.",
     "Vitamin D deficiency causes night blindness. Vitamin D is needed to make rhodopsin, the light-sensitive pigment in the retina's rod cells."),
    ("What are the warning signs that a mole could be skin cancer?",
     "Use the ABCDE rule: Asymmetry, an irregular Border, several Colours, a Diameter over 6 mm and Evolving size, shape or colour. See a doctor about any mole that changes, bleeds or itches.",
     "The most dangerous moles are small, perfectly round and evenly brown. Moles that change shape or colour are a normal part of ageing and do not need checking. Only moles on the face can become cancerous."),
    ("My child swallowed a button battery. What should I do?",
     "Treat it as an emergency and go to the nearest emergency department immediately, because a battery stuck in the food pipe can cause severe burns within 2 hours. Do not make the child vomit.",
     "Give the child plenty of water and some bread to help the battery pass, then watch the stool for a few days to check that it has come out. There is no need to go to hospital unless the child develops a fever."),
    ("What is the main cause of COPD?",
     "Cigarette smoking is the main cause of COPD. Other causes include smoke from cooking fuels, occupational dusts and the inherited condition alpha-1 antitrypsin deficiency, and stopping smoking slows its progression.",
     "COPD is mainly caused by childhood asthma and is not related to smoking, so stopping smoking does not change how it progresses. It is diagnosed with a chest X-ray alone, and inhalers do not help."),
    ("Is chest pain that comes on with exercise and goes away with rest something to worry about?",
     "Yes. This is the typical pattern of stable angina and should be assessed by a doctor soon. If the pain comes on at rest, is severe or lasts more than a few minutes, call emergency services.",
     "No. Chest pain during exercise is almost always a pulled muscle, and because it settles with rest it does not need medical review. Taking a painkiller before exercise will prevent it."),
    ("How is scabies treated?",
     "Permethrin 5% cream is applied to the whole body from the neck down, washed off after 8 to 12 hours, and repeated after 7 days. All close contacts should be treated at the same time, and clothes and bedding washed hot.",
     "Scabies is a bacterial skin infection, so it is treated with a 2-week course of oral antibiotics; the cream treatments only soothe the itching. Close contacts do not need treatment."),
    ("What is the first-line treatment for croup in a child?",
     "A single dose of oral dexamethasone is the first-line treatment and reduces airway swelling within hours. Severe croup with noisy breathing at rest also needs nebulised adrenaline in hospital.",
     "Croup is a bacterial infection, so the first-line treatment is a course of amoxicillin. Steroids should be avoided because they weaken the immune response. Most children need admission for intravenous antibiotics."),
    ("Can I take St John's wort with my contraceptive pill?",
     "It is not recommended. St John's wort induces liver enzymes that break down the hormones in the pill, which can make it less effective and lead to pregnancy, so speak to a pharmacist or doctor first.",
     "Yes. Herbal remedies like St John's wort are natural and do not interact with prescription medicines, so you can take them together safely. There is no need to tell your doctor or pharmacist about herbal products."),
    ("What does a high LDL cholesterol level increase the risk of?",
     "A high LDL cholesterol increases the risk of atherosclerosis, which can lead to heart attack, stroke and peripheral arterial disease. Diet, exercise and statins lower LDL.",
     "LDL is the 'good' cholesterol, so a high LDL level protects against heart disease and stroke and does not need treatment. Eating more saturated fat raises it further, which is beneficial."),
    ("How long is someone with chickenpox contagious?",
     "A person with chickenpox is contagious from 1 to 2 days before the rash appears until all the blisters have crusted over, usually about 5 days after the rash starts.",
     "Chickenpox is only contagious on the first day of the rash; once the spots appear in large numbers the person can no longer spread it. Children can go back to school the day after the rash appears."),
    ("How much sleep do adults need?",
     "Most adults need 7 to 9 hours of sleep a night. Regularly sleeping less than 7 hours is linked to poorer concentration, weight gain and a higher risk of heart disease.",
     "Most adults only need 4 to 5 hours of sleep a night, and sleeping longer than 6 hours makes people tired and is bad for the heart."),
    ("Which organ does hepatitis B mainly affect?",
     "Hepatitis B mainly affects the liver. Chronic infection can lead to cirrhosis and liver cancer, and it is preventable with vaccination.",
     "Hepatitis B mainly affects the kidneys. Chronic infection leads to kidney failure, and there is no vaccine against it. It is spread mainly through contaminated food."),
    ("How should head lice be treated?",
     "Use a dimeticone lotion or wet combing with a fine-toothed lice comb, and repeat after 7 days to catch newly hatched lice. Only people with live lice need treatment.",
     "Everyone in the household should shave their heads and wash all bedding every day for a month, since lotions and combing do not work against lice."),
    ("How much caffeine is considered safe during pregnancy?",
     "Up to 200 mg of caffeine a day is considered safe in pregnancy, about two mugs of instant coffee. Higher intakes are linked to low birth weight and miscarriage.",
     "Caffeine does not cross the placenta, so there is no limit in pregnancy and up to 1,000 mg a day is fine. Energy drinks are a good way to stay alert while pregnant."),
    ("What are the symptoms of a kidney stone?",
     "A kidney stone typically causes sudden, severe, colicky pain in the side or back that spreads to the groin, often with blood in the urine and nausea. Fever with this pain needs urgent care.",
     "Kidney stones are painless. The main symptoms are constant thirst and passing large amounts of clear urine, and they are found mainly on routine blood tests."),
    ("Is it safe to stop taking a beta blocker suddenly?",
     "No. Stopping a beta blocker suddenly can cause a rebound fast heart rate, high blood pressure and worsening angina or even a heart attack. Any reduction should be gradual and agreed with your doctor.",
     "Yes. Beta blockers leave the body within a day, so you can stop them at any time without any effect on your heart. Many people skip them on days when they feel well."),
    ("What is the difference between a heart attack and a cardiac arrest?",
     "A heart attack is a blocked coronary artery damaging heart muscle, and the person is usually awake with chest pain. In a cardiac arrest the heart stops pumping effectively, the person collapses and stops breathing, and needs CPR and defibrillation.",
     "They are the same thing. Both terms describe the heart stopping because of a blood clot, and the treatment is identical. CPR is not useful in either case."),
    ("How should insulin be stored?",
     "Keep unopened insulin in the fridge at 2 to 8 °C and never freeze it. The pen or vial in use can usually be kept at room temperature for about 4 weeks, away from heat and sunlight.",
     "Insulin should be kept in the freezer so it stays potent, and each dose should be thawed in warm water just before the injection. Insulin left out of the fridge for an hour should be thrown away."),
    ("What is the best way to remove a tick?",
     "Use fine-tipped tweezers to grasp the tick as close to the skin as possible and pull upward with steady, even pressure. Then clean the bite area, and avoid crushing, burning or smothering the tick.",
     "Hold a lit match to the tick or cover it with petroleum jelly so it backs out on its own, then flick it off with your fingernail. Squeezing its body firmly helps it let go."),
    ("Why is it important to finish a full course of tuberculosis treatment?",
     "Stopping early can let the infection return and can produce drug-resistant TB. Standard treatment lasts 6 months: four drugs for 2 months, then isoniazid and rifampicin for 4 months.",
     "It is not very important. TB treatment can be stopped after two weeks once the cough improves, because the bacteria are dead by then. Taking the tablets only on days with symptoms is also acceptable."),
    ("What blood glucose level counts as hypoglycemia in someone with diabetes?",
     "Hypoglycemia is a blood glucose below 4.0 mmol/L (about 70 mg/dL). Symptoms include shakiness, sweating, hunger and confusion.",
     "Hypoglycemia means high blood sugar, defined as a blood glucose above 11 mmol/L (about 200 mg/dL). It is treated with an extra dose of insulin."),
    ("What bacterium causes Lyme disease?",
     "Lyme disease is caused by the bacterium Borrelia burgdorferi, spread by the bite of infected Ixodes (black-legged) ticks. Early infection often causes an expanding red rash and is treated with doxycycline.",
     "Lyme disease is caused by Rickettsia rickettsii, spread by mosquitoes. It does not cause a rash and cannot be treated with antibiotics. Ticks cannot spread it."),
    ("Can I give honey to my 6-month-old baby for a cough?",
     "No. Honey should not be given to babies under 12 months old because it can contain Clostridium botulinum spores that cause infant botulism.",
     "Yes. A teaspoon of honey is a safe, natural cough remedy for babies of any age and works better than cough medicine. Giving it at bedtime also helps babies sleep through the night."),
    ("What is tinnitus?",
     "Tinnitus is hearing a ringing, buzzing or hissing sound that has no outside source, often linked to noise exposure or age-related hearing loss. Sudden tinnitus in one ear, or tinnitus that pulses with the heartbeat, should be checked by a doctor.",
     "Tinnitus is a bacterial ear infection that always needs antibiotic ear drops, and the ringing stops once the infection clears. Hearing tests are not useful."),
    ("What is the PSA test used for?",
     "The PSA test measures prostate-specific antigen in the blood. A raised level can be a sign of prostate cancer but also of an enlarged prostate or infection, so whether to test is a shared decision with a doctor.",
     "The PSA test is a definitive test for prostate cancer: a normal level rules the cancer out completely and a raised level always means cancer. No further tests are ever needed after a PSA result."),
    ("How do statins lower cholesterol?",
     "Statins block HMG-CoA reductase, the liver enzyme that makes cholesterol. The liver then takes up more LDL cholesterol from the blood.",
     "Statins bind cholesterol in the gut and stop it being absorbed from food, so they only work when taken with a fatty meal. They have no effect on the liver."),
    ("Which blood group is the universal red cell donor?",
     "Group O negative is the universal red cell donor, because its red cells carry no A, B or RhD antigens. It is used in emergencies when the patient's blood group is unknown.",
     "Group AB positive is the universal red cell donor, because its red cells carry every antigen and so match all patients. O negative blood can only be given to people who are also O negative."),
    ("Are generic medicines as effective as brand-name medicines?",
     "Yes. Generic medicines contain the same active ingredient at the same strength and must be shown to be bioequivalent to the brand-name product. They differ only in inactive ingredients, appearance and price.",
     "No. Generic medicines contain only about half of the active ingredient of the brand, which is why they are cheaper and why doctors prefer brands. They also do not have to pass any quality tests."),
    ("What is glaucoma?",
     "Glaucoma is a group of eye diseases that damage the optic nerve, usually linked to raised pressure inside the eye. It causes gradual loss of side vision and is treated mainly with eye drops that lower the pressure.",
     "Glaucoma is clouding of the lens of the eye that makes vision blurry. It is treated by getting stronger glasses and does not cause permanent vision loss. Eye pressure tests are not helpful."),
    ("Should I take tetracycline with milk?",
     "No. Calcium in milk binds tetracycline and greatly reduces its absorption, as do iron supplements and antacids. Take it with water, 1 to 2 hours apart from dairy products.",
     "Yes. Milk helps tetracycline get absorbed faster and protects the stomach, so it is best taken with a full glass of milk. Calcium has no effect on how antibiotics are absorbed."),
    ("What is the first-line medicine for type 2 diabetes?",
     "Metformin, together with diet and exercise, is the usual first-line medicine for type 2 diabetes unless there is a contraindication. SGLT2 inhibitors or GLP-1 receptor agonists are added for people with heart or kidney disease.",
     "Insulin injections are always the first-line treatment from the day type 2 diabetes is diagnosed, because tablets do not work for this condition. Metformin is reserved for type 1 diabetes."),
    ("How do I know if a cut needs stitches?",
     "A cut may need stitches if it gapes open, is deeper than about 6 mm, keeps bleeding after 10 minutes of firm pressure, or is on the face or over a joint. It is best closed within a few hours, so seek care promptly.",
     "Cuts only need stitches if they are longer than 10 cm. Anything smaller heals on its own with a plaster, however deep it is. Stitches can be put in at any time, even several days after the injury."),
    ("Is a fever after vaccination normal?",
     "A mild fever for a day or two after a vaccine is common and shows the immune system responding. Seek medical advice if the fever is high, lasts more than two days, or there are signs of an allergic reaction.",
     "No. A fever after a vaccine means the vaccine has given you the disease, so you should refuse any further doses. It also suggests that the vaccine batch was faulty and should be reported as a failure."),
    ("What are the symptoms of an overactive thyroid?",
     "An overactive thyroid commonly causes weight loss despite a good appetite, feeling hot and sweaty, a fast or irregular heartbeat, tremor, anxiety and loose stools.",
     "An overactive thyroid commonly causes weight gain, feeling cold, constipation, a slow heartbeat, dry skin and tiredness."),
    ("How does penicillin kill bacteria?",
     "Penicillin binds penicillin-binding proteins and blocks the cross-linking of peptidoglycan in the bacterial cell wall. The weakened wall causes the bacterium to burst.",
     "Penicillin blocks bacterial protein synthesis at the 30S ribosome, which stops the bacteria from making the proteins they need to divide."),
    ("What are the main causes of peptic ulcers?",
     "The main causes are infection with Helicobacter pylori and the use of NSAIDs such as ibuprofen or aspirin. Treating H. pylori and stopping NSAIDs allows most ulcers to heal.",
     "The main causes are stress and spicy food. Bacteria play no role, so antibiotics are never part of ulcer treatment. Drinking plenty of milk is the best treatment."),
    ("How much physical activity should adults do each week?",
     "Adults should aim for at least 150 minutes of moderate or 75 minutes of vigorous aerobic activity a week. Muscle-strengthening activity on 2 or more days is also recommended.",
     "Twenty minutes of gentle walking once a week is all the activity adults need, and more than this gives no extra health benefit. Strength exercises are unnecessary for adults."),
    ("How can I lower my risk of type 2 diabetes?",
     "Keeping to a healthy weight, being active for at least 150 minutes a week and eating a diet high in fibre and low in sugary drinks all lower the risk. Losing 5 to 7% of body weight helps people with prediabetes.",
     "Type 2 diabetes is purely genetic, so diet, weight and exercise make no difference to your risk of getting it. Screening is therefore pointless for people who are overweight."),
    ("What does a lipid panel measure?",
     "A lipid panel measures total cholesterol, LDL cholesterol, HDL cholesterol and triglycerides. It is used to estimate cardiovascular risk, and fasting is often not required.",
     "A lipid panel measures blood sugar and liver enzymes, and you must fast for 24 hours before it or the results are invalid. It does not measure cholesterol."),
    ("Is it dangerous to take benzodiazepines together with opioids?",
     "Yes. Both depress the brain and breathing, and together they greatly increase the risk of fatal respiratory depression. Only combine them if a doctor has prescribed both and knows about each.",
     "No. Benzodiazepines counteract the breathing effects of opioids, which is why they are often given together to make opioids safer. Alcohol can be added safely as well."),
    ("Which vaccine protects against measles?",
     "The MMR vaccine protects against measles, mumps and rubella. Two doses give about 97% protection against measles.",
     "The BCG vaccine protects against measles and is given once at birth; no booster dose is needed. It also protects against mumps, so the MMR vaccine is not needed."),
    ("What are signs of dehydration in a young child?",
     "Signs include fewer wet nappies, a dry mouth, crying without tears, sunken eyes or a sunken soft spot on the head, and unusual sleepiness or irritability. A child with these signs should be seen urgently.",
     "Young children rarely get dehydrated, so there is nothing in particular to watch for; they will drink when they are thirsty. Offering extra fluids is not necessary, even when they have diarrhoea."),
    ("What are the main functions of the kidneys?",
     "The kidneys filter the blood to remove waste and excess water as urine and keep salt, potassium and acid levels balanced. They also help control blood pressure and make erythropoietin and active vitamin D.",
     "The kidneys mainly produce bile to digest fat and store glucose as glycogen, while urine is made in the bladder. They have no role in blood pressure or red blood cell production."),
    ("How is iron deficiency anemia usually treated?",
     "It is usually treated with oral iron, such as ferrous sulfate once daily or on alternate days, while the cause of the iron loss is found and treated. Iron is absorbed better away from tea, coffee and antacids.",
     "Iron deficiency anemia is treated with vitamin B12 injections every three months, and iron tablets should be avoided. Drinking tea or coffee with meals improves iron absorption."),
    ("I've felt sad most days for a month and lost interest in things I used to enjoy. What should I do?",
     "These can be symptoms of depression, which is common and treatable, so please book an appointment with your doctor. Talking therapies and antidepressants both help, and if you have thoughts of harming yourself, contact emergency services or a crisis line now.",
     "Everyone feels down sometimes. Try to cheer yourself up and keep busy, and it will pass on its own, so there is no need to see anyone. Medication and talking therapies rarely help with low mood, and feelings like these are not a medical problem."),
    ("What is a migraine aura?",
     "A migraine aura is a temporary neurological disturbance, most often visual, such as zigzag lines, flashing lights or blind spots. It develops over several minutes, lasts 5 to 60 minutes and usually comes before the headache.",
     "A migraine aura is the throbbing pain itself, which typically lasts for 3 days and is felt on both sides of the head. Visual symptoms are not part of a migraine."),
    ("What is a normal oxygen saturation?",
     "A normal oxygen saturation in a healthy adult at sea level is 95 to 100%. Some people with COPD have a lower target range of 88 to 92%.",
     "A normal oxygen saturation is 80 to 85%, and levels above 90% suggest too much oxygen in the blood. People with COPD should always aim for 100%."),
    ("Can I take paracetamol and ibuprofen at the same time?",
     "Adults can generally take both, because they work in different ways, as long as each is taken at its recommended dose. Check first if you have stomach ulcers, kidney problems, heart failure or asthma worsened by NSAIDs.",
     "No. Paracetamol and ibuprofen react together in the stomach to form a toxic compound, so they must never be taken on the same day. Leave at least 12 hours between them."),
    ("What is the maximum daily dose of paracetamol for a healthy adult?",
     "The maximum is 4 g in 24 hours, usually taken as 1 g up to four times a day at least 4 hours apart. A lower maximum is used for people who weigh under 50 kg, have liver disease or drink heavily.",
     "Up to 10 g a day is safe for a healthy adult, since paracetamol has no serious overdose risk. Taking more simply makes the pain relief last longer."),
    ("What does a positive Babinski sign mean in an adult?",
     "In an adult, an upgoing big toe when the sole is stroked indicates an upper motor neuron lesion affecting the corticospinal tract, for example after a stroke. It is normal in infants up to about 1 to 2 years.",
     "In an adult, an upgoing big toe when the sole is stroked is a normal reflex that shows the nervous system is healthy. It is absent in infants."),
    ("What is the most common cause of hypothyroidism in countries with enough iodine?",
     "Hashimoto thyroiditis, an autoimmune condition in which the immune system gradually destroys the thyroid, is the most common cause.",
     "Graves disease, an autoimmune condition in which the immune system gradually destroys the thyroid, is the most common cause."),
    ("How is sepsis treated in the first hour?",
     "Blood cultures are taken, broad-spectrum intravenous antibiotics are given within one hour, and intravenous fluids are given for low blood pressure or a high lactate. Vasopressors are added if blood pressure stays low.",
     "Sepsis is managed by watching the patient and giving oral painkillers until culture results return after 48 hours; antibiotics before then are unnecessary. Fluids should be avoided because they worsen the infection."),
    ("Why should I use sunscreen?",
     "Sunscreen protects against UVB and UVA rays, which reduces sunburn, skin ageing and the risk of skin cancer, including melanoma. Use a broad-spectrum SPF 30 or higher and reapply every 2 hours outdoors.",
     "Sunscreen only matters at the beach in summer. Using it on ordinary days makes no difference to skin health or cancer risk. A suntan protects you as well as any sunscreen."),
    ("What causes gout?",
     "Gout is caused by crystals of monosodium urate forming in a joint when uric acid levels in the blood are high. It often affects the big toe first.",
     "Gout is caused by crystals of calcium pyrophosphate forming in a joint when calcium levels in the blood are high. It often affects the knee first."),
    ("Which drug is used to dissolve a clot in acute ischemic stroke?",
     "Intravenous alteplase or tenecteplase can dissolve the clot if given within 4.5 hours of symptom onset, after a CT scan has excluded bleeding.",
     "A bolus of intravenous heparin dissolves the clot and can be given at any time within 48 hours, without any need for a scan first. Stroke symptoms that settle within an hour never need treatment."),
    ("What is the normal range for blood sodium?",
     "The normal serum sodium range is about 135 to 145 mmol/L. Low sodium can cause confusion and seizures when it is severe or falls quickly.",
     "The normal serum sodium range is about 120 to 130 mmol/L, and levels above 135 mmol/L are considered dangerously high. Drinking extra water is the usual treatment for high sodium in hospital."),
    ("Which vitamin does the skin make after sun exposure?",
     "The skin makes vitamin D when UVB light converts 7-dehydrocholesterol to cholecalciferol. It is then activated in the liver and kidneys.",
     "The skin makes vitamin C when sunlight reacts with sweat, and it is then stored in the liver for later use. Vitamin D can only be obtained from food."),
    ("What is a common side effect of opioid painkillers that does not wear off over time?",
     "Constipation is common and usually persists, because tolerance to it rarely develops. A laxative is often prescribed together with the opioid.",
     "Diarrhoea is the common lasting side effect of opioids, so an anti-diarrhoeal medicine is usually prescribed alongside them. Laxatives should be avoided with opioids."),
    ("What should I do if I've been bitten by a bat?",
     "Wash the wound with soap and water for 15 minutes and seek urgent medical advice about rabies post-exposure treatment, even if the bite looks minor. Bat bites can transmit rabies.",
     "Bat bites are tiny and harmless, so just put a plaster on it; there is no need to see a doctor. Bats do not carry rabies, so a vaccine is never needed after a bite."),
    ("Which hormones are lacking in Addison's disease?",
     "Addison's disease is a failure of the adrenal cortex, so cortisol is lacking and usually aldosterone too. It is treated with hydrocortisone and fludrocortisone.",
     "Addison's disease is a failure of the adrenal medulla, so adrenaline is lacking. It is treated with an adrenaline auto-injector used daily."),
    ("How long should I wash my hands with soap to remove germs?",
     "Wash with soap and water for at least 20 seconds, covering the backs of the hands, between the fingers and under the nails, then dry them well.",
     "Two or three seconds under the tap is enough, because soap kills germs instantly on contact. Drying your hands afterwards makes no difference."),
    ("What is preeclampsia?",
     "Preeclampsia is new high blood pressure after 20 weeks of pregnancy with protein in the urine or signs of organ damage. It can be dangerous for mother and baby, needs close monitoring, and is cured by delivery.",
     "Preeclampsia is harmless ankle swelling in early pregnancy. It needs no monitoring and always settles on its own. Blood pressure checks in later pregnancy are not needed."),
    ("What is the first treatment for an asthma attack?",
     "Use a short-acting reliever inhaler such as salbutamol, ideally through a spacer, taking one puff every 30 to 60 seconds up to 10 puffs. Call emergency services if the attack is severe or not improving.",
     "Use a steroid preventer inhaler such as beclometasone, which opens the airways within seconds and is the best inhaler during an attack. Reliever inhalers should be saved for mild symptoms only."),
    ("What test is used to screen for cervical cancer?",
     "Cervical screening tests a sample of cells from the cervix for high-risk HPV, and samples that are positive are checked for abnormal cells. It finds changes that can be treated before cancer develops.",
     "A blood test for CA-125 is used to screen for cervical cancer, and a normal result means screening is not needed again. Women who have had the HPV vaccine never need screening."),
    ("How should I take alendronate tablets?",
     "Take it first thing in the morning on an empty stomach with a full glass of plain water, and stay upright without eating or taking other medicines for at least 30 minutes. This helps absorption and prevents irritation of the food pipe.",
     "Take it at bedtime with a glass of milk and lie down straight afterwards, as this helps the tablet get absorbed. Taking it with breakfast and your other morning tablets is also fine."),
    ("What is a common side effect of iron tablets?",
     "Constipation, dark or black stools, nausea and stomach discomfort are common with iron tablets. Taking them with food can reduce the stomach upset, although it lowers absorption.",
     "Hair loss and pale, white stools are the common side effects of iron tablets, and they mean the dose is too low. They should be taken with tea to protect the stomach."),
    ("I've just started warfarin. What should I know about my diet?",
     "Keep the amount of vitamin K-rich foods, such as green leafy vegetables, consistent from week to week, and avoid binge drinking and large amounts of cranberry juice. Your INR will be checked regularly, especially at the start.",
     "Diet makes no difference with warfarin, so you can eat and drink whatever you like, and you only need an INR test once a year. Cranberry juice and alcohol in any amount are fine too."),
    ("What usually causes a heart attack?",
     "Most heart attacks happen when a fatty plaque in a coronary artery ruptures and a blood clot forms on it, blocking blood flow to part of the heart muscle.",
     "Most heart attacks are caused by a spasm of the heart valves, which stops them opening and blocks blood from leaving the heart. Cholesterol and smoking play no part in it."),
    ("What causes shingles?",
     "Shingles is caused by reactivation of the varicella-zoster virus, the chickenpox virus, which lies dormant in nerve roots. It causes a painful, blistering rash in a band on one side of the body.",
     "Shingles is caused by herpes simplex type 2 spreading from the genitals to the skin of the chest, and it can only occur in people who never had chickenpox."),
    ("What is a normal urine output for an adult?",
     "A normal adult urine output is at least 0.5 mL per kg of body weight per hour, usually about 0.8 to 2 litres a day. Output below 0.5 mL/kg/hour for 6 hours is a sign of acute kidney injury.",
     "A normal adult should pass at least 5 litres of urine a day, and anything less than that is a sign of kidney failure. Drinking less water is the best way to protect the kidneys."),
]

# rejected answers that are unhelpful or unsafe rather than factually wrong (for the report)
UNHELPFUL = {
    "I've felt sad most days for a month and lost interest in things I used to enjoy. What should I do?",
    "What are signs of dehydration in a young child?",
    "What should I do if I've been bitten by a bat?",
    "Why should I use sunscreen?",
    "I've just started warfarin. What should I know about my diet?",
    "How should head lice be treated?",
    "How long should I wash my hands with soap to remove germs?",
    "Is a fever after vaccination normal?",
}


def _sentences(s: str) -> int:
    # count sentence ends, ignoring decimals and abbreviations such as "e.g." / "H. pylori"
    t = re.sub(r"\b(e\.g|i\.e|H|E|vs|Dr)\.", "X", s)
    t = re.sub(r"\d\.\d", "0", t)
    return len(re.findall(r"[.!?](\s|$)", t))


def check() -> None:
    assert len(SFT) == 120, len(SFT)
    assert len(PREFERENCE) == 80, len(PREFERENCE)
    ins = [i for i, _, _ in SFT]
    assert len(set(ins)) == len(ins), "duplicate SFT instruction"
    qs = [q for q, _, _ in PREFERENCE]
    assert len(set(qs)) == len(qs), "duplicate preference question"
    assert not set(ins) & set(qs), "SFT and preference share a question"
    assert UNHELPFUL <= set(qs), UNHELPFUL - set(qs)
    for i, inp, out in SFT:
        n = _sentences(out)
        assert 1 <= n <= 3, (i, n)
        assert i.strip() == i and out.strip() == out and inp.strip() == inp
        assert out.isascii() and i.isascii() and inp.isascii(), i
    for q, c, r in PREFERENCE:
        assert c != r and c.strip() == c and r.strip() == r
        assert 1 <= _sentences(c) <= 3, q


def build(out_dir: Path) -> dict:
    check()
    rng = random.Random(SEED)
    sft = [{"instruction": i, "input": inp, "output": o} for i, inp, o in SFT]
    rng.shuffle(sft)
    pref = [{"question": q, "response_chosen": c, "response_rejected": r} for q, c, r in PREFERENCE]
    rng.shuffle(pref)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Stanford Alpaca: utils.jdump -> json.dump(obj, f, indent=4) (default ensure_ascii, no EOL)
    with open(out_dir / "sft_en_alpaca.json", "w", encoding="utf-8", newline="\n") as f:
        json.dump(sft, f, indent=4)
    # MedicalGPT data/reward: one json.dumps(obj, ensure_ascii=False) per line
    with open(out_dir / "preference_en.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for r in pref:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    derived = english_subsets(Path(__file__).parent, out_dir)
    return {"sft_en_alpaca.json": len(sft), "preference_en.jsonl": len(pref), **derived,
            "sft_with_input": sum(1 for r in sft if r["input"]),
            "pref_unhelpful_rejected": len(UNHELPFUL)}


def english_subsets(src_dir: Path, out_dir: Path) -> dict:
    """The English records of make_samples.py's bilingual files, in their own shapes and
    serialisation: pretrain_en.jsonl (lines of pretrain.jsonl) and sft_en_sharegpt.json
    (conversations of sft_sharegpt.json, indent 2), for English-only models."""
    counts = {}
    src = src_dir / "pretrain.jsonl"
    if src.is_file():
        lines = [ln for ln in src.read_text(encoding="utf-8").splitlines(keepends=True)
                 if ln.strip() and json.loads(ln)["text"].isascii()]
        (out_dir / "pretrain_en.jsonl").write_text("".join(lines), encoding="utf-8", newline="\n")
        counts["pretrain_en.jsonl"] = len(lines)
    src = src_dir / "sft_sharegpt.json"
    if src.is_file():
        convs = [c for c in json.loads(src.read_text(encoding="utf-8"))
                 if all(t["value"].isascii() for t in c["conversations"])]
        with open(out_dir / "sft_en_sharegpt.json", "w", encoding="utf-8", newline="\n") as f:
            json.dump(convs, f, ensure_ascii=False, indent=2)
            f.write("\n")
        counts["sft_en_sharegpt.json"] = len(convs)
    return counts


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    print(json.dumps(build(out)))

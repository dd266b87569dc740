"""A small byte-level BPE tokenizer trained locally (no network) for tests and benches."""
from __future__ import annotations


def build_tokenizer(texts=None, vocab_size: int = 2000):
    """Train a byte-level BPE on ``texts`` (a built-in medical-ish corpus by default) and wrap it
    as a ``PreTrainedTokenizerFast`` with ``<s>``, ``</s>`` (eos) and ``<pad>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        texts = sample_texts(2000)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


_WORDS = ("patient presents with fever cough chest pain hypertension diabetes insulin "
          "aspirin dose mg daily renal hepatic cardiac infection antibiotic diagnosis "
          "treatment acute chronic syndrome blood pressure glucose therapy clinical trial "
          "患者 发热 咳嗽 胸痛 高血压 糖尿病 治疗 诊断 急性 慢性 感染 抗生素 血压 血糖").split()


def sample_texts(n: int, seed: int = 0, min_words: int = 8, max_words: int = 40) -> list[str]:
    import random
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(min_words, max_words))) +
            f" #{i}." for i in range(n)]

"""C-Poly layer and model wrapper (medpipe.stages.adapters.cpoly) on a tiny random Qwen2."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM  # import once at collection (lazy module)

from medpipe.stages.adapters.cpoly import (
    CPolyConfig,
    CPolyLinear,
    CPolyModel,
    UnknownTaskError,
    _TaskState,
    inject_cpoly,
    load_cpoly,
    merge_cpoly,
)

TASKS = ["pubmedqa", "medmcqa", "medqa"]


def tiny_qwen(seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    return Qwen2ForCausalLM(cfg).eval()


@torch.no_grad()
def randomize(cm: CPolyModel, seed: int = 1, logit_scale: float = 2.0) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in cm.cpoly_layers().values():
        layer.cpoly_B.copy_(torch.randn(layer.cpoly_B.shape, generator=g) * 0.3)
        layer.cpoly_logits.copy_(torch.randn(layer.cpoly_logits.shape, generator=g) * logit_scale)
        if layer.cpoly_task_w is not None:
            layer.cpoly_task_w.add_(torch.randn(layer.cpoly_task_w.shape, generator=g) * 0.3)


def make_cpoly(seed: int = 0, **kw) -> CPolyModel:
    kw.setdefault("target_modules", "all-linear")
    cm = inject_cpoly(tiny_qwen(seed), TASKS, CPolyConfig(**kw))
    randomize(cm, seed + 1)
    return cm.eval()


def ids(b: int = 4, n: int = 7, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 100, (b, n), generator=g)


# ----------------------------------------------------------------------------------------------
def _peft_lora_linear(base: nn.Linear, A: torch.Tensor, B: torch.Tensor, alpha: float):
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    cfg = LoraConfig(r=A.shape[0], lora_alpha=alpha)
    lora = LoraLinear(base, "default", cfg, r=A.shape[0], lora_alpha=alpha)
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(A)
        lora.lora_B["default"].weight.copy_(B)
    return lora.eval()


def test_single_skill_equals_lora():
    torch.manual_seed(0)
    base = nn.Linear(16, 24)
    state = _TaskState()
    cfg = CPolyConfig(r=4, alpha=8.0)
    layer = CPolyLinear(base, 2, cfg, state).eval()
    with torch.no_grad():
        layer.cpoly_B.normal_()
        # task 0: all shared weight on skill 2, task-specific weight 0
        layer.cpoly_logits[0] = torch.tensor([-60.0, -60.0, 60.0, -60.0])
        layer.cpoly_task_w[0] = 0.0
    x = torch.randn(3, 5, 16)
    state.task_ids = torch.zeros(3, dtype=torch.long)
    r = 4
    ref = _peft_lora_linear(base, layer.cpoly_A[2 * r:3 * r], layer.cpoly_B[:, 2 * r:3 * r], 8.0)
    torch.testing.assert_close(layer(x), ref(x), atol=1e-5, rtol=1e-5)

    # all weight on task 1's own specific skill (no normalisation, shared logits -> sigmoid 0)
    layer2 = CPolyLinear(base, 2, CPolyConfig(r=4, alpha=8.0, normalize=False), state).eval()
    with torch.no_grad():
        layer2.cpoly_B.normal_()
        layer2.cpoly_logits.fill_(-200.0)
    state.task_ids = torch.ones(3, dtype=torch.long)
    k = 4 + 1  # skill index of task 1's specific skill
    ref2 = _peft_lora_linear(base, layer2.cpoly_A[k * r:(k + 1) * r], layer2.cpoly_B[:, k * r:(k + 1) * r], 8.0)
    torch.testing.assert_close(layer2(x), ref2(x), atol=1e-5, rtol=1e-5)


def test_task_block_identity_and_gumbel_sampling():
    torch.manual_seed(0)
    state = _TaskState()
    layer = CPolyLinear(nn.Linear(8, 8), 3, CPolyConfig(), state).eval()
    alloc = layer.allocation(torch.arange(3))  # eval mode: no Gumbel noise (what merge_cpoly folds in)
    assert alloc.shape == (3, 4 + 3)
    torch.testing.assert_close(alloc[:, 4:], torch.eye(3))
    torch.testing.assert_close(alloc[:, :4].sum(-1), torch.ones(3))  # normalised shared block
    full = CPolyLinear(nn.Linear(8, 8), 3, CPolyConfig(task_block="full"), state)
    torch.testing.assert_close(full.cpoly_task_w.detach(), torch.eye(3))

    with torch.no_grad():
        layer.cpoly_B.normal_()
    x = torch.randn(2, 4, 8)
    state.task_ids = torch.tensor([0, 2])
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # Gumbel-sigmoid noise in training
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)  # deterministic sigmoid at eval

    st = CPolyLinear(nn.Linear(8, 8), 3, CPolyConfig(straight_through=True, normalize=False), state).train()
    w = st.allocation(torch.tensor([0, 1, 2, 0]))[:, :4]
    torch.testing.assert_close(w.detach(), w.detach().round())  # hard 0/1 forward values
    assert w.requires_grad


def test_mixed_task_batch_matches_per_example_runs():
    cm = make_cpoly()
    x = ids(4)
    tasks = ["medqa", "pubmedqa", "medmcqa", "pubmedqa"]
    with torch.no_grad():
        batch = cm(input_ids=x, task_ids=tasks).logits
        for i, t in enumerate(tasks):
            one = cm(input_ids=x[i:i + 1], task_ids=t).logits
            torch.testing.assert_close(batch[i:i + 1], one, atol=1e-5, rtol=1e-5)
        # the tasks really differ, and the adapter really changes the base model
        a = cm(input_ids=x[:1], task_ids="medqa").logits
        b = cm(input_ids=x[:1], task_ids="pubmedqa").logits
        assert (a - b).abs().max() > 1e-3
        base = tiny_qwen(0)(input_ids=x[:1]).logits  # the same base weights, no adapter
        assert (a - base).abs().max() > 1e-3
    # tensor ids work the same as names
    with torch.no_grad():
        t_ids = torch.tensor([TASKS.index(t) for t in tasks])
        torch.testing.assert_close(cm(input_ids=x, task_ids=t_ids).logits, batch)


def test_training_gradients_reach_only_used_skills():
    cm = make_cpoly()
    cm.train()
    x = ids(2)
    out = cm(input_ids=x, labels=x, task_ids=["pubmedqa", "pubmedqa"])
    out.loss.backward()
    layer = next(iter(cm.cpoly_layers().values()))
    r = layer.r
    g = layer.cpoly_A.grad
    assert g[:4 * r].abs().sum() > 0                      # shared skills
    assert g[4 * r:5 * r].abs().sum() > 0                 # pubmedqa's own skill
    assert g[5 * r:].abs().sum() == 0                     # other tasks' skills untouched
    assert layer.cpoly_logits.grad[0].abs().sum() > 0 and layer.cpoly_logits.grad[1:].abs().sum() == 0
    trainable = {n for n, p in cm.named_parameters() if p.requires_grad}
    assert trainable and all(".cpoly_" in n for n in trainable)


def test_gradient_checkpointing_keeps_task_ids():
    """Re-run during backward, every layer still routes each row to its task: the gradients equal
    those of the same step without checkpointing, and the task not in the batch gets none."""
    grads = []
    for checkpointing in (False, True):
        cm = make_cpoly()
        if checkpointing:
            cm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        cm.train()
        torch.manual_seed(0)  # the same Gumbel noise in the shared routing for both
        x = ids(2)
        cm(input_ids=x, labels=x, task_ids=["medqa", "medmcqa"]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in cm.named_parameters() if p.requires_grad})
        layer = next(iter(cm.cpoly_layers().values()))
        r = layer.r
        assert layer.cpoly_A.grad[4 * r:5 * r].abs().sum() == 0  # pubmedqa's own skill: not in the batch
        assert layer.cpoly_A.grad[5 * r:].abs().sum() > 0  # medmcqa's and medqa's
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_merge_equals_unmerged(tmp_path):
    from transformers import AutoModelForCausalLM

    cm = make_cpoly()
    x = ids(2)
    with torch.no_grad():
        want = cm(input_ids=x, task_ids="medmcqa").logits
    merged = merge_cpoly(cm, "medmcqa")
    assert not any(isinstance(m, CPolyLinear) for m in merged.modules())
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = reloaded(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_unknown_task_error_or_shared_only():
    cm = make_cpoly()
    x = ids(2)
    with pytest.raises(UnknownTaskError):
        cm(input_ids=x, task_ids=["medqa", "cmexam"])
    with pytest.raises(UnknownTaskError):
        cm(input_ids=x, task_ids=torch.tensor([0, 7]))
    with torch.no_grad():
        mixed = cm(input_ids=x, task_ids=["medqa", "cmexam"], unknown_task="shared").logits
        known = cm(input_ids=x[:1], task_ids="medqa").logits
    torch.testing.assert_close(mixed[:1], known, atol=1e-5, rtol=1e-5)
    shared = merge_cpoly(make_cpoly(), None, shared_only=True)
    with torch.no_grad():
        torch.testing.assert_close(mixed[1:], shared(input_ids=x[1:]).logits, atol=1e-5, rtol=1e-5)
    # configured default
    cm2 = make_cpoly(unknown_task="shared")
    with torch.no_grad():
        torch.testing.assert_close(cm2(input_ids=x, task_ids=["medqa", "cmexam"]).logits, mixed,
                                   atol=1e-5, rtol=1e-5)


def test_no_task_ids_is_an_error():
    cm = make_cpoly()
    with pytest.raises(RuntimeError, match="task ids"):
        cm(input_ids=ids(1))


def test_save_load_roundtrip(tmp_path):
    cm = make_cpoly()
    x = ids(3)
    tasks = ["medqa", "medqa", "pubmedqa"]
    with torch.no_grad():
        want = cm(input_ids=x, task_ids=tasks).logits
    cm.save_pretrained(tmp_path / "ad")  # what the trainer's final save calls
    assert (tmp_path / "ad" / "cpoly_adapter.safetensors").exists()
    loaded = load_cpoly(tiny_qwen(0), tmp_path / "ad")
    assert loaded.tasks == TASKS and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x, task_ids=tasks).logits, want, atol=1e-6, rtol=1e-6)


def test_generate_with_mixed_task_ids():
    cm = make_cpoly()
    x = ids(2, 5)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        both = cm.generate(input_ids=x, attention_mask=torch.ones_like(x), task_ids=["medqa", "pubmedqa"], **kw)
        a = cm.generate(input_ids=x[:1], attention_mask=torch.ones_like(x[:1]), task_ids="medqa", **kw)
        b = cm.generate(input_ids=x[1:], attention_mask=torch.ones_like(x[1:]), task_ids="pubmedqa", **kw)
        assert torch.equal(both, torch.cat([a, b]))
        beams = cm.generate(input_ids=x, attention_mask=torch.ones_like(x), task_ids=["medqa", "pubmedqa"],
                            num_beams=2, num_return_sequences=2, **kw)
        assert beams.shape[0] == 4
    assert cm._state.task_ids is None  # context cleared after the call


def test_cpoly_model_takes_task_ids_and_is_trained_as_the_stage_builds_it():
    # the stage builds the layers with inject_cpoly(model, tasks, params.cpoly); the scorers route
    # task ids only to models that declare `accepts_task_ids`
    cm = inject_cpoly(tiny_qwen(), TASKS, CPolyConfig(r=2))
    assert cm.accepts_task_ids is True and isinstance(cm, CPolyModel)
    layer = next(iter(cm.cpoly_layers().values()))
    assert layer.cpoly_A.shape[0] == (4 + len(TASKS)) * 2  # A shared + one skill per task, rank 2
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        inject_cpoly(tiny_qwen(), TASKS, CPolyConfig(target_modules=["no_such_proj"]))

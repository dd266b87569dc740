"""`grpo` — online RL with verifiable rewards on TRL's GRPOTrainer (Group Relative Policy
Optimization): for every prompt `num_generations` completions are sampled, scored by the stage's
rewards (plugins, `medpipe.stages.rewards`), and each completion's advantage is its reward
against its group's mean (÷ std with `scale_rewards: group`).

* Model: the previous stage's artifact (merged). `peft:` trains a new LoRA on it, else all
  weights. Reference for the KL term (`beta > 0`): the input model itself — with LoRA, TRL's
  policy with the adapter disabled (the merged input); in full training a frozen copy TRL
  reloads from `config._name_or_path`, which this stage points at the input artifact's directory.
  `beta: 0` (TRL's default) builds no reference. `ref_probe: true` saves the reference log-probs
  of the latest batch (ref_probe.pt), so the choice of reference is checkable from outside.
* Prompts: exam items in any mcq format medpipe reads (MedQA, MedMCQA, CMExam, CMB, C-Eval,
  CMMLU, PubMedQA, MMLU), listed as the eval stage lists them, with the answer-format instruction
  (`<answer>X</answer>`; `think: true` asks for `<think>…</think>` first) and `shots` solved
  examples from the training split, rendered through the model's chat template by TRL. The gold
  letters travel in the `answer` column, the item's option letters in `letters`.
* `heldout`: that fraction of the items is never trained on; it is sampled once before and once
  after training with the same seed and scored (`heldout_before/*`, `heldout_after/*`: reward,
  each reward, format-valid rate, accuracy, completion tokens).
* Batch: `batch_size` is the GLOBAL number of completions per optimizer step (prompts ×
  num_generations), `micro_batch_size` completions per device and forward; TRL generates the
  whole batch at once (generation_batch_size = batch_size), so batch_size must be a multiple of
  num_generations (TRL's own refusal, checked at `validate`).
* Logged per step (log_history.jsonl, progress line): the total reward, each reward's mean
  (`rewards/<name>/mean`), the fraction of zero-variance groups (`frac_reward_zero_std`), with a
  warning when it stays near 1 at the start (stages/training/rl_callbacks.py).
* GPU: `use_vllm` (null = on when CUDA and vLLM are there) generates with vLLM colocated in the
  training process (TRL's `vllm_mode: colocate`), else transformers' generate.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from medpipe.params import param
from medpipe.stagekind import StageKind
from medpipe.stages.training.params import TrainParams

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")


def _default_rewards() -> list:
    return [{"name": "mcq_exact", "weight": 1.0}, {"name": "format", "weight": 0.5}]


@dataclass
class GRPOParams(TrainParams):
    lr: float = param(1e-6, "peak learning rate (TRL's GRPO default)")
    epochs: float = param(1.0, "passes over the training prompts")
    batch_size: int = param(8, "GLOBAL completions per optimizer step = prompts × num_generations")
    logging_steps: int = param(1, "optimizer steps between log lines (rewards, zero-variance groups)")
    max_length: int = param(1024, "prompt tokens (chat template included); longer prompts are dropped and counted")
    heldout: float = param(0.0, "fraction of the items never trained on: sampled and scored before and after training")
    num_generations: int = param(4, "completions sampled per prompt (a group; >= 2)")
    max_completion_length: int = param(256, "new tokens per completion")
    temperature: float = param(1.0, "sampling temperature of the rollouts (also of the held-out passes)")
    top_p: float = param(1.0, "nucleus sampling of the rollouts")
    beta: float = param(0.0, "KL coefficient against the reference (the input model); 0 = no reference (TRL default)")
    loss_type: str = param("dapo", "TRL loss_type: " + ", ".join(LOSS_TYPES))
    scale_rewards: str = param("group", "advantage scaling: group (÷ group std) | batch | none (Dr. GRPO)")
    epsilon: float = param(0.2, "PPO clip range (lower; TRL epsilon)")
    epsilon_high: Optional[float] = param(None, "upper clip range (DAPO clip-higher); null = epsilon")
    num_iterations: int = param(1, "policy updates per generated batch (TRL num_iterations, μ)")
    mask_truncated_completions: bool = param(False, "leave completions cut at max_completion_length out of the loss")
    rewards: List[Any] = param(help="rewards combined with weights: [{name: mcq_exact|format|length|judge|<plugin>, "
                                    "weight, options...} | {python: 'pkg.module:function', weight}]",
                               factory=_default_rewards)
    shots: int = param(0, "solved examples (from the training split) before each prompt, answers in the asked format")
    think: bool = param(False, "ask for <think>…</think> before the <answer> (the format reward's think option too)")
    lang: str = param("auto", "prompt language: auto (per item) | en | zh")
    heldout_eval: bool = param(True, "sample and score the held-out prompts before and after training")
    ref_probe: bool = param(True, "save the latest batch's reference log-probs to ref_probe.pt (beta > 0)")
    use_vllm: Optional[bool] = param(None, "generate with vLLM colocated (GPU); null = when CUDA and vLLM are there")
    vllm_gpu_memory_utilization: float = param(0.3, "GPU memory share vLLM may take when colocated")

    def _rules(self):
        from medpipe.stages.rewards import problems

        bad = problems(self.rewards)
        return super()._rules() + [
            ("num_generations", self.num_generations >= 2, ">= 2 (GRPO compares completions within a group)"),
            ("batch_size", self.num_generations < 2 or self.batch_size % self.num_generations == 0,
             f"a multiple of num_generations ({self.num_generations}): it counts prompts × num_generations "
             f"and TRL generates whole groups"),
            ("max_completion_length", self.max_completion_length >= 1, ">= 1"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("beta", self.beta >= 0, ">= 0"),
            ("loss_type", self.loss_type in LOSS_TYPES, "one of " + ", ".join(LOSS_TYPES)),
            ("scale_rewards", self.scale_rewards in SCALE_REWARDS, "one of " + ", ".join(SCALE_REWARDS)),
            ("epsilon", self.epsilon > 0, "> 0"),
            ("epsilon_high", self.epsilon_high is None or self.epsilon_high >= self.epsilon, ">= epsilon or null"),
            ("num_iterations", self.num_iterations >= 1, ">= 1"),
            ("shots", self.shots >= 0, ">= 0"),
            ("lang", self.lang in ("auto", "en", "zh"), "auto, en or zh"),
            ("eval_steps", self.eval_steps is None, "null (the held-out prompts are scored before and after training)"),
            ("keep_best", not self.keep_best, "false (GRPO has no held-out loss; see heldout_eval)"),
            ("vllm_gpu_memory_utilization", 0 < self.vllm_gpu_memory_utilization <= 1, "in (0, 1]"),
            ("rewards", not bad, "valid: " + "; ".join(bad))]


def prompt_rows(records: list[dict], pool: list[dict], p: GRPOParams) -> list[dict]:
    """The trainer's rows: chat prompt, gold letters, option letters, item id."""
    from medpipe.stages.evaluation.prompts import pick_shots
    from medpipe.stages.rewards.answers import prompt_messages

    rows = []
    for r in records:
        shots = pick_shots(r, pool, p.shots) if p.shots else []
        rows.append({"prompt": prompt_messages(r, p.lang, shots, p.think), "answer": list(r["answer"]),
                     "letters": "".join(r["options"]), "id": str(r.get("id") or r.get("_loc"))})
    return rows


def vllm_on(p: GRPOParams, name: str) -> bool:
    import importlib.util

    import torch

    from medpipe.errors import ConfigError

    have = torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None
    if p.use_vllm and not have:
        raise ConfigError(f"stages.{name}.use_vllm: true needs a CUDA GPU and vLLM installed "
                          f"(pip install vllm); set it to null or false")
    return have if p.use_vllm is None else bool(p.use_vllm)


class GRPOStage(StageKind):
    """Online RL (GRPO, TRL) with verifiable rewards on exam items; reference = the input model."""

    Params = GRPOParams

    def check(self, params: GRPOParams, base: Any, data_opts: dict) -> list[str]:
        from medpipe.data import load_records
        from medpipe.stages import rewards as reward_plugins
        from medpipe.stages.training.params import data_options

        reward_plugins.build(params.rewards)  # options and python imports fail here, before any stage trains
        return load_records(params.data, "mcq", heldout=params.heldout,
                            **data_options(params, data_opts)).summary_table().splitlines()

    def run(self, ctx: Any):
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        from medpipe.data import load_records
        from medpipe.errors import MedpipeError
        from medpipe.stages import rewards as reward_plugins
        from medpipe.stages.models.loader import lora_config
        from medpipe.stages.training.args import training_kwargs
        from medpipe.stages.training.callbacks import callbacks
        from medpipe.stages.training.loop import load_model, load_tokenizer, save_result, seed, train
        from medpipe.stages.training.params import data_options
        from medpipe.stages.training.rl_callbacks import RewardWatch

        p: GRPOParams = ctx.params
        tok = load_tokenizer(ctx)
        funcs, weights = reward_plugins.build(p.rewards, where=f"stages.{ctx.name}.rewards")
        loaded = load_records(p.data, "mcq", heldout=p.heldout, **data_options(p, ctx.data))
        labeled = [r for r in loaded.records if r.get("answer")]
        rows, too_long = self._fit(prompt_rows(labeled, labeled, p), tok, p.max_length)
        held = prompt_rows([r for r in loaded.heldout if r.get("answer")], labeled, p)
        if not rows:
            raise MedpipeError(f"stages.{ctx.name}: no labeled exam items to train on in {p.data}")
        ctx.say(f"{len(rows)} training prompts × {p.num_generations} completions"
                + (f", {len(held)} held out" if held else "")
                + (f"; {too_long} prompt(s) over max_length={p.max_length} dropped" if too_long else "")
                + (f"; {len(loaded.records) - len(labeled)} unlabeled item(s) skipped"
                   if len(labeled) < len(loaded.records) else ""))
        for fn in funcs:
            if fn.start is not None:
                fn.start()  # e.g. the judge endpoint answers before anything trains

        kw = training_kwargs(ctx, p)
        for k in ("eval_strategy", "eval_steps", "load_best_model_at_end", "metric_for_best_model",
                  "greater_is_better"):
            kw.pop(k, None)  # no held-out loss in GRPO: the held-out prompts are scored before/after instead
        use_vllm = vllm_on(p, ctx.name)
        args = GRPOConfig(**kw, num_generations=p.num_generations, max_completion_length=p.max_completion_length,
                          temperature=p.temperature, top_p=p.top_p, beta=p.beta, loss_type=p.loss_type,
                          scale_rewards=p.scale_rewards, epsilon=p.epsilon, epsilon_high=p.epsilon_high,
                          num_iterations=p.num_iterations, mask_truncated_completions=p.mask_truncated_completions,
                          reward_weights=weights, trust_remote_code=bool(ctx.model.get("trust_remote_code", False)),
                          use_vllm=use_vllm, vllm_mode="colocate",
                          vllm_gpu_memory_utilization=p.vllm_gpu_memory_utilization, log_completions=False)
        model = load_model(ctx, p)
        # TRL rebuilds a full-training reference from config._name_or_path: the input artifact's directory
        model.config._name_or_path = str(ctx.input.model_path)
        before = self._heldout(ctx, model, tok, held, funcs, weights, p, "before")
        seed(ctx)  # the LoRA TRL builds next starts the same in any process
        watch = RewardWatch(ctx)
        trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tok, peft_config=lora_config(p.peft) if p.peft else None,
                              callbacks=callbacks(ctx, p) + [watch])
        if p.ref_probe and p.beta > 0 and trainer.is_world_process_zero():
            self._probe_reference(trainer, ctx.output_dir / "ref_probe.pt")
        metrics = train(trainer, ctx)
        metrics.update(watch.metrics(), prompts=len(rows), heldout=len(held), prompts_overlength=too_long,
                       num_generations=p.num_generations, use_vllm=int(use_vllm))
        metrics.update(before)
        metrics.update(self._heldout(ctx, trainer.model, tok, held, funcs, weights, p, "after"))
        return save_result(ctx, trainer, tok, p, metrics)

    @staticmethod
    def _fit(rows: list[dict], tok: Any, max_length: int) -> tuple[list[dict], int]:
        """Rows whose rendered prompt fits max_length tokens; the count of those that did not."""
        def n_tokens(prompt: list[dict]) -> int:
            if getattr(tok, "chat_template", None):
                return len(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True))
            return len(tok("".join(m["content"] for m in prompt))["input_ids"])

        kept = [r for r in rows if n_tokens(r["prompt"]) <= max_length]
        return kept, len(rows) - len(kept)

    @staticmethod
    def _heldout(ctx: Any, model: Any, tok: Any, held: list[dict], funcs, weights, p: GRPOParams, when: str) -> dict:
        if not (p.heldout_eval and held):
            return {}
        from medpipe.stages.rewards.heldout import sample, score

        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return {}
        samples = sample(model, tok, [r["prompt"] for r in held], max_new_tokens=p.max_completion_length,
                         temperature=p.temperature, seed=int(ctx.seed))
        m = score(held, samples, funcs, weights, p.think)
        ctx.say(f"held-out {when} ({m['n']} prompts): reward {m['reward']:.3f}, format-valid {m['format_valid']:.3f}, "
                f"accuracy {m['accuracy']:.3f}, {m['completion_tokens']:.1f} tokens")
        return {f"heldout_{when}/{k}": v for k, v in m.items()}

    @staticmethod
    def _probe_reference(trainer: Any, path) -> None:
        """Save the reference log-probs TRL computes for each generated batch, with the ids and
        masks they belong to (the file keeps the latest batch: by then the policy has moved away
        from the reference, so a probe that still equals the input model shows the reference
        stayed frozen)."""
        import os

        import torch

        original = trainer._generate_and_score_completions

        def probed(inputs):
            out = original(inputs)
            if "ref_per_token_logps" in out:
                keep = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "ref_per_token_logps")
                torch.save({k: out[k].detach().cpu() for k in keep} | {"temperature": trainer.temperature,
                                                                       "step": trainer.state.global_step},
                           str(path) + ".tmp")
                os.replace(str(path) + ".tmp", path)
            return out

        trainer._generate_and_score_completions = probed

"""What an RL stage shows and records per logged step: the total reward, each reward's mean and
the fraction of prompt groups whose completions all got the same reward (TRL's
`frac_reward_zero_std`: such a group has zero advantage and teaches nothing). A warning when that
fraction stays near 1 over the first logged steps: the model never varies in what the rewards
see (e.g. it never writes the asked answer format) and training cannot move it."""
from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

ZERO_STD = "frac_reward_zero_std"


class RewardWatch(TrainerCallback):
    def __init__(self, ctx: Any, first_steps: int = 3, near_one: float = 0.95):
        self.ctx, self.first_steps, self.near_one = ctx, first_steps, near_one
        self.zero_std: list[float] = []
        self.rewards: list[float] = []
        self.warned = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or ZERO_STD not in logs or not state.is_world_process_zero:
            return
        self.zero_std.append(float(logs[ZERO_STD]))
        self.rewards.append(float(logs.get("reward", float("nan"))))
        means = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in logs.items()
                          if k.startswith("rewards/") and k.endswith("/mean"))
        self.ctx.say(f"step {state.global_step}: reward {self.rewards[-1]:.3f} ({means}); "
                     f"zero-variance groups {self.zero_std[-1]:.2f}")
        start = self.zero_std[:self.first_steps]
        if not self.warned and len(start) == self.first_steps and min(start) >= self.near_one:
            self.warned = True
            self.ctx.say(f"warning: {min(start):.2f}+ of the prompt groups had zero reward variance in each of the first "
                         f"{self.first_steps} logged steps: nothing to learn from (advantage 0). Teach the answer "
                         f"format first (an SFT stage), add worked examples (shots), raise temperature or "
                         f"num_generations, or add a reward that varies")

    def metrics(self) -> dict:
        """Start/end figures for the artifact (means over the first / last few logged steps)."""
        if not self.zero_std:
            return {}
        k = max(1, min(self.first_steps, len(self.zero_std) // 2 or 1))
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        return {"zero_std_frac_start": mean(self.zero_std[:k]), "zero_std_frac_end": mean(self.zero_std[-k:]),
                "reward_start": mean(self.rewards[:k]), "reward_end": mean(self.rewards[-k:]),
                "zero_std_warning": int(self.warned)}

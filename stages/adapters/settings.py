"""The adapter settings, written once: the dataclasses the adapter layers are built from AND the
nested `medcare:` / `cpoly:` block of the stage params (like `peft:`). Torch-free (the CLI reads
stage params); the layers are in medcare.py / cpoly.py beside this module."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, List, Optional

from medpipe.params import Checked, param

MEDCARE_VARIANTS = ("code", "paper")


@dataclass
class MedCareConfig(Checked):
    """MedCare layer settings. Values: the paper (§4.1 / Appendix: r=16, α=32, s=2, E=8, K=2);
    `variant` picks where the paper and the authors' code differ (docs: MedCare variants)."""

    _where: ClassVar[str] = "medcare."
    variant: str = param("code", "code: the authors' code (α/r for every LoRA, top-K gates renormalised, Kaiming A) | "
                                 "paper: Eq. 4/5/13 (α/r for NA, α/r' for KA and Align, softmax gates not "
                                 "renormalised, Gaussian A)", choices=MEDCARE_VARIANTS)
    r: int = param(16, "rank of each routed NA expert")
    alpha: float = param(32.0, "LoRA alpha (scale α/rank, see variant)")
    s: int = param(2, "shared experts: KA has rank r' = s·r")
    n_experts: int = param(8, "E routed experts (NA)")
    top_k: int = param(2, "K experts per token")
    renormalize: Optional[bool] = param(None, "renormalise the K selected gate weights to sum 1; null = the variant's "
                                              "(code: true, paper: false)")
    balance_coef: float = param(0.0, "Switch-style load-balancing aux loss weight (0 = off, as published)")
    expert_dropout: float = param(0.0, "MKA: dropout on the input of KA and the NA experts (0, the authors' code)")
    keep_na: bool = param(True, "layer: use NA in eval mode (the MKA stage trains with false: KA only at inference)")
    attn_lora: bool = param(True, "MKA: plain PEFT LoRA on q/k/v/o")
    attn_dropout: float = param(0.05, "MKA: dropout of the attention LoRA")
    align_rank: Optional[int] = param(None, "DA: rank of Align; null = s·r, like KA")
    align_dropout: float = param(0.05, "DA: dropout on the input of KA and Align (one mask, the authors' code)")
    train_ka: bool = param(True, "DA: KA trainable (false freezes the loaded KA)")
    ffn_modules: Optional[List[str]] = param(None, "FFN linear names; null = the table for the model type")
    attn_modules: Optional[List[str]] = param(None, "attention linear names; null = the table for the model type")

    def _rules(self):
        return [("r", self.r >= 1, ">= 1"), ("s", self.s >= 1, ">= 1 (KA has rank s·r)"),
                ("alpha", self.alpha > 0, "> 0"), ("n_experts", self.n_experts >= 1, ">= 1"),
                ("top_k", 1 <= self.top_k <= max(self.n_experts, 1), f"between 1 and n_experts ({self.n_experts})"),
                ("balance_coef", self.balance_coef >= 0, ">= 0"),
                ("align_rank", self.align_rank is None or self.align_rank >= 1, ">= 1 or null"),
                *((d, 0 <= getattr(self, d) < 1, "in [0, 1)") for d in ("expert_dropout", "attn_dropout", "align_dropout"))]

    @property
    def scale(self) -> float:
        """Scale of the NA experts (and, variant code, of every LoRA in the layer): α/r."""
        return self.alpha / self.r

    @property
    def ka_rank(self) -> int:
        return self.s * self.r

    @property
    def align_r(self) -> int:
        return self.align_rank or self.ka_rank

    @property
    def ka_scale(self) -> float:
        """KA's scale: α/r (code) or α/r' with r' = s·r (paper, Eq. 13)."""
        return self.alpha / self.ka_rank if self.variant == "paper" else self.scale

    @property
    def align_scale(self) -> float:
        """Align's scale: α/r (code) or α/r' with r' its own rank (paper, Eq. 13)."""
        return self.alpha / self.align_r if self.variant == "paper" else self.scale

    @property
    def renormalized(self) -> bool:
        return (self.variant == "code") if self.renormalize is None else bool(self.renormalize)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MedCareConfig":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        for k in ("ffn_modules", "attn_modules"):
            if d.get(k) is not None:
                d[k] = list(d[k])
        return cls(**d)


CPOLY_TASK_BLOCKS = ("diagonal", "full")


@dataclass
class CPolyConfig(Checked):
    """C-Poly layer settings (AntGLM-Med stage 3: A=4 shared skills, B=1 task-specific, rank 4)."""

    _where: ClassVar[str] = "cpoly."
    n_shared_skills: int = param(4, "A: LoRA skills shared by all tasks")
    n_task_skills: int = param(1, "B: task-specific skills per task (0 = Poly)")
    r: int = param(4, "rank of every skill")
    alpha: Optional[float] = param(None, "skill scale alpha / r; null = r (scale 1)")
    dropout: float = param(0.0, "dropout on the adapter input (training only)")
    tau: float = param(1.0, "Gumbel-sigmoid temperature of the shared routing (training)")
    normalize: bool = param(True, "divide the shared weights by their sum (PEFT Poly)")
    straight_through: bool = param(False, "hard 0/1 shared weights forward, soft gradient")
    task_block: str = param("diagonal", "diagonal (task t uses only its own skills) | full", choices=CPOLY_TASK_BLOCKS)
    target_modules: Optional[List[str]] = param(help="[all-linear], module names (q_proj, ...) or one regex; "
                                                     "null = PEFT's LoRA default for the model type",
                                                factory=lambda: ["all-linear"])
    unknown_task: str = param("error", "a task not trained on: error | shared (shared skills only)",
                              choices=("error", "shared"))
    init_logit_range: float = param(1e-3, "shared logits start ~ U(-x, x)")
    adapter_dtype: str = param("float32", "float32 | base (the dtype of the base weight)", choices=("float32", "base"))

    def _rules(self):
        return [("n_shared_skills", self.n_shared_skills >= 0, ">= 0"), ("n_task_skills", self.n_task_skills >= 0, ">= 0"),
                ("n_task_skills", self.n_shared_skills + self.n_task_skills > 0,
                 "> 0 when n_shared_skills is 0 (C-Poly needs at least one skill)"),
                ("r", self.r >= 1, ">= 1"), ("tau", self.tau > 0, "> 0"),
                ("dropout", 0.0 <= self.dropout < 1.0, "in [0, 1)")]

    @property
    def scaling(self) -> float:
        return (self.r if self.alpha is None else float(self.alpha)) / self.r

    @classmethod
    def from_dict(cls, d: dict) -> "CPolyConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown C-Poly config keys: {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("target_modules"), str):  # adapters saved before targets were a list
            d["target_modules"] = [d["target_modules"]]
        return cls(**d)

"""``KDTrainer``: a ``transformers.Trainer`` that distils with kdcore's loss terms.

For pipelines that already run on the Hugging Face Trainer (accelerate,
DeepSpeed, FSDP, PEFT)::

    from kdcore_lm import KDTrainer
    trainer = KDTrainer(model=student, teacher=teacher, args=args, train_dataset=ds,
                        losses=["ce", {"name": "kd", "temperature": 2.0,
                                       "schedule": {"name": "linear", "start": 0.5, "end": 1.0}}])
    trainer.train()

``losses`` are kdcore ``[[loss]]`` tables (a name, or a mapping with ``name``,
``weight``, ``schedule``, ``id`` and the loss's parameters: divergences,
transforms, ``chunk_size``), validated and built exactly as a kdcore run
builds them (:class:`kdcore.engine.Objective`, from :func:`kdcore.engine.build_objective`), so the same batch
gives the same loss value as the kdcore engine. Time schedules see a
:class:`kdcore.losses.schedule.Progress` made from the Trainer's state (epoch counted
from 1, optimizer steps taken, steps per epoch from ``max_steps``).

Batches: ``input_ids`` (+ ``attention_mask`` / ``position_ids``) and either
kdcore's ``target`` (already shifted: position t holds token t + 1, -100 where
no loss) or Hugging Face's ``labels`` (unshifted, as the usual collators make
them; shifted here). Normalisation: the loss of a micro-batch is its terms'
sum over kept tokens divided by the kept tokens of the whole accumulated
optimizer step (over every process; ``num_items_in_batch``, counted here from
the targets), so gradient accumulation and data parallelism change nothing but
memory, as in kdcore's engine.

Vocabularies: both models' logits are restricted to the tokenizer's
vocabulary (``vocab_size``; default ``len(processing_class)`` where a tokenizer
is given, else the smaller model's rows when the models differ only by
padding); models whose sizes differ by more than ``vocab_slack`` rows are a
:class:`kdcore.ConfigError` naming both sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from kdcore.common.errors import ConfigError
from kdcore.engine import build_objective
from kdcore.losses.outputs import Outputs
from kdcore.losses.schedule import Progress
from kdcore_lm.hf import HFCausalLM, check_vocab, lm_head_of

IGNORE_INDEX = -100


def shift_labels(labels: Tensor) -> Tensor:
    """Hugging Face ``labels`` (unshifted) as kdcore targets: ``target[t] = labels[t + 1]``, -100 last."""
    return nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def _rows_of(model: nn.Module) -> int:
    if isinstance(model, HFCausalLM):
        return model.head.width
    return model.get_output_embeddings().weight.shape[0]


class KDTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is kdcore's ``sum_i w_i(t) * L_i`` (module docstring).

    - ``teacher``: a causal LM (``transformers`` model or kdcore ``hf`` backbone), frozen,
      moved to the training device; required when a term uses the teacher;
    - ``losses``: kdcore loss tables (default ``["ce", "kd"]``);
    - ``fused``: compute the student's (and teacher's) logits from the last hidden
      states inside the losses (chunked with ``chunk_size``) instead of the model's
      full logits; needs kdcore's fused projection;
    - ``vocab_size`` / ``vocab_slack``: the shared vocabulary (see the module docstring).

    Per-term values are logged as ``loss/<term>`` and weights as ``weight/<term>``.
    """

    def __init__(self, model=None, args=None, *, teacher: nn.Module | None = None,
                 losses: Sequence[str | Mapping[str, Any]] = ("ce", "kd"), fused: bool = False,
                 vocab_size: int | None = None, vocab_slack: int = 1024, **kwargs):
        self.objective = build_objective(losses)
        if self.objective.uses_teacher and teacher is None:
            names = [t.id for t in self.objective.terms if t.uses_teacher]
            raise ConfigError(f"teacher: required by loss term(s) {', '.join(names)}")
        if any(p.requires_grad for p in self.objective.modules.parameters()):
            raise ConfigError("losses: terms with trainable parameters (connectors) are not supported by "
                              "KDTrainer; use kdcore train")
        if any(t.uses_outputs for t in self.objective.terms):
            raise ConfigError("losses: feature terms (taps) are not supported by KDTrainer; use kdcore train")
        super().__init__(model=model, args=args, **kwargs)
        self.loss_is_scaled_for_ga = True  # normalised by the whole step's kept tokens in compute_loss
        self.kd_fused = bool(fused)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.args.device)
        self.objective.modules.to(self.args.device)
        self.vocab_size = self._shared_vocab(vocab_size, vocab_slack)
        self._heads: dict[int, nn.Module] = {}
        self._term_sums: dict[str, float] = {}
        self._term_count = 0

    # -- vocabularies ---------------------------------------------------------------------------
    def _shared_vocab(self, vocab_size: int | None, slack: int) -> int | None:
        rows = [_rows_of(m) for m in (self.model, self.teacher) if m is not None]
        if vocab_size is None and self.processing_class is not None and hasattr(self.processing_class, "__len__"):
            vocab_size = len(self.processing_class)
        if vocab_size is None:
            if len(set(rows)) <= 1:
                return None
            vocab_size = min(rows)
        for r, who in zip(rows, ("the student", "the teacher")):
            check_vocab(r, vocab_size, slack, who)
        return vocab_size

    # -- data -----------------------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "target" not in self._signature_columns:
            self._signature_columns.append("target")

    @staticmethod
    def targets(inputs: Mapping[str, Any]) -> Tensor:
        """The batch's kdcore targets (``target``, or ``labels`` shifted)."""
        if inputs.get("target") is not None:
            return inputs["target"]
        if inputs.get("labels") is not None:
            return shift_labels(inputs["labels"])
        raise ValueError(f"KDTrainer: a batch needs 'target' (shifted) or 'labels', got keys {sorted(inputs)}")

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """The kept target tokens of the whole optimizer step, over every process."""
        try:
            count = sum((self.targets(b) != IGNORE_INDEX).sum() for b in batch_samples)
        except (ValueError, TypeError, AttributeError):
            return None
        if not torch.is_tensor(count):
            return None
        count = count.to(device)
        if self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    # -- outputs --------------------------------------------------------------------------------
    def _head(self, model: nn.Module) -> nn.Module:
        key = id(model)
        if key not in self._heads:
            self._heads[key] = lm_head_of(model, vocab=self.vocab_size)
        return self._heads[key]

    def model_outputs(self, model: nn.Module, inputs: Mapping[str, Tensor]) -> Outputs:
        """``Outputs`` of a causal LM on a batch's model inputs (logits over the shared vocabulary;
        hidden and head instead with ``fused``)."""
        inner = self.accelerator.unwrap_model(model) if hasattr(self, "accelerator") else model
        if isinstance(inner, HFCausalLM):
            out = Outputs.of(model(**inputs))
            if self.vocab_size is not None and out.has_logits:
                out = Outputs(out.logits[..., :self.vocab_size], hidden=out.hidden, head=out.head)
            return out
        if self.kd_fused:
            raw = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
            return Outputs(hidden=raw.hidden_states[-1], head=self._head(inner))
        logits = model(**inputs, use_cache=False).logits
        if self.vocab_size is not None:
            logits = logits[..., :self.vocab_size]
        return Outputs(logits)

    def progress(self) -> Progress:
        """kdcore's view of where training stands (for the terms' time schedules)."""
        state = self.state
        epochs = max(int(math.ceil(self.args.num_train_epochs)), 1)
        total = int(state.max_steps or 0)
        per_epoch = max(total // epochs, 1) if total else 1
        epoch = min(int(state.epoch or 0) + 1, epochs) if state.epoch is not None else 1
        return Progress(epoch, int(state.global_step), epochs, per_epoch, total)

    # -- the loss -------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        target = self.targets(inputs)
        model_inputs = {k: v for k, v in inputs.items() if k not in ("target", "labels")}
        weights = self.objective.weights(self.progress())
        active = self.objective.active(weights)
        student = self.model_outputs(model, model_inputs)
        teacher = None
        if self.teacher is not None and any(t.uses_teacher for t in active):
            with torch.no_grad():
                teacher = self.model_outputs(self.teacher, model_inputs)
        losses = self.objective.losses(student, teacher, target, weights)
        total = self.objective.total(losses, weights)
        if total is None:  # every weight is 0 at this step
            total = torch.zeros((), device=target.device, requires_grad=True)
        if num_items_in_batch is not None and model.training:
            kept = (target != IGNORE_INDEX).sum()
            total = total * kept / torch.as_tensor(num_items_in_batch, device=total.device).clamp(min=1)
            if self.args.world_size > 1:
                total = total * self.args.world_size  # data parallelism averages the processes' gradients
            self._record(losses, weights)
        return (total, student) if return_outputs else total

    def _record(self, losses: Mapping[str, Tensor], weights: Mapping[str, float]) -> None:
        for k, v in losses.items():
            self._term_sums[f"loss/{k}"] = self._term_sums.get(f"loss/{k}", 0.0) + float(v.detach())
        for k, w in weights.items():
            self._term_sums[f"weight/{k}"] = self._term_sums.get(f"weight/{k}", 0.0) + float(w)
        self._term_count += 1

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._term_count and "loss" in logs:
            logs.update({k: v / self._term_count for k, v in self._term_sums.items()})
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

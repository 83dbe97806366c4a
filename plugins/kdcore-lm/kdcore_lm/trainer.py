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

On-policy: ``batch_policy`` is a kdcore ``[batch_policy]`` table (e.g.
``{"name": "on_policy", "lmbda": 0.5, "max_new_tokens": 32}``), built from the
registry as ``kdcore train`` builds it. It replaces each optimizer step's whole
batch (the step's micro-batches joined, right-padded to the widest) before any
forward pass, and the step then trains on its micro-batches again (the same
row counts). Its :class:`kdcore.losses.policy.StepContext` has the Trainer's
``args.seed`` and the optimizer steps taken (``state.global_step``), so which
steps generate and the tokens drawn depend on the seed and the step only, and
resuming from a Trainer checkpoint continues the same draws. A plain
``transformers`` model generates through the ``hf`` backbone's key/value-cache
path over the shared vocabulary, as it does under ``kdcore train``.

Trainable loss terms: logit terms with their own parameters (e.g. ``kd`` with
``transforms = [{"name": "ctkd"}]``, CTKD's learnable temperature) train as under
``kdcore train``: one more optimizer param group at the Trainer's learning rate
(and schedule) and ``weight_decay``, clipped with the student under one global norm
(``max_grad_norm``), their gradients averaged over the processes once per optimizer
step (DDP through torchrun; DeepSpeed, FSDP and the like are refused). Their state
(parameters and buffers, :attr:`kdcore.engine.Objective.modules`' state dict as
``{"losses": ...}``) is written atomically to ``kdcore_losses.pt`` beside the model
in every ``checkpoint-N`` directory and by :meth:`Trainer.save_model`, and read back
with ``weights_only=True`` on ``train(resume_from_checkpoint=...)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import DistributedType
from torch import Tensor, nn
from transformers import Trainer

from kdcore.common.errors import ConfigError
from kdcore.engine import average_gradients, build_objective
from kdcore.losses import build
from kdcore.losses.outputs import Outputs
from kdcore.losses.policy import StepContext
from kdcore.losses.schedule import Progress
from kdcore_lm import term_state
from kdcore_lm.hf import HFCausalLM, check_vocab, lm_head_of

IGNORE_INDEX = -100


def shift_labels(labels: Tensor) -> Tensor:
    """Hugging Face ``labels`` (unshifted) as kdcore targets: ``target[t] = labels[t + 1]``, -100 last."""
    return nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def _rows_of(model: nn.Module) -> int:
    if isinstance(model, HFCausalLM):
        return model.head.width
    return model.get_output_embeddings().weight.shape[0]


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """An optimizer step's whole batch as a batch policy sees it: the model ``inputs`` and
    the shifted ``target`` (what :meth:`replace` gives back is the step's new batch)."""

    inputs: dict[str, Tensor]
    target: Tensor

    def __len__(self) -> int:
        return int(self.target.shape[0])

    def replace(self, *, inputs: Mapping[str, Tensor] | None = None, target: Tensor | None = None) -> "StepBatch":
        """This batch with new ``inputs`` and/or ``target`` (the same rows)."""
        return StepBatch(self.inputs if inputs is None else dict(inputs), self.target if target is None else target)


def join_micro_batches(inputs: Sequence[Mapping[str, Tensor]], targets: Sequence[Tensor]) -> StepBatch:
    """One :class:`StepBatch` of a step's micro-batches (model inputs and targets), each
    right-padded to the widest (``attention_mask`` 0, target -100), as collators that pad
    every micro-batch to its own longest row leave them of different widths."""
    if len(targets) == 1:
        return StepBatch(dict(inputs[0]), targets[0])
    width = max(t.shape[-1] for t in targets)
    if any(t.shape[-1] != width for t in targets):
        inputs = [{"attention_mask": torch.ones_like(x["input_ids"]), **x} for x in inputs]

    def pad(x: Tensor, value: int) -> Tensor:
        return nn.functional.pad(x, (0, width - x.shape[-1]), value=value)

    joined = {k: torch.cat([pad(x[k], 0) for x in inputs]) for k in inputs[0]}
    return StepBatch(joined, torch.cat([pad(t, IGNORE_INDEX) for t in targets]))


def split_step_batch(batch: StepBatch, sizes: Sequence[int]) -> list[dict[str, Tensor]]:
    """The micro-batches (model inputs with ``target``) of ``sizes`` rows each, in order."""
    out, start = [], 0
    for n in sizes:
        rows = slice(start, start + n)
        out.append({**{k: v[rows] for k, v in batch.inputs.items()}, "target": batch.target[rows]})
        start += n
    return out


class KDTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is kdcore's ``sum_i w_i(t) * L_i`` (module docstring).

    - ``teacher``: a causal LM (``transformers`` model or kdcore ``hf`` backbone), frozen,
      moved to the training device; required when a term uses the teacher;
    - ``losses``: kdcore loss tables (default ``["ce", "kd"]``);
    - ``fused``: compute the student's (and teacher's) logits from the last hidden
      states inside the losses (chunked with ``chunk_size``) instead of the model's
      full logits; needs kdcore's fused projection;
    - ``vocab_size`` / ``vocab_slack``: the shared vocabulary (see the module docstring);
    - ``batch_policy``: a kdcore ``[batch_policy]`` table (a name, or a mapping with ``name``
      and its parameters, e.g. ``on_policy``'s ``lmbda``) or a policy object (the module docstring).

    Per-term values are logged as ``loss/<term>`` (each step's mean over its kept tokens)
    and weights as ``weight/<term>``.

    Loss terms with trainable parameters (e.g. ``ctkd``'s temperature) train with the
    student: a param group of their own in the optimizer KDTrainer creates (a given
    ``optimizers=(opt, sched)`` cannot hold them and is refused), gradients averaged over
    the processes (DDP only), their state in ``kdcore_losses.pt`` of every checkpoint and
    of ``save_model`` (the module docstring).
    """

    def __init__(self, model=None, args=None, *, teacher: nn.Module | None = None,
                 losses: Sequence[str | Mapping[str, Any]] = ("ce", "kd"), fused: bool = False,
                 vocab_size: int | None = None, vocab_slack: int = 1024,
                 batch_policy: str | Mapping[str, Any] | Callable | None = None, **kwargs):
        self.objective = build_objective(losses)
        if self.objective.uses_teacher and teacher is None:
            names = [t.id for t in self.objective.terms if t.uses_teacher]
            raise ConfigError(f"teacher: required by loss term(s) {', '.join(names)}")
        self.batch_policy = None if batch_policy is None else build("batch_policy", batch_policy, "batch_policy")
        if getattr(self.batch_policy, "seq_kd", False) is True and teacher is None:
            raise ConfigError("teacher: required by batch_policy.seq_kd = true (the teacher generates the "
                              "completions of the steps the student does not)")
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
        self._materialise_lazy_terms()
        #: the loss terms' trainable parameters (their own param group; empty: none)
        self.term_params = [p for p in self.objective.modules.parameters() if p.requires_grad]
        if self.term_params:
            self._check_term_training()
            self.add_callback(term_state.ClearTermGradients(self.term_params))
        self._heads: dict[int, nn.Module] = {}
        self._generators: dict[int, HFCausalLM] = {}
        self._term_sums: dict[str, float] = {}
        self._term_count = 0.0  # the recorded micro-batches' shares of their steps' kept tokens
        self._steps_per_epoch: int | None = None  # optimizer steps in an epoch, once training has begun

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

    # -- the loss terms' own parameters ---------------------------------------------------------
    def _materialise_lazy_terms(self) -> None:
        """Create the terms' lazy parameters (``ctkd``'s instance MLP, whose input width is
        the vocabulary's) before the optimizer is built, by running the terms once without
        learning on one position of zero logits over the shared vocabulary; the random
        number generators are left as they were."""
        params = self.objective.modules.parameters()
        if not any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
            return
        device = self.args.device
        width = self.vocab_size or _rows_of(self.accelerator.unwrap_model(self.model))
        logits = Outputs(torch.zeros(1, 1, width, device=device))
        target = torch.zeros(1, 1, dtype=torch.long, device=device)
        weights = {t.id: 1.0 for t in self.objective.terms}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            self.objective.losses(logits, logits if self.teacher is not None else None, target, weights)
        self.objective.modules.to(device)

    def _check_term_training(self) -> None:
        """Refuse what would train the terms' parameters wrongly: a distribution other than
        plain data parallelism (their gradients are averaged here, outside the wrapped model)
        and a given optimizer without them."""
        shown = term_state.first_names(term_state.parameter_names(self.objective.modules, self.term_params))
        kind = self.accelerator.distributed_type
        if not (kind == DistributedType.NO or kind.value.startswith("MULTI_")) or \
                getattr(self, "is_distributed_loading_by_transformers", False):
            raise ConfigError(f"losses: terms with trainable parameters ({shown}) are trained by KDTrainer in one "
                              f"process or under DDP (torchrun) only, not under {kind.value}; use DDP or "
                              "kdcore train")
        if self.optimizer is not None:
            held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            if any(id(p) not in held for p in self.term_params):
                raise ConfigError(f"optimizers: the given optimizer does not hold the loss terms' trainable "
                                  f"parameters ({shown}); leave optimizers out (or pass optimizer_cls_and_kwargs) "
                                  "so that KDTrainer adds them as a param group")

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The Trainer's optimizer with the loss terms' trainable parameters as one more
        param group (the Trainer's learning rate and ``weight_decay``, as ``kdcore train``
        gives them the student's), added before the learning-rate schedule is made so that
        the schedule applies to it too."""
        optimizer = super().create_optimizer(model)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if self.term_params and not any(id(p) in held for p in self.term_params):
            optimizer.add_param_group({"params": list(self.term_params), "lr": self.args.learning_rate,
                                       "weight_decay": self.args.weight_decay})
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's micro-batch step; after the last micro-batch of an optimizer step
        the terms' gradients (their sum over the step's micro-batches) are averaged over
        the processes, once, as DDP averages the student's."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.term_params and self.args.world_size > 1 and self.accelerator.sync_gradients:
            average_gradients(self.term_params, lambda t: self.accelerator.reduce(t, reduction="mean"))
        return loss

    def _clip_grad_norm(self, model):
        """Clip the student's and the terms' gradients under one global norm, as ``kdcore train``
        clips every parameter group together; returns the norm before clipping."""
        if not self.term_params:
            return super()._clip_grad_norm(model)
        return self.accelerator.clip_grad_norm_([*model.parameters(), *self.term_params], self.args.max_grad_norm)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's model, and beside it the loss terms' state in ``kdcore_losses.pt`` (in
        every checkpoint, which saves through here, and for the user's final model)."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            term_state.save(self.objective.modules, output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer's model from a checkpoint being resumed, and the terms' state saved with it."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.load_terms(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """The best checkpoint's model (``load_best_model_at_end``) and the terms' state saved with it."""
        super()._load_best_model()
        self.load_terms(self.state.best_model_checkpoint, key="load_best_model_at_end")

    def load_terms(self, directory: str | Path, key: str = "resume_from_checkpoint") -> None:
        """Load the loss terms' state from ``directory`` (:func:`kdcore_lm.term_state.load`;
        ``key``: the setting that chose ``directory``, for messages)."""
        term_state.load(self.objective.modules, directory, key)

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

    # -- the batch policy -----------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The step's micro-batches, replaced by the batch policy's new batch where it makes one
        (and the kept tokens of the new ones)."""
        samples, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.batch_policy is None or not samples:
            return samples, count
        made = self.apply_batch_policy(samples)
        if made is samples:
            return samples, count
        return made, self._get_num_items_in_batch(made, device)

    def apply_batch_policy(self, samples: list) -> list:
        """The batch policy on the step's micro-batches joined into one batch, split back into
        micro-batches of the same row counts (``samples`` itself where it keeps the batch)."""
        micro = [self._prepare_inputs(s) for s in samples]
        targets = [self.targets(m) for m in micro]
        inputs = [{k: v for k, v in m.items() if k not in ("target", "labels")} for m in micro]
        batch = join_micro_batches(inputs, targets)
        made = self.batch_policy(batch, self.step_context())
        if made is batch:
            return samples
        return split_step_batch(made, [len(t) for t in targets])

    def step_context(self) -> StepContext:
        """What the batch policy sees at this optimizer step (seeded by ``args.seed`` and the step)."""
        student = self.accelerator.unwrap_model(self.model)
        return StepContext(self._generator(student), self._generator(self.teacher), self.progress(),
                           self.args.seed, self.args.device, self.args.process_index, self.args.world_size,
                           self.accelerator.autocast)

    def _generator(self, model: nn.Module | None) -> nn.Module | None:
        """``model`` as the ``hf`` backbone (its decoder and head over the shared vocabulary), which
        generates with its key/value cache; a backbone already is one."""
        if model is None or isinstance(model, HFCausalLM):
            return model
        key = id(model)
        if key not in self._generators:
            self._generators[key] = HFCausalLM(model, self._head(model), fused=False)
        backbone = self._generators[key]
        backbone.training = model.training  # generate() puts it back in this mode (the teacher stays in eval)
        return backbone

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

    def get_train_dataloader(self):
        """The Trainer's training loader; its length gives the optimizer steps in an epoch
        (as the Trainer counts them) for :meth:`progress`."""
        loader = super().get_train_dataloader()
        try:
            batches = len(loader)
        except TypeError:  # an iterable dataset without a length: the run is one epoch of max_steps
            batches = 0
        accumulate = self.args.gradient_accumulation_steps
        self._steps_per_epoch = max(-(-batches // accumulate), 1) if batches else None
        return loader

    def progress(self) -> Progress:
        """kdcore's view of where training stands (for the terms' time schedules): the
        optimizer steps taken, the steps in an epoch (from the training loader) and the
        epochs the run's steps make, whether ``num_train_epochs`` or ``max_steps`` bounds it."""
        state = self.state
        total = int(state.max_steps or 0)
        per_epoch = self._steps_per_epoch or total or 1
        epochs = max(-(-total // per_epoch), 1) if total else max(int(math.ceil(self.args.num_train_epochs)), 1)
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
            share = (target != IGNORE_INDEX).sum() / torch.as_tensor(num_items_in_batch,
                                                                      device=total.device).clamp(min=1)
            total = total * share
            if self.args.world_size > 1:
                total = total * self.args.world_size  # data parallelism averages the processes' gradients
            self._record(losses, weights, float(share))
        return (total, student) if return_outputs else total

    def _record(self, losses: Mapping[str, Tensor], weights: Mapping[str, float], share: float) -> None:
        """Add a micro-batch's term values and weights, weighted by its share of the step's kept
        tokens, so that a step's logged value is its mean over its kept tokens (as kdcore logs it)."""
        for k, v in losses.items():
            self._term_sums[f"loss/{k}"] = self._term_sums.get(f"loss/{k}", 0.0) + share * float(v.detach())
        for k, w in weights.items():
            self._term_sums[f"weight/{k}"] = self._term_sums.get(f"weight/{k}", 0.0) + share * float(w)
        self._term_count += share

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The Trainer's training log (every process calls it at the same step) with the
        terms' values and weights since the last one: their means over the kept tokens of
        every process (each micro-batch's share is of its whole step's kept tokens, so the
        processes' sums add up to the global mean)."""
        if "loss" in logs:
            sums, count = self._term_sums, self._term_count
            if self.args.world_size > 1:
                names = sorted(sums)  # the same terms, in the same order, on every process
                values = torch.tensor([*(sums[k] for k in names), count], dtype=torch.float64,
                                      device=self.args.device)
                values = self.accelerator.reduce(values, reduction="sum").tolist()
                sums, count = dict(zip(names, values[:-1])), values[-1]
            if count:
                logs.update({k: v / count for k, v in sums.items()})
            self._term_sums, self._term_count = {}, 0.0
        super().log(logs, *args, **kwargs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

"""Backbone ``hf``: a Hugging Face ``transformers`` causal LM as a kdcore model.

Built with random weights from a ``config`` table (``model_type`` plus that
architecture's config keys; ``vocab_size`` defaults to the dataset's
vocabulary, positions to the dataset's sequence length) or loaded from a local
directory (``path``; never a download unless ``allow_download = true``).

Its forward returns :class:`kdcore.Outputs` with ``hidden`` (the last hidden
state, after the final norm) and ``head`` (an :class:`LMHead`: the model's own
output layer, tied embeddings included, followed by the final transforms its
config declares: ``logit_scale`` (Cohere), ``logits_scaling`` (Granite),
``final_logit_softcapping`` (Gemma 2/3)), so fused losses never hold the full
logits and dense losses read ``outputs.logits = head(hidden)``.

Vocabulary alignment: the head's columns are the dataset's vocabulary
(``num_classes``, the tokenizer's size), padded with ``-inf`` columns up to
``pad_vocab_to`` when set. Rows of the model's embedding matrix beyond the
tokenizer's vocabulary (the padding rows vendors add, e.g. 151936 or 152064
rows for a 151665-token tokenizer) are ids the tokenizer never produces: their
columns are dropped (or ``-inf`` below ``pad_vocab_to``), so two models whose
vocabularies differ only by padding give logits of the same width over the
same tokens. A model with fewer rows than the tokenizer has tokens, or with
more than ``vocab_slack`` extra rows, uses another tokenizer: a
:class:`kdcore.ConfigError` naming both sizes.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdcore.common.errors import ConfigError
from kdcore.losses.outputs import Outputs

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
#: config keys that hold a model's number of positions, by preference
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")


class LMHead(nn.Module):
    """``head(hidden) -> logits``: the model's output layer and final transforms.

    ``logits = cap * tanh(z / cap)`` with ``z = proj(hidden) * scale / divide``
    (each factor only where the config has it), then restricted to the first
    ``vocab`` columns and padded with ``-inf`` columns up to ``width``.
    ``proj`` is the model's own output module (weights shared, tied embeddings
    included), so gradients reach the model's parameters.
    """

    def __init__(self, proj: nn.Module, *, rows: int, vocab: int | None = None, width: int | None = None,
                 scale: float | None = None, divide: float | None = None, softcap: float | None = None):
        super().__init__()
        self.proj = proj
        self.rows = int(rows)
        self.vocab = self.rows if vocab is None else int(vocab)
        self.width = self.vocab if width is None else int(width)
        if not 0 < self.vocab <= self.rows or self.width < self.vocab:
            raise ValueError(f"LMHead: need 0 < vocab ({self.vocab}) <= rows ({self.rows}) and width >= vocab")
        self.scale, self.divide, self.softcap = scale, divide, softcap

    @property
    def weight(self) -> Tensor:
        """The output projection's weight ``[rows, H]`` (the tied embedding where tied)."""
        return self.proj.weight

    def forward(self, hidden: Tensor) -> Tensor:
        z = self.proj(hidden)
        if self.scale is not None and self.scale != 1.0:
            z = z * self.scale
        if self.divide is not None and self.divide != 1.0:
            z = z / self.divide
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.vocab < z.shape[-1]:
            z = z[..., :self.vocab]
        if self.width > self.vocab:
            z = nn.functional.pad(z, (0, self.width - self.vocab), value=float("-inf"))
        return z

    def extra_repr(self) -> str:
        parts = [f"rows={self.rows}", f"vocab={self.vocab}", f"width={self.width}"]
        parts += [f"{k}={v}" for k, v in (("scale", self.scale), ("divide", self.divide),
                                          ("softcap", self.softcap)) if v is not None]
        return ", ".join(parts)


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def lm_head_of(model: nn.Module, *, vocab: int | None = None, width: int | None = None) -> LMHead:
    """The :class:`LMHead` of a ``transformers`` causal LM (its output embeddings and the
    final logit transforms of its config), over ``vocab`` columns padded to ``width``."""
    proj = model.get_output_embeddings()
    if proj is None or not hasattr(proj, "weight"):
        raise ConfigError(f"{type(model).__name__}: has no output embeddings (not a causal LM?)")
    cfg = _text_config(model.config)
    rows = proj.weight.shape[0]

    def factor(name):
        value = getattr(cfg, name, None)
        return None if value is None else float(value)

    return LMHead(proj, rows=rows, vocab=vocab, width=width, scale=factor("logit_scale"),
                  divide=factor("logits_scaling"), softcap=factor("final_logit_softcapping"))


def check_vocab(rows: int, vocab: int, slack: int, what: str) -> None:
    """A :class:`ConfigError` naming both sizes where ``rows`` embedding rows cannot serve a
    ``vocab``-token tokenizer (fewer rows, or more than ``slack`` padding rows)."""
    if rows < vocab:
        raise ConfigError(f"vocab_size: {what} has {rows} vocabulary rows but the dataset's tokenizer has {vocab} "
                          "tokens: they use different tokenizers (student, teacher and dataset must share one; "
                          "a teacher with another tokenizer goes through backbone = \"cross_tokenizer\")")
    if rows - vocab > slack:
        raise ConfigError(f"vocab_size: {what} has {rows} vocabulary rows, {rows - vocab} more than the dataset's "
                          f"tokenizer's {vocab} tokens (more than vocab_slack = {slack} padding rows): a different "
                          "tokenizer? (raise vocab_slack if these rows are padding)")


def _dtype(name: str, *, allow_auto: bool):
    if name == "auto" and allow_auto:
        return "auto"
    if name not in DTYPES:
        choices = sorted(DTYPES) + (["auto"] if allow_auto else [])
        raise ConfigError(f"dtype: {name!r} is not one of {', '.join(choices)}")
    return DTYPES[name]


def _build_config(table: Mapping[str, Any], num_classes: int | None, positions: int | None):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    table = dict(table)
    model_type = table.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ConfigError("config.model_type: required (e.g. \"llama\", \"qwen2\", \"gpt2\", \"gemma2\")")
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ConfigError(f"config.model_type: unknown transformers model type {model_type!r}{hint}")
    default = AutoConfig.for_model(model_type)
    known = set(default.to_dict()) | set(getattr(default, "attribute_map", {}))
    for cls in type(default).__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            known |= set(inspect.signature(init).parameters) - {"self", "kwargs"}
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"config.{key}: not a {model_type} config key{hint}")
    if "vocab_size" not in table:
        if num_classes is None:
            raise ConfigError("config.vocab_size: required when the backbone is built outside a run "
                              "(a run fills it from the dataset's vocabulary)")
        table["vocab_size"] = int(num_classes)
    vocab = int(table["vocab_size"])
    if positions and not any(k in table for k in POSITION_KEYS):
        key = next((k for k in POSITION_KEYS if k in known), None)
        if key is not None:
            table[key] = int(positions)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the defaults may not fit a tiny vocabulary
        value = getattr(default, key, None)
        if key not in table and isinstance(value, int) and value >= vocab:
            table[key] = None
    try:
        return AutoConfig.for_model(model_type, **table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"config: {model_type} rejects this config: {exc}") from None


def _missing_path_error(path: str) -> ConfigError:
    return ConfigError(
        f"path: model directory not found: {path}. Put a transformers model there first (e.g. "
        f"`hf download <org>/<model> --local-dir {path}`, or `model.save_pretrained({path!r})`), or set "
        "allow_download = true to let transformers fetch a hub id")


def _load_pretrained(path: str, allow_download: bool, dtype, attn_implementation):
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    p = Path(path).expanduser()
    if not p.exists() and not allow_download:
        raise _missing_path_error(path)
    if p.exists() and not (p / "config.json").exists():
        raise ConfigError(f"path: {path} holds no config.json (not a transformers model directory)")
    kwargs = {"local_files_only": not allow_download, "dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(str(p) if p.exists() else path, **kwargs)
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"path: cannot load a causal LM from {path}: {first}") from None
    except (SafetensorError, json.JSONDecodeError) as exc:
        raise _damaged_weights_error(path, p, exc) from None


def _first_damaged(p: Path) -> tuple[Path, Exception] | None:
    """The first file of model directory ``p`` that does not parse, with its error: a
    ``*.safetensors`` whose header does not read (truncated, overwritten) or a ``*.index.json``
    that is not JSON; None when every one reads (or ``p`` is no directory)."""
    from safetensors import SafetensorError, safe_open

    if not p.is_dir():
        return None
    for file in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.index.json")):
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt"):
                    pass
            else:
                json.loads(file.read_text(encoding="utf-8"))
        except (SafetensorError, ValueError, OSError) as exc:
            return file, exc
    return None


def _damaged_weights_error(path: str, p: Path, exc: Exception) -> ConfigError:
    """The config error for weights that do not parse, naming the damaged file (neither
    safetensors' nor json's message names it) and what to do."""
    found = _first_damaged(p)
    where, exc = found if found else (f"a weights file of {path}", exc)
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"path: {where} is damaged ({reason}); download the model again or re-save it "
                       "with save_pretrained")


def _lora(model: nn.Module, spec: Mapping[str, Any]) -> None:
    try:
        import peft
    except ImportError:
        raise ConfigError("lora: needs the peft package (pip install 'kdcore-lm[peft]')") from None
    spec = dict(spec)
    for alias, name in (("alpha", "lora_alpha"), ("dropout", "lora_dropout")):
        if alias in spec:
            spec[name] = spec.pop(alias)
    spec.setdefault("r", 8)
    spec.setdefault("target_modules", "all-linear")
    spec.setdefault("task_type", "CAUSAL_LM")
    accepted = set(inspect.signature(peft.LoraConfig).parameters)
    for key in spec:
        if key not in accepted:
            close = difflib.get_close_matches(key, sorted(accepted), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"lora.{key}: not a LoRA parameter{hint}")
    try:
        peft.get_peft_model(model, peft.LoraConfig(**spec))  # injects the adapters into ``model`` in place
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"lora: {exc}") from None


@functools.cache
def core_fuses() -> bool:
    """Whether kdcore's logit losses take ``Outputs(hidden, head)`` (the fused projection);
    probed once on a tiny input."""
    from kdcore.plugins import create

    head = nn.Linear(2, 3)
    hidden = torch.zeros(1, 2, 2)
    try:
        value = create("loss", "kd", chunk_size=1)(Outputs(hidden=hidden, head=head),
                                                    Outputs(hidden=hidden, head=head),
                                                    torch.zeros(1, 2, dtype=torch.long))
        return bool(torch.isfinite(value))
    except Exception:  # noqa: BLE001 - any failure means: not supported
        return False


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM whose forward returns ``Outputs(hidden, head)``.

    ``model`` is the ``transformers`` model itself (``save_pretrained`` works on it);
    ``head`` its :class:`LMHead` (not a registered submodule: its parameters are the
    model's own, so the state dict is the model's).
    """

    def __init__(self, model: nn.Module, head: LMHead, *, fused: bool | str = "auto", pretrained: bool = False):
        super().__init__()
        self.model = model
        self.__dict__["head"] = head  # shares the model's parameters; kept out of the state dict
        self.fused = fused
        #: loaded with trained weights (from ``path``): the run needs no checkpoint for it
        self.pretrained = pretrained

    @property
    def config(self):
        return self.model.config

    def prefer_logits(self) -> None:
        """Compute the logits inside forward from now on where ``fused = "auto"`` leaves the
        choice to this backbone. The engine calls it before sharding the student under FSDP,
        where a head run after forward would miss FSDP's gradient reduction; an explicit
        ``fused = true`` is kept (and the engine refuses it with a config error)."""
        if self.fused == "auto":
            self.fused = False

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None, **kwargs) -> Tensor:
        """The last hidden state ``[B, T, H]`` (after the final norm)."""
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, use_cache=False, **kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, **kwargs) -> Outputs:
        if position_ids is not None and attention_mask is not None and bool((attention_mask == 1).all()):
            attention_mask = None  # lets transformers build the per-document mask of packed rows
        hidden = self.hidden_states(input_ids, attention_mask, position_ids, **kwargs)
        if self.fused is True or (self.fused == "auto" and core_fuses()):
            return Outputs(hidden=hidden, head=self.head)
        return Outputs(self.head(hidden), hidden=hidden, head=self.head)

    def check_head(self) -> float:
        """The largest difference between ``head(hidden)`` and the model's own logits on a
        short input (raises :class:`ConfigError` when they disagree)."""
        ids = torch.arange(min(4, self.head.vocab), device=self.head.weight.device).unsqueeze(0)
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                ours = self.head(self.hidden_states(ids))[..., :self.head.vocab].float()
                theirs = self.model(input_ids=ids, use_cache=False).logits[..., :self.head.vocab].float()
        finally:
            self.model.train(was)
        diff = float((ours - theirs).abs().max())
        tol = (1e-4 if ours.dtype == torch.float32 and self.head.weight.dtype == torch.float32 else 3e-2) \
            * (1.0 + float(theirs.abs().max()))
        if not diff <= tol:
            raise ConfigError(f"{self.model.config.model_type}: the output head does not reproduce the model's "
                              f"logits (largest difference {diff:.3g}); this architecture applies a final "
                              "transform kdcore-lm does not know")
        return diff


def hf(num_classes: int | None = None, *, config: Mapping[str, Any] | None = None, path: str | None = None,
       allow_download: bool = False, dtype: str = "float32", gradient_checkpointing: bool = False,
       lora: Mapping[str, Any] | None = None, pad_vocab_to: int = 0, vocab_slack: int = 1024,
       attn_implementation: str | None = None, fused: bool | str = "auto", check_head: bool = True,
       in_features: int | None = None) -> HFCausalLM:
    """A causal LM from ``config`` (random weights) or ``path`` (a local directory).

    - ``num_classes``: the dataset's vocabulary (filled by the run);
    - ``in_features``: the dataset's sequence length (filled by the run): the
      positions of a model built from ``config`` unless it sets them;
    - ``dtype``: ``float32``, ``bfloat16``, ``float16`` (``auto``: the saved one, with ``path``);
    - ``gradient_checkpointing``: recompute activations in the backward pass;
    - ``lora``: LoRA adapters through ``peft`` (``r``, ``alpha``, ``dropout``,
      ``target_modules`` or any ``peft.LoraConfig`` key); only they train;
    - ``pad_vocab_to``: the logits' width (``-inf`` columns past the vocabulary;
      0: the dataset's vocabulary); ``vocab_slack``: how many padding rows beyond
      the tokenizer a model may have;
    - ``fused``: true: return ``Outputs(hidden, head)`` without logits; false: compute
      the logits inside forward (e.g. under FSDP) and return them with hidden and head;
      ``"auto"``: true where kdcore's logit losses take ``Outputs`` (the fused projection),
      false for a student sharded with FSDP (:meth:`HFCausalLM.prefer_logits`);
    - ``check_head``: check once that the head reproduces the model's logits.
    """
    if (config is None) == (path is None):
        raise ConfigError("path: give either path (a local model directory) or config (a table with "
                          "model_type, built with random weights), not " + ("both" if path else "neither"))
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise ConfigError(f"num_classes: must be a positive integer, got {num_classes!r}")
    if isinstance(pad_vocab_to, bool) or not isinstance(pad_vocab_to, int) or pad_vocab_to < 0:
        raise ConfigError(f"pad_vocab_to: must be a non-negative integer, got {pad_vocab_to!r}")
    if isinstance(vocab_slack, bool) or not isinstance(vocab_slack, int) or vocab_slack < 0:
        raise ConfigError(f"vocab_slack: must be a non-negative integer, got {vocab_slack!r}")
    if fused not in (True, False, "auto"):
        raise ConfigError(f"fused: must be true, false or \"auto\", got {fused!r}")
    if lora is not None and not isinstance(lora, Mapping):
        raise ConfigError(f"lora: must be a table of LoRA parameters (e.g. {{r = 8}}), got {lora!r}")
    if path is not None:
        if not isinstance(path, str) or not path:
            raise ConfigError(f"path: must be a directory path string, got {path!r}")
        torch_dtype = _dtype(dtype, allow_auto=True)
        model = _load_pretrained(path, allow_download, torch_dtype, attn_implementation)
        what = f"the model at {path}"
    else:
        if not isinstance(config, Mapping):
            raise ConfigError(f"config: must be a table with model_type, got {config!r}")
        from transformers import AutoModelForCausalLM

        torch_dtype = _dtype(dtype, allow_auto=False)
        hf_config = _build_config(config, num_classes, in_features)
        kwargs = {"dtype": torch_dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        try:
            model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
        except ValueError as exc:
            raise ConfigError(f"config: cannot build a causal LM of type {config['model_type']!r}: {exc}") from None
        what = f"the {config['model_type']} config"
    rows = model.get_output_embeddings().weight.shape[0]
    vocab = rows if num_classes is None else num_classes
    check_vocab(rows, vocab, vocab_slack, what)
    width = pad_vocab_to or vocab
    if width < vocab:
        raise ConfigError(f"pad_vocab_to: {pad_vocab_to} is smaller than the vocabulary ({vocab} tokens)")
    if gradient_checkpointing:
        model.config.use_cache = False
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora is not None:
        _lora(model, lora)
    backbone = HFCausalLM(model, lm_head_of(model, vocab=vocab, width=width), fused=fused,
                          pretrained=path is not None)
    if check_head:
        backbone.check_head()
    if config is not None:
        model.train()
    return backbone

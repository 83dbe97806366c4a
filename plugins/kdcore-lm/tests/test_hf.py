"""Backbone hf: heads that reproduce the models' logits, vocabulary alignment, loading, options."""

from __future__ import annotations

import sys

import pytest
import torch

import kdcore
from kdcore_lm.hf import HFCausalLM, hf



def _helpers():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("helpers_lm", Path(__file__).with_name("helpers_lm.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = _helpers().TINY


def build(arch="llama", num_classes=50, **kw):
    torch.manual_seed(0)
    kw.setdefault("fused", True)
    return hf(num_classes=num_classes, config=dict(TINY[arch]), in_features=16, **kw)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_head_reproduces_the_models_logits(arch):
    m = build(arch).eval()
    ids = torch.randint(0, 50, (2, 9))
    out = m(input_ids=ids)
    assert isinstance(out, kdcore.Outputs) and out.projectable and not out.has_logits
    assert isinstance(out.head, torch.nn.Module) and out.hidden.shape == (2, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(out.head(out.hidden), m.model(input_ids=ids).logits)
    if arch == "gemma2":
        assert m.head.softcap == 5.0 and float(out.logits.detach().abs().max()) <= 5.0


@pytest.mark.parametrize("model_type,key,value,attr",
                         [("cohere", "logit_scale", 0.5, "scale"), ("granite", "logits_scaling", 4.0, "divide")])
def test_logit_scale_of_other_architectures(model_type, key, value, attr):
    conf = {**TINY["llama"], "model_type": model_type, key: value}
    m = hf(num_classes=40, config=conf).eval()
    assert getattr(m.head, attr) == value
    ids = torch.randint(0, 40, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=ids).logits, m.model(input_ids=ids).logits)


def test_tied_embeddings_share_the_weight_and_gradients_reach_hidden_and_head():
    m = build("gpt2")
    assert m.head.weight is m.model.get_input_embeddings().weight
    assert list(m.state_dict()) == list(m.model.state_dict(prefix="model.")) or \
        all(k.startswith("model.") for k in m.state_dict())
    out = m(input_ids=torch.randint(0, 50, (2, 5)))
    out.hidden.retain_grad()
    out.logits.logsumexp(-1).sum().backward()
    assert out.hidden.grad is not None and m.head.weight.grad is not None
    assert {id(p) for p in m.head.parameters()} <= {id(p) for p in m.parameters()}


def test_vocabularies_that_differ_by_padding_are_aligned():
    student = hf(num_classes=50, config={**TINY["llama"], "vocab_size": 56})
    teacher = hf(num_classes=50, config={**TINY["qwen2"], "vocab_size": 64})
    ids = torch.randint(0, 50, (2, 7))
    s, t = student(input_ids=ids), teacher(input_ids=ids)
    assert s.logits.shape == t.logits.shape == (2, 7, 50)  # padded rows are ids the tokenizer never produces
    padded_s = hf(num_classes=50, config={**TINY["llama"], "vocab_size": 56}, pad_vocab_to=64)
    padded_t = hf(num_classes=50, config={**TINY["qwen2"], "vocab_size": 64}, pad_vocab_to=64)
    ps, pt = padded_s(input_ids=ids).logits, padded_t(input_ids=ids).logits
    assert ps.shape == pt.shape == (2, 7, 64)
    assert torch.isneginf(ps[..., 50:]).all() and torch.isneginf(pt[..., 50:]).all()
    assert torch.isfinite(ps[..., :50]).all()
    target = torch.randint(0, 50, (2, 7))
    kd, ce = kdcore.create("loss", "kd", temperature=2.0), kdcore.create("loss", "ce")
    value = kd(ps, pt.detach(), target) + ce(ps, None, target)
    value.backward()
    assert torch.isfinite(value)
    assert all(torch.isfinite(p.grad).all() for p in padded_s.parameters() if p.grad is not None)


def test_different_tokenizers_are_a_config_error_naming_both_sizes():
    with pytest.raises(kdcore.ConfigError, match=r"40 vocabulary rows.*50 tokens"):
        hf(num_classes=50, config={**TINY["llama"], "vocab_size": 40})
    with pytest.raises(kdcore.ConfigError, match=r"5000 vocabulary rows.*50 tokens"):
        hf(num_classes=50, config={**TINY["llama"], "vocab_size": 5000})
    with pytest.raises(kdcore.ConfigError, match="pad_vocab_to"):
        hf(num_classes=50, config=dict(TINY["llama"]), pad_vocab_to=20)


def test_config_errors():
    with pytest.raises(kdcore.ConfigError, match="either path"):
        hf(num_classes=10)
    with pytest.raises(kdcore.ConfigError, match="did you mean 'llama'"):
        hf(num_classes=10, config={"model_type": "lama"})
    with pytest.raises(kdcore.ConfigError, match="config.hidden_sise: .*did you mean 'hidden_size'"):
        hf(num_classes=10, config={"model_type": "llama", "hidden_sise": 8})
    with pytest.raises(kdcore.ConfigError, match="dtype"):
        hf(num_classes=10, config=dict(TINY["llama"]), dtype="float8")


def test_missing_path_names_it_and_how_to_get_the_model(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(kdcore.ConfigError, match=f"path: model directory not found: {missing}.*hf download"):
        hf(num_classes=10, path=str(missing))
    with pytest.raises(kdcore.ConfigError, match="config.json"):
        hf(num_classes=10, path=str(tmp_path))


def test_loads_a_local_directory(tmp_path):
    m = build("qwen2").eval()
    m.model.save_pretrained(tmp_path / "m")
    loaded = hf(num_classes=50, path=str(tmp_path / "m")).eval()
    assert loaded.pretrained and not m.pretrained
    ids = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, m(input_ids=ids).logits)
    half = hf(num_classes=50, path=str(tmp_path / "m"), dtype="bfloat16")
    assert half.head.weight.dtype == torch.bfloat16
    created = kdcore.create("backbone", "hf", num_classes=50, path=str(tmp_path / "m"))
    assert isinstance(created, HFCausalLM)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for gc in (False, True):
        m = build("llama", gradient_checkpointing=gc)
        m.eval()  # no dropout; checkpointing still recomputes in train mode only
        m.model.train()
        torch.manual_seed(1)
        out = m(input_ids=torch.randint(0, 50, (2, 6)))
        out.logits.logsumexp(-1).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_unfused_returns_logits_too():
    out = build("llama", fused=False)(input_ids=torch.randint(0, 50, (1, 4)))
    assert out.has_logits and out.projectable


def test_packed_documents_do_not_attend_across():
    for arch in ("llama", "gpt2"):
        m = build(arch).eval()
        a, b = torch.randint(0, 50, (5,)), torch.randint(0, 50, (7,))
        ids = torch.cat([a, b]).unsqueeze(0)
        pos = torch.cat([torch.arange(5), torch.arange(7)]).unsqueeze(0)
        with torch.no_grad():
            packed = m(input_ids=ids, position_ids=pos, attention_mask=torch.ones_like(ids)).logits
            alone = m(input_ids=b.unsqueeze(0)).logits
            crossed = m(input_ids=ids).logits
        torch.testing.assert_close(packed[0, 5:], alone[0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(crossed[0, 5:], alone[0], atol=1e-3)


def test_lora_trains_only_the_adapters(monkeypatch):
    pytest.importorskip("peft")
    m = build("llama", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    out = m(input_ids=torch.randint(0, 50, (1, 4)))
    out.logits.sum().backward()
    with pytest.raises(kdcore.ConfigError, match="lora.rank: not a LoRA parameter"):
        build("llama", lora={"rank": 4})
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(kdcore.ConfigError, match="needs the peft package"):
        build("llama", lora={"r": 4})

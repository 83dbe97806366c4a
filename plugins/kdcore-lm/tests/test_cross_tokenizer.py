"""The ``cross_tokenizer`` teacher (kdcore_lm.cross): a teacher with another tokenizer in the
student's positions and vocabulary, the engine's ``Outputs.known`` hook for every loss that
uses a teacher, runs on synthetic_lm tokenised two ways (where the right answer is known),
real tokenizers, config errors, and the refusals of the teacher cache and ``kdcore capture``."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import tomli_w
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdcore
from kdcore.cli import main
from kdcore.engine.objective import Term
from kdcore.losses import LogitLoss, Outputs
from kdcore.plugins import default_registry
from kdcore.testing.components import testing_params as component_params
from kdcore_lm.metrics import evaluate_lm
from kdcore_lm.synthetic import synthetic_lm

spec = importlib.util.spec_from_file_location("helpers_lm", Path(__file__).with_name("helpers_lm.py"))
H = importlib.util.module_from_spec(spec)
spec.loader.exec_module(H)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
V, S = 32, 8
DATA = {"name": "synthetic_lm", "n": 600, "length": 16, "vocab_size": V, "states": 8, "split_tokens": S}
LAW = {"backbone": "synthetic_lm_law", "vocab_size": V, "states": 8}
STUDENT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2}


def tokenizer(side):
    return {"name": "synthetic_lm", "side": side, "vocab_size": V, "split_tokens": S}


def cross(**params):
    return {"backbone": "cross_tokenizer", "teacher": dict(LAW), "teacher_tokenizer": tokenizer("teacher"),
            "student_tokenizer": tokenizer("student"), **params}


def data(**params):
    return synthetic_lm(**{k: v for k, v in {**DATA, **params}.items() if k != "name"})


def build(**params):
    spec = cross(**params)
    spec.pop("backbone")
    return kdcore.create("backbone", "cross_tokenizer", num_classes=data().num_classes, **spec)


# -- the teacher's outputs -------------------------------------------------------------------------

def test_the_law_through_the_alignment_is_the_students_law():
    """The teacher is the language's exact law on its own tokens; moved onto the student's
    tokenisation it equals the student's exact law wherever a position is served (all but
    a first position that is a head: no teacher position precedes it)."""
    d = data()
    out = build(floor=0.0)(**d.test.inputs)
    known = out.known
    assert out.logits.shape == d.test.posterior.shape
    first_is_head = d.test.inputs["input_ids"][:, 0] >= V - S
    torch.testing.assert_close(~known[:, 0], first_is_head)
    assert bool(known[:, 1:].all())
    torch.testing.assert_close(out.logits.exp()[known], d.test.posterior[known], atol=2e-6, rtol=1e-5)
    assert bool((out.logits[~known] == 0).all())  # unserved rows are finite (uniform), never NaN


def test_exact_match_renormalises_over_the_shared_tokens():
    d = data()
    out = build(match="exact", floor=0.0)(**d.test.inputs)
    heads = d.test.inputs["input_ids"] >= V - S
    assert not bool(out.known[heads & (d.test.inputs["input_ids"] < V - S + S // 2)].any())  # inside a token
    whole = d.test.posterior[..., :V - S]
    expected = whole / whole.sum(-1, keepdim=True)
    p = out.logits.exp()[out.known]
    torch.testing.assert_close(p[:, :V - S], expected[out.known], atol=2e-6, rtol=1e-5)
    assert bool((p[:, V - S:] == 0).all())


def test_floor_keeps_every_logit_finite():
    d = data()
    out = build(floor=1e-6)(**d.test.inputs)
    assert torch.isfinite(out.logits).all()
    p = out.logits.exp()[out.known]
    torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[0]), atol=1e-5, rtol=0)


def test_padding_positions_are_unserved():
    d = data()
    ids = d.test.inputs["input_ids"][:4]
    mask = torch.ones_like(ids)
    mask[:, 10:] = 0
    out = build()(input_ids=ids, attention_mask=mask)
    assert not bool(out.known[:, 10:].any())
    full = build()(input_ids=ids)
    torch.testing.assert_close(out.logits[:, :10], full.logits[:, :10])


def test_match_none_gives_the_teachers_own_vocabulary_at_aligned_positions():
    d = data()
    out = build(match="none", floor=0.0)(**d.test.inputs)
    assert out.logits.shape[-1] == V
    ids = d.test.inputs["input_ids"]
    inside = (ids >= V - S) & (ids < V - S + S // 2)  # a head: no teacher boundary after it
    assert not bool(out.known[inside].any()) and bool(out.known[~inside][1:].all())


def test_the_state_dict_is_the_wrapped_teachers(tmp_path):
    teacher = kdcore.create("backbone", "cross_tokenizer", num_classes=None,
                            teacher={"backbone": "hf", "config": dict(STUDENT)},
                            teacher_tokenizer=tokenizer("teacher"), student_tokenizer=tokenizer("student"))
    inner = teacher.teacher.state_dict()
    assert list(teacher.state_dict()) == list(inner) and all(k.startswith("model.") for k in inner)
    teacher.load_state_dict({k: torch.zeros_like(v) for k, v in inner.items()})
    assert all(bool((v == 0).all()) for v in teacher.teacher.state_dict().values())


# -- Outputs.known in the engine: every loss that uses the teacher ---------------------------------

def teacher_losses():
    reg = default_registry()
    out = []
    for name in reg.available("loss"):
        factory = reg.get("loss", name).factory
        if isinstance(factory, type) and issubclass(factory, (LogitLoss,)) and getattr(factory, "uses_teacher", True) \
                or name == "uld":
            out.append(name)
    return out


@pytest.mark.parametrize("name", teacher_losses())
def test_unknown_teacher_positions_do_not_count(name):
    """A term sees the teacher's unknown positions as ignored (target -100): its value and
    gradients do not depend on the teacher's logits there, and equal the loss on the known
    positions alone; the student's ce keeps them."""
    try:
        loss = kdcore.create("loss", name, **component_params("loss", name))
    except kdcore.ConfigError as exc:
        pytest.skip(f"{name} needs parameters: {exc}")
    if getattr(loss, "uses_outputs", False):
        pytest.skip(f"{name} reads features, not logits")
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(2, 6, 9, generator=g)
    zt = torch.randn(2, 6, 9, generator=g)
    y = torch.randint(0, 9, (2, 6), generator=g)
    y[1, 5] = -100
    known = torch.tensor([[True, False, True, True, False, True], [True, True, False, True, True, True]])
    term = Term(name, loss, 1.0)
    values = []
    for garbage in (0.0, 1e4):
        t = torch.where(known.unsqueeze(-1), zt, garbage * torch.randn(2, 6, 9, generator=g))
        s = zs.clone().requires_grad_()
        value = term(Outputs(s), Outputs(t, known=known), y)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all()
        assert bool((s.grad[~known] == 0).all())
        values.append(value.detach())
    torch.testing.assert_close(values[0], values[1])
    torch.testing.assert_close(values[0], loss(zs, zt, y.masked_fill(~known, -100)).detach())


def test_a_supervised_term_keeps_every_position():
    y = torch.tensor([[1, 2, 0]])
    zs = torch.randn(1, 3, 4)
    known = torch.tensor([[True, False, False]])
    ce = Term("ce", kdcore.create("loss", "ce"), 1.0)
    torch.testing.assert_close(ce(Outputs(zs), Outputs(torch.zeros(1, 3, 4), known=known), y),
                               kdcore.create("loss", "ce")(zs, None, y))


@settings(max_examples=30, deadline=None)
@given(scale=st.sampled_from([1.0, 30.0, 1e4, 1e30]), seed=st.integers(0, 2**16))
def test_kd_through_the_teacher_is_finite_on_extreme_logits(scale, seed):
    """Extreme student logits against the projected teacher (floor on and off): finite
    values and student gradients, zero gradients at unserved positions."""
    d = data(n=60)
    ids = d.test.inputs["input_ids"][:2]
    for floor in (0.0, 1e-6):
        out = build(floor=floor)(input_ids=ids)
        s = (torch.randn(2, 16, d.num_classes, generator=torch.Generator().manual_seed(seed)) * scale)
        s.requires_grad_()
        value = Term("kd", kdcore.create("loss", "kd"), 1.0)(Outputs(s), out, d.test.targets[:2])
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all()
        assert bool((s.grad[~out.known] == 0).all())


# -- runs on synthetic_lm tokenised two ways ---------------------------------------------------------

def config(teacher=None, loss=({"name": "ce"}, {"name": "kd"}), epochs=10, seed=0, **run):
    conf = {"run": {"seed": seed, "epochs": epochs, "batch_size": 32, "progress": "off", **run},
            "data": dict(DATA), "student": {"backbone": "hf", "config": dict(STUDENT)},
            "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}, "loss": [dict(t) for t in loss]}
    if teacher is not None:
        conf["teacher"] = teacher
    return conf


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    untrained = kdcore.create("backbone", "hf", num_classes=data().num_classes, in_features=16, config=dict(STUDENT))
    out = {"untrained": evaluate_lm(untrained, data().test)["kl_to_truth"]}
    for name, conf in {"none": config(loss=[{"name": "ce"}]),
                       "cross": config(cross()),
                       "same": config({**LAW, "split_tokens": S})}.items():
        out[name] = kdcore.train(conf, root / name, quiet=True)["test_kl"]
    return out


def test_the_student_learns_the_law_of_its_own_tokens_from_a_teacher_with_another_tokenizer(runs):
    """Teacher: the exact law on the language's tokens; student: the finer tokenisation.
    Measured (seed 0, 10 epochs, ce + kd): untrained 2.13, ce only 0.051, cross_tokenizer
    0.0145, the same-tokenizer teacher 0.0239 (benchmarks/bench_cross_tokenizer.py: the
    two agree within the spread over seeds)."""
    assert runs["cross"] < 0.02 * runs["untrained"]
    assert runs["cross"] < 0.7 * runs["none"]
    assert runs["cross"] < 1.5 * runs["same"]


def test_uld_trains_on_the_aligned_positions(tmp_path):
    conf = config(cross(match="none"), loss=[{"name": "ce"}, {"name": "uld"}], epochs=1)
    with pytest.warns(UserWarning, match="teacher 'teacher' predicts over other classes than the data's"):
        summary = kdcore.train(conf, tmp_path / "uld", quiet=True)
    assert summary["test_kl"] < 1.0 and not any(k.startswith("teacher_") for k in summary)


def test_a_teacher_is_scored_only_where_it_knows_the_positions(tmp_path):
    """The summary's teacher metrics skip the positions the alignment cannot serve."""
    summary = kdcore.train(config(cross(), loss=[{"name": "ce"}, {"name": "kd"}], epochs=1), tmp_path / "r",
                           quiet=True)
    assert summary["teacher_test_kl"] < 1e-3  # the exact law, through the alignment, where it is served


def test_the_example_trains_at_tiny_size(tmp_path):
    import tomllib

    conf = tomllib.loads((EXAMPLES / "lm_cross_tokenizer.toml").read_text())
    conf["run"].update(epochs=2, progress="off")
    conf["data"].update(n=192)
    untrained = kdcore.create("backbone", "hf", num_classes=30, in_features=16, config=dict(STUDENT))
    summary = kdcore.train(conf, tmp_path / "example", quiet=True)
    assert summary["test_kl"] < 0.5 * evaluate_lm(untrained, data(n=192).test)["kl_to_truth"]


# -- real tokenizers ---------------------------------------------------------------------------------

def build_reordered_tokenizer(directory):
    """The helpers' word-level tokenizer with its words in reverse order and no chat template:
    another tokenizer over the same words (ids differ), built here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<bos>"] + list(reversed(H.WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return fast


def test_hf_tokenizers_align_by_words(tmp_path, tokenizer_dir, tokenizer):
    """Two word-level tokenizers over the same words in another order: at every position the
    projected teacher is the teacher's own law over the words, renumbered."""
    teacher_tok = build_reordered_tokenizer(tmp_path / "teacher_tok")
    torch.manual_seed(0)
    model = kdcore.create("backbone", "cross_tokenizer", num_classes=len(tokenizer),
                          teacher={"backbone": "hf", "config": dict(STUDENT)}, floor=0.0,
                          teacher_tokenizer=str(tmp_path / "teacher_tok"), student_tokenizer=str(tokenizer_dir))
    ids = torch.tensor([tokenizer("the cat sat on the mat")["input_ids"]])
    out = model(input_ids=ids)
    assert bool(out.known.all())
    t_ids = torch.tensor([teacher_tok("the cat sat on the mat")["input_ids"]])
    assert t_ids.shape == ids.shape
    t_logp = torch.log_softmax(model.teacher(input_ids=t_ids).logits.float(), -1)
    words = [teacher_tok.convert_tokens_to_ids(w) for w in H.WORDS]
    expected = torch.log_softmax(t_logp[..., words], -1)
    student_words = [tokenizer.convert_tokens_to_ids(w) for w in H.WORDS]
    torch.testing.assert_close(out.logits[..., student_words], expected, atol=1e-5, rtol=1e-5)


def test_a_text_run_with_a_teacher_of_another_tokenizer(tmp_path, tokenizer_dir, tokenizer):
    """The text dataset in the student's tokenizer, an hf teacher with its own tokenizer and a
    checkpoint of its own weights (loaded through the wrapper), ce + kd: the run trains, and
    the teacher it ran is the checkpoint's."""
    teacher_tok = build_reordered_tokenizer(tmp_path / "teacher_tok")
    torch.manual_seed(1)
    inner = kdcore.create("backbone", "hf", num_classes=len(teacher_tok), config=dict(STUDENT))
    torch.save(inner.state_dict(), tmp_path / "teacher.pt")
    sentences = ["the cat sat on the mat", "a dog ran in the park", "the big red dog is good",
                 "what is the answer", "the small blue cat ran"]
    records = [{"prompt": f"tell me {s.split()[1]}", "completion": s} for s in sentences] * 4
    train = H.write_jsonl(tmp_path / "train.jsonl", records)
    teacher = {"backbone": "cross_tokenizer", "checkpoint": str(tmp_path / "teacher.pt"),
               "teacher": {"backbone": "hf", "config": dict(STUDENT)},
               "teacher_tokenizer": str(tmp_path / "teacher_tok"), "student_tokenizer": str(tokenizer_dir)}
    conf = {"run": {"seed": 0, "epochs": 1, "batch_size": 4, "progress": "off"},
            "data": {"name": "text", "path": str(train), "val_path": str(train), "tokenizer": str(tokenizer_dir),
                     "max_length": 24},
            "teacher": teacher, "student": {"backbone": "hf", "config": dict(STUDENT)},
            "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0}, "loss": [{"name": "ce"}, {"name": "kd"}]}
    summary = kdcore.train(conf, tmp_path / "run", quiet=True)
    assert math.isfinite(summary["best_val_acc"])
    from kdcore.config import from_dict
    from kdcore.engine import build_model

    built = build_model(from_dict(conf), "teacher")
    for key, value in inner.state_dict().items():
        torch.testing.assert_close(built.teacher.state_dict()[key], value)


# -- errors and refusals -----------------------------------------------------------------------------

def cli(capsys, *args):
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def write(path, conf):
    path.write_text(tomli_w.dumps(conf))
    return path


@pytest.mark.parametrize("change,message", [
    ({"student_tokenizer": None}, "teacher.student_tokenizer: required: a local tokenizer directory (save one with "
     "tokenizer.save_pretrained(DIR)), or { name = \"synthetic_lm\", side = \"teacher\", vocab_size = ..., "
     "split_tokens = ... } for synthetic_lm tokenised two ways"),
    ({"teacher_tokenizer": "no/such/dir"}, "teacher.teacher_tokenizer: tokenizer directory not found: no/such/dir; "
     "save the tokenizer there first (tokenizer.save_pretrained('no/such/dir'), or `hf download <org>/<model> "
     "--local-dir no/such/dir`)"),
    ({"match": "fuzzy"}, "teacher.match: must be one of 'prefix', 'exact', 'none', got 'fuzzy'"),
    ({"teacher": None}, "teacher.teacher: required: the teacher's own backbone table, e.g. teacher = { backbone = "
     "\"hf\", path = \"models/teacher\" }"),
    ({"student_tokenizer": {"name": "synthetic_lm", "side": "student", "vocab_size": V, "split_tokens": 2}},
     "teacher.student_tokenizer: has 33 tokens but the dataset's vocabulary has 30: name the tokenizer the "
     "dataset was tokenised with"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, capsys, change, message):
    teacher = {k: v for k, v in {**cross(), **change}.items() if v is not None}
    code, err = cli(capsys, "train", str(write(tmp_path / "c.toml", config(teacher))), "--out", str(tmp_path / "r"))
    assert (code, err) == (2, f"kdcore: error: {message}\n")


@pytest.mark.parametrize("files,reason", [
    ({}, "Couldn't instantiate the backend tokenizer from one of"),
    ({"tokenizer.json": '{"not": "a tokenizer"', "tokenizer_config.json": "{}"},
     "Expecting ',' delimiter: line 2 column 1 (char 22)"),
])
def test_a_damaged_tokenizer_directory_is_named(tmp_path, capsys, files, reason):
    (tmp_path / "tok").mkdir()
    for name, text in files.items():
        (tmp_path / "tok" / name).write_text(text + "\n")
    conf = config(cross(teacher_tokenizer=str(tmp_path / "tok")))
    code, err = cli(capsys, "train", str(write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "r"))
    tok = tmp_path / "tok"
    assert (code, err) == (2, f"kdcore: error: teacher.teacher_tokenizer: cannot load a tokenizer from {tok} "
                              f"({reason}); save the tokenizer there again with "
                              f"tokenizer.save_pretrained({str(tok)!r})\n")


def test_left_padded_rows_are_refused():
    ids = data().test.inputs["input_ids"][:2]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(kdcore.ConfigError) as err:
        build()(input_ids=ids, attention_mask=mask)
    assert str(err.value) == ("teacher.backbone: cross_tokenizer takes right-padded rows (the attention mask's "
                              "ones, then its zeros); a row here is padded on the left: pad on the right")


def test_a_row_longer_than_the_teachers_positions_is_refused():
    """A teacher with learned positions (gpt2, 12 of them) and rows of 16 student tokens,
    which the teacher's tokenizer makes longer still: one line, not an index error."""
    teacher = kdcore.create("backbone", "cross_tokenizer", num_classes=None,
                            teacher={"backbone": "hf", "config": {**H.TINY["gpt2"], "n_positions": 12}},
                            teacher_tokenizer=tokenizer("teacher"), student_tokenizer=tokenizer("student"))
    with pytest.raises(kdcore.ConfigError) as err:
        teacher(input_ids=data().test.inputs["input_ids"][:2])
    assert str(err.value).startswith("teacher.backbone: a row of this batch is ")
    assert str(err.value).endswith(" tokens for the teacher's tokenizer, more than its 12 positions "
                                   "(max_position_embeddings); shorten data.length, or give the teacher more "
                                   "positions")


def test_packed_rows_are_refused():
    with pytest.raises(kdcore.ConfigError) as err:
        build()(input_ids=torch.zeros(1, 4, dtype=torch.long), position_ids=torch.tensor([[0, 1, 0, 1]]))
    assert str(err.value) == ("teacher.backbone: cross_tokenizer takes one document per row, not packed rows "
                              "(position_ids); set data.packing = false")


def test_the_teacher_cache_is_refused(tmp_path, capsys):
    conf = config({**cross(), "cache": True}, epochs=1)
    code, err = cli(capsys, "train", str(write(tmp_path / "c.toml", conf)), "--out", str(tmp_path / "r"))
    assert (code, err) == (2, "kdcore: error: teacher.cache: the teacher's outputs hold only some positions (a "
                              "teacher with another tokenizer, backbone cross_tokenizer), which the cache does not "
                              "keep; set teacher.cache = false\n")


def test_capture_is_refused(tmp_path, capsys):
    code, err = cli(capsys, "capture", str(write(tmp_path / "c.toml", config(cross()))), "--out",
                    str(tmp_path / "store"), "--quiet")
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("kdcore: error: teacher: its outputs hold only some positions "
                                                   "(a teacher with another tokenizer, backbone cross_tokenizer), "
                                                   "which a store cannot mark; train with the teacher running")

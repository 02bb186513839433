"""
Robustness: every bad input gets a clear error from tinyllm's own checks, and no saved work is ever lost.

The first sections test what other test files do not (configs, inputs, files, training); the last one
throws seeded random bad inputs at the whole public API and checks that each raises a documented
exception (ValueError or TypeError, including TokenizerError and CheckpointError) from a `raise` in a
tinyllm file, never a raw NumPy or Python error from deep inside. The command line is in test_cli.py.
"""
import json
import linecache
import math
import os
import pickle

import numpy as np
import pytest

import tinyllm
from tinyllm import GPT, GPTConfig
from tinyllm.checkpoint import CheckpointError, load_checkpoint, load_pretrained, save_checkpoint
from tinyllm.data import World
from tinyllm.layers import IGNORE_INDEX
from tinyllm.optim import AdamW, clip_grad_norm, lr_schedule
from tinyllm.peft import (AdapterConfig, FullFineTuningConfig, LoraConfig, PeftModel, PrefixTuningConfig,
                          PromptTuningConfig, get_peft_model)
from tinyllm.tasks import encode_examples, evaluate, get_task
from tinyllm.tokenizer import CharTokenizer, TokenizerError, default_tokenizer
from tinyllm.train import TrainConfig, TrainingError, train
from train_helpers import batches, interrupt_at_train_batch

TINYLLM_DIR = os.path.dirname(os.path.abspath(tinyllm.__file__))
TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
V, T_MAX = TINY.vocab_size, TINY.block_size
METHODS = {
    "lora": lambda: LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights=False),
    "lora dropout": lambda: LoraConfig(r=2, lora_dropout=0.5, init_lora_weights=False),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=2),
    "prefix projection": lambda: PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True,
                                                    encoder_hidden_size=4),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=2),
    "adapter": lambda: AdapterConfig(bottleneck_size=2),
    "full": lambda: FullFineTuningConfig(),
}


def peft(method, seed=0):
    return get_peft_model(GPT(TINY, seed=seed), METHODS[method](), seed=seed)


def tiny_train_config(path=None, **overrides):
    settings = dict(max_steps=8, batch_size=4, lr=1e-2, warmup_steps=2, eval_interval=4, eval_iters=2,
                    log_interval=4, checkpoint_interval=3, seed=3, checkpoint=None if path is None else str(path))
    return TrainConfig(**{**settings, **overrides})


def quiet(line):
    pass


def raising_frame(error):
    """(file, line number, source line) of the frame the exception was raised in."""
    tb = error.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    return filename, tb.tb_lineno, linecache.getline(filename, tb.tb_lineno).strip()


def undocumented(call, name=None):
    """None when call() raises a documented error: a ValueError or TypeError with a message, raised by a
    `raise` statement in a tinyllm file (and naming `name`, when given); else what went wrong."""
    try:
        call()
    except (ValueError, TypeError) as e:
        filename, lineno, line = raising_frame(e)
        where = f"{os.path.relpath(filename, os.path.dirname(TINYLLM_DIR))}:{lineno}"
        if not filename.startswith(TINYLLM_DIR + os.sep) or not line.startswith("raise"):
            return f"{type(e).__name__} from {where} ({line!r}), not from a tinyllm check: {e}"
        if not str(e) or (name is not None and name not in str(e)):
            return f"{type(e).__name__} from {where} does not name {name!r}: {e}"
        return None
    except Exception as e:                                # noqa: BLE001 - reporting it is the point
        filename, lineno, _ = raising_frame(e)
        return f"undocumented {type(e).__name__} from {filename}:{lineno}: {e}"
    return "no error raised"


def assert_documented(call, name=None):
    problem = undocumented(call, name)
    assert problem is None, problem


def same_arrays(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------------
# configs (test_model.py, test_peft_model.py and test_train.py have the basic ones)

@pytest.mark.parametrize("make, field", [
    (lambda: LoraConfig(use_rslora="no"), "use_rslora"),            # a non-empty string is truthy: silently on
    (lambda: LoraConfig(init_lora_weights=1), "init_lora_weights"),  # 1 == True, but is not a choice
    (lambda: LoraConfig(lora_alpha="16"), "lora_alpha"),
    (lambda: LoraConfig(lora_alpha=float("inf")), "lora_alpha"),
    (lambda: LoraConfig(lora_dropout="0.1"), "lora_dropout"),
    (lambda: LoraConfig(target_modules="c_attn("), "regular expression"),
    (lambda: LoraConfig(target_modules=["c_attn", None]), "target_modules"),
    (lambda: LoraConfig(target_modules=7), "target_modules"),
    (lambda: LoraConfig(layers_to_transform=["0"]), "layers_to_transform"),
    (lambda: LoraConfig(layers_to_transform=[0.5]), "layers_to_transform"),
    (lambda: AdapterConfig(layers_to_transform="01"), "layers_to_transform"),
    (lambda: PrefixTuningConfig(prefix_projection="yes"), "prefix_projection"),
    (lambda: PrefixTuningConfig(init="text", init_text=123), "init_text"),
    (lambda: PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text=["hi"]), "prompt_tuning_init_text"),
    (lambda: FullFineTuningConfig(inference_mode="false"), "inference_mode"),
    (lambda: GPT({"n_embd": 8, "n_heads": 2}), "n_heads"),           # a typo names the unknown field
    (lambda: GPT(None), "GPTConfig"),
    (lambda: GPT(TINY, dtype=np.int64), "dtype"),
])
def test_more_config_errors_name_the_field(make, field):
    assert_documented(make, field)


@pytest.mark.parametrize("config", [
    lambda: PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="Hello"),
    lambda: PrefixTuningConfig(num_virtual_tokens=2, init="text", init_text="Hello"),
])
def test_init_text_with_an_unknown_character(config):
    base = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=8))
    assert_documented(lambda: get_peft_model(base, config()), "'H' at position 0")


def test_lora_unknown_module_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        get_peft_model(GPT(TINY), LoraConfig(target_modules=["q_proj"]))
    for name in ("c_attn", "c_proj", "c_fc", "c_attn.q", "c_attn.v"):
        assert repr(name) in str(info.value)


def test_train_config_numpy_numbers_reach_the_checkpoint_as_json(tmp_path):
    """np.int64 steps and an np.float32 lr are accepted; they must not crash the first save after training."""
    cfg = tiny_train_config(tmp_path / "c.npz", max_steps=np.int64(3), lr=np.float32(1e-2), eval_iters=0)
    assert type(cfg.max_steps) is int and type(cfg.lr) is float
    train(GPT(TINY), batches(), cfg, out=quiet)
    assert load_checkpoint(tmp_path / "c.npz")[1]["train_config"]["max_steps"] == 3


# ----------------------------------------------------------------------------------------------------
# inputs (test_model.py has ids outside the vocabulary, wrong ndim and dtype, empty and too-long input)

@pytest.mark.parametrize("idx, message", [
    ([[1, 2, 3], [4]], "different lengths"),            # ragged: numpy alone says "inhomogeneous shape"
    (np.zeros((0, 4), dtype=np.int64), "empty"),        # a batch of no sequences
    ([["a", "b"]], "integer"),
    (None, "2-D"),
    (np.array([[1.0, float("nan")]]), "integer"),
])
def test_more_bad_token_inputs(idx, message):
    for method in ("gpt", "prompt"):
        model = GPT(TINY) if method == "gpt" else peft(method)
        assert_documented(lambda: model.forward(idx), message)
        assert_documented(lambda: model.generate(idx, 2), message)


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(top_k=1.5), "top_k"), (dict(top_k=True), "top_k"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(seed="abc"), "seed"), (dict(seed=-1), "seed"),
])
def test_more_bad_generate_arguments(kwargs, field):
    kwargs = {"max_new_tokens": 2, **kwargs}
    assert_documented(lambda: GPT(TINY).generate(np.zeros((1, 2), dtype=np.int64), **kwargs), field)


def test_text_with_unknown_characters_names_the_character_and_position():
    tok = default_tokenizer()
    for text, char, pos in [("hello wörld", "ö", 7), ("tab\there", "\t", 3), ("Hi", "H", 0), ("ok €", "€", 3)]:
        with pytest.raises(TokenizerError) as info:
            tok.encode(text)
        assert (info.value.char, info.value.position) == (char, pos)
        assert repr(char) in str(info.value) and f"position {pos}" in str(info.value)
    assert_documented(lambda: tok.encode(b"bytes"), "decode bytes first")
    assert_documented(lambda: tok.encode(None), "str")


def test_empty_text_cannot_reach_the_model():
    tok = default_tokenizer()
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=8))
    assert tok.encode("").shape == (0,)
    assert_documented(lambda: model.forward(tok.encode("")[None]), "empty")
    assert_documented(lambda: encode_examples(tok, [("", " a\n")], 8), "empty prompt")
    assert_documented(lambda: evaluate(model, tok, []), "no examples")


# ----------------------------------------------------------------------------------------------------
# files (test_checkpoint.py has truncated, corrupted, empty, foreign and future files)

class Payload:
    """Unpickling this creates a file: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_executes_code_from_the_file(tmp_path):
    marker = str(tmp_path / "code-ran")
    evil = np.array([Payload(marker)], dtype=object)
    header = np.frombuffer(json.dumps({"format": "tinyllm-checkpoint", "version": 1}).encode(), np.uint8)
    np.savez(tmp_path / "evil.npz", allow_pickle=True, **{"model/wte.weight": evil, "__meta__": header})
    np.save(tmp_path / "evil.npy", evil, allow_pickle=True)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(Payload(marker)))
    for name in ("evil.npz", "evil.npy", "evil.pkl"):
        with pytest.raises(CheckpointError):
            load_checkpoint(tmp_path / name)
        with pytest.raises(CheckpointError):
            load_pretrained(tmp_path / name)
    pm = peft("lora")
    pm.save_pretrained(tmp_path / "adapter", format="tinyllm")
    (tmp_path / "adapter" / "adapter_model.npz").write_bytes((tmp_path / "evil.npz").read_bytes())
    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(GPT(TINY), str(tmp_path / "adapter"))
    assert not os.path.exists(marker)


def test_every_np_load_in_tinyllm_refuses_pickles():
    for folder, _, files in os.walk(TINYLLM_DIR):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name)) as f:
                    source = f.read()
                for line in source.splitlines():
                    if "np.load(" in line:
                        assert "allow_pickle=False" in line, f"{name}: {line.strip()}"


def test_checkpoint_from_a_different_config(tmp_path):
    """Model arrays that do not match the config in the same file, and a run resumed into another model."""
    model = GPT(TINY)
    cfg = tiny_train_config(tmp_path / "c.npz", max_steps=2, eval_iters=0)
    train(model, batches(), cfg, out=quiet, meta={"tokenizer_chars": "abcdefghij\n"})
    arrays, meta = load_checkpoint(tmp_path / "c.npz")
    meta["config"]["n_layer"] = 3
    save_checkpoint(tmp_path / "lying.npz", arrays, meta)
    with pytest.raises(CheckpointError, match="missing keys"):
        load_pretrained(tmp_path / "lying.npz")
    wider = GPTConfig(**{**TINY.to_dict(), "n_embd": 16})
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train(GPT(wider), batches(), cfg, out=quiet, resume_from=str(tmp_path / "c.npz"))
    train(peft("lora"), batches(), tiny_train_config(tmp_path / "lora.npz", max_steps=2, eval_iters=0), out=quiet)
    with pytest.raises(CheckpointError, match="does not fit this model"):   # a LoRA run into prefix tuning
        train(peft("prefix"), batches(), cfg, out=quiet, resume_from=str(tmp_path / "lora.npz"))


def test_adapter_files_from_two_different_saves_are_refused(tmp_path):
    """A save interrupted between adapter_model.npz and adapter_config.json leaves a mismatched pair; a
    changed lora_alpha would load silently with the wrong scale, so the two files are cross-checked."""
    peft("lora").save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["lora_alpha"] = 64
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="lora_alpha"):
        PeftModel.from_pretrained(GPT(TINY), str(tmp_path / "a"))


def test_a_failed_load_adapter_leaves_no_half_loaded_adapter(tmp_path):
    peft("adapter").save_pretrained(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.npz"
    weights.write_bytes(weights.read_bytes()[:200])
    host = peft("lora")
    with pytest.raises(CheckpointError):
        host.load_adapter(str(tmp_path / "a"), "other")
    peft("prefix").save_pretrained(tmp_path / "b", format="tinyllm")     # weights that do not fit the config
    arrays, meta = load_checkpoint(tmp_path / "b" / "adapter_model.npz")
    save_checkpoint(tmp_path / "b" / "adapter_model.npz", {k: v[:1] for k, v in arrays.items()}, meta)
    with pytest.raises(CheckpointError, match="shape"):
        host.load_adapter(str(tmp_path / "b"), "other")
    assert list(host.adapters) == ["default"]


@pytest.mark.parametrize("method", ["gpt"] + list(METHODS))
def test_a_rejected_state_dict_changes_nothing(method):
    model = GPT(TINY) if method == "gpt" else peft(method)
    before = model.state_dict()
    for k in list(before)[::3]:
        for bad in (np.full_like(before[k], np.nan), before[k].astype(str), before[k][..., :1]):
            assert_documented(lambda: model.load_state_dict({**before, k: bad}), k)
            assert same_arrays(model.state_dict(), before)


def test_adamw_rejects_a_bad_gradient_before_changing_anything():
    model = GPT(TINY)
    opt = AdamW(model.trainable_parameters())
    grads = {k: np.ones_like(v) for k, v in model.trainable_parameters().items()}
    opt.step(grads)
    params, state = model.state_dict(), opt.state_dict()
    last = list(grads)[-1]
    for bad in (np.full_like(grads[last], np.inf), grads[last][:1], grads[last].tolist()):
        assert_documented(lambda: opt.step({**grads, last: bad}), last)
        assert same_arrays(model.state_dict(), params) and same_arrays(opt.state_dict(), state)


# ----------------------------------------------------------------------------------------------------
# training (test_train.py has Ctrl-C, resume, a nan loss and a crash mid-write of one file)

class GradientBlowsUp:
    """A GPT whose loss stays finite but whose gradient turns to inf at one training step."""

    def __init__(self, model, bad_call):
        self.model, self.config, self.calls, self.bad_call = model, model.config, 0, bad_call

    def forward_backward(self, idx, targets, workers=None):
        self.calls += 1
        loss, grads = self.model.forward_backward(idx, targets, workers)
        if self.calls == self.bad_call:
            grads["wte.weight"][0, 0] = np.inf
        return loss, grads

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_non_finite_gradient_stops_keeps_the_checkpoint_and_the_run_can_go_on(tmp_path):
    path = tmp_path / "c.npz"
    cfg = tiny_train_config(path, eval_iters=0)
    with pytest.raises(TrainingError, match=r"step 5: the gradient norm is inf.*step 3\), was kept.*learning rate"):
        train(GradientBlowsUp(GPT(TINY), bad_call=5), batches(), cfg, out=quiet)
    assert load_checkpoint(path)[1]["step"] == 3
    lines = []
    history = train(GPT(TINY), batches(), cfg, out=lines.append, resume_from=str(path))
    assert "resuming" in lines[0] and history["status"] == "completed" and history["step"][-1] == 8


@pytest.mark.parametrize("method", ["lora dropout", "prefix projection"])
def test_peft_resume_after_ctrl_c_is_bit_identical(method, tmp_path):
    """LoRA dropout draws masks from the PeftModel's own generator: it is checkpointed with the batch RNG."""
    full, cut = tmp_path / "full.npz", tmp_path / "cut.npz"
    room = T_MAX - 2                                       # the prefix takes 2 positions
    train(peft(method), batches(room), tiny_train_config(full), out=quiet)
    lines = []
    history = train(peft(method), interrupt_at_train_batch(batches(room), 6), tiny_train_config(cut),
                    out=lines.append)
    assert history["status"] == "interrupted" and "Resume with" in lines[-1] and str(cut) in lines[-1]
    train(peft(method, seed=5), batches(room), tiny_train_config(cut), out=quiet, resume_from=str(cut))
    (a, meta_a), (b, meta_b) = load_checkpoint(full), load_checkpoint(cut)
    assert same_arrays(a, b) and meta_a["history"]["train_loss"] == meta_b["history"]["train_loss"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_a_crash_during_a_periodic_save_keeps_the_previous_checkpoint(error, tmp_path, monkeypatch):
    path = tmp_path / "c.npz"
    real_savez, saves = np.savez, []

    def savez_dies_on_second_save(file, *args, **kwargs):
        saves.append(1)
        if len(saves) == 2:
            file.write(b"PK\x03\x04 half")
            raise error("the machine went down")
        return real_savez(file, *args, **kwargs)
    monkeypatch.setattr(np, "savez", savez_dies_on_second_save)
    cfg = tiny_train_config(path, eval_iters=0)
    if error is KeyboardInterrupt:          # Ctrl-C mid-save: the loop saves again, whole, and says so
        lines = []
        history = train(GPT(TINY), batches(), cfg, out=lines.append)
        assert history["status"] == "interrupted" and "Resume with" in lines[-1]
        assert load_checkpoint(path)[1]["step"] == 6
    else:
        with pytest.raises(OSError):
            train(GPT(TINY), batches(), cfg, out=quiet)
        assert load_checkpoint(path)[1]["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["c.npz"]


@pytest.mark.parametrize("format", ["peft", "tinyllm"])
def test_a_crash_during_save_pretrained_keeps_the_previous_adapter(format, tmp_path, monkeypatch):
    pm = peft("lora")
    pm.save_pretrained(tmp_path, format=format)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    for v in pm.adapters["default"].values():
        v += 1.0

    def crash(fd):                            # the bytes are written, not yet on disk: the machine goes down
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        pm.save_pretrained(tmp_path, format=format)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    monkeypatch.undo()
    PeftModel.from_pretrained(GPT(TINY), str(tmp_path))


def test_problems_that_would_lose_a_run_at_its_end_are_found_before_it_starts(tmp_path):
    started = []

    def get_batch(split, rng):
        started.append(split)
        return batches()(split, rng)
    with pytest.raises(CheckpointError, match="is a folder"):
        train(GPT(TINY), get_batch, tiny_train_config(tmp_path), out=quiet)
    with pytest.raises(ValueError, match="JSON"):
        train(GPT(TINY), get_batch, tiny_train_config(tmp_path / "c.npz"), out=quiet, meta={"when": np.float32(1)})
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a writable folder"):
        train(GPT(TINY), get_batch, tiny_train_config(tmp_path / "file" / "c.npz"), out=quiet)
    assert started == []


# ----------------------------------------------------------------------------------------------------
# a seeded fuzz of the public API: random bad inputs, each must get a documented error
#
# Each family is a generator of (description, call, name): call() must raise a documented error that
# mentions name (None: any message). Families draw from their own seeded generator, so a failure
# reproduces exactly; the description says which input it was.

N_CASES = 40          # random cases per family


def pick(rng, values):
    return values[rng.integers(len(values))]


def bad_tokens(rng, vocab_size=V, block_size=T_MAX, exclude=()):
    """A random bad idx and what is wrong with it, made by breaking a good (B,T) batch one way."""
    B, T = int(rng.integers(1, 4)), int(rng.integers(1, block_size + 1))
    good = rng.integers(0, vocab_size, (B, T))
    b, t = int(rng.integers(B)), int(rng.integers(T))
    kind = pick(rng, [k for k in ("float", "nan", "inf", "bool", "str", "object", "complex", "id", "1-D", "3-D",
                                  "0-D", "empty", "no batch", "too long", "None", "ragged", "nested None")
                      if k not in exclude])
    if kind in ("float", "nan", "inf"):
        x = good.astype(float)
        x[b, t] = {"float": 0.5, "nan": np.nan, "inf": np.inf}[kind]
        return x, kind
    if kind == "id":
        x = good.copy()
        x[b, t] = [-1, -100, vocab_size, vocab_size + 7, 2 ** 62, -2 ** 63][rng.integers(6)]
        return x, f"id {x[b, t]}"
    return {"bool": good.astype(bool), "str": good.astype(str), "object": good.tolist() + [None],
            "complex": good.astype(complex), "1-D": good[0], "3-D": good[None], "0-D": good[0, 0],
            "empty": good[:, :0], "no batch": good[:0], "None": None, "nested None": [[1, None]],
            "too long": rng.integers(0, vocab_size, (B, block_size + 1 + int(rng.integers(3)))),
            "ragged": [list(good[0]), list(good[0]) + [1]]}[kind], kind


def bad_targets(rng, idx):
    """Random bad targets for a good idx, and what is wrong with them."""
    B, T = idx.shape
    good = rng.integers(0, V, (B, T))
    kind = str(rng.choice(["shape", "1-D", "float", "bool", "str", "id", "all ignored", "ragged", "None inside"]))
    if kind == "id":
        bad = good.copy()
        bad[rng.integers(B), rng.integers(T)] = [-1, -101, V, 10 ** 12][rng.integers(4)]
        return bad, kind
    return {"shape": rng.integers(0, V, (B, T + 1)), "1-D": good[0], "float": good.astype(float),
            "bool": good.astype(bool), "str": good.astype(str), "all ignored": np.full((B, T), IGNORE_INDEX),
            "ragged": [list(row) for row in good] + [[1]], "None inside": [[None] * T] * B}[kind], kind


BAD_GENERATE = {
    "max_new_tokens": [-1, -50, 1.5, float("nan"), None, "3", True, [2]],
    "temperature": [-0.1, -math.inf, float("nan"), math.inf, "1", None, [1.0], 1j],
    "top_k": [0, -3, 1.5, float("nan"), "2", True, [3]],
    "seed": ["abc", -1, 1.5, [0.5]],
}


def model_family(make_model):
    """forward with a bad idx or bad targets, generate with a bad idx or one bad argument."""
    def family(rng):
        model = make_model()
        for _ in range(N_CASES):
            what = pick(rng, ["idx", "targets", "generate"])
            idx = rng.integers(0, V, (int(rng.integers(1, 3)), int(rng.integers(1, 5))))
            if what == "idx":
                bad, kind = bad_tokens(rng)
                yield f"forward(idx: {kind})", lambda bad=bad: model.forward(bad), \
                    "block_size" if kind == "too long" else "idx"
            elif what == "targets":
                bad, kind = bad_targets(rng, idx)
                yield f"forward(targets: {kind})", lambda idx=idx, bad=bad: model.forward(idx, bad), "target"
            else:
                args = dict(idx=idx, max_new_tokens=3, temperature=pick(rng, [0.0, 0.7]), top_k=pick(rng, [None, 2]))
                field = pick(rng, list(BAD_GENERATE) + ["idx"])
                if field == "idx":   # (a prompt longer than the context is cropped to its end, as in nanoGPT)
                    args["idx"], kind = bad_tokens(rng, exclude=("too long",))
                else:
                    args[field] = kind = pick(rng, BAD_GENERATE[field])
                yield f"generate({field}: {kind!r})", lambda args=args: model.generate(**args), field
    return family


def bad_state_dict(rng, good):
    """A state dict broken one random way, what was done, and the name the error must mention."""
    k = pick(rng, list(good))
    v = good[k]
    kind = pick(rng, ["not a dict", "missing", "extra", "nan", "inf", "str", "object", "complex", "shape",
                      "scalar", "None", "ragged"])
    if kind == "not a dict":
        return pick(rng, [None, 3, "state", list(good.values())]), kind, "dict"
    if kind == "missing":
        return {key: val for key, val in good.items() if key != k}, f"{kind} {k}", k
    if kind == "extra":
        return {**good, "h.99.attn.c_attn.weight": v}, kind, "h.99"
    if kind in ("nan", "inf"):
        bad = v.astype(np.float64)
        bad.flat[rng.integers(bad.size)] = np.nan if kind == "nan" else -np.inf
        return {**good, k: bad}, f"{kind} in {k}", k
    bad = {"str": v.astype(str), "object": v.astype(object), "complex": v.astype(complex),
           "shape": np.zeros(v.shape + (1,)), "scalar": 1.0, "None": None, "ragged": [[1.0, 2.0], [3.0]]}[kind]
    if kind == "object":
        bad.flat[0] = None
    return {**good, k: bad}, f"{kind} {k}", k


def state_dict_family(make_model):
    def family(rng):
        model = make_model()
        good = model.state_dict()
        for _ in range(N_CASES // 2):
            state, kind, name = bad_state_dict(rng, good)
            yield f"load_state_dict({kind})", lambda state=state: model.load_state_dict(state), name
        assert same_arrays(model.state_dict(), good), "a rejected load_state_dict changed the model"
    return family


NUMBERS_ONLY = ["8", None, True, [8], {}]
BAD_FIELDS = {           # every config field, with values that are wrong for it
    GPTConfig: {f: [0, -3, 2.5, float("nan"), *NUMBERS_ONLY] for f in ("vocab_size", "block_size", "n_layer",
                                                                      "n_head", "n_embd")},
    LoraConfig: {"r": [0, -1, 2.5, *NUMBERS_ONLY], "lora_alpha": [0, -8, float("nan"), math.inf, *NUMBERS_ONLY],
                 "lora_dropout": [-0.1, 1.0, 3, float("nan"), "0.1", None, True],
                 "bias": ["some", None, 1, ["none"]], "use_rslora": ["yes", 1, None],
                 "init_lora_weights": ["kaiming", None, 1, "True", [True]],
                 "target_modules": [5, [5], ["c_attn", None], [], "(", {"c_attn": 1}, [""]],
                 "layers_to_transform": ["ab", [1.5], [None], [True], 1.5, {}],
                 "inference_mode": ["yes", 1, None]},
    PrefixTuningConfig: {"num_virtual_tokens": [0, -1, 2.5, *NUMBERS_ONLY], "prefix_projection": ["yes", 1, None],
                         "encoder_hidden_size": [0, 2.5, *NUMBERS_ONLY], "init": ["zeros", None, 1, "RANDOM"],
                         "init_text": [5, ["abc"], b"abc"], "init_std": [0, -1, float("nan"), math.inf, *NUMBERS_ONLY]},
    PromptTuningConfig: {"num_virtual_tokens": [0, -2, 1.5, *NUMBERS_ONLY],
                         "prompt_tuning_init": ["random", None, 1, "VOCAB"],
                         "prompt_tuning_init_text": [5, ["a"], b"a"]},
    AdapterConfig: {"bottleneck_size": [0, -2, 2.5, *NUMBERS_ONLY],
                    "init_std": [0, -1e-2, float("nan"), *NUMBERS_ONLY],
                    "layers_to_transform": ["ab", [1.5], [None], 2.5]},
    FullFineTuningConfig: {"last_k_blocks": [0, -1, 2.5, "1", True], "inference_mode": ["no", 0]},
    TrainConfig: {**{f: [0, -1, 2.5, float("nan"), *NUMBERS_ONLY] for f in ("max_steps", "batch_size",
                                                                           "eval_interval", "log_interval")},
                  **{f: [-1, 2.5, *NUMBERS_ONLY] for f in ("warmup_steps", "eval_iters", "checkpoint_interval",
                                                           "seed")},
                  "lr": [0, -1e-3, float("nan"), math.inf, *NUMBERS_ONLY],
                  "min_lr_ratio": [-0.1, 1.5, float("nan"), "0.1", None, True],
                  "weight_decay": [-0.1, float("nan"), math.inf, "0", None, True],
                  "grad_clip": [0, -1.0, float("nan"), math.inf, "1", True], "checkpoint": [3, "", b"c.npz", ["c"]]},
}


def config_family(rng):
    for _ in range(2 * N_CASES):
        cls = pick(rng, list(BAD_FIELDS))
        field = pick(rng, list(BAD_FIELDS[cls]))
        value = pick(rng, BAD_FIELDS[cls][field])
        yield f"{cls.__name__}({field}={value!r})", lambda: cls(**{field: value}), field
    # combinations of fields that are each fine alone
    yield "GPTConfig(n_embd=10, n_head=4)", lambda: GPTConfig(n_embd=10, n_head=4), "n_embd"
    yield "PrefixTuningConfig(init='text')", lambda: PrefixTuningConfig(init="text"), "init_text"
    yield "PromptTuningConfig(prompt_tuning_init='TEXT')", lambda: PromptTuningConfig(prompt_tuning_init="TEXT"), \
        "prompt_tuning_init_text"


def model_config_family(rng):
    """Configs that are fine alone but not for this model: get_peft_model finds them, naming the field."""
    too_many = lambda: int(rng.integers(T_MAX, 3 * T_MAX))   # noqa: E731
    for _ in range(N_CASES // 2):
        description, config, field = pick(rng, [
            ("LoRA rank above the layer", lambda: LoraConfig(r=int(rng.integers(TINY.n_embd + 1, 100))),
             "LoraConfig.r"),
            ("unknown module", lambda: LoraConfig(target_modules=[pick(rng, ["q_proj", "attn", "wte", "lm_head"])]),
             "valid names"),
            ("regex matching nothing", lambda: LoraConfig(target_modules=r"h\.7\..*"), "target_modules"),
            ("LoRA layer out of range", lambda: LoraConfig(layers_to_transform=[int(rng.integers(2, 9))]),
             "layers_to_transform"),
            ("prefix fills the context", lambda: PrefixTuningConfig(num_virtual_tokens=too_many()),
             "num_virtual_tokens"),
            ("prompt fills the context", lambda: PromptTuningConfig(num_virtual_tokens=too_many()),
             "num_virtual_tokens"),
            ("adapter layer -1", lambda: AdapterConfig(layers_to_transform=[-1]), "layers_to_transform"),
            ("more blocks than the model", lambda: FullFineTuningConfig(last_k_blocks=int(rng.integers(3, 9))),
             "last_k_blocks"),
        ])
        yield description, lambda config=config: get_peft_model(GPT(TINY), config()), field
    for name in (None, "", "..", "a/b", 3, ["x"]):            # adapter names become folder names
        yield f"adapter_name={name!r}", lambda name=name: get_peft_model(GPT(TINY), LoraConfig(), name), "adapter_name"
        yield f"set_adapter({name!r})", lambda name=name: peft("lora").set_adapter(name), "adapter"
    yield "a dict for a config", lambda: get_peft_model(GPT(TINY), {"r": 8}), "LoraConfig"


def tokenizer_family(rng):
    tok = default_tokenizer()
    unknown = "ÄéZ€\t\r😀~`{}\\^"
    not_text = [None, 5, 1.5, b"abc", ["a", "b"], np.array(["a"]), {"a": 1}]
    not_ids = [[[1, 2], [3]], [[1, 2], [3, 4]], [1.0, 2.0], [True], [64], [-1], None, "abc", [1, None],
               np.array([1, 2 ** 40]), 3]
    for _ in range(N_CASES):
        what = pick(rng, ["unknown char", "not text", "decode"])
        if what == "unknown char":
            text = "".join(rng.choice(list("abc xyz.,01\n"), size=int(rng.integers(0, 30))))
            pos, char = int(rng.integers(len(text) + 1)), pick(rng, unknown)
            text = text[:pos] + char + text[pos:]
            yield f"encode({text!r})", lambda text=text: tok.encode(text), f"{char!r} at position {pos}"
        elif what == "not text":
            value = pick(rng, not_text)
            yield f"encode({value!r})", lambda value=value: tok.encode(value), None
        else:
            value = pick(rng, not_ids)
            yield f"decode({value!r})", lambda value=value: tok.decode(value), None
    for chars in (None, "", "aa", 5, ["a", "b"]):
        yield f"CharTokenizer({chars!r})", lambda chars=chars: CharTokenizer(chars), None


def tasks_family(rng):
    tok = default_tokenizer()
    model = GPT(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=8))
    task = get_task("record", World(0, 4))
    bad_examples = [[], None, "ab", [("a",)], [("a", "b", "c")], [("a", None)], [(1, 2)], [("", " x\n")],
                    [("a", "")], [("Hi", " x\n")], [("q" * 40, " x\n")], {"a": "b"}, [["a"]]]
    bad_args = [("split", "dev"), ("split", None), ("batch_size", 0), ("batch_size", -4), ("batch_size", 2.5),
                ("batch_size", None), ("max_new_tokens", -1), ("max_new_tokens", 0), ("max_new_tokens", 1.5)]
    for _ in range(N_CASES):
        what = pick(rng, ["encode", "block_size", "evaluate", "evaluate args"])
        examples = pick(rng, bad_examples)
        if what == "encode":
            yield f"encode_examples({examples!r})", lambda ex=examples: encode_examples(tok, ex, 32), None
        elif what == "block_size":
            size = pick(rng, [0, -1, 1.5, "32", None, True])
            yield f"encode_examples(block_size={size!r})", \
                lambda size=size: encode_examples(tok, [("a", " b\n")], size), "block_size"
        elif what == "evaluate":
            yield f"evaluate({examples!r})", lambda ex=examples: evaluate(model, tok, ex), None
        else:
            field, value = pick(rng, bad_args)
            yield f"evaluate({field}={value!r})", \
                lambda field=field, value=value: evaluate(model, tok, task, **{field: value}), field


def optim_family(rng):
    params = {"w": np.ones((3, 2)), "b": np.zeros(2)}
    good = {"w": np.ones((3, 2)), "b": np.ones(2)}
    bad_args = {"lr": [-1e-3, float("nan"), math.inf, "1e-3", None, True],
                "betas": [(0.9,), (0.9, 1.0), (-0.1, 0.9), 0.9, "ab", (0.9, float("nan")), None, (0.9, "0.95")],
                "eps": [0, -1e-8, float("nan"), "1e-8", None],
                "weight_decay": [-0.1, float("nan"), math.inf, "0.1", None]}
    bad_params = [None, [np.ones(2)], {"w": [1.0, 2.0]}, {"w": np.arange(3)}, {"w": np.array(["a"])}]
    bad_grads = [None, [np.ones(2)], {"nope": np.ones(2)}, {"w": np.ones(2)}, {"w": [[1.0] * 2] * 3},
                 {"w": np.full((3, 2), np.nan)}, {"b": np.array(["a", "b"])}, {"b": np.array([1.0, np.inf])}]
    bad_schedules = [(-1, 1e-3, 2, 10), (1.5, 1e-3, 2, 10), ("3", 1e-3, 2, 10), (0, float("nan"), 2, 10),
                     (0, -1.0, 2, 10), (0, 1e-3, -1, 10), (0, 1e-3, 2, None), (0, 1e-3, 2, 10, 1.5)]
    for _ in range(N_CASES):
        what = pick(rng, ["init", "params", "step", "step lr", "load", "clip", "schedule"])
        opt = AdamW({k: v.copy() for k, v in params.items()})
        if what == "init":
            field = pick(rng, list(bad_args))
            value = pick(rng, bad_args[field])
            yield f"AdamW({field}={value!r})", lambda field=field, value=value: AdamW(params, **{field: value}), field
        elif what == "params":
            value = pick(rng, bad_params)
            yield f"AdamW({value!r})", lambda value=value: AdamW(value), None
        elif what == "step":
            grads = pick(rng, bad_grads)
            yield f"step({grads!r})", lambda opt=opt, grads=grads: opt.step(grads), None
            assert opt.t == 0 and same_arrays(opt.params, params), "a rejected step changed the optimizer"
        elif what == "step lr":
            lr = pick(rng, bad_args["lr"])
            yield f"step(lr={lr!r})", lambda opt=opt, lr=lr: opt.step(good, lr=lr), "lr"
            assert opt.t == 0 and same_arrays(opt.params, params), "a rejected step changed the optimizer"
        elif what == "load":
            state = opt.state_dict()
            kind, state = pick(rng, [("None", None), ("empty", {}), ("t='x'", {**state, "t": "x"}),
                                     ("t=-1", {**state, "t": np.array(-1)}), ("t=1.5", {**state, "t": np.array(1.5)}),
                                     ("m shape", {**state, "m/w": np.ones(2)}),
                                     ("v nan", {**state, "v/b": np.array([np.nan, 0.0])}),
                                     ("m strings", {**state, "m/b": ["a", "b"]}),
                                     ("no t", {k: v for k, v in state.items() if k != "t"})])
            yield f"load_state_dict({kind})", lambda opt=opt, state=state: opt.load_state_dict(state), None
            assert opt.t == 0 and not any(m.any() for m in opt.m.values()), "a rejected load changed the optimizer"
        elif what == "clip":
            value = pick(rng, [0, -1.0, float("nan"), "1", None])
            yield f"clip_grad_norm(max_norm={value!r})", lambda value=value: clip_grad_norm(dict(good), value), \
                "max_norm"
        else:
            args = pick(rng, bad_schedules)
            yield f"lr_schedule{args!r}", lambda args=args: lr_schedule(*args), None


def train_family(rng):
    """train() itself: a wrong cfg, a get_batch that hands over bad batches, a bad resume_from."""
    cfg, good = tiny_train_config(eval_iters=0), np.zeros((4, 8), dtype=np.int64)
    for _ in range(N_CASES // 4):
        what = pick(rng, ["cfg", "x", "y", "resume"])
        if what == "cfg":
            yield "train(cfg=a dict)", lambda: train(GPT(TINY), batches(), {"max_steps": 3}, out=quiet), "TrainConfig"
        elif what == "x":
            x, kind = bad_tokens(rng)
            yield f"get_batch gives x: {kind}", \
                lambda x=x: train(GPT(TINY), lambda split, r: (x, good), cfg, out=quiet), None
        elif what == "y":
            y, kind = bad_targets(rng, good)
            yield f"get_batch gives y: {kind}", \
                lambda y=y: train(GPT(TINY), lambda split, r: (good, y), cfg, out=quiet), "target"
        else:
            path = pick(rng, [3, ["c.npz"], os.path.abspath(__file__)])
            yield f"resume_from={path!r}", lambda path=path: train(GPT(TINY), batches(), cfg, out=quiet,
                                                                   resume_from=path), None


FAMILIES = {
    "GPT forward and generate": model_family(lambda: GPT(TINY)),
    **{f"PeftModel {m} forward and generate": model_family(lambda m=m: peft(m)) for m in METHODS},
    "GPT load_state_dict": state_dict_family(lambda: GPT(TINY)),
    **{f"PeftModel {m} load_state_dict": state_dict_family(lambda m=m: peft(m)) for m in METHODS},
    "configs": config_family,
    "configs against the model": model_config_family,
    "tokenizer": tokenizer_family,
    "tasks": tasks_family,
    "optim": optim_family,
    "train": train_family,
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_random_bad_inputs_raise_documented_errors(family):
    rng = np.random.default_rng([ord(c) for c in family])       # a fixed seed per family
    problems, n = [], 0
    for description, call, name in FAMILIES[family](rng):
        n += 1
        problem = undocumented(call, name)
        if problem is not None:
            problems.append(f"{description}: {problem}")
    assert n >= 10
    assert not problems, f"{len(problems)} of {n} bad inputs got no clear answer:\n" + "\n".join(problems)

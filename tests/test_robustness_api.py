"""
Robustness of the API (issue 14, round 2): wrong arguments at the public entry points get a TypeError or
ValueError that names what is wrong, from a check in tinyllm, never an AttributeError from deep inside; and
the numeric edges: float16 models train, tiny temperatures sample as greedy decoding does, and prompts of any
integer type come back as int64 ids that generate can take again.
"""
import linecache
import os
import warnings

import numpy as np
import pytest

import tinyllm
from tinyllm import GPT, GPTConfig
from tinyllm.data import corpus_splits
from tinyllm.optim import AdamW
from tinyllm.peft import (LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig,
                          get_peft_model)
from tinyllm.pretrain import PRETRAIN_DATA
from tinyllm.tokenizer import default_tokenizer
from tinyllm.train import TrainConfig, TrainingError, corpus_batches, train
from train_helpers import batches, interrupt_at_train_batch

TINYLLM_DIR = os.path.dirname(os.path.abspath(tinyllm.__file__))
TINY = GPTConfig(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)


def quiet(line):
    pass


def tiny_config(**overrides):
    return TrainConfig(**{**dict(max_steps=3, batch_size=4, lr=1e-2, warmup_steps=1, eval_interval=2, eval_iters=1,
                                 log_interval=1, seed=3), **overrides})


def raised_by_tinyllm(call, error, *fragments):
    """call() must raise `error` from a `raise` statement in a tinyllm file, with every fragment in its message."""
    with pytest.raises(error) as info:
        call()
    tb = info.value.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    line = linecache.getline(filename, tb.tb_lineno).strip()
    assert filename.startswith(TINYLLM_DIR + os.sep) and line.startswith("raise"), \
        f"{type(info.value).__name__} from {filename}:{tb.tb_lineno} ({line}): {info.value}"
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return info.value


# ----------------------------------------------------------------------------------------------------
# 4. wrong arguments to the API

@pytest.mark.parametrize("model", [None, "gpt2", {"n_layer": 2}, GPTConfig()], ids=["None", "str", "dict", "GPTConfig"])
def test_get_peft_model_and_from_pretrained_need_a_gpt(model, tmp_path):
    raised_by_tinyllm(lambda: get_peft_model(model, LoraConfig()), TypeError, "tinyllm GPT")
    raised_by_tinyllm(lambda: PeftModel(model, LoraConfig()), TypeError, "tinyllm GPT")
    raised_by_tinyllm(lambda: PeftModel.from_pretrained(model, str(tmp_path / "missing")), TypeError, "tinyllm GPT")


def test_a_peft_model_is_not_wrapped_again(tmp_path):
    pm = get_peft_model(GPT(TINY), LoraConfig(r=2))
    pm.save_pretrained(tmp_path)
    raised_by_tinyllm(lambda: get_peft_model(pm, LoraConfig()), TypeError, "PeftModel already", "add_adapter")
    raised_by_tinyllm(lambda: PeftModel.from_pretrained(pm, str(tmp_path)), TypeError, "PeftModel already")
    get_peft_model(pm.base_model, PrefixTuningConfig(num_virtual_tokens=2))       # its base, as the message says


@pytest.mark.parametrize("seed", ["abc", -1, 1.5])
def test_get_peft_model_names_a_bad_seed(seed):
    raised_by_tinyllm(lambda: get_peft_model(GPT(TINY), LoraConfig(), seed=seed), ValueError, "seed")


class NotAModel:
    config = TINY


@pytest.mark.parametrize("model, missing", [
    (None, "trainable_parameters()"), (NotAModel(), "forward_backward()"), ("gpt", "state_dict()"),
    (TINY, "load_state_dict()"),
])
def test_train_needs_a_model(model, missing):
    raised_by_tinyllm(lambda: train(model, batches(), tiny_config(), out=quiet), TypeError, "model must be", missing)


@pytest.mark.parametrize("get_batch, message", [
    (None, "get_batch must be a function"), ([np.zeros((4, 8), int)] * 2, "get_batch must be a function"),
    (lambda split, rng: None, "got NoneType"),
    (lambda split, rng: np.zeros((4, 8), np.int64), "got ndarray"),
    (lambda split, rng: (np.zeros((4, 8), np.int64),), "got 1 things"),
    (lambda split, rng: (np.zeros((4, 8), np.int64),) * 3, "got 3 things"),
    (lambda split, rng: {"x": 1, "y": 2}, "got dict"),
])
def test_a_get_batch_that_is_not_one_or_returns_the_wrong_things(get_batch, message):
    for cfg in (tiny_config(eval_iters=0), tiny_config()):    # from the training step and from validation
        raised_by_tinyllm(lambda: train(GPT(TINY), get_batch, cfg, out=quiet), TypeError, "get_batch", message)


def test_a_get_batch_that_returns_the_wrong_kind_of_arrays():
    good = np.zeros((4, 8), np.int64)
    for x, y, message in ((good.astype(float), good, "integer"), (good, good.astype(str), "targets"),
                          ([[1, 2], [3]], good, "different lengths"), (good[:2], good[:2], "batch_size")):
        raised_by_tinyllm(lambda: train(GPT(TINY), lambda split, rng: (x, y), tiny_config(eval_iters=0), out=quiet),
                          ValueError, message)


@pytest.mark.parametrize("value", [None, "2.5", [2.5], np.array([2.5, 1.0]), True, {"loss": 2.5}],
                         ids=["None", "str", "list", "array", "bool", "dict"])
def test_an_eval_fn_that_does_not_return_a_number(value):
    lines = []
    raised_by_tinyllm(lambda: train(GPT(TINY), batches(), tiny_config(), eval_fn=lambda m: value, out=lines.append),
                      TypeError, "eval_fn(model) must return the validation loss as a number")
    assert lines == []


def test_eval_fn_numbers_of_any_kind_are_fine_and_a_nan_one_stops_training():
    for value in (2, 2.5, np.float32(2.5), np.float64(2.5), np.int64(3)):
        history = train(GPT(TINY), batches(), tiny_config(), eval_fn=lambda m: value, out=quiet)
        assert history["val_loss"] == [float(value)] * 3     # at steps 0, 2 and 3
    raised_by_tinyllm(lambda: train(GPT(TINY), batches(), tiny_config(), eval_fn=lambda m: float("nan"), out=quiet),
                      TrainingError, "the validation loss is nan")
    raised_by_tinyllm(lambda: train(GPT(TINY), batches(), tiny_config(), eval_fn="val", out=quiet),
                      TypeError, "eval_fn must be None or a function")


@pytest.mark.parametrize("meta", [["kind", "pretrain"], "pretrain", 3], ids=["list", "str", "int"])
def test_meta_and_the_other_arguments_of_train(meta):
    raised_by_tinyllm(lambda: train(GPT(TINY), batches(), tiny_config(), out=quiet, meta=meta), TypeError,
                      "meta must be None or a dict")
    raised_by_tinyllm(lambda: train(GPT(TINY), batches(), tiny_config(), out="stdout"), TypeError, "out must be")
    raised_by_tinyllm(lambda: train(GPT(TINY), batches(), tiny_config(), out=quiet, resume_command=["x"]), TypeError,
                      "resume_command")


BAD_NAMES = ["a\0b", "line\nbreak", "tab\there", "bell\x07", "del\x7f", "adapter_config.json", "adapter_model.npz",
             "adapter_model.safetensors", "ADAPTER_CONFIG.JSON", "x" * 256, "é" * 128, "\udc80surrogate"]


@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:20] for n in BAD_NAMES])
def test_an_adapter_name_that_cannot_be_a_folder_name_is_refused_when_added(name, tmp_path):
    raised_by_tinyllm(lambda: get_peft_model(GPT(TINY), LoraConfig(), adapter_name=name), ValueError, "adapter_name")
    pm = get_peft_model(GPT(TINY), LoraConfig(r=2))
    raised_by_tinyllm(lambda: pm.add_adapter(name, PromptTuningConfig(num_virtual_tokens=2)), ValueError, "adapter_name")
    pm.save_pretrained(tmp_path / "saved")
    raised_by_tinyllm(lambda: pm.load_adapter(str(tmp_path / "saved"), name), ValueError, "adapter_name")
    raised_by_tinyllm(lambda: pm.load_adapter(str(tmp_path / "nowhere"), name), ValueError, "adapter_name")  # first
    raised_by_tinyllm(lambda: PeftModel.from_pretrained(GPT(TINY), str(tmp_path / "saved"), adapter_name=name),
                      ValueError, "adapter_name")
    assert list(pm.adapters) == ["default"]


def test_names_that_are_folder_names_save_and_load(tmp_path):
    pm = get_peft_model(GPT(TINY), LoraConfig(r=2))
    for name in ("task-a", "Task_B.v2", "ünïcode", "x" * 200, "adapter_config"):
        pm.add_adapter(name, PromptTuningConfig(num_virtual_tokens=2))
    pm.save_pretrained(tmp_path)
    pm.load_adapter(str(tmp_path / "ünïcode"), "reloaded")
    assert "reloaded" in pm.adapters


# ----------------------------------------------------------------------------------------------------
# 5. numeric edges

@pytest.fixture(scope="module")
def corpus():
    """Real text of the synthetic world, which a tiny model can learn something of in a few dozen steps."""
    tok = default_tokenizer()
    _, train_text, val_text = corpus_splits({**PRETRAIN_DATA, "n_chars": 20_000})
    return {"train": tok.encode(train_text), "val": tok.encode(val_text)}


def test_a_float16_model_trains_like_a_float32_one(corpus):
    """AdamW keeps float32 m and v for float16 parameters; in float16 its eps (1e-8) underflowed to 0 and every
    run diverged at step 2, whatever the learning rate."""
    config = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)
    get_batch = corpus_batches(corpus, 8, 16)
    losses = {}
    for dtype in (np.float16, np.float32):
        model = GPT(config, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")                    # no overflow or underflow warning either
            history = train(model, get_batch, tiny_config(max_steps=60, batch_size=8, lr=3e-3, warmup_steps=5,
                                                          eval_iters=0), out=quiet)
        assert history["status"] == "completed" and model.dtype == dtype
        losses[dtype] = np.mean(history["train_loss"][-10:])
    assert losses[np.float16] < 3.5                           # well below uniform guessing, log(64) = 4.16
    assert abs(losses[np.float16] - losses[np.float32]) < 0.05
    for lr in (1e-4, 1e-3, 1e-2):                             # every learning rate, not one lucky one
        train(GPT(config, dtype=np.float16), get_batch, tiny_config(max_steps=5, batch_size=8, lr=lr, eval_iters=0),
              out=quiet)


def test_adamw_state_is_float32_for_float16_parameters_and_resumes_exactly(tmp_path):
    params = {"w": np.full((2, 3), 0.5, np.float16), "b": np.zeros(3, np.float16), "d": np.zeros(2, np.float64)}
    opt = AdamW(params)
    assert {k: v.dtype for k, v in opt.m.items()} == {"w": np.float32, "b": np.float32, "d": np.float64}
    opt.step({"w": np.full((2, 3), 1e-5, np.float16), "b": np.full(3, 1e-7, np.float16), "d": np.ones(2)})
    assert all(np.isfinite(p).all() for p in params.values()) and params["b"].dtype == np.float16
    assert (params["b"] < 0).all() and (params["w"] < 0.5).all()    # a tiny gradient still moves them
    model = GPT(TINY, dtype=np.float16)
    full = train(model, batches(), tiny_config(max_steps=6), out=quiet)
    cut = tiny_config(max_steps=6, checkpoint=str(tmp_path / "cut.npz"))
    assert train(GPT(TINY, dtype=np.float16), interrupt_at_train_batch(batches(), 4), cut, out=quiet)["status"] \
        == "interrupted"                                      # Ctrl-C at step 4: saved at step 3
    resumed_model = GPT(TINY, dtype=np.float16, seed=7)
    resumed = train(resumed_model, batches(), cut, out=quiet, resume_from=cut.checkpoint)
    assert resumed["train_loss"] == full["train_loss"]
    assert all(np.array_equal(model.params[k], resumed_model.params[k]) for k in model.params)


TEMPERATURES = [5e-324, 1e-320, 1e-310, 1e-300, 1e-30, 1e-12]


@pytest.mark.parametrize("make", ["gpt", "lora", "prefix"])
def test_tiny_temperatures_sample_as_greedy_decoding_does(make):
    model = GPT(TINY, seed=1) if make == "gpt" else get_peft_model(
        GPT(TINY, seed=1), LoraConfig(r=2, init_lora_weights=False) if make == "lora" else
        PrefixTuningConfig(num_virtual_tokens=2))
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    greedy = model.generate(prompt, 4, temperature=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # "overflow in divide" included
        for t in TEMPERATURES:
            for top_k in (None, 1, 3):
                assert np.array_equal(model.generate(prompt, 4, temperature=t, top_k=top_k, seed=0), greedy), t
        for t in (1e-3, 1.0, 1e300):                          # ordinary and huge ones still sample
            out = model.generate(prompt, 4, temperature=t, seed=0)
            assert out.shape == (2, 7) and ((0 <= out) & (out < TINY.vocab_size)).all()


@pytest.mark.parametrize("dtype", [np.uint64, np.uint32, np.uint8, np.int32, np.int16, np.int8, np.int64])
def test_a_prompt_of_any_integer_type_gives_int64_ids_generate_can_take_again(dtype):
    for model in (GPT(TINY), get_peft_model(GPT(TINY), PromptTuningConfig(num_virtual_tokens=2))):
        prompt = np.array([[1, 2, 3]], dtype=dtype)
        for n in (0, 1, 3):
            out = model.generate(prompt, n, temperature=0.7, seed=1)
            assert out.dtype == np.int64 and out.shape == (1, 3 + n)
            assert np.array_equal(out[:, :3], prompt)
        again = model.generate(out, 2, seed=2)
        assert again.dtype == np.int64 and np.array_equal(again[:, :out.shape[1]], out)


def test_unsigned_ids_past_int64_are_refused_not_wrapped_around():
    for ids in ([[2 ** 64 - 1]], [[2 ** 63]], [[1, 2 ** 63 + 5]]):
        raised_by_tinyllm(lambda: GPT(TINY).generate(np.array(ids, dtype=np.uint64), 2), ValueError,
                          "is not a token id")

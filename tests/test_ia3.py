"""(IA)^3: its scaling layer against finite differences, PEFT's count on GPT-2 small, the model it starts
as, its merge, and its config's checks. (Its gradients through the whole model, saving and loading, and the
data-parallel step are in the tests every method goes through: peft_helpers.METHODS.)"""
import numpy as np
import pytest

import tinyllm.model
from tinyllm.gradcheck import numerical_gradient, rel_error
from tinyllm.model import GPT, GPTConfig, param_shapes
from tinyllm.peft import IA3Config, get_peft_model
from tinyllm.peft.ia3 import scale_backward, scale_forward
from peft_helpers import CFG, make_base, make_batch, make_peft


def test_scale_layer_gradients(record_error):
    rng = np.random.default_rng(0)
    x, l, dout = rng.normal(size=(2, 3, 5)), rng.normal(size=5), rng.normal(size=(2, 3, 5))
    out, cache = scale_forward(x, l)
    dx, dl = scale_backward(dout, cache)
    f = lambda: float(np.sum(scale_forward(x, l)[0] * dout))
    worst = max(rel_error(dx, numerical_gradient(f, x)), rel_error(dl, numerical_gradient(f, l)))
    record_error("layer: ia3 scale", worst)
    assert worst < 1e-7 and np.array_equal(out, x * l)


def test_gpt2_small_count_matches_peft(capsys, monkeypatch):
    """PEFT's line for GPT-2 small with IA3Config's GPT-2 defaults (c_attn, and mlp.c_proj as a feed-forward
    module): 12 x (2304 + 3072) vectors' numbers. Zeros stand in for the weights (the count ignores them)."""
    monkeypatch.setattr(tinyllm.model, "init_params",
                        lambda config, seed=0, dtype=np.float32: {k: np.zeros(s, dtype) for k, s in param_shapes(config).items()})
    pm = get_peft_model(GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)), IA3Config())
    capsys.readouterr()
    pm.print_trainable_parameters()
    assert capsys.readouterr().out == "trainable params: 64,512 || all params: 124,504,320 || trainable%: 0.0518\n"
    assert pm.adapters["default"]["h.0.attn.c_attn.ia3_l"].shape == (3 * 768,)
    assert pm.adapters["default"]["h.0.mlp.c_proj.ia3_l"].shape == (4 * 768,)


def test_starts_as_the_base_model():
    base = make_base()
    idx, _ = make_batch()
    before = base.forward(idx)[0]
    pm = get_peft_model(base, IA3Config())
    assert all(np.all(v == 1.0) for v in pm.adapters["default"].values())
    assert np.array_equal(pm.forward(idx)[0], before)


@pytest.mark.parametrize("method", ["ia3", "ia3 every linear"])
def test_merge_gives_the_same_model_and_unmerge_restores_it(method):
    pm = make_peft(method)
    idx, _ = make_batch()
    weights = {k: v.copy() for k, v in pm.base_model.params.items()}
    unmerged = pm.forward(idx)[0]
    pm.merge_adapter()
    assert np.max(np.abs(pm.forward(idx)[0] - unmerged)) < 1e-12     # the scaling now lives in W and b
    changed = [k for k in weights if not np.array_equal(pm.base_model.params[k], weights[k])]
    assert changed and all(k.endswith((".weight", ".bias")) and (".c_" in k) for k in changed)
    pm.unmerge_adapter()
    assert all(np.array_equal(pm.base_model.params[k], weights[k]) for k in weights)


def test_the_scaled_side_is_the_output_or_the_input():
    """A target scales c_attn's output, bias included; a feed-forward module scales mlp.c_proj's input."""
    pm = make_peft("ia3")
    p, a = pm.base_model.params, pm.adapters["default"]
    x = np.random.default_rng(1).normal(size=(2, 3, CFG.n_embd))
    hooks = pm.method.hooks(pm.active_peft_config, a, CFG)
    out, _ = hooks.linear("h.0.attn.c_attn", x, p["h.0.attn.c_attn.weight"], p["h.0.attn.c_attn.bias"])
    want = (x @ p["h.0.attn.c_attn.weight"] + p["h.0.attn.c_attn.bias"]) * a["h.0.attn.c_attn.ia3_l"]
    assert np.max(np.abs(out - want)) < 1e-12
    h = np.random.default_rng(2).normal(size=(2, 3, 4 * CFG.n_embd))
    out, _ = hooks.linear("h.0.mlp.c_proj", h, p["h.0.mlp.c_proj.weight"], p["h.0.mlp.c_proj.bias"])
    want = (h * a["h.0.mlp.c_proj.ia3_l"]) @ p["h.0.mlp.c_proj.weight"] + p["h.0.mlp.c_proj.bias"]
    assert np.max(np.abs(out - want)) < 1e-12


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_modules=["c_attn"], feedforward_modules=["mlp.c_proj"]), "subset of target_modules"),
    (dict(target_modules=["q_proj"], feedforward_modules=[]), "not a module of this GPT"),
    (dict(target_modules=[""]), "target_modules must be"),
    (dict(feedforward_modules=7), "feedforward_modules must be"),
    (dict(init_ia3_weights="yes"), "init_ia3_weights"),
])
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_peft_model(make_base(), IA3Config(**kwargs))


@pytest.mark.parametrize("kwargs", [dict(target_modules=["c_attn"]),
                                    dict(target_modules=r".*c_attn", feedforward_modules=["mlp.c_proj"])])
def test_feedforward_modules_only_mark_targets(kwargs):
    """As in PEFT: the default feed-forward module (mlp.c_proj), or one a regex target leaves out, is not a target
    here, so every vector scales c_attn's output (3C numbers per block)."""
    pm = get_peft_model(make_base(), IA3Config(**kwargs))
    shapes = {k: v.shape for k, v in pm.trainable_parameters().items()}
    assert shapes == {f"h.{i}.attn.c_attn.ia3_l": (3 * CFG.n_embd,) for i in range(CFG.n_layer)}

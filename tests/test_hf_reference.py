"""
tinyllm against Hugging Face's GPT2LMHeadModel, in float64: logits, loss, every parameter gradient and
greedy generation. A development check: it needs torch and transformers, which tinyllm does not depend
on, and is skipped when they are not installed.

Our parameter dict is HF's GPT-2 state dict without the `transformer.` prefix, with the same (in, out)
Conv1D weights, so the copy is one line per tensor.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_model import TINY, random_params                     # noqa: E402
from tinyllm.gradcheck import rel_error                          # noqa: E402
from tinyllm.layers import IGNORE_INDEX                          # noqa: E402
from tinyllm.model import GPT, GPTConfig, gpt_backward, gpt_forward, param_shapes   # noqa: E402

TOL = 1e-10

CONFIGS = {
    "tiny": TINY,
    "three layers four heads": dict(vocab_size=13, block_size=6, n_layer=3, n_head=4, n_embd=12),
}


def hf_model(config, params):
    """A float64 GPT2LMHeadModel with exactly our params (the LM head is tied to wte, as ours is)."""
    hf_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
        bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    model = transformers.GPT2LMHeadModel(hf_config).to(torch.float64).eval()
    with torch.no_grad():
        for name, value in params.items():
            model.get_parameter("transformer." + name).copy_(torch.from_numpy(value))
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_names_shapes_and_order_match_hf(name):
    config = GPTConfig(**CONFIGS[name])
    model = hf_model(config, random_params(config, seed=0))
    hf = [(n.removeprefix("transformer."), tuple(p.shape)) for n, p in model.named_parameters()]
    assert hf == list(param_shapes(config).items())               # lm_head is wte, so it is not listed again


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("n_ignored", [0, 3])
def test_logits_loss_and_gradients_match_hf(name, n_ignored, record_error):
    config = GPTConfig(**CONFIGS[name])
    p = random_params(config, seed=1)
    rng = np.random.default_rng(1)
    B, T = 2, config.block_size
    idx = rng.integers(0, config.vocab_size, (B, T))
    labels = idx.copy()
    labels.reshape(-1)[rng.choice(B * T, n_ignored, replace=False)] = IGNORE_INDEX
    # HF predicts labels[:, t+1] from position t; ours predicts targets[:, t], so targets = labels shifted
    targets = np.full((B, T), IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]

    logits, loss, cache = gpt_forward(p, idx, config, targets)
    grads = gpt_backward(cache, set(p))

    model = hf_model(config, p)
    out = model(input_ids=torch.from_numpy(idx), labels=torch.from_numpy(labels))
    hf_logits = out.logits.detach().numpy()
    assert hf_logits.dtype == np.float64
    record_error("hf: logits", rel_error(logits, hf_logits))
    assert rel_error(logits, hf_logits) < TOL
    # HF's own loss casts the logits to float32 first (transformers' ForCausalLMLoss), so it agrees only to
    # float32 precision; its shift convention is the same as ours. The float64 loss below is HF's, shifted
    # the same way, without the cast: that one must agree exactly, and so must its gradients.
    assert loss == pytest.approx(out.loss.item(), rel=1e-6)
    V = config.vocab_size
    loss64 = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V),
                                               torch.from_numpy(labels[:, 1:]).reshape(-1), ignore_index=IGNORE_INDEX)
    assert loss == pytest.approx(loss64.item(), rel=TOL)
    loss64.backward()
    worst = {}
    for hf_name, param in model.named_parameters():
        ours = grads[hf_name.removeprefix("transformer.")]
        worst[hf_name] = rel_error(ours, param.grad.numpy())
    record_error("hf: every parameter gradient", max(worst.values()))
    assert max(worst.values()) < TOL, {k: v for k, v in worst.items() if not v < TOL}


def test_greedy_generation_matches_hf():
    model = GPT(dict(TINY, block_size=12), seed=2, dtype=np.float64)
    model.load_state_dict(random_params(model.config, seed=2, scale=0.6))
    idx = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 4))
    ours = model.generate(idx, 8, temperature=0)                  # 12 tokens: stays within HF's n_positions
    hf = hf_model(model.config, model.params)
    with torch.no_grad():
        theirs = hf.generate(torch.from_numpy(idx), max_new_tokens=8, do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones(idx.shape, dtype=torch.long))
    np.testing.assert_array_equal(ours, theirs.numpy())

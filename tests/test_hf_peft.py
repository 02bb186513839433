"""
Dev-only cross-check against the real thing: Hugging Face transformers' GPT-2 and the peft library.

Skipped unless torch, transformers and peft import (they are not in requirements.txt; a developer installs
them by hand). A tiny float64 GPT2LMHeadModel gets our base weights (HF's keys are `transformer.` + ours,
and its Conv1D weights are (in, out) like ours), then:

    LoRA     peft.get_peft_model(hf, peft.LoraConfig(...)) with our A, B copied in (PEFT stores A.T, B.T):
             logits, loss, every trainable gradient, and print_trainable_parameters' line
    prefix   HF GPT-2 with our prefixes as its KV cache; and peft's PrefixTuningConfig (with and without
             prefix_projection) with our parameters copied into its prompt encoder: logits, gradients, counts
    prompt   HF GPT-2 on inputs_embeds = [prompt; wte[idx]]; and peft's PromptTuningConfig: the same
    IA3      peft.IA3Config with our vectors copied in (PEFT stores a target's as (out, 1), a feed-forward
             module's as (1, in)): logits, loss, gradients and the count
"""
import contextlib
import inspect
import io
import re
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tinyllm.layers import IGNORE_INDEX                                          # noqa: E402
from tinyllm.peft import (IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig,   # noqa: E402
                          get_peft_model)
from peft_helpers import CFG, make_base, make_batch, perturb                    # noqa: E402

V, C, L, NH = CFG.vocab_size, CFG.n_embd, CFG.n_layer, CFG.n_head
P = 3
LOGITS_TOL = 1e-10   # two float64 implementations of the same function
GRAD_TOL = 1e-10


def hf_gpt2(base):
    """A float64 GPT2LMHeadModel holding our base weights, no dropout, eager attention."""
    config = transformers.GPT2Config(vocab_size=V, n_positions=CFG.block_size, n_embd=C, n_layer=L, n_head=NH,
                                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, summary_first_dropout=0.0, layer_norm_epsilon=1e-5,
                                     bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config).double().eval()
    hf_params = dict(model.named_parameters())
    assert len(hf_params) == len(base.params)                         # lm_head is tied to wte, as ours
    with torch.no_grad():
        for name, value in base.params.items():
            hf_params["transformer." + name].copy_(torch.from_numpy(value))
    return model


def call(model, idx, **kw):
    """Run a HF model; this transformers version may call the KV cache `cache` or `past_key_values`."""
    if "kv" in kw:
        kv = kw.pop("kv")
        params = inspect.signature(transformers.GPT2LMHeadModel.forward).parameters
        kw["cache" if "cache" in params else "past_key_values"] = kv
    if idx is not None:
        kw["input_ids"] = torch.from_numpy(idx)
    return model(**kw).logits


def torch_loss(logits, targets):
    return torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.from_numpy(targets).reshape(-1),
                                             ignore_index=IGNORE_INDEX)


def printed(fn):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn()
    return out.getvalue()


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(1e-300, np.max(np.abs(a) + np.abs(b))))


def peft_name(name):
    """peft's parameter name -> ours: base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight
    -> h.0.attn.c_attn.lora_A; ...c_attn.base_layer.bias -> h.0.attn.c_attn.bias."""
    name = name.replace("base_model.model.", "").replace("transformer.", "").replace(".base_layer", "")
    name = name.replace(".default", "")
    return name[:-len(".weight")] if ".lora_" in name else name


# ----------------------------------------------------------------------------------------------------
# LoRA against peft.LoraConfig on HF GPT-2

LORA_CASES = {
    "c_attn": dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    "all linears (suffix c_proj)": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"]),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["c_attn"], use_rslora=True),
    "bias=all": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], bias="all"),
    "bias=lora_only": dict(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], bias="lora_only"),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_matches_peft(case, record_error):
    kw = LORA_CASES[case]
    ours = perturb(get_peft_model(make_base(), LoraConfig(init_lora_weights=False, **kw)))
    theirs = peft.get_peft_model(hf_gpt2(make_base()), peft.LoraConfig(fan_in_fan_out=True, init_lora_weights=False,
                                                                      lora_dropout=0.0, **kw)).eval()
    their_params = {peft_name(n): p for n, p in theirs.named_parameters()}
    their_trainable = {peft_name(n) for n, p in theirs.named_parameters() if p.requires_grad}
    assert their_trainable == set(ours.trainable_parameters())          # the same numbers train
    with torch.no_grad():
        for k, v in ours.adapters["default"].items():                   # PEFT's nn.Linear stores (out, in)
            their_params[k].copy_(torch.from_numpy(v.T))
    assert printed(theirs.print_trainable_parameters) == printed(ours.print_trainable_parameters)

    idx, targets = make_batch()
    logits, loss = ours.forward(idx, targets)
    grads = ours.backward()
    hf_logits = call(theirs, idx)
    hf_loss = torch_loss(hf_logits, targets)
    hf_loss.backward()
    d_logits = float(np.max(np.abs(logits - hf_logits.detach().numpy())))
    record_error(f"hf peft: lora {case} logits (abs)", d_logits)
    assert d_logits < LOGITS_TOL
    assert abs(loss - hf_loss.item()) < LOGITS_TOL
    worst = 0.0
    for k in their_trainable:
        theirs_g = their_params[k].grad.numpy()
        theirs_g = theirs_g.T if ".lora_" in k else theirs_g
        assert k in grads, f"PEFT trains {k} and gives it a gradient; tinyllm's backward() gives none"
        worst = max(worst, rel(grads[k], theirs_g))
    record_error(f"hf peft: lora {case} grads", worst)
    assert worst < GRAD_TOL


# ----------------------------------------------------------------------------------------------------
# prefix tuning: the prefix is HF GPT-2's KV cache; and peft's own PrefixTuningConfig

def as_cache(prefixes, B):
    """Our (P,C) prefixes as a DynamicCache of (B,NH,P,hs) keys and values per layer."""
    from transformers.cache_utils import DynamicCache
    cache = DynamicCache()
    hs = C // NH
    for i in range(L):
        k, v = (torch.from_numpy(np.ascontiguousarray(np.broadcast_to(
            prefixes[f"h.{i}.attn.prefix_{kv}"].reshape(P, NH, hs).transpose(1, 0, 2)[None], (B, NH, P, hs))))
            for kv in "kv")
        cache.update(k, v, i)
    return cache


def test_prefix_is_hf_gpt2_with_a_kv_cache(record_error):
    ours = perturb(get_peft_model(make_base(), PrefixTuningConfig(num_virtual_tokens=P)))
    idx, _ = make_batch()
    logits = ours.forward(idx)[0]
    hf = hf_gpt2(make_base())
    with torch.no_grad():
        hf_logits = call(hf, idx, kv=as_cache(ours.adapters["default"], idx.shape[0]),
                         attention_mask=torch.ones(idx.shape[0], P + idx.shape[1], dtype=torch.long)).numpy()
    d = float(np.max(np.abs(logits - hf_logits)))
    record_error("hf peft: prefix as past_key_values logits (abs)", d)
    assert d < LOGITS_TOL


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_matches_peft_prefix_tuning(projection, record_error):
    ours = perturb(get_peft_model(make_base(), PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=projection,
                                                                  encoder_hidden_size=8)))
    theirs = peft.get_peft_model(hf_gpt2(make_base()), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
        encoder_hidden_size=8)).double().eval()     # peft makes its prompt encoder in float32: cast it
    assert printed(theirs.print_trainable_parameters) == printed(ours.print_trainable_parameters)
    enc = {n.replace("prompt_encoder.default.", ""): p for n, p in theirs.named_parameters() if p.requires_grad}
    a = ours.adapters["default"]
    names = {k.replace("prefix_encoder.", ""): k for k in a}
    flip = lambda short, x: x.T if short.startswith("transform") and short.endswith("weight") else x
    if projection:   # the same MLP: embedding, Linear(C,H), Tanh, Linear(H,2LC); torch's Linear is (out, in)
        assert set(enc) == set(names)
        with torch.no_grad():
            for short, k in names.items():
                enc[short].copy_(torch.from_numpy(flip(short, a[k])))
    else:            # one (P, 2LC) embedding laid out k0 | v0 | k1 | v1, as ours
        assert list(enc) == ["embedding.weight"] and tuple(enc["embedding.weight"].shape) == (P, 2 * L * C)
        with torch.no_grad():
            enc["embedding.weight"].copy_(torch.from_numpy(np.concatenate(
                [a[f"h.{i}.attn.prefix_{kv}"] for i in range(L) for kv in "kv"], axis=1)))
    idx, targets = make_batch()
    logits, loss = ours.forward(idx, targets)
    grads = ours.backward()
    hf_logits = call(theirs, idx)
    torch_loss(hf_logits, targets).backward()
    d = float(np.max(np.abs(logits - hf_logits.detach().numpy())))
    record_error(f"hf peft: prefix projection={projection} logits (abs)", d)
    assert d < LOGITS_TOL
    if projection:
        worst = max(rel(grads[k], flip(s, enc[s].grad.numpy())) for s, k in names.items())
    else:
        g = np.concatenate([grads[f"h.{i}.attn.prefix_{kv}"] for i in range(L) for kv in "kv"], axis=1)
        worst = rel(g, enc["embedding.weight"].grad.numpy())
    record_error(f"hf peft: prefix projection={projection} grads", worst)
    assert worst < GRAD_TOL


# ----------------------------------------------------------------------------------------------------
# prompt tuning: HF GPT-2 on [prompt; wte[idx]]; and peft's own PromptTuningConfig

def test_prompt_is_hf_gpt2_on_inputs_embeds(record_error):
    ours = perturb(get_peft_model(make_base(), PromptTuningConfig(num_virtual_tokens=P)))
    idx, _ = make_batch()
    logits = ours.forward(idx)[0]
    base = make_base()
    embeds = np.concatenate([np.broadcast_to(ours.adapters["default"]["prompt_embeddings"], (idx.shape[0], P, C)),
                             base.params["wte.weight"][idx]], axis=1)       # (B,P+T,C)
    with torch.no_grad():
        hf_logits = call(hf_gpt2(base), None, inputs_embeds=torch.from_numpy(embeds)).numpy()
    d = float(np.max(np.abs(logits - hf_logits[:, P:])))
    record_error("hf peft: prompt as inputs_embeds logits (abs)", d)
    assert d < LOGITS_TOL


def test_prompt_matches_peft_prompt_tuning(record_error):
    ours = perturb(get_peft_model(make_base(), PromptTuningConfig(num_virtual_tokens=P)))
    theirs = peft.get_peft_model(hf_gpt2(make_base()), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P)).double().eval()     # the prompt encoder, too
    assert printed(theirs.print_trainable_parameters) == printed(ours.print_trainable_parameters)
    (name, emb), = [(n, p) for n, p in theirs.named_parameters() if p.requires_grad]
    with torch.no_grad():
        emb.copy_(torch.from_numpy(ours.adapters["default"]["prompt_embeddings"]))
    idx, targets = make_batch()
    logits, loss = ours.forward(idx, targets)
    grads = ours.backward()
    hf_logits = call(theirs, idx)[:, P:]                                     # peft returns the virtual tokens' too
    torch_loss(hf_logits, targets).backward()
    d = float(np.max(np.abs(logits - hf_logits.detach().numpy())))
    record_error("hf peft: prompt tuning logits (abs)", d)
    assert d < LOGITS_TOL
    worst = rel(grads["prompt_embeddings"], emb.grad.numpy())
    record_error("hf peft: prompt tuning grads", worst)
    assert worst < GRAD_TOL


# ----------------------------------------------------------------------------------------------------
# (IA)^3 against peft.IA3Config on HF GPT-2

IA3_CASES = {
    "GPT-2 defaults": dict(),
    "every linear": dict(target_modules=["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
                         feedforward_modules=["mlp.c_fc", "mlp.c_proj"]),
}


@pytest.mark.parametrize("case", list(IA3_CASES))
def test_ia3_matches_peft(case, record_error):
    kw = IA3_CASES[case]
    ours = perturb(get_peft_model(make_base(), IA3Config(init_ia3_weights=False, **kw)))
    theirs = peft.get_peft_model(hf_gpt2(make_base()), peft.IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False,
                                                                      fan_in_fan_out=True, **kw)).eval()
    their = {peft_name(n).replace(".ia3_l", "") + ".ia3_l": p for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(their) == set(ours.adapters["default"])
    with torch.no_grad():
        for k, v in ours.adapters["default"].items():
            their[k].copy_(torch.from_numpy(v.reshape(their[k].shape)))
    assert printed(theirs.print_trainable_parameters) == printed(ours.print_trainable_parameters)
    idx, targets = make_batch()
    logits, loss = ours.forward(idx, targets)
    grads = ours.backward()
    hf_logits = call(theirs, idx)
    hf_loss = torch_loss(hf_logits, targets)
    hf_loss.backward()
    d = float(np.max(np.abs(logits - hf_logits.detach().numpy())))
    record_error(f"hf peft: ia3 {case} logits (abs)", d)
    assert d < LOGITS_TOL and abs(loss - hf_loss.item()) < LOGITS_TOL
    worst = max(rel(grads[k], their[k].grad.numpy().reshape(-1)) for k in their)
    record_error(f"hf peft: ia3 {case} grads", worst)
    assert worst < GRAD_TOL


# ----------------------------------------------------------------------------------------------------
# PEFT's own adapter files, both ways: tinyllm writes a folder that peft.PeftModel.from_pretrained loads, and
# reads one that peft's save_pretrained wrote

FORMAT_CASES = {
    "lora": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "mlp.c_fc"], init_lora_weights=False),
    "lora bias=all": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], bias="all", init_lora_weights=False),
    "lora trainable tokens": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False,
                                                trainable_token_indices=[3, 5]),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=P),
    "prefix projection": lambda: PrefixTuningConfig(num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=8),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=P),
    "lora dropout": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.1,
                                       init_lora_weights=False),      # loaded for inference: no dropout
    # a regex in tinyllm's names (h.0...) is widened for PEFT's (transformer.h.0...); one in PEFT's works as it is
    "lora tinyllm regex": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=r"h\.\d+\.attn\.c_attn",
                                             init_lora_weights=False),
    "lora peft regex": lambda: LoraConfig(r=2, lora_alpha=4, target_modules=r"transformer\.h\.\d+\.mlp\.c_fc",
                                          init_lora_weights=False),
    "lora full names": lambda: LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,     # as 'all-linear' saves
                                          target_modules=["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"]),
    "ia3": lambda: IA3Config(init_ia3_weights=False),
    # PEFT fills in feedforward_modules=['mlp.c_proj'] for a GPT-2, and saves it, though it is no target here
    "ia3 c_attn only": lambda: IA3Config(target_modules=["c_attn"], init_ia3_weights=False),
}


def peft_logits(model, idx, virtual):
    """peft's logits for the real tokens (prompt tuning returns the virtual tokens' too, in front)."""
    with torch.no_grad():
        return call(model, idx).numpy()[:, virtual:]


@pytest.mark.parametrize("case", list(FORMAT_CASES))
def test_peft_loads_what_tinyllm_saves(case, tmp_path, record_error):
    ours = perturb(get_peft_model(make_base(), FORMAT_CASES[case]()))
    for v in ours.base_model.params.values():          # a bias='all' adapter carries base biases it trained
        v += 0.0
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    idx, _ = make_batch()
    logits = ours.eval().forward(idx)[0]
    base = make_base()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(hf_gpt2(base), str(tmp_path)).double().eval()
    complaints = [str(w.message) for w in caught if re.search(r"unexpected|missing|ignored", str(w.message), re.I)]
    assert complaints == []
    virtual = P if case == "prompt" else 0
    d = float(np.max(np.abs(logits - peft_logits(theirs, idx, virtual))))
    record_error(f"hf peft: {case} saved by tinyllm, loaded by peft (abs)", d)
    assert d < (1e-6 if case.startswith(("prefix", "prompt")) else LOGITS_TOL)   # peft loads a prompt as float32


@pytest.mark.parametrize("case", [c for c in FORMAT_CASES if c not in ("prefix projection", "lora tinyllm regex")])
def test_tinyllm_loads_what_peft_saves(case, tmp_path, record_error):
    """peft saves its trained-looking adapter; tinyllm loads the folder onto the same base weights."""
    cfg = FORMAT_CASES[case]()
    kw = {k: v for k, v in cfg.to_dict().items() if k not in ("peft_type", "inference_mode", "init_lora_weights",
                                                            "init_ia3_weights", "init", "init_text", "init_std")}
    cls = {"LoraConfig": peft.LoraConfig, "PrefixTuningConfig": peft.PrefixTuningConfig,
           "PromptTuningConfig": peft.PromptTuningConfig, "IA3Config": peft.IA3Config}[type(cfg).__name__]
    extra = {"fan_in_fan_out": True} if cls in (peft.LoraConfig, peft.IA3Config) else {}
    theirs = peft.get_peft_model(hf_gpt2(make_base()), cls(task_type="CAUSAL_LM", **extra, **kw)).double()
    with torch.no_grad():                               # move every trainable number off its start
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(str(tmp_path))
    ours = PeftModel.from_pretrained(make_base(), str(tmp_path))
    idx, _ = make_batch()
    virtual = P if case == "prompt" else 0
    d = float(np.max(np.abs(ours.forward(idx)[0] - peft_logits(theirs.eval(), idx, virtual))))
    record_error(f"hf peft: {case} saved by peft, loaded by tinyllm (abs)", d)
    assert d < LOGITS_TOL

"""
Prompt tuning (Lester et al., 2021): num_virtual_tokens learned input vectors,

    prompt_embeddings (P,C)

put in front of the token embeddings, so the model reads P "words" that no tokenizer has. They take the
first P positions; the real tokens follow at positions P, P+1, ... Only P*C numbers train.
"""
import numpy as np


def init_prompt(config, model, rng, tokenizer=None):
    wte = model.params["wte.weight"]
    P = config.num_virtual_tokens
    if config.prompt_tuning_init == "TEXT":
        ids = tokenizer.encode(config.prompt_tuning_init_text)
        if len(ids) == 0:
            raise ValueError("PromptTuningConfig.prompt_tuning_init_text is empty after tokenizing")
        prompt = wte[np.resize(ids, P)]                                  # the text's embeddings, repeated or cut
    elif config.prompt_tuning_init == "SAMPLE_VOCAB":
        prompt = wte[rng.integers(0, wte.shape[0], P)]                   # embeddings of random tokens
    else:
        prompt = rng.normal(0.0, float(wte.std()), (P, wte.shape[1]))   # at the scale of real embeddings
    return {"prompt_embeddings": np.array(prompt, dtype=model.dtype)}


def formula(config, model_config):
    P, C = config.num_virtual_tokens, model_config.n_embd
    return f"prompt P * C = {P}*{C} = {P * C:,}"

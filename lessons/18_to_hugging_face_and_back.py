"""
Lesson 18: to Hugging Face and back. When one CPU is not enough, a learner moves to PyTorch with
transformers and PEFT; this lesson shows that the step is a file copy, because tinyllm writes and reads
their formats with NumPy alone:

  1. the pretrained character model as a GPT-2 folder (config.json + model.safetensors)
  2. safetensors: 8 bytes, a JSON header, raw numbers; read by hand, nothing in it can run
  3. a LoRA adapter as PEFT writes one (adapter_config.json + adapter_model.safetensors)
  4. when torch, transformers and peft are installed: both loaded there, and the largest logit
     difference; otherwise the lines of Python a learner would run
  5. GPT-2's tokenizer from its two files: byte-level BPE, and how its merges build a word
  6. with --gpt2 FOLDER (a GPT-2 you downloaded yourself; tinyllm downloads nothing): the real GPT-2, its
     PEFT-style counts, a few generated tokens, and a few LoRA steps on a small text

Run from the repository root (README.md has the measured time, without --gpt2):

    python lessons/18_to_hugging_face_and_back.py
    python lessons/18_to_hugging_face_and_back.py --gpt2 path/to/gpt2

Files go to runs/lessons/18_to_hugging_face_and_back/.
"""
import argparse
import json
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import numpy as np

from tinyllm import GPT
from tinyllm.peft import LoraConfig, PeftModel, get_peft_model
from tinyllm.tokenizer import BPETokenizer
from tinyllm.train import TrainConfig, train
from lessons.common import CHECKPOINT, indented, load_base, section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "18_to_hugging_face_and_back")


def have(*modules):
    """Whether every one of these packages imports (they are never requirements of tinyllm)."""
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in modules)


def export_base(base, folder):
    """1. model.save_pretrained(folder) writes the two files transformers' GPT2LMHeadModel reads. tinyllm's
    names are GPT-2's without 'transformer.', and both store the linear weights (in, out): the export is a
    rename. The character model is a GPT-2 with a 64-token vocabulary."""
    section("1. the pretrained model as a Hugging Face GPT-2 folder")
    base.save_pretrained(folder)
    for name in sorted(os.listdir(folder)):
        print(f"  {os.path.relpath(os.path.join(folder, name))}: {os.path.getsize(os.path.join(folder, name)):,} bytes")
    config = json.load(open(os.path.join(folder, "config.json")))
    print(f"config.json: {dict((k, config[k]) for k in ('model_type', 'vocab_size', 'n_positions', 'n_embd', 'n_layer', 'n_head'))}")
    back = GPT.from_pretrained(folder)
    same = all(np.array_equal(back.params[k], v) for k, v in base.params.items())
    print(f"GPT.from_pretrained(folder) reads it back: bit for bit the same weights: {same}")
    return {"round_trip_exact": same}


def show_safetensors(path):
    """2. A safetensors file is 8 bytes (the header's length, little-endian), a JSON header naming every
    tensor's dtype, shape and byte range, and then the raw numbers. Reading the header needs nothing but
    struct and json; no byte of the file is ever executed, which is why the format replaced pickles."""
    section("2. what a safetensors file is")
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]                     # u64, little-endian
        header = json.loads(f.read(n))
    name = next(k for k in header if k != "__metadata__")
    print(f"{os.path.relpath(path)}: {os.path.getsize(path):,} bytes; the first 8 say the header is {n:,} bytes of JSON.")
    print(f"{len(header) - 1} tensors; the first: {name!r}: {header[name]}")
    print(f"metadata: {header.get('__metadata__')}  (transformers wants 'format': 'pt')")
    print("tinyllm.safetensors checks every field (sizes, offsets, dtypes, that the tensors tile the data) before")
    print("it touches the numbers, and memory-maps them: GPT.from_pretrained copies each tensor from the map")
    print("straight into the model's arrays, so loading a file costs one copy of it in memory, not two.")
    return {"header_bytes": n, "tensors": len(header) - 1}


def export_lora(base, tok, folder, base_folder, steps):
    """3. A LoRA adapter in PEFT's own format: adapter_config.json with PEFT's field names (fan_in_fan_out:
    true, because GPT-2's linears are Conv1D) and adapter_model.safetensors with PEFT's keys, lora_A.weight
    (r, in) and lora_B.weight (out, r): torch's nn.Linear layout, the transposes of tinyllm's. tinyllm's own
    facts (the base's fingerprint) travel in the file's metadata, which PEFT ignores."""
    section("3. a LoRA adapter as PEFT writes one")
    from tinyllm.data import World
    from tinyllm.finetune import task_batches
    from tinyllm.tasks import get_task
    pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]), tokenizer=tok)
    task = get_task("extract", World(0, 24))
    print("A few steps of LoRA on the extract task (lesson 09 trains it to the end), then pm.save_pretrained:")
    train(pm, task_batches(tok, task, base.config.block_size, 8), TrainConfig(max_steps=steps, batch_size=8, lr=1e-2,
          warmup_steps=1, eval_iters=0, log_interval=max(1, steps // 2)), out=indented)
    pm.save_pretrained(folder)
    fields = json.load(open(os.path.join(folder, "adapter_config.json")))
    print(f"adapter_config.json: {json.dumps({k: fields[k] for k in ('peft_type', 'task_type', 'r', 'lora_alpha', 'target_modules', 'fan_in_fan_out')})}")
    from tinyllm.safetensors import load_file
    arrays, meta = load_file(os.path.join(folder, "adapter_model.safetensors"))
    key = sorted(arrays)[0]
    print(f"adapter_model.safetensors: {len(arrays)} arrays, e.g. {key} {arrays[key].shape}; metadata keys {sorted(meta)}")
    back = PeftModel.from_pretrained(GPT.from_pretrained(base_folder), folder)
    x = np.array([tok.encode(task.test[0][0])])
    d = float(np.max(np.abs(back.forward(x)[0] - pm.eval().forward(x)[0])))
    print(f"Read back by tinyllm onto the exported base: max |logit difference| = {d:g}")
    return pm, {"adapter_arrays": len(arrays), "adapter_round_trip_max_diff": d}


def in_pytorch(pm, tok, base_folder, adapter_folder):
    """4. The same files in PyTorch: transformers loads the folder, PEFT puts the adapter on it, and the
    logits agree with tinyllm's to float32 rounding. Without those packages installed, the lines to run."""
    section("4. the same files in transformers and PEFT")
    code = (f"import torch, transformers, peft\n"
            f"model = transformers.GPT2LMHeadModel.from_pretrained({base_folder!r})\n"
            f"model = peft.PeftModel.from_pretrained(model, {adapter_folder!r})\n"
            f"logits = model(input_ids=torch.tensor([ids])).logits")
    if not have("torch", "transformers", "peft"):
        print("torch, transformers and peft are not installed (tinyllm never needs them). With them, this is all:\n")
        print(indented_block(code))
        return {"pytorch_max_diff": None}
    import contextlib
    import io
    import torch
    import transformers
    import peft
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        hf = transformers.GPT2LMHeadModel.from_pretrained(base_folder)
        hf = peft.PeftModel.from_pretrained(hf, adapter_folder).eval()
    ids = tok.encode("kim is a baker, owns a cat and loves pink.\njob")
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(np.array([ids]))).logits.numpy()
    ours = pm.eval().forward(np.array([ids]))[0]
    d = float(np.max(np.abs(ours - theirs)))
    print(indented_block(code))
    print(f"\nran in this Python: max |tinyllm logits - transformers + PEFT logits| = {d:.2e} (float32 rounding)")
    return {"pytorch_max_diff": d}


def indented_block(text):
    return "\n".join("    " + line for line in text.splitlines())


def learn_merges(text, n):
    """A byte-level BPE of n merges learned from text, as GPT-2's were (minbpe's loop): count adjacent pairs,
    merge the most frequent into a new token, repeat. Returns (vocab, merges) in GPT-2's file format."""
    from tinyllm.bpe import BYTE_ENCODER, pretokenize
    words = [[BYTE_ENCODER[b] for b in w.encode()] for w in pretokenize(text)]   # merges stay inside a piece
    vocab = {BYTE_ENCODER[b]: b for b in range(256)}
    merges = []
    for _ in range(n):
        counts = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        a, b = max(counts, key=counts.get)
        merges.append((a, b))
        vocab[a + b] = len(vocab)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i:i + 2] = [a + b]
                i += 1
    return vocab, merges


def show_bpe(folder, corpus_text):
    """5. GPT-2 reads bytes, not characters: its 50,257 tokens are the 256 bytes plus 50,000 merges learned from
    text, applied in the order they were learned. With the real files (--gpt2) those merges; without them a
    small set learned here from the lessons' corpus, in the same format."""
    section("5. GPT-2's tokenizer: byte-level BPE")
    if folder is not None and os.path.isfile(os.path.join(folder, "merges.txt")):
        tok = BPETokenizer.from_pretrained(folder)
        print(f"BPETokenizer.from_pretrained({folder!r}): {tok.vocab_size:,} tokens")
        word = " lives"
    else:
        vocab, merges = learn_merges(corpus_text[:20_000], 120)
        tok = BPETokenizer(vocab, merges)
        print(f"120 merges learned from 20,000 characters of the corpus: {tok.vocab_size} tokens "
              f"(GPT-2's files hold 50,000 merges; --gpt2 FOLDER uses them)")
        word = " lives"
    steps = tok.merge_steps(word)
    print(f"How the merges build {word!r}:")
    for parts in steps:
        print("  " + " | ".join(parts))
    text = "mia lives in oslo. 😀"
    ids = tok.encode(text)
    print(f"encode({text!r}) -> {ids}; decode gives it back: {tok.decode(ids) == text}")
    return {"merge_steps": len(steps), "round_trip": tok.decode(ids) == text}


def real_gpt2(folder, steps, echo=print):
    """6. The real GPT-2, loaded from a folder you downloaded (any size). Its counts are PEFT's; a few greedy
    tokens; a few steps of LoRA on a short text, with the training loop every lesson uses."""
    section("6. the real GPT-2")
    model = GPT.from_pretrained(folder)
    tok = BPETokenizer.from_pretrained(folder)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"]))
    pm.print_trainable_parameters()
    prompt = "The meaning of fine-tuning is"
    out = pm.eval().generate(np.array([tok.encode(prompt)]), 12, temperature=0)[0]
    print(f"greedy: {tok.decode(out)!r}")
    text = ("Fine-tuning adapts a pretrained model to a task. LoRA trains a low-rank update of a few matrices and "
            "leaves the pretrained weights as they are. ") * 8
    ids = np.array(tok.encode(text))
    T = 32

    def get_batch(split, rng):
        starts = rng.integers(0, len(ids) - T - 1, 2)
        return np.stack([ids[s:s + T] for s in starts]), np.stack([ids[s + 1:s + T + 1] for s in starts])
    history = train(pm.train(), get_batch, TrainConfig(max_steps=steps, batch_size=2, lr=1e-3, warmup_steps=1,
                                                       eval_iters=0, log_interval=1), out=echo)
    print(f"loss {history['train_loss'][0]:.3f} -> {history['train_loss'][-1]:.3f} in {steps} steps")
    return {"gpt2_trainable": pm.get_nb_trainable_parameters()[0], "gpt2_losses": history["train_loss"]}


def main(gpt2=None, steps=20, gpt2_steps=5, checkpoint=CHECKPOINT, config=None, out_dir=OUT_DIR):
    """Run the lesson. gpt2: a Hugging Face GPT-2 folder to load (optional); steps: LoRA steps of section 3;
    config: GPTConfig fields of a random model to use instead of the pretrained one (for tests).
    Returns a dict of what it measured."""
    os.makedirs(out_dir, exist_ok=True)
    base, tok, data, source = load_base(checkpoint, config)
    print(f"The base: {source}.")
    base_folder, adapter_folder = os.path.join(out_dir, "gpt2_char"), os.path.join(out_dir, "lora_peft")
    m = export_base(base, base_folder)
    m.update(show_safetensors(os.path.join(base_folder, "model.safetensors")))
    pm, more = export_lora(base, tok, adapter_folder, base_folder, steps)
    m.update(more)
    m.update(in_pytorch(pm, tok, base_folder, adapter_folder))
    from tinyllm.data import corpus_splits
    m.update(show_bpe(gpt2, corpus_splits(data)[1]))
    if gpt2 is not None:
        m.update(real_gpt2(gpt2, gpt2_steps))
    return m


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Lesson 18: to Hugging Face and back.")
    parser.add_argument("--gpt2", metavar="FOLDER", help="a Hugging Face GPT-2 folder you downloaded yourself")
    main(gpt2=parser.parse_args().gpt2)

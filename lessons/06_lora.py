"""
Lesson 06: LoRA, low-rank adaptation.

Full fine-tuning (lesson 05) trains every weight and saves a whole model per task. LoRA freezes the
model and learns, next to chosen linear layers y = x @ W + b, a low-rank update:

    y = x @ W + b + scale * (x @ A) @ B         A (in,r), B (r,out), scale = lora_alpha / r

so a layer with in*out weights trains r*(in+out) numbers. This lesson follows the Hugging Face PEFT API:

  1. get_peft_model(model, LoraConfig(...)): what trains, with the formula r*(in+out) per module
  2. the no-op start: B starts at zero, so the model starts exactly equal to the base
  3. training on the lab's task (extract: read one field off a sentence)
  4. merging: W <- W + scale * A @ B gives the same model with no extra cost; merge_and_unload() returns
     a plain GPT
  5. saving: save_pretrained writes only A and B, a small file next to a full copy of the model;
     PeftModel.from_pretrained loads it back onto the base
  6. one base, many tasks: a second adapter (qa) on the same base, set_adapter to switch, and
     disable_adapter() to get the base back

Run from the repository root (a few minutes on 2 cores, plus a pretraining first if no pretrained model
exists yet; README.md has the times measured):

    python lessons/06_lora.py

Figures go to runs/lessons/06_lora/.

Legend: B batch, T time, C channels, V vocabulary, L blocks, r rank.
"""
import copy
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)   # `import tinyllm` from a fresh clone, with no install step

import matplotlib
matplotlib.use("Agg")      # write image files; no window needed
import matplotlib.pyplot as plt
import numpy as np

from tinyllm.data import World
from tinyllm.finetune import VAL_EXAMPLES, full_copy_bytes, saved_bytes, task_batches, val_loss_fn
from tinyllm.model import GPT
from tinyllm.peft import LoraConfig, PeftModel, get_peft_model
from tinyllm.peft.lora import find_targets, module_shapes
from tinyllm.peft.saving import read_adapter
from tinyllm.plots import log_loss_axis, smooth
from tinyllm.presets import DEFAULT_TASK, tuned_lrs
from tinyllm.tasks import evaluate, get_task
from tinyllm.train import TrainConfig, train
from lessons.common import (CHECKPOINT, human_bytes, indented, lesson_section, load_base, lr_source, max_diff,
                            same_length_prompts)

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "06_lora")
LR = tuned_lrs()["lora"]   # the sweep's learning rate for LoRA on extract (presets.py: r=8 on c_attn)


def train_adapter(pm, tok, task, steps, lr, batch_size, seed, n_val):
    """Train pm's active adapter on task with the loop of lesson 04; returns the history.

    The batches and the validation loss are tinyllm.finetune's: answer tokens only, the same n_val
    validation examples at every evaluation.
    """
    block_size = pm.base_model.config.block_size
    val_loss = val_loss_fn(tok, task, block_size, n=n_val)

    def eval_fn(model):
        model.eval()                    # no LoRA dropout while measuring
        loss = val_loss(model)
        model.train()
        return loss
    every = max(1, steps // 5)
    cfg = TrainConfig(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
                      weight_decay=0.0, eval_interval=every, eval_iters=0, log_interval=every, seed=seed)
    history = train(pm, task_batches(tok, task, block_size, batch_size), cfg, eval_fn=eval_fn, out=indented)
    pm.eval()
    return history


def task_table(pm, tok, tasks, n_val):
    """Validation loss and test accuracy on every task, of the base (adapter disabled) and of each adapter.
    Returns {row label: {task name: {'val_loss', 'accuracy'}}}."""
    val_losses = {t.name: val_loss_fn(tok, t, pm.base_model.config.block_size, n=n_val) for t in tasks}

    def measure():
        return {t.name: {"val_loss": val_losses[t.name](pm), "accuracy": evaluate(pm, tok, t, "test")["accuracy"]}
                for t in tasks}
    rows = {}
    with pm.disable_adapter():
        rows["base (disable_adapter)"] = measure()
    for name in pm.adapters:
        pm.set_adapter(name)
        rows[f"adapter {name!r}"] = measure()
    return rows


# ----------------------------------------------------------------------------------------------------
# the lesson's sections, in the order they run

@lesson_section("1. get_peft_model: what trains")
def show_trainable(pm, base, source):
    """get_peft_model freezes every weight of the base and adds an A and a B to each module the config
    targets. A name in target_modules matches every module that ends with it: 'c_proj' is attn.c_proj and
    mlp.c_proj. Each module's update A @ B has the shape of its W, (in, out), but rank r at most: it is
    stored as r*(in+out) numbers instead of in*out. (pm.config is the base model's GPTConfig, as in PEFT;
    the LoRA settings are pm.active_peft_config.)"""
    c, lc = base.config, pm.active_peft_config
    print(f"The base: {source}; {c.n_layer} blocks, C = {c.n_embd}, {base.num_parameters():,} parameters.")
    print(f"pm = get_peft_model(model, LoraConfig(r={lc.r}, lora_alpha={lc.lora_alpha}, "
          f"target_modules={lc.target_modules}), adapter_name={pm.active_adapter!r})\n")
    pm.print_trainable_parameters()
    print(pm.formula())
    shapes, targets = module_shapes(c), find_targets(lc, c)
    print(f"\n{'module':<20} {'(in, out)':>12} {'W: in*out':>10} {'LoRA: r*(in+out)':>17} {'ratio':>7}")
    for name in shapes:                                 # in the order of the forward pass
        if name.startswith("h.0.") and name in targets:  # every block has the same modules
            n_in, n_out = shapes[name]
            print(f"{name[4:]:<20} {str((n_in, n_out)):>12} {n_in * n_out:>10,} {lc.r * (n_in + n_out):>17,} "
                  f"{lc.r * (n_in + n_out) / (n_in * n_out):>7.1%}")
    n_lora = sum(lc.r * sum(shapes[n]) for n in targets)
    n_frozen = sum(shapes[n][0] * shapes[n][1] for n in targets)
    print(f"In all {len(targets)} modules ({c.n_layer} blocks): {n_lora:,} LoRA numbers train, beside "
          f"{n_frozen:,} frozen weights of the same layers.")
    print(f"scale = lora_alpha / r = {lc.lora_alpha} / {lc.r} = {lc.scale:g}")
    return dict(trainable=n_lora, frozen_in_targets=n_frozen, targets=len(targets))


@lesson_section("2. the no-op start")
def show_noop(pm, base, x):
    """Every lora_B starts at zero and every lora_A at random (Kaiming-uniform), so (x @ A) @ B = 0: the
    update adds exactly nothing, and training starts from the base model itself. Why not both at zero?
    Then both gradients would be zero, dB = (x A)^T dout and dA = x^T dout B^T, and nothing would ever
    train. One of the two must start random; B at zero makes the start a no-op."""
    adapter = pm.adapters[pm.active_adapter]
    B_zero = all(not np.any(v) for k, v in adapter.items() if k.endswith("lora_B"))
    A_max = max(float(np.abs(v).max()) for k, v in adapter.items() if k.endswith("lora_A"))
    print(f"Every lora_B is zero: {B_zero}; largest |A|: {A_max:.3f}.")
    diff = max_diff(pm.forward(x)[0], base.forward(x)[0])
    print(f"max |logits(pm) - logits(base)| on {x.shape[0]} validation prompts: {diff:g}")
    return diff


@lesson_section("3. training the first adapter")
def train_first(pm, base, base_state, tok, task, settings):
    """train(pm, ...) is the loop of lesson 04, on pm.trainable_parameters(): the A's and B's. The base's
    weights get no weight gradient at all (backward still passes dx through them to the layers below), so
    they cannot move; that is checked bit for bit after training."""
    steps, lr, batch_size = settings["steps"], settings["lr"], settings["batch_size"]
    print(f"The task: {task.name}, e.g. {task.train[0][0]!r} -> {task.train[0][1]!r}")
    before = evaluate(pm, tok, task, "test")["accuracy"]
    print(f"Test accuracy before training (the no-op adapter, so the base's): {before:.1%}")
    print(f"{steps} steps of {batch_size}, AdamW at lr {lr:g} ({lr_source('lora', lr, DEFAULT_TASK)}; the sweep "
          f"tunes LoRA on c_attn alone, this lesson puts it on the modules of section 1).\n")
    history = train_adapter(pm, tok, task, steps, lr, batch_size, settings["seed"], settings["n_val"])
    after = evaluate(pm, tok, task, "test")
    unchanged = all(np.array_equal(base.params[k], base_state[k]) for k in base_state)
    print(f"\nValidation loss per answer token: {history['val_loss'][0]:.3f} -> {history['val_loss'][-1]:.3f}; "
          f"test accuracy {before:.1%} -> {after['accuracy']:.1%} (exact match).")
    print(f"Base weights bit-identical to the pretrained ones after training: {unchanged}")
    for (prompt, answer), pred in list(zip(task.test, after["predictions"]))[:3]:
        print(f"  {prompt!r}\n    truth {answer!r}\n    LoRA  {pred!r}")
    return dict(history=history, accuracy_before=before, accuracy_after=after["accuracy"], base_unchanged=unchanged)


@lesson_section("4. merging: W <- W + scale * A @ B")
def show_merge(pm, base, x):
    """x @ W + scale * (x @ A) @ B = x @ (W + scale * A @ B): the update can be folded into W, and the
    model then costs exactly what the base costs at inference. merge_adapter() folds it in,
    unmerge_adapter() takes it out again, merge_and_unload() folds it in and returns a plain GPT. All of
    this happens on copies (copy.deepcopy(pm)), so that pm's base stays bit-identical to the pretrained
    one."""
    unmerged, _ = pm.forward(x)
    pm2 = copy.deepcopy(pm)
    pm2.merge_adapter()
    merged, _ = pm2.forward(x)
    moved = max(max_diff(pm2.base_model.params[k], base.params[k]) for k in base.params)
    pm2.unmerge_adapter()
    back = max(max_diff(pm2.base_model.params[k], base.params[k]) for k in base.params)
    d_merge = max_diff(merged, unmerged)
    print(f"pm2.merge_adapter(): the largest weight change was {moved:.4f}.")
    print(f"max |logits merged - logits unmerged| = {d_merge:.2e} (float32 rounding: (x A) B and x (A B) are "
          f"summed in different orders)")
    print("pm2.unmerge_adapter(): the weights are back to the pretrained ones " +
          ("bit for bit." if back == 0 else f"up to rounding ({back:.1e} at most), not bit for bit."))

    plain = copy.deepcopy(pm).merge_and_unload()        # a copy: merge_and_unload changes its base in place
    plain_logits, _ = plain.forward(x)
    lora_keys = [k for k in plain.params if "lora" in k]
    d_plain = max_diff(plain_logits, unmerged)
    print(f"\nplain = copy.deepcopy(pm).merge_and_unload(): a {type(plain).__name__} with {plain.num_parameters():,} "
          f"parameters (the base has {base.num_parameters():,}), {len(lora_keys)} LoRA keys;")
    print(f"max |logits plain - logits unmerged| = {d_plain:.2e}.")
    return dict(merged_vs_unmerged_max_diff=d_merge, unmerge_restores_max_diff=back,
                merge_and_unload_max_diff=d_plain, merged_is_plain_gpt=isinstance(plain, GPT) and not lora_keys,
                merged_num_parameters=plain.num_parameters())


@lesson_section("5. saving only the adapter")
def show_save_load(pm, base_state, x, folder):
    """pm.save_pretrained(folder) writes what the adapter adds and nothing of the base: its config
    (adapter_config.json) and its A's and B's, in Hugging Face PEFT's format (adapter_model.safetensors,
    with PEFT's names). PeftModel.from_pretrained(base, folder) puts them back onto a base, here a fresh
    copy of the pretrained one, as another process would load it."""
    pm.save_pretrained(folder)
    name = pm.active_adapter
    where = folder if name == "default" else os.path.join(folder, name)
    for f in sorted(os.listdir(where)):
        print(f"  {os.path.relpath(os.path.join(where, f))}: {os.path.getsize(os.path.join(where, f)):,} bytes")
    arrays = read_adapter(pm.base_model, where, False)[1]          # tinyllm's names, whichever the format
    adapter_bytes = saved_bytes(where)
    full_bytes = full_copy_bytes(pm.base_model)
    print(f"The file holds {len(arrays)} arrays (an A and a B per module), {sum(a.size for a in arrays.values()):,} "
          f"numbers.")
    print(f"Adapter: {human_bytes(adapter_bytes)}; a full copy of the model: {human_bytes(full_bytes)} "
          f"(the adapter is {adapter_bytes / full_bytes:.1%} of it, {full_bytes / adapter_bytes:.0f}x smaller).")

    fresh = copy.deepcopy(pm.base_model)
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, where, adapter_name=name)
    d = max_diff(loaded.forward(x)[0], pm.forward(x)[0])
    print(f"\nloaded = PeftModel.from_pretrained(base, {os.path.relpath(where)!r}): "
          f"max |logits loaded - logits trained| = {d:g}.")
    print(f"Loaded for inference, as in PEFT: loaded.get_nb_trainable_parameters() = "
          f"{loaded.get_nb_trainable_parameters()} (is_trainable=True would let it train on).")
    return dict(adapter_bytes=adapter_bytes, full_copy_bytes=full_bytes, reload_max_diff=d)


@lesson_section("6. one base, many tasks")
def many_tasks(pm, base, tok, tasks, x, settings, full_bytes, folder):
    """pm.add_adapter(name, LoraConfig(...)) puts a second set of A's and B's on the same frozen base, and
    pm.set_adapter(name) chooses which one the forward uses; `with pm.disable_adapter():` gives the base
    back. Only one base is stored, and each task adds its adapter. The second task is qa: questions about
    the world's people, answered from what pretraining taught ('where does mia live\\nanswer' -> ' oslo\\n');
    its validation and test questions ask about people no training question mentions."""
    task2 = tasks[1]
    print(f"pm.add_adapter({task2.name!r}, LoraConfig(...)); pm.set_adapter({task2.name!r}); trained on "
          f"{task2.name}, e.g. {task2.train[0][0]!r} -> {task2.train[0][1]!r}\n")
    pm.add_adapter(task2.name, dataclasses.replace(pm.active_peft_config))
    pm.set_adapter(task2.name)
    pm.train()
    steps, batch_size = settings["second_steps"], settings["batch_size"]
    history = train_adapter(pm, tok, task2, steps, settings["lr"], batch_size, settings["seed"], settings["n_val"])
    passes = steps * batch_size / len(task2.train)
    print(f"\n{task2.name} has {len(task2.train)} training examples: {steps} steps of {batch_size} read each "
          f"{passes:.1f} times on average. Train loss (last 10 steps) {np.mean(history['train_loss'][-10:]):.3f}, "
          f"validation loss {history['val_loss'][-1]:.3f}.")
    with pm.disable_adapter():
        disabled, _ = pm.forward(x)
    d_disabled = max_diff(disabled, base.forward(x)[0])
    print(f"\nwith pm.disable_adapter(): max |logits - logits of the base| = {d_disabled:g}")
    rows = task_table(pm, tok, tasks, settings["n_val"])
    print("\nSwitching with pm.set_adapter(name): validation loss per answer token, and test accuracy (exact match)")
    print(f"{'':<24}" + "".join(f"{t.name + ' loss':>14}{t.name + ' accuracy':>18}" for t in tasks))
    for label, row in rows.items():
        print(f"{label:<24}" + "".join(f"{row[t.name]['val_loss']:>14.3f}{row[t.name]['accuracy']:>18.1%}"
                                       for t in tasks))
    pm.save_pretrained(folder)
    both = sum(saved_bytes(os.path.join(folder, name)) for name in pm.adapters)
    print(f"\nOn disk: one base ({human_bytes(full_bytes)}) + {len(pm.adapters)} adapters ({human_bytes(both)}), "
          f"against {len(pm.adapters)} full copies ({human_bytes(len(pm.adapters) * full_bytes)}).")
    return dict(history=history, disabled_max_diff=d_disabled, task_table=rows, all_adapters_bytes=both)


@lesson_section("figures")
def save_figures(histories, rows, r, batch_size, saved, out_dir):
    """loss_curves.png: train and validation loss of both adapters against steps.
    one_base_many_tasks.png: validation loss and test accuracy of the base and of each adapter on each
    task, and the bytes stored per task: one adapter against a full copy of the model."""
    paths = [os.path.join(out_dir, "loss_curves.png"), os.path.join(out_dir, "one_base_many_tasks.png")]
    plot_losses(histories, r, batch_size, paths[0])
    plot_many_tasks(rows, saved["adapter_bytes"], saved["full_copy_bytes"], paths[1])
    for path in paths:
        print(f"saved {os.path.relpath(path)}")
    return paths


# ----------------------------------------------------------------------------------------------------
# figures

def plot_losses(histories, r, batch_size, path):
    fig, ax = plt.subplots(figsize=(10, 6))
    for (name, h), color in zip(histories.items(), ("tab:blue", "tab:orange")):
        ax.plot(h["step"], smooth(h["train_loss"], 10), color=color, lw=1.5,
                label=f"adapter {name!r}: train loss (mean of the last 10 steps)")
        ax.plot(h["val_step"], h["val_loss"], "o--", color=color, lw=1.5, label=f"adapter {name!r}: validation loss")
    log_loss_axis(ax)
    ax.set_xlabel(f"step (batches of {batch_size} examples)")
    ax.set_ylabel("loss per answer token (nats, log scale)")
    ax.set_title(f"LoRA (r = {r}): two adapters trained on one frozen base")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_many_tasks(rows, adapter_bytes, full_bytes, path):
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5), gridspec_kw=dict(width_ratios=[1.3, 1.3, 1]))
    labels = list(rows)
    tasks = list(rows[labels[0]])
    x = np.arange(len(tasks))
    width = 0.8 / len(labels)
    for ax, key, fmt in ((axes[0], "val_loss", "%.2f"), (axes[1], "accuracy", "%.0f%%")):
        for j, (label, color) in enumerate(zip(labels, ("lightgray", "tab:blue", "tab:orange", "tab:green"))):
            values = [rows[label][t][key] * (100 if key == "accuracy" else 1) for t in tasks]
            bars = ax.bar(x + (j - (len(labels) - 1) / 2) * width, values, width, color=color, label=label)
            ax.bar_label(bars, fmt=fmt, fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{t} task" for t in tasks])
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("validation loss (nats per answer token)")
    axes[0].set_title("Validation loss (lower is better)")
    axes[1].set_ylabel("test accuracy (%, exact match)")
    top = max(rows[label][t]["accuracy"] for label in labels for t in tasks)
    axes[1].set_ylim(0, min(105, max(10, 130 * top)))
    axes[1].set_title("Test accuracy (higher is better)")
    ax = axes[2]
    bars = ax.bar(["one LoRA adapter", "a full copy"], [adapter_bytes / 2 ** 10, full_bytes / 2 ** 10],
                  color=["tab:blue", "tab:gray"])
    ax.bar_label(bars, labels=[human_bytes(adapter_bytes), human_bytes(full_bytes)])
    ax.set_ylabel("bytes on disk per task (KiB)")
    ax.set_title("What must be stored for each task")
    ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))                 # room for the legend above the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(steps=300, lr=LR, r=8, lora_alpha=16, target_modules=("c_attn", "c_proj", "c_fc"), batch_size=8,
         second_task="qa", second_steps=100, checkpoint=CHECKPOINT, config=None, n_test=None, n_val=VAL_EXAMPLES,
         seed=0, out_dir=OUT_DIR):
    """Run the lesson.

    steps, lr, batch_size: the first adapter's training, on the lab's task (second_steps: the second's);
    r, lora_alpha, target_modules: the LoraConfig of both; second_task: the second adapter's task;
    checkpoint: the pretrained model (made if missing); config: GPTConfig fields of a random model to use
    instead (for tests); n_test: score only the first n test examples of each task (None: all); n_val:
    validation examples in the validation loss.
    Returns a dict of what it measured (and the paths of its figures).
    """
    os.makedirs(out_dir, exist_ok=True)
    base, tok, data, source = load_base(checkpoint, config, seed)
    world = World(data["world_seed"], data["n_people"])
    tasks = [get_task(name, world) for name in (DEFAULT_TASK, second_task)]
    tasks = [dataclasses.replace(t, test=t.test[:n_test]) for t in tasks]
    settings = dict(steps=steps, second_steps=second_steps, lr=lr, batch_size=batch_size, seed=seed, n_val=n_val)
    base_state, x = base.state_dict(), same_length_prompts(tok, tasks[0].val, 8)      # x: (B,T)
    lora_config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules))
    pm = get_peft_model(base, lora_config, adapter_name=tasks[0].name, seed=seed)
    counts = show_trainable(pm, base, source)
    noop = show_noop(pm, base, x)
    first = train_first(pm, base, base_state, tok, tasks[0], settings)
    merge = show_merge(pm, base, x)
    saved = show_save_load(pm, base_state, x, os.path.join(out_dir, "adapters"))
    many = many_tasks(pm, base, tok, tasks, x, settings, saved["full_copy_bytes"], os.path.join(out_dir, "adapters"))
    figures = save_figures({t.name: run["history"] for t, run in zip(tasks, (first, many))}, many["task_table"], r,
                           batch_size, saved, out_dir)
    h, h2 = first["history"], many["history"]
    return dict(pretrained=config is None, trainable_params=pm.get_nb_trainable_parameters()[0],
                formula_count=counts["trainable"], noop_max_diff=noop, val_loss_before=h["val_loss"][0],
                val_loss_after=h["val_loss"][-1], accuracy_before=first["accuracy_before"],
                accuracy_after=first["accuracy_after"], base_unchanged=first["base_unchanged"], **merge, **saved,
                disabled_max_diff=many["disabled_max_diff"], second_val_loss_before=h2["val_loss"][0],
                second_val_loss_after=h2["val_loss"][-1], task_table=many["task_table"],
                all_adapters_bytes=many["all_adapters_bytes"], figures=figures)


if __name__ == "__main__":
    main()

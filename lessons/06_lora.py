"""
Lesson 06: LoRA, low-rank adaptation.

Full fine-tuning (lesson 05) trains every weight and saves a whole model per task. LoRA freezes the
model and learns, next to chosen linear layers y = x @ W + b, a low-rank update:

    y = x @ W + b + scale * (x @ A) @ B         A (in,r), B (r,out), scale = lora_alpha / r

so a layer with in*out weights trains r*(in+out) numbers. This lesson follows the Hugging Face PEFT API:

  1. get_peft_model(model, LoraConfig(...)): what trains, with the formula r*(in+out) per module
  2. the no-op start: B starts at zero, so the model starts exactly equal to the base
  3. training on the record task
  4. merging: W <- W + scale * A @ B gives the same model with no extra cost; merge_and_unload() returns
     a plain GPT
  5. saving: save_pretrained writes only A and B, a small file next to a full copy of the model;
     PeftModel.from_pretrained loads it back onto the base
  6. one base, many tasks: a second adapter (qa) on the same base, set_adapter to switch, and
     disable_adapter() to get the base back

Run from the repository root (about a minute on 2 CPU cores, plus ~3 minutes of pretraining the first
time if no pretrained checkpoint exists yet):

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

from tinyllm.plots import log_loss_axis, smooth
from tinyllm.presets import tuned_lrs

LRS = tuned_lrs()
from tinyllm.data import World
from tinyllm.finetune import VAL_EXAMPLES, full_copy_bytes, saved_bytes, task_batches, val_loss_fn
from tinyllm.model import GPT
from tinyllm.peft.saving import read_adapter
from tinyllm.peft import LoraConfig, PeftModel, get_peft_model
from tinyllm.peft.lora import find_targets, module_shapes
from tinyllm.tasks import evaluate, get_task
from tinyllm.train import TrainConfig, train
from lessons.common import CHECKPOINT, indented, load_base, max_diff, same_length_prompts, section

OUT_DIR = os.path.join(ROOT, "runs", "lessons", "06_lora")
LR = LRS["lora"]   # the learning rate tinyllm.compare measured best for LoRA: larger than full fine-tuning's


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


# ----------------------------------------------------------------------------------------------------
# 1. what trains

def show_trainable(pm, config):
    section("1. get_peft_model: what trains")
    lc = pm.active_peft_config                          # pm.config is the base model's GPTConfig, as in PEFT
    print(f"pm = get_peft_model(model, LoraConfig(r={lc.r}, lora_alpha={lc.lora_alpha}, "
          f"target_modules={lc.target_modules}), adapter_name={pm.active_adapter!r})")
    print("A name in target_modules matches every module that ends with it: 'c_proj' is attn.c_proj and "
          "mlp.c_proj.\n")
    pm.print_trainable_parameters()
    print(pm.formula())
    shapes, targets = module_shapes(config), find_targets(lc, config)
    print(f"\n{'module':<20} {'(in, out)':>12} {'W: in*out':>10} {'LoRA: r*(in+out)':>17} {'ratio':>7}")
    for name in shapes:                                 # in the order of the forward pass
        if name.startswith("h.0.") and name in targets:  # every block has the same modules
            n_in, n_out = shapes[name]
            print(f"{name[4:]:<20} {str((n_in, n_out)):>12} {n_in * n_out:>10,} {lc.r * (n_in + n_out):>17,} "
                  f"{lc.r * (n_in + n_out) / (n_in * n_out):>7.1%}")
    n_lora = sum(lc.r * sum(shapes[n]) for n in targets)
    n_frozen = sum(shapes[n][0] * shapes[n][1] for n in targets)
    print(f"In all {len(targets)} modules ({config.n_layer} blocks): {n_lora:,} LoRA numbers train, beside "
          f"{n_frozen:,} frozen weights of the same layers.")
    print(f"scale = lora_alpha / r = {lc.lora_alpha} / {lc.r} = {lc.scale:g}")
    return dict(trainable=n_lora, frozen_in_targets=n_frozen, targets=len(targets))


# ----------------------------------------------------------------------------------------------------
# 2. the no-op start

def show_noop(pm, base, x):
    section("2. the no-op start")
    adapter = pm.adapters[pm.active_adapter]
    B_zero = all(not np.any(v) for k, v in adapter.items() if k.endswith("lora_B"))
    A_max = max(float(np.abs(v).max()) for k, v in adapter.items() if k.endswith("lora_A"))
    print(f"Every lora_B is zero: {B_zero}; lora_A is random (Kaiming-uniform, largest |A| {A_max:.3f}).")
    print("So (x @ A) @ B = 0: the update adds exactly nothing, and training starts from the base model.")
    logits_pm, _ = pm.forward(x)
    logits_base, _ = base.forward(x)
    diff = max_diff(logits_pm, logits_base)
    print(f"max |logits(pm) - logits(base)| on {x.shape[0]} validation prompts: {diff:g}")
    print("(A starts random rather than at zero too: with both zero, the gradients of A and B would both")
    print(" be zero, dB = (x A)^T dout and dA = x^T dout B^T, and nothing would ever train.)")
    return diff


# ----------------------------------------------------------------------------------------------------
# 4. merging, 5. saving and loading

def show_merge(pm, base, x):
    section("4. merging: W <- W + scale * A @ B")
    print("On a copy, pm2 = copy.deepcopy(pm), so that pm's base stays bit-identical to the pretrained one.")
    unmerged, _ = pm.forward(x)
    pm2 = copy.deepcopy(pm)
    pm2.merge_adapter()
    merged, _ = pm2.forward(x)
    moved = max(max_diff(pm2.base_model.params[k], base.params[k]) for k in base.params)
    pm2.unmerge_adapter()
    back = max(max_diff(pm2.base_model.params[k], base.params[k]) for k in base.params)
    d_merge = max_diff(merged, unmerged)
    print(f"pm2.merge_adapter() folds each update into its W; the largest weight change was {moved:.4f}.")
    print(f"max |logits merged - logits unmerged| = {d_merge:.2e} (float32 rounding: (x A) B and x (A B) are "
          f"summed in different orders)")
    print(f"pm2.unmerge_adapter() takes it out again, up to rounding: the weights are back to within {back:.1e} "
          f"of the pretrained ones, not bit for bit.")

    plain = copy.deepcopy(pm).merge_and_unload()        # a copy: merge_and_unload changes its base in place
    plain_logits, _ = plain.forward(x)
    lora_keys = [k for k in plain.params if "lora" in k]
    d_plain = max_diff(plain_logits, unmerged)
    print(f"\nplain = copy.deepcopy(pm).merge_and_unload(): a {type(plain).__name__} with {plain.num_parameters():,} parameters "
          f"(the base has {base.num_parameters():,}), {len(lora_keys)} LoRA keys;")
    print(f"max |logits plain - logits unmerged| = {d_plain:.2e}. At inference it costs exactly what the base costs.")
    return dict(merged_vs_unmerged_max_diff=d_merge, unmerge_restores_max_diff=back,
                merge_and_unload_max_diff=d_plain, merged_is_plain_gpt=isinstance(plain, GPT) and not lora_keys,
                merged_num_parameters=plain.num_parameters())


def show_save_load(pm, base_state, x, folder):
    section("5. saving only the adapter")
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
    print(f"Adapter: {adapter_bytes:,} bytes; a full copy of the model: {full_bytes:,} bytes "
          f"(the adapter is {adapter_bytes / full_bytes:.1%} of it, {full_bytes / adapter_bytes:.0f}x smaller).")

    fresh = copy.deepcopy(pm.base_model)                # the pretrained base, as another process would load it
    fresh.load_state_dict(base_state)
    loaded = PeftModel.from_pretrained(fresh, where, adapter_name=name)
    d = max_diff(loaded.forward(x)[0], pm.forward(x)[0])
    print(f"\nloaded = PeftModel.from_pretrained(base, {os.path.relpath(where)!r}): "
          f"max |logits loaded - logits trained| = {d:g}.")
    print(f"Loaded for inference, as in PEFT: loaded.get_nb_trainable_parameters() = "
          f"{loaded.get_nb_trainable_parameters()} (is_trainable=True would let it train on).")
    return dict(adapter_bytes=adapter_bytes, full_copy_bytes=full_bytes, reload_max_diff=d)


# ----------------------------------------------------------------------------------------------------
# 6. one base, many tasks

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
    bars = ax.bar(["one LoRA adapter", "a full copy"], [adapter_bytes / 1e3, full_bytes / 1e3],
                  color=["tab:blue", "tab:gray"])
    ax.bar_label(bars, labels=[f"{adapter_bytes / 1e3:,.0f} kB", f"{full_bytes / 1e3:,.0f} kB"])
    ax.set_ylabel("bytes on disk per task (kB)")
    ax.set_title("What must be stored for each task")
    ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))                 # room for the legend above the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main(steps=600, lr=LR, r=8, lora_alpha=16, target_modules=("c_attn", "c_proj", "c_fc"), batch_size=8,
         task_name="record", second_task="qa", second_steps=300, checkpoint=CHECKPOINT, config=None, n_test=None,
         n_val=VAL_EXAMPLES, seed=0, out_dir=OUT_DIR):
    """Run the lesson.

    steps, lr, batch_size: the first adapter's training (second_steps: the second's); r, lora_alpha,
    target_modules: the LoraConfig of both; task_name, second_task: their tasks; checkpoint: the
    pretrained model (made if missing); config: GPTConfig fields of a random model to use instead (for
    tests); n_test: score only the first n test examples of each task (None: all); n_val: validation
    examples in the validation loss.
    Returns a dict of what it measured (and the paths of its figures).
    """
    os.makedirs(out_dir, exist_ok=True)
    base, tok, data, source = load_base(checkpoint, config, seed)
    world = World(data["world_seed"], data["n_people"])
    tasks = [get_task(name, world) for name in (task_name, second_task)]
    if n_test is not None:
        tasks = [dataclasses.replace(t, test=t.test[:n_test]) for t in tasks]
    task, task2 = tasks
    base_state = base.state_dict()
    x = same_length_prompts(tok, task.val, 8)                                   # (B,T)
    print(f"The base: {source}; {base.config.n_layer} blocks, C = {base.config.n_embd}, "
          f"{base.num_parameters():,} parameters.")

    lora_config = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules))
    pm = get_peft_model(base, lora_config, adapter_name=task.name, seed=seed)
    counts = show_trainable(pm, base.config)
    noop = show_noop(pm, base, x)

    section(f"3. training the {task.name!r} adapter")
    print(f"The task: {task.name}, e.g. {task.train[0][0]!r} -> {task.train[0][1]!r}")
    before = evaluate(pm, tok, task, "test")["accuracy"]
    print(f"Test accuracy before training (the no-op adapter, so the base's): {before:.1%}")
    print(f"train(pm, ...): the loop of lesson 04 on pm.trainable_parameters(), {steps} steps of {batch_size}, "
          f"AdamW lr {lr:g}. The base's weights get no gradient at all.\n")
    history = train_adapter(pm, tok, task, steps, lr, batch_size, seed, n_val)
    after = evaluate(pm, tok, task, "test")
    unchanged = all(np.array_equal(base.params[k], base_state[k]) for k in base_state)
    print(f"\nValidation loss per answer token: {history['val_loss'][0]:.3f} -> {history['val_loss'][-1]:.3f}; "
          f"test accuracy {before:.1%} -> {after['accuracy']:.1%}.")
    print(f"Base weights bit-identical to the pretrained ones after training: {unchanged}")
    for (prompt, answer), pred in list(zip(task.test, after["predictions"]))[:3]:
        print(f"  {prompt!r}\n    truth {answer!r}\n    LoRA  {pred!r}")

    merge = show_merge(pm, base, x)
    saved = show_save_load(pm, base_state, x, os.path.join(out_dir, "adapters"))

    section("6. one base, many tasks")
    print(f"pm.add_adapter({task2.name!r}, LoraConfig(...)); pm.set_adapter({task2.name!r}): a second adapter "
          f"on the same frozen base, trained on {task2.name}, e.g. {task2.train[0][0]!r} -> {task2.train[0][1]!r}\n")
    pm.add_adapter(task2.name, dataclasses.replace(lora_config))
    pm.set_adapter(task2.name)
    pm.train()
    history2 = train_adapter(pm, tok, task2, second_steps, lr, batch_size, seed, n_val)
    passes = second_steps * batch_size / len(task2.train)
    train_end = float(np.mean(history2["train_loss"][-10:]))
    print(f"\n{task2.name} has {len(task2.train)} training examples: {second_steps} steps of {batch_size} read each "
          f"{passes:.1f} times on average. Train loss (last 10 steps) {train_end:.3f}, validation loss "
          f"{history2['val_loss'][-1]:.3f}.")
    with pm.disable_adapter():
        disabled, _ = pm.forward(x)
    d_disabled = max_diff(disabled, base.forward(x)[0])
    print(f"\nwith pm.disable_adapter(): max |logits - logits of the base| = {d_disabled:g}")
    rows = task_table(pm, tok, tasks, n_val)
    print("\nSwitching with pm.set_adapter(name): validation loss per answer token, and test accuracy (exact match)")
    print(f"{'':<24}" + "".join(f"{t.name + ' loss':>14}{t.name + ' accuracy':>16}" for t in tasks))
    for label, row in rows.items():
        cells = [f"{row[t.name]['val_loss']:>14.3f}{row[t.name]['accuracy']:>16.1%}" for t in tasks]
        print(f"{label:<24}" + "".join(cells))
    pm.save_pretrained(os.path.join(out_dir, "adapters"))
    both = sum(saved_bytes(os.path.join(out_dir, "adapters", name)) for name in pm.adapters)
    print(f"\nOn disk: one base ({saved['full_copy_bytes']:,} bytes) + {len(pm.adapters)} adapters ({both:,} bytes), "
          f"against {len(pm.adapters)} full copies ({len(pm.adapters) * saved['full_copy_bytes']:,} bytes).")

    section("figures")
    loss_path = os.path.join(out_dir, "loss_curves.png")
    tasks_path = os.path.join(out_dir, "one_base_many_tasks.png")
    plot_losses({task.name: history, task2.name: history2}, r, batch_size, loss_path)
    plot_many_tasks(rows, saved["adapter_bytes"], saved["full_copy_bytes"], tasks_path)
    print(f"saved {os.path.relpath(loss_path)}: train and validation loss of both adapters")
    print(f"saved {os.path.relpath(tasks_path)}: accuracy of the base and of each adapter, and bytes per task")
    return dict(pretrained=config is None, trainable_params=pm.get_nb_trainable_parameters()[0],
                formula_count=counts["trainable"], noop_max_diff=noop, val_loss_before=history["val_loss"][0],
                val_loss_after=history["val_loss"][-1], accuracy_before=before, accuracy_after=after["accuracy"],
                base_unchanged=unchanged, **merge, **saved, disabled_max_diff=d_disabled,
                second_val_loss_before=history2["val_loss"][0], second_val_loss_after=history2["val_loss"][-1],
                task_table=rows, all_adapters_bytes=both, figures=[loss_path, tasks_path])


if __name__ == "__main__":
    main()

"""
The command line: `python -m tinyllm COMMAND [flags]`.

Each command is two small functions: add_X(subparsers) declares its flags, run_X(args) does the work
and returns the exit status (0 ok, 1 training failed, 2 bad input, 130 interrupted). To add a command,
write the pair and list add_X in COMMANDS.
"""
import argparse
import os
import sys

from .checkpoint import (CheckpointError, atomic_open, can_write_in, check_writable, check_writable_folder,
                         load_pretrained)
from .pretrain import PRETRAIN, PRETRAIN_OUT, QUICK, pretrain
from .train import TrainingError


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line: 'prog: error: ... (see prog --help)', exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def guarded(work):
    """work(), its exit status; a bad input or file is one line and status 2, a training that diverged 1."""
    try:
        return work()
    except (CheckpointError, ValueError) as e:
        return fail(e)
    except TrainingError as e:
        return fail(e, status=1)


def fail(message, status=2):
    print(f"error: {message}", file=sys.stderr)
    return status


# ----------------------------------------------------------------------------------------------------
# pretrain

def add_pretrain(subparsers):
    p = subparsers.add_parser(
        "pretrain", help="train the default small GPT on the synthetic corpus (a few minutes)",
        description="Pretrain the default GPT (4 layers, 128 wide, character vocabulary) on the synthetic "
                    "corpus, print samples, and save a checkpoint that the fine-tuning lessons start from. "
                    "Ctrl-C saves a checkpoint and prints the command that resumes it.")
    p.add_argument("--steps", type=int,
                   help=f"optimizer steps (default {PRETRAIN.max_steps}; {QUICK['max_steps']} with --quick)")
    p.add_argument("--batch-size", type=int, help=f"sequences of 128 characters per step (default "
                   f"{PRETRAIN.batch_size}; {QUICK['batch_size']} with --quick)")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {PRETRAIN.lr:g})")
    p.add_argument("--out", help=f"checkpoint to write (default {PRETRAIN_OUT}, or the --resume file)")
    p.add_argument("--seed", type=int, help=f"seed of the initial weights and of the batches (default {PRETRAIN.seed})")
    p.add_argument("--resume", metavar="PATH", help="continue the run saved in this checkpoint, exactly")
    p.add_argument("--quick", action="store_true", help="a few seconds on a small corpus, for tests")
    p.set_defaults(run=run_pretrain)


def run_pretrain(args):
    if args.out == "":
        return fail("--out must be a file path for the checkpoint, got ''")
    out = args.out or args.resume or PRETRAIN_OUT
    command = f"python -m tinyllm pretrain --resume {out}"

    def work():
        check_writable(out)                     # now, not after the corpus is built
        result = pretrain(out=out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          resume=args.resume, quick=args.quick, resume_command=command)
        return 130 if result["history"]["status"] == "interrupted" else 0
    return guarded(work)


# ----------------------------------------------------------------------------------------------------
# bench

def add_bench(subparsers):
    from .bench import CONFIGS as BENCH_CONFIGS
    p = subparsers.add_parser(
        "bench", help="measure speed: tokens/s, GFLOP/s against the matmul peak, step time per method",
        description="Time forward+backward with one worker and with one per core (and PyTorch eager on the same "
                    "model when torch is installed), each library in a process of its own, the processes taking "
                    "turns; GPT-2 small's load time and memory; profile each layer against the matmul peak; compare "
                    "each fine-tuning method's step time and memory with full fine-tuning and with a model that "
                    "trains nothing; time each method's generation with and without the KV cache. Medians of "
                    "--repeats runs (the peak: the fastest run).")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure; medians are reported (default 5)")
    p.add_argument("--configs", nargs="+", default=list(BENCH_CONFIGS), choices=list(BENCH_CONFIGS),
                   help="model configs to time (default: all; gpt2-*: GPT-2 small's sizes, 124M parameters, with "
                        "random weights)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference even if torch is installed")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    p.set_defaults(run=run_bench)


def run_bench(args):
    import json
    from .bench import run
    if args.repeats < 1:
        return fail(f"--repeats must be at least 1, got {args.repeats}")
    if args.json is not None:
        if args.json == "" or os.path.isdir(args.json):
            return fail(f"--json must be the path of a file to write, got {args.json!r}")
        folder = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(folder) or not can_write_in(folder):     # fail now, not after minutes of timing
            return fail(f"cannot write --json {args.json!r}: {folder!r} is not an existing, writable folder")
    results = run(configs=tuple(args.configs), repeats=args.repeats, torch_ref=not args.no_torch)
    if args.json is not None:
        with atomic_open(args.json) as f:
            f.write(json.dumps(results, indent=2).encode())
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------------
# compare

def add_compare(subparsers):
    from .compare import DEFAULT_OUT, DEFAULT_SETTINGS, DEFAULT_TASK, QUICK_SETTINGS
    from .tasks import TASKS
    p = subparsers.add_parser(
        "compare", help="fine-tune full, LoRA, prefix, prompt, adapter and (IA)^3 side by side, and test the claims",
        description="From one pretrained checkpoint (made first if it does not exist), fine-tune every method on "
                    "the same task, each at the learning rate and step budget the sweep tuned for it, over several "
                    "seeds; measure accuracy, loss, forgetting, time, memory and file sizes; judge the usual claims "
                    "about fine-tuning by explicit rules that account for the noise; write results.json, report.md "
                    "and plots into --out.")
    p.add_argument("--task", default=DEFAULT_TASK, choices=list(TASKS) + ["all"],
                   help=f"the task to fine-tune on (default {DEFAULT_TASK}); all: every task, one after the other, "
                        "the only way to measure the claims about classification")
    p.add_argument("--seeds", type=int, help=f"runs per method, to measure the spread (default "
                                             f"{DEFAULT_SETTINGS.seeds}; {QUICK_SETTINGS.seeds} with --quick)")
    p.add_argument("--seed", type=int, default=0,
                   help="the first seed (default 0): a second run with --seed 10 checks the verdicts on other seeds")
    p.add_argument("--steps", type=int, help="the same number of steps for every method, instead of each one's "
                                             "budget from the sweep (the report then says so)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"folder for results.json, report.md, plots and adapters (default {DEFAULT_OUT})")
    p.add_argument("--checkpoint", help="pretrained checkpoint to start from; made with pretrain if missing "
                                        "(default runs/pretrain/ckpt.npz; with --quick a tiny one in --out)")
    p.add_argument("--quick", action="store_true", help="a smoke test: a tiny pretraining and a few steps prove the "
                                                        "code runs; no verdicts")
    p.set_defaults(run=run_compare)


def run_compare(args):
    from .compare import DEFAULT_CHECKPOINT, DEFAULT_OUT, DEFAULT_TASK, compare
    if args.checkpoint == "":
        return fail("--checkpoint must be the path of a checkpoint, got ''")
    checkpoint = args.checkpoint or (os.path.join(args.out, "pretrain", "ckpt.npz") if args.quick
                                     else DEFAULT_CHECKPOINT)      # where compare looks for it
    try:                                        # found now, before any pretraining or fine-tuning
        check_writable_folder(args.out, "--out")
        if os.path.exists(checkpoint):          # one that does not exist yet, compare makes
            load_pretrained(checkpoint, need_data=True)
    except CheckpointError as e:
        return fail(e)
    flags = [(args.task != DEFAULT_TASK, f"--task {args.task}"),
             (args.seeds is not None, f"--seeds {args.seeds}"), (args.seed != 0, f"--seed {args.seed}"),
             (args.steps is not None, f"--steps {args.steps}"), (args.out != DEFAULT_OUT, f"--out {args.out}"),
             (args.checkpoint is not None, f"--checkpoint {args.checkpoint}"), (args.quick, "--quick")]
    command = " ".join(["python -m tinyllm compare"] + [flag for given, flag in flags if given])

    def work():
        compare(task=args.task, seeds=args.seeds, seed=args.seed, steps=args.steps, out=args.out,
                checkpoint=args.checkpoint, quick=args.quick, command=command)
        return 0
    return guarded(work)


# ----------------------------------------------------------------------------------------------------
# sweep

def add_sweep(subparsers):
    from .presets import MAIN_METHODS, VARIANTS
    from .tasks import TASKS
    p = subparsers.add_parser(
        "sweep", help="tune each method's learning rate and step budget on validation data (about an hour)",
        description="For each method, train at every learning rate of its grid and at doubling budgets until "
                    "the validation loss stops falling; then the variants the tuning claims need. Writes "
                    "tinyllm/sweeps/<task>/*.json, which compare reads. Start two processes with different "
                    "--methods to use both cores.")
    p.add_argument("--task", default="extract", choices=list(TASKS), help="the task to tune on (default extract)")
    p.add_argument("--methods", nargs="*", default=list(MAIN_METHODS), choices=list(MAIN_METHODS),
                   help="methods to sweep (default: all)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="variant groups to run after them (default: all; each needs its method's sweep)")
    p.add_argument("--checkpoint", default=PRETRAIN_OUT, help=f"pretrained model (default {PRETRAIN_OUT})")
    p.add_argument("--out", help="folder for the results (default tinyllm/sweeps/<task>)")
    p.set_defaults(run=run_sweep)


def run_sweep(args):
    from .sweep import sweep
    try:                                        # found now, not after an hour of sweeping
        if args.out is not None:
            check_writable_folder(args.out, "--out")
        load_pretrained(args.checkpoint, need_data=True)
    except CheckpointError as e:
        return fail(e)
    command = " ".join(["python -m tinyllm sweep", f"--task {args.task}", "--methods", *args.methods,
                        "--variants", *args.variants])

    def work():
        sweep(task=args.task, methods=args.methods, variants=args.variants, checkpoint=args.checkpoint,
              out=args.out, command=command)
        return 0
    return guarded(work)


# ----------------------------------------------------------------------------------------------------
# check

def add_check(subparsers):
    from .exercises import EXERCISES
    p = subparsers.add_parser(
        "check", help="check your solution to an exercise in lessons/exercises/ (gradient checks, with hints)",
        description="Import your lessons/exercises/NAME.py, compare its forward with tinyllm's and every gradient "
                    "it returns with centred finite differences and with tinyllm's backward, in float64, and print "
                    "a table; when a check fails, say what the mistake looks like. Exit status 0 when every check "
                    "passes, 1 when one fails or is not implemented yet.")
    p.add_argument("name", nargs="?", choices=list(EXERCISES), metavar="NAME",
                   help=f"the exercise: {', '.join(EXERCISES)}")
    p.add_argument("--file", metavar="PATH", help="your solution (default lessons/exercises/NAME.py)")
    p.add_argument("--list", action="store_true", help="list the exercises, in the order to do them")
    p.set_defaults(run=run_check)


def run_check(args):
    from .exercises import ExerciseError, check, list_exercises
    if args.list:
        list_exercises()
        return 0
    if args.name is None:
        return fail("name the exercise to check, e.g. `python -m tinyllm check gelu`, or list them with "
                    "`python -m tinyllm check --list`")
    try:
        result = check(args.name, args.file)
    except ExerciseError as e:
        return fail(e)
    return 0 if result.ok else 1


# ----------------------------------------------------------------------------------------------------

COMMANDS = [add_pretrain, add_bench, add_compare, add_sweep, add_check]


def build_parser():
    parser = Parser(prog="python -m tinyllm",
                    description="tinyllm: GPT-2 and its fine-tuning methods in NumPy, every gradient by hand.")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(subparsers)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:                   # outside the training loop, which handles its own
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

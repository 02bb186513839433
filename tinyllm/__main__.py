"""
The command line: `python -m tinyllm COMMAND [flags]`.

Each command is two small functions: add_X(subparsers) declares its flags, run_X(args) does the work
and returns the exit status (0 ok, 1 training failed, 2 bad input, 130 interrupted). To add a command,
write the pair and list add_X in COMMANDS.
"""
import argparse
import sys

from .checkpoint import CheckpointError
from .pretrain import PRETRAIN, PRETRAIN_OUT, QUICK, pretrain
from .train import TrainingError


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line: 'prog: error: ... (see prog --help)', exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def fail(message, status=2):
    print(f"error: {message}", file=sys.stderr)
    return status


# ----------------------------------------------------------------------------------------------------
# pretrain

def add_pretrain(subparsers):
    p = subparsers.add_parser(
        "pretrain", help="train the default small GPT on the synthetic corpus (about 3 minutes)",
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
    out = args.out or args.resume or PRETRAIN_OUT
    command = f"python -m tinyllm pretrain --resume {out}"
    try:
        result = pretrain(out=out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          resume=args.resume, quick=args.quick, resume_command=command)
    except (CheckpointError, ValueError) as e:
        return fail(e)
    except TrainingError as e:
        return fail(e, status=1)
    return 130 if result["history"]["status"] == "interrupted" else 0


# ----------------------------------------------------------------------------------------------------
# bench

def add_bench(subparsers):
    p = subparsers.add_parser(
        "bench", help="measure speed: tokens/s, GFLOP/s against the matmul peak, step time per method",
        description="Time forward+backward on the 'lesson' and 'wide' configs (and PyTorch eager on the same "
                    "model when torch is installed), profile each layer against the matmul peak, compare each "
                    "fine-tuning method's step time and memory with full fine-tuning and with a model that trains "
                    "nothing, and time each method's generation with and without the KV cache. Medians of "
                    "--repeats runs, all in this one process (the peak: the fastest run).")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per figure; medians are reported (default 5)")
    p.add_argument("--configs", nargs="+", default=["lesson", "wide"], choices=["lesson", "wide"],
                   help="model configs to time (default: both)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference even if torch is installed")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    p.set_defaults(run=run_bench)


def run_bench(args):
    import json
    from .bench import run
    if args.repeats < 1:
        return fail(f"--repeats must be at least 1, got {args.repeats}")
    if args.json:
        try:
            open(args.json, "a").close()        # fail now, not after minutes of timing
        except OSError as e:
            return fail(f"cannot write --json {args.json!r}: {e.strerror}")
    results = run(configs=tuple(args.configs), repeats=args.repeats, torch_ref=not args.no_torch)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.json}")
    return 0


# ----------------------------------------------------------------------------------------------------
# compare

def add_compare(subparsers):
    from .compare import DEFAULT_OUT, DEFAULT_SETTINGS, DEFAULT_TASK
    from .tasks import TASKS
    p = subparsers.add_parser(
        "compare", help="fine-tune full, LoRA, prefix, prompt and adapter side by side, and test the claims",
        description="From one pretrained checkpoint (made first if it does not exist), fine-tune every method on "
                    "the same task, each at the learning rate and step budget the sweep tuned for it, over several "
                    "seeds; measure accuracy, loss, forgetting, time, memory and file sizes; judge the usual claims "
                    "about fine-tuning by explicit rules that account for the noise; write results.json, report.md "
                    "and plots into --out.")
    p.add_argument("--task", default=DEFAULT_TASK, choices=list(TASKS) + ["all"],
                   help=f"the task to fine-tune on (default {DEFAULT_TASK}); all: every task, one after the other, "
                        "the only way to measure the claims about classification")
    p.add_argument("--seeds", type=int, default=DEFAULT_SETTINGS.seeds,
                   help=f"runs per method, to measure the spread (default {DEFAULT_SETTINGS.seeds})")
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
    from .compare import DEFAULT_OUT, DEFAULT_SETTINGS, DEFAULT_TASK, compare
    flags = [(args.task != DEFAULT_TASK, f"--task {args.task}"),
             (args.seeds != DEFAULT_SETTINGS.seeds, f"--seeds {args.seeds}"), (args.seed != 0, f"--seed {args.seed}"),
             (args.steps is not None, f"--steps {args.steps}"), (args.out != DEFAULT_OUT, f"--out {args.out}"),
             (args.checkpoint is not None, f"--checkpoint {args.checkpoint}"), (args.quick, "--quick")]
    command = " ".join(["python -m tinyllm compare"] + [flag for given, flag in flags if given])
    try:
        compare(task=args.task, seeds=args.seeds if args.seeds != DEFAULT_SETTINGS.seeds or not args.quick else None,
                seed=args.seed, steps=args.steps, out=args.out, checkpoint=args.checkpoint, quick=args.quick,
                command=command)
    except (CheckpointError, ValueError) as e:
        return fail(e)
    except TrainingError as e:
        return fail(e, status=1)
    return 0


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
    command = " ".join(["python -m tinyllm sweep", f"--task {args.task}", "--methods", *args.methods,
                        "--variants", *args.variants])
    try:
        sweep(task=args.task, methods=args.methods, variants=args.variants, checkpoint=args.checkpoint,
              out=args.out, command=command)
    except (CheckpointError, ValueError) as e:
        return fail(e)
    except TrainingError as e:
        return fail(e, status=1)
    return 0


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

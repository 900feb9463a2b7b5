r"""One task over many checkpoints of a model: a CSV row per revision, optionally a PNG plot.

    python scripts/sweep.py --model=EleutherAI/pythia-160m --revisions=step1000,step2000,main \
        --task=perplexity --data=path/to/val_text_document --limit=100000 --out=ppl.csv \
        --plot=ppl.png
    python scripts/sweep.py --model=EleutherAI/pythia-160m --revisions=all \
        --task=lambada_openai --out=lambada.csv --plot=lambada.png
    python scripts/sweep.py --model=runs/tiny --revisions=all --task=memorization \
        --data=path/to/document --start_row=0 --end_row=1024 --out=mem.csv --plot=mem.png

--model: a hub id (revisions = branch names; `all` = Pythia's 154 steps), a training workdir
(revisions = step numbers; `all` = every saved step) or a folder with one model directory per
revision. Revisions already in --out are skipped; the `compiles` column counts the XLA
compilations each revision triggered; `same_weights_as` flags a revision whose weights equal an
earlier one's.
"""

import sys

from absl import flags

from pythia_jax.cli import default_lambada_path, parse_model_flags

TASKS = ("perplexity", "lambada_openai", "memorization")
DEFAULT_METRIC = {"perplexity": "perplexity", "lambada_openai": "acc",
                  "memorization": "memorized_fraction"}

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", None, "hub id / training workdir / folder of revision dirs",
                    flag_values=FLAGS)
flags.DEFINE_string("revisions", "all", "comma list of revisions, or all", flag_values=FLAGS)
flags.DEFINE_string("task", None, f"one of {', '.join(TASKS)}", flag_values=FLAGS)
flags.DEFINE_string("out", None, "results CSV (resumed when it exists)", flag_values=FLAGS)
flags.DEFINE_string("plot", None, "write a PNG of --metric against step", flag_values=FLAGS)
flags.DEFINE_string("metric", None, "column to plot (default: perplexity / acc / "
                    "memorized_fraction)", flag_values=FLAGS)
flags.DEFINE_string("data", None, "perplexity / memorization: .bin/.idx prefix; lambada: "
                    ".jsonl (default: the hub dataset's LAMBADA test set)", flag_values=FLAGS)
flags.DEFINE_integer("limit", None, "perplexity: first N tokens; lambada: first N examples",
                     flag_values=FLAGS)
flags.DEFINE_integer("context_length", None, "perplexity window", flag_values=FLAGS)
flags.DEFINE_integer("start_row", 0, "memorization: first row", flag_values=FLAGS)
flags.DEFINE_integer("end_row", None, "memorization: one past the last row", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", 16, "rows per compiled call", flag_values=FLAGS)
flags.DEFINE_string("tokenizer", None, "lambada: tokenizer (default: bundled NeoX-20B)",
                    flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "parameter dtype",
                  flag_values=FLAGS)
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16", "float16"],
                  "activation dtype", flag_values=FLAGS)


def _err(msg: str) -> int:
    print(f"sweep: error: {msg}", file=sys.stderr)
    return 2


def _make_task():
    from pythia_jax import evaluate as ev
    from pythia_jax.research import memorization as mem

    if FLAGS.task == "perplexity":
        def task(model):
            r = ev.evaluate_token_stream(model, FLAGS.data, context_length=FLAGS.context_length,
                                         max_tokens=FLAGS.limit, batch_size=FLAGS.batch_size)
            return {k: r[k] for k in ("nll", "perplexity", "token_accuracy")}
        return task
    if FLAGS.task == "lambada_openai":
        from pythia_jax.tokenizer import load_tokenizer
        tok = load_tokenizer(FLAGS.tokenizer) if FLAGS.tokenizer else load_tokenizer()
        path = FLAGS.data or default_lambada_path()

        def task(model):
            r = ev.evaluate_lambada(model, tok, path, limit=FLAGS.limit,
                                    batch_size=FLAGS.batch_size)
            return {k: r[k] for k in ("acc", "perplexity", "mean_loglikelihood")}
        return task
    ds = mem.open_rows(FLAGS.data)
    mem.check_row_range(ds, FLAGS.start_row, FLAGS.end_row)
    mem.read_rows(ds, [FLAGS.start_row, FLAGS.end_row - 1])
    rows = range(FLAGS.start_row, FLAGS.end_row)

    def task(model):
        res = mem.memorize_rows(model, ds, rows, batch_size=FLAGS.batch_size)
        s = mem.summarize(res)
        return {k: s[k] for k in ("memorized_fraction", "mean_score", "mean_true_logprob")}
    return task


def main(argv=None) -> int:
    error = parse_model_flags(FLAGS, argv)
    if error:
        return _err(error)
    if FLAGS.task not in TASKS:
        return _err(f"unknown task {FLAGS.task!r}: expected --task= one of {', '.join(TASKS)}")
    if not FLAGS.out:
        return _err("--out is required (the results CSV)")
    if FLAGS.task in ("perplexity", "memorization") and not FLAGS.data:
        return _err(f"--data is required for --task={FLAGS.task} (a .bin/.idx prefix)")
    if FLAGS.task == "memorization" and FLAGS.end_row is None:
        return _err("--end_row is required for --task=memorization")
    if FLAGS.batch_size < 1:
        return _err(f"--batch_size must be >= 1, got {FLAGS.batch_size}")
    metric = FLAGS.metric or DEFAULT_METRIC[FLAGS.task]

    from pythia_jax.research import sweep as sw

    try:
        revs = sw.resolve_revisions(FLAGS.model, FLAGS.revisions)
        sw.read_results(FLAGS.out)  # a malformed results file fails before any loading
        task = _make_task()
        rows = sw.sweep(FLAGS.model, revs, task, FLAGS.out, dtype=FLAGS.dtype,
                        compute_dtype=FLAGS.compute_dtype,
                        log=lambda m: print(m, file=sys.stderr))
        if FLAGS.plot:
            sw.plot_sweep(rows, metric, FLAGS.plot, title=f"{FLAGS.model}: {FLAGS.task}")
    except (ValueError, TypeError, OSError) as e:
        return _err(str(e))
    flagged = [r["revision"] for r in rows if r["same_weights_as"]]
    print(f"sweep: {len(rows)} revision(s) in {FLAGS.out}"
          + (f"; same weights as another revision: {', '.join(flagged)}" if flagged else ""))
    return 0


def run():
    """Console command `pythia-jax-sweep` (pyproject.toml [project.scripts])."""
    sys.exit(main())


if __name__ == "__main__":
    run()

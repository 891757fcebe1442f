"""--profile's table: every layer type of a tiny model gets its time, the shares add up, the trace is written."""
import json
import re

import pytest
import torch

from profiling import profile_decode
from qlinear import QuantFormat, rtn_layer
from tests.test_default_model import run_generate
from tests.test_model import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

def test_profile_table_groups_decode_time_by_layer_type(tmp_path):
    model = tiny_model()
    model.layers[0].feed_forward.w1 = rtn_layer(model.layers[0].feed_forward.w1.weight.detach(),
                                                QuantFormat.parse("int4-g32-asym"))
    model.setup_caches(1, 64)
    prompt = torch.tensor([1, 2, 3, 4], dtype=torch.int)
    table = profile_decode(model, prompt, 8, tmp_path / "trace.json")
    rows = dict(re.findall(r"^\| (.+?) \| [^|]+ \| [0-9.]+ \| (-?[0-9]+)% \|$", table, re.MULTILINE))
    assert set(rows) == {"linear float32", "linear int4-g32-asym", "attention", "norms/rope", "sampling", "other"}
    assert all(int(share) >= 0 for share in rows.values())
    assert 97 <= sum(int(share) for share in rows.values()) <= 103
    assert "| linear float32 | 14 |" in table  # 2 layers x 7 linears, less the quantized one, and the head
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]


def test_cli_profile_prints_the_table_and_writes_the_trace(tmp_path):
    r = run_generate("--max_new_tokens", "6", "--threads", "1", "--dtype", "float32", "--profile", str(tmp_path))
    assert r.returncode == 0, r.stderr
    # SmolLM2: 30 layers of 4 linear calls (q|k|v and gate|up fused at load, wo, w2) and the head
    assert "| linear float32 | 121 |" in r.stderr and "| attention | 30 |" in r.stderr
    assert (tmp_path / "decode_trace.json").is_file()

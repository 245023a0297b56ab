"""Parameter counts: ours equals transformers.LlamaForCausalLM for every size (meta device, no allocation)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tools.param_counts import SIZES, count_hf, count_ours, llama_args, main, markdown, rows  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# (size, vocab) -> (low, high) bounds on the total: the sizes are named after their count at vocab 32000
# (GaLore's table), the exact values are checked against HF below rather than hard-coded.
BALLPARK = {"60m": (55e6, 65e6), "130m": (125e6, 140e6), "350m": (340e6, 380e6), "1b": (1.2e9, 1.4e9),
            "7b": (6.5e9, 7.0e9)}


@pytest.mark.parametrize("size", SIZES)
def test_ours_equals_hf(size):
    args = llama_args(size, 8192 if size == "tiny" else 32000)
    assert count_ours(args) == count_hf(args)


@pytest.mark.parametrize("size", sorted(BALLPARK))
def test_ballpark_of_names(size):
    total, non_emb = count_ours(llama_args(size, 32000))
    lo, hi = BALLPARK[size]
    assert lo <= total <= hi, (size, total)
    a = llama_args(size, 32000)
    assert total - non_emb == 2 * 32000 * a.dim  # untied embeddings: embed_tokens + lm_head


def test_closed_form_matches():
    for size in SIZES:
        a = llama_args(size, 32000)
        per_layer = 4 * a.dim * a.dim + 3 * a.dim * a.intermediate_size + 2 * a.dim
        assert count_ours(a)[0] == 2 * a.vocab_size * a.dim + a.n_layers * per_layer + a.dim


def test_meta_device_allocates_nothing():
    # Building 7B for counting must not touch real memory: no parameter of ours lives off the meta device.
    from model.llama import Llama
    with torch.device("meta"):
        m = Llama(llama_args("7b", 32000))
    assert all(p.is_meta for p in m.parameters())


def test_table_and_cli():
    table = rows(sizes=["tiny", "60m"])
    assert [r["size"] for r in table] == ["tiny", "60m"] and all(r["match"] for r in table)
    assert table[0]["vocab"] == 8192 and table[1]["vocab"] == 32000
    md = markdown(table)
    assert md.startswith("| size") and "| 60m | 32000 |" in md and f"{table[1]['hf']:,}" in md
    assert main(["--sizes", "tiny", "--json"]) == 0
    out = subprocess.run([sys.executable, "tools/param_counts.py", "--sizes", "tiny,7b"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| 7b | 32000 |" in out.stdout and "**NO**" not in out.stdout

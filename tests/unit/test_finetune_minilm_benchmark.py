"""benchmarks/finetune_minilm.py at toy size: a tiny random BERT written by transformers, fine-tuned for two
timed steps by both sides on the same batches; the first-batch losses agree and the report carries what
BENCHMARKS.md quotes (examples/s, the ratio, the memory rise)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared machine: more threads only spin."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny_bert(d, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=40, type_vocab_size=2)  # fmt: skip
    model = transformers.BertModel(cfg)
    with torch.no_grad():  # random norms and biases too, so a part one side leaves out shows in the loss
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(d)
    return d


def _batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        T = 6 + i
        lengths = torch.randint(3, T + 1, (4,), generator=g)
        lengths[0] = T
        mask = torch.arange(T)[None] < lengths[:, None]
        ids = torch.where(mask, torch.randint(1, 60, (4, T), generator=g), 0)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 2, (4,), generator=g)})
    return out


def test_finetune_benchmark_trains_both_sides_on_a_tiny_bert(tmp_path):
    from benchmarks.finetune_minilm import run

    src = _tiny_bert(tmp_path / "bert")
    report = run(src, _batches(3), dtypes=["fp32", "bf16"], warmup=1, round_steps=1, lr=1e-3, memory=False, threads=1)
    assert report["machine"]["cpu"] and report["machine"]["torch"] == torch.__version__
    for dtype, tol in (("fp32", 1e-5), ("bf16", 2e-2)):
        res = report["results"][dtype]
        assert res["steps"] == 2 and res["examples"] == 8
        assert res["first_batch_loss_diff"] < tol, res  # the same weights give the same loss
        for side in ("selfattn", "transformers"):
            row = res["sides"][side]
            assert row["examples_per_s"] > 0 and row["first_batch_loss"] > 0 and torch.isfinite(torch.tensor(row["mean_train_loss"]))
        assert res["ratio"] > 0


@pytest.mark.slow  # two child processes, each importing torch and transformers
def test_finetune_benchmark_measures_each_sides_memory_in_its_own_process(tmp_path):
    from benchmarks.finetune_minilm import measure_memory

    mem = measure_memory(_tiny_bert(tmp_path / "bert"), _batches(2), "fp32", threads=1)
    for side in ("selfattn", "transformers"):
        assert mem[side]["base_mib"] > 0 and mem[side]["peak_rise_mib"] >= 0
